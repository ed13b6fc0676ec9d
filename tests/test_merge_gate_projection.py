"""MergeGateProjection on real exports of gated attention, and its refusal when there is no sibling."""
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile import models
from qcompile.config import QuantConfig
from qcompile.passes import MergeGateProjection, NormalizeGraph
from qcompile.pipeline import CompileContext, Pipeline
from qcompile.runtime import make_session


@pytest.mark.parametrize("name", ["tiny-vit-gated", "tiny-encoder-gated", "tiny-decoder-gated"])
def test_gate_projection_merges_exactly(name, tmp_path):
    model = onnx.load(str(models.export(name, tmp_path / "model.onnx")))
    context = CompileContext.from_model(model, QuantConfig())
    records = Pipeline([NormalizeGraph(), MergeGateProjection()]).run(context)
    blocks = len(models.get(name).build().blocks)
    assert records[1].changed == blocks
    before, after = Counter(n.op_type for n in model.graph.node), Counter(n.op_type for n in context.model.graph.node)
    assert after["MatMul"] == before["MatMul"] - blocks and after["Split"] == before["Split"] + blocks
    feed = models.get(name).samples("eval", 3)
    expected = make_session(model).run(None, feed)[0]
    np.testing.assert_allclose(make_session(context.model).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_gated_model_compiles_w8a8(tmp_path):
    name = "tiny-vit-gated"
    path = models.export(name, tmp_path / "model.onnx")
    artifact = qcompile.compile(path, QuantConfig(), calib=models.write_samples(name, "calib", 8, tmp_path / "c.npz"),
                                verify_data=models.write_samples(name, "eval", 4, tmp_path / "e.npz"))
    merged = [t for t in artifact.manifest["plan"]["tensors"] if t["tensor"].endswith("_merged_weight")]
    assert len(merged) == 4 and all(t["scale"]["channels"] == 3 * 64 + 4 for t in merged)  # QKV + 4 gate columns
    assert artifact.manifest["verification"]["outputs"]["logits"]["sqnr_db"] > 15


def test_a_gate_without_a_sibling_projection_is_left_alone_with_a_reason():
    weight = onnx.numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="gate"),
                               helper.make_node("Sigmoid", ["logits"], ["g"], name="sigmoid")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, [3, 2])], [weight])
    context = CompileContext.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), QuantConfig())
    assert Pipeline([MergeGateProjection()]).run(context)[0].changed == 0
    assert context.notes == [{"pass": "merge-gate-projection", "node": "sigmoid",
                              "note": "gate kept separate: no other projection reads its input"}]
