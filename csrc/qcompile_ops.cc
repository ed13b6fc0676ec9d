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

// Rows are split into tasks of a few rows each and run on ONNX Runtime's intra-op thread pool.
constexpr int64_t kRowsPerTask = 16;

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
    struct Job {
      const Layout* l;
      const float* x;
      float* y;
      int64_t m;
      TaskErrors errors;
    } job{&l, static_cast<const float*>(in[0].data), y, m, {}};
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
          j->errors.run([&] {
            std::vector<float> w(static_cast<size_t>((end - first) * l.k));
            for (int64_t row = first; row < end; ++row) dequantize_row(l, row, w.data() + (row - first) * l.k);
            matmul_rows(w.data(), end - first, j->x, j->m, l.k, j->y + first, l.n);
          });
        },
        tasks, 0, &job);
    if (job.errors.failed) return error(kName, job.errors.message);
    return Ort::Status{nullptr};
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
