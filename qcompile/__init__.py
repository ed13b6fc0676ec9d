"""qcompile: an ahead-of-time quantization compiler for ONNX models."""
__version__ = "0.1.0"

from .artifact import Artifact  # noqa: E402
from .compiler import compile  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import QCompileError  # noqa: E402

__all__ = ["Artifact", "QCompileError", "QuantConfig", "compile", "__version__"]
