"""Real-model corpus: compile every ONNX backend test model (and torchvision exports) with its own
inputs as calibration data, and tally what comes out.

    .venv/bin/python benchmarks/corpus.py                       # every folder, W8A8
    .venv/bin/python benchmarks/corpus.py --formats w8a8,int4 --folders simple,pytorch-converted
    .venv/bin/python benchmarks/corpus.py --torchvision         # also torchvision exports (legacy 11/13, dynamo 17/18)
    .venv/bin/python benchmarks/corpus.py --match 'conv' --jobs 2 --keep

Models: the `onnx` package's backend test data (onnx/backend/test/data/): pytorch-converted,
pytorch-operator and simple ship model.onnx with test_data_set_*/{input,output}_*.pb; light ships
models whose weights are ConstantOfShape nodes (inputs: the ONNX runner's ramp); real only names
the light models again (counted as skipped); node is not shipped in the wheel any more, so its
1,800-odd cases are generated from onnx.backend.test.case.node (as `backend-test-tools
generate-data` would) into build/bench/corpus/data/node/.

Every model is compiled with `qcompile compile MODEL --calib D --verify-data D -o OUT <format
flags>` (D: the test inputs, one sample per test_data_set) and each case ends in one of:

  artifact        exit 0, the artifact loads and runs in ONNX Runtime, and matches the float model
                  within the quantization error (float outputs: SQNR >= MIN_SQNR[format], or
                  within MARGIN[format] dB of the float model with round-to-nearest weights, or
                  |error| <= 1e-5 * max |float| + 1e-7; and finite wherever float is finite;
                  integer/bool outputs: >= 99% equal; models with random ops: shapes only)
  mismatch        exit 0 and the artifact runs, but its outputs are outside that tolerance
  broken artifact exit 0 but the artifact does not load or run in ONNX Runtime
  clear error     exit 2 and stderr is one line starting "error: "
  internal error  exit 3 and stderr is one line ("internal error: ...", a named bug of ours)
  other           anything else: a traceback, exit 1, a signal, a timeout, several stderr lines

`artifact` and `clear error` are the good outcomes; a clear error is the right answer where the
float model itself does not load in ONNX Runtime (`float_loads` in the results). Models with
sequence / map / optional inputs cannot be given as .npz calibration data: they are flagged
`unsupported input type` and compiled with their tensor inputs only (qcompile must still answer
with one line).

By default the CLI is run in a forked child of this process (`--exec fork`: the same `main()`,
the same exit code and the same file descriptors 1 and 2 as `qcompile compile`, without paying
the 1.5 s import per case); `--exec subprocess` runs the installed `qcompile` executable.

Writes build/bench/corpus/results.json (one record per model and format) and results.md (tallies
and failures grouped by root cause).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "bench" / "corpus"
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FOLDERS = ("node", "pytorch-converted", "pytorch-operator", "simple", "light", "real")
TORCHVISION = "torchvision"

# --formats: name -> `qcompile compile` flags.
FORMATS = {
    "w8a8": ["--weights", "int8", "--acts", "int8"],
    "w8": ["--weights", "int8", "--acts", "none"],
    "w4a8": ["--weights", "int4", "--acts", "int8"],
    "int4": ["--weights", "int4", "--acts", "none"],  # packed affine lookup-table weights, per channel
    "int4b32": ["--weights", "int4", "--block", "32", "--acts", "none"],
    "nl4": ["--weights", "nl4", "--acts", "none", "--functions", "x,sinh", "--executor", "serial"],
}
# Output SQNR (dB, float outputs, all samples) an artifact must reach to "match float within the
# quantization error". Loose on purpose: random-weight networks and single ops fed with unit-range
# test data; the per-model figure is in the results.
MIN_SQNR = {"w8a8": 15.0, "w8": 20.0, "w4a8": 8.0, "int4": 8.0, "int4b32": 8.0, "nl4": 8.0}
# Below MIN_SQNR an output still matches when it is within MARGIN dB of the same model with its
# weights rounded to nearest (symmetric, per output channel, WEIGHT_BITS): deep random-weight
# networks are chaotic (torchvision's MobileNetV2 with int8 round-to-nearest weights alone: ~10 dB),
# so a fixed figure cannot tell quantization error from a bug there, the naive baseline can.
WEIGHT_BITS = {"w8a8": 8, "w8": 8, "w4a8": 4, "int4": 4, "int4b32": 4, "nl4": 4}
MARGIN = {"w8a8": 10.0, "w8": 3.0, "w4a8": 10.0, "int4": 3.0, "int4b32": 3.0, "nl4": 3.0}
INT_EQUAL_FRACTION = 0.99
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"}

GOOD = ("artifact", "clear error")
OUTCOMES = ("artifact", "mismatch", "broken artifact", "clear error", "internal error", "other", "skipped")


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    folder: str
    name: str
    model: Path | None  # None: skipped (see `skip`)
    datasets: list[Path] = field(default_factory=list)  # test_data_set_* folders
    skip: str | None = None

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.name}"


def discover(folders=FOLDERS, data_root: Path = OUT / "data", torchvision_root: Path = OUT / TORCHVISION) -> list[Case]:
    """Every case of the named folders, sorted by folder then name."""
    cases: list[Case] = []
    for folder in folders:
        if folder == "node":
            root = generate_node_cases(data_root / "node")
            cases += _case_dirs("node", root)
        elif folder in ("pytorch-converted", "pytorch-operator", "simple"):
            cases += _case_dirs(folder, ONNX_DATA / folder)
        elif folder == "light":
            cases += _light_cases(data_root / "light")
        elif folder == "real":
            for entry in sorted((ONNX_DATA / "real").iterdir()) if (ONNX_DATA / "real").is_dir() else ():
                info = json.loads((entry / "data.json").read_text()) if (entry / "data.json").is_file() else {}
                cases.append(Case("real", entry.name, None, skip=f"no model shipped (data.json names {info.get('url', '?')}, "
                                                                   "run under light/)"))
        elif folder == TORCHVISION:
            cases += _case_dirs(TORCHVISION, torchvision_root)
        else:
            raise SystemExit(f"unknown folder {folder!r}; known: {', '.join(FOLDERS + (TORCHVISION,))}")
    return cases


def _case_dirs(folder: str, root: Path) -> list[Case]:
    cases = []
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if not entry.is_dir():
            continue
        datasets = sorted(entry.glob("test_data_set_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        export = entry / "export.json"  # torchvision exports: the exporter's own failure is no qcompile case
        if export.is_file() and not json.loads(export.read_text()).get("ok"):
            error = json.loads(export.read_text()).get("error", "?")
            cases.append(Case(folder, entry.name, None, skip=f"export failed: {error}"))
        elif not (entry / "model.onnx").is_file():
            cases.append(Case(folder, entry.name, None, skip="no model.onnx"))
        elif not datasets:
            cases.append(Case(folder, entry.name, None, skip="no test_data_set_*"))
        else:
            cases.append(Case(folder, entry.name, entry / "model.onnx", datasets))
    return cases


def generate_node_cases(root: Path) -> Path:
    """Write the node test cases (model.onnx, test_data_set_*/{input,output}_*.pb) that the onnx
    wheel no longer ships, from onnx.backend.test.case.node; cached per onnx version."""
    stamp = root / f".generated-onnx-{onnx.__version__}"
    if stamp.is_file():
        return root
    import warnings

    from onnx.backend.test.case import node as node_cases

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    for case in cases:
        folder = root / case.name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(case.model.SerializeToString())
        for index, (inputs, outputs) in enumerate(case.data_sets):
            data_dir = folder / f"test_data_set_{index}"
            data_dir.mkdir()
            for prefix, values, infos in (("input", inputs, case.model.graph.input), ("output", outputs, case.model.graph.output)):
                for j, value in enumerate(values):
                    (data_dir / f"{prefix}_{j}.pb").write_bytes(_to_proto(value, infos[j]).SerializeToString())
    stamp.write_text(f"{len(cases)} cases\n")
    return root


def _to_proto(value, info: onnx.ValueInfoProto):
    kind = info.type.WhichOneof("value")
    if kind == "map_type":
        return numpy_helper.from_dict(value, info.name)
    if kind == "sequence_type":
        return numpy_helper.from_list(value, info.name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, info.name)
    if isinstance(value, onnx.TensorProto):
        return value
    return numpy_helper.from_array(value, info.name)


def _light_cases(root: Path) -> list[Case]:
    """light/light_NAME.onnx: inputs are the ONNX runner's deterministic ramp (its
    generate_dummy_data(random=False)), which light_NAME_output_*.pb were computed on."""
    source = ONNX_DATA / "light"
    cases = []
    for model_path in sorted(source.glob("light_*.onnx")) if source.is_dir() else ():
        name = model_path.stem[len("light_"):]
        data_dir = root / name / "test_data_set_0"
        if not data_dir.is_dir():
            model = onnx.load(str(model_path), load_external_data=False)
            initializers = {init.name for init in model.graph.initializer}
            data_dir.mkdir(parents=True)
            inputs = [value for value in model.graph.input if value.name not in initializers]
            for j, value in enumerate(inputs):
                shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim)
                count = int(np.prod(shape))
                ramp = (np.arange(count).reshape(shape) / count).astype(np.float32)
                (data_dir / f"input_{j}.pb").write_bytes(numpy_helper.from_array(ramp, value.name).SerializeToString())
            for j, _ in enumerate(model.graph.output):
                expected = source / f"{model_path.stem}_output_{j}.pb"
                if expected.is_file():
                    shutil.copy(expected, data_dir / f"output_{j}.pb")
        cases.append(Case("light", name, model_path, [data_dir]))
    return cases


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class CaseData:
    """A case's test data, read against its model."""

    inputs: list[dict]  # per data set: graph input name -> value (arrays; lists/dicts/None for non-tensors)
    expected: list[list]  # per data set: expected outputs in graph output order (may be shorter)
    input_kinds: dict  # graph input name -> "tensor" | "sequence" | "map" | "optional" | ...
    output_names: list[str]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (IR < 4 lists every initializer as an input)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def read_case_data(case: Case, model: onnx.ModelProto) -> CaseData:
    inputs_info = graph_inputs(model)
    kinds = {value.name: value.type.WhichOneof("value") or "undefined" for value in inputs_info}
    kinds = {name: kind.replace("_type", "") for name, kind in kinds.items()}
    inputs, expected = [], []
    for data_dir in case.datasets:
        feed = {}
        for j, info in enumerate(inputs_info):
            path = data_dir / f"input_{j}.pb"
            if path.is_file():
                feed[info.name] = _read_value(path, info)
        inputs.append(feed)
        outputs = []
        for j, info in enumerate(model.graph.output):
            path = data_dir / f"output_{j}.pb"
            if not path.is_file():
                break
            outputs.append(_read_value(path, info))
        expected.append(outputs)
    return CaseData(inputs, expected, kinds, [value.name for value in model.graph.output])


