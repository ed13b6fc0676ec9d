"""W8A8 to a target: the gated probe against the deployed model, the float-set search, the floor."""
import subprocess
import sys

import numpy as np
import pytest

import qcompile
from qcompile import phases, sensitivity
from qcompile.compiler import QCompileWarning
from qcompile.data import batched, iterate_feeds
from qcompile.errors import BelowFloorError
from qcompile.runtime import make_session


def _calibrated(tiny_bert, **config):
    state = phases.CompileState(tiny_bert["model"], qcompile.QuantConfig(**config), tiny_bert["calib"],
                                tiny_bert["eval"])
    for phase in (phases.load, phases.normalize, phases.plan, phases.calibrate):
        phase(state)
    return state


def _sqnr(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((r.astype(np.float64) - o) ** 2)) for r, o in zip(reference, outputs))
    return 10 * np.log10(signal / noise)


def test_gated_probe_scores_sets_of_groups_as_the_deployed_model_computes(tiny_bert):
    state = _calibrated(tiny_bert)
    plan = state.context.plan
    feeds = list(batched(iterate_feeds(tiny_bert["eval"], state.inputs), state.inputs, 8))
    probe = sensitivity.GatedProbe(state.reference, plan, feeds)
    assert probe(set()) == float("inf")  # nothing quantized: the float model exactly
    float_session, deployed = make_session(state.reference), make_session(phases._deployed_model(state))
    reference = [out for feed in feeds for out in float_session.run(None, feed)]
    deployed_sqnr = _sqnr(reference, [out for feed in feeds for out in deployed.run(None, feed)])
    # Fake-quant in float against ONNX Runtime's integer kernels: the same rounding, other summation order.
    assert abs(probe(plan.integer) - deployed_sqnr) < 0.5
    matmul = next(g.node for g in plan.groups if g.kernel == "MatMulIntegerToFloat" and g.node in plan.integer)
    assert probe({matmul}, alone=True) > probe(plan.integer)
    # Floating a group removes the optional groups that were integer only for it: the switches follow the plan.
    integer, _ = plan.integer_groups({matmul: "test"})
    assert probe.switches(plan.integer - {matmul}) == probe.switches(integer)
    # On other feeds, the same session scores what a probe built for them does (the sensitivity pass's 16 samples).
    first = list(batched(iterate_feeds(tiny_bert["eval"], state.inputs), state.inputs, 1))[:1]
    assert probe.on(first)(plan.integer) == sensitivity.GatedProbe(state.reference, plan, first)(plan.integer)
    assert probe.on(first)(plan.integer) != probe(plan.integer)


def test_keep_float_reaches_the_target_with_no_group_to_spare(tiny_bert):
    state = _calibrated(tiny_bert)
    plan = state.context.plan
    probe = sensitivity.GatedProbe(state.reference, plan, phases._probe_feeds(state, phases._reiterable(state)))
    full = probe(plan.integer)
    phases.measure_sensitivity(state)
    # Every integer group that computes is scored; data-movement groups follow their neighbours.
    assert {s.node for s in state.sensitivity} == {g.node for g in plan.groups if g.node in plan.integer and g.listed}
    assert any(not g.listed for g in plan.groups if g.node in plan.integer)
    assert all(s.cost_us >= 0 for s in state.sensitivity)
    floats = [s.float_alone_db for s in state.sensitivity]
    assert floats == sorted(floats, reverse=True)
    target = full + 6.0
    search = sensitivity.keep_float(probe, state.sensitivity, target, full)
    assert search.full_db == full and search.sqnr_db >= target and search.floated
    assert probe(plan.integer - set(search.floated)) == search.sqnr_db
    for node in search.floated:  # each float group is needed: back to integer, the target fails
        assert probe(plan.integer - (set(search.floated) - {node})) < target


def test_compile_to_a_target_keeps_groups_float_and_says_which(tiny_bert):
    full = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(target_sqnr=0), calib=tiny_bert["calib"],
                            verify_data=tiny_bert["eval"]).manifest
    assert full["float_search"]["floated"] == {}
    target = full["verification"]["outputs"]["sentence_embedding"]["sqnr_db"] + 6.0
    manifest = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(target_sqnr=target), calib=tiny_bert["calib"],
                                verify_data=tiny_bert["eval"]).manifest
    floated = manifest["float_search"]["floated"]
    assert floated and manifest["verification"]["outputs"]["sentence_embedding"]["sqnr_db"] >= target
    kept = {s["node"]: s["reason"] for s in manifest["plan"]["kept_float"]}
    assert all("output SQNR target" in kept[node] for node in floated)
    assert {s["node"] for s in manifest["sensitivity"]} >= set(floated)


def test_an_output_below_the_floor_warns_and_strict_writes_nothing(tiny_bert, tmp_path):
    config = dict(target_sqnr=0, sqnr_floor=200.0)
    with pytest.warns(QCompileWarning, match=r"below the 200 dB floor; worst layers: .*rerun with --target-sqnr"):
        artifact = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(**config), calib=tiny_bert["calib"],
                                    verify_data=tiny_bert["eval"])
    assert "below the 200 dB floor" in artifact.manifest["warnings"][0]
    with pytest.raises(BelowFloorError, match="--strict: nothing written"):
        qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(**config, strict=True), calib=tiny_bert["calib"],
                         verify_data=tiny_bert["eval"])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "qcompile", "compile", str(tiny_bert["model"]), "--calib",
                             str(tiny_bert["calib"]), "--verify-data", str(tiny_bert["eval"]), "-o", str(out),
                             "--target-sqnr", "0", "--sqnr-floor", "200", "--strict"], capture_output=True, text=True)
    assert result.returncode == 4 and not out.exists()
    assert result.stderr.count("\n") == 1 and "below the 200 dB floor" in result.stderr


