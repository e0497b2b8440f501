// CUDA factored scores (and the per-token variant).
// One block per (document, token range, query group): a range is a tile of 64 tokens for
// per-token scores and all T tokens for document scores, or, when there are too few
// (document, query group) pairs to fill the GPU and the caller gives a workspace, a split
// of them whose partial scores sum_splits_kernel adds up in split order. A query group
// is QB queries whose QB*r factor columns are processed in chunks of 64: for each chunk
// the block computes, for its 64 token rows, GL = g L[:, chunk] (K = d_out) and
// AR = a R[:, chunk] (K = d_in) as two 64x64 fp32 register tiles, multiplies them
// elementwise and folds each query's r columns into per-(token, query) sums in shared
// memory in a fixed order. Per-token scores are written directly; document scores sum
// the token rows in order inside the block. No atomics: deterministic for a given split.
#include <algorithm>
#include "kernels_common.cuh"

namespace pyinf {
namespace cuda {

// acc += x[token rows, :] @ F[:, c0:c0+BN], K = d, staged through shared memory in slices
// of BK. Row m of the tile is at element offset base[m] of x (-1: masked / out of range, read
// as zeros); column c of F is rank c % R of query q0 + c / R of the factor [Q, d, R].
__device__ __forceinline__ void factor_product(float (&As)[BK][BM + 4], float (&Bs)[BK][BN + 4],
                                               const int64_t* base, const View3& x, const View3& f, int64_t d,
                                               int64_t c0, int64_t q0, int64_t C, int64_t R, float (&acc)[4][4],
                                               int tid, int ty, int tx) {
  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int m = e / BK, k = e % BK;
      As[k][m] = (base[m] >= 0 && k0 + k < d) ? ld(x.p, x.dt, base[m] + (k0 + k) * x.s2) : 0.0f;
    }
    for (int e = tid; e < BK * BN; e += THREADS) {
      const int k = e / BN, c = e % BN;
      const int64_t col = c0 + c;
      float v = 0.0f;
      if (k0 + k < d && col < C) {
        const int64_t q = q0 + col / R, kr = col % R;
        v = ld(f.p, f.dt, q * f.s0 + (k0 + k) * f.s1 + kr * f.s2);
      }
      Bs[k][c] = v;
    }
    __syncthreads();
    mma_slice(As, Bs, acc, ty, tx);
    __syncthreads();
  }
}

__global__ void __launch_bounds__(THREADS) factored_scores_kernel(View3 acts, View3 grads, View3 left, View3 right,
                                                                  MaskView mask, int64_t T, int64_t d_in,
                                                                  int64_t d_out, int64_t Q, int64_t R, int QB,
                                                                  int per_token, int64_t tblocks, int64_t tspan,
                                                                  float* out, float* partials) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  __shared__ float Ps[BM][BN + 1];
  __shared__ float sums[BM][QMAX];
  __shared__ int64_t a_base[BM], g_base[BM];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const ScoreBlock blk = score_block(T, Q, R, QB, tblocks, tspan);
  const int64_t n = blk.n, q0 = blk.q0, C = blk.C, t_begin = blk.t_begin, t_end = blk.t_end;
  const int qb = blk.qb;

  for (int e = tid; e < BM * QMAX; e += THREADS) sums[e / QMAX][e % QMAX] = 0.0f;
  __syncthreads();  // the token loop may not run at all (T == 0)

  for (int64_t t0 = t_begin; t0 < t_end; t0 += BM) {
    if (tid < BM) {
      const int64_t t = t0 + tid;
      const bool ok = t < t_end && keep(mask, n, t);
      a_base[tid] = ok ? n * acts.s0 + t * acts.s1 : -1;
      g_base[tid] = ok ? n * grads.s0 + t * grads.s1 : -1;
    }
    __syncthreads();
    for (int64_t c0 = 0; c0 < C; c0 += BN) {
      float gl[4][4], ar[4][4];
      zero(gl);
      zero(ar);
      // GL = g[tokens, :] @ L[:, c0:c0+BN] and AR = a[tokens, :] @ R[:, c0:c0+BN]
      factor_product(As, Bs, g_base, grads, left, d_out, c0, q0, C, R, gl, tid, ty, tx);
      factor_product(As, Bs, a_base, acts, right, d_in, c0, q0, C, R, ar, tid, ty, tx);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) Ps[ty * 4 + i][tx * 4 + j] = gl[i][j] * ar[i][j];
      __syncthreads();
      fold_query_columns<THREADS>(Ps, sums, qb, c0, R, tid);
      __syncthreads();
    }
    if (per_token) store_token_scores<THREADS>(sums, qb, n, t0, t_end, T, Q, q0, out, tid);
    __syncthreads();
  }
  if (!per_token) store_document_scores(sums, qb, blockIdx.x, Q, q0, partials ? partials : out, tid);
}