def _read_value(path: Path, info: onnx.ValueInfoProto):
    kind = info.type.WhichOneof("value")
    data = path.read_bytes()
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def write_npz(path: Path, arrays: dict) -> None:
    """np.savez without its keyword clash (an input may be called `file`) and without pickles."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def _fixed_width(value: np.ndarray) -> np.ndarray:
    """A string tensor (numpy objects) as fixed-width bytes, or unicode where it is not ASCII."""
    try:
        return value.astype(np.bytes_)
    except UnicodeEncodeError:
        return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v), otypes=[str])(value)


def write_calibration(data: CaseData, directory: Path) -> Path:
    """The test inputs as calibration data: one sample per data set (a leading sample axis), in one
    .npz when the data sets' shapes agree, else one .npz per data set in a folder. Non-tensor
    inputs are left out; string tensors become fixed-width bytes (an .npz holds no objects)."""
    feeds = []
    for feed in data.inputs:
        tensors = {}
        for name, value in feed.items():
            if data.input_kinds.get(name) != "tensor" or not isinstance(value, np.ndarray):
                continue
            tensors[name] = _fixed_width(value) if value.dtype == object else value
        feeds.append(tensors)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {tuple(sorted((n, a.shape, a.dtype.str) for n, a in feed.items())) for feed in feeds}
    if len(shapes) == 1:
        path = directory / "calib.npz"
        write_npz(path, {name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]})
        return path
    folder = directory / "calib"
    folder.mkdir(exist_ok=True)
    for index, feed in enumerate(feeds):
        write_npz(folder / f"set_{index:03d}.npz", {name: np.expand_dims(a, 0) for name, a in feed.items()})
    return folder


# ---------------------------------------------------------------------------------------------
# Comparing outputs


def compare_output(reference, actual, fmt: str, min_sqnr: float | None = None) -> dict:
    """One output, all samples: {"kind", "ok", figures...}. reference/actual: lists of per-sample
    values; min_sqnr: the SQNR floor (default MIN_SQNR[fmt])."""
    pairs = list(zip(reference, actual))
    if not all(isinstance(r, np.ndarray) for r, _ in pairs):
        same = all(_same_nontensor(r, a) for r, a in pairs)
        return {"kind": "non-tensor", "ok": same}
    for r, a in pairs:
        a = np.asarray(a)
        if r.shape != a.shape:
            return {"kind": "shape", "ok": False, "why": f"shape {a.shape}, float gives {r.shape}"}
    kind = pairs[0][0].dtype.kind if pairs else "f"
    float_like = kind in "fc" or pairs[0][0].dtype.name in ("bfloat16", "float16") or "float" in pairs[0][0].dtype.name
    if float_like:
        signal_energy = error_energy = 0.0
        max_abs = max_err = 0.0
        nonfinite = 0
        for r, a in pairs:
            r = np.asarray(r).astype(np.float64)
            a = np.asarray(a).astype(np.float64)
            finite = np.isfinite(r)
            nonfinite += int(np.count_nonzero(finite & ~np.isfinite(a)))
            both = finite & np.isfinite(a)
            diff = (r - a)[both]
            signal_energy += float(np.sum(r[finite] ** 2))
            error_energy += float(np.sum(diff ** 2))
            if finite.any():
                max_abs = max(max_abs, float(np.max(np.abs(r[finite]))))
            if diff.size:
                max_err = max(max_err, float(np.max(np.abs(diff))))
        if error_energy == 0.0:
            sqnr = math.inf
        elif signal_energy == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(signal_energy / error_energy)
        close = max_err <= 1e-5 * max_abs + 1e-7  # float rounding: a model with nothing quantized
        ok = nonfinite == 0 and (close or sqnr >= (MIN_SQNR[fmt] if min_sqnr is None else min_sqnr))
        return {"kind": "float", "ok": ok, "sqnr_db": sqnr, "max_abs_err": max_err, "max_abs": max_abs,
                "nonfinite": nonfinite}
    total = equal = 0
    for r, a in pairs:
        total += r.size
        equal += int(np.count_nonzero(r == np.asarray(a)))
    fraction = equal / total if total else 1.0
    return {"kind": "exact", "ok": fraction >= INT_EQUAL_FRACTION, "equal_fraction": fraction}


def _same_nontensor(reference, actual) -> bool:
    try:
        if isinstance(reference, list):
            return len(reference) == len(actual) and all(np.array_equal(r, a) for r, a in zip(reference, actual))
        return np.array_equal(reference, actual)
    except Exception:
        return False


def _ort_value(value):
    """A test value as ONNX Runtime takes it."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return value.astype(object)
    return value


