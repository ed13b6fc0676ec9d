"""compile(): load -> normalise -> plan -> calibrate -> insert QDQ -> verify -> artifact."""
from __future__ import annotations

import hashlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__, calibration, report
from .lut import DOMAIN as LUT_DOMAIN, search as lut_search
from .artifact import Artifact
from .config import QuantConfig
from .data import batched, iterate_feeds, model_input_specs, split_holdout
from .errors import QCompileError
from .graph import load_model
from .pipeline import CompileContext, Pipeline
from .plan import QuantPlan
from .runtime import DETERMINISTIC_THREADS
from .verify import verify
from .passes import (DequantizeAfterGather, FoldClippedSoftmax, InsertLutWeights, InsertQDQ, MergeGateProjection,
                     NormalizeGraph, PlanW8A8)
from .passes.insert_lut_weights import find_lut_weights

PROBE_SAMPLES = 32  # calibration samples on which lookup-table candidates are scored end to end


def compile(model: str | Path | onnx.ModelProto, config: QuantConfig | None = None, calib=None,
            verify_data=None) -> Artifact:
    """Quantize a float ONNX model.

    calib: calibration data (see qcompile.data); required when activations are quantized.
    verify_data: held-out samples for verification; default: the last `config.verify_fraction`
        of the calibration samples (which then are not used for calibration).
    """
    config = config or QuantConfig()
    float_model = load_model(model)
    inputs = model_input_specs(float_model)
    context = CompileContext.from_model(float_model, config)
    records = Pipeline([NormalizeGraph(), FoldClippedSoftmax(), MergeGateProjection(), PlanW8A8()]).run(context)
    reference = context.model  # the float model with normalised names: calibration target
    plan = context.plan

    calibrated = [s for s in plan.of_kind("activation") if s.fixed_range is None]
    if calib is None and calibrated:
        raise QCompileError("quantizing activations needs calibration data (--calib)")
    if calib is None:
        calib_feeds, verify_feeds = [], list(iterate_feeds(verify_data, inputs)) if verify_data is not None else []
    elif verify_data is None:
        calib_feeds, verify_feeds = split_holdout(calib, inputs, config.verify_fraction)
    else:
        calib_feeds, verify_feeds = iterate_feeds(calib, inputs), list(iterate_feeds(verify_data, inputs))

    histograms = {}
    if calibrated:
        histograms = calibration.collect_histograms(
            reference, [s.tensor for s in calibrated], batched(calib_feeds, inputs, config.calib_batch_size),
            threads=DETERMINISTIC_THREADS)
    constants = {name: t.values for name, t in context.graph.tensors().items() if isinstance(t, gs.Constant)}
    weight_specs = plan.of_kind("weight")
    # Weights are independent and NumPy releases the GIL: solve them on all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        solved = pool.map(lambda spec: calibration.weight_params(constants[spec.tensor], spec.axis, spec.grid,
                                                                 config.calib_method), weight_specs)
        plan.params.update(zip((spec.tensor for spec in weight_specs), solved))
    for spec in plan.of_kind("activation"):
        plan.params[spec.tensor] = calibration.activation_params(
            spec, histograms.get(spec.tensor), config.calib_method, config.percentile)
    lut_summary, lut_nodes, figures = None, set(), ()
    if config.lut_weights:
        lut_summary, lut_nodes, figures = _choose_lut_weights(context, reference, inputs, calib, calib_feeds)
    records += Pipeline([InsertQDQ(), InsertLutWeights(), DequantizeAfterGather()]).run(context)
    quantized = context.model

    verification = None
    if verify_feeds:
        verification = verify(reference, quantized, verify_feeds, _quantized_layers(plan, reference, lut_nodes)).to_dict()
    manifest = {
        "qcompile_version": __version__,
        "source_model_sha256": hashlib.sha256(float_model.SerializeToString(deterministic=True)).hexdigest(),
        "config": config.to_dict(),
        "passes": [{"name": r.name, "changed": r.changed, "summary": r.summary} for r in records],
        "explain": context.notes,
        "plan": _plan_summary(plan),
        "lut_weights": lut_summary,
        "verification": verification,
        "custom_op_library": LUT_DOMAIN if config.lut_weights else None,
    }
    return Artifact(quantized, manifest, report.render(manifest, figures))


