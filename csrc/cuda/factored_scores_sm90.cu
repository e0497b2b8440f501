// CUDA factored scores for Hopper (sm_90a): TMA loads, warpgroup MMA (wgmma), built on
// CuTe (CUTLASS headers from the nvidia-cutlass package; see CMakeLists.txt).
//
// A tile is 128 factor columns x 128 token rows of one document; a CTA of 256 threads (two
// consumer warpgroups) takes one tile (or, persistent, several in turn). Per tile it runs
// ceil(d_out / 64) + ceil(d_in / 64) K steps through a 4-stage TMA pipeline: the first
// multiply grads rows by the left factor into one fp32 accumulator (GL), the rest acts rows by
// the right factor into a second one (AR); both are 128 x 128 in registers (64 + 64 floats per
// thread). The
// epilogue multiplies them element by element, zeroes masked and out-of-range token rows
// (a select, so NaN or Inf in padding cannot leak), and folds each query's columns and then
// the token rows in a fixed order through shared memory: deterministic, no atomics.
//
// The wgmma B operand must be K-major, and a query's columns must not straddle two column
// tiles, so the host first copies the factors [Q, d, r] into a workspace as [Cp, d] with each
// query's rank padded with zero columns to Rp (a power of two <= 128) and Cp a multiple of 128:
// one small pass (Q * r * (d_in + d_out) elements) next to the products' 2 N T (d_in + d_out) Q Rp
// FLOP. Token rows are read by TMA straight from acts and grads viewed as [T, d, N] (rows
// past T and columns past d arrive as zeros).
//
// The mainloop follows CUTLASS's Hopper TMA tutorial (examples/cute/tutorial/hopper/
// wgmma_tma_sm90.cu): one thread issues the TMA loads, every thread waits for a stage's full
// barrier, the two warpgroups each issue 64x128x64 of wgmma and arrive on the stage's empty
// barrier once that wgmma has completed; the producer waits on it before refilling the stage.
// Unlike the tutorial, a step's wgmma is left running while the previous step's stage is
// released (as CUTLASS's own mainloops do with K_PIPE_MMAS = 1). Two other modes are kept for
// comparison on the GPU: PYINF_NATIVE_SM90=wait0, the tutorial's wait at every step, and
// PYINF_NATIVE_SM90=ws, a third (producer) warpgroup whose elected thread issues every TMA load,
// so that no consumer warp ever waits on an empty barrier (384 threads; 154 registers fit
// without setmaxnreg), on a persistent grid (one CTA per SM, tiles round-robin; the stages and
// phases run on across a CTA's tiles, so the next tile's loads overlap this tile's epilogue).
//
// Applicable (factored_scores_sm90_applicable): compiled with 90a and the CUTLASS headers, a
// compute-capability 9.0 device, all four inputs bf16 or all fp16, r <= 128, acts and grads
// with a contiguous last dimension and a plain nested layout of 16-byte aligned rows and
// documents (tma_rows_ok), and a caller workspace. Opt-in (PYINF_NATIVE_SM90=1) until it has
// been checked and timed on an H100: so far it has been compiled (ptxas: registers, no spills,
// no wgmma warnings) and its barrier protocol run in a model (tests/test_native_sm90.py).
#include "kernels_common.cuh"

#if defined(PYINF_WITH_SM90)

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