# ---------------------------------------------------------------------------------------------
# One case: compile, then check the artifact


def compile_command(model: Path, calib: Path, output: Path, fmt: str) -> list[str]:
    return ["compile", str(model), "--calib", str(calib), "--verify-data", str(calib), "-o", str(output), *FORMATS[fmt]]


def qcompile_executable() -> list[str]:
    script = Path(sys.executable).parent / "qcompile"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qcompile"]


def _run_cli_forked(argv: list[str], stdout: Path, stderr: Path, timeout: float, pid_file: Path | None) -> tuple:
    """`qcompile ARGV` in a forked child: its own process group, fds 1 and 2 to files. -> (exit code
    or None, signal or None, timed out)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setpgid(0, 0)
            out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(err, 2)
            sys.argv = ["qcompile", *argv]
            from qcompile.cli import main

            try:
                main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
                if not isinstance(done.code, (int, type(None))):
                    print(done.code, file=sys.stderr)
            except BaseException:  # what the interpreter would do with an uncaught exception
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    if pid_file is not None:
        pid_file.write_text(str(pid))
    return _wait(pid, timeout)


def _run_cli_subprocess(argv: list[str], stdout: Path, stderr: Path, timeout: float, pid_file: Path | None) -> tuple:
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(qcompile_executable() + argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        if pid_file is not None:
            pid_file.write_text(str(process.pid))
        return _wait(process.pid, timeout)


def _wait(pid: int, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return None, None, True
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), False
    return os.WEXITSTATUS(status), None, False


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


PROGRESS = re.compile(r"\r|^\s*\w[\w ]*:\s+\d+%\||it/s\]|s/it\]|sample/s\]|batch/s\]")


def stderr_lines(text: str) -> list[str]:
    """stderr's lines without tqdm progress bars (drawn with carriage returns and erased) and blanks."""
    lines = []
    for line in text.splitlines():
        if PROGRESS.search(line):
            line = line.rsplit("\r", 1)[-1]
            if not line.strip() or PROGRESS.search(line):
                continue
        if line.strip():
            lines.append(line.rstrip())
    return lines


