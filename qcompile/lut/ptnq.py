"""Lookup-table weight quantizers: PTNQ non-linear fitting (seed 003) and the affine baselines.

Every quantizer is a SymPy expression of the code value `c` and per-row (or per-block) parameters;
its table (one float per code) is the expression evaluated on the code grid, and a weight's code is
the index of the nearest table entry.
* non-linear: w = s * f(a * c / 2^(B-1)), c in [-2^(B-1), 2^(B-1)), f from the function pool;
* affine: w = scale * (c - zero), c in [0, 2^B), per row or per block of columns (MSE-optimal).

Fitting a function runs on the rows of every layer together (vectorised, in chunks of 2048 rows),
on a sorted 64-point sketch of each row (equally spaced order statistics: the squared error over
them tracks the row's own):
1. initialisation: ones, random, and space search; s from the range rule; optionally a non-linear
   regression on the sorted weights; each row keeps its best start;
2. training: Adam on (a, s) with straight-through rounding, three learning-rate schedules (linear
   decay, cosine with warm restarts, constant) side by side, starting at 10^(E/2 - 1) where E is
   the exponent of the layer's initial MSE; each row keeps its best parameters.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import functions
from .functions import Backend, lower
from ..numerics import IntGrid, mse_params

c, a, s, scale, zero = sp.symbols("c a s scale zero", real=True)
SCHEDULES = ("linear", "cosine", "constant")
SKETCH_POINTS = 64
SPACE_START_BOUND = 10.0  # space search starts with a drawn from [-10, 10]
CHUNK_ROWS = 2048


@dataclass(frozen=True)
class FitOptions:
    """steps: Adam steps per schedule; space_*: space-search rounds, draws per row per round, and the
    coarser sketch it scores on; regression: refine the best start by a fit to the sorted weights."""

    steps: int = 15
    space_rounds: int = 15
    space_population: int = 16
    space_sketch: int = 32
    regression: bool = False
    seed: int = 0


@dataclass
class Quantizer:
    """One weight's B-bit table quantizer: `expression` of c and `params` (each [N, G, 1])."""

    bits: int
    function: str | None
    expression: sp.Expr
    params: dict[str, np.ndarray]
    grid: np.ndarray  # the code values c, one per table entry
    table: np.ndarray = field(init=False)  # [N, G, 2^bits] float32

    def __post_init__(self) -> None:
        symbols = {sp.Symbol(name, real=True): value.astype(np.float32) for name, value in self.params.items()}
        symbols[c] = self.grid.astype(np.float32)
        with np.errstate(all="ignore"):
            table = lower(self.expression, symbols, Float32Backend())
        rows, blocks = next(iter(self.params.values())).shape[:2]
        self.table = np.broadcast_to(table, (rows, blocks, self.grid.size)).astype(np.float32)

    @property
    def name(self) -> str:
        """The pool function, "affine" or "table" (free values)."""
        return self.function or ("affine" if "scale" in self.params else "table")

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """[N, K] weights -> [N, K] table indices (nearest entry of each row's block table)."""
        n, k = rows.shape
        blocks = self.table.shape[1]
        blocked = rows.reshape(n * blocks, k // blocks)
        return nearest(blocked, self.table.reshape(n * blocks, -1)).reshape(n, k)

    def dequantize(self, indices: np.ndarray) -> np.ndarray:
        n, k = indices.shape
        blocks = self.table.shape[1]
        flat = self.table.reshape(n * blocks, -1)
        return np.take_along_axis(flat, indices.reshape(n * blocks, -1), axis=1).reshape(n, k)


class Float32Backend(Backend):
    """NumPy in float32, as ONNX Runtime computes the folded table."""

    def const(self, value: float):
        return np.float32(value)

    def pow(self, base, exponent: float):
        return np.power(base, np.float32(exponent))


def nearest(rows: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of tables[r] for every value of rows[r]; NaN entries are never chosen."""
    import torch

    safe = np.where(np.isnan(tables), np.inf, tables)
    order = np.argsort(safe, axis=1, kind="stable")
    ordered = np.take_along_axis(safe, order, axis=1)
    with np.errstate(invalid="ignore"):  # inf + inf midpoints: past every finite value, as wanted
        midpoints = (ordered[:, 1:] + ordered[:, :-1]) / 2
    positions = torch.searchsorted(torch.from_numpy(np.ascontiguousarray(midpoints)),
                                   torch.from_numpy(np.ascontiguousarray(rows, dtype=midpoints.dtype))).numpy()
    return np.take_along_axis(order, positions, axis=1)


def nonlinear_grid(bits: int) -> np.ndarray:
    half = 1 << (bits - 1)
    return np.arange(-half, half, dtype=np.float64)


def nonlinear_quantizer(function: str, bits: int, a_rows: np.ndarray, s_rows: np.ndarray) -> Quantizer:
    f = functions.by_name(function)
    expression = s * f.forward.subs(functions.x, a * c / (1 << (bits - 1)))
    return Quantizer(bits, function, expression,
                     {"a": a_rows.reshape(-1, 1, 1), "s": s_rows.reshape(-1, 1, 1)}, nonlinear_grid(bits))


def affine_quantizer(rows: np.ndarray, bits: int, block: int | None = None,
                     weights: np.ndarray | None = None) -> Quantizer:
    """MSE-optimal asymmetric B-bit affine parameters per row, or per block of `block` columns; `weights`
    ([N, K] or broadcastable) weigh each value's squared error."""
    n, k = rows.shape
    block = block or k
    blocked = rows.reshape(n * (k // block), block)
    if weights is not None:
        weights = np.broadcast_to(weights, rows.shape).reshape(blocked.shape)
    step, zero_point = mse_params(blocked, IntGrid(0, (1 << bits) - 1, np.uint8), weights)
    shape = (n, k // block, 1)
    return Quantizer(bits, None, scale * (c - zero),
                     {"scale": np.asarray(step, np.float32).reshape(shape),
                      "zero": np.asarray(zero_point, np.float32).reshape(shape)},
                     np.arange(1 << bits, dtype=np.float64))


def sketch(rows: np.ndarray, points: int = SKETCH_POINTS) -> np.ndarray:
    """Equally spaced order statistics of each row: [N, points] (a short row repeats some)."""
    ordered = np.sort(rows, axis=1)
    return ordered[:, np.round(np.linspace(0, rows.shape[1] - 1, points)).astype(np.int64)]


def fit_function(function: str, bits: int, sketches: np.ndarray, layer_of_row: np.ndarray,
                 options: FitOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (a, s) of `function` at `bits` for the sketched rows of every layer. Deterministic:
    the random streams are seeded from (function, bits, options.seed) only."""
    import torch

    torch.manual_seed(zlib.crc32(f"{function}/{bits}/{options.seed}".encode()))
    # Rows are fitted at unit peak, so losses (and the learning-rate rule) compare across layers.
    peak = np.abs(sketches).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0).astype(np.float32)
    unit_rows = torch.from_numpy((sketches / peak[:, None]).astype(np.float32))
    f = functions.by_name(function)
    # Chunks of rows keep every temporary small enough for the allocator to reuse (one tensor over
    # all rows of MiniLM is ~100 MB and page-faults on every operation).
    fits = [_Fit(f, bits, unit_rows[start:start + CHUNK_ROWS], torch) for start in range(0, len(unit_rows), CHUNK_ROWS)]
    starts = []
    for fit in fits:
        start = fit.best_of([fit.start(torch.ones(fit.rows)), fit.start(torch.randn(fit.rows).clamp(-1, 1)),
                             fit.space_search(options)])
        if options.regression:
            start = fit.best_of([start, fit.regression(*start, options.steps)])
        starts.append(start)
    with torch.no_grad():  # seed 003's initial learning rate 10^(E/2 - 1), E from each layer's starting MSE
        loss = torch.cat([torch.nan_to_num(fit.rounding_loss(*start), nan=0.0, posinf=0.0) for fit, start in zip(fits, starts)])
        layer_of_row = torch.from_numpy(layer_of_row)
        layer_loss = torch.zeros(int(layer_of_row.max()) + 1).index_add_(0, layer_of_row, loss)
        layer_loss /= torch.bincount(layer_of_row).clamp_min(1)
        rate = (10.0 ** (torch.floor(torch.log10(layer_loss.clamp_min(1e-30))) / 2 - 1))[layer_of_row]
    trained = [fit.train(*start, rate[i * CHUNK_ROWS:(i + 1) * CHUNK_ROWS], options.steps)
               for i, (fit, start) in enumerate(zip(fits, starts))]
    a_rows = torch.cat([a for a, _ in trained]).numpy()
    s_rows = torch.cat([s for _, s in trained]).numpy()
    return a_rows.astype(np.float32), (s_rows * peak).astype(np.float32)


class _Fit:
    """Vectorised fitting of one function at one bit width, for one chunk of rows at unit peak."""

    def __init__(self, f: functions.PoolFunction, bits: int, rows, torch):
        self.f, self.torch, self.rows_data = f, torch, rows
        self.rows = rows.shape[0]
        self.half = float(1 << (bits - 1))
        self.codes = torch.arange(-self.half, self.half, dtype=torch.float32)
        self.peak = rows.abs().amax(dim=1)

    def table(self, a, s):
        """[..., rows] parameters -> [..., rows, 2^B] tables."""
        return s[..., None] * self.f.torch(a[..., None] * self.codes / self.half)

    def scale_for(self, a):
        """Seed 003's range rule: s maps the largest |f| on the code grid to the largest |w|."""
        reach = self.torch.nan_to_num(self.f.torch(a[..., None] * self.codes / self.half).abs(), 0.0, 0.0, 0.0)
        reach = reach.amax(dim=-1)
        return self.torch.where(reach > 0, self.peak / reach.clamp_min(1e-30), self.torch.ones_like(reach))

    def away_from_zero(self, a):
        """a = 0 collapses every table entry to f(0): keep |a| >= 1e-3."""
        return self.torch.where(a.abs() < 1e-3, self.torch.full_like(a, 1e-3), a)

    def start(self, a):
        a = self.away_from_zero(a)
        return a, self.scale_for(a)

    def nearest_mse(self, a, s):
        """Squared error per row with nearest-entry codes; a, s: [..., rows]."""
        rows = self.rows_data
        table = self.torch.nan_to_num(self.table(a, s), nan=float("inf"))
        ordered, _ = table.sort(dim=-1)
        midpoints = (ordered[..., 1:] + ordered[..., :-1]) / 2
        target = rows.expand(*a.shape, rows.shape[-1]).contiguous()
        positions = self.torch.searchsorted(midpoints.contiguous(), target)
        error = (target - ordered.gather(-1, positions)) ** 2
        return self.torch.nan_to_num(error.mean(dim=-1), nan=float("inf"))

    def best_of(self, candidates):
        errors = self.torch.stack([self.nearest_mse(a, s) for a, s in candidates])
        choice = errors.argmin(dim=0)
        a = self.torch.stack([a for a, _ in candidates]).gather(0, choice[None])[0]
        s = self.torch.stack([s for _, s in candidates]).gather(0, choice[None])[0]
        return a, s

    def space_search(self, options: FitOptions):
        """Seed 003's space search on a coarser sketch, scored by the inverse-rounding quantizer through
        its table (cheaper than nearest-entry codes): draw, keep the top 10%, narrow to
        [-(max + mean), max + mean] of the kept |a|, repeat; the best draw seen wins."""
        torch = self.torch
        index = torch.linspace(0, self.rows_data.shape[1] - 1, min(options.space_sketch, self.rows_data.shape[1]))
        coarse = self.rows_data[:, index.round().long()]
        population = options.space_population
        keep = max(1, population // 10)
        bound = torch.full((self.rows,), SPACE_START_BOUND)
        best_a, best_error = torch.ones(self.rows), torch.full((self.rows,), float("inf"))
        for _ in range(options.space_rounds):
            draws = self.away_from_zero((torch.rand(population, self.rows) * 2 - 1) * bound)
            errors = self.table_loss(draws, self.scale_for(draws), coarse)
            top_errors, top = errors.topk(keep, dim=0, largest=False)
            kept = draws.gather(0, top).abs()
            better = top_errors[0] < best_error
            best_a = torch.where(better, draws.gather(0, top[:1])[0], best_a)
            best_error = torch.where(better, top_errors[0], best_error)
            bound = kept.amax(dim=0) + kept.mean(dim=0)
        return self.start(best_a)

    def regression(self, a, s, steps: int):
        """Fit s * f(a * t) to the sorted weights, t spread evenly over the code range (no rounding)."""
        torch = self.torch
        t = torch.linspace(-1.0, (self.half - 1) / self.half, self.rows_data.shape[1])
        a, s = a.clone().requires_grad_(), s.clone().requires_grad_()
        optimizer = torch.optim.Adam([a, s], lr=1e-2)
        for _ in range(steps):
            loss = torch.nan_to_num((s[:, None] * self.f.torch(a[:, None] * t) - self.rows_data) ** 2, 0.0, 0.0, 0.0)
            optimizer.zero_grad()
            loss.mean(dim=1).sum().backward()
            for p in (a, s):
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
            optimizer.step()
        return a.detach(), s.detach()

    def table_loss(self, a, s, rows):
        """rounding_loss without gradients: the dequantized values are read from the 2^B-entry table."""
        torch = self.torch
        codes = (self.f.torch(rows / s[..., None], inverse=True) / a[..., None] * self.half).round()
        index = torch.nan_to_num(codes, nan=0.0).clamp(-self.half, self.half - 1).long() + int(self.half)
        error = (rows - self.table(a, s).gather(-1, index)) ** 2
        return torch.nan_to_num(error.mean(dim=-1), nan=float("inf"))

    def rounding_loss(self, a, s):
        """Per-row MSE of seed 003's quantizer: codes from the inverse, rounded (straight-through)."""
        rows = self.rows_data
        inverse = self.f.torch(rows / s[..., None], inverse=True) / a[..., None] * self.half
        codes = inverse + (inverse.round() - inverse).detach()
        codes = codes.clamp(-self.half, self.half - 1)
        error = (rows - s[..., None] * self.f.torch(a[..., None] * codes / self.half)) ** 2
        return error.mean(dim=-1)

    def train(self, a, s, rate, steps: int):
        """Adam on (a, s) from the start given, one copy per learning-rate schedule; `rate` per row."""
        torch = self.torch
        count = len(SCHEDULES)
        start_a, start_s = a, s
        a = a.expand(count, -1).clone().requires_grad_()
        s = s.expand(count, -1).clone().requires_grad_()
        best_a, best_s = a.detach().clone(), s.detach().clone()
        best = torch.full((count, self.rows), float("inf"))
        moments = [torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(s), torch.zeros_like(s)]
        restart = max(1, steps // 4)
        for step in range(steps):
            factor = torch.tensor([1.0 - 0.9 * step / steps, 0.5 * (1 + np.cos(np.pi * (step % restart) / restart)),
                                   1.0])[:, None]
            loss = self.rounding_loss(a, s)
            finite = torch.isfinite(loss)
            with torch.no_grad():
                improved = finite & (loss < best)
                best = torch.where(improved, loss, best)
                best_a = torch.where(improved, a, best_a)
                best_s = torch.where(improved, s, best_s)
            grads = torch.autograd.grad(torch.where(finite, loss, 0.0).sum(), [a, s])
            with torch.no_grad():  # Adam, written out: a learning rate per row (its layer's) and per schedule
                for parameter, grad, m, v in ((a, grads[0], *moments[:2]), (s, grads[1], *moments[2:])):
                    grad = torch.nan_to_num(grad, 0.0, 0.0, 0.0)
                    m.mul_(0.9).add_(grad, alpha=0.1)
                    v.mul_(0.999).addcmul_(grad, grad, value=0.001)
                    m_hat, v_hat = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.999 ** (step + 1))
                    parameter.sub_(rate * factor * m_hat / (v_hat.sqrt() + 1e-12))
        return self.best_of([(best_a[i], best_s[i]) for i in range(count)] + [(start_a, start_s)])
