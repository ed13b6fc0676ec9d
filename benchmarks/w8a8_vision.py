"""W8A8 on vision models (and the ViT and MiniLM rows): float, qcompile and ONNX Runtime's
quantize_static (MinMax, Percentile, Entropy), in one run.

Models, each with calibration samples and disjoint held-out samples (of the photos scikit-image
bundles, the first half calibrates and the second half evaluates, as in the zoo):

* efficientnet-lite0: the zoo's pre-trained EfficientNet-Lite0 on 224 x 224 crops of real photos.
* mobilenet-v3-large: torchvision's MobileNetV3-Large (HardSwish), RANDOM weights (seeded, BatchNorm
  statistics measured as benchmarks/corpus_torchvision.py does), legacy TorchScript exporter, opset 13.
* resnet18: torchvision's ResNet-18, RANDOM weights likewise, legacy exporter, opset 13, exported
  without constant folding so that its 20 BatchNormalization nodes stay unfolded in the graph.
* vit-s16: torchvision's VisionTransformer at ViT-S/16's shape (12 layers, 6 heads, width 384, MLP
  1536, 16 x 16 patches of 224 x 224 crops), RANDOM weights (the zero-initialised head gets small
  random weights, as in benchmarks/corpus_torchvision.py), legacy exporter, opset 14: the smallest
  at which it exports nn.MultiheadAttention's aten::scaled_dot_product_attention (opset 13 raises
  UnsupportedOperatorError).
* ppocrv4-det, ppocrv4-rec: PaddleOCR's pre-trained PP-OCRv4 text detector and recogniser, as
  shipped in the `rapidocr-onnxruntime` wheel (opset 12), on models/ocr.py's samples: Lee-corpus
  text rendered onto photo crops, 256 x 256 pages (detector) and 48 x 320 lines (recogniser).
* tiny-vit-vanilla: the zoo's ViT for MNIST digits, RANDOM weights, on real digits.
* all-minilm-l6-v2: the zoo's pre-trained sentence encoder on Lee-corpus sentences. ONNX Runtime
  gets w8a8_minilm.py's copy with a finite attention-mask fill and the mask path excluded.

Methods: float; qcompile W8A8 (its defaults: MSE calibration, node groups kept float until the output
SQNR reaches 20 dB; `--targets T ...` adds a compile per --target-sqnr T, 0 = every group integer); ONNX Runtime quantize_static, QDQ,
per-channel, uint8 activations and int8 weights (set explicitly: ONNX Runtime 1.32 defaults to int8
activations), with each calibrator at its defaults (Entropy's default 128 histogram bins leave it one
candidate threshold, the full range, so it reproduces MinMax). Before quantize_static, ONNX Runtime's
documented flow: quant_pre_process (BatchNorm folding, constants to initializers, shape inference),
with its symbolic shape inference skipped, as it fails on PP-OCRv4 ("Incomplete symbolic shape
inference"). Per-channel QDQ needs opset 13 (DequantizeLinear's `axis`), so for ONNX Runtime PP-OCRv4
is first converted to opset 13 with onnx.version_converter; qcompile takes the original. Every
quantizer runs in its own process: one that fails or runs out of memory loses only its row.

Columns: output SQNR against float on the held-out samples, run here on the saved artifact (for
qcompile also the SQNR in its manifest); agreement with float (top-1, per-timestep argmax for the
recogniser, mean cosine for MiniLM); batch-1 latency with 2 threads, measured interleaved in one
process per model (every session warmed up, then rounds of a block of runs each, median over all
timed runs), also as a ratio to float and to ONNX Runtime MinMax (all ORT calibrators give the same
graph); which Conv/MatMul/Gemm ONNX Runtime runs as integer kernels (qcompile.deployed); artifact
size; quantization wall time (qcompile's includes its verification on the held-out samples).

    .venv/bin/python benchmarks/w8a8_vision.py          # ~20 minutes on 2 cores
    .venv/bin/python benchmarks/w8a8_vision.py --models resnet18 --calib 4 --eval 4 --runs 3
    .venv/bin/python benchmarks/w8a8_vision.py --models all-minilm-l6-v2 --targets 0 25   # issue 13's bars
    .venv/bin/python benchmarks/w8a8_vision.py --models all-minilm-l6-v2 --max-drops 0.003 0.001   # target=
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timing import interleaved_ms, model_bytes

os.environ.setdefault("TQDM_DISABLE", "1")
THREADS = 2
ORT_CALIBRATORS = ("MinMax", "Percentile", "Entropy")


@dataclass(frozen=True)
class Bench:
    title: str
    agreement: str | None  # "top-1", "timestep argmax", "cosine" or None
    samples: tuple[int, int]  # default calibration / held-out counts
    attention_mask: bool = False  # ONNX Runtime gets w8a8_minilm.py's finite-mask copy and exclusions


BENCHES = {
    "efficientnet-lite0": Bench("EfficientNet-Lite0, pre-trained (ImageNet), 224 x 224 photo crops", "top-1", (32, 32)),
    "mobilenet-v3-large": Bench("MobileNetV3-Large (torchvision), RANDOM weights, 224 x 224 photo crops", "top-1", (32, 32)),
    "resnet18": Bench("ResNet-18 (torchvision), RANDOM weights, BatchNorm unfolded, 224 x 224 photo crops", "top-1",
                      (32, 32)),
    "vit-s16": Bench("ViT-S/16 (torchvision architecture), RANDOM weights, 224 x 224 photo crops", "top-1", (32, 32)),
    "ppocrv4-det": Bench("PP-OCRv4 text detector (PaddleOCR), pre-trained, 256 x 256 pages of rendered text", None,
                         (32, 32)),
    "ppocrv4-rec": Bench("PP-OCRv4 text recogniser (PaddleOCR), pre-trained, 48 x 320 rendered text lines",
                         "timestep argmax", (32, 32)),
    "tiny-vit-vanilla": Bench("ViT for MNIST (zoo), RANDOM weights, 28 x 28 digits", "top-1", (64, 64)),
    "all-minilm-l6-v2": Bench("all-MiniLM-L6-v2, pre-trained, Lee-corpus sentences", "cosine", (64, 64),
                              attention_mask=True),
}
TORCHVISION = ("mobilenet-v3-large", "resnet18", "vit-s16")
OCR = ("ppocrv4-det", "ppocrv4-rec")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--out", type=Path, default=Path("build/bench/w8a8_vision"))
    parser.add_argument("--calib", type=int, help="calibration samples (default: 32, 64 for tiny-vit-vanilla and MiniLM)")
    parser.add_argument("--eval", type=int, help="held-out samples (default: 32, 64 for tiny-vit-vanilla and MiniLM)")
    parser.add_argument("--runs", type=int, default=3000, help="timed runs per session, in 100 interleaved rounds")
    parser.add_argument("--targets", type=float, nargs="*", default=[],
                        help="also compile with each of these --target-sqnr values (0: every group integer)")
    parser.add_argument("--max-drops", type=float, nargs="*", default=[],
                        help="also compile with target= the agreement metric, within each of these drops of float")
    args = parser.parse_args()

    results = {}
    for name in args.models:
        bench = BENCHES[name]
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        calib, held_out = args.calib or bench.samples[0], args.eval or bench.samples[1]
        started = time.perf_counter()
        print(f"{name}: preparing model and samples ...", file=sys.stderr, flush=True)
        _isolated(prepare, name, str(folder), calib, held_out)
        methods = {"qcompile": _attempt(f"{name}: qcompile", quantize_qcompile, str(folder), None)}
        for target in args.targets:
            methods[f"qcompile --target-sqnr {target:g}"] = _attempt(f"{name}: qcompile --target-sqnr {target:g}",
                                                                    quantize_qcompile, str(folder), target)
        for drop in args.max_drops:
            methods[f"qcompile target=agreement, max_drop {drop:g}"] = _attempt(
                f"{name}: qcompile max_drop {drop:g}", quantize_qcompile, str(folder), None, drop, bench.agreement)
        for calibrator in ORT_CALIBRATORS:
            methods[f"onnxruntime {calibrator}"] = _attempt(f"{name}: onnxruntime {calibrator}",
                                                            quantize_onnxruntime, str(folder), calibrator,
                                                            bench.attention_mask)
        print(f"{name}: measuring ...", file=sys.stderr, flush=True)
        rows = _isolated(measure, str(folder), methods, bench.agreement, args.runs)
        results[name] = {"title": bench.title, "calib_samples": calib, "eval_samples": held_out,
                         "agreement": bench.agreement, "rows": rows, "seconds": round(time.perf_counter() - started)}
        print(f"{name}: done in {results[name]['seconds']} s", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"threads": THREADS, "runs": args.runs, "models": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = _markdown(results, args.runs)
    (args.out / "results.md").write_text(table)
    print(table)


def _isolated(function, *args):
    """function(*args) in a fresh spawned process; a crash there (out of memory) raises BrokenProcessPool here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _attempt(label: str, function, *args) -> dict:
    print(f"{label} ...", file=sys.stderr, flush=True)
    try:
        return _isolated(function, *args)
    except Exception as error:  # a failed quantizer loses its row, not the run
        text = str(error).strip().splitlines()
        return {"error": f"{type(error).__name__}: {text[0][:300] if text else ''}"}


