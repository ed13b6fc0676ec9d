// qcompile's ONNX Runtime custom-op library (domain "qcompile", CPU).
//
// Weights are stored as B-bit codes packed per output row (code i of a row occupies bits
// [i*B, i*B + B) of the row's little-endian bit stream) and a lookup table of 2^B floats per
// (row, block). A non-linear (or affine) B-bit quantizer has only 2^B distinct values per table,
// so dequantization is a table read and costs what affine dequantization costs.
//
//   LutDequantize(packed u8 [N, R], table f32 [N, G, 2^B]) -> W f32 [N, K]
//   LutMatMul(X f32 [..., K], packed, table) -> Y f32 [..., N] = X @ W^T   (W never materialised)
//
// Attributes: bits (1..8) and k (K >= 1). R must be ceil(K*B/8) and G must divide K.
//
// A model is untrusted input. Every input and output is declared required, so ONNX Runtime refuses a
// node that omits one or has too few or too many; the kernels check again anyway (count, presence,
// tensor-ness, element type, rank, shape) before reading anything, the attributes are checked when the
// kernel is created, and sizes derived from them use overflow-checked 64-bit arithmetic. Every failure
// is an ONNX Runtime error naming the op and the problem; no exception crosses the C API.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");

struct Layout {
  int bits = 0;
  int64_t k = 0, n = 0, row_bytes = 0, blocks = 0, block = 0, levels = 0;
  const uint8_t* packed = nullptr;
  const float* table = nullptr;

  const uint8_t* row_codes(int64_t row) const { return packed + row * row_bytes; }
  const float* row_table(int64_t row) const { return table + row * blocks * levels; }
  // The 16-lane SIMD path reads 16 4-bit codes (8 bytes) at a time within one block.
  bool simd4() const { return kHasAvx512 && bits == 4 && block % 16 == 0; }
};

// ------------------------------------------------------------------------------------------------
// Validation: everything below this section reads only what these functions have checked.

Ort::Status error(const char* op, const std::string& message) {
  return Ort::Status((op + (": " + message)).c_str(), ORT_INVALID_ARGUMENT);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string type_str(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

// The product of `dims` (each >= 0) times `scale`, or false when it exceeds int64.
bool checked_size(const std::vector<int64_t>& dims, int64_t scale, int64_t* size) {
  int64_t product = scale;
  for (int64_t d : dims)
    if (d < 0 || __builtin_mul_overflow(product, d, &product)) return false;
  *size = product;
  return true;
}

struct Attributes {
  int64_t bits = 0, k = 0;
};

// Read and range-check the attributes once, when ONNX Runtime creates the kernel (at session load).
Ort::Status read_attributes(const char* op, const OrtApi& api, const OrtKernelInfo* info, Attributes* out) {
  for (auto [name, value] : {std::pair{"bits", &out->bits}, std::pair{"k", &out->k}})
    if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, value)) {
      const std::string detail = api.GetErrorMessage(status);
      api.ReleaseStatus(status);
      return error(op, std::string("missing or non-integer attribute '") + name + "': " + detail);
    }
  if (out->bits < 1 || out->bits > 8)
    return error(op, "attribute bits must be in 1..8, got " + std::to_string(out->bits));
  if (out->k < 1) return error(op, "attribute k must be positive, got " + std::to_string(out->k));
  int64_t row_bits = 0;  // k * bits + 7 (the rounding in the row width) must fit int64
  if (__builtin_mul_overflow(out->k, out->bits, &row_bits) || row_bits > std::numeric_limits<int64_t>::max() - 7)
    return error(op, "attribute k = " + std::to_string(out->k) + " is too large: k * bits = " +
                         std::to_string(out->k) + " * " + std::to_string(out->bits) + " overflows int64");
  return Ort::Status{nullptr};
}

// One input of an op, by position: its name in messages and its element type.
struct InputSpec {
  const char* name;
  ONNXTensorElementDataType type;
};

// A present CPU tensor of the declared element type, with non-negative dimensions whose product fits int64.
struct Input {
  const void* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;  // elements
};

// Check the node's input and output counts, then fetch every input. Nothing is read before this returns OK.
template <size_t kCount>
Ort::Status read_inputs(const char* op, const Ort::KernelContext& context, const std::array<InputSpec, kCount>& specs,
                        std::array<Input, kCount>* inputs) {
  if (context.GetInputCount() != kCount) {
    std::string names;
    for (const auto& spec : specs) names += (names.empty() ? "" : ", ") + std::string(spec.name);
    return error(op, "expects " + std::to_string(kCount) + " inputs (" + names + "), got " +
                         std::to_string(context.GetInputCount()));
  }
  if (context.GetOutputCount() != 1)
    return error(op, "expects 1 output, got " + std::to_string(context.GetOutputCount()));
  for (size_t i = 0; i < kCount; ++i) {
    const std::string name = std::string("input ") + specs[i].name;
    const Ort::ConstValue value = context.GetInput(i);
    if (value == nullptr) return error(op, name + " is missing (omitted from the node)");
    if (!value.IsTensor()) return error(op, name + " is not a tensor");
    const auto info = value.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != specs[i].type)
      return error(op, name + " must be " + type_str(specs[i].type) + ", got " + type_str(info.GetElementType()));
    Input& input = (*inputs)[i];
    input.shape = info.GetShape();
    if (!checked_size(input.shape, 1, &input.size))
      return error(op, name + " has an invalid shape " + shape_str(input.shape));
    input.data = value.GetTensorRawData();
    if (input.size > 0 && input.data == nullptr) return error(op, name + " has no data");
  }
  return Ort::Status{nullptr};
}

