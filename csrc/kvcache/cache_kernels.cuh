// CUDA kernels of the quantized KV cache in use: kv_append (quantize a step's K and V into the cache,
// one launch for a whole layer) and quantized_decode_attention (split-KV decode attention straight
// from the codes). Torch-free: compiled by nvcc (cache_cuda.cu) and by g++ through the emulation
// header (tests/kvcache/cache_emu.cpp). The storage, the residual rule and the addressing are those
// of cache.h; the quantization math is quantize.h's (bit-identical to the CPU kernels).
//
// Every format works on "packs" of 8 consecutive channels (D % 8 == 0 and G % 8 == 0, checked by the
// op layer): the codes of a pack are `bits` bytes, loaded / stored with one access.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kvcache/cache.h"
#include "kvcache/cache_params.h"
#include "kvcache/quantize_kernels.cuh"
#include "trous/common.h"
#include "trous/convert.cuh"

namespace trous {
namespace kv {

constexpr int kAppendThreads = 256;
constexpr int kDecodeThreads = 128;
constexpr int kDecodeTile = 32;     // cache tokens per tile of the decode block: one per lane of a warp
constexpr int kDecodeMaxRows = 32;  // query rows ((Hq / Hkv) * Sq) per decode block

static_assert(kDecodeTile == 32 && kDecodeThreads % 32 == 0, "the decode softmax maps a tile onto a warp");

// ---------------------------------------------------------------- kv_append

// Row of token t of head h of sequence b before the append: in the residual ring (t < L, the old
// tokens) or in the new input (t >= L).
template <typename T>
TROUS_DEVICE inline const T* append_row(const CacheFormat& f, index_t H, const T* ring, const T* x, BHTStrides sx,
                                        index_t b, index_t h, index_t t, index_t L) {
  return t < L ? ring + residual_row(f, H, b, h, t) * f.head_dim : x + b * sx.b + h * sx.h + (t - L) * sx.t;
}

// Quantizes tokens [q0, q1) of every head of sequence b into one tensor (keys or values) of the cache.
// One work item is independent of all others (no collective), so the block-stride loops need no
// uniform trip count.
template <typename T>
TROUS_DEVICE void append_quantize(const CacheFormat& f, const PageMap& m, bool keys, uint8_t* __restrict__ codes,
                                  void* __restrict__ params, bool fp8_per_head, const T* ring, const T* x,
                                  BHTStrides sx, index_t b, index_t L, index_t q0, index_t q1, float limit) {
  const index_t H = m.num_heads, D = f.head_dim, G = f.group;
  const index_t packs = D / kPack, cb = code_bytes(f);
  const index_t n_tok = q1 - q0;
  if (n_tok <= 0) return;
  if (f.scheme == CacheScheme::kFp8) {
    const index_t n = H * n_tok * packs;
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
      const index_t j = i % packs, t = q0 + (i / packs) % n_tok, h = i / (packs * n_tok);
      const float s = static_cast<const float*>(params)[fp8_per_head ? h : 0];
      const bool ok = fp8_scale_ok(s);  // an invalid scale gives NaN codes, as the bulk kernels
      const T* src = append_row(f, H, ring, x, sx, b, h, t, L) + j * kPack;
      uint32_t q[kPack];
#pragma unroll
      for (int e = 0; e < kPack; ++e) q[e] = ok ? float_to_fp8(to_float(src[e]) / s, f.fp8_format) : 0x7fu;
      store_codes(codes + token_row(m, b, h, t) * cb + j * kPack, q, 8);
    }
    return;
  }
  if (keys && f.scheme == CacheScheme::kKivi) {  // per channel over each group of G tokens
    const index_t n_groups = n_tok / G;          // q0, q1 are multiples of G
    const index_t n = H * n_groups * packs;
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
      const index_t j = i % packs, t0 = q0 + ((i / packs) % n_groups) * G, h = i / (packs * n_groups);
      float mn[kPack], mx[kPack];
      bool finite[kPack];
      for (index_t t = 0; t < G; ++t) {
        const T* src = append_row(f, H, ring, x, sx, b, h, t0 + t, L) + j * kPack;
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          const float v = to_float(src[e]);
          mn[e] = t == 0 ? v : fminf(mn[e], v);
          mx[e] = t == 0 ? v : fmaxf(mx[e], v);
          finite[e] = (t == 0 || finite[e]) && isfinite(v);
        }
      }
      AsymParams pr[kPack];
      const index_t p0 = (key_group_row(m, f, b, h, t0) * D + j * kPack) * 2;
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        pr[e] = asym_params(mn[e], mx[e], finite[e], f.bits, f.param_type, limit);
        store_param(params, p0 + 2 * e, pr[e].scale, f.param_type);
        store_param(params, p0 + 2 * e + 1, pr[e].zero, f.param_type);
      }
      for (index_t t = 0; t < G; ++t) {
        const T* src = append_row(f, H, ring, x, sx, b, h, t0 + t, L) + j * kPack;
        uint32_t q[kPack];
#pragma unroll
        for (int e = 0; e < kPack; ++e) q[e] = finite[e] ? asym_code(to_float(src[e]), pr[e], f.bits) : 0u;
        store_codes(codes + token_row(m, b, h, t0 + t) * cb + j * f.bits, q, f.bits);
      }
    }
    return;
  }
  // Per-token groups of G channels: per-token, symmetric int8, KIVI values. One thread per group.
  const bool sym = f.scheme == CacheScheme::kSymmetric;
  const index_t n_cg = D / G, np = n_params(f);
  const index_t n = H * n_tok * n_cg;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
    const index_t g = i % n_cg, t = q0 + (i / n_cg) % n_tok, h = i / (n_cg * n_tok);
    const T* src = append_row(f, H, ring, x, sx, b, h, t, L) + g * G;
    float mn = to_float(src[0]), mx = mn, amax = fabsf(mn);
    bool finite = true;
    for (index_t c = 0; c < G; ++c) {
      const float v = to_float(src[c]);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
      amax = fmaxf(amax, fabsf(v));
      finite = finite && isfinite(v);
    }
    const index_t row = token_row(m, b, h, t);
    const index_t pi = (row * n_cg + g) * np;
    float inv = 0.f;
    AsymParams pr{};
    if (sym) {
      const float s = sym_scale(amax, finite, f.param_type, limit);
      inv = sym_inv(s);
      store_param(params, pi, s, f.param_type);
    } else {
      pr = asym_params(mn, mx, finite, f.bits, f.param_type, limit);
      store_param(params, pi, pr.scale, f.param_type);
      store_param(params, pi + 1, pr.zero, f.param_type);
    }
    uint8_t* dst = codes + row * cb + g * G * f.bits / 8;
    for (index_t c = 0; c < G; c += kPack) {
      uint32_t q[kPack];
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        const float v = to_float(src[c + e]);
        q[e] = !finite ? 0u : sym ? (uint32_t)(sym_code(v, inv) & 0xff) : asym_code(v, pr, f.bits);
      }
      store_codes(dst + c * f.bits / 8, q, f.bits);
    }
  }
}

