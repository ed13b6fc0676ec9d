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
            verify_data=None, example_inputs=None) -> Artifact:
    """Quantize a float model: an .onnx path, an onnx.ModelProto, or a torch.nn.Module (exported
    with the dynamo exporter; `example_inputs` is a {name: array} dict or a tuple of arrays).

    calib: calibration data (see qcompile.data); required when activations are quantized.
    verify_data: held-out samples for verification; default: the last `config.verify_fraction`
        of the calibration samples (which then are not used for calibration).
    Raises QCompileError for bad input (BelowFloorError: config.strict and the output below the floor),
    InternalError (naming the phase or pass) for a bug of ours. Warnings (an output below the floor)
    are in `artifact.manifest["warnings"]` and issued with warnings.warn.
    """
    state = phases.CompileState(model, config or QuantConfig(), calib, verify_data, example_inputs)
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


class QCompileWarning(UserWarning):
    """A compile that finished but whose result needs the user's attention (an output below the floor)."""
