// CUDA emulation for tests: lets g++ compile the project's UNCHANGED kernel headers (.cuh) and run
// them on the CPU, under AddressSanitizer/UBSan or ThreadSanitizer (see architecture.md, "Testing
// CUDA kernels on a machine without a GPU"). Include this first, then the .cuh kernels, or the
// launcher .cu itself (csrc/<family>/<subop>_cuda.cu, compiled unchanged as C++): launchers write
// TROUS_LAUNCH(grid, block, smem, stream, kernel)(args...) (trous/launch.cuh), which this header
// defines as an emulated launch, and the CUDA runtime calls they make (cudaGetLastError,
// cudaGetDevice, cudaDeviceGetAttribute, cudaFuncSetAttribute, cudaMemsetAsync, ...) have host
// stand-ins below, answering for an emulated H100/H200-like device (trous_emu::device(), which a
// test may change). Device memory is host memory: launchers get plain host pointers, and a launch
// runs to completion before it returns (every stream is synchronous). Tests of a kernel alone call
// `trous_emu::launch(kernel, grid, block, args...)` where CUDA code writes kernel<<<grid, block>>>.
//
// Model: blocks run one after another; each CUDA thread of a block is one std::thread (from a pool
// reused across blocks and launches), so `__shared__` can simply be `static`. Barriers and warp
// collectives are rendezvous that check what the hardware leaves undefined: a thread that returns
// while others wait at __syncthreads, a shuffle whose mask names a lane that never joins it (or
// joins another collective), mismatched masks. Any such error prints a "trous-emu:" line and exits
// with status 3; a wait longer than TROUS_EMU_TIMEOUT seconds (default 60) is reported as deadlock.
// Stricter than the CUDA docs in one way: a lane that has returned may not be named in a later
// shuffle mask (the usual shape of that is an early return before a full-mask reduction).
// Not emulated: inline PTX (__CUDA_ARCH__ is undefined, so keep PTX in helpers with a plain-C++
// twin), memory ordering of shuffles (they synchronise here, so TSan cannot see a race that only a
// shuffle "orders"), clusters, cooperative groups, __activemask.
#pragma once
#ifndef TROUS_CUDA_EMULATION
#define TROUS_CUDA_EMULATION 1  // makes trous/common.h mark functions __host__ __device__
#endif

#include <cuda_bf16.h>  // host-compilable with g++: compute on the host through fp32
#include <cuda_fp16.h>
#include <vector_functions.h>  // make_float4, ...
#include <vector_types.h>      // dim3, uint3, float4, uint4, ...
#include <cuda_runtime.h>      // host API declarations only: the functions used are defined below

#include <algorithm>
#include <any>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// crt/host_defines.h already turns __host__/__device__/__global__/__forceinline__ into host
// meanings; shared memory must be one object per block, hence static (blocks never overlap).
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// Dynamic shared memory: `extern __shared__ T x[]` cannot be static, so kernels spell it
// TROUS_DYNAMIC_SHARED(T, x) (common.h gives the nvcc form); here it is a per-launch buffer.
#ifndef TROUS_DYNAMIC_SHARED
#define TROUS_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::trous_emu::dynamic_smem())
#endif
// The launchers' kernel<<<grid, block, smem, stream>>>(args...) (trous/launch.cuh gives the nvcc form).
#ifndef TROUS_LAUNCH
#define TROUS_LAUNCH(grid, block, smem, stream, ...) \
  ::trous_emu::launcher<__VA_ARGS__>((grid), (block), (smem), (stream))
#endif

