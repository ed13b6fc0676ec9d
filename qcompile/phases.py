"""The phases of compile(), in order. Each reads and writes one CompileState and nothing else.

load -> normalize -> plan -> calibrate -> keep_float -> search -> rewrite -> verify -> check_floor -> describe

A new phase is a function `phase(state) -> None` added to compiler.PHASES; what it needs from the
ones before it lives on the state, documented below.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__, calibration, intake, report, sensitivity
from .artifact import Artifact
from .config import W8A8_TARGET_SQNR, QuantConfig
from .data import InputSpec, batched, iterate_feeds, model_input_specs, split_holdout
from .deployed import DeployedKernels, deployed_session
from .errors import BelowFloorError, QCompileError, first_line
from .graph import load_model
from .lut import DOMAIN as LUT_DOMAIN, mixed as lut_mixed, search as lut_search, tables as lut_tables
from .numerics import decibels
from .passes import (DequantizeAfterGather, FoldClippedSoftmax, FoldConvAffine, FuseHardSwish, InsertLutWeights,
                     InsertQDQ, MergeGateProjection, NormalizeGraph, PlanW8A8, SumBeforeLayerNorm)
from .passes.insert_lut_weights import find_lut_weights
from .pipeline import CompileContext, PassRecord, Pipeline
from .plan import QuantPlan
from .runtime import DETERMINISTIC_THREADS, make_session
from .verify import verify as verify_model

PROBE_SAMPLES = 32  # calibration samples on which lookup-table candidates and W8A8 float sets are scored end to end
# Of those, the ones each W8A8 group's sensitivity (two sets per group, used only to rank them) is scored on.
# On a ViT-S/16, 32 took 6 of the compile's 7 minutes. On MiniLM at --target-sqnr 25, a ranking on 32
# samples kept 14 groups float, on 16 15, on 8 21.
SENSITIVITY_SAMPLES = 16
CHECK_SAMPLES = 4  # samples on which the float model (and an opset conversion) is checked at load


@dataclass
class CompileState:
    # given
    source: object  # an .onnx path, an onnx.ModelProto or a torch.nn.Module
    config: QuantConfig
    calib: object = None
    verify_data: object = None
    example_inputs: object = None  # for a torch.nn.Module
    target: object = None  # a user metric fn(session) -> float (higher is better), with max_drop
    max_drop: float | None = None
    # load
    float_model: onnx.ModelProto | None = None  # as given (exported), checked
    intake: intake.Intake | None = None
    inputs: list[InputSpec] = field(default_factory=list)
    calib_feeds: object = ()  # an iterable of checked feeds (a list where it must be read twice)
    verify_feeds: list[dict] = field(default_factory=list)
    input_files: tuple[Path, ...] = ()  # never overwritten by the artifact
    # normalize, plan, rewrite
    context: CompileContext | None = None
    reference: onnx.ModelProto | None = None  # the float model as the planner saw it: the calibration target
    records: list[PassRecord] = field(default_factory=list)
    # calibrate, keep_float
    histograms: dict = field(default_factory=dict)  # activation tensor -> StreamingHistogram
    sensitivity: list = field(default_factory=list)  # of sensitivity.GroupSensitivity, where measured
    float_search: sensitivity.FloatSearch | None = None
    # search
    lut_summary: dict | None = None
    lut_nodes: set = field(default_factory=set)
    figures: tuple = ()
    # verify, describe
    deployed: DeployedKernels | None = None
    verification: dict | None = None
    warnings: list[str] = field(default_factory=list)
    artifact: Artifact | None = None


def load(state: CompileState) -> None:
    """Read (or export) the model, refuse what cannot be compiled, raise its opset to what the
    output needs, read the data and run the float model on it once."""
    config = state.config
    if _is_torch_module(state.source):
        from .torch_export import export_for_compile

        state.float_model = load_model(export_for_compile(state.source, state.example_inputs))
    else:
        state.float_model = load_model(state.source)
        if isinstance(state.source, (str, Path)):
            state.input_files = (Path(state.source),)
    state.input_files += tuple(Path(p) for p in (state.calib, state.verify_data) if isinstance(p, (str, Path)))
    state.inputs = model_input_specs(state.float_model)
    _read_data(state)
    checked = list(itertools.islice(state.verify_feeds or _reiterable(state), CHECK_SAMPLES))
    min_opset = intake.LUT_OPSET if config.lut_weights else intake.QDQ_OPSET
    prepared, state.intake = intake.prepare(state.float_model, min_opset, checked)
    if not (state.intake.conversion_check or {}).get("samples"):  # a checked conversion already ran it
        _run_float_model(prepared, checked)
    state.context = CompileContext.from_model(prepared, config)


def normalize(state: CompileState) -> None:
    """Unique node names, constants as initializers, per-channel affine ops folded into Convs,
    hard-swish activations fused, attention patterns folded."""
    state.records += Pipeline([NormalizeGraph(), FoldConvAffine(), FuseHardSwish(), FoldClippedSoftmax(),
                               MergeGateProjection()]).run(state.context)


def plan(state: CompileState) -> None:
    """Decide what is quantized how (no graph change); fail now if that needs data we lack."""
    state.records += Pipeline([PlanW8A8()]).run(state.context)
    state.reference = state.context.model
    if not state.calib_feeds and _calibrated_specs(state.context.plan):
        raise QCompileError("quantizing activations needs calibration data (--calib)")
    if state.config.lut_weights:
        if not find_lut_weights(state.context.graph, state.config.lut_ops):
            raise QCompileError(f"the model has no constant {'/'.join(state.config.lut_ops)} weight to store as "
                                "lookup tables; --weights int8 --acts int8 quantizes its activations")
        if state.calib is None and (state.config.target_sqnr is not None or state.config.weights == "auto"):
            raise QCompileError(f"{'--weights auto' if state.config.weights == 'auto' else '--target-sqnr'} "
                                "measures output SQNR on calibration data: give --calib")


def calibrate(state: CompileState) -> None:
    """Activation ranges from one streaming pass over the calibration data; weight scales per channel."""
    config, plan_ = state.config, state.context.plan
    histograms = state.histograms
    # Keeping a group float can leave a tensor that took another's scale (a Reshape output) needing
    # its own range: a second pass collects it. One pass in the usual case.
    while pending := [s.tensor for s in _calibrated_specs(plan_) if s.tensor not in histograms]:
        histograms.update(calibration.collect_histograms(
            state.reference, pending,
            batched(_reiterable(state), state.inputs, config.calib_batch_size), threads=DETERMINISTIC_THREADS))
        nonfinite = [name for name in pending if histograms[name].nonfinite]
        if nonfinite:  # no integer grid holds +-inf or NaN: quantizing would corrupt it
            plan_.keep_float(nonfinite, "an input takes +-inf or NaN on calibration data (a mask?)")
    unseen = [name for name, histogram in histograms.items() if name in plan_.specs and not histogram.counts.any()]
    if unseen:
        raise QCompileError(f"no finite calibration value reached {len(unseen)} activations ({', '.join(unseen[:3])}): "
                            "are the samples empty?")
    constants = {name: t.values for name, t in state.context.graph.tensors().items() if isinstance(t, gs.Constant)}
    weight_specs = [spec for spec in plan_.of_kind("weight") if spec.tensor not in plan_.params]
    # Weights are independent and NumPy releases the GIL: solve them on all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        solved = pool.map(lambda spec: calibration.weight_params(constants[spec.tensor], spec.axis, spec.grid,
                                                                 config.calib_method), weight_specs)
        plan_.params.update(zip((spec.tensor for spec in weight_specs), solved))
    activations = plan_.of_kind("activation")
    for spec in activations:
        if spec.same_as is None:
            plan_.params[spec.tensor] = calibration.activation_params(
                spec, histograms.get(spec.tensor), config.calib_method, config.percentile)
    for spec in activations:
        if spec.same_as is not None:
            plan_.params[spec.tensor] = plan_.params[spec.same_as]
    for spec in plan_.of_kind("bias"):
        source, weight = spec.operands
        plan_.params[weight], plan_.params[spec.tensor] = calibration.bias_params(
            constants[spec.tensor], plan_.params[source], plan_.params[weight])


def keep_float(state: CompileState) -> None:
    """W8A8: keep float the fewest, cheapest node groups that bring the output SQNR to the target
    (config.target_sqnr, else W8A8_TARGET_SQNR) on the calibration probe and the held-out samples, or
    that keep the user's metric (state.target) within state.max_drop of float."""
    config, plan_ = state.config, state.context.plan
    if not config.static_acts or config.lut_weights or not plan_.integer:
        return
    probe = sensitivity.GatedProbe(state.reference, plan_, _probe_feeds(state, _reiterable(state)))
    full = probe(plan_.integer)
    search = (_keep_float_for_metric(state, probe, full) if state.target is not None
              else _keep_float_for_sqnr(state, probe, full))
    state.float_search = search
    if search.floated:
        plan_.floated.update(search.floated)
        plan_.resolve()
        calibrate(state)  # a tensor that took a now-float neighbour's scale needs its own range


