"""Quantization-aware fine-tuning with learned step sizes (LSQ), initialised by the MSE solver.

Seed 004: fake-quantize every matmul input (weights per output channel, activations per tensor),
start the scales at the MSE optimum (eq. 3, the same solver `qcompile compile` uses), then learn
weights and scales together (eq. 4-5: straight-through rounding, gradient scale
g = 1 / sqrt(N_F * Q_P)). GELU, softmax and LayerNorm stay float.

    qat = qcompile.qat.prepare(model, qcompile.QuantConfig(weights="int8"), calib=batches)
    train(qat, ...)                                       # the user's own loop
    art = qcompile.qat.convert(qat, example_inputs, "out/")

`prepare` swaps nn.Linear for QuantLinear and qcompile.qat.MatMul (write attention's
activation x activation products with it) for a version that quantizes both inputs. `convert`
exports to ONNX with QuantizeLinear/DequantizeLinear carrying the learned scales and int8 weight
codes: the same kind of artifact as `qcompile compile`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, calibration, report
from .artifact import Artifact
from .calibration import StreamingHistogram
from .config import QuantConfig
from .errors import QCompileError
from .numerics import UINT8, IntGrid
from .plan import GRIDS, TensorSpec

GRID_NAMES = {grid: name for name, grid in GRIDS.items()}
from .runtime import make_session
from .torch_export import to_onnx

SCALE_INITS = ("mse", "minmax", "lsq")


@dataclass(frozen=True)
class QatOptions:
    """Where scales start, and whether they learn. Seed 004 Table IV's ablations:
    init="mse", learn_scales=False is "MSE only"; init="lsq", learn_scales=True is "learned only"
    (LSQ's 2 mean|v| / sqrt(Q_P) start); init="mse", learn_scales=True is both. Without training,
    init="mse" or "minmax" with learn_scales=False is post-training quantization."""

    init: str = "mse"
    learn_scales: bool = True

    def __post_init__(self) -> None:
        if self.init not in SCALE_INITS:
            raise QCompileError(f"init must be one of {', '.join(SCALE_INITS)}; got {self.init!r}")


# Custom ops: the exporter turns them into ONNX QuantizeLinear/DequantizeLinear (see _TRANSLATIONS).
@torch.library.custom_op("qcompile::fake_quant", mutates_args=())
def _fake_quant_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    limits = torch.iinfo(zero_point.dtype)
    zero = zero_point.float()
    return (torch.clamp(torch.round(x / scale) + zero, limits.min, limits.max) - zero) * scale


@_fake_quant_op.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("qcompile::dequantize", mutates_args=())
def _dequantize_op(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * codes.dim()
    shape[axis] = -1
    return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)


@_dequantize_op.register_fake
def _(codes, scale, zero_point, axis):
    return torch.empty(codes.shape, dtype=torch.float32)


def _translations() -> dict:
    from onnxscript import opset20 as op

    def fake_quant(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dequantize(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    return {torch.ops.qcompile.fake_quant.default: fake_quant, torch.ops.qcompile.dequantize.default: dequantize}


class FakeQuantize(nn.Module):
    """LSQ fake quantization: q = (round_ste(clip(x / s + z)) - z) * s with a learnable scale s.

    channels: None for one scale per tensor, else one per slice of axis 0 (a weight's output
    channels). The zero point is fixed at initialisation (uint8 activations; 0 for weights).
    """

    def __init__(self, grid: IntGrid, channels: int | None = None):
        super().__init__()
        self.grid = grid
        self.scale = nn.Parameter(torch.ones(channels) if channels else torch.tensor(1.0))
        self.register_buffer("zero_point", torch.zeros_like(self.scale))
        self.observer: StreamingHistogram | None = None  # set while prepare() calibrates
        self.abs_sum = 0.0
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            values = x.detach().float().numpy()
            self.observer.update(values)
            self.abs_sum += float(np.abs(values).sum())
            self.count += values.size
            return x
        scale, zero_point = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)
        # LSQ's gradient scale: forward value s, backward gradient times g.
        g = 1.0 / math.sqrt(x.numel() / self.scale.numel() * self.grid.qmax)
        scale = scale * g + (scale - scale * g).detach()
        # round(x / s) + z, then clip: ONNX QuantizeLinear's order, so ties round the same way.
        ratio = x / scale
        rounded = ratio + (torch.round(ratio) - ratio).detach()  # straight-through rounding
        return (torch.clamp(rounded + zero_point, self.grid.qmin, self.grid.qmax) - zero_point) * scale

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._broadcast(self.scale.detach(), x), self._broadcast(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zero_point, self.grid.qmin, self.grid.qmax)

    def _broadcast(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *[1] * (x.dim() - 1)) if values.dim() else values

    def set_params(self, scale, zero_point) -> None:
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(np.asarray(scale), dtype=torch.float32).expand_as(self.scale))
            self.zero_point.copy_(torch.as_tensor(np.asarray(zero_point), dtype=torch.float32).expand_as(self.zero_point))

    def export_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tensor activation as ONNX QuantizeLinear -> DequantizeLinear."""
        zero_point = self.zero_point.to(torch.uint8 if self.grid.qmin == 0 else torch.int8)
        return _fake_quant_op(x, self.scale.detach(), zero_point)


class MatMul(nn.Module):
    """torch.matmul as a module, so `prepare` can quantize both inputs (attention's Q.K^T, P.V)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class QuantMatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant_a, self.quant_b = FakeQuantize(UINT8), FakeQuantize(UINT8)
        self.exporting = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            return torch.matmul(self.quant_a.export_input(a), self.quant_b.export_input(b))
        return torch.matmul(self.quant_a(a), self.quant_b(b))


class QuantLinear(nn.Module):
    """nn.Linear with a per-tensor uint8 input quantizer and a per-output-channel weight quantizer."""

    def __init__(self, linear: nn.Linear, weight_grid: IntGrid):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.quant_input = FakeQuantize(UINT8)
        self.quant_weight = FakeQuantize(weight_grid, channels=linear.out_features)
        self.exporting = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            # Integer codes stored (in, out) so the graph reads DequantizeLinear -> MatMul, no Transpose.
            codes = self.quant_weight.codes(self.weight.detach()).t().contiguous().to(torch.int8)
            weight = _dequantize_op(codes, self.quant_weight.scale.detach(), torch.zeros_like(codes[0]), 1)
            out = torch.matmul(self.quant_input.export_input(x), weight)
            return out + self.bias if self.bias is not None else out
        return nn.functional.linear(self.quant_input(x), self.quant_weight(self.weight), self.bias)


def prepare(model: nn.Module, config: QuantConfig, calib, options: QatOptions = QatOptions(),
            inputs=None) -> nn.Module:
    """A copy of `model` with fake quantization whose scales start from `calib`.

    calib: an iterable of batches, e.g. a few batches of a training DataLoader.
    inputs: maps a batch to the model's input (a tensor, or a tuple of positional arguments);
        default: the batch itself, or its first element when it is a tuple or list, so
        (inputs, labels) batches work as they are.
    """
    if config.weights == "none" or config.acts != "int8":
        raise QCompileError(f"QAT quantizes weights and activations; got weights={config.weights}, acts={config.acts}")
    prepared = copy.deepcopy(model)
    _swap_modules(prepared, GRIDS[config.weights])
    quantizers = [m for m in prepared.modules() if isinstance(m, FakeQuantize)]
    if not quantizers:
        raise QCompileError("the model has no nn.Linear or qcompile.qat.MatMul to quantize")
    _initialise(prepared, quantizers, (_model_input(b, inputs) for b in calib), options.init)
    for quantizer in quantizers:
        quantizer.scale.requires_grad_(options.learn_scales)
    return prepared


def _model_input(batch, inputs):
    if inputs is not None:
        return inputs(batch)
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _swap_modules(module: nn.Module, weight_grid: IntGrid) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantLinear(child, weight_grid))
        elif isinstance(child, MatMul):
            setattr(module, name, QuantMatMul())
        else:
            _swap_modules(child, weight_grid)


def _initialise(model: nn.Module, quantizers: list[FakeQuantize], calib, method: str) -> None:
    """Weights from their values; activations from statistics of one pass over `calib`."""
    weight_quantizers = {m.quant_weight for m in model.modules() if isinstance(m, QuantLinear)}
    for layer in (m for m in model.modules() if isinstance(m, QuantLinear)):
        weight = layer.weight.detach().numpy()
        if method == "lsq":
            layer.quant_weight.set_params(2 * np.abs(weight).mean(axis=1) / math.sqrt(layer.quant_weight.grid.qmax), 0)
        else:
            params = calibration.weight_params(weight, 0, layer.quant_weight.grid, method)
            layer.quant_weight.set_params(params.scale, 0)
    activations = [q for q in quantizers if q not in weight_quantizers]
    for quantizer in activations:
        quantizer.observer = StreamingHistogram()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batches = 0
        for batch in calib:
            model(*batch) if isinstance(batch, tuple) else model(batch)
            batches += 1
    model.train(was_training)
    if batches == 0:
        raise QCompileError("the calibration data holds no batches")
    spec = TensorSpec("activation", "activation", "uint8", None, (), "QAT")
    for quantizer in activations:
        histogram, quantizer.observer = quantizer.observer, None
        if method == "lsq":
            scale = 2 * quantizer.abs_sum / quantizer.count / math.sqrt(UINT8.qmax)
            zero_point = np.clip(np.round(-min(histogram.minimum, 0.0) / scale), 0, UINT8.qmax)
        else:
            params = calibration.activation_params(spec, histogram, method, QuantConfig().percentile)
            scale, zero_point = params.scale, params.zero_point
        quantizer.set_params(scale, zero_point)


def convert(model: nn.Module, example_inputs: tuple, output: str | Path | None = None, force: bool = False) -> Artifact:
    """Export the fake-quantized model to an ONNX QDQ artifact carrying the learned scales.

    The artifact is verified against the PyTorch fake-quant model on `example_inputs` in ONNX
    Runtime; the figures go into the manifest.
    """
    model = model.eval()
    with torch.no_grad():
        expected = model(*example_inputs).numpy()
    exporting = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantMatMul))]
    for module in exporting:
        module.exporting = True
    try:
        example = {f"input_{i}": tensor for i, tensor in enumerate(example_inputs)}
        onnx_model = to_onnx(model, example, ["output"], dynamic_axes=("batch",), translations=_translations())
    finally:
        for module in exporting:
            module.exporting = False
    session = make_session(onnx_model)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), example_inputs)}
    actual = session.run(None, feed)[0]
    verification = {"samples": int(len(expected)), "max_abs_difference": float(np.abs(actual - expected).max()),
                    "output_step_bound": _output_step_bound(model)}
    manifest = {
        "qcompile_version": __version__,
        "source": "qat",
        "plan": _plan_summary(model),
        "verification_against_pytorch": verification,
        "custom_op_library": None,
    }
    artifact = Artifact(onnx_model, manifest, report.render_qat(manifest))
    if output is not None:
        artifact.save(output, force=force)
    return artifact


def _output_step_bound(model: nn.Module) -> float:
    """How far one quantization step of the last layer's input can move the output: s * max_j sum_i |W_ji|."""
    last = [m for m in model.modules() if isinstance(m, QuantLinear)][-1]
    with torch.no_grad():
        weight = last.quant_weight(last.weight)
        return float(last.quant_input.scale) * float(weight.abs().sum(dim=1).max())


def _plan_summary(model: nn.Module) -> dict:
    tensors = []
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            scale = module.scale.detach().numpy()
            tensors.append({
                "module": name, "dtype": GRID_NAMES[module.grid],
                "per_channel": scale.ndim == 1,
                "scale": float(scale) if scale.ndim == 0 else {"min": float(scale.min()), "max": float(scale.max())},
            })
    return {"tensors": tensors}