// Copies the new tokens [max(q1, L), L + n) of every head into the residual ring.
template <typename T>
TROUS_DEVICE void append_ring(const CacheFormat& f, index_t H, T* ring, const T* x, BHTStrides sx, index_t b, index_t L,
                              index_t first, index_t end) {
  const index_t D = f.head_dim, n_tok = end - first;
  if (n_tok <= 0) return;
  const index_t n = H * n_tok * D;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
    const index_t d = i % D, t = first + (i / D) % n_tok, h = i / (D * n_tok);
    ring[residual_row(f, H, b, h, t) * D + d] = x[b * sx.b + h * sx.h + (t - L) * sx.t + d];
  }
}

// One block per sequence, all KV heads, K and V: the block reads lengths[b], quantizes the tokens the
// residual rule moves out of the ring (old ring tokens and new ones), then (after a barrier, since a
// long prefill can wrap onto ring slots still being read) writes the new tokens that stay in full
// precision into the ring, and finally sets lengths[b] += n_new. One block owns the sequence, so
// nothing else reads lengths[b] while it changes. The op layer cannot check lengths on the device
// without a host sync: a sequence whose lengths[b] + n_new does not fit its `capacity` tokens (or is
// negative) is left unchanged, lengths included, rather than written out of bounds.
template <typename T>
__global__ void __launch_bounds__(kAppendThreads) kv_append_kernel(AppendParams p, float limit, index_t capacity) {
  const CacheRef& c = p.cache;
  const CacheFormat& f = c.fmt;
  const index_t b = blockIdx.x, H = c.map.num_heads;
  const index_t L = c.lengths[b], T1 = L + p.n_new;
  if (L < 0 || T1 > capacity) return;  // block-uniform: before any barrier
  const index_t q0 = quantized_length(f, L), q1 = quantized_length(f, T1);
  T* k_ring = static_cast<T*>(c.k_residual);
  T* v_ring = static_cast<T*>(c.v_residual);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  append_quantize<T>(f, c.map, true, static_cast<uint8_t*>(c.k_codes), c.k_params, c.fp8_scale_per_head, k_ring, k,
                     p.sk, b, L, q0, q1, limit);
  append_quantize<T>(f, c.map, false, static_cast<uint8_t*>(c.v_codes), c.v_params, c.fp8_scale_per_head, v_ring, v,
                     p.sv, b, L, q0, q1, limit);
  __syncthreads();
  const index_t first = q1 > L ? q1 : L;
  append_ring<T>(f, H, k_ring, k, p.sk, b, L, first, T1);
  append_ring<T>(f, H, v_ring, v, p.sv, b, L, first, T1);
  if (threadIdx.x == 0) c.lengths[b] = (int32_t)T1;  // every thread read lengths[b] before the barrier
}

