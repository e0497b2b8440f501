// CPU emulation of the Hopper instructions factored_scores_sm90.cu uses (see emu_sm90.h for
// the execution model): mbarriers, TMA tensor loads and their tensor maps
// (cuTensorMapEncodeTiled), wgmma with shared-memory operands, elect.sync. Semantics and
// layouts follow the PTX ISA 8.x and the CUDA driver API documentation; what is not needed
// by the kernel (other shapes, MN-major operands, interleaved maps, element strides, other
// swizzles in wgmma) is rejected with a message instead of being guessed.
#include "cuda_runtime.h"
#include "emu_sm90.h"

#include <cuda.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {
namespace sm90 {
namespace {

std::chrono::seconds wait_timeout() {
  const char* v = std::getenv("PYINF_EMU_BARRIER_TIMEOUT");
  return std::chrono::seconds(v && std::atoi(v) > 0 ? std::atoi(v) : 60);
}

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

unsigned char* smem_window(size_t* bytes) {
  unsigned char* base = static_cast<unsigned char*>(dynamic_smem(16));
  *bytes = dynamic_smem_bytes();
  return base;
}

// Host pointer of `n` bytes at shared address `addr`, bounds-checked.
unsigned char* smem_at(uint64_t addr, size_t n, const char* what) {
  size_t bytes = 0;
  unsigned char* base = smem_window(&bytes);
  if (addr + n > bytes)
    throw std::runtime_error(std::string(what) + ": shared address " + hex(addr) + " + " + std::to_string(n) +
                             " bytes is past the block's " + std::to_string(bytes) + " bytes of shared memory");
  return base + addr;
}

// ---- mbarriers --------------------------------------------------------------------------

struct MBar {
  uint32_t count = 0, pending = 0, phase = 0;  // phase: completed phases so far
  int64_t tx = 0;                              // transaction bytes still expected
};

// Which TMA load last wrote each 16-byte chunk of shared memory: the mbarrier it completed
// its bytes on and that barrier's phase then. A wgmma may read the chunk only if its thread
// has seen that phase complete (an mbarrier wait that returned after it): the data's
// happens-before edge on the GPU. Checked when the wgmma is issued.
struct Written {
  uint32_t bar = 0xffffffffu, phase = 0;  // bar 0xffffffff: no TMA wrote the chunk
};

struct BlockState {
  std::mutex m;
  std::condition_variable cv;
  std::map<uint32_t, MBar> bars;  // by shared address
  std::vector<Written> written;   // per 16-byte chunk of shared memory
  // wgmma is a warpgroup instruction (.sync.aligned): every thread of a warpgroup issues the same
  // sequence. Per warpgroup, the (desc_a, desc_b, scale_d) of each wgmma its threads issued so
  // far; a thread whose i-th wgmma differs, or that leaves the kernel with fewer than another
  // thread of its warpgroup issued, is an error. (A thread that issues none is not checked.)
  std::map<int, std::vector<std::array<uint64_t, 3>>> issued;
};

// Per thread: the phases of each mbarrier (by address) this thread has seen complete.
thread_local std::map<uint32_t, uint32_t> t_seen;
thread_local size_t t_issued = 0;  // wgmma issued by this thread

BlockState& block() {
  return *static_cast<BlockState*>(
      block_state([]() -> void* { return new BlockState; }, [](void* p) { delete static_cast<BlockState*>(p); }));
}

uint32_t bar_addr(const void* bar, const char* what) {
  const uint32_t a = smem_addr(bar);
  if (a % 8 != 0) throw std::runtime_error(std::string(what) + ": mbarrier at " + hex(a) + " is not 8-byte aligned");
  return a;
}

MBar& find(BlockState& s, uint32_t addr, const char* what) {
  auto it = s.bars.find(addr);
  if (it == s.bars.end())
    throw std::runtime_error(std::string(what) + ": mbarrier at shared address " + hex(addr) +
                             " used before mbarrier.init");
  return it->second;
}

void maybe_complete(BlockState& s, MBar& b) {  // under s.m
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
    s.cv.notify_all();
  }
}

void complete_tx(void* bar, uint32_t bytes) {
  const uint32_t a = bar_addr(bar, "cp.async.bulk.tensor complete_tx");
  BlockState& s = block();
  std::lock_guard<std::mutex> l(s.m);
  MBar& b = find(s, a, "cp.async.bulk.tensor complete_tx");
  b.tx -= bytes;
  maybe_complete(s, b);
}

// ---- tensor maps --------------------------------------------------------------------------

constexpr uint64_t kMapMagic = 0x70796e66544d4150ull;  // "pyinfTMAP"

// What cuTensorMapEncodeTiled stores in the 128-byte CUtensorMap here.
struct EmuMap {
  uint64_t magic;
  const unsigned char* addr;
  uint32_t rank, esize, swizzle;
  uint32_t dim_minus1[5], box[5];  // (element strides and OOB fill: only 1 and zeros are encoded)
  uint64_t stride[4];  // bytes, of dims 1..rank-1 (dim 0 is contiguous)
};
static_assert(sizeof(EmuMap) <= sizeof(CUtensorMap), "the emulated tensor map must fit a CUtensorMap");

std::mutex g_encode_m;
std::string g_encode_error;

CUresult encode_fail(CUtensorMap* map, const std::string& why) {
  std::lock_guard<std::mutex> l(g_encode_m);
  g_encode_error = why;
  if (map != nullptr) std::memset(static_cast<void*>(map), 0, sizeof(CUtensorMap));
  return CUDA_ERROR_INVALID_VALUE;
}

uint32_t element_size(CUtensorMapDataType t) {
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;
  }
}

