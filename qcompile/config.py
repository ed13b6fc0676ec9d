"""Typed, JSON-round-trippable compile configuration (no string-keyed option dicts)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import QCompileError

WEIGHT_FORMATS = ("int8", "int4", "none", "nl", "affine", "table", "auto")
LUT_WEIGHT_FORMATS = ("nl", "affine", "table", "auto")  # packed codes read through lookup tables (qcompile custom ops)
FITS = ("output", "weight")
LUT_BITS = range(2, 9)
SELECTIONS = ("layer", "model")
LUT_OPS = ("MatMul", "Gemm", "Conv", "Gather")
EXECUTOR_NAMES = ("local", "serial", "ray")
ACTIVATION_FORMATS = ("int8", "dynamic", "none")
CALIBRATION_METHODS = ("mse", "minmax", "percentile")
# W8A8 without --target-sqnr: the output SQNR (dB) below which node groups are kept float. 20 dB is a
# mean cosine of about 0.995 against the float model.
W8A8_TARGET_SQNR = 20.0


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    weights: "int8" = symmetric int8 (-127..127), per output channel; "int4" = symmetric -7..7, per
        output channel, codes stored one per byte (int8 tensors); "none" = keep float. These three
        are QDQ formats. Lookup-table formats (packed codes, qcompile's custom ops): "nl" = PTNQ
        non-linear functions (seed 003), "affine" = MSE-optimal asymmetric affine, "table" = 2^B free
        values fitted by k-means and stored as float16 (SqueezeLLM); affine and table per output
        channel or per block of `block` columns. "auto" = a format per layer (float, affine or table, at
        its own width and block; qcompile.lut.mixed) for `target_sqnr` or `size_budget`.
    fit: "output" = fit lookup-table weights to the layer's output error on calibration inputs (GPTQ
        error feedback when choosing the codes of MatMul/Gemm weights; affine and table fits of Conv
        weights weighted by their input channel's sqrt(E[x_c^2])); "weight" = minimise each weight's
        own error. "output" needs
        calibration data and falls back to "weight" without it.
    bits: (lowest, highest) code width for "nl" / "affine" / "table" (an int B means (B, B)); with a range, "nl" searches from the
        highest down and keeps the lowest width whose output SQNR reaches `target_sqnr`.
    block: affine or table block size along the input dimension (None: per output channel).
    target_sqnr: output SQNR (dB) to reach. W8A8: the fewest, cheapest node groups stay float until it
        holds on calibration and held-out samples (default W8A8_TARGET_SQNR; 0 keeps every group
        integer). "auto": the per-layer formats with the fewest bytes reaching it. "nl" with a bit
        range: the bit-width search's target. Both on calibration data.
    size_budget: for "auto": the stored weight bytes allowed, as a fraction of the float weights' bytes;
        the search takes the best output SQNR within it.
    function_depth: PTNQ pool depth: 0 = the primitives, 1 = also their compositions f(g(x)).
    functions: search only these pool functions (names as in qcompile.lut.functions; None: the whole pool).
    lut_ops: which ops' weights become lookup tables (Gather: embedding tables).
    select: choose the PTNQ function per "model" (seed 003) or per "layer" (greedy, from the best
        per-model choice, kept only where the output SQNR improves).
    executor, workers: where PTNQ fitting tasks run ("local" process pool, "serial", or "ray").
    acts: "int8" = 8-bit activations, per tensor (stored as asymmetric uint8, the grid
        ONNX Runtime's fastest x86 integer kernels take), ranges calibrated ahead of time; "dynamic" =
        with nl / affine / table weights, each MatMul/Gemm quantizes its input to uint8 per tensor at
        run time and multiplies it with its weight's table rounded to int8 per output channel
        (ONNX Runtime's DynamicQuantizeMatMul on a weight folded at session start); "none" = keep float.
    calib_method: how activation ranges are chosen: "mse" (seed 004's alternating solver),
        "minmax", or "percentile" (keeps `percentile` % of the values inside the range).
    quantize_attention: also quantize the activation x activation MatMuls of attention
        (Q, K, V and the softmax output).
    quantize_residual_adds: let Adds of two activations (residual Adds) run as integer QLinearAdd
        where an integer kernel reads their output.
    calib_batch_size: samples concatenated per ONNX Runtime call when the batch axis is dynamic.
    verify_fraction: share of calibration samples held out for verification when no separate
        verification data is given.
    sqnr_floor: a deployed output SQNR (dB, held-out samples) below this ends the compile with a
        warning naming the worst layers and a fix; with `strict`, an error and nothing written.
    """

    weights: str = "int8"
    acts: str = "int8"
    calib_method: str = "mse"
    percentile: float = 99.99
    quantize_attention: bool = True
    quantize_residual_adds: bool = True
    calib_batch_size: int = 16
    verify_fraction: float = 0.2
    bits: tuple[int, int] = (4, 4)
    block: int | None = None
    target_sqnr: float | None = None
    size_budget: float | None = None
    function_depth: int = 0
    functions: tuple[str, ...] | None = None
    lut_ops: tuple[str, ...] = LUT_OPS
    select: str = "layer"
    executor: str = "local"
    workers: int | None = None
    fit: str = "output"
    sqnr_floor: float = 10.0
    strict: bool = False

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
        object.__setattr__(self, "bits", (self.bits, self.bits) if isinstance(self.bits, int) else tuple(self.bits))
        low, high = self.bits
        if low not in LUT_BITS or high not in LUT_BITS or low > high:
            raise QCompileError(f"bits must be a range within 2..8 (like 4 or 4-8), got {low}-{high}")
        w8a8 = self.static_acts and not self.lut_weights
        if self.target_sqnr is not None and not (w8a8 or self.weights == "auto" or (self.weights == "nl" and low < high)):
            raise QCompileError("--target-sqnr needs --acts int8 with int8/int4/none weights (node groups kept float until "
                                "it holds), --weights auto, or --weights nl --bits LOW-HIGH (the bit-width search)")
        if self.acts == "dynamic" and self.weights not in ("nl", "affine", "table"):
            raise QCompileError(f"--acts dynamic needs nl, affine or table weights (like nl4, int4, table4), not {self.weights}")
        if self.weights == "auto":
            if (self.target_sqnr is None) == (self.size_budget is None):
                raise QCompileError("--weights auto needs exactly one of --target-sqnr DB and --size-budget FRACTION")
            if self.acts != "none":
                raise QCompileError("--weights auto chooses weight formats against the float model: it needs --acts none")
        if self.size_budget is not None and (self.weights != "auto" or not 0.0 < self.size_budget <= 1.0):
            raise QCompileError(f"--size-budget needs --weights auto and a fraction in (0, 1], got {self.size_budget}")
        if self.weights in ("affine", "table") and low != high:
            raise QCompileError(f"a bit-width search (--bits LOW-HIGH) needs --weights nl, not {self.weights}")
        if self.block is not None and (self.weights not in ("affine", "table") or self.block < 1):
            raise QCompileError("--block needs affine or table lookup-table weights (like int4 or table4) and a positive "
                                f"size, got {self.block}")
        object.__setattr__(self, "lut_ops", tuple(self.lut_ops))
        if not self.lut_ops or not set(self.lut_ops) <= set(LUT_OPS):
            raise QCompileError(f"lut_ops must be a non-empty subset of {', '.join(LUT_OPS)}; got {', '.join(self.lut_ops)}")
        if self.function_depth not in (0, 1):
            raise QCompileError(f"function_depth must be 0 or 1, got {self.function_depth}")
        if self.functions is not None:
            object.__setattr__(self, "functions", tuple(self.functions))
            from .lut.functions import pool  # SymPy: imported only when a pool is asked for

            known = {f.name for f in pool(self.function_depth)}
            unknown = [name for name in self.functions if name not in known]
            if unknown or not self.functions:
                raise QCompileError(f"unknown or non-invertible pool functions: {', '.join(unknown) or '(none given)'}; "
                                    f"the depth-0 pool is {', '.join(f.name for f in pool(0))}")
        _check_choice("select", self.select, SELECTIONS)
        _check_choice("executor", self.executor, EXECUTOR_NAMES)
        _check_choice("fit", self.fit, FITS)

    @property
    def lut_weights(self) -> bool:
        return self.weights in LUT_WEIGHT_FORMATS

    @property
    def static_acts(self) -> bool:
        """Activations get calibrated QuantizeLinear/DequantizeLinear pairs."""
        return self.acts == "int8"

    @property
    def qdq_weights(self) -> str:
        """The weight format PlanW8A8 inserts QDQ for ("none" when weights go through lookup tables)."""
        return "none" if self.lut_weights else self.weights

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