// The float32 output, of `shape`; its size in bytes must fit int64, as the kernels index it with int64.
Ort::Status allocate_output(const char* op, const Ort::KernelContext& context, const std::vector<int64_t>& shape,
                            float** out) {
  int64_t bytes = 0;
  if (!checked_size(shape, sizeof(float), &bytes))
    return error(op, "output shape " + shape_str(shape) + " is too large");
  Ort::UnownedValue value = context.GetOutput(0, shape);
  if (value == nullptr) return error(op, "output is missing (omitted from the node)");
  *out = value.GetTensorMutableData<float>();
  if (bytes > 0 && *out == nullptr) return error(op, "could not allocate the output " + shape_str(shape));
  return Ort::Status{nullptr};
}

// The packed codes and table against the (already range-checked) attributes.
Ort::Status check_layout(const char* op, const Attributes& a, const Input& packed, const Input& table, Layout* out) {
  const auto& ps = packed.shape;
  const auto& ts = table.shape;
  if (ps.size() != 2) return error(op, "packed codes must be 2-D [N, R], got " + shape_str(ps));
  if (ts.size() != 3) return error(op, "table must be 3-D [N, G, 2^bits], got " + shape_str(ts));
  const int64_t row_bytes = (a.k * a.bits + 7) / 8;  // cannot overflow: read_attributes checked it
  if (ps[1] != row_bytes)
    return error(op, "packed codes have " + std::to_string(ps[1]) + " bytes per row; " + std::to_string(a.k) +
                         " codes of " + std::to_string(a.bits) + " bits need " + std::to_string(row_bytes));
  if (ts[0] != ps[0])
    return error(op, "table has " + std::to_string(ts[0]) + " rows, packed codes " + std::to_string(ps[0]));
  if (ts[2] != (int64_t{1} << a.bits))
    return error(op, "table has " + std::to_string(ts[2]) + " entries per block, " + std::to_string(a.bits) +
                         "-bit codes need " + std::to_string(int64_t{1} << a.bits));
  if (ts[1] < 1 || a.k % ts[1] != 0)
    return error(op, "table has " + std::to_string(ts[1]) + " blocks per row, which does not divide k = " +
                         std::to_string(a.k));
  *out = Layout{static_cast<int>(a.bits), a.k, ps[0], row_bytes, ts[1], a.k / ts[1], ts[2],
                static_cast<const uint8_t*>(packed.data), static_cast<const float*>(table.data)};
  return Ort::Status{nullptr};
}

// ------------------------------------------------------------------------------------------------
// Kernels: from here on, every read is within a checked Layout.

// Portable dequantization of codes [first, first + count) of a row into out[0, count), one code at a time from
// the bit stream, never past the row's end.
void dequantize_scalar(const Layout& l, int64_t row, int64_t first, int64_t count, float* out) {
  const uint8_t* codes = l.row_codes(row);
  const float* table = l.row_table(row);
  const unsigned mask = (1u << l.bits) - 1;
  for (int64_t i = first, end = first + count; i < end;) {
    const int64_t b = i / l.block, stop = std::min(end, (b + 1) * l.block);
    for (; i < stop; ++i) {
      const int64_t bit = i * l.bits, byte = bit >> 3;
      unsigned word = codes[byte];
      if (byte + 1 < l.row_bytes) word |= unsigned(codes[byte + 1]) << 8;
      const unsigned code = (word >> (bit & 7)) & mask;
      out[i - first] = table[b * l.levels + code];
    }
  }
}

// 16 consecutive 4-bit codes (8 bytes) -> 16 table values; permutexvar reads only the low 4 index bits,
// so the nibbles need no masking.
__attribute__((target("avx512f,avx512bw"))) inline __m512 lookup16(const uint8_t* codes, __m512 table) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  const __m128i nibbles = _mm_unpacklo_epi8(bytes, _mm_srli_epi16(bytes, 4));
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles), table);
}

__attribute__((target("avx512f,avx512bw"))) void dequantize_row_simd4(const Layout& l, int64_t row, float* out) {
  const uint8_t* codes = l.row_codes(row);
  const float* table = l.row_table(row);
  for (int64_t b = 0; b < l.blocks; ++b) {
    const __m512 t = _mm512_loadu_ps(table + b * 16);
    for (int64_t i = b * l.block; i < (b + 1) * l.block; i += 16) _mm512_storeu_ps(out + i, lookup16(codes + i / 2, t));
  }
}

