"""DequantizeAfterGather: gather integer rows, then dequantize only those.

Pattern -> rewrite:
    W_q -> DequantizeLinear(s, z, axis=a) -> Gather(axis=g, indices) -> y
    W_q -> Gather(axis=g, indices) -> DequantizeLinear(s, z, axis=a') -> y
where a != g and a' is where axis a lands in Gather's output. The result is identical, but ONNX
Runtime no longer dequantizes the whole table (for MiniLM's word embeddings, 11.7M values) on
every run. Per-tensor parameters (no axis) move the same way.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult


class DequantizeAfterGather:
    name = "dequantize-after-gather"

    def run(self, context: CompileContext) -> PassResult:
        moved = 0
        for gather in [node for node in context.graph.nodes if node.op == "Gather"]:
            if _swap(context.graph, gather):
                moved += 1
        return PassResult(moved, f"moved {moved} DequantizeLinear nodes after their Gather")


def _swap(graph: gs.Graph, gather: gs.Node) -> bool:
    table = gather.inputs[0]
    dequantize = table.inputs[0] if len(table.inputs) == 1 else None
    if dequantize is None or dequantize.op != "DequantizeLinear" or not isinstance(dequantize.inputs[0], gs.Constant):
        return False
    codes, scale, zero_point = dequantize.inputs
    rank, index_rank = len(codes.shape), len(gather.inputs[1].shape)
    gather_axis = gather.attrs.get("axis", 0) % rank
    attrs = {}
    if "axis" in dequantize.attrs:
        channel_axis = dequantize.attrs["axis"] % rank
        if channel_axis == gather_axis:
            return False  # each gathered slice would need its own scale
        attrs["axis"] = channel_axis if channel_axis < gather_axis else channel_axis - 1 + index_rank
    output = gather.outputs[0]
    gathered = gs.Variable(f"{output.name}_gathered_codes", dtype=codes.dtype, shape=output.shape)
    gather.inputs[0] = codes
    gather.outputs[0] = gathered
    graph.nodes.append(gs.Node("DequantizeLinear", f"{gather.name}_DequantizeLinear", attrs=attrs,
                               inputs=[gathered, scale, zero_point], outputs=[output]))
    return True
