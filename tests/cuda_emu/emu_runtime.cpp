// CPU emulation of the CUDA runtime pieces used by csrc/cuda (see cuda_runtime.h): the
// launcher, block / warp barriers, shared-memory poisoning, the last-error state and the
// few cudart functions the sources call. Also exports pyinf_emu_* hooks for the tests
// (launch log, failures of emulated threads).
#include "cuda_runtime.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define EMU_API extern "C" __attribute__((visibility("default")))

namespace emu {

thread_local uint3 t_threadIdx;
thread_local uint3 t_blockIdx;
thread_local dim3 t_blockDim;
thread_local dim3 t_gridDim;

namespace {

std::chrono::seconds barrier_timeout() {
  static const std::chrono::seconds t = [] {
    const char* v = std::getenv("PYINF_EMU_BARRIER_TIMEOUT");
    return std::chrono::seconds(v && std::atoi(v) > 0 ? std::atoi(v) : 60);
  }();
  return t;
}

// A reusable barrier; a participant that leaves (kernel return, exception) drops out.
// Lock-free state (expected << 32 | arrived) and a futex on the generation counter, so
// that the waiters of a completed phase wake without contending for a lock (hundreds of
// threads on two cores). Waits time out: a barrier that the other threads never reach is
// reported instead of hanging the tests.
class Barrier {
 public:
  void init(int n) {
    initial_ = n;
    state_.store(static_cast<uint64_t>(n) << 32);
  }

  void arrive_and_wait(const char* what) {
    const uint32_t g = gen_.load(std::memory_order_acquire);
    const uint64_t left = initial_ - (state_.load(std::memory_order_acquire) >> 32);
    if (left != 0)  // CUDA requires every thread of the block (warp) to reach the barrier
      throw std::runtime_error(std::string(what) + " reached after " + std::to_string(left) +
                               " thread(s) of the block (warp) returned: divergent barrier");
    if (update(+1)) return;
    const auto deadline = std::chrono::steady_clock::now() + barrier_timeout();
    while (gen_.load(std::memory_order_acquire) == g) {
      const auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::nanoseconds(0)) {
        if (leave_phase(g)) return;  // completed just now
        throw std::runtime_error(std::string(what) + ": not reached by the other threads within the timeout "
                                 "(divergent barrier or deadlock)");
      }
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, g, &ts, nullptr, 0);
    }
  }

  // Returns true if other threads were waiting at the barrier when this one left: they
  // wait for a barrier this thread never reaches (divergent barrier).
  bool drop() {
    const bool waiting = (state_.load(std::memory_order_acquire) & 0xffffffffu) != 0;
    update(-1);
    return waiting;
  }

 private:
  // +1: arrive; -1: leave for good. Returns true if this call completed the phase.
  bool update(int op) {
    uint64_t old = state_.load(std::memory_order_acquire), nw;
    bool complete;
    do {
      uint64_t expected = old >> 32, arrived = old & 0xffffffffu;
      if (op > 0) ++arrived; else --expected;
      complete = arrived > 0 && arrived >= expected;
      nw = (expected << 32) | (complete ? 0 : arrived);
    } while (!state_.compare_exchange_weak(old, nw, std::memory_order_acq_rel, std::memory_order_acquire));
    if (complete) {
      gen_.fetch_add(1, std::memory_order_acq_rel);
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
    }
    return complete;
  }
  // Withdraw this thread's arrival of phase g after a timeout; false if the phase is still
  // open (the arrival was withdrawn), true if it completed meanwhile.
  bool leave_phase(uint32_t g) {
    uint64_t old = state_.load(std::memory_order_acquire);
    while (true) {
      if (gen_.load(std::memory_order_acquire) != g) return true;
      if ((old & 0xffffffffu) == 0) return true;  // completing right now
      if (state_.compare_exchange_weak(old, old - 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return false;
    }
  }
  std::atomic<uint64_t> state_{0};
  std::atomic<uint32_t> gen_{0};
  uint64_t initial_ = 0;
};

struct BlockCtx {
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> scratch;  // per warp: 2 slots of 1024 floats
  std::mutex fail_m;
  std::string failure;
  std::vector<const void*> shared_seen;  // __shared__ arrays declared by this block's threads
  size_t shared_bytes = 0;

  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> l(fail_m);
    if (failure.empty()) failure = msg;
  }
};

thread_local BlockCtx* t_ctx = nullptr;
thread_local int t_linear = 0;
thread_local int t_slot = 0;

BlockCtx& ctx() {
  if (t_ctx == nullptr) throw std::runtime_error("device built-in called outside an emulated kernel");
  return *t_ctx;
}

struct SharedArray {
  void* p;
  size_t bytes;
  unsigned char poison;
};
std::mutex g_shared_m;
std::vector<SharedArray> g_shared;

std::mutex g_log_m;
std::string g_launch_log;       // "name grid=(x,y,z) block=(x,y,z);" per launch
std::string g_failures;         // messages of failed launches
long long g_failure_count = 0;
long long g_threads_run = 0;

thread_local cudaError_t g_last_error = cudaSuccess;  // per host thread, as in the runtime

void log_failure(const std::string& msg) {
  std::lock_guard<std::mutex> l(g_log_m);
  ++g_failure_count;
  if (g_failures.size() < 20000) g_failures += msg + "\n";
}

}  // namespace