namespace trous_emu {
constexpr int kErrorExit = 3;

// What the host program is doing (a test case name), printed with any error.
inline std::string& context() {
  static std::string c;
  return c;
}

// Reports an emulation error and exits at once (other threads may be blocked: no unwinding).
[[noreturn]] inline void fail(const char* kind, const std::string& what) {
  std::fprintf(stderr, "trous-emu: %s: %s%s%s\n", kind, what.c_str(),
               context().empty() ? "" : "\n  in: ", context().c_str());
  std::fflush(stderr);
  std::_Exit(kErrorExit);
}

// The emulated device, as cudaDeviceGetAttribute reports it and launches are checked against:
// H100 / H200 (sm_90) limits. A test may change it (e.g. fewer SMs) before calling a launcher.
struct Device {
  int sm_count = 132;
  int smem_per_block = 48 * 1024;         // dynamic shared memory without opt-in
  int smem_per_block_optin = 227 * 1024;  // the most cudaFuncSetAttribute may allow
  int smem_per_sm = 228 * 1024;
  int max_threads_per_block = 1024;
  int max_threads_per_sm = 2048;
  int max_block[3] = {1024, 1024, 64};
  int max_grid[3] = {INT_MAX, 65535, 65535};
  int regs_per_block = 64 * 1024;
  int l2_bytes = 50 * 1024 * 1024;
  int cc_major = 9, cc_minor = 0;
};
inline Device& device() {
  static Device d;
  return d;
}

inline std::chrono::steady_clock::time_point deadline() {
  static const double s = std::getenv("TROUS_EMU_TIMEOUT") ? std::atof(std::getenv("TROUS_EMU_TIMEOUT")) : 60.0;
  return std::chrono::steady_clock::now() + std::chrono::milliseconds((long long)(s * 1000));
}

enum class Op { kSyncwarp, kShfl, kVote };

// Per-warp rendezvous state, guarded by its own mutex (warps never wait for each other).
struct Warp {
  std::mutex m;
  std::condition_variable cv;
  uint32_t exists = 0, exited = 0, at_barrier = 0;  // lane bitmasks
  uint32_t wait_mask[32] = {};                      // mask a waiting lane passed, 0 = not waiting
  Op op[32];
  const char* file[32];
  int line[32], src[32];
  uint64_t val[32], res[32], epoch[32] = {};
};

struct Grid {
  dim3 grid, block;
  int nthreads = 0;
  std::vector<unsigned char> smem;  // dynamic shared memory of the running block
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0, exited = 0, count = 0, last_count = 0;
  uint64_t gen = 0, blocks_done = 0, nblocks = 0;
  std::vector<Warp> warps;
};

struct ThreadCtx {
  Grid* g = nullptr;
  int tid = 0;         // linear thread index in the block
  uint64_t block = 0;  // linear block index
};
inline thread_local ThreadCtx ctx;

inline std::string where() { return "thread " + std::to_string(ctx.tid) + " of block " + std::to_string(ctx.block); }
inline Grid& grid_ctx() {
  if (!ctx.g) fail("bad call", "device intrinsic called outside trous_emu::launch");
  return *ctx.g;
}
inline unsigned char* dynamic_smem() { return grid_ctx().smem.data(); }

template <typename Pred>
void wait_until(std::unique_lock<std::mutex>& lk, std::condition_variable& cv, Pred pred, const char* what) {
  if (!cv.wait_until(lk, deadline(), pred)) fail("deadlock", where() + " waited too long at " + what);
}

inline const char* op_name(Op o) {
  return o == Op::kSyncwarp ? "__syncwarp" : o == Op::kShfl ? "__shfl*_sync" : "vote";
}

// One warp collective: every existing lane named in `mask` must arrive with the same mask, at the
// same intrinsic and call site (__syncwarp may differ in site). Returns this lane's result: the value
// of lane `src` for shuffles, the ballot of `val != 0` over the mask for votes.
inline uint64_t warp_collective(Op op, uint32_t mask, uint64_t val, int src, const char* file, int line) {
  Grid& g = grid_ctx();
  Warp& w = g.warps[ctx.tid / 32];
  const int lane = ctx.tid % 32;
  const auto site = [&] {  // built only to report an error
    return std::string(op_name(op)) + "(mask=" + std::to_string(mask) + ") at " + file + ":" + std::to_string(line) +
           ", lane " + std::to_string(lane) + ", " + where();
  };
  std::unique_lock<std::mutex> lk(w.m);
  if (!(mask >> lane & 1u)) fail("divergent warp collective", "calling lane not in mask: " + site());
  const uint32_t need = mask & w.exists;
  if (need & w.exited) fail("divergent warp collective", "mask names lanes that already returned: " + site());
  if (need & w.at_barrier) fail("divergent warp collective", "mask names lanes waiting at __syncthreads: " + site());
  for (int k = 0; k < 32; ++k) {
    if (!w.wait_mask[k] || !((need >> k & 1u) || (w.wait_mask[k] >> lane & 1u))) continue;
    if (w.wait_mask[k] != mask || w.op[k] != op ||
        (op != Op::kSyncwarp && (w.line[k] != line || std::strcmp(w.file[k], file))))
      fail("divergent warp collective", site() + " meets lane " + std::to_string(k) + " in " + op_name(w.op[k]) +
                                            "(mask=" + std::to_string(w.wait_mask[k]) + ") at " + w.file[k] + ":" +
                                            std::to_string(w.line[k]));
  }
  w.wait_mask[lane] = mask, w.op[lane] = op, w.file[lane] = file, w.line[lane] = line;
  w.val[lane] = val, w.src[lane] = src;
  bool all = true;
  for (int k = 0; k < 32; ++k) all = all && (!(need >> k & 1u) || w.wait_mask[k] == mask);
  if (all) {  // last to arrive computes everyone's result and releases them
    uint64_t ballot = 0;
    for (int k = 0; k < 32; ++k) ballot |= (uint64_t)((need >> k & 1u) && w.val[k] != 0) << k;
    for (int k = 0; k < 32; ++k) {
      if (!(need >> k & 1u)) continue;
      if (op == Op::kShfl && w.src[k] != k && !(need >> w.src[k] & 1u))
        fail("divergent warp collective",
             "lane " + std::to_string(k) + " reads lane " + std::to_string(w.src[k]) + " outside the mask: " + site());
      w.res[k] = op == Op::kShfl ? w.val[w.src[k]] : ballot;
      w.wait_mask[k] = 0;
      ++w.epoch[k];
    }
    w.cv.notify_all();
    return w.res[lane];
  }
  const uint64_t e = w.epoch[lane];
  wait_until(lk, w.cv, [&] { return w.epoch[lane] != e; }, op_name(op));
  return w.res[lane];
}

// Checks, under the warp lock, that no warp-mate waits in a collective that names this thread.
inline void leave_warp(bool to_barrier) {
  Warp& w = grid_ctx().warps[ctx.tid / 32];
  const int lane = ctx.tid % 32;
  std::lock_guard<std::mutex> lk(w.m);
  for (int k = 0; k < 32; ++k)
    if (w.wait_mask[k] >> lane & 1u)
      fail("divergent warp collective", "lane " + std::to_string(lane) +
                                            (to_barrier ? " went to __syncthreads" : " returned") + " while lane " +
                                            std::to_string(k) + " waits in " + op_name(w.op[k]) + " at " + w.file[k] +
                                            ":" + std::to_string(w.line[k]) + " naming it, " + where());
  (to_barrier ? w.at_barrier : w.exited) |= 1u << lane;
}

// __syncthreads with a count of true predicates (for the _count/_and/_or variants).
inline int block_barrier(int pred) {
  Grid& g = grid_ctx();
  leave_warp(true);
  std::unique_lock<std::mutex> lk(g.m);
  if (g.exited)
    fail("divergent __syncthreads",
         where() + " reached __syncthreads after " + std::to_string(g.exited) + " threads of its block returned");
  g.count += pred != 0;
  if (++g.arrived == g.nthreads) {
    for (Warp& w : g.warps) {
      std::lock_guard<std::mutex> wl(w.m);
      w.at_barrier = 0;
    }
    g.last_count = g.count, g.count = 0, g.arrived = 0, ++g.gen;
    g.cv.notify_all();
    return g.last_count;
  }
  const uint64_t gen = g.gen;
  wait_until(lk, g.cv, [&] { return g.gen != gen; }, "__syncthreads");
  return g.last_count;
}

// A thread returned from the kernel: nobody may still wait for it; the last one starts the next block.
inline void thread_exit() {
  Grid& g = *ctx.g;
  leave_warp(false);
  std::unique_lock<std::mutex> lk(g.m);
  if (g.arrived)
    fail("divergent __syncthreads",
         where() + " returned while " + std::to_string(g.arrived) + " threads of its block wait at __syncthreads");
  const uint64_t b = g.blocks_done;
  if (b + 1 == g.nblocks) {  // last block: nothing to wait for (saves a wake-up per thread)
    ++g.exited;
    return;
  }
  if (++g.exited == g.nthreads) {
    for (Warp& w : g.warps) {
      std::lock_guard<std::mutex> wl(w.m);
      w.exited = w.at_barrier = 0;
    }
    std::fill(g.smem.begin(), g.smem.end(), 0xff);  // uninitialised shared memory reads as NaN / -1
    g.exited = 0, ++g.blocks_done;
    g.cv.notify_all();
    return;
  }
  wait_until(lk, g.cv, [&] { return g.blocks_done != b; }, "the end of its block");
}

inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
}  // namespace trous_emu