# --- models and samples (each writes FOLDER/model.onnx, calib.npz, eval.npz) ---

def prepare(name: str, folder: str, calib: int, held_out: int) -> None:
    folder = Path(folder)
    model_path = folder / "model.onnx"
    if name in OCR:
        from qcompile.models import ocr

        shutil.copyfile(ocr.model_path(name), model_path)
    elif name in TORCHVISION:
        _export_torchvision(name, model_path)
    else:
        from qcompile import models

        models.export(name, model_path)
    for split, count in (("calib", calib), ("eval", held_out)):
        np.savez(folder / f"{split}.npz", **_samples(name, split, count))
    if BENCHES[name].attention_mask:
        from w8a8_minilm import _check_finite_mask_copy

        _check_finite_mask_copy(str(model_path), str(folder / "eval.npz"), str(folder))


def _samples(name: str, split: str, count: int) -> dict[str, np.ndarray]:
    from qcompile import models
    from qcompile.models.ocr import text_samples
    from qcompile.models.vision import photo_samples

    if name in OCR:
        return text_samples(name, split, count)
    return photo_samples(split, count) if name in TORCHVISION else models.get(name).samples(split, count)


def _export_torchvision(name: str, path: Path) -> None:
    """Random weights from corpus_torchvision.build; the legacy exporter at opset 13 (14 for ViT, whose
    scaled_dot_product_attention it exports only from 14), batch 1. Without constant folding the
    exporter leaves BatchNormalization unfolded (asserted for ResNet-18)."""
    import onnx
    import torch

    from corpus_torchvision import build

    net = build(name.replace("-", "_"))
    opset = 14 if name == "vit-s16" else 13
    torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=opset,
                      input_names=["images"], output_names=["logits"], do_constant_folding=name != "resnet18")
    if name == "resnet18":
        nodes = onnx.load(str(path)).graph.node
        assert any(node.op_type == "BatchNormalization" for node in nodes), "the exporter folded BatchNorm"


