"""PyTorch -> ONNX export with the dynamo exporter (it matched PyTorch where the old one did not)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch


def export_module(module: torch.nn.Module, example: dict[str, np.ndarray], path: Path, output_names: list[str],
                  dynamic_axes: tuple[str, ...] = ("batch", "sequence")) -> Path:
    """Export `module(**example)`; axis i of every input becomes the dynamic dim `dynamic_axes[i]`."""
    names = list(example)
    tensors = tuple(torch.from_numpy(example[name]) for name in names)
    dims = [torch.export.Dim(axis_name) for axis_name in dynamic_axes]
    dynamic_shapes = {name: {axis: dims[axis] for axis in range(min(len(dims), example[name].ndim))} for name in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs that torchvision ops are unavailable; we export no torchvision ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tensors, input_names=names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes,
                                    dynamo=True, verbose=False)
    program.save(str(path))
    return path