// ---------------------------------------------------------------- quantized_decode_attention

// Split-KV plan, computed on the host (decode_plan in cache_cuda.cu): the tokens [0, L) of every
// sequence are cut into `splits` chunks of whole tiles (the chunk is computed on the device from its
// length, see decode_chunk, so short sequences of a long cache still use every split); the query rows
// of a KV head ((Hq / Hkv) * Sq, row r = g * Sq + s) into `row_blocks` blocks of `rows`.
struct DecodePlan {
  int splits = 0;
  int rows = 0;          // rows per block
  int row_blocks = 0;    // ceil(nq / rows)
  index_t nq = 0;        // query rows per KV head
  index_t capacity = 0;  // tokens a sequence can hold: a length outside [0, capacity] gives NaN rows
  bool vec = false;      // residual rings and KIVI key params 16-byte aligned: 16-byte loads
  size_t smem = 0;       // dynamic shared memory per block, bytes
};

// Tokens per split of a sequence holding L tokens: ceil(L / splits), rounded up to whole tiles.
TROUS_INLINE index_t decode_chunk(index_t L, int splits) {
  return ceil_div(ceil_div(L, (index_t)splits), kDecodeTile) * kDecodeTile;
}

// Floats of dynamic shared memory of a decode block with `rows` query rows.
TROUS_INLINE index_t decode_smem_floats(index_t rows, index_t D) {
  return rows * D                 // q
         + kDecodeTile * (D + 1)  // dequantized keys of the tile (padded: no bank conflicts)
         + kDecodeTile * D        // dequantized values
         + rows * kDecodeTile     // scores, then probabilities
         + rows * D               // output accumulators
         + 3 * rows;              // running max, sum, rescale factor
}

// The (scale, min) pairs of 8 consecutive channels (16 parameters from element i, a multiple of 16),
// with 16-byte loads when VEC.
TROUS_DEVICE inline void load_param_pairs(const void* params, index_t i, ParamType t, bool vec, float (&s)[kPack],
                                          float (&z)[kPack]) {
  if (vec && t == ParamType::kFloat32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(params) + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 w = p[k];
      s[2 * k] = w.x, z[2 * k] = w.y, s[2 * k + 1] = w.z, z[2 * k + 1] = w.w;
    }
  } else if (vec) {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(params) + i);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint4 w = p[k];
      const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[4 * k + e] = half_bits_to_float((uint16_t)(u[e] & 0xffffu));
        z[4 * k + e] = half_bits_to_float((uint16_t)(u[e] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPack; ++e)
      s[e] = load_param(params, i + 2 * e, t), z[e] = load_param(params, i + 2 * e + 1, t);
  }
}

