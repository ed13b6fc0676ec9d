"""Accuracy per bit of weight-only quantization (seed 003 Table 3 style), in one run, on two real
pre-trained models: all-MiniLM-L6-v2 (sentence embeddings; metric: mean cosine to float on held-out
Lee-corpus sentences) and EfficientNet-Lite0 (ImageNet CNN; metric: top-1 agreement with float on
crops of real photos). Also output SQNR, model bytes, and batch-1 latency of the 4-bit artifacts.

MiniLM also gets a task metric, as seed 003's Table 3 reports task metrics: the Spearman
correlation of its word-pair cosine similarities with human scores on WordSim-353 and SimLex-999
(gensim's test data), for the float model and every quantized one.

Methods, activations float:
* qcompile nl: PTNQ, per-channel non-linear tables, function chosen per layer by output SQNR on
  calibration data; the whole pool at 4 bits, and (to bound the run time) the best --top-functions
  of the 4-bit search at 5..8 bits;
* qcompile nl, MatMul weights only: the same, on exactly the weights ONNX Runtime quantizes
  (embeddings and convolutions stay float), searching the functions of the 4-bit pool search;
* qcompile affine: MSE-optimal per-channel affine tables, the same kernels;
* ONNX Runtime MatMulNBits (RTN, symmetric, block 32 and 128) and HQQ (block 32) where they run:
  they quantize MatMul weights only (EfficientNet's convolutions stay float).

    .venv/bin/python benchmarks/ptnq_accuracy.py      # ~60 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from timing import median_ms, model_bytes

os.environ.setdefault("TQDM_DISABLE", "1")
BITS = (4, 5, 6, 7, 8)
THREADS = 2
WORD_MODEL = "all-minilm-l6-v2"
MODELS = {"all-minilm-l6-v2": {"calib": 64, "eval": 128, "metric": "mean cosine"},
          "efficientnet-lite0": {"calib": 72, "eval": 72, "metric": "top-1 agreement"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--top-functions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("build/bench/ptnq_accuracy"))
    parser.add_argument("--reuse", action="store_true",
                        help="reuse artifacts an earlier run left in --out (their compile time is not re-measured)")
    args = parser.parse_args()
    previous = args.out / "results.json"
    results = json.loads(previous.read_text()) if args.reuse and previous.exists() else {"bits": BITS, "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args.out / name, args.top_functions, args.reuse)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_model(name: str, out: Path, top_functions: int, reuse: bool) -> dict:
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
    rows = {}

    def record(method: str, bits: int, path: Path, extra: dict | None = None, use_library: bool | None = None):
        session = make_session(str(path), use_library=use_library)
        output = session.run(None, evaluation)[0].astype(np.float64)
        rows.setdefault(method, {})[str(bits)] = {"metric": _metric(spec["metric"], reference, output),
                                                  "sqnr_db": _sqnr(reference, output), "bytes": model_bytes(path),
                                                  **(word_similarity(session) if name == WORD_MODEL else {}),
                                                  **(extra or {})}
        log(f"{name} {method} {bits} bits: {rows[method][str(bits)]}")

    def compiled(folder: str, config) -> tuple[Path, dict, float | None]:
        """An artifact's model path, manifest and compile seconds (None when reused from an earlier run)."""
        target = out / folder
        if reuse and (target / "manifest.json").exists():
            return target / "model.onnx", json.loads((target / "manifest.json").read_text()), None
        start = time.perf_counter()
        artifact = qcompile.compile(str(float_path), config, calib=calib)
        seconds = time.perf_counter() - start
        artifact.save(target, force=True)
        return target / "model.onnx", artifact.manifest, round(seconds, 1)

    functions = None
    for bits in BITS:
        path, manifest, seconds = compiled(f"nl{bits}", qcompile.QuantConfig(weights="nl", acts="none", bits=bits,
                                                                             functions=functions))
        summary = manifest["lut_weights"]
        used = sorted({layer["quantizer"] for layer in summary["layers"]})
        record("qcompile nl", bits, path, {"compile_seconds": seconds, "functions_used": used,
                                           "functions_searched": len(summary["tried"][0]["per_function"])})
        if functions is None:  # the whole pool ran at 4 bits: later widths search its best functions only
            ranked = sorted(summary["tried"][0]["per_function"], key=lambda f: -f["sqnr_db"])
            functions = tuple(sorted({f["function"] for f in ranked[:top_functions]} | set(used)))
        if _count(float_path, "MatMul"):  # like for like with ONNX Runtime, which quantizes MatMul weights only
            path, _, _ = compiled(f"nl{bits}_matmul", qcompile.QuantConfig(weights="nl", acts="none", bits=bits,
                                                                           functions=functions, lut_ops=("MatMul",)))
            record("qcompile nl, MatMul weights only", bits, path)
        path, _, _ = compiled(f"affine{bits}", qcompile.QuantConfig(weights="affine", acts="none", bits=bits))
        record("qcompile affine per-channel", bits, path)
        for label, block, algorithm in (("RTN block 32", 32, "rtn"), ("RTN block 128", 128, "rtn"), ("HQQ block 32", 32, "hqq")):
            path = out / f"ort_{algorithm}{block}_{bits}.onnx"
            try:  # a method that does not quantize or load at this width is a table entry, not a crash
                if not (reuse and path.exists()):
                    _onnxruntime_nbits(float_path, path, bits, block, algorithm)
                record(f"onnxruntime {label}", bits, path, {"quantized_matmuls": _count(path, "MatMulNBits")})
            except Exception as error:  # noqa: BLE001
                rows.setdefault(f"onnxruntime {label}", {})[str(bits)] = {"error": str(error).splitlines()[0][:120]}
    latency_feed = {k: v[:1] for k, v in evaluation.items()}
    latency = {"float": median_ms(make_session(str(float_path), threads=THREADS), latency_feed),
               "qcompile nl4, library": median_ms(make_session(str(out / "nl4" / "model.onnx"), threads=THREADS,
                                                               use_library=True), latency_feed),
               "qcompile nl4, fallback": median_ms(make_session(str(out / "nl4" / "model.onnx"), threads=THREADS,
                                                                use_library=False), latency_feed)}
    if (out / "ort_rtn32_4.onnx").exists():
        latency["onnxruntime int4 RTN block 32"] = median_ms(make_session(str(out / "ort_rtn32_4.onnx"), threads=THREADS),
                                                             latency_feed)
    float_task = word_similarity(make_session(str(float_path))) if name == WORD_MODEL else {}
    return {"metric": spec["metric"], "float_bytes": model_bytes(float_path), "float_task": float_task,
            "calib_samples": spec["calib"],
            "eval_samples": spec["eval"], "rows": rows, "latency_ms_batch1": {k: round(v, 3) for k, v in latency.items()}}


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


def _onnxruntime_nbits(float_path: Path, path: Path, bits: int, block: int, algorithm: str) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    config = (nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if algorithm == "hqq"
              else nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits))
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
        nl4 = result["rows"]["qcompile nl"]["4"]
        lines += ["", f"4-bit pool search: {nl4['functions_searched']} functions in {nl4['compile_seconds']} s "
                      f"(whole compile, 2 worker processes); functions used: {', '.join(nl4['functions_used'])}.",
                  "Batch-1 latency (ms, 2 threads): " + ", ".join(f"{k} {v}" for k, v in result["latency_ms_batch1"].items()),
                  ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
