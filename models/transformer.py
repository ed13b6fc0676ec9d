"""Small transformers whose attention is vanilla, clipped-softmax or gated (models/quantizable.py):
a BERT-style encoder (post-LayerNorm, masked language modelling), an OPT-style causal decoder
(pre-LayerNorm) and the block the ViT uses. Every block exposes its FFN output and residual sum
through OutlierProbes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcompile.errors import QCompileError

from .quantizable import ClippedSoftmax, Gate, OutlierProbe, SelfAttention

ATTENTION_KINDS = ("vanilla", "clipped", "gated")


@dataclass(frozen=True)
class AttentionConfig:
    """kind: "vanilla", "clipped" (softmax with gamma = -alpha / T, zeta) or "gated" (gate, pi_init).

    alpha must stay below zeta * T / (T - 1) (about 1) or a uniform attention row is clipped to all
    zeros, and with it every gradient through attention: measured here, a 17-token ViT with
    alpha = 4 trained to chance (0.09 on MNIST) while alpha = 1 matched vanilla (0.92).
    """

    kind: str = "vanilla"
    alpha: float = 1.0
    zeta: float = 1.0
    gate: str = "linear"
    pi_init: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise QCompileError(f"attention kind must be one of {', '.join(ATTENTION_KINDS)}; got {self.kind!r}")

    def build(self, dim: int, heads: int, causal: bool) -> SelfAttention:
        softmax = ClippedSoftmax(alpha=self.alpha, zeta=self.zeta) if self.kind == "clipped" else None
        gate = Gate(dim, heads, self.gate, self.pi_init) if self.kind == "gated" else None
        return SelfAttention(dim, heads, softmax=softmax, gate=gate, causal=causal)


VANILLA = AttentionConfig()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, attention: AttentionConfig = VANILLA,
                 causal: bool = False, pre_norm: bool = True):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = attention.build(dim, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ffn_output, self.residual = OutlierProbe(), OutlierProbe()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.norm1(x), padding_mask)
            return self.residual(x + self.ffn_output(self.mlp(self.norm2(x))))
        x = self.norm1(x + self.attention(x, padding_mask))
        return self.norm2(self.residual(x + self.ffn_output(self.mlp(x))))


class TokenTransformer(nn.Module):
    """BERT-style when not causal: embedding LayerNorm, post-LN blocks, a masked-LM head.
    OPT-style when causal: causal pre-LN blocks, a final LayerNorm, a language-model head.
    The head is tied to the token embedding."""

    def __init__(self, vocab: int, causal: bool, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128,
                 max_tokens: int = 128, attention: AttentionConfig = VANILLA):
        super().__init__()
        self.causal = causal
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_tokens, dim)
        self.norm = nn.LayerNorm(dim)  # on the embeddings (BERT) or after the blocks (OPT)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, attention, causal=causal, pre_norm=causal)
                                    for _ in range(depth))
        self.head_bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        x = x if self.causal else self.norm(x)
        for block in self.blocks:
            x = block(x, attention_mask)
        x = self.norm(x) if self.causal else x
        return x @ self.tokens.weight.t() + self.head_bias


class Encoder(TokenTransformer):
    def __init__(self, vocab: int, *args, **kwargs):
        super().__init__(vocab, False, *args, **kwargs)


class Decoder(TokenTransformer):
    def __init__(self, vocab: int, *args, **kwargs):
        super().__init__(vocab, True, *args, **kwargs)
