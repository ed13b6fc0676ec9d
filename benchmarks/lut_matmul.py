"""A 4096 x 4096 weight-only MatMul at batch 1, 16, 64 and 128 (seed 003 Table 4 style), in one run:
float, ONNX Runtime's MatMulNBits int4 (block 32, RTN), qcompile nl4 (PTNQ sinh, per channel) and
qcompile int4 (affine, blocks of 128) on qcompile's custom-op library, and nl4 through its
standard-op fallback functions; then MiniLM's three MatMul shapes at 64 tokens, float against nl4
on the library.

The weight is Laplacian (what trained weights look like); latency is the median of many runs with
2 intra-op threads (--threads), the sessions of one shape and batch timed in turns (timing.interleaved_ms), so
that a slow spell on the machine hits them alike; "x float" is a library's latency over float's at
the same batch, from the same turns. Bytes are the serialized model. The memory-bandwidth floor is
the nl4 model's bytes over a read bandwidth measured here in the same run. An 8.4 MB nl4 weight
stays in the L3 cache between runs, so batch 1 is also timed "cold": eight different weights per
run (67 MB of codes, more than the cache), time per MatMul.

    .venv/bin/python benchmarks/lut_matmul.py      # ~4 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from timing import interleaved_ms, median_ms, model_bytes

os.environ.setdefault("TQDM_DISABLE", "1")
THREADS = 2  # --threads
RUNS = {1: 400, 16: 100, 64: 40, 128: 30}
LIBRARIES = ("qcompile nl4, library", "qcompile int4 block 128, library")
MINILM_SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (K, N): attention projections, FFN in, FFN out
MINILM_TOKENS, MINILM_RUNS = 64, 2000

COLD_COPIES = 8


def float_model(k: int, n: int, copies: int = 1) -> onnx.ModelProto:
    """x @ w_i for `copies` independent Laplacian weights, one output each."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.laplace(0, 0.02, (k, n)).astype(np.float32), f"w{i}")
               for i in range(copies)]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(copies)], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]) for i in range(copies)],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def nl4_config():
    import qcompile

    return qcompile.QuantConfig(weights="nl", acts="none", bits=4, functions=("sinh",), executor="serial")


def cold_batch1_ms(k: int, n: int, threads: int) -> dict:
    """Batch-1 ms per MatMul when each run reads COLD_COPIES different weights (more than the L3 cache)."""
    import qcompile
    from qcompile.runtime import make_session

    model = float_model(k, n, COLD_COPIES)
    ort_model = _onnxruntime_int4(model)
    nl4 = qcompile.compile(model, nl4_config()).model
    feed = {"x": np.random.default_rng(2).standard_normal((1, k)).astype(np.float32)}
    return {name: round(median_ms(make_session(m, threads=threads, **extra), feed, warmup=5, runs=100) / COLD_COPIES, 4)
            for name, m, extra in (("onnxruntime int4 block 32", ort_model, {}),
                                   ("qcompile nl4, library", nl4, {"use_library": True}))}


def minilm_shapes(threads: int) -> list[dict]:
    """Float against nl4 on the library for MiniLM's MatMul shapes at MINILM_TOKENS tokens."""
    import qcompile
    from qcompile.runtime import make_session

    rows = []
    for k, n in MINILM_SHAPES:
        model = float_model(k, n)
        sessions = {"float": make_session(model, threads=threads),
                    "library": make_session(qcompile.compile(model, nl4_config()).model, threads=threads,
                                            use_library=True)}
        x = np.random.default_rng(3).standard_normal((MINILM_TOKENS, k)).astype(np.float32)
        ms = interleaved_ms(sessions, {"x": x}, MINILM_RUNS, rounds=10)
        rows.append({"k": k, "n": n, "m": MINILM_TOKENS, "ms_float": round(ms["float"], 4),
                     "ms_library": round(ms["library"], 4), "library_x_float": round(ms["library"] / ms["float"], 3)})
    return rows