// Dequantizes pack j (channels 8j..8j+7) of token t of head h of sequence b (t < Q: from the codes;
// else from the residual ring) into v.
template <typename T>
TROUS_DEVICE inline void decode_load_pack(const CacheRef& c, bool keys, bool vec, index_t b, index_t h, index_t t,
                                          index_t Q, index_t j, float (&v)[kPack]) {
  const CacheFormat& f = c.fmt;
  const index_t D = f.head_dim;
  if (t >= Q) {
    const T* src = static_cast<const T*>(keys ? c.k_residual : c.v_residual) +
                   residual_row(f, c.map.num_heads, b, h, t) * D + j * kPack;
    if (vec) {
      load_pack<T, true>(src, v);
    } else {
      load_pack<T, false>(src, v);
    }
    return;
  }
  const index_t row = token_row(c.map, b, h, t);
  const uint8_t* codes = static_cast<const uint8_t*>(keys ? c.k_codes : c.v_codes) + row * code_bytes(f);
  const void* params = keys ? c.k_params : c.v_params;
  uint32_t q[kPack];
  if (f.scheme == CacheScheme::kFp8) {
    load_codes(codes + j * kPack, q, 8);
    const float s_in = static_cast<const float*>(params)[c.fp8_scale_per_head ? h : 0];
    const float s = fp8_scale_ok(s_in) ? s_in : NAN;
#pragma unroll
    for (int e = 0; e < kPack; ++e) v[e] = fp8_to_float((uint8_t)q[e], f.fp8_format) * s;
    return;
  }
  load_codes(codes + j * f.bits, q, f.bits);
  if (keys && f.scheme == CacheScheme::kKivi) {
    float sc[kPack], zr[kPack];
    load_param_pairs(params, (key_group_row(c.map, f, b, h, t) * D + j * kPack) * 2, f.param_type, vec, sc, zr);
#pragma unroll
    for (int e = 0; e < kPack; ++e) v[e] = asym_decode(q[e], sc[e], zr[e]);
    return;
  }
  const index_t gi = row * (D / f.group) + (j * kPack) / f.group;
  if (f.scheme == CacheScheme::kSymmetric) {
    const float s = load_param(params, gi, f.param_type);
#pragma unroll
    for (int e = 0; e < kPack; ++e) v[e] = (float)(int8_t)(uint8_t)q[e] * s;
  } else {
    const float s = load_param(params, 2 * gi, f.param_type), z = load_param(params, 2 * gi + 1, f.param_type);
#pragma unroll
    for (int e = 0; e < kPack; ++e) v[e] = asym_decode(q[e], s, z);
  }
}

