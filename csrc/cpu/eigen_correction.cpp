// CPU eigen-correction and self-influence. Per document: gather the unmasked tokens,
// rotate them (a Q_A, g Q_S), then R = g~^T a~ one output row at a time (parallel over
// rows, double accumulation over tokens). The N x d_out x d_in batch never exists; one
// row of R per thread does. Reduction orders are fixed, so results do not depend on the
// thread count.
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_common.h"

using namespace pyinf;

namespace {

// Rotated, transposed tokens of document n: at [d_in, kept], gt [d_out, kept].
struct Rotated {
  std::vector<float> a, g, tmp, at, gt;
  int64_t kept = 0;
};

void rotate_doc(const pyinf_tensor& acts, const pyinf_tensor& grads, const pyinf_tensor* mask,
                const std::vector<float>& qa, const std::vector<float>& qs, int64_t n, Rotated& r) {
  const int64_t d_in = acts.shape[2], d_out = grads.shape[2];
  r.kept = cpu::gather_doc(acts, mask, n, r.a);
  cpu::gather_doc(grads, mask, n, r.g);
  const int64_t k = r.kept;
  r.tmp.resize(static_cast<size_t>(k * (d_in > d_out ? d_in : d_out)));
  r.at.resize(static_cast<size_t>(k * d_in));
  r.gt.resize(static_cast<size_t>(k * d_out));
  cpu::matmul(r.a.data(), qa.data(), r.tmp.data(), k, d_in, d_in);
  cpu::transpose(r.tmp.data(), r.at.data(), k, d_in);
  cpu::matmul(r.g.data(), qs.data(), r.tmp.data(), k, d_out, d_out);
  cpu::transpose(r.tmp.data(), r.gt.data(), k, d_out);
}

// mode 0: out[d_out, d_in] += R^2 over docs; mode 1: out[n] = sum R^2 / (lambdas + damping).
pyinf_status run(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* q_a,
                 const pyinf_tensor* q_s, const pyinf_tensor* lambdas, float damping, const pyinf_tensor* mask,
                 float* out) {
  Dims d;
  pyinf_status s = validate_rotated(op, acts, grads, q_a, q_s, lambdas, damping, mask, out, &d);
  if (s != PYINF_SUCCESS) return s;
  const bool self = lambdas != nullptr;
  PYINF_CPU_GUARD_BEGIN
  std::vector<float> qa, qs, inv;
  cpu::dense2(*q_a, qa);
  cpu::dense2(*q_s, qs);
  if (self) {
    cpu::dense2(*lambdas, inv);
    for (auto& v : inv) v = 1.0f / (v + damping);
  }
  const int64_t d_in = d.d_in, d_out = d.d_out;
  std::vector<double> acc;
  if (!self) acc.assign(static_cast<size_t>(d_out * d_in), 0.0);
  std::vector<double> row_sums(static_cast<size_t>(d_out));
  Rotated r;
  for (int64_t n = 0; n < d.n; ++n) {
    rotate_doc(*acts, *grads, mask, qa, qs, n, r);
    const int64_t k = r.kept;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < d_out; ++i) {
      const float* gi = r.gt.data() + i * k;
      double row = 0.0;
      for (int64_t j = 0; j < d_in; ++j) {
        // the rotated gradient entry is an fp32 value, as on the GPU
        const double v = static_cast<float>(cpu::dot(gi, r.at.data() + j * k, k));
        if (self)
          row += v * v * inv[i * d_in + j];
        else
          acc[i * d_in + j] += v * v;
      }
      row_sums[i] = row;
    }
    if (self) {
      double total = 0.0;
      for (int64_t i = 0; i < d_out; ++i) total += row_sums[i];
      out[n] = static_cast<float>(total);
    }
  }
  if (!self)
    for (int64_t i = 0; i < d_out * d_in; ++i) out[i] = static_cast<float>(acc[i]);
  PYINF_CPU_GUARD_END(op)
  return PYINF_SUCCESS;
}

}  // namespace

extern "C" pyinf_status pyinf_cpu_eigen_correction(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                   const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                   const pyinf_tensor* mask, float* out) {
  return run("eigen_correction", acts, grads, q_a, q_s, nullptr, 0.0f, mask, out);
}

extern "C" pyinf_status pyinf_cpu_self_influence(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                 const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                 const pyinf_tensor* lambdas, float damping,
                                                 const pyinf_tensor* mask, float* out) {
  if (lambdas == nullptr)
    return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_self_influence: 'lambdas' is NULL");
  return run("self_influence", acts, grads, q_a, q_s, lambdas, damping, mask, out);
}
