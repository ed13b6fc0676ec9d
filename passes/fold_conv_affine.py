"""FoldConvAffine: fold per-channel affine ops that follow a Conv into its weight and bias.

Pattern -> rewrite, repeated while one matches:
    Conv(W, b) -> BatchNormalization(scale, B, mean, var, eps)  ->  Conv(W * k, (b - mean) * k + B),  k = scale / sqrt(var + eps)
    Conv(W, b) -> Mul(c)                                         ->  Conv(W * c, b * c)
    Conv(W, b) -> Add(d)                                         ->  Conv(W, b + d)
where W, b and the other operand are constants holding one value per output channel (or one in
all), and the Conv output has no other reader (and is not a graph output). ONNX Runtime folds the
same in a float model (and PaddlePaddle exports its reparameterised blocks as Conv -> Mul -> Add). A
quantized Conv must be folded first: it fuses into an integer kernel only when its own output is
quantized, and a per-tensor grid on the Conv output, before a per-channel rescaling, would lose the
channels the rescaling enlarges.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult


class FoldConvAffine:
    name = "fold-conv-affine"

    def run(self, context: CompileContext) -> PassResult:
        graph = context.graph
        outputs = {tensor.name for tensor in graph.outputs}
        folded = 0
        changed = True
        while changed:
            changed = False
            for conv in [node for node in graph.nodes if node.op == "Conv"]:
                follower = _foldable_follower(conv, outputs)
                if follower is None:
                    continue
                weight, bias = _affine(follower, conv.inputs[1].values.shape[0])
                _fold(conv, follower, weight, bias)
                folded += 1
                changed = True
            graph.cleanup()
        return PassResult(folded, f"folded {folded} BatchNormalization / Mul / Add nodes into their Conv")


def _foldable_follower(conv: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    output = conv.outputs[0]
    if len(output.outputs) != 1 or output.name in graph_outputs or not all(isinstance(t, gs.Constant) for t in conv.inputs[1:]):
        return None
    follower = output.outputs[0]
    channels = conv.inputs[1].values.shape[0]
    if follower.op == "BatchNormalization":
        parameters = follower.inputs[1:5]
        if (len(parameters) == 4 and len(follower.outputs) == 1 and not follower.attrs.get("training_mode", 0)
                and all(isinstance(t, gs.Constant) and t.values.shape == (channels,) for t in parameters)):
            return follower
        return None
    if follower.op in ("Mul", "Add") and len(follower.inputs) == 2:
        other = follower.inputs[1] if follower.inputs[0] is output else follower.inputs[0]
        if isinstance(other, gs.Constant) and _per_channel(other.values, channels, output_rank=len(conv.inputs[1].shape)):
            return follower
    return None


def _per_channel(values: np.ndarray, channels: int, output_rank: int) -> bool:
    """Broadcasts against the Conv output (N, C, spatial...) varying along C at most."""
    if values.dtype != np.float32 or values.ndim > output_rank:
        return False
    shape = (1,) * (output_rank - values.ndim) + values.shape
    return shape[0] == 1 and shape[1] in (1, channels) and all(d == 1 for d in shape[2:])


def _affine(follower: gs.Node, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, offset) per output channel: the follower computes y * multiplier + offset."""
    if follower.op == "BatchNormalization":
        scale, shift, mean, variance = (t.values.astype(np.float64) for t in follower.inputs[1:5])
        factor = scale / np.sqrt(variance + follower.attrs.get("epsilon", 1e-5))
        return factor, shift - mean * factor
    constant = next(t for t in follower.inputs if isinstance(t, gs.Constant))
    values = np.broadcast_to(constant.values.astype(np.float64).reshape(-1), (channels,))  # one value, or one per channel
    return (values, np.zeros(channels)) if follower.op == "Mul" else (np.ones(channels), values)


def _fold(conv: gs.Node, follower: gs.Node, multiplier: np.ndarray, offset: np.ndarray) -> None:
    weight = conv.inputs[1].values.astype(np.float64)
    bias = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
    folded_weight = weight * multiplier.reshape(-1, *[1] * (weight.ndim - 1))
    conv.inputs[1] = gs.Constant(f"{conv.name}_folded_weight_{follower.name}", folded_weight.astype(np.float32))
    folded_bias = gs.Constant(f"{conv.name}_folded_bias_{follower.name}", (bias * multiplier + offset).astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = folded_bias
    else:
        conv.inputs.append(folded_bias)
    result = follower.outputs[0]
    follower.outputs.clear()
    conv.outputs.clear()
    conv.outputs.append(result)