void dequantize_row(const Layout& l, int64_t row, float* out) {
  if (l.simd4())
    dequantize_row_simd4(l, row, out);
  else
    dequantize_scalar(l, row, 0, l.k, out);
}

// Batch-1 fused kernel: y = <x, W[row]> with W[row] read straight from the codes, four accumulators.
__attribute__((target("avx512f,avx512bw"))) float dot_row_simd4(const Layout& l, int64_t row, const float* x) {
  const uint8_t* codes = l.row_codes(row);
  const float* table = l.row_table(row);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t b = 0; b < l.blocks; ++b) {
    const __m512 t = _mm512_loadu_ps(table + b * 16);
    int64_t i = b * l.block;
    const int64_t end = i + l.block;
    for (; i + 64 <= end; i += 64)
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm512_fmadd_ps(lookup16(codes + (i + 16 * u) / 2, t), _mm512_loadu_ps(x + i + 16 * u), acc[u]);
    for (; i < end; i += 16) acc[0] = _mm512_fmadd_ps(lookup16(codes + i / 2, t), _mm512_loadu_ps(x + i), acc[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// Small batches, 4-bit: the batch-1 kernel's lookups, each shared by kRows rows of X. Four rows of W at a time
// (a ragged group repeats its last row), so each 16 values of X loaded serve four lookups;
// y[r * y_stride + w] = <x_r, W[row + w]> for r < kRows, w < rows.
template <int kRows>
__attribute__((target("avx512f,avx512bw"))) void dot_rows_simd4(const Layout& l, int64_t row, int64_t rows,
                                                                const float* x, float* y, int64_t y_stride) {
  const uint8_t* codes[4];
  const float* tables[4];
  for (int w = 0; w < 4; ++w) {
    codes[w] = l.row_codes(row + std::min<int64_t>(w, rows - 1));
    tables[w] = l.row_table(row + std::min<int64_t>(w, rows - 1));
  }
  __m512 acc[4][kRows];
  for (auto& line : acc)
    for (auto& a : line) a = _mm512_setzero_ps();
  for (int64_t b = 0; b < l.blocks; ++b) {
    __m512 t[4];
    for (int w = 0; w < 4; ++w) t[w] = _mm512_loadu_ps(tables[w] + b * 16);
    for (int64_t i = b * l.block; i < (b + 1) * l.block; i += 16) {
      __m512 wv[4];
      for (int w = 0; w < 4; ++w) wv[w] = lookup16(codes[w] + i / 2, t[w]);
      for (int r = 0; r < kRows; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * l.k + i);
        for (int w = 0; w < 4; ++w) acc[w][r] = _mm512_fmadd_ps(wv[w], xv, acc[w][r]);
      }
    }
  }
  for (int w = 0; w < rows; ++w)
    for (int r = 0; r < kRows; ++r) y[r * y_stride + w] = _mm512_reduce_add_ps(acc[w][r]);
}

using DotRows = void (*)(const Layout&, int64_t, int64_t, const float*, float*, int64_t);
constexpr DotRows kDotRows[4] = {dot_rows_simd4<1>, dot_rows_simd4<2>, dot_rows_simd4<3>, dot_rows_simd4<4>};

// Portable batched product, for CPUs without AVX-512: Y[r, c] = <X[r], W[c]> for r < m, c < rows, Y row stride
// y_stride.
void matmul_rows_scalar(const float* w, int64_t rows, const float* x, int64_t m, int64_t k, float* y,
                        int64_t y_stride) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < rows; ++c) {
      float sum = 0.f;
      for (int64_t i = 0; i < k; ++i) sum += w[c * k + i] * x[r * k + i];
      y[r * y_stride + c] = sum;
    }
}

// ------------------------------------------------------------------------------------------------
// Batched LutMatMul on AVX-512 (every M > kSmallBatch, and every M with widths other than 4 bits): Y^T = W X^T,
// BLIS-style, with rows of X in the vector lanes and W broadcast one weight at a time, so that W is never transposed nor, with 4-bit codes,
// even written out: the microkernel takes each code from the packed row (shift and mask, on the integer units)
// and broadcasts its table entry straight from memory, beside the FMAs. (A first version that dequantized W
// into a transposed buffer spent a fifth of the time at M = 64 on the lookups and the transposes.)
// * X is transposed once per call, by the tasks, into blocks of 1 or 2 vectors (16 rows each, zero-padded past
//   M), each laid out [K][16 * vectors].
// * A task takes kNc output channels and a part of the blocks, and runs K in panels of kKc (one block's panel of
//   X stays in L1; a K up to kMaxKc is one panel; with lookups, a panel holds at most kTableSets whole tables or
//   lies within one). The microkernel multiplies kChannels channels by one block's panel into 12 or 24 zmm
//   accumulators, which it adds into the task's [kNc][rows] scratch of Y^T.
// * At the end of the task, the scratch is transposed into Y.
// Other widths (and 4-bit blocks not a multiple of 16) dequantize each panel into a [kNc][kMaxKc] buffer first,
// with the same microkernel broadcasting from it.

