"""--weights auto: per-layer formats for a target output SQNR or a size budget, on a small CNN with a
depthwise Conv (rows of 9 weights) exported from PyTorch."""
import numpy as np
import onnx
import pytest

import qcompile
from qcompile.cli import _weight_format
from qcompile.data import batched, model_input_specs
from qcompile.phases import PROBE_SAMPLES
from qcompile.runtime import make_session

STORED = ("_codes", "_scale", "_zero", "_t", "_grid")  # what InsertLutWeights stores for a weight


@pytest.fixture(scope="module")
def cnn():
    import torch

    from qcompile.torch_export import export_for_compile

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pointwise = torch.nn.Conv2d(16, 64, 1)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, image):
            x = torch.relu(self.stem(image))
            x = torch.relu(self.pointwise(torch.relu(self.depthwise(x))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((48, 1, 3, 12, 12)).astype(np.float32)
    model = export_for_compile(Net().eval(), (images[0],))
    return {"model": model, "calib": [{"image": x} for x in images[:40]], "eval": [{"image": x} for x in images[40:]]}


def compile_auto(cnn, **goal):
    config = qcompile.QuantConfig(weights="auto", acts="none", workers=1, **goal)
    return qcompile.compile(cnn["model"], config, calib=cnn["calib"], verify_data=cnn["eval"])


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


def test_the_budget_holds_for_the_bytes_the_artifact_stores(cnn):
    artifact = compile_auto(cnn, size_budget=0.3)
    mixed = artifact.manifest["lut_weights"]["mixed"]
    stored = initializers(artifact.model)
    for choice in mixed["choices"]:
        tensor = choice["tensor"]
        names = [tensor] if choice["format"] == "float" else [tensor + suffix for suffix in STORED]
        assert sum(stored[name].nbytes for name in names if name in stored) == choice["bytes"], choice
    assert sum(c["bytes"] for c in mixed["choices"]) == mixed["bytes"] <= 0.3 * mixed["float_bytes"]
    assert mixed["bytes_fraction"] == pytest.approx(mixed["bytes"] / mixed["float_bytes"])
    # The last point of the front within the budget (the next one is over it), or a fill of it that
    # measured better.
    front, point = mixed["front"], mixed["front_point"]
    assert front[point]["bytes_fraction"] <= 0.3 < front[point + 1]["bytes_fraction"]
    if mixed["detour"] and mixed["detour"]["chosen"]:
        assert front[point]["measured_sqnr_db"] < mixed["detour"]["measured_sqnr_db"]
        assert mixed["bytes_fraction"] == mixed["detour"]["bytes_fraction"]
    else:
        assert mixed["bytes_fraction"] == front[point]["bytes_fraction"]
    # Float layers stay in the graph as they were and are not lookup-table nodes.
    kept = {c["tensor"] for c in mixed["choices"] if c["format"] == "float"}
    assert kept.isdisjoint(layer["tensor"] for layer in artifact.manifest["lut_weights"]["layers"])
    assert "the front of per-layer formats" in artifact.report_html
    again = compile_auto(cnn, size_budget=0.3).manifest["lut_weights"]["mixed"]
    assert again == mixed  # deterministic


def test_a_target_is_reached_on_the_probe_with_the_cheapest_measured_point(cnn):
    target = 30.0
    artifact = compile_auto(cnn, target_sqnr=target)
    summary = artifact.manifest["lut_weights"]
    mixed = summary["mixed"]
    points = mixed["front"] + ([mixed["detour"]] if mixed["detour"] else [])
    reached = [p for p in points if isinstance(p["measured_sqnr_db"], float) and p["measured_sqnr_db"] >= target]
    chosen = min(reached, key=lambda p: p["bytes_fraction"])  # nearest-entry codes
    assert chosen["bytes_fraction"] == mixed["bytes_fraction"] < 1.0 and summary["bits"] is None
    assert summary["sqnr_db"] >= target  # then GPTQ's codes for the Gemm
    # The recorded SQNR is the artifact's own on the probe's calibration samples.
    specs = model_input_specs(cnn["model"])
    feeds = list(batched(iter(cnn["calib"][:PROBE_SAMPLES]), specs, 16))
    reference = np.concatenate([make_session(cnn["model"]).run(None, f)[0] for f in feeds]).astype(np.float64)
    quantized = np.concatenate([artifact.session().run(None, f)[0] for f in feeds]).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2))
    assert sqnr == pytest.approx(summary["sqnr_db"], abs=0.05)


