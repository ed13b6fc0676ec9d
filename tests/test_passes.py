"""Passes on a tiny hand-built attention-like graph: exact plan, exact rewrite, numerics vs NumPy."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.config import QuantConfig
from qcompile.errors import InternalError
from qcompile.numerics import INT8_SYMMETRIC, UINT8, fake_quantize
from qcompile.passes import DequantizeAfterGather, InsertQDQ, NormalizeGraph, PlanW8A8
from qcompile.pipeline import CompileContext, PassResult, Pipeline
from qcompile.plan import QuantParams
from qcompile.runtime import make_session

SHAPE = [1, 4, 8]
# A free sequence length, as text models are exported: ONNX Runtime then keeps MatMul and bias Add apart
# (test_placement covers the static shape, where it fuses them into a Gemm).
GRAPH_SHAPE = [1, "tokens", 8]


def attention_like_model(rng) -> onnx.ModelProto:
    """x -> MatMul(W) + b -> residual Add with x -> r;  y = Softmax(r r^T) r  (+ a mask-like broadcast Add)."""
    weight = rng.normal(size=(8, 8)).astype(np.float32)
    bias = rng.normal(size=(8,)).astype(np.float32)
    mask = np.zeros((1, 1, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),  # unnamed on purpose
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias_add"),
        helper.make_node("Add", ["hb", "x"], ["r"], name="residual_add"),
        helper.make_node("Transpose", ["r"], ["rt"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["r", "rt"], ["scores"], name="scores_matmul"),
        helper.make_node("Constant", [], ["mask"], name="mask_constant", value=numpy_helper.from_array(mask)),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "r"], ["y"], name="context_matmul"),
    ]
    graph = helper.make_graph(nodes, "attention_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, GRAPH_SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, GRAPH_SHAPE)],
                              [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def planned(model, **config):
    context = CompileContext.from_model(model, QuantConfig(**config))
    Pipeline([NormalizeGraph(), PlanW8A8()]).run(context)
    return context


def test_normalize_names_nodes_and_folds_constants(rng):
    context = CompileContext.from_model(attention_like_model(rng), QuantConfig())
    result = NormalizeGraph().run(context)
    assert result.changed == 2
    assert [node.name for node in context.graph.nodes][0] == "MatMul_0"
    assert "Constant" not in {node.op for node in context.graph.nodes}


def test_normalize_folds_weights_computed_from_constants():
    """ConstantOfShape weights (the ONNX light models) and Transpose(W) become initializers."""
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["filled"], value=numpy_helper.from_array(np.float32([0.5]))),
             helper.make_node("MatMul", ["x", "filled"], ["h"]),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                              [numpy_helper.from_array(np.int64([4, 3]), "shape"), numpy_helper.from_array(weight, "w")])
    context = CompileContext.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), QuantConfig())
    result = NormalizeGraph().run(context)
    assert [node.op for node in context.graph.nodes] == ["MatMul", "MatMul"]
    assert result.summary == "named 4 nodes, folded 0 Constant nodes and 2 constant subgraph nodes"
    first, second = (node.inputs[1] for node in context.graph.nodes)
    np.testing.assert_array_equal(first.values, np.full((4, 3), 0.5, np.float32))
    np.testing.assert_array_equal(second.values, weight.T)


def test_plan_lists_each_tensor_once_with_its_consumers(rng):
    plan = planned(attention_like_model(rng)).plan
    summary = {name: (s.kind, s.dtype, s.axis, s.consumers, s.fixed_range, s.same_as) for name, s in plan.specs.items()}
    # The residual Add reads the graph input and a float bias Add: as a QLinearAdd it would need two
    # extra QuantizeLinear nodes, so it stays float, and so does the Transpose of its output.
    assert summary == {
        "x": ("activation", "uint8", None, (("MatMul_0", 0),), None, None),
        "W": ("weight", "int8", 1, (("MatMul_0", 1),), None, None),
        "r": ("activation", "uint8", None, (("scores_matmul", 0), ("context_matmul", 1)), None, None),
        "rt": ("activation", "uint8", None, (("scores_matmul", 1),), None, None),
        "probs": ("activation", "uint8", None, (("context_matmul", 0),), (0.0, 1.0), None),
    }
    kept = {(s.node, s.op_type): s.reason for s in plan.skipped}
    assert set(kept) == {("bias_add", "Add"), ("mask_add", "Add"), ("softmax", "Softmax"), ("residual_add", "Add")}
    assert kept[("residual_add", "Add")].startswith("no input is an integer kernel's output")


def test_plan_respects_config_switches(rng):
    plan = planned(attention_like_model(rng), quantize_attention=False, quantize_residual_adds=False).plan
    assert set(plan.specs) == {"x", "W"}
    assert planned(attention_like_model(rng), acts="none").plan.of_kind("activation") == []


def test_insert_qdq_rewrites_exactly_and_matches_numpy(rng):
    model = attention_like_model(rng)
    context = planned(model)
    params = {name: QuantParams.make(0.05, 128, UINT8) for name in ("x", "r", "rt")}
    params["probs"] = QuantParams.make(1 / 255, 0, UINT8)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    weight_scale = np.abs(weight).max(axis=0) / 127
    params["W"] = QuantParams.make(weight_scale, np.zeros(8), INT8_SYMMETRIC)
    context.plan.params = params
    records = Pipeline([InsertQDQ()]).run(context)
    assert records[0].changed == 5
    rewritten = context.model

    ops = Counter(node.op_type for node in rewritten.graph.node)
    assert ops == Counter({"QuantizeLinear": 4, "DequantizeLinear": 5, "MatMul": 3, "Add": 3, "Transpose": 1, "Softmax": 1})
    quantized_weight = next(i for i in rewritten.graph.initializer if i.name == "W_quantized")
    assert quantized_weight.data_type == TensorProto.INT8
    assert all(i.name != "W" for i in rewritten.graph.initializer)  # float weight dropped

    x = rng.normal(size=SHAPE).astype(np.float32)

    def qdq(v, name):
        p = params[name]
        # float32 throughout, as ONNX Runtime computes: rounding ties must land the same way
        return fake_quantize(v.astype(np.float32), p.scale, p.zero_point.astype(np.float32),
                             INT8_SYMMETRIC if name == "W" else UINT8).astype(np.float32)

    hb = qdq(x, "x") @ qdq(weight, "W") + numpy_helper.to_array(model.graph.initializer[1])
    r = hb + x
    scores = qdq(r, "r") @ qdq(r.transpose(0, 2, 1), "rt")
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = qdq(probs, "probs") @ qdq(r, "r")
    # The graph's own semantics, unoptimised: agrees with NumPy to float rounding.
    unfused = make_session(rewritten, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    np.testing.assert_allclose(unfused, expected, rtol=1e-5, atol=1e-5)
    # Optimised, ORT fuses into integer kernels (accumulating in int32): within one step of r.
    fused = make_session(rewritten).run(None, {"x": x})[0]
    np.testing.assert_allclose(fused, expected, atol=float(params["r"].scale) * 1.01)


def test_pipeline_names_the_failing_pass_and_those_before_it(rng):
    class Broken:
        name = "broken"

        def run(self, context):
            context.graph.nodes[0].inputs.clear()  # leaves a MatMul without inputs
            return PassResult(1, "broke it")

    context = CompileContext.from_model(attention_like_model(rng), QuantConfig())
    with pytest.raises(InternalError, match=r"^pass broken \(passes before it: normalize-graph\): ValidationError: "
                                            r"Node\(MatMul_0\)"):
        Pipeline([NormalizeGraph(), Broken()]).run(context)


def test_pipeline_names_the_node_a_failing_pass_was_at(rng):
    class Crashing:
        name = "crashing"

        def run(self, context):
            for node in context.graph.nodes:
                if node.op == "Softmax":
                    return PassResult(len(node.inputs[7]), "")  # an index error of ours
            return PassResult(0, "")

    context = CompileContext.from_model(attention_like_model(rng), QuantConfig())
    with pytest.raises(InternalError, match=r"^pass crashing at node softmax \(passes before it: normalize-graph\): "
                                            r"IndexError: list index out of range$"):
        Pipeline([NormalizeGraph(), Crashing()]).run(context)


def gather_model(table_codes, scale, channel_axis, gather_axis, indices_shape):
    """W_q -> DequantizeLinear(axis) -> Gather(axis, indices) -> y."""
    attrs = {"axis": channel_axis} if channel_axis is not None else {}
    nodes = [helper.make_node("DequantizeLinear", ["W_q", "s", "z"], ["W"], name="dq", **attrs),
             helper.make_node("Gather", ["W", "idx"], ["y"], name="gather", axis=gather_axis)]
    zero_point = np.zeros_like(scale, dtype=np.int8)
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("idx", TensorProto.INT64, indices_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table_codes, "W_q"), numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(zero_point, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("channel_axis, gather_axis", [(1, 0), (0, 1), (None, 0)])
def test_dequantize_after_gather_is_exact(rng, channel_axis, gather_axis):
    codes = rng.integers(-127, 128, size=(7, 5)).astype(np.int8)
    scale = np.float32(0.1) if channel_axis is None else rng.uniform(0.01, 1, codes.shape[channel_axis]).astype(np.float32)
    model = gather_model(codes, scale, channel_axis, gather_axis, [2, 3])
    context = CompileContext.from_model(model, QuantConfig())
    records = Pipeline([DequantizeAfterGather()]).run(context)
    assert records[0].changed == 1
    assert [n.op_type for n in context.model.graph.node] == ["Gather", "DequantizeLinear"]
    gather = context.model.graph.node[0]
    assert gather.input[0] == "W_q" and gather.output[0] == "y_gathered_codes"
    indices = rng.integers(0, codes.shape[gather_axis], size=(2, 3)).astype(np.int64)
    expected = make_session(model).run(None, {"idx": indices})[0]
    np.testing.assert_array_equal(make_session(context.model).run(None, {"idx": indices})[0], expected)


def test_dequantize_after_gather_leaves_per_slice_scales_alone(rng):
    codes = rng.integers(-127, 128, size=(7, 5)).astype(np.int8)
    model = gather_model(codes, np.ones(7, np.float32), 0, 0, [3])  # each gathered row has its own scale
    context = CompileContext.from_model(model, QuantConfig())
    assert Pipeline([DequantizeAfterGather()]).run(context)[0].changed == 0


def test_plan_quantizes_embedding_tables_per_hidden_channel(rng):
    table = numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "idx"], ["y"], name="embed")], "embed",
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], [table])
    plan = planned(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])).plan
    assert {n: (s.kind, s.axis, s.consumers) for n, s in plan.specs.items()} == {"table": ("weight", 1, (("embed", 0),))}
