// CPU emulation of the part of the CUDA runtime that csrc/cuda/*.cu uses, for compiling
// those sources UNMODIFIED with g++ (see emulate.py, which also rewrites the <<<...>>>
// launches into emu::launch(...) calls). This directory must come first on the include
// path so that `#include <cuda_runtime.h>` and `#include <mma.h>` resolve here; the real
// CUDA headers (after it) provide the types: cuda_runtime_api.h / driver_types.h
// (cudaError_t, cudaStream_t; declarations only: the few functions used are defined in
// emu_runtime.cpp, no libcudart), vector_types.h (dim3, uint3, uint4), cuda_bf16.h /
// cuda_fp16.h (host conversions).
//
// Execution model (emu::launch): the blocks of a grid run one after another, in a shuffled
// order that differs between launches; each block runs blockDim.x*y*z threads concurrently. __shared__ is `static`: all threads of the
// running block share the function-local arrays, exactly as shared memory, and every array
// seen so far is poisoned (NaN for floating types, 0x7f7f... for integers) before each
// block starts, so a read of shared memory not written by the current block shows up.
// __syncthreads() is a barrier over the block's threads (a thread that returns from the
// kernel leaves the barrier); a barrier not reached by the other threads within the
// timeout is reported as a launch failure.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- keywords ---------------------------------------------------------------------------
// crt/host_defines.h (pulled in above) defines these as empty annotations for a non-CUDA
// compiler; make the ones with a meaning here explicit.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __align__
#define __align__(n) __attribute__((aligned(n)))
#undef __grid_constant__
#define __grid_constant__

namespace emu {

// Per-thread built-ins, set by the launcher.
extern thread_local uint3 t_threadIdx;
extern thread_local uint3 t_blockIdx;
extern thread_local dim3 t_blockDim;
extern thread_local dim3 t_gridDim;

void syncthreads();  // block barrier of the calling emulated thread
int lane_id();       // linear thread index % 32
int warp_id();       // linear thread index / 32
void warp_sync();    // barrier over the calling thread's warp
// Per-warp scratch for warp collectives (wmma::mma_sync): `slot` 0 or 1, 1024 floats each.
float* warp_scratch(int slot);
// Alternating slot of the calling thread's next warp collective (double buffering: one
// warp barrier per collective is enough, see mma.h).
int next_warp_slot();

// Shared-memory poisoning: the preprocessed sources call EMU_SHARED(arr) after each
// __shared__ declaration; the launcher fills every registered array before each block.
void register_shared(void* p, size_t bytes, unsigned char poison);

template <typename A>
inline void shared_array(A& arr) {
  using E = std::remove_cv_t<std::remove_all_extents_t<A>>;
  constexpr bool integral = std::is_integral_v<E>;
  register_shared(static_cast<void*>(&arr), sizeof(A), integral ? 0x7f : 0xff);
}

// "Device memory" check: when the tests have registered the buffers they pass (every
// tensor, output and workspace), each pointer a kernel receives, directly or as the `p`
// member of a by-value struct (View3, View2, MaskView), must be null or inside one of them;
// a pointer to host-only memory (a host temporary, a struct on the host stack) would fault
// on a GPU but not here, so it fails the launch instead.
bool device_pointer_ok(const void* p);
void fail_launch(const char* name, const std::string& why);  // sets the error, logs, runs nothing

template <typename T, typename = void>
struct has_ptr_member : std::false_type {};
template <typename T>
struct has_ptr_member<T, std::void_t<decltype(std::declval<const T&>().p)>>
    : std::is_pointer<decltype(std::declval<const T&>().p)> {};

// A by-value table of pointers (FactoredGroup) lists them through for_each_device_pointer.
struct PointerVisitor {
  void operator()(const void*) const {}
};
template <typename T, typename = void>
struct lists_pointers : std::false_type {};
template <typename T>
struct lists_pointers<T, std::void_t<decltype(std::declval<const T&>().for_each_device_pointer(PointerVisitor{}))>>
    : std::true_type {};

template <typename T>
inline bool kernel_arg_ok(const T& a) {
  if constexpr (std::is_pointer_v<T>) {
    return device_pointer_ok(static_cast<const void*>(a));
  } else if constexpr (has_ptr_member<T>::value) {
    return device_pointer_ok(static_cast<const void*>(a.p));
  } else if constexpr (lists_pointers<T>::value) {
    bool ok = true;
    a.for_each_device_pointer([&ok](const void* p) { ok = ok && device_pointer_ok(p); });
    return ok;
  } else {
    return true;
  }
}

// Dynamic shared memory (`extern __shared__ T name[];`, rewritten by emulate.py into a call
// of this): the running block's buffer of the launch's `smem` bytes, 1024-byte aligned and
// poisoned (0xff) before every block. `align` is the declaration's __align__.
void* dynamic_smem(size_t align);
size_t dynamic_smem_bytes();
// For the Hopper emulation (emu_sm90.cpp): named barriers (bar.sync id, threads), a per-block
// state object made on first use, whether a thread of the block failed, a check run by every
// thread when it leaves the kernel (it may throw), the calling thread's linear index.
void named_barrier(uint32_t id, uint32_t threads);
void* block_state(void* (*make)(), void (*destroy)(void*));
bool block_failed();
void set_thread_exit_check(void (*check)());
int linear_thread();

// Launcher. Checks the launch configuration like the runtime (a bad one sets the error
// cudaGetLastError returns and runs nothing; dynamic shared memory over 48 KiB needs
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize) first), then
// runs the blocks.
void run_grid(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
              void (*body)(void*), void* closure);

template <typename K, typename... A>
void launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, K kernel, A... args) {
  // The runtime's limit on a launch's parameters (CUDA 12.1+ on sm_70+; 4 KiB before).
  constexpr size_t param_bytes = (sizeof(A) + ... + 0);
  if (param_bytes > 32764) {
    fail_launch(name, std::to_string(param_bytes) + " bytes of kernel parameters, over the 32764 CUDA allows");
    return;
  }
  int bad = 0, i = 0;
  ((bad = bad ? bad : (kernel_arg_ok(args) ? 0 : i + 1), ++i), ...);
  if (bad) {
    fail_launch(name, "kernel argument " + std::to_string(bad - 1) +
                          " is a pointer outside every registered device buffer (host memory on a GPU)");
    return;
  }
  struct Closure {
    K kernel;
    std::tuple<A...> args;
  } c{kernel, std::tuple<A...>(args...)};
  run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
           [](void* p) {
             Closure* cl = static_cast<Closure*>(p);
             // Each thread gets its own copy of the parameters, as kernel parameters are.
             std::tuple<A...> mine = cl->args;
             std::apply(cl->kernel, mine);
           },
           &c);
}

}  // namespace emu

#define threadIdx (::emu::t_threadIdx)
#define blockIdx (::emu::t_blockIdx)
#define blockDim (::emu::t_blockDim)
#define gridDim (::emu::t_gridDim)

inline void __syncthreads() { ::emu::syncthreads(); }

// cuda_runtime.h's template overload (this header replaces it): kernels by their pointer.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#define EMU_SHARED(arr) ::emu::shared_array(arr)