namespace pyinf {
namespace cuda {
namespace {

using namespace cute;

constexpr int kTileM = 128;  // token rows per CTA
constexpr int kTileN = 128;  // factor columns per CTA
constexpr int kTileK = 64;   // K per pipeline stage: 128 bytes of 16-bit values (the 128-byte swizzle)
constexpr int kStages = 4;
constexpr int kConsumers = 256;  // two warpgroups of MMA threads (plus a producer warpgroup in kWarpSpecialized)

// How the K loop is run (PYINF_NATIVE_SM90): every thread consumes; one of them also produces.
enum Sm90Mode : int {
  kWait0 = 0,            // "wait0": each K step's wgmma is waited for (the CUTLASS tutorial's scheme)
  kInFlight1 = 1,        // "1": one wgmma batch left in flight across K steps (the default)
  kWarpSpecialized = 2,  // "ws": as kInFlight1, with the TMA issued by a third, producer warpgroup
};
constexpr int block_threads(int mode) { return mode == kWarpSpecialized ? kConsumers + 128 : kConsumers; }
constexpr int kMaxQueriesPerTile = kTileN / 8;  // Rp >= 8
constexpr int kProdLd = kTileN + 1;             // fp32 product tile row (odd: no bank conflicts on column walks)

using TileShape = Shape<Int<kTileM>, Int<kTileN>, Int<kTileK>>;
using ClusterShape = Shape<_1, _1, _1>;
// (rows, K, batch): rows and batch strided, K contiguous. The factor copy is the same with batch 1.
using GmemStride = Stride<int64_t, _1, int64_t>;

template <class T>
struct Sm90Types {
  using SmemLayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             make_shape(Int<kTileM>{}, Int<kTileK>{}, Int<kStages>{})));
  using SmemLayoutB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             make_shape(Int<kTileN>{}, Int<kTileK>{}, Int<kStages>{})));
  // Two warpgroups stacked along M: each owns 64 token rows x 128 columns.
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kTileN>, Int<kTileK>>, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<T const*>(nullptr)),
                                          make_layout(make_shape(int(0), int(0), int(0)), GmemStride{})));
  using TmaA = decltype(make_tma_copy_A_sm90(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutA{}(_, _, Int<0>{}), TileShape{},
                                             ClusterShape{}));
  using TmaB = decltype(make_tma_copy_B_sm90(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutB{}(_, _, Int<0>{}), TileShape{},
                                             ClusterShape{}));
  static constexpr uint32_t kTxBytes = uint32_t(sizeof(T)) * (kTileM + kTileN) * kTileK;

  // The operand stages first, each on a 1024-byte boundary: CuTe's wgmma descriptors carry base
  // offset 0, i.e. assume the 128-byte swizzle pattern (8 rows of 128 bytes) starts at the tile.
  struct SharedStorage {
    alignas(1024) ArrayEngine<T, cosize_v<SmemLayoutA>> A;
    alignas(1024) ArrayEngine<T, cosize_v<SmemLayoutB>> B;
    alignas(16) float prod[kTileM][kProdLd];
    float row_query[kTileM][kMaxQueriesPerTile];
    uint8_t row_ok[kTileM];
    alignas(8) uint64_t full[kStages];
    uint64_t empty[kStages];
  };
};

template <class T>
struct Sm90Params {
  typename Sm90Types<T>::TmaA tma_g, tma_a;  // grads and acts rows, viewed as [T, d, N]
  typename Sm90Types<T>::TmaB tma_l, tma_r;  // padded factors [Cp, d, 1]
  int T_len, d_out, d_in, N;
  int Q, Rp, Cp, tblocks;
  MaskView mask;
  int per_token;
  float* out;       // [N, T, Q] per token, else [N, Q] (written here when tblocks == 1)
  float* partials;  // [N, tblocks, Q] document scores per token tile (tblocks > 1), summed after
};