def headline(text: str) -> str:
    """The line that says what went wrong: a traceback's last line, else the `error:` / `internal
    error:` line, else the first line."""
    lines = stderr_lines(text)
    if not lines:
        return ""
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    for line in lines:
        if line.startswith(("error:", "internal error:")):
            return line
    return lines[0]


def classify_exit(code, signal_number, timed_out: bool, stderr: str) -> tuple[str, str]:
    """(outcome, why) for a compile that did not write an artifact (or None, '' for exit 0)."""
    lines = stderr_lines(stderr)
    if timed_out:
        return "other", "timeout"
    if signal_number is not None:
        return "other", f"killed by {signal.Signals(signal_number).name}"
    if code == 0:
        return None, ""
    traceback_seen = any("Traceback" in line for line in lines)
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not traceback_seen:
        return "clear error", ""
    if code == 3 and len(lines) == 1 and lines[0].startswith("internal error") and not traceback_seen:
        return "internal error", ""
    if traceback_seen:
        return "other", f"traceback (exit {code})"
    if len(lines) != 1:
        return "other", f"exit {code} with {len(lines)} stderr lines"
    return "other", f"exit {code}"


def model_facts(model: onnx.ModelProto) -> dict:
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    ops = sorted({node.op_type for node in model.graph.node})
    return {"ir_version": model.ir_version, "opset": opsets.get("ai.onnx", opsets.get("", None)),
            "domains": sorted(d for d in opsets if d != "ai.onnx"), "ops": ops,
            "initializers": len(model.graph.initializer)}


def _nondeterministic(model: onnx.ModelProto) -> bool:
    def walk(graph):
        for node in graph.node:
            if node.op_type in RANDOM_OPS or (node.op_type == "Dropout" and len(node.input) >= 3 and node.input[2]):
                return True
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH and walk(attribute.g):
                    return True
                if attribute.type == onnx.AttributeProto.GRAPHS and any(walk(g) for g in attribute.graphs):
                    return True
        return False

    return walk(model.graph) or any(walk(function) for function in model.functions)