// out[n, q] = the sum of the document's S split partials [N, S, Q], in split order.
__global__ void sum_splits_kernel(const float* __restrict__ partials, int64_t N, int64_t S, int64_t Q,
                                  float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * Q) return;
  const int64_t n = i / Q, q = i % Q;
  float s = 0.0f;
  for (int64_t k = 0; k < S; ++k) s += partials[(n * S + k) * Q + q];
  out[i] = s;
}

pyinf_status launch_sum_splits(const float* partials, int64_t N, int64_t S, int64_t Q, float* out,
                               cudaStream_t stream, const char* op) {
  sum_splits_kernel<<<ceil_div(N * Q, 256), 256, 0, stream>>>(partials, N, S, Q, out);
  return launch_check(op);
}

// Blocks a split aims for: a few waves of the 132 SMs of an H100 (the TC kernel's 128-thread
// blocks with ~30 KB of shared memory fit several per SM). A constant, not the device's SM
// count, so that a result does not depend on which GPU computed it.
constexpr int64_t kSplitTargetBlocks = 512;
// A split keeps at least this many token tiles (the block's set-up and epilogue amortised).
constexpr int64_t kMinSplitTiles = 2;

FactoredPlan plan(const Dims& d, int per_token, bool may_split) {
  FactoredPlan p{};
  int qb = d.r > 0 ? static_cast<int>(BN / d.r) : QMAX;
  if (qb < 1) qb = 1;
  if (qb > QMAX) qb = QMAX;
  if (qb > d.q) qb = static_cast<int>(d.q);
  p.qb = qb < 1 ? 1 : qb;
  p.groups = d.q > 0 ? (d.q + p.qb - 1) / p.qb : 0;
  if (per_token) {
    p.tspan = BM;
    p.tblocks = (d.t + BM - 1) / BM;
    return p;
  }
  p.tspan = d.t;
  p.tblocks = 1;
  const int64_t pairs = d.n * p.groups, tiles = (d.t + BM - 1) / BM;
  if (!may_split || pairs == 0 || pairs >= kSplitTargetBlocks) return p;
  int64_t splits = (kSplitTargetBlocks + pairs - 1) / pairs;
  if (splits > tiles / kMinSplitTiles) splits = tiles / kMinSplitTiles;
  if (splits < 2) return p;
  p.tspan = ((tiles + splits - 1) / splits) * BM;  // whole tiles per split
  p.tblocks = (d.t + p.tspan - 1) / p.tspan;
  if (p.tblocks < 2) {
    p.tspan = d.t;
    p.tblocks = 1;
    return p;
  }
  p.split = true;
  p.workspace_bytes = static_cast<size_t>(d.n * p.tblocks * d.q) * sizeof(float);
  return p;
}

// Whether a call with a workspace of workspace_bytes (and packed factors, or none) runs the
// Hopper kernel. With packed factors it may need no workspace at all (no partials).
bool takes_sm90(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                const pyinf_tensor* right, const Dims& d, int per_token, size_t workspace_bytes,
                bool packed = false) {
#if defined(PYINF_WITH_SM90)
  if (d.n == 0 || d.q == 0 || !factored_scores_sm90_applicable(acts, grads, left, right, d)) return false;
  const size_t need = factored_scores_sm90_workspace_bytes(d, per_token ? 1 : 0, packed);
  return need == 0 || workspace_bytes >= need;
#else
  (void)acts, (void)grads, (void)left, (void)right, (void)d, (void)per_token, (void)workspace_bytes, (void)packed;
  return false;
#endif
}

// Bytes of the Hopper kernel's packed factors for a validated factor pair (0: it cannot take them).
size_t packed_factor_bytes(const pyinf_tensor* left, const pyinf_tensor* right, const Dims& d) {
#if defined(PYINF_WITH_SM90)
  if (d.q > 0 && factored_scores_sm90_packable(left, right, d)) return factored_scores_sm90_packed_bytes(d);
#else
  (void)left, (void)right, (void)d;
#endif
  return 0;
}

