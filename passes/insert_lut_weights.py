"""InsertLutWeights: weights become packed B-bit codes read through a per-row lookup table.

Pattern -> rewrite (W a constant float weight, encoded in context.lut: its quantizer and codes):
    MatMul(X, W[K, N])                 ->  qcompile.LutMatMul(X, codes, table)
    Gemm(X, W, C) (alpha = beta = 1)   ->  qcompile.LutMatMul(X, codes, table) -> Add(C)
    Conv(X, W[O, I, kh, kw], ...)      ->  Conv(X, Reshape(qcompile.LutDequantizeConstant(codes, table)), ...)
    Gather(W[V, D], ids, axis=0)       ->  Reshape(LutDequantize(Gather(codes, ids), Gather(table, ids)))
With --acts dynamic, MatMul and Gemm instead become
    com.microsoft.DynamicQuantizeMatMul(X, Transpose(qcompile.LutDequantizeConstant(codes, int8 table)), scale)
(-> Add(C) for Gemm): the table rounded to int8 per output channel (scale = max |table row| / 127), folded
by ONNX Runtime into an int8 weight at session start, which its integer GEMM packs once and multiplies
with X quantized to uint8 at run time. The session holds 1 byte per weight; the file, the codes.
`codes` is uint8 [N, ceil(K*B/8)], one row per output channel (per embedding row for Gather).
`table` is not stored: it is computed from the quantizer's per-row parameters by standard ops
generated from its SymPy expression (s * f(a * c / 2^(B-1)), or scale * (c - zero)); every input of
that subgraph is a constant, so ONNX Runtime folds it into the table once, at session start. A free
table is stored as float16 and cast. A Conv weight is decoded by standard ops (LutDequantizeConstant
has no library kernel) that ONNX Runtime folds into a float weight at session start: a Conv whose
weight is computed at run time loses ONNX Runtime's blocked (NCHWc) layout and runs up to 8x slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.lut import DOMAIN as LUT_DOMAIN, packing
from qcompile.lut.functions import ELEMENTARY, Backend, lower
from qcompile.graph import MICROSOFT_DOMAIN
from qcompile.pipeline import CompileContext, PassResult


@dataclass
class LutWeight:
    """A constant weight the pass can rewrite, as [N, K] rows (N output channels)."""

    tensor: str
    node: str
    op: str
    rows: np.ndarray
    shape: tuple[int, ...]
    transposed: bool  # rows are the tensor transposed (MatMul's [K, N], Gemm without transB)

    def to_original(self, rows: np.ndarray) -> np.ndarray:
        """Rows back to the tensor's own layout (what the float model reads)."""
        return np.ascontiguousarray(rows.T if self.transposed else rows).reshape(self.shape)


def find_lut_weights(graph: gs.Graph, ops=("MatMul", "Gemm", "Conv", "Gather")) -> list[LutWeight]:
    """Every constant float weight of MatMul / Gemm / Conv / Gather(axis 0) (those in `ops`) that only
    that node reads."""
    found = []
    for node in graph.nodes:
        weight = _weight_input(node) if node.op in ops else None
        if weight is None or len(weight.outputs) != 1 or weight.values.dtype != np.float32:
            continue
        values = weight.values
        transposed = node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0))
        rows = np.ascontiguousarray(values.T) if transposed else values.reshape(values.shape[0], -1)
        found.append(LutWeight(weight.name, node.name, node.op, rows, tuple(values.shape), transposed))
    return found


def _weight_input(node: gs.Node) -> gs.Constant | None:
    if node.op == "MatMul" and len(node.inputs) == 2 and not isinstance(node.inputs[0], gs.Constant):
        weight = node.inputs[1]
        return weight if isinstance(weight, gs.Constant) and weight.values.ndim == 2 else None
    if node.op == "Gemm" and not node.attrs.get("transA", 0) and node.attrs.get("alpha", 1.0) == 1.0 \
            and node.attrs.get("beta", 1.0) == 1.0 and isinstance(node.inputs[1], gs.Constant):
        return node.inputs[1]
    if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
        return node.inputs[1]
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and isinstance(node.inputs[0], gs.Constant) \
            and node.inputs[0].values.ndim == 2:
        return node.inputs[0]
    return None


