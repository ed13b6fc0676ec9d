"""Any exporter's model in: what qcompile cannot compile is refused in one line, the rest is
brought to the form the passes expect, before any long work starts.

* refused: training ops, already-quantized models, float16/bfloat16 compute, non-tensor inputs
  or outputs (sequences, maps, optionals);
* initializers also listed as graph inputs (older exporters, IR < 4) become plain constants;
* the ai.onnx opset is raised to what the output needs (13: per-channel QuantizeLinear /
  DequantizeLinear; 18: the lookup-table fallback's bitwise ops) by onnx.version_converter, and
  the converted model is checked against the original on the sample data (the original in ONNX
  Runtime, or below opset 7, where it has no kernels, in onnx.reference);
* MatMul / Gemm / Conv inside If / Loop / Scan bodies are counted: they stay float.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import version_converter

from .errors import QCompileError, first_line
from .runtime import make_session

QDQ_OPSET = 13  # per-channel (axis) QuantizeLinear / DequantizeLinear
LUT_OPSET = 18  # BitShift / BitwiseAnd in the lookup-table fallback functions
TRAINING_DOMAINS = ("ai.onnx.preview.training", "ai.onnx.training", "com.microsoft.nchwc")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "MatMulNBits",
                 "DynamicQuantizeMatMul", "LutMatMul", "LutDequantize", "LutDequantizeConstant"}
HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
LINEAR_OPS = ("MatMul", "Gemm", "Conv")
CONVERSION_TOLERANCE = 1e-4  # relative to the output's largest magnitude


@dataclass
class Intake:
    """What was done to the model on the way in, for the manifest and the console."""

    opset_from: int
    opset_to: int
    conversion_check: dict | None = None  # {"samples", "reference", "max_abs_diff", "max_abs_output"} when converted
    constants_from_inputs: int = 0
    subgraph_linear_ops: dict = field(default_factory=dict)  # op type -> count inside control-flow bodies

    def to_dict(self) -> dict:
        return {"opset": {"from": self.opset_from, "to": self.opset_to, "check": self.conversion_check},
                "constants_from_inputs": self.constants_from_inputs,
                "subgraph_linear_ops": self.subgraph_linear_ops}


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise QCompileError("the model imports no ai.onnx opset")
    return versions[0]


def refuse_unsupported(model: onnx.ModelProto) -> None:
    """One-line errors for models qcompile cannot quantize."""
    nodes = list(_all_nodes(model.graph))
    training = sorted({f"{n.domain}.{n.op_type}" for n in nodes if n.domain in TRAINING_DOMAINS})
    if training:
        raise QCompileError(f"the model holds training ops ({', '.join(training)}); qcompile compiles inference graphs")
    quantized = Counter(n.op_type for n in nodes if n.op_type in QUANTIZED_OPS)
    if quantized:
        found = ", ".join(f"{count} {op}" for op, count in sorted(quantized.items()))
        raise QCompileError(f"the model is already quantized ({found}); give qcompile the float model")
    for what, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                kind = (value.type.WhichOneof("value") or "unknown").replace("_type", "")
                article = "an" if kind[0] in "aeiou" else "a"
                raise QCompileError(f"{what} {value.name!r} is {article} {kind}, not a tensor; qcompile compiles models "
                                    "with tensor inputs and outputs only")
    half = Counter(HALF_TYPES[t.data_type] for t in model.graph.initializer if t.data_type in HALF_TYPES)
    half.update(HALF_TYPES[v.type.tensor_type.elem_type] for v in model.graph.input
                if v.type.tensor_type.elem_type in HALF_TYPES)
    if half:
        dtype, count = half.most_common(1)[0]
        raise QCompileError(f"the model computes in {dtype} ({count} {dtype} inputs and weights); qcompile quantizes "
                            "float32 models: export or convert it to float32 first")


def prepare(model: onnx.ModelProto, min_opset: int, samples: list[dict]) -> tuple[onnx.ModelProto, Intake]:
    """The model (loaded by graph.load_model, which refuses what qcompile cannot compile) with
    constants as constants and at least `min_opset`, and the record of it.
    `samples`: a few feeds to check an opset conversion on (none: the check is recorded as skipped)."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    opset = ai_onnx_opset(prepared)
    intake = Intake(opset_from=opset, opset_to=max(opset, min_opset),
                    constants_from_inputs=_constants_from_inputs(prepared))
    prepared.ir_version = max(prepared.ir_version, 4)  # IR 4: initializers need not be graph inputs
    if opset < min_opset:
        prepared = _convert(prepared, opset, min_opset)
        intake.conversion_check = _check_conversion(model, prepared, samples, opset, min_opset)
    minimum_ir = onnx.helper.find_min_ir_version_for(list(prepared.opset_import), ignore_unknown=True)
    prepared.ir_version = max(prepared.ir_version, minimum_ir)
    inner = Counter(n.op_type for node in prepared.graph.node for graph in _subgraphs(node)
                    for n in _all_nodes(graph) if n.op_type in LINEAR_OPS)
    intake.subgraph_linear_ops = dict(sorted(inner.items()))
    return prepared, intake


