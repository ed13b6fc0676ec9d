import os

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A real PyTorch export of the tiny BERT sentence encoder, with real-text samples."""
    from qcompile import models

    folder = tmp_path_factory.mktemp("tiny_bert")
    model = models.export("tiny-bert", folder / "model.onnx")
    calib = models.write_samples("tiny-bert", "calib", 24, folder / "calib.npz")
    evaluation = models.write_samples("tiny-bert", "eval", 8, folder / "eval.npz")
    return {"model": model, "calib": calib, "eval": evaluation, "folder": folder}


def matmul_model():
    """y = x @ w with a dynamic batch axis: the smallest model with a weight and an activation."""
    import onnx
    from onnx import TensorProto, helper

    weight = onnx.numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.fixture
def rng():
    return np.random.default_rng(0)