// Grid (B * Hkv, splits, row_blocks). A block dequantizes its chunk's K and V tile by tile into
// shared memory (each element once, shared by all its query rows: the GQA heads and the Sq new
// tokens), runs an online softmax per row and writes a partial (out / l, m + log l) per row to the
// workspace: out [splits, B * Hkv, nq, D] then lse [splits, B * Hkv, nq], fp32.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads, 1) quantized_decode_kernel(DecodeParams p, DecodePlan plan) {
  const CacheRef& c = p.cache;
  const CacheFormat& f = c.fmt;
  const index_t D = f.head_dim, Hkv = c.map.num_heads, packs = D / kPack;
  const index_t bh = blockIdx.x, b = bh / Hkv, h = bh % Hkv, split = blockIdx.y;
  const index_t r0 = (index_t)blockIdx.z * plan.rows;
  const index_t nr = plan.nq - r0 < plan.rows ? plan.nq - r0 : plan.rows;
  const index_t L_in = c.lengths[b];
  const index_t L = L_in < 0 || L_in > plan.capacity ? 0 : L_in;  // invalid: read nothing (merge gives NaN)
  const index_t Q = quantized_length(f, L);
  const index_t chunk = decode_chunk(L, plan.splits);
  const index_t t_begin = split * chunk;
  const index_t t_end = t_begin + chunk < L ? t_begin + chunk : L;
  const index_t group = p.Hq / Hkv;

  TROUS_DYNAMIC_SHARED(float, smem);
  float* qs = smem;                           // [nr][D]
  float* ks = qs + plan.rows * D;             // [tile][D + 1]
  float* vs = ks + kDecodeTile * (D + 1);     // [tile][D]
  float* ss = vs + kDecodeTile * D;           // [nr][tile]
  float* acc = ss + plan.rows * kDecodeTile;  // [nr][D]
  float* m_run = acc + plan.rows * D;         // [nr]
  float* l_run = m_run + plan.rows;           // [nr]
  float* alpha = l_run + plan.rows;           // [nr]

  const T* q = static_cast<const T*>(p.q);
  for (index_t i = threadIdx.x; i < nr * D; i += blockDim.x) {
    const index_t r = r0 + i / D, d = i % D;
    const index_t hq = h * group + r / p.Sq, s = r % p.Sq;
    qs[i] = to_float(q[b * p.sq.b + hq * p.sq.h + s * p.sq.t + d]);
    acc[i] = 0.f;
  }
  for (index_t r = threadIdx.x; r < nr; r += blockDim.x) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }
  __syncthreads();

  for (index_t tile0 = t_begin; tile0 < t_end; tile0 += kDecodeTile) {  // block-uniform bounds
    const index_t nt = t_end - tile0 < kDecodeTile ? t_end - tile0 : kDecodeTile;
    for (index_t i = threadIdx.x; i < 2 * nt * packs; i += blockDim.x) {
      const bool keys = i < nt * packs;
      const index_t k = keys ? i : i - nt * packs;
      const index_t t = k / packs, j = k % packs;
      float v[kPack];
      if (keys) {
        decode_load_pack<T>(c, true, plan.vec, b, h, tile0 + t, Q, j, v);
#pragma unroll
        for (int e = 0; e < kPack; ++e) ks[t * (D + 1) + j * kPack + e] = v[e];
      } else {
        decode_load_pack<T>(c, false, plan.vec, b, h, tile0 + t, Q, j, v);
#pragma unroll
        for (int e = 0; e < kPack; ++e) vs[t * D + j * kPack + e] = v[e];
      }
    }
    __syncthreads();
    // Scores of (row, token); a token after the row's position (or past the tile) is masked.
    for (index_t i = threadIdx.x; i < nr * kDecodeTile; i += blockDim.x) {
      const index_t r = i / kDecodeTile, t = i % kDecodeTile;
      const index_t pos = L - p.Sq + (r0 + r) % p.Sq;
      float sc = -INFINITY;
      if (t < nt && tile0 + t <= pos) {
        const float* qr = qs + r * D;
        const float* kt = ks + t * (D + 1);
        float dot = 0.f;
        for (index_t d = 0; d < D; ++d) dot = fmaf(qr[d], kt[d], dot);
        sc = dot * p.scale;
        if (p.softcap > 0.f) sc = p.softcap * tanhf(sc / p.softcap);
      }
      ss[i] = sc;
    }
    __syncthreads();
    // Online softmax: one warp per row, one lane per token of the tile (kDecodeTile == warpSize).
    for (index_t r = threadIdx.x / 32; r < nr; r += blockDim.x / 32) {  // warp-uniform bounds
      const int lane = threadIdx.x % 32;
      float* sr = ss + r * kDecodeTile;
      const float sc = sr[lane];
      float mx = sc;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_run[r];
      const float m_new = fmaxf(m_old, mx);
      const bool none = m_new == -INFINITY;           // nothing visible yet: probabilities 0, accumulators stay 0
      const float e = none ? 0.f : expf(sc - m_new);  // masked: exp(-inf) = 0
      float sum = e;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      sr[lane] = e;
      __syncwarp();  // every lane has read m_run[r] before lane 0 updates it
      if (lane == 0) {
        const float a = none ? 1.f : expf(m_old - m_new);  // m_old = -inf: 0
        l_run[r] = l_run[r] * a + sum;
        m_run[r] = m_new;
        alpha[r] = a;
      }
    }
    __syncthreads();
    // Each (row, channel) accumulator belongs to one thread for the whole kernel (fixed mapping).
    for (index_t i = threadIdx.x; i < nr * D; i += blockDim.x) {
      const index_t r = i / D, d = i % D;
      const index_t pos = L - p.Sq + (r0 + r) % p.Sq;
      // The row sees a prefix of the tile: stopping there keeps a masked NaN value out of it.
      const index_t vis = pos - tile0 + 1 < nt ? pos - tile0 + 1 : nt;
      const float* pr = ss + r * kDecodeTile;
      float a = acc[i] * alpha[r];
      for (index_t t = 0; t < vis; ++t) a = fmaf(pr[t], vs[t * D + d], a);
      acc[i] = a;
    }
    __syncthreads();
  }

  const index_t BH = (index_t)gridDim.x;
  float* ws_out = static_cast<float*>(p.workspace);
  float* ws_lse = ws_out + (index_t)plan.splits * BH * plan.nq * D;
  const index_t base = (split * BH + bh) * plan.nq + r0;
  for (index_t i = threadIdx.x; i < nr * D; i += blockDim.x) {
    const float l = l_run[i / D];
    ws_out[base * D + i] = l > 0.f ? acc[i] / l : 0.f;
  }
  for (index_t r = threadIdx.x; r < nr; r += blockDim.x) {
    const float l = l_run[r];
    ws_lse[base + r] = l > 0.f ? m_run[r] + logf(l) : -INFINITY;
  }
}

