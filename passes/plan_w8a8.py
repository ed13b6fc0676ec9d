"""PlanW8A8: decide which tensors get 8-bit quantization, before any node is inserted.

Pattern -> plan (the graph is not changed):
    MatMul / Gemm / Conv with a constant float weight  ->  weight: int8 (or int4) symmetric, per output channel
    Gather from a constant float table (embedding)     ->  weight: the same, per last-axis channel
    their float activation input(s)                     ->  activation: uint8, per tensor, calibrated
    MatMul of two activations (attention Q.K^T, P.V)    ->  both inputs (if quantize_attention)
    ... whose input is a Softmax or Sigmoid output      ->  uint8 with the fixed range [0, 1]
    ... or the output of a Clip with constant bounds    ->  uint8 with those bounds (clipped softmax: [0, 1])
    Add of two activations of one shape (residual)      ->  both inputs (if quantize_residual_adds)
Every other compute node stays in float and is listed, with the reason, in plan.skipped.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult
from qcompile.plan import QuantPlan, SkippedNode, TensorSpec

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
# Ops that move or select data; they carry no arithmetic worth listing as "kept in float".
DATA_MOVEMENT_OPS = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Gather", "GatherND",
    "GatherElements", "Shape", "Expand", "Cast", "Range", "Identity", "Split", "Constant", "ConstantOfShape",
}
PROBABILITY_OPS = ("Softmax", "Sigmoid")  # outputs in [0, 1] whatever the input: no calibration needed
PROBABILITY_RANGE = (0.0, 1.0)


class PlanW8A8:
    name = "plan-w8a8"

    def run(self, context: CompileContext) -> PassResult:
        config, plan = context.config, QuantPlan()
        for node in context.graph.nodes:
            if node.op in LINEAR_OPS:
                _plan_linear(node, plan, config.qdq_weights, config.acts != "none", config.quantize_attention)
            elif node.op == "Gather" and config.qdq_weights != "none" and _is_table(node.inputs[0]):
                plan.add(TensorSpec(node.inputs[0].name, "weight", config.qdq_weights, _table_axis(node), ((node.name, 0),),
                                    "Gather table (embedding)"))
            elif node.op == "Add" and config.acts != "none" and config.quantize_residual_adds and _is_residual(node):
                for index, tensor in enumerate(node.inputs):
                    plan.add(_activation(tensor, node, index, "residual Add input"))
            elif node.op not in DATA_MOVEMENT_OPS:
                plan.skipped.append(SkippedNode(node.name, node.op, _float_reason(node)))
        context.plan = plan
        return PassResult(0, f"{len(plan.of_kind('weight'))} weights, {len(plan.of_kind('activation'))} activations, "
                             f"{len(plan.skipped)} nodes kept in float")


def _plan_linear(node: gs.Node, plan: QuantPlan, weight_dtype: str, acts: bool, attention: bool) -> None:
    weights = weight_dtype != "none"
    data_inputs = node.inputs[:2]  # Gemm's C and Conv's B are biases: kept in float
    constant = [isinstance(t, gs.Constant) for t in data_inputs]
    if not all(_is_float(t) for t in data_inputs):
        plan.skipped.append(SkippedNode(node.name, node.op, "non-float inputs"))
        return
    if not any(constant):
        if not attention or not acts:
            plan.skipped.append(SkippedNode(node.name, node.op, "activation x activation MatMul not quantized by config"))
            return
        for index, tensor in enumerate(data_inputs):
            plan.add(_activation(tensor, node, index, "attention MatMul input"))
        return
    for index, tensor in enumerate(data_inputs):
        if isinstance(tensor, gs.Constant):
            if weights:
                plan.add(TensorSpec(tensor.name, "weight", weight_dtype, _channel_axis(node, index, tensor), ((node.name, index),),
                                    f"{node.op} weight"))
        elif acts:
            plan.add(_activation(tensor, node, index, f"{node.op} input"))
    if not weights and not acts:
        plan.skipped.append(SkippedNode(node.name, node.op, "quantization disabled by config"))


def _activation(tensor: gs.Tensor, node: gs.Node, index: int, reason: str) -> TensorSpec:
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op in PROBABILITY_OPS:
        return TensorSpec(tensor.name, "activation", "uint8", None, ((node.name, index),),
                          f"{producer.op.lower()} output", fixed_range=PROBABILITY_RANGE)
    if producer is not None and producer.op == "Clip" and _constant_bounds(producer):
        low, high = _constant_bounds(producer)
        return TensorSpec(tensor.name, "activation", "uint8", None, ((node.name, index),),
                          f"Clip output, range [{low:g}, {high:g}] known", fixed_range=(low, high))
    return TensorSpec(tensor.name, "activation", "uint8", None, ((node.name, index),), reason)


def _constant_bounds(clip: gs.Node) -> tuple[float, float] | None:
    """A Clip's (min, max) when both are constants (clipped softmax: (0, 1))."""
    bounds = clip.inputs[1:3]
    if len(bounds) != 2 or not all(isinstance(b, gs.Constant) and b.values.size == 1 for b in bounds):
        return None
    return float(bounds[0].values.ravel()[0]), float(bounds[1].values.ravel()[0])


def _channel_axis(node: gs.Node, index: int, weight: gs.Constant) -> int | None:
    """The weight's output-channel axis, or None (per tensor) where it has none."""
    rank = len(weight.shape)
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        if index == 0:
            return None
        return 0 if node.attrs.get("transB", 0) else 1
    return rank - 1 if index == 1 and rank >= 2 else None  # MatMul: B is (..., K, N)


def _is_table(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and _is_float(tensor) and len(tensor.shape) >= 2


def _table_axis(node: gs.Node) -> int | None:
    """One scale per last-axis channel (the embedding's hidden dim), unless Gather indexes that axis."""
    rank = len(node.inputs[0].shape)
    return rank - 1 if node.attrs.get("axis", 0) % rank != rank - 1 else None


def _is_residual(node: gs.Node) -> bool:
    """Both inputs are float activations of one fully known shape (no broadcasting, e.g. a mask)."""
    a, b = node.inputs
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant) or not (_is_float(a) and _is_float(b)):
        return False
    known = a.shape is not None and all(dim is not None for dim in a.shape)
    return known and b.shape is not None and list(a.shape) == list(b.shape)


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _float_reason(node: gs.Node) -> str:
    if node.op == "Add":
        return "Add with a constant or broadcast input (bias or mask), not a residual"
    return "no integer kernel planned for this op"