def _save(record: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(record)))
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def run_case(case: Case, fmt: str, work: Path, result_path: Path, timeout: float, mode: str, keep: bool) -> dict:
    """Compile one case in one format and check the artifact; the record is saved after each stage
    (a crash in ONNX Runtime leaves what was known before it)."""
    record = {"case": case.key, "folder": case.folder, "name": case.name, "format": fmt, "stage": "prepare"}
    _save(record, result_path)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        model = onnx.load(str(case.model), load_external_data=False)
        record.update(model_facts(model))
        data = read_case_data(case, model)
        record["input_kinds"] = sorted(set(data.input_kinds.values()))
        record["unsupported_input"] = any(kind != "tensor" for kind in data.input_kinds.values())
        record["samples"] = len(data.inputs)
        calib = write_calibration(data, work)
    except Exception as error:
        record.update(stage="done", outcome="skipped", why=f"test data unreadable: {type(error).__name__}: {error}")
        _save(record, result_path)
        return record

    # 1. compile, before this process opens any ONNX Runtime session (forking a process with
    #    runtime threads is not safe)
    record["stage"] = "compile"
    _save(record, result_path)
    artifact = work / "artifact"
    run = _run_cli_forked if mode == "fork" else _run_cli_subprocess
    started = time.monotonic()
    code, signal_number, timed_out = run(compile_command(case.model, calib, artifact, fmt), work / "stdout.txt",
                                         work / "stderr.txt", timeout, result_path.with_suffix(".pid"))
    record["compile_s"] = round(time.monotonic() - started, 3)
    stderr = (work / "stderr.txt").read_text(errors="replace")
    record.update(exit_code=code, signal=signal_number, timed_out=timed_out, error=headline(stderr),
                  stderr_tail="\n".join(stderr.splitlines()[-15:])[-3000:])
    outcome, why = classify_exit(code, signal_number, timed_out, stderr)
    if outcome is not None:
        record.update(outcome=outcome, why=why)

    # 2. the float model in ONNX Runtime (reference, and whether it loads at all)
    record["stage"] = "float"
    _save(record, result_path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    feeds = [{name: _ort_value(value) for name, value in feed.items()} for feed in data.inputs]
    reference = None
    try:
        session = ort.InferenceSession(str(case.model), options, providers=["CPUExecutionProvider"])
        record["float_loads"] = True
        try:
            reference = [dict(zip(data.output_names, session.run(None, feed))) for feed in feeds]
            record["float_runs"] = True
        except Exception as error:
            record.update(float_runs=False, float_error=_first_line(error))
        del session
    except Exception as error:
        record.update(float_loads=False, float_runs=False, float_error=_first_line(error))
        # Would it load after onnx's own version converter? (ONNX Runtime has no kernels for
        # some opset-1..6 forms, such as the legacy `broadcast` attribute, that the converter rewrites.)
        converted = _converted(case.model)
        if converted is not None:
            try:
                session = ort.InferenceSession(converted.SerializeToString(), options, providers=["CPUExecutionProvider"])
                record["float_loads_converted"] = True
                reference = [dict(zip(data.output_names, session.run(None, feed))) for feed in feeds]
                record["float_runs_converted"] = True
                del session
            except Exception as error:
                record.setdefault("float_loads_converted", False)
                record["float_converted_error"] = _first_line(error)
    if reference is None and all(len(outputs) == len(data.output_names) for outputs in data.expected):
        reference = [dict(zip(data.output_names, outputs)) for outputs in data.expected]
        record["reference"] = "expected outputs (.pb)"
    elif reference is not None:
        record["reference"] = "float model in ONNX Runtime"

    # 3. the artifact: loads, runs, matches
    if code == 0 and outcome is None:
        record["stage"] = "artifact"
        _save(record, result_path)
        record.update(_check_artifact(artifact, feeds, reference, fmt, model, case.model))
    record["stage"] = "done"
    _save(record, result_path)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _converted(path: Path, target: int = 13) -> onnx.ModelProto | None:
    """The model converted by onnx.version_converter to `target` (or to its own opset when newer), or None."""
    try:
        model = onnx.load(str(path))
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None or opset >= target:
            return None
        return onnx.version_converter.convert_version(model, target)
    except Exception:
        return None


def rounded_weights_outputs(model_path: Path, feeds: list[dict], fmt: str) -> dict | None:
    """The float model with its Conv / Gemm / MatMul / Gather weights rounded to nearest on a
    symmetric per-output-channel grid of WEIGHT_BITS[fmt] bits, run in ONNX Runtime: the naive
    baseline of the format's weight error. -> {output: [per-sample arrays]}, or None."""
    import onnxruntime as ort

    try:
        model = onnx.load(str(model_path))
        initializers = {init.name: init for init in model.graph.initializer}
        axes: dict[str, int] = {}
        for node in model.graph.node:
            if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in initializers:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axes[node.input[1]] = {"Conv": 0, "MatMul": -1, "Gemm": 0 if trans_b else 1}[node.op_type]
            elif node.op_type == "Gather" and node.input and node.input[0] in initializers:
                axes[node.input[0]] = -1
        qmax = 2 ** (WEIGHT_BITS[fmt] - 1) - 1
        changed = 0
        for name, axis in axes.items():
            weight = numpy_helper.to_array(initializers[name])
            if weight.dtype != np.float32 or weight.ndim < 2:
                continue
            moved = np.moveaxis(weight, axis, 0)
            scale = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1) / qmax
            scale = np.where(scale > 0, scale, 1.0).reshape((-1,) + (1,) * (moved.ndim - 1))
            rounded = np.moveaxis(np.clip(np.round(moved / scale), -qmax, qmax) * scale, 0, axis).astype(np.float32)
            initializers[name].CopyFrom(numpy_helper.from_array(rounded, name))
            changed += 1
        if not changed:
            return None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        data = model.SerializeToString() if model.ByteSize() < 2**31 - 2**20 else None
        if data is None:
            return None
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        runs = [session.run(None, {k: v for k, v in feed.items() if k in wanted}) for feed in feeds]
        return {name: [run[i] for run in runs] for i, name in enumerate(names)}
    except Exception:
        return None


def _check_artifact(directory: Path, feeds: list[dict], reference, fmt: str, model: onnx.ModelProto,
                    model_path: Path) -> dict:
    from qcompile.artifact import Artifact

    found: dict = {}
    try:
        artifact = Artifact.load(directory)
        plan = (artifact.manifest.get("plan") or {}).get("tensors", [])
        found["quantized"] = len(plan) + len(((artifact.manifest.get("lut_weights") or {}).get("layers") or []))
        session = artifact.session()
    except Exception as error:
        return {"outcome": "broken artifact", "why": f"does not load: {_first_line(error)}", "artifact_loads": False}
    found["artifact_loads"] = True
    names = [output.name for output in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    try:
        results = [dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted}))) for feed in feeds]
    except Exception as error:
        return {**found, "outcome": "broken artifact", "why": f"does not run: {_first_line(error)}", "artifact_runs": False}
    found["artifact_runs"] = True
    if reference is None:
        return {**found, "outcome": "artifact", "why": "runs; no float reference to compare with"}
    if _nondeterministic(model):
        shapes_ok = all(np.shape(res.get(n)) == np.shape(ref[n]) for res, ref in zip(results, reference) for n in ref)
        return {**found, "outcome": "artifact" if shapes_ok else "mismatch", "why": "random ops: shapes compared"}
    outputs, bad = {}, []
    baseline = None
    for name in reference[0]:
        if name not in results[0]:
            bad.append(f"{name}: missing")
            continue
        expected, actual = [ref[name] for ref in reference], [res[name] for res in results]
        figures = compare_output(expected, actual, fmt)
        if not figures["ok"] and figures["kind"] == "float" and not figures["nonfinite"]:
            if baseline is None:
                baseline = rounded_weights_outputs(model_path, feeds, fmt) or {}
            if name in baseline:
                naive = compare_output(expected, baseline[name], fmt)["sqnr_db"]
                figures = compare_output(expected, actual, fmt, min(MIN_SQNR[fmt], naive - MARGIN[fmt]))
                figures["naive_sqnr_db"] = naive
        outputs[name] = figures
        if not figures["ok"]:
            bad.append(f"{name}: " + _describe(figures))
    sqnrs = [f["sqnr_db"] for f in outputs.values() if f.get("kind") == "float"]
    naive = [f["naive_sqnr_db"] for f in outputs.values() if "naive_sqnr_db" in f]
    found.update(outputs=outputs, sqnr_db=min(sqnrs) if sqnrs else None, naive_sqnr_db=min(naive) if naive else None)
    if bad:
        return {**found, "outcome": "mismatch", "why": "; ".join(bad)[:300]}
    return {**found, "outcome": "artifact"}


