"""Clipped softmax, gated attention and outlier_stats (models/quantizable.py, models/transformer.py)."""
import numpy as np
import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.models.quantizable import ClippedSoftmax, Gate, OutlierProbe, SelfAttention, outlier_stats
from qcompile.models.transformer import AttentionConfig, Decoder, Encoder
from qcompile.models.vit import ViT


def test_clipped_softmax_formula_and_reachable_zeros_and_ones():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
    out = ClippedSoftmax(alpha=2.0, zeta=1.1)(logits)  # gamma = -2/4
    expected = np.clip((1.1 + 0.5) * torch.softmax(logits, -1).numpy() - 0.5, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    assert out[0].eq(0).all()  # a uniform head outputs exact zeros: "doing nothing" without extreme logits
    assert out[1, 0] == 1.0
    vanilla = ClippedSoftmax(gamma=0.0, zeta=1.0)(logits)
    np.testing.assert_allclose(vanilla.numpy(), torch.softmax(logits, -1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [({}, "exactly one of gamma and alpha"),
                                              ({"gamma": 0.1}, "gamma <= 0"), ({"alpha": 1.0, "zeta": 0.9}, "zeta >= 1")])
def test_clipped_softmax_rejects_bad_parameters(kwargs, message):
    with pytest.raises(QCompileError, match=message):
        ClippedSoftmax(**kwargs)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gate_starts_at_pi_init_and_gates_each_head(kind):
    torch.manual_seed(0)
    gate = Gate(16, 4, kind, pi_init=0.25)
    x = torch.randn(2, 5, 16)
    probabilities = gate(x)
    assert probabilities.shape == (2, 5, 4)
    for layer in gate.modules():  # zero the input weights: only the bias speaks
        if hasattr(layer, "weight") and layer.weight is not None:
            torch.nn.init.zeros_(layer.weight)
    if kind == "mlp":
        torch.nn.init.zeros_(gate.layers[0].bias)
    np.testing.assert_allclose(gate(x).detach().numpy(), 0.25, rtol=1e-6)


def test_gated_attention_equals_manual_formula():
    torch.manual_seed(0)
    attention = SelfAttention(16, 4, gate=Gate(16, 4, "linear", 0.5))
    x = torch.randn(2, 5, 16)
    q, k, v = attention.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    heads = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
    heads = heads * torch.sigmoid(attention.gate.layers(x)).transpose(1, 2).unsqueeze(-1)
    expected = attention.proj(heads.transpose(1, 2).reshape(2, 5, 16))
    np.testing.assert_allclose(attention(x).detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_causal_and_padding_masks_block_the_right_tokens():
    torch.manual_seed(0)
    decoder = Decoder(vocab=50, dim=16, depth=1, heads=2).eval()
    ids = torch.randint(0, 50, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    changed = ids.clone()
    changed[0, 4:] = 7  # a later token changes: earlier positions must not see it
    np.testing.assert_allclose(decoder(ids, mask)[0, :4].detach().numpy(), decoder(changed, mask)[0, :4].detach().numpy(),
                               atol=1e-6)
    encoder = Encoder(vocab=50, dim=16, depth=1, heads=2).eval()
    padded = torch.tensor([[1, 1, 1, 1, 0, 0]])
    np.testing.assert_allclose(encoder(ids, padded)[0, :4].detach().numpy(), encoder(changed, padded)[0, :4].detach().numpy(),
                               atol=1e-5)


def test_outlier_stats_sees_a_planted_outlier():
    torch.manual_seed(0)
    model = ViT(dim=16, depth=1, heads=2, hidden=32).eval()
    batches = [torch.rand(4, 1, 28, 28) for _ in range(3)]
    before = outlier_stats(model, batches)
    with torch.no_grad():  # one dimension of one token (the class token), as the paper's delimiter outliers
        model.position[0, 0, 5] = 80.0
    after = outlier_stats(model, batches)
    assert after["max_inf_norm"] > 60 > before["max_inf_norm"]
    assert after["avg_kurtosis"] > 3 * before["avg_kurtosis"] and after["outliers"] > before["outliers"]
    assert sum(isinstance(m, OutlierProbe) for m in model.modules()) == 2


@pytest.mark.parametrize("kind", ["vanilla", "clipped", "gated"])
def test_every_variant_builds_in_every_model(kind):
    config = AttentionConfig(kind=kind)
    ids, mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    assert Encoder(50, 16, 1, 2, attention=config)(ids, mask).shape == (2, 6, 50)
    assert Decoder(50, 16, 1, 2, attention=config)(ids, mask).shape == (2, 6, 50)
    assert ViT(16, 1, 2, 32, attention=config)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["tiny-encoder-clipped", "tiny-decoder-gated", "tiny-vit-clipped", "tiny-vit-gated"])
def test_variants_export_and_match_pytorch_in_onnx_runtime(name, tmp_path):
    from qcompile import models
    from qcompile.runtime import make_session

    path = models.export(name, tmp_path / "model.onnx")
    feed = models.get(name).samples("eval", 3)
    expected = models.get(name).build()(*(torch.from_numpy(v) for v in feed.values())).detach().numpy()
    actual = make_session(str(path)).run(None, feed)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
