"""Packed lookup-table weights: the storage format of the `qcompile` custom ops.

A weight matrix W [N, K] (N output channels) is stored as
* `packed` uint8 [N, ceil(K*B/8)]: B-bit codes, code i of a row in bits [i*B, i*B + B) of the row's
  little-endian bit stream (4-bit: two codes per byte, the first in the low nibble);
* `table` float32 [N, G, 2^B]: the value of each code, per row and per block of K/G columns
  (G = 1 is per-channel; an affine quantizer is a linear table).

Two ops read it, LutDequantize(packed, table) -> W and LutMatMul(X, packed, table) -> X @ W^T, with
integer attributes `bits` and `k`. Each also ships as an ONNX model-local function made of standard
ops, so a stock ONNX Runtime without qcompile's library runs the artifact (slower). A third,
LutDequantizeConstant, is LutDequantize with no kernel in the library: ONNX Runtime always runs its
function, and with constant inputs folds it into a float weight at session start (Conv weights: the
Conv then keeps ONNX Runtime's blocked float layout).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import DOMAIN


def packed_row_bytes(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] integer codes in [0, 2^bits) -> [N, ceil(K*bits/8)] uint8."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    n, k = codes.shape
    bit_planes = (codes.astype(np.uint16)[:, :, None] >> np.arange(bits, dtype=np.uint16)) & 1
    stream = bit_planes.reshape(n, k * bits).astype(np.uint8)
    stream = np.pad(stream, ((0, 0), (0, packed_row_bytes(k, bits) * 8 - k * bits)))
    return np.packbits(stream, axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of pack_codes: [N, R] uint8 -> [N, k] int64."""
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : k * bits]
    planes = stream.reshape(packed.shape[0], k, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=2)


def _attribute_ref(name: str) -> onnx.AttributeProto:
    """A Constant's value_int bound to the calling node's attribute `name`."""
    return onnx.AttributeProto(name="value_int", ref_attr_name=name, type=onnx.AttributeProto.INT)


def _constant(name: str, value, dtype) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))


def _dequantize_body(packed: str, table: str, weight: str) -> list[onnx.NodeProto]:
    """Standard-op nodes computing LutDequantize(packed, table) -> weight, for a function body."""
    bits_node = helper.make_node("Constant", [], ["bits"])
    bits_node.attribute.append(_attribute_ref("bits"))
    k_node = helper.make_node("Constant", [], ["k"])
    k_node.attribute.append(_attribute_ref("k"))
    node = helper.make_node
    return [
        bits_node, k_node,
        _constant("zero", 0, TensorProto.INT64), _constant("one", 1, TensorProto.INT64),
        _constant("eight", 8, TensorProto.INT64), _constant("eight_u32", 8, TensorProto.UINT32),
        _constant("one_u32", 1, TensorProto.UINT32),
        helper.make_node("Constant", [], ["pads"], value=helper.make_tensor("pads", TensorProto.INT64, [4], [0, 0, 0, 1])),
        helper.make_node("Constant", [], ["rows_flat"], value=helper.make_tensor("rows_flat", TensorProto.INT64, [2], [0, -1])),
        node("Range", ["zero", "k", "one"], ["index"]),
        node("Mul", ["index", "bits"], ["bit"]),
        node("Div", ["bit", "eight"], ["byte"]),
        node("Add", ["byte", "one"], ["next_byte"]),
        node("Mod", ["bit", "eight"], ["shift"]),
        node("Cast", ["shift"], ["shift_u32"], to=TensorProto.UINT32),
        # One zero byte after each row, so the two-byte read of a row's last code stays in bounds.
        node("Pad", [packed, "pads"], ["padded"]),
        node("Gather", ["padded", "byte"], ["low_u8"], axis=1),
        node("Gather", ["padded", "next_byte"], ["high_u8"], axis=1),
        node("Cast", ["low_u8"], ["low"], to=TensorProto.UINT32),
        node("Cast", ["high_u8"], ["high_u8_u32"], to=TensorProto.UINT32),
        node("BitShift", ["high_u8_u32", "eight_u32"], ["high"], direction="LEFT"),
        node("BitwiseOr", ["low", "high"], ["word"]),
        node("BitShift", ["word", "shift_u32"], ["shifted"], direction="RIGHT"),
        node("Cast", ["bits"], ["bits_u32"], to=TensorProto.UINT32),
        node("BitShift", ["one_u32", "bits_u32"], ["levels_u32"], direction="LEFT"),
        node("Sub", ["levels_u32", "one_u32"], ["mask"]),
        node("BitwiseAnd", ["shifted", "mask"], ["code_u32"]),
        node("Cast", ["code_u32"], ["code"], to=TensorProto.INT64),
        # Column i reads block i // (k/G) of its row's table: flat index (i // block) * 2^bits + code.
        node("Shape", [table], ["blocks"], start=1, end=2),
        node("Shape", [table], ["levels"], start=2, end=3),
        node("Div", ["k", "blocks"], ["block"]),
        node("Div", ["index", "block"], ["block_of_column"]),
        node("Mul", ["block_of_column", "levels"], ["block_offset"]),
        node("Add", ["block_offset", "code"], ["flat_index"]),
        node("Reshape", [table, "rows_flat"], ["flat_table"]),
        node("GatherElements", ["flat_table", "flat_index"], [weight], axis=1),
    ]


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    """The standard-op bodies of LutDequantize, LutDequantizeConstant and LutMatMul, for a model importing
    ai.onnx `opset` (>= 18)."""
    imports = [helper.make_opsetid("", opset)]
    dequantize, constant = (helper.make_function(DOMAIN, name, ["packed", "table"], ["weight"],
                                                 _dequantize_body("packed", "table", "weight"), imports, ["bits", "k"])
                            for name in ("LutDequantize", "LutDequantizeConstant"))
    matmul_nodes = _dequantize_body("packed", "table", "weight") + [
        helper.make_node("Transpose", ["weight"], ["weight_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "weight_t"], ["Y"]),
    ]
    matmul = helper.make_function(DOMAIN, "LutMatMul", ["X", "packed", "table"], ["Y"], matmul_nodes, imports,
                                  ["bits", "k"])
    return [dequantize, constant, matmul]


def add_functions(model: onnx.ModelProto) -> None:
    """Import the qcompile domain into `model` and attach the fallback function bodies (once)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 18:
        raise ValueError(f"the standard-op fallback needs ai.onnx opset >= 18 (bitwise ops); the model has {opset}")
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    present = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in function_protos(opset) if (f.domain, f.name) not in present)
