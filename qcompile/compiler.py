"""compile(): a float model in, an Artifact out, through the phases of qcompile.phases in order."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from . import phases
from .artifact import Artifact
from .config import QuantConfig
from .errors import InternalError, QCompileError

PHASES = (phases.load, phases.normalize, phases.plan, phases.calibrate, phases.keep_float, phases.search,
          phases.rewrite, phases.verify, phases.check_floor, phases.describe)


def compile(model: str | Path | onnx.ModelProto, config: QuantConfig | None = None, calib=None,
            verify_data=None, example_inputs=None, target=None, max_drop: float | None = None) -> Artifact:
    """Quantize a float model: an .onnx path, an onnx.ModelProto, or a torch.nn.Module (exported
    with the dynamo exporter; `example_inputs` is a {name: array} dict or a tuple of arrays).

    calib: calibration data (see qcompile.data); required when activations are quantized.
    verify_data: held-out samples for verification; default: the last `config.verify_fraction`
        of the calibration samples (which then are not used for calibration).
    target, max_drop: W8A8 to your own metric instead of an output SQNR: `target(session) -> float`
        (higher is better; return minus a loss) runs on ONNX Runtime sessions of the float model and
        of candidate deployed models, on data of your choosing; the fewest, cheapest node groups stay
        float until it is at most `max_drop` (in its own units) below float.
    Raises QCompileError for bad input (BelowFloorError: config.strict and the output below the floor),
    InternalError (naming the phase or pass) for a bug of ours. Warnings (an output below the floor)
    are in `artifact.manifest["warnings"]` and issued with warnings.warn.
    """
    config = config or QuantConfig()
    _check_target(target, max_drop, config)
    state = phases.CompileState(model, config, calib, verify_data, example_inputs, target, max_drop)
    for phase in PHASES:
        try:
            phase(state)
        except (QCompileError, InternalError):
            raise
        except Exception as error:
            raise InternalError(f"phase {phase.__name__}", error) from error
    for message in state.warnings:
        warnings.warn(message, QCompileWarning, stacklevel=2)
    return state.artifact


def _check_target(target, max_drop, config: QuantConfig) -> None:
    if target is None and max_drop is None:
        return
    if not callable(target):
        raise QCompileError("target must be a function session -> float, given with max_drop")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < float("inf"):
        raise QCompileError(f"max_drop must be a finite number >= 0 (how far below float the target metric may "
                            f"fall), got {max_drop!r}")
    if not config.static_acts or config.lut_weights:
        raise QCompileError("target= chooses which W8A8 node groups stay float: it needs acts='int8' with int8, int4 "
                            "or no weight quantization")
    if config.target_sqnr is not None:
        raise QCompileError("give target_sqnr or target=, not both")


class QCompileWarning(UserWarning):
    """A compile that finished but whose result needs the user's attention (an output below the floor)."""
