"""Accuracy per bit and whole-model speed of weight-only lookup-table quantization, in one run, on two
real pre-trained models: all-MiniLM-L6-v2 (sentence embeddings; metric: mean cosine to float on held-out
Lee-corpus sentences) and EfficientNet-Lite0 (ImageNet CNN; metric: top-1 agreement with float on
crops of real photos). Also output SQNR, model bytes, batch-1 latency (interleaved) and the memory a
session holds.

MiniLM also gets a task metric, as seed 003's Table 3 reports task metrics: the Spearman
correlation of its word-pair cosine similarities with human scores on WordSim-353 and SimLex-999
(gensim's test data), for the float model and every quantized one.

Methods, activations float, every constant MatMul/Gemm/Conv/Gather weight quantized (embeddings included):
* qcompile nl (PTNQ functions, per channel; pool screened, best 4 fitted, chosen per layer by output SQNR),
  qcompile table (free 2^B-entry float16 tables per channel, k-means), qcompile affine (per channel);
  each fitted to the output ("output": GPTQ codes for MatMul/Gemm, input-weighted fits for Conv) and
  to the weights alone ("weight");
* qcompile table with one table per 128 inputs, at 4 bits;
* ONNX Runtime MatMulNBits (RTN, symmetric; HQQ; GPTQ) at block 32 and 128 where they run: they
  quantize MatMul weights only (embeddings stay float; EfficientNet's convolutions too).

Not here: SmolLM2-135M perplexity. Its weights come from the Hugging Face hub, which this machine
cannot reach, and no PyPI package ships them.

    .venv/bin/python benchmarks/lut_accuracy.py      # ~30 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from timing import interleaved_ms, model_bytes

os.environ.setdefault("TQDM_DISABLE", "1")
BITS = (4, 6, 8)
THREADS = 2
LATENCY_RUNS = 1000
WORD_MODEL = "all-minilm-l6-v2"
MODELS = {"all-minilm-l6-v2": {"calib": 64, "eval": 128, "metric": "mean cosine"},
          "efficientnet-lite0": {"calib": 72, "eval": 72, "metric": "top-1 agreement"}}
FORMATS = {"nl": "qcompile nl", "table": "qcompile table", "affine": "qcompile affine"}
ORT_METHODS = (("RTN", 32), ("RTN", 128), ("HQQ", 32), ("HQQ", 128), ("GPTQ", 32), ("GPTQ", 128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("build/bench/lut_accuracy"))
    args = parser.parse_args()
    results = {"bits": BITS, "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args.out / name)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_model(name: str, out: Path) -> dict:
    import qcompile
    from qcompile import models
    from qcompile.runtime import make_session

    out.mkdir(parents=True, exist_ok=True)
    spec = MODELS[name]
    float_path = out / "model.onnx"
    if not float_path.exists():
        models.export(name, float_path)
    calib = models.write_samples(name, "calib", spec["calib"], out / "calib.npz")
    evaluation = dict(np.load(models.write_samples(name, "eval", spec["eval"], out / "eval.npz")))
    reference = make_session(str(float_path)).run(None, evaluation)[0].astype(np.float64)
    rows, paths = {}, {}

    def record(method: str, bits: int, path: Path, extra: dict | None = None):
        session = make_session(str(path), use_library=True if _uses_library(path) else None)
        output = session.run(None, evaluation)[0].astype(np.float64)
        rows.setdefault(method, {})[str(bits)] = {"metric": _metric(spec["metric"], reference, output),
                                                  "sqnr_db": _sqnr(reference, output), "bytes": model_bytes(path),
                                                  **(word_similarity(session) if name == WORD_MODEL else {}),
                                                  **(extra or {})}
        paths[f"{method}, {bits} bits"] = path
        log(f"{name} {method} {bits} bits: {rows[method][str(bits)]}")

    def compiled(folder: str, config) -> tuple[Path, dict]:
        start = time.perf_counter()
        artifact = qcompile.compile(str(float_path), config, calib=calib)
        seconds = round(time.perf_counter() - start, 1)
        artifact.save(out / folder, force=True)
        return out / folder / "model.onnx", {"compile_seconds": seconds, "quantizers": sorted(
            {layer["quantizer"] for layer in artifact.manifest["lut_weights"]["layers"]})}

    for bits in BITS:
        for weights, label in FORMATS.items():
            for fit in ("output", "weight"):
                path, extra = compiled(f"{weights}{bits}_{fit}", qcompile.QuantConfig(weights=weights, acts="none",
                                                                                      bits=bits, fit=fit))
                record(f"{label}, {fit} fit", bits, path, extra)
    path, extra = compiled("table4_block128", qcompile.QuantConfig(weights="table", acts="none", bits=4, block=128))
    record("qcompile table, block 128, output fit", 4, path, extra)
    for algorithm, block in ORT_METHODS:
        for bits in (4, 8) if algorithm == "RTN" else (4,):
            path = out / f"ort_{algorithm}{block}_{bits}.onnx"
            try:  # a method that does not quantize or load at this width is a table entry, not a crash
                _onnxruntime_nbits(float_path, path, bits, block, algorithm, calib)
                record(f"onnxruntime {algorithm} block {block}", bits, path,
                       {"quantized_matmuls": _count(path, "MatMulNBits")})
            except Exception as error:  # noqa: BLE001
                rows.setdefault(f"onnxruntime {algorithm} block {block}", {})[str(bits)] = {
                    "error": str(error).strip().splitlines()[-1][:160]}
                log(f"{name} onnxruntime {algorithm} block {block}: {rows[f'onnxruntime {algorithm} block {block}'][str(bits)]}")
    timed = {"float": float_path, **{key: paths[key] for key in (
        "qcompile nl, output fit, 4 bits", "qcompile table, output fit, 4 bits", "qcompile affine, output fit, 4 bits",
        "onnxruntime RTN block 32, 4 bits") if key in paths}}
    feed = {k: v[:1] for k, v in evaluation.items()}
    sessions = {key: make_session(str(path), threads=THREADS, use_library=True if _uses_library(path) else None)
                for key, path in timed.items()}
    latency = interleaved_ms(sessions, feed, LATENCY_RUNS)
    memory = {key: _session_megabytes(path, out / "eval.npz") for key, path in timed.items()}
    float_task = word_similarity(make_session(str(float_path))) if name == WORD_MODEL else {}
    return {"metric": spec["metric"], "float_bytes": model_bytes(float_path), "float_task": float_task,
            "calib_samples": spec["calib"], "eval_samples": spec["eval"], "rows": rows,
            "latency_ms_batch1": {k: round(v, 3) for k, v in latency.items()},
            "session_mb": memory}


def _uses_library(path: Path) -> bool:
    return any(o.domain == "qcompile" for o in onnx.load(path, load_external_data=False).opset_import)


def _session_megabytes(path: Path, samples: Path) -> str:
    """"PEAK / RESIDENT" MB: the peak resident memory of a fresh process that opens the model (through
    qcompile.runtime.make_session) and runs one sample, and what stays resident after, each minus the
    process's before opening it. Read from /proc (VmHWM, VmRSS): getrusage's ru_maxrss survives execve,
    so a child of a large benchmark process would start at its parent's peak."""
    code = ("import numpy as np; from qcompile.runtime import make_session; "
            "kb = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]); "
            "feed = {k: v[:1] for k, v in np.load(%r).items()}; "
            "peak, resident = kb('VmHWM'), kb('VmRSS'); "
            "session = make_session(%r); session.run(None, feed); "
            "print((kb('VmHWM') - peak) / 1024, (kb('VmRSS') - resident) / 1024)") % (str(samples), str(path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, resident = (float(value) for value in result.stdout.strip().splitlines()[-1].split())
    return f"{peak:.1f} / {resident:.1f}"


def word_similarity(session) -> dict:
    """Spearman correlation between the model's word-pair cosines and human scores, per benchmark."""
    from qcompile.models import sentence_encoder, text
    from qcompile.verify import row_cosines

    result = {}
    for file in text.WORD_SIMILARITY_FILES:
        first, second, scores = text.word_pairs(file)
        embed = lambda words: session.run(None, sentence_encoder.encode(words))[0].astype(np.float64)  # noqa: E731
        cosines = row_cosines(embed(first), embed(second))
        result[f"spearman_{file.split('.')[0]}"] = round(float(np.corrcoef(_ranks(cosines), _ranks(np.array(scores)))[0, 1]), 4)
    return result


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _onnxruntime_nbits(float_path: Path, path: Path, bits: int, block: int, algorithm: str, calib: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    class Reader(CalibrationDataReader):
        def __init__(self):
            samples = np.load(calib)
            self.feeds = iter([{k: samples[k][i:i + 1] for k in samples.files} for i in range(len(samples[samples.files[0]]))])

        def get_next(self):
            return next(self.feeds, None)

    if algorithm == "HQQ":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif algorithm == "GPTQ":
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block)
    else:
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(float_path), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path))


