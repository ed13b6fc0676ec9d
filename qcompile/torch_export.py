"""PyTorch -> ONNX export with the dynamo exporter (it matched PyTorch where the old one did not)."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch


def to_onnx(module: torch.nn.Module, example: dict[str, np.ndarray | torch.Tensor], output_names: list[str] | None,
            dynamic_axes: tuple[str, ...] = ("batch", "sequence"), translations: dict | None = None) -> onnx.ModelProto:
    """Export `module(*example.values())`; axis i of every input becomes the dynamic dim
    `dynamic_axes[i]`. `translations` maps custom torch ops to ONNX functions."""
    names = list(example)
    tensors = tuple(torch.as_tensor(example[name]) for name in names)
    dims = [torch.export.Dim(axis_name) for axis_name in dynamic_axes]
    dynamic_shapes = tuple({axis: dims[axis] for axis in range(min(len(dims), t.dim()))} for t in tensors)
    # The exporter logs that torchvision ops are unavailable; we export no torchvision ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tensors, input_names=names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False,
                                    custom_translation_table=translations)
    return program.model_proto


def export_module(module: torch.nn.Module, example: dict[str, np.ndarray], path: Path, output_names: list[str],
                  dynamic_axes: tuple[str, ...] = ("batch", "sequence")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(module, example, output_names, dynamic_axes), str(path))
    return path


def export_for_compile(module: torch.nn.Module, example_inputs) -> onnx.ModelProto:
    """Any module -> ONNX for qcompile.compile: `example_inputs` is a {name: array} dict (names
    become the graph's input names, as calibration data keys them) or a tuple of arrays (named
    after forward's parameters). Only the batch axis (0) is dynamic."""
    from .errors import QCompileError, first_line

    if example_inputs is None:
        raise QCompileError("compiling a torch.nn.Module needs example_inputs (a {name: array} dict or a tuple)")
    if not isinstance(example_inputs, dict):
        arrays = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        parameters = [name for name, p in inspect.signature(module.forward).parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(parameters) < len(arrays):
            raise QCompileError(f"{len(arrays)} example inputs, but forward takes {len(parameters)} positional arguments")
        example_inputs = dict(zip(parameters, arrays))
    module = module.eval()
    try:
        return to_onnx(module, example_inputs, None, dynamic_axes=("batch",))
    except Exception as error:  # the exporter's many error types: the module is the user's
        raise QCompileError(f"torch.onnx.export (dynamo) failed: {first_line(error)}") from None