def _describe(figures: dict) -> str:
    if figures["kind"] == "float":
        text = f"SQNR {figures['sqnr_db']:.1f} dB"
        if "naive_sqnr_db" in figures:
            text += f" (round-to-nearest weights: {figures['naive_sqnr_db']:.1f} dB)"
        return text + (f", {figures['nonfinite']} non-finite where float is finite" if figures["nonfinite"] else "")
    if figures["kind"] == "exact":
        return f"{figures['equal_fraction']:.1%} equal"
    return figures.get("why", figures["kind"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


# ---------------------------------------------------------------------------------------------
# Many cases


def preload_for_fork() -> None:
    """Import what `qcompile compile` imports, once, before forking children."""
    import onnxruntime  # noqa: F401

    import qcompile.cli  # noqa: F401
    import qcompile.compiler  # noqa: F401
    from qcompile.artifact import Artifact  # noqa: F401
    try:
        import qcompile.lut.functions  # noqa: F401  (SymPy)
    except Exception:
        pass


def run_all(cases: list[Case], formats: list[str], out: Path, jobs: int = 1, timeout: float = 60.0,
            mode: str = "fork", keep: bool = False, progress=print) -> list[dict]:
    """Every case in every format (see run_pairs), in format then case order."""
    return run_pairs([(case, fmt) for fmt in formats for case in cases], out, jobs, timeout, mode, keep, progress)


def run_pairs(pairs: list[tuple[Case, str]], out: Path, jobs: int = 1, timeout: float = 60.0, mode: str = "fork",
              keep: bool = False, progress=print) -> list[dict]:
    """Each (case, format), `jobs` at a time, each in a forked runner process (so one that crashes
    or hangs takes nothing else down). Returns the records in the order given."""
    if mode == "fork":
        preload_for_fork()
    records: dict[tuple, dict] = {}
    tasks = []
    for case, fmt in pairs:
        if case.model is None:
            records[(case.key, fmt)] = {"case": case.key, "folder": case.folder, "name": case.name, "format": fmt,
                                        "outcome": "skipped", "why": case.skip}
        else:
            tasks.append((case, fmt))
    state = out / "state"
    state.mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple] = {}
    pending = collections.deque(tasks)
    done_count = 0
    limit = 2 * timeout + 120  # compile, then float and artifact runs
    while pending or running:
        while pending and len(running) < jobs:
            case, fmt = pending.popleft()
            slug = re.sub(r"[^\w.-]", "_", f"{fmt}__{case.folder}__{case.name}")
            result_path = state / f"{slug}.json"
            work = out / "work" / slug
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.setpgid(0, 0)
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)  # ONNX Runtime's own warnings while checking artifacts
                    run_case(case, fmt, work, result_path, timeout, mode, keep)
                except BaseException:
                    code = 1
                    result_path.with_suffix(".err").write_text(traceback.format_exc())
                finally:
                    os._exit(code)
            running[pid] = (case, fmt, result_path, work, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for child, (case, fmt, result_path, work, started) in list(running.items()):
                if now - started > limit:
                    _kill_group(child)
                    compile_pid = result_path.with_suffix(".pid")
                    if compile_pid.is_file():
                        _kill_group(int(compile_pid.read_text()))
            time.sleep(0.02)
            continue
        if pid not in running:
            continue
        case, fmt, result_path, work, started = running.pop(pid)
        record = _finish(case, fmt, result_path, status, time.monotonic() - started, limit)
        records[(case.key, fmt)] = record
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        done_count += 1
        if progress:
            progress(f"[{done_count}/{len(tasks)}] {fmt:8} {case.key:60.60} {record['outcome']:15} "
                     f"{_short(record)}")
    return [records[(case.key, fmt)] for case, fmt in pairs]


def _finish(case: Case, fmt: str, result_path: Path, status: int, seconds: float, limit: float) -> dict:
    try:
        record = json.loads(result_path.read_text())
    except (OSError, ValueError):
        record = {"case": case.key, "folder": case.folder, "name": case.name, "format": fmt, "stage": "start"}
    failure = result_path.with_suffix(".err")
    if failure.is_file():
        record["harness_traceback"] = failure.read_text()[-3000:]
    for leftover in (result_path, result_path.with_suffix(".pid"), result_path.with_suffix(".tmp"), failure):
        leftover.unlink(missing_ok=True)
    if record.get("stage") != "done":
        how = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"exit {os.WEXITSTATUS(status)}")
        if seconds > limit:
            how = f"runner timeout after {seconds:.0f} s"
        stage = record.get("stage")
        if stage in ("float", "artifact") and record.get("outcome") is None:
            # the compile succeeded; ONNX Runtime crashed on the float model or on the artifact
            record.update(outcome="broken artifact" if stage == "artifact" else "other",
                          why=f"{'artifact' if stage == 'artifact' else 'float model'} check crashed ({how})")
        elif record.get("outcome") is None:
            record.update(outcome="other", why=f"harness failed in stage {stage} ({how})")
        record["stage"] = "done"
    return record


