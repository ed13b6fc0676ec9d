"""Which W8A8 node groups cost accuracy, what keeping each float costs in speed, and the float set that
reaches a target.

* `GatedProbe`: the float model with every planned tensor fake-quantized at its calibrated parameters
  behind a switch: an activation goes x -> QuantizeLinear -> DequantizeLinear, and each planned reader
  takes Where(switch, dequantized, x); a weight becomes a graph input fed float or dequantized. One
  session scores any set of integer groups by feeding switches (int32 biases are left float: their
  rounding is far below the weights'). It runs the fake-quant arithmetic in float, not ONNX Runtime's
  integer kernels; the compile's verification measures the deployed model.
* `sensitivity`: per computing group (not a data-movement one), output SQNR when only it is quantized
  and when only it stays float (with the optional groups that drop out with it), scored in chunks on
  an executor (local pool, Ray) where the machine has cores to spare.
* `latency_costs`: per group, the run time keeping it float adds, read from ONNX Runtime's profiler:
  its float node(s) in the float model minus its integer kernel in the deployed model, plus the
  QuantizeLinear / DequantizeLinear its inputs and output then need, at the measured per-element rate;
  each node's fastest of PROFILE_RUNS runs, rounded to two significant digits.
* `keep_float`: groups ranked by the noise keeping them float removes per microsecond it costs; the
  shortest ranked prefix that reaches the target (bisection), then each chosen group, most expensive
  first, goes back to integer where the target still holds. Deterministic for given costs; the costs
  are timings, so two compiles agree unless a group's cost moves across a two-digit rounding step.
* `keep_float_for_metric`: the same ranking, and the shortest prefix whose deployed model keeps the
  user's own metric (`compile(target=fn, max_drop=d)`) within d of float, by bisection on that metric.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from .deployed import source_node
from .lut.executors import make_executor
from .lut.search import SqnrProbe
from .numerics import json_number, quantize
from .plan import QuantPlan
from .runtime import DETERMINISTIC_THREADS, make_session

PROFILE_RUNS = 20
HELD_OUT_ROUNDS = 8
MIN_RAISE_DB = 0.1
WORKER_START_SECONDS = 10.0  # a worker process imports qcompile and opens the probe session before scoring


@dataclass(frozen=True)
class GroupSensitivity:
    node: str
    op_type: str
    kernel: str
    quantized_alone_db: float  # output SQNR with only this group quantized
    float_alone_db: float  # with every other group quantized
    cost_us: float  # run time keeping it float adds (measured)
    noise_removed: float  # output noise power (relative to the signal) keeping only it float removes

    def to_dict(self) -> dict:
        return {**asdict(self), "quantized_alone_db": json_number(self.quantized_alone_db),
                "float_alone_db": json_number(self.float_alone_db), "cost_us": round(self.cost_us, 1),
                "noise_removed": float(f"{self.noise_removed:.3g}")}


@dataclass
class FloatSearch:
    """What `keep_float` chose and the points it measured on the way."""

    target_db: float | None  # None: a user metric's target (`metric`)
    full_db: float  # every group integer
    floated: dict[str, str] = field(default_factory=dict)  # group -> why it stays float
    sqnr_db: float = float("inf")
    held_out_db: float | None = None  # the deployed model's, on the held-out samples, where checked
    front: list[dict] = field(default_factory=list)  # {"floated", "cost_us", "sqnr_db" or "metric"} per measured set
    metric: dict | None = None  # target=: {"float", "max_drop", "required", "reached", "evaluations"}

    def to_dict(self) -> dict:
        return {**asdict(self), "full_db": json_number(self.full_db),
                "sqnr_db": json_number(self.sqnr_db),
                "held_out_db": None if self.held_out_db is None else json_number(self.held_out_db)}


class GatedProbe:
    """Output SQNR, on some feeds, of the float model with the tensors of a set of integer groups
    fake-quantized. `plan` must hold calibrated parameters for every spec of its integer groups."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, feeds: list[dict]):
        self.plan = plan
        self.model, self.defaults, self.quantized = _gated_model(model, plan)
        self.probe = SqnrProbe(self.model, self.defaults, feeds)

    def on(self, feeds: list[dict]) -> "GatedProbe":
        """The same gated model and session, scoring `feeds` instead."""
        other = copy.copy(self)
        other.probe = self.probe.on(feeds)
        return other

    def switches(self, integer: set[str], alone: bool = False) -> dict[str, np.ndarray]:
        """The inputs that quantize what the `integer` groups need (alone: exactly their own specs,
        without the optional groups that would drop out around them)."""
        specs = self.plan.specs_of(integer) if alone else self.plan.specs_of(self.plan.integer_groups(
            {g.node: "" for g in self.plan.groups if g.node not in integer})[0])
        return {name: value for (tensor, consumer), (name, value) in self.quantized.items()
                if tensor in specs and (consumer is None or consumer in specs[tensor].consumers)}

    def __call__(self, integer: set[str], alone: bool = False) -> float:
        return self.probe(self.switches(integer, alone))


