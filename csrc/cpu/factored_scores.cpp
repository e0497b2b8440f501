// CPU factored scores: every query's factors side by side as [d, Q*r] columns, per token
// two GEMVs (g . L, a . R), Hadamard product, sum over each query's r columns; per-doc
// sums over tokens in double, in token order. Parallel over tokens.
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"

using namespace pyinf;

namespace {
// [Q, d, r] -> dense [d, Q*r] with column q*r + k.
void factor_cols(const pyinf_tensor& f, std::vector<float>& out) {
  const int64_t Q = f.shape[0], D = f.shape[1], R = f.shape[2];
  out.resize(static_cast<size_t>(D * Q * R));
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t o = 0; o < D; ++o)
      for (int64_t k = 0; k < R; ++k)
        out[o * Q * R + q * R + k] = load_host(f.data, f.dtype, q * f.strides[0] + o * f.strides[1] + k * f.strides[2]);
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
}  // namespace

extern "C" pyinf_status pyinf_cpu_factored_scores(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                  const pyinf_tensor* left, const pyinf_tensor* right,
                                                  const pyinf_tensor* mask, int per_token, float* out) {
  Dims d;
  pyinf_status s = validate_factored(acts, grads, left, right, mask, per_token, out, &d);
  if (s != PYINF_SUCCESS) return s;
  PYINF_CPU_GUARD_BEGIN
  const int64_t N = d.n, T = d.t, Q = d.q, R = d.r, C = d.q * d.r, d_in = d.d_in, d_out = d.d_out;
  if (C == 0 || N * T == 0 || d_in == 0 || d_out == 0) {
    // no query, rank 0, no token or an empty layer: every score is 0 (and the factors,
    // whose Q * r may be up to 2^60 here, are never read)
    for (int64_t i = 0; i < N * (per_token ? T : 1) * Q; ++i) out[i] = 0.0f;
    return PYINF_SUCCESS;
  }
  std::vector<float> lcols, rcols;
  factor_cols(*left, lcols);
  factor_cols(*right, rcols);
  // Per-token scores: written straight into `out` when they are the result; else into a
  // buffer summed over tokens below, in a fixed order (the result does not depend on threads).
  std::vector<float> tok_buffer(per_token ? 0 : static_cast<size_t>(N * T * Q));
  float* const tok = per_token ? out : tok_buffer.data();
  // Each thread's rows (a, g) and products (gl, ar), allocated here: an exception cannot
  // leave an OpenMP region, so a failed allocation inside one would abort the process
  // instead of becoming PYINF_ERROR_OUT_OF_MEMORY.
  const int64_t per_thread = d_in + d_out + 2 * C;
  int64_t scratch_floats = 0;
  if (!size_product({max_threads(), per_thread}, &scratch_floats)) throw std::bad_alloc();  // past 2^60 floats
  std::vector<float> scratch(static_cast<size_t>(scratch_floats));
#pragma omp parallel
  {
    float* const a = scratch.data() + thread_index() * per_thread;
    float* const g = a + d_in;
    float* const gl = g + d_out;
    float* const ar = gl + C;
#pragma omp for schedule(static)
    for (int64_t nt = 0; nt < N * T; ++nt) {
      const int64_t n = nt / T, t = nt % T;
      float* o = tok + nt * Q;
      if (!cpu::keep(mask, n, t)) {  // a masked token scores 0
        for (int64_t q = 0; q < Q; ++q) o[q] = 0.0f;
        continue;
      }
      const int64_t ab = n * acts->strides[0] + t * acts->strides[1];
      const int64_t gb = n * grads->strides[0] + t * grads->strides[1];
      for (int64_t k = 0; k < d_in; ++k) a[k] = load_host(acts->data, acts->dtype, ab + k * acts->strides[2]);
      for (int64_t k = 0; k < d_out; ++k) g[k] = load_host(grads->data, grads->dtype, gb + k * grads->strides[2]);
      for (int64_t c = 0; c < C; ++c) gl[c] = ar[c] = 0.0f;
      for (int64_t k = 0; k < d_out; ++k) {
        const float gv = g[k];
        const float* lr = lcols.data() + k * C;
        for (int64_t c = 0; c < C; ++c) gl[c] += gv * lr[c];
      }
      for (int64_t k = 0; k < d_in; ++k) {
        const float av = a[k];
        const float* rr = rcols.data() + k * C;
        for (int64_t c = 0; c < C; ++c) ar[c] += av * rr[c];
      }
      for (int64_t q = 0; q < Q; ++q) {
        float acc = 0.0f;
        for (int64_t k = 0; k < R; ++k) acc += gl[q * R + k] * ar[q * R + k];
        o[q] = acc;
      }
    }
  }
  if (!per_token) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t q = 0; q < Q; ++q) {
        double acc = 0.0;
        for (int64_t t = 0; t < T; ++t) acc += tok[(n * T + t) * Q + q];
        out[n * Q + q] = static_cast<float>(acc);
      }
  }
  PYINF_CPU_GUARD_END("factored_scores")
  return PYINF_SUCCESS;
}

extern "C" pyinf_status pyinf_cpu_factored_scores_grouped(const pyinf_factored_problem* problems, int count,
                                                          int per_token) {
  const char* fn = "pyinf_cpu_factored_scores_grouped";
  pyinf_status s = validate_factored_group(fn, problems, count, per_token, true, nullptr);  // all before any is scored
  if (s != PYINF_SUCCESS) return s;
  for (int i = 0; i < count; ++i) {
    const pyinf_factored_problem& p = problems[i];
    s = pyinf_cpu_factored_scores(p.acts, p.grads, p.left, p.right, p.mask, per_token, p.out);
    if (s != PYINF_SUCCESS)
      return fail(s, std::string(fn) + ": problem " + std::to_string(i) + ": " + pyinf_last_error());
  }
  return PYINF_SUCCESS;
}
