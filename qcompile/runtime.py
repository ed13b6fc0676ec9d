"""ONNX Runtime sessions: the one place where qcompile opens them."""
from __future__ import annotations

import ctypes
import sys

import onnx
import onnxruntime as ort

from .errors import QCompileError
from .lut import DOMAIN as LUT_DOMAIN, ops

# Fixed thread count for calibration and verification: results must not depend on the machine.
DETERMINISTIC_THREADS = 2


def make_session(model: onnx.ModelProto | str, threads: int = DETERMINISTIC_THREADS,
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 use_library: bool | None = None, optimized_path=None, profile_prefix=None) -> ort.InferenceSession:
    """optimized_path: where ONNX Runtime writes the graph it optimized (what it actually runs).
    use_library: register qcompile's custom-op library, built on first use (True); run the models'
    standard-op fallback functions instead (False); or register it when the model has qcompile ops,
    falling back with a one-line note where it cannot be built (None).
    profile_prefix: turn on ONNX Runtime's profiler, writing its JSON file under this prefix."""
    options = ort.SessionOptions()
    custom_ops = _uses_custom_ops(model)
    if use_library is None and custom_ops:
        try:
            ops.register(options)
        except QCompileError as error:
            print(f"qcompile: {error}; running the standard-op fallback (slower)", file=sys.stderr, flush=True)
    elif use_library:
        ops.register(options)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = optimization
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
    options.log_severity_level = 4  # fatal only: its errors reach the caller as exceptions, not stderr lines
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    if custom_ops:
        _return_freed_memory()
    return session


def _return_freed_memory() -> None:
    """Give the heap ONNX Runtime freed back to the system. Folding lookup-table weights at session start
    allocates and frees about 40 bytes per weight (the decode's index arithmetic); glibc keeps that
    heap, so a whole-MiniLM --acts dynamic session stayed at 540 MB resident instead of 37 MB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _uses_custom_ops(model: onnx.ModelProto | str) -> bool:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model, load_external_data=False)
    return any(o.domain == LUT_DOMAIN for o in model.opset_import)


def with_extra_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named float tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {output.name for output in exposed.graph.output}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed
