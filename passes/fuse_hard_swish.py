"""FuseHardSwish: write hard-swish activations spelled out in elementwise ops as one or two ops.

Pattern -> rewrite:
    x -> Add(3) -> Clip(0, 6) -> Mul(x, .) -> Div(6)      ->  x -> HardSigmoid(1/6, 1/2) -> Mul(x, .)   (PaddlePaddle's export)
    x -> HardSigmoid(1/6, 1/2) -> Mul(x, .)              ->  x -> HardSwish                            (opset >= 14; PyTorch's at 13)
Both compute x * clip(x / 6 + 1/2, 0, 1). The activations between integer Convs run in float: each
op is a pass over a whole feature map, and on PP-OCRv4 these four ops made up most of the float
time left in the W8A8 artifact.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult

SIXTH = 1 / 6


class FuseHardSwish:
    name = "fuse-hard-swish"

    def run(self, context: CompileContext) -> PassResult:
        graph = context.graph
        outputs = {tensor.name for tensor in graph.outputs}
        spelled_out = 0
        for divide in [node for node in graph.nodes if node.op == "Div"]:
            source = _spelled_out_source(divide, outputs)
            if source is not None:
                gate = gs.Variable(f"{divide.name}_hard_sigmoid", dtype=np.float32, shape=source.shape)
                product = divide.outputs[0]
                divide.outputs.clear()
                graph.nodes.append(gs.Node("HardSigmoid", f"{divide.name}_HardSigmoid", {"alpha": SIXTH, "beta": 0.5},
                                           inputs=[source], outputs=[gate]))
                graph.nodes.append(gs.Node("Mul", f"{divide.name}_Mul", inputs=[source, gate], outputs=[product]))
                spelled_out += 1
        graph.cleanup().toposort()
        fused = 0
        if graph.opset >= 14:  # HardSwish exists from opset 14
            for gate_node in [node for node in graph.nodes if node.op == "HardSigmoid"]:
                multiply = _hard_swish_mul(gate_node, outputs)
                if multiply is not None:
                    product = multiply.outputs[0]
                    multiply.outputs.clear()
                    gate_node.op, gate_node.attrs = "HardSwish", {}
                    gate_node.outputs[0] = product
                    fused += 1
            graph.cleanup()
        return PassResult(spelled_out + fused, f"wrote {spelled_out} x * Clip(x + 3, 0, 6) / 6 as x * HardSigmoid(x), "
                                               f"fused {fused} x * HardSigmoid(x) into HardSwish")


def _spelled_out_source(divide: gs.Node, graph_outputs: set[str]) -> gs.Tensor | None:
    """x, if `divide` ends Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) with every step read only by the next."""
    multiply = _only_producer(divide.inputs[0], graph_outputs)
    if multiply is None or multiply.op != "Mul" or not _is_scalar(divide.inputs[1], 6.0):
        return None
    for source, clipped in (multiply.inputs, multiply.inputs[::-1]):
        clip = _only_producer(clipped, graph_outputs)
        if clip is None or clip.op != "Clip" or len(clip.inputs) != 3:
            continue
        add = _only_producer(clip.inputs[0], graph_outputs)
        if (add is not None and add.op == "Add" and _is_scalar(clip.inputs[1], 0.0) and _is_scalar(clip.inputs[2], 6.0)
                and any(a is source and _is_scalar(b, 3.0) for a, b in (add.inputs, add.inputs[::-1]))):
            return source
    return None


def _hard_swish_mul(gate_node: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    """The Mul(x, HardSigmoid(x)) that reads `gate_node`, if it is a hard swish."""
    gate = gate_node.outputs[0]
    if (len(gate.outputs) != 1 or gate.name in graph_outputs or not np.isclose(gate_node.attrs.get("alpha", 0.2), SIXTH)
            or not np.isclose(gate_node.attrs.get("beta", 0.5), 0.5)):
        return None
    multiply = gate.outputs[0]
    source = gate_node.inputs[0]
    return multiply if multiply.op == "Mul" and {id(t) for t in multiply.inputs} == {id(source), id(gate)} else None


def _only_producer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The node making `tensor`, when that tensor has this one reader and is not a graph output."""
    if len(tensor.inputs) != 1 or len(tensor.outputs) != 1 or tensor.name in graph_outputs:
        return None
    return tensor.inputs[0]


def _is_scalar(tensor: gs.Tensor, value: float) -> bool:
    return isinstance(tensor, gs.Constant) and tensor.values.size == 1 and np.isclose(float(tensor.values.ravel()[0]), value)
