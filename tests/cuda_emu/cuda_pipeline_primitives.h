// Emulated cuda_pipeline_primitives.h (asynchronous global -> shared copies, cp.async, sm_80+):
// the three primitives the kernels use, with the real header's argument rules checked (size
// 4, 8 or 16; zfill <= size; both pointers aligned to the size; the destination in shared
// memory) and the copies deferred to the __pipeline_wait_prior that retires their group
// (emu_runtime.cpp). This directory comes first on the include path, so a kernel's
// `#include <cuda_pipeline_primitives.h>` gets this file.
#pragma once

#include <cstddef>

namespace emu {
void pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill);
void pipeline_commit();
void pipeline_wait_prior(size_t prior);
}  // namespace emu

inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                    size_t size_and_align, size_t zfill = 0) {
  ::emu::pipeline_memcpy_async(dst_shared, src_global, size_and_align, zfill);
}
inline void __pipeline_commit() { ::emu::pipeline_commit(); }
inline void __pipeline_wait_prior(size_t prior) { ::emu::pipeline_wait_prior(prior); }