def _constants_from_inputs(model: onnx.ModelProto) -> int:
    """Drop initializers from the graph inputs (IR < 4 lists them there): they are weights to quantize."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    dropped = len(model.graph.input) - len(inputs)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return dropped


def _convert(model: onnx.ModelProto, opset: int, target: int) -> onnx.ModelProto:
    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as error:  # the converter raises RuntimeError, ValueError or its own types
        blocking = _blocking_op(model, str(error))
        raise QCompileError(f"cannot convert the model from opset {opset} to {target}{blocking}: "
                            f"{first_line(error)}; export it at opset >= {target}") from None
    return converted


def _blocking_op(model: onnx.ModelProto, message: str) -> str:
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in message})
    return f" (op {', '.join(ops)})" if ops else ""


def _check_conversion(original: onnx.ModelProto, converted: onnx.ModelProto, samples: list[dict], opset: int,
                      target: int) -> dict:
    """Run both models on the samples; a conversion that changes the outputs is refused. The original
    runs in ONNX Runtime, or in ONNX's reference evaluator where ONNX Runtime has no kernels for its
    opset (below 7)."""
    if not samples:
        return {"samples": 0, "note": "no sample data: not checked"}
    references, reference_engine = _run_original(original, samples, opset)
    try:
        session = make_session(converted)
        values = [session.run(None, feed) for feed in samples]
    except Exception as error:  # onnxruntime's own exception types
        raise QCompileError(f"the model converted from opset {opset} to {target} does not run in ONNX Runtime "
                            f"({first_line(error)}); export it at opset >= {target}") from None
    worst_diff, worst_scale = 0.0, 0.0
    for reference_outputs, value_outputs in zip(references, values):
        for reference, value in zip(reference_outputs, value_outputs):
            reference, value = np.asarray(reference), np.asarray(value)
            if reference.dtype.kind in "OSU":  # strings: equal or not
                if reference.shape != value.shape or not np.array_equal(reference, value):
                    raise QCompileError(f"converting from opset {opset} to {target} changed a string output; "
                                        f"export the model at opset >= {target}")
                continue
            reference, value = reference.astype(np.float64), value.astype(np.float64)
            if reference.shape != value.shape:
                raise QCompileError(f"converting from opset {opset} to {target} changed an output's shape "
                                    f"{reference.shape} -> {value.shape}; export the model at opset >= {target}")
            finite = np.isfinite(reference)
            if reference.size:
                diff = np.nan_to_num(np.abs(np.where(finite, reference - value, 0.0)), nan=np.inf)
                worst_diff = max(worst_diff, float(diff.max()))
                worst_scale = max(worst_scale, float(np.max(np.abs(np.where(finite, reference, 0.0)))))
    if worst_diff > CONVERSION_TOLERANCE * max(worst_scale, 1.0):
        raise QCompileError(f"converting from opset {opset} to {target} changed the outputs by up to {worst_diff:.3g} "
                            f"(largest output {worst_scale:.3g}); export the model at opset >= {target}")
    return {"samples": len(samples), "reference": reference_engine, "max_abs_diff": worst_diff,
            "max_abs_output": worst_scale}


def _run_original(model: onnx.ModelProto, samples: list[dict], opset: int) -> tuple[list, str]:
    """The original model's outputs on the samples, and which engine computed them."""
    try:
        session = make_session(model)
    except Exception:  # no kernels for this opset: ONNX's own reference implementation of the spec
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(model)
            return [evaluator.run(None, feed) for feed in samples], "onnx.reference"
        except Exception as error:
            raise QCompileError(f"neither ONNX Runtime nor ONNX's reference evaluator runs the model at opset {opset} "
                                f"({first_line(error)}); export it at opset >= {QDQ_OPSET}") from None
    try:
        return [session.run(None, feed) for feed in samples], "onnxruntime"
    except Exception as error:
        raise QCompileError(f"ONNX Runtime cannot run the model on the data: {first_line(error)}") from None


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _all_nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its control-flow bodies."""
    for node in graph.node:
        yield node
        for body in _subgraphs(node):
            yield from _all_nodes(body)
