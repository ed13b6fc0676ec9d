"""InsertQDQ: materialise the plan as QuantizeLinear/DequantizeLinear nodes.

Pattern -> rewrite, for each spec with calibrated parameters:
    activation x -> consumer      ->  x -> QuantizeLinear -> DequantizeLinear -> consumer
    weight W (float) -> consumer  ->  W_q (int8 initializer) -> DequantizeLinear(axis) -> consumer
    bias b (float) -> Conv / Gemm ->  b_q (int32 initializer) -> DequantizeLinear(axis 0) -> Conv / Gemm
Only the planned (consumer, input) pairs are rewired; other readers keep the float tensor, and a
float weight nobody reads any more is dropped. Names derive from the tensor's, so the output is
deterministic.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph import replace_input
from qcompile.numerics import quantize
from qcompile.pipeline import CompileContext, PassResult
from qcompile.plan import QuantParams, TensorSpec


class InsertQDQ:
    name = "insert-qdq"

    def run(self, context: CompileContext) -> PassResult:
        graph, plan = context.graph, context.plan
        tensors = graph.tensors()
        nodes = {node.name: node for node in graph.nodes}
        inserted = 0
        for spec in plan.specs.values():
            params = plan.params.get(spec.tensor)
            if params is None:
                continue
            dequantized = _dequantized(graph, tensors[spec.tensor], spec, params)
            replace_input(tensors[spec.tensor], dequantized, [(nodes[name], index) for name, index in spec.consumers])
            inserted += 1
        return PassResult(inserted, f"quantized {inserted} tensors")


def _dequantized(graph: gs.Graph, tensor: gs.Tensor, spec: TensorSpec, params: QuantParams) -> gs.Variable:
    scale = gs.Constant(f"{spec.tensor}_scale", params.scale)
    zero_point = gs.Constant(f"{spec.tensor}_zero_point", params.zero_point)
    axis_attrs = {"axis": spec.axis} if spec.axis is not None else {}
    if spec.kind in ("weight", "bias"):
        values = tensor.values
        broadcast = _per_channel_shape(values.ndim, spec.axis)
        codes = quantize(values, params.scale.reshape(broadcast), params.zero_point.reshape(broadcast).astype(np.float64), spec.grid)
        quantized = gs.Constant(f"{spec.tensor}_quantized", codes)
    else:
        quantized = gs.Variable(f"{spec.tensor}_quantized", dtype=spec.grid.dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{spec.tensor}_QuantizeLinear", inputs=[tensor, scale, zero_point],
                                   outputs=[quantized]))
    dequantized = gs.Variable(f"{spec.tensor}_dequantized", dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{spec.tensor}_DequantizeLinear", attrs=axis_attrs,
                               inputs=[quantized, scale, zero_point], outputs=[dequantized]))
    return dequantized


def _per_channel_shape(rank: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * rank
    shape[axis] = -1
    return tuple(shape)
