"""qcompile's native ONNX Runtime custom-op library (csrc/qcompile_ops.cc): build and registration.

The C++ source has one home, csrc/qcompile_ops.cc in the repository; wheels and sdists carry it as
package data (qcompile/csrc/qcompile_ops.cc, mapped in pyproject.toml), so an installed qcompile
builds the library the same way a checkout does.

The library is an ONNX Runtime custom-op library (loaded with register_custom_ops_library), not a
Python extension, and it is built on the user's machine, not at wheel build time: the wheel stays
pure Python and `pip install` needs no compiler, no ONNX Runtime headers and no Debian download.
It goes to a per-user cache, ~/.cache/qcompile/ops/<key>/libqcompile_ops.so (or under
$XDG_CACHE_HOME), keyed by a hash of the source, the compiler flags, the compiler and the machine:
site-packages may be read-only, an edited source never runs against a stale library, and a dev
checkout and any number of installs share builds. $QCOMPILE_OPS_LIBRARY names a prebuilt library
instead (built there only by `qcompile build-ops`).

When it is built: `qcompile build-ops` (make setup runs it), or on first use, when a session opens
a model that uses qcompile's ops (one line on stderr, about three seconds). Where it cannot be built,
a session that insists on it (use_library=True) fails with the reason; one that left the choice open
(use_library=None) says so in one line and runs the models' standard-op fallback functions.

PyPI's onnxruntime ships no C/C++ headers. They come from, in order:
1. the folder in $QCOMPILE_ORT_INCLUDE (or `build_library(include=...)`), which must hold
   onnxruntime_lite_custom_op.h;
2. a cached copy of Debian's libonnxruntime-dev headers under ~/.cache/qcompile (or $XDG_CACHE_HOME);
3. downloading that package with `apt-get download` into the cache, with a private sources list
   (no system apt configuration is touched).
The library uses only the versioned C API, so one built against the 1.21 headers loads in newer
ONNX Runtime releases (which is why the ONNX Runtime version is not part of the cache key).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from ..errors import QCompileError

HEADER_ENV = "QCOMPILE_ORT_INCLUDE"
LIBRARY_ENV = "QCOMPILE_OPS_LIBRARY"
HEADER_FILE = "onnxruntime_lite_custom_op.h"
LIBRARY_NAME = "libqcompile_ops.so"
_PACKAGE = Path(__file__).resolve().parents[1]
# An install carries the source as package data (qcompile/csrc/); a source checkout (editable install) has it
# at the repository root. The first that exists is the one built.
SOURCE_CANDIDATES = (_PACKAGE / "csrc" / "qcompile_ops.cc", _PACKAGE.parent / "csrc" / "qcompile_ops.cc")
SOURCE = next((path for path in SOURCE_CANDIDATES if path.is_file()), SOURCE_CANDIDATES[0])
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
DEBIAN_PACKAGE, DEBIAN_SUITE = "libonnxruntime-dev", "trixie"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qcompile"


def _compiler() -> list[str] | None:
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return [found] if found else None


def _build_key() -> str:
    """What the built file depends on: the source, the flags, the compiler and the machine."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes() if SOURCE.is_file() else b"<no source>")
    for part in (*CXX_FLAGS, *(_compiler() or ["<no compiler>"]), platform.machine()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """Where the built library lives: $QCOMPILE_OPS_LIBRARY, else the per-user cache entry for this source."""
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV])
    return _cache_dir() / "ops" / _build_key() / LIBRARY_NAME


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
        # Staged beside the target and renamed into place, so a concurrent fetch (or an interrupted one) never
        # leaves a half-copied folder behind; whichever process renames first wins.
        staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".", suffix=".partial"))
        shutil.copytree(root / "x/usr/include/onnxruntime", staged, dirs_exist_ok=True)
        try:
            staged.rename(target)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            if not (target / HEADER_FILE).is_file():
                raise
    return target


def find_headers(include: str | Path | None = None) -> Path:
    if include is not None:
        return _check_header_dir(Path(include), "header folder")
    if os.environ.get(HEADER_ENV):
        return _check_header_dir(Path(os.environ[HEADER_ENV]), f"${HEADER_ENV} =")
    cached = _cache_dir() / f"{DEBIAN_PACKAGE}-{DEBIAN_SUITE}" / "include"
    if (cached / HEADER_FILE).is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QCompileError(f"cannot create the header cache {cached.parent} ({exc.strerror}): set XDG_CACHE_HOME "
                            f"to a writable folder, or {HEADER_ENV} to a folder holding {HEADER_FILE}") from None
    return _download_debian_headers(cached)


def build_library(include: str | Path | None = None, output: Path | None = None) -> Path:
    """Compile csrc/qcompile_ops.cc into a shared library (default: library_path()); the file appears
    only when the build succeeds, atomically, so concurrent builds and readers never see a partial one."""
    if not SOURCE.is_file():
        looked = " and ".join(map(str, SOURCE_CANDIDATES))
        raise QCompileError(f"qcompile's C++ source is not installed (looked for {looked}): reinstall qcompile "
                            "from a wheel or sdist, or build from a source checkout")
    compiler = _compiler()
    if compiler is None:
        raise QCompileError("no C++ compiler found (install g++ or set CXX)")
    headers = find_headers(include)
    output = Path(output) if output is not None else library_path()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle, partial_name = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".", suffix=".partial")
    except OSError as exc:
        raise QCompileError(f"cannot write the custom-op library to {output.parent} ({exc.strerror}): set "
                            f"XDG_CACHE_HOME to a writable folder, or {LIBRARY_ENV} to the library's path") from None
    os.close(handle)
    partial = Path(partial_name)
    command = [*compiler, *CXX_FLAGS, f"-I{headers}", str(SOURCE), "-o", str(partial)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise QCompileError(f"cannot run the C++ compiler {compiler[0]} ({exc.strerror}): "
                            "install g++ or set CXX") from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise QCompileError(f"building the custom-op library failed:\n{result.stderr.strip()}")
    partial.chmod(0o755)
    partial.replace(output)
    return output


def register(options: ort.SessionOptions) -> None:
    """Register the custom-op library with a session's options, building it first if it is not built yet
    (one line on stderr). A $QCOMPILE_OPS_LIBRARY that does not exist is an error: that path is a prebuilt
    library, built only by `qcompile build-ops`."""
    options.register_custom_ops_library(str(_built_library()))


def _built_library() -> Path:
    path = library_path()
    if not path.is_file():
        if os.environ.get(LIBRARY_ENV):
            raise QCompileError(f"qcompile's custom-op library is not built ({path}, from ${LIBRARY_ENV}): run "
                                "`qcompile build-ops`, or open the artifact with use_library=False to run its "
                                "standard-op fallback")
        print(f"qcompile: building the custom-op library on first use ({path})", file=sys.stderr, flush=True)
        try:
            build_library(output=path)
        except QCompileError as exc:
            raise QCompileError(f"qcompile's custom-op library is not built, and building it failed: {exc} (or open "
                                "the artifact with use_library=False to run its standard-op fallback)") from None
    return path
