// Deliberately broken kernels, one per failure class the emulation harness must catch, plus a
// correct kernel that must pass under every sanitizer (no false positives). Usage:
//   planted_bugs <variant>      variant in: correct oob_write smem_overflow race divergent_barrier
//                                divergent_shuffle shuffle_mask_mismatch
// A planted variant that runs to the end prints "<variant>: finished" and returns 0 (TSan then still
// exits 66 if it reported a race), so a test asserts a nonzero exit status and the report text of
// the expected mechanism.
#include "cuda_emu.h"

#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 96;  // 3 warps
constexpr int kN = 200;     // elements: not a multiple of the block, the last warp partly in range

// Correct: block-wide neighbour sum through shared memory, then a warp-shuffle reduction in which
// every lane takes part (out-of-range lanes contribute 0), a ballot, and one atomic per warp.
__global__ void correct_kernel(const float* x, float* out, float* total, unsigned* n_pos, int n) {
  __shared__ float s[kBlock];
  TROUS_DYNAMIC_SHARED(float, dyn);
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  const float v = i < n ? x[i] : 0.f;
  s[t] = v;
  dyn[t] = 2.f * v;
  __syncthreads();
  const float nb = s[(t + 1) % blockDim.x] + dyn[(t + blockDim.x - 1) % blockDim.x];
  float sum = v;
  for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
  const unsigned pos = __ballot_sync(0xffffffffu, v > 0.f);
  if (t % 32 == 0) {
    atomicAdd(total, sum);
    atomicAdd(n_pos, __popc(pos));  // int into unsigned, as CUDA's overloads allow
  }
  if (i < n) out[i] = nb;
}

// ASan: no bounds check, the grid covers more threads than elements.
__global__ void oob_write_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = 2.f * x[i % n];
}

// ASan: shared memory sized for fewer threads than the block has. (Written through a pointer, as
// kernels that carve shared memory do; direct indexing of the array is caught earlier by UBSan.)
__global__ void smem_overflow_kernel(const float* x, float* out, int n) {
  __shared__ float s[64];
  float* p = s;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  p[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) out[i] = s[(threadIdx.x + 1) % 64];
}

// TSan: reads a neighbour's shared-memory slot without the __syncthreads between write and read.
__global__ void race_kernel(const float* x, float* out, int n) {
  __shared__ float s[kBlock];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.f;
  const float nb = s[(t + 1) % blockDim.x];  // missing __syncthreads() above
  if (i < n) out[i] = nb;
}

// Emulation barrier check: threads past the end return before the block's barrier.
__global__ void divergent_barrier_kernel(const float* x, float* out, int n) {
  __shared__ float s[kBlock];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  if (i >= n) return;  // early return before __syncthreads
  s[t] = x[i];
  __syncthreads();
  out[i] = s[t] + s[t > 0 ? t - 1 : 0];
}

// Emulation mask check: a full-mask reduction that only the in-range lanes execute.
__global__ void divergent_shuffle_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float v = x[i];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    out[i] = v;
  }
}

// Emulation mask check: lanes of one warp disagree on the mask of the same shuffle.
__global__ void shuffle_mask_mismatch_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = i < n ? x[i] : 0.f;
  const unsigned mask = threadIdx.x % 32 < 16 ? 0x0000ffffu : 0xffffffffu;
  const float w = __shfl_xor_sync(mask, v, 1);
  if (i < n) out[i] = v + w;
}

int run(const char* variant) {
  std::vector<float> x(kN), out(kN, 0.f);
  for (int i = 0; i < kN; ++i) x[i] = (float)((i * 37) % 23) - 11.f;
  const dim3 grid((kN + kBlock - 1) / kBlock), block(kBlock);
  using trous_emu::launch;
  if (!std::strcmp(variant, "correct")) {
    float total = 0.f;
    unsigned n_pos = 0;
    trous_emu::launch_smem(correct_kernel, grid, block, kBlock * sizeof(float), x.data(), out.data(), &total, &n_pos,
                           kN);
    float want_total = 0.f;
    unsigned want_pos = 0;
    int bad = 0;
    for (int i = 0; i < kN; ++i) {
      want_total += x[i];
      want_pos += x[i] > 0.f;
      const int b0 = i / kBlock * kBlock, t = i % kBlock;
      const auto at = [&](int tt) { return b0 + tt < kN ? x[b0 + tt] : 0.f; };
      const float want = at((t + 1) % kBlock) + 2.f * at((t + kBlock - 1) % kBlock);
      if (out[i] != want) ++bad;
    }
    if (bad || total != want_total || n_pos != want_pos) {  // sums of small integers: exact
      std::printf("correct: WRONG (%d bad elements, total %g vs %g, positives %u vs %u)\n", bad, total, want_total,
                  n_pos, want_pos);
      return 1;
    }
    std::printf("correct: ok\n");
    return 0;
  }
  if (!std::strcmp(variant, "oob_write")) {
    launch(oob_write_kernel, grid, block, x.data(), out.data(), kN);
  } else if (!std::strcmp(variant, "smem_overflow")) {
    launch(smem_overflow_kernel, grid, block, x.data(), out.data(), kN);
  } else if (!std::strcmp(variant, "race")) {
    launch(race_kernel, grid, block, x.data(), out.data(), kN);
  } else if (!std::strcmp(variant, "divergent_barrier")) {
    launch(divergent_barrier_kernel, grid, block, x.data(), out.data(), kN);
  } else if (!std::strcmp(variant, "divergent_shuffle")) {
    launch(divergent_shuffle_kernel, grid, block, x.data(), out.data(), kN);
  } else if (!std::strcmp(variant, "shuffle_mask_mismatch")) {
    launch(shuffle_mask_mismatch_kernel, grid, block, x.data(), out.data(), kN);
  } else {
    std::fprintf(stderr, "unknown variant %s\n", variant);
    return 2;
  }
  std::printf("%s: finished\n", variant);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <variant>\n", argv[0]);
    return 2;
  }
  return run(argv[1]);
}
