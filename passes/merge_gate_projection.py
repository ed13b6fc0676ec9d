"""MergeGateProjection: compute an attention gate's projection in the MatMul of its neighbour.

Pattern -> rewrite (x is read by both projections; W, b constants):
    x -> MatMul(Ws) -> Add(bs) -> s          x -> MatMul([Ws | Wg]) -> Add([bs | bg]) -> Split -> s
    x -> MatMul(Wg) -> Add(bg) -> Sigmoid ->   =>                                          \\-> Sigmoid ->
One MatMul reads (and, quantized, quantizes) x once instead of twice; each output column is the
same dot product as before, so the result is exact. The Sigmoid and the multiply stay where they
are: on the per-head context (tokens x head dim values per head), cheaper than on the attention
probabilities (tokens x tokens). A gate with no sibling projection is left alone, with a note.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult

MIN_SPLIT_OPSET = 13  # Split takes its sizes as an input from opset 13


class MergeGateProjection:
    name = "merge-gate-projection"

    def run(self, context: CompileContext) -> PassResult:
        graph = context.graph
        merged = 0
        for sigmoid in [node for node in graph.nodes if node.op == "Sigmoid"]:
            gate = _projection(sigmoid.inputs[0])
            if gate is None:
                continue  # not a projection: not a gate
            # (nodes replaced by an earlier merge have no outputs until cleanup)
            sibling = next((p for node in graph.nodes if node is not gate[0] and node.op == "MatMul" and node.outputs
                            and node.inputs[0] is gate[0].inputs[0] and (p := _projection(_final(node))) is not None), None)
            if sibling is None:
                context.note(self.name, sigmoid.name, "gate kept separate: no other projection reads its input")
            elif graph.opset < MIN_SPLIT_OPSET:
                context.note(self.name, sigmoid.name, f"gate kept separate: opset {graph.opset} < {MIN_SPLIT_OPSET}")
            else:
                _merge(graph, sibling, gate)
                merged += 1
                context.note(self.name, sigmoid.name, f"gate projection merged into {sibling[0].name}")
        return PassResult(merged, f"merged {merged} gate projections into their neighbours")


def _final(matmul: gs.Node) -> gs.Tensor:
    """The MatMul's output, or its bias Add's output when a constant bias follows."""
    readers = matmul.outputs[0].outputs
    if len(readers) == 1 and readers[0].op == "Add" and _bias(readers[0], matmul) is not None:
        return readers[0].outputs[0]
    return matmul.outputs[0]


def _bias(add: gs.Node, matmul: gs.Node) -> gs.Constant | None:
    other = next((t for t in add.inputs if t is not matmul.outputs[0]), None)
    return other if isinstance(other, gs.Constant) and other.values.ndim == 1 else None


def _projection(tensor: gs.Tensor):
    """(MatMul, bias Add or None) producing `tensor` as x @ W (+ b), W a constant matrix."""
    producer = tensor.inputs[0] if tensor.inputs else None
    add = producer if producer is not None and producer.op == "Add" else None
    matmul = next((t.inputs[0] for t in add.inputs if t.inputs and t.inputs[0].op == "MatMul"), None) if add else producer
    if matmul is None or matmul.op != "MatMul" or not isinstance(matmul.inputs[1], gs.Constant):
        return None
    if matmul.inputs[1].values.ndim != 2 or len(matmul.outputs[0].outputs) != 1:
        return None
    if add is not None and _bias(add, matmul) is None:
        return None
    return matmul, add


def _merge(graph: gs.Graph, sibling, gate) -> None:
    (sibling_matmul, sibling_add), (gate_matmul, gate_add) = sibling, gate
    name = sibling_matmul.name
    outputs = [_final(sibling_matmul), _final(gate_matmul)]
    weights = [sibling_matmul.inputs[1].values, gate_matmul.inputs[1].values]
    has_bias = sibling_add is not None or gate_add is not None
    biases = [_bias(add, matmul).values if add is not None else np.zeros(w.shape[1], np.float32)
              for (matmul, add), w in ((sibling, weights[0]), (gate, weights[1]))]
    for node in (sibling_matmul, sibling_add, gate_matmul, gate_add):  # cleanup drops them
        if node is not None:
            node.outputs.clear()
    projected = gs.Variable(f"{name}_merged", dtype=np.float32)
    graph.nodes.append(gs.Node("MatMul", f"{name}_merged", outputs=[projected], inputs=[
        sibling_matmul.inputs[0], gs.Constant(f"{name}_merged_weight", np.concatenate(weights, axis=1))]))
    if has_bias:
        biased = gs.Variable(f"{name}_merged_biased", dtype=np.float32)
        graph.nodes.append(gs.Node("Add", f"{name}_merged_bias", outputs=[biased],
                                   inputs=[projected, gs.Constant(f"{name}_merged_bias", np.concatenate(biases))]))
        projected = biased
    sizes = gs.Constant(f"{name}_split_sizes", np.array([w.shape[1] for w in weights], np.int64))
    graph.nodes.append(gs.Node("Split", f"{name}_split", attrs={"axis": -1}, inputs=[projected, sizes], outputs=outputs))
