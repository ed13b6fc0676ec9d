"""Affine quantization (seed 002, eq. 1) and the scale solvers that choose its parameters.

q(x; s, z) = s * (clip(round(x / s) + z, qmin, qmax) - z)

Every solver works on rows: `values` is (rows, n) and each row gets its own scale (and zero point),
so one call serves a per-channel weight (a row per output channel) and a per-tensor activation
(one row). Optional `weights` of the same shape turn the rows into weighted samples, which is how a
histogram (bin centres weighted by counts) is solved without keeping the raw activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntGrid:
    """The integer codes a quantized tensor may take."""

    qmin: int
    qmax: int
    dtype: type

    @property
    def symmetric(self) -> bool:
        return self.qmin == -self.qmax


# Restricted symmetric int8 (-127..127): zero point 0 and no saturation in int8 x int8 dot products.
INT8_SYMMETRIC = IntGrid(-127, 127, np.int8)
UINT8 = IntGrid(0, 255, np.uint8)
# Biases of integer Conv/Gemm kernels, at scale input scale x weight scale.
INT32 = IntGrid(-(2**31 - 1), 2**31 - 1, np.int32)
# 4-bit codes held one per byte in int8 tensors (no packing yet).
INT4_SYMMETRIC = IntGrid(-7, 7, np.int8)

# Clipping ratios swept to pick the alternating solver's start. At 8 bits an unclipped start is
# already a fixpoint (its codes fit its own scale), so alternation alone would never clip.
COARSE_RATIOS = np.geomspace(0.02, 1.0, 32)
FINE_STEPS = np.linspace(1 / 1.13, 1.13, 15)  # around the coarse best; 1.13 = the coarse spacing
MSE_MAX_ITERATIONS = 100
MSE_TOLERANCE = 1e-7
# Rows longer than this are solved on a per-row histogram of as many bins (centres weighted by
# counts): the solver's cost then stops growing with the row (an embedding table has 30k-value rows).
MAX_EXACT_ROW = 4096
# Bounds the (starts x rows x n) working set of the vectorised solver, in elements.
_SOLVER_CHUNK_ELEMENTS = 1 << 22


def codes(values, scale, zero_point, grid: IntGrid):
    """Integer codes (as floats); round half to even, as ONNX QuantizeLinear does."""
    return np.clip(np.round(values / scale) + zero_point, grid.qmin, grid.qmax)


def fake_quantize(values, scale, zero_point, grid: IntGrid):
    """Quantize then dequantize."""
    return (codes(values, scale, zero_point, grid) - zero_point) * scale


def quantize(values, scale, zero_point, grid: IntGrid) -> np.ndarray:
    return codes(values, scale, zero_point, grid).astype(grid.dtype)


def params_from_range(low, high, grid: IntGrid):
    """Scale and zero point whose grid covers [low, high] (widened to include 0, so 0 is exact)."""
    low = np.minimum(np.asarray(low, dtype=np.float64), 0.0)
    high = np.maximum(np.asarray(high, dtype=np.float64), 0.0)
    if grid.symmetric:
        scale = np.maximum(-low, high) / grid.qmax
        zero_point = np.zeros_like(scale)
    else:
        scale = (high - low) / (grid.qmax - grid.qmin)
        zero_point = None
    scale = np.where(scale > 0, scale, 1.0)
    if zero_point is None:
        zero_point = np.clip(np.round(grid.qmin - low / scale), grid.qmin, grid.qmax)
    return scale, zero_point


def weighted_mse(values, weights, scale, zero_point, grid: IntGrid) -> np.ndarray:
    """Per-row mean squared quantization error; scale and zero_point broadcast against rows."""
    error = values - fake_quantize(values, scale, zero_point, grid)
    return (weights * error * error).sum(-1) / weights.sum(-1)


def mse_params(values, grid: IntGrid, weights=None):
    """Per-row (scale, zero_point) minimising the squared error of seed 004, eq. 3.

    Alternating minimisation: with the parameters fixed, the best codes are round-and-clip; with
    the codes fixed, the best scale (and, for an asymmetric grid, offset) is a closed-form least
    squares fit, `s = <v, c> / <c, c>` in the symmetric case. Repeat until the scale stops moving.
    It starts from the best of a coarse sweep of clipping ratios, since alternation only finds the
    fixpoint nearest its start.
    """
    # float32 halves the memory traffic; the MSE comparisons need no more precision than that.
    values = np.atleast_2d(np.asarray(values, dtype=np.float32))
    weights = np.ones_like(values) if weights is None else np.atleast_2d(np.asarray(weights, np.float32))
    if values.shape[1] > MAX_EXACT_ROW:
        values, weights = row_histograms(values, weights, MAX_EXACT_ROW)
    rows = values.shape[0]
    chunk = max(1, _SOLVER_CHUNK_ELEMENTS // (len(COARSE_RATIOS) * values.shape[1]))
    scales, zero_points = np.empty(rows), np.empty(rows)
    for begin in range(0, rows, chunk):
        part = slice(begin, begin + chunk)
        scales[part], zero_points[part] = _solve_alternating(values[part], weights[part], grid)
    return scales, zero_points


def row_histograms(values, weights, bins: int):
    """Per row: `bins` equal bins over [min, max], as (centres, summed weights), each (rows, bins).
    The outermost centres sit on the row's min and max, so the full range stays reachable."""
    rows = len(values)
    low, high = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    width = np.where(high > low, (high - low) / bins, 1.0).astype(np.float32)
    index = np.clip(((values - low) / width).astype(np.int64), 0, bins - 1)
    index += (np.arange(rows) * bins)[:, None]
    counts = np.bincount(index.ravel(), weights=weights.ravel(), minlength=rows * bins).reshape(rows, bins)
    centres = low + (np.arange(bins, dtype=np.float32) + 0.5) * width
    centres[:, 0], centres[:, -1] = low[:, 0], high[:, 0]
    return centres.astype(np.float32), counts.astype(np.float32)