def _onnxruntime_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer rewrites the model it is given
    quantizer = MatMulNBitsQuantizer(copy, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    return quantizer.model.model


def read_bandwidth_gbs(megabytes: int = 1024) -> float:
    """Bytes per second numpy reads when summing a large array (best of 5), a floor for memory-bound kernels."""
    data = np.ones(megabytes << 18, dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("build/bench/lut_matmul"))
    parser.add_argument("--threads", type=int, default=THREADS, help="intra-op threads per session")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import qcompile
    from qcompile.numerics import sqnr_db
    from qcompile.runtime import make_session

    k = n = args.size
    paths = {"float": args.out / "float.onnx", "onnxruntime int4 block 32": args.out / "ort_int4.onnx"}
    model = float_model(k, n)
    onnx.save(model, paths["float"])
    onnx.save(_onnxruntime_int4(model), paths["onnxruntime int4 block 32"])
    start = time.perf_counter()
    artifact = qcompile.compile(model, nl4_config())
    compile_seconds = time.perf_counter() - start
    artifact.save(args.out / "nl4", force=True)
    qcompile.compile(model, qcompile.QuantConfig(weights="affine", acts="none", bits=4, block=128,
                                                 executor="serial")).save(args.out / "int4_block128", force=True)
    nl4, int4 = args.out / "nl4" / "model.onnx", args.out / "int4_block128" / "model.onnx"
    sessions = {
        "float": make_session(str(paths["float"]), threads=args.threads),
        "onnxruntime int4 block 32": make_session(str(paths["onnxruntime int4 block 32"]), threads=args.threads),
        "qcompile nl4, library": make_session(str(nl4), threads=args.threads, use_library=True),
        "qcompile int4 block 128, library": make_session(str(int4), threads=args.threads, use_library=True),
        "qcompile nl4, fallback": make_session(str(nl4), threads=args.threads, use_library=False),
    }
    sizes = {name: model_bytes(paths.get(name, int4 if "block 128" in name else nl4)) for name in sessions}
    rng = np.random.default_rng(1)
    x = {m: rng.standard_normal((m, k)).astype(np.float32) for m in RUNS}
    reference = sessions["float"].run(None, {"x": x[1]})[0]
    latency = {m: interleaved_ms(sessions, {"x": x[m]}, runs, rounds=10) for m, runs in RUNS.items()}
    rows = []
    for name, session in sessions.items():
        row = {"method": name, "bytes": sizes[name], "x_float_bytes": round(sizes[name] / sizes["float"], 4)}
        for m in RUNS:
            row[f"ms_batch{m}"] = round(latency[m][name], 4)
        row["output_sqnr_db_vs_float"] = round(sqnr_db(reference, session.run(None, {"x": x[1]})[0]), 2)
        rows.append(row)
    library_x_float = {name: {m: round(latency[m][name] / latency[m]["float"], 3) for m in RUNS} for name in LIBRARIES}
    minilm = minilm_shapes(args.threads)
    cold = cold_batch1_ms(k, n, args.threads)
    bandwidth = read_bandwidth_gbs()
    result = {"k": k, "n": n, "threads": args.threads, "read_bandwidth_gbs": round(bandwidth, 1),
              "nl4_floor_ms": round(sizes["qcompile nl4, library"] / bandwidth / 1e6, 4),
              "nl4_compile_seconds": round(compile_seconds, 1), "rows": rows, "library_x_float": library_x_float,
              "minilm": minilm, "cold_batch1_ms": cold}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = {r["method"]: r for r in result["rows"]}
    ort = rows["onnxruntime int4 block 32"]
    batches = [int(key[len("ms_batch"):]) for key in result["rows"][0] if key.startswith("ms_batch")]
    lines = [f"{result['k']}x{result['n']} MatMul, weight-only, {result['threads']} threads; median ms.", "",
             "| method | " + " | ".join(f"batch {m}" for m in batches)
             + " | x ORT int4 (b=1) | bytes | x float bytes | SQNR vs float (dB) |",
             "|---|" + "---|" * (len(batches) + 4)]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | " + " | ".join(str(r[f"ms_batch{m}"]) for m in batches)
                     + f" | {r['ms_batch1'] / ort['ms_batch1']:.2f} | {r['bytes']} | {r['x_float_bytes']} | "
                     f"{r['output_sqnr_db_vs_float']} |")
    lines += ["", "Library latency over float's (below 1: faster than ONNX Runtime's float MatMul):", "",
              "| library | " + " | ".join(f"batch {m}" for m in batches) + " |", "|---|" + "---|" * len(batches)]
    for name, ratios in result["library_x_float"].items():
        lines.append(f"| {name} | " + " | ".join(f"{ratios[m]:.3f}" for m in batches) + " |")
    lines += ["", f"MiniLM's MatMul shapes at {result['minilm'][0]['m']} tokens, {result['threads']} threads; median ms:", "",
              "| K x N | float | qcompile nl4, library | x float |", "|---|---|---|---|"]
    for r in result["minilm"]:
        lines.append(f"| {r['k']} x {r['n']} | {r['ms_float']} | {r['ms_library']} | {r['library_x_float']:.3f} |")
    floor = result["nl4_floor_ms"]
    lines += ["", f"Memory-bandwidth floor for nl4 at batch 1: {floor} ms ({rows['qcompile nl4, library']['bytes']} bytes "
              f"at {result['read_bandwidth_gbs']} GB/s measured); the library kernel is "
              f"{rows['qcompile nl4, library']['ms_batch1'] / floor:.2f}x the floor (the weight is cache-resident).",
              "", f"Cold batch 1 ({COLD_COPIES} different weights per run, ms per MatMul): "
              + ", ".join(f"{name} {ms}" for name, ms in result["cold_batch1_ms"].items())
              + f"; nl4 is {result['cold_batch1_ms']['qcompile nl4, library'] / floor:.2f}x its DRAM floor."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
