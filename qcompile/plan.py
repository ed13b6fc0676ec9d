"""The quantization plan: frozen per-tensor specs, decided before any node is inserted."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .numerics import INT4_SYMMETRIC, INT8_SYMMETRIC, INT32, UINT8, IntGrid

GRIDS = {"int8": INT8_SYMMETRIC, "int4": INT4_SYMMETRIC, "uint8": UINT8, "int32": INT32}


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized, and which node inputs read the quantized value.

    kind: "weight" (a constant, quantized once at compile time), "activation" (calibrated) or
        "bias" (a constant, int32 at scale input scale x weight scale, as ONNX Runtime's integer
        Conv and Gemm take it).
    dtype: "int8" (symmetric, -127..127), "int4" (symmetric, -7..7, held in int8), "uint8"
        (asymmetric, 0..255) or "int32" (biases).
    axis: the per-channel axis, or None for one scale per tensor.
    fixed_range: a range known from the math (softmax output: [0, 1]); no calibration needed.
    same_as: another activation whose parameters this one takes (the output of a data-movement op
        such as MaxPool or Reshape, which ONNX Runtime runs on the integer codes only when both
        sides share scale and zero point).
    operands: for a bias, its (activation input, weight) tensors, whose scales multiply to its own.
    consumers: (node name, input index) pairs rewired to the quantized value.
    reason: why the tensor is quantized, for the report.
    """

    tensor: str
    kind: str
    dtype: str
    axis: int | None
    consumers: tuple[tuple[str, int], ...]
    reason: str
    fixed_range: tuple[float, float] | None = None
    same_as: str | None = None
    operands: tuple[str, str] | None = None

    @property
    def grid(self) -> IntGrid:
        return GRIDS[self.dtype]

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor, "kind": self.kind, "dtype": self.dtype, "axis": self.axis,
            "consumers": [list(c) for c in self.consumers], "reason": self.reason,
            "fixed_range": list(self.fixed_range) if self.fixed_range else None,
            **({"same_as": self.same_as} if self.same_as else {}),
        }


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point: scalars for a per-tensor spec, vectors for a per-channel one."""

    scale: np.ndarray
    zero_point: np.ndarray

    @classmethod
    def make(cls, scale, zero_point, grid: IntGrid) -> "QuantParams":
        return cls(np.asarray(scale, dtype=np.float32), np.asarray(zero_point).astype(grid.dtype))


@dataclass(frozen=True)
class SkippedNode:
    """A node left in float, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class NodeGroup:
    """A node that ONNX Runtime runs as one integer kernel (`kernel`) when every tensor in `specs`
    is quantized: its activation inputs, its weight and int32 bias, and its output where the kernel
    writes integers (the output behind a Relu/Clip, which ONNX Runtime then drops).

    optional: the group is worth it only if a group in `readers` (the nodes reading its output)
    runs as an integer kernel too, and one in `sources` (the nodes making its activation inputs;
    "" for a graph input) does: otherwise its rounding buys no speed (an Add feeding a
    LayerNormalization), or the QuantizeLinear nodes it needs cost more than it saves (an Add of
    a graph input and a float bias Add).
    listed: whether it is named among the nodes kept float when it is not integer (a data-movement
        op is not).
    absorbed: the Relu / Clip between the node and its quantized output, which ONNX Runtime drops, or
        the bias Add it fuses into the node.
    tied_output: for a kernel with a float output (QGemm, MatMulIntegerToFloat), its output
        quantized for every reader, used when any integer reader quantizes it: ONNX Runtime fuses
        a node whose output feeds QuantizeLinear nodes only, or none.
    """

    node: str
    op_type: str
    kernel: str
    specs: tuple[TensorSpec, ...]
    optional: bool = False
    readers: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    listed: bool = True
    tied_output: TensorSpec | None = None
    absorbed: tuple[str, ...] = ()


