"""Writing never destroys the user's files, and every failure is one line with the right exit code."""
import json
import multiprocessing
import subprocess
import sys

import numpy as np
import onnx
import pytest

import qcompile
from conftest import matmul_model
from qcompile import QCompileError, QuantConfig


def qcompile_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def one_line(result, code, message):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr


def snapshot(folder):
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path):
    """A user's folder: a model, its calibration data and an unrelated file."""
    onnx.save(matmul_model(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((10, 1, 3)).astype(np.float32))
    (tmp_path / "notes.txt").write_text("keep me")
    return tmp_path


@pytest.mark.parametrize("output, cwd, message", [
    (".", ".", "refusing to write over the current directory"),
    ("../here", "here", "refusing to write over the current directory"),
    ("{root}", ".", "refusing to write over the current directory"),
    ("{root}/..", ".", "refusing to write over the current directory"),
    ("notes.txt", ".", "exists and is not a directory"),
    ("folder", ".", "not a previous qcompile output"),
    ("/proc/qcompile-out", ".", "cannot write there"),
    ("notes.txt/out", ".", "cannot write there"),
])
def test_force_never_replaces_what_is_not_a_previous_artifact(workdir, output, cwd, message):
    (workdir / "here").mkdir()
    (workdir / "folder").mkdir()
    (workdir / "folder" / "data.bin").write_bytes(b"user data")
    before = snapshot(workdir)
    model, calib = workdir / "m.onnx", workdir / "c.npz"
    result = qcompile_cli("compile", model, "--calib", calib, "-o", output.format(root=workdir), "--force",
                          cwd=workdir / cwd)
    one_line(result, 2, message)
    assert snapshot(workdir) == before  # nothing touched, no staging folder left


def test_the_input_folder_and_its_ancestors_are_refused(workdir):
    nested = workdir / "a" / "b"
    nested.mkdir(parents=True)
    (workdir / "m.onnx").rename(nested / "m.onnx")
    before = snapshot(workdir)
    for output in (nested, workdir / "a"):
        result = qcompile_cli("compile", nested / "m.onnx", "--calib", workdir / "c.npz", "-o", output, "--force",
                              cwd="/")
        one_line(result, 2, f"refusing to write over input {nested / 'm.onnx'}")
    assert snapshot(workdir) == before


def test_force_replaces_a_previous_artifact(workdir):
    out = workdir / "out"
    for _ in range(2):
        result = qcompile_cli("compile", "m.onnx", "--calib", "c.npz", "-o", out, "--force", cwd=workdir)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.html"]
    assert sorted(p.name for p in workdir.iterdir()) == ["c.npz", "m.onnx", "notes.txt", "out"]


def test_an_existing_output_without_force_is_refused_before_any_work(workdir):
    (workdir / "out").mkdir()
    (workdir / "out" / "manifest.json").write_text(json.dumps({"qcompile_version": "0"}))
    result = qcompile_cli("compile", "m.onnx", "--calib", "c.npz", "-o", "out", cwd=workdir)
    one_line(result, 2, "output directory exists (use --force to replace it)")


def _save_after_barrier(artifact, target, barrier, results):
    barrier.wait()
    try:
        artifact.save(target, force=True)
        results.put("won")
    except QCompileError as error:
        results.put(str(error))


def test_two_processes_saving_one_artifact_each_win_or_get_one_error(tmp_path):
    artifact = qcompile.compile(matmul_model(), QuantConfig(acts="none"))
    target = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    outcomes = []
    for _ in range(15):
        barrier, results = context.Barrier(2), context.Queue()
        workers = [context.Process(target=_save_after_barrier, args=(artifact, target, barrier, results))
                   for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        outcomes += [results.get(timeout=5) for _ in workers]
        assert qcompile.Artifact.load(target).manifest == json.loads(json.dumps(artifact.manifest))  # whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left
    assert "won" in outcomes
    assert all(o == "won" or "another process wrote it at the same time" in o for o in outcomes), outcomes


def test_two_cli_writers_with_force_each_win_or_get_one_line(workdir):
    command = [sys.executable, "-m", "qcompile", "compile", "m.onnx", "--calib", "c.npz", "-o", "out", "--force"]
    runs = [subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    finished = [(run.wait(120), run.stderr.read()) for run in runs]
    for code, stderr in finished:
        assert code == 0 or (code == 2 and len(stderr.strip().splitlines()) == 1), stderr
    assert qcompile.Artifact.load(workdir / "out").manifest["qcompile_version"]
    assert sorted(p.name for p in workdir.iterdir()) == ["c.npz", "m.onnx", "notes.txt", "out"]


def test_a_bug_of_ours_is_one_line_and_exit_3_with_the_traceback_under_debug(workdir):
    script = ("import sys, qcompile.compiler as c\n"
              "def broken(state): raise KeyError('plan entry')\n"
              "c.PHASES = c.PHASES[:2] + (broken,) + c.PHASES[2:]\n"
              "from qcompile.cli import main\n"
              "sys.argv = ['qcompile', *sys.argv[1:]]\n"
              "main()\n")
    args = ["compile", "m.onnx", "--calib", "c.npz", "-o", "out"]
    plain = subprocess.run([sys.executable, "-c", script, *args], cwd=workdir, capture_output=True, text=True)
    one_line(plain, 3, "internal error: phase broken: KeyError: 'plan entry' (a bug in qcompile; rerun with --debug")
    debug = subprocess.run([sys.executable, "-c", script, "--debug", *args], cwd=workdir, capture_output=True, text=True)
    assert debug.returncode == 3 and "Traceback" in debug.stderr and "in broken\nKeyError: 'plan entry'" in debug.stderr
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "manifest.json").write_text("{not json"), "not a readable manifest"),
    (lambda out: (out / "manifest.json").write_text("[1, 2]"), "not a qcompile manifest"),
    (lambda out: (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:40]), "not a readable ONNX model"),
    (lambda out: (out / "model.onnx").unlink(), "not a qcompile artifact"),
])
def test_run_on_a_damaged_artifact_is_one_line(workdir, damage, message):
    assert qcompile_cli("compile", "m.onnx", "--calib", "c.npz", "-o", "out", cwd=workdir).returncode == 0
    damage(workdir / "out")
    np.savez(workdir / "x.npz", x=np.ones((1, 3), np.float32))
    one_line(qcompile_cli("run", "out", "--inputs", "x.npz", "--outputs", "y.npz", cwd=workdir), 2, message)


