"""FoldBatchNorm: fold an inference BatchNormalization into the Conv before it.

Pattern -> rewrite:
    x -> Conv(W, b) -> y -> BatchNormalization(scale, B, mean, var, epsilon) -> z
    x -> Conv(W * k, (b - mean) * k + B) -> z,      k = scale / sqrt(var + epsilon), per output channel
when W, b and the BatchNormalization parameters are constants and y has no other reader (and is
not a graph output). ONNX Runtime folds the same in a float model; a quantized Conv must be folded
first, since it fuses into an integer kernel only when its own output is quantized, and the scale
of its weight must be chosen for the folded weight.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult


class FoldBatchNorm:
    name = "fold-batch-norm"

    def run(self, context: CompileContext) -> PassResult:
        graph = context.graph
        outputs = {tensor.name for tensor in graph.outputs}
        folded = 0
        for norm in [node for node in graph.nodes if node.op == "BatchNormalization"]:
            conv = _foldable_conv(norm, outputs)
            if conv is None:
                continue
            scale, shift, mean, variance = (t.values.astype(np.float64) for t in norm.inputs[1:5])
            factor = scale / np.sqrt(variance + norm.attrs.get("epsilon", 1e-5))
            weight = conv.inputs[1]
            bias = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros_like(mean)
            folded_weight = weight.values * factor.reshape(-1, *[1] * (weight.values.ndim - 1))
            conv.inputs[1] = gs.Constant(f"{conv.name}_folded_weight", folded_weight.astype(np.float32))
            folded_bias = gs.Constant(f"{conv.name}_folded_bias", ((bias - mean) * factor + shift).astype(np.float32))
            if len(conv.inputs) > 2:
                conv.inputs[2] = folded_bias
            else:
                conv.inputs.append(folded_bias)
            normalized = norm.outputs[0]
            norm.outputs.clear()
            conv.outputs.clear()
            conv.outputs.append(normalized)
            folded += 1
        graph.cleanup()
        return PassResult(folded, f"folded {folded} BatchNormalization nodes into their Conv")


def _foldable_conv(norm: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    source = norm.inputs[0]
    conv = source.inputs[0] if len(source.inputs) == 1 else None
    if conv is None or conv.op != "Conv" or len(source.outputs) != 1 or source.name in graph_outputs:
        return None
    if len(norm.outputs) != 1 or norm.attrs.get("training_mode", 0):
        return None
    constants = conv.inputs[1:] + norm.inputs[1:5]
    if not all(isinstance(t, gs.Constant) for t in constants) or len(norm.inputs) < 5:
        return None
    channels = conv.inputs[1].values.shape[0]
    return conv if all(t.values.shape == (channels,) for t in norm.inputs[1:5]) else None
