// Tensor-core (TF32 WMMA, sm_80+) versions of the two GEMM stages of eigen_correction and
// self_influence (eigen_correction.cu): the rotation into the eigenbasis and the per-document
// Gram tile R_n = g~_n^T a~_n with its squared epilogue. Same grids, same workspace, same
// fixed reduction orders as the fp32-FMA kernels; operands are rounded to TF32 (10-bit
// mantissa, exact for bf16/fp16 inputs) when staged to shared memory, products accumulate
// in fp32. Four warps cover a 64 x 64 tile, 32 x 32 each (2 x 2 fragments of 16 x 16 x 8).
// Accumulator fragments of one type share their element-to-thread mapping, which the
// epilogues rely on (R^2 summed into Lambda's fragments; R^2 times 1/(Lambda + damping)
// loaded into a fragment of the same type).
//
// The default for bf16 / fp16 inputs (use_tensor_cores in kernels_common.cuh). Checked
// against the float64 reference on the CPU (tests/test_native_emulated.py); not yet run or
// timed on a GPU.
#include "tc_common.cuh"

namespace pyinf {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int TK = 32;            // K slice (tokens for the Gram tile, input features for rotation)
constexpr int ROW_LD = TK + 4;    // [BM][ROW_LD]: rows x K, row-major
constexpr int COL_LD = BN + 4;    // [TK][COL_LD]: K x columns, row-major
constexpr int OUT_LD = BN + 4;    // [BM][OUT_LD] fp32 output staging

using FragA_row = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragA_col = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

__device__ __forceinline__ float tf32(float v) { return wmma::__float_to_tf32(v); }

// out[row, c] = keep(row) ? sum_k x[n,t,k] q[k,c] : 0, fp32 dense [N*T, d].
__global__ void __launch_bounds__(TC_THREADS) rotate_tc_kernel(View3 x, View2 q, MaskView mask, int64_t N, int64_t T,
                                                               int64_t d, float* out) {
  __shared__ __align__(128) float As[BM][ROW_LD];
  __shared__ __align__(128) float Bs[TK][COL_LD];
  __shared__ __align__(128) float Cs[BM][OUT_LD];
  __shared__ int64_t row_base[BM];
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t rows = N * T;
  if (tid < BM) row_base[tid] = token_row_offset(row0 + tid, rows, T, x, mask);
  __syncthreads();
  FragC acc[2][2];
  fill_2x2(acc, 0.0f);
  for (int64_t k0 = 0; k0 < d; k0 += TK) {
    for (int e = tid; e < BM * TK; e += TC_THREADS) {  // consecutive threads walk k
      const int m = e / TK, k = e % TK;
      const int64_t base = row_base[m];
      As[m][k] = tf32((base >= 0 && k0 + k < d) ? ld(x.p, x.dt, base + (k0 + k) * x.s2) : 0.0f);
    }
    for (int e = tid; e < TK * BN; e += TC_THREADS) {  // consecutive threads walk columns
      const int k = e / BN, c = e % BN;
      Bs[k][c] = tf32((k0 + k < d && col0 + c < d) ? ld(q.p, q.dt, (k0 + k) * q.s0 + (col0 + c) * q.s1) : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TK; kk += 8) {
      warp_mma_2x2<FragA_row, FragB>(acc, &As[wm * 32][kk], &As[wm * 32 + 16][kk], ROW_LD, &Bs[kk][wn * 32],
                                     &Bs[kk][wn * 32 + 16], COL_LD);
    }
    __syncthreads();
  }
  store_2x2<OUT_LD>(Cs, acc, wm, wn);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += TC_THREADS) {
    const int m = e / BN, c = e % BN;
    const int64_t r = row0 + m;
    if (r < rows && col0 + c < d) out[r * d + col0 + c] = Cs[m][c];  // masked rows: exact zeros
  }
}

// One 64 x 64 tile (rows i0.. of d_out, columns j0.. of d_in) of R_n = g~_n^T a~_n per
// document. self_mode 0: out[d_out, d_in] = sum_n R_n^2 (all documents in order);
// self_mode 1: out[n * tiles + tile] = sum over the tile of R_n^2 / (Lambda + damping).
// self_mode is a template parameter so that each version holds only its own fragments.
template <int self_mode>
__global__ void __launch_bounds__(TC_THREADS) gram_tc_kernel(const float* __restrict__ rot_g,
                                                             const float* __restrict__ rot_a, int64_t N, int64_t T,
                                                             int64_t d_out, int64_t d_in, View2 lambdas, float damping,
                                                             float* out) {
  __shared__ __align__(128) float Gs[TK][COL_LD];  // Gs[t][m] = g~[t, i0+m]: A = g~^T, col-major
  __shared__ __align__(128) float As[TK][COL_LD];  // As[t][c] = a~[t, j0+c]: B, row-major
  __shared__ __align__(128) float Cs[BM][OUT_LD];
  __shared__ float red[TC_THREADS];
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM, j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  FragC lam[2][2], inv[2][2];
  fill_2x2(lam, 0.0f);
  if constexpr (self_mode) {  // 1 / (Lambda + damping) in the accumulators' own layout (0 outside the matrix)
    for (int e = tid; e < BM * BN; e += TC_THREADS) {
      const int m = e / BN, c = e % BN;
      const int64_t gi = i0 + m, gj = j0 + c;
      Cs[m][c] = (gi < d_out && gj < d_in)
                     ? 1.0f / (ld(lambdas.p, lambdas.dt, gi * lambdas.s0 + gj * lambdas.s1) + damping)
                     : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(inv[i][j], &Cs[wm * 32 + i * 16][wn * 32 + j * 16], OUT_LD, wmma::mem_row_major);
    __syncthreads();
  }
  const int64_t n_begin = self_mode ? blockIdx.z : 0;
  const int64_t n_step = self_mode ? gridDim.z : 1;
  for (int64_t n = n_begin; n < N; n += n_step) {
    FragC acc[2][2];
    fill_2x2(acc, 0.0f);
    const float* g = rot_g + n * T * d_out;
    const float* a = rot_a + n * T * d_in;
    for (int64_t t0 = 0; t0 < T; t0 += TK) {
      for (int e = tid; e < TK * BM; e += TC_THREADS) {  // consecutive threads walk features
        const int k = e / BM, m = e % BM;
        const bool tok = t0 + k < T;
        Gs[k][m] = tf32((tok && i0 + m < d_out) ? g[(t0 + k) * d_out + i0 + m] : 0.0f);
        As[k][m] = tf32((tok && j0 + m < d_in) ? a[(t0 + k) * d_in + j0 + m] : 0.0f);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TK; kk += 8) {
        // column-major A = g~^T
        warp_mma_2x2<FragA_col, FragB>(acc, &Gs[kk][wm * 32], &Gs[kk][wm * 32 + 16], COL_LD, &As[kk][wn * 32],
                                       &As[kk][wn * 32 + 16], COL_LD);
      }
      __syncthreads();
    }
    if constexpr (!self_mode) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < acc[i][j].num_elements; ++e)
            lam[i][j].x[e] = fmaf(acc[i][j].x[e], acc[i][j].x[e], lam[i][j].x[e]);
    } else {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < acc[i][j].num_elements; ++e)
            s = fmaf(acc[i][j].x[e] * acc[i][j].x[e], inv[i][j].x[e], s);
      block_sum_store<TC_THREADS>(red, s, tid, out + n * tiles + tile);
    }
  }
  if constexpr (!self_mode) {
    store_2x2<OUT_LD>(Cs, lam, wm, wn);
    __syncthreads();
    for (int e = tid; e < BM * BN; e += TC_THREADS) {
      const int m = e / BN, c = e % BN;
      const int64_t gi = i0 + m, gj = j0 + c;
      if (gi < d_out && gj < d_in) out[gi * d_in + gj] = Cs[m][c];
    }
  }
}

}  // namespace

void launch_rotate_tc(View3 x, View2 q, MaskView mask, int64_t N, int64_t T, int64_t d, float* out, dim3 grid,
                      cudaStream_t stream) {
  rotate_tc_kernel<<<grid, TC_THREADS, 0, stream>>>(x, q, mask, N, T, d, out);
}

void launch_gram_tc(const float* rot_g, const float* rot_a, int64_t N, int64_t T, int64_t d_out, int64_t d_in,
                    int self_mode, View2 lambdas, float damping, float* out, dim3 grid, cudaStream_t stream) {
  if (self_mode)
    gram_tc_kernel<1><<<grid, TC_THREADS, 0, stream>>>(rot_g, rot_a, N, T, d_out, d_in, lambdas, damping, out);
  else
    gram_tc_kernel<0><<<grid, TC_THREADS, 0, stream>>>(rot_g, rot_a, N, T, d_out, d_in, lambdas, damping, out);
}

}  // namespace cuda
}  // namespace pyinf