def test_empty_samples_calibrate_nothing_and_only_empty_samples_are_a_user_error(workdir):
    rng = np.random.default_rng(0)
    np.savez(workdir / "empty.npz", x=np.zeros((3, 0, 3), np.float32))
    result = qcompile_cli("compile", "m.onnx", "--calib", "empty.npz", "-o", "out", cwd=workdir)
    one_line(result, 2, "no finite calibration value reached 1 activations (x): are the samples empty?")
    # One empty batch among real ones is skipped, not a ZeroDivisionError.
    folder = workdir / "mixed"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((1, 0, 3), np.float32))
    np.savez(folder / "b.npz", x=rng.standard_normal((10, 1, 3)).astype(np.float32))
    result = qcompile_cli("compile", "m.onnx", "--calib", folder, "-o", "out", cwd=workdir)
    assert result.returncode == 0, result.stderr


def test_external_data_outside_the_model_folder_is_a_user_error(workdir):
    model = matmul_model()
    weight = model.graph.initializer[0]
    weight.data_location = onnx.TensorProto.EXTERNAL
    del weight.external_data[:]
    weight.external_data.add(key="location", value="../../etc/passwd")
    weight.ClearField("float_data")
    weight.ClearField("raw_data")
    (workdir / "sub").mkdir()
    onnx.save(model, str(workdir / "sub" / "ext.onnx"))
    result = qcompile_cli("compile", "sub/ext.onnx", "--calib", "c.npz", "-o", "out", cwd=workdir)
    one_line(result, 2, "not an ONNX model")


def test_a_model_onnx_runtime_rejects_is_one_line_before_any_work(tmp_path):
    """ONNX Runtime logs its own error line to stderr before raising; the user must see only ours."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (1, 6, 3)), ("R", (1, 6, 2)))]
    gru = helper.make_node("GRU", ["x", "W", "R"], ["y"], hidden_size=2, layout=1)  # batch-first: ORT has no kernel
    graph = helper.make_graph([gru], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 2])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(tmp_path / "gru.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((2, 1, 4, 3)).astype(np.float32))
    result = qcompile_cli("compile", "gru.onnx", "--calib", "c.npz", "-o", "out", cwd=tmp_path)
    one_line(result, 2, "error: ONNX Runtime cannot load the model: ")
