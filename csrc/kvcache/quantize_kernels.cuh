// CUDA kernels of KV-cache quantization. Torch-free: compiled by nvcc (csrc/cuda/kvcache.cu) and by
// g++ through the emulation header (tests/emu). Math lives in kvcache.h, shared with the CPU kernels.
//
// Every kernel gives one thread a "pack" of 8 consecutive channels of one row (D % 8 == 0 is
// checked by the caller), so 16-bit inputs load as one 16-byte vector, fp32 as two, and the codes
// of a pack are bits bytes (one 8-, 4- or 2-byte store).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "trous/common.h"
#include "trous/convert.cuh"
#include "kvcache/quantize.h"

namespace trous {
namespace kv {

constexpr int kPack = 8;
constexpr int kThreads = 256;

// Loads 8 consecutive elements as fp32; VEC uses 16-byte loads (the launcher checks alignment).
template <typename T, bool VEC>
TROUS_DEVICE inline void load_pack(const T* p, float (&v)[kPack]) {
  if constexpr (VEC && sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
    v[4] = b.x;
    v[5] = b.y;
    v[6] = b.z;
    v[7] = b.w;
  } else if constexpr (VEC && sizeof(T) == 2) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[kPack];
    memcpy(static_cast<void*>(e), &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < kPack; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kPack; ++i) v[i] = to_float(p[i]);
  }
}

// Stores 8 fp32 values as T; the output is always a fresh contiguous tensor, so 16-byte aligned.
template <typename T>
TROUS_DEVICE inline void store_pack(T* p, const float (&v)[kPack]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    T e[kPack];
#pragma unroll
    for (int i = 0; i < kPack; ++i) e[i] = from_float<T>(v[i]);
    uint4 raw;
    memcpy(&raw, static_cast<const void*>(e), sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Packs 8 codes of `bits` bits LSB-first into bits bytes and stores them with one aligned store.
TROUS_DEVICE inline void store_codes(uint8_t* p, const uint32_t (&q)[kPack], int bits) {
  if (bits == 8) {
    uint2 w;
    w.x = q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24;
    w.y = q[4] | q[5] << 8 | q[6] << 16 | q[7] << 24;
    *reinterpret_cast<uint2*>(p) = w;
  } else if (bits == 4) {
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < kPack; ++i) w |= q[i] << (4 * i);
    *reinterpret_cast<uint32_t*>(p) = w;
  } else {
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < kPack; ++i) w |= q[i] << (2 * i);
    *reinterpret_cast<uint16_t*>(p) = (uint16_t)w;
  }
}

TROUS_DEVICE inline void load_codes(const uint8_t* p, uint32_t (&q)[kPack], int bits) {
  if (bits == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = (w.x >> (8 * i)) & 0xffu;
      q[i + 4] = (w.y >> (8 * i)) & 0xffu;
    }
  } else {
    const uint32_t w = bits == 4 ? *reinterpret_cast<const uint32_t*>(p) : *reinterpret_cast<const uint16_t*>(p);
    const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
    for (int i = 0; i < kPack; ++i) q[i] = (w >> (bits * i)) & mask;
  }
}

TROUS_DEVICE inline void store_param(void* params, index_t i, float v, ParamType t) {
  if (t == ParamType::kFloat16) {
    static_cast<uint16_t*>(params)[i] = float_to_half_bits(v);
  } else {
    static_cast<float*>(params)[i] = v;
  }
}

TROUS_DEVICE inline float load_param(const void* params, index_t i, ParamType t) {
  return t == ParamType::kFloat16 ? half_bits_to_float(static_cast<const uint16_t*>(params)[i])
                                  : static_cast<const float*>(params)[i];
}