def _short(record: dict) -> str:
    if record["outcome"] == "artifact":
        sqnr = record.get("sqnr_db")
        naive = record.get("naive_sqnr_db")
        naive = f" (round-to-nearest weights {naive:.1f} dB)" if isinstance(naive, float) else ""
        return (f"SQNR {sqnr:.1f} dB" if isinstance(sqnr, float) else str(sqnr or "")) + naive
    return (record.get("why") or "") + (" | " if record.get("why") and record.get("error") else "") + (record.get("error") or "")[:160]


# ---------------------------------------------------------------------------------------------
# Reports


def opset_bucket(record: dict) -> str:
    opset = record.get("opset")
    if not isinstance(opset, int):
        return "no ai.onnx" if record.get("ir_version") else "?"
    return "<7" if opset < 7 else ("7-21" if opset <= 21 else ">21")


def root_cause(record: dict) -> str:
    """A grouping key for a failure: its headline with names, numbers and shapes blanked."""
    line = record.get("error") or ""
    if record["outcome"] in ("broken artifact", "mismatch"):
        line = record.get("why") or ""
        if record["outcome"] == "mismatch":
            return "mismatch: " + ("non-finite outputs" if "non-finite" in line else
                                   "integer outputs differ" if "equal" in line else
                                   "shape differs" if "shape" in line else
                                   "missing output" if "missing" in line else "SQNR below threshold")
    elif record["outcome"] == "other" and record.get("why") in ("timeout",) or str(record.get("why", "")).startswith(("killed", "harness", "float model")):
        return f"other: {re.sub(r'[0-9]+', 'N', record['why'])}"
    prefix = record["outcome"]
    if record["outcome"] == "other" and record.get("why"):
        prefix = f"other ({re.sub(r'[0-9]+', 'N', record['why'])})"
    line = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", line)
    line = re.sub(r"(/[\w.+-]+)+", "<path>", line)
    line = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", line)
    line = re.sub(r"\([^()]{40,}\)", "(…)", line)
    return f"{prefix}: {line[:200]}"


def tally(records: list[dict], by: str = "folder") -> dict:
    table: dict = collections.OrderedDict()
    for record in records:
        key = (record[by] if by != "opset" else opset_bucket(record), record["format"])
        row = table.setdefault(key, collections.Counter())
        row[record["outcome"]] += 1
        row["cases"] += 1
        if record.get("unsupported_input"):
            row["unsupported input type"] += 1
        if record.get("float_loads") is False and not record.get("float_loads_converted"):
            row["float does not load"] += 1
        if record["outcome"] == "clear error" and float_runs(record):
            row["clear error, float runs"] += 1
    return table


def float_runs(record: dict) -> bool:
    """The float model runs in ONNX Runtime on the test inputs, as given or after onnx's version converter."""
    return bool(record.get("float_runs") or record.get("float_runs_converted"))


def groups(records: list[dict], outcomes=("other", "internal error", "broken artifact", "mismatch")) -> list:
    found: dict = {}
    for record in records:
        if record["outcome"] in outcomes:
            found.setdefault(root_cause(record), []).append(record)
    return sorted(found.items(), key=lambda item: (-len(item[1]), item[0]))


def render(records: list[dict], seconds: float | None = None) -> str:
    columns = list(OUTCOMES) + ["unsupported input type", "float does not load", "clear error, float runs"]
    lines = ["# qcompile corpus", ""]
    if seconds is not None:
        lines += [f"{len(records)} runs in {seconds:.0f} s.", ""]
    for title, by in (("By folder", "folder"), ("By opset (default domain)", "opset")):
        lines += [f"## {title}", "", "| " + " | ".join([by, "format", "cases"] + columns) + " |",
                  "|" + "---|" * (len(columns) + 3)]
        for (key, fmt), row in tally(records, by).items():
            lines.append("| " + " | ".join([str(key), fmt, str(row["cases"])] + [str(row[c]) for c in columns]) + " |")
        lines.append("")
    bad_float = [r for r in records if r.get("float_loads") and r["outcome"] == "broken artifact"]
    lines += [f"Artifacts that do not load or run although the float model loads in ONNX Runtime: {len(bad_float)}", ""]
    lines += ["## Failures by root cause", ""]
    for cause, members in groups(records):
        examples = ", ".join(f"{r['case']} [{r['format']}]" for r in members[:3])
        lines.append(f"* **{len(members)}** × `{cause}` — e.g. {examples}")
        first = members[0]
        detail = first.get("error") if first["outcome"] not in ("mismatch", "broken artifact") else first.get("why")
        if detail:
            lines.append(f"    * {first['case']}: `{detail[:300]}`")
    refused = [r for r in records if r["outcome"] == "clear error" and float_runs(r)]
    lines += ["", "## Clear errors on models whose float version runs in ONNX Runtime (refusals to review)", ""]
    for cause, members in groups(refused, outcomes=("clear error",)):
        examples = ", ".join(f"{r['case']} [{r['format']}]" for r in members[:3])
        lines.append(f"* **{len(members)}** × `{cause}` — e.g. {examples}")
        lines.append(f"    * {members[0]['case']}: `{(members[0].get('error') or '')[:300]}`")
    sqnr = [r for r in records if r["outcome"] in ("artifact", "mismatch") and isinstance(r.get("sqnr_db"), float)
            and r.get("quantized")]
    if sqnr:
        lines += ["", "## Output SQNR of artifacts that quantized something (dB, lowest float output)", "",
                  "| case | format | quantized tensors | SQNR | round-to-nearest weights SQNR |", "|---|---|---|---|---|"]
        for r in sorted(sqnr, key=lambda r: r["sqnr_db"])[:80]:
            naive = r.get("naive_sqnr_db")
            naive = f"{naive:.1f}" if isinstance(naive, float) else ""
            lines.append(f"| {r['case']} | {r['format']} | {r['quantized']} | {r['sqnr_db']:.1f} | {naive} |")
    return "\n".join(lines) + "\n"