template <class T, int kMode>
__global__ void __launch_bounds__(block_threads(kMode), 1)
    factored_scores_sm90_kernel(CUTE_GRID_CONSTANT Sm90Params<T> const p) {
  // wgmma batches left running when a K step ends: at most one, as stages are released one step late
  constexpr int kInFlight = kMode == kWait0 ? 0 : 1;
  constexpr bool kWs = kMode == kWarpSpecialized;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Ty = Sm90Types<T>;
  using Storage = typename Ty::SharedStorage;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBar = cutlass::arch::ClusterBarrier;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& s = *reinterpret_cast<Storage*>(smem_raw);

  const int tid = threadIdx.x;
  const int kt_g = (p.d_out + kTileK - 1) / kTileK, kt_a = (p.d_in + kTileK - 1) / kTileK;
  const int k_tiles = kt_g + kt_a;  // K steps per tile: grads x left, then acts x right
  // Tiles in launch order: column tile fastest, then token tile, then document. A CTA takes
  // tiles blockIdx.x, blockIdx.x + gridDim.x, ... (one tile each unless the grid is persistent)
  // and runs their K steps as one sequence of `steps`; the pipeline's stages and phases follow
  // the step index across tiles, so the next tile's loads overlap this tile's epilogue.
  const int c_tiles = p.Cp / kTileN;
  const int num_tiles = c_tiles * p.tblocks * p.N;
  const int my_tiles = (num_tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
  const int steps = my_tiles * k_tiles;
  struct TileCoord {
    int c, t, n;
  };
  auto tile_coord = [&](int i) {  // this CTA's i-th tile
    const int tile = (int)blockIdx.x + i * (int)gridDim.x;
    return TileCoord{tile % c_tiles, (tile / c_tiles) % p.tblocks, tile / (c_tiles * p.tblocks)};
  };

  Tensor sA = make_tensor(make_smem_ptr(s.A.begin()), typename Ty::SmemLayoutA{});  // (128, 64, stage)
  Tensor sB = make_tensor(make_smem_ptr(s.B.begin()), typename Ty::SmemLayoutB{});  // (128, 64, stage)
  // The sources tiled: (128, 64, row tile, K step, batch).
  Tensor gG = local_tile(p.tma_g.get_tma_tensor(make_shape(p.T_len, p.d_out, p.N)), TileShape{}, make_coord(_, _, _),
                         Step<_1, X, _1>{});
  Tensor gA = local_tile(p.tma_a.get_tma_tensor(make_shape(p.T_len, p.d_in, p.N)), TileShape{}, make_coord(_, _, _),
                         Step<_1, X, _1>{});
  Tensor gL = local_tile(p.tma_l.get_tma_tensor(make_shape(p.Cp, p.d_out, 1)), TileShape{}, make_coord(_, _, _),
                         Step<X, _1, _1>{});
  Tensor gR = local_tile(p.tma_r.get_tma_tensor(make_shape(p.Cp, p.d_in, 1)), TileShape{}, make_coord(_, _, _),
                         Step<X, _1, _1>{});
  auto tma_g = p.tma_g.get_slice(0);
  auto tma_a = p.tma_a.get_slice(0);
  auto tma_l = p.tma_l.get_slice(0);
  auto tma_r = p.tma_r.get_slice(0);
  Tensor tGs = tma_g.partition_D(sA);  // (TMA, TMA_M, TMA_K, stage)
  Tensor tAs = tma_a.partition_D(sA);
  Tensor tLs = tma_l.partition_D(sB);
  Tensor tRs = tma_r.partition_D(sB);
  // One TMA per operand and stage covers the whole 128 x 64 box.
  CUTE_STATIC_ASSERT_V(size<1>(tGs) == _1{} && size<2>(tGs) == _1{} && size<3>(tGs) == Int<kStages>{});
  CUTE_STATIC_ASSERT_V(size<1>(tLs) == _1{} && size<2>(tLs) == _1{} && size<3>(tLs) == Int<kStages>{});

  // The TMA producer: one elected lane of warp 0. Written as the CUTLASS idiom (a warp-uniform
  // warp index, elect.sync) so that ptxas sees the branch reconverge; `tid == 0` made it
  // serialise the wgmma (C7520, "compiler-inserted WG.AR in divergent path"). With kWs, warp
  // 0 is in warpgroup 0, which only produces; the consumers are warpgroups 1 and 2.
  const bool producer = cutlass::canonical_warp_idx_sync() == 0 && cute::elect_one_sync();
  const bool consumer = !kWs || cutlass::canonical_warp_group_idx() > 0;
  const int ctid = kWs ? tid - 128 : tid;  // thread index among the consumers
  if (producer) {
    prefetch_tma_descriptor(p.tma_g.get_tma_descriptor());  // the four descriptors live in kernel parameters
    prefetch_tma_descriptor(p.tma_a.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_l.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_r.get_tma_descriptor());
    for (int st = 0; st < kStages; ++st) {
      FullBar::init(&s.full[st], 1);
      EmptyBar::init(&s.empty[st], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // Step g of this CTA's sequence into stage st: K step g % k_tiles of tile g / k_tiles.
  auto issue = [&](int g, int st) {
    const TileCoord tc = tile_coord(g / k_tiles);
    const int kt = g % k_tiles;
    FullBar::arrive_and_expect_tx(&s.full[st], Ty::kTxBytes);
    if (kt < kt_g) {
      copy(p.tma_g.with(s.full[st]), tma_g.partition_S(gG(_, _, tc.t, _, tc.n))(_, _, _, kt), tGs(_, _, _, st));
      copy(p.tma_l.with(s.full[st]), tma_l.partition_S(gL(_, _, tc.c, _, 0))(_, _, _, kt), tLs(_, _, _, st));
    } else {
      copy(p.tma_a.with(s.full[st]), tma_a.partition_S(gA(_, _, tc.t, _, tc.n))(_, _, _, kt - kt_g), tAs(_, _, _, st));
      copy(p.tma_r.with(s.full[st]), tma_r.partition_S(gR(_, _, tc.c, _, 0))(_, _, _, kt - kt_g), tRs(_, _, _, st));
    }
  };

  if (consumer) {
    if (producer) {  // !kWs: the producer is consumer thread 0 and fills the stages ahead
      for (int g = 0; g < kStages && g < steps; ++g) issue(g, g);
    }
    typename Ty::TiledMma mma;
    ThrMMA thr_mma = mma.get_thread_slice(ctid);
    Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // smem descriptors, (MMA, MMA_M, MMA_K, stage)
    Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
    Tensor acc_gl = partition_fragment_C(mma, Shape<Int<kTileM>, Int<kTileN>>{});  // (MMA, MMA_M, MMA_N)
    Tensor acc_ar = partition_fragment_C(mma, Shape<Int<kTileM>, Int<kTileN>>{});
    Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kTileM>, Int<kTileN>>{}));
    CUTE_STATIC_ASSERT_V(size(acc_gl) == Int<kTileM * kTileN / kConsumers>{});  // 64 fp32 per thread each
    CUTE_STATIC_ASSERT_V(size(mma) == Int<kConsumers>{});

    // Stage of step `done` is free again once its wgmma has completed: every consumer says so on
    // the stage's empty barrier, and (without kWs) the producer refills it with step done + kStages.
    auto release = [&](int done) {
      const int st = done % kStages;
      EmptyBar::arrive(&s.empty[st]);
      if (!kWs && producer && done + kStages < steps) {
        EmptyBar::wait(&s.empty[st], (done / kStages) & 1);
        issue(done + kStages, st);
      }
    };
    // Step g (K step kt of its tile) into `acc`. The two products run as two loops, not one loop
    // with a branch between the accumulators: ptxas cannot prove such a branch warp-uniform and
    // then serialises the wgmma (C7520).
    auto k_step = [&](auto& acc, int g, int kt) {
      const int st = g % kStages;
      FullBar::wait(&s.full[st], (g / kStages) & 1);
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, st), tCrB(_, _, _, st), acc);
      warpgroup_commit_batch();
      // kInFlight = 1: step g's wgmma keeps running while step g - 1's stage is released and the
      // next step is waited for and issued (the tensor cores never drain between steps).
      warpgroup_wait<kInFlight>();
      warpgroup_fence_operand(acc);
      if (kInFlight == 0)
        release(g);
      else if (kt > 0)
        release(g - 1);  // the tile's last step is released after its final wait
    };
    auto consumers_sync = [] { cutlass::arch::NamedBarrier::sync(kConsumers, 1); };

    int g = 0;
    for (int i = 0; i < my_tiles; ++i) {
      const TileCoord tc = tile_coord(i);
      const int t0 = tc.t * kTileM;
      if (ctid < kTileM) {
        const int t = t0 + ctid;
        s.row_ok[ctid] = (t < p.T_len && keep(p.mask, tc.n, t)) ? 1 : 0;
      }
      clear(acc_gl);
      clear(acc_ar);
      warpgroup_fence_operand(acc_gl);
      warpgroup_fence_operand(acc_ar);
      for (int kt = 0; kt < kt_g; ++kt) k_step(acc_gl, g++, kt);        // GL = grads rows x left factor
      for (int kt = kt_g; kt < k_tiles; ++kt) k_step(acc_ar, g++, kt);  // AR = acts rows x right factor
      if constexpr (kInFlight > 0) {
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_gl);
        warpgroup_fence_operand(acc_ar);
        release(g - 1);
      }

      // Epilogue: the product tile (masked rows exact zeros) into shared memory, in CuTe's own
      // coordinates of each accumulator element, then folded in a fixed order.
      consumers_sync();  // this tile's row_ok written; the last tile's epilogue done everywhere
      CUTE_UNROLL
      for (int e = 0; e < size(acc_gl); ++e) {
        const int m = get<0>(coords(e)), c = get<1>(coords(e));
        s.prod[m][c] = s.row_ok[m] ? acc_gl(e) * acc_ar(e) : 0.0f;
      }
      consumers_sync();
      // Each query's Rp columns, in column order, per token row.
      const int qpt = kTileN / p.Rp;
      const int q0 = tc.c * qpt;
      for (int e = ctid; e < kTileM * qpt; e += kConsumers) {
        const int m = e / qpt, ql = e % qpt;
        float acc = 0.0f;
        for (int k = 0; k < p.Rp; ++k) acc += s.prod[m][ql * p.Rp + k];
        s.row_query[m][ql] = acc;
      }
      consumers_sync();
      if (p.per_token) {
        for (int e = ctid; e < kTileM * qpt; e += kConsumers) {
          const int m = e / qpt, ql = e % qpt;
          const int t = t0 + m, q = q0 + ql;
          if (t < p.T_len && q < p.Q) p.out[((int64_t)tc.n * p.T_len + t) * p.Q + q] = s.row_query[m][ql];
        }
      } else if (ctid < qpt && q0 + ctid < p.Q) {
        float acc = 0.0f;
        for (int m = 0; m < kTileM; ++m) acc += s.row_query[m][ctid];  // token rows in order
        if (p.tblocks == 1)
          p.out[(int64_t)tc.n * p.Q + q0 + ctid] = acc;
        else
          p.partials[((int64_t)tc.n * p.tblocks + tc.t) * p.Q + q0 + ctid] = acc;
      }
    }
  } else if (producer) {
    // kWs: the producer warpgroup's elected thread streams every step of every tile; a stage
    // is refilled once the consumers have released its previous use (step g - kStages).
    for (int g = 0; g < steps; ++g) {
      const int st = g % kStages;
      if (g >= kStages) EmptyBar::wait(&s.empty[st], ((g / kStages) - 1) & 1);
      issue(g, st);
    }
  }