constexpr int kChannels = 12;      // per microkernel: 12 x 2 accumulators + 2 vectors of X + 1 broadcast of 32 zmm
constexpr int kMaxVectors = 2;     // 32 rows of X per microkernel
constexpr int64_t kNc = 48;        // a multiple of 16 (the final transpose) and of kChannels
constexpr int64_t kKc = 256;       // a multiple of 16; a block's panel of X (32 KB) stays in L1
constexpr int64_t kMaxKc = 384;    // a K up to this is one panel: MiniLM's 384, 3% faster than 256 + 128
constexpr int64_t kTableSets = 4;  // tables per channel a panel may span (blocks of 64 codes or less end it sooner)
constexpr int64_t kMaxPartBlocks = 4;  // at most 128 rows of X per task: bounds the scratch

// v[r] (row r, lane c) becomes v[c] (row c, lane r): 4 rounds of 16 two-source shuffles.
__attribute__((target("avx512f"))) inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i], t[i+1]: in each 128-bit lane, columns (0, 1) and (2, 3) of rows i, i+1
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // v[i + c]: in lane L, column 4L + c of rows i..i+3
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[i + h]), b = _mm512_castps_pd(t[i + h + 2]);
      v[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      v[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes across v[c], v[4 + c], v[8 + c], v[12 + c]
    const __m512 lo01 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x44), hi01 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x44),
                 hi23 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);  // column 4L + c goes to t[4L + c]
    t[4 + c] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
  for (int c = 0; c < 16; ++c) v[c] = t[c];
}

inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : count <= 0 ? 0 : (1u << count) - 1);
}

// Rows [first, first + 16 * vectors) of X (m x k; zero past row m) into out [k][16 * vectors], 64-byte aligned.
__attribute__((target("avx512f"))) void pack_x_block(const float* x, int64_t m, int64_t k, int64_t first,
                                                     int64_t vectors, float* out) {
  const int64_t width = 16 * vectors;
  for (int64_t v = 0; v < vectors; ++v) {
    const int64_t r0 = first + 16 * v, rows = std::clamp<int64_t>(m - r0, 0, 16);
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 lanes = first_lanes(k - i);
      __m512 t[16];
      for (int64_t r = 0; r < 16; ++r)
        t[r] = r < rows ? _mm512_maskz_loadu_ps(lanes, x + (r0 + r) * k + i) : _mm512_setzero_ps();
      transpose16(t);
      for (int64_t c = 0; c < std::min<int64_t>(16, k - i); ++c) _mm512_store_ps(out + (i + c) * width + 16 * v, t[c]);
    }
  }
}

// One microkernel call: kChannels channels by a K panel of one block of X.
struct Tile {
  int64_t kc;
  const float* w;            // lookup: the group's tables, kTableSets * 16 floats a channel; else W, row stride
                             // kMaxKc
  const uint8_t* codes;      // lookup: the group's 4-bit codes from the panel's start, row stride codes_stride
  int64_t codes_stride;
  int64_t table_chunks;      // lookup: the 16-code chunks each table set covers (kc is a multiple of 16)
  const float* x;            // the block's panel, [kc][16 * vectors], 64-byte aligned
  float* y;                  // Y^T [kChannels][16 * vectors], row stride y_stride, 64-byte aligned
  int64_t y_stride;
  bool accumulate;           // add to y (K panels after the first)
};

