"""Attention that can "do nothing" without outliers (Bondarenko, Nagel, Blankevoort 2023; seed 002).

* ClippedSoftmax: clip((zeta - gamma) * softmax(x) + gamma, 0, 1), gamma < 0 <= 1 <= zeta, so
  exact zeros and ones are reachable without pushing logits to extremes.
* Gated attention: sigmoid(G(x)) * softmax(Q K^T / sqrt(d)) V, G a per-head linear layer or small
  MLP on the token's input, its bias set so the gate starts at pi_init.
* outlier_stats: the paper's metrics (max infinity norm, average kurtosis, values beyond 6 std) of
  the FFN outputs and residual sums, which blocks expose through OutlierProbe modules.

SelfAttention takes either (or neither), causal or not, so one module serves a BERT-style encoder,
an OPT-style decoder and the ViT.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from qcompile.analyze import OUTLIER_SIGMAS, StreamingMoments
from qcompile.errors import QCompileError
from qcompile.qat import MatMul

GATES = ("linear", "mlp")


class ClippedSoftmax(nn.Module):
    """clip((zeta - gamma) * softmax(x) + gamma, 0, 1). Give gamma directly, or alpha for
    gamma = -alpha / T with T the length of the softmax axis (the paper's choice)."""

    def __init__(self, gamma: float | None = None, zeta: float = 1.0, alpha: float | None = None, dim: int = -1):
        super().__init__()
        if (gamma is None) == (alpha is None):
            raise QCompileError("give exactly one of gamma and alpha")
        if (gamma is not None and gamma > 0) or (alpha is not None and alpha < 0) or zeta < 1:
            raise QCompileError(f"clipped softmax needs gamma <= 0 (alpha >= 0) and zeta >= 1; got gamma={gamma}, "
                                f"alpha={alpha}, zeta={zeta}")
        self.gamma, self.zeta, self.alpha, self.dim = gamma, zeta, alpha, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = -self.alpha / x.shape[self.dim] if self.alpha is not None else self.gamma
        return torch.clip((self.zeta - gamma) * torch.softmax(x, dim=self.dim) + gamma, 0.0, 1.0)


class Gate(nn.Module):
    """Per-head gate probabilities (batch, tokens, heads) = sigmoid(G(x)).

    kind "linear": one linear map per head; "mlp": per head, Linear(dim, hidden) -> ReLU -> Linear(hidden, 1).
    The output bias starts at logit(pi_init), so every gate starts at pi_init.
    """

    def __init__(self, dim: int, heads: int, kind: str = "linear", pi_init: float = 0.5, hidden: int = 4):
        super().__init__()
        if kind not in GATES:
            raise QCompileError(f"gate must be one of {', '.join(GATES)}; got {kind!r}")
        if not 0.0 < pi_init < 1.0:
            raise QCompileError(f"pi_init must be in (0, 1); got {pi_init}")
        self.heads = heads
        if kind == "linear":
            self.layers = nn.Linear(dim, heads)
            out = self.layers
        else:
            out = nn.Conv1d(heads * hidden, heads, kernel_size=1, groups=heads)  # one small layer per head
            self.layers = nn.Sequential(nn.Linear(dim, heads * hidden), nn.ReLU(), _Tokens(out))
        nn.init.constant_(out.bias, math.log(pi_init / (1 - pi_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(x))


class _Tokens(nn.Module):
    """Applies a Conv1d over channels of (batch, tokens, channels) input."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention; optional clipped softmax, gate and causal mask."""

    def __init__(self, dim: int, heads: int, softmax: nn.Module | None = None, gate: Gate | None = None,
                 causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = softmax if softmax is not None else nn.Softmax(dim=-1)
        self.gate = gate
        self.scores, self.context = MatMul(), MatMul()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """padding_mask: (batch, tokens), 1 for real tokens, 0 for padding."""
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = self.scores(q * self.scale, k.transpose(-2, -1))
        blocked = None  # only mask when there is something to mask: an all-false mask still costs a node
        if padding_mask is not None:
            blocked = (padding_mask[:, None, None, :] == 0)
        if self.causal:
            future = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
            blocked = future if blocked is None else blocked | future
        if blocked is not None:
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        context = self.context(self.softmax(scores), v)  # (batch, heads, tokens, head dim)
        if self.gate is not None:
            context = context * self.gate(x).transpose(1, 2).unsqueeze(-1)
        return self.proj(context.transpose(1, 2).reshape(batch, tokens, dim))


class OutlierProbe(nn.Identity):
    """Marks a tensor whose outliers outlier_stats measures (an FFN output or a residual sum)."""


def outlier_stats(model: nn.Module, batches, forward=None) -> dict:
    """Bondarenko et al.'s metrics over the model's OutlierProbes on `batches`:
    max_inf_norm (largest |x| seen), avg_kurtosis (kurtosis per probe, averaged over probes) and
    outliers (values beyond 6 std of their probe's mean; counted in a second pass over `batches`).

    forward: how to run a batch (default: model(batch), or model(*batch) for a tuple).
    """
    probes = [m for m in model.modules() if isinstance(m, OutlierProbe)]
    if not probes:
        raise QCompileError("the model has no OutlierProbe modules to measure")
    batches = list(batches)
    run = forward or (lambda batch: model(*batch) if isinstance(batch, tuple) else model(batch))
    moments = {probe: StreamingMoments() for probe in probes}
    peaks = {probe: 0.0 for probe in probes}
    outliers = {probe: 0 for probe in probes}

    def measure(probe, _inputs, output):
        values = output.detach().double().numpy()
        moments[probe].update(values)
        peaks[probe] = max(peaks[probe], float(np.abs(values).max()))

    def count(probe, _inputs, output):
        values = output.detach().double().numpy()
        outliers[probe] += int((np.abs(values - moments[probe].mean) > OUTLIER_SIGMAS * moments[probe].std).sum())

    was_training = model.training
    model.eval()
    try:
        for hook in (measure, count):
            handles = [probe.register_forward_hook(hook) for probe in probes]
            with torch.no_grad():
                for batch in batches:
                    run(batch)
            for handle in handles:
                handle.remove()
    finally:
        model.train(was_training)
    return {"max_inf_norm": max(peaks.values()),
            "avg_kurtosis": float(np.mean([m.kurtosis for m in moments.values()])),
            "outliers": sum(outliers.values())}
