"""W8A8 on all-MiniLM-L6-v2: qcompile (mse, minmax, percentile) against ONNX Runtime's
quantize_static (QDQ, per-channel; MinMax, Percentile, Entropy) and float, in one run.

Same model, calibration sentences (Lee news corpus, background part) and held-out evaluation
sentences (Lee corpus) for every method. Each quantizer runs in its own process so its wall time
and peak memory are its own. Writes JSON and a markdown table.

    .venv/bin/python benchmarks/w8a8_minilm.py            # ~10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from timing import median_ms, model_bytes  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
LATENCY_THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--memory-samples", type=int, nargs=2, default=(64, 512),
                        help="qcompile mse peak memory is measured at these two calibration sizes")
    parser.add_argument("--out", type=Path, default=Path("build/bench/w8a8_minilm"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from qcompile import models

    model_path = args.out / "model.onnx"
    if not model_path.exists():
        models.export("all-minilm-l6-v2", model_path)
    calib = models.write_samples("all-minilm-l6-v2", "calib", max(args.calib_samples, *args.memory_samples),
                                 args.out / "calib_all.npz")
    evaluation = models.write_samples("all-minilm-l6-v2", "eval", args.eval_samples, args.out / "eval.npz")
    _check_finite_mask_copy(str(model_path), str(evaluation), str(args.out))
    calib_sets = {n: _subset(calib, n, args.out / f"calib_{n}.npz") for n in {args.calib_samples, *args.memory_samples}}

    jobs = [("float", None, args.calib_samples)]
    jobs += [(f"qcompile {m}", ("qcompile", m), args.calib_samples) for m in ("mse", "minmax", "percentile")]
    jobs += [(f"onnxruntime {m}", ("onnxruntime", m), args.calib_samples) for m in ("MinMax", "Percentile", "Entropy")]
    rows = []
    for name, method, samples in jobs:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(_in_subprocess(_run_method, name, method, str(model_path), str(calib_sets[samples]),
                                   str(evaluation), str(args.out)))
    memory = {n: _in_subprocess(_run_method, f"qcompile mse ({n} samples)", ("qcompile", "mse"), str(model_path),
                                str(calib_sets[n]), str(evaluation), str(args.out))["peak_memory_mb"]
              for n in args.memory_samples}

    result = {"model": "all-minilm-l6-v2", "calib_samples": args.calib_samples, "eval_samples": args.eval_samples,
              "sequence_length": int(np.load(evaluation)["input_ids"].shape[1]), "rows": rows,
              "qcompile_mse_peak_memory_mb_by_calib_samples": memory}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    (args.out / "results.md").write_text(table)
    print(table)


def _subset(path: Path, count: int, target: Path) -> Path:
    archive = np.load(path)
    np.savez(target, **{name: archive[name][:count] for name in archive.files})
    return target


def _in_subprocess(function, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    result = queue.get()
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _child(queue, function, args) -> None:
    try:
        queue.put(function(*args))
    except BaseException as error:  # report to the parent instead of dying silently
        queue.put(RuntimeError(f"{args[0]}: {error!r}"))


def _run_method(name: str, method, model_path: str, calib_path: str, eval_path: str, out: str) -> dict:
    start = time.perf_counter()
    if method is None:
        quantized_path = model_path
    elif method[0] == "qcompile":
        quantized_path = _qcompile(method[1], model_path, calib_path, out)
    else:
        quantized_path = _onnxruntime(method[1], model_path, calib_path, out)
    quantize_seconds = time.perf_counter() - start if method else 0.0
    peak_mb = _peak_rss_mb()
    accuracy = _accuracy(model_path, quantized_path, eval_path)
    return {
        "method": name, **accuracy, "calibration_seconds": round(quantize_seconds, 2),
        "peak_memory_mb": round(peak_mb, 1) if method else None,
        "latency_ms_batch1": round(_latency_ms(quantized_path, eval_path), 3),
        "artifact_bytes": model_bytes(quantized_path),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, restarts at exec, so a spawned
    worker does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _qcompile(method: str, model_path: str, calib_path: str, out: str) -> str:
    import qcompile

    config = qcompile.QuantConfig(weights="int8", acts="int8", calib_method=method, verify_fraction=0.0)
    artifact = qcompile.compile(model_path, config, calib=calib_path)
    folder = Path(tempfile.mkdtemp(dir=out, prefix=f"qcompile_{method}_"))
    artifact.save(folder, force=True)
    return str(folder / "model.onnx")


def _onnxruntime(method: str, model_path: str, calib_path: str, out: str) -> str:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    archive = np.load(calib_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(archive["input_ids"])))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {name: archive[name][row : row + 1] for name in archive.files}

    target = str(Path(out) / f"onnxruntime_{method}.onnx")
    quantize_static(_finite_mask_copy(model_path, out), target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=_mask_path(model_path))
    return target


def _finite_mask_copy(model_path: str, out: str) -> str:
    """The model with its attention-mask fill value float32 min replaced by -1e4. ORT's calibrators
    histogram every tensor of the quantizable op types, nodes_to_exclude or not, and Entropy cannot
    bin a range reaching float32 min. exp(-1e4) is 0 in float32, so the outputs do not change."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(model_path)
    for index, initializer in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(initializer)
        if values.dtype == np.float32 and values.size and values.max() <= np.finfo(np.float32).min / 2:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.full_like(values, -1e4), initializer.name))
    target = str(Path(out) / "model_finite_mask.onnx")
    onnx.save(model, target)
    return target


