// Shared pieces of the portable CUDA kernels (sm_80+): dtype-generic loads and one
// 64x64 fp32 FMA tile engine (256 threads, 4x4 outputs per thread, K staged through
// shared memory in slices of 16). Inputs are converted to fp32 when staged; all
// accumulation is fp32. Dtypes are a runtime switch (uniform per launch), so each kernel
// is compiled once per architecture: this keeps the CI compile short.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../common.h"

namespace pyinf {
namespace cuda {

constexpr int BM = 64;       // tile rows
constexpr int BN = 64;       // tile cols
constexpr int BK = 16;       // K slice
constexpr int THREADS = 256; // 16 x 16 threads, 4 x 4 outputs each

struct View3 {  // a strided [A, B, C] input
  const void* p;
  int dt;
  int64_t s0, s1, s2;
};
struct View2 {
  const void* p;
  int dt;
  int64_t s0, s1;
};
struct MaskView {  // p == nullptr: keep everything
  const uint8_t* p;
  int64_t s0, s1;
};

inline View3 view3(const pyinf_tensor& t) { return View3{t.data, (int)t.dtype, t.strides[0], t.strides[1], t.strides[2]}; }
inline View2 view2(const pyinf_tensor& t) { return View2{t.data, (int)t.dtype, t.strides[0], t.strides[1]}; }
inline MaskView mask_view(const pyinf_tensor* m) {
  return m ? MaskView{static_cast<const uint8_t*>(m->data), m->strides[0], m->strides[1]} : MaskView{nullptr, 0, 0};
}

__device__ __forceinline__ float ld(const void* p, int dt, int64_t i) {
  if (dt == PYINF_FLOAT32) return static_cast<const float*>(p)[i];
  if (dt == PYINF_BFLOAT16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

__device__ __forceinline__ bool keep(const MaskView& m, int64_t n, int64_t t) {
  return m.p == nullptr || m.p[n * m.s0 + t * m.s1] != 0;
}

// Element offset of flattened token row r = n * T + t of a strided [N, T, *] input, or -1
// when r is past the last row or the token is masked out (its values are then never read).
__device__ __forceinline__ int64_t token_row_offset(int64_t r, int64_t rows, int64_t T, const View3& x,
                                                    const MaskView& mask) {
  if (r >= rows) return -1;
  const int64_t n = r / T, t = r % T;
  return keep(mask, n, t) ? n * x.s0 + t * x.s1 : -1;
}

// acc[i][j] += sum_k As[k][ty*4+i] * Bs[k][tx*4+j] over one staged K slice.
__device__ __forceinline__ void mma_slice(const float (&As)[BK][BM + 4], const float (&Bs)[BK][BN + 4],
                                          float (&acc)[4][4], int ty, int tx) {
#pragma unroll
  for (int k = 0; k < BK; ++k) {
    float a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[k][ty * 4 + i];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx * 4 + j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// Factored scores. A launch covers a table of up to kMaxGroup problems (layers), so that a
// model's small layers are scored in one launch; a single call is a table of one. Each
// problem is cut into blocks: one per (document, token range, query group of QB <= QMAX
// queries). A token range is tspan tokens: one tile of BM for per-token scores; for document
// scores all T tokens (tblocks = 1), or a split of them whose partial scores a second kernel
// sums in a fixed order (few documents and queries: more blocks than that). The grid is 1-D:
// a problem's blocks are [first_block, next problem's first_block), numbered query group by
// query group, and within a group document by document, range by range.
constexpr int QMAX = 16;       // queries per block at most
constexpr int kMaxGroup = 16;  // problems per launch: FactoredGroup stays within 4 KiB

// One problem as the kernels read it: acts [N, T, d_in], grads [N, T, d_out], left
// [Q, d_out, R], right [Q, d_in, R] (strided, in elements), the optional mask [N, T], and
// its plan. 248 bytes: 16 of them fit the classic 4 KiB kernel-parameter space.
struct FactoredProblem {
  const void* acts;
  const void* grads;
  const void* left;
  const void* right;
  int64_t as0, as1, as2, gs0, gs1, gs2, ls0, ls1, ls2, rs0, rs1, rs2;
  MaskView mask;
  float* out;       // [N, Q], or [N, T, Q] for per-token scores
  float* partials;  // [N * tblocks, Q] split partial sums (document scores only), or null
  int64_t T, d_in, d_out, Q, R;
  int64_t tblocks, tspan;
  int64_t xblocks;      // N * tblocks: blocks per query group
  int32_t first_block;  // the problem's first block of the launch's grid
  int32_t qb;           // QB: queries per block
  uint8_t dt[4];        // pyinf_dtype of acts, grads, left, right
  uint32_t vec;         // bit i: input i (acts, grads, left, right) allows 16-byte loads
};

struct FactoredGroup {
  FactoredProblem p[kMaxGroup];
  int32_t count;
  // Every device pointer the table holds (lets a checker see them; unused by the kernels).
  template <typename F>
  void for_each_device_pointer(F&& f) const {
    for (int i = 0; i < count; ++i) {
      for (const void* q : {p[i].acts, p[i].grads, p[i].left, p[i].right, static_cast<const void*>(p[i].mask.p),
                            static_cast<const void*>(p[i].out), static_cast<const void*>(p[i].partials)})
        f(q);
    }
  }
};
// The kernels take the table and an int: both must fit the classic 4 KiB of kernel parameters.
static_assert(sizeof(FactoredGroup) + sizeof(int) <= 4096, "a grouped launch's table must fit 4 KiB of parameters");

struct ScoreBlock {
  const FactoredProblem* P;
  int64_t x;        // document * tblocks + token range: the row of P->partials
  int64_t n;        // document
  int64_t q0;       // first query of the group
  int qb;           // queries in the group
  int64_t C;        // factor columns of the group: qb * R
  int64_t t_begin;  // token rows [t_begin, t_end)
  int64_t t_end;
};

// The calling block's problem and share of it. Problems are few (<= kMaxGroup), so a scan.
// kGrouped = false: a table of one. The kernels are compiled for both: with the problem's
// index a constant, its fields are read straight from the constant bank as instruction
// operands; with a block-dependent index they take registers (ptxas, nvcc 13: the bf16 WMMA
// kernel 168 registers and 20 bytes of spills on sm_90a, 212 on sm_80, against 152 and 166
// for a table of one), which single-layer calls, the large layers, need not pay.
template <bool kGrouped>
__device__ __forceinline__ ScoreBlock score_block(const FactoredGroup& g) {
  // 32-bit index arithmetic: a launch has at most 2^31 - 1 blocks (checked on the host), and
  // a 64-bit division is a called subroutine whose registers the WMMA kernel cannot spare.
  const uint32_t bid = blockIdx.x;
  int i = 0;
  if (kGrouped)
    while (i + 1 < g.count && bid >= static_cast<uint32_t>(g.p[i + 1].first_block)) ++i;
  const FactoredProblem& P = g.p[i];
  const uint32_t local = kGrouped ? bid - static_cast<uint32_t>(P.first_block) : bid;
  const uint32_t xblocks = static_cast<uint32_t>(P.xblocks), tblocks = static_cast<uint32_t>(P.tblocks);
  ScoreBlock b;
  b.P = &P;
  b.x = local % xblocks;
  b.n = static_cast<uint32_t>(b.x) / tblocks;
  const int64_t tb = static_cast<uint32_t>(b.x) % tblocks;
  b.q0 = static_cast<int64_t>(local / xblocks) * P.qb;
  b.qb = static_cast<int>(P.Q - b.q0 < P.qb ? P.Q - b.q0 : P.qb);
  b.C = b.qb * P.R;
  b.t_begin = tb * P.tspan;
  b.t_end = b.t_begin + P.tspan < P.T ? b.t_begin + P.tspan : P.T;
  return b;
}

// Factored-score epilogues shared by the FMA and tensor-core kernels (one fixed order).
// sums[m][ql] += the product tile's columns of query ql that fall in [c0, c0 + BN), in
// column order; Ps[m][c] holds column c0 + c of token row m.
template <int NTHREADS, int LD, int QM>
__device__ __forceinline__ void fold_query_columns(const float (*Ps)[LD], float (*sums)[QM], int qb, int64_t c0,
                                                   int64_t R, int tid) {
  for (int e = tid; e < BM * qb; e += NTHREADS) {
    const int m = e / qb, ql = e % qb;
    const int64_t lo = (ql * R > c0 ? ql * R : c0);
    int64_t hi = (ql + 1) * R;
    if (hi > c0 + BN) hi = c0 + BN;
    float s = 0.0f;
    for (int64_t c = lo; c < hi; ++c) s += Ps[m][c - c0];
    sums[m][ql] += s;
  }
}

// Per-token scores of token rows t0.. (masked tokens hold exact zeros) into out [N, T, Q].
template <int NTHREADS, int QM>
__device__ __forceinline__ void store_token_scores(const float (*sums)[QM], int qb, int64_t n, int64_t t0,
                                                   int64_t t_end, int64_t T, int64_t Q, int64_t q0, float* out,
                                                   int tid) {
  for (int e = tid; e < BM * qb; e += NTHREADS) {
    const int m = e / qb, ql = e % qb;
    const int64_t t = t0 + m;
    if (t < t_end) out[(n * T + t) * Q + q0 + ql] = sums[m][ql];
  }
}

// Document scores of the block's token range: each query's token rows summed in row order
// into row `row` of dst [rows, Q] (out [N, Q] itself when a document is one range).
template <int QM>
__device__ __forceinline__ void store_document_scores(const float (*sums)[QM], int qb, int64_t row, int64_t Q,
                                                      int64_t q0, float* dst, int tid) {
  if (tid < qb) {
    float s = 0.0f;
    for (int m = 0; m < BM; ++m) s += sums[m][tid];
    dst[row * Q + q0 + tid] = s;
  }
}

// Sum of every thread's `s` in a fixed-order tree (deterministic), written by thread 0 to
// *dst. red has NTHREADS floats; all threads of the block must call it.
template <int NTHREADS>
__device__ __forceinline__ void block_sum_store(float* red, float s, int tid, float* dst) {
  red[tid] = s;
  __syncthreads();
  for (int w = NTHREADS / 2; w > 0; w /= 2) {
    if (tid < w) red[tid] += red[tid + w];
    __syncthreads();
  }
  if (tid == 0) *dst = red[0];
  __syncthreads();
}

__device__ __forceinline__ void zero(float (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
}

inline pyinf_status cuda_check(cudaError_t err, const char* op, const char* what) {
  if (err == cudaSuccess) return PYINF_SUCCESS;
  return fail(PYINF_ERROR_CUDA, std::string("pyinf_cuda_") + op + ": " + what + ": " + cudaGetErrorName(err) +
                                    ": " + cudaGetErrorString(err));
}

// Kernel launch status (launch configuration errors; asynchronous faults surface later).
inline pyinf_status launch_check(const char* op) { return cuda_check(cudaGetLastError(), op, "kernel launch"); }

// cudaGetLastError holds the last error of any runtime call on this host thread, not only
// pyinf's: one that earlier work left unchecked would be reported by launch_check as if
// pyinf's launch had failed. Each entry point takes it first, after validating its
// arguments and before launching anything, and says it came before pyinf's launch. (On a
// first call it is also where a runtime that cannot start, with no driver or no device,
// reports so.)
inline pyinf_status pending_error_check(const char* op) {
  return cuda_check(cudaGetLastError(), op, "CUDA reported an error before pyinf launched anything (left "
                                            "unchecked by earlier work on this thread, not from pyinf, or the "
                                            "CUDA runtime could not start)");
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Rotation: out[row, j] (fp32, dense [N*T, d]) = keep(row) ? sum_k x[n,t,k] q[k,j] : 0
// (masked rows are exact zeros and never read), on TF32 tensor cores when tensor_cores.
// Defined in rotate.cu.
pyinf_status launch_rotate(const char* op, View3 x, View2 q, MaskView mask, int64_t N, int64_t T, int64_t d,
                           bool tensor_cores, float* out, cudaStream_t stream);

// Whether a call runs its tensor-core kernels (factored_scores_tc.cu, eigen_tc.cu) or the
// fp32 FMA ones. By default the tensor cores take 16-bit inputs (bf16 / fp16), whose
// precision they keep: WMMA on the operands as given for the factored scores; TF32 (exact
// for 16-bit values) for the rotations and Gram tiles, where only the fp32 eigenbases get
// rounded, to about the precision of the inputs. fp32 inputs keep fp32 FMA arithmetic.
// PYINF_NATIVE_TC="0" keeps every call on the FMA kernels; "1" also takes fp32 inputs of the
// eigen ops to TF32 (about 1e-3 relative error). Read per call (cheap next to a launch) so
// that tests and benchmarks can switch it.
inline bool use_tensor_cores(bool sixteen_bit_inputs) {
  const char* v = std::getenv("PYINF_NATIVE_TC");
  const bool is = v != nullptr && (v[0] == '0' || v[0] == '1') && v[1] == '\0';
  if (is && v[0] == '0') return false;
  if (is && v[0] == '1') return true;
  return sixteen_bit_inputs;
}

inline bool is_16bit(const pyinf_tensor* t) { return t->dtype == PYINF_BFLOAT16 || t->dtype == PYINF_FLOAT16; }

// TF32 tensor-core rotation and Gram tile (eigen_tc.cu): same grids, arguments and outputs
// as rotate_kernel and gram_kernel, 128 threads per block.
void launch_rotate_tc(View3 x, View2 q, MaskView mask, int64_t N, int64_t T, int64_t d, float* out, dim3 grid,
                      cudaStream_t stream);
void launch_gram_tc(const float* rot_g, const float* rot_a, int64_t N, int64_t T, int64_t d_out, int64_t d_in,
                    int self_mode, View2 lambdas, float damping, float* out, dim3 grid, cudaStream_t stream);

// How one problem of a factored-scores call is cut into blocks (factored_scores.cu): QB
// queries per block, `groups` query groups, tblocks token ranges of tspan tokens per document;
// `split`: document scores are written per range into N * tblocks * Q floats of the
// workspace, then summed.
struct FactoredPlan {
  int qb;
  int64_t groups, tblocks, tspan;
  bool split;
  size_t workspace_bytes;
};

// Tensor-core factored scores (factored_scores_tc.cu): applicable when the four inputs are
// all bf16 or all fp16. The launch runs a table whose problems all have dtype dt, on the
// same 1-D grid of `blocks` blocks and with the same outputs as the FMA kernel.
bool factored_scores_tc_applicable(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                   const pyinf_tensor* right);
void launch_factored_scores_tc(const FactoredGroup& g, int per_token, unsigned blocks, pyinf_dtype dt,
                               cudaStream_t stream);

// out [N, Q] = the partial document scores [N, S, Q] of S token ranges summed in range order
// (factored_scores.cu; deterministic).
pyinf_status launch_sum_splits(const float* partials, int64_t N, int64_t S, int64_t Q, float* out,
                               cudaStream_t stream, const char* op);

#if defined(PYINF_WITH_SM90)
// Hopper factored scores (factored_scores_sm90.cu: TMA + wgmma): whether a call can take it
// (opt-in PYINF_NATIVE_SM90=1, an sm_90 device, 16-bit inputs, TMA-aligned token rows,
// r <= 128) and whether its packed factors can be made for a factor pair (the same without
// the token rows: d.n and d.t unused); the sizes of the packed factors and of the workspace
// (without / with packed factors given); the packing; the launch (which writes `out`
// completely; packed NULL: it packs into the workspace first).
bool factored_scores_sm90_applicable(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                     const pyinf_tensor* right, const Dims& d);
bool factored_scores_sm90_packable(const pyinf_tensor* left, const pyinf_tensor* right, const Dims& d);
size_t factored_scores_sm90_packed_bytes(const Dims& d);
size_t factored_scores_sm90_workspace_bytes(const Dims& d, int per_token, bool packed);
pyinf_status pack_factors_sm90(const pyinf_tensor* left, const pyinf_tensor* right, const Dims& d, void* packed,
                               cudaStream_t stream);
pyinf_status launch_factored_scores_sm90(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                         const pyinf_tensor* right, const pyinf_tensor* mask, const Dims& d,
                                         int per_token, float* out, const void* packed, void* workspace,
                                         cudaStream_t stream);
#endif

}  // namespace cuda
}  // namespace pyinf
