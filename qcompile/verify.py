"""Verification: run the float and quantized models in ONNX Runtime on held-out samples.

Per model output: SQNR and mean per-sample cosine similarity. Per quantized layer (each node that
reads a quantized tensor): SQNR of its output. Sums are accumulated as samples stream by.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from tqdm import tqdm

from .numerics import decibels
from .runtime import make_session, with_extra_outputs


@dataclass(frozen=True)
class LayerCheck:
    node: str
    op_type: str
    tensor: str
    sqnr_db: float


@dataclass(frozen=True)
class Verification:
    samples: int
    outputs: dict[str, dict[str, float]]  # output name -> {"sqnr_db", "cosine"}
    layers: list[LayerCheck]

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "outputs": {name: {k: _rounded(v) for k, v in values.items()} for name, values in self.outputs.items()},
            "layers": [{"node": l.node, "op_type": l.op_type, "tensor": l.tensor, "sqnr_db": _rounded(l.sqnr_db)}
                       for l in self.layers],
        }


class _SqnrSum:
    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: np.ndarray, approximation: np.ndarray) -> None:
        reference = reference.astype(np.float64)
        self.signal += float(np.sum(reference**2))
        self.noise += float(np.sum((reference - approximation) ** 2))

    def db(self) -> float:
        return decibels(self.signal, self.noise)


def verify(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, feeds: Iterable[dict],
           layers: list[tuple[str, str, str]]) -> Verification:
    """`layers`: (node name, op type, output tensor) to compare, present in both models."""
    outputs = [output.name for output in float_model.graph.output  # strings have no SQNR
               if output.type.tensor_type.elem_type != onnx.TensorProto.STRING]
    layer_tensors = [tensor for _, _, tensor in layers if tensor not in outputs]
    names = outputs + layer_tensors
    float_session = make_session(with_extra_outputs(float_model, layer_tensors))
    quantized_session = make_session(with_extra_outputs(quantized_model, layer_tensors))
    sums = {name: _SqnrSum() for name in names}
    cosines: dict[str, list[float]] = {name: [] for name in outputs}
    samples = 0
    for feed in tqdm(feeds, desc="verifying", unit="sample", leave=False):
        reference = dict(zip(names, float_session.run(names, feed)))
        quantized = dict(zip(names, quantized_session.run(names, feed)))
        for name in names:
            sums[name].add(reference[name], quantized[name])
        for name in outputs:
            cosines[name].extend(row_cosines(reference[name], quantized[name]))
        samples += 1
    return Verification(
        samples=samples,
        outputs={name: {"sqnr_db": sums[name].db(), "cosine": float(np.mean(cosines[name])) if cosines[name] else 1.0}
                 for name in outputs},
        layers=[LayerCheck(node, op, tensor, sums[tensor].db()) for node, op, tensor in layers],
    )


def row_cosines(reference: np.ndarray, approximation: np.ndarray) -> list[float]:
    """Cosine similarity per leading-axis row (one per sample of a batch)."""
    if reference.size == 0:
        return []
    a = reference.reshape(len(reference), -1).astype(np.float64) if reference.ndim else reference.reshape(1, 1)
    b = approximation.reshape(a.shape).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    same_zero = np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0)  # two zero rows agree; one zero row does not
    return list(np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), same_zero))


def _rounded(value: float) -> float | str:
    """Fixed precision keeps manifests byte-stable; JSON has no infinity."""
    return round(float(value), 4) if np.isfinite(value) else str(value)
