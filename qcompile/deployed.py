"""What ONNX Runtime makes of a model: which compute nodes run as integer kernels.

Read from the graph ONNX Runtime itself optimizes (`SessionOptions.optimized_model_filepath`,
the optimization level deployed sessions use), not from a model of its fusion rules. Fused nodes
keep the original node's name, with suffixes: `_token_N` where the layout transformer rewrote it, and
the fusion's name (`/MatMulAddFusion` where a MatMul and its bias Add became one Gemm,
`/MatmulTransposeFusion/`, ...), so each Conv / MatMul / Gemm of the artifact is looked up by name.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from .runtime import make_session

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
INTEGER_KERNELS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
                   "DynamicQuantizeMatMul", "QGemm", "QAttention", "NhwcQLinearConv"}
_FUSION_SUFFIX = re.compile(r"(/+\w+Fusion/*)*(_token_\d+)?$")


def source_node(optimized_name: str) -> str:
    """The name of the node an optimized-graph node came from."""
    return _FUSION_SUFFIX.sub("", optimized_name)


@dataclass(frozen=True)
class DeployedKernels:
    """Per compute op type: the nodes, and the kernel each became (None: not found after fusion)."""

    kernels: dict[str, dict[str, str | None]]  # op type -> node name -> kernel op type

    def integer(self, op_type: str) -> list[str]:
        return [node for node, kernel in self.kernels.get(op_type, {}).items() if kernel in INTEGER_KERNELS]

    def float_nodes(self) -> dict[str, str]:
        """Compute nodes that did not become integer kernels -> what they run as."""
        return {node: kernel or "fused into a float node" for nodes in self.kernels.values()
                for node, kernel in nodes.items() if kernel not in INTEGER_KERNELS}

    def fused_share(self) -> float:
        total = sum(len(nodes) for nodes in self.kernels.values())
        return sum(len(self.integer(op)) for op in self.kernels) / total if total else 1.0

    def summary(self) -> str:
        """`48/50 Conv as QLinearConv, 1/1 Gemm as QGemm`."""
        parts = []
        for op_type, nodes in self.kernels.items():
            kinds = sorted({kernel for kernel in nodes.values() if kernel in INTEGER_KERNELS})
            parts.append(f"{len(self.integer(op_type))}/{len(nodes)} {op_type} as {' or '.join(kinds) or 'integer kernels'}")
        return ", ".join(parts) or "no Conv/MatMul/Gemm"

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "fused_share": round(self.fused_share(), 4),
                "by_op": {op: {"nodes": len(nodes), "integer": len(self.integer(op))} for op, nodes in self.kernels.items()},
                "float": self.float_nodes()}


def deployed_kernels(model: onnx.ModelProto | str | Path) -> DeployedKernels:
    """Open `model` in an ONNX Runtime CPU session at full optimization and map each compute node
    to the kernel it runs as."""
    return deployed_session(model)[1]


def deployed_session(model: onnx.ModelProto | str | Path) -> tuple[ort.InferenceSession, DeployedKernels]:
    """The session deployment opens (verification runs it too), and what it made of each compute node."""
    source = model if isinstance(model, onnx.ModelProto) else str(model)
    graph = (model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)).graph
    session, optimized = _optimized(source, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    became = {}
    for node in optimized.node:
        became.setdefault(source_node(node.name), node.op_type)
    kernels: dict[str, dict[str, str | None]] = {}
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            kernels.setdefault(node.op_type, {})[node.name] = became.get(node.name)
    return session, DeployedKernels(kernels)


def gemm_fused_matmuls(model: onnx.ModelProto) -> set[str]:
    """The MatMul nodes of `model` that ONNX Runtime's MatMulAddFusion turns, with the Add that reads
    them, into a Gemm (it does where the input's shape is static, or the input is 2-D). Their integer
    kernel is then QGemm, which takes the bias only as int32 from a DequantizeLinear; a float bias
    leaves the Gemm float, every DequantizeLinear before it running on each call."""
    _, optimized = _optimized(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    matmuls = {node.name for node in model.graph.node if node.op_type == "MatMul"}
    return {source_node(node.name) for node in optimized.node
            if node.op_type == "Gemm" and source_node(node.name) in matmuls}


def _optimized(model: onnx.ModelProto | str, level: ort.GraphOptimizationLevel) -> tuple[ort.InferenceSession, onnx.GraphProto]:
    """A session on `model` at `level`, and the graph ONNX Runtime made of it."""
    with tempfile.TemporaryDirectory(prefix="qcompile-optimized-") as folder:
        optimized_path = Path(folder) / "optimized.onnx"
        session = make_session(model, optimization=level, optimized_path=optimized_path)
        return session, onnx.load(str(optimized_path), load_external_data=False).graph
