// Shared pieces of the tensor-core (WMMA, sm_80+) kernels: 4 warps per 64 x 64 tile, each
// warp owning 32 x 32 as 2 x 2 accumulator fragments of 16 x 16.
#pragma once

#include <mma.h>

#include "kernels_common.cuh"

namespace pyinf {
namespace cuda {

constexpr int TC_THREADS = 128;  // 4 warps: warp w owns rows (w / 2) * 32, columns (w % 2) * 32

// acc[i][j] += A_i B_j for one K step: A_0, A_1 are the fragments at a0, a1 and B_0, B_1
// those at b0, b1 (shared-memory pointers to each fragment's first element; leading
// dimensions lda, ldb).
template <typename FragA, typename FragB, typename FragC, typename T>
__device__ __forceinline__ void warp_mma_2x2(FragC (&acc)[2][2], const T* a0, const T* a1, unsigned lda,
                                             const T* b0, const T* b1, unsigned ldb) {
  FragA fa[2];
  FragB fb[2];
  nvcuda::wmma::load_matrix_sync(fa[0], a0, lda);
  nvcuda::wmma::load_matrix_sync(fa[1], a1, lda);
  nvcuda::wmma::load_matrix_sync(fb[0], b0, ldb);
  nvcuda::wmma::load_matrix_sync(fb[1], b1, ldb);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
}

template <typename FragC>
__device__ __forceinline__ void fill_2x2(FragC (&f)[2][2], float v) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(f[i][j], v);
}

// The warp's fragments into a row-major fp32 tile in shared memory (leading dimension LD).
template <int LD, typename FragC>
__device__ __forceinline__ void store_2x2(float (*tile)[LD], FragC (&f)[2][2], int wm, int wn) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(&tile[wm * 32 + i * 16][wn * 32 + j * 16], f[i][j], LD,
                                      nvcuda::wmma::mem_row_major);
}

}  // namespace cuda
}  // namespace pyinf