template <int kVectors, bool kLookup>
__attribute__((target("avx512f"))) void microkernel(const Tile& t) {
  __m512 acc[kChannels][kVectors];
  for (auto& channel : acc)
    for (auto& a : channel) a = _mm512_setzero_ps();
  const float* x = t.x;
  if constexpr (kLookup) {
    const float* tables = t.w;
    for (int64_t j = 0, left = t.table_chunks; j < t.kc; j += 16, --left) {
      if (left == 0) tables += 16, left = t.table_chunks;
      uint64_t bits[kChannels];  // 16 codes of each channel, lowest first
      for (int c = 0; c < kChannels; ++c) std::memcpy(&bits[c], t.codes + c * t.codes_stride + j / 2, sizeof(uint64_t));
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i, x += 16 * kVectors) {
        __m512 xv[kVectors];
        for (int v = 0; v < kVectors; ++v) xv[v] = _mm512_load_ps(x + 16 * v);
#pragma GCC unroll 12
        for (int c = 0; c < kChannels; ++c) {
          const __m512 wc = _mm512_set1_ps(tables[c * kTableSets * 16 + ((bits[c] >> (4 * i)) & 15)]);
          for (int v = 0; v < kVectors; ++v) acc[c][v] = _mm512_fmadd_ps(wc, xv[v], acc[c][v]);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < t.kc; ++i, x += 16 * kVectors) {
      __m512 xv[kVectors];
      for (int v = 0; v < kVectors; ++v) xv[v] = _mm512_load_ps(x + 16 * v);
#pragma GCC unroll 12
      for (int c = 0; c < kChannels; ++c) {
        const __m512 wc = _mm512_set1_ps(t.w[c * kMaxKc + i]);
        for (int v = 0; v < kVectors; ++v) acc[c][v] = _mm512_fmadd_ps(wc, xv[v], acc[c][v]);
      }
    }
  }
#pragma GCC unroll 12
  for (int c = 0; c < kChannels; ++c)
    for (int v = 0; v < kVectors; ++v) {
      float* out = t.y + c * t.y_stride + 16 * v;
      _mm512_store_ps(out, t.accumulate ? _mm512_add_ps(acc[c][v], _mm512_load_ps(out)) : acc[c][v]);
    }
}

using Microkernel = void (*)(const Tile&);
constexpr Microkernel kMicrokernels[2][kMaxVectors] = {{microkernel<1, false>, microkernel<2, false>},
                                                       {microkernel<1, true>, microkernel<2, true>}};

// scratch [kNc][16 * vectors] (row stride 16 * vectors) holds Y^T for channels n0.. and rows first..; write
// the channels below width and the rows below m into y (m x n). Y is written a row at a time (16 x kNc floats are
// transposed through `rows` first): down a column of Y, 16 lines with a stride like 6 or 16 KB share an L1 set,
// and stores in that order ran 5-8 times slower.
__attribute__((target("avx512f"))) void store_transposed(const float* scratch, int64_t vectors, int64_t width,
                                                         int64_t first, int64_t m, int64_t n, int64_t n0, float* y) {
  const int64_t stride = 16 * vectors;
  alignas(64) float rows[16][kNc];
  for (int64_t v = 0; v < vectors; ++v) {
    for (int64_t c0 = 0; c0 < width; c0 += 16) {
      __m512 t[16];
      for (int64_t c = 0; c < 16; ++c) t[c] = _mm512_load_ps(scratch + (c0 + c) * stride + 16 * v);
      transpose16(t);
      for (int64_t r = 0; r < 16; ++r) _mm512_store_ps(&rows[r][c0], t[r]);
    }
    for (int64_t r = 0, row = first + 16 * v; r < 16 && row < m; ++r, ++row)
      for (int64_t c0 = 0; c0 < width; c0 += 16)
        _mm512_mask_storeu_ps(y + row * n + n0 + c0, first_lanes(width - c0), _mm512_load_ps(&rows[r][c0]));
  }
}

// Short copies (a table set, a row's codes in a panel): a library call for each cost several percent.
__attribute__((target("avx512f,avx512bw"))) inline void copy_bytes(const uint8_t* from, int64_t count, uint8_t* to) {
  for (int64_t i = 0; i < count; i += 64) {
    const __mmask64 lanes = count - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (count - i)) - 1;
    _mm512_mask_storeu_epi8(to + i, lanes, _mm512_maskz_loadu_epi8(lanes, from + i));
  }
}
__attribute__((target("avx512f"))) inline void copy_floats(const float* from, int64_t count, float* to) {
  for (int64_t i = 0; i < count; i += 16) _mm512_mask_storeu_ps(to + i, first_lanes(count - i), _mm512_loadu_ps(from + i));
}

// `count` near-equal parts of [0, total): part p starts at start(p); no intermediate exceeds total.
struct Split {
  int64_t total, count;
  int64_t start(int64_t p) const { return p * (total / count) + std::min(p, total % count); }
};

// One product on the batched AVX-512 path: the split into tasks and the transposed X they share. The caller
// provides the memory (64-byte aligned): packed_x_floats() for X, kTaskFloats per running task. X is transposed by
// the tasks themselves, each block by the first task to need it, so the product takes one pass over the thread
// pool, not two (a second dispatch and barrier cost several percent on MiniLM's shapes).
class PackedMatMul {
 public:
  // Fewer channel blocks than this and the rows of X are split over tasks too (each then reads its channels).
  static constexpr int64_t kMinTasks = 8;
  static constexpr int64_t kScratchFloats = kNc * 16 * kMaxVectors * kMaxPartBlocks;
  // The scratch, then the W panel (other widths), or the tables and a ragged last group's codes (4-bit).
  static constexpr int64_t kTaskFloats =
      kScratchFloats + std::max(kNc * kMaxKc, kTableSets * kNc * 16 + kChannels * kMaxKc / 8);

  static int64_t packed_x_floats(int64_t m, int64_t k) { return (m + 15) / 16 * 16 * k; }

  PackedMatMul(const Layout& l, const float* x, int64_t m, float* y, float* packed_x)
      : l_(l), x_(x), y_(y), m_(m), channel_blocks_((l.n + kNc - 1) / kNc), packed_x_(packed_x) {
    const int64_t vectors = (m + 15) / 16;
    blocks_ = {vectors, (vectors + kMaxVectors - 1) / kMaxVectors};
    packing_.reset(new std::atomic<int>[static_cast<size_t>(blocks_.count)]());  // all kIdle
    const int64_t parts = std::max((blocks_.count + kMaxPartBlocks - 1) / kMaxPartBlocks,
                                   (kMinTasks + channel_blocks_ - 1) / channel_blocks_);
    parts_ = {blocks_.count, std::min(parts, blocks_.count)};
  }

