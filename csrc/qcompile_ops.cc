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
// Attributes: bits (1..8) and k (K). R must be ceil(K*B/8) and G must divide K. Every shape is
// checked before any read; a mismatch returns an ONNX Runtime error.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

using Ort::Custom::Tensor;

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

Ort::Status error(const std::string& message) { return Ort::Status(message.c_str(), ORT_INVALID_ARGUMENT); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Ort::Status check_layout(const std::string& op, int64_t bits, int64_t k, const Tensor<uint8_t>& packed,
                         const Tensor<float>& table, Layout* out) {
  if (bits < 1 || bits > 8) return error(op + ": attribute bits must be in 1..8, got " + std::to_string(bits));
  if (k < 1) return error(op + ": attribute k must be positive, got " + std::to_string(k));
  const auto& ps = packed.Shape();
  const auto& ts = table.Shape();
  if (ps.size() != 2) return error(op + ": packed codes must be 2-D [N, R], got " + shape_str(ps));
  if (ts.size() != 3) return error(op + ": table must be 3-D [N, G, 2^bits], got " + shape_str(ts));
  const int64_t row_bytes = (k * bits + 7) / 8;
  if (ps[1] != row_bytes)
    return error(op + ": packed codes have " + std::to_string(ps[1]) + " bytes per row; " + std::to_string(k) +
                 " codes of " + std::to_string(bits) + " bits need " + std::to_string(row_bytes));
  if (ts[0] != ps[0])
    return error(op + ": table has " + std::to_string(ts[0]) + " rows, packed codes " + std::to_string(ps[0]));
  if (ts[2] != (int64_t{1} << bits))
    return error(op + ": table has " + std::to_string(ts[2]) + " entries per block, " + std::to_string(bits) +
                 "-bit codes need " + std::to_string(int64_t{1} << bits));
  if (ts[1] < 1 || k % ts[1] != 0)
    return error(op + ": table has " + std::to_string(ts[1]) + " blocks per row, which does not divide k = " +
                 std::to_string(k));
  *out = Layout{static_cast<int>(bits), k, ps[0], row_bytes, ts[1], k / ts[1], ts[2], packed.Data(), table.Data()};
  return Ort::Status{nullptr};
}

// Portable row dequantization: one code at a time from the bit stream, never past the row's end.
void dequantize_row_scalar(const Layout& l, int64_t row, float* out) {
  const uint8_t* codes = l.row_codes(row);
  const float* table = l.row_table(row);
  const unsigned mask = (1u << l.bits) - 1;
  for (int64_t i = 0; i < l.k; ++i) {
    const int64_t bit = i * l.bits, byte = bit >> 3;
    unsigned word = codes[byte];
    if (byte + 1 < l.row_bytes) word |= unsigned(codes[byte + 1]) << 8;
    const unsigned code = (word >> (bit & 7)) & mask;
    out[i] = table[(i / l.block) * l.levels + code];
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
    dequantize_row_scalar(l, row, out);
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

__attribute__((target("avx512f"))) float dot_simd(const float* a, const float* b, int64_t k) {
  const int64_t body = k - k % 16;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < body; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % 16)) - 1);
  acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + body), _mm512_maskz_loadu_ps(tail, b + body), acc);
  return _mm512_reduce_add_ps(acc);
}

// Y[r, c] = <X[r], W[c]> for r < m, c < rows, Y row stride y_stride. Register tiles of 4 rows of W by 4 rows of X
// (16 accumulators) share every load; ragged edges go one pair at a time with a masked tail.
__attribute__((target("avx512f"))) void matmul_rows_simd(const float* w, int64_t rows, const float* x, int64_t m,
                                                         int64_t k, float* y, int64_t y_stride) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % 16)) - 1);
  const int64_t body = k - k % 16;
  const int64_t rows4 = rows - rows % 4, m4 = m - m % 4;
  for (int64_t r0 = 0; r0 < m4; r0 += 4)
    for (int64_t c0 = 0; c0 < rows4; c0 += 4) {
      __m512 acc[4][4];
      for (auto& line : acc)
        for (auto& a : line) a = _mm512_setzero_ps();
      for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 lanes = i < body ? __mmask16(0xFFFF) : tail;
        __m512 wv[4];
        for (int c = 0; c < 4; ++c) wv[c] = _mm512_maskz_loadu_ps(lanes, w + (c0 + c) * k + i);
        for (int r = 0; r < 4; ++r) {
          const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + (r0 + r) * k + i);
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) y[(r0 + r) * y_stride + c0 + c] = _mm512_reduce_add_ps(acc[r][c]);
    }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = (r < m4 ? rows4 : 0); c < rows; ++c) y[r * y_stride + c] = dot_simd(w + c * k, x + r * k, k);
}

