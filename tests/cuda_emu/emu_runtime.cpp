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
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <deque>
#include <exception>
#include <map>
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
  std::atomic<bool> failed{false};
  std::vector<const void*> shared_seen;  // __shared__ arrays declared by this block's threads
  size_t shared_bytes = 0;
  unsigned char* dyn_smem = nullptr;  // the launch's dynamic shared memory (poisoned per block)
  size_t dyn_bytes = 0;
  std::map<uint32_t, std::pair<uint32_t, std::unique_ptr<Barrier>>> named;  // bar.sync id -> (threads, barrier)
  void* state = nullptr;  // block_state(): made by the first caller, destroyed with the block
  void (*destroy_state)(void*) = nullptr;
  uint64_t serial = next_serial();  // distinct for every block of every launch

  static uint64_t next_serial() {
    static std::atomic<uint64_t> n{0};
    return n.fetch_add(1) + 1;
  }

  ~BlockCtx() {
    if (state != nullptr) destroy_state(state);
  }
  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> l(fail_m);
    if (failure.empty()) failure = msg;
    failed.store(true);
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

void* dynamic_smem(size_t align) {
  BlockCtx& c = ctx();
  if (c.dyn_smem == nullptr)
    throw std::runtime_error("extern __shared__ array used by a kernel launched without dynamic shared memory");
  if (align > 1024) throw std::runtime_error("extern __shared__ alignment over 1024 bytes is not emulated");
  return c.dyn_smem;
}

size_t dynamic_smem_bytes() { return ctx().dyn_bytes; }

void named_barrier(uint32_t id, uint32_t threads) {
  BlockCtx& c = ctx();
  if (id >= 16) throw std::runtime_error("bar.sync: barrier id " + std::to_string(id) + " >= 16");
  if (threads == 0 || threads % 32 != 0)
    throw std::runtime_error("bar.sync: thread count " + std::to_string(threads) + " is not a multiple of 32");
  Barrier* b;
  {
    std::lock_guard<std::mutex> l(c.fail_m);
    auto it = c.named.find(id);
    if (it == c.named.end()) {
      it = c.named.emplace(id, std::make_pair(threads, std::make_unique<Barrier>())).first;
      it->second.second->init(static_cast<int>(threads));
    } else if (it->second.first != threads) {
      throw std::runtime_error("bar.sync " + std::to_string(id) + ": used with " + std::to_string(threads) +
                               " and with " + std::to_string(it->second.first) + " threads");
    }
    b = it->second.second.get();
  }
  b->arrive_and_wait("bar.sync (named barrier)");
}

void* block_state(void* (*make)(), void (*destroy)(void*)) {
  BlockCtx& c = ctx();
  std::lock_guard<std::mutex> l(c.fail_m);
  if (c.state == nullptr) {
    c.state = make();
    c.destroy_state = destroy;
  }
  return c.state;
}

bool block_failed() { return ctx().failed.load(); }

// ---- cp.async (cuda_pipeline_primitives.h) ----------------------------------------------
// Each thread's copies are queued and carried out when __pipeline_wait_prior retires their
// group, never earlier: a thread that reads its stage before waiting (or before the barrier
// that makes the other threads' copies visible) sees the buffer's old contents, as it may
// on the GPU.
namespace {
struct PendingCopy {
  void* dst;
  const void* src;
  size_t copy, fill;  // bytes copied from src, then zero bytes
};
thread_local uint64_t t_pipe_block = 0;  // the block the queues below belong to
thread_local std::vector<PendingCopy> t_open;
thread_local std::deque<std::vector<PendingCopy>> t_groups;

void pipe_sync_block() {
  const uint64_t serial = ctx().serial;
  if (t_pipe_block != serial) {  // a previous block's leftovers (copies never waited for) go
    t_open.clear();
    t_groups.clear();
    t_pipe_block = serial;
  }
}

bool in_shared(const void* p, size_t n) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  BlockCtx& c = ctx();
  if (c.dyn_smem && u >= reinterpret_cast<uintptr_t>(c.dyn_smem) &&
      u + n <= reinterpret_cast<uintptr_t>(c.dyn_smem) + c.dyn_bytes)
    return true;
  std::lock_guard<std::mutex> l(g_shared_m);
  for (const SharedArray& a : g_shared)
    if (u >= reinterpret_cast<uintptr_t>(a.p) && u + n <= reinterpret_cast<uintptr_t>(a.p) + a.bytes) return true;
  return false;
}
}  // namespace

void pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill) {
  pipe_sync_block();
  if (size != 4 && size != 8 && size != 16)
    throw std::runtime_error("__pipeline_memcpy_async: size " + std::to_string(size) + " is not 4, 8 or 16");
  if (zfill > size) throw std::runtime_error("__pipeline_memcpy_async: zfill over the size");
  if (reinterpret_cast<uintptr_t>(dst) % size || reinterpret_cast<uintptr_t>(src) % size)
    throw std::runtime_error("__pipeline_memcpy_async: a pointer not aligned to the copy size " + std::to_string(size));
  if (!in_shared(dst, size)) throw std::runtime_error("__pipeline_memcpy_async: destination not in shared memory");
  if (zfill < size && !device_pointer_ok(src))
    throw std::runtime_error("__pipeline_memcpy_async: source outside every registered device buffer");
  t_open.push_back({dst, src, size - zfill, zfill});
}

void pipeline_commit() {
  pipe_sync_block();
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}

void pipeline_wait_prior(size_t prior) {
  pipe_sync_block();
  while (t_groups.size() > prior) {
    for (const PendingCopy& c : t_groups.front()) {
      std::memcpy(c.dst, c.src, c.copy);
      std::memset(static_cast<char*>(c.dst) + c.copy, 0, c.fill);
    }
    t_groups.pop_front();
  }
}

namespace {
std::atomic<void (*)()> g_exit_check{nullptr};
}

void set_thread_exit_check(void (*check)()) { g_exit_check.store(check); }

int linear_thread() {
  ctx();
  return t_linear;
}

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
  void (*check)() = g_exit_check.load();
  bool body_done = false;
  try {
    a.body(a.closure);
    body_done = true;
    if (check) check();
  } catch (const std::exception& e) {
    c.fail(e.what());
  } catch (...) {
    c.fail("unknown exception");
  }
  if (check && !body_done) {  // the check also clears per-thread state: none for the worker's next block
    try {
      check();
    } catch (...) {
    }
  }
  if (c.block.drop()) c.fail("a thread returned from the kernel while others wait at __syncthreads (divergent barrier)");
  if (c.warps[a.t / 32]->drop()) c.fail("a thread returned from the kernel while its warp waits in a collective");
  t_ctx = nullptr;
  return nullptr;
}

// The threads that run blocks: pthreads with small stacks (the kernels' frames are a few KiB),
// made once and reused by every block of every launch (creating hundreds of threads per block
// dominated the tests' time). run() gives thread t of a block to worker t; each worker sets
// the built-ins itself (thread_main), so nothing of a previous block survives but the worker's
// stack. One block runs at a time (launches from several host threads take turns).
class WorkerPool {
 public:
  // Runs thread_main(&args[t]) for every t on distinct concurrent workers; false if the
  // workers could not be created (then nothing ran).
  bool run(std::vector<ThreadArgs>& args, std::string* why) {
    std::lock_guard<std::mutex> run_lock(run_m_);
    const size_t n = args.size();
    while (workers_.size() < n) {
      auto w = std::make_unique<Worker>();
      w->pool = this;
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, 256 * 1024);
      const int rc = pthread_create(&w->thread, &attr, &WorkerPool::loop, w.get());
      pthread_attr_destroy(&attr);
      if (rc != 0) {
        *why = "pthread_create failed: " + std::string(std::strerror(rc));
        return false;
      }
      pthread_detach(w->thread);
      workers_.push_back(std::move(w));
    }
    {
      std::lock_guard<std::mutex> l(done_m_);
      remaining_ = n;
    }
    for (size_t t = 0; t < n; ++t) {
      Worker& w = *workers_[t];
      std::lock_guard<std::mutex> l(w.m);
      w.job = &args[t];
      w.cv.notify_one();
    }
    std::unique_lock<std::mutex> l(done_m_);
    done_cv_.wait(l, [&] { return remaining_ == 0; });
    return true;
  }

 private:
  struct Worker {
    WorkerPool* pool = nullptr;
    pthread_t thread{};
    std::mutex m;
    std::condition_variable cv;
    ThreadArgs* job = nullptr;
  };

  static void* loop(void* p) {
    Worker& w = *static_cast<Worker*>(p);
    while (true) {
      ThreadArgs* job;
      {
        std::unique_lock<std::mutex> l(w.m);
        w.cv.wait(l, [&] { return w.job != nullptr; });
        job = w.job;
        w.job = nullptr;
      }
      thread_main(job);
      WorkerPool& pool = *w.pool;
      std::lock_guard<std::mutex> l(pool.done_m_);
      if (--pool.remaining_ == 0) pool.done_cv_.notify_one();
    }
    return nullptr;
  }

  std::mutex run_m_;
  std::vector<std::unique_ptr<Worker>> workers_;  // never shrinks; workers live as long as the process
  std::mutex done_m_;
  std::condition_variable done_cv_;
  size_t remaining_ = 0;
};