class OnnxBackend(Backend):
    """`lower` into graph nodes: each operation appends a node and returns its output tensor."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}_{what}_{self.count}"

    def _node(self, op: str, inputs: list, **attrs) -> gs.Variable:
        output = gs.Variable(self._name(op.lower()), dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, self._name(op), attrs=attrs, inputs=inputs, outputs=[output]))
        return output

    def const(self, value: float):
        return gs.Constant(self._name("const"), np.array(value, dtype=np.float32))

    def parameter(self, name: str, values: np.ndarray):
        """A quantizer parameter as a float32 input: float16 ones are stored as they are and cast."""
        if values.dtype == np.float16:
            return self._node("Cast", [gs.Constant(name, values)], to=onnx.TensorProto.FLOAT)
        return gs.Constant(name, values.astype(np.float32))

    def add(self, x, y):
        return self._node("Add", [x, y])

    def mul(self, x, y):
        return self._node("Mul", [x, y])

    def pow(self, x, exponent: float):
        return self._node("Pow", [x, self.const(exponent)])

    def clip(self, x, low, high):
        bound = [self.const(low) if low is not None else gs.Variable.empty(),
                 self.const(high) if high is not None else gs.Variable.empty()]
        return self._node("Clip", [x, *bound])

    def call(self, func, x):
        return self._node(ELEMENTARY[func][2], [x])


class InsertLutWeights:
    name = "insert-lut-weights"

    def run(self, context: CompileContext) -> PassResult:
        graph = context.graph
        nodes = {node.name: node for node in graph.nodes}
        weights = {w.tensor: w for w in find_lut_weights(graph)}
        for tensor, encoded in context.lut.items():
            weight, quantizer = weights[tensor], encoded.quantizer
            node = nodes[weight.node]
            codes = gs.Constant(f"{tensor}_codes", packing.pack_codes(encoded.codes, quantizer.bits))
            attrs = {"bits": quantizer.bits, "k": int(weight.rows.shape[1])}
            if node.op in ("MatMul", "Gemm") and context.config.acts == "dynamic":
                int8_table, scale = int8_rows(quantizer.table)
                weight = _op(graph, "LutDequantizeConstant", f"{tensor}_lut",
                             [codes, gs.Constant(f"{tensor}_table_int8", int8_table)], attrs, LUT_DOMAIN, np.int8)
                transposed = _op(graph, "Transpose", f"{tensor}_int8", [weight], {"perm": [1, 0]}, dtype=np.int8)
                self._matmul(graph, node, "DynamicQuantizeMatMul", MICROSOFT_DOMAIN,
                             [transposed, gs.Constant(f"{tensor}_scale", scale)], {})
            elif node.op in ("MatMul", "Gemm"):
                table = self._table(graph, tensor, quantizer)
                self._matmul(graph, node, "LutMatMul", LUT_DOMAIN, [codes, table], attrs)
            elif node.op == "Conv":
                table = self._table(graph, tensor, quantizer)
                shape = gs.Constant(f"{tensor}_shape", np.array(node.inputs[1].shape, dtype=np.int64))
                dequantized = _op(graph, "LutDequantizeConstant", f"{tensor}_lut", [codes, table], attrs, LUT_DOMAIN)
                node.inputs[1] = _op(graph, "Reshape", f"{tensor}_reshaped", [dequantized, shape])
            else:
                self._gather(graph, node, codes, self._table(graph, tensor, quantizer), attrs)
        return PassResult(len(context.lut), f"{len(context.lut)} weights read through lookup tables")

    @staticmethod
    def _table(graph: gs.Graph, tensor: str, quantizer) -> gs.Tensor:
        backend = OnnxBackend(graph, f"{tensor}_table")
        symbols = {symbol: backend.parameter(f"{tensor}_{symbol.name}", quantizer.params[symbol.name])
                   for symbol in quantizer.expression.free_symbols if symbol.name in quantizer.params}
        symbols.update({symbol: gs.Constant(f"{tensor}_grid", quantizer.grid.astype(np.float32))
                        for symbol in quantizer.expression.free_symbols if symbol.name == "c"})
        return lower(quantizer.expression, symbols, backend)

    @staticmethod
    def _matmul(graph: gs.Graph, node: gs.Node, op: str, domain: str, weight_inputs: list, attrs) -> None:
        """X @ W as `op`(X, *weight_inputs), then Gemm's bias C added."""
        output = node.outputs[0]
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
        product = output if bias is None else gs.Variable(f"{output.name}_lut_matmul", dtype=np.float32)
        graph.nodes.append(gs.Node(op, f"{node.name}_lut", attrs=attrs, domain=domain,
                                   inputs=[node.inputs[0], *weight_inputs], outputs=[product]))
        if bias is not None:
            graph.nodes.append(gs.Node("Add", f"{node.name}_bias", inputs=[product, bias], outputs=[output]))
        node.outputs.clear()
        node.inputs.clear()

    @staticmethod
    def _gather(graph: gs.Graph, node: gs.Node, codes, table, attrs) -> None:
        ids, output = node.inputs[1], node.outputs[0]
        name = node.name
        flat = _op(graph, "Reshape", f"{name}_flat_ids", [ids, gs.Constant(f"{name}_minus_one", np.array([-1], np.int64))],
                   dtype=np.int64)
        rows = _op(graph, "Gather", f"{name}_codes", [codes, flat], {"axis": 0}, dtype=np.uint8)
        tables = _op(graph, "Gather", f"{name}_tables", [table, flat], {"axis": 0})
        values = _op(graph, "LutDequantize", f"{name}_lut", [rows, tables], attrs, LUT_DOMAIN)
        width = gs.Constant(f"{name}_width", np.array([attrs["k"]], np.int64))
        shape = _op(graph, "Concat", f"{name}_shape", [_op(graph, "Shape", f"{name}_ids_shape", [ids], dtype=np.int64),
                                                         width], {"axis": 0}, dtype=np.int64)
        graph.nodes.append(gs.Node("Reshape", f"{name}_reshape", inputs=[values, shape], outputs=[output]))
        node.outputs.clear()
        node.inputs.clear()


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [N, G, 2^B] float table as int8 values and a float32 scale per row (N): max |row| -> 127."""
    peak = np.abs(table).reshape(len(table), -1).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(table / scale[:, None, None]), -127, 127).astype(np.int8), scale


def _op(graph: gs.Graph, op: str, name: str, inputs: list, attrs: dict | None = None, domain: str | None = None,
        dtype=np.float32) -> gs.Variable:
    output = gs.Variable(f"{name}_out", dtype=dtype)
    graph.nodes.append(gs.Node(op, name, attrs=attrs or {}, inputs=inputs, outputs=[output], domain=domain))
    return output
