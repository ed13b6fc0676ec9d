"""qcompile's native ONNX Runtime custom-op library (csrc/qcompile_ops.cc): build and registration.

PyPI's onnxruntime ships no C/C++ headers. They come from, in order:
1. the folder in $QCOMPILE_ORT_INCLUDE (or `build_library(include=...)`), which must hold
   onnxruntime_lite_custom_op.h;
2. a cached copy of Debian's libonnxruntime-dev headers under ~/.cache/qcompile (or $XDG_CACHE_HOME);
3. downloading that package with `apt-get download` into the cache, with a private sources list
   (no system apt configuration is touched).
The library uses only the versioned C API, so one built against the 1.21 headers loads in newer
ONNX Runtime releases.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import onnxruntime as ort

from ..errors import QCompileError

HEADER_ENV = "QCOMPILE_ORT_INCLUDE"
LIBRARY_ENV = "QCOMPILE_OPS_LIBRARY"
HEADER_FILE = "onnxruntime_lite_custom_op.h"
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "qcompile_ops.cc"
DEBIAN_PACKAGE, DEBIAN_SUITE = "libonnxruntime-dev", "trixie"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompile"


def library_path() -> Path:
    """Where the built library lives ($QCOMPILE_OPS_LIBRARY overrides)."""
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV])
    return Path(__file__).resolve().parents[1] / "_native" / "libqcompile_ops.so"


def library_available() -> bool:
    return library_path().is_file()


def _check_header_dir(folder: Path, origin: str) -> Path:
    if not (folder / HEADER_FILE).is_file():
        raise QCompileError(f"{origin} {folder} has no {HEADER_FILE}: point it at ONNX Runtime's include folder")
    return folder


def _download_debian_headers(target: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise QCompileError(f"ONNX Runtime C/C++ headers not found: set {HEADER_ENV} to a folder holding {HEADER_FILE}"
                            " (apt-get and dpkg, used to fetch Debian's libonnxruntime-dev, are not available)")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True)
        sources = root / "sources.list"
        sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {DEBIAN_SUITE} main\n")
        apt = ["apt-get", "-q", f"-o=Dir::Etc::SourceList={sources}", "-o=Dir::Etc::SourceParts=/dev/null",
               f"-o=Dir::State={root / 'state'}", f"-o=Dir::Cache={root / 'cache'}", "-o=Debug::NoLocking=1"]
        try:
            subprocess.run([*apt, "update"], check=True, capture_output=True, text=True)
            subprocess.run([*apt, "download", DEBIAN_PACKAGE], check=True, capture_output=True, text=True, cwd=root)
            package = next(root.glob(f"{DEBIAN_PACKAGE}_*.deb"))
            subprocess.run(["dpkg", "-x", str(package), str(root / "x")], check=True, capture_output=True, text=True)
        except (subprocess.CalledProcessError, StopIteration) as exc:
            detail = getattr(exc, "stderr", "") or "no package file"
            raise QCompileError(f"ONNX Runtime C/C++ headers not found, and fetching Debian's {DEBIAN_PACKAGE} failed "
                                f"({detail.strip().splitlines()[-1] if detail.strip() else exc}); set {HEADER_ENV} "
                                f"to a folder holding {HEADER_FILE}") from None
        staged = target.with_name(target.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(root / "x/usr/include/onnxruntime", staged)
        staged.rename(target)
    return target


def find_headers(include: str | Path | None = None) -> Path:
    if include is not None:
        return _check_header_dir(Path(include), "header folder")
    if os.environ.get(HEADER_ENV):
        return _check_header_dir(Path(os.environ[HEADER_ENV]), f"${HEADER_ENV} =")
    cached = _cache_dir() / f"{DEBIAN_PACKAGE}-{DEBIAN_SUITE}" / "include"
    if (cached / HEADER_FILE).is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    return _download_debian_headers(cached)


def build_library(include: str | Path | None = None, output: Path | None = None) -> Path:
    """Compile csrc/qcompile_ops.cc into a shared library; the file appears only when the build succeeds."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise QCompileError("no C++ compiler found (install g++ or set CXX)")
    headers = find_headers(include)
    output = output or library_path()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{headers}",
               str(SOURCE), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise QCompileError(f"building the custom-op library failed:\n{result.stderr.strip()}")
    partial.rename(output)
    return output


def register(options: ort.SessionOptions) -> None:
    """Register the custom-op library with a session's options."""
    if not library_available():
        raise QCompileError(f"qcompile's custom-op library is not built ({library_path()}): run `qcompile build-ops`, "
                            "or open the artifact with use_library=False to run its standard-op fallback")
    options.register_custom_ops_library(str(library_path()))