def _check_finite_mask_copy(model_path: str, eval_path: str, out: str) -> None:
    from qcompile.runtime import make_session

    feed = dict(np.load(eval_path))
    original = make_session(model_path).run(None, feed)[0]
    copy = make_session(_finite_mask_copy(model_path, out)).run(None, feed)[0]
    np.testing.assert_allclose(copy, original, atol=1e-6)


def _mask_path(model_path: str) -> list[str]:
    """Nodes from the attention-mask Where down to the Softmaxes: kept float for every ORT method,
    as qcompile keeps them."""
    import onnx

    nodes = onnx.load(model_path, load_external_data=False).graph.node
    tainted = {output for node in nodes if node.op_type == "Where" for output in node.output}
    excluded = [node.name for node in nodes if node.op_type == "Where"]
    for node in nodes:  # graph order is topological
        if node.op_type != "Where" and tainted.intersection(node.input):
            excluded.append(node.name)
            if node.op_type != "Softmax":
                tainted.update(node.output)
    return excluded


def _accuracy(float_path: str, quantized_path: str, eval_path: str) -> dict:
    """Mean cosine similarity of quantized vs float sentence embeddings, and output SQNR."""
    from qcompile.numerics import sqnr_db
    from qcompile.runtime import make_session
    from qcompile.verify import row_cosines

    archive = np.load(eval_path)
    feed = {name: archive[name] for name in archive.files}
    reference = make_session(float_path).run(None, feed)[0].astype(np.float64)
    quantized = make_session(quantized_path).run(None, feed)[0].astype(np.float64)
    return {"mean_cosine": round(float(np.mean(row_cosines(reference, quantized))), 4), "output_sqnr_db": round(sqnr_db(reference, quantized), 2)}


def _latency_ms(path: str, eval_path: str) -> float:
    from qcompile.runtime import make_session

    archive = np.load(eval_path)
    return median_ms(make_session(path, threads=LATENCY_THREADS), {name: archive[name][:1] for name in archive.files})


def _markdown(result: dict) -> str:
    rows = result["rows"]
    entropy = next(r for r in rows if r["method"] == "onnxruntime Entropy")
    ort_latency = min(r["latency_ms_batch1"] for r in rows if r["method"].startswith("onnxruntime"))
    float_latency = rows[0]["latency_ms_batch1"]
    lines = [
        f"all-MiniLM-L6-v2, W8A8, {result['calib_samples']} calibration / {result['eval_samples']} held-out sentences, "
        f"sequence length {result['sequence_length']}, latency at batch 1 with {LATENCY_THREADS} threads.",
        "",
        "| method | mean cosine | output SQNR (dB) | calibration (s) | x ORT Entropy time | peak memory (MB) "
        "| latency (ms) | x best ORT latency | x float latency | artifact (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['calibration_seconds'] / entropy['calibration_seconds']:.2f}" if r["peak_memory_mb"] else "-"
        lines.append(
            f"| {r['method']} | {r['mean_cosine']:.4f} | {r['output_sqnr_db']:.2f} | {r['calibration_seconds']:.1f} "
            f"| {ratio} | {r['peak_memory_mb'] or '-'} | {r['latency_ms_batch1']:.2f} "
            f"| {r['latency_ms_batch1'] / ort_latency:.2f} | {r['latency_ms_batch1'] / float_latency:.2f} "
            f"| {r['artifact_bytes'] / 1e6:.1f} |")
    memory = result["qcompile_mse_peak_memory_mb_by_calib_samples"]
    sizes = sorted(memory, key=int)
    lines += ["", "qcompile mse peak memory by calibration set size: "
              + ", ".join(f"{n} samples: {memory[n]} MB" for n in sizes)
              + f" (ratio {memory[sizes[-1]] / memory[sizes[0]]:.3f})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