// ---- CUDA built-ins
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

inline void __syncthreads() { trous_emu::block_barrier(0); }
inline int __syncthreads_count(int p) { return trous_emu::block_barrier(p); }
inline int __syncthreads_and(int p) { return trous_emu::block_barrier(p) == (int)trous_emu::grid_ctx().nthreads; }
inline int __syncthreads_or(int p) { return trous_emu::block_barrier(p) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  trous_emu::warp_collective(trous_emu::Op::kSyncwarp, mask, 0, 0, f, l);
}

namespace trous_emu {
// Shuffle of any trivially copyable value of up to 8 bytes; `src` is the absolute source lane.
template <typename T>
T shfl(unsigned mask, T var, int src, const char* f, int l) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(Op::kShfl, mask, bits, src, f, l);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}
inline int lane() { return ctx.tid % 32; }
// Source lanes as PTX shfl computes them: within the caller's width-sized segment, else itself.
inline int seg_src(int s, int width) {
  const int lo = lane() & ~(width - 1);
  return s >= lo && s < lo + width ? s : lane();
}
}  // namespace trous_emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, const char* f = __builtin_FILE(),
              int l = __builtin_LINE()) {
  return trous_emu::shfl(mask, v, (trous_emu::lane() & ~(width - 1)) | (src & (width - 1)), f, l);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int m, int width = warpSize, const char* f = __builtin_FILE(),
                  int l = __builtin_LINE()) {
  return trous_emu::shfl(mask, v, trous_emu::seg_src(trous_emu::lane() ^ m, width), f, l);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = warpSize, const char* f = __builtin_FILE(),
                   int l = __builtin_LINE()) {
  return trous_emu::shfl(mask, v, trous_emu::seg_src(trous_emu::lane() + (int)d, width), f, l);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = warpSize, const char* f = __builtin_FILE(),
                 int l = __builtin_LINE()) {
  return trous_emu::shfl(mask, v, trous_emu::seg_src(trous_emu::lane() - (int)d, width), f, l);
}
inline unsigned __ballot_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (unsigned)trous_emu::warp_collective(trous_emu::Op::kVote, mask, p != 0, 0, f, l);
}
inline int __any_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return __ballot_sync(mask, p, f, l) != 0;
}
inline int __all_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return __ballot_sync(mask, p, f, l) == (mask & trous_emu::grid_ctx().warps[trous_emu::ctx.tid / 32].exists);
}