uint32_t swizzle_bytes(CUtensorMapSwizzle s) {
  switch (s) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: return 0;
    case CU_TENSOR_MAP_SWIZZLE_32B: return 32;
    case CU_TENSOR_MAP_SWIZZLE_64B: return 64;
    case CU_TENSOR_MAP_SWIZZLE_128B: return 128;
    default: return 1;  // other modes (128B atoms of 32B / 64B): not emulated
  }
}

// The shared-memory swizzle of TMA and wgmma: the 16-byte chunk bits [4, 7) of an address
// XOR its 128-byte row bits [7, 10), over 1024 (128B), 512 (64B) or 256 (32B) byte patterns.
uint64_t swizzle(uint64_t addr, uint32_t span) {
  switch (span) {
    case 128: return addr ^ (((addr >> 7) & 7) << 4);
    case 64: return addr ^ (((addr >> 7) & 3) << 4);
    case 32: return addr ^ (((addr >> 7) & 1) << 4);
    default: return addr;
  }
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float fp16_to_float(uint16_t h) {
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  float v;
  if (e == 0)
    v = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31)
    v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else
    v = std::ldexp(static_cast<float>(m | 0x400), static_cast<int>(e) - 25);
  return (h & 0x8000) ? -v : v;
}

// ---- wgmma --------------------------------------------------------------------------------

struct Gmma {
  int dtype;
  uint64_t desc_a, desc_b;
  float* d[64];
  int scale_d, scale_a, scale_b;
};

thread_local std::vector<Gmma> t_open;                 // issued since the last commit
thread_local std::deque<std::vector<Gmma>> t_groups;  // committed, not yet retired
thread_local bool t_fenced = false;

// PTX ISA, "Matrix Descriptor Format" (wgmma). The leading byte offset (bits 16-29) is not
// used by K-major operands with a swizzle, the only kind emulated.
struct Desc {
  uint64_t start, sbo;
  uint32_t base_offset, layout;
};

Desc decode(uint64_t d) {
  return Desc{(d & 0x3fff) << 4, ((d >> 32) & 0x3fff) << 4, static_cast<uint32_t>((d >> 49) & 7),
              static_cast<uint32_t>((d >> 62) & 3)};
}