def _keep_float_for_sqnr(state: CompileState, probe: sensitivity.GatedProbe, full: float) -> sensitivity.FloatSearch:
    config, plan_ = state.config, state.context.plan
    target = config.target_sqnr if config.target_sqnr is not None else W8A8_TARGET_SQNR
    held_out = _HeldOutCheck(state) if state.verify_feeds else None
    held_out_full = held_out(plan_.integer) if held_out is not None and full >= target else None
    if full >= target and (held_out_full is None or held_out_full >= target):
        return sensitivity.FloatSearch(target, full, sqnr_db=full, held_out_db=held_out_full)
    measure_sensitivity(state, probe)
    search = sensitivity.keep_float(probe, state.sensitivity, target, full, held_out)
    reached = search.held_out_db if search.held_out_db is not None else search.sqnr_db
    if reached < target:
        state.warnings.append(f"the output SQNR is {reached:.1f} dB with {len(search.floated)} node groups kept float; "
                              f"the target was {target:g} dB")
    return search


def _keep_float_for_metric(state: CompileState, probe: sensitivity.GatedProbe, full: float) -> sensitivity.FloatSearch:
    """compile(target=fn, max_drop=d): fn(session) of the deployed model must stay within d of fn of
    the float model; the probe's sensitivity ranks the groups."""
    plan_ = state.context.plan
    float_metric = _user_metric(state.target, make_session(state.reference))

    def metric_of(integer: set[str]) -> float:
        return _user_metric(state.target, make_session(_deployed_with(state, integer)))

    full_metric = metric_of(plan_.integer)
    if full_metric >= float_metric - state.max_drop:
        return sensitivity.FloatSearch(None, full, sqnr_db=full,
                                       metric=sensitivity.metric_record(float_metric, state.max_drop, full_metric, 1))
    measure_sensitivity(state, probe)
    search = sensitivity.keep_float_for_metric(probe, state.sensitivity, full, metric_of, float_metric,
                                               state.max_drop, full_metric)
    if search.metric["reached"] < search.metric["required"]:
        state.warnings.append(f"the target metric is {search.metric['reached']:g} with every node group kept "
                              f"float ({len(search.floated)}); float gives {float_metric:g}, the target was "
                              f"{search.metric['required']:g} (max_drop {state.max_drop:g})")
    return search


