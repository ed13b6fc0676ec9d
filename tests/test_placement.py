"""W8A8 placement against ONNX Runtime's real CPU fusions: for each pattern, a small model, the exact
plan, the integer kernels ONNX Runtime builds from the artifact (read from its optimized graph), and
the artifact's agreement with float."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.calibration import BIAS_LIMIT
from qcompile.deployed import deployed_kernels
from qcompile.numerics import sqnr_db
from qcompile.runtime import make_session

CHANNELS = 8


def _conv(name, source, output, rng, channels_in=CHANNELS, bias=True, scale=0.3):
    weight = numpy_helper.from_array((rng.standard_normal((CHANNELS, channels_in, 3, 3)) * scale).astype(np.float32), f"{name}_w")
    inputs = [source, weight.name]
    initializers = [weight]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32), f"{name}_b"))
        inputs.append(f"{name}_b")
    return helper.make_node("Conv", inputs, [output], name=name, pads=[1, 1, 1, 1]), initializers


def _model(nodes_and_initializers, outputs, opset=13, extra_initializers=()):
    nodes, initializers = [], list(extra_initializers)
    for item in nodes_and_initializers:
        node, inits = item if isinstance(item, tuple) else (item, [])
        nodes.append(node)
        initializers += inits
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _samples(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def _compile(model, **config):
    return qcompile.compile(model, qcompile.QuantConfig(**config), calib=_samples(16), verify_data=_samples(4, seed=1))


def _measured_sqnr(float_model, quantized_model, samples):
    reference, quantized = make_session(float_model), make_session(quantized_model)
    pairs = [(reference.run(None, s)[0], quantized.run(None, s)[0]) for s in samples]
    return sqnr_db(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))


def _cnn(rng):
    """Conv -> Relu -> Conv -> Clip(0, 6) -> GlobalAveragePool -> Flatten -> Gemm (the graph output)."""
    gemm_weight = numpy_helper.from_array(rng.standard_normal((10, CHANNELS)).astype(np.float32), "fc_w")
    gemm_bias = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc_b")
    bounds = [numpy_helper.from_array(np.float32(0), "low"), numpy_helper.from_array(np.float32(6), "high")]
    return _model([
        _conv("conv1", "x", "c1", rng, channels_in=3),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        _conv("conv2", "r1", "c2", rng),
        helper.make_node("Clip", ["c2", "low", "high"], ["r2"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ], {"logits": [1, 10]}, extra_initializers=[gemm_weight, gemm_bias] + bounds)


def test_cnn_runs_as_integer_kernels_end_to_end(rng):
    model = _cnn(rng)
    artifact = _compile(model)
    plan = {t["tensor"]: t for t in artifact.manifest["plan"]["tensors"]}
    # Conv outputs are quantized behind their Relu / Clip (ORT drops those into the QuantizeLinear),
    # at zero point 0 so that it can; the Flatten runs on the pool's codes, at the pool's scale.
    assert set(plan) == {"x", "conv1_w", "conv1_b", "r1", "conv2_w", "conv2_b", "r2", "pooled", "flat", "fc_w", "fc_b"}
    assert plan["r1"]["zero_point"] == 0 and plan["r2"]["zero_point"] == 0
    assert plan["flat"]["same_as"] == "pooled" and plan["flat"]["scale"] == plan["pooled"]["scale"]
    assert {plan[b]["dtype"] for b in ("conv1_b", "conv2_b", "fc_b")} == {"int32"}
    deployed = artifact.manifest["deployed"]
    assert deployed["summary"] == "2/2 Conv as QLinearConv, 1/1 Gemm as QGemm"
    assert deployed["fused_share"] == 1.0 and deployed["float"] == {}
    optimized_ops = _optimized_op_types(artifact.model)
    assert {"QLinearGlobalAveragePool", "QLinearConv", "QGemm"} <= optimized_ops
    assert not {"Relu", "Clip", "Conv", "Gemm"} & optimized_ops
    assert _measured_sqnr(model, artifact.model, _samples(4, seed=1)) > 25


def test_verification_scores_the_model_as_deployed(rng):
    """The manifest's output SQNR is the saved artifact's, not the layer probe's (ORT fuses nothing
    whose output is a graph output, so exposing every layer would change the numbers)."""
    model = _cnn(rng)
    artifact = _compile(model)
    reported = artifact.manifest["verification"]["outputs"]["logits"]["sqnr_db"]
    assert reported == pytest.approx(_measured_sqnr(model, artifact.model, _samples(4, seed=1)), abs=1e-3)
    layers = {layer["node"] for layer in artifact.manifest["verification"]["layers"]}
    assert layers == {"conv1", "conv2", "pool", "flatten", "fc"}


def _optimized_op_types(model):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        make_session(model, optimized_path=Path(folder) / "o.onnx")
        return {node.op_type for node in onnx.load(str(Path(folder) / "o.onnx")).graph.node}


def test_batch_norm_and_channel_scales_are_folded_into_their_conv(rng):
    """Conv -> BatchNormalization -> Mul(per-channel) -> Add(per-channel) (PaddlePaddle's exports)
    becomes one Conv, exactly; the Mul by a [1, C, 1, 1] scale spanning 1e-3..1e2 would otherwise
    rescale a per-tensor-quantized Conv output."""
    norm = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
            (("gamma", rng.uniform(0.5, 2, CHANNELS)), ("beta", rng.standard_normal(CHANNELS)),
             ("mean", rng.standard_normal(CHANNELS)), ("var", rng.uniform(0.1, 3, CHANNELS)),
             ("channel_scale", np.geomspace(1e-3, 1e2, CHANNELS).reshape(1, CHANNELS, 1, 1)),
             ("channel_shift", rng.standard_normal((CHANNELS, 1, 1))))]
    model = _model([_conv("conv1", "x", "c1", rng, channels_in=3),
                    helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
                    helper.make_node("Mul", ["channel_scale", "bn"], ["scaled"], name="scale"),
                    helper.make_node("Add", ["scaled", "channel_shift"], ["shifted"], name="shift"),
                    helper.make_node("Relu", ["shifted"], ["r1"], name="relu1"),
                    _conv("conv2", "r1", "y", rng)], {"y": [1, CHANNELS, 16, 16]}, extra_initializers=norm)
    artifact = _compile(model, acts="none", weights="none")  # the folded float model, nothing quantized
    assert [node.op_type for node in artifact.model.graph.node] == ["Conv", "Relu", "Conv"]
    for sample in _samples(3):
        np.testing.assert_allclose(make_session(artifact.model).run(None, sample)[0],
                                   make_session(model).run(None, sample)[0], rtol=1e-4, atol=1e-4)
    quantized = _compile(model)
    assert quantized.manifest["deployed"]["by_op"]["Conv"]["integer"] == 1  # conv2 writes the graph output
    assert [s["node"] for s in quantized.manifest["plan"]["kept_float"]] == ["conv2"]
    assert quantized.manifest["passes"][1] == {"name": "fold-conv-affine", "changed": 3,
                                               "summary": "folded 3 BatchNormalization / Mul / Add nodes into their Conv"}


def test_a_conv_writing_a_graph_output_stays_float_with_a_float_weight(rng):
    model = _model([_conv("conv1", "x", "y", rng, channels_in=3)], {"y": [1, CHANNELS, 16, 16]})
    artifact = _compile(model)
    assert artifact.manifest["plan"]["tensors"] == []
    assert [n.op_type for n in artifact.model.graph.node] == ["Conv"]
    assert artifact.manifest["plan"]["kept_float"][0]["reason"].startswith("its output is a graph output")
    assert artifact.manifest["deployed"]["summary"] == "0/1 Conv as integer kernels"


def test_float_only_ops_get_no_quantization_that_buys_nothing(rng):
    """Conv -> HardSwish -> Conv: HardSwish runs in float; the residual Add feeding only a float
    Softmax stays float, while the Add feeding a Conv is a QLinearAdd."""
    model = _model([
        _conv("conv1", "x", "c1", rng, channels_in=3),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hardswish"),
        _conv("conv2", "h1", "c2", rng),
        helper.make_node("Add", ["c1", "c2"], ["sum"], name="residual_to_conv"),
        _conv("conv3", "sum", "c3", rng),
        helper.make_node("Add", ["c3", "sum"], ["sum2"], name="residual_to_softmax"),
        helper.make_node("Softmax", ["sum2"], ["y"], name="softmax", axis=1),
    ], {"y": [1, CHANNELS, 16, 16]}, opset=14)
    artifact = _compile(model)
    kept = {s["node"]: s["reason"] for s in artifact.manifest["plan"]["kept_float"]}
    assert set(kept) == {"hardswish", "residual_to_softmax", "softmax"}
    assert kept["residual_to_softmax"].startswith("no integer kernel reads its output")
    assert artifact.manifest["deployed"]["summary"] == "3/3 Conv as QLinearConv"
    assert "QLinearAdd" in _optimized_op_types(artifact.model)
    assert _measured_sqnr(model, artifact.model, _samples(4, seed=1)) > 20


def test_gemm_output_read_by_float_and_integer_nodes_is_quantized_for_all():
    """A Gemm whose output feeds an integer Gemm and a float HardSigmoid: ONNX Runtime fuses the
    first Gemm only if every reader of its output goes through a QuantizeLinear."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 48)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
               numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w2"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2")]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["g1"], name="fc1", transB=1),
             helper.make_node("HardSigmoid", ["g1"], ["gate"], name="hardsigmoid", alpha=1 / 6),
             helper.make_node("Gemm", ["g1", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("gate", TensorProto.FLOAT, [1, 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    samples = [{"x": np.random.default_rng(i).standard_normal((1, 3, 4, 4)).astype(np.float32)} for i in range(20)]
    artifact = qcompile.compile(model, qcompile.QuantConfig(), calib=samples[:16], verify_data=samples[16:])
    g1 = next(t for t in artifact.manifest["plan"]["tensors"] if t["tensor"] == "g1")
    assert sorted(map(tuple, g1["consumers"])) == [("fc2", 0), ("hardsigmoid", 0)]
    assert artifact.manifest["deployed"]["summary"] == "2/2 Gemm as QGemm"


def test_weight_scales_are_floored_so_int32_biases_fit(rng):
    """A near-dead channel (weights ~1e-40, the MSE scale a denormal) with a real bias: the int32 bias
    must not overflow, so its weight scale is raised and the output keeps the bias's value and sign."""
    weight = (rng.standard_normal((CHANNELS, 3, 3, 3)) * 0.3).astype(np.float32)
    weight[0] = 1e-40
    bias = np.full(CHANNELS, -2.0, np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                    helper.make_node("Relu", ["c"], ["r"], name="relu"),
                    helper.make_node("Add", ["r", "r"], ["y"], name="double")], {"y": [1, CHANNELS, 16, 16]},
                   extra_initializers=inits)
    artifact = _compile(model)
    initializers = {i.name: numpy_helper.to_array(i) for i in artifact.model.graph.initializer}
    assert np.abs(initializers["b_quantized"].astype(np.int64)).max() <= BIAS_LIMIT
    scales = initializers["w_scale"]
    assert scales.min() >= 1e-12
    sample = _samples(1, seed=3)[0]
    reference, quantized = make_session(model).run(None, sample)[0], make_session(artifact.model).run(None, sample)[0]
    np.testing.assert_allclose(quantized[:, 0], reference[:, 0], atol=1e-3)  # relu(-2) = 0 everywhere, not 2^31 garbage


def test_matmul_graphs_keep_their_integer_kernels():
    from conftest import matmul_model

    samples = [{"x": np.random.default_rng(i).standard_normal((1, 3)).astype(np.float32)} for i in range(10)]
    artifact = qcompile.compile(matmul_model(), qcompile.QuantConfig(), calib=samples[:8], verify_data=samples[8:])
    assert deployed_kernels(artifact.model).summary() == "1/1 MatMul as MatMulIntegerToFloat"
    weight_only = qcompile.compile(matmul_model(), qcompile.QuantConfig(acts="none"), verify_data=samples[8:])
    assert weight_only.manifest["deployed"]["summary"] == "0/1 MatMul as integer kernels"


def test_a_float_residual_add_before_layer_norm_becomes_sum():
    """ONNX Runtime would fuse Add + LayerNormalization into its slower SkipLayerNormalization; as
    Sum, the same values run as Sum + LayerNormalization."""
    rng = np.random.default_rng(0)
    shape = [1, 6, 16]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Add", ["h", "x"], ["residual"], name="residual_add"),
             helper.make_node("LayerNormalization", ["residual", "gamma", "beta"], ["y"], name="norm", axis=-1)]
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
               numpy_helper.from_array(np.ones(16, np.float32), "gamma"), numpy_helper.from_array(np.zeros(16, np.float32), "beta")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "SkipLayerNormalization" in _optimized_op_types(model)
    samples = [{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(10)]
    weight_only = qcompile.compile(model, qcompile.QuantConfig(acts="none", weights="none"), verify_data=samples)
    assert [n.op_type for n in weight_only.model.graph.node] == ["MatMul", "Sum", "LayerNormalization"]
    np.testing.assert_array_equal(make_session(weight_only.model).run(None, samples[0])[0],
                                  make_session(model, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
                                  .run(None, samples[0])[0])
    quantized = qcompile.compile(model, qcompile.QuantConfig(), calib=samples[:8], verify_data=samples[8:])
    optimized = _optimized_op_types(quantized.model)
    assert "SkipLayerNormalization" not in optimized and {"Sum", "LayerNormalization", "MatMulIntegerToFloat"} <= optimized


@pytest.mark.parametrize("opset, fused", [(13, ["Conv", "HardSigmoid", "Mul", "Conv"]), (14, ["Conv", "HardSwish", "Conv"])])
def test_spelled_out_hard_swish_becomes_one_or_two_ops(rng, opset, fused):
    """PaddlePaddle's x * Clip(x + 3, 0, 6) / 6 runs as x * HardSigmoid(x), or HardSwish from opset 14."""
    constants = [numpy_helper.from_array(np.float32(v), n) for n, v in (("three", 3), ("zero", 0), ("six", 6))]
    model = _model([_conv("conv1", "x", "c1", rng, channels_in=3),
                    helper.make_node("Add", ["c1", "three"], ["shifted"], name="add3"),
                    helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"], name="clip"),
                    helper.make_node("Mul", ["c1", "clipped"], ["product"], name="mul"),
                    helper.make_node("Div", ["product", "six"], ["h1"], name="div6"),
                    _conv("conv2", "h1", "y", rng)], {"y": [1, CHANNELS, 16, 16]}, opset=opset, extra_initializers=constants)
    artifact = _compile(model, acts="none", weights="none")
    assert [node.op_type for node in artifact.model.graph.node] == fused
    for sample in _samples(3):
        np.testing.assert_allclose(make_session(artifact.model).run(None, sample)[0], make_session(model).run(None, sample)[0],
                                   rtol=1e-4, atol=1e-4)
    quantized = _compile(model)
    assert quantized.manifest["deployed"]["summary"] == "1/2 Conv as QLinearConv"  # conv2 writes the graph output


def _linear_layers(shape):
    """x @ W1 + b1 (bias first in the Add) -> Relu -> x @ W2 + b2: nn.Linear as the exporters write it."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.3).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
               numpy_helper.from_array((rng.standard_normal((32, 16)) * 0.3).astype(np.float32), "w2"),
               numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["b1", "h1"], ["a1"], name="fc1_bias"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Add", ["h2", "b2"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape, kernel, biases", [
    ([1, 6, 16], "QGemm", {"b1": [["fc1_bias", 0]], "b2": [["fc2_bias", 1]]}),
    (["batch", "tokens", 16], "MatMulIntegerToFloat", {}),
])
def test_a_matmul_bias_add_is_int32_where_onnx_runtime_fuses_them_into_a_gemm(shape, kernel, biases):
    """At a static input shape ONNX Runtime's MatMulAddFusion makes MatMul + Add one Gemm, whose integer
    kernel (QGemm) takes the bias only as int32: a float bias left it a float Gemm on dequantized
    inputs (torchvision's ViT-S/16 ran at 1.9x float). With a free dimension it does not fuse, and the
    bias stays a float Add after MatMulIntegerToFloat."""
    model = _linear_layers(shape)
    samples = [{"x": np.random.default_rng(i).standard_normal((1, 6, 16)).astype(np.float32)} for i in range(20)]
    artifact = qcompile.compile(model, qcompile.QuantConfig(), calib=samples[:16], verify_data=samples[16:])
    assert artifact.manifest["deployed"]["summary"] == f"2/2 MatMul as {kernel}"
    int32 = {t["tensor"]: t["consumers"] for t in artifact.manifest["plan"]["tensors"] if t["dtype"] == "int32"}
    assert int32 == biases
    kept = {s["node"] for s in artifact.manifest["plan"]["kept_float"]}
    assert ("fc1_bias" in kept) == (not biases)
    assert _measured_sqnr(model, artifact.model, samples[16:]) > 35


def test_nodes_onnx_runtime_fused_are_found_under_their_fusion_suffixes():
    """ONNX Runtime names a fused node after the original plus the fusion ('scores/MatmulTransposeFusion/');
    what the float or the deployed model runs each MatMul as is looked up through that suffix."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["y"], name="scores")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert deployed_kernels(model).kernels == {"MatMul": {"scores": "FusedMatMul"}}