// The shared address of element (row, k) of a K-major operand with the 128-byte swizzle (row:
// the M or N index, k < 16): the canonical layout ((8, m), (T, 2k)) : ((8T, SBO), (1, T)),
// T = 8 16-bit elements, i.e. byte (row % 8) * 128 + (row / 8) * SBO + 2 k from the start
// address, then swizzled.
uint64_t element_addr(const Desc& ds, int row, int k) {
  return swizzle(ds.start + static_cast<uint64_t>(row / 8) * ds.sbo + static_cast<uint64_t>(row % 8) * 128 + 2 * k,
                 128);
}

// The rows of A and B whose elements a thread's accumulators need. PTX ISA, wgmma m64nNk16
// fp32 accumulator fragment: element i of a thread is row 16 * (warp in warpgroup) + lane / 4
// + 8 * ((i / 2) % 2), column 2 * (lane % 4) + i % 2 + 8 * (i / 4); a_rows[(i / 2) % 2] and
// b_rows[2 * (i / 4) + i % 2].
void fragment_rows(int a_rows[2], int b_rows[32]) {
  const int t = linear_thread(), lane = t % 32, wq = (t / 32) % 4;
  for (int h = 0; h < 2; ++h) a_rows[h] = wq * 16 + lane / 4 + 8 * h;
  for (int j = 0; j < 16; ++j)
    for (int e = 0; e < 2; ++e) b_rows[2 * j + e] = 8 * j + 2 * (lane % 4) + e;
}

void load_row(const Desc& ds, int row, int dtype, float* out, const char* which) {
  for (int k = 0; k < 16; ++k) {
    const uint64_t phys = element_addr(ds, row, k);
    uint16_t h;
    std::memcpy(&h, smem_at(phys, 2, which), 2);
    out[k] = dtype == 1 ? bf16_to_float(h) : fp16_to_float(h);
  }
}

void check_desc(const Desc& ds, const char* which) {
  if (ds.layout != 1)
    throw std::runtime_error(std::string("wgmma ") + which + ": descriptor layout type " +
                             std::to_string(ds.layout) + " (only the 128-byte swizzle is emulated)");
  if (ds.base_offset != 0)
    throw std::runtime_error(std::string("wgmma ") + which + ": base offset " + std::to_string(ds.base_offset) +
                             " (only 0 is emulated)");
  if ((ds.start & 127) + 32 > 128)
    throw std::runtime_error(std::string("wgmma ") + which + ": the K slice at " + hex(ds.start) +
                             " crosses a 128-byte swizzle row");
}

// The rows of an operand this thread reads (execute()) must hold TMA data whose barrier phase
// this thread has seen complete.
void check_published(const Desc& ds, int row, const char* which) {
  BlockState& s = block();
  std::lock_guard<std::mutex> l(s.m);
  for (int k = 0; k < 16; k += 8) {  // the row's two 16-byte chunks
    const uint64_t chunk = element_addr(ds, row, k) / 16;
    const Written w = chunk < s.written.size() ? s.written[chunk] : Written{};
    if (w.bar == 0xffffffffu)
      throw std::runtime_error(std::string("wgmma ") + which + " reads shared memory at " + hex(chunk * 16) +
                               " that no TMA load wrote");
    auto seen = t_seen.find(w.bar);
    if (seen == t_seen.end() || seen->second <= w.phase)
      throw std::runtime_error(std::string("wgmma ") + which + " reads shared memory at " + hex(chunk * 16) +
                               " before waiting for its TMA load (phase " + std::to_string(w.phase) +
                               " of the mbarrier at " + hex(w.bar) + " not seen complete by this thread)");
  }
}

