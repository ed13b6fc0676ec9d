"""The quantization plan: frozen per-tensor specs, decided before any node is inserted."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .numerics import INT4_SYMMETRIC, INT8_SYMMETRIC, UINT8, IntGrid

GRIDS = {"int8": INT8_SYMMETRIC, "int4": INT4_SYMMETRIC, "uint8": UINT8}


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized, and which node inputs read the quantized value.

    kind: "weight" (a constant, quantized once at compile time) or "activation" (calibrated).
    dtype: "int8" (symmetric, -127..127), "int4" (symmetric, -7..7, held in int8) or "uint8"
        (asymmetric, 0..255).
    axis: the per-channel axis, or None for one scale per tensor.
    fixed_range: a range known from the math (softmax output: [0, 1]); no calibration needed.
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

    @property
    def grid(self) -> IntGrid:
        return GRIDS[self.dtype]

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor, "kind": self.kind, "dtype": self.dtype, "axis": self.axis,
            "consumers": [list(c) for c in self.consumers], "reason": self.reason,
            "fixed_range": list(self.fixed_range) if self.fixed_range else None,
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


@dataclass
class QuantPlan:
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    skipped: list[SkippedNode] = field(default_factory=list)
    params: dict[str, QuantParams] = field(default_factory=dict)

    def add(self, spec: TensorSpec) -> None:
        """Add a spec, merging consumers with an existing spec of the same tensor."""
        existing = self.specs.get(spec.tensor)
        if existing is not None:
            consumers = tuple(dict.fromkeys(existing.consumers + spec.consumers))
            reason = existing.reason if spec.reason in existing.reason else f"{existing.reason}; {spec.reason}"
            spec = TensorSpec(existing.tensor, existing.kind, existing.dtype, existing.axis, consumers, reason,
                              existing.fixed_range or spec.fixed_range)
        self.specs[spec.tensor] = spec

    def keep_float(self, tensor: str, reason: str, op_types: dict[str, str]) -> None:
        """Withdraw a tensor's spec: each node that would have read it quantized is listed as kept float."""
        spec = self.specs.pop(tensor)
        self.skipped.extend(SkippedNode(node, op_types[node], reason) for node, _ in spec.consumers)

    def of_kind(self, kind: str) -> list[TensorSpec]:
        return [spec for spec in self.specs.values() if spec.kind == kind]
