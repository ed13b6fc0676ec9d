"""A fixed, representative sample of the real-model corpus (benchmarks/corpus.py): ONNX backend test
models across folders, opsets (6 through 28) and IR versions (3 through 11), compiled from their own
test inputs, each checked for the outcome that is RIGHT for it, not merely for some one-line answer.

An "artifact" must load and run in ONNX Runtime and match the float model within the
quantization error (corpus.MIN_SQNR); a "clear error" is exit 2 with one `error: ` line on
stderr. Where both are right (a policy: fp16, already-quantized, sequence inputs), either passes;
an internal error, a traceback, a crash, a broken artifact or a mismatch never does.

Most cases run the CLI's main() in a forked child (same exit code and stderr as the executable,
without the 1.5 s import each); SUBPROCESS_CASES go through the installed `qcompile` executable.
The whole file takes well under a minute. `pytest tests/test_corpus.py -k Linear` runs one model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import corpus  # noqa: E402
import corpus_torchvision  # noqa: E402

ART = {"artifact"}
ERR = {"clear error"}
EITHER = {"artifact", "clear error"}

# (case, formats, right outcomes, why)
SAMPLE = [
    # pytorch-converted: IR 3 (initializers listed as graph inputs), opset 6, real weights
    ("pytorch-converted/test_Conv2d", "w8a8", ART, "IR 3 / opset 6 Conv with weights"),
    ("pytorch-converted/test_Conv3d_dilated_strided", "w8a8", ART, "3-D Conv"),
    ("pytorch-converted/test_Linear", "w8a8", ART,
     "opset-6 Gemm with the legacy broadcast attribute: onnx's version converter makes it run"),
    ("pytorch-converted/test_BatchNorm2d_eval", "w8a8", ART, "opset-6 BatchNormalization (is_test attribute)"),
    ("pytorch-converted/test_PReLU_2d", "w8a8", ART, "opset-6 PRelu with a weight"),
    ("pytorch-converted/test_PReLU_2d_multiparam", "w8a8", EITHER,
     "opset-6 PRelu with a [C] slope: onnx's converter keeps the shape, which opset-7 broadcasting rejects"),
    ("pytorch-converted/test_Embedding", "w8a8", ART, "Gather from a weight table"),
    ("pytorch-converted/test_MaxPool2d_stride_padding_dilation", "w8a8", ART, "IR 7 / opset 12"),
    ("pytorch-operator/test_operator_addmm", "w8a8", ART, "opset-6 Gemm from torch.addmm"),
    # node tests across opsets
    ("node/test_and_bcast4v3d", "w8a8", ART, "opset 7, bool tensors"),
    ("node/test_scan_sum", "w8a8", ERR, "opset-8 Scan: onnx's converter keeps the batch axis that opset 9 dropped, "
                                         "so the converted model fails in ONNX Runtime: one line saying so"),
    ("node/test_upsample_nearest", "w8a8", ART, "opset 9 Upsample"),
    ("node/test_scatter_with_axis", "w8a8", ART, "opset 10 Scatter (deprecated op)"),
    ("node/test_gemm_all_attributes", "w8a8", ART, "opset 13 Gemm, both operands activations"),
    ("node/test_if", "w8a8", ART, "If with tensor branches"),
    ("node/test_attention_4d_softcap_neginf_mask", "w8a8", ART, "-inf in an attention mask input"),
    ("node/test_equal_string", "w8a8", ART, "string inputs"),
    ("node/test_string_concat", "w8a8", ART, "string outputs (not compared by SQNR)"),
    ("node/test_reduce_l1_empty_set", "w8a8", ART, "an empty input tensor"),
    ("node/test_loop11", "w8a8", ART, "Loop"),
    ("node/test_constantofshape_int_shape_zero", "w8a8", EITHER, "an empty output"),
    ("node/test_if_opt", "w8a8", EITHER, "If over optional values"),
    ("node/test_split_to_sequence_1", "w8a8", EITHER, "a sequence output"),
    ("node/test_sequence_insert_at_back", "w8a8", EITHER, "sequence inputs (no .npz can hold them)"),
    ("node/test_attention_4d_fp16", "w8a8", EITHER, "a float16 model"),
    ("node/test_qlinearconv", "w8a8", EITHER, "already quantized (QLinearConv)"),
    ("node/test_dequantizelinear", "w8a8", EITHER, "already quantized (DequantizeLinear)"),
    ("node/test_adam", "w8a8", ERR, "training-domain op (ai.onnx.preview.training.Adam)"),
    ("node/test_lstm_batchwise", "w8a8", ERR, "ONNX Runtime has no kernel for LSTM layout=1: one line, no ORT log"),
    ("node/test_attention_4d_diff_heads_mask4d_padded_kv", "w8a8", ERR,
     "the float model fails in ONNX Runtime on its own test data: one line, no ORT log"),
    # simple, light
    ("simple/test_gradient_of_add", "w8a8", ERR, "training-domain Gradient op"),
    ("simple/test_sequence_model1", "w8a8", ART, "sequence ops inside the graph"),
    ("light/squeezenet", "w8a8", ART, "weights made by ConstantOfShape nodes"),
    ("light/squeezenet", "int4", ART, "ConstantOfShape weights folded into lookup-table weights"),
    # every weight format on opset 7-21 models with weights
    *[(case, fmt, ART, f"weight format {fmt}")
      for case in ("pytorch-converted/test_Conv2d", "pytorch-converted/test_Linear")
      for fmt in ("w8", "w4a8", "int4", "int4b32", "nl4")],
    ("node/test_gemm_all_attributes", "w8", ART, "weight-only int8, weights given as graph inputs"),
    ("node/test_gemm_all_attributes", "w4a8", ART, "int4 QDQ, weights given as graph inputs"),
    *[("node/test_gemm_all_attributes", fmt, EITHER, f"{fmt}: no constant weight to put in lookup tables")
      for fmt in ("int4", "int4b32", "nl4")],
    ("pytorch-converted/test_Embedding", "int4", ART, "embedding table as lookup-table weights"),
]
SUBPROCESS_CASES = [("pytorch-converted/test_Conv2d", "w8a8"), ("simple/test_gradient_of_add", "w8a8"),
                    ("node/test_lstm_batchwise", "w8a8")]


def _run(out: Path, pairs, mode: str) -> dict:
    """The corpus script on these (case, format) pairs, in a fresh process (it forks: better from a
    process that has run no other test), -> {(case, format): record}."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpus.py"), "--pairs",
                           ",".join(f"{case}@{fmt}" for case, fmt in pairs), "--exec", mode, "--jobs", "2",
                           "--timeout", "120", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())["records"]
    return {(record["case"], record["format"]): record for record in records}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("corpus"), [(case, fmt) for case, fmt, _, _ in SAMPLE], "fork")


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("corpus-cli"), SUBPROCESS_CASES, "subprocess")


