"""Output-aware lookup tables: free k-means tables, GPTQ codes, layer input statistics, against NumPy references."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile import calibration
from qcompile.lut import tables
from qcompile.lut.ptnq import affine_quantizer
from qcompile.runtime import make_session

RNG = np.random.default_rng(0)


def lloyd_reference(values, weights, centres, iterations=tables.LLOYD_ITERATIONS):
    """Weighted 1-D Lloyd, one row at a time, written plainly."""
    centres = centres.astype(np.float64)
    for _ in range(iterations):
        centres = np.sort(centres)
        cluster = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        for j in range(len(centres)):
            members = cluster == j
            if weights[members].sum() > 0:
                centres[j] = np.sum(weights[members] * values[members]) / np.sum(weights[members])
    return np.sort(centres)


def correlated_inputs(samples, k, rng):
    """Inputs with correlated channels and a few loud ones, as LayerNorm outputs have."""
    mixing = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((samples, k)) @ mixing
    x[:, :3] *= 8.0
    return x.astype(np.float32)


def test_weighted_kmeans_matches_a_plain_lloyd():
    values = RNG.laplace(0, 1, (6, 200)).astype(np.float32)
    weights = RNG.uniform(0, 3, (6, 200)).astype(np.float32)
    start = np.sort(RNG.uniform(-2, 2, (6, 16)), axis=1).astype(np.float32)
    got = tables.weighted_kmeans(values, weights, start)
    for row in range(6):
        np.testing.assert_allclose(got[row], lloyd_reference(values[row], weights[row], start[row]), rtol=1e-4, atol=1e-5)


def test_free_tables_beat_affine_on_weight_error_and_are_stored_as_float16():
    rows = RNG.laplace(0, 0.05, (64, 256)).astype(np.float32)
    table = tables.free_table(rows, 4)
    affine = affine_quantizer(rows, 4)
    assert table.params["t"].dtype == np.float16 and table.table.shape == (64, 1, 16)
    error = {name: np.mean((q.dequantize(q.encode(rows)) - rows) ** 2) for name, q in (("table", table), ("affine", affine))}
    assert error["table"] < 0.9 * error["affine"]
    blocked = tables.free_table(rows, 4, block=64)
    assert blocked.table.shape == (64, 4, 16)
    assert np.mean((blocked.dequantize(blocked.encode(rows)) - rows) ** 2) < error["table"]


def gptq_reference(w, table, h, damping=tables.GPTQ_DAMPING):
    """GPTQ without lazy batches: quantize columns in order of decreasing H_kk, spread each error through
    the upper Cholesky factor of H^-1."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    order = np.argsort(-np.diag(h), kind="stable")
    h, w = h[order][:, order], w[:, order]
    h += damping * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    codes = np.zeros(w.shape, np.int64)
    for i in range(w.shape[1]):
        entries = table[:, order[i] * table.shape[1] // w.shape[1]]
        codes[:, i] = np.abs(entries - w[:, i:i + 1]).argmin(axis=1)
        error = (w[:, i] - entries[np.arange(len(w)), codes[:, i]]) / u[i, i]
        w[:, i:] -= np.outer(error, u[i, i:])
    unpermuted = np.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted


def test_gptq_codes_match_the_reference_and_cut_the_output_error():
    k, n = 300, 24  # more than one lazy batch of 128 columns
    x, held_out = np.split(correlated_inputs(2500, k, RNG), [2000])
    hessian = (x.T.astype(np.float64) @ x) / len(x)
    rows = RNG.laplace(0, 0.05, (n, k)).astype(np.float32)
    quantizer = tables.free_table(rows, 3)
    codes = tables.gptq_codes(rows, quantizer, hessian)
    assert np.mean(codes == gptq_reference(rows, quantizer.table.astype(np.float64), hessian)) > 0.99

    def output_error(q_codes):
        return np.mean((held_out @ (rows - quantizer.dequantize(q_codes)).T) ** 2)

    assert output_error(codes) < 0.7 * output_error(quantizer.encode(rows))


def test_input_moments_stream_to_the_numpy_values():
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Conv", ["image", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 5]),
                                           helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 2, 4, 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 3, 5]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.ones((1, 2, 1, 1), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    batches = [{"x": RNG.standard_normal((2, 3, 5)).astype(np.float32),
                "image": RNG.standard_normal((2, 2, 4, 4)).astype(np.float32)} for _ in range(3)]
    moments = calibration.collect_input_moments(model, {"h": True, "image": False}, batches, threads=1)
    h = np.concatenate([np.maximum(b["x"], 0).reshape(-1, 5) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(moments["h"], h.T @ h / len(h), rtol=1e-6)
    image = np.concatenate([b["image"] for b in batches]).astype(np.float64)
    np.testing.assert_allclose(moments["image"], (image**2).mean(axis=(0, 2, 3)), rtol=1e-6)


class _Weight:
    def __init__(self, op, shape):
        self.op, self.shape = op, shape


def test_grouped_conv_weights_are_weighted_by_the_channel_they_read():
    moments = np.array([1.0, 4.0, 9.0, 16.0])  # E[x_c^2] of 4 input channels
    stats = tables.layer_statistics(_Weight("Conv", (6, 2, 3, 3)), moments)  # 2 groups of 2 channels, 3 rows each
    assert stats.hessian is None and stats.importance.shape == (6, 18)
    np.testing.assert_allclose(stats.importance[0].reshape(2, 9)[:, 0], np.array([1.0, 2.0]) / 1.5)
    np.testing.assert_allclose(stats.importance[5].reshape(2, 9)[:, 0], np.array([3.0, 4.0]) / 3.5)
    dead = tables.layer_statistics(_Weight("Conv", (2, 2, 1, 1)), np.zeros(2))
    np.testing.assert_array_equal(dead.importance, np.ones((2, 2)))
    matmul = tables.layer_statistics(_Weight("MatMul", (4, 4)), np.eye(4))
    assert matmul.importance is None and matmul.hessian is not None


def linear_model(k=64, n=32):
    w = RNG.laplace(0, 0.05, (k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [onnx.numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w


def test_table_weights_compile_to_float16_tables_that_onnx_runtime_reads_exactly():
    model, w = linear_model()
    samples = [{"x": x[None]} for x in correlated_inputs(256, 64, RNG)]
    calib, evaluation = samples[:192], samples[192:]
    results = {}
    for fit in ("output", "weight"):
        artifact = qcompile.compile(model, qcompile.QuantConfig(weights="table", bits=3, acts="none", fit=fit),
                                    calib=calib, verify_data=evaluation)
        stored = {i.name: onnx.numpy_helper.to_array(i) for i in artifact.model.graph.initializer}
        assert stored["w_t"].dtype == np.float16 and stored["w_t"].shape == (32, 1, 8)
        encoded = artifact.manifest["lut_weights"]
        assert encoded["layers"][0]["quantizer"] == "table" and encoded["fit"].startswith(fit)
        results[fit] = artifact.manifest["verification"]["outputs"]["y"]["sqnr_db"]
        # What ONNX Runtime computes is x @ (the float16 table read at the stored codes).
        from qcompile.lut.packing import unpack_codes

        codes = unpack_codes(stored["w_codes"], 3, 64)
        dequantized = np.take_along_axis(stored["w_t"][:, 0].astype(np.float32), codes, axis=1)
        x = evaluation[0]["x"]
        for use_library in (True, False):
            np.testing.assert_allclose(artifact.session(use_library=use_library).run(None, {"x": x})[0],
                                       x @ dequantized.T, rtol=1e-5, atol=1e-5)
    assert results["output"] > results["weight"] + 1.0  # GPTQ codes on correlated inputs


def gemm_model(k=64, n=32):
    w = RNG.laplace(0, 0.05, (n, k)).astype(np.float32)
    c = RNG.standard_normal(n).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(c, "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), c


def dynamic_quantize_reference(x):
    """ONNX DynamicQuantizeLinear: uint8 over the range widened to hold 0."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return np.clip(np.rint(x / scale) + zero, 0, 255), scale, zero


@pytest.mark.parametrize("op, block", [("MatMul", None), ("MatMul", 32), ("Gemm", None)])
def test_dynamic_activations_multiply_uint8_inputs_by_int8_tables_on_stock_onnx_runtime(op, block, tmp_path):
    model, bias = gemm_model() if op == "Gemm" else (linear_model()[0], 0.0)
    samples = [{"x": x[None]} for x in correlated_inputs(64, 64, RNG)]
    config = dict(weights="table", bits=4, block=block, fit="weight")
    tables_only = qcompile.compile(model, qcompile.QuantConfig(acts="none", **config), calib=samples)
    artifact = qcompile.compile(model, qcompile.QuantConfig(acts="dynamic", **config), calib=samples)
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in artifact.model.graph.initializer}
    float_table = {i.name: onnx.numpy_helper.to_array(i) for i in tables_only.model.graph.initializer}["w_t"]
    int8_table, scale = stored["w_table_int8"], stored["w_scale"]
    # The same fitted table, rounded to int8 per output channel.
    assert int8_table.dtype == np.int8 and int8_table.shape == (32, 2 if block else 1, 16)
    np.testing.assert_allclose(int8_table * scale[:, None, None], float_table.astype(np.float32),
                               atol=float(scale.max()) / 2 * 1.0001)
    assert np.abs(int8_table).reshape(32, -1).max(axis=1).tolist() == [127] * 32
    from qcompile.lut.packing import unpack_codes

    codes = unpack_codes(stored["w_codes"], 4, 64)
    block_of_column = np.arange(64) // (block or 64)
    weight = int8_table[np.arange(32)[:, None], block_of_column[None, :], codes].astype(np.float64)
    x = np.concatenate([s["x"] for s in samples[:4]])
    quantized, x_scale, x_zero = dynamic_quantize_reference(x)
    expected = ((quantized - x_zero) @ weight.T) * x_scale * scale + bias
    # No qcompile library: ONNX Runtime folds the weight and runs its own integer GEMM.
    optimized = tmp_path / "optimized.onnx"
    session = make_session(artifact.model, use_library=False, optimized_path=optimized)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    graph = onnx.load(optimized).graph
    (matmul,) = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert matmul.input[1] in {i.name for i in graph.initializer}  # folded once, packed by ONNX Runtime
    assert not any(n.op_type in ("LutDequantizeConstant", "GatherElements", "Transpose") for n in graph.node)


def test_int8_rows_round_each_table_row_to_its_own_scale():
    from passes.insert_lut_weights import int8_rows

    table = np.stack([np.linspace(-0.3, 0.1, 16), np.zeros(16), np.linspace(0, 5, 16)]).astype(np.float32)[:, None]
    values, scale = int8_rows(table)
    np.testing.assert_allclose(scale, [0.3 / 127, 1.0, 5 / 127], rtol=1e-6)
    assert values[1].tolist() == [[0] * 16] and values[0, 0, 0] == -127 and values[2, 0, -1] == 127
    np.testing.assert_allclose(values * scale[:, None, None], table, atol=float(scale[[0, 2]].max()) / 2 * 1.0001)


def test_table_config_errors_are_one_line():
    with pytest.raises(qcompile.QCompileError, match="a bit-width search .* needs --weights nl, not table"):
        qcompile.QuantConfig(weights="table", bits=(3, 5))
    with pytest.raises(qcompile.QCompileError, match="fit must be one of output, weight"):
        qcompile.QuantConfig(weights="table", fit="hessian")
    qcompile.QuantConfig(weights="table", block=32)  # per-block free tables are fine
    with pytest.raises(qcompile.QCompileError, match="--acts dynamic needs nl, affine or table weights"):
        qcompile.QuantConfig(weights="int8", acts="dynamic")
