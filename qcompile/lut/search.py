"""Choosing lookup-table weight quantizers for a whole model (seed 003, section 2.2).

Non-linear ("nl"): every pool function is fitted to every layer (one task per function and bit
width, on the chosen executor). Candidates are scored by the model's end-to-end output SQNR on
calibration data, not only by weight MSE:
* per model (seed 003): every layer uses one function; the best function wins;
* per layer (beyond the paper): from the per-model choice, each layer in turn tries the function
  with its lowest weight MSE and keeps it where the output SQNR improves.
With a bit range, widths go from high to low; a function whose SQNR misses the target at one
width is pruned from the lower ones, and the lowest width that reaches the target is kept.
Affine and free tables ("table", k-means): one quantizer per weight, no search.
With calibration data, fitting is output-aware (qcompile.lut.tables): GPTQ codes for MatMul/Gemm
weights, importance-weighted affine and table fits for Conv weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx

from . import functions
from ..config import QuantConfig
from ..errors import QCompileError
from .executors import make_executor
from ..numerics import decibels
from .ptnq import FitOptions, Quantizer, affine_quantizer, fit_function, nonlinear_quantizer, sketch
from .tables import LayerStatistics, free_table, gptq_codes
from ..runtime import make_session


SCREEN_ROWS = 4096  # rows, spread over the layers, on which the whole pool is fitted first
SCREEN_KEEP = 4  # functions then fitted to every row and compared on the model's output


class SqnrProbe:
    """Output SQNR of the float model with some weights (or other inputs) replaced, on a few calibration
    batches. The weights become graph inputs, so one session scores every candidate."""

    def __init__(self, model: onnx.ModelProto, weights: dict[str, np.ndarray], feeds: list[dict]):
        if not feeds:
            raise QCompileError("choosing lookup-table quantizers by output SQNR needs calibration data (--calib)")
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        constants = {init.name for init in probe.graph.initializer}
        kept = [init for init in probe.graph.initializer if init.name not in weights]
        del probe.graph.initializer[:]
        probe.graph.initializer.extend(kept)
        for name, value in weights.items():  # inputs already (a GatedProbe's switches) stay as they are
            if name in constants:
                probe.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, value.shape))
        self.session, self.weights = make_session(probe), weights
        self._score_on(feeds)

    def on(self, feeds: list[dict]) -> "SqnrProbe":
        """This probe's session, scoring `feeds` instead."""
        other = copy.copy(self)
        other._score_on(feeds)
        return other

    def _score_on(self, feeds: list[dict]) -> None:
        self.feeds = feeds
        self.reference = self._run({})
        self.signal = sum(float(np.sum(r**2)) for r in self.reference)

    def _run(self, replaced: dict[str, np.ndarray]) -> list[np.ndarray]:
        weights = {**self.weights, **replaced}
        return [output.astype(np.float64).ravel() for feed in self.feeds
                for output in self.session.run(None, {**feed, **weights})]

    def __call__(self, replaced: dict[str, np.ndarray]) -> float:
        noise = sum(float(np.sum((r - o) ** 2)) for r, o in zip(self.reference, self._run(replaced)))
        return decibels(self.signal, noise) if np.isfinite(noise) else float("-inf")


@dataclass
class Choice:
    """The quantizers chosen at one bit width (None: a width per layer, --weights auto), and how they scored."""

    bits: int | None
    encoded: dict[str, Encoded]  # per weight tensor: its quantizer, codes and weight MSE
    sqnr_db: float | None
    per_function: list[dict]  # {"function", "sqnr_db", "mse"} for the per-model candidates


@dataclass
class Encoded:
    """One candidate quantizer of one weight, its codes and its weight MSE."""

    quantizer: Quantizer
    codes: np.ndarray
    mse: float

    @classmethod
    def of(cls, weight, quantizer: Quantizer, hessian: np.ndarray | None = None) -> "Encoded":
        """Nearest-entry codes, or with a layer input's E[x^T x], GPTQ's."""
        codes = quantizer.encode(weight.rows) if hessian is None else gptq_codes(weight.rows, quantizer, hessian)
        codes = codes.astype(np.uint8)
        return cls(quantizer, codes, float(np.mean((quantizer.dequantize(codes) - weight.rows) ** 2)))

    def weight(self, weight) -> np.ndarray:
        """The dequantized weight in the float model's layout."""
        return weight.to_original(self.quantizer.dequantize(self.codes))