void execute(const Gmma& g) {  // descriptors checked when issued
  const Desc da = decode(g.desc_a), db = decode(g.desc_b);
  int a_rows[2], b_rows[32];
  fragment_rows(a_rows, b_rows);
  float a[2][16], b[32][16];
  for (int h = 0; h < 2; ++h) load_row(da, a_rows[h], g.dtype, a[h], "wgmma A operand");
  for (int j = 0; j < 32; ++j) load_row(db, b_rows[j], g.dtype, b[j], "wgmma B operand");
  for (int i = 0; i < 64; ++i) {
    const float* ar = a[(i / 2) % 2];
    const float* br = b[2 * (i / 4) + i % 2];
    float acc = g.scale_d ? *g.d[i] : 0.0f;
    for (int k = 0; k < 16; ++k) acc = std::fmaf(ar[k] * g.scale_a, br[k] * g.scale_b, acc);
    *g.d[i] = acc;
  }
}

void exit_check() {
  const bool open = !t_open.empty(), pending = !t_groups.empty();
  const size_t issued = t_issued;
  t_open.clear();
  t_groups.clear();
  t_fenced = false;
  t_seen.clear();
  t_issued = 0;
  if (open || pending)
    throw std::runtime_error("the kernel returned with wgmma not retired (no wgmma.wait_group 0 after its last commit)");
  if (issued > 0) {
    BlockState& s = block();
    std::lock_guard<std::mutex> l(s.m);
    const size_t most = s.issued[linear_thread() / 128].size();
    if (issued < most)
      throw std::runtime_error("a thread left the kernel after " + std::to_string(issued) + " wgmma, another of its "
                               "warpgroup issued " + std::to_string(most) + " (wgmma is a warpgroup instruction)");
  }
}

struct RegisterExitCheck {
  RegisterExitCheck() { set_thread_exit_check(exit_check); }
} g_register_exit_check;

}  // namespace

uint32_t smem_addr(const void* p) {
  size_t bytes = 0;
  const unsigned char* base = smem_window(&bytes);
  const unsigned char* q = static_cast<const unsigned char*>(p);
  if (q < base || q >= base + bytes)
    throw std::runtime_error("a shared-memory address was taken of a pointer outside the block's shared memory");
  return static_cast<uint32_t>(q - base);
}

bool elect_one() { return linear_thread() % 32 == 0; }

void mbar_init(const void* bar, uint32_t arrivals) {
  const uint32_t a = bar_addr(bar, "mbarrier.init");
  if (arrivals == 0 || arrivals >= (1u << 20))
    throw std::runtime_error("mbarrier.init: arrival count " + std::to_string(arrivals) + " outside [1, 2^20)");
  BlockState& s = block();
  std::lock_guard<std::mutex> l(s.m);
  s.bars[a] = MBar{arrivals, arrivals, 0, 0};
}

void mbar_arrive(const void* bar, uint32_t expect_tx_bytes) {
  const char* what = expect_tx_bytes ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
  const uint32_t a = bar_addr(bar, what);
  BlockState& s = block();
  std::lock_guard<std::mutex> l(s.m);
  MBar& b = find(s, a, what);
  if (b.pending == 0)
    throw std::runtime_error(std::string(what) + ": more arrivals than the mbarrier's count " +
                             std::to_string(b.count) + " in one phase");
  b.tx += expect_tx_bytes;
  if (b.tx >= (1 << 20)) throw std::runtime_error(std::string(what) + ": transaction count over 2^20 - 1");
  --b.pending;
  maybe_complete(s, b);
}

void mbar_wait(const void* bar, uint32_t parity) {
  const uint32_t a = bar_addr(bar, "mbarrier.try_wait.parity");
  BlockState& s = block();
  std::unique_lock<std::mutex> l(s.m);
  MBar& b = find(s, a, "mbarrier.try_wait.parity");
  const auto deadline = std::chrono::steady_clock::now() + wait_timeout();
  // The phase of parity `parity` has completed once the current phase's parity differs.
  while ((b.phase & 1) == (parity & 1)) {
    if (block_failed()) throw std::runtime_error("mbarrier wait abandoned: another thread of the block failed");
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error("mbarrier wait (parity " + std::to_string(parity & 1) + ", shared address " + hex(a) +
                               ") not completed within the timeout: deadlock");
    s.cv.wait_for(l, std::chrono::milliseconds(20));
  }
  uint32_t& seen = t_seen[a];
  seen = std::max(seen, b.phase);
}

