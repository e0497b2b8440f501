// CUDA eigen-correction and self-influence.
//   1. rotate_kernel: a~ = a Q_A and g~ = g Q_S for every token (masked rows -> 0), fp32,
//      into the workspace (N*T*(d_in+d_out) floats).
//   2. gram_kernel: one block per 64x64 tile of R_n = g~_n^T a~_n; per document the tile
//      is built over the tokens and squared in registers, so the N x d_out x d_in batch
//      never exists in memory.
//        eigen_correction: the block loops over all documents in order and writes
//        Lambda's tile (deterministic, no atomics);
//        self_influence:   one block per (tile, document) writes the tile's partial
//        sum of R^2 / (Lambda + damping) (fixed-order block reduction), and
//   3. reduce_partials_kernel sums each document's tile partials in tile order.
// For bf16 / fp16 inputs (and for all inputs with PYINF_NATIVE_TC=1) steps 1 and 2 run on
// TF32 tensor cores (eigen_tc.cu), same order; PYINF_NATIVE_TC=0 keeps them on fp32 FMA.
#include "kernels_common.cuh"

namespace pyinf {
namespace cuda {

namespace {

constexpr size_t kAlign = 256;
inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct Layout {
  size_t rot_a = 0, rot_g = 0, partials = 0, total = 0;
  int64_t tiles = 0;
};

// Validated sizes are at most kMaxSize (2^60), so the rotated tokens' bytes (the inputs'
// element counts times 4) cannot overflow; the output tiles and self_influence's partials
// (N * tiles, the product of no tensor) are checked here.
pyinf_status layout(const char* op, const Dims& d, bool self, Layout* l) {
  const int64_t ti = (d.d_out + BM - 1) / BM, tj = (d.d_in + BN - 1) / BN;
  pyinf_status s = check_sizes(op, "tiles(d_out)*tiles(d_in)", {ti, tj});
  if (s == PYINF_SUCCESS && self) s = check_sizes(op, "N*tiles(d_out)*tiles(d_in)", {d.n, ti, tj});
  if (s != PYINF_SUCCESS) return s;
  const size_t rows = static_cast<size_t>(d.n * d.t);
  l->tiles = ti * tj;
  l->rot_a = 0;
  l->rot_g = align_up(rows * static_cast<size_t>(d.d_in) * sizeof(float));
  l->partials = l->rot_g + align_up(rows * static_cast<size_t>(d.d_out) * sizeof(float));
  l->total = l->partials + (self ? align_up(static_cast<size_t>(d.n * l->tiles) * sizeof(float)) : 0);
  return PYINF_SUCCESS;
}

}  // namespace

// rot_g [N*T, d_out], rot_a [N*T, d_in] dense fp32. mode 0: out = Lambda [d_out, d_in];
// mode 1: partials[n * tiles + tile] with lambdas/damping.
__global__ void __launch_bounds__(THREADS) gram_kernel(const float* __restrict__ rot_g,
                                                       const float* __restrict__ rot_a, int64_t N, int64_t T,
                                                       int64_t d_out, int64_t d_in, int self_mode, View2 lambdas,
                                                       float damping, float* out) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  __shared__ float red[THREADS];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM, j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  float inv[4][4];
  if (self_mode) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t gi = i0 + ty * 4 + i, gj = j0 + tx * 4 + j;
        inv[i][j] = (gi < d_out && gj < d_in) ? 1.0f / (ld(lambdas.p, lambdas.dt, gi * lambdas.s0 + gj * lambdas.s1) + damping)
                                              : 0.0f;
      }
  }
  float lam[4][4];
  zero(lam);
  const int64_t n_begin = self_mode ? blockIdx.z : 0;
  const int64_t n_step = self_mode ? gridDim.z : 1;
  for (int64_t n = n_begin; n < N; n += n_step) {
    float acc[4][4];
    zero(acc);
    const float* g = rot_g + n * T * d_out;
    const float* a = rot_a + n * T * d_in;
    for (int64_t t0 = 0; t0 < T; t0 += BK) {
      for (int e = tid; e < BK * BM; e += THREADS) {
        const int k = e / BM, m = e % BM;
        const bool tok = t0 + k < T;
        As[k][m] = (tok && i0 + m < d_out) ? g[(t0 + k) * d_out + i0 + m] : 0.0f;
        Bs[k][m] = (tok && j0 + m < d_in) ? a[(t0 + k) * d_in + j0 + m] : 0.0f;
      }
      __syncthreads();
      mma_slice(As, Bs, acc, ty, tx);
      __syncthreads();
    }
    if (!self_mode) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) lam[i][j] = fmaf(acc[i][j], acc[i][j], lam[i][j]);
    } else {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s = fmaf(acc[i][j] * acc[i][j], inv[i][j], s);
      block_sum_store<THREADS>(red, s, tid, out + n * tiles + tile);
    }
  }
  if (!self_mode) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t gi = i0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t gj = j0 + tx * 4 + j;
        if (gi < d_out && gj < d_in) out[gi * d_in + gj] = lam[i][j];
      }
    }
  }
}

__global__ void reduce_partials_kernel(const float* __restrict__ partials, int64_t N, int64_t tiles, float* out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.0f;
  for (int64_t k = 0; k < tiles; ++k) s += partials[n * tiles + k];
  out[n] = s;
}