# --- quantizers (each in its own process) ---

def quantize_qcompile(folder: str, target: float | None, max_drop: float | None = None,
                      agreement: str | None = None) -> dict:
    """Its defaults (W8A8, the default output SQNR target), another --target-sqnr, or (max_drop) the
    Python API's target= with the bench's agreement metric against float on the held-out samples:
    float scores 1, and the compile keeps groups float until the metric is at least 1 - max_drop."""
    import qcompile
    from qcompile.runtime import make_session

    folder = Path(folder)
    start = time.perf_counter()
    config = qcompile.QuantConfig(weights="int8", acts="int8", target_sqnr=target)
    out, metric = folder / ("qcompile" if target is None else f"qcompile_target_{target:g}"), None
    if max_drop is not None:
        archive = np.load(folder / "eval.npz")
        feeds = [{name: archive[name][i : i + 1] for name in archive.files} for i in range(len(archive[archive.files[0]]))]

        def outputs(session) -> np.ndarray:
            return np.concatenate([session.run(None, feed)[0] for feed in feeds])

        def metric(session) -> float:
            return _agreement(agreement, reference, outputs(session))

        reference, out = outputs(make_session(str(folder / "model.onnx"))), folder / f"qcompile_drop_{max_drop:g}"
    artifact = qcompile.compile(folder / "model.onnx", config, calib=folder / "calib.npz",
                                verify_data=folder / "eval.npz", target=metric, max_drop=max_drop)
    artifact.save(out, force=True)
    verification = artifact.manifest["verification"]["outputs"]
    search = artifact.manifest["float_search"] or {}
    return {"path": str(out / "model.onnx"), "seconds": round(time.perf_counter() - start, 1),
            "float_groups": len(search.get("floated", {})), "metric": search.get("metric"),
            "manifest_sqnr_db": round(float(next(iter(verification.values()))["sqnr_db"]), 2),
            "manifest_verification": verification, "manifest_deployed": artifact.manifest.get("deployed")}


