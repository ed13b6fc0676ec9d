"""Output-aware lookup tables: what a layer's inputs say about which weight errors matter.

A weight error dW of a layer y = x W^T costs E||x dW^T||^2 = sum over rows of dW H dW^T, with
H = E[x^T x] over calibration inputs (SqueezeLLM, arXiv 2306.07629; GPTQ, arXiv 2210.17323).
Its uses, for any table quantizer (PTNQ function, affine or free):
* `gptq_codes` (MatMul/Gemm): codes chosen column by column with GPTQ's error feedback through H^-1;
* `LayerStatistics.importance` (Conv, whose K x K moments would need every window): its diagonal,
  per-weight weights of the k-means and affine fits;
* `free_table`: per row (or per block of columns) 2^B free values fitted by weighted k-means
  (Lloyd-Max), stored as float16 (SqueezeLLM's non-uniform tables).
Refitting a free table to the GPTQ codes under the full H gained 0.1 dB on MiniLM for 18x the time:
not done.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from .ptnq import Quantizer, affine_quantizer

LLOYD_ITERATIONS = 24
GPTQ_BLOCK = 128  # columns updated together (GPTQ's lazy batch)
GPTQ_DAMPING = 0.1  # of the mean diagonal, added to H before inversion (0.01 overfits 64 MiniLM samples: -0.9 dB)
GPTQ_MAX_INPUTS = 4096  # beyond this K, the K x K moments (8 K^2 bytes per input) are not collected
ROW_CHUNK = 4096
table_symbol = sp.Symbol("t", real=True)


@dataclass
class LayerStatistics:
    """What one weight's fit knows about its layer's inputs.

    hessian: E[x^T x] [K, K] of a MatMul/Gemm input: codes are chosen with GPTQ's error feedback.
    importance: [N, K] weights of each weight's squared error, mean 1 per row: a Conv weight's input
        channel's sqrt(E[x_c^2]) (measured: the square root fits EfficientNet-Lite0 better than E[x_c^2]
        itself, and weighting MatMul rows this way loses 1 dB on MiniLM where GPTQ gains 2)."""

    hessian: np.ndarray | None = None
    importance: np.ndarray | None = None


def layer_statistics(weight, moments: np.ndarray | None) -> LayerStatistics:
    """From the second moments of a LutWeight's input (a [K, K] matrix for MatMul/Gemm, per-channel
    E[x_c^2] for Conv; None: no calibration data)."""
    if moments is None:
        return LayerStatistics()
    if weight.op != "Conv":
        return LayerStatistics(hessian=moments)
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    groups = moments.size // in_per_group
    channel = (np.arange(out_channels) // (out_channels // groups))[:, None] * in_per_group + np.arange(in_per_group)
    per_weight = np.repeat(np.sqrt(np.maximum(moments[channel], 0.0)), int(np.prod(weight.shape[2:])), axis=1)
    mean = per_weight.mean(axis=1, keepdims=True)
    # A row whose inputs never fire (mean 0) has nothing to weigh: uniform.
    importance = np.where(mean > 0, per_weight / np.where(mean > 0, mean, 1.0), 1.0)
    return LayerStatistics(importance=importance.astype(np.float32))


def free_table(rows: np.ndarray, bits: int, block: int | None = None, weights: np.ndarray | None = None) -> Quantizer:
    """2^bits values per row (per block of `block` columns) by Lloyd-Max k-means, each value's squared
    error weighted by `weights` ([N, K] or broadcastable), stored as float16. Lloyd starts from the
    MSE-optimal affine grid and never increases the error, so a free table is never worse than affine
    (started at the weighted quantiles instead, it ended 5% worse than affine on Laplacian rows)."""
    n, k = rows.shape
    start = affine_quantizer(rows, bits, block, weights).table  # [N, G, 2^B]
    blocks = start.shape[1]
    values = rows.reshape(n * blocks, k // blocks)
    weight = np.ones_like(rows) if weights is None else np.broadcast_to(weights, rows.shape).copy()
    weight = weight.reshape(values.shape)
    table = np.empty((n * blocks, 1 << bits), np.float32)
    for begin in range(0, n * blocks, ROW_CHUNK):
        part = slice(begin, begin + ROW_CHUNK)
        table[part] = weighted_kmeans(values[part], weight[part], start.reshape(n * blocks, -1)[part])
    return table_quantizer(table.reshape(n, blocks, 1 << bits), bits)


def table_quantizer(table: np.ndarray, bits: int) -> Quantizer:
    """A quantizer whose table is stored as it is, in float16."""
    return Quantizer(bits, None, table_symbol, {"t": table.astype(np.float16)},
                     np.arange(1 << bits, dtype=np.float64))


def weighted_kmeans(values: np.ndarray, weights: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per row: the centres [rows, levels], from those given, minimising sum w (v - nearest centre)^2
    (Lloyd's algorithm); an empty cluster keeps its centre."""
    import torch

    v = torch.from_numpy(np.ascontiguousarray(values, np.float32))
    w = torch.from_numpy(np.ascontiguousarray(weights, np.float32))
    centres = torch.from_numpy(np.ascontiguousarray(centres, np.float32))
    rows, levels = centres.shape
    offsets = (torch.arange(rows) * levels)[:, None]
    for _ in range(LLOYD_ITERATIONS):
        centres, _ = centres.sort(dim=1)
        midpoints = (centres[:, 1:] + centres[:, :-1]) / 2
        cluster = (torch.searchsorted(midpoints.contiguous(), v) + offsets).ravel()
        mass = torch.zeros(rows * levels).index_add_(0, cluster, w.ravel())
        moment = torch.zeros(rows * levels).index_add_(0, cluster, (w * v).ravel())
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-30), centres.ravel()).view(rows, levels)
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres.sort(dim=1)[0].numpy()


def gptq_codes(rows: np.ndarray, quantizer: Quantizer, hessian: np.ndarray) -> np.ndarray:
    """Codes of `rows` [N, K] under `quantizer`'s tables, chosen column by column in order of decreasing
    E[x_k^2] with GPTQ's error feedback: each column's rounding error is spread over the columns not
    yet quantized through H^-1, so the layer's output error, not each weight's, is what is minimised."""
    import torch

    n, k = rows.shape
    h = torch.from_numpy(hessian.astype(np.float64))
    w = torch.from_numpy(rows.astype(np.float64)).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    h = h[order][:, order]
    w = w[:, order]
    h += GPTQ_DAMPING * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    table = torch.from_numpy(quantizer.table.astype(np.float64))  # [N, G, L]
    block_of_column = (order * table.shape[1] // k).long()
    codes = torch.empty((n, k), dtype=torch.long)
    for start in range(0, k, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, k)
        part, errors = w[:, start:end].clone(), torch.zeros((n, end - start), dtype=w.dtype)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            entries = table[:, block_of_column[start + i]]  # [N, L]
            column = part[:, i]
            choice = (entries - column[:, None]).abs().nan_to_num(float("inf")).argmin(dim=1)
            codes[:, start + i] = choice
            error = (column - entries.gather(1, choice[:, None])[:, 0]) / block_inverse[i, i]
            part[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted.numpy()
