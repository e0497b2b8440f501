// CPU covariance: sum over unmasked token rows of x x^T, upper triangle computed once and
// mirrored (exact symmetry); double accumulation over tokens; parallel over output rows.
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_common.h"

using namespace pyinf;

extern "C" pyinf_status pyinf_cpu_covariance(const pyinf_tensor* x, const pyinf_tensor* mask, float* out) {
  Dims d;
  pyinf_status s = validate_covariance(x, mask, out, &d);
  if (s != PYINF_SUCCESS) return s;
  PYINF_CPU_GUARD_BEGIN
  const int64_t D = d.d_in;
  // All unmasked rows, transposed to [D, R] so every output is a contiguous dot product,
  // written there one document at a time (one fp32 copy of the kept rows, not two).
  int64_t R = 0;
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t t = 0; t < d.t; ++t) R += cpu::keep(mask, n, t) ? 1 : 0;
  std::vector<float> xt(static_cast<size_t>(D * R)), doc;
  int64_t r0 = 0;
  for (int64_t n = 0; n < d.n; ++n) {
    const int64_t kept = cpu::gather_doc(*x, mask, n, doc);
    for (int64_t i = 0; i < kept; ++i)
      for (int64_t k = 0; k < D; ++k) xt[k * R + r0 + i] = doc[i * D + k];
    r0 += kept;
  }
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < D; ++i) {
    for (int64_t j = i; j < D; ++j) {
      const float v = static_cast<float>(cpu::dot(xt.data() + i * R, xt.data() + j * R, R));
      out[i * D + j] = v;
      out[j * D + i] = v;
    }
  }
  PYINF_CPU_GUARD_END("covariance")
  return PYINF_SUCCESS;
}
