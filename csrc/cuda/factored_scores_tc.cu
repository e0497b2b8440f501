// CUDA factored scores on tensor cores (WMMA, sm_80+), for inputs that are all bf16 or all
// fp16. Same grid, same per-query fold and the same fixed reduction order as the fp32-FMA
// kernel in factored_scores.cu; only the two products GL = g L[:, chunk] and
// AR = a R[:, chunk] change: K slices of 32 are staged through shared memory in the input
// dtype and multiplied by 16x16x16 WMMA tiles with fp32 accumulators. The staging is double
// buffered: slice s + 1 is loaded while slice s is multiplied, by asynchronous 16-byte copies
// (cp.async) where the layout allows, else by plain loads and stores into the other buffer.
// Four warps cover the 64x64 tile, 32x32 each. GL and AR fragments
// have the same type, hence the same element-to-thread mapping, so their product is taken
// fragment element by fragment element before one store to shared memory.
//
// The default for such inputs; PYINF_NATIVE_TC=0 takes them to the FMA kernel instead (see
// use_tensor_cores in kernels_common.cuh). Checked against the float64 reference on the CPU
// (tests/test_native_emulated.py); not yet run or timed on a GPU.
#include <cuda_pipeline_primitives.h>

#include "tc_common.cuh"

namespace pyinf {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int TC_BK = 32;        // K slice staged per step
constexpr int A_LD = TC_BK + 8;  // row-major [BM][A_LD] tile of token rows (16-bit elements)
constexpr int B_LD = BN + 8;     // row-major [TC_BK][B_LD] tile of factor columns
constexpr int P_LD = BN + 4;     // fp32 product tile (WMMA needs ldm % 4 == 0 for float)

template <typename T>
__device__ __forceinline__ T zero_of() {
  return T(0.0f);
}

template <typename T>
struct Frags {
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};

// One asynchronous 16-byte copy global -> shared (cp.async), or 16 zero bytes when !ok (src
// is then not read; it only has to be a valid address).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool ok) {
  if (ok)
    __pipeline_memcpy_async(dst, src, 16);
  else
    __pipeline_memcpy_async(dst, src, 16, 16);
}

// Stage x[token rows, k0:k0+TC_BK] into As (row m at element offset base[m] of x, -1: zeros).
// vec: x's last dimension is contiguous and every row start and the pointer allow aligned
// 16-byte loads (checked on the host): those go by cp.async, the rest by plain stores.
template <typename T>
__device__ __forceinline__ void stage_rows(T (*As)[A_LD], const int64_t* base, const T* x, int64_t s2, int64_t d,
                                           int64_t k0, bool vec, int tid) {
  if (vec) {
    for (int e = tid; e < BM * (TC_BK / 8); e += TC_THREADS) {
      const int m = e / (TC_BK / 8), k = (e % (TC_BK / 8)) * 8;
      if (base[m] < 0 || k0 + k + 8 <= d) {  // a whole vector, or a masked row's zeros
        copy16(&As[m][k], base[m] >= 0 ? x + base[m] + k0 + k : x, base[m] >= 0);
      } else {  // the last partial vector of a row (d = 769 with a bias column)
#pragma unroll
        for (int j = 0; j < 8; ++j) As[m][k + j] = k0 + k + j < d ? x[base[m] + k0 + k + j] : zero_of<T>();
      }
    }
  } else {
    for (int e = tid; e < BM * TC_BK; e += TC_THREADS) {
      const int m = e / TC_BK, k = e % TC_BK;
      As[m][k] = (base[m] >= 0 && k0 + k < d) ? x[base[m] + (k0 + k) * s2] : zero_of<T>();
    }
  }
}

