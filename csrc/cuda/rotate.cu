#include "kernels_common.cuh"

namespace pyinf {
namespace cuda {

__global__ void __launch_bounds__(THREADS) rotate_kernel(View3 x, View2 q, MaskView mask, int64_t N, int64_t T,
                                                         int64_t d, float* out) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  __shared__ int64_t row_base[BM];  // element offset of each tile row, -1 = masked / out of range
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t rows = N * T;
  if (tid < BM) row_base[tid] = token_row_offset(row0 + tid, rows, T, x, mask);
  __syncthreads();
  float acc[4][4];
  zero(acc);
  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    // A slice: As[k][m] = x[row m, k0+k]; consecutive threads walk k (contiguous in memory).
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int m = e / BK, k = e % BK;
      const int64_t base = row_base[m];
      As[k][m] = (base >= 0 && k0 + k < d) ? ld(x.p, x.dt, base + (k0 + k) * x.s2) : 0.0f;
    }
    // B slice: Bs[k][c] = q[k0+k, col0+c]; consecutive threads walk c.
    for (int e = tid; e < BK * BN; e += THREADS) {
      const int k = e / BN, c = e % BN;
      Bs[k][c] = (k0 + k < d && col0 + c < d) ? ld(q.p, q.dt, (k0 + k) * q.s0 + (col0 + c) * q.s1) : 0.0f;
    }
    __syncthreads();
    mma_slice(As, Bs, acc, ty, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + ty * 4 + i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx * 4 + j;
      if (c < d) out[r * d + c] = acc[i][j];  // masked rows: exact zeros
    }
  }
}

}  // namespace cuda
}  // namespace pyinf

namespace pyinf {
namespace cuda {

pyinf_status launch_rotate(const char* op, View3 x, View2 q, MaskView mask, int64_t N, int64_t T, int64_t d,
                           bool tensor_cores, float* out, cudaStream_t stream) {
  if (N * T == 0 || d == 0) return PYINF_SUCCESS;
  const int64_t row_tiles = (N * T + BM - 1) / BM, col_tiles = (d + BN - 1) / BN;
  if (row_tiles > 0x7fffffffLL || col_tiles > 65535)
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_cuda_") + op + ": problem too large for one launch");
  dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  if (tensor_cores) {
    launch_rotate_tc(x, q, mask, N, T, d, out, grid, stream);
    return launch_check(op);
  }
  rotate_kernel<<<grid, THREADS, 0, stream>>>(x, q, mask, N, T, d, out);
  return launch_check(op);
}

}  // namespace cuda
}  // namespace pyinf