namespace {

pyinf_status run(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* q_a,
                 const pyinf_tensor* q_s, const pyinf_tensor* lambdas, float damping, const pyinf_tensor* mask,
                 float* out, void* workspace, size_t workspace_bytes, void* stream_ptr) {
  Dims d;
  pyinf_status s = validate_rotated(op, acts, grads, q_a, q_s, lambdas, damping, mask, out, &d);
  if (s != PYINF_SUCCESS) return s;
  const bool self = lambdas != nullptr;
  Layout l;
  s = layout(op, d, self, &l);
  if (s != PYINF_SUCCESS) return s;
  s = check_aligned((std::string("pyinf_cuda_") + op).c_str(), "workspace", workspace);
  if (s != PYINF_SUCCESS) return s;
  if (workspace_bytes < l.total || (workspace == nullptr && l.total > 0))  // (NULL holds no bytes)
    return fail(PYINF_ERROR_WORKSPACE, std::string("pyinf_cuda_") + op + ": needs a workspace of " +
                                           std::to_string(l.total) + " bytes, got " +
                                           (workspace == nullptr ? std::string("NULL")
                                                                 : std::to_string(workspace_bytes)));
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (self ? d.n == 0 : d.d_out * d.d_in == 0) return PYINF_SUCCESS;
  s = pending_error_check(op);
  if (s != PYINF_SUCCESS) return s;
  if (l.tiles == 0)  // self_influence of a layer with no weights: every score is 0
    return cuda_check(cudaMemsetAsync(out, 0, static_cast<size_t>(d.n) * sizeof(float), stream), op, "memset");
  // the Gram tiles' grid and the sums' grid, checked before anything is launched
  const int64_t tj = (d.d_in + BN - 1) / BN, ti = (d.d_out + BM - 1) / BM;
  if (tj > 0x7fffffffLL || ti > 65535 || (self && (d.n + 127) / 128 > 0x7fffffffLL))
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_cuda_") + op + ": problem too large for one launch");
  char* ws = static_cast<char*>(workspace);
  float* rot_a = reinterpret_cast<float*>(ws + l.rot_a);
  float* rot_g = reinterpret_cast<float*>(ws + l.rot_g);
  const MaskView mv = mask_view(mask);
  const bool tc = use_tensor_cores(is_16bit(acts) && is_16bit(grads));  // one choice for both stages
  s = launch_rotate(op, view3(*acts), view2(*q_a), mv, d.n, d.t, d.d_in, tc, rot_a, stream);
  if (s != PYINF_SUCCESS) return s;
  s = launch_rotate(op, view3(*grads), view2(*q_s), mv, d.n, d.t, d.d_out, tc, rot_g, stream);
  if (s != PYINF_SUCCESS) return s;
  const View2 lv = self ? view2(*lambdas) : View2{nullptr, 0, 0, 0};
  if (!self) {
    dim3 grid(static_cast<unsigned>(tj), static_cast<unsigned>(ti), 1);
    if (tc)
      launch_gram_tc(rot_g, rot_a, d.n, d.t, d.d_out, d.d_in, 0, lv, 0.0f, out, grid, stream);
    else
      gram_kernel<<<grid, THREADS, 0, stream>>>(rot_g, rot_a, d.n, d.t, d.d_out, d.d_in, 0, lv, 0.0f, out);
    return launch_check(op);
  }
  float* partials = reinterpret_cast<float*>(ws + l.partials);
  dim3 grid(static_cast<unsigned>(tj), static_cast<unsigned>(ti), static_cast<unsigned>(d.n < 65535 ? d.n : 65535));
  if (tc)
    launch_gram_tc(rot_g, rot_a, d.n, d.t, d.d_out, d.d_in, 1, lv, damping, partials, grid, stream);
  else
    gram_kernel<<<grid, THREADS, 0, stream>>>(rot_g, rot_a, d.n, d.t, d.d_out, d.d_in, 1, lv, damping, partials);
  s = launch_check(op);
  if (s != PYINF_SUCCESS) return s;
  reduce_partials_kernel<<<ceil_div(d.n, 128), 128, 0, stream>>>(partials, d.n, l.tiles, out);
  return launch_check(op);
}

pyinf_status workspace_size(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads, bool self,
                            size_t* bytes) {
  Dims d;
  pyinf_status s = validate_tokens(op, acts, grads, &d);
  if (s != PYINF_SUCCESS) return s;
  if (bytes == nullptr)
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_cuda_") + op + "_workspace_size: 'bytes' is NULL");
  Layout l;
  s = layout(op, d, self, &l);
  if (s != PYINF_SUCCESS) return s;
  *bytes = l.total;
  return PYINF_SUCCESS;
}

}  // namespace
}  // namespace cuda
}  // namespace pyinf

using namespace pyinf;

extern "C" pyinf_status pyinf_cuda_eigen_correction_workspace_size(const pyinf_tensor* acts,
                                                                   const pyinf_tensor* grads, size_t* bytes) {
  return cuda::workspace_size("eigen_correction", acts, grads, false, bytes);
}

extern "C" pyinf_status pyinf_cuda_self_influence_workspace_size(const pyinf_tensor* acts,
                                                                 const pyinf_tensor* grads, size_t* bytes) {
  return cuda::workspace_size("self_influence", acts, grads, true, bytes);
}

extern "C" pyinf_status pyinf_cuda_eigen_correction(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                    const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                    const pyinf_tensor* mask, float* out, void* workspace,
                                                    size_t workspace_bytes, void* stream) {
  return cuda::run("eigen_correction", acts, grads, q_a, q_s, nullptr, 0.0f, mask, out, workspace, workspace_bytes,
                   stream);
}

extern "C" pyinf_status pyinf_cuda_self_influence(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                  const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                  const pyinf_tensor* lambdas, float damping,
                                                  const pyinf_tensor* mask, float* out, void* workspace,
                                                  size_t workspace_bytes, void* stream) {
  if (lambdas == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, "pyinf_self_influence: 'lambdas' is NULL");
  return cuda::run("self_influence", acts, grads, q_a, q_s, lambdas, damping, mask, out, workspace,
                   workspace_bytes, stream);
}