  int64_t tasks() const { return channel_blocks_ * parts_.count; }

  // Y for channels [n0, n0 + kNc) and the rows of one part of the blocks.
  __attribute__((target("avx512f,avx512bw"))) void run(int64_t task, float* buffer) const {
    const int64_t n0 = task / parts_.count * kNc, part = task % parts_.count;
    const int64_t width = std::min(kNc, l_.n - n0);
    const int64_t b0 = parts_.start(part), b1 = parts_.start(part + 1);
    const int64_t v0 = blocks_.start(b0), stride = 16 * (blocks_.start(b1) - v0);  // scratch row: the part's rows
    // The part's blocks of X: transpose those no task has claimed yet, then wait for the others.
    for (int64_t b = b0; b < b1; ++b)
      if (int idle = kIdle; packing_[b].compare_exchange_strong(idle, kPacking, std::memory_order_acquire)) {
        const int64_t first = blocks_.start(b);
        pack_x_block(x_, m_, l_.k, 16 * first, blocks_.start(b + 1) - first, x_block(b));
        packing_[b].store(kPacked, std::memory_order_release);
      }
    for (int64_t b = b0; b < b1; ++b)
      while (packing_[b].load(std::memory_order_acquire) != kPacked) _mm_pause();
    float* scratch = buffer;  // [kNc][stride]
    float* w = buffer + kScratchFloats;
    const bool lookup = l_.simd4();
    // With lookups, the tables are copied into [kNc][kTableSets][16], so the microkernel finds each by a constant
    // offset, and the codes are read in place, except those of a ragged last group: they are copied, kMaxKc / 2 bytes
    // a row, beside zero rows for the channels past N (whose tables are zero too).
    auto* edge_codes = reinterpret_cast<uint8_t*>(w + kTableSets * kNc * 16);
    const int64_t edge = width / kChannels * kChannels;
    if (lookup) {
      std::fill(w, w + kTableSets * kNc * 16, 0.f);
      std::fill(edge_codes, edge_codes + kChannels * kMaxKc / 2, uint8_t{0});
    } else {
      std::fill(w + width * kMaxKc, w + kNc * kMaxKc, 0.f);  // W panel [kNc][kMaxKc]; channels past N stay zero
    }
    // A panel with lookups spans whole tables, or lies within one.
    const int64_t panel = l_.k <= kMaxKc ? l_.k : kKc;
    const int64_t span =
        !lookup || l_.block >= panel ? panel : std::min(panel, kTableSets * l_.block) / l_.block * l_.block;
    for (int64_t k0 = 0, kc = 0; k0 < l_.k; k0 += kc) {
      kc = std::min(span, l_.k - k0);
      if (lookup && l_.block > panel) kc = std::min(kc, l_.block - k0 % l_.block);
      const int64_t first_table = k0 / l_.block, tables = lookup ? (k0 + kc - 1) / l_.block - first_table + 1 : 0;
      const bool new_tables = k0 % l_.block == 0;
      // A group's panel (its tables and ragged codes, or its dequantized W) is prepared just before the microkernel
      // of the group before it, so that the copies overlap that microkernel's FMAs.
      const auto prepare = [&](int64_t group) {
        for (int64_t c = group; c < std::min(width, group + kChannels); ++c)
          if (lookup) {
            if (new_tables) copy_floats(l_.row_table(n0 + c) + first_table * 16, tables * 16, w + c * kTableSets * 16);
            if (c >= edge) copy_bytes(l_.row_codes(n0 + c) + k0 / 2, kc / 2, edge_codes + (c - edge) * kMaxKc / 2);
            // The next panel's codes and tables, to cache while this one computes: otherwise they come from memory
            // (or L3) a row at a time, as the microkernel and the copies reach them.
            const int64_t next = k0 + kc, ahead = std::min(span, l_.k - next);
            for (int64_t i = 0; i < ahead / 2; i += 64)
              _mm_prefetch(reinterpret_cast<const char*>(l_.row_codes(n0 + c) + next / 2) + i, _MM_HINT_T0);
            for (int64_t b = next / l_.block; ahead > 0 && b <= (next + ahead - 1) / l_.block; ++b)
              _mm_prefetch(reinterpret_cast<const char*>(l_.row_table(n0 + c) + b * 16), _MM_HINT_T0);
          } else {
            dequantize_scalar(l_, n0 + c, k0, kc, w + c * kMaxKc);
          }
      };
      prepare(0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t first = blocks_.start(b), vectors = blocks_.start(b + 1) - first;
        for (int64_t c = 0; c < width; c += kChannels) {
          if (b == b0) prepare(c + kChannels);
          const bool whole = c < edge;
          kMicrokernels[lookup][vectors - 1](Tile{
              kc, w + c * (lookup ? kTableSets * 16 : kMaxKc), whole ? l_.row_codes(n0 + c) + k0 / 2 : edge_codes,
              whole ? l_.row_bytes : kMaxKc / 2, std::min(kc, l_.block) / 16, x_block(b) + 16 * vectors * k0,
              scratch + c * stride + 16 * (first - v0), stride, k0 > 0});
        }
      }
    }
    store_transposed(scratch, stride / 16, width, 16 * v0, m_, l_.n, n0, y_);
  }