def _choose_lut_weights(context: CompileContext, reference: onnx.ModelProto, inputs, calib, calib_feeds):
    """Fit and choose every lookup-table weight quantizer (context.lut); the manifest's summary of it."""
    config = context.config
    weights = find_lut_weights(context.graph, config.lut_ops)
    if not weights:
        raise QCompileError(f"--weights nl/affine: the model has no constant {', '.join(config.lut_ops)} weight")
    probe = None
    if calib is not None:
        source = calib_feeds if isinstance(calib_feeds, list) else iterate_feeds(calib, inputs)
        feeds = list(batched(itertools.islice(source, PROBE_SAMPLES), inputs, config.calib_batch_size))
        probe = lut_search.SqnrProbe(reference, {w.tensor: w.to_original(w.rows) for w in weights}, feeds)
    elif config.target_sqnr is not None:
        raise QCompileError("--target-sqnr is measured on calibration data: give --calib")
    choice, tried = lut_search.choose(weights, config, probe)
    context.lut = choice.encoded
    quantized_nodes = {w.node for w in weights}
    context.plan.skipped = [s for s in context.plan.skipped if s.node not in quantized_nodes]
    layers = [{"tensor": w.tensor, "node": w.node, "op_type": w.op, "rows": int(w.rows.shape[0]),
               "k": int(w.rows.shape[1]), "bits": choice.bits, "function": choice.encoded[w.tensor].quantizer.function,
               "blocks": int(choice.encoded[w.tensor].quantizer.table.shape[1]), "mse": choice.encoded[w.tensor].mse}
              for w in weights]
    summary = {"format": config.weights, "bits": choice.bits, "sqnr_db": choice.sqnr_db,
               "scored_by": "output SQNR on calibration data" if probe else "weight MSE (no --calib)",
               "tried": [{"bits": c.bits, "sqnr_db": c.sqnr_db, "per_function": c.per_function} for c in tried],
               "layers": layers}
    samples = []
    for w in weights[:: max(1, len(weights) // 4)][:4]:  # a few layers, spread over the model
        row = int(np.abs(w.rows).max(axis=1).argmax())  # the row with the widest range
        encoded = choice.encoded[w.tensor]
        values = encoded.quantizer.dequantize(encoded.codes[row:row + 1])[0]
        samples.append((f"{w.tensor} row {row} ({encoded.quantizer.function or 'affine'})", w.rows[row], values))
    return summary, quantized_nodes, (report.sorted_weights_figure(samples),)


def _quantized_layers(plan: QuantPlan, model: onnx.ModelProto, extra_nodes=frozenset()) -> list[tuple[str, str, str]]:
    """(node, op, first output) of each node that reads a quantized tensor, in graph order."""
    consumers = {name for spec in plan.specs.values() for name, _ in spec.consumers} | set(extra_nodes)
    return [(n.name, n.op_type, n.output[0]) for n in model.graph.node if n.name in consumers]


def _plan_summary(plan: QuantPlan) -> dict:
    tensors = []
    for spec in plan.specs.values():
        params = plan.params[spec.tensor]
        entry = spec.to_dict()
        entry["scale"] = _describe(params.scale)
        entry["zero_point"] = _describe(params.zero_point)
        tensors.append(entry)
    return {
        "tensors": tensors,
        "kept_float": [{"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in plan.skipped],
    }


def _describe(values: np.ndarray):
    """A scalar as is; a per-channel vector as its range (the full vector lives in the model)."""
    if values.ndim == 0:
        return float(values) if values.dtype.kind == "f" else int(values)
    return {"channels": int(values.size), "min": float(values.min()), "max": float(values.max())}
