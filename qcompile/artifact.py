"""The compiled artifact: model.onnx (+ external data when large), manifest.json, report.html.

Writing is safe by construction:
* `check_output` refuses, before any work starts, a target that is a file, a directory that is
  not a previous qcompile artifact (even with force), the current directory, or the folder of
  an input or any ancestor of one;
* `save` fills a temporary sibling folder and renames it into place, so a failure never leaves a
  half-written directory, and two writers of one target each either win atomically or get a
  one-line error.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from .errors import QCompileError, first_line
from .runtime import make_session

MODEL_FILE, MANIFEST_FILE, REPORT_FILE = "model.onnx", "manifest.json", "report.html"
EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 512 << 20  # bytes of serialized model above which weights go to a side file
MARKER = "qcompile_version"  # the manifest key that makes a directory a qcompile artifact
CHECK_ATTEMPTS = 5  # looks at an output folder that concurrent writers keep replacing


def check_output(directory: str | Path, force: bool, inputs=()) -> Path:
    """Raise QCompileError unless `directory` may be written: absent, empty, or (with force) a
    previous qcompile output (its manifest.json holds MARKER). Never the working directory, an
    input, or a folder holding an input."""
    target = Path(directory)
    resolved = target.resolve()
    protected = [Path.cwd().resolve()] + [Path(p).resolve() for p in inputs if p is not None]
    for path in protected:
        if resolved == path or resolved in path.parents:
            what = "the current directory" if path == protected[0] else f"input {path}"
            raise QCompileError(f"{target}: refusing to write over {what}; choose a new output directory")
    # A concurrent writer may move the folder away while it is examined: a verdict counts only if the
    # folder examined is still the one there; otherwise look again.
    for _ in range(CHECK_ATTEMPTS):
        try:
            examined = target.lstat().st_ino
        except (FileNotFoundError, NotADirectoryError):  # absent, or under a file: mkdir says which
            return target
        problem = _output_problem(target, force)
        try:
            if problem is None or target.lstat().st_ino == examined:
                break
        except FileNotFoundError:
            continue
    if problem is not None:
        raise QCompileError(problem)
    return target


def _output_problem(target: Path, force: bool) -> str | None:
    """Why an existing `target` may not be written, or None."""
    if not target.is_dir() or target.is_symlink():
        return f"{target}: exists and is not a directory; choose a new output directory"
    try:
        if not any(target.iterdir()):
            return None
    except FileNotFoundError:
        return f"{target}: vanished while it was checked"
    if not force:
        return f"{target}: output directory exists (use --force to replace it)"
    if not _is_output(target):
        return f"{target}: not a previous qcompile output (no qcompile {MANIFEST_FILE}); --force replaces only those"
    return None


def _is_output(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and MARKER in manifest


@contextmanager
def staged_directory(directory: str | Path, force: bool, inputs=()):
    """Yield a temporary sibling folder to fill; on success it replaces `directory`, on failure it
    is removed, so no half-written output and no staging folder is ever left."""
    target = check_output(directory, force, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise QCompileError(f"{target}: cannot write there ({error.strerror or error})") from None
    try:
        yield staging
        _replace(staging, target, force, inputs)
    except OSError as error:
        raise QCompileError(f"{target}: writing failed ({error.strerror or error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, target: Path, force: bool, inputs) -> None:
    """Move the old output aside, then rename staging into place: each step is one atomic rename,
    so a concurrent writer that got in between is detected, never mixed with."""
    check_output(target, force, inputs)  # it may have changed while we worked
    trash = None
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        try:
            os.rename(target, trash / "old")
        except FileNotFoundError:
            pass  # another writer moved it first
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise QCompileError(f"{target}: another process wrote it at the same time; its output was kept, "
                            "this one discarded") from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


@dataclass
class Artifact:
    model: onnx.ModelProto
    manifest: dict
    report_html: str
    inputs: tuple[Path, ...] = field(default=(), repr=False)  # files it was made from: never overwritten

    def session(self, threads: int | None = None, use_library: bool | None = None) -> ort.InferenceSession:
        """An ONNX Runtime session for this artifact. Lookup-table weights run on qcompile's custom-op
        library when it is built (use_library=True insists on it); use_library=False runs the standard-op
        fallback functions the model carries, as a stock ONNX Runtime would."""
        return make_session(self.model, threads=threads or 0, use_library=use_library)

    def save(self, directory: str | Path, force: bool = False,
             external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
        with staged_directory(directory, force, self.inputs) as staging:
            model = self.model
            external = model.ByteSize() > external_data_threshold
            if external:  # onnx moves the weights out of the proto it saves: keep ours whole
                model = onnx.ModelProto()
                model.CopyFrom(self.model)
            onnx.save_model(model, str(staging / MODEL_FILE), save_as_external_data=external,
                            all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)
            (staging / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
            (staging / REPORT_FILE).write_text(self.report_html)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "Artifact":
        folder = Path(directory)
        files = [folder / MODEL_FILE, folder / MANIFEST_FILE]
        if not all(f.is_file() for f in files):
            raise QCompileError(f"{folder}: not a qcompile artifact (needs {MODEL_FILE} and {MANIFEST_FILE})")
        try:
            manifest = json.loads(files[1].read_text())
        except (OSError, ValueError) as error:
            raise QCompileError(f"{files[1]}: not a readable manifest ({error})") from None
        if not isinstance(manifest, dict) or MARKER not in manifest:
            raise QCompileError(f"{files[1]}: not a qcompile manifest (no {MARKER})")
        try:
            model = onnx.load(str(files[0]))
            onnx.checker.check_model(model)
        except (DecodeError, ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as error:
            raise QCompileError(f"{files[0]}: not a readable ONNX model ({first_line(error)})") from None
        report = folder / REPORT_FILE
        return cls(model, manifest, report.read_text() if report.is_file() else "")
