"""The model zoo: PyTorch models qcompile can export to ONNX, with real sample data for each."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qcompile.errors import QCompileError


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    build: Callable  # () -> torch.nn.Module in eval mode
    samples: Callable  # (split: "calib" | "eval", count) -> {input name: array with leading sample axis}
    outputs: tuple[str, ...]


def _sentence_samples(split: str, count: int) -> dict[str, np.ndarray]:
    from . import sentence_encoder, text

    corpus = text.CALIBRATION_FILE if split == "calib" else text.EVALUATION_FILE
    return sentence_encoder.encode(text.sentences(corpus, count))


def _minilm():
    from .sentence_encoder import minilm

    return minilm()


def _tiny_bert():
    from .sentence_encoder import tiny_bert

    return tiny_bert()


def _digit_samples(split: str, count: int) -> dict[str, np.ndarray]:
    """MNIST digits, shuffled once (the file is sorted by label): calibration from the front, evaluation from the back."""
    from .vit import mnist_5k

    images, _ = mnist_5k()
    images = images[np.random.default_rng(0).permutation(len(images))]
    return {"images": images[:count] if split == "calib" else images[-count:]}


def _efficientnet():
    from .vision import efficientnet_lite0

    return efficientnet_lite0()


def _photo_samples(split: str, count: int) -> dict[str, np.ndarray]:
    from .vision import photo_samples

    return photo_samples(split, count)


def _attention_variant(family: str, kind: str):
    def build():
        import torch

        from .transformer import AttentionConfig, Decoder, Encoder
        from .vit import ViT

        torch.manual_seed(0)
        config = AttentionConfig(kind=kind)
        if family == "vit":
            return ViT(attention=config).eval()
        model = Encoder if family == "encoder" else Decoder
        return model(vocab=30522, attention=config).eval()

    return build


_FAMILIES = {"encoder": ("BERT-style encoder", _sentence_samples, ("logits",)),
             "decoder": ("OPT-style causal decoder", _sentence_samples, ("logits",)),
             "vit": ("ViT for 28x28 digits", _digit_samples, ("logits",))}

ZOO = {
    "all-minilm-l6-v2": ZooModel("all-minilm-l6-v2", "pre-trained sentence encoder (22.7M params, BERT, 6 layers)",
                                 _minilm, _sentence_samples, ("sentence_embedding",)),
    "efficientnet-lite0": ZooModel("efficientnet-lite0", "pre-trained ImageNet CNN (4.65M params), on real photos",
                                   _efficientnet, _photo_samples, ("logits",)),
    "tiny-bert": ZooModel("tiny-bert", "randomly initialised 2-layer BERT sentence encoder for tests",
                          _tiny_bert, _sentence_samples, ("sentence_embedding",)),
}
for _family, (_what, _samples, _outputs) in _FAMILIES.items():
    for _kind in ("vanilla", "clipped", "gated"):
        ZOO[f"tiny-{_family}-{_kind}"] = ZooModel(f"tiny-{_family}-{_kind}", f"randomly initialised {_what}, {_kind} attention",
                                                  _attention_variant(_family, _kind), _samples, _outputs)


def get(name: str) -> ZooModel:
    if name not in ZOO:
        raise QCompileError(f"unknown model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def export(name: str, path: str | Path) -> Path:
    """Export a zoo model to ONNX with dynamic batch and sequence axes."""
    from qcompile.torch_export import export_module

    model = get(name)
    example = model.samples("calib", 2)
    axes = ("batch",) if "images" in example else ("batch", "sequence")
    return export_module(model.build(), example, Path(path), list(model.outputs), axes)


def write_samples(name: str, split: str, count: int, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **get(name).samples(split, count))
    return path