def test_short_depthwise_rows_never_store_more_than_float(cnn):
    mixed = compile_auto(cnn, size_budget=0.5).manifest["lut_weights"]["mixed"]
    depthwise = next(c for c in mixed["choices"] if "depthwise" in c["tensor"])
    assert depthwise["format"] in ("float", "table2", "table3") or depthwise["format"].startswith("affine")
    for choice in mixed["choices"]:
        weight = next(i for i in cnn["model"].graph.initializer if i.name == choice["tensor"])
        float_bytes = 4 * int(np.prod(weight.dims))
        assert choice["bytes"] == float_bytes if choice["format"] == "float" else choice["bytes"] < float_bytes


@pytest.mark.parametrize("settings, message", [
    (dict(weights="auto", acts="none"), "exactly one of --target-sqnr DB and --size-budget"),
    (dict(weights="auto", acts="none", target_sqnr=20.0, size_budget=0.2), "exactly one of"),
    (dict(weights="auto", target_sqnr=20.0), "it needs --acts none"),
    (dict(weights="table", acts="none", size_budget=0.2), "--size-budget needs --weights auto"),
    (dict(weights="auto", acts="none", size_budget=1.5), r"a fraction in \(0, 1\]"),
    (dict(weights="affine", acts="none", target_sqnr=20.0), "--target-sqnr needs --acts int8 with int8/int4/none weights"),
])
def test_settings_that_do_not_go_together_are_refused(settings, message):
    with pytest.raises(qcompile.QCompileError, match=message):
        qcompile.QuantConfig(**settings)


def test_a_budget_below_every_format_and_missing_data_are_clear_errors(cnn):
    with pytest.raises(qcompile.QCompileError, match=r"below the smallest size the formats reach: 0\.\d+ of the float"):
        compile_auto(cnn, size_budget=0.01)
    with pytest.raises(qcompile.QCompileError, match="--weights auto measures output SQNR on calibration data"):
        qcompile.compile(cnn["model"], qcompile.QuantConfig(weights="auto", acts="none", target_sqnr=20.0),
                         verify_data=cnn["eval"])
    assert _weight_format("auto", None, None, "none") == ("auto", (4, 4))
    with pytest.raises(qcompile.QCompileError, match="drop --bits"):
        _weight_format("auto", "4", None, "none")


def test_the_command_line_compiles_to_a_budget_and_refuses_a_missing_goal(tiny_bert, tmp_path):
    import json
    import subprocess
    import sys

    def qcompile_cli(*args):
        return subprocess.run([sys.executable, "-m", "qcompile", "compile", tiny_bert["model"], "--calib", tiny_bert["calib"],
                               "--acts", "none", "--weights", "auto", "--workers", "1", *map(str, args)],
                              capture_output=True, text=True)

    result = qcompile_cli("-o", tmp_path / "out", "--size-budget", "0.2")
    assert result.returncode == 0, result.stderr
    mixed = json.loads((tmp_path / "out" / "manifest.json").read_text())["lut_weights"]["mixed"]
    assert mixed["bytes"] <= 0.2 * mixed["float_bytes"]
    assert "mixed-width lookup tables" in result.stdout
    assert f"--weights auto: {mixed['bytes_fraction']:.4f} of the float weight bytes" in result.stdout
    missing = qcompile_cli("-o", tmp_path / "x")
    assert missing.returncode == 2 and "exactly one of --target-sqnr DB and --size-budget" in missing.stderr