#endif
}

// dst [Cp, ld] (16-bit) = the factor [Q, d, r] with each query's rank padded to Rp columns and
// the rows past Q * Rp zero. Block (c, y) writes row c, elements y * 256.. (coalesced writes,
// no 64-bit division per element).
template <class T>
__global__ void pad_factor_kernel(const T* __restrict__ src, int64_t s0, int64_t s1, int64_t s2, int64_t Q,
                                  int64_t d, int64_t R, int64_t Rp, int64_t ld, T* __restrict__ dst) {
  const int64_t c = blockIdx.x, k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= ld) return;
  const int64_t q = c / Rp, kr = c % Rp;
  dst[c * ld + k] = (q < Q && kr < R && k < d) ? src[q * s0 + k * s1 + kr * s2] : T(0.0f);
}

int64_t padded_rank(int64_t r) {  // callers check r <= kTileN first (Rp <= 128: at least one query per tile)
  int64_t rp = 8;
  while (rp < r) rp *= 2;
  return rp;
}

// Workspace: [packed factors: left Cp x ld_out, right Cp x ld_in][partials], or (factors packed
// once by the caller, pyinf_cuda_factored_scores_pack) the partials alone.
struct Sm90Plan {
  int64_t rp, cp, ld_out, ld_in, tblocks;
  size_t left_off, right_off, packed_bytes, partials_bytes;
};

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

