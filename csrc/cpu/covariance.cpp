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
  // All unmasked rows, transposed to [D, R] so every output is a contiguous dot product.
  std::vector<float> rows_all, doc;
  int64_t R = 0;
  for (int64_t n = 0; n < d.n; ++n) {
    const int64_t kept = cpu::gather_doc(*x, mask, n, doc);
    rows_all.insert(rows_all.end(), doc.begin(), doc.begin() + kept * D);
    R += kept;
  }
  std::vector<float> xt(static_cast<size_t>(D * R));
  cpu::transpose(rows_all.data(), xt.data(), R, D);
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