void syncthreads() { ctx().block.arrive_and_wait("__syncthreads"); }

int lane_id() { return t_linear % 32; }
int warp_id() { return t_linear / 32; }

void warp_sync() { ctx().warps.at(t_linear / 32)->arrive_and_wait("warp collective"); }

float* warp_scratch(int slot) { return ctx().scratch.data() + (static_cast<size_t>(t_linear / 32) * 2 + slot) * 1024; }

int next_warp_slot() {
  const int s = t_slot;
  t_slot ^= 1;
  return s;
}

void register_shared(void* p, size_t bytes, unsigned char poison) {
  {
    BlockCtx& c = ctx();
    std::lock_guard<std::mutex> l(c.fail_m);
    bool seen = false;
    for (const void* q : c.shared_seen) seen = seen || q == p;
    if (!seen) {
      c.shared_seen.push_back(p);
      c.shared_bytes += bytes;
    }
  }
  std::lock_guard<std::mutex> l(g_shared_m);
  for (const SharedArray& a : g_shared)
    if (a.p == p) return;
  g_shared.push_back({p, bytes, poison});
}

namespace {
std::mutex g_ranges_m;
std::vector<std::pair<uintptr_t, uintptr_t>> g_ranges;  // registered "device" buffers [begin, end)
}  // namespace

bool device_pointer_ok(const void* p) {
  std::lock_guard<std::mutex> l(g_ranges_m);
  if (g_ranges.empty() || p == nullptr) return true;
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  for (const auto& r : g_ranges)
    if (u >= r.first && u <= r.second) return true;  // one past the end: an empty buffer
  return false;
}

void fail_launch(const char* name, const std::string& why) {
  g_last_error = cudaErrorLaunchFailure;
  {
    std::lock_guard<std::mutex> l(g_log_m);
    g_launch_log += std::string(name) + " NOT RUN;";
  }
  log_failure(std::string(name) + ": " + why);
}

namespace {

struct ThreadArgs {
  BlockCtx* c;
  int t;
  uint3 bidx;
  dim3 grid, block;
  void (*body)(void*);
  void* closure;
};

void* thread_main(void* p) {
  const ThreadArgs& a = *static_cast<ThreadArgs*>(p);
  BlockCtx& c = *a.c;
  t_threadIdx = uint3{a.t % a.block.x, (a.t / a.block.x) % a.block.y, a.t / (a.block.x * a.block.y)};
  t_blockIdx = a.bidx;
  t_blockDim = a.block;
  t_gridDim = a.grid;
  t_ctx = &c;
  t_linear = a.t;
  t_slot = 0;
  try {
    a.body(a.closure);
  } catch (const std::exception& e) {
    c.fail(e.what());
  } catch (...) {
    c.fail("unknown exception");
  }
  if (c.block.drop()) c.fail("a thread returned from the kernel while others wait at __syncthreads (divergent barrier)");
  if (c.warps[a.t / 32]->drop()) c.fail("a thread returned from the kernel while its warp waits in a collective");
  t_ctx = nullptr;
  return nullptr;
}

}  // namespace

constexpr size_t kStaticSharedLimit = 48 * 1024;