// Per-token quantization, one thread per pack; the G/8 lanes of a group reduce with shuffles.
// LANES = G / 8 is a power of two <= 32, so groups never straddle a warp and a warp's inactive
// tail lanes form whole groups (they still take part in the shuffles, then store nothing).
template <typename T, bool VEC, int LANES>
__global__ void __launch_bounds__(kThreads) quantize_token_lanes(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                 void* __restrict__ params, TokenQuantArgs a) {
  const index_t packs_per_row = a.in.D / kPack;
  const index_t n_packs = a.in.rows() * packs_per_row;
  const index_t p = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = p < n_packs;
  const index_t row = active ? p / packs_per_row : 0;
  const index_t j = active ? p % packs_per_row : 0;

  float v[kPack];
  if (active) {
    load_pack<T, VEC>(x + row_offset(row, a.in.H, a.in.T, a.in.stride) + j * kPack, v);
  } else {
#pragma unroll
    for (int i = 0; i < kPack; ++i) v[i] = 0.f;
  }
  float mn = v[0], mx = v[0], amax = fabsf(v[0]);
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kPack; ++i) {
    mn = fminf(mn, v[i]);
    mx = fmaxf(mx, v[i]);
    amax = fmaxf(amax, fabsf(v[i]));
    finite = finite && isfinite(v[i]);
  }
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    finite = __shfl_xor_sync(0xffffffffu, (int)finite, off) && finite;
  }
  if (!active) return;

  const index_t n_groups = a.in.D / a.group;
  const index_t group_index = row * n_groups + (j * kPack) / a.group;
  const bool leader = (j % LANES) == 0;
  uint32_t q[kPack];
  if (a.symmetric) {
    const float s = sym_scale(amax, finite, a.ptype, a.limit);
    const float inv = sym_inv(s);
#pragma unroll
    for (int i = 0; i < kPack; ++i) q[i] = finite ? (uint32_t)(sym_code(v[i], inv) & 0xff) : 0u;
    if (leader) store_param(params, group_index, s, a.ptype);
  } else {
    const AsymParams pr = asym_params(mn, mx, finite, a.bits, a.ptype, a.limit);
#pragma unroll
    for (int i = 0; i < kPack; ++i) q[i] = finite ? asym_code(v[i], pr, a.bits) : 0u;
    if (leader) {
      store_param(params, 2 * group_index, pr.scale, a.ptype);
      store_param(params, 2 * group_index + 1, pr.zero, a.ptype);
    }
  }
  store_codes(codes + row * (a.in.D * a.bits / 8) + j * a.bits, q, a.bits);
}

// Any G % 8 == 0: one thread per group (used when G / 8 is not a power of two <= 32).
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_token_serial(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                  void* __restrict__ params, TokenQuantArgs a) {
  const index_t n_groups = a.in.D / a.group;
  const index_t gi = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= a.in.rows() * n_groups) return;
  const index_t row = gi / n_groups;
  const index_t c0 = (gi % n_groups) * a.group;
  const T* src = x + row_offset(row, a.in.H, a.in.T, a.in.stride) + c0;
  float mn = to_float(src[0]), mx = mn, amax = fabsf(mn);
  bool finite = true;
  for (int c = 0; c < a.group; ++c) {
    const float v = to_float(src[c]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
    amax = fmaxf(amax, fabsf(v));
    finite = finite && isfinite(v);
  }
  uint8_t* dst = codes + row * (a.in.D * a.bits / 8) + c0 * a.bits / 8;
  float s = 0.f;
  AsymParams pr{};
  if (a.symmetric) {
    s = sym_scale(amax, finite, a.ptype, a.limit);
    store_param(params, gi, s, a.ptype);
  } else {
    pr = asym_params(mn, mx, finite, a.bits, a.ptype, a.limit);
    store_param(params, 2 * gi, pr.scale, a.ptype);
    store_param(params, 2 * gi + 1, pr.zero, a.ptype);
  }
  for (int c = 0; c < a.group; c += kPack) {
    uint32_t q[kPack];
    for (int i = 0; i < kPack; ++i) {
      const float v = to_float(src[c + i]);
      q[i] = !finite ? 0u : a.symmetric ? (uint32_t)(sym_code(v, sym_inv(s)) & 0xff) : asym_code(v, pr, a.bits);
    }
    store_codes(dst + c * a.bits / 8, q, a.bits);
  }
}

// Per-token dequantization: one thread per pack, output contiguous [rows, D].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_token(const uint8_t* __restrict__ codes, const void* __restrict__ params, T* __restrict__ out,
                     TokenDequantArgs a) {
  const index_t packs_per_row = a.D / kPack;
  const index_t p = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= a.rows * packs_per_row) return;
  const index_t row = p / packs_per_row;
  const index_t j = p % packs_per_row;
  const index_t group_index = row * (a.D / a.group) + (j * kPack) / a.group;
  uint32_t q[kPack];
  load_codes(codes + row * (a.D * a.bits / 8) + j * a.bits, q, a.bits);
  float v[kPack];
  if (a.symmetric) {
    const float s = load_param(params, group_index, a.ptype);
#pragma unroll
    for (int i = 0; i < kPack; ++i) v[i] = (float)(int8_t)(uint8_t)q[i] * s;
  } else {
    const float s = load_param(params, 2 * group_index, a.ptype);
    const float z = load_param(params, 2 * group_index + 1, a.ptype);
#pragma unroll
    for (int i = 0; i < kPack; ++i) v[i] = asym_decode(q[i], s, z);
  }
  store_pack(out + p * kPack, v);
}