// Stage F[k0:k0+TC_BK, columns c0:c0+BN] of the factor [Q, d, R] into Bs; columns at or past
// C are zeros. vec: R % 8 == 0, the rank dimension is contiguous and the strides and pointer
// allow aligned 16-byte loads, so 8 consecutive columns are 8 consecutive ranks of one query.
// Each thread stages one fixed column (vec: 8 columns) at every K slice: fcol is its element
// offset in row 0 of F, or -1 past C (factor_column below), so that no K slice divides.
template <typename T>
__device__ __forceinline__ void stage_factor(T (*Bs)[B_LD], const T* f, int64_t fcol, int64_t s1, int64_t d,
                                             int64_t k0, bool vec, int tid) {
  if (vec) {
    const int c = (tid % (BN / 8)) * 8;
    for (int k = tid / (BN / 8); k < TC_BK; k += TC_THREADS / (BN / 8)) {
      const bool ok = k0 + k < d && fcol >= 0;
      copy16(&Bs[k][c], ok ? f + fcol + (k0 + k) * s1 : f, ok);
    }
  } else {
    const int c = tid % BN;
    for (int k = tid / BN; k < TC_BK; k += TC_THREADS / BN) Bs[k][c] = (k0 + k < d && fcol >= 0) ? f[fcol + (k0 + k) * s1] : zero_of<T>();
  }
}

// The calling thread's staging column of chunk c0 (see stage_factor): column c is rank c % R
// of query q0 + c / R.
__device__ __forceinline__ int64_t factor_column(int64_t c0, int64_t q0, int64_t C, int64_t R, int64_t s0,
                                                 int64_t s2, bool vec, int tid) {
  static_assert(TC_THREADS % BN == 0 && TC_THREADS % (BN / 8) == 0, "one fixed staging column per thread");
  const int64_t col = c0 + (vec ? (tid % (BN / 8)) * 8 : tid % BN);
  return col < C ? (q0 + col / R) * s0 + (col % R) * s2 : -1;
}

// acc (this warp's 2 x 2 fragments at rows wm*32, cols wn*32) += x[rows, :] @ F[:, c0:c0+BN],
// through the double buffers As[2], Bs[2]: slice s + 1 is staged into buffer (s + 1) % 2
// while slice s is multiplied from buffer s % 2. Every thread commits one copy group per
// slice (possibly empty), so waiting for all but the newest group means slice s has landed.
template <typename T>
__device__ __forceinline__ void tc_factor_product(T (*As)[BM][A_LD], T (*Bs)[TC_BK][B_LD], const int64_t* base,
                                                  const T* x, int64_t xs2, bool xvec, const T* f, int64_t fs0,
                                                  int64_t fs1, int64_t fs2, bool fvec, int64_t d, int64_t c0,
                                                  int64_t q0, int64_t C, int64_t R,
                                                  typename Frags<T>::C (&acc)[2][2], int tid, int wm, int wn) {
  const int64_t fcol = factor_column(c0, q0, C, R, fs0, fs2, fvec, tid);
  const int64_t slices = (d + TC_BK - 1) / TC_BK;
  if (slices > 0) {
    stage_rows<T>(As[0], base, x, xs2, d, 0, xvec, tid);
    stage_factor<T>(Bs[0], f, fcol, fs1, d, 0, fvec, tid);
  }
  __pipeline_commit();
  for (int64_t s = 0; s < slices; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s + 1 < slices) {  // buffer buf ^ 1 was last read at slice s - 1, before the barrier ending it
      stage_rows<T>(As[buf ^ 1], base, x, xs2, d, (s + 1) * TC_BK, xvec, tid);
      stage_factor<T>(Bs[buf ^ 1], f, fcol, fs1, d, (s + 1) * TC_BK, fvec, tid);
    }
    __pipeline_commit();
    __pipeline_wait_prior(1);  // this thread's copies of slice s have landed
    __syncthreads();           // and every thread's (copies and plain stores)
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      warp_mma_2x2<typename Frags<T>::A, typename Frags<T>::B>(
          acc, &As[buf][wm * 32][kk], &As[buf][wm * 32 + 16][kk], A_LD, &Bs[buf][kk][wn * 32],
          &Bs[buf][kk][wn * 32 + 16], B_LD);
    }
    __syncthreads();  // every warp is done with buffer buf before slice s + 2 is staged into it
  }
}

