"""PlanW8A8: decide which node groups run as ONNX Runtime CPU integer kernels, before any node is inserted.

A group is a node plus the tensors ONNX Runtime needs quantized to fuse it (its QDQ selectors):
    Conv with a constant weight       ->  input, weight (per output channel), int32 bias, output  ->  QLinearConv
    Gemm with a constant weight       ->  input, weight, int32 bias (float output*)               ->  QGemm
    MatMul with a constant weight     ->  input, weight (float output*)                           ->  MatMulIntegerToFloat
      and a bias Add ONNX Runtime     ->  input, weight, int32 bias of the Add (float output*)    ->  QGemm
      fuses into one Gemm with it
    MatMul of two activations         ->  both inputs (if quantize_attention)                     ->  MatMulIntegerToFloat
    Add / Mul of two activations, Concat, GlobalAveragePool, AveragePool, Sigmoid, LeakyRelu
                                      ->  inputs and output                                       ->  QLinearAdd, ...
    MaxPool, Reshape, Resize, ...     ->  input, and output at the same scale                     ->  runs on the codes
    Gather from a constant table      ->  the table (per last-axis channel)
(*) quantized for every reader, and the kernel QGemm / QLinearMatMul, when an integer reader
quantizes it: ONNX Runtime fuses a node only if its output feeds QuantizeLinear nodes alone, or none.
An output behind a Relu or a Clip with constant bounds is quantized after it (ONNX Runtime drops
the Relu/Clip into the QuantizeLinear). The elementwise and same-scale groups are optional: integer
only when a reader of their output is, and the maker of one of their inputs is, since otherwise
their rounding buys no speed or the QuantizeLinear nodes they need cost more than they save. A Softmax /
Sigmoid output gets the fixed range [0, 1], a Clip output its bounds. Every other compute node
(HardSwish, LayerNormalization, ...) stays float, listed with the reason in plan.skipped; so does
a node whose weight would only be dequantized on every run.
Which MatMul + bias Add pairs ONNX Runtime fuses into a Gemm (where the input's shape is static: a
ViT at a fixed image size, not a text model with a free sequence length) is read from the graph it
optimizes; left float, the bias would keep that Gemm float, all its inputs dequantized on every run.
With acts "none" only weights are planned (weight-only: smaller, not faster).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.deployed import gemm_fused_matmuls
from qcompile.pipeline import CompileContext, PassResult
from qcompile.plan import NodeGroup, QuantPlan, SkippedNode, TensorSpec

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
# Ops that move or select data; they carry no arithmetic worth listing as "kept in float".
DATA_MOVEMENT_OPS = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Gather", "GatherND",
    "GatherElements", "Shape", "Expand", "Cast", "Range", "Identity", "Split", "Constant", "ConstantOfShape",
}
# Integer kernels with quantized inputs and output (ONNX Runtime's CPU QDQ selectors).
ELEMENTWISE_KERNELS = {"Add": "QLinearAdd", "Mul": "QLinearMul", "Concat": "QLinearConcat",
                       "GlobalAveragePool": "QLinearGlobalAveragePool", "AveragePool": "QLinearAveragePool",
                       "Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu"}
# Ops ONNX Runtime runs on the integer codes when input and output share one scale.
SAME_SCALE_OPS = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice", "Expand",
                  "Tile", "DepthToSpace", "Gather")
PROBABILITY_OPS = ("Softmax", "Sigmoid")  # outputs in [0, 1] whatever the input: no calibration needed
PROBABILITY_RANGE = (0.0, 1.0)


class PlanW8A8:
    name = "plan-w8a8"

    def run(self, context: CompileContext) -> PassResult:
        config, plan = context.config, QuantPlan()
        outputs = {tensor.name for tensor in context.graph.outputs}
        bias_adds = _bias_adds(context) if config.static_acts and config.qdq_weights != "none" else {}
        for node in context.graph.nodes:
            if node.op in LINEAR_OPS:
                _plan_linear(node, plan, config, outputs, bias_adds.get(node.name))
            elif node.op == "Gather" and config.qdq_weights != "none" and _is_table(node.inputs[0]):
                plan.add_group(NodeGroup(node.name, node.op, "Gather", (TensorSpec(
                    node.inputs[0].name, "weight", config.qdq_weights, _table_axis(node), ((node.name, 0),),
                    "Gather table (embedding)"),)))
            elif config.static_acts and _plan_elementwise(node, plan, config, outputs):
                continue
            elif node.op not in DATA_MOVEMENT_OPS and node.op not in SAME_SCALE_OPS:
                plan.unplanned.append(SkippedNode(node.name, node.op, _float_reason(node, config, outputs)))
        plan.resolve()
        context.plan = plan
        return PassResult(0, f"{len(plan.integer)} node groups, {len(plan.of_kind('weight'))} weights, "
                             f"{len(plan.of_kind('activation'))} activations, {len(plan.skipped)} nodes kept in float")


def _bias_adds(context: CompileContext) -> dict[str, tuple[gs.Node, int]]:
    """MatMul -> (the Add of its constant per-channel bias, the bias's input index), for the pairs ONNX
    Runtime fuses into a Gemm."""
    pairs = {}
    for node in context.graph.nodes:
        readers = node.outputs[0].outputs if node.op == "MatMul" else []
        if (len(readers) == 1 and readers[0].op == "Add" and isinstance(node.inputs[1], gs.Constant)
                and len(node.inputs[1].shape) == 2):
            add, inputs = readers[0], [t.name for t in readers[0].inputs]
            if len(inputs) == 2 and inputs[0] != inputs[1]:
                index = 1 - inputs.index(node.outputs[0].name)
                if _is_channel_bias(node, add.inputs[index], node.inputs[1]):
                    pairs[node.name] = (add, index)
    fused = gemm_fused_matmuls(context.model) if pairs else set()
    return {name: pair for name, pair in pairs.items() if name in fused}


def _plan_linear(node: gs.Node, plan: QuantPlan, config, graph_outputs: set[str],
                 bias_add: tuple[gs.Node, int] | None) -> None:
    acts, weights = config.static_acts, config.qdq_weights != "none"
    data_inputs = node.inputs[:2]
    if not all(_is_float(t) for t in data_inputs):
        return plan.unplanned.append(SkippedNode(node.name, node.op, "non-float inputs"))
    weight_index = next((i for i, t in enumerate(data_inputs) if isinstance(t, gs.Constant)), None)
    if weight_index is None:
        if not (config.quantize_attention and acts):
            return plan.unplanned.append(SkippedNode(node.name, node.op, "activation x activation MatMul not quantized by config"))
        if node.op != "MatMul":
            return plan.unplanned.append(SkippedNode(node.name, node.op, "no integer kernel without a constant weight"))
        return plan.add_group(NodeGroup(node.name, node.op, "MatMulIntegerToFloat", tuple(
            _activation(t, ((node.name, i),), "attention MatMul input") for i, t in enumerate(data_inputs)),
            tied_output=_tied_output(node, graph_outputs)))
    if not weights:
        return plan.unplanned.append(SkippedNode(node.name, node.op, "quantization disabled by config"))
    weight = data_inputs[weight_index]
    weight_spec = TensorSpec(weight.name, "weight", config.qdq_weights, _channel_axis(node, weight_index, weight),
                             ((node.name, weight_index),), f"{node.op} weight")
    if not acts:  # weight-only: stored small, dequantized at load
        return plan.add_group(NodeGroup(node.name, node.op, "", (weight_spec,)))
    if weight_index != 1:
        return plan.unplanned.append(SkippedNode(node.name, node.op, "the constant is the first operand: no integer kernel"))
    activation = data_inputs[0]
    specs = [_activation(activation, ((node.name, 0),), f"{node.op} input"), weight_spec]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.op != "MatMul" else None
    if bias is not None:
        if not _is_channel_bias(node, bias, weight):
            return plan.unplanned.append(SkippedNode(node.name, node.op, "its bias is not a constant per-channel vector: "
                                                                       "no integer kernel"))
        specs.append(TensorSpec(bias.name, "bias", "int32", 0, ((node.name, 2),), f"{node.op} bias",
                                operands=(activation.name, weight.name)))
    if bias_add is not None:  # ONNX Runtime makes MatMul + Add one Gemm: its QGemm needs the bias int32
        add, index = bias_add
        specs.append(TensorSpec(add.inputs[index].name, "bias", "int32", 0, ((add.name, index),),
                                "MatMul bias (Add), fused by ONNX Runtime into a Gemm", operands=(activation.name, weight.name)))
        return plan.add_group(NodeGroup(node.name, node.op, "QGemm", tuple(specs), absorbed=(add.name,),
                                        tied_output=_tied_output(add, graph_outputs)))
    kernel = {"Conv": "QLinearConv", "Gemm": "QGemm", "MatMul": "MatMulIntegerToFloat"}[node.op]
    if node.op != "Conv":
        return plan.add_group(NodeGroup(node.name, node.op, kernel, tuple(specs), tied_output=_tied_output(node, graph_outputs)))
    output, absorbed = _quantized_output(node, graph_outputs)  # QLinearConv writes integers: quantize its output
    if output is None:
        return plan.unplanned.append(SkippedNode(node.name, node.op, "its output is a graph output: ONNX Runtime "
                                                                   "has no integer Conv with a float output"))
    plan.add_group(NodeGroup(node.name, node.op, kernel, tuple(specs) + (output,), absorbed=absorbed))


def _tied_output(node: gs.Node, graph_outputs: set[str]) -> TensorSpec | None:
    output = node.outputs[0]
    return None if output.name in graph_outputs else _output_spec(output, f"{node.op} output (another integer kernel reads it)")


def _plan_elementwise(node: gs.Node, plan: QuantPlan, config, graph_outputs: set[str]) -> bool:
    """Plan an optional integer group for an elementwise or same-scale op; False if it is neither."""
    if node.op in ELEMENTWISE_KERNELS:
        if node.op == "Add" and not config.quantize_residual_adds:
            return False
        inputs = node.inputs if node.op == "Concat" else node.inputs[:2 if node.op in ("Add", "Mul") else 1]
        if not inputs or not all(_is_activation(t) for t in inputs):
            return False
        output, absorbed = _quantized_output(node, graph_outputs)
        if output is None:
            return False
        specs = tuple(_activation(t, ((node.name, i),), f"{node.op} input") for i, t in enumerate(inputs)) + (output,)
        kernel = ELEMENTWISE_KERNELS[node.op]
    elif node.op in SAME_SCALE_OPS:
        source = node.inputs[0]
        if not _is_activation(source) or node.outputs[0].name in graph_outputs:
            return False
        output = _output_spec(node.outputs[0], f"{node.op} output, at its input's scale", same_as=source.name)
        specs, kernel, absorbed = (_activation(source, ((node.name, 0),), f"{node.op} input"), output), f"{node.op} on uint8", ()
    else:
        return False
    readers = tuple(name for name, _ in specs[-1].consumers)
    sources = tuple(spec_tensor.inputs[0].name if spec_tensor.inputs else "" for spec_tensor in
                    (inputs if node.op in ELEMENTWISE_KERNELS else (node.inputs[0],)))
    plan.add_group(NodeGroup(node.name, node.op, kernel, specs, optional=True, readers=readers, sources=sources,
                             listed=node.op in ELEMENTWISE_KERNELS, absorbed=absorbed))
    return True


def _quantized_output(node: gs.Node, graph_outputs: set[str]) -> tuple[TensorSpec | None, tuple[str, ...]]:
    """The spec of the node's output, taken behind a lone Relu / constant Clip (None if a graph
    output), and that Relu / Clip."""
    tensor, absorbed = node.outputs[0], ()
    follower = tensor.outputs[0] if len(tensor.outputs) == 1 and tensor.name not in graph_outputs else None
    if follower is not None and (follower.op == "Relu" or (follower.op == "Clip" and _constant_bounds(follower))):
        tensor, absorbed = follower.outputs[0], (follower.name,)
    if tensor.name in graph_outputs or not _is_float(tensor):
        return None, ()
    reason = f"{node.op} output" + (f" after {tensor.inputs[0].op}" if absorbed else "")
    return _output_spec(tensor, reason), absorbed


def _output_spec(tensor: gs.Tensor, reason: str, same_as: str | None = None) -> TensorSpec:
    """Every reader takes the quantized value: ONNX Runtime fuses only a node whose output feeds a
    QuantizeLinear alone."""
    readers = tuple((consumer.name, index) for consumer in tensor.outputs
                    for index, t in enumerate(consumer.inputs) if t is tensor)
    if same_as is not None:
        return TensorSpec(tensor.name, "activation", "uint8", None, readers, reason, same_as=same_as)
    return _activation(tensor, readers, reason)


def _activation(tensor: gs.Tensor, consumers: tuple[tuple[str, int], ...], reason: str) -> TensorSpec:
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op in PROBABILITY_OPS:
        return TensorSpec(tensor.name, "activation", "uint8", None, consumers,
                          f"{producer.op.lower()} output", fixed_range=PROBABILITY_RANGE)
    if producer is not None and producer.op == "Clip" and _constant_bounds(producer):
        low, high = _constant_bounds(producer)
        return TensorSpec(tensor.name, "activation", "uint8", None, consumers,
                          f"Clip output, range [{low:g}, {high:g}] known", fixed_range=(low, high))
    return TensorSpec(tensor.name, "activation", "uint8", None, consumers, reason)


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


def _is_channel_bias(node: gs.Node, bias: gs.Tensor, weight: gs.Constant) -> bool:
    """A constant float vector of one value per output channel, added as is (Gemm: beta = 1)."""
    channels = weight.shape[_channel_axis(node, 1, weight)]
    return (isinstance(bias, gs.Constant) and _is_float(bias) and list(bias.shape) == [channels]
            and node.attrs.get("beta", 1.0) == 1.0 and node.attrs.get("alpha", 1.0) == 1.0)


def _is_table(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and _is_float(tensor) and len(tensor.shape) >= 2


def _table_axis(node: gs.Node) -> int | None:
    """One scale per last-axis channel (the embedding's hidden dim), unless Gather indexes that axis."""
    rank = len(node.inputs[0].shape)
    return rank - 1 if node.attrs.get("axis", 0) % rank != rank - 1 else None


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _is_activation(tensor: gs.Tensor) -> bool:
    return _is_float(tensor) and not isinstance(tensor, gs.Constant)


def _float_reason(node: gs.Node, config, graph_outputs: set[str]) -> str:
    if not config.static_acts:
        return f"activations are not quantized ahead of time (--acts {config.acts})"
    if node.op == "Add" and not config.quantize_residual_adds:
        return "Adds of two activations are kept float by config (--no-residual)"
    if node.op in ELEMENTWISE_KERNELS and not all(_is_activation(t) for t in node.inputs):
        return f"{node.op} with a constant input (a bias or a scale): no integer kernel planned"
    if node.op in ELEMENTWISE_KERNELS and any(t.name in graph_outputs for t in node.outputs):
        return "its output is a graph output: its integer kernel would need a quantized one"
    return "no integer kernel for this op in ONNX Runtime's CPU provider"
