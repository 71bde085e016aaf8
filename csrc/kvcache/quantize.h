// KV-cache quantization math, shared by the CPU kernels and the CUDA kernels (kvcache_kernels.cuh).
// Formulas: ../shared/spec/kvcache.md. Everything is computed in fp32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "trous/common.h"
#include "trous/dtype.h"

namespace trous {
namespace kv {

TROUS_INLINE uint32_t float_bits_(float v) {
  uint32_t x;
  memcpy(&x, &v, 4);
  return x;
}

TROUS_INLINE float bits_float_(uint32_t x) {
  float v;
  memcpy(&v, &x, 4);
  return v;
}

// How a group's parameters are stored (fp16 or fp32). Codes are computed with the stored
// (rounded) values, so dequantization reproduces exactly what the quantizer optimised.
enum class ParamType : int { kFloat32 = 0, kFloat16 = 1 };

// Asymmetric min-max parameters of one group, rounded to their storage type, and the two constants
// of the code formula t = (x / 2 - zero / 2) * (2 / scale), which cannot overflow for finite x
// (the plain (x - zero) / scale overflows once a group spans more than FLT_MAX) and gives the same
// bits as (x - zero) * inv wherever x / 2 is exact.
struct AsymParams {
  float scale;
  float zero;       // the group minimum
  float inv;        // 1 / scale (scale >= min_scale, so finite), or 0 for a non-finite group (never NaN)
  float zero_half;  // zero / 2
  float inv2;       // 2 / scale
};

// Round-to-nearest-even fp32 -> fp16 -> fp32, written with integer ops so it is bit-identical on
// host and device and needs no half type (the kernels still store real fp16 bits, see half_bits).
TROUS_INLINE uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / Inf
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                                  // rounds past 65504: overflow to Inf
  if (abs < 0x38800000u) {               // subnormal half (or zero): value = m * 2^-24
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal: +-0
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24 bits dropped
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | h;
  }
  uint32_t h = ((abs >> 13) - (112u << 10));  // rebias exponent 127 -> 15
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | h;
}

TROUS_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t x;
  if (exp == 0x1fu) {
    x = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {  // subnormal: exactly mant * 2^-24
      float f = (float)mant * 5.9604644775390625e-8f;
      return sign ? -f : f;
    }
  } else {
    x = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

TROUS_INLINE float round_param(float v, ParamType t) {
  return t == ParamType::kFloat16 ? half_bits_to_float(float_to_half_bits(v)) : v;
}

TROUS_INLINE int max_code(int bits) { return (1 << bits) - 1; }

// A group holding NaN or +-Inf gets NaN parameters: the whole group dequantizes to NaN, so the
// poison stays visible instead of silently becoming finite numbers. Its codes are 0.
// Rounds a parameter to its storage type; CPU kernels may pass a faster equivalent (F16C).
// up(v): rounded upwards (round_scale_up).
struct ParamRounding {
  ParamType t;
  TROUS_HOST_DEVICE float operator()(float v) const { return round_param(v, t); }
  TROUS_HOST_DEVICE float up(float v) const;
};

// The smallest scale a finite group gets: a constant or tiny group never gets scale 0 (which would
// lose it to underflow), and 1 / scale stays finite in fp32. fp16 parameters: the smallest subnormal
// 2^-24 (subnormal scales keep the absolute error of tiny groups below 2^-25 per step, better than
// flooring at the smallest normal 2^-14); fp32: the smallest normal 2^-126 (1 / a subnormal
// overflows).
TROUS_INLINE float min_scale(ParamType t) {
  return t == ParamType::kFloat16 ? 5.9604644775390625e-8f : 1.17549435082228750797e-38f;
}

// The representable value just below a positive parameter s (one ulp down in its storage type).
TROUS_INLINE float param_below(float s, ParamType t) {
  return t == ParamType::kFloat16 ? half_bits_to_float((uint16_t)(float_to_half_bits(s) - 1u))
                                  : bits_float_(float_bits_(s) - 1u);
}

// The scale rounded to its storage type, upwards: s >= the exact scale, so no element of a group is
// clamped by more than half a step (matters for fp16 subnormal scales, whose nearest rounding can
// lose a third of the step). fp32 parameters are the fp32 quotient itself.
TROUS_INLINE float round_scale_up(float exact, ParamType t) {
  const float s = round_param(exact, t);
  return s < exact ? (t == ParamType::kFloat16 ? half_bits_to_float((uint16_t)(float_to_half_bits(s) + 1u))
                                               : bits_float_(float_bits_(s) + 1u))
                   : s;
}

TROUS_HOST_DEVICE inline float ParamRounding::up(float v) const { return round_scale_up(v, t); }

// The largest magnitude whose conversion from fp32 to the input dtype stays finite (exclusive):
// reconstructions are kept below it, so a finite group always dequantizes to finite values of the
// dtype it was quantized from. fp32: any finite value; fp16: below 65520 (rounds to 65504);
// bf16: below 0x7f7f8000 (rounds to 3.3895e38).
TROUS_INLINE float finite_limit(DType d) {
  return d == DType::kFloat16 ? 65520.f : d == DType::kBFloat16 ? bits_float_(0x7f7f8000u) : INFINITY;
}

// Scale of a finite group: s = (mx / 2 - mn / 2) / L * 2 (the same bits as (mx - mn) / L, without
// overflow for a group spanning [-FLT_MAX, FLT_MAX]), rounded up to its storage type, floored at
// min_scale, then stepped down (at most twice; rounding moves it by half an ulp) while the top code
// would reconstruct at or beyond `limit`: fma(L, s, zero) < limit, so every code reconstructs finitely.
template <typename Round>
TROUS_INLINE AsymParams asym_params_rounded(float mn, float mx, bool finite, int bits, float limit, Round round) {
  AsymParams p;
  if (!finite) {
    p.scale = p.zero = p.zero_half = NAN;
    p.inv = p.inv2 = 0.f;
    return p;
  }
  const float L = (float)max_code(bits);
  const float floor_s = min_scale(round.t);
  float s = round.up(fmaf(mx, 0.5f, -(mn * 0.5f)) / L * 2.f);
  s = s > floor_s ? s : floor_s;  // not fmaxf: a libm call on the host
  p.zero = round(mn);
  p.inv = 1.f / s;
  if (!(fmaf(L, s, p.zero) < limit)) {  // rare (groups near the dtype's limit): off the common path
    for (int i = 0; i < 2 && !(fmaf(L, s, p.zero) < limit) && s > floor_s; ++i) s = param_below(s, round.t);
    p.inv = 1.f / s;
  }
  p.scale = s;
  p.zero_half = p.zero * 0.5f;
  p.inv2 = p.inv * 2.f;
  return p;
}

TROUS_INLINE AsymParams asym_params(float mn, float mx, bool finite, int bits, ParamType t, float limit = INFINITY) {
  return asym_params_rounded(mn, mx, finite, bits, limit, ParamRounding{t});
}

// Round half to even for |t| < 2^22, identical to rintf/cvt.rni but vectorisable without SSE4.1:
// adding 1.5 * 2^23 leaves no fraction bits, so the default rounding mode does the work. Callers clamp
// first, which also keeps every step one rounded fp32 operation (no FMA contraction possible).
TROUS_INLINE float round_half_even(float t) {
  const float kMagic = 12582912.f;
  return (t + kMagic) - kMagic;
}

// t = fma(x, 1/2, -zero/2) * (2 / scale), clamped to [0, L]; NaN (only in a non-finite group, whose
// codes are 0) becomes 0 before the integer conversion.
TROUS_INLINE uint32_t asym_code(float x, AsymParams p, int bits) {
  const float max_q = (float)max_code(bits);
  float t = fmaf(x, 0.5f, -p.zero_half) * p.inv2;
  t = t > 0.f ? (t < max_q ? t : max_q) : 0.f;
  return (uint32_t)round_half_even(t);
}

// fma(q, s, z): the product q * s is exact inside the fma, so a finite group (whose top code
// reconstructs below the dtype's limit, see asym_params_rounded) never overflows.
TROUS_INLINE float asym_decode(uint32_t q, float scale, float zero) { return fmaf((float)q, scale, zero); }

// Symmetric int8: s = amax / 127 (rounded up, floored at min_scale, stepped down while 127 s would
// reach `limit`), q in [-127, 127].
template <typename Round>
TROUS_INLINE float sym_scale_rounded(float amax, bool finite, float limit, Round round) {
  if (!finite) return NAN;
  const float floor_s = min_scale(round.t);
  float s = round.up(amax / 127.f);
  s = s > floor_s ? s : floor_s;
  for (int i = 0; i < 2 && !(127.f * s < limit) && s > floor_s; ++i) s = param_below(s, round.t);
  return s;
}

TROUS_INLINE float sym_scale(float amax, bool finite, ParamType t, float limit = INFINITY) {
  return sym_scale_rounded(amax, finite, limit, ParamRounding{t});
}

// `inv` = 1 / scale, or 0 for a zero or NaN scale (all codes 0).
TROUS_INLINE float sym_inv(float scale) { return scale > 0.f ? 1.f / scale : 0.f; }

TROUS_INLINE int32_t sym_code(float x, float inv) {
  float t = x * inv;
  t = t == t ? t : 0.f;  // NaN (only in a non-finite group, whose codes are 0) must not reach the int cast
  t = t < -127.f ? -127.f : (t > 127.f ? 127.f : t);
  return (int32_t)round_half_even(t);
}

// An explicit fp8 scale is usable iff finite and positive. The CPU op refuses others; the CUDA
// kernels (which cannot read it without a host sync) turn every code / output of an invalid scale
// into NaN.
TROUS_INLINE bool fp8_scale_ok(float s) { return s > 0.f && s <= 3.40282346638528859812e38f; }

// ---- fp8 (OCP e4m3fn and e5m2), round-to-nearest-even with saturation to the largest finite
// value (satfinite). NaN stays NaN; +-Inf saturates to +-max.
enum class Fp8Format : int { kE4M3 = 0, kE5M2 = 1 };

TROUS_INLINE uint32_t float_bits(float v) {
  uint32_t x;
  memcpy(&x, &v, 4);
  return x;
}

TROUS_INLINE float bits_float(uint32_t x) {
  float v;
  memcpy(&v, &x, 4);
  return v;
}

TROUS_INLINE int fp8_mant_bits(Fp8Format f) { return f == Fp8Format::kE4M3 ? 3 : 2; }
TROUS_INLINE int fp8_bias(Fp8Format f) { return f == Fp8Format::kE4M3 ? 7 : 15; }
TROUS_INLINE uint32_t fp8_max_code(Fp8Format f) { return f == Fp8Format::kE4M3 ? 0x7eu : 0x7bu; }

// Integer-only encoding (no frexp/ldexp): normal values round their fp32 mantissa to the fp8 width
// (a carry moves into the exponent by itself); subnormals are multiples of the smallest step.
TROUS_INLINE uint8_t float_to_fp8(float v, Fp8Format f) {
  const uint32_t x = float_bits(v);
  const uint32_t sign = (x >> 24) & 0x80u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return (uint8_t)(sign | 0x7fu);  // NaN
  const int mb = fp8_mant_bits(f), bias = fp8_bias(f);
  uint32_t code;
  if (abs < (uint32_t)(128 - bias) << 23) {  // below the smallest normal 2^(1 - bias)
    const float steps = bits_float(abs) * bits_float((uint32_t)(127 + bias - 1 + mb) << 23);  // exact
    code = (uint32_t)round_half_even(steps);
  } else {
    const int shift = 23 - mb;
    const uint32_t rounded = abs + ((1u << (shift - 1)) - 1u) + ((abs >> shift) & 1u);
    code = (rounded >> shift) - ((uint32_t)(127 - bias) << mb);
  }
  if (code > fp8_max_code(f)) code = fp8_max_code(f);  // satfinite, +-Inf included
  return (uint8_t)(sign | code);
}

TROUS_INLINE float fp8_to_float(uint8_t c, Fp8Format f) {
  const int mb = fp8_mant_bits(f), bias = fp8_bias(f);
  const uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  const uint32_t exp = (c & 0x7fu) >> mb;
  const uint32_t mant = c & ((1u << mb) - 1u);
  if ((f == Fp8Format::kE4M3 && (c & 0x7fu) == 0x7fu) || (f == Fp8Format::kE5M2 && exp == 0x1fu)) {
    return bits_float(sign | 0x7f800000u | (mant ? 0x400000u : 0u));  // NaN, or Inf for e5m2
  }
  if (exp == 0) {  // subnormal: mant * 2^(1 - bias - mb)
    const float v = (float)mant * bits_float((uint32_t)(127 + 1 - bias - mb) << 23);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 127u - (uint32_t)bias) << 23) | (mant << (23 - mb)));
}

