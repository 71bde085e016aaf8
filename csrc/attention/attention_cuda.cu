// CUDA launchers of the sparse attention core (kernels: attention_kernels.cuh). No torch.
#include "trous/launch.cuh"
// (launch.cuh first: it brings the CUDA runtime and half types)
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/attention_cuda.h"
#include "attention/attention_kernels.cuh"

namespace trous {
namespace attention {
namespace {

constexpr index_t kMaxGridYZ = 65535;
constexpr index_t kMaxGridX = 2147483647;

// Calls f(std::integral_constant<int, Dp>) with the smallest head-dim instance Dp >= D. (No 80: its
// dQ kernel spills 12 bytes on sm_80; D 65..96 run zero padded in the 96 instance.)
template <typename F>
void dispatch_head_dim(index_t D, F&& f) {
  if (D < 1 || D > 256)
    throw std::invalid_argument("trous.sparse_attention (CUDA): head dim D must be in [1, 256], got " +
                                std::to_string(D));
  if (D <= 32) return f(std::integral_constant<int, 32>{});
  if (D <= 64) return f(std::integral_constant<int, 64>{});
  if (D <= 96) return f(std::integral_constant<int, 96>{});
  if (D <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

[[noreturn]] void refuse_fp32_head_dim(index_t D) {
  throw std::invalid_argument("trous.sparse_attention (CUDA): float32 takes head dims up to " +
                              std::to_string(kMaxHeadDimFp32) + ", got D = " + std::to_string(D) +
                              " (use float16 or bfloat16)");
}

// 16-byte loads of a tensor: base 16-byte aligned and every row start too.
template <typename T>
bool vec_ok(const void* ptr, const BSHStrides& s) {
  constexpr index_t V = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s.b % V == 0 && s.s % V == 0 && s.h % V == 0;
}

void check_grid(index_t x, index_t y, index_t z, const char* what) {
  if (x > kMaxGridX || y > kMaxGridYZ || z > kMaxGridYZ)
    throw std::invalid_argument(std::string("trous.") + what + " (CUDA): grid of " + std::to_string(x) + " tiles x " +
                                std::to_string(y) + " heads x " + std::to_string(z) +
                                " batches exceeds the CUDA grid (heads and batch at most 65535)");
}

// Allows `bytes` of dynamic shared memory for `kernel` (opt-in above 48 KiB), or throws.
template <typename K>
void allow_smem(K* kernel, size_t bytes, const char* what) {
  int dev = 0, optin = 0;
  cuda_check(cudaGetDevice(&dev), what);
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), what);
  if (bytes > static_cast<size_t>(optin))
    throw std::runtime_error(std::string("trous.") + what + " (CUDA): needs " + std::to_string(bytes) +
                             " B of shared memory per block, the device allows " + std::to_string(optin));
  if (bytes > 48 * 1024)
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               what);
}

struct WorkspaceLayout {
  size_t delta_bytes = 0, slot_bytes = 0;
  int nslots = 0;
  DkdvSlots slots;
};

WorkspaceLayout workspace_layout(const AttnBwdParams& p) {
  WorkspaceLayout w;
  const size_t rows = static_cast<size_t>(p.B * p.Hq * p.Sq);
  w.delta_bytes = (rows * sizeof(float) + 255) / 256 * 256;
  const bool gk = p.pattern.n_global_keys > 0, gr = p.pattern.n_global_rows > 0;
  if (gk || gr) {
    w.nslots = 1 + gk + gr;
    w.slots.per = p.B * p.Hkv * p.Sk * p.D;
    w.slots.global_keys = gk ? 1 : -1;
    w.slots.all_keys = gr ? 1 + gk : -1;
    w.slot_bytes = static_cast<size_t>(w.nslots) * 2 * static_cast<size_t>(w.slots.per) * sizeof(float);
  }
  return w;
}

}  // namespace

bool sparse_attention_cuda_supported(DType dtype, index_t D) {
  return D >= 1 && D <= (dtype == DType::kFloat32 ? kMaxHeadDimFp32 : 256) &&
         (dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16);
}

void launch_sparse_attention_fwd(DType dtype, const AttnFwdParams& p, void* stream) {
  if (p.B == 0 || p.Sq == 0 || p.Hq == 0) return;
  const char* what = "sparse_attention_fwd";
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(p.D, [&](auto dp) {
      constexpr int Dp = decltype(dp)::value;
      if constexpr (sizeof(T) == 4 && Dp > kMaxHeadDimFp32) {
        refuse_fp32_head_dim(p.D);
      } else {
        const index_t tiles = num_query_tiles(p.pattern, AttnTiles<T, Dp>::kTq);
        if (tiles == 0) return;
        check_grid(tiles, p.Hq, p.B, what);
        const uint32_t vec = (vec_ok<T>(p.q, p.sq) ? kVecQ : 0u) | (vec_ok<T>(p.k, p.sk) ? kVecK : 0u) |
                             (vec_ok<T>(p.v, p.sv) ? kVecV : 0u);
        const size_t smem = fwd_smem_bytes<T, Dp>();
        allow_smem(attn_fwd_kernel<T, Dp>, smem, what);
        TROUS_LAUNCH(dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B)),
                     kAttnThreads, smem, static_cast<cudaStream_t>(stream), attn_fwd_kernel<T, Dp>)(p, vec);
      }
    });
  });
  check_launch("trous.sparse_attention_fwd");
}