@dataclass
class QuantPlan:
    """Candidate node groups in graph order; `specs` are those of the groups that stay integer, and
    `skipped` the nodes that run in float: those the planner made no group for (`unplanned`, less
    the Relu/Clip an integer group absorbs) and the groups that stay float."""

    groups: list[NodeGroup] = field(default_factory=list)
    unplanned: list[SkippedNode] = field(default_factory=list)
    skipped: list[SkippedNode] = field(default_factory=list)
    params: dict[str, QuantParams] = field(default_factory=dict)
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    floated: dict[str, str] = field(default_factory=dict)  # group node -> why it stays float
    integer: set[str] = field(default_factory=set)  # the group nodes that run as integer kernels

    def add_group(self, group: NodeGroup) -> None:
        self.groups.append(group)

    def resolve(self) -> None:
        """Choose the integer groups (those not in `floated`, less the optional groups that drop out)
        and collect their specs and the nodes that run in float."""
        self.integer, reasons = self.integer_groups(self.floated)
        self.specs = self.specs_of(self.integer)
        absorbed = {name for g in self.groups if g.node in self.integer for name in g.absorbed}
        self.skipped = [s for s in self.unplanned if s.node not in absorbed]
        self.skipped += [SkippedNode(g.node, g.op_type, reasons[g.node]) for g in self.groups if g.node in reasons and g.listed]

    def integer_groups(self, floated: dict[str, str]) -> tuple[set[str], dict[str, str]]:
        """The groups that run as integer kernels when those in `floated` (node -> why) stay float, and
        why each other group does not. Dropping an optional group can only make others drop, so this repeats until
        nothing changes."""
        integer = {g.node for g in self.groups if g.node not in floated}
        reasons = dict(floated)
        absorbed_by = {name: g.node for g in self.groups for name in g.absorbed}
        changed = True
        while changed:
            changed = False
            for group in self.groups:
                if not group.optional or group.node not in integer:
                    continue
                if not integer.intersection(group.readers):
                    reasons[group.node] = f"no integer kernel reads its output: an integer {group.op_type} would only add rounding"
                elif group.sources and not any(absorbed_by.get(source, source) in integer for source in group.sources):
                    reasons[group.node] = "no input is an integer kernel's output: quantizing them would cost more than it saves"
                else:
                    continue
                integer.discard(group.node)
                changed = True
        return integer, reasons

    def specs_of(self, integer: set[str]) -> dict[str, TensorSpec]:
        """The tensors quantized, and for which readers, when the groups in `integer` run as integer kernels."""
        specs: dict[str, TensorSpec] = {}
        for group in self.groups:
            if group.node in integer:
                for spec in group.specs:
                    _merge(specs, spec)
        for group in self.groups:
            if group.node in integer and group.tied_output and group.tied_output.tensor in specs:
                _merge(specs, group.tied_output)
        return specs

    def keep_float(self, tensors: list[str], reason: str) -> None:
        """Every group that needs one of `tensors` quantized stays float, and so do optional groups
        that were worth it only for them."""
        for group in self.groups:
            if any(spec.tensor in tensors for spec in group.specs):
                self.floated.setdefault(group.node, reason)
        self.resolve()

    def of_kind(self, kind: str) -> list[TensorSpec]:
        return [spec for spec in self.specs.values() if spec.kind == kind]


def _merge(specs: dict[str, TensorSpec], spec: TensorSpec) -> None:
    """Add a spec, merging consumers with an existing spec of the same tensor."""
    existing = specs.get(spec.tensor)
    if existing is not None:
        consumers = tuple(dict.fromkeys(existing.consumers + spec.consumers))
        reason = existing.reason if spec.reason in existing.reason else f"{existing.reason}; {spec.reason}"
        spec = TensorSpec(existing.tensor, existing.kind, existing.dtype, existing.axis, consumers, reason,
                          existing.fixed_range or spec.fixed_range, existing.same_as or spec.same_as,
                          existing.operands or spec.operands)
    specs[spec.tensor] = spec
