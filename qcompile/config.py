"""Typed, JSON-round-trippable compile configuration (no string-keyed option dicts)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import QCompileError

WEIGHT_FORMATS = ("int8", "int4", "none")
ACTIVATION_FORMATS = ("int8", "none")
CALIBRATION_METHODS = ("mse", "minmax", "percentile")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    weights: "int8" = symmetric int8 (-127..127), per output channel; "int4" = symmetric -7..7, per
        output channel, codes stored one per byte (int8 tensors); "none" = keep float.
    acts: "int8" = 8-bit activations, per tensor (stored as asymmetric uint8, the grid
        ONNX Runtime's fastest x86 integer kernels take); "none" = keep float.
    calib_method: how activation ranges are chosen: "mse" (seed 004's alternating solver),
        "minmax", or "percentile" (keeps `percentile` % of the values inside the range).
    quantize_attention: also quantize the activation x activation MatMuls of attention
        (Q, K, V and the softmax output).
    quantize_residual_adds: also quantize both inputs of residual Adds.
    calib_batch_size: samples concatenated per ONNX Runtime call when the batch axis is dynamic.
    verify_fraction: share of calibration samples held out for verification when no separate
        verification data is given.
    """

    weights: str = "int8"
    acts: str = "int8"
    calib_method: str = "mse"
    percentile: float = 99.99
    quantize_attention: bool = True
    quantize_residual_adds: bool = True
    calib_batch_size: int = 16
    verify_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check_choice("weights", self.weights, WEIGHT_FORMATS)
        _check_choice("acts", self.acts, ACTIVATION_FORMATS)
        _check_choice("calib_method", self.calib_method, CALIBRATION_METHODS)
        if not 50.0 < self.percentile <= 100.0:
            raise QCompileError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calib_batch_size < 1:
            raise QCompileError(f"calib_batch_size must be >= 1, got {self.calib_batch_size}")
        if not 0.0 <= self.verify_fraction < 1.0:
            raise QCompileError(f"verify_fraction must be in [0, 1), got {self.verify_fraction}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QCompileError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QCompileError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