bool mbar_try_wait(const void* bar, uint32_t parity) {
  const uint32_t a = bar_addr(bar, "mbarrier.try_wait.parity");
  BlockState& s = block();
  std::lock_guard<std::mutex> l(s.m);
  const MBar& b = find(s, a, "mbarrier.try_wait.parity");
  if ((b.phase & 1) == (parity & 1)) return false;
  uint32_t& seen = t_seen[a];
  seen = std::max(seen, b.phase);
  return true;
}

void tma_prefetch(const void* desc) {
  if (reinterpret_cast<uintptr_t>(desc) % 64 != 0)
    throw std::runtime_error("prefetch.tensormap: the tensor map is not 64-byte aligned");
}

void tma_load(const void* desc, void* mbar, void* smem, int rank, const int32_t* crd) {
  if (reinterpret_cast<uintptr_t>(desc) % 64 != 0)
    throw std::runtime_error("cp.async.bulk.tensor: the tensor map is not 64-byte aligned");
  EmuMap m;
  std::memcpy(&m, desc, sizeof m);
  if (m.magic != kMapMagic) {
    std::lock_guard<std::mutex> l(g_encode_m);
    throw std::runtime_error("cp.async.bulk.tensor: the tensor map was never encoded (cuTensorMapEncodeTiled "
                             "failed: " + g_encode_error + ")");
  }
  if (static_cast<uint32_t>(rank) != m.rank)
    throw std::runtime_error("cp.async.bulk.tensor." + std::to_string(rank) + "d with a rank-" +
                             std::to_string(m.rank) + " tensor map");
  const uint64_t dst = smem_addr(smem);
  if (dst % 128 != 0) throw std::runtime_error("cp.async.bulk.tensor: shared destination " + hex(dst) +
                                               " is not 128-byte aligned");
  if (m.swizzle != 0 && dst % (8 * m.swizzle) != 0)
    throw std::runtime_error("cp.async.bulk.tensor: shared destination " + hex(dst) + " is not on a " +
                             std::to_string(8 * m.swizzle) + "-byte swizzle pattern boundary (not emulated)");
  uint32_t box[5] = {1, 1, 1, 1, 1}, dimm1[5] = {0, 0, 0, 0, 0};
  uint64_t stride[5] = {m.esize, 0, 0, 0, 0};
  int64_t c[5] = {0, 0, 0, 0, 0};
  uint64_t box_elems = 1;
  for (uint32_t i = 0; i < m.rank; ++i) {
    box[i] = m.box[i];
    dimm1[i] = m.dim_minus1[i];
    if (i > 0) stride[i] = m.stride[i - 1];
    c[i] = crd[i];
    box_elems *= box[i];
  }
  const uint64_t bytes = box_elems * m.esize;
  smem_at(dst, bytes, "cp.async.bulk.tensor destination");  // the whole box inside shared memory
  uint64_t i[5];
  uint64_t lin = 0;
  for (i[4] = 0; i[4] < box[4]; ++i[4])
    for (i[3] = 0; i[3] < box[3]; ++i[3])
      for (i[2] = 0; i[2] < box[2]; ++i[2])
        for (i[1] = 0; i[1] < box[1]; ++i[1])
          for (i[0] = 0; i[0] < box[0]; ++i[0], lin += m.esize) {
            bool inside = true;
            uint64_t off = 0;
            for (int k = 0; k < 5; ++k) {
              const int64_t g = c[k] + static_cast<int64_t>(i[k]);
              inside = inside && g >= 0 && g <= static_cast<int64_t>(dimm1[k]);
              off += inside ? static_cast<uint64_t>(g) * stride[k] : 0;
            }
            unsigned char* out = smem_at(swizzle(dst + lin, m.swizzle), m.esize, "cp.async.bulk.tensor destination");
            if (inside)
              std::memcpy(out, m.addr + off, m.esize);
            else
              std::memset(out, 0, m.esize);  // CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: zeros
          }
  {  // tag the chunks with the phase these bytes complete (the barrier's current one)
    const uint32_t a = bar_addr(mbar, "cp.async.bulk.tensor");
    BlockState& s = block();
    std::lock_guard<std::mutex> l(s.m);
    const uint32_t phase = find(s, a, "cp.async.bulk.tensor").phase;
    size_t smem_bytes = 0;
    smem_window(&smem_bytes);
    if (s.written.size() < smem_bytes / 16) s.written.resize(smem_bytes / 16);
    for (uint64_t chunk = dst / 16; chunk < (dst + bytes + 15) / 16; ++chunk) s.written[chunk] = Written{a, phase};
  }
  complete_tx(mbar, static_cast<uint32_t>(bytes));  // the whole box counts, filled or not
}

