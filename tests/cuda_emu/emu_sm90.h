// The Hopper instructions of csrc/cuda/factored_scores_sm90.cu, emulated on the CPU
// (emu_sm90.cpp). sm90_overlay.py patches CuTe's / CUTLASS's inline-PTX branches into calls
// of these; this header is force-included (after cuda_runtime.h) in that one unit.
//
// Execution model, on top of cuda_runtime.h's (a block's threads run concurrently):
//  * shared memory is the launch's dynamic shared memory, one buffer per block, poisoned
//    (0xff bytes: NaN in bf16 / fp16 / fp32) before each block; its "shared addresses"
//    (cast_smem_ptr_to_uint, wgmma descriptors, TMA destinations) are offsets into it;
//  * an mbarrier lives beside the shared word it is declared in: arrival count, pending
//    arrivals, transaction bytes and phase, as the PTX ISA describes them; waits block
//    (with the emulation's barrier timeout) until the phase of the given parity completed;
//  * a TMA load (cp.async.bulk.tensor) runs when issued: it reads the box from global
//    memory as the tensor map says (zeros out of bounds), writes it to shared memory with
//    the map's swizzle, then completes its bytes on the mbarrier;
//  * a wgmma (mma_async, both operands in shared memory) is queued when issued and runs only
//    when wgmma.wait_group retires its group: it reads shared memory THEN, so a stage that
//    is refilled before the wgmma reading it has been waited for gives wrong results, as it
//    may on the GPU. When it is issued, the shared memory it will read must hold TMA data
//    whose mbarrier phase the issuing thread has seen complete (a wait that returned after
//    it): a wgmma issued before waiting for its stage is an error, whatever the timing. The
//    threads of a warpgroup must issue the same sequence of wgmma (descriptors, scale-d),
//    as the instruction is warpgroup-wide (.sync.aligned). Each thread computes its own 64 accumulator elements from the PTX ISA's
//    fragment layout, decoding the matrix descriptors (start address, strides, swizzle)
//    itself: CuTe's layouts are checked against the ISA, not against themselves.
#pragma once

#include <cstddef>
#include <cstdint>

namespace emu {

int warp_id();
void named_barrier(uint32_t id, uint32_t threads);  // bar.sync id, threads

namespace sm90 {

uint32_t smem_addr(const void* p);  // shared-window address of a pointer into shared memory
bool elect_one();                   // elect.sync: lane 0 of the calling warp

void mbar_init(const void* bar, uint32_t arrivals);
void mbar_arrive(const void* bar, uint32_t expect_tx_bytes);  // mbarrier.arrive[.expect_tx]
void mbar_wait(const void* bar, uint32_t parity);
bool mbar_try_wait(const void* bar, uint32_t parity);

void tma_prefetch(const void* desc);
void tma_load(const void* desc, void* mbar, void* smem, int rank, const int32_t* crd);

void wgmma_fence();         // wgmma.fence
void wgmma_commit();        // wgmma.commit_group
void wgmma_wait(int keep);  // wgmma.wait_group keep
// wgmma.mma_async.m{M}n{N}k{K}.f32.{dtype} with both operands in shared memory: dtype 1 bf16,
// 2 fp16; d: this thread's M*N/128 accumulators.
void wgmma_ss(int dtype, int M, int N, int K, uint64_t desc_a, uint64_t desc_b, float* const* d, int scale_d,
              int scale_a, int scale_b, int tnsp_a, int tnsp_b);

}  // namespace sm90
}  // namespace emu
