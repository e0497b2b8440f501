// CUDA factored scores (and the per-token variant), for one layer or for a group of layers
// in one launch (pyinf_cuda_factored_scores_grouped: the small layers of a model would each
// be too small to fill the GPU and would pay a launch each).
// One block per (problem, document, token range, query group): a range is a tile of 64 tokens
// for per-token scores and all T tokens for document scores, or, when there are too few
// (document, query group) pairs in the call to fill the GPU and the caller gives a workspace,
// a split of them whose partial scores a second kernel adds up in split order. A query group
// is QB queries whose QB*r factor columns are processed in chunks of 64: for each chunk
// the block computes, for its 64 token rows, GL = g L[:, chunk] (K = d_out) and
// AR = a R[:, chunk] (K = d_in) as two 64x64 fp32 register tiles, multiplies them
// elementwise and folds each query's r columns into per-(token, query) sums in shared
// memory in a fixed order. Per-token scores are written directly; document scores sum
// the token rows in order inside the block. No atomics: deterministic for a given split.
#include <algorithm>
#include <vector>

#include "kernels_common.cuh"

namespace pyinf {
namespace cuda {

// acc += x[token rows, :] @ F[:, c0:c0+BN], K = d, staged through shared memory in slices
// of BK. Row m of the tile is at element offset base[m] of x (-1: masked / out of range, read
// as zeros); column c of F is rank c % R of query q0 + c / R of the factor [Q, d, R]. Each
// thread stages one fixed column of F at every K slice, so its offset is worked out once.
__device__ __forceinline__ void factor_product(float (&As)[BK][BM + 4], float (&Bs)[BK][BN + 4],
                                               const int64_t* base, const View3& x, const View3& f, int64_t d,
                                               int64_t c0, int64_t q0, int64_t C, int64_t R, float (&acc)[4][4],
                                               int tid, int ty, int tx) {
  static_assert(THREADS % BN == 0, "one fixed staging column per thread");
  const int c = tid % BN;
  const int64_t col = c0 + c;
  const int64_t fcol = col < C ? (q0 + col / R) * f.s0 + (col % R) * f.s2 : -1;
  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int m = e / BK, k = e % BK;
      As[k][m] = (base[m] >= 0 && k0 + k < d) ? ld(x.p, x.dt, base[m] + (k0 + k) * x.s2) : 0.0f;
    }
    for (int k = tid / BN; k < BK; k += THREADS / BN)
      Bs[k][c] = (k0 + k < d && fcol >= 0) ? ld(f.p, f.dt, fcol + (k0 + k) * f.s1) : 0.0f;
    __syncthreads();
    mma_slice(As, Bs, acc, ty, tx);
    __syncthreads();
  }
}

// At least 2 blocks per SM: caps registers at 128, ptxas's own choice before the grouped table;
// without it ptxas aimed at 3 blocks (80 registers) for sm_80 and spilled 52 bytes.
template <bool kGrouped>
__global__ void __launch_bounds__(THREADS, 2) factored_scores_kernel(const __grid_constant__ FactoredGroup g,
                                                                  int per_token) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  __shared__ float Ps[BM][BN + 1];
  __shared__ float sums[BM][QMAX];
  __shared__ int64_t a_base[BM], g_base[BM];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const ScoreBlock blk = score_block<kGrouped>(g);
  const FactoredProblem& P = *blk.P;
  const View3 acts{P.acts, P.dt[0], P.as0, P.as1, P.as2}, grads{P.grads, P.dt[1], P.gs0, P.gs1, P.gs2};
  const View3 left{P.left, P.dt[2], P.ls0, P.ls1, P.ls2}, right{P.right, P.dt[3], P.rs0, P.rs1, P.rs2};
  const MaskView mask = P.mask;
  const int64_t n = blk.n, q0 = blk.q0, C = blk.C, t_begin = blk.t_begin, t_end = blk.t_end, R = P.R;
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
      factor_product(As, Bs, g_base, grads, left, P.d_out, c0, q0, C, R, gl, tid, ty, tx);
      factor_product(As, Bs, a_base, acts, right, P.d_in, c0, q0, C, R, ar, tid, ty, tx);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) Ps[ty * 4 + i][tx * 4 + j] = gl[i][j] * ar[i][j];
      __syncthreads();
      fold_query_columns<THREADS>(Ps, sums, qb, c0, R, tid);
      __syncthreads();
    }
    if (per_token) store_token_scores<THREADS>(sums, qb, n, t0, t_end, P.T, P.Q, q0, P.out, tid);
    __syncthreads();
  }
  if (!per_token) store_document_scores(sums, qb, blk.x, P.Q, q0, P.partials ? P.partials : P.out, tid);
}