// The workspace a call needs: the split's partials, or the Hopper kernel's (with or without
// packed factors given), whichever is larger.
size_t workspace_bytes_for(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                           const pyinf_tensor* right, const Dims& d, int per_token, bool packed) {
  size_t bytes = plan(d, per_token, true).workspace_bytes;
#if defined(PYINF_WITH_SM90)
  if (factored_scores_sm90_applicable(acts, grads, left, right, d))
    bytes = std::max(bytes, factored_scores_sm90_workspace_bytes(d, per_token ? 1 : 0, packed));
#else
  (void)acts, (void)grads, (void)left, (void)right, (void)packed;
#endif
  return bytes;
}

pyinf_status run_factored(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                          const pyinf_tensor* right, const pyinf_tensor* mask, int per_token, float* out,
                          void* workspace, size_t workspace_bytes, bool may_split, void* stream_ptr,
                          const void* packed = nullptr, size_t packed_bytes = 0) {
  Dims d;
  pyinf_status s = validate_factored(acts, grads, left, right, mask, per_token, out, &d);
  if (s != PYINF_SUCCESS) return s;
  if (packed != nullptr) {
    const size_t need = packed_factor_bytes(left, right, d);
    if (need == 0 || packed_bytes < need)
      return fail(PYINF_ERROR_WORKSPACE, "pyinf_cuda_factored_scores_split_packed: the packed factors have " +
                                             std::to_string(packed_bytes) + " bytes, these factors need " +
                                             std::to_string(need) + (need == 0 ? " (none can be packed here)" : ""));
  }
#if defined(PYINF_WITH_SM90)
  if ((workspace != nullptr || packed != nullptr) &&
      takes_sm90(acts, grads, left, right, d, per_token, workspace_bytes, packed != nullptr))
    return launch_factored_scores_sm90(acts, grads, left, right, mask, d, per_token ? 1 : 0, out, packed, workspace,
                                       static_cast<cudaStream_t>(stream_ptr));
#endif
  const FactoredPlan p = plan(d, per_token, may_split);
  if (p.workspace_bytes > workspace_bytes || (p.workspace_bytes > 0 && workspace == nullptr))
    return fail(PYINF_ERROR_WORKSPACE, "pyinf_cuda_factored_scores_split: needs a workspace of " +
                                           std::to_string(p.workspace_bytes) + " bytes, got " +
                                           std::to_string(workspace_bytes));
  if (d.n == 0 || d.q == 0 || p.tblocks == 0) return PYINF_SUCCESS;
  if (d.n * p.tblocks > 0x7fffffffLL || p.groups > 65535)
    return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_cuda_factored_scores: problem too large for one launch");
  const dim3 grid(static_cast<unsigned>(d.n * p.tblocks), static_cast<unsigned>(p.groups));
  float* partials = p.split ? static_cast<float*>(workspace) : nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (factored_scores_tc_applicable(acts, grads, left, right) && use_tensor_cores(true)) {
    launch_factored_scores_tc(acts, grads, left, right, mask, d, per_token ? 1 : 0, p, grid, out, partials, stream);
  } else {
    factored_scores_kernel<<<grid, THREADS, 0, stream>>>(view3(*acts), view3(*grads), view3(*left), view3(*right),
                                                         mask_view(mask), d.t, d.d_in, d.d_out, d.q, d.r, p.qb,
                                                         per_token ? 1 : 0, p.tblocks, p.tspan, out, partials);
  }
  s = launch_check("factored_scores");
  if (s != PYINF_SUCCESS || !p.split) return s;
  return launch_sum_splits(partials, d.n, p.tblocks, d.q, out, stream, "factored_scores");
}

}  // namespace cuda
}  // namespace pyinf

using namespace pyinf;
using namespace pyinf::cuda;

extern "C" pyinf_status pyinf_cuda_factored_scores(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                   const pyinf_tensor* left, const pyinf_tensor* right,
                                                   const pyinf_tensor* mask, int per_token, float* out,
                                                   void* stream) {
  return run_factored(acts, grads, left, right, mask, per_token, out, nullptr, 0, false, stream);
}

namespace {
// The two workspace-size entry points: validated shapes, then workspace_bytes_for.
pyinf_status report_workspace(const char* fn, const pyinf_tensor* acts, const pyinf_tensor* grads,
                              const pyinf_tensor* left, const pyinf_tensor* right, int per_token, bool packed,
                              size_t* bytes) {
  if (bytes == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, std::string(fn) + ": 'bytes' is NULL");
  Dims d;
  pyinf_status s = validate_factored_shapes(acts, grads, left, right, &d);
  if (s != PYINF_SUCCESS) return s;
  *bytes = workspace_bytes_for(acts, grads, left, right, d, per_token, packed);
  return PYINF_SUCCESS;
}
}  // namespace

