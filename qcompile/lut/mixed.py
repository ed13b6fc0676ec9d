"""Weight-only mixed precision (--weights auto): a lookup-table format per layer, chosen to reach a target
output SQNR with the fewest bytes, or the best SQNR within a size budget.

1. Candidates per layer: float (kept as it is), affine at 2..8 bits per output channel and per block of
   32/64/128 columns where a row holds several blocks, free tables at 2..6 bits per output channel (per
   block, a table was on no layer's hull of EfficientNet-Lite0: not fitted). A candidate that
   stores as many bytes as float or more is dropped (a depthwise row of 9 weights takes no per-channel
   table). Bytes are what the artifact stores: packed codes; affine scale and zero as float32 per row or
   block and its code grid; free tables as float16; 4 bytes per float weight.
2. Each candidate's layer output error e_l(c) on a sample of up to SAMPLE_ROWS rows (every fit is per row,
   so a fit to the sample is the full fit restricted to it), with nearest-entry codes: sum over rows of
   dW H dW^T where H = E[x^T x] is known (MatMul/Gemm), the importance-weighted squared error for Conv,
   the plain squared error otherwise (Gather, no statistics).
3. A gain per layer turns e_l into model output noise: the layer alone quantized with REFERENCE, its
   output noise N_l measured by the SqnrProbe, g_l = N_l / e_l(REFERENCE). Noise is assumed additive over
   layers: predicted noise = sum over layers of g_l e_l(c_l).
4. The front: each layer's candidates reduced to the lower convex hull of (bytes, predicted noise); moving
   the layers from their cheapest point, one hull step at a time in order of noise removed per byte,
   walks the Lagrangian front (the minimisers of bytes + lambda * noise over every lambda) from the
   cheapest assignment to all float.
5. A budget takes the last front point within it. A target takes the first point predicted to reach it
   and measures it with the probe; the predicted target moves by the measured shortfall or excess for up
   to ROUNDS rounds, bracketing the cheapest point measured to reach the target. If none did, bisection
   between the last point that missed and the all-float end, which reaches any target: the search always
   succeeds, keeping layers float where it must.
   Front points are far apart where one step is big (a large layer going float: 0.7% of EfficientNet-Lite0's
   bytes and 1.3 dB at once). A detour takes the later steps of the other layers instead (`_detour`): for a
   budget, from its point, every later step that still fits; for a target, from the point before the one
   reached, later steps for fewer bytes until that point's measured shortfall is made up on the predicted
   SQNR. Measured, it is kept where it does better (a budget) or also reaches the target (a target).
6. Points are measured with nearest-entry codes; the chosen quantizers then get GPTQ's codes where H is
   known (as lut.search.choose does), and the output SQNR recorded is the artifact's. GPTQ gains more on
   the calibration data it saw than on held-out data (tried on EfficientNet-Lite0's 1x1 Convs, 5-bit
   tables: +4.5 dB against +1.2 dB): measured with it, a target would be reached on paper with fewer bytes.
Deterministic: fits, probe and tie-breaks (layer order) depend on the inputs only.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..config import QuantConfig
from ..errors import QCompileError
from ..numerics import decibels, json_number
from .packing import packed_row_bytes
from .ptnq import Quantizer, affine_quantizer
from .search import Choice, Encoded, SqnrProbe
from .tables import LayerStatistics, free_table

SAMPLE_ROWS = 64  # all rows: the same EfficientNet-Lite0 SQNR at a 0.15 budget (14.01 dB), several times slower
AFFINE_BITS = range(2, 9)
TABLE_BITS = range(2, 7)
BLOCKS = (None, 32, 64, 128)
ROUNDS = 4


@dataclass(frozen=True)
class Candidate:
    """One way to store a weight: "float", or "affine" / "table" at `bits`, per row or per `block` columns."""

    kind: str
    bits: int
    block: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "float":
            return "float"
        return f"{self.kind}{self.bits}" + (f" b{self.block}" if self.block else "")

    def stored_bytes(self, n: int, k: int) -> int:
        if self.kind == "float":
            return 4 * n * k
        tables = n * (k // (self.block or k))
        levels = 1 << self.bits
        params = tables * 8 + 4 * levels if self.kind == "affine" else tables * 2 * levels
        return n * packed_row_bytes(k, self.bits) + params

    def fit(self, rows: np.ndarray, importance: np.ndarray | None) -> Quantizer:
        return (affine_quantizer if self.kind == "affine" else free_table)(rows, self.bits, self.block, importance)


FLOAT = Candidate("float", 32)
REFERENCE = Candidate("affine", 4)  # the gain's probe (affine6 took 1% more bytes for 20 dB on EfficientNet-Lite0)


class _Layer:
    """One weight: its candidates, their bytes and sampled output errors, its full fits."""

    def __init__(self, weight, statistics: LayerStatistics):
        self.weight, self.statistics = weight, statistics
        n, k = weight.rows.shape
        formats = [Candidate("affine", bits, block) for bits in AFFINE_BITS for block in BLOCKS
                   if block is None or (k % block == 0 and k > block)]
        formats += [Candidate("table", bits) for bits in TABLE_BITS]
        self.candidates = [c for c in formats if c.stored_bytes(n, k) < 4 * n * k] + [FLOAT]
        self.bytes = np.array([c.stored_bytes(n, k) for c in self.candidates], np.float64)
        sample = np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().astype(np.int64))
        importance = None if statistics.importance is None else statistics.importance[sample]
        rows = weight.rows[sample]
        self.errors = np.array([0.0 if c is FLOAT else self._error(rows, c.fit(rows, importance), importance)
                                for c in self.candidates])
        self.reference_error = self._error(rows, REFERENCE.fit(rows, importance), importance)
        self._quantizers: dict[Candidate, Quantizer] = {}
        self._encoded: dict[tuple[Candidate, bool], Encoded] = {}

    def _error(self, rows: np.ndarray, quantizer: Quantizer, importance: np.ndarray | None) -> float:
        error = (quantizer.dequantize(quantizer.encode(rows)) - rows).astype(np.float64)
        if self.statistics.hessian is not None:
            return float(np.sum((error @ self.statistics.hessian) * error))
        return float(np.sum(error**2 if importance is None else importance * error**2))

    def encode(self, candidate: Candidate, gptq: bool) -> Encoded:
        """The full fit's codes: nearest-entry (as the errors were estimated) or, with gptq, GPTQ's where H is known."""
        if candidate not in self._quantizers:
            self._quantizers[candidate] = candidate.fit(self.weight.rows, self.statistics.importance)
        hessian = self.statistics.hessian if gptq else None
        key = (candidate, hessian is not None)
        if key not in self._encoded:
            self._encoded[key] = Encoded.of(self.weight, self._quantizers[candidate], hessian)
        return self._encoded[key]


def choose_mixed(weights, config: QuantConfig, probe: SqnrProbe,
                 statistics: dict[str, LayerStatistics] | None = None) -> tuple[Choice, dict]:
    """The format of every weight (a list of LutWeight) for config.target_sqnr or config.size_budget:
    the chosen quantizers (float layers are left out) and the summary of the search (its front, per layer
    the chosen format, bytes and gain)."""
    with ThreadPoolExecutor(config.workers or os.cpu_count()) as pool:  # NumPy and PyTorch release the GIL
        layers = list(pool.map(lambda w: _Layer(w, (statistics or {}).get(w.tensor) or LayerStatistics()), weights))
    gains = [_gain(layer, probe) for layer in layers]
    with np.errstate(invalid="ignore"):  # an infinite gain times float's zero error: zero noise
        noises = [np.where(layer.errors > 0, gain * layer.errors, 0.0) for layer, gain in zip(layers, gains)]
    hulls = [_hull(layer.bytes, noise) for layer, noise in zip(layers, noises)]
    # Every hull step, in order of predicted noise removed per byte (ties: layer order, then step order).
    steps = []
    for index, (layer, noise, hull) in enumerate(zip(layers, noises, hulls)):
        steps += [((noise[a] - noise[b]) / (layer.bytes[b] - layer.bytes[a]), index, step)
                  for step, (a, b) in enumerate(zip(hull, hull[1:]))]
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    order = [index for _, index, _ in steps]
    float_bytes = float(sum(layer.bytes[-1] for layer in layers))
    step_bytes = np.array([layers[i].bytes[hulls[i][s + 1]] - layers[i].bytes[hulls[i][s]] for _, i, s in steps])
    step_noise = np.array([noises[i][hulls[i][s + 1]] - noises[i][hulls[i][s]] for _, i, s in steps])
    total_bytes = np.cumsum([sum(layer.bytes[hull[0]] for layer, hull in zip(layers, hulls)), *step_bytes])
    total_noise = np.cumsum([sum(noise[hull[0]] for noise, hull in zip(noises, hulls)), *step_noise])
    total_noise = np.maximum(total_noise, 0.0)  # the all-float end is 0, up to rounding
    predicted = np.array([decibels(probe.signal, noise) for noise in total_noise])

    def assignment(moves) -> list[Candidate]:
        moved = Counter(order[m] for m in moves)
        return [layer.candidates[hull[moved[i]]] for i, (layer, hull) in enumerate(zip(layers, hulls))]

    def measure(moves) -> float:
        return probe({layer.weight.tensor: layer.encode(c, gptq=False).weight(layer.weight)
                      for layer, c in zip(layers, assignment(moves)) if c is not FLOAT})

    measured: dict[int, float] = {}

    def measure_point(point: int) -> float:
        if point not in measured:
            measured[point] = measure(range(point))
        return measured[point]

    if config.size_budget is not None:
        budget = config.size_budget * float_bytes
        within = np.flatnonzero(total_bytes <= budget)
        if not within.size:
            raise QCompileError(f"--size-budget {config.size_budget:g} is below the smallest size the formats reach: "
                                f"{total_bytes[0] / float_bytes:.4f} of the float weight bytes")
        point = int(within[-1])
        measure_point(point)
        detour = _detour(order, step_bytes, step_noise, point, total_bytes[point], total_noise[point], budget, 0.0)
        worth = len(detour[0]) > point  # a step of another layer fits
    else:
        point = _reach(config.target_sqnr, predicted, measure_point)
        detour, worth = None, False
        if measured.get(point - 1, np.inf) < config.target_sqnr:  # the last step may be bigger than needed
            aim = predicted[point - 1] + config.target_sqnr - measured[point - 1]  # its shortfall, as in _reach
            aim_noise = probe.signal / 10.0 ** (aim / 10.0)
            detour = _detour(order, step_bytes, step_noise, point - 1, total_bytes[point - 1], total_noise[point - 1],
                             total_bytes[point] - 1, aim_noise)
            worth = detour[2] <= aim_noise
    moves, chosen_bytes, chosen_noise = range(point), total_bytes[point], total_noise[point]
    detour_record = None
    if worth:
        steps_taken, size, noise = detour
        budgeted = config.size_budget is not None
        detour_sqnr = measure(steps_taken)
        better = detour_sqnr > measured[point] if budgeted else detour_sqnr >= config.target_sqnr
        if better:
            moves, chosen_bytes, chosen_noise = steps_taken, size, noise
        detour_record = {"bytes_fraction": float(size / float_bytes),
                         "predicted_sqnr_db": json_number(decibels(probe.signal, noise)),
                         "measured_sqnr_db": json_number(detour_sqnr), "chosen": better}
    chosen = assignment(moves)
    encoded = {layer.weight.tensor: layer.encode(c, gptq=True) for layer, c in zip(layers, chosen) if c is not FLOAT}
    sqnr = probe({layer.weight.tensor: encoded[layer.weight.tensor].weight(layer.weight) for layer in layers
                  if layer.weight.tensor in encoded})
    kept_float = sum(c is FLOAT for c in chosen)
    summary = {
        "goal": ({"target_sqnr_db": config.target_sqnr} if config.size_budget is None
                 else {"size_budget": config.size_budget}),
        "float_bytes": int(float_bytes), "bytes": int(chosen_bytes),
        "bytes_fraction": float(chosen_bytes / float_bytes),
        "predicted_sqnr_db": json_number(decibels(probe.signal, chosen_noise)),
        "kept_float": kept_float,
        "front": [{"bytes_fraction": float(b / float_bytes), "predicted_sqnr_db": json_number(p),
                   "measured_sqnr_db": None if j not in measured else json_number(measured[j])}
                  for j, (b, p) in enumerate(zip(total_bytes, predicted))],
        "front_point": point,
        "detour": detour_record,
        "choices": [{"tensor": layer.weight.tensor, "op_type": layer.weight.op, "format": c.name,
                     "bits": c.bits, "bytes": int(c.stored_bytes(*layer.weight.rows.shape)), "gain": float(gain) if np.isfinite(gain) else "inf"}
                    for layer, c, gain in zip(layers, chosen, gains)],
    }
    return Choice(None, encoded, sqnr, []), summary


def _gain(layer: _Layer, probe: SqnrProbe) -> float:
    """Model output noise per unit of the layer's output error, from the layer alone at REFERENCE; infinite
    where that breaks the output (a non-finite value): the layer then stays float."""
    sqnr = probe({layer.weight.tensor: layer.encode(REFERENCE, gptq=False).weight(layer.weight)})
    if not np.isfinite(sqnr):
        return float("inf") if sqnr < 0 else 0.0
    noise = probe.signal / 10.0 ** (sqnr / 10.0)
    return noise / layer.reference_error if layer.reference_error > 0 else 0.0


def _hull(costs: np.ndarray, noise: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (cost, noise), from the cheapest to the quietest.
    Points of infinite noise (a layer of infinite gain) are left out; float's is zero."""
    hull: list[int] = []
    for i in sorted(np.flatnonzero(np.isfinite(noise)), key=lambda i: (costs[i], noise[i])):
        if hull and noise[i] >= noise[hull[-1]]:
            continue  # costs as much or more and removes no noise
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is under the chord from a to i, or on it: drop it
            if (noise[a] - noise[b]) * (costs[i] - costs[a]) > (noise[a] - noise[i]) * (costs[b] - costs[a]):
                break
            hull.pop()
        hull.append(int(i))
    return hull