def _solve_alternating(values, weights, grid: IntGrid):
    low, high = values.min(axis=1), values.max(axis=1)
    coarse = np.broadcast_to(COARSE_RATIOS[:, None], (len(COARSE_RATIOS), len(values)))
    low_ratio, high_ratio, _ = _sweep(values, weights, grid, low, high, coarse, coarse)
    fine = np.minimum(high_ratio * FINE_STEPS[:, None], 1.0)
    low_ratio, high_ratio, best_error = _sweep(values, weights, grid, low, high, fine, fine)
    if not grid.symmetric:  # the two ends of an asymmetric range clip independently
        low_ratio, _, best_error = _sweep(values, weights, grid, low, high, coarse, np.broadcast_to(high_ratio, coarse.shape))
        _, high_ratio, best_error = _sweep(values, weights, grid, low, high, np.broadcast_to(low_ratio, coarse.shape), coarse)
    best_scale, best_zero_point = params_from_range(low * low_ratio, high * high_ratio, grid)
    scale, zero_point = best_scale[:, None], best_zero_point[:, None]
    for _ in range(MSE_MAX_ITERATIONS):
        fixed_codes = codes(values, scale, zero_point, grid)
        new_scale, zero_point = _fit_to_codes(values, weights, fixed_codes, scale, zero_point, grid)
        moved = np.abs(new_scale - scale) > MSE_TOLERANCE * scale
        scale = new_scale
        # The asymmetric step rounds its zero point, so it is not monotone: keep the best iterate.
        error = weighted_mse(values, weights, scale, zero_point, grid)
        better = error < best_error
        best_scale = np.where(better, scale[:, 0], best_scale)
        best_zero_point = np.where(better, zero_point[:, 0], best_zero_point)
        best_error = np.minimum(error, best_error)
        if not moved.any():
            break
    return best_scale, best_zero_point


def _sweep(values, weights, grid, low, high, low_ratios, high_ratios):
    """Per row, the (low ratio, high ratio, error) of the best range among the candidates given."""
    scale, zero_point = params_from_range(low * low_ratios, high * high_ratios, grid)
    errors = weighted_mse(values, weights, scale[..., None], zero_point[..., None], grid)
    pick, rows = errors.argmin(axis=0), np.arange(len(values))
    return low_ratios[pick, rows], high_ratios[pick, rows], errors[pick, rows]


def _fit_to_codes(values, weights, fixed_codes, scale, zero_point, grid: IntGrid):
    """Least-squares parameters for fixed integer codes; degenerate fits keep the old parameters."""
    if grid.symmetric:
        numerator = (weights * values * fixed_codes).sum(-1, keepdims=True)
        denominator = (weights * fixed_codes * fixed_codes).sum(-1, keepdims=True)
        fitted = np.divide(numerator, denominator, out=scale.copy(), where=denominator > 0)
        return np.where(fitted > 0, fitted, scale), zero_point
    # values ~ a * codes + b, then s = a and z = round(-b / a).
    w_sum = weights.sum(-1, keepdims=True)
    mean_c = (weights * fixed_codes).sum(-1, keepdims=True) / w_sum
    mean_v = (weights * values).sum(-1, keepdims=True) / w_sum
    centred_c = fixed_codes - mean_c
    covariance = (weights * centred_c * (values - mean_v)).sum(-1, keepdims=True)
    variance = (weights * centred_c * centred_c).sum(-1, keepdims=True)
    slope = np.divide(covariance, variance, out=scale.copy(), where=variance > 0)
    valid = slope > 0
    new_scale = np.where(valid, slope, scale)
    offset = mean_v - new_scale * mean_c
    new_zero_point = np.clip(np.round(-offset / new_scale), grid.qmin, grid.qmax)
    return new_scale, np.where(valid, new_zero_point, zero_point)


def grid_search_params(values, grid: IntGrid, weights=None, steps: int = 400):
    """Brute-force reference for `mse_params`: try clipping ranges on a dense grid, keep the best.

    Symmetric grids search one clipping ratio; asymmetric ones search low and high independently.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    weights = np.ones_like(values) if weights is None else np.atleast_2d(np.asarray(weights, np.float64))
    low, high = values.min(axis=1), values.max(axis=1)
    ratios = np.linspace(1.0 / steps, 1.0, steps)
    if grid.symmetric:
        low_ratio, high_ratio = ratios, ratios
    else:
        low_ratio, high_ratio = (r.ravel() for r in np.meshgrid(ratios, ratios))
    best_scale, best_zero_point = np.empty(len(values)), np.empty(len(values))
    for row in range(len(values)):
        scale, zero_point = params_from_range(low[row] * low_ratio, high[row] * high_ratio, grid)
        errors = weighted_mse(values[row], weights[row], scale[:, None], zero_point[:, None], grid)
        best = errors.argmin()
        best_scale[row], best_zero_point[row] = scale[best], zero_point[best]
    return best_scale, best_zero_point


def sqnr_db(reference, approximation) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = np.sum((reference - np.asarray(approximation, dtype=np.float64)) ** 2)
    return decibels(np.sum(reference**2), noise)


def decibels(signal: float, noise: float) -> float:
    """10 log10(signal / noise), inf for no noise."""
    if noise == 0:
        return float("inf")
    return float(10.0 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def json_number(value: float) -> float | str:
    """Fixed precision keeps manifests byte-stable; JSON has no infinity."""
    return round(float(value), 4) if np.isfinite(value) else str(value)
