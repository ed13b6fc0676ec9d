"""Any exporter's model in: old opsets in every weight format, IR 3, -1 dims, torch modules; and
one clear error for what qcompile cannot compile."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile import QCompileError, QuantConfig
from qcompile.numerics import sqnr_db
from qcompile.runtime import make_session

FORMATS = {
    "w8a8": QuantConfig(),
    "int8-weights": QuantConfig(acts="none"),
    "int4-qdq": QuantConfig(weights="int4"),
    "int4-lut": QuantConfig(weights="affine", bits=4, acts="none"),
    "int4-block16": QuantConfig(weights="affine", bits=4, block=16, acts="none"),
    "nl4": QuantConfig(weights="nl", bits=4, acts="none", functions=("x", "sinh"), executor="serial"),
}


def cnn(opset: int, ir: int | None = None, batch=("N",), weights_as_inputs=False) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> MatMul + bias -> Relu -> Gemm(transB) -> Softmax(axis 1): ops whose
    attributes or semantics changed between opsets 7 and 21 (Softmax's axis meaning changed at 13)."""
    rng = np.random.default_rng(opset)
    weights = {"conv_w": rng.standard_normal((4, 3, 3, 3)) * 0.3, "conv_b": rng.standard_normal(4) * 0.1,
               "fc_w": rng.standard_normal((256, 16)) * 0.1, "fc_b": rng.standard_normal(16) * 0.1,
               "out_w": rng.standard_normal((10, 16)) * 0.3, "out_b": rng.standard_normal(10) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "fc_w"], ["m"]),
             helper.make_node("Add", ["m", "fc_b"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "out_w", "out_b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, 3, 8, 8])]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "cnn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, 10])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def images(count=24, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((count, 1, 3, 8, 8)).astype(np.float32)}


def float_outputs(model, batch):
    session = make_session(model)
    return np.concatenate([session.run(None, {"x": x})[0] for x in batch["x"]])


@pytest.mark.parametrize("opset", [7, 10, 12, 13, 17, 21])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_opset_compiles_in_every_weight_format(tmp_path, opset, fmt):
    model, config = cnn(opset), FORMATS[fmt]
    calib, held_out = images(), images(8, seed=1)
    artifact = qcompile.compile(model, config, calib=[{"x": x} for x in calib["x"]], verify_data=None)
    needed = 18 if config.lut_weights else 13
    opset_record = artifact.manifest["intake"]["opset"]
    assert (opset_record["from"], opset_record["to"]) == (opset, max(opset, needed))
    if opset < needed:  # the conversion was checked on the data, and the check is recorded
        assert opset_record["check"]["samples"] > 0 and opset_record["check"]["max_abs_diff"] < 1e-5
    saved = artifact.save(tmp_path / "out")
    loaded = qcompile.Artifact.load(saved)
    session = loaded.session()
    quantized = np.concatenate([session.run(None, {"x": x})[0] for x in held_out["x"]])
    # Against the original model at its own opset: the conversion and the quantization together.
    assert sqnr_db(float_outputs(model, held_out), quantized) > (20 if "8" in fmt else 10)


def test_ir3_initializers_listed_as_inputs_become_weights():
    model = cnn(9, ir=3, weights_as_inputs=True)
    artifact = qcompile.compile(model, QuantConfig(), calib=[{"x": x} for x in images()["x"]])
    assert artifact.manifest["intake"]["constants_from_inputs"] == 6
    weights = {t["tensor"] for t in artifact.manifest["plan"]["tensors"] if t["kind"] == "weight"}
    assert weights == {"conv_w", "fc_w", "out_w"}
    assert [i.name for i in artifact.model.graph.input] == ["x"]


def test_minus_one_batch_dim_is_dynamic():
    model = cnn(13, batch=(-1,))
    data = images(12)
    artifact = qcompile.compile(model, QuantConfig(), calib=[{"x": x} for x in data["x"]])
    assert artifact.manifest["verification"]["samples"] == 2  # 20% of 12 held out, each a batch of one


def test_a_torch_module_is_exported_and_compiled():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 5)

        def forward(self, image):
            return self.fc(torch.relu(self.conv(image)).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    data = np.random.default_rng(0).standard_normal((16, 2, 3, 12, 12)).astype(np.float32)
    artifact = qcompile.compile(net, QuantConfig(), calib=[{"image": x} for x in data], example_inputs=(data[0],))
    assert [i.name for i in artifact.model.graph.input] == ["image"]
    x = data[0]
    got = artifact.session().run(None, {"image": x})[0]
    assert sqnr_db(net(torch.from_numpy(x)).detach().numpy(), got) > 25


def with_node(op, inputs, outputs, domain="", opset=17, dtype=TensorProto.FLOAT, **attrs):
    node = helper.make_node(op, inputs, outputs, domain=domain, **attrs)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(i, dtype, [2]) for i in inputs if i],
                              [helper.make_tensor_value_info(o, dtype, [2]) for o in outputs])
    return helper.make_model(graph, opset_imports=imports)


def quantized_model():
    node_q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    node_dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    graph = helper.make_graph([node_q, node_dq], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def sequence_output_model():
    graph = helper.make_graph([helper.make_node("SequenceConstruct", ["x"], ["s"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def sequence_input_model():
    graph = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["n"])], "g",
                              [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("make, message", [
    (quantized_model, "the model is already quantized (1 DequantizeLinear, 1 QuantizeLinear); give qcompile the float model"),
    (lambda: with_node("Relu", ["x"], ["y"], dtype=TensorProto.FLOAT16),
     "the model computes in float16 (1 float16 inputs and weights)"),
    (sequence_input_model, "input 's' is a sequence, not a tensor"),
    (sequence_output_model, "output 's' is a sequence, not a tensor"),
])
def test_models_qcompile_cannot_compile_get_one_clear_error(make, message):
    with pytest.raises(QCompileError) as error:
        qcompile.compile(make(), QuantConfig(acts="none"))
    assert message in str(error.value)


def test_training_ops_are_refused():
    model = with_node("Adagrad", ["r", "t", "x", "g", "h"], ["x2", "h2"], domain="ai.onnx.preview.training")
    with pytest.raises(QCompileError, match="training ops \\(ai.onnx.preview.training.Adagrad\\)"):
        qcompile.compile(model, QuantConfig(acts="none"))


def test_linear_ops_inside_control_flow_are_counted_as_float():
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["branch"], then_branch=then_graph, else_branch=else_graph),
             helper.make_node("MatMul", ["branch", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
                               numpy_helper.from_array(np.float32(0), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    artifact = qcompile.compile(model, QuantConfig(acts="none"), verify_data=[{"x": np.ones((1, 4), np.float32)}])
    coverage = artifact.manifest["coverage"]
    assert coverage == {"linear_ops": 2, "kept_float": 1,
                        "reasons": {"inside an If / Loop / Scan body (not quantized)": 1}}
