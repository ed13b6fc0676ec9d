"""Activation statistics in bounded memory, and the quantization parameters computed from them.

One ONNX Runtime pass over the calibration data exposes every planned activation as an extra
output; each tensor keeps only a running min/max and a fixed-size histogram. Memory therefore does
not grow with the number of samples (ONNX Runtime's histogram calibrators keep every batch's
outputs until the end).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from tqdm import tqdm

from . import numerics
from .plan import QuantParams, TensorSpec
from .runtime import make_session, with_extra_outputs

HISTOGRAM_BINS = 16384
# Weight scales never go below this: a near-dead channel's MSE scale can be a denormal (2.5e-42 seen
# on EfficientNet-Lite0), which no int32 bias or requantization multiplier survives.
WEIGHT_SCALE_FLOOR = 1e-12
# Largest |int32 bias| allowed, leaving the accumulator headroom for the sum of the products.
BIAS_LIMIT = 2**30


@dataclass
class StreamingHistogram:
    """Counts on `bins` equal bins over [-radius, radius]. When a value falls outside, the radius
    doubles and neighbouring bins merge pairwise, so the size never changes."""

    bins: int = HISTOGRAM_BINS
    radius: float = 0.0
    counts: np.ndarray = field(default=None)
    minimum: float = np.inf
    maximum: float = -np.inf
    nonfinite: int = 0  # values no grid can hold (a -inf mask): such a tensor is kept float

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        values = values.ravel()
        finite = np.isfinite(values)
        if not finite.all():
            self.nonfinite += int(values.size - finite.sum())
            values = values[finite]
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)
        extent = max(-low, high)
        if self.radius == 0.0:
            self.radius = extent if extent > 0 else 1.0
        while extent > self.radius:
            self._double()
        index = ((values + np.float32(self.radius)) * np.float32(self.bins / (2 * self.radius))).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.zeros_like(self.counts)
        quarter = self.bins // 4
        self.counts[quarter : quarter + len(merged)] = merged
        self.radius *= 2

    def centres_and_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres of the non-empty bins and their counts."""
        occupied = np.nonzero(self.counts)[0]
        width = 2 * self.radius / self.bins
        return -self.radius + (occupied + 0.5) * width, self.counts[occupied].astype(np.float64)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """The range holding `percentile` % of the values, the rest cut equally from both tails."""
        centres, counts = self.centres_and_counts()
        cumulative = np.cumsum(counts) / counts.sum()
        tail = (100.0 - percentile) / 200.0
        low = centres[np.searchsorted(cumulative, tail)]
        high = centres[min(np.searchsorted(cumulative, 1.0 - tail), len(centres) - 1)]
        return max(low, self.minimum), min(high, self.maximum)


def collect_histograms(
    model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict], threads: int, total: int | None = None
) -> dict[str, StreamingHistogram]:
    """Run the float model over `batches` once, histogramming each named tensor."""
    session = make_session(with_extra_outputs(model, tensors), threads=threads)
    histograms = {name: StreamingHistogram() for name in tensors}
    for feed in tqdm(batches, desc="calibrating", unit="batch", total=total, leave=False):
        for name, value in zip(tensors, session.run(tensors, feed)):
            histograms[name].update(value)
    return histograms


def collect_input_moments(model: onnx.ModelProto, inputs: dict[str, bool], batches: Iterable[dict], threads: int,
                          total: int | None = None) -> dict[str, np.ndarray]:
    """Second moments of layer inputs over `batches`, in memory that does not grow with the data:
    inputs[name] True: E[x^T x] over the last axis ([K, K], a MatMul/Gemm input); False: E[x_c^2]
    per channel (axis 1, a Conv input)."""
    graph_inputs = {i.name for i in model.graph.input}
    computed = [name for name in inputs if name not in graph_inputs]
    session = make_session(with_extra_outputs(model, computed), threads=threads)
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(inputs, 0)
    for feed in tqdm(batches, desc="collecting layer input statistics", unit="batch", total=total, leave=False):
        values = {**dict(zip(computed, session.run(computed, feed))), **feed}
        for name in inputs:
            value = values[name]
            if inputs[name]:
                flat = value.reshape(-1, value.shape[-1]).astype(np.float32)
                product, count = (flat.T @ flat).astype(np.float64), flat.shape[0]
            else:
                channels = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1).astype(np.float64)
                product, count = np.einsum("ij,ij->i", channels, channels), channels.shape[1]
            sums[name] = sums[name] + product if name in sums else product
            counts[name] += count
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def activation_params(spec: TensorSpec, histogram: StreamingHistogram | None, method: str, percentile: float) -> QuantParams:
    grid = spec.grid
    if spec.fixed_range is not None:
        scale, zero_point = numerics.params_from_range(*spec.fixed_range, grid)
    elif method == "minmax":
        scale, zero_point = numerics.params_from_range(histogram.minimum, histogram.maximum, grid)
    elif method == "percentile":
        scale, zero_point = numerics.params_from_range(*histogram.percentile_range(percentile), grid)
    else:
        centres, counts = histogram.centres_and_counts()
        # Bin centres stand in for their values; the range must still reach the true extremes.
        centres = np.clip(centres, histogram.minimum, histogram.maximum)
        scale, zero_point = numerics.mse_params(centres, grid, weights=counts)
    return QuantParams.make(np.ravel(scale)[0], np.ravel(zero_point)[0], grid)


def weight_params(weight: np.ndarray, axis: int | None, grid: numerics.IntGrid, method: str) -> QuantParams:
    """Per-channel (along `axis`) or per-tensor weight parameters: MSE unless the method is minmax."""
    rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1) if axis is not None else weight.reshape(1, -1)
    if method == "minmax":
        scale, zero_point = numerics.params_from_range(rows.min(axis=1), rows.max(axis=1), grid)
    else:
        scale, zero_point = numerics.mse_params(rows, grid)
    scale = np.maximum(scale, WEIGHT_SCALE_FLOOR)
    if axis is None:
        scale, zero_point = scale[0], zero_point[0]
    return QuantParams.make(scale, zero_point, grid)


def bias_params(bias: np.ndarray, source: QuantParams, weight: QuantParams) -> tuple[QuantParams, QuantParams]:
    """(weight, bias) parameters for an integer kernel's int32 bias, whose scale is input scale x
    weight scale per channel. Weight scales are raised where the bias would not fit in BIAS_LIMIT."""
    needed = np.abs(bias.astype(np.float64)) / (float(source.scale) * BIAS_LIMIT)
    weight = QuantParams(np.maximum(weight.scale, needed).astype(np.float32), weight.zero_point)
    bias_scale = (source.scale * weight.scale).astype(np.float32)
    return weight, QuantParams.make(np.broadcast_to(bias_scale, bias.shape), np.zeros(bias.shape), numerics.INT32)
