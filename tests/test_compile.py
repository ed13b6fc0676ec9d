"""End to end on a real PyTorch export (tiny BERT sentence encoder) and real text samples."""
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.artifact import Artifact
from qcompile.numerics import sqnr_db
from qcompile.runtime import make_session
from conftest import matmul_model


def test_export_matches_pytorch(tiny_bert):
    from qcompile.models import sentence_encoder

    feed = {k: v[:3] for k, v in np.load(tiny_bert["eval"]).items()}
    expected = sentence_encoder.tiny_bert()(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    actual = make_session(str(tiny_bert["model"])).run(None, feed)[0]
    np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.fixture(scope="module")
def compiled(tiny_bert, tmp_path_factory):
    artifact = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(), calib=tiny_bert["calib"],
                                verify_data=tiny_bert["eval"])
    folder = artifact.save(tmp_path_factory.mktemp("artifact") / "out")
    return artifact, folder


def test_artifact_layout_and_manifest(compiled):
    artifact, folder = compiled
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "report.html"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["qcompile_version"] == qcompile.__version__
    assert qcompile.QuantConfig.from_dict(manifest["config"]) == qcompile.QuantConfig()
    assert manifest["custom_op_library"] is None
    assert [p["name"] for p in manifest["passes"]] == ["normalize-graph", "fold-conv-affine", "fuse-hard-swish",
                                                        "fold-clipped-softmax", "merge-gate-projection",
                                                        "plan-w8a8", "insert-qdq", "insert-lut-weights",
                                                        "dequantize-after-gather", "sum-before-layer-norm"]
    kinds = Counter(t["kind"] for t in manifest["plan"]["tensors"])
    assert kinds["weight"] == 15  # 2 layers x (Q, K, V, attention output, FFN in, FFN out) + 3 embedding tables
    assert any(t["reason"] == "softmax output" and t["scale"] == pytest.approx(1 / 255) for t in manifest["plan"]["tensors"])
    assert {s["op_type"] for s in manifest["plan"]["kept_float"]} >= {"Softmax", "LayerNormalization"}
    verification = manifest["verification"]
    assert verification["samples"] == 8
    assert len(verification["layers"]) > 20
    report = (folder / "report.html").read_text()
    assert "<svg" in report and "Per-layer output SQNR" in report


def test_quantized_model_is_close_to_float_and_verification_is_honest(compiled, tiny_bert):
    artifact, folder = compiled
    feed = dict(np.load(tiny_bert["eval"]))
    reference = make_session(str(tiny_bert["model"])).run(None, feed)[0]
    quantized = artifact.session().run(None, feed)[0]
    measured = sqnr_db(reference, quantized)
    assert measured > 15.0
    recorded = artifact.manifest["verification"]["outputs"]["sentence_embedding"]["sqnr_db"]
    assert recorded == pytest.approx(measured, abs=0.05)
    ops = Counter(n.op_type for n in artifact.model.graph.node)
    assert ops["DequantizeLinear"] > ops["QuantizeLinear"] > 0
    np.testing.assert_array_equal(Artifact.load(folder).session().run(None, feed)[0], quantized)


def test_same_inputs_give_byte_identical_artifacts(compiled, tiny_bert, tmp_path):
    _, folder = compiled
    again = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(), calib=tiny_bert["calib"],
                             verify_data=tiny_bert["eval"]).save(tmp_path / "again")
    for name in ("model.onnx", "manifest.json", "report.html"):
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name


def test_in_memory_calibration_data_gives_the_same_model(compiled, tiny_bert):
    artifact, _ = compiled
    arrays = np.load(tiny_bert["calib"])
    feeds = [{k: arrays[k][i : i + 1] for k in arrays.files} for i in range(len(arrays["input_ids"]))]
    from_feeds = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(), calib=feeds, verify_data=tiny_bert["eval"])
    assert from_feeds.model.SerializeToString() == artifact.model.SerializeToString()


def test_large_models_save_weights_as_external_data(compiled, tmp_path):
    artifact, _ = compiled
    folder = artifact.save(tmp_path / "external", external_data_threshold=1000)
    assert (folder / "model.onnx.data").is_file()
    assert onnx.load(str(folder / "model.onnx")).graph.initializer  # loads with its side file
    reloaded = Artifact.load(folder).model
    for saved, ours in zip(reloaded.graph.initializer, artifact.model.graph.initializer, strict=True):
        # equal values on disk, and ours was not emptied by the save
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(saved), onnx.numpy_helper.to_array(ours))


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_other_calibration_methods(tiny_bert, method):
    config = qcompile.QuantConfig(calib_method=method)
    artifact = qcompile.compile(tiny_bert["model"], config, calib=tiny_bert["calib"], verify_data=tiny_bert["eval"])
    assert artifact.manifest["verification"]["outputs"]["sentence_embedding"]["sqnr_db"] > 10.0


def test_holdout_from_calibration_data_when_no_verify_data(tiny_bert):
    artifact = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(verify_fraction=0.25), calib=tiny_bert["calib"])
    assert artifact.manifest["verification"]["samples"] == 6  # 25% of 24


