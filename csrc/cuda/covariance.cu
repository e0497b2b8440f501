// CUDA covariance: one block per upper-triangular 64x64 output tile, looping over all
// N*T token rows in order (no split-K, no atomics: deterministic); the tile is written
// to (i, j) and mirrored to (j, i), so the result is exactly symmetric.
#include "kernels_common.cuh"

namespace pyinf {
namespace cuda {

__global__ void __launch_bounds__(THREADS) covariance_kernel(View3 x, MaskView mask, int64_t N, int64_t T,
                                                             int64_t d, float* out) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (ti > tj) return;  // lower tiles are mirrors
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  __shared__ int64_t row_base[BK];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i0 = ti * BM, j0 = tj * BN, rows = N * T;
  float acc[4][4];
  zero(acc);
  for (int64_t r0 = 0; r0 < rows; r0 += BK) {
    if (tid < BK) row_base[tid] = token_row_offset(r0 + tid, rows, T, x, mask);
    __syncthreads();
    // As[k][m] = x[row r0+k, i0+m], Bs[k][c] = x[row r0+k, j0+c]; threads walk the feature dim.
    for (int e = tid; e < BK * BM; e += THREADS) {
      const int k = e / BM, m = e % BM;
      const int64_t base = row_base[k];
      As[k][m] = (base >= 0 && i0 + m < d) ? ld(x.p, x.dt, base + (i0 + m) * x.s2) : 0.0f;
      Bs[k][m] = (base >= 0 && j0 + m < d) ? ld(x.p, x.dt, base + (j0 + m) * x.s2) : 0.0f;
    }
    __syncthreads();
    mma_slice(As, Bs, acc, ty, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gi = i0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gj = j0 + tx * 4 + j;
      if (gi >= d || gj >= d) continue;
      if (ti == tj && gi > gj) continue;  // diagonal tile: the upper half writes both
      out[gi * d + gj] = acc[i][j];
      out[gj * d + gi] = acc[i][j];
    }
  }
}

}  // namespace cuda
}  // namespace pyinf

using namespace pyinf;
using namespace pyinf::cuda;

extern "C" pyinf_status pyinf_cuda_covariance(const pyinf_tensor* x, const pyinf_tensor* mask, float* out,
                                              void* stream) {
  Dims dims;
  pyinf_status s = validate_covariance(x, mask, out, &dims);
  if (s != PYINF_SUCCESS) return s;
  const int64_t d = dims.d_in;
  if (d == 0) return PYINF_SUCCESS;
  const int64_t tiles = (d + BM - 1) / BM;
  if (tiles > 65535) return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_cuda_covariance: d too large");
  s = pending_error_check("covariance");
  if (s != PYINF_SUCCESS) return s;
  dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  covariance_kernel<<<grid, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(view3(*x), mask_view(mask), dims.n,
                                                                             dims.t, d, out);
  return launch_check("covariance");
}