def _count(path: Path, op: str) -> int:
    return sum(node.op_type == op for node in onnx.load(path, load_external_data=False).graph.node)


def _metric(kind: str, reference: np.ndarray, output: np.ndarray) -> float:
    if kind == "top-1 agreement":
        return round(float(np.mean(reference.argmax(axis=1) == output.argmax(axis=1))), 4)
    from qcompile.verify import row_cosines

    return round(float(np.mean(row_cosines(reference, output))), 4)


def _sqnr(reference: np.ndarray, output: np.ndarray) -> float:
    from qcompile.numerics import sqnr_db

    return round(sqnr_db(reference, output), 2)


def markdown(results: dict) -> str:
    lines = []
    for name, result in results["models"].items():
        lines += [f"**{name}**: {result['metric']} with float (output SQNR dB in brackets); {result['calib_samples']} "
                  f"calibration and {result['eval_samples']} held-out samples. Float model: {result['float_bytes']} bytes.", "",
                  "| method | " + " | ".join(f"{b} bits" for b in results["bits"]) + " | bytes at 4 bits (x float) |",
                  "|---|" + "---|" * (len(results["bits"]) + 1)]
        for method, by_bits in result["rows"].items():
            cells = []
            for bits in results["bits"]:
                entry = by_bits.get(str(bits))
                cells.append("-" if entry is None else "n/a" if "error" in entry
                             else f"{entry['metric']:.4f} ({entry['sqnr_db']:.1f})")
            four = by_bits.get("4", {})
            size = f"{four['bytes']} ({four['bytes'] / result['float_bytes']:.3f})" if "bytes" in four else "-"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {size} |")
        if result["float_task"]:
            lines += ["", "Word similarity (Spearman with human scores; WordSim-353 / SimLex-999): float "
                      + " / ".join(f"{v:.4f}" for v in result["float_task"].values()), "",
                      "| method | " + " | ".join(f"{b} bits" for b in results["bits"]) + " |",
                      "|---|" + "---|" * len(results["bits"])]
            for method, by_bits in result["rows"].items():
                cells = [" / ".join(f"{by_bits[str(b)][k]:.4f}" for k in result["float_task"])
                         if "metric" in by_bits.get(str(b), {}) else "-" for b in results["bits"]]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        seconds = {method: by_bits["4"]["compile_seconds"] for method, by_bits in result["rows"].items()
                   if "compile_seconds" in by_bits.get("4", {})}
        lines += ["", "Whole compile at 4 bits (s, 2 cores): " + ", ".join(f"{k} {v}" for k, v in seconds.items()),
                  "", f"Batch-1 latency ({THREADS} threads, median of {LATENCY_RUNS} interleaved runs) and memory a session holds (MB, peak / resident):", "",
                  "| artifact | ms | x float | session MB |", "|---|---|---|---|"]
        base = result["latency_ms_batch1"]["float"]
        for key, ms in result["latency_ms_batch1"].items():
            lines.append(f"| {key} | {ms:.3f} | {ms / base:.2f} | {result['session_mb'][key]} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