def test_a_collapsed_four_bit_model_does_not_end_silently(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "qcompile", "compile", str(tiny_bert["model"]), "--calib",
                             str(tiny_bert["calib"]), "--verify-data", str(tiny_bert["eval"]), "-o", str(out),
                             "--weights", "int2", "--acts", "none", "--sqnr-floor", "30"], capture_output=True, text=True)
    assert result.returncode == 0 and (out / "model.onnx").exists()
    assert "WARNING: output sentence_embedding has SQNR" in result.stderr
    assert "rerun with --weights auto --target-sqnr" in result.stderr


def test_analyze_sensitivity_ranks_every_group(tiny_bert, tmp_path):
    out = tmp_path / "analysis"
    result = subprocess.run([sys.executable, "-m", "qcompile", "analyze", str(tiny_bert["model"]), "--calib",
                             str(tiny_bert["calib"]), "-o", str(out), "--sensitivity"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import json

    groups = json.loads((out / "sensitivity.json").read_text())
    assert groups and all({"node", "float_alone_db", "quantized_alone_db", "cost_us"} <= set(g) for g in groups)
    assert "Sensitivity of the output to each node group" in (out / "report.html").read_text()



def _noise_metric(samples_path) -> callable:
    """A user metric: minus the output noise power relative to the float model's output (float: 0).
    It records the sessions it was given."""
    data = np.load(samples_path)
    feeds = [{name: data[name][i:i + 1] for name in data.files} for i in range(len(data[data.files[0]]))]
    reference = []

    def metric(session) -> float:
        outputs = [session.run(None, feed)[0] for feed in feeds]
        if not reference:  # the first call is the float model's
            reference.extend(outputs)
        metric.sessions.append(session)
        signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
        return -sum(float(np.sum((r.astype(np.float64) - o) ** 2)) for r, o in zip(reference, outputs)) / signal

    metric.sessions = []
    return metric


def test_compile_to_a_user_metric_floats_groups_until_it_holds(tiny_bert):
    full = qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(target_sqnr=0), calib=tiny_bert["calib"],
                            verify_data=tiny_bert["eval"]).manifest
    max_drop = 10 ** (-(full["verification"]["outputs"]["sentence_embedding"]["sqnr_db"] + 6.0) / 10)
    metric = _noise_metric(tiny_bert["eval"])
    artifact = qcompile.compile(tiny_bert["model"], calib=tiny_bert["calib"], verify_data=tiny_bert["eval"],
                                target=metric, max_drop=max_drop)
    search = artifact.manifest["float_search"]
    assert metric(make_session(artifact.model)) == search["metric"]["reached"] >= -max_drop  # what the search saw
    assert search["metric"]["float"] == 0.0 and search["metric"]["required"] == -max_drop and search["floated"]
    # Bisection over the ranked groups: the float model, all integer, then about log2(groups) prefixes.
    groups = len(artifact.manifest["sensitivity"])
    assert len(metric.sessions) - 1 == search["metric"]["evaluations"] + 1 <= np.ceil(np.log2(groups)) + 4
    assert search["metric"]["evaluations"] == len(search["front"])
    shorter = max(p["floated"] for p in search["front"] if p["floated"] < len(search["floated"]))
    assert next(p["metric"] for p in search["front"] if p["floated"] == shorter) < -max_drop


@pytest.mark.parametrize("kwargs, config, message", [
    ({"target": lambda session: 1.0}, {}, "max_drop must be a finite number >= 0"),
    ({"target": lambda session: 1.0, "max_drop": -1}, {}, "max_drop must be a finite number >= 0"),
    ({"max_drop": 0.1}, {}, "target must be a function session -> float"),
    ({"target": lambda session: 1.0, "max_drop": 0.1}, {"target_sqnr": 20}, "target_sqnr or target=, not both"),
    ({"target": lambda session: 1.0, "max_drop": 0.1}, {"acts": "none"}, "it needs acts='int8'"),
    ({"target": lambda session: float("nan"), "max_drop": 0.1}, {}, "must return a finite number, got nan"),
    ({"target": lambda session: 1 / 0, "max_drop": 0.1}, {}, "the target metric raised ZeroDivisionError: division by zero"),
])
def test_a_bad_user_metric_is_a_one_line_error(tiny_bert, kwargs, config, message):
    with pytest.raises(qcompile.QCompileError, match=message):
        qcompile.compile(tiny_bert["model"], qcompile.QuantConfig(**config), calib=tiny_bert["calib"],
                         verify_data=tiny_bert["eval"], **kwargs)


def test_groups_that_did_not_measurably_help_are_floated_last_cheapest_first():
    """The ranking holds every group, so that the search can float all of them if nothing less reaches
    the target: helpful groups by noise removed per microsecond, then the rest by cost."""
    def group(node, noise_removed, cost_us):
        return sensitivity.GroupSensitivity(node, "MatMul", "MatMulIntegerToFloat", 20.0, 20.0, cost_us, noise_removed)

    ranked = [group("no_gain_dear", 0.0, 50.0), group("small_gain", 1e-4, 10.0), group("no_gain_cheap", -1e-5, 5.0),
              group("big_gain", 1e-3, 10.0)]
    assert sensitivity._float_order(ranked) == ["big_gain", "small_gain", "no_gain_cheap", "no_gain_dear"]