// out[n, q] (element i = n * Q + q) = the sum of the document's S split partials [N, S, Q],
// in split order.
__device__ __forceinline__ void sum_split(const float* __restrict__ partials, int64_t N, int64_t S, int64_t Q,
                                          float* __restrict__ out, int64_t i) {
  if (i >= N * Q) return;
  const int64_t n = i / Q, q = i % Q;
  float s = 0.0f;
  for (int64_t k = 0; k < S; ++k) s += partials[(n * S + k) * Q + q];
  out[i] = s;
}

__global__ void sum_splits_kernel(const float* __restrict__ partials, int64_t N, int64_t S, int64_t Q,
                                  float* __restrict__ out) {
  sum_split(partials, N, S, Q, out, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

// The same for every split problem of a launch's table: blockIdx.y is the problem.
__global__ void sum_group_splits_kernel(const __grid_constant__ FactoredGroup g) {
  const FactoredProblem& P = g.p[blockIdx.y];
  if (P.partials == nullptr) return;
  sum_split(P.partials, P.xblocks / P.tblocks, P.tblocks, P.Q, P.out,
            static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
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

// QB: the queries a block takes (as many whole queries as fit in BN columns, at most QMAX).
int query_block(const Dims& d) {
  int qb = d.r > 0 ? static_cast<int>(BN / d.r) : QMAX;
  if (qb < 1) qb = 1;
  if (qb > QMAX) qb = QMAX;
  if (qb > d.q) qb = static_cast<int>(d.q);
  return qb < 1 ? 1 : qb;
}

// The query groups of QB queries.
int64_t query_groups(const Dims& d) {
  const int qb = query_block(d);
  return d.q > 0 ? (d.q + qb - 1) / qb : 0;
}

int64_t document_query_pairs(const Dims& d) { return d.n * query_groups(d); }

// The plan of one problem of a call whose problems have call_pairs (document, query group)
// pairs in all: the split is sized for the whole call, so a group of layers that fills the
// GPU together splits none of them.
FactoredPlan plan(const Dims& d, int per_token, bool may_split, int64_t call_pairs) {
  FactoredPlan p{};
  p.qb = query_block(d);
  p.groups = query_groups(d);
  if (per_token) {
    p.tspan = BM;
    p.tblocks = (d.t + BM - 1) / BM;
    return p;
  }
  p.tspan = d.t;
  p.tblocks = 1;
  const int64_t pairs = d.n * p.groups, tiles = (d.t + BM - 1) / BM;
  if (!may_split || pairs == 0 || call_pairs >= kSplitTargetBlocks) return p;
  int64_t splits = (kSplitTargetBlocks + call_pairs - 1) / call_pairs;
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

FactoredPlan plan(const Dims& d, int per_token, bool may_split) {
  return plan(d, per_token, may_split, document_query_pairs(d));
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

// One validated problem of a call to the portable kernels.
struct ProblemCall {
  const pyinf_tensor *acts, *grads, *left, *right, *mask;
  float* out;
  Dims d;
};

// The portable kernel a problem runs: WMMA for four bf16 or four fp16 inputs (unless
// PYINF_NATIVE_TC=0), else fp32 FMA. Problems of one launch share it.
enum class PortableKernel { wmma_bf16, wmma_fp16, fma };

PortableKernel portable_kernel(const ProblemCall& c, bool tensor_cores) {
  if (!tensor_cores || !factored_scores_tc_applicable(c.acts, c.grads, c.left, c.right)) return PortableKernel::fma;
  return c.acts->dtype == PYINF_BFLOAT16 ? PortableKernel::wmma_bf16 : PortableKernel::wmma_fp16;
}

const char* portable_kernel_name(PortableKernel k) { return k == PortableKernel::fma ? "fma" : "wmma"; }

// Partial sums of a split problem start at multiples of 256 bytes of the workspace.
size_t aligned_partials(size_t bytes) { return (bytes + 255) / 256 * 256; }

std::vector<FactoredPlan> plan_calls(const std::vector<ProblemCall>& calls, int per_token, bool may_split) {
  // Only compared with kSplitTargetBlocks: capped there, so that the sum over many large
  // problems (each at most 2^60) cannot overflow.
  int64_t call_pairs = 0;
  for (const ProblemCall& c : calls) call_pairs = std::min(call_pairs + document_query_pairs(c.d), kSplitTargetBlocks);
  std::vector<FactoredPlan> plans;
  for (const ProblemCall& c : calls) plans.push_back(plan(c.d, per_token, may_split, call_pairs));
  return plans;
}

// Where each split problem's partial sums start in the workspace (offsets[i]; unused for a
// problem that is not split), and the bytes the call needs: one after another, each at a
// multiple of 256 bytes (a single call's partials start at 0 and need exactly their size).
size_t partials_layout(const std::vector<FactoredPlan>& plans, std::vector<size_t>* offsets = nullptr) {
  size_t end = 0;
  for (const FactoredPlan& p : plans) {
    const size_t start = p.split ? aligned_partials(end) : end;
    if (offsets) offsets->push_back(start);
    if (p.split) end = start + p.workspace_bytes;
  }
  return end;
}

// For 16-byte loads (the WMMA kernel's staging; see factored_scores_tc.cu): token rows of a
// [N, T, d] input with a contiguous last dimension, row starts at multiples of 8 elements, an
// aligned pointer (d itself may be odd: the last partial vector of a row is read
// element by element).
bool rows_vectorisable(const pyinf_tensor& x) {
  return aligned16(x.data) && x.strides[2] == 1 && x.strides[0] % 8 == 0 && x.strides[1] % 8 == 0;
}

// 8 ranks of a [Q, d, R] factor.
bool factor_vectorisable(const pyinf_tensor& f) {
  return aligned16(f.data) && f.strides[2] == 1 && f.strides[0] % 8 == 0 && f.strides[1] % 8 == 0 &&
         f.shape[2] % 8 == 0;
}

FactoredProblem describe(const ProblemCall& c, const FactoredPlan& p, float* partials, int64_t first_block) {
  FactoredProblem f{};
  f.acts = c.acts->data;
  f.grads = c.grads->data;
  f.left = c.left->data;
  f.right = c.right->data;
  const int64_t* s[4] = {c.acts->strides, c.grads->strides, c.left->strides, c.right->strides};
  int64_t* dst[4][3] = {{&f.as0, &f.as1, &f.as2}, {&f.gs0, &f.gs1, &f.gs2}, {&f.ls0, &f.ls1, &f.ls2},
                        {&f.rs0, &f.rs1, &f.rs2}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) *dst[i][j] = s[i][j];
  f.mask = mask_view(c.mask);
  f.out = c.out;
  f.partials = partials;
  f.T = c.d.t;
  f.d_in = c.d.d_in;
  f.d_out = c.d.d_out;
  f.Q = c.d.q;
  f.R = c.d.r;
  f.tblocks = p.tblocks;
  f.tspan = p.tspan;
  f.xblocks = c.d.n * p.tblocks;
  f.first_block = static_cast<int32_t>(first_block);
  f.qb = p.qb;
  f.dt[0] = static_cast<uint8_t>(c.acts->dtype);
  f.dt[1] = static_cast<uint8_t>(c.grads->dtype);
  f.dt[2] = static_cast<uint8_t>(c.left->dtype);
  f.dt[3] = static_cast<uint8_t>(c.right->dtype);
  f.vec = (rows_vectorisable(*c.acts) ? 1u : 0u) | (rows_vectorisable(*c.grads) ? 2u : 0u) |
          (factor_vectorisable(*c.left) ? 4u : 0u) | (factor_vectorisable(*c.right) ? 8u : 0u);
  return f;
}

template <bool kGrouped>
void launch_fma(const FactoredGroup& g, int per_token, unsigned blocks, cudaStream_t stream) {
  factored_scores_kernel<kGrouped><<<blocks, THREADS, 0, stream>>>(g, per_token ? 1 : 0);
}

// One launch's table and its grid.
struct GroupLaunch {
  PortableKernel kernel;
  FactoredGroup g;
  int64_t blocks = 0;
  int64_t max_scores = 0;  // the largest N * Q of a split problem (the sums' grid), 0: none split
};

// Scores the validated problems with the portable kernels: problems grouped by kernel (in
// call order) into launches of up to kMaxGroup. Every table is built and checked before the
// first launch, so a call that fails leaves nothing half-written.
pyinf_status run_portable(const std::vector<ProblemCall>& calls, int per_token, void* workspace,
                          size_t workspace_bytes, bool may_split, cudaStream_t stream, const char* fn) {
  const std::vector<FactoredPlan> plans = plan_calls(calls, per_token, may_split);
  std::vector<size_t> offsets;
  const size_t need = partials_layout(plans, &offsets);
  const pyinf_status aligned = check_aligned(fn, "workspace", workspace);
  if (aligned != PYINF_SUCCESS) return aligned;
  if (need > workspace_bytes || (need > 0 && workspace == nullptr))
    return fail(PYINF_ERROR_WORKSPACE, std::string(fn) + ": needs a workspace of " + std::to_string(need) +
                                           " bytes, got " + std::to_string(workspace == nullptr ? 0 : workspace_bytes));
  const bool tensor_cores = use_tensor_cores(true);
  std::vector<GroupLaunch> launches;
  for (const PortableKernel kind : {PortableKernel::wmma_bf16, PortableKernel::wmma_fp16, PortableKernel::fma}) {
    for (size_t i = 0; i < calls.size(); ++i) {
      const ProblemCall& c = calls[i];
      const FactoredPlan& p = plans[i];
      if (portable_kernel(c, tensor_cores) != kind) continue;
      float* partials = p.split ? reinterpret_cast<float*>(static_cast<char*>(workspace) + offsets[i]) : nullptr;
      const int64_t blocks = c.d.n * p.tblocks * p.groups;
      if (blocks == 0) continue;  // nothing to score (N, Q or T is 0)
      if (launches.empty() || launches.back().kernel != kind || launches.back().g.count == kMaxGroup) {
        launches.emplace_back();
        launches.back().kernel = kind;
      }
      GroupLaunch& l = launches.back();
      if (l.blocks + blocks > 0x7fffffffLL)
        return fail(PYINF_ERROR_INVALID_VALUE, std::string(fn) + ": problem too large for one launch (" +
                                                   std::to_string(l.blocks + blocks) + " blocks)");
      l.g.p[l.g.count++] = describe(c, p, partials, l.blocks);
      l.blocks += blocks;
      if (p.split) l.max_scores = std::max(l.max_scores, c.d.n * c.d.q);
    }
  }
  for (const GroupLaunch& l : launches) {
    const unsigned blocks = static_cast<unsigned>(l.blocks);
    if (l.kernel == PortableKernel::fma && l.g.count == 1)
      launch_fma<false>(l.g, per_token, blocks, stream);
    else if (l.kernel == PortableKernel::fma)
      launch_fma<true>(l.g, per_token, blocks, stream);
    else
      launch_factored_scores_tc(l.g, per_token ? 1 : 0, blocks,
                                l.kernel == PortableKernel::wmma_bf16 ? PYINF_BFLOAT16 : PYINF_FLOAT16, stream);
    pyinf_status s = launch_check("factored_scores");
    if (s != PYINF_SUCCESS) return s;
    if (l.max_scores == 0) continue;
    sum_group_splits_kernel<<<dim3(ceil_div(l.max_scores, 256), static_cast<unsigned>(l.g.count)), 256, 0, stream>>>(
        l.g);
    s = launch_check("factored_scores");
    if (s != PYINF_SUCCESS) return s;
  }
  return PYINF_SUCCESS;
}

pyinf_status run_factored(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                          const pyinf_tensor* right, const pyinf_tensor* mask, int per_token, float* out,
                          void* workspace, size_t workspace_bytes, bool may_split, void* stream_ptr,
                          const void* packed = nullptr, size_t packed_bytes = 0) {
  Dims d;
  pyinf_status s = validate_factored(acts, grads, left, right, mask, per_token, out, &d);
  if (s != PYINF_SUCCESS) return s;
  s = check_aligned("pyinf_cuda_factored_scores_split", "workspace", workspace);
  if (s == PYINF_SUCCESS) s = check_aligned("pyinf_cuda_factored_scores_split_packed", "packed", packed);
  if (s != PYINF_SUCCESS) return s;
  if (packed != nullptr) {
    const size_t need = packed_factor_bytes(left, right, d);
    if (need == 0 || packed_bytes < need)
      return fail(PYINF_ERROR_WORKSPACE, "pyinf_cuda_factored_scores_split_packed: the packed factors have " +
                                             std::to_string(packed_bytes) + " bytes, these factors need " +
                                             std::to_string(need) + (need == 0 ? " (none can be packed here)" : ""));
  }
  s = pending_error_check("factored_scores");
  if (s != PYINF_SUCCESS) return s;
#if defined(PYINF_WITH_SM90)
  // (no workspace counts as 0 bytes: packed factors with a NULL workspace and nonzero bytes
  // would otherwise put the partial sums at address 0)
  if ((workspace != nullptr || packed != nullptr) &&
      takes_sm90(acts, grads, left, right, d, per_token, workspace == nullptr ? 0 : workspace_bytes,
                 packed != nullptr))
    return launch_factored_scores_sm90(acts, grads, left, right, mask, d, per_token ? 1 : 0, out, packed, workspace,
                                       static_cast<cudaStream_t>(stream_ptr));
#endif
  return run_portable({ProblemCall{acts, grads, left, right, mask, out, d}}, per_token, workspace, workspace_bytes,
                      may_split, static_cast<cudaStream_t>(stream_ptr), "pyinf_cuda_factored_scores_split");
}

// The problems of a grouped call, validated (validate_factored_group), as calls.
pyinf_status validate_group(const char* fn, const pyinf_factored_problem* problems, int count, int per_token,
                            bool with_outputs, std::vector<ProblemCall>* calls) {
  std::vector<Dims> dims;
  const pyinf_status s = validate_factored_group(fn, problems, count, per_token, with_outputs, &dims);
  if (s != PYINF_SUCCESS) return s;
  for (int i = 0; i < count; ++i) {
    const pyinf_factored_problem& p = problems[i];
    calls->push_back(ProblemCall{p.acts, p.grads, p.left, p.right, p.mask, p.out, dims[i]});
  }
  return PYINF_SUCCESS;
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
  *name = takes_sm90(acts, grads, left, right, d, per_token, workspace_bytes)
              ? "sm90"
              : portable_kernel_name(portable_kernel(ProblemCall{acts, grads, left, right, nullptr, nullptr, d},
                                                     use_tensor_cores(true)));
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
  s = check_aligned("pyinf_cuda_factored_scores_pack", "packed", packed);
  if (s != PYINF_SUCCESS) return s;
  if (packed == nullptr || packed_bytes < need)
    return fail(PYINF_ERROR_WORKSPACE, "pyinf_cuda_factored_scores_pack: needs " + std::to_string(need) +
                                           " bytes of packed factors, got " + std::to_string(packed ? packed_bytes : 0));
#if defined(PYINF_WITH_SM90)
  s = pending_error_check(op);
  if (s != PYINF_SUCCESS) return s;
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

extern "C" pyinf_status pyinf_cuda_factored_scores_grouped_workspace_size(const pyinf_factored_problem* problems,
                                                                          int count, int per_token, size_t* bytes) {
  const char* fn = "pyinf_cuda_factored_scores_grouped_workspace_size";
  if (bytes == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, std::string(fn) + ": 'bytes' is NULL");
  std::vector<ProblemCall> calls;
  pyinf_status s = validate_group(fn, problems, count, per_token, false, &calls);
  if (s != PYINF_SUCCESS) return s;
  *bytes = partials_layout(plan_calls(calls, per_token, true));
  return PYINF_SUCCESS;
}

extern "C" pyinf_status pyinf_cuda_factored_scores_grouped(const pyinf_factored_problem* problems, int count,
                                                           int per_token, void* workspace, size_t workspace_bytes,
                                                           void* stream) {
  const char* fn = "pyinf_cuda_factored_scores_grouped";
  std::vector<ProblemCall> calls;
  pyinf_status s = validate_group(fn, problems, count, per_token, true, &calls);
  if (s != PYINF_SUCCESS || calls.empty()) return s;
  s = pending_error_check("factored_scores_grouped");
  if (s != PYINF_SUCCESS) return s;
  return run_portable(calls, per_token, workspace, workspace_bytes, true, static_cast<cudaStream_t>(stream), fn);
}
