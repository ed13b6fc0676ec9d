"""Whole-model batch-1 speed of lookup-table weights on all-MiniLM-L6-v2 (64 tokens per sentence), against
float and ONNX Runtime's MatMulNBits, in one run: latency (interleaved), output SQNR and mean cosine
against float on held-out Lee-corpus sentences, file bytes and the memory a session holds.

Methods (every MatMul weight quantized at 4 bits; qcompile also stores the embeddings as tables):
* qcompile table4 / nl4, output fit, activations float (LutMatMul, qcompile's library);
* the same with --acts dynamic: each MatMul's input quantized to uint8 per tensor at run time and
  multiplied with the table rounded to int8 per channel (ONNX Runtime's DynamicQuantizeMatMul);
* ONNX Runtime MatMulNBits, RTN symmetric and HQQ, block 32, at accuracy_level 0 (float compute, its
  default) and 4 (int8 compute: inputs quantized per block of 32 at run time).

    .venv/bin/python benchmarks/lut_whole_model.py      # ~8 minutes on 2 cores
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

from lut_accuracy import _onnxruntime_nbits, _session_megabytes, _sqnr, _uses_library
from timing import interleaved_ms, model_bytes

os.environ.setdefault("TQDM_DISABLE", "1")
MODEL, CALIB, EVAL, THREADS = "all-minilm-l6-v2", 64, 128, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/lut_whole_model"))
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    import qcompile
    from qcompile import models
    from qcompile.runtime import make_session
    from qcompile.verify import row_cosines

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    float_path = out / "model.onnx"
    if not float_path.exists():
        models.export(MODEL, float_path)
    calib = models.write_samples(MODEL, "calib", CALIB, out / "calib.npz")
    evaluation = dict(np.load(models.write_samples(MODEL, "eval", EVAL, out / "eval.npz")))
    paths, seconds = {"float": float_path}, {}
    for weights in ("table", "nl"):
        for acts in ("none", "dynamic"):
            start = time.perf_counter()
            artifact = qcompile.compile(str(float_path), qcompile.QuantConfig(weights=weights, bits=4, acts=acts),
                                        calib=calib)
            label = f"qcompile {weights}4, acts {acts}"
            seconds[label] = round(time.perf_counter() - start, 1)
            artifact.save(out / f"{weights}4_{acts}", force=True)
            paths[label] = out / f"{weights}4_{acts}" / "model.onnx"
            print(f"{label}: {seconds[label]} s", file=sys.stderr, flush=True)
    for algorithm in ("RTN", "HQQ"):
        plain = out / f"ort_{algorithm}32.onnx"
        _onnxruntime_nbits(float_path, plain, 4, 32, algorithm, calib)
        paths[f"onnxruntime {algorithm} block 32, accuracy_level 0"] = plain
        paths[f"onnxruntime {algorithm} block 32, accuracy_level 4"] = _with_accuracy_level(plain, 4)

    # Sentence by sentence, as deployed at batch 1: a dynamic range is then one sentence's.
    feeds = [{name: values[i:i + 1] for name, values in evaluation.items()} for i in range(EVAL)]
    sessions = {label: make_session(str(path), threads=THREADS, use_library=True if _uses_library(path) else None)
                for label, path in paths.items()}
    outputs = {label: np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float64)
               for label, session in sessions.items()}
    reference, rows = outputs["float"], {}
    for label, path in paths.items():
        output = outputs[label]
        rows[label] = {"sqnr_db": _sqnr(reference, output), "cosine": round(float(np.mean(row_cosines(reference, output))), 4),
                       "bytes": model_bytes(path), "session_mb": _session_megabytes(path, out / "eval.npz"),
                       "compile_seconds": seconds.get(label)}
    for label, latency in interleaved_ms(sessions, feeds[0], args.runs).items():
        rows[label]["latency_ms"] = round(latency, 3)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = _markdown(rows, args.runs)
    (out / "results.md").write_text(table)
    print(table)


def _with_accuracy_level(path: Path, level: int) -> Path:
    """A copy of a MatMulNBits model whose nodes compute at another accuracy_level."""
    model = onnx.load(path)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in [a for a in node.attribute if a.name == "accuracy_level"]:
                node.attribute.remove(attribute)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    copy = path.with_name(f"{path.stem}_level{level}.onnx")
    onnx.save(model, copy)
    return copy


def _markdown(rows: dict, runs: int) -> str:
    float_row, nbits = rows["float"], rows["onnxruntime RTN block 32, accuracy_level 0"]
    fastest_nbits = min(r["latency_ms"] for label, r in rows.items() if label.startswith("onnxruntime"))
    lines = [f"{MODEL}, batch 1, 64 tokens, {THREADS} threads, median of {runs} interleaved runs; SQNR and mean "
             f"cosine against float on {EVAL} held-out sentences.", "",
             "| method | SQNR (dB) | cosine | latency (ms) | x float | x MatMulNBits RTN (level 0) "
             "| x fastest MatMulNBits | x float bytes | session MB (peak / resident) | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['sqnr_db']:.2f} | {row['cosine']} | {row['latency_ms']:.2f} "
                     f"| {row['latency_ms'] / float_row['latency_ms']:.2f} | {row['latency_ms'] / nbits['latency_ms']:.2f} "
                     f"| {row['latency_ms'] / fastest_nbits:.2f} | {row['bytes'] / float_row['bytes']:.3f} "
                     f"| {row['session_mb']} | {row['compile_seconds'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