def _detour(order: list[int], step_bytes: np.ndarray, step_noise: np.ndarray, point: int, start_bytes: float,
            start_noise: float, max_bytes: float, max_noise: float) -> tuple[list[int], float, float]:
    """From front point `point`, the later steps in front order that keep the bytes within max_bytes, until the
    predicted noise is at most max_noise: (steps taken, bytes, noise). A layer whose step is left out takes
    none of its later ones (its hull order). This fills a budget the next front step overshoots, or reaches
    a target's noise without a big last step (a large layer going float)."""
    taken, size, noise, blocked = list(range(point)), start_bytes, start_noise, set()
    for step in range(point, len(order)):
        if noise <= max_noise:
            break
        if order[step] in blocked or size + step_bytes[step] > max_bytes:
            blocked.add(order[step])
            continue
        taken.append(step)
        size, noise = size + step_bytes[step], noise + step_noise[step]
    return taken, size, noise


def _reach(target: float, predicted: np.ndarray, measure) -> int:
    """The cheapest front point measured to reach `target`, as described in the module docstring."""
    last = len(predicted) - 1
    missed, reached, aim = -1, last, target  # the all-float end reaches any target
    for _ in range(ROUNDS):
        hits = np.flatnonzero(predicted >= aim)
        point = min(max(int(hits[0]) if hits.size else last, missed + 1), reached - 1)
        if point <= missed:
            break
        sqnr = measure(point)
        if sqnr >= target:
            reached = point
        else:
            missed = point
        aim += target - sqnr
    if reached == last:  # nothing cheaper reached it yet: bisect towards the all-float end
        while reached - missed > 1:
            middle = (missed + reached) // 2
            if measure(middle) >= target:
                reached = middle
            else:
                missed = middle
    measure(reached)
    return reached