 private:
  float* x_block(int64_t b) const { return packed_x_ + 16 * blocks_.start(b) * l_.k; }

  const Layout& l_;
  const float* x_;
  float* y_;
  int64_t m_, channel_blocks_;
  float* packed_x_;
  static constexpr int kIdle = 0, kPacking = 1, kPacked = 2;
  std::unique_ptr<std::atomic<int>[]> packing_;  // per block of X
  Split blocks_;  // X's vectors (16 rows each) into blocks of at most kMaxVectors, each packed [k][16 * vectors]
  Split parts_;   // blocks into parts; a task is one block of kNc channels by one part
};

// Rows are split into tasks of a few rows each and run on ONNX Runtime's intra-op thread pool.
constexpr int64_t kRowsPerTask = 16;
// Up to this many rows of X (one vector of the batched path), 4-bit products take dot_rows_simd4, with lanes along
// K: faster there, as each code feeds 4 to 16 FMAs instead of one (2.2 ms against 3.0 at M = 16, 4096 x 4096).
constexpr int64_t kSmallBatch = 16;

// Tasks run on ONNX Runtime's threads: an exception (std::bad_alloc) must not leave them. The first one's
// message is kept, and Compute reports it once every task has finished.
struct TaskErrors {
  std::atomic<bool> failed{false};
  std::string message;

  template <typename F>
  void run(F&& body) {
    try {
      body();
    } catch (const std::exception& e) {
      if (!failed.exchange(true)) message = e.what();
    } catch (...) {
      if (!failed.exchange(true)) message = "unknown exception";
    }
  }
};

// A kernel: the checked attributes and the C API's compute entry, which lets no exception out.
template <typename Kernel>
struct LutKernel {
  Attributes attributes;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      return static_cast<Kernel*>(this)->Compute(Ort::KernelContext(context)).release();
    } catch (const std::exception& e) {  // Ort::Exception included
      return error(Kernel::kName, e.what()).release();
    } catch (...) {
      return error(Kernel::kName, "unknown exception").release();
    }
  }
};

