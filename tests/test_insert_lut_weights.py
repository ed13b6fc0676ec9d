"""InsertLutWeights and the lookup-table compile path on hand-built graphs, with ONNX Runtime numerics."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile.lut import ptnq
from qcompile.artifact import Artifact
from qcompile.graph import to_graph
from qcompile.passes.insert_lut_weights import find_lut_weights
from qcompile.runtime import make_session

RNG = np.random.default_rng(0)
W_MATMUL = RNG.laplace(0, 0.1, (32, 24)).astype(np.float32)  # [K, N]
W_GEMM = RNG.laplace(0, 0.1, (16, 24)).astype(np.float32)  # transB: [N, K]
B_GEMM = RNG.standard_normal(16).astype(np.float32)
W_CONV = RNG.laplace(0, 0.1, (4, 3, 3, 3)).astype(np.float32)
TABLE = RNG.laplace(0, 0.1, (20, 12)).astype(np.float32)


def linear_model():
    nodes = [helper.make_node("MatMul", ["x", "w_matmul"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w_gemm", "b_gemm"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
                              [onnx.numpy_helper.from_array(v, n) for n, v in
                               [("w_matmul", W_MATMUL), ("w_gemm", W_GEMM), ("b_gemm", B_GEMM)]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def conv_gather_model():
    nodes = [helper.make_node("Conv", ["image", "w_conv"], ["features"], pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0)]
    graph = helper.make_graph(
        nodes, "conv_gather",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4, 8, 8]),
         helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", 5, 12])],
        [onnx.numpy_helper.from_array(W_CONV, "w_conv"), onnx.numpy_helper.from_array(TABLE, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def linear_feeds(count=24):
    return [{"x": RNG.standard_normal((1, 32)).astype(np.float32)} for _ in range(count)]


def affine(rows, bits=4, block=None):
    q = ptnq.affine_quantizer(rows, bits, block)
    return q.dequantize(q.encode(rows))


def run_with_weights(model, weights, feed):
    """The float model with some initializers replaced: the reference a rewrite must reproduce."""
    replaced = onnx.ModelProto()
    replaced.CopyFrom(model)
    for init in replaced.graph.initializer:
        if init.name in weights:
            init.CopyFrom(onnx.numpy_helper.from_array(weights[init.name], init.name))
    return make_session(replaced).run(None, feed)


def op_counts(model):
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("block", [None, 8])
def test_linear_weights_become_lut_matmuls_and_match_the_reference(block):
    config = qcompile.QuantConfig(weights="affine", acts="none", bits=4, block=block, fit="weight")
    artifact = qcompile.compile(linear_model(), config, calib=linear_feeds())
    counts = op_counts(artifact.model)
    assert counts["LutMatMul"] == 2 and "MatMul" not in counts and "Gemm" not in counts and counts["Add"] >= 1
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in artifact.model.graph.initializer}
    assert initializers["w_matmul_codes"].shape == (24, 16) and initializers["w_matmul_codes"].dtype == np.uint8
    assert initializers["w_gemm_codes"].shape == (16, 12)
    assert "w_matmul" not in initializers and "w_gemm" not in initializers
    expected_weights = {"w_matmul": affine(W_MATMUL.T.copy(), 4, block).T, "w_gemm": affine(W_GEMM, 4, block)}
    feed = {"x": RNG.standard_normal((3, 32)).astype(np.float32)}
    expected = run_with_weights(linear_model(), expected_weights, feed)[0]
    for use_library in (True, False):
        np.testing.assert_allclose(artifact.session(use_library=use_library).run(None, feed)[0], expected,
                                   rtol=1e-5, atol=1e-5)


def test_conv_and_gather_weights_dequantize_through_tables():
    config = qcompile.QuantConfig(weights="affine", acts="none", bits=3)
    artifact = qcompile.compile(conv_gather_model(), config)
    counts = op_counts(artifact.model)
    assert counts["LutDequantize"] == 1 and counts["LutDequantizeConstant"] == 1 and counts["Conv"] == 1
    ids = np.array([[0, 19, 3, 3, 7], [1, 2, 5, 8, 13]], np.int64)
    feed = {"image": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32), "ids": ids}
    expected = run_with_weights(conv_gather_model(), {"w_conv": affine(W_CONV.reshape(4, -1), 3).reshape(W_CONV.shape),
                                                      "table": affine(TABLE, 3)}, feed)
    for use_library in (True, False):
        for got, want in zip(artifact.session(use_library=use_library).run(None, feed), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nonlinear_search_scores_the_artifact_it_writes(tmp_path):
    config = qcompile.QuantConfig(weights="nl", acts="none", bits=4, functions=("sinh", "x"), executor="serial")
    feeds = linear_feeds()
    artifact = qcompile.compile(linear_model(), config, calib=feeds)
    summary = artifact.manifest["lut_weights"]
    assert summary["bits"] == 4 and summary["scored_by"] == "output SQNR on calibration data"
    assert {layer["quantizer"] for layer in summary["layers"]} <= {"sinh", "x"}
    assert [f["function"] for f in summary["tried"][0]["per_function"]] == ["sinh", "x"]
    best_single = max(f["sqnr_db"] for f in summary["tried"][0]["per_function"])
    assert summary["sqnr_db"] >= best_single  # per-layer selection starts from the best per-model choice
    # The recorded SQNR is the artifact's own, on the first calibration samples.
    artifact.save(tmp_path / "out")
    loaded = Artifact.load(tmp_path / "out")
    probe_feeds = feeds[: len(feeds) - int(len(feeds) * config.verify_fraction)]  # split_holdout keeps these
    reference = np.concatenate([make_session(linear_model()).run(None, f)[0] for f in probe_feeds])
    quantized = np.concatenate([loaded.session().run(None, f)[0] for f in probe_feeds])
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2))
    assert sqnr == pytest.approx(summary["sqnr_db"], abs=0.05)
    assert "sorted weights" in loaded.report_html


def test_bit_width_search_keeps_the_lowest_width_reaching_the_target():
    feeds = linear_feeds()
    # Weight-error fit: with GPTQ codes the pruning (by nearest-code scores) is conservative, not exact.
    common = dict(weights="nl", acts="none", functions=("sinh", "tan"), executor="serial", select="model", fit="weight")
    fixed = {bits: qcompile.compile(linear_model(), qcompile.QuantConfig(bits=bits, **common), calib=feeds)
             .manifest["lut_weights"]["sqnr_db"] for bits in (3, 4, 5, 6)}
    target = (fixed[4] + fixed[5]) / 2  # 5 bits reach it, 4 do not
    searched = qcompile.compile(linear_model(), qcompile.QuantConfig(bits=(3, 6), target_sqnr=target, **common),
                                calib=feeds).manifest["lut_weights"]
    assert searched["bits"] == 5
    assert [t["bits"] for t in searched["tried"]] == [6, 5, 4]  # stops once no function reaches the target
    assert searched["sqnr_db"] == pytest.approx(fixed[5])
    with pytest.raises(qcompile.QCompileError, match="no quantizer reaches the target SQNR of 200.0 dB at 6 bits"):
        qcompile.compile(linear_model(), qcompile.QuantConfig(bits=(3, 6), target_sqnr=200.0, **common), calib=feeds)


def test_lut_weights_without_a_weight_are_a_clear_error():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(qcompile.QCompileError, match="has no constant MatMul/Gemm/Conv/Gather weight to store as lookup tables"):
        qcompile.compile(model, qcompile.QuantConfig(weights="affine", acts="none", bits=4))


def test_a_real_cnn_keeps_onnx_runtimes_blocked_convs_with_lookup_table_weights(tmp_path):
    """EfficientNet-Lite0 (pre-trained, a real PyTorch export): 49 Conv weights and the classifier. ONNX
    Runtime folds every Conv weight's decoding into a constant and runs the Convs in its NCHWc layout."""
    from qcompile import models

    path = models.export("efficientnet-lite0", tmp_path / "model.onnx")
    images = models.get("efficientnet-lite0").samples("eval", 4)
    artifact = qcompile.compile(path, qcompile.QuantConfig(weights="affine", acts="none", bits=6))
    counts = op_counts(artifact.model)
    assert counts["LutDequantizeConstant"] == 49 and counts["LutMatMul"] == 1 and "Gemm" not in counts
    make_session(artifact.model, use_library=True, optimized_path=tmp_path / "optimized.onnx")
    deployed = {(node.domain, node.op_type) for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    convs = [node for node in onnx.load(tmp_path / "optimized.onnx").graph.node if node.op_type == "Conv"]
    assert len(convs) == 49 and {node.domain for node in convs} == {"com.microsoft.nchwc"}
    assert ("qcompile", "LutMatMul") in deployed and not {op for _, op in deployed} & {"LutDequantizeConstant", "BitShift"}
    fast, stock = (artifact.session(use_library=flag).run(None, images)[0] for flag in (True, False))
    np.testing.assert_allclose(fast, stock, rtol=1e-4, atol=1e-4)
    # The float model with the same 6-bit affine weights substituted gives the same logits.
    model = onnx.load(path)
    weights = find_lut_weights(to_graph(model))
    assert len(weights) == 50
    expected = run_with_weights(model, {w.tensor: w.to_original(affine(w.rows, 6)) for w in weights}, images)[0]
    np.testing.assert_allclose(fast, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_lut_ops_limits_which_weights_become_tables():
    config = qcompile.QuantConfig(weights="affine", acts="none", bits=4, lut_ops=("MatMul",))
    artifact = qcompile.compile(linear_model(), config)
    counts = op_counts(artifact.model)
    assert counts["LutMatMul"] == 1 and counts["Gemm"] == 1
    assert [layer["tensor"] for layer in artifact.manifest["lut_weights"]["layers"]] == ["w_matmul"]
    with pytest.raises(qcompile.QCompileError, match="lut_ops must be a non-empty subset"):
        qcompile.QuantConfig(weights="nl", lut_ops=("Attention",))
