// CPU kernel of kv_append (the storage and residual rule of cache.h), and the row kernels of the bulk
// quantizers (defined in quantize_cpu.cpp) that it calls: appended codes and parameters are produced
// by the very functions that produce the bulk ops' codes, so they are bit-identical to
// kv_quantize / kv_quantize_channel / kv_quantize_fp8 applied to the same group.
#pragma once
#include "kvcache/cache_params.h"
#include "kvcache/quantize.h"
#include "trous/common.h"

namespace trous {
namespace kv {

// Appends p.n_new tokens of p.k / p.v to every sequence of p.cache (see AppendParams). The caller
// has validated everything, lengths and block table entries included (append_ops.cpp).
void cpu_kv_append(const AppendParams& p);

// ---- Row kernels of the bulk quantizers (quantize_cpu.cpp), AVX2 or scalar as the bulk ops pick.

// n (token, head) rows of a.in.D fp32 values (row i at rows[i]) in groups of a.group channels: the
// parameters of group g of row i at group index row_index[i] * (D / G) + g of `params` (pairs
// (scale, min) unless a.symmetric), its codes at dst[i] (D * bits / 8 bytes, or D for symmetric int8).
// Uses a.in.D only of a.in. Up to 8 rows per call let the AVX2 path compute 8 groups' parameters at once.
void cpu_quantize_token_rows(const float* const* rows, const index_t* row_index, uint8_t* const* dst, index_t n,
                             const TokenQuantArgs& a, void* params);

// KIVI keys: one token group of a.group rows of a.in.D fp32 values (`tile`, row-major): the D
// (scale, min) pairs at pair index p0 + c of `params`, the codes of row t at dst + t * D * bits / 8.
void cpu_quantize_key_group(const float* tile, const ChannelQuantArgs& a, void* params, index_t p0, uint8_t* dst);

// fp8: D values divided by `scale` and encoded (D bytes at dst).
void cpu_quantize_fp8_row(const float* row, float scale, Fp8Format format, index_t D, uint8_t* dst);

}  // namespace kv
}  // namespace trous