def print_tally(records: list[dict]) -> None:
    columns = [("artifact", "ok"), ("mismatch", "mism"), ("broken artifact", "broken"), ("clear error", "clear"),
               ("internal error", "internal"), ("other", "other"), ("skipped", "skip"),
               ("unsupported input type", "unsup-in"), ("float does not load", "no-float"),
               ("clear error, float runs", "refused")]
    for by in ("folder", "opset"):
        print(f"\n{by:<20} {'format':<8} {'cases':>6} " + " ".join(f"{short:>8}" for _, short in columns))
        for (key, fmt), row in tally(records, by).items():
            print(f"{str(key):<20} {fmt:<8} {row['cases']:>6} " + " ".join(f"{row[c]:>8}" for c, _ in columns))
    print("\nfailures by root cause (count, cause, examples):")
    for cause, members in groups(records):
        print(f"  {len(members):>4}  {cause[:150]}")
        print(f"        e.g. {', '.join(r['case'] + ' [' + r['format'] + ']' for r in members[:2])}")
    refused = [r for r in records if r["outcome"] == "clear error" and float_runs(r)]
    print("\nclear errors on models whose float version runs in ONNX Runtime (review: refusals):")
    for cause, members in groups(refused, outcomes=("clear error",)):
        print(f"  {len(members):>4}  {cause[:150]}")
        print(f"        e.g. {', '.join(r['case'] + ' [' + r['format'] + ']' for r in members[:2])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", default=",".join(FOLDERS), help=f"comma-separated, of {', '.join(FOLDERS)}")
    parser.add_argument("--formats", default="w8a8", help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--match", help="only cases whose FOLDER/NAME matches this regular expression")
    parser.add_argument("--cases", help="only these FOLDER/NAME cases (comma-separated)")
    parser.add_argument("--pairs", help="only these FOLDER/NAME@FORMAT runs (comma-separated; overrides --formats)")
    parser.add_argument("--limit", type=int, help="at most this many cases per folder")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per compile")
    parser.add_argument("--exec", dest="mode", choices=("fork", "subprocess"), default="fork",
                        help="run `qcompile compile` in a forked child (default) or as the installed executable")
    parser.add_argument("--torchvision", action="store_true",
                        help="also export torchvision architectures (legacy exporter at opset 11/13, dynamo at 17/18) "
                             "and compile them")
    parser.add_argument("--archs", help="torchvision architectures (default: corpus_torchvision.DEFAULT_ARCHS)")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep each case's calibration data and artifact")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    folders = [f for f in args.folders.split(",") if f]
    if args.torchvision and TORCHVISION not in folders:
        folders.append(TORCHVISION)
    pairs = [item.rsplit("@", 1) for item in args.pairs.split(",")] if args.pairs else None
    if pairs:
        args.cases = ",".join(dict.fromkeys(case for case, _ in pairs))
        formats = list(dict.fromkeys(fmt for _, fmt in pairs))
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    if args.cases:
        folders = [f for f in FOLDERS + (TORCHVISION,) if any(c.startswith(f + "/") for c in args.cases.split(","))]
    if TORCHVISION in folders:
        from corpus_torchvision import export_all  # benchmarks/ is on sys.path when run as a script

        archs = args.archs.split(",") if args.archs else None
        if args.cases and not archs:
            archs = sorted({c.split("/")[1].rsplit("_", 1)[0] for c in args.cases.split(",") if c.startswith(TORCHVISION + "/")})
        export_all(OUT / TORCHVISION, archs, progress=None if args.quiet else print)
    cases = discover(folders)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.key in wanted]
        missing = wanted - {c.key for c in cases}
        if missing:
            parser.error(f"no such cases: {', '.join(sorted(missing))}")
    if args.match:
        cases = [c for c in cases if re.search(args.match, c.key)]
    if args.limit:
        per_folder = collections.Counter()
        kept = []
        for case in cases:
            per_folder[case.folder] += 1
            if per_folder[case.folder] <= args.limit:
                kept.append(case)
        cases = kept
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    by_key = {case.key: case for case in cases}
    todo = [(by_key[case], fmt) for case, fmt in pairs] if pairs else [(case, fmt) for fmt in formats for case in cases]
    records = run_pairs(todo, args.out, jobs=args.jobs, timeout=args.timeout, mode=args.mode, keep=args.keep,
                        progress=None if args.quiet else print)
    seconds = time.monotonic() - started
    (args.out / "results.json").write_text(json.dumps(_jsonable({"seconds": seconds, "formats": formats,
                                                                  "folders": folders, "records": records}), indent=1))
    (args.out / "results.md").write_text(render(records, seconds))
    if not args.quiet:
        print_tally(records)
        print(f"\n{len(records)} runs in {seconds:.0f} s; wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
