"""Outlier analysis: streaming moments against NumPy, metrics on a model with planted outliers, CLI."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompile.analyze import OUTLIER_SIGMAS, StreamingMoments, analyze


def test_streaming_moments_match_numpy_over_uneven_batches(rng):
    values = np.concatenate([rng.standard_t(3, size=5000), rng.normal(5, 2, size=300)])
    moments = StreamingMoments()
    for chunk in np.split(values, [1, 17, 2000, 2001, 4500]):
        moments.update(chunk)
    centred = values - values.mean()
    assert moments.mean == pytest.approx(values.mean(), rel=1e-10)
    assert moments.std == pytest.approx(values.std(), rel=1e-10)
    assert moments.kurtosis == pytest.approx(np.mean(centred**4) / np.mean(centred**2) ** 2, rel=1e-9)


def outlier_model():
    """y = x * gain, where one channel's gain is 50: a planted outlier dimension, as in BERT."""
    gain = np.ones(16, np.float32)
    gain[3] = 50.0
    graph = helper.make_graph([helper.make_node("Mul", ["x", "gain"], ["y"], name="scale"),
                               helper.make_node("Relu", ["x"], ["r"], name="relu")], "outliers",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16]),
                               helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 16])],
                              [onnx.numpy_helper.from_array(gain, "gain")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_analyze_finds_the_planted_outlier_dimension(rng):
    x = rng.normal(size=(200, 1, 16)).astype(np.float32)
    analysis = analyze(outlier_model(), [{"x": sample} for sample in x])
    by_name = {t.tensor: t for t in analysis.tensors}
    assert list(by_name) == ["y", "r"] and analysis.worst == "y"
    y = (x[:, 0] * np.where(np.arange(16) == 3, 50.0, 1.0)).astype(np.float64)
    centred = y - y.mean()
    assert by_name["y"].max_abs == pytest.approx(np.abs(y).max())
    assert by_name["y"].kurtosis == pytest.approx(np.mean(centred**4) / np.mean(centred**2) ** 2, rel=1e-6)
    beyond = np.mean(np.abs(centred) > OUTLIER_SIGMAS * y.std())
    assert by_name["y"].outlier_fraction == pytest.approx(beyond, abs=2 / y.size)  # histogram bins at the edge
    assert by_name["y"].kurtosis > 10 > by_name["r"].kurtosis


def test_cli_writes_report_and_refuses_to_overwrite(tmp_path, rng):
    model = tmp_path / "model.onnx"
    onnx.save(outlier_model(), str(model))
    np.savez(tmp_path / "samples.npz", x=rng.normal(size=(32, 16)).astype(np.float32))
    command = [sys.executable, "-m", "qcompile", "analyze", str(model), "--calib", str(tmp_path / "samples.npz"),
               "-o", str(tmp_path / "analysis")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "y " in result.stdout
    report = (tmp_path / "analysis" / "report.html").read_text()
    assert report.count("<svg") == 2 and "Histogram of y" in report
    assert [t["tensor"] for t in json.loads((tmp_path / "analysis" / "outliers.json").read_text())] == ["y", "r"]
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "exists" in again.stderr
