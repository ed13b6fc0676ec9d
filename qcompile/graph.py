"""Loading, checking and converting ONNX models (onnx.ModelProto <-> onnx-graphsurgeon Graph)."""
from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .lut import DOMAIN as LUT_DOMAIN, packing
from .errors import QCompileError, first_line
from .intake import refuse_unsupported


MICROSOFT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (DynamicQuantizeMatMul)


def load_model(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read and check a float model; every problem is a one-line QCompileError."""
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        path = Path(source)
        if not path.is_file():
            raise QCompileError(f"{path}: no such file")
        try:
            model = onnx.load(str(path))
        except (DecodeError, ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as error:
            raise QCompileError(f"{path}: not an ONNX model ({first_line(error)})") from None
    if not model.graph.node:
        raise QCompileError("not an ONNX model: the graph has no nodes")
    refuse_unsupported(model)  # before the checker: its message is clearer than the checker's would be
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise QCompileError(f"the model fails the ONNX checker: {first_line(error)}") from None
    return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, strict_mode=True))


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keep the original model's metadata, and check the result strictly."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = like.ir_version
    model.producer_name, model.producer_version = like.producer_name, like.producer_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    if any(node.domain == LUT_DOMAIN for node in model.graph.node):
        packing.add_functions(model)
    if any(node.domain == MICROSOFT_DOMAIN for node in model.graph.node) and \
            not any(o.domain == MICROSOFT_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MICROSOFT_DOMAIN, 1))
    check_rewritten(model)
    return model


def check_rewritten(model: onnx.ModelProto) -> None:
    """A pass must leave a graph that passes the checker and strict shape inference."""
    onnx.checker.check_model(model, full_check=True)


def replace_input(old: gs.Tensor, new: gs.Tensor, consumers=None) -> None:
    """Make `consumers` ((node, input index) pairs; default: every reader of `old`) read `new`."""
    if consumers is None:
        consumers = [(node, i) for node in list(old.outputs) for i, t in enumerate(node.inputs) if t is old]
    for node, index in consumers:
        node.inputs[index] = new