def quantize_onnxruntime(folder: str, calibrator: str, attention_mask: bool) -> dict:
    """Convert to opset 13 where older, quant_pre_process (symbolic shape inference skipped), quantize_static."""
    import onnx
    import onnxruntime
    from onnx import version_converter
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnxruntime.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per node on the root logger
    folder = Path(folder)
    archive = np.load(folder / "calib.npz")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(archive[archive.files[0]])))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {name: archive[name][row : row + 1] for name in archive.files}

    start = time.perf_counter()
    source, excluded = str(folder / "model.onnx"), None
    if attention_mask:
        from w8a8_minilm import _finite_mask_copy, _mask_path

        source, excluded = _finite_mask_copy(source, str(folder)), _mask_path(source)
    imports = onnx.load(source, load_external_data=False).opset_import
    opset = next(o.version for o in imports if o.domain in ("", "ai.onnx"))
    target = folder / f"onnxruntime_{calibrator}.onnx"
    with tempfile.TemporaryDirectory(prefix="w8a8-vision-") as scratch:
        if opset < 13:
            onnx.save(version_converter.convert_version(onnx.load(source), 13), Path(scratch) / "opset13.onnx")
            source = str(Path(scratch) / "opset13.onnx")
        quant_pre_process(source, Path(scratch) / "preprocessed.onnx", skip_symbolic_shape=True)
        with contextlib.redirect_stdout(sys.stderr):  # the calibrators print their progress
            quantize_static(Path(scratch) / "preprocessed.onnx", target, Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, calibrator), nodes_to_exclude=excluded)
    seconds = time.perf_counter() - start
    return {"path": str(target), "seconds": round(seconds, 1), "converted_from_opset": opset if opset < 13 else None}


# --- measurement (one process per model) ---

def measure(folder: str, methods: dict[str, dict], agreement: str | None, runs: int) -> list[dict]:
    """Accuracy against float on the held-out samples, integer kernels, size, and interleaved latency."""
    from qcompile.deployed import deployed_kernels
    from qcompile.numerics import sqnr_db
    from qcompile.runtime import make_session

    archive = np.load(Path(folder) / "eval.npz")
    count = len(archive[archive.files[0]])
    feeds = [{name: archive[name][i : i + 1] for name in archive.files} for i in range(count)]
    rows = [{"method": "float", "path": str(Path(folder) / "model.onnx"), "seconds": 0.0}]
    rows += [{"method": method, **result} for method, result in methods.items()]
    sessions, outputs = {}, {}
    for row in rows:
        if "error" in row:
            continue
        session = sessions[row["method"]] = make_session(row["path"], threads=THREADS)
        output = outputs[row["method"]] = np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float64)
        deployed = deployed_kernels(row["path"])
        row.update(output_sqnr_db=round(sqnr_db(outputs["float"], output), 2),
                   agreement=_agreement(agreement, outputs["float"], output),
                   kernels=deployed.summary(), fused_share=round(deployed.fused_share(), 4),
                   artifact_bytes=model_bytes(row["path"]))
    for method, latency in interleaved_ms(sessions, feeds[0], runs).items():
        next(row for row in rows if row["method"] == method)["latency_ms"] = round(latency, 3)
    return rows


def _agreement(kind: str | None, reference: np.ndarray, quantized: np.ndarray) -> float | None:
    """top-1 / per-timestep argmax: share of positions whose argmax over the last axis matches;
    cosine: mean over samples."""
    if kind == "cosine":
        from qcompile.verify import row_cosines

        return round(float(np.mean(row_cosines(reference, quantized))), 4)
    if kind:
        return round(float(np.mean(reference.argmax(-1) == quantized.argmax(-1))), 4)
    return None


# --- report ---

def _markdown(results: dict, runs: int) -> str:
    lines = [f"W8A8, batch-1 latency with {THREADS} threads (median of {runs} runs, interleaved); SQNR and "
             "agreement against float on the held-out samples.", ""]
    for name, result in results.items():
        rows = {row["method"]: row for row in result["rows"]}
        float_ms = rows["float"]["latency_ms"]
        ort_ms = rows["onnxruntime MinMax"].get("latency_ms")
        agreement = result["agreement"] or "agreement"
        lines += [f"### {name}: {result['title']}", "",
                  f"{result['calib_samples']} calibration / {result['eval_samples']} held-out samples.", "",
                  f"| method | output SQNR (dB) | manifest SQNR (dB) | {agreement} | latency (ms) | x float "
                  "| x ORT MinMax | fused share | integer kernels | artifact (MB) | quantize (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, row in rows.items():
            if "error" in row:
                lines.append(f"| {method} | failed: {row['error']} |" + " |" * 9)
                continue
            lines.append(
                f"| {method} | {row['output_sqnr_db']} | {row.get('manifest_sqnr_db', '-')} "
                f"| {'-' if row['agreement'] is None else row['agreement']} | {row['latency_ms']:.2f} "
                f"| {row['latency_ms'] / float_ms:.2f} | {_ratio(row['latency_ms'], ort_ms)} "
                f"| {row['fused_share']:.2f} | {row['kernels']} | {row['artifact_bytes'] / 1e6:.1f} | {row['seconds']} |")
        lines.append("")
    return "\n".join(lines)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


if __name__ == "__main__":
    main()