def _gated_model(model: onnx.ModelProto, plan: QuantPlan):
    """The gated copy of `model`, its extra inputs' float defaults, and per (tensor, consumer) the
    input name and value that quantize it (consumer None: a weight, for all its planned readers)."""
    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    graph = gated.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    defaults, quantized, added = {}, {}, []
    for spec in plan.specs.values():
        params = plan.params[spec.tensor]
        readers = [(name, index) for name, index in dict.fromkeys(spec.consumers) if name in nodes]
        if spec.kind == "weight":
            values = numpy_helper.to_array(initializers[spec.tensor]).astype(np.float32)
            shape = [1] * values.ndim
            if spec.axis is not None:
                shape[spec.axis] = -1
            scale, zero = params.scale.reshape(shape), params.zero_point.reshape(shape).astype(np.float64)
            dequantized = ((quantize(values, scale, zero, spec.grid).astype(np.float64) - zero) * scale).astype(np.float32)
            name = f"{spec.tensor}::probe"
            graph.initializer.append(numpy_helper.from_array(values, name))
            defaults[name] = values
            quantized[(spec.tensor, None)] = (name, dequantized)
            for node_name, index in readers:
                nodes[node_name].input[index] = name
        elif spec.kind == "activation":
            base = f"{spec.tensor}::probe"
            graph.initializer.extend([numpy_helper.from_array(np.asarray(params.scale, np.float32), f"{base}_scale"),
                                      numpy_helper.from_array(np.asarray(params.zero_point), f"{base}_zero")])
            added += [helper.make_node("QuantizeLinear", [spec.tensor, f"{base}_scale", f"{base}_zero"], [f"{base}_q"],
                                       name=f"{base}_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero"], [f"{base}_dq"],
                                       name=f"{base}_DequantizeLinear")]
            for node_name, index in readers:
                switch = f"{base}::{node_name}::{index}"
                graph.input.append(helper.make_tensor_value_info(switch, TensorProto.BOOL, []))
                added.append(helper.make_node("Where", [switch, f"{base}_dq", spec.tensor], [f"{switch}_out"],
                                              name=f"{switch}_Where"))
                nodes[node_name].input[index] = f"{switch}_out"
                defaults[switch] = np.array(False)
                quantized[(spec.tensor, (node_name, index))] = (switch, np.array(True))
    graph.node.extend(added)
    return _sorted(gated), defaults, quantized


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (the probe nodes were appended at the end)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):  # a cycle or an input produced nowhere: keep ONNX's error
            ordered += remaining
            break
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def sensitivity(probe: GatedProbe, costs: dict[str, float], executor_name: str = "serial",
                workers: int | None = None) -> list[GroupSensitivity]:
    """Per integer group that computes (data-movement groups, a Reshape on the integer codes, are left
    out: they stay integer exactly while a neighbour does), sorted by how much SQNR keeping it float
    buys (most first)."""
    plan = probe.plan
    groups = [g for g in plan.groups if g.node in plan.integer and g.listed]
    sets = [probe.switches(plan.integer)] + [probe.switches({g.node}, alone=True) for g in groups]
    sets += [probe.switches(plan.integer - {g.node}) for g in groups]
    scores = score_sets(probe, sets, executor_name, workers)
    full, alone, without = scores[0], scores[1:len(groups) + 1], scores[len(groups) + 1:]
    result = [GroupSensitivity(g.node, g.op_type, g.kernel, a, w, costs.get(g.node, 0.0), _noise(full) - _noise(w))
              for g, a, w in zip(groups, alone, without)]
    return sorted(result, key=lambda s: -s.float_alone_db)