def choose(weights, config: QuantConfig, probe: SqnrProbe | None, statistics: dict[str, LayerStatistics] | None = None,
           options: FitOptions | None = None) -> tuple[Choice, list[Choice]]:
    """The quantizer of every weight (a list of LutWeight), and what was tried at each bit width.
    statistics: per weight tensor, its layer's input statistics (output-aware fitting); none: weight MSE."""
    statistics = {w.tensor: (statistics or {}).get(w.tensor) or LayerStatistics() for w in weights}
    low, high = config.bits
    if config.weights in ("affine", "table"):
        fit = affine_quantizer if config.weights == "affine" else free_table
        chosen = {w.tensor: Encoded.of(w, fit(w.rows, high, _block_for(w, config.block), statistics[w.tensor].importance),
                                       statistics[w.tensor].hessian) for w in weights}
        score = probe({w.tensor: chosen[w.tensor].weight(w) for w in weights}) if probe else None
        choice = Choice(high, chosen, score, [])
        return choice, [choice]
    options = options or FitOptions()
    executor = make_executor(config.executor, config.workers)
    # PTNQ fits stay unweighted: weighted quantiles drop a row's extremes from the range rule (3.2 dB lost
    # on EfficientNet-Lite0 at 6 bits).
    sketches = np.concatenate([sketch(w.rows) for w in weights])
    layer_of_row = np.concatenate([np.full(w.rows.shape[0], i) for i, w in enumerate(weights)])
    alive = list(config.functions or [f.name for f in functions.pool(config.function_depth)])
    tried: list[Choice] = []
    for bits in range(high, low - 1, -1):
        finalists = _screen(alive, bits, sketches, layer_of_row, options, executor)
        fits = executor.map(fit_function, [(name, bits, sketches, layer_of_row, options) for name in finalists],
                            f"fitting {len(finalists)} functions at {bits} bits")
        candidates = {name: _encode(name, bits, fit, weights) for name, fit in zip(finalists, fits)}
        scores = {name: _score(weights, encoded, probe) for name, encoded in candidates.items()}
        best = max(scores, key=scores.get)
        chosen, score = dict(candidates[best]), scores[best]
        if config.select == "layer":
            chosen, score = _per_layer(weights, candidates, chosen, score, probe)
        if any(stats.hessian is not None for stats in statistics.values()):
            # Candidates compete on nearest-entry codes (GPTQ per candidate would multiply the search time);
            # the chosen quantizers then get GPTQ's codes.
            chosen = {w.tensor: Encoded.of(w, chosen[w.tensor].quantizer, statistics[w.tensor].hessian) for w in weights}
            score = _score(weights, chosen, probe)
        per_function = [{"function": name, "sqnr_db": scores[name] if probe else None,
                         "mse": float(np.mean([e.mse for e in encoded.values()]))} for name, encoded in candidates.items()]
        tried.append(Choice(bits, chosen, score if probe else None, per_function))
        if config.target_sqnr is None:
            continue
        alive = [name for name in alive if scores[name] >= config.target_sqnr]
        if score < config.target_sqnr or not alive:
            break
    if config.target_sqnr is None:
        return tried[-1], tried
    reached = [c for c in tried if c.sqnr_db >= config.target_sqnr]
    if not reached:
        raise QCompileError(f"no quantizer reaches the target SQNR of {config.target_sqnr} dB at {high} bits "
                            f"(best: {tried[0].sqnr_db:.2f} dB); lower --target-sqnr or raise --bits")
    return reached[-1], tried


def _screen(names: list[str], bits: int, sketches: np.ndarray, layer_of_row: np.ndarray, options: FitOptions,
            executor) -> list[str]:
    """The SCREEN_KEEP functions with the lowest error when fitted to SCREEN_ROWS rows spread evenly over
    the layers (each layer's error relative to its rows' mean square, averaged over layers): only these
    are fitted to every row."""
    if len(names) <= SCREEN_KEEP:
        return names
    layers = np.unique(layer_of_row)
    per_layer = -(-SCREEN_ROWS // len(layers))
    rows = np.concatenate([np.flatnonzero(layer_of_row == layer)[:: max(1, int(np.sum(layer_of_row == layer)) // per_layer)]
                           for layer in layers])
    screen, screen_layers = sketches[rows], layer_of_row[rows]
    fits = executor.map(fit_function, [(name, bits, screen, screen_layers, options) for name in names],
                        f"screening {len(names)} functions at {bits} bits")
    power = np.maximum(np.mean(screen.astype(np.float64) ** 2, axis=1), 1e-30)
    errors = {}
    for name, (a_rows, s_rows) in zip(names, fits):
        quantizer = nonlinear_quantizer(name, bits, a_rows, s_rows)
        relative = np.mean((quantizer.dequantize(quantizer.encode(screen)) - screen) ** 2, axis=1) / power
        errors[name] = float(np.mean([np.mean(relative[screen_layers == layer]) for layer in layers]))
    return sorted(names, key=lambda name: (not np.isfinite(errors[name]), errors[name]))[:SCREEN_KEEP]


def _block_for(weight, block: int | None) -> int | None:
    return block if block is not None and weight.rows.shape[1] % block == 0 else None


def _encode(name: str, bits: int, fit: tuple[np.ndarray, np.ndarray], weights) -> dict[str, Encoded]:
    a_rows, s_rows = fit
    encoded, start = {}, 0
    for w in weights:
        end = start + w.rows.shape[0]
        encoded[w.tensor] = Encoded.of(w, nonlinear_quantizer(name, bits, a_rows[start:end], s_rows[start:end]))
        start = end
    return encoded


def _score(weights, encoded: dict[str, Encoded], probe: SqnrProbe | None) -> float:
    """Output SQNR with these quantizers, or minus the summed weight MSE without a probe."""
    if probe is None:
        return -sum(e.mse for e in encoded.values())
    return probe({w.tensor: encoded[w.tensor].weight(w) for w in weights})


def _per_layer(weights, candidates, chosen, score, probe):
    """Greedy: each layer tries its lowest-MSE function and keeps it where the score rises."""
    current = {w.tensor: chosen[w.tensor].weight(w) for w in weights} if probe else None
    for w in weights:
        alternative = min(candidates, key=lambda name: candidates[name][w.tensor].mse)
        trial = candidates[alternative][w.tensor]
        if trial.quantizer.function == chosen[w.tensor].quantizer.function:
            continue
        if probe is None:
            trial_score = score - chosen[w.tensor].mse + trial.mse
        else:
            trial_score = probe({**current, w.tensor: trial.weight(w)})
        if trial_score > score:
            chosen, score = {**chosen, w.tensor: trial}, trial_score
            if probe:
                current[w.tensor] = trial.weight(w)
    return chosen, score
