// Torch-free parameters of the cache kernels (kv_append, quantized_decode_attention) shared by the
// op layer, the CPU kernels, the CUDA launchers (cache_cuda.h) and the emulation tests. The storage
// and the residual rule are those of cache.h. Pointers are device pointers on CUDA.
#pragma once
#include "kvcache/cache.h"
#include "trous/common.h"
#include "trous/dtype.h"

namespace trous {
namespace kv {

// One layer's cache, as laid out in cache.h (every tensor contiguous).
struct CacheRef {
  CacheFormat fmt{};
  PageMap map{};            // block_table nullptr = contiguous (page b, page_size = T_max)
  void* k_codes = nullptr;  // uint8 (int8 for symmetric int8)
  void* v_codes = nullptr;
  // Integer schemes: group parameters (fp32 or fp16 per fmt.param_type). fp8: the fixed fp32 scale,
  // one value or one per KV head (fp8_scale_per_head).
  void* k_params = nullptr;
  void* v_params = nullptr;
  bool fp8_scale_per_head = false;
  void* k_residual = nullptr;  // [batch, Hkv, residual_capacity(fmt), D] in `act`
  void* v_residual = nullptr;
  int32_t* lengths = nullptr;   // [batch]: tokens held per sequence
  index_t batch = 0;            // sequences addressed by this call (rows of lengths / block_table / residual)
  DType act = DType::kFloat32;  // activation dtype (residual, new K / V, q, out)
};

// Strides in elements of a [B, H, T, D] activation tensor with a contiguous last dimension.
struct BHTStrides {
  index_t b = 0, h = 0, t = 0;
};

// kv_append: k, v [batch, Hkv, n_new, D] are appended to every sequence b at positions
// [lengths[b], lengths[b] + n_new); tokens that the residual rule moves out of the residual (old
// residual tokens and new ones) are quantized, the rest written to the residual ring, and
// lengths[b] += n_new. The caller has checked that lengths[b] + n_new fits the sequence's pages.
struct AppendParams {
  CacheRef cache{};
  const void* k = nullptr;
  const void* v = nullptr;
  BHTStrides sk{}, sv{};
  index_t n_new = 0;
};

// quantized_decode_attention: q [batch, Hq, Sq, D] (Hq % Hkv == 0); query s of sequence b sits at
// position lengths[b] - Sq + s and attends cache tokens [0, that position] (the new tokens were
// appended first). out [batch, Hq, Sq, D] contiguous in `act`; lse fp32 [batch, Hq, Sq] contiguous,
// natural log; a query with no key (position < 0) gives out 0 and lse -inf.
struct DecodeParams {
  CacheRef cache{};
  const void* q = nullptr;
  BHTStrides sq{};
  void* out = nullptr;
  float* lse = nullptr;
  index_t Hq = 0, Sq = 0;
  float scale = 1.f;    // s = scale * q.k
  float softcap = 0.f;  // > 0: s -> softcap * tanh(s / softcap); 0 = off
  // Device memory of decode_workspace_bytes(params) bytes (cache_cuda.h) for split-KV partial results;
  // the launcher owns its layout.
  void* workspace = nullptr;
};

}  // namespace kv
}  // namespace trous
