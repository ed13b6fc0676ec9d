"""Verification: run the float and quantized models in ONNX Runtime on held-out samples.

Per model output: SQNR and mean per-sample cosine similarity, of the quantized model exactly as
deployed. Per quantized layer: SQNR of its output, from a separate probe that exposes every layer's
output (ONNX Runtime does not fuse a node whose output is a graph output, so the probe computes
differently from the deployed model) on the first LAYER_SAMPLES samples. Sums are float32 and
accumulated as samples stream by.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from .numerics import decibels, json_number
from .runtime import make_session, with_extra_outputs

LAYER_SAMPLES = 8


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
            "layer_samples": min(self.samples, LAYER_SAMPLES),
            "outputs": {name: {k: json_number(v) for k, v in values.items()} for name, values in self.outputs.items()},
            "layers": [{"node": l.node, "op_type": l.op_type, "tensor": l.tensor, "sqnr_db": json_number(l.sqnr_db)}
                       for l in self.layers],
        }


class _SqnrSum:
    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: np.ndarray, approximation: np.ndarray) -> None:
        reference = reference.ravel().astype(np.float32, copy=False)
        error = reference - approximation.ravel().astype(np.float32, copy=False)
        self.signal += float(np.dot(reference, reference))
        self.noise += float(np.dot(error, error))

    def db(self) -> float:
        return decibels(self.signal, self.noise)


def verify(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, feeds: Iterable[dict],
           layers: list[tuple[str, str, str]], deployed_session: ort.InferenceSession | None = None) -> Verification:
    """`layers`: (node name, op type, output tensor) to compare, present in both models.
    `deployed_session`: a session already open on `quantized_model` (one is opened otherwise)."""
    outputs = [output.name for output in float_model.graph.output  # strings have no SQNR
               if output.type.tensor_type.elem_type != onnx.TensorProto.STRING]
    layer_tensors = list(dict.fromkeys(tensor for _, _, tensor in layers if tensor not in outputs))
    float_session = make_session(with_extra_outputs(float_model, layer_tensors))
    deployed_session = deployed_session or make_session(quantized_model)
    probe_session = make_session(with_extra_outputs(quantized_model, layer_tensors)) if layer_tensors else None
    sums = {name: _SqnrSum() for name in outputs + layer_tensors}
    cosines: dict[str, list[float]] = {name: [] for name in outputs}
    samples = 0
    for feed in tqdm(feeds, desc="verifying", unit="sample", leave=False):
        probe = probe_session is not None and samples < LAYER_SAMPLES
        names = outputs + layer_tensors if probe else outputs
        reference = dict(zip(names, float_session.run(names, feed)))
        deployed = dict(zip(outputs, deployed_session.run(outputs, feed)))
        for name in outputs:
            sums[name].add(reference[name], deployed[name])
            cosines[name].extend(row_cosines(reference[name], deployed[name]))
        if probe:
            for name, value in zip(layer_tensors, probe_session.run(layer_tensors, feed)):
                sums[name].add(reference[name], value)
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
    a = reference.reshape(len(reference), -1).astype(np.float32) if reference.ndim else reference.reshape(1, 1)
    b = approximation.reshape(a.shape).astype(np.float32)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    same_zero = np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0)  # two zero rows agree; one zero row does not
    return list(np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), same_zero))