template <typename T, bool kGrouped>
__global__ void __launch_bounds__(TC_THREADS)
    factored_scores_tc_kernel(const __grid_constant__ FactoredGroup g, int per_token) {
  __shared__ __align__(128) T As[2][BM][A_LD];
  __shared__ __align__(128) T Bs[2][TC_BK][B_LD];
  __shared__ __align__(128) float Ps[BM][P_LD];
  __shared__ float sums[BM][QMAX];
  __shared__ int64_t a_base[BM], g_base[BM];
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const ScoreBlock blk = score_block<kGrouped>(g);
  const FactoredProblem& P = *blk.P;
  const T* acts = static_cast<const T*>(P.acts);
  const T* grads = static_cast<const T*>(P.grads);
  const T* left = static_cast<const T*>(P.left);
  const T* right = static_cast<const T*>(P.right);
  const bool avec = P.vec & 1u, gvec = P.vec & 2u, lvec = P.vec & 4u, rvec = P.vec & 8u;
  const MaskView mask = P.mask;
  const int64_t n = blk.n, q0 = blk.q0, C = blk.C, t_begin = blk.t_begin, t_end = blk.t_end, R = P.R;
  const int qb = blk.qb;

  for (int e = tid; e < BM * QMAX; e += TC_THREADS) sums[e / QMAX][e % QMAX] = 0.0f;
  __syncthreads();

  for (int64_t t0 = t_begin; t0 < t_end; t0 += BM) {
    if (tid < BM) {
      const int64_t t = t0 + tid;
      const bool ok = t < t_end && keep(mask, n, t);
      a_base[tid] = ok ? n * P.as0 + t * P.as1 : -1;
      g_base[tid] = ok ? n * P.gs0 + t * P.gs1 : -1;
    }
    __syncthreads();
    for (int64_t c0 = 0; c0 < C; c0 += BN) {
      typename Frags<T>::C gl[2][2], ar[2][2];
      fill_2x2(gl, 0.0f);
      fill_2x2(ar, 0.0f);
      tc_factor_product<T>(As, Bs, g_base, grads, P.gs2, gvec, left, P.ls0, P.ls1, P.ls2, lvec, P.d_out, c0, q0, C, R,
                           gl, tid, wm, wn);
      tc_factor_product<T>(As, Bs, a_base, acts, P.as2, avec, right, P.rs0, P.rs1, P.rs2, rvec, P.d_in, c0, q0, C, R,
                           ar, tid, wm, wn);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < gl[i][j].num_elements; ++e) gl[i][j].x[e] *= ar[i][j].x[e];
      store_2x2<P_LD>(Ps, gl, wm, wn);
      __syncthreads();
      fold_query_columns<TC_THREADS>(Ps, sums, qb, c0, R, tid);
      __syncthreads();
    }
    if (per_token) store_token_scores<TC_THREADS>(sums, qb, n, t0, t_end, P.T, P.Q, q0, P.out, tid);
    __syncthreads();
  }
  if (!per_token) store_document_scores(sums, qb, blk.x, P.Q, q0, P.partials ? P.partials : P.out, tid);
}

template <typename T, bool kGrouped>
void launch(const FactoredGroup& g, int per_token, unsigned blocks, cudaStream_t stream) {
  factored_scores_tc_kernel<T, kGrouped><<<blocks, TC_THREADS, 0, stream>>>(g, per_token);
}

// A table of one reads its problem from fixed kernel-parameter offsets (see score_block).
template <typename T>
void launch_typed(const FactoredGroup& g, int per_token, unsigned blocks, cudaStream_t stream) {
  if (g.count == 1)
    launch<T, false>(g, per_token, blocks, stream);
  else
    launch<T, true>(g, per_token, blocks, stream);
}

}  // namespace

bool factored_scores_tc_applicable(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                   const pyinf_tensor* right) {
  const pyinf_dtype dt = acts->dtype;
  return (dt == PYINF_BFLOAT16 || dt == PYINF_FLOAT16) && grads->dtype == dt && left->dtype == dt &&
         right->dtype == dt;
}

void launch_factored_scores_tc(const FactoredGroup& g, int per_token, unsigned blocks, pyinf_dtype dt,
                               cudaStream_t stream) {
  if (dt == PYINF_BFLOAT16)
    launch_typed<__nv_bfloat16>(g, per_token, blocks, stream);
  else
    launch_typed<__half>(g, per_token, blocks, stream);
}

}  // namespace cuda
}  // namespace pyinf