def test_config_round_trips_and_rejects_bad_values():
    config = qcompile.QuantConfig(calib_method="percentile", percentile=99.9, quantize_attention=False)
    assert qcompile.QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(qcompile.QCompileError, match="calib_method must be one of"):
        qcompile.QuantConfig(calib_method="kl")
    with pytest.raises(qcompile.QCompileError, match="unknown config keys: nbits"):
        qcompile.QuantConfig.from_dict({"nbits": 4})
    search = qcompile.QuantConfig(weights="nl", acts="none", bits=(4, 8), target_sqnr=30.0, functions=["sinh", "x"])
    assert qcompile.QuantConfig.from_json(search.to_json()) == search
    assert qcompile.QuantConfig(weights="affine", bits=3).bits == (3, 3)
    for bad, message in [({"weights": "nl", "bits": (1, 4)}, "bits must be a range within 2..8"),
                         ({"weights": "nl", "block": 32}, "--block needs affine or table lookup-table weights"),
                         ({"weights": "nl", "target_sqnr": 30.0}, "--target-sqnr needs --acts int8"),
                         ({"weights": "affine", "bits": (4, 6)}, "needs --weights nl"),
                         ({"weights": "nl", "functions": ["cosh"]}, "unknown or non-invertible pool functions: cosh"),
                         ({"weights": "nl", "executor": "slurm"}, "executor must be one of")]:
        with pytest.raises(qcompile.QCompileError, match=message):
            qcompile.QuantConfig(**bad)


def test_float_graph_input_is_calibrated_directly(tmp_path):
    """A model input feeding a MatMul is itself a calibrated activation (exposed as an extra output)."""
    x = np.random.default_rng(0).normal(size=(10, 1, 3)).astype(np.float32)
    artifact = qcompile.compile(matmul_model(), qcompile.QuantConfig(), calib=[{"x": sample} for sample in x])
    assert {t["tensor"] for t in artifact.manifest["plan"]["tensors"]} == {"x", "w"}
    assert artifact.manifest["verification"]["outputs"]["y"]["sqnr_db"] > 30.0


def test_int4_weights_use_a_seven_level_grid(tiny_bert):
    config = qcompile.QuantConfig(weights="int4", acts="none")
    artifact = qcompile.compile(tiny_bert["model"], config, calib=tiny_bert["calib"], verify_data=tiny_bert["eval"])
    codes = [onnx.numpy_helper.to_array(i) for i in artifact.model.graph.initializer if i.name.endswith("_quantized")]
    assert codes and all(c.dtype == np.int8 and np.abs(c).max() <= 7 for c in codes)
    assert any(np.abs(c).max() == 7 for c in codes)
    int4 = artifact.manifest["verification"]["outputs"]["sentence_embedding"]["sqnr_db"]
    int8 = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(weights="int8", acts="none"), calib=tiny_bert["calib"],
                            verify_data=tiny_bert["eval"]).manifest["verification"]["outputs"]["sentence_embedding"]["sqnr_db"]
    assert 5.0 < int4 < int8 - 10.0  # about 6 dB per bit


def test_row_cosines_one_zero_row_is_no_agreement():
    from qcompile.verify import row_cosines

    reference = np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    approximation = np.array([[2.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(row_cosines(reference, approximation), [1.0, 1.0, 0.0])
    assert row_cosines(approximation[2:], reference[2:]) == [0.0]


def test_a_tensor_that_loses_its_shared_scale_gets_its_own_range():
    """x (-inf in one sample) -> Conv (positive weights) -> Relu -> Reshape -> MatMul: the Conv stays
    float, so the Reshape no longer runs on its codes at its scale; the MatMul's input (finite: the
    Relu zeroes the -inf) then needs a range of its own, and gets one from a second pass."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(np.abs(rng.standard_normal((4, 3, 3, 3))).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w2"),
               numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu"),
             helper.make_node("Reshape", ["a1", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    samples = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(10)]
    samples[3]["x"][0, 0, 2, 2] = -np.inf
    artifact = qcompile.compile(model, qcompile.QuantConfig(), calib=samples[:8], verify_data=samples[8:])
    plan = artifact.manifest["plan"]
    assert {(s["node"], s["reason"]) for s in plan["kept_float"]} == {
        ("conv", "an input takes +-inf or NaN on calibration data (a mask?)"),
        ("relu", "no integer kernel for this op in ONNX Runtime's CPU provider")}
    r = next(t for t in plan["tensors"] if t["tensor"] == "r")
    assert "same_as" not in r and r["consumers"] == [["matmul", 0]] and r["scale"] > 0
    assert artifact.manifest["deployed"]["summary"] == "0/1 Conv as integer kernels, 1/1 MatMul as MatMulIntegerToFloat"
    assert artifact.manifest["verification"]["outputs"]["y"]["sqnr_db"] > 30


def test_an_activation_carrying_infinities_stays_float():
    """-inf (a mask) fits no integer grid: its consumer is kept float, with the reason, and so is its
    weight (a dequantized weight on a float MatMul would only cost time)."""
    from conftest import matmul_model

    samples = [{"x": np.random.default_rng(i).standard_normal((1, 3)).astype(np.float32)} for i in range(8)]
    samples[2]["x"][0, 1] = -np.inf
    artifact = qcompile.compile(matmul_model(), qcompile.QuantConfig(verify_fraction=0.0), calib=samples)
    plan = artifact.manifest["plan"]
    assert plan["tensors"] == []
    assert [node.op_type for node in artifact.model.graph.node] == ["MatMul"]
    assert plan["kept_float"] == [{"node": "MatMul_0", "op_type": "MatMul",
                                   "reason": "an input takes +-inf or NaN on calibration data (a mask?)"}]
