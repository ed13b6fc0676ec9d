"""The compiled artifact: model.onnx (+ external data when large), manifest.json, report.html.

`save` writes into a temporary sibling folder and renames it into place, so a failure never
leaves a half-written output directory.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import QCompileError
from .runtime import make_session

MODEL_FILE, MANIFEST_FILE, REPORT_FILE = "model.onnx", "manifest.json", "report.html"
EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 512 << 20  # bytes of serialized model above which weights go to a side file


@contextmanager
def staged_directory(directory: str | Path, force: bool):
    """Yield a temporary sibling folder to fill; on success it replaces `directory`, on failure it
    is removed, so no half-written output is ever left."""
    target = Path(directory)
    if target.exists() and not force:
        raise QCompileError(f"{target}: output directory exists (use --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass
class Artifact:
    model: onnx.ModelProto
    manifest: dict
    report_html: str

    def session(self, threads: int | None = None, use_library: bool | None = None) -> ort.InferenceSession:
        """An ONNX Runtime session for this artifact. Lookup-table weights run on qcompile's custom-op
        library when it is built (use_library=True insists on it); use_library=False runs the standard-op
        fallback functions the model carries, as a stock ONNX Runtime would."""
        return make_session(self.model, threads=threads or 0, use_library=use_library)

    def save(self, directory: str | Path, force: bool = False,
             external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
        with staged_directory(directory, force) as staging:
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
        report = folder / REPORT_FILE
        return cls(onnx.load(str(files[0])), json.loads(files[1].read_text()),
                   report.read_text() if report.is_file() else "")