def score_sets(probe: GatedProbe, sets: list[dict], executor_name: str, workers: int | None) -> list[float]:
    """The probe's SQNR for each set of switched inputs: in this process where that takes less than
    starting workers would (a small model), else in chunks, one per worker."""
    if not sets:
        return []
    started = time.perf_counter()
    first = probe.probe(sets[0])
    # One session already runs on DETERMINISTIC_THREADS cores: more workers than cores / that only contend.
    default_workers = max(1, (os.cpu_count() or 1) // DETERMINISTIC_THREADS)
    chunks = max(1, min(len(sets) - 1, workers or default_workers)) if executor_name != "serial" else 1
    if chunks == 1 or (time.perf_counter() - started) * (len(sets) - 1) < WORKER_START_SECONDS * chunks:
        return [first] + [probe.probe(s) for s in tqdm(sets[1:], desc=f"scoring {len(sets)} group sets",
                                                     unit="set", leave=False)]
    model, rest = probe.model.SerializeToString(), sets[1:]
    tasks = [(model, probe.defaults, probe.probe.feeds, rest[i::chunks]) for i in range(chunks)]
    parts = make_executor(executor_name, workers).map(_score_chunk, tasks, f"scoring {len(sets)} group sets")
    scores = [0.0] * len(rest)
    for i, part in enumerate(parts):
        scores[i::chunks] = part
    return [first] + scores


def _score_chunk(model: bytes, defaults: dict, feeds: list[dict], sets: list[dict]) -> list[float]:
    probe = SqnrProbe(onnx.load_from_string(model), defaults, feeds)
    return [probe(s) for s in sets]


def latency_costs(float_model: onnx.ModelProto, deployed_model: onnx.ModelProto, plan: QuantPlan,
                  feed: dict) -> dict[str, float]:
    """Microseconds per run that keeping each integer group float adds (see the module docstring)."""
    float_times, float_elements = _profile(float_model, feed)
    integer_times, _ = _profile(deployed_model, feed, qdq_rate=True)
    rate = integer_times.pop("::qdq_us_per_element", 0.0)
    costs = {}
    for group in plan.groups:
        if group.node not in plan.integer:
            continue
        float_time = sum(float_times.get(name, 0.0) for name in (group.node, *group.absorbed))
        cost = max(0.0, float_time - integer_times.get(group.node, 0.0)) + rate * float_elements.get(group.node, 0)
        costs[group.node] = float(f"{cost:.2g}")  # two digits: run-to-run timing noise rarely reorders the groups
    return costs


def _profile(model: onnx.ModelProto, feed: dict, qdq_rate: bool = False) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds per node name (layout suffixes stripped), the fastest of PROFILE_RUNS runs, and each
    node's input + output element count; with qdq_rate, also the QuantizeLinear / DequantizeLinear
    microseconds per element under the key "::qdq_us_per_element"."""
    with tempfile.TemporaryDirectory(prefix="qcompile-profile-") as folder:
        session = make_session(model, profile_prefix=os.path.join(folder, "profile"))
        for _ in range(PROFILE_RUNS + 1):
            session.run(None, feed)
        with open(session.end_profiling()) as file:
            events = json.load(file)
    runs, elements, kinds = collections.defaultdict(list), {}, {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        args = event["args"]
        runs[node].append(event["dur"])
        elements[node] = sum(int(np.prod(next(iter(s.values()))))
                             for s in args.get("input_type_shape", []) + args.get("output_type_shape", []))
        kinds[node] = args.get("op_name")
    # The fastest run of each node: the other core's work only ever adds time.
    fastest = {node: float(min(durations)) for node, durations in runs.items()}
    times, counts = collections.defaultdict(float), collections.defaultdict(int)
    for node, duration in fastest.items():
        name = source_node(node)
        times[name] += duration
        counts[name] += elements[node]
    if qdq_rate:
        qdq = [node for node, kind in kinds.items() if kind in ("QuantizeLinear", "DequantizeLinear")]
        total = sum(elements[node] for node in qdq)
        times["::qdq_us_per_element"] = sum(fastest[node] for node in qdq) / total if total else 0.0
    return dict(times), dict(counts)


def keep_float(probe: GatedProbe, ranked: list[GroupSensitivity], target_db: float, full_db: float,
               held_out=None) -> FloatSearch:
    """The cheapest set of groups to keep float so that the probe (and `held_out`, if given: integer
    groups -> output SQNR on held-out samples) reaches `target_db`; every group float if nothing
    less does. full_db: the probe's SQNR with every group integer."""
    plan = probe.plan
    search = FloatSearch(target_db, full_db)
    order, costs = _float_order(ranked), {s.node: s.cost_us for s in ranked}

    measured: dict[frozenset, float] = {frozenset(): full_db}  # (the sensitivity pass scored other samples)
    search.front.append({"floated": 0, "cost_us": 0.0, "sqnr_db": json_number(full_db)})

    def measure(floated: list[str]) -> float:
        key = frozenset(floated)
        if key not in measured:
            measured[key] = probe(plan.integer - key)
            search.front.append({"floated": len(floated), "cost_us": round(sum(costs[n] for n in floated), 1),
                                 "sqnr_db": json_number(measured[key])})
        return measured[key]

    calibration_target = target_db
    floated: list[str] = []
    for _ in range(HELD_OUT_ROUNDS):  # a held-out shortfall raises the calibration target by it
        floated = _shortest_prefix(order, lambda k: measure(order[:k]) >= calibration_target)
        for node in sorted(floated, key=lambda n: -costs[n]):  # most expensive first back to integer
            trial = [n for n in floated if n != node]
            if measure(trial) >= calibration_target:
                floated = trial
        if held_out is None:
            break
        search.held_out_db = held_out(plan.integer - set(floated))
        if search.held_out_db >= target_db or len(floated) == len(order):
            break
        calibration_target += max(target_db - search.held_out_db, MIN_RAISE_DB)
    search.sqnr_db = measure(floated)
    search.floated = {node: f"kept float to reach the {target_db:g} dB output SQNR target (its sensitivity and cost: "
                            "report.html)" for node in floated}
    return search


def keep_float_for_metric(probe: GatedProbe, ranked: list[GroupSensitivity], full_db: float, metric_of,
                          float_metric: float, max_drop: float, full_metric: float) -> FloatSearch:
    """The shortest prefix of keep_float's ranking for which metric_of(integer groups), the user's metric
    of the deployed model, reaches float_metric - max_drop; every group if nothing less does.
    No pruning pass: each evaluation is a deployed session and the user's function. full_metric: the
    metric with every group integer."""
    plan = probe.plan
    search = FloatSearch(None, full_db)
    order, costs = _float_order(ranked), {s.node: s.cost_us for s in ranked}
    required = float_metric - max_drop
    values = {0: full_metric}
    search.front.append({"floated": 0, "cost_us": 0.0, "metric": full_metric})

    def value(length: int) -> float:
        if length not in values:
            values[length] = metric_of(plan.integer - set(order[:length]))
            search.front.append({"floated": length, "cost_us": round(sum(costs[n] for n in order[:length]), 1),
                                 "metric": values[length]})
        return values[length]

    floated = _shortest_prefix(order, lambda length: value(length) >= required)
    search.sqnr_db = probe(plan.integer - set(floated))
    search.metric = metric_record(float_metric, max_drop, value(len(floated)), len(values))
    search.floated = {node: f"kept float to keep the target metric within {max_drop:g} of float (its sensitivity "
                            "and cost: report.html)" for node in floated}
    return search


def metric_record(float_metric: float, max_drop: float, reached: float, evaluations: int) -> dict:
    """FloatSearch.metric: the user metric's float value, target, value as compiled and deployed models measured."""
    return {"float": float_metric, "max_drop": max_drop, "required": float_metric - max_drop, "reached": reached,
            "evaluations": evaluations}


def _float_order(ranked: list[GroupSensitivity]) -> list[str]:
    """Groups by the noise keeping them float removes per microsecond of run time it gives up. Those
    whose removal did not measurably help on the sensitivity samples follow, cheapest first: together
    they can still matter (on MiniLM at 30 dB, a third of the groups, left out, capped the search at
    27.9 dB), and every group floats if nothing less reaches the target."""
    gains = {s.node: max(s.noise_removed, 0.0) / max(s.cost_us, 1.0) for s in ranked}
    return [s.node for s in sorted(ranked, key=lambda s: (-gains[s.node], s.cost_us))]


def _shortest_prefix(order: list[str], reaches) -> list[str]:
    """The shortest prefix of `order` for which reaches(length) holds (all of it if none does),
    by bisection: floating more groups is taken to raise the SQNR."""
    if reaches(0):
        return []
    low, high = 0, len(order)  # reaches(low) fails; reaches(high) taken to hold
    while high - low > 1:
        middle = (low + high) // 2
        if reaches(middle):
            high = middle
        else:
            low = middle
    return order[:high]


def _noise(sqnr_db: float) -> float:
    """Noise power relative to the signal."""
    return 10.0 ** (-sqnr_db / 10.0) if np.isfinite(sqnr_db) else 0.0