extern "C" pyinf_status pyinf_cuda_factored_scores_workspace_size(const pyinf_tensor* acts,
                                                                  const pyinf_tensor* grads,
                                                                  const pyinf_tensor* left,
                                                                  const pyinf_tensor* right, int per_token,
                                                                  size_t* bytes) {
  return report_workspace("pyinf_cuda_factored_scores_workspace_size", acts, grads, left, right, per_token, false,
                          bytes);
}

extern "C" pyinf_status pyinf_cuda_factored_scores_packed_workspace_size(const pyinf_tensor* acts,
                                                                         const pyinf_tensor* grads,
                                                                         const pyinf_tensor* left,
                                                                         const pyinf_tensor* right, int per_token,
                                                                         size_t* bytes) {
  return report_workspace("pyinf_cuda_factored_scores_packed_workspace_size", acts, grads, left, right, per_token,
                          true, bytes);
}

extern "C" pyinf_status pyinf_cuda_factored_scores_kernel(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                          const pyinf_tensor* left, const pyinf_tensor* right,
                                                          int per_token, size_t workspace_bytes, const char** name) {
  if (name == nullptr)
    return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_cuda_factored_scores_kernel: 'name' is NULL");
  Dims d;
  pyinf_status s = validate_factored_shapes(acts, grads, left, right, &d);
  if (s != PYINF_SUCCESS) return s;
  *name = takes_sm90(acts, grads, left, right, d, per_token, workspace_bytes) ? "sm90"
          : factored_scores_tc_applicable(acts, grads, left, right) && use_tensor_cores(true) ? "wmma"
                                                                                            : "fma";
  return PYINF_SUCCESS;
}

extern "C" pyinf_status pyinf_cuda_factored_scores_split(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                         const pyinf_tensor* left, const pyinf_tensor* right,
                                                         const pyinf_tensor* mask, int per_token, float* out,
                                                         void* workspace, size_t workspace_bytes, void* stream) {
  return run_factored(acts, grads, left, right, mask, per_token, out, workspace, workspace_bytes, true, stream);
}

extern "C" pyinf_status pyinf_cuda_factored_scores_pack_size(const pyinf_tensor* left, const pyinf_tensor* right,
                                                             size_t* bytes) {
  if (bytes == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_cuda_factored_scores_pack_size: 'bytes' is NULL");
  Dims d;
  pyinf_status s = validate_factor_pair("factored_scores_pack_size", left, right, &d);
  if (s != PYINF_SUCCESS) return s;
  *bytes = packed_factor_bytes(left, right, d);
  return PYINF_SUCCESS;
}

extern "C" pyinf_status pyinf_cuda_factored_scores_pack(const pyinf_tensor* left, const pyinf_tensor* right,
                                                        void* packed, size_t packed_bytes, void* stream) {
  const char* op = "factored_scores_pack";
  Dims d;
  pyinf_status s = validate_factor_pair(op, left, right, &d);
  if (s != PYINF_SUCCESS) return s;
  const size_t need = packed_factor_bytes(left, right, d);
  if (need == 0)
    return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_cuda_factored_scores_pack: the Hopper kernel cannot take these "
                                           "factors here (pyinf_cuda_factored_scores_pack_size reports 0 bytes)");
  if (packed == nullptr || packed_bytes < need)
    return fail(PYINF_ERROR_WORKSPACE, "pyinf_cuda_factored_scores_pack: needs " + std::to_string(need) +
                                           " bytes of packed factors, got " + std::to_string(packed ? packed_bytes : 0));
#if defined(PYINF_WITH_SM90)
  return pack_factors_sm90(left, right, d, packed, static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  return fail(PYINF_ERROR_INTERNAL, "pyinf_cuda_factored_scores_pack: no Hopper kernel in this build");
#endif
}

extern "C" pyinf_status pyinf_cuda_factored_scores_split_packed(
    const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left, const pyinf_tensor* right,
    const void* packed, size_t packed_bytes, const pyinf_tensor* mask, int per_token, float* out, void* workspace,
    size_t workspace_bytes, void* stream) {
  return run_factored(acts, grads, left, right, mask, per_token, out, workspace, workspace_bytes, true, stream,
                      packed, packed_bytes);
}
