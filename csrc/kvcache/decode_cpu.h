// Torch-free declaration of the CPU kernel of quantized_decode_attention (decode_cpu.cpp); the same
// DecodeParams as the CUDA launcher (cache_cuda.h), so the op layer treats both devices alike.
#pragma once
#include "kvcache/cache_params.h"

namespace trous {
namespace kv {

// Decode attention over the quantized cache plus its residual ring (cache.h), every format, both
// layouts. p.workspace is unused on CPU (split-KV partials are allocated by the kernel).
void cpu_quantized_decode(const DecodeParams& p);

// Number of token splits per (sequence, KV head) the CPU kernel uses for `threads` threads (split-KV
// when batch * Hkv is too small to keep the threads busy); exposed for the tests.
index_t cpu_decode_splits(index_t batch_heads, index_t max_len, index_t threads);

}  // namespace kv
}  // namespace trous