void matmul_rows_scalar(const float* w, int64_t rows, const float* x, int64_t m, int64_t k, float* y,
                        int64_t y_stride) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < rows; ++c) {
      float sum = 0.f;
      for (int64_t i = 0; i < k; ++i) sum += w[c * k + i] * x[r * k + i];
      y[r * y_stride + c] = sum;
    }
}

void matmul_rows(const float* w, int64_t rows, const float* x, int64_t m, int64_t k, float* y, int64_t y_stride) {
  if (kHasAvx512)
    matmul_rows_simd(w, rows, x, m, k, y, y_stride);
  else
    matmul_rows_scalar(w, rows, x, m, k, y, y_stride);
}

int64_t attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::string* problem) {
  int64_t value = 0;
  if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, name, &value)) {
    *problem = std::string("missing or non-integer attribute '") + name + "': " + api->GetErrorMessage(status);
    api->ReleaseStatus(status);
  }
  return value;
}

// Rows are split into tasks of a few rows each and run on ONNX Runtime's intra-op thread pool.
constexpr int64_t kRowsPerTask = 16;

struct LutKernel {
  std::string problem;  // a bad attribute is reported by Compute: no exception may cross the C API
  int64_t bits, k;      // declared after `problem`, which their initialisers write to
  LutKernel(const OrtApi* api, const OrtKernelInfo* info)
      : bits(attribute(api, info, "bits", &problem)), k(attribute(api, info, "k", &problem)) {}
};

struct LutDequantize : LutKernel {
  using LutKernel::LutKernel;

  Ort::Status Compute(OrtKernelContext* context, const Tensor<uint8_t>& packed, const Tensor<float>& table,
                      Tensor<float>& weight) {
    try {
      if (!problem.empty()) return error("LutDequantize: " + problem);
      Layout l;
      if (auto status = check_layout("LutDequantize", bits, k, packed, table, &l); !status.IsOK()) return status;
      float* out = weight.Allocate({l.n, l.k});
      struct Job {
        const Layout* l;
        float* out;
      } job{&l, out};
      const size_t tasks = static_cast<size_t>((l.n + kRowsPerTask - 1) / kRowsPerTask);
      Ort::KernelContext(context).ParallelFor(
          [](void* data, size_t task) {
            auto* j = static_cast<Job*>(data);
            const int64_t end = std::min<int64_t>(j->l->n, (task + 1) * kRowsPerTask);
            for (int64_t row = task * kRowsPerTask; row < end; ++row) dequantize_row(*j->l, row, j->out + row * j->l->k);
          },
          tasks, 0, &job);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e);
    }
  }
};

struct LutMatMul : LutKernel {
  using LutKernel::LutKernel;

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, const Tensor<uint8_t>& packed,
                      const Tensor<float>& table, Tensor<float>& y) {
    try {
      if (!problem.empty()) return error("LutMatMul: " + problem);
      Layout l;
      if (auto status = check_layout("LutMatMul", bits, k, packed, table, &l); !status.IsOK()) return status;
      std::vector<int64_t> shape = x.Shape();
      if (shape.empty() || shape.back() != l.k)
        return error("LutMatMul: input X has shape " + shape_str(shape) + "; its last dimension must be k = " +
                     std::to_string(l.k));
      const int64_t m = x.NumberOfElement() / l.k;
      shape.back() = l.n;
      struct Job {
        const Layout* l;
        const float* x;
        float* y;
        int64_t m;
      } job{&l, x.Data(), y.Allocate(shape), m};
      const size_t tasks = static_cast<size_t>((l.n + kRowsPerTask - 1) / kRowsPerTask);
      if (m == 0 || l.n == 0) return Ort::Status{nullptr};
      Ort::KernelContext(context).ParallelFor(
          [](void* data, size_t task) {
            auto* j = static_cast<Job*>(data);
            const Layout& l = *j->l;
            const int64_t end = std::min<int64_t>(l.n, (task + 1) * kRowsPerTask);
            if (j->m == 1 && l.simd4()) {
              for (int64_t row = task * kRowsPerTask; row < end; ++row) j->y[row] = dot_row_simd4(l, row, j->x);
              return;
            }
            const int64_t first = task * kRowsPerTask;
            std::vector<float> w(static_cast<size_t>((end - first) * l.k));
            for (int64_t row = first; row < end; ++row) dequantize_row(l, row, w.data() + (row - first) * l.k);
            matmul_rows(w.data(), end - first, j->x, j->m, l.k, j->y + first, l.n);
          },
          tasks, 0, &job);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e);
    }
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> dequantize{
      Ort::Custom::CreateLiteCustomOp<LutDequantize>("LutDequantize", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> matmul{
      Ort::Custom::CreateLiteCustomOp<LutMatMul>("LutMatMul", "CPUExecutionProvider")};
  try {
    static Ort::CustomOpDomain domain{"qcompile"};
    static bool added = false;
    if (!added) {
      domain.Add(dequantize.get());
      domain.Add(matmul.get());
      added = true;
    }
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const std::exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