Sm90Plan sm90_plan(const Dims& d, int per_token) {
  Sm90Plan p{};
  p.rp = padded_rank(d.r);
  const int64_t qpt = kTileN / p.rp;
  p.cp = (d.q + qpt - 1) / qpt * kTileN;
  p.ld_out = (d.d_out + 7) / 8 * 8;  // 16-byte rows for TMA
  p.ld_in = (d.d_in + 7) / 8 * 8;
  p.tblocks = (d.t + kTileM - 1) / kTileM;
  p.left_off = 0;
  p.right_off = align_up(static_cast<size_t>(p.cp * p.ld_out) * 2, 128);
  p.packed_bytes = align_up(p.right_off + static_cast<size_t>(p.cp * p.ld_in) * 2, 128);
  p.partials_bytes = (per_token || p.tblocks == 1) ? 0 : static_cast<size_t>(d.n * p.tblocks * d.q) * 4;
  return p;
}

// Whether TMA can read the token rows of x [N, T, d] (cuTensorMapEncodeTiled's rules, checked
// here because CuTe only asserts them, and not at all in a release build): a 16-byte aligned
// base, a contiguous last dimension, row and document strides that are multiples of 16 bytes,
// and a plain nested layout (rows and documents that do not overlap; no zero strides).
bool tma_rows_ok(const pyinf_tensor& x) {
  const int64_t n = x.shape[0], t = x.shape[1], d = x.shape[2], s0 = x.strides[0], s1 = x.strides[1];
  constexpr int64_t kMaxStride = (int64_t(1) << 40) / 2;  // TMA: global strides below 2^40 bytes (16-bit data)
  return (reinterpret_cast<uintptr_t>(x.data) & 15) == 0 && x.strides[2] == 1 && s1 % 8 == 0 && s0 % 8 == 0 &&
         s1 >= d && (n == 1 || s0 >= t * s1) && s0 > 0 && s1 > 0 && s0 < kMaxStride && s1 < kMaxStride;
}