void wgmma_fence() { t_fenced = true; }

void wgmma_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
  t_fenced = false;
}

void wgmma_wait(int keep) {
  if (!t_open.empty())
    throw std::runtime_error("wgmma.wait_group with wgmma.mma_async issued but not committed (commit_group)");
  while (static_cast<int>(t_groups.size()) > keep) {
    for (const Gmma& g : t_groups.front()) execute(g);
    t_groups.pop_front();
  }
}

void wgmma_ss(int dtype, int M, int N, int K, uint64_t desc_a, uint64_t desc_b, float* const* d, int scale_d,
              int scale_a, int scale_b, int tnsp_a, int tnsp_b) {
  if (!t_fenced && t_open.empty())
    throw std::runtime_error("wgmma.mma_async without a wgmma.fence since the last commit");
  if (M != 64 || N != 128 || K != 16 || (dtype != 1 && dtype != 2))
    throw std::runtime_error("wgmma: only m64n128k16 with bf16 or fp16 operands is emulated");
  if (tnsp_a != 0 || tnsp_b != 0) throw std::runtime_error("wgmma: only K-major operands are emulated");
  {  // the data's happens-before edge, at issue (the wgmma may read it any time after)
    const Desc da = decode(desc_a), db = decode(desc_b);
    check_desc(da, "A");
    check_desc(db, "B");
    int a_rows[2], b_rows[32];
    fragment_rows(a_rows, b_rows);
    for (int row : a_rows) check_published(da, row, "A operand");
    for (int row : b_rows) check_published(db, row, "B operand");
  }
  {  // the same wgmma as the rest of the warpgroup
    BlockState& s = block();
    std::lock_guard<std::mutex> l(s.m);
    auto& seq = s.issued[linear_thread() / 128];
    const std::array<uint64_t, 3> op{desc_a, desc_b, static_cast<uint64_t>(scale_d)};
    if (t_issued < seq.size() && seq[t_issued] != op)
      throw std::runtime_error("wgmma " + std::to_string(t_issued) + " of this thread differs from the same wgmma of "
                               "another thread of its warpgroup (descriptors " + hex(desc_a) + ", " + hex(desc_b) +
                               " vs " + hex(seq[t_issued][0]) + ", " + hex(seq[t_issued][1]) + ")");
    if (t_issued == seq.size()) seq.push_back(op);
    ++t_issued;
  }
  Gmma g;
  g.dtype = dtype;
  g.desc_a = desc_a;
  g.desc_b = desc_b;
  for (int i = 0; i < 64; ++i) g.d[i] = d[i];
  g.scale_d = scale_d;
  g.scale_a = scale_a;
  g.scale_b = scale_b;
  t_open.push_back(g);
}

}  // namespace sm90
}  // namespace emu