size_t sparse_attention_bwd_workspace_bytes(const AttnBwdParams& p) {
  const WorkspaceLayout w = workspace_layout(p);
  return w.delta_bytes + w.slot_bytes;
}

void launch_sparse_attention_bwd(DType dtype, const AttnBwdParams& p, void* stream) {
  if (p.B == 0 || p.Hq == 0 || (p.Sq == 0 && p.Sk == 0)) return;
  const char* what = "sparse_attention_bwd";
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kFloat32 && p.D > kMaxHeadDimFp32) refuse_fp32_head_dim(p.D);
  WorkspaceLayout w = workspace_layout(p);
  float* delta = static_cast<float*>(p.workspace);
  if (w.nslots) {
    w.slots.base = reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + w.delta_bytes);
    cuda_check(cudaMemsetAsync(w.slots.base, 0, w.slot_bytes, st), what);
  }
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const index_t rows = p.B * p.Hq * p.Sq;
    if (rows > 0) {                                                   // delta = rowsum(grad_out * out)
      const index_t want = ceil_div(rows, 16 * (kAttnThreads / 32));  // 16 rows a warp
      const index_t blocks = want < (index_t{1} << 20) ? want : (index_t{1} << 20);
      TROUS_LAUNCH(static_cast<unsigned>(blocks), kAttnThreads, 0, st, attn_bwd_delta_kernel<T>)(p, delta);
    }
    dispatch_head_dim(p.D, [&](auto dp) {
      constexpr int Dp = decltype(dp)::value;
      if constexpr (sizeof(T) == 4 && Dp > kMaxHeadDimFp32) {
        refuse_fp32_head_dim(p.D);
      } else {
        using C = AttnTiles<T, Dp>;
        const uint32_t vec = (vec_ok<T>(p.q, p.sq) ? kVecQ : 0u) | (vec_ok<T>(p.k, p.sk) ? kVecK : 0u) |
                             (vec_ok<T>(p.v, p.sv) ? kVecV : 0u) | (vec_ok<T>(p.grad_out, p.sdo) ? kVecDO : 0u);
        const index_t ktiles = p.Sk > 0 ? num_key_tiles(p.pattern, C::kTkB) : 0;
        if (ktiles > 0) {
          check_grid(ktiles, p.Hkv, p.B, what);
          const dim3 grid(static_cast<unsigned>(ktiles), static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
          const size_t smem = dkdv_smem_bytes<T, Dp>();
          if constexpr (!C::kSplitDkdv) {  // dK and dV in one pass
            allow_smem(attn_bwd_dkdv_kernel<T, Dp, true, true>, smem, what);
            TROUS_LAUNCH(grid, kAttnThreads, smem, st, attn_bwd_dkdv_kernel<T, Dp, true, true>)(p, delta, w.slots, vec);
          } else {  // registers: dV, then dK (recomputing S)
            allow_smem(attn_bwd_dkdv_kernel<T, Dp, false, true>, smem, what);
            TROUS_LAUNCH(grid, kAttnThreads, smem, st, attn_bwd_dkdv_kernel<T, Dp, false, true>)(p, delta, w.slots,
                                                                                                 vec);
            allow_smem(attn_bwd_dkdv_kernel<T, Dp, true, false>, smem, what);
            TROUS_LAUNCH(grid, kAttnThreads, smem, st, attn_bwd_dkdv_kernel<T, Dp, true, false>)(p, delta, w.slots,
                                                                                                 vec);
          }
        }
        const index_t qtiles = p.Sq > 0 ? num_query_tiles(p.pattern, C::kTq) : 0;
        if (qtiles > 0) {
          check_grid(qtiles, p.Hq, p.B, what);
          const size_t smem = dq_smem_bytes<T, Dp>();
          allow_smem(attn_bwd_dq_kernel<T, Dp>, smem, what);
          TROUS_LAUNCH(dim3(static_cast<unsigned>(qtiles), static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B)),
                       kAttnThreads, smem, st, attn_bwd_dq_kernel<T, Dp>)(p, delta, vec);
        }
      }
    });
    if (w.nslots && p.Sk > 0) {  // grad_k / grad_v = sum of the key-tile kinds' partials
      const index_t n = p.B * p.Hkv * p.Sk * p.D;
      const index_t want = ceil_div(n, 16 * kAttnThreads);  // 16 elements a thread
      const index_t blocks = want < (index_t{1} << 20) ? want : (index_t{1} << 20);
      TROUS_LAUNCH(static_cast<unsigned>(blocks), kAttnThreads, 0, st, attn_bwd_finalize_kernel<T>)(p, w.slots,
                                                                                                    w.nslots);
    }
  });
  check_launch("trous.sparse_attention_bwd");
}

}  // namespace attention
}  // namespace trous