def _explain(record: dict) -> str:
    return json.dumps({k: record.get(k) for k in ("outcome", "why", "error", "exit_code", "float_loads",
                                                  "float_runs_converted", "sqnr_db", "stderr_tail")}, indent=1, default=str)


@pytest.mark.parametrize("case,fmt,right,why", SAMPLE, ids=[f"{c.split('/')[1]}-{f}" for c, f, _, _ in SAMPLE])
def test_sample(results, case, fmt, right, why):
    record = results[(case, fmt)]
    assert record["outcome"] in right, f"{case} [{fmt}] ({why}): want {' or '.join(sorted(right))}\n{_explain(record)}"
    if record["outcome"] == "clear error":
        assert record["error"].startswith("error: ") and "\n" not in record["error"]


@pytest.mark.parametrize("case,fmt", SUBPROCESS_CASES, ids=[c.split("/")[1] for c, _ in SUBPROCESS_CASES])
def test_installed_executable(subprocess_results, case, fmt):
    """The real `qcompile` executable: same outcome as in the forked runs (one line on stderr)."""
    right = next(r for c, f, r, _ in SAMPLE if (c, f) == (case, fmt))
    record = subprocess_results[(case, fmt)]
    assert record["outcome"] in right, _explain(record)


def test_classification():
    """The outcome rules the corpus applies to a finished compile."""
    assert corpus.classify_exit(2, None, False, "error: bad input\n") == ("clear error", "")
    assert corpus.classify_exit(3, None, False, "internal error: phase x: KeyError: 'a' (a bug in qcompile)\n")[0] == "internal error"
    assert corpus.classify_exit(2, None, False, "[E:onnxruntime:, x.cc:1] boom\nerror: bad\n")[0] == "other"
    assert corpus.classify_exit(1, None, False, "Traceback (most recent call last):\n  ...\nKeyError: 'a'\n")[0] == "other"
    assert corpus.classify_exit(None, 11, False, "")[1] == "killed by SIGSEGV"
    assert corpus.classify_exit(None, None, True, "")[1] == "timeout"
    progress = "calibrating:  50%|#####     | 1/2 [00:00<00:00]\r\r" + " " * 20 + "\rerror: bad input\n"
    assert corpus.classify_exit(2, None, False, progress) == ("clear error", "")
    assert corpus.headline("Traceback (most recent call last):\n  File x\nValueError: no\n") == "ValueError: no"


def test_compare_output():
    import numpy as np

    x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100)
    assert corpus.compare_output([x], [x], "w8a8")["ok"]
    noisy = corpus.compare_output([x], [x + 0.01], "w8a8")
    assert noisy["ok"] and 30 < noisy["sqnr_db"] < 40
    assert not corpus.compare_output([x], [x * 0.5], "w8a8")["ok"]  # 6 dB
    assert not corpus.compare_output([x], [np.where(x > 0.9, np.nan, x)], "w8a8")["ok"]
    labels = np.arange(200)
    assert corpus.compare_output([labels], [labels], "w8a8")["ok"]
    assert not corpus.compare_output([labels], [labels[::-1]], "w8a8")["ok"]


@pytest.mark.skipif(corpus_torchvision.torchvision_spec() is None,
                    reason="torchvision not installed in .venv/torchvision (make setup installs it)")
def test_torchvision_exports(tmp_path):
    """resnet18 (random weights) from the legacy exporter at opset 13 and the dynamo exporter at 18
    (W8A8), and the legacy export with int4 lookup-table weights."""
    root = corpus.OUT / corpus.TORCHVISION
    statuses = corpus_torchvision.export_all(root, ["resnet18"], progress=None)
    assert all(s.get("ok") for s in statuses), statuses
    records = _run(tmp_path, [("torchvision/resnet18_legacy13", "w8a8"), ("torchvision/resnet18_dynamo18", "w8a8"),
                              ("torchvision/resnet18_legacy13", "int4")], "fork")
    for record in records.values():
        assert record["outcome"] == "artifact", _explain(record)


def test_script_runs(tmp_path):
    """The corpus script end to end on two models: tallies and results files."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpus.py"), "--folders", "simple",
                           "--match", "test_single_relu_model|test_gradient_of_add$", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["name"]: r["outcome"] for r in records} == {"test_single_relu_model": "artifact",
                                                           "test_gradient_of_add": "clear error"}
    assert "## By folder" in (tmp_path / "results.md").read_text()