// Grid (B * Hkv * nq): merges the splits of one query row with their LSE into out [B, Hq, Sq, D]
// and lse [B, Hq, Sq]. A row no split saw (position < 0) gets out 0 and lse -inf.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) quantized_decode_merge(DecodeParams p, DecodePlan plan) {
  const index_t D = p.cache.fmt.head_dim, Hkv = p.cache.map.num_heads;
  const index_t BH = p.cache.batch * Hkv;
  const index_t row = blockIdx.x;  // (b * Hkv + h) * nq + r
  const index_t bh = row / plan.nq, r = row % plan.nq;
  const index_t b = bh / Hkv, h = bh % Hkv;
  const index_t hq = h * (p.Hq / Hkv) + r / p.Sq, s = r % p.Sq;
  const index_t L = p.cache.lengths[b];
  const bool bad = L < 0 || L > plan.capacity;  // not a valid length: poison the rows, visibly
  const float* ws_out = static_cast<const float*>(p.workspace);
  const float* ws_lse = ws_out + (index_t)plan.splits * BH * plan.nq * D;
  float m = -INFINITY;
  for (int k = 0; k < plan.splits; ++k) m = fmaxf(m, ws_lse[k * BH * plan.nq + row]);
  float w_sum = 0.f;
  if (m != -INFINITY)
    for (int k = 0; k < plan.splits; ++k) w_sum += expf(ws_lse[k * BH * plan.nq + row] - m);
  const index_t o = ((b * p.Hq + hq) * p.Sq + s);
  T* out = static_cast<T*>(p.out) + o * D;
  for (index_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    if (m != -INFINITY) {
      for (int k = 0; k < plan.splits; ++k) {
        const float lse_k = ws_lse[k * BH * plan.nq + row];
        if (lse_k != -INFINITY) a = fmaf(expf(lse_k - m), ws_out[(k * BH * plan.nq + row) * D + d], a);
      }
      a /= w_sum;
    }
    out[d] = from_float<T>(bad ? NAN : a);
  }
  if (threadIdx.x == 0) p.lse[o] = bad ? NAN : m != -INFINITY ? m + logf(w_sum) : -INFINITY;
}

}  // namespace kv
}  // namespace trous
