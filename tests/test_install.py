"""qcompile installs like a library: a non-editable install from the sdist (and the wheel built from it)
builds the custom-op library from the source it ships, into the per-user cache, and runs LutMatMul.

Nothing is downloaded: the wheel is built without build isolation (setuptools comes with the dev extra),
the install goes into a fresh virtual environment whose dependencies are this environment's packages
(one .pth line; this environment's own .pth files, the editable install's finder among them, are not
read there), and the ONNX Runtime headers are the ones `make setup` cached.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from qcompile.lut import ops

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from (pyproject.toml's package-dir and readme): copied, so the build never
# writes into the checkout.
PROJECT_FILES = ["pyproject.toml", "README.md", "qcompile", "passes", "models", "csrc"]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    import qcompile
    from qcompile.errors import QCompileError
    from qcompile.lut import DOMAIN, ops, packing
    from qcompile.runtime import make_session

    assert not ops.library_available(), ops.library_path()
    rng = np.random.default_rng(0)
    n, k, bits, blocks = 16, 64, 4, 2
    codes = rng.integers(0, 1 << bits, (n, k))
    table = rng.standard_normal((n, blocks, 1 << bits)).astype(np.float32)
    # No standard-op fallback functions: only the custom-op library can run this model.
    graph = helper.make_graph(
        [helper.make_node("LutMatMul", ["X", "codes", "table"], ["Y"], domain=DOMAIN, bits=bits, k=k)], "lut",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(packing.pack_codes(codes, bits), "codes"),
         onnx.numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    weight = table[np.arange(n)[:, None], np.arange(k)[None, :] // (k // blocks), codes]
    for batch in (1, 3):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        y = make_session(model, use_library=True).run(["Y"], {"X": x})[0]
        np.testing.assert_allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5)
    built = str(ops.library_path())

    # No compiler: a first-use build is one clear QCompileError.
    os.environ["CXX"] = "/nonexistent/g++"
    try:
        make_session(model, use_library=True)
        raise SystemExit("expected a QCompileError")
    except QCompileError as exc:
        missing_compiler = str(exc)
    print(json.dumps({"package": qcompile.__file__, "source": str(ops.SOURCE), "library": built,
                      "missing_compiler": missing_compiler}))
""")


def run(command, **kwargs):
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    shown = " ".join(str(part) if len(str(part)) < 200 else "SCRIPT" for part in command)
    assert result.returncode == 0, f"{shown} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_non_editable_install_builds_and_runs_the_custom_op_library(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "_native", "*.so", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)

    # sdist, then the wheel built from it (what `pip install qcompile-0.1.0.tar.gz` does), then the install.
    run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
         tmp_path / "dist"], cwd=source)
    sdist, = (tmp_path / "dist").glob("qcompile-*.tar.gz")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", sdist])
    wheel, = (tmp_path / "dist").glob("qcompile-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_qcompile_test_deps.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    # A fresh cache: the library is built by the installed package. The headers are this machine's.
    cache = tmp_path / "cache"
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "CXX", ops.LIBRARY_ENV, "XDG_CACHE_HOME"}}
    env["XDG_CACHE_HOME"] = str(cache)
    if not env.get(ops.HEADER_ENV):
        headers = cache / "qcompile" / f"{ops.DEBIAN_PACKAGE}-{ops.DEBIAN_SUITE}" / "include"
        headers.parent.mkdir(parents=True)
        headers.symlink_to(ops.find_headers())
    work = tmp_path / "work"
    work.mkdir()

    # First use: make_session(use_library=True) builds it, with one line on stderr.
    first = run([python, "-c", SCRIPT], cwd=work, env=env)
    seen = json.loads(first.stdout.strip().splitlines()[-1])
    assert Path(seen["package"]).is_relative_to(site)
    assert Path(seen["source"]) == site / "qcompile" / "csrc" / "qcompile_ops.cc"
    library = Path(seen["library"])
    assert library.is_relative_to(cache / "qcompile" / "ops") and library.is_file()
    # Once for the two sessions, once more for the attempt without a compiler.
    assert first.stderr.count(f"qcompile: building the custom-op library on first use ({library})\n") == 1, first.stderr
    assert first.stderr.count("building the custom-op library on first use") == 2, first.stderr
    assert "cannot run the C++ compiler /nonexistent/g++" in seen["missing_compiler"]

    # `qcompile build-ops`, the installed console script, (re)builds the same file.
    built = run([venv / "bin" / "qcompile", "build-ops"], cwd=work, env=env)
    assert built.stdout.strip() == f"built {library}"
    assert not (site / "qcompile" / "_native").exists()