def _user_metric(target, session) -> float:
    """target(session) as a float; what it raises or returns wrong is the user's to fix."""
    try:
        value = target(session)
    except Exception as error:
        raise QCompileError(f"the target metric raised {type(error).__name__}: {first_line(error)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise QCompileError(f"the target metric must return a finite number, got {value!r}")
    return float(value)


def _deployed_with(state: CompileState, integer: set[str]) -> onnx.ModelProto:
    """The deployed model with only the `integer` groups integer; the plan is left as it was."""
    plan_ = state.context.plan
    chosen = dict(plan_.floated)
    plan_.floated.update({g.node: "" for g in plan_.groups if g.node not in integer})
    plan_.resolve()
    calibrate(state)  # a tensor that took a now-float neighbour's scale needs its own range
    model = _deployed_model(state)
    plan_.floated = chosen
    plan_.resolve()
    return model


class _HeldOutCheck:
    """Output SQNR on the held-out samples of the model as deployed with a given set of integer groups."""

    def __init__(self, state: CompileState):
        self.state, self.feeds = state, state.verify_feeds  # one by one, as `verify` runs them: the same sums
        session = make_session(state.reference)
        self.reference = [session.run(None, feed) for feed in self.feeds]

    def __call__(self, integer: set[str]) -> float:
        session = make_session(_deployed_with(self.state, integer))
        signal = noise = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            for expected, output in zip(reference, session.run(None, feed)):
                if expected.dtype.kind == "f":
                    signal += float(np.sum(expected.astype(np.float64) ** 2))
                    noise += float(np.sum((expected.astype(np.float64) - output) ** 2))
        return decibels(signal, noise)


def measure_sensitivity(state: CompileState, probe: sensitivity.GatedProbe | None = None) -> None:
    """state.sensitivity: each computing integer group's sensitivity and the measured cost of keeping it
    float; on `probe`'s session where one is open for the current plan."""
    plan_ = state.context.plan
    feeds = _probe_feeds(state, _reiterable(state), SENSITIVITY_SAMPLES)
    probe = probe.on(feeds) if probe is not None else sensitivity.GatedProbe(state.reference, plan_, feeds)
    feed = next(iter(batched(itertools.islice(_reiterable(state), 1), state.inputs, 1)))
    costs = sensitivity.latency_costs(state.reference, _deployed_model(state), plan_, feed)
    state.sensitivity = sensitivity.sensitivity(probe, costs, state.config.executor, state.config.workers)


def _probe_feeds(state: CompileState, feeds, samples: int = PROBE_SAMPLES) -> list[dict]:
    return list(batched(itertools.islice(feeds, samples), state.inputs, state.config.calib_batch_size))


def _deployed_model(state: CompileState) -> onnx.ModelProto:
    """The model as `rewrite` would write it for the current plan, rewritten on a copy."""
    context = CompileContext.from_model(state.context.model, state.config)
    context.plan = state.context.plan
    Pipeline([InsertQDQ(), DequantizeAfterGather(), SumBeforeLayerNorm()]).run(context)
    return context.model


def search(state: CompileState) -> None:
    """Fit and choose every lookup-table weight quantizer (context.lut), for lookup-table formats."""
    if not state.config.lut_weights:
        return
    context, config = state.context, state.config
    weights = find_lut_weights(context.graph, config.lut_ops)
    probe = None
    if state.calib is not None:
        probe = lut_search.SqnrProbe(state.reference, {w.tensor: w.to_original(w.rows) for w in weights},
                                     _probe_feeds(state, _reiterable(state)))
    statistics = _layer_statistics(state, weights)
    if config.weights == "auto":
        choice, mixed = lut_mixed.choose_mixed(weights, config, probe, statistics)
        tried = []
    else:
        choice, tried = lut_search.choose(weights, config, probe, statistics)
    fit = "output error (GPTQ codes for MatMul/Gemm, weighted fits for Conv)" if statistics else "weight error"
    context.lut = choice.encoded
    stored = [w for w in weights if w.tensor in choice.encoded]  # --weights auto keeps some float
    state.lut_nodes = {w.node for w in stored}
    kept_float = {w.node for w in weights} - state.lut_nodes
    context.plan.skipped = [replace(s, reason="kept float by --weights auto (its format at the chosen point of "
                                              "the bytes / SQNR front)") if s.node in kept_float else s
                            for s in context.plan.skipped if s.node not in state.lut_nodes]
    layers = [{"tensor": w.tensor, "node": w.node, "op_type": w.op, "rows": int(w.rows.shape[0]),
               "k": int(w.rows.shape[1]), "bits": choice.encoded[w.tensor].quantizer.bits,
               "quantizer": choice.encoded[w.tensor].quantizer.name,
               "blocks": int(choice.encoded[w.tensor].quantizer.table.shape[1]), "mse": choice.encoded[w.tensor].mse}
              for w in stored]
    state.lut_summary = {"format": config.weights, "bits": choice.bits, "sqnr_db": choice.sqnr_db, "fit": fit,
                         "scored_by": "output SQNR on calibration data" if probe else "weight MSE (no --calib)",
                         "tried": [{"bits": c.bits, "sqnr_db": c.sqnr_db, "per_function": c.per_function}
                                   for c in tried],
                         "layers": layers}
    figures = ()
    if config.weights == "auto":
        state.lut_summary["mixed"] = mixed
        figures = (report.front_figure(mixed),)
    samples = []
    for w in stored[:: max(1, len(stored) // 4)][:4]:  # a few layers, spread over the model
        row = int(np.abs(w.rows).max(axis=1).argmax())  # the row with the widest range
        encoded = choice.encoded[w.tensor]
        values = encoded.quantizer.dequantize(encoded.codes[row:row + 1])[0]
        samples.append((f"{w.tensor} row {row} ({encoded.quantizer.name})", w.rows[row], values))
    state.figures = figures + ((report.sorted_weights_figure(samples),) if samples else ())


def _layer_statistics(state: CompileState, weights) -> dict[str, lut_tables.LayerStatistics]:
    """Output-aware fitting's statistics of each lookup-table weight's input, from one streaming pass
    over the calibration data: E[x^T x] of MatMul/Gemm inputs (up to GPTQ_MAX_INPUTS wide), E[x_c^2] of
    Conv inputs. Empty for --fit weight or without calibration data."""
    if state.config.fit != "output" or state.calib is None:
        return {}
    nodes = {node.name: node for node in state.context.graph.nodes}
    layer_input, full = {}, {}  # weight -> its input; input -> K x K (True) or per channel (False)
    for w in weights:
        name, square = nodes[w.node].inputs[0].name, w.op != "Conv"
        if w.op == "Gather" or (square and w.rows.shape[1] > lut_tables.GPTQ_MAX_INPUTS) or full.get(name, square) != square:
            continue
        layer_input[w.tensor], full[name] = name, square
    if not full:
        return {}
    moments = calibration.collect_input_moments(
        state.reference, full, batched(_reiterable(state), state.inputs, state.config.calib_batch_size),
        threads=DETERMINISTIC_THREADS)
    return {w.tensor: lut_tables.layer_statistics(w, moments[layer_input[w.tensor]]) for w in weights
            if w.tensor in layer_input}


def rewrite(state: CompileState) -> None:
    """Materialise the plan: QuantizeLinear/DequantizeLinear pairs and lookup-table weights; keep
    ONNX Runtime off its slow fused SkipLayerNormalization."""
    state.records += Pipeline([InsertQDQ(), InsertLutWeights(), DequantizeAfterGather(),
                               SumBeforeLayerNorm()]).run(state.context)


def verify(state: CompileState) -> None:
    """Which compute nodes ONNX Runtime runs as integer kernels in the model as deployed; its output
    SQNR, and per-layer SQNR, against the float model on held-out samples."""
    session, state.deployed = deployed_session(state.context.model)
    if state.verify_feeds:
        layers = _quantized_layers(state.context.plan, state.reference, state.lut_nodes)
        state.verification = verify_model(state.reference, state.context.model, state.verify_feeds, layers,
                                          session).to_dict()


def check_floor(state: CompileState) -> None:
    """An output SQNR below config.sqnr_floor on the held-out samples: a warning that names the three
    layers that cost most and the option that fixes it; with config.strict, BelowFloorError."""
    config = state.config
    if not state.verification:
        state.warnings.append(f"no held-out samples: the output was not checked against the {config.sqnr_floor:g} dB floor")
        return
    outputs = state.verification["outputs"]
    if not outputs:  # string outputs only: nothing has an SQNR
        return
    name = min(outputs, key=lambda n: float(outputs[n]["sqnr_db"]))
    sqnr = float(outputs[name]["sqnr_db"])
    if sqnr >= config.sqnr_floor:
        return
    if state.sensitivity:  # measured: the groups whose quantization costs most
        worst = [f"{s.node} ({s.op_type}, {s.float_alone_db:.1f} dB with only it float)" for s in state.sensitivity[:3]]
    else:
        layers = sorted(state.verification["layers"], key=lambda layer: float(layer["sqnr_db"]))
        worst = [f"{layer['node']} ({layer['op_type']}, its output {float(layer['sqnr_db']):.1f} dB)" for layer in layers[:3]]
    message = (f"output {name} has SQNR {sqnr:.1f} dB on {state.verification['samples']} held-out samples, below the "
               f"{config.sqnr_floor:g} dB floor; worst layers: {', '.join(worst) or 'none measured'}; {_floor_fix(config)}")
    if config.strict:
        raise BelowFloorError(f"{message} (--strict: nothing written)")
    state.warnings.append(message)


def _floor_fix(config: QuantConfig) -> str:
    target = max(W8A8_TARGET_SQNR, config.sqnr_floor + 10.0)
    if config.static_acts and not config.lut_weights:
        return f"rerun with --target-sqnr {max(target, (config.target_sqnr or 0.0) + 10.0):g} to keep more groups float"
    if config.weights == "int4":
        return "rerun with --weights int8"
    return f"rerun with --weights auto --target-sqnr {target:g} to choose each layer's format"


def describe(state: CompileState) -> None:
    """The manifest and report, and the artifact that carries them."""
    config, context = state.config, state.context
    manifest = {
        "qcompile_version": __version__,
        "source_model_sha256": hashlib.sha256(state.float_model.SerializeToString(deterministic=True)).hexdigest(),
        "config": config.to_dict(),
        "intake": state.intake.to_dict(),
        "passes": [{"name": r.name, "changed": r.changed, "summary": r.summary} for r in state.records],
        "explain": context.notes,
        "plan": _plan_summary(context.plan),
        "coverage": _coverage(state),
        "lut_weights": state.lut_summary,
        "float_search": state.float_search.to_dict() if state.float_search else None,
        "sensitivity": [s.to_dict() for s in state.sensitivity],
        "deployed": state.deployed.to_dict(),
        "verification": state.verification,
        "warnings": state.warnings,
        "custom_op_library": LUT_DOMAIN if config.lut_weights else None,
    }
    state.artifact = Artifact(context.model, manifest, report.render(manifest, state.figures), state.input_files)


def _read_data(state: CompileState) -> None:
    config, inputs = state.config, state.inputs
    if state.calib is None:
        state.verify_feeds = list(iterate_feeds(state.verify_data, inputs)) if state.verify_data is not None else []
    elif state.verify_data is None:
        state.calib_feeds, state.verify_feeds = split_holdout(state.calib, inputs, config.verify_fraction)
    else:
        state.calib_feeds = iterate_feeds(state.calib, inputs)
        state.verify_feeds = list(iterate_feeds(state.verify_data, inputs))
        first = next(state.calib_feeds)  # a bad first sample fails now, not after minutes of work
        state.calib_feeds = itertools.chain([first], state.calib_feeds)


def _reiterable(state: CompileState):
    """The calibration feeds, from the start: a list is read again; a stream is read from its source
    again (a file, folder or list), or once (a reader), in which case it is kept as a list."""
    if isinstance(state.calib_feeds, list):
        return iter(state.calib_feeds)
    if isinstance(state.calib, (str, Path, list, tuple)):
        return iterate_feeds(state.calib, state.inputs)
    state.calib_feeds = list(state.calib_feeds)
    return iter(state.calib_feeds)


def _run_float_model(model: onnx.ModelProto, samples: list[dict]) -> None:
    """The float model must load and run in ONNX Runtime on the user's data before anything else."""
    try:
        session = make_session(model)
    except Exception as error:
        raise QCompileError(f"ONNX Runtime cannot load the model: {first_line(error)}") from None
    for index, feed in enumerate(samples):
        try:
            session.run(None, feed)
        except Exception as error:
            raise QCompileError(f"ONNX Runtime cannot run the model on sample {index}: {first_line(error)}") from None


def _is_torch_module(source) -> bool:
    return any(cls.__module__ == "torch.nn.modules.module" and cls.__name__ == "Module" for cls in type(source).__mro__)


def _calibrated_specs(plan_: QuantPlan):
    return [s for s in plan_.of_kind("activation") if s.fixed_range is None and s.same_as is None]


def _quantized_layers(plan_: QuantPlan, model: onnx.ModelProto, extra_nodes=frozenset()) -> list[tuple[str, str, str]]:
    """(node, op, first output) of each integer node group and each lookup-table node, in graph order."""
    consumers = {g.node for g in plan_.groups if g.node in plan_.integer} | set(extra_nodes)
    return [(n.name, n.op_type, n.output[0]) for n in model.graph.node if n.name in consumers]


def _coverage(state: CompileState) -> dict:
    """How much of the linear compute (MatMul / Gemm / Conv) was quantized, and why the rest was not."""
    plan_ = state.context.plan
    quantized = plan_.integer | state.lut_nodes
    linear = [n for n in state.reference.graph.node if n.op_type in intake.LINEAR_OPS]
    kept = {s.node: s.reason for s in plan_.skipped if s.op_type in intake.LINEAR_OPS}
    reasons: dict[str, int] = {}
    for node in linear:
        if node.name not in quantized:
            reason = kept.get(node.name, "weight not a constant, or quantization disabled by config")
            reasons[reason] = reasons.get(reason, 0) + 1
    inner = sum(state.intake.subgraph_linear_ops.values())
    if inner:
        reasons["inside an If / Loop / Scan body (not quantized)"] = inner
    return {"linear_ops": len(linear) + inner, "kept_float": sum(reasons.values()), "reasons": reasons}


def _plan_summary(plan_: QuantPlan) -> dict:
    tensors = []
    for spec in plan_.specs.values():
        params = plan_.params[spec.tensor]
        entry = spec.to_dict()
        entry["scale"] = _describe(params.scale)
        entry["zero_point"] = _describe(params.zero_point)
        tensors.append(entry)
    return {
        "tensors": tensors,
        "kept_float": [{"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in plan_.skipped],
    }


def _describe(values: np.ndarray):
    """A scalar as is; a per-channel vector as its range (the full vector lives in the model)."""
    if values.ndim == 0:
        return float(values) if values.dtype.kind == "f" else int(values)
    return {"channels": int(values.size), "min": float(values.min()), "max": float(values.max())}
