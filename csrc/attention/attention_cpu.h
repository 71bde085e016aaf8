// CPU kernels of the sparse attention core (tiles and masks: attention/pattern.h).
#pragma once
#include "attention/pattern.h"
#include "trous/common.h"
#include "trous/dtype.h"

namespace trous {
namespace attention {

// Strides in elements of a (B, S, H, D) tensor whose last dimension is contiguous.
struct SeqStrides {
  index_t b, s, h;
};

// q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D) with their strides; out (B, Sq, Hq, D) contiguous; lse fp32
// (B, Hq, Sq) contiguous. Backward: grad_out / out with their strides, grad_q / grad_k / grad_v
// contiguous with the shapes of q / k / v. scale > 0; softcap 0 = off.
struct CpuAttnArgs {
  index_t B, Sq, Sk, Hq, Hkv, D;
  SeqStrides q, k, v, o, go;
  float scale, softcap;
  Pattern pat;
};

// Query rows per tile and keys per block of the CPU kernels (measured: the backward gains from longer
// key blocks, the forward does not).
constexpr index_t kCpuQueryTile = 256;
constexpr index_t kCpuKeyTile = 64;
constexpr index_t kCpuNarrowQueryTile = 32;
constexpr index_t kCpuBwdQueryTile = 128;
constexpr index_t kCpuBwdKeyTile = 128;

void cpu_sparse_attention_fwd(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                              const CpuAttnArgs& a);
void cpu_sparse_attention_bwd(DType dtype, const void* grad_out, const void* q, const void* k, const void* v,
                              const void* out, const float* lse, void* grad_q, void* grad_k, void* grad_v,
                              const CpuAttnArgs& a);

}  // namespace attention
}  // namespace trous
