"""FoldClippedSoftmax on real PyTorch exports: every way of writing the clip, exactness, plan, notes."""
import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile import models
from qcompile.config import QuantConfig
from qcompile.passes import FoldClippedSoftmax, NormalizeGraph, PlanW8A8
from qcompile.pipeline import CompileContext, Pipeline
from qcompile.runtime import make_session
from qcompile.torch_export import to_onnx


class ClippedSoftmaxWritten(torch.nn.Module):
    """softmax(x) @ v with the clip written one of the ways people write it."""

    def __init__(self, how: str, alpha: float | None):
        super().__init__()
        self.how, self.alpha = how, alpha

    def forward(self, x, v):
        gamma = -self.alpha / x.shape[-1] if self.alpha else -0.03
        y = (1.1 - gamma) * torch.softmax(x, -1) + gamma
        if self.how == "clip":
            y = torch.clip(y, 0, 1)
        elif self.how == "clamp_min_max":
            y = torch.clamp_max(torch.clamp_min(y, 0.0), 1.0)
        elif self.how == "minimum_maximum":
            y = torch.minimum(torch.maximum(y, torch.tensor(0.0)), torch.tensor(1.0))
        else:  # "relu": 1 - relu(1 - relu(y))
            y = 1 - torch.relu(1 - torch.relu(y))
        return y @ v


def export(how, alpha):
    example = {"x": torch.randn(2, 3, 5, 5), "v": torch.randn(2, 3, 5, 4)}
    return to_onnx(ClippedSoftmaxWritten(how, alpha), example, ["y"], ("batch",))


def run_pass(model):
    context = CompileContext.from_model(model, QuantConfig())
    records = Pipeline([NormalizeGraph(), FoldClippedSoftmax(), PlanW8A8()]).run(context)
    return context, records[1]


@pytest.mark.parametrize("how", ["clip", "clamp_min_max", "minimum_maximum", "relu"])
@pytest.mark.parametrize("alpha", [None, 4.0], ids=["gamma", "gamma=-alpha/T"])
def test_every_written_form_becomes_one_exact_clip_with_a_fixed_range(how, alpha, rng):
    model = export(how, alpha)  # the softmax length is static, so the exporter folds gamma either way
    context, record = run_pass(model)
    assert record.changed == (1 if how == "relu" else 0)
    ops = [n.op_type for n in context.model.graph.node]
    assert ops.count("Clip") == 1 and "Relu" not in ops
    feed = {"x": rng.normal(size=(2, 3, 5, 5)).astype(np.float32) * 4, "v": rng.normal(size=(2, 3, 5, 4)).astype(np.float32)}
    np.testing.assert_allclose(make_session(context.model).run(None, feed)[0], make_session(model).run(None, feed)[0],
                               rtol=1e-5, atol=1e-6)
    [note] = context.notes
    assert note["note"].startswith("clipped softmax") and "gamma and zeta are constants" in note["note"]
    fixed = [s for s in context.plan.specs.values() if s.fixed_range is not None]
    assert [(s.fixed_range, s.reason) for s in fixed] == [((0.0, 1.0), "Clip output, range [0, 1] known")]


def test_a_plain_softmax_says_why_it_was_not_folded(tmp_path):
    context, record = run_pass(onnx.load(str(models.export("tiny-vit-vanilla", tmp_path / "model.onnx"))))
    assert record.changed == 0
    assert {n["note"] for n in context.notes} == {"plain softmax: its output feeds MatMul, not a single Mul"}


@pytest.mark.parametrize("name", ["tiny-vit-clipped", "tiny-encoder-clipped", "tiny-decoder-clipped"])
def test_clipped_models_compile_w8a8_with_uncalibrated_probabilities(name, tmp_path):
    path = models.export(name, tmp_path / "model.onnx")
    calib = models.write_samples(name, "calib", 8, tmp_path / "calib.npz")
    artifact = qcompile.compile(path, QuantConfig(), calib=calib, verify_data=models.write_samples(name, "eval", 4, tmp_path / "e.npz"))
    notes = [n["note"] for n in artifact.manifest["explain"] if n["pass"] == "fold-clipped-softmax"]
    blocks = len(models.get(name).build().blocks)
    assert len(notes) == blocks and all(n.startswith("clipped softmax (already one Clip") for n in notes)
    # Text models have a dynamic sequence length, so gamma = -alpha/T stays a run-time computation.
    assert all(("run time" in n) == (name != "tiny-vit-clipped") for n in notes)
    probabilities = [t for t in artifact.manifest["plan"]["tensors"] if t["reason"] == "Clip output, range [0, 1] known"]
    assert len(probabilities) == blocks
    assert all(t["scale"] == pytest.approx(1 / 255) and t["zero_point"] == 0 for t in probabilities)
    assert artifact.manifest["verification"]["outputs"]["logits"]["sqnr_db"] > 15
