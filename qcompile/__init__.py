"""qcompile: an ahead-of-time quantization compiler for ONNX models."""
__version__ = "0.1.0"

from .artifact import Artifact  # noqa: E402
from .compiler import compile  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import QCompileError  # noqa: E402

__all__ = ["Artifact", "QCompileError", "QuantConfig", "compile", "qat", "__version__"]


def __getattr__(name: str):
    """`qcompile.qat` loads on first use: it needs PyTorch, the rest of qcompile does not."""
    if name == "qat":
        import importlib

        return importlib.import_module(".qat", __name__)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
