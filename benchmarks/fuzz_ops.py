"""Fuzz qcompile's custom-op library (LutMatMul, LutDequantize) with malformed and valid one-node models.

Every case is built from (seed, index) alone, so a worker process regenerates it from its number. A valid
case (random bits, k, blocks, rows, batch shape, empty tensors included) must run and match a NumPy
reference; a malformed one carries one to three defects (omitted or missing or extra inputs and outputs,
wrong dtypes, ranks and shapes, attributes out of range or of the wrong type, k * bits overflowing int64)
and must be refused with an error. Workers run batches of cases and print one JSON line per finished
case; a worker that dies (SIGSEGV, abort) or hangs costs only the case it was on: the driver records it
and starts a new worker at the next case.

    .venv/bin/python benchmarks/fuzz_ops.py --cases 3000 --seed 0   # ~20 s on 2 cores (minutes if workers crash)

Exit status 1 when any case crashed, hung, gave a wrong answer, was refused though valid, was accepted
though malformed, or failed outside ONNX Runtime (a fault of this script).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

os.environ.setdefault("TQDM_DISABLE", "1")

OPS = {"LutDequantize": ("packed", "table"), "LutMatMul": ("X", "packed", "table")}
OUTPUT = {"LutDequantize": "W", "LutMatMul": "Y"}
DTYPE = {"X": np.float32, "packed": np.uint8, "table": np.float32}
OTHER_DTYPES = [np.float64, np.float16, np.float32, np.int8, np.uint8, np.int32, np.int64, np.uint16, np.bool_]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
EXTREME_BITS = [0, 9, 16, 32, 64, 255, 256, -1, -4, -8, 1 << 31, (1 << 32) + 4, 1 << 40, INT64_MAX, INT64_MIN]
EXTREME_K = [0, -1, -16, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 7, 1 << 31, (1 << 32) + 16, 1 << 62, 1 << 61,
             (1 << 63) // 3]
HANG_SECONDS = 60


@dataclass
class Case:
    op: str
    bits: int
    k: int
    attrs: dict
    inputs: list                      # node input names, '' for an omitted one
    outputs: list                     # node output names, '' for an omitted one
    feeds: dict                       # graph inputs (or initializers) by name
    initializers: bool = False        # packed and table as initializers rather than graph inputs
    x_shape: tuple | None = None      # X made in the graph by ConstantOfShape (shapes numpy cannot hold)
    shape_only: bool = False          # return Shape(output): an empty output with a huge dimension
    expected: dict | None = None      # reference outputs of a valid case; None: must be refused
    defects: list = field(default_factory=list)

    def describe(self) -> str:
        shapes = ", ".join(f"{name}{'*' if self.initializers and name != 'X' else ''}={a.dtype}{list(a.shape)}"
                           for name, a in self.feeds.items())
        if self.x_shape is not None:
            shapes += f", X=ConstantOfShape{list(self.x_shape)}"
        head = f"{self.op}({', '.join(repr(i) for i in self.inputs)}) -> {self.outputs} {self.attrs} [{shapes}]"
        return head + (" | " + "; ".join(self.defects) if self.defects else " | valid")


# ------------------------------------------------------------------ generation

def reference(codes: np.ndarray, table: np.ndarray, k: int) -> np.ndarray:
    n = codes.shape[0]
    block = k // table.shape[1]
    return table[np.arange(n)[:, None], np.arange(k)[None, :] // block, codes]


def valid_case(rng: np.random.Generator) -> Case:
    from qcompile.lut import packing

    op = str(rng.choice(list(OPS)))
    bits = int(rng.integers(1, 9))
    k = int(rng.integers(1, 70)) if rng.random() < 0.6 else 16 * int(rng.integers(1, 9))  # 16s: the SIMD paths
    blocks = int(rng.choice([g for g in range(1, k + 1) if k % g == 0]))
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, 40))
    codes = rng.integers(0, 1 << bits, (n, k))
    packed = packing.pack_codes(codes, bits)
    assert np.array_equal(packing.unpack_codes(packed, bits, k), codes)
    table = rng.standard_normal((n, blocks, 1 << bits)).astype(np.float32)
    weight = reference(packing.unpack_codes(packed, bits, k), table, k)
    feeds = {"packed": packed, "table": table}
    expected = {"W": weight}
    if op == "LutMatMul":
        lead = tuple(int(rng.integers(0, 4)) if rng.random() < 0.1 else int(rng.integers(1, 5))
                     for _ in range(int(rng.integers(0, 4))))
        x = rng.standard_normal(lead + (k,)).astype(np.float32)
        feeds = {"X": x, **feeds}
        expected = {"Y": (x.astype(np.float64) @ weight.T.astype(np.float64)).astype(np.float32)}
    return Case(op, bits, k, {"bits": bits, "k": k}, list(OPS[op]), [OUTPUT[op]], feeds,
                initializers=bool(rng.random() < 0.2), expected=expected)


def _pick_input(rng, case):
    names = [name for name in OPS[case.op] if name in case.feeds]  # X may come from ConstantOfShape
    return names[int(rng.integers(0, len(names)))]


def _random_array(rng, shape, dtype):
    return np.asarray(rng.standard_normal(shape) * 10).astype(dtype)  # an array even when 0-d


# Each defect makes the case malformed on its own; a case takes at most one defect per group.
def omit_input(rng, case):
    position = int(rng.integers(0, len(case.inputs)))
    case.inputs[position] = ""
    return f"input {position} omitted"


def fewer_inputs(rng, case):
    count = int(rng.integers(0, len(case.inputs)))
    case.inputs = case.inputs[:count]
    return f"{count} inputs"


def extra_inputs(rng, case):
    case.inputs += [str(rng.choice(list(case.feeds))) for _ in range(int(rng.integers(1, 3)))]
    return f"{len(case.inputs)} inputs"


def omit_output(rng, case):
    case.outputs = [""]
    return "output omitted"


def no_outputs(rng, case):
    case.outputs = []
    return "0 outputs"


def extra_outputs(rng, case):
    case.outputs += ["", "extra"][: int(rng.integers(1, 3))] if rng.random() < 0.5 else ["extra"]
    return f"{len(case.outputs)} outputs"


def wrong_dtype(rng, case):
    name = _pick_input(rng, case)
    others = [d for d in OTHER_DTYPES if d is not DTYPE[name]]
    dtype = others[int(rng.integers(0, len(others)))]
    case.feeds[name] = case.feeds[name].astype(dtype)
    return f"{name} is {np.dtype(dtype).name}"


def wrong_rank(rng, case):
    name = _pick_input(rng, case)
    valid_rank = {"X": None, "packed": 2, "table": 3}[name]
    rank = 0 if name == "X" else int(rng.choice([r for r in range(6) if r != valid_rank]))
    shape = tuple(int(d) for d in rng.integers(0, 5, rank))
    case.feeds[name] = _random_array(rng, shape, DTYPE[name])
    return f"{name} has rank {rank}"


def packed_width(rng, case):
    needed = case.feeds["packed"].shape[1]
    width = int(rng.choice([w for w in {0, needed - 1, needed + 1, 2 * needed + 3} if w >= 0 and w != needed]))
    case.feeds["packed"] = rng.integers(0, 256, (case.feeds["packed"].shape[0], width)).astype(np.uint8)
    return f"packed has {width} bytes per row, needs {needed}"


def table_rows(rng, case):
    n = case.feeds["packed"].shape[0]
    rows = int(rng.choice([r for r in {0, n - 1, n + 1, 2 * n + 1} if r >= 0 and r != n]))
    case.feeds["table"] = _random_array(rng, (rows,) + case.feeds["table"].shape[1:], np.float32)
    return f"table has {rows} rows, packed {n}"


def table_levels(rng, case):
    levels = 1 << case.bits
    bad = int(rng.choice([v for v in {0, 1, levels - 1, levels + 1, 2 * levels, levels // 2} if v != levels]))
    shape = case.feeds["table"].shape
    case.feeds["table"] = _random_array(rng, (shape[0], shape[1], bad), np.float32)
    return f"table has {bad} levels, {case.bits} bits need {levels}"


def table_blocks(rng, case):
    # Small counts only: k may be huge after the overflow defect, and the table must stay small.
    candidates = [0] + [g for g in range(2, 70) if case.k % g] + ([case.k + 1] if case.k < 100 else [])
    blocks = int(rng.choice(candidates))
    shape = case.feeds["table"].shape
    case.feeds["table"] = _random_array(rng, (shape[0], blocks, shape[2]), np.float32)
    return f"table has {blocks} blocks, k = {case.k}"


def x_width(rng, case):
    if "X" not in case.feeds:
        return table_blocks(rng, case)
    width = int(rng.choice([w for w in {0, case.k - 1, case.k + 1, 2 * case.k} if w >= 0 and w != case.k]))
    x = case.feeds["X"]
    case.feeds["X"] = _random_array(rng, x.shape[:-1] + (width,), np.float32)
    return f"X has last dimension {width}, k = {case.k}"


def bits_out_of_range(rng, case):
    case.attrs["bits"] = int(rng.choice(EXTREME_BITS))
    return f"bits = {case.attrs['bits']}"


def k_out_of_range(rng, case):
    case.attrs["k"] = int(rng.choice(EXTREME_K + [-case.k, case.k + (1 << 62), case.k * (1 << 40)]))
    return f"k = {case.attrs['k']}"


def k_bits_overflow(rng, case):
    """k such that k * bits wraps past 2^64 to a small row width, with shapes matching the wrapped width:
    only overflow-checked arithmetic refuses it."""
    bits = int(rng.integers(3, 9))
    k = -(-(1 << 64) // bits) + int(rng.integers(0, 40))
    wrapped = k * bits - (1 << 64)
    if not 0 <= wrapped < (1 << 20) or k > INT64_MAX:
        k = (1 << 61) + int(rng.integers(1, 40))
        bits, wrapped = 8, k * 8 - (1 << 64)
    n = int(rng.integers(0, 3))
    case.bits, case.k, case.attrs = bits, k, {**case.attrs, "bits": bits, "k": k}
    case.feeds["packed"] = rng.integers(0, 256, (n, (wrapped + 7) // 8)).astype(np.uint8)
    case.feeds["table"] = _random_array(rng, (n, 1, 1 << bits), np.float32)
    if case.op == "LutMatMul":
        del case.feeds["X"]
        case.x_shape = (0, k) if rng.random() < 0.5 else (int(rng.integers(0, 3)), 0, k)
    case.shape_only = True
    return f"k * bits = {k} * {bits} overflows int64 (wraps to {wrapped})"


def attribute_type(rng, case):
    name = str(rng.choice(["bits", "k"]))
    value = case.attrs[name]
    form = str(rng.choice(["float", "ints", "string", "missing"]))
    if form == "missing":
        del case.attrs[name]
    else:
        case.attrs[name] = {"float": float(value), "ints": [value], "string": str(value)}[form]
    return f"attribute {name} {form}"


DEFECTS = {
    "attributes": [bits_out_of_range, k_out_of_range, k_bits_overflow, attribute_type],
    "shape": [packed_width, table_rows, table_levels, table_blocks, x_width],
    "rank": [wrong_rank],
    "dtype": [wrong_dtype],
    "inputs": [omit_input, fewer_inputs, extra_inputs],
    "outputs": [omit_output, no_outputs, extra_outputs],
}


def make_case(seed: int, index: int) -> Case:
    rng = np.random.default_rng([seed, index])
    case = valid_case(rng)
    if rng.random() < 0.25:
        return case
    groups = rng.choice(list(DEFECTS), size=int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])), replace=False)
    # In DEFECTS' order: the overflow defect rebuilds the shapes that the shape defects then break, which
    # need the valid ranks that the rank defect takes away, whose new arrays the dtype defect then converts.
    for group in sorted(groups, key=list(DEFECTS).index):
        defect = DEFECTS[group][int(rng.integers(0, len(DEFECTS[group])))]
        case.defects.append(defect(rng, case))
    case.expected = None
    return case


# ------------------------------------------------------------------ running one case

def build_model(case: Case) -> onnx.ModelProto:
    from qcompile.lut import DOMAIN

    def tensor_type(array):
        return helper.np_dtype_to_tensor_dtype(array.dtype)

    nodes, inits, graph_inputs = [], [], []
    for name, array in case.feeds.items():
        if case.initializers and name != "X":
            inits.append(onnx.numpy_helper.from_array(array, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, tensor_type(array), None))
    if case.x_shape is not None:
        inits.append(onnx.numpy_helper.from_array(np.array(case.x_shape, np.int64), "x_shape"))
        nodes.append(helper.make_node("ConstantOfShape", ["x_shape"], ["X"]))
    nodes.append(helper.make_node(case.op, case.inputs, case.outputs, domain=DOMAIN, **case.attrs))
    graph_outputs = []
    for name in dict.fromkeys(o for o in case.outputs if o):
        if case.shape_only:
            nodes.append(helper.make_node("Shape", [name], [name + "_shape"]))
            graph_outputs.append(helper.make_tensor_value_info(name + "_shape", TensorProto.INT64, None))
        else:
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    if not graph_outputs:  # a graph needs an output: pass one of its inputs through
        nodes.append(helper.make_node("Shape", ["x_shape" if case.x_shape is not None else next(iter(case.feeds))],
                                      ["passthrough"]))
        graph_outputs.append(helper.make_tensor_value_info("passthrough", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "fuzz", graph_inputs, graph_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def run_case(case: Case) -> tuple[str, str]:
    """(status, detail): ok, wrong, accepted, ort_error or other_error."""
    from qcompile.runtime import make_session

    try:
        session = make_session(build_model(case), use_library=True)
        feeds = {name: a for name, a in case.feeds.items() if not case.initializers or name == "X"}
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(names, feeds)))
    except Exception as error:  # noqa: BLE001 - anything but a crash is a result
        if type(error).__module__.startswith("onnxruntime."):  # Fail, InvalidArgument, InvalidGraph, ...
            return "ort_error", str(error)[:400]
        return "other_error", f"{type(error).__name__}: {str(error)[:400]}"
    if case.expected is None:
        return "accepted", ", ".join(f"{name} {np.shape(value)}" for name, value in results.items())
    for name, want in case.expected.items():
        got = results.get(name)
        if got is None or got.shape != want.shape or got.dtype != np.float32:
            return "wrong", f"{name}: got {None if got is None else (got.dtype, got.shape)}, want {want.shape}"
        tolerance = 1e-5 * np.sqrt(case.k) if name == "Y" else 0
        if not np.allclose(got, want, rtol=1e-5 if name == "Y" else 0, atol=tolerance):
            return "wrong", f"{name}: max |error| {np.max(np.abs(got - want)):.3g}"
    return "ok", ""


def worker(seed: int, start: int, stop: int, memory_gb: float) -> None:
    import resource

    # No core files; a runaway allocation fails inside the worker instead of wakening the OOM killer.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * (1 << 30)),) * 2)
    for index in range(start, stop):
        status, detail = run_case(make_case(seed, index))
        print(json.dumps({"index": index, "status": status, "detail": detail}), flush=True)


# ------------------------------------------------------------------ driver

def run_batch(seed: int, start: int, stop: int, memory_gb: float) -> dict[int, tuple[str, str]]:
    """Results of cases start..stop-1, restarting a worker after each crash or hang."""
    results = {}
    while start < stop:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed),
                   "--start", str(start), "--stop", str(stop), "--memory-gb", str(memory_gb)]
        # ONNX Runtime logs every case it refuses: a pipe could fill up and block the worker.
        log = tempfile.TemporaryFile("w+", errors="replace")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        hung = False
        while True:
            if not selector.select(timeout=HANG_SECONDS):
                hung = True
                process.kill()
                break
            line = process.stdout.readline()
            if not line:
                break
            record = json.loads(line)
            results[record["index"]] = (record["status"], record["detail"])
            start = record["index"] + 1
        selector.close()
        code = process.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
        if start < stop:  # the worker stopped on case `start`
            if hung:
                results[start] = ("hang", f"no answer in {HANG_SECONDS} s")
            else:
                # The log holds ONNX Runtime's report of every case the worker refused; keep anything else.
                plain = re.sub(r"\x1b\[[0-9;]*m", "", stderr)  # its log lines come coloured
                last = [line for line in plain.splitlines() if line.strip() and "onnxruntime:" not in line][-1:]
                name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
                results[start] = ("crash", ": ".join([name] + last))
            start += 1
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="number of cases (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=200, help="cases per worker process")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time")
    parser.add_argument("--show", type=int, default=20, help="failing cases to list per kind")
    parser.add_argument("--memory-gb", type=float, default=4, help="address-space limit of a worker (default 4)")
    parser.add_argument("--dump", help="write every case's description and result to this JSON-lines file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seed, args.start, args.stop, args.memory_gb)
        return 0

    began = time.perf_counter()
    batches = [(b, min(b + args.batch, args.cases)) for b in range(0, args.cases, args.batch)]
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for part in pool.map(lambda bounds: run_batch(args.seed, *bounds, args.memory_gb), batches):
            results.update(part)
    seconds = time.perf_counter() - began

    tally = collections.Counter()
    failures = collections.defaultdict(list)
    inert = 0
    dump = open(args.dump, "w") if args.dump else None
    for index in range(args.cases):
        status, detail = results[index]
        case = make_case(args.seed, index)
        valid = case.expected is not None
        if dump:
            dump.write(json.dumps({"index": index, "case": case.describe(), "status": status, "detail": detail}) + "\n")
        kind = "valid" if valid else "malformed"
        tally[kind, status] += 1
        if status == "ort_error" and valid:
            failures["valid but refused"].append((index, detail))
        elif status == "accepted" and not case.inputs and not case.outputs:
            inert += 1  # ONNX Runtime never creates a kernel for a node with no inputs and no outputs
        elif status not in ("ok", "ort_error"):  # crash, hang, wrong, accepted; other_error: the harness failed
            failures[status].append((index, detail))

    if dump:
        dump.close()
    columns = ["ok", "wrong", "accepted", "ort_error", "other_error", "crash", "hang"]
    print(f"{args.cases} cases, seed {args.seed}, {seconds:.0f} s")
    print(f"{'':10s}" + "".join(f"{c:>12s}" for c in ["cases"] + columns))
    for kind in ("valid", "malformed"):
        counts = [tally[kind, c] for c in columns]
        print(f"{kind:10s}{sum(counts):12d}" + "".join(f"{c:12d}" for c in counts))
    crashes = tally["valid", "crash"] + tally["malformed", "crash"]
    print(f"ran OK: {tally['valid', 'ok'] + tally['malformed', 'accepted']}, "
          f"ORT error: {tally['valid', 'ort_error'] + tally['malformed', 'ort_error']}, "
          f"other error: {tally['valid', 'other_error'] + tally['malformed', 'other_error']}, crash: {crashes}, "
          f"hang: {tally['valid', 'hang'] + tally['malformed', 'hang']}, wrong answer: {tally['valid', 'wrong']}")
    if inert:
        print(f"accepted but inert (a node with no inputs and no outputs, which ONNX Runtime never runs): {inert}")
    for kind, cases in sorted(failures.items()):
        print(f"\n{kind}: {len(cases)}")
        for index, detail in cases[: args.show]:
            print(f"  #{index} {make_case(args.seed, index).describe()}\n      {detail.splitlines()[0] if detail else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
