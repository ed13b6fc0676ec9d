"""The packed lookup-table format and the qcompile custom ops (C++ library and standard-op fallback)
against NumPy references built from the unpacked codes."""
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