void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void (*body)(void*),
              void* closure) {
  (void)stream;
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  // Log entry "name grid=(x,y,z) block=(x,y,z) smem=<static shared bytes>;", written when
  // the launch ends (smem: the largest sum of the __shared__ arrays one block declared).
  size_t smem_static = 0;
  struct LogEntry {
    std::string text;
    const size_t& smem;
    ~LogEntry() {
      std::lock_guard<std::mutex> l(g_log_m);
      g_launch_log += text + " smem=" + std::to_string(smem) + ";";
    }
  } entry{std::string(name) + " grid=(" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
              std::to_string(grid.z) + ") block=(" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
              std::to_string(block.z) + ")",
          smem_static};
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || smem > 0) {
    // (no kernel here uses dynamic shared memory; a nonzero request would be unexpected)
    g_last_error = cudaErrorInvalidConfiguration;
    log_failure(std::string(name) + ": invalid launch configuration");
    return;
  }
  const int n = static_cast<int>(nthreads);
  const int nwarps = (n + 31) / 32;
  // CUDA does not order the blocks of a grid: run them in a shuffled order, a different one
  // per launch (PYINF_EMU_BLOCK_ORDER=linear: x fastest, then y, z), so that a result that
  // depends on the order (blocks writing the same element, reading another block's output)
  // shows up as a wrong or non-reproducible result.
  const uint64_t nblocks = 1ull * grid.x * grid.y * grid.z;
  if (nblocks > (1ull << 24)) {
    g_last_error = cudaErrorLaunchFailure;
    log_failure(std::string(name) + ": more blocks than the emulation runs (" + std::to_string(nblocks) + ")");
    return;
  }
  std::vector<uint64_t> order(nblocks);
  for (uint64_t b = 0; b < nblocks; ++b) order[b] = b;
  static std::atomic<uint64_t> launches{0};
  const char* ord = std::getenv("PYINF_EMU_BLOCK_ORDER");
  if (!(ord && std::string(ord) == "linear")) {
    std::mt19937_64 rng(0x9e3779b97f4a7c15ull * (launches.fetch_add(1) + 1));
    std::shuffle(order.begin(), order.end(), rng);
  }
  for (const uint64_t b : order) {
    const unsigned bx = static_cast<unsigned>(b % grid.x), by = static_cast<unsigned>((b / grid.x) % grid.y),
                   bz = static_cast<unsigned>(b / (1ull * grid.x * grid.y));
    {  // poison all shared arrays seen so far: no block may read what it did not write
      std::lock_guard<std::mutex> l(g_shared_m);
      for (const SharedArray& a : g_shared) std::memset(a.p, a.poison, a.bytes);
    }
    BlockCtx c;
    c.block.init(n);
    for (int w = 0; w < nwarps; ++w) {
      c.warps.push_back(std::make_unique<Barrier>());
      c.warps.back()->init(w + 1 < nwarps ? 32 : n - 32 * w);
    }
    c.scratch.assign(static_cast<size_t>(nwarps) * 2 * 1024, 0.0f);
    // pthreads with small stacks (the kernels' frames are a few KiB): glibc then reuses
    // the stacks of the previous block instead of mapping 8 MiB per thread.
    std::vector<ThreadArgs> args(n);
    std::vector<pthread_t> threads;
    threads.reserve(n);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (int t = 0; t < n; ++t) {
      args[t] = ThreadArgs{&c, t, uint3{bx, by, bz}, grid, block, body, closure};
      pthread_t th;
      const int rc = pthread_create(&th, &attr, thread_main, &args[t]);
      if (rc != 0) {  // could not start the thread: it never runs
        c.fail("pthread_create failed: " + std::string(std::strerror(rc)));
        c.block.drop();
        c.warps[t / 32]->drop();
      } else {
        threads.push_back(th);
      }
    }
    pthread_attr_destroy(&attr);
    for (pthread_t th : threads) pthread_join(th, nullptr);
    {
      std::lock_guard<std::mutex> l(g_log_m);
      g_threads_run += static_cast<long long>(threads.size());
    }
    smem_static = std::max(smem_static, c.shared_bytes);
    if (c.shared_bytes > kStaticSharedLimit)
      c.fail("static shared memory " + std::to_string(c.shared_bytes) + " bytes > the 48 KiB static limit");
    if (!c.failure.empty()) {
      g_last_error = cudaErrorLaunchFailure;
      log_failure(std::string(name) + " block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                  std::to_string(bz) + "): " + c.failure);
      return;  // the rest of the grid is abandoned, as after a device fault
    }
  }
}

}  // namespace emu

// ---- cudart functions used by the sources (declared by the real cuda_runtime_api.h) -------

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown(emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated kernel thread failed)";
    default: return "unknown error (emulated)";
  }
}

cudaError_t cudaMemsetAsync(void* devPtr, int value, size_t count, cudaStream_t stream) {
  (void)stream;
  if (devPtr == nullptr && count > 0) return cudaErrorInvalidValue;
  if (count > 0) std::memset(devPtr, value, count);
  return cudaSuccess;
}

// ---- test hooks -----------------------------------------------------------------------------

EMU_API const char* pyinf_emu_launch_log(void) {
  std::lock_guard<std::mutex> l(emu::g_log_m);
  return emu::g_launch_log.c_str();
}

EMU_API const char* pyinf_emu_failures(void) {
  std::lock_guard<std::mutex> l(emu::g_log_m);
  return emu::g_failures.c_str();
}

EMU_API long long pyinf_emu_failure_count(void) {
  std::lock_guard<std::mutex> l(emu::g_log_m);
  return emu::g_failure_count;
}

EMU_API long long pyinf_emu_threads_run(void) {
  std::lock_guard<std::mutex> l(emu::g_log_m);
  return emu::g_threads_run;
}

// Number of distinct __shared__ arrays seen so far (all are poisoned before every block).
EMU_API long long pyinf_emu_shared_arrays(void) {
  std::lock_guard<std::mutex> l(emu::g_shared_m);
  return static_cast<long long>(emu::g_shared.size());
}

// "Device memory" ranges for the kernel-argument check (see cuda_runtime.h); reset clears them.
EMU_API void pyinf_emu_add_device_range(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> l(emu::g_ranges_m);
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  emu::g_ranges.emplace_back(u, u + bytes);
}

EMU_API void pyinf_emu_reset(void) {
  {
    std::lock_guard<std::mutex> l(emu::g_ranges_m);
    emu::g_ranges.clear();
  }
  std::lock_guard<std::mutex> l(emu::g_log_m);
  emu::g_launch_log.clear();
  emu::g_failures.clear();
  emu::g_failure_count = 0;
}