// PYINF_NATIVE_SM90, read per call: "1", "wait0" or "ws" (Sm90Mode); anything else = off (-1).
int sm90_mode() {
  const char* v = std::getenv("PYINF_NATIVE_SM90");
  if (v == nullptr) return -1;
  const std::string s(v);
  return s == "1" ? kInFlight1 : s == "wait0" ? kWait0 : s == "ws" ? kWarpSpecialized : -1;
}

bool sm90_device() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

template <class T>
typename Sm90Types<T>::GmemTensor gmem(const void* data, int rows, int d, int batch, int64_t row_stride,
                                       int64_t batch_stride) {
  return make_tensor(make_gmem_ptr(static_cast<T const*>(data)),
                     make_layout(make_shape(rows, d, batch), GmemStride{row_stride, _1{}, batch_stride}));
}

// The factors [Q, d, r] into `packed` as [Cp, ld] each, K-major and rank-padded (Sm90Plan).
template <class T>
pyinf_status pack_typed(const pyinf_tensor* left, const pyinf_tensor* right, const Dims& d, void* packed,
                        cudaStream_t stream) {
  const Sm90Plan plan = sm90_plan(d, 1);
  char* base = static_cast<char*>(packed);
  pad_factor_kernel<T><<<dim3(static_cast<unsigned>(plan.cp), ceil_div(plan.ld_out, 256)), 256, 0, stream>>>(
      static_cast<const T*>(left->data), left->strides[0], left->strides[1], left->strides[2], d.q, d.d_out, d.r,
      plan.rp, plan.ld_out, reinterpret_cast<T*>(base + plan.left_off));
  pad_factor_kernel<T><<<dim3(static_cast<unsigned>(plan.cp), ceil_div(plan.ld_in, 256)), 256, 0, stream>>>(
      static_cast<const T*>(right->data), right->strides[0], right->strides[1], right->strides[2], d.q, d.d_in, d.r,
      plan.rp, plan.ld_in, reinterpret_cast<T*>(base + plan.right_off));
  return launch_check("factored_scores (sm90 factor copy)");
}