struct LutDequantize : LutKernel<LutDequantize> {
  static constexpr const char* kName = "LutDequantize";
  static constexpr std::array<InputSpec, 2> kInputs{{{"packed", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
                                                     {"table", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}}};

  Ort::Status Compute(const Ort::KernelContext& context) {
    std::array<Input, 2> in;
    Layout l;
    float* out = nullptr;
    if (auto status = read_inputs(kName, context, kInputs, &in); !status.IsOK()) return status;
    if (auto status = check_layout(kName, attributes, in[0], in[1], &l); !status.IsOK()) return status;
    if (auto status = allocate_output(kName, context, {l.n, l.k}, &out); !status.IsOK()) return status;
    struct Job {
      const Layout* l;
      float* out;
    } job{&l, out};
    const size_t tasks = static_cast<size_t>((l.n + kRowsPerTask - 1) / kRowsPerTask);
    context.ParallelFor(
        [](void* data, size_t task) {
          auto* j = static_cast<Job*>(data);
          const int64_t end = std::min<int64_t>(j->l->n, (task + 1) * kRowsPerTask);
          for (int64_t row = task * kRowsPerTask; row < end; ++row) dequantize_row(*j->l, row, j->out + row * j->l->k);
        },
        tasks, 0, &job);
    return Ort::Status{nullptr};
  }
};

struct LutMatMul : LutKernel<LutMatMul> {
  static constexpr const char* kName = "LutMatMul";
  static constexpr std::array<InputSpec, 3> kInputs{{{"X", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
                                                     {"packed", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
                                                     {"table", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}}};

  Ort::Status Compute(const Ort::KernelContext& context) {
    std::array<Input, 3> in;
    Layout l;
    if (auto status = read_inputs(kName, context, kInputs, &in); !status.IsOK()) return status;
    if (auto status = check_layout(kName, attributes, in[1], in[2], &l); !status.IsOK()) return status;
    std::vector<int64_t> shape = in[0].shape;
    if (shape.empty() || shape.back() != l.k)
      return error(kName, "input X has shape " + shape_str(shape) + "; its last dimension must be k = " +
                              std::to_string(l.k));
    const int64_t m = in[0].size / l.k;  // m > 0 bounds k by X's real size, so the per-task scratch fits
    shape.back() = l.n;
    float* y = nullptr;
    if (auto status = allocate_output(kName, context, shape, &y); !status.IsOK()) return status;
    if (m == 0 || l.n == 0) return Ort::Status{nullptr};
    const auto* x = static_cast<const float*>(in[0].data);
    if (kHasAvx512 && !(m <= kSmallBatch && l.simd4())) return matmul_packed(context, l, x, m, y);
    struct Job {
      const Layout* l;
      const float* x;
      float* y;
      int64_t m;
      TaskErrors errors;
    } job{&l, x, y, m, {}};
    const size_t tasks = static_cast<size_t>((l.n + kRowsPerTask - 1) / kRowsPerTask);
    context.ParallelFor(
        [](void* data, size_t task) {
          auto* j = static_cast<Job*>(data);
          const Layout& l = *j->l;
          const int64_t first = task * kRowsPerTask, end = std::min<int64_t>(l.n, first + kRowsPerTask);
          if (j->m == 1 && l.simd4()) {
            for (int64_t row = first; row < end; ++row) j->y[row] = dot_row_simd4(l, row, j->x);
            return;
          }
          if (l.simd4()) {  // a small batch (kSmallBatch rows at most): X in groups of up to 4 rows
            for (int64_t r = 0; r < j->m; r += 4)
              for (int64_t row = first; row < end; row += 4)
                kDotRows[std::min<int64_t>(4, j->m - r) - 1](l, row, std::min<int64_t>(4, end - row), j->x + r * l.k,
                                                             j->y + r * l.n + row, l.n);
            return;
          }
          j->errors.run([&] {
            std::vector<float> w(static_cast<size_t>((end - first) * l.k));
            for (int64_t row = first; row < end; ++row) dequantize_row(l, row, w.data() + (row - first) * l.k);
            matmul_rows_scalar(w.data(), end - first, j->x, j->m, l.k, j->y + first, l.n);
          });
        },
        tasks, 0, &job);
    if (job.errors.failed) return error(kName, job.errors.message);
    return Ort::Status{nullptr};
  }

  // The AVX-512 batched path. Memory comes from ONNX Runtime's CPU allocator (its arena, by default), which keeps
  // it between runs: freed to the system and faulted in again on every run, it cost a tenth of the time on MiniLM's
  // shapes.
  static Ort::Status matmul_packed(const Ort::KernelContext& context, const Layout& l, const float* x, int64_t m,
                                   float* y) {
    const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const std::unique_ptr<OrtAllocator, void (*)(OrtAllocator*)> allocator(
        context.GetAllocator(*cpu), [](OrtAllocator* a) { Ort::GetApi().ReleaseAllocator(a); });
    Ort::UnownedAllocator arena(allocator.get());
    Ort::MemoryAllocation packed_x = allocate(arena, PackedMatMul::packed_x_floats(m, l.k));
    struct Job {
      Ort::UnownedAllocator& arena;
      PackedMatMul product;
      TaskErrors errors;
    } job{arena, PackedMatMul(l, x, m, y, aligned(packed_x)), {}};
    context.ParallelFor(
        [](void* data, size_t task) {
          auto* j = static_cast<Job*>(data);
          j->errors.run([&] {
            Ort::MemoryAllocation buffer = allocate(j->arena, PackedMatMul::kTaskFloats);
            j->product.run(task, aligned(buffer));
          });
        },
        static_cast<size_t>(job.product.tasks()), 0, &job);
    if (job.errors.failed) return error(kName, job.errors.message);
    return Ort::Status{nullptr};
  }

  // floats, plus room to align them to 64 bytes.
  static Ort::MemoryAllocation allocate(Ort::UnownedAllocator& allocator, int64_t floats) {
    Ort::MemoryAllocation memory = allocator.GetAllocation(static_cast<size_t>(floats) * sizeof(float) + 64);
    if (memory.get() == nullptr) throw std::bad_alloc();
    return memory;
  }
  static float* aligned(Ort::MemoryAllocation& memory) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(memory.get()) + 63) & ~uintptr_t{63});
  }
};

// The op schema and kernel factory for Kernel. Every input and output is required (CustomOpBase's default
// characteristic), so ONNX Runtime refuses at load a node that omits one or has the wrong number.
template <typename Kernel>
struct LutOp : Ort::CustomOpBase<LutOp<Kernel>, Kernel, /*WithStatus=*/true> {
  LutOp() {
    // The status-returning callbacks replace these; leave no pointer uninitialised.
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
  }
  const char* GetName() const { return Kernel::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return Kernel::kInputs.size(); }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index < Kernel::kInputs.size() ? Kernel::kInputs[index].type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      Attributes attributes;
      if (auto status = read_attributes(Kernel::kName, api, info, &attributes); !status.IsOK()) return status.release();
      auto* created = new Kernel;
      created->attributes = attributes;
      *kernel = created;
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::Status(e).release();
    }
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  try {
    const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
    if (api == nullptr)  // an ONNX Runtime older than the headers: report it through the first API version
      return api_base->GetApi(1)->CreateStatus(
          ORT_FAIL, ("qcompile's custom ops need ONNX Runtime API version " + std::to_string(ORT_API_VERSION) +
                     " or newer; this ONNX Runtime is " + api_base->GetVersionString())
                        .c_str());
    Ort::InitApi(api);
    static LutOp<LutDequantize> dequantize;
    static LutOp<LutMatMul> matmul;
    static Ort::CustomOpDomain domain = [] {  // built once, even by concurrent registrations
      Ort::CustomOpDomain made{"qcompile"};
      made.Add(&dequantize);
      made.Add(&matmul);
      return made;
    }();
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const std::exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