// Atomics: GCC builtins (TSan understands them; std::atomic_ref needs C++20). acq_rel rather than
// CUDA's relaxed because TSan cannot model __threadfence, which correct code pairs with them.
namespace trous_emu {
template <typename T> struct same {
  using type = T;
};  // non-deduced: atomicAdd(unsigned*, 1) must work
template <typename T, typename F>
T atomic_update(T* p, F f) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T want = f(old);
  while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) want = f(old);
  return old;
}
}  // namespace trous_emu
#define TROUS_EMU_ATOMIC(name, expr)                                        \
  template <typename T> T name(T* p, typename trous_emu::same<T>::type v) { \
    return trous_emu::atomic_update(p, [v](T o) { return (T)(expr); });     \
  }
TROUS_EMU_ATOMIC(atomicAdd, o + v)
TROUS_EMU_ATOMIC(atomicSub, o - v)
TROUS_EMU_ATOMIC(atomicMax, o < v ? v : o)
TROUS_EMU_ATOMIC(atomicMin, v < o ? v : o)
TROUS_EMU_ATOMIC(atomicExch, ((void)o, v))
TROUS_EMU_ATOMIC(atomicAnd, o& v)
TROUS_EMU_ATOMIC(atomicOr, o | v)
#undef TROUS_EMU_ATOMIC
template <typename T> T atomicCAS(T* p, typename trous_emu::same<T>::type cmp, typename trous_emu::same<T>::type v) {
  __atomic_compare_exchange(p, &cmp, &v, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  return cmp;  // the old value either way
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Device math the host headers lack (the ones that exist only under __CUDACC__).
template <typename T> T __ldg(const T* p) { return *p; }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline unsigned __float2uint_rn(float x) { return (unsigned)std::nearbyint(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x != x ? 0.f : std::min(std::max(x, 0.f), 1.f); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
using std::isfinite;
using std::max;
using std::min;

namespace trous_emu {
// Worker threads outlive launches: creating 256 threads per launch costs ~0.4 s under TSan.
// Workers 0..n-1 run a job; the caller waits until all of them have returned from it.
class Pool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lk(m_);
    while ((int)workers_.size() < n) workers_.emplace_back(&Pool::loop, this, (int)workers_.size());
    fn_ = &fn, active_ = running_ = n, ++job_;
    work_.notify_all();
    done_.wait(lk, [&] { return running_ == 0; });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    work_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      work_.wait(lk, [&] { return stop_ || job_ != seen; });
      if (stop_) return;
      seen = job_;
      if (id >= active_) continue;
      const std::function<void(int)>* fn = fn_;
      lk.unlock();
      (*fn)(id);
      lk.lock();
      if (--running_ == 0) done_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable work_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* fn_ = nullptr;
  int active_ = 0, running_ = 0;
  uint64_t job_ = 0;
  bool stop_ = false;
};

inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  static Pool pool;
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> lk(one_launch_at_a_time);
  const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
  const int n = (int)(block.x * block.y * block.z);
  const Device& d = device();
  if (!nblocks || !n || n > d.max_threads_per_block || smem_bytes > (size_t)d.smem_per_block_optin ||
      grid.x > (unsigned)d.max_grid[0] || grid.y > (unsigned)d.max_grid[1] || grid.z > (unsigned)d.max_grid[2] ||
      block.x > (unsigned)d.max_block[0] || block.y > (unsigned)d.max_block[1] || block.z > (unsigned)d.max_block[2])
    fail("bad launch", "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                           std::to_string(grid.z) + ") of blocks (" + std::to_string(block.x) + ", " +
                           std::to_string(block.y) + ", " + std::to_string(block.z) + "), " +
                           std::to_string(smem_bytes) + " B dynamic shared memory (cudaErrorInvalidConfiguration)");
  Grid g;
  g.grid = grid, g.block = block, g.nthreads = n, g.nblocks = nblocks;
  g.smem.assign(smem_bytes, 0xff);
  g.warps = std::vector<Warp>((n + 31) / 32);
  for (int t = 0; t < n; ++t) g.warps[t / 32].exists |= 1u << (t % 32);
  // Each CUDA thread of the block is one worker; it runs the kernel for every block in turn.
  pool.run(n, [&g, &body, nblocks](int t) {
    ctx = ThreadCtx{&g, t, 0};
    threadIdx = make_uint3(t % g.block.x, t / g.block.x % g.block.y, t / (g.block.x * g.block.y));
    blockDim = g.block, gridDim = g.grid;
    for (uint64_t b = 0; b < nblocks; ++b) {
      ctx.block = b;
      blockIdx = make_uint3(b % g.grid.x, b / g.grid.x % g.grid.y, b / ((uint64_t)g.grid.x * g.grid.y));
      body();
      thread_exit();
    }
    ctx = ThreadCtx{};
  });
}

// cudaFuncAttributeMaxDynamicSharedMemorySize of each kernel (cudaFuncSetAttribute), by address.
inline std::map<const void*, int>& max_dynamic_smem() {
  static std::map<const void*, int> m;
  return m;
}

// What the launchers launched (TROUS_LAUNCH only, not trous_emu::launch): kernel name, grid, block,
// dynamic shared memory and the converted arguments, so that a test can report and check the
// configuration the real launch policy chose. Tests clear it when they like.
struct LaunchRecord {
  std::string kernel;  // e.g. "quantize_token_lanes<float, true, 4>" (namespaces dropped)
  dim3 grid, block;
  size_t smem = 0;
  std::vector<std::any> args;
  // The i-th kernel argument of type T (counting those of type T only), or null.
  template <typename T>
  const T* arg(int i = 0) const {
    for (const std::any& a : args)
      if (const T* p = std::any_cast<T>(&a))
        if (i-- == 0) return p;
    return nullptr;
  }
};
inline std::vector<LaunchRecord>& launches() {
  static std::vector<LaunchRecord> v;
  return v;
}

// kernel<<<grid, block, smem_bytes>>>(args...): arguments are converted to the parameter types once,
// like cudaLaunchKernel copying them, and every thread gets its own by-value copy. Above the default
// 48 KiB, the kernel must have opted in (cudaFuncSetAttribute), as on the GPU.
template <typename... P, typename... A>
void launch_smem(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  if (smem_bytes > (size_t)device().smem_per_block) {
    const auto it = max_dynamic_smem().find(reinterpret_cast<const void*>(kernel));
    if (it == max_dynamic_smem().end() || smem_bytes > (size_t)it->second)
      fail("bad launch", std::to_string(smem_bytes) + " B dynamic shared memory, above " +
                             std::to_string(device().smem_per_block) +
                             " B, without cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) to at "
                             "least that (cudaErrorInvalidValue)");
  }
  run_grid(grid, block, smem_bytes, [&] { std::apply(kernel, params); });
}
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  launch_smem(kernel, grid, block, 0, std::forward<A>(args)...);
}

// "trous::kv::quantize_token_lanes<float, true, 4>" -> "quantize_token_lanes<float, true, 4>".
template <auto K>
std::string kernel_name() {
  std::string s = __PRETTY_FUNCTION__;  // "... [with auto K = NAME; ...]" (g++) or "[K = NAME]" (clang)
  const size_t b = s.find("K = ");
  if (b == std::string::npos) return s;
  s = s.substr(b + 4);
  s = s.substr(0, s.find_first_of(";]"));
  if (s.rfind("& ", 0) == 0) s = s.substr(2);
  const size_t lt = s.find('<'), colon = s.rfind("::", lt);
  return colon == std::string::npos ? s : s.substr(colon + 2);
}

// TROUS_LAUNCH(grid, block, smem, stream, kernel)(args...): the stream is ignored (launches are
// synchronous); the launch is recorded in launches(), then run.
template <auto K>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    run(K, std::forward<A>(args)...);
  }

 private:
  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) const {
    static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    LaunchRecord r{kernel_name<K>(), grid, block, smem, {}};
    std::apply([&r](const auto&... p) { r.args = {std::any(p)...}; }, params);
    launches().push_back(std::move(r));
    std::apply([&](const auto&... p) { launch_smem(kernel, grid, block, smem, p...); }, params);
  }
};
template <auto K>
Launcher<K> launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launcher<K>{grid, block, smem};
}

