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


@pytest.fixture
def rng():
    return np.random.default_rng(0)
