// CPU emulation of the nvcuda::wmma API (the subset csrc/cuda/*.cu uses, plus the checks
// the real API documents for it). See cuda_runtime.h for the execution model.
//
// Fragments: each emulated thread holds x[num_elements], num_elements = (rows * cols of
// the operand) / 32, as on the hardware for the shapes used here. Element mapping (an
// implementation choice; the real one is unspecified): lane l holds the linear indices
// l*E .. l*E+E-1 of the operand in ROW-MAJOR logical order (A: M x K, B: K x N,
// accumulator: M x N), whatever the memory layout it was loaded from. Fragments of one
// type therefore share their mapping, which is all the kernels rely on.
//
// mma_sync is a warp collective: each lane writes its A and B elements into a per-warp
// scratch area of the running block, a barrier over the 32 lanes, then each lane computes
// its own D elements from the full A and B (products summed in k order into the lane's C
// element in fp32 with fmaf; bf16 / fp16 operands widened exactly to float; tf32 operands
// TRUNCATED to 10 mantissa bits, the hardware ignoring the low 13 bits). Two scratch slots
// alternate, so one barrier per collective suffices. load / store / fill need no
// communication. Pointer (32-byte) and ldm (16-byte multiple) requirements of the real API
// are checked and a violation fails the launch.
#pragma once

#include "cuda_runtime.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision

enum layout_t { mem_row_major, mem_col_major };

inline float __float_to_tf32(float in) {
  // cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa.
  if (!std::isfinite(in)) return in;
  uint32_t u;
  std::memcpy(&u, &in, 4);
  u += 0x1000u;  // half an ulp of the 10-bit mantissa, in magnitude (sign-magnitude: ties away)
  u &= 0xffffe000u;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

namespace detail {

template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename T>
inline float widen(const T& v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return static_cast<float>(v);
}

template <typename T>
inline T narrow(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(v);
  else if constexpr (std::is_same_v<T, __half>) return __float2half(v);
  else return v;
}

inline float tf32_truncate(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u &= 0xffffe000u;  // keep Inf / NaN as they are
  std::memcpy(&v, &u, 4);
  return v;
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("wmma emulation: " + what); }

inline void check_ptr_ldm(const void* p, unsigned ldm, size_t elem_bytes, const char* fn) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    fail(std::string(fn) + ": pointer not 256-bit aligned");
  if ((static_cast<size_t>(ldm) * elem_bytes) % 16 != 0)
    fail(std::string(fn) + ": ldm is not a multiple of 16 bytes");
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert((std::is_same_v<T, precision::tf32> && M == 16 && N == 16 && K == 8) ||
                    ((std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) &&
                     ((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                      (M == 8 && N == 32 && K == 16))) ||
                    (std::is_same_v<Use, accumulator> && std::is_same_v<T, float>),
                "wmma emulation: fragment shape / type not supported by the hardware API");
  static_assert(std::is_same_v<Use, accumulator> == std::is_same_v<Layout, void>,
                "wmma emulation: matrix_a / matrix_b need a layout, accumulators take none");

 public:
  using element_type = T;
  using storage_element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::dims<Use, M, N, K>::rows;
  static constexpr int cols = detail::dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  storage_element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  using S = typename fragment<Use, M, N, K, T, Layout>::storage_element_type;
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = detail::narrow<S>(detail::widen(v));
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                             const typename fragment<Use, M, N, K, T, Layout>::storage_element_type* p,
                             unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads need a layout_t");
  using F = fragment<Use, M, N, K, T, Layout>;
  detail::check_ptr_ldm(p, ldm, sizeof(*p), "load_matrix_sync");
  const int lane = ::emu::lane_id();
  for (int e = 0; e < F::num_elements; ++e) {
    const int idx = lane * F::num_elements + e, i = idx / F::cols, j = idx % F::cols;
    f.x[e] = std::is_same_v<Layout, row_major> ? p[static_cast<size_t>(i) * ldm + j]
                                                : p[static_cast<size_t>(j) * ldm + i];
  }
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  detail::check_ptr_ldm(p, ldm, sizeof(float), "load_matrix_sync");
  const int lane = ::emu::lane_id();
  for (int e = 0; e < F::num_elements; ++e) {
    const int idx = lane * F::num_elements + e, i = idx / F::cols, j = idx % F::cols;
    f.x[e] = layout == mem_row_major ? p[static_cast<size_t>(i) * ldm + j] : p[static_cast<size_t>(j) * ldm + i];
  }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  detail::check_ptr_ldm(p, ldm, sizeof(float), "store_matrix_sync");
  const int lane = ::emu::lane_id();
  for (int e = 0; e < F::num_elements; ++e) {
    const int idx = lane * F::num_elements + e, i = idx / F::cols, j = idx % F::cols;
    (layout == mem_row_major ? p[static_cast<size_t>(i) * ldm + j] : p[static_cast<size_t>(j) * ldm + i]) = f.x[e];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c,
                     bool satf = false) {
  using FA = fragment<matrix_a, M, N, K, T, LA>;
  using FB = fragment<matrix_b, M, N, K, T, LB>;
  using FC = fragment<accumulator, M, N, K, float>;
  static_assert(M * K + K * N <= 1024, "scratch too small");
  if (satf) detail::fail("mma_sync: satf is not emulated");
  const int lane = ::emu::lane_id();
  float* s = ::emu::warp_scratch(::emu::next_warp_slot());
  float* sa = s;          // A, M x K row-major
  float* sb = s + M * K;  // B, K x N row-major
  for (int e = 0; e < FA::num_elements; ++e) {
    const float v = detail::widen(a.x[e]);
    sa[lane * FA::num_elements + e] = std::is_same_v<T, precision::tf32> ? detail::tf32_truncate(v) : v;
  }
  for (int e = 0; e < FB::num_elements; ++e) {
    const float v = detail::widen(b.x[e]);
    sb[lane * FB::num_elements + e] = std::is_same_v<T, precision::tf32> ? detail::tf32_truncate(v) : v;
  }
  ::emu::warp_sync();
  float out[FC::num_elements];
  for (int e = 0; e < FC::num_elements; ++e) {
    const int idx = lane * FC::num_elements + e, i = idx / N, j = idx % N;
    float acc = c.x[e];
    for (int k = 0; k < K; ++k) acc = std::fmaf(sa[i * K + k], sb[k * N + j], acc);
    out[e] = acc;
  }
  for (int e = 0; e < FC::num_elements; ++e) d.x[e] = out[e];  // d may be c
}

}  // namespace wmma
}  // namespace nvcuda
