// Helpers for the CPU implementations: gather strided bf16/fp16/fp32 inputs into dense fp32.
#pragma once

#include <cstdint>
#include <vector>

#include "../common.h"

namespace pyinf {
namespace cpu {

inline bool keep(const pyinf_tensor* mask, int64_t n, int64_t t) {
  if (mask == nullptr) return true;
  const uint8_t* m = static_cast<const uint8_t*>(mask->data);
  return m[n * mask->strides[0] + t * mask->strides[1]] != 0;
}

// Dense row-major fp32 copy of a 2-D tensor.
inline void dense2(const pyinf_tensor& t, std::vector<float>& out) {
  const int64_t a = t.shape[0], b = t.shape[1];
  out.resize(static_cast<size_t>(a * b));
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j) out[i * b + j] = load_host(t.data, t.dtype, i * t.strides[0] + j * t.strides[1]);
}

// The unmasked token rows of document n of a [N, T, d] tensor, dense fp32 [rows, d];
// `rows` receives the token indices kept. Masked rows are never read.
inline int64_t gather_doc(const pyinf_tensor& x, const pyinf_tensor* mask, int64_t n, std::vector<float>& out,
                          std::vector<int64_t>* rows = nullptr) {
  const int64_t T = x.shape[1], d = x.shape[2];
  out.resize(static_cast<size_t>(T * d));
  if (rows) rows->clear();
  int64_t kept = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!keep(mask, n, t)) continue;
    const int64_t base = n * x.strides[0] + t * x.strides[1];
    float* dst = out.data() + kept * d;
    for (int64_t k = 0; k < d; ++k) dst[k] = load_host(x.data, x.dtype, base + k * x.strides[2]);
    if (rows) rows->push_back(t);
    ++kept;
  }
  return kept;
}

// out[rows x m] = x[rows x k] @ w[k x m], all dense row-major fp32.
inline void matmul(const float* x, const float* w, float* out, int64_t rows, int64_t k, int64_t m) {
#pragma omp parallel for schedule(static) if (rows * k * m > (1 << 16))
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * m;
    for (int64_t j = 0; j < m; ++j) o[j] = 0.0f;
    for (int64_t p = 0; p < k; ++p) {
      const float xv = x[i * k + p];
      const float* wr = w + p * m;
      for (int64_t j = 0; j < m; ++j) o[j] += xv * wr[j];
    }
  }
}

// [rows x cols] -> [cols x rows]
inline void transpose(const float* x, float* out, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = x[i * cols + j];
}

// Dot product accumulated in double (the token sums of every op go through here).
inline double dot(const float* a, const float* b, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return acc;
}

}  // namespace cpu
}  // namespace pyinf

#define PYINF_CPU_GUARD_BEGIN try {
#define PYINF_CPU_GUARD_END(op)                                                              \
  }                                                                                          \
  catch (const std::bad_alloc&) {                                                            \
    return pyinf::fail(PYINF_ERROR_OUT_OF_MEMORY, std::string("pyinf_cpu_") + op +           \
                                                      ": host allocation failed");           \
  }                                                                                          \
  catch (const std::exception& e) {                                                          \
    return pyinf::fail(PYINF_ERROR_INTERNAL, std::string("pyinf_cpu_") + op + ": " + e.what()); \
  }