// ---- the driver's tensor-map encoder (CUTLASS calls it directly: CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL) ----

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType,
                                        cuuint32_t tensorRank, void* globalAddress, const cuuint64_t* globalDim,
                                        const cuuint64_t* globalStrides, const cuuint32_t* boxDim,
                                        const cuuint32_t* elementStrides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2Promotion,
                                        CUtensorMapFloatOOBfill oobFill) {
  using namespace emu::sm90;
  (void)l2Promotion;
  // The driver API's documented requirements.
  if (tensorMap == nullptr || reinterpret_cast<uintptr_t>(tensorMap) % 64 != 0)
    return encode_fail(tensorMap, "tensorMap not 64-byte aligned");
  const uint32_t esize = element_size(tensorDataType);
  if (esize == 0) return encode_fail(tensorMap, "data type not emulated");
  if (tensorRank < 1 || tensorRank > 5) return encode_fail(tensorMap, "rank " + std::to_string(tensorRank));
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return encode_fail(tensorMap, "interleaved maps not emulated");
  if (reinterpret_cast<uintptr_t>(globalAddress) % 16 != 0)
    return encode_fail(tensorMap, "globalAddress " + hex(reinterpret_cast<uintptr_t>(globalAddress)) +
                                      " not 16-byte aligned");
  const uint32_t span = swizzle_bytes(swizzle);
  if (span == 1) return encode_fail(tensorMap, "swizzle mode not emulated");
  if (oobFill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) return encode_fail(tensorMap, "NaN OOB fill not emulated");
  EmuMap m{};
  m.magic = kMapMagic;
  m.addr = static_cast<const unsigned char*>(globalAddress);
  m.rank = tensorRank;
  m.esize = esize;
  m.swizzle = span;
  uint64_t extent = esize;  // bytes from the base to one past the last element
  for (uint32_t i = 0; i < tensorRank; ++i) {
    if (globalDim[i] == 0 || globalDim[i] > (1ull << 32))
      return encode_fail(tensorMap, "globalDim[" + std::to_string(i) + "] = " + std::to_string(globalDim[i]));
    if (boxDim[i] == 0 || boxDim[i] > 256)
      return encode_fail(tensorMap, "boxDim[" + std::to_string(i) + "] = " + std::to_string(boxDim[i]));
    if (elementStrides[i] != 1) return encode_fail(tensorMap, "element strides other than 1 not emulated");
    m.dim_minus1[i] = static_cast<uint32_t>(globalDim[i] - 1);
    m.box[i] = boxDim[i];
    const uint64_t st = i == 0 ? esize : globalStrides[i - 1];
    if (i > 0) {
      if (st % 16 != 0 || st >= (1ull << 40))
        return encode_fail(tensorMap, "globalStrides[" + std::to_string(i - 1) + "] = " + std::to_string(st) +
                                          " (must be a multiple of 16 below 2^40)");
      m.stride[i - 1] = st;
    }
    extent += (globalDim[i] - 1) * st;
  }
  if ((static_cast<uint64_t>(boxDim[0]) * esize) % 16 != 0)
    return encode_fail(tensorMap, "boxDim[0] * element size not a multiple of 16 bytes");
  if (span != 0 && static_cast<uint64_t>(boxDim[0]) * esize > span)
    return encode_fail(tensorMap, "boxDim[0] * element size over the swizzle span");
  // Every element the map describes must lie in a buffer the test registered as device memory.
  if (!emu::device_pointer_ok(globalAddress) ||
      !emu::device_pointer_ok(static_cast<const unsigned char*>(globalAddress) + extent - 1))
    return encode_fail(tensorMap, "the tensor [" + hex(reinterpret_cast<uintptr_t>(globalAddress)) + ", +" +
                                      std::to_string(extent) + ") is not inside one registered device buffer");
  std::memset(static_cast<void*>(tensorMap), 0, sizeof(CUtensorMap));
  std::memcpy(static_cast<void*>(tensorMap), &m, sizeof m);
  return CUDA_SUCCESS;
}
