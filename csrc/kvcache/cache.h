// The quantized KV cache of one layer: where every token's codes, parameters and full-precision
// residual live, and which tokens are quantized. Torch-free and TROUS_INLINE, so kv_append,
// quantized_decode_attention (CPU and CUDA) and their emulation tests address the cache through the
// same few functions. Formats and math: ../shared/spec/kvcache.md, quantize.h.
//
// Storage (every tensor contiguous, owned by trous.QuantizedKVCache):
//   codes   [pages, Hkv, page_size, code_bytes(D)]   uint8 (int8 for symmetric int8)
//   params  per-token / values: [pages, Hkv, page_size, D / G, n_params]  (fp32 or fp16)
//           KIVI keys:          [pages, Hkv, page_size / G, D, 2]       (one group of G tokens)
//           fp8:                a scale tensor [] or [Hkv] (fp32), fixed when the cache is built
//   residual [max_batch, Hkv, residual_capacity, D] in the activation dtype (a ring, see below)
//   lengths  int32 [max_batch]: tokens held per sequence (quantized + residual)
//   block_table int32 [max_batch, max_pages] (paged) or none (contiguous)
// Contiguous is the paged layout with one page per sequence: page_size = the capacity T_max and
// sequence b's page is b. Token t of sequence b lives in page block_table[b][t / page_size] at
// offset t % page_size.
//
// The residual rule (KIVI, and the same rule with a token group of 1 for every other scheme): the R
// most recent tokens always stay in full precision; older tokens are quantized in whole token
// groups (G tokens for KIVI, whose keys are quantized per channel over G tokens; 1 otherwise), each
// exactly once, never re-quantized. So with T tokens held, tokens [0, quantized_length(T)) are
// quantized and [quantized_length(T), T) are in the residual ring, at slot t % residual_capacity.
#pragma once
#include <cstdint>

#include "kvcache/quantize.h"
#include "trous/common.h"

namespace trous {
namespace kv {

enum class CacheScheme : int {
  kPerToken = 0,   // asymmetric min-max, groups of G channels per (token, head), 2/4/8 bits
  kSymmetric = 1,  // int8, s = amax / 127 per group of G channels
  kKivi = 2,       // keys per channel over G tokens, values per token over G channels; 2/4/8 bits
  kFp8 = 3,        // e4m3 / e5m2 with a fixed fp32 scale per tensor or per KV head
};

struct CacheFormat {
  CacheScheme scheme;
  int bits;              // 2, 4, 8 (integer schemes); 8 for fp8
  int64_t group;         // G: channels per group (per-token, symmetric, KIVI values); tokens per key group (KIVI)
  ParamType param_type;  // storage of scales / minima (integer schemes)
  Fp8Format fp8_format;  // kFp8 only
  int64_t head_dim;      // D
  int64_t residual;      // R: the most recent tokens kept in full precision (a multiple of G for KIVI)
};

// Tokens quantized together along the sequence: G for KIVI keys (and, to keep one residual length
// for K and V, KIVI values), 1 for every other scheme.
TROUS_INLINE int64_t token_group(const CacheFormat& f) { return f.scheme == CacheScheme::kKivi ? f.group : 1; }

// Slots of the residual ring: R plus the G - 1 tokens of an incomplete group.
TROUS_INLINE int64_t residual_capacity(const CacheFormat& f) { return f.residual + token_group(f) - 1; }

// Tokens [0, quantized_length) of a sequence holding T tokens are quantized: the largest multiple of
// the token group that leaves at least R tokens in full precision.
TROUS_INLINE int64_t quantized_length(const CacheFormat& f, int64_t T) {
  const int64_t g = token_group(f);
  return T <= f.residual ? 0 : ((T - f.residual) / g) * g;
}

TROUS_INLINE int64_t residual_slot(const CacheFormat& f, int64_t t) { return t % residual_capacity(f); }

// Bytes of one (token, head) row of codes: D * bits / 8 (int8 and fp8: D).
TROUS_INLINE int64_t code_bytes(const CacheFormat& f) { return f.head_dim * f.bits / 8; }

// Parameters per (token, head) row of per-token-style tensors: (scale, min) pairs, or one scale.
TROUS_INLINE int64_t n_params(const CacheFormat& f) { return f.scheme == CacheScheme::kSymmetric ? 1 : 2; }

// Where a sequence's pages are: block_table == nullptr means contiguous (page b, page_size = T_max).
struct PageMap {
  const int32_t* block_table;  // [max_batch, max_pages] or nullptr
  int64_t max_pages;           // row stride of block_table
  int64_t page_size;           // tokens per page (a multiple of G for KIVI)
  int64_t num_heads;           // Hkv
};

TROUS_INLINE int64_t page_of(const PageMap& m, int64_t b, int64_t t) {
  return m.block_table ? (int64_t)m.block_table[b * m.max_pages + t / m.page_size] : b;
}

// Row index of (token t of sequence b, head h) in the flattened [pages * Hkv * page_size] rows of
// codes and per-token params: multiply by code_bytes or (D / G) * n_params for the element offset.
TROUS_INLINE int64_t token_row(const PageMap& m, int64_t b, int64_t h, int64_t t) {
  return (page_of(m, b, t) * m.num_heads + h) * m.page_size + t % m.page_size;
}

// Row index of the KIVI key group holding token t in the flattened [pages * Hkv * page_size / G]
// groups of key params: multiply by D * 2 for the element offset.
TROUS_INLINE int64_t key_group_row(const PageMap& m, const CacheFormat& f, int64_t b, int64_t h, int64_t t) {
  return (page_of(m, b, t) * m.num_heads + h) * (m.page_size / f.group) + (t % m.page_size) / f.group;
}

// Row index of token t's residual slot in the flattened [max_batch * Hkv * residual_capacity] rows.
TROUS_INLINE int64_t residual_row(const CacheFormat& f, int64_t num_heads, int64_t b, int64_t h, int64_t t) {
  return (b * num_heads + h) * residual_capacity(f) + residual_slot(f, t);
}

}  // namespace kv
}  // namespace trous