// The error cudaGetLastError returns (and resets): set by a failed runtime call. A launch that would
// fail on the GPU stops the program instead ("trous-emu: bad launch").
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) last_error() = e;
  return e;
}
}  // namespace trous_emu

// ---- CUDA runtime stand-ins: the calls the launchers make, on the emulated device 0.
extern "C" {
inline cudaError_t cudaGetLastError(void) {
  const cudaError_t e = trous_emu::last_error();
  trous_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError(void) { return trous_emu::last_error(); }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaError (emulated)";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error (emulated)";
  }
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int dev) {
  if (dev != 0) return trous_emu::set_error(cudaErrorInvalidDevice);
  const trous_emu::Device& d = trous_emu::device();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = d.max_threads_per_block; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.max_threads_per_sm; break;
    case cudaDevAttrMaxBlockDimX: *value = d.max_block[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = d.max_block[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = d.max_block[2]; break;
    case cudaDevAttrMaxGridDimX: *value = d.max_grid[0]; break;
    case cudaDevAttrMaxGridDimY: *value = d.max_grid[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = d.max_grid[2]; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = d.regs_per_block; break;
    case cudaDevAttrL2CacheSize: *value = d.l2_bytes; break;
    case cudaDevAttrWarpSize: *value = warpSize; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; break;
    default:  // an answer made up here could hide a launcher bug: add the attribute to Device
      trous_emu::fail("unsupported", "cudaDeviceGetAttribute(" + std::to_string((int)attr) + ") is not emulated");
  }
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (!func) return trous_emu::set_error(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    trous_emu::fail("unsupported", "cudaFuncSetAttribute(" + std::to_string((int)attr) + ") is not emulated");
  if (value < 0 || value > trous_emu::device().smem_per_block_optin) return trous_emu::set_error(cudaErrorInvalidValue);
  trous_emu::max_dynamic_smem()[func] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  if (count) std::memset(p, value, count);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind, cudaStream_t) {
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
}  // extern "C"
// The C++ overload cuda_runtime.h declares only under nvcc: a kernel by its function pointer.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, enum cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
