"""The packed lookup-table format and the qcompile custom ops (C++ library and standard-op fallback)
against NumPy references built from the unpacked codes, and the library against malformed models.

Run as a script, this file is the worker that runs named malformed-model cases (see run_cases)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qcompile.lut import DOMAIN as LUT_DOMAIN, ops, packing
from qcompile.errors import QCompileError
from qcompile.runtime import make_session


def random_weights(rng, n, k, bits, blocks):
    codes = rng.integers(0, 1 << bits, (n, k))
    table = rng.standard_normal((n, blocks, 1 << bits)).astype(np.float32)
    return codes, table


def reference_weight(codes, table):
    """W[n, i] = table[n, block of i, codes[n, i]], straight from the codes."""
    n, k = codes.shape
    block = k // table.shape[1]
    return table[np.arange(n)[:, None], np.arange(k)[None, :] // block, codes]


def lut_model(packed, table, bits, k, x_shape, overrides=None):
    """One LutMatMul and one LutDequantize node over the same packed weight."""
    attrs = {name: value for name, value in {"bits": bits, "k": k, **(overrides or {})}.items() if value is not None}
    nodes = [helper.make_node("LutMatMul", ["X", "packed", "table"], ["Y"], domain=LUT_DOMAIN, **attrs),
             helper.make_node("LutDequantize", ["packed", "table"], ["W"], domain=LUT_DOMAIN, **attrs)]
    graph = helper.make_graph(
        nodes, "lut", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None), helper.make_tensor_value_info("W", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(packed, "packed"), onnx.numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    packing.add_functions(model)
    return model


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 16, 33])
def test_pack_unpack_round_trip_and_layout(bits, k):
    rng = np.random.default_rng(bits * 100 + k)
    codes = rng.integers(0, 1 << bits, (5, k))
    packed = packing.pack_codes(codes, bits)
    assert packed.shape == (5, (k * bits + 7) // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits, k), codes)
    # Bit i*bits + j of a row is bit j of code i, little-endian within each byte.
    stream = np.unpackbits(packed, axis=1, bitorder="little")
    np.testing.assert_array_equal(stream[:, 1:bits], (codes[:, :1] >> np.arange(1, bits)) & 1)


def test_four_bit_codes_share_a_byte_low_nibble_first():
    np.testing.assert_array_equal(packing.pack_codes(np.array([[1, 2, 15]]), 4), [[0x21, 0x0F]])


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        packing.pack_codes(np.array([[16]]), 4)


# (n, k, bits, blocks): 4-bit with 16-multiple blocks takes the AVX-512 path, the rest the portable one.
SHAPES = [(5, 7, 3, 1), (16, 64, 4, 2), (8, 33, 5, 3), (3, 40, 6, 5), (9, 48, 8, 1), (4, 30, 2, 3),
          (33, 256, 4, 1), (6, 96, 4, 3), (7, 20, 4, 1), (2, 5, 1, 1)]


@pytest.mark.parametrize("n,k,bits,blocks", SHAPES)
@pytest.mark.parametrize("use_library", [True, False], ids=["library", "fallback"])
def test_lut_ops_match_numpy(n, k, bits, blocks, use_library):
    rng = np.random.default_rng(n * k + bits)
    codes, table = random_weights(rng, n, k, bits, blocks)
    weight = reference_weight(codes, table)
    model = lut_model(packing.pack_codes(codes, bits), table, bits, k, ["batch", "seq", k])
    session = make_session(model, use_library=use_library)
    for shape in [(1, 1, k), (2, 3, k), (1, 17, k), (0, 2, k)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y, w = session.run(None, {"X": x})
        np.testing.assert_array_equal(w, weight)  # a table read: exact
        assert y.shape == shape[:-1] + (n,)
        np.testing.assert_allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_library_and_fallback_agree_on_a_large_gemv():
    rng = np.random.default_rng(0)
    codes, table = random_weights(rng, 512, 1024, 4, 1)
    model = lut_model(packing.pack_codes(codes, 4), table, 4, 1024, [1, 1024])
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    fast = make_session(model, use_library=True).run(["Y"], {"X": x})[0]
    stock = make_session(model, use_library=False).run(["Y"], {"X": x})[0]
    np.testing.assert_allclose(fast, stock, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast, x @ reference_weight(codes, table).T, rtol=1e-4, atol=1e-4)


# Batched shapes (n, k, bits, blocks) for LutMatMul with M > 1. 4-bit with blocks a multiple of 16 takes the lookup
# kernels (dot_rows_simd4 up to 16 rows, the batched microkernel beyond: blocks of 32 to 256 codes put several tables
# in one K panel, blocks of 384 end panels early); other widths and blocks dequantize each panel first. N = 37, 50
# and 30 leave a ragged group of channels, M = 5, 17, 33 and 130 a ragged vector of rows.
BATCHED_SHAPES = [(37, 96, 4, 1), (37, 96, 4, 3), (96, 4096, 4, 1), (96, 4096, 4, 32), (50, 512, 4, 16),
                  (30, 768, 4, 2), (40, 384, 4, 3), (37, 100, 4, 5), (37, 100, 3, 1), (96, 4096, 5, 32),
                  (20, 48, 8, 3)]


@pytest.mark.parametrize("n,k,bits,blocks", BATCHED_SHAPES)
def test_library_matches_numpy_on_batches(n, k, bits, blocks):
    rng = np.random.default_rng(n + k + bits + blocks)
    codes, table = random_weights(rng, n, k, bits, blocks)
    weight = reference_weight(codes, table).astype(np.float64)
    model = lut_model(packing.pack_codes(codes, bits), table, bits, k, ["batch", k])
    session = make_session(model, threads=2, use_library=True)
    for m in [2, 5, 16, 17, 33, 64, 130]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = session.run(["Y"], {"X": x})[0]
        assert y.shape == (m, n)
        np.testing.assert_allclose(y, x.astype(np.float64) @ weight.T, rtol=1e-5, atol=1e-5 * np.sqrt(k),
                                   err_msg=f"m = {m}")


def test_library_batches_keep_leading_dimensions():
    rng = np.random.default_rng(7)
    codes, table = random_weights(rng, 40, 64, 4, 2)
    model = lut_model(packing.pack_codes(codes, 4), table, 4, 64, ["batch", "seq", 64])
    x = rng.standard_normal((3, 11, 64)).astype(np.float32)
    y = make_session(model, threads=2, use_library=True).run(["Y"], {"X": x})[0]
    assert y.shape == (3, 11, 40)
    np.testing.assert_allclose(y, x @ reference_weight(codes, table).T, rtol=1e-5, atol=1e-4)


def run_library(model, x):
    return make_session(model, use_library=True).run(None, {"X": x})


@pytest.mark.parametrize("change,message", [
    (lambda p, t: (p[:, :-1], t), "bytes per row"),
    (lambda p, t: (p, t[:, :, :8]), "entries per block"),
    (lambda p, t: (p, t[:-1]), "table has 3 rows, packed codes 4"),
    (lambda p, t: (p, np.concatenate([t, t, t], axis=1)), "does not divide k"),
    (lambda p, t: (p[0], t), "packed codes must be 2-D"),
    (lambda p, t: (p, t[:, 0]), "table must be 3-D"),
])
def test_library_rejects_malformed_weights(change, message):
    rng = np.random.default_rng(1)
    codes, table = random_weights(rng, 4, 20, 4, 2)
    packed, table = change(packing.pack_codes(codes, 4), table)
    with pytest.raises(Exception, match=message) as raised:
        run_library(lut_model(packed, table, 4, 20, ["batch", 20]), np.ones((1, 20), np.float32))
    assert isinstance(raised.value, (ort.capi.onnxruntime_pybind11_state.Fail,
                                     ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                                     ort.capi.onnxruntime_pybind11_state.RuntimeException))


@pytest.mark.parametrize("attrs,message", [({"bits": 9}, "bits must be in 1..8"), ({"k": 0}, "k must be positive"),
                                           ({"bits": 0}, "bits must be in 1..8"),
                                           ({"k": None}, "missing or non-integer attribute 'k'")])
def test_library_rejects_bad_attributes(attrs, message):
    codes, table = random_weights(np.random.default_rng(2), 4, 20, 4, 1)
    with pytest.raises(Exception, match=message):
        run_library(lut_model(packing.pack_codes(codes, 4), table, 4, 20, ["batch", 20], attrs), np.ones((1, 20), np.float32))


def test_library_rejects_an_input_of_the_wrong_width():
    codes, table = random_weights(np.random.default_rng(3), 4, 20, 4, 1)
    model = lut_model(packing.pack_codes(codes, 4), table, 4, 20, ["batch", "width"])
    with pytest.raises(Exception, match=r"input X has shape \[1, 21\]; its last dimension must be k = 20"):
        run_library(model, np.ones((1, 21), np.float32))


def test_library_rejects_codes_of_the_wrong_dtype():
    codes, table = random_weights(np.random.default_rng(4), 4, 20, 4, 1)
    model = lut_model(packing.pack_codes(codes, 4).astype(np.int8), table, 4, 20, ["batch", 20])
    with pytest.raises(Exception, match="(?i)type"):
        run_library(model, np.ones((1, 20), np.float32))


def test_missing_library_and_headers_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(ops.LIBRARY_ENV, str(tmp_path / "absent.so"))
    with pytest.raises(QCompileError, match="custom-op library is not built"):
        ops.register(ort.SessionOptions())
    with pytest.raises(QCompileError, match="has no onnxruntime_lite_custom_op.h"):
        ops.find_headers(tmp_path)
    monkeypatch.setenv(ops.HEADER_ENV, str(tmp_path))
    with pytest.raises(QCompileError, match=r"\$QCOMPILE_ORT_INCLUDE = .* has no onnxruntime_lite_custom_op.h"):
        ops.build_library(output=tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()


# ---------------------------------------------------------------------------------------------------
# Malformed models. A bad kernel crashes the process instead of raising, so every case runs in a worker
# subprocess (this file run as a script): all cases in one worker, a new one after any crash.

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def one_node_model(op="LutMatMul", inputs=None, outputs=None, x_shape=None, **changes):
    """(model, feeds): one qcompile node over a valid 4 x 20 4-bit weight in 2 blocks and X [2, 20], every
    tensor a graph input. `changes`: attributes (bits=, k=; None drops one) and feeds (X=, packed=, table=);
    inputs/outputs: the node's names ('' omits one); x_shape: X made by ConstantOfShape instead, for shapes
    no NumPy array can hold."""
    rng = np.random.default_rng(5)
    codes, table = random_weights(rng, 4, 20, 4, 2)
    x = rng.standard_normal((2, 20)).astype(np.float32)
    feeds = {"X": x, "packed": packing.pack_codes(codes, 4), "table": table}
    attrs = {"bits": 4, "k": 20}
    for name, value in changes.items():
        (attrs if name in attrs else feeds)[name] = value
    attrs = {name: value for name, value in attrs.items() if value is not None}
    nodes, initializers = [], []
    if op == "LutDequantize" or x_shape is not None:
        del feeds["X"]
    if x_shape is not None:
        initializers.append(onnx.numpy_helper.from_array(np.array(x_shape, np.int64), "x_shape"))
        nodes.append(helper.make_node("ConstantOfShape", ["x_shape"], ["X"]))
    default = {"LutMatMul": (["X", "packed", "table"], ["Y"]), "LutDequantize": (["packed", "table"], ["W"])}[op]
    inputs, outputs = default[0] if inputs is None else inputs, default[1] if outputs is None else outputs
    nodes.append(helper.make_node(op, inputs, outputs, domain=LUT_DOMAIN, **attrs))
    # Shapes of the outputs, not the outputs: an empty output may have a dimension too large for NumPy.
    named = [name for name in outputs if name] or ["X" if x_shape is None and op == "LutMatMul" else "packed"]
    nodes += [helper.make_node("Shape", [name], [name + "_shape"]) for name in named]
    graph = helper.make_graph(
        nodes, "malformed",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), None)
         for name, a in feeds.items()],
        [helper.make_tensor_value_info(name + "_shape", TensorProto.INT64, None) for name in named], initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(LUT_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets), feeds


def _wrapped_k(bits):
    """The smallest k whose k * bits wraps past 2^64 (to a product below `bits`)."""
    return -(-(1 << 64) // bits)


U8, F32 = np.uint8, np.float32


def matmul(**changes):
    return lambda: one_node_model("LutMatMul", **changes)


def dequantize(**changes):
    return lambda: one_node_model("LutDequantize", **changes)


WRAPS_8, WRAPS_3 = (1 << 61) + 1, _wrapped_k(3)  # k * 8 wraps to 8 (1 byte per row); k * 3 to 2 (1 byte)
# name: (model builder, the error message that must name the problem)
MALFORMED = {
    # Omitted (''), missing and extra inputs and outputs: ONNX Runtime refuses the node at load, as the
    # library declares every input and output required.
    "matmul omits X": (matmul(inputs=["", "packed", "table"]), r"input 0 is marked single but has an empty string"),
    "matmul omits packed": (matmul(inputs=["X", "", "table"]), r"input 1 is marked single but has an empty string"),
    "matmul omits table": (matmul(inputs=["X", "packed", ""]), r"input 2 is marked single but has an empty string"),
    "dequantize omits packed": (dequantize(inputs=["", "table"]), r"input 0 is marked single but has an empty string"),
    "dequantize omits table": (dequantize(inputs=["packed", ""]), r"input 1 is marked single but has an empty string"),
    "matmul omits Y": (matmul(outputs=[""]), r"output 0 is marked single but has an empty string"),
    "dequantize omits W": (dequantize(outputs=[""]), r"output 0 is marked single but has an empty string"),
    "matmul with 2 inputs": (matmul(inputs=["X", "packed"]), r"input size 2 not in range \[min=3, max=3\]"),
    "matmul with 0 inputs": (matmul(inputs=[]), r"input size 0 not in range \[min=3, max=3\]"),
    "dequantize with 1 input": (dequantize(inputs=["packed"]), r"input size 1 not in range \[min=2, max=2\]"),
    "matmul with 4 inputs": (matmul(inputs=["X", "packed", "table", "X"]), r"input size 4 not in range \[min=3, max"),
    "dequantize with 0 outputs": (dequantize(outputs=[]), r"output size 0 not in range \[min=1, max=1\]"),
    "matmul with 2 outputs": (matmul(outputs=["Y", "Y2"]), r"output size 2 not in range \[min=1, max=1\]"),
    # Element types, checked by ONNX Runtime against the declared input types.
    "packed float64": (matmul(packed=np.zeros((4, 10))), r"tensor\(double\)' of input parameter \(packed\)"),
    "table int32": (dequantize(table=np.zeros((4, 2, 16), np.int32)), r"tensor\(int32\)' of input parameter \(table\)"),
    "X float16": (matmul(X=np.zeros((2, 20), np.float16)), r"tensor\(float16\)' of input parameter \(X\)"),
    # Ranks and shapes, checked by the kernels.
    "X 0-d": (matmul(X=np.array(1, F32)), r"input X has shape \[\]; its last dimension must be k = 20"),
    "X last dimension not k": (matmul(X=np.zeros((3, 1, 19), F32)), r"input X has shape \[3, 1, 19\]; its last dim"),
    "packed 0-d": (matmul(packed=np.array(7, U8)), r"packed codes must be 2-D \[N, R\], got \[\]"),
    "packed 1-d": (dequantize(packed=np.zeros(10, U8)), r"packed codes must be 2-D \[N, R\], got \[10\]"),
    "packed 3-d": (matmul(packed=np.zeros((4, 10, 1), U8)), r"packed codes must be 2-D \[N, R\], got \[4, 10, 1\]"),
    "table 4-d": (dequantize(table=np.zeros((1, 4, 2, 16), F32)), r"table must be 3-D \[N, G, 2\^bits\], got \[1, 4,"),
    "table 2-d": (matmul(table=np.zeros((4, 32), F32)), r"table must be 3-D \[N, G, 2\^bits\], got \[4, 32\]"),
    "packed with no bytes per row": (matmul(packed=np.zeros((4, 0), U8)),
                                     r"packed codes have 0 bytes per row; 20 codes of 4 bits need 10"),
    "table with 0 rows": (matmul(table=np.zeros((0, 2, 16), F32)), r"table has 0 rows, packed codes 4"),
    "table with 0 blocks": (dequantize(table=np.zeros((4, 0, 16), F32)), r"0 blocks per row, which does not divide k"),
    "blocks not dividing k": (matmul(table=np.zeros((4, 3, 16), F32)), r"3 blocks per row, which does not divide k ="),
    "table with 0 levels": (matmul(table=np.zeros((4, 2, 0), F32)), r"0 entries per block, 4-bit codes need 16"),
    # Attributes, checked when the kernel is created (at load).
    "bits 0": (matmul(bits=0), r"LutMatMul: attribute bits must be in 1\.\.8, got 0"),
    "bits 9": (dequantize(bits=9), r"LutDequantize: attribute bits must be in 1\.\.8, got 9"),
    "bits -1": (matmul(bits=-1), r"attribute bits must be in 1\.\.8, got -1"),
    "bits 2^40": (matmul(bits=1 << 40), r"attribute bits must be in 1\.\.8, got 1099511627776"),
    "bits int64 min": (dequantize(bits=INT64_MIN), r"attribute bits must be in 1\.\.8, got -9223372036854775808"),
    "k 0": (matmul(k=0), r"LutMatMul: attribute k must be positive, got 0"),
    "k -1": (dequantize(k=-1), r"attribute k must be positive, got -1"),
    "k int64 min": (matmul(k=INT64_MIN), r"attribute k must be positive, got -9223372036854775808"),
    "k 2^31": (matmul(k=1 << 31), r"packed codes have 10 bytes per row; 2147483648 codes of 4 bits need 1073741824"),
    "k 2^62": (dequantize(k=1 << 62),
               r"attribute k = 4611686018427387904 is too large: k \* bits = 4611686018427387904 \* 4 overflows int64"),
    "k int64 max": (matmul(k=INT64_MAX), r"attribute k = 9223372036854775807 is too large"),
    # k * bits wraps past 2^64 to a small product, and the packed codes are as wide as that product asks:
    # only overflow-checked arithmetic refuses these (the unchecked kernels ran them).
    "k * bits wraps to the packed width": (
        matmul(bits=8, k=WRAPS_8, packed=np.zeros((1, 1), U8), table=np.zeros((1, 1, 256), F32), x_shape=[0, WRAPS_8]),
        rf"LutMatMul: attribute k = {WRAPS_8} is too large: k \* bits = {WRAPS_8} \* 8 overflows int64"),
    "k * bits wraps, 3 bits, no rows": (
        dequantize(bits=3, k=WRAPS_3, packed=np.zeros((0, 1), U8), table=np.zeros((0, 1, 8), F32)),
        rf"LutDequantize: attribute k = {WRAPS_3} is too large: k \* bits = {WRAPS_3} \* 3 overflows int64"),
    "bits float": (matmul(bits=4.0), r"missing or non-integer attribute 'bits'"),
    "k missing": (dequantize(k=None), r"missing or non-integer attribute 'k'"),
    "k a list": (matmul(k=[20]), r"missing or non-integer attribute 'k'"),
}

# Edge cases that are valid: the output shapes they must give.
LARGEST_K = (1 << 60) - 1  # k * 8 + 7 = 2^63 - 1
EDGE = {
    "no rows": (matmul(packed=np.zeros((0, 10), U8), table=np.zeros((0, 2, 16), F32)), {"Y_shape": [2, 0]}),
    "dequantize no rows": (dequantize(packed=np.zeros((0, 10), U8), table=np.zeros((0, 2, 16), F32)),
                           {"W_shape": [0, 20]}),
    "X with an empty batch": (matmul(X=np.zeros((0, 3, 20), F32)), {"Y_shape": [0, 3, 4]}),
    "X 1-d": (matmul(X=np.zeros(20, F32)), {"Y_shape": [4]}),
    "X of 0 rows with the largest k": (  # W is never made
        matmul(bits=8, k=LARGEST_K, packed=np.zeros((0, LARGEST_K), U8), table=np.zeros((0, 1, 256), F32),
               x_shape=[0, LARGEST_K]), {"Y_shape": [0, 0]}),
}
CASES = {name: builder for name, (builder, _) in {**MALFORMED, **EDGE}.items()}
CRASH_CASE_ENV = "QCOMPILE_TEST_CRASH_CASE"  # set: the worker also knows a case "segfault", which crashes it


def run_cases(names: list[str]) -> dict[str, dict]:
    """Run the named cases in worker subprocesses: {name: {"status": "ok" | "error" | "crash", ...}}.
    A worker runs cases in order, printing one JSON line after each; one that dies costs only the case it
    was on (status "crash", with its exit status: -11 is SIGSEGV), and a new worker takes the rest."""
    results, pending = {}, list(names)
    while pending:
        worker = subprocess.run([sys.executable, os.path.abspath(__file__), *pending], capture_output=True, text=True,
                                timeout=600)
        for line in worker.stdout.splitlines():
            record = json.loads(line)
            results[record.pop("case")] = record
        pending = [name for name in pending if name not in results]
        if pending:
            results[pending.pop(0)] = {"status": "crash", "returncode": worker.returncode,
                                       "stderr": worker.stderr[-2000:]}
    return results


def _worker(names: list[str]) -> None:
    for name in names:
        model, feeds = CASES[name]()
        try:
            session = make_session(model, use_library=True)
            outputs = [o.name for o in session.get_outputs()]
            record = {"status": "ok", "shapes": dict(zip(outputs, (v.tolist() for v in session.run(outputs, feeds))))}
        except Exception as error:  # noqa: BLE001 - the worker reports every failure but a crash
            record = {"status": "error", "type": type(error).__name__, "message": str(error)}
        print(json.dumps({"case": name, **record}), flush=True)


@pytest.fixture(scope="module")
def case_results():
    return run_cases(list(CASES))


@pytest.mark.parametrize("name", list(MALFORMED))
def test_library_refuses_malformed_models_with_an_error(name, case_results):
    result = case_results[name]
    assert result["status"] == "error", result  # not "ok" (accepted) nor "crash" (the process died)
    assert result["type"] in ("Fail", "InvalidArgument", "InvalidGraph", "RuntimeException"), result
    assert re.search(MALFORMED[name][1], result["message"]), result["message"]


@pytest.mark.parametrize("name", list(EDGE))
def test_library_runs_edge_cases(name, case_results):
    assert case_results[name] == {"status": "ok", "shapes": EDGE[name][1]}


def test_case_runner_reports_a_crash_and_goes_on(monkeypatch):
    """A case that kills its worker (a SIGSEGV here) is reported as a crash; the cases after it still run."""
    monkeypatch.setenv(CRASH_CASE_ENV, "1")
    results = run_cases(["k 0", "segfault", "bits 9"])
    assert results["segfault"]["status"] == "crash" and results["segfault"]["returncode"] < 0
    assert [results[name]["status"] for name in ("k 0", "bits 9")] == ["error", "error"]


if __name__ == "__main__":
    if os.environ.get(CRASH_CASE_ENV):
        CASES["segfault"] = lambda: __import__("ctypes").string_at(0)  # reads address 0
    _worker(sys.argv[1:])
