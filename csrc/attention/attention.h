// Torch-free parameters of the sparse attention CUDA kernels (attention_kernels.cuh, launchers in
// attention_cuda.{h,cu}). The op layer (attention_ops.cpp) fills them from the tensors and the Pattern
// it builds (attention/pattern.h); the CUDA emulation tests fill them by hand.
//
// Layouts: q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), out and every gradient of the same shape as its
// tensor, each with its own (batch, seq, head) strides in elements and a contiguous last dimension.
// lse is fp32 (B, Hq, Sq), contiguous. Pointers are device pointers of the element type the launcher
// is called with (fp16, bf16 or fp32); Pattern's arrays (global_flags / keys / rows) are device arrays.
#pragma once
#include "attention/pattern.h"
#include "trous/common.h"

namespace trous {
namespace attention {

// Strides in elements of one (B, S, H, D) tensor with a contiguous last dimension.
struct BSHStrides {
  index_t b, s, h;
};

struct AttnFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // (B, Sq, Hq, D)
  float* lse = nullptr;  // (B, Hq, Sq) contiguous, natural log; -inf for fully masked rows (out 0 there)
  index_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0;
  BSHStrides sq{}, sk{}, sv{}, so{};  // of q, k, v, out
  float scale = 1.f;                  // s = scale * q.k
  float softcap = 0.f;                // > 0: s -> softcap * tanh(s / softcap) (before masking); 0 = off
  Pattern pattern{};
};

struct AttnBwdParams {
  const void* grad_out = nullptr;  // (B, Sq, Hq, D)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;   // the forward's output
  const float* lse = nullptr;  // the forward's lse, (B, Hq, Sq) contiguous
  void* grad_q = nullptr;      // (B, Sq, Hq, D)
  void* grad_k = nullptr;      // (B, Sk, Hkv, D)
  void* grad_v = nullptr;      // (B, Sk, Hkv, D)
  index_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0;
  BSHStrides sdo{}, sq{}, sk{}, sv{}, so{}, sdq{}, sdk{}, sdv{};  // of grad_out, q, k, v, out, grad_q/k/v
  float scale = 1.f;
  float softcap = 0.f;
  Pattern pattern{};
  // Device memory of sparse_attention_bwd_workspace_bytes(*this) bytes (attention_cuda.h), any
  // content, 256-byte aligned; the launcher owns its layout.
  void* workspace = nullptr;
};

}  // namespace attention
}  // namespace trous