template <class T>
pyinf_status launch_typed(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                          const pyinf_tensor* right, const pyinf_tensor* mask, const Dims& d, int per_token,
                          float* out, const void* packed, void* workspace, int mode, cudaStream_t stream) {
  using Ty = Sm90Types<T>;
  const Sm90Plan plan = sm90_plan(d, per_token);
  char* ws = static_cast<char*>(workspace);
  float* partials = reinterpret_cast<float*>(packed != nullptr ? ws : ws + plan.packed_bytes);
  if (packed == nullptr) {  // pack into the workspace first (on every call)
    const pyinf_status status = pack_typed<T>(left, right, d, ws, stream);
    if (status != PYINF_SUCCESS) return status;
    packed = ws;
  }
  const T* left_p = reinterpret_cast<const T*>(static_cast<const char*>(packed) + plan.left_off);
  const T* right_p = reinterpret_cast<const T*>(static_cast<const char*>(packed) + plan.right_off);
  pyinf_status status = PYINF_SUCCESS;

  const int64_t lt = plan.cp * plan.ld_out, rt = plan.cp * plan.ld_in;

  Sm90Params<T> p;
  using SmemA = typename Ty::SmemLayoutA;
  using SmemB = typename Ty::SmemLayoutB;
  const int N = (int)d.n, Tn = (int)d.t, din = (int)d.d_in, dout = (int)d.d_out, cp = (int)plan.cp;
  p.tma_g = make_tma_copy_A_sm90(SM90_TMA_LOAD{}, gmem<T>(grads->data, Tn, dout, N, grads->strides[1], grads->strides[0]),
                                 SmemA{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
  p.tma_a = make_tma_copy_A_sm90(SM90_TMA_LOAD{}, gmem<T>(acts->data, Tn, din, N, acts->strides[1], acts->strides[0]),
                                 SmemA{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
  p.tma_l = make_tma_copy_B_sm90(SM90_TMA_LOAD{}, gmem<T>(left_p, cp, dout, 1, plan.ld_out, lt), SmemB{}(_, _, Int<0>{}),
                                 TileShape{}, ClusterShape{});
  p.tma_r = make_tma_copy_B_sm90(SM90_TMA_LOAD{}, gmem<T>(right_p, cp, din, 1, plan.ld_in, rt), SmemB{}(_, _, Int<0>{}),
                                 TileShape{}, ClusterShape{});
  p.T_len = Tn;
  p.d_out = dout;
  p.d_in = din;
  p.N = N;
  p.Q = (int)d.q;
  p.Rp = (int)plan.rp;
  p.Cp = cp;
  p.tblocks = (int)plan.tblocks;
  p.mask = mask_view(mask);
  p.per_token = per_token;
  p.out = out;
  p.partials = partials;

  static_assert(sizeof(typename Ty::SharedStorage) <= 227 * 1024, "over the H100's 227 KiB of shared memory per block");
  const int smem = static_cast<int>(sizeof(typename Ty::SharedStorage));
  auto sm90_kernel = mode == kWarpSpecialized ? factored_scores_sm90_kernel<T, kWarpSpecialized>
                    : mode == kWait0           ? factored_scores_sm90_kernel<T, kWait0>
                                               : factored_scores_sm90_kernel<T, kInFlight1>;
  status = cuda_check(cudaFuncSetAttribute(sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                      "factored_scores", "sm90 shared memory size");
  if (status != PYINF_SUCCESS) return status;
  // One CTA per tile, or (kWs) a persistent grid of one CTA per SM taking tiles round-robin.
  const int64_t tiles = plan.cp / kTileN * plan.tblocks * d.n;
  int64_t grid = tiles;
  if (mode == kWarpSpecialized) {
    int dev = 0, sms = 0;
    status = cuda_check(cudaGetDevice(&dev), "factored_scores", "cudaGetDevice");
    if (status == PYINF_SUCCESS)
      status = cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "factored_scores",
                          "SM count");
    if (status != PYINF_SUCCESS) return status;
    if (sms > 0 && sms < grid) grid = sms;
    // Tests cap the grid to give every CTA several tiles at small shapes.
    const char* cap = std::getenv("PYINF_NATIVE_SM90_CTAS");
    if (cap != nullptr && std::atoi(cap) > 0 && std::atoi(cap) < grid) grid = std::atoi(cap);
  }
  sm90_kernel<<<static_cast<unsigned>(grid), block_threads(mode), smem, stream>>>(p);
  status = launch_check("factored_scores (sm90)");
  if (status != PYINF_SUCCESS || per_token || plan.tblocks == 1) return status;
  return launch_sum_splits(partials, d.n, plan.tblocks, d.q, out, stream, "factored_scores (sm90 token tiles)");
}

}  // namespace

bool factored_scores_sm90_packable(const pyinf_tensor* left, const pyinf_tensor* right, const Dims& d) {
  if (sm90_mode() < 0 || !use_tensor_cores(true)) return false;
  if (!is_16bit(left) || right->dtype != left->dtype) return false;
  if (d.d_in < 1 || d.d_out < 1 || d.r < 1 || d.r > kTileN || (d.d_in + 255) / 256 > 65535 ||
      (d.d_out + 255) / 256 > 65535)  // the factor copy's grid
    return false;
  // int indices; cp >= Q, and Q is bounded first so that the plan's Q * padded rank cannot overflow
  if (d.q > 0x7fffffffLL || sm90_plan(d, 1).cp > 0x7fffffffLL) return false;
  return sm90_device();
}

bool factored_scores_sm90_applicable(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                     const pyinf_tensor* right, const Dims& d) {
  const pyinf_dtype dt = left->dtype;
  if (acts->dtype != dt || grads->dtype != dt || d.t < 1 || d.t > 0x7fffffffLL) return false;
  if (!tma_rows_ok(*acts) || !tma_rows_ok(*grads)) return false;
  if (!factored_scores_sm90_packable(left, right, d)) return false;  // (checks r <= 128 before any plan)
  const Sm90Plan plan = sm90_plan(d, 0);
  const int64_t tiles = plan.cp / kTileN * plan.tblocks * d.n;
  // int tile indices, and int K-step counters: a CTA runs up to all tiles' K steps (grid of one)
  const int64_t k_steps = (d.d_out + kTileK - 1) / kTileK + (d.d_in + kTileK - 1) / kTileK;
  return tiles <= 0x7fffffffLL && tiles * k_steps <= 0x7fffffffLL;
}

size_t factored_scores_sm90_packed_bytes(const Dims& d) { return sm90_plan(d, 1).packed_bytes; }

size_t factored_scores_sm90_workspace_bytes(const Dims& d, int per_token, bool packed) {
  const Sm90Plan plan = sm90_plan(d, per_token);
  return (packed ? 0 : plan.packed_bytes) + plan.partials_bytes;
}

pyinf_status pack_factors_sm90(const pyinf_tensor* left, const pyinf_tensor* right, const Dims& d, void* packed,
                               cudaStream_t stream) {
  if (left->dtype == PYINF_BFLOAT16) return pack_typed<cutlass::bfloat16_t>(left, right, d, packed, stream);
  return pack_typed<cutlass::half_t>(left, right, d, packed, stream);
}

pyinf_status launch_factored_scores_sm90(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                         const pyinf_tensor* right, const pyinf_tensor* mask, const Dims& d,
                                         int per_token, float* out, const void* packed, void* workspace,
                                         cudaStream_t stream) {
  const int mode = sm90_mode();
  if (acts->dtype == PYINF_BFLOAT16)
    return launch_typed<cutlass::bfloat16_t>(acts, grads, left, right, mask, d, per_token, out, packed, workspace,
                                             mode, stream);
  return launch_typed<cutlass::half_t>(acts, grads, left, right, mask, d, per_token, out, packed, workspace, mode,
                                       stream);
}

}  // namespace cuda
}  // namespace pyinf

#endif  // PYINF_WITH_SM90