// KIVI keys: per (head, channel) min-max over G consecutive tokens. One thread per pack of 8
// channels of one token group; consecutive threads read consecutive channels of a token row.
// Params [B, H, T / G, D, 2].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) quantize_channel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                             void* __restrict__ params, ChannelQuantArgs a) {
  const index_t packs_per_row = a.in.D / kPack;
  const index_t token_groups = a.in.T / a.group;
  const index_t p = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= a.in.B * a.in.H * token_groups * packs_per_row) return;
  const index_t j = p % packs_per_row;
  const index_t tg = (p / packs_per_row) % token_groups;
  const index_t bh = p / (packs_per_row * token_groups);
  const index_t row0 = bh * a.in.T + tg * a.group;

  float mn[kPack], mx[kPack];
  bool finite[kPack];
  for (int t = 0; t < a.group; ++t) {
    float v[kPack];
    load_pack<T, VEC>(x + row_offset(row0 + t, a.in.H, a.in.T, a.in.stride) + j * kPack, v);
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      mn[i] = t == 0 ? v[i] : fminf(mn[i], v[i]);
      mx[i] = t == 0 ? v[i] : fmaxf(mx[i], v[i]);
      finite[i] = (t == 0 || finite[i]) && isfinite(v[i]);
    }
  }
  AsymParams pr[kPack];
  const index_t param0 = ((bh * token_groups + tg) * a.in.D + j * kPack) * 2;
#pragma unroll
  for (int i = 0; i < kPack; ++i) {
    pr[i] = asym_params(mn[i], mx[i], finite[i], a.bits, a.ptype, a.limit);
    store_param(params, param0 + 2 * i, pr[i].scale, a.ptype);
    store_param(params, param0 + 2 * i + 1, pr[i].zero, a.ptype);
  }
  for (int t = 0; t < a.group; ++t) {
    float v[kPack];
    load_pack<T, VEC>(x + row_offset(row0 + t, a.in.H, a.in.T, a.in.stride) + j * kPack, v);
    uint32_t q[kPack];
#pragma unroll
    for (int i = 0; i < kPack; ++i) q[i] = finite[i] ? asym_code(v[i], pr[i], a.bits) : 0u;
    store_codes(codes + (row0 + t) * (a.in.D * a.bits / 8) + j * a.bits, q, a.bits);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_channel(const uint8_t* __restrict__ codes, const void* __restrict__ params, T* __restrict__ out,
                       ChannelDequantArgs a) {
  const index_t packs_per_row = a.D / kPack;
  const index_t p = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= a.rows * packs_per_row) return;
  const index_t row = p / packs_per_row;
  const index_t j = p % packs_per_row;
  const index_t bh = row / a.T;
  const index_t tg = (row % a.T) / a.group;
  const index_t param0 = ((bh * (a.T / a.group) + tg) * a.D + j * kPack) * 2;
  uint32_t q[kPack];
  load_codes(codes + row * (a.D * a.bits / 8) + j * a.bits, q, a.bits);
  float v[kPack];
#pragma unroll
  for (int i = 0; i < kPack; ++i) {
    v[i] =
        asym_decode(q[i], load_param(params, param0 + 2 * i, a.ptype), load_param(params, param0 + 2 * i + 1, a.ptype));
  }
  store_pack(out + p * kPack, v);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    quantize_fp8(const T* __restrict__ x, const float* __restrict__ scale, uint8_t* __restrict__ codes, Fp8Args a) {
  const index_t packs_per_row = a.in.D / kPack;
  const index_t p = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= a.in.rows() * packs_per_row) return;
  const index_t row = p / packs_per_row;
  const index_t j = p % packs_per_row;
  const float s = scale[a.per_head ? (row / a.in.T) % a.in.H : 0];
  const bool ok = fp8_scale_ok(s);  // an invalid explicit scale gives NaN codes (0x7f in both formats)
  float v[kPack];
  load_pack<T, VEC>(x + row_offset(row, a.in.H, a.in.T, a.in.stride) + j * kPack, v);
  uint32_t q[kPack];
#pragma unroll
  for (int i = 0; i < kPack; ++i) q[i] = ok ? float_to_fp8(v[i] / s, a.format) : 0x7fu;
  store_codes(codes + p * kPack, q, 8);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_fp8(const uint8_t* __restrict__ codes, const float* __restrict__ scale, T* __restrict__ out,
                   index_t rows, index_t H, index_t T_len, index_t D, Fp8Format format, bool per_head) {
  const index_t packs_per_row = D / kPack;
  const index_t p = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= rows * packs_per_row) return;
  const index_t row = p / packs_per_row;
  const float s_in = scale[per_head ? (row / T_len) % H : 0];
  const float s = fp8_scale_ok(s_in) ? s_in : NAN;  // an invalid scale decodes to NaN
  uint32_t q[kPack];
  load_codes(codes + p * kPack, q, 8);
  float v[kPack];
#pragma unroll
  for (int i = 0; i < kPack; ++i) v[i] = fp8_to_float((uint8_t)q[i], format) * s;
  store_pack(out + p * kPack, v);
}

}  // namespace kv
}  // namespace trous