WorkerPool& pool() {
  static WorkerPool* p = new WorkerPool;  // never destroyed: detached workers wait on it at exit
  return *p;
}

}  // namespace

constexpr size_t kStaticSharedLimit = 48 * 1024;

namespace {
std::mutex g_attr_m;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
constexpr size_t kDefaultDynamicLimit = 48 * 1024, kOptInLimit = 227 * 1024;  // H100: 227 KiB per block
}  // namespace

void run_grid(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
              void (*body)(void*), void* closure) {
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
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    log_failure(std::string(name) + ": invalid launch configuration");
    return;
  }
  size_t dyn_limit = kDefaultDynamicLimit;
  {
    std::lock_guard<std::mutex> l(g_attr_m);
    auto it = g_max_dynamic_smem.find(fn);
    if (it != g_max_dynamic_smem.end()) dyn_limit = static_cast<size_t>(it->second);
  }
  if (smem > dyn_limit) {  // the runtime's "too many resources requested for launch"
    g_last_error = cudaErrorInvalidValue;
    log_failure(std::string(name) + ": " + std::to_string(smem) + " bytes of dynamic shared memory, over the " +
                std::to_string(dyn_limit) + " the kernel allows (cudaFuncSetAttribute)");
    return;
  }
  struct AlignedFree {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, AlignedFree> dyn(
      smem > 0 ? static_cast<unsigned char*>(std::aligned_alloc(1024, (smem + 1023) / 1024 * 1024)) : nullptr);
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
    if (dyn) {
      std::memset(dyn.get(), 0xff, smem);
      c.dyn_smem = dyn.get();
      c.dyn_bytes = smem;
    }
    for (int w = 0; w < nwarps; ++w) {
      c.warps.push_back(std::make_unique<Barrier>());
      c.warps.back()->init(w + 1 < nwarps ? 32 : n - 32 * w);
    }
    c.scratch.assign(static_cast<size_t>(nwarps) * 2 * 1024, 0.0f);
    std::vector<ThreadArgs> args(n);
    for (int t = 0; t < n; ++t) args[t] = ThreadArgs{&c, t, uint3{bx, by, bz}, grid, block, body, closure};
    std::string why;
    if (pool().run(args, &why)) {
      std::lock_guard<std::mutex> l(g_log_m);
      g_threads_run += n;
    } else {
      c.fail(why);  // no thread of the block ran
    }
    smem_static = std::max(smem_static, c.shared_bytes);
    if (c.shared_bytes + smem > kOptInLimit)
      c.fail("static + dynamic shared memory " + std::to_string(c.shared_bytes + smem) + " bytes > 227 KiB");
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

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (func == nullptr) return cudaErrorInvalidDeviceFunction;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;  // the one used
  if (value < 0 || static_cast<size_t>(value) > emu::kOptInLimit) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> l(emu::g_attr_m);
  emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// The emulated device: an H100 (compute capability 9.0, 132 SMs; PYINF_EMU_SMS overrides the count).
cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (value == nullptr || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: {
      const char* v = std::getenv("PYINF_EMU_SMS");
      *value = v && std::atoi(v) > 0 ? std::atoi(v) : 132;
      return cudaSuccess;
    }
    default: return cudaErrorInvalidValue;
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

// An error left pending by earlier work on this host thread (what cudaGetLastError returns next).
EMU_API void pyinf_emu_set_last_error(int error) { emu::g_last_error = static_cast<cudaError_t>(error); }

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
