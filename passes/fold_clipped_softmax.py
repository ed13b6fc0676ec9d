"""FoldClippedSoftmax: recognise clipped softmax, in each form the exporter emits, as one Clip.

Pattern -> rewrite:
    Softmax -> Mul(zeta - gamma) -> Add(gamma) -> Clip(0, 1)                   ->  kept (already compact)
    Softmax -> Mul(zeta - gamma) -> Add(gamma) -> Relu -> Sub(1, .) -> Relu -> Sub(1, .)
                                                                               ->  ... -> Add(gamma) -> Clip(0, 1)
(1 - relu(1 - relu(y)) is min(max(y, 0), 1), so the rewrite is exact.) Either way the output of the
Clip lies in [0, 1], which the plan gives a fixed uint8 grid (scale 1/255: 0 and 1 exact) with no
calibration. PyTorch's exporter already folds gamma and zeta into constants when the softmax length
is static; with a dynamic length gamma = -alpha/T is computed at run time and those ops stay.
Every Softmax gets a note saying what was found, or why the pattern did not match.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.pipeline import CompileContext, PassResult


class FoldClippedSoftmax:
    name = "fold-clipped-softmax"

    def run(self, context: CompileContext) -> PassResult:
        rewritten = 0
        for softmax in [node for node in context.graph.nodes if node.op == "Softmax"]:
            scale, shift, reason = _affine_after(softmax)
            if shift is None:
                context.note(self.name, softmax.name, f"plain softmax: {reason}")
                continue
            clip_nodes = _clip_after(shift)
            if clip_nodes is None:
                context.note(self.name, softmax.name, "softmax -> Mul -> Add, but no clip to [0, 1] follows")
                continue
            if len(clip_nodes) > 1:
                _replace_with_clip(context.graph, shift, clip_nodes)
                rewritten += 1
            constant = isinstance(_other_input(scale, softmax), gs.Constant) and isinstance(_other_input(shift, scale), gs.Constant)
            how = "gamma and zeta are constants" if constant else "gamma = -alpha/T is computed at run time"
            form = "relu form rewritten to one Clip" if len(clip_nodes) > 1 else "already one Clip"
            context.note(self.name, softmax.name, f"clipped softmax ({form}; {how}): output range [0, 1]")
        return PassResult(rewritten, f"rewrote {rewritten} clipped softmaxes to Clip")


def _only_consumer(node: gs.Node) -> gs.Node | None:
    readers = node.outputs[0].outputs
    return readers[0] if len(readers) == 1 else None


def _other_input(node: gs.Node, producer: gs.Node) -> gs.Tensor:
    """The input of a two-input node that `producer` does not supply."""
    return next(t for t in node.inputs if t is not producer.outputs[0])


def _affine_after(softmax: gs.Node):
    """(Mul, Add, "") of Softmax -> Mul -> Add, or (None, None, why not)."""
    scale = _only_consumer(softmax)
    if scale is None or scale.op != "Mul":
        readers = ", ".join(sorted({n.op for n in softmax.outputs[0].outputs})) or "the graph output"
        return None, None, f"its output feeds {readers}, not a single Mul"
    shift = _only_consumer(scale)
    if shift is None or shift.op != "Add":
        return None, None, "the Mul after it does not feed a single Add"
    return scale, shift, ""


def _clip_after(shift: gs.Node) -> list[gs.Node] | None:
    """The nodes that clip the Add's output to [0, 1]: [Clip] or [Relu, Sub, Relu, Sub]."""
    first = _only_consumer(shift)
    if first is not None and first.op == "Clip" and len(first.inputs) == 3:
        if all(isinstance(t, gs.Constant) for t in first.inputs[1:]) and _bounds(first) == (0.0, 1.0):
            return [first]
        return None
    chain, node = [], first
    for op in ("Relu", "Sub", "Relu", "Sub"):
        if node is None or node.op != op:
            return None
        if op == "Sub" and not (_is_constant(node.inputs[0], 1.0) and node.inputs[1] is chain[-1].outputs[0]):
            return None
        chain.append(node)
        if len(chain) < 4:
            node = _only_consumer(node)
    return chain


def _bounds(clip: gs.Node) -> tuple[float, float]:
    return float(np.asarray(clip.inputs[1].values)), float(np.asarray(clip.inputs[2].values))


def _is_constant(tensor: gs.Tensor, value: float) -> bool:
    return isinstance(tensor, gs.Constant) and tensor.values.size == 1 and float(tensor.values.ravel()[0]) == value


def _replace_with_clip(graph: gs.Graph, shift: gs.Node, chain: list[gs.Node]) -> None:
    output = chain[-1].outputs[0]
    chain[-1].outputs.clear()
    zero = gs.Constant(f"{shift.name}_clip_min", np.array(0.0, np.float32))
    one = gs.Constant(f"{shift.name}_clip_max", np.array(1.0, np.float32))
    graph.nodes.append(gs.Node("Clip", f"{shift.name}_Clip", inputs=[shift.outputs[0], zero, one], outputs=[output]))
