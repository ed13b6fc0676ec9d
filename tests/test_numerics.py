import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompile import numerics
from qcompile.numerics import INT4_SYMMETRIC, INT8_SYMMETRIC, UINT8, IntGrid
from qcompile.runtime import make_session


UINT4 = IntGrid(0, 15, np.uint8)


def distributions(rng, rows=6, n=4096):
    return {
        "gaussian": rng.normal(size=(rows, n)),
        "laplace": rng.laplace(size=(rows, n)),
        "outliers": np.concatenate([rng.normal(size=(rows, n - 6)), rng.normal(scale=30, size=(rows, 6))], axis=1),
        "relu": np.maximum(rng.normal(size=(rows, n)), 0.0),
        "gelu-like": np.maximum(rng.normal(size=(rows, n)) * 2, -0.17),
    }


def test_fake_quantize_matches_onnx_runtime_quantize_dequantize(rng):
    x = (rng.normal(size=(64,)) * 3).astype(np.float32)
    x[:4] = [0.5, 1.5, -2.5, 1e4]  # ties (round half to even) and a saturating value
    scale, zero_point = np.float32(0.5), np.uint8(3)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        [onnx.numpy_helper.from_array(np.array(scale), "s"), onnx.numpy_helper.from_array(np.array(zero_point), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    expected = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(numerics.fake_quantize(x, scale, np.float32(zero_point), UINT8).astype(np.float32), expected)


@pytest.mark.parametrize("grid", [INT8_SYMMETRIC, UINT8, INT4_SYMMETRIC, UINT4], ids=["int8", "uint8", "int4", "uint4"])
def test_alternating_mse_reaches_the_brute_force_optimum(rng, grid):
    for name, values in distributions(rng).items():
        ones = np.ones_like(values)
        scale, zero_point = numerics.mse_params(values, grid)
        reference_scale, reference_zero_point = numerics.grid_search_params(values, grid, steps=400 if grid.symmetric else 80)
        error = numerics.weighted_mse(values, ones, scale[:, None], zero_point[:, None], grid)
        reference = numerics.weighted_mse(values, ones, reference_scale[:, None], reference_zero_point[:, None], grid)
        ratio = error / reference
        assert ratio.max() < 1.05 and ratio.mean() < 1.02, f"{name}: MSE / brute-force MSE = {ratio}"


@pytest.mark.parametrize("grid, gain", [(INT8_SYMMETRIC, 1.0), (UINT8, 1.0), (INT4_SYMMETRIC, 0.6), (UINT4, 0.6)],
                         ids=["int8", "uint8", "int4", "uint4"])
def test_mse_never_loses_to_minmax_and_wins_big_at_low_bits(rng, grid, gain):
    values = distributions(rng)["laplace"]
    ones = np.ones_like(values)
    mse = numerics.weighted_mse(values, ones, *(p[:, None] for p in numerics.mse_params(values, grid)), grid)
    minmax_params = numerics.params_from_range(values.min(1), values.max(1), grid)
    minmax = numerics.weighted_mse(values, ones, *(p[:, None] for p in minmax_params), grid)
    assert (mse <= gain * minmax).all()


def test_weighted_rows_equal_repeated_values(rng):
    """A histogram (values weighted by counts) must solve like the raw values it summarises."""
    distinct = np.round(rng.normal(size=300), 2)
    counts = rng.integers(1, 20, size=300)
    repeated = np.repeat(distinct, counts)
    for grid in (INT8_SYMMETRIC, UINT8):
        weighted = numerics.mse_params(distinct, grid, weights=counts)
        raw = numerics.mse_params(repeated, grid)
        np.testing.assert_allclose(weighted[0], raw[0], rtol=1e-6)  # float32 sums, other order
        np.testing.assert_array_equal(weighted[1], raw[1])


def test_zero_is_exact_and_degenerate_rows_are_safe():
    values = np.array([[0.0, 0.0, 0.0], [0.3, 2.0, 5.0], [-1.0, -0.5, -2.0]])
    for grid in (INT8_SYMMETRIC, UINT8):
        scale, zero_point = numerics.mse_params(values, grid)
        assert np.all(np.isfinite(scale)) and np.all(scale > 0)
        assert np.all(numerics.fake_quantize(np.zeros(3), scale, zero_point, grid) == 0)


def test_sqnr():
    reference = np.array([3.0, 4.0])
    assert numerics.sqnr_db(reference, reference) == float("inf")
    assert numerics.sqnr_db(reference, reference * 1.1) == pytest.approx(20.0)


@pytest.mark.parametrize("grid", [INT8_SYMMETRIC, UINT8, INT4_SYMMETRIC], ids=["int8", "uint8", "int4"])
def test_long_rows_solved_on_histograms_stay_near_the_exact_solution(rng, grid):
    """Rows over MAX_EXACT_ROW values (embedding tables) are solved on a per-row histogram."""
    values = np.concatenate([rng.laplace(size=(3, 30000)), rng.normal(scale=20, size=(3, 8))], axis=1)
    ones = np.ones_like(values)
    summarised = numerics.weighted_mse(values, ones, *(p[:, None] for p in numerics.mse_params(values, grid)), grid)
    assert values.shape[1] > numerics.MAX_EXACT_ROW
    reference_scale, reference_zero_point = numerics.grid_search_params(values, grid, steps=400 if grid.symmetric else 60)
    reference = numerics.weighted_mse(values, ones, reference_scale[:, None], reference_zero_point[:, None], grid)
    assert (summarised / reference).max() < 1.05
