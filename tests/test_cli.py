"""The command line as a user meets it: one-line errors with exit code 2, no half-written output."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import matmul_model


def qcompile(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(result, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def bad_calibration(tiny_bert, tmp_path, change):
    arrays = dict(np.load(tiny_bert["calib"]))
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def checker_failing_model(path):
    node = helper.make_node("MatMul", ["x", "missing"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("not_onnx", "not an ONNX model"),
    ("checker", "fails the ONNX checker"),
    ("missing_input", "missing model inputs: attention_mask"),
    ("extra_input", "names that are not model inputs: token_type_ids"),
    ("wrong_dtype", "has dtype int32, the model wants int64"),
    ("wrong_rank", "the model wants ?x?"),
    ("nan", "contains NaN"),
    ("empty", "holds no samples"),
    ("no_calib", "needs calibration data"),
    ("output_exists", "output directory exists"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_bert, tmp_path, case, message):
    model, calib = tiny_bert["model"], tiny_bert["calib"]
    out = tmp_path / "out"
    args = ["--calib", calib]
    if case == "not_onnx":
        model = tmp_path / "model.onnx"
        model.write_text("hello")
    elif case == "checker":
        model = checker_failing_model(tmp_path / "broken.onnx")
    elif case == "missing_input":
        args = ["--calib", bad_calibration(tiny_bert, tmp_path, lambda a: a.pop("attention_mask"))]
    elif case == "extra_input":
        args = ["--calib", bad_calibration(tiny_bert, tmp_path, lambda a: a.update(token_type_ids=a["input_ids"]))]
    elif case == "wrong_dtype":
        args = ["--calib", bad_calibration(tiny_bert, tmp_path, lambda a: a.update(input_ids=a["input_ids"].astype(np.int32)))]
    elif case == "wrong_rank":
        args = ["--calib", bad_calibration(tiny_bert, tmp_path, lambda a: a.update(input_ids=a["input_ids"][..., None, None]))]
    elif case == "nan":
        model = tmp_path / "float_input.onnx"
        onnx.save(matmul_model(), str(model))
        bad = tmp_path / "nan.npz"
        x = np.ones((4, 1, 3), np.float32)
        x[2, 0, 1] = np.nan
        np.savez(bad, x=x)
        args = ["--calib", bad]
    elif case == "empty":
        args = ["--calib", bad_calibration(tiny_bert, tmp_path, lambda a: a.update({k: v[:0] for k, v in a.items()}))]
    elif case == "no_calib":
        args = []
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = qcompile("compile", model, "-o", out, *args)
    assert_user_error(result, message)
    if case == "output_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folders left


def test_compile_then_run(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result = qcompile("compile", tiny_bert["model"], "--calib", tiny_bert["calib"], "--verify-data", tiny_bert["eval"],
                      "-o", out, "--calib-method", "minmax")
    assert result.returncode == 0, result.stderr
    assert "sentence_embedding" in result.stdout and (out / "report.html").is_file()
    again = qcompile("compile", tiny_bert["model"], "--calib", tiny_bert["calib"], "-o", out, "--force")
    assert again.returncode == 0, again.stderr

    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **{k: v[:2] for k, v in np.load(tiny_bert["eval"]).items()})
    ran = qcompile("run", out, "--inputs", inputs, "--outputs", tmp_path / "y.npz")
    assert ran.returncode == 0, ran.stderr
    assert np.load(tmp_path / "y.npz")["sentence_embedding"].shape == (2, 64)
    assert_user_error(qcompile("run", tmp_path, "--inputs", inputs, "--outputs", tmp_path / "z.npz"),
                      "not a qcompile artifact")


def test_export_unknown_model_and_bad_choice(tmp_path):
    assert_user_error(qcompile("export", "resnet-9000", "-o", tmp_path / "m.onnx"), "unknown model 'resnet-9000'")
    assert_user_error(qcompile("compile", "m.onnx", "-o", tmp_path / "o", "--weights", "fp8"),
                      "--weights must be int8, int4, intB, nl, nlB, table, tableB, none or auto")
    assert_user_error(qcompile("compile", "m.onnx", "-o", tmp_path / "o", "--weights", "int9"),
                      "bits must be a range within 2..8")


def test_compile_nonlinear_lookup_table_weights(tiny_bert, tmp_path):
    out = tmp_path / "nl"
    result = qcompile("compile", tiny_bert["model"], "--calib", tiny_bert["calib"], "-o", out, "--weights", "nl3",
                      "--acts", "none", "--functions", "x,sinh", "--executor", "serial")
    assert result.returncode == 0, result.stderr
    assert "as packed 3-bit lookup tables" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["custom_op_library"] == "qcompile" and manifest["lut_weights"]["bits"] == 3
    assert_user_error(qcompile("compile", tiny_bert["model"], "-o", tmp_path / "x", "--weights", "int8", "--bits", "4"),
                      "--bits applies to lookup-table weights")
    assert_user_error(qcompile("compile", tiny_bert["model"], "-o", tmp_path / "x", "--weights", "nl", "--bits", "4-x"),
                      "--bits must be B or LOW-HIGH")
    assert not (tmp_path / "x").exists()


def test_export_reports_the_samples_it_wrote_not_the_ones_asked_for(tmp_path):
    result = qcompile("export", "tiny-vit-vanilla", "-o", tmp_path / "m.onnx", "--calib-out", tmp_path / "c.npz",
                      "--calib-samples", 6000, "--eval-out", tmp_path / "e.npz", "--eval-samples", 3)
    assert result.returncode == 0, result.stderr
    assert f"wrote 5000 calibration samples to {tmp_path / 'c.npz'} (asked for 6000; the model's data holds 5000)" \
        in result.stdout
    assert f"wrote 3 evaluation samples to {tmp_path / 'e.npz'}\n" in result.stdout
    assert len(np.load(tmp_path / "c.npz")["images"]) == 5000
