"""QAT: LSQ fake quantization, MSE initialisation shared with the compiler, export to a QDQ artifact."""
from collections import Counter

import numpy as np
import pytest
import torch

import qcompile
from qcompile import calibration
from qcompile.numerics import INT4_SYMMETRIC, UINT8, fake_quantize
from qcompile.qat import FakeQuantize, MatMul, QatOptions, QuantLinear, QuantMatMul


class TinyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        self.scores, self.context = MatMul(), MatMul()

    def forward(self, x):
        probabilities = torch.softmax(self.scores(self.q(x), self.k(x).transpose(1, 2)), dim=-1)
        return self.head(self.context(probabilities, x).mean(1))


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    return TinyAttention().eval(), [torch.randn(4, 5, 8) for _ in range(6)]


def test_lsq_forward_matches_numpy_and_gradients_follow_seed_004():
    quantizer = FakeQuantize(UINT8)
    quantizer.set_params(0.1, 100)
    x = torch.linspace(-12, 17, 301, requires_grad=True)
    y = quantizer(x)
    np.testing.assert_allclose(y.detach().numpy(), fake_quantize(x.detach().numpy(), 0.1, 100, UINT8), atol=1e-6)
    y.sum().backward()
    v = x.detach() / 0.1
    inside = (torch.round(v) + 100 >= 0) & (torch.round(v) + 100 <= 255)
    assert torch.equal(x.grad, inside.float())  # straight-through inside the range, zero outside
    # d q / d s = round(v) - v inside, qmin - z below and qmax - z above (seed 004 eq. 5), times g.
    expected = torch.where(inside, torch.round(v) - v, torch.where(torch.round(v) + 100 < 0, -100.0, 155.0))
    g = 1 / np.sqrt(301 * 255)
    assert quantizer.scale.grad.item() == pytest.approx(float(expected.sum()) * g, rel=1e-4)


def test_prepare_swaps_modules_and_starts_from_the_compilers_mse_solution(model_and_data):
    model, data = model_and_data
    prepared = qcompile.qat.prepare(model, qcompile.QuantConfig(weights="int4"), data)
    assert isinstance(prepared.q, QuantLinear) and isinstance(prepared.scores, QuantMatMul)
    assert isinstance(model.q, torch.nn.Linear)  # the user's model is untouched
    expected = calibration.weight_params(model.q.weight.detach().numpy(), 0, INT4_SYMMETRIC, "mse")
    np.testing.assert_allclose(prepared.q.quant_weight.scale.detach().numpy(), expected.scale, rtol=1e-6)
    quantizers = [m for m in prepared.modules() if isinstance(m, FakeQuantize)]
    assert len(quantizers) == 3 * 2 + 2 * 2  # three Linears (input, weight), two MatMuls (both inputs)
    assert all(q.scale.requires_grad for q in quantizers)


def test_calibration_batches_from_a_dataloader_or_a_custom_mapping(model_and_data):
    model, data = model_and_data
    reference = qcompile.qat.prepare(model, qcompile.QuantConfig(), data)
    dataset = torch.utils.data.TensorDataset(torch.cat(data), torch.zeros(len(data) * 4, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # (inputs, labels) batches
    from_loader = qcompile.qat.prepare(model, qcompile.QuantConfig(), loader)
    from_dicts = qcompile.qat.prepare(model, qcompile.QuantConfig(), [{"x": x} for x in data], inputs=lambda b: b["x"])
    for other in (from_loader, from_dicts):
        for a, b in zip(reference.parameters(), other.parameters(), strict=True):
            assert torch.equal(a, b)


def test_mse_initialisation_starts_closer_than_lsq(model_and_data):
    model, data = model_and_data
    reference = model(data[0])
    errors = {}
    for init in ("mse", "lsq"):
        prepared = qcompile.qat.prepare(model, qcompile.QuantConfig(weights="int4"), data, QatOptions(init=init))
        errors[init] = float(((prepared(data[0]) - reference) ** 2).mean().detach())
    assert errors["mse"] < 0.5 * errors["lsq"]


def test_scales_learn_only_when_asked(model_and_data):
    model, data = model_and_data
    for learn in (True, False):
        prepared = qcompile.qat.prepare(model, qcompile.QuantConfig(), data, QatOptions(learn_scales=learn))
        before = prepared.q.quant_input.scale.item()
        optimizer = torch.optim.SGD([p for p in prepared.parameters() if p.requires_grad], lr=0.1)
        prepared(data[0]).square().sum().backward()
        optimizer.step()
        assert (prepared.q.quant_input.scale.item() != before) == learn


def test_convert_writes_a_qdq_artifact_that_matches_pytorch(model_and_data, tmp_path):
    model, data = model_and_data
    prepared = qcompile.qat.prepare(model, qcompile.QuantConfig(weights="int4"), data)
    artifact = qcompile.qat.convert(prepared, (data[0],), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx", "report.html"]
    ops = Counter(node.op_type for node in artifact.model.graph.node)
    # 10 activation quantizers, but the three that read x calibrate to one scale and the exporter
    # merges identical nodes: 5 Q/DQ pairs on activations, plus 3 weight DequantizeLinear nodes.
    assert ops["QuantizeLinear"] == 5 and ops["DequantizeLinear"] == 8
    assert ops["Transpose"] == 1  # K^T only: weights are stored (in, out), so none before a MatMul
    codes = [i for i in artifact.model.graph.initializer if i.data_type == 3]  # int8 weight codes
    assert len(codes) >= 3
    from onnx import numpy_helper

    assert all(np.abs(numpy_helper.to_array(c)).max() <= 7 for c in codes if c.dims)  # 4-bit codes
    check = artifact.manifest["verification_against_pytorch"]
    assert check["max_abs_difference"] <= check["output_step_bound"]
    with torch.no_grad():
        expected = prepared(data[1]).numpy()
    actual = artifact.session().run(None, {"input_0": data[1].numpy()})[0]  # another batch size too
    np.testing.assert_allclose(actual, expected, atol=check["output_step_bound"])


def test_bad_qat_requests_are_clear_errors(model_and_data):
    model, data = model_and_data
    with pytest.raises(qcompile.QCompileError, match="QAT quantizes weights and activations"):
        qcompile.qat.prepare(model, qcompile.QuantConfig(acts="none"), data)
    with pytest.raises(qcompile.QCompileError, match="no batches"):
        qcompile.qat.prepare(model, qcompile.QuantConfig(), [])
    with pytest.raises(qcompile.QCompileError, match="no nn.Linear"):
        qcompile.qat.prepare(torch.nn.ReLU(), qcompile.QuantConfig(), data)
    with pytest.raises(qcompile.QCompileError, match="init must be one of"):
        QatOptions(init="kl")
