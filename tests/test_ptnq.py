"""PTNQ: the SymPy function pool, its lowerings, fitting, the affine baselines and the executors."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from qcompile.lut import functions, ptnq
from qcompile.lut.executors import LocalExecutor, SerialExecutor
from qcompile.passes.insert_lut_weights import OnnxBackend
from qcompile.runtime import make_session

POOL = ["x", "x^3", "exp", "log", "sqrt", "cbrt", "sin", "tan", "sinh", "tanh", "arcsin", "arccos", "arctan",
        "arcsinh", "arccosh", "arctanh"]


def test_pool_keeps_the_invertible_primitives():
    assert [f.name for f in functions.pool(0)] == POOL  # x^2, cos, cosh fold the code line and are dropped
    assert str(functions.by_name("sinh").inverse) == "log(x + sqrt(x**2 + 1))"


def test_depth_one_adds_compositions_that_invert():
    composed = [f for f in functions.pool(1) if "(" in f.name]
    assert len(composed) > 100
    sinh_tan = functions.by_name("sinh(tan)")
    points = np.linspace(-0.9, 0.9, 11)
    np.testing.assert_allclose(sinh_tan.numpy(sinh_tan.numpy(points), inverse=True), points, atol=1e-9)


@pytest.mark.parametrize("name", POOL)
def test_numpy_torch_and_onnx_lowerings_agree_and_inverse_round_trips(name):
    f = functions.by_name(name)
    points = np.linspace(-3, 3, 61)  # beyond every domain: the guards must keep values finite where clipped
    expected = f.numpy(points)
    np.testing.assert_allclose(f.torch(torch.from_numpy(points)).numpy(), expected, rtol=1e-12, equal_nan=True)
    graph = gs.Graph(opset=18)
    x = gs.Variable("x", dtype=np.float32, shape=[61])
    graph.inputs = [x]
    output = functions.lower(f.forward, {functions.x: x}, OnnxBackend(graph, "f"))
    output.shape = [61]
    graph.outputs = [output]
    onnx_value = make_session(gs.export_onnx(graph)).run(None, {"x": points.astype(np.float32)})[0]
    finite = np.isfinite(expected)
    np.testing.assert_allclose(onnx_value[finite], expected[finite], rtol=2e-5, atol=1e-5)
    inside = np.abs(points) <= 0.5 if name not in ("log", "sqrt", "arccosh") else (points >= 1.0) & (points <= 1.5)
    np.testing.assert_allclose(f.numpy(f.numpy(points[inside]), inverse=True), points[inside], atol=1e-9)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(0)
    tables = rng.standard_normal((6, 16))
    tables[2, 3] = np.nan  # a NaN entry is never chosen
    rows = rng.standard_normal((6, 50)) * 2
    safe = np.where(np.isnan(tables), np.inf, tables)
    brute = np.abs(rows[:, :, None] - safe[:, None, :]).argmin(axis=2)
    np.testing.assert_array_equal(ptnq.nearest(rows, tables), brute)


def test_affine_quantizer_is_a_linear_table_per_block():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((4, 64)).astype(np.float32)
    per_channel, per_block = ptnq.affine_quantizer(rows, 4), ptnq.affine_quantizer(rows, 4, block=16)
    assert per_channel.table.shape == (4, 1, 16) and per_block.table.shape == (4, 4, 16)
    steps = np.diff(per_block.table, axis=2)
    np.testing.assert_allclose(steps, np.broadcast_to(steps[..., :1], steps.shape), rtol=1e-5)
    error = lambda q: np.mean((q.dequantize(q.encode(rows)) - rows) ** 2)  # noqa: E731
    assert error(per_block) < error(per_channel)
    minmax_step = (rows.max(1) - rows.min(1)) / 15  # MSE-optimal parameters beat min-max
    minmax = np.round((rows - rows.min(1, keepdims=True)) / minmax_step[:, None]) * minmax_step[:, None] + rows.min(1, keepdims=True)
    assert error(per_channel) < np.mean((minmax - rows) ** 2)


def laplacian_rows(rows=64, k=256, seed=0):
    return np.random.default_rng(seed).laplace(0, 0.02, (rows, k)).astype(np.float32)


def fitted_error(name, bits, weights, options=None):
    a, s = ptnq.fit_function(name, bits, ptnq.sketch(weights), np.zeros(len(weights), np.int64),
                             options or ptnq.FitOptions())
    q = ptnq.nonlinear_quantizer(name, bits, a, s)
    return np.mean((q.dequantize(q.encode(weights)) - weights) ** 2), (a, s)


def test_fit_is_deterministic_and_beats_its_starts():
    weights = laplacian_rows()
    first, (a, s) = fitted_error("sinh", 4, weights)
    again, (a2, s2) = fitted_error("sinh", 4, weights)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(s, s2)
    # The "ones" start with the range rule, as seed 003 initialises it:
    peak = np.abs(weights).max(1)
    ones = ptnq.nonlinear_quantizer("sinh", 4, np.ones(64), peak / np.sinh(1.0))
    assert first < 0.8 * np.mean((ones.dequantize(ones.encode(weights)) - weights) ** 2)


def test_non_linear_beats_linear_on_heavy_tails_and_more_bits_help():
    weights = laplacian_rows()
    sinh4, _ = fitted_error("sinh", 4, weights)
    linear4, _ = fitted_error("x", 4, weights)
    sinh5, _ = fitted_error("sinh", 5, weights)
    assert sinh4 < 0.9 * linear4
    assert sinh5 < 0.5 * sinh4


def test_regression_option_never_hurts():
    weights = laplacian_rows(rows=16)
    plain, _ = fitted_error("tan", 4, weights)
    regressed, _ = fitted_error("tan", 4, weights, ptnq.FitOptions(regression=True))
    assert regressed <= plain * 1.001


def test_local_pool_and_serial_executors_return_identical_fits():
    weights = laplacian_rows(rows=32, k=64)
    tasks = [(name, 4, ptnq.sketch(weights), np.zeros(32, np.int64), ptnq.FitOptions(space_rounds=5, steps=10))
             for name in ("sinh", "tan", "arctan")]
    serial = SerialExecutor().map(ptnq.fit_function, tasks)
    pooled = LocalExecutor(workers=2).map(ptnq.fit_function, tasks)
    for (a1, s1), (a2, s2) in zip(serial, pooled):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(s1, s2)


def test_ray_executor_returns_the_same_fits():
    pytest.importorskip("ray")
    from qcompile.lut.executors import RayExecutor

    weights = laplacian_rows(rows=16, k=64)
    tasks = [(name, 3, ptnq.sketch(weights), np.zeros(16, np.int64), ptnq.FitOptions(space_rounds=3, steps=5))
             for name in ("sinh", "x")]
    for (a1, s1), (a2, s2) in zip(SerialExecutor().map(ptnq.fit_function, tasks), RayExecutor().map(ptnq.fit_function, tasks)):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(s1, s2)


def test_quantizer_table_in_onnx_matches_numpy():
    """The table subgraph the pass emits folds to the table the encoder used."""
    weights = laplacian_rows(rows=8, k=32)
    q = ptnq.nonlinear_quantizer("arcsinh", 3, np.linspace(0.5, 3, 8), np.linspace(0.01, 0.05, 8))
    graph = gs.Graph(opset=18)
    from qcompile.passes.insert_lut_weights import InsertLutWeights

    table = InsertLutWeights._table(graph, "w", q)
    table.shape, table.dtype = list(q.table.shape), np.float32
    graph.outputs = [table]
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model)
    np.testing.assert_allclose(make_session(model).run(None, {})[0], q.table, rtol=1e-6)
    assert q.encode(weights).max() < 8