// ---- Kernel arguments (shared by the CPU kernels and the CUDA launchers).

// Input rows [B, H, T] of D channels, each row contiguous, outer strides arbitrary.
struct RowLayout {
  index_t B, H, T, D;
  RowStrides stride;
  TROUS_HOST_DEVICE index_t rows() const { return B * H * T; }
};

struct TokenQuantArgs {
  RowLayout in;
  int bits;
  int group;       // G channels per group, G % 8 == 0, G divides D
  bool symmetric;  // int8 symmetric: params hold the scale only
  ParamType ptype;
  float limit = INFINITY;  // finite_limit of the input dtype
};

struct TokenDequantArgs {
  index_t rows, D;
  int bits, group;
  bool symmetric;
  ParamType ptype;
};

struct ChannelQuantArgs {
  RowLayout in;  // T % group == 0
  int bits;
  int group;  // G tokens per group
  ParamType ptype;
  float limit = INFINITY;  // finite_limit of the input dtype
};

struct ChannelDequantArgs {
  index_t rows, T, D;  // rows = B * H * T
  int bits, group;
  ParamType ptype;
};

struct Fp8Args {
  RowLayout in;
  Fp8Format format;
  bool per_head;  // scale has H entries, else 1
};

}  // namespace kv
}  // namespace trous
