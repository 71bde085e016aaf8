// CPU kernels of KV-cache quantization. Rows are split across threads with at::parallel_for; within
// a row, groups of 8 channels go through AVX2 (runtime-selected, see simd.h) or a scalar twin that
// computes the same bits from the shared math in kvcache.h.
#include "kvcache/quantize_cpu.h"

#include "kvcache/append_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "trous/simd_cpu.h"

namespace trous {
namespace kv {
namespace {

using cpu::has_avx2;

// Rows per parallel task: large enough to amortise scheduling, small enough to balance two cores.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_rows(index_t D) { return std::max<int64_t>(1, kGrainElements / std::max<index_t>(D, 1)); }

// ---- packing of 8 one-byte codes (byte k of `b` = code k) into bits bytes, LSB-first.
inline void store_packed8(uint8_t* dst, uint64_t b, int bits) {
  if (bits == 8) {
    memcpy(dst, &b, 8);
  } else if (bits == 4) {
    uint64_t t = (b | (b >> 4)) & 0x00ff00ff00ff00ffull;  // byte 2k = q[2k] | q[2k+1] << 4
    t = (t | (t >> 8)) & 0x0000ffff0000ffffull;
    const uint32_t w = (uint32_t)(t | (t >> 16));
    memcpy(dst, &w, 4);
  } else {
    const uint64_t t = b | (b >> 6) | (b >> 12) | (b >> 18);  // byte 4k = q[4k] | ... | q[4k+3] << 6
    const uint16_t w = (uint16_t)((t & 0xff) | ((t >> 24) & 0xff00));
    memcpy(dst, &w, 2);
  }
}

inline uint64_t load_packed8(const uint8_t* src, int bits) {
  uint64_t x = 0;
  if (bits == 8) {
    memcpy(&x, src, 8);
  } else if (bits == 4) {  // spread 4 bytes to 8 nibbles, one per byte
    uint32_t w;
    memcpy(&w, src, 4);
    x = w;
    x = (x | (x << 16)) & 0x0000ffff0000ffffull;
    x = (x | (x << 8)) & 0x00ff00ff00ff00ffull;
    x = (x | (x << 4)) & 0x0f0f0f0f0f0f0f0full;
  } else {  // spread 2 bytes to 8 crumbs
    uint16_t w;
    memcpy(&w, src, 2);
    x = w;
    x = (x | (x << 24)) & 0x000000ff000000ffull;
    x = (x | (x << 12)) & 0x000f000f000f000full;
    x = (x | (x << 6)) & 0x0303030303030303ull;
  }
  return x;
}

struct GroupStats {
  float mn, mx, amax;
  bool finite;
};

GroupStats group_stats_scalar(const float* v, index_t n) {
  GroupStats s{v[0], v[0], 0.f, true};
  for (index_t i = 0; i < n; ++i) {
    s.mn = fminf(s.mn, v[i]);
    s.mx = fmaxf(s.mx, v[i]);
    s.amax = fmaxf(s.amax, fabsf(v[i]));
    s.finite = s.finite && std::isfinite(v[i]);
  }
  return s;
}

uint64_t asym_codes8_scalar(const float* v, AsymParams p, int bits) {
  uint64_t b = 0;
  for (int k = 0; k < 8; ++k) b |= (uint64_t)asym_code(v[k], p, bits) << (8 * k);
  return b;
}

uint64_t sym_codes8_scalar(const float* v, float inv) {
  uint64_t b = 0;
  for (int k = 0; k < 8; ++k) b |= (uint64_t)(uint8_t)(int8_t)sym_code(v[k], inv) << (8 * k);
  return b;
}

#if TROUS_HAVE_AVX2_PATH
// Exponent all ones = NaN or Inf; checked on the bits so min/max's NaN handling does not matter.
TROUS_AVX2 __m256i non_finite_mask(__m256 v) {
  const __m256i exp = _mm256_set1_epi32(0x7f800000);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp), exp);
}

// Same steps as asym_code: fma(x, 1/2, -zero/2), one rounded multiply by 2 / scale, clamp (NaN
// becomes 0: max_ps returns its second operand), then cvtps (round to nearest even in the default
// MXCSR mode).
TROUS_AVX2 uint64_t asym_codes8_avx2(const float* v, AsymParams p, int bits) {
  __m256 t = _mm256_mul_ps(_mm256_fmsub_ps(_mm256_loadu_ps(v), _mm256_set1_ps(0.5f), _mm256_set1_ps(p.zero_half)),
                           _mm256_set1_ps(p.inv2));
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), _mm256_set1_ps((float)max_code(bits)));
  return cpu::low_bytes(_mm256_cvtps_epi32(t));
}

TROUS_AVX2 uint64_t sym_codes8_avx2(const float* v, float inv) {
  __m256 t = _mm256_mul_ps(_mm256_loadu_ps(v), _mm256_set1_ps(inv));
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
  return cpu::low_bytes(_mm256_cvtps_epi32(t));
}

// fma(q, s, z), as asym_decode (the product is exact, so a finite group cannot overflow).
template <typename T>
TROUS_AVX2 void decode8_avx2(uint64_t b, bool is_signed, float s, float z, T* out) {
  const __m128i bytes = _mm_cvtsi64_si128((long long)b);
  const __m256i q = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
  cpu::store8(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(s), _mm256_set1_ps(z)));
}

// 32 codes (4 vectors of int32 lanes, values in [0, 255] or [-127, 127]) as 32 bytes in order.
TROUS_AVX2 inline __m256i bytes32(__m256i q0, __m256i q1, __m256i q2, __m256i q3, bool is_signed) {
  const __m256i a = _mm256_packs_epi32(q0, q1), b = _mm256_packs_epi32(q2, q3);  // per 128-bit lane: q0 q1 | ..
  const __m256i c = is_signed ? _mm256_packs_epi16(a, b) : _mm256_packus_epi16(a, b);
  return _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 32 unsigned codes (int32 lanes of q[0..3]) packed LSB-first, as store_packed8, to 32 * bits / 8 bytes.
TROUS_AVX2 void store_packed32(const __m256i* q, int bits, uint8_t* dst) {
  const __m256i c = bytes32(q[0], q[1], q[2], q[3], false);
  if (bits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), c);
  } else if (bits == 4) {  // byte k = q[2k] | q[2k+1] << 4
    const __m256i m = _mm256_maddubs_epi16(c, _mm256_set1_epi16(0x1001));
    const __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(m, m), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(b));
  } else {  // byte k = q[4k] | q[4k+1] << 2 | q[4k+2] << 4 | q[4k+3] << 6
    const __m256i m =
        _mm256_madd_epi16(_mm256_maddubs_epi16(c, _mm256_set1_epi16(0x0401)), _mm256_set1_epi32(0x00100001));
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(m, m), _mm256_setzero_si256());
    const __m256i w = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));  // dwords 0, 4
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(w));
  }
}

// The 32 codes of 32 * bits / 8 packed bytes (LSB-first, as load_packed8) as two vectors of 16 bytes.
TROUS_AVX2 inline void load_codes32(const uint8_t* src, int bits, __m128i& lo, __m128i& hi) {
  if (bits == 8) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
  } else if (bits == 4) {  // byte k = q[2k] | q[2k+1] << 4
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), m = _mm_set1_epi8(0x0f);
    const __m128i a = _mm_and_si128(x, m), b = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    lo = _mm_unpacklo_epi8(a, b);
    hi = _mm_unpackhi_epi8(a, b);
  } else {  // byte k = q[4k] | q[4k+1] << 2 | q[4k+2] << 4 | q[4k+3] << 6
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)), m = _mm_set1_epi8(3);
    const __m128i t01 = _mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 2), m));
    const __m128i t23 =
        _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(x, 4), m), _mm_and_si128(_mm_srli_epi16(x, 6), m));
    lo = _mm_unpacklo_epi16(t01, t23);
    hi = _mm_unpackhi_epi16(t01, t23);
  }
}

// Codes 8k..8k+7 of (lo, hi) as int32 lanes (signed: int8 codes).
TROUS_AVX2 inline __m256i codes8_of32(__m128i lo, __m128i hi, int k, bool is_signed) {
  const __m128i v = k < 2 ? lo : hi;
  const __m128i b = (k & 1) ? _mm_srli_si128(v, 8) : v;
  return is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
}

// 32 values fma(q, s, z) (decode8_avx2's steps) from packed codes.
template <typename T>
TROUS_AVX2 void decode32_avx2(const uint8_t* src, int bits, bool is_signed, float s, float z, T* out) {
  __m128i lo, hi;
  load_codes32(src, bits, lo, hi);
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  for (int k = 0; k < 4; ++k) {
    cpu::store8(out + 8 * k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes8_of32(lo, hi, k, is_signed)), vs, vz));
  }
}

// KIVI: per-channel min / max over G token rows (row t at src + t * stride) and bad[c] != 0 where
// channel c holds NaN / Inf; the rows are also written as fp32 to `tile` (G x D) unless it is null.
// 32 channels at a time, the running values held in registers (one pass over the rows instead of a
// load and a store of the running values per token; fp16 / bf16 converted in the same pass).
template <typename T>
TROUS_AVX2 void channel_stats_avx2(const T* src, index_t stride, index_t G, index_t D, float* tile, float* mn,
                                   float* mx, uint32_t* bad) {
  index_t c0 = 0;
  const auto chunk = [&](auto width) TROUS_AVX2 {
    constexpr int kV = decltype(width)::value;  // vectors of 8 channels per chunk
    __m256 lo[kV], hi[kV];
    __m256i nf[kV];
    for (index_t t = 0; t < G; ++t) {
      for (int k = 0; k < kV; ++k) {
        const index_t c = c0 + 8 * k;
        const __m256 x = cpu::load8(src + t * stride + c);
        if (tile) _mm256_storeu_ps(tile + t * D + c, x);
        lo[k] = t == 0 ? x : _mm256_min_ps(lo[k], x);
        hi[k] = t == 0 ? x : _mm256_max_ps(hi[k], x);
        nf[k] = t == 0 ? non_finite_mask(x) : _mm256_or_si256(nf[k], non_finite_mask(x));
      }
    }
    for (int k = 0; k < kV; ++k) {
      _mm256_storeu_ps(mn + c0 + 8 * k, lo[k]);
      _mm256_storeu_ps(mx + c0 + 8 * k, hi[k]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bad + c0 + 8 * k), nf[k]);
    }
    c0 += 8 * kV;
  };
  while (c0 + 32 <= D) chunk(std::integral_constant<int, 4>{});
  while (c0 < D) chunk(std::integral_constant<int, 1>{});
}

TROUS_AVX2 void channel_stats_tile_avx2(const float* tile, index_t G, index_t D, float* mn, float* mx, uint32_t* bad) {
  channel_stats_avx2(tile, D, G, D, nullptr, mn, mx, bad);
}

// zero_half / inv2: per channel, as AsymParams (asym_code's steps, 8 channels at a time).
TROUS_AVX2 void channel_codes_avx2(const float* v, const float* zero_half, const float* inv2, int bits, index_t D,
                                   uint8_t* dst) {
  const __m256 max_q = _mm256_set1_ps((float)max_code(bits));
  const __m256 half = _mm256_set1_ps(0.5f);
  index_t c = 0;
  for (; c + 32 <= D; c += 32) {  // 32 at a time: the packing of store_packed32
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
      const index_t o = c + 8 * k;
      const __m256 t = _mm256_mul_ps(_mm256_fmsub_ps(_mm256_loadu_ps(v + o), half, _mm256_loadu_ps(zero_half + o)),
                                     _mm256_loadu_ps(inv2 + o));
      q[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), max_q));
    }
    store_packed32(q, bits, dst + c / 8 * bits);
  }
  for (; c < D; c += 8) {
    __m256 t = _mm256_mul_ps(_mm256_fmsub_ps(_mm256_loadu_ps(v + c), half, _mm256_loadu_ps(zero_half + c)),
                             _mm256_loadu_ps(inv2 + c));
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), max_q);
    store_packed8(dst + c / 8 * bits, cpu::low_bytes(_mm256_cvtps_epi32(t)), bits);
  }
}

// float_to_fp8 of (x / s) for 8 values, in integer lanes (same steps as the scalar function).
TROUS_AVX2 inline uint64_t fp8_codes8_avx2(__m256 x, __m256 s, Fp8Format f) {
  const int mb = fp8_mant_bits(f), bias = fp8_bias(f), shift = 23 - mb;
  const __m256 y = _mm256_div_ps(x, s);
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(abs, shift), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(abs, _mm256_set1_epi32((1 << (shift - 1)) - 1)), lsb);
  const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(rounded, shift), _mm256_set1_epi32((127 - bias) << mb));
  const __m256 steps =
      _mm256_mul_ps(_mm256_castsi256_ps(abs), _mm256_set1_ps(bits_float((uint32_t)(127 + bias - 1 + mb) << 23)));
  const __m256i subnormal = _mm256_cvtps_epi32(steps);
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32((128 - bias) << 23), abs);
  __m256i code = _mm256_blendv_epi8(normal, subnormal, is_sub);
  code = _mm256_min_epi32(code, _mm256_set1_epi32((int)fp8_max_code(f)));
  const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), is_nan);
  return cpu::low_bytes(_mm256_or_si256(code, sign));
}

// One row of D values (fp32, or fp16 / bf16 converted as they are loaded).
template <typename T>
TROUS_AVX2 void fp8_row_avx2(const T* v, float s, Fp8Format f, index_t D, uint8_t* dst) {
  const __m256 vs = _mm256_set1_ps(s);
  for (index_t c = 0; c < D; c += 8) {
    const uint64_t b = fp8_codes8_avx2(cpu::load8(v + c), vs, f);
    memcpy(dst + c, &b, 8);
  }
}
#endif

template <typename T>
void decode8_scalar(uint64_t b, bool is_signed, float s, float z, T* out) {
  for (int k = 0; k < 8; ++k) {
    const uint8_t c = (uint8_t)(b >> (8 * k));
    out[k] = static_cast<T>(is_signed ? (float)(int8_t)c * s : asym_decode(c, s, z));
  }
}

void store_param_cpu(void* params, index_t i, float v, ParamType t) {
  if (t == ParamType::kFloat16) {
    static_cast<uint16_t*>(params)[i] = float_to_half_bits(v);
  } else {
    static_cast<float*>(params)[i] = v;
  }
}

float load_param_cpu(const void* params, index_t i, ParamType t) {
  return t == ParamType::kFloat16 ? half_bits_to_float(static_cast<const uint16_t*>(params)[i])
                                  : static_cast<const float*>(params)[i];
}

// A row of the input as fp32: the row itself for fp32, else converted into `scratch`.
template <typename T>
const float* row_as_float(const T* src, index_t n, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    cpu::to_float_row(src, scratch.data(), n);
    return scratch.data();
  }
}

// Per-row work, written once over an `Ops` policy (AVX2 or scalar). Each policy's row function
// carries its own target attribute and this body is force-inlined into it, so the AVX2 helpers
// inline too (a generic-target caller could not inline them).
struct ScalarOps {
  using Rounding = ParamRounding;
  static void store_param(void* params, index_t i, float v, ParamType t) { store_param_cpu(params, i, v, t); }
  static float load_param(const void* params, index_t i, ParamType t) { return load_param_cpu(params, i, t); }
  static GroupStats stats(const float* v, index_t n) { return group_stats_scalar(v, n); }
  static uint64_t asym8(const float* v, AsymParams p, int bits) { return asym_codes8_scalar(v, p, bits); }
  static uint64_t sym8(const float* v, float inv) { return sym_codes8_scalar(v, inv); }
  template <typename T>
  static void decode8(uint64_t b, bool is_signed, float s, float z, T* out) {
    decode8_scalar(b, is_signed, s, z, out);
  }
};

#if TROUS_HAVE_AVX2_PATH
struct Avx2Ops {
  // fp16 parameters through F16C (one instruction instead of the portable bit manipulation).
  struct Rounding {
    ParamType t;
    TROUS_AVX2 float operator()(float v) const {
      return t == ParamType::kFloat16
                 ? _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT)))
                 : v;
    }
    // Rounded upwards (the same bits as round_scale_up: the smallest fp16 >= v).
    TROUS_AVX2 float up(float v) const {
      return t == ParamType::kFloat16 ? _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_POS_INF)))
                                      : v;
    }
  };
  TROUS_AVX2 static void store_param(void* params, index_t i, float v, ParamType t) {
    if (t == ParamType::kFloat16) {
      static_cast<uint16_t*>(params)[i] =
          (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT), 0);
    } else {
      static_cast<float*>(params)[i] = v;
    }
  }
  TROUS_AVX2 static float load_param(const void* params, index_t i, ParamType t) {
    if (t == ParamType::kFloat32) return static_cast<const float*>(params)[i];
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<const uint16_t*>(params)[i])));
  }
  template <typename T>
  TROUS_AVX2 static void decode8(uint64_t b, bool is_signed, float s, float z, T* out) {
    decode8_avx2(b, is_signed, s, z, out);
  }
};
#endif

#if TROUS_HAVE_AVX2_PATH
// ---- Parameters of 8 groups at once (lanes = groups), with the scalar formulas' exact steps
// (asym_params_rounded, sym_scale_rounded: the same IEEE operations in the same order, so the same
// bits); the rare lanes whose top code would reach the dtype's limit, and non-finite lanes, are redone
// by the scalar functions themselves. The per-group chains (two divisions, the fp16 roundings) are
// latency-bound one group at a time: eight at once is what lets the bulk ops reach memory speed.

// Lane i of the result: the min (kMin) or max over the 8 lanes of v[i] (min / max are exact, so the
// order of the reduction does not change the value).
template <bool kMin>
TROUS_AVX2 inline __m256 minmax_ps(__m256 a, __m256 b) {
  return kMin ? _mm256_min_ps(a, b) : _mm256_max_ps(a, b);
}

template <bool kMin>
TROUS_AVX2 __m256 transpose_reduce8(const __m256* v) {
  __m256 s[4];
  for (int i = 0; i < 4; ++i) {
    s[i] = minmax_ps<kMin>(_mm256_shuffle_ps(v[2 * i], v[2 * i + 1], 0x88),
                           _mm256_shuffle_ps(v[2 * i], v[2 * i + 1], 0xDD));
  }
  const __m256 lo = minmax_ps<kMin>(_mm256_shuffle_ps(s[0], s[1], 0x88), _mm256_shuffle_ps(s[0], s[1], 0xDD));
  const __m256 hi = minmax_ps<kMin>(_mm256_shuffle_ps(s[2], s[3], 0x88), _mm256_shuffle_ps(s[2], s[3], 0xDD));
  return minmax_ps<kMin>(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

struct alignas(32) Params8 {
  float scale[8], zero[8], inv[8], zero_half[8], inv2[8];
};

TROUS_AVX2 inline __m256 round_param8(__m256 v, ParamType t, int mode) {
  if (t != ParamType::kFloat16) return v;
  return mode == 0 ? _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT))
                   : _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_POS_INF));
}

// asym_params_rounded for 8 groups; bad: bit i set = lane i holds NaN / Inf.
TROUS_AVX2 void asym_params8(__m256 mn, __m256 mx, unsigned bad, int bits, float limit, ParamType t, Params8& o) {
  const __m256 L = _mm256_set1_ps((float)max_code(bits)), half = _mm256_set1_ps(0.5f);
  const __m256 floor_s = _mm256_set1_ps(min_scale(t));
  __m256 s = _mm256_mul_ps(_mm256_div_ps(_mm256_fmsub_ps(mx, half, _mm256_mul_ps(mn, half)), L), _mm256_set1_ps(2.f));
  s = round_param8(s, t, 1);
  s = _mm256_blendv_ps(floor_s, s, _mm256_cmp_ps(s, floor_s, _CMP_GT_OQ));
  const __m256 zero = round_param8(mn, t, 0);
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), s);
  const unsigned ok =
      (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_fmadd_ps(L, s, zero), _mm256_set1_ps(limit), _CMP_LT_OQ));
  _mm256_store_ps(o.scale, s);
  _mm256_store_ps(o.zero, zero);
  _mm256_store_ps(o.inv, inv);
  _mm256_store_ps(o.zero_half, _mm256_mul_ps(zero, half));
  _mm256_store_ps(o.inv2, _mm256_mul_ps(inv, _mm256_set1_ps(2.f)));
  unsigned redo = (~ok | bad) & 0xffu;
  if (redo == 0) return;
  alignas(32) float a[8], b[8];
  _mm256_store_ps(a, mn);
  _mm256_store_ps(b, mx);
  for (; redo; redo &= redo - 1) {
    const int i = __builtin_ctz(redo);
    const AsymParams p = asym_params_rounded(a[i], b[i], !((bad >> i) & 1u), bits, limit, Avx2Ops::Rounding{t});
    o.scale[i] = p.scale;
    o.zero[i] = p.zero;
    o.inv[i] = p.inv;
    o.zero_half[i] = p.zero_half;
    o.inv2[i] = p.inv2;
  }
}

// sym_scale_rounded and sym_inv for 8 groups.
TROUS_AVX2 void sym_params8(__m256 amax, unsigned bad, float limit, ParamType t, Params8& o) {
  const __m256 floor_s = _mm256_set1_ps(min_scale(t));
  __m256 s = round_param8(_mm256_div_ps(amax, _mm256_set1_ps(127.f)), t, 1);
  s = _mm256_blendv_ps(floor_s, s, _mm256_cmp_ps(s, floor_s, _CMP_GT_OQ));
  const unsigned ok = (unsigned)_mm256_movemask_ps(
      _mm256_cmp_ps(_mm256_mul_ps(_mm256_set1_ps(127.f), s), _mm256_set1_ps(limit), _CMP_LT_OQ));
  _mm256_store_ps(o.scale, s);
  _mm256_store_ps(o.inv, _mm256_div_ps(_mm256_set1_ps(1.f), s));
  unsigned redo = (~ok | bad) & 0xffu;
  if (redo == 0) return;
  alignas(32) float a[8];
  _mm256_store_ps(a, amax);
  for (; redo; redo &= redo - 1) {
    const int i = __builtin_ctz(redo);
    o.scale[i] = sym_scale_rounded(a[i], !((bad >> i) & 1u), limit, Avx2Ops::Rounding{t});
    o.inv[i] = sym_inv(o.scale[i]);
  }
}

// asym_code of 32 values, packed LSB-first (as store_packed8) to 32 * bits / 8 bytes at dst: the
// same t and rounding as asym_codes8_avx2. Only the upper clamp is done in float (it keeps a large t
// from converting to INT_MIN); the lower one is the saturation of the int32 -> uint8 packing, which
// gives the same code because rounding commutes with clamping to integers.
TROUS_AVX2 inline __attribute__((always_inline)) void asym_codes32_avx2(const float* v, AsymParams p, int bits,
                                                                        uint8_t* dst) {
  const __m256 zh = _mm256_set1_ps(p.zero_half), inv2 = _mm256_set1_ps(p.inv2), half = _mm256_set1_ps(0.5f);
  const __m256 max_q = _mm256_set1_ps((float)max_code(bits));
  __m256i q[4];
  for (int k = 0; k < 4; ++k) {
    const __m256 t = _mm256_mul_ps(_mm256_fmsub_ps(_mm256_loadu_ps(v + 8 * k), half, zh), inv2);
    q[k] = _mm256_cvtps_epi32(_mm256_min_ps(t, max_q));
  }
  store_packed32(q, bits, dst);
}

// sym_code of 32 values of a finite group as 32 int8 bytes at dst (the steps of sym_codes8_avx2):
// |t| stays near 127 in a finite group, so both clamps are the packing's saturation to [-128, 127]
// and one max with -127.
TROUS_AVX2 inline __attribute__((always_inline)) void sym_codes32_avx2(const float* v, float inv, uint8_t* dst) {
  const __m256 s = _mm256_set1_ps(inv);
  __m256i q[4];
  for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * k), s));
  const __m256i c = _mm256_max_epi8(bytes32(q[0], q[1], q[2], q[3], true), _mm256_set1_epi8(-127));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), c);
}

// Stores the first n (<= 8) lanes of a and, when b, interleaved pairs (a[i], b[i]) from parameter
// index i0 on, in the storage type (F16C, as Avx2Ops::store_param).
TROUS_AVX2 void store_params8(void* params, index_t i0, const float* a, const float* b, int n, ParamType t) {
  alignas(32) float v[16];
  int count = n;
  if (b) {
    const __m256 x = _mm256_load_ps(a), y = _mm256_load_ps(b);
    const __m256 lo = _mm256_unpacklo_ps(x, y), hi = _mm256_unpackhi_ps(x, y);
    _mm256_store_ps(v, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_store_ps(v + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    count = 2 * n;
  } else {
    _mm256_store_ps(v, _mm256_load_ps(a));
  }
  if (t == ParamType::kFloat32) {
    memcpy(static_cast<float*>(params) + i0, v, count * sizeof(float));
    return;
  }
  alignas(32) uint16_t h[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_cvtps_ph(_mm256_load_ps(v), _MM_FROUND_TO_NEAREST_INT));
  if (count > 8) {
    _mm_store_si128(reinterpret_cast<__m128i*>(h + 8),
                    _mm256_cvtps_ph(_mm256_load_ps(v + 8), _MM_FROUND_TO_NEAREST_INT));
  }
  memcpy(static_cast<uint16_t*>(params) + i0, h, count * sizeof(uint16_t));
}

// Statistics of one group of G values (fp32 at f, or converted from src into f on the way): lane-wise
// min and max (asym) or max |x| (symmetric), and whether a value is NaN / Inf: fma(x, 0, acc) stays 0
// for finite x and becomes NaN otherwise (one instruction per vector instead of a mask test).
template <typename T, bool kSymmetric>
TROUS_AVX2 inline void group_stats8(const T* src, float* f, index_t G, __m256& va, __m256& vb, bool& finite) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), zero = _mm256_setzero_ps();
  __m256 mn = _mm256_setzero_ps(), mx = mn, amax = mn, nf[4] = {mn, mn, mn, mn};  // 4 chains: a quarter of the latency
  for (index_t c = 0; c < G; c += 8) {
    const __m256 x = cpu::load8(src + c);
    if constexpr (!std::is_same_v<T, float>) _mm256_storeu_ps(f + c, x);
    if constexpr (kSymmetric) {
      amax = _mm256_max_ps(amax, _mm256_and_ps(x, abs_mask));
    } else {
      mn = c == 0 ? x : _mm256_min_ps(mn, x);
      mx = c == 0 ? x : _mm256_max_ps(mx, x);
    }
    nf[c / 8 % 4] = _mm256_fmadd_ps(x, zero, nf[c / 8 % 4]);
  }
  va = kSymmetric ? amax : mn;
  vb = mx;
  const __m256 any = _mm256_add_ps(_mm256_add_ps(nf[0], nf[1]), _mm256_add_ps(nf[2], nf[3]));
  finite = _mm256_movemask_ps(_mm256_cmp_ps(any, any, _CMP_UNORD_Q)) == 0;
}

// Per-token groups of n_rows rows (row i's D values at rows[i], its codes at dst[i], its groups'
// parameters at group index row_index[i] * (D / G) + g), 8 groups at a time. Rows of fp16 / bf16 are
// converted into `scratch` (n_rows * D floats) by the statistics pass and encoded from there. kG is
// the group size when known at compile time (the loops over a group unroll), else 0.
template <typename T, int kG, bool kSymmetric>
TROUS_AVX2 void quantize_rows_avx2(const T* const* rows, const index_t* row_index, uint8_t* const* dst, index_t n_rows,
                                   const TokenQuantArgs& a, void* params, float* scratch) {
  const index_t G = kG > 0 ? kG : a.group, D = a.in.D, ng = D / G, total = n_rows * ng;
  constexpr int np = kSymmetric ? 1 : 2;
  Params8 o;
  index_t next_row = 0, next_group = 0;  // of the next chunk's first lane (counters, not divisions)
  for (index_t j0 = 0; j0 < total; j0 += 8) {
    const int m = (int)std::min<index_t>(8, total - j0);
    const float* gp[8];                  // lane i's fp32 values
    index_t lane_row[8], lane_group[8];  // lane i holds group lane_group[i] of row lane_row[i]
    __m256 va[8], vb[8];                 // asym: min, max; symmetric: amax
    unsigned bad = 0;
    for (int i = 0; i < 8; ++i) {
      if (i >= m) {
        va[i] = va[0];
        vb[i] = vb[0];
        continue;
      }
      lane_row[i] = next_row;
      lane_group[i] = next_group;
      if (++next_group == ng) {
        next_group = 0;
        ++next_row;
      }
      const index_t off = lane_group[i] * G;
      float* f = std::is_same_v<T, float> ? nullptr : scratch + lane_row[i] * D + off;
      bool finite;
      group_stats8<T, kSymmetric>(rows[lane_row[i]] + off, f, G, va[i], vb[i], finite);
      gp[i] = std::is_same_v<T, float> ? reinterpret_cast<const float*>(rows[lane_row[i]]) + off : f;
      bad |= (unsigned)!finite << i;
    }
    // Group index of lane i; the lanes' parameters are contiguous when their rows are consecutive.
    const auto group_index = [&](int i) { return row_index[lane_row[i]] * ng + lane_group[i]; };
    const index_t p0 = group_index(0);
    bool contiguous = true;  // every row of the lanes follows the previous one
    for (index_t i = lane_row[0] + 1; i <= lane_row[m - 1]; ++i)
      contiguous = contiguous && row_index[i] == row_index[i - 1] + 1;
    const auto store = [&](const float* sc, const float* ze) {
      if (contiguous) return store_params8(params, np * p0, sc, ze, m, a.ptype);
      for (int i = 0; i < m; ++i) {
        Avx2Ops::store_param(params, np * group_index(i), sc[i], a.ptype);
        if (ze) Avx2Ops::store_param(params, np * group_index(i) + 1, ze[i], a.ptype);
      }
    };
    if constexpr (kSymmetric) {
      sym_params8(transpose_reduce8<false>(va), bad, a.limit, a.ptype, o);
      store(o.scale, nullptr);
      for (int i = 0; i < m; ++i) {
        uint8_t* d = dst[lane_row[i]] + lane_group[i] * G;
        const bool finite = !((bad >> i) & 1u);
        index_t c = 0;
        if (finite) {
          for (; c + 32 <= G; c += 32) sym_codes32_avx2(gp[i] + c, o.inv[i], d + c);
        }
        for (; c < G; c += 8) {
          const uint64_t b = finite ? sym_codes8_avx2(gp[i] + c, o.inv[i]) : 0;
          memcpy(d + c, &b, 8);
        }
      }
    } else {
      asym_params8(transpose_reduce8<true>(va), transpose_reduce8<false>(vb), bad, a.bits, a.limit, a.ptype, o);
      store(o.scale, o.zero);
      for (int i = 0; i < m; ++i) {
        uint8_t* d = dst[lane_row[i]] + lane_group[i] * G * a.bits / 8;
        const bool finite = !((bad >> i) & 1u);
        AsymParams p;
        p.scale = o.scale[i];
        p.zero = o.zero[i];
        p.inv = o.inv[i];
        p.zero_half = o.zero_half[i];
        p.inv2 = o.inv2[i];
        index_t c = 0;
        if (finite) {
          for (; c + 32 <= G; c += 32) asym_codes32_avx2(gp[i] + c, p, a.bits, d + c / 8 * a.bits);
        }
        for (; c < G; c += 8) {
          const uint64_t b = finite ? asym_codes8_avx2(gp[i] + c, p, a.bits) : 0;
          store_packed8(d + c / 8 * a.bits, b, a.bits);
        }
      }
    }
  }
}

// quantize_rows_avx2 with the group size and the scheme as template arguments.
template <typename T>
TROUS_AVX2 void quantize_rows_avx2(const T* const* rows, const index_t* row_index, uint8_t* const* dst, index_t n_rows,
                                   const TokenQuantArgs& a, void* params, float* scratch) {
  const auto run = [&](auto group, auto symmetric) {
    quantize_rows_avx2<T, decltype(group)::value, decltype(symmetric)::value>(rows, row_index, dst, n_rows, a, params,
                                                                              scratch);
  };
  const auto by_group = [&](auto symmetric) {
    switch (a.group) {
      case 32: return run(std::integral_constant<int, 32>{}, symmetric);
      case 64: return run(std::integral_constant<int, 64>{}, symmetric);
      case 128: return run(std::integral_constant<int, 128>{}, symmetric);
      default: return run(std::integral_constant<int, 0>{}, symmetric);
    }
  };
  if (a.symmetric) return by_group(std::true_type{});
  by_group(std::false_type{});
}
#endif

#define TROUS_FORCE_INLINE inline __attribute__((always_inline))

// One row of D channels in groups of G (G % 8 == 0): parameters, then codes 8 at a time.
template <typename Ops>
TROUS_FORCE_INLINE void quantize_row(const float* row, const TokenQuantArgs& a, void* params, index_t row_index,
                                     uint8_t* dst) {
  const index_t G = a.group, n_groups = a.in.D / G;
  for (index_t g = 0; g < n_groups; ++g) {
    const float* v = row + g * G;
    const index_t gi = row_index * n_groups + g;
    const GroupStats st = Ops::stats(v, G);
    if (a.symmetric) {
      const float s = sym_scale_rounded(st.amax, st.finite, a.limit, typename Ops::Rounding{a.ptype});
      const float inv = sym_inv(s);
      Ops::store_param(params, gi, s, a.ptype);
      for (index_t c = 0; c < G; c += 8) {
        const uint64_t b = st.finite ? Ops::sym8(v + c, inv) : 0;
        memcpy(dst + g * G + c, &b, 8);
      }
      continue;
    }
    const AsymParams p = asym_params_rounded(st.mn, st.mx, st.finite, a.bits, a.limit, typename Ops::Rounding{a.ptype});
    Ops::store_param(params, 2 * gi, p.scale, a.ptype);
    Ops::store_param(params, 2 * gi + 1, p.zero, a.ptype);
    for (index_t c = 0; c < G; c += 8) {
      const uint64_t b = st.finite ? Ops::asym8(v + c, p, a.bits) : 0;
      store_packed8(dst + (g * G + c) / 8 * a.bits, b, a.bits);
    }
  }
}

template <typename Ops, typename T>
TROUS_FORCE_INLINE void dequantize_row(const uint8_t* src, const void* params, const TokenDequantArgs& a,
                                       index_t row_index, T* out) {
  const index_t G = a.group, n_groups = a.D / G;
  for (index_t g = 0; g < n_groups; ++g) {
    const index_t gi = row_index * n_groups + g;
    const float s = Ops::load_param(params, a.symmetric ? gi : 2 * gi, a.ptype);
    const float z = a.symmetric ? 0.f : Ops::load_param(params, 2 * gi + 1, a.ptype);
    for (index_t c = g * G; c < (g + 1) * G; c += 8) {
      Ops::decode8(load_packed8(src + c / 8 * a.bits, a.bits), a.symmetric, s, z, out + c);
    }
  }
}

void quantize_row_scalar(const float* row, const TokenQuantArgs& a, void* params, index_t r, uint8_t* dst) {
  quantize_row<ScalarOps>(row, a, params, r, dst);
}
template <typename T>
void dequantize_row_scalar(const uint8_t* src, const void* params, const TokenDequantArgs& a, index_t r, T* out) {
  dequantize_row<ScalarOps>(src, params, a, r, out);
}
#if TROUS_HAVE_AVX2_PATH
// dequantize_row with Avx2Ops, 32 codes at a time where the group allows (the same fma per value).
template <typename T>
TROUS_AVX2 void dequantize_row_avx2(const uint8_t* src, const void* params, const TokenDequantArgs& a, index_t r,
                                    T* out) {
  const index_t G = a.group, n_groups = a.D / G;
  for (index_t g = 0; g < n_groups; ++g) {
    const index_t gi = r * n_groups + g;
    const float s = Avx2Ops::load_param(params, a.symmetric ? gi : 2 * gi, a.ptype);
    const float z = a.symmetric ? 0.f : Avx2Ops::load_param(params, 2 * gi + 1, a.ptype);
    index_t c = g * G;
    for (; c + 32 <= (g + 1) * G; c += 32) decode32_avx2(src + c / 8 * a.bits, a.bits, a.symmetric, s, z, out + c);
    for (; c < (g + 1) * G; c += 8)
      Avx2Ops::decode8(load_packed8(src + c / 8 * a.bits, a.bits), a.symmetric, s, z, out + c);
  }
}
#endif

template <typename T>
void quantize_token_impl(const T* x, uint8_t* codes, void* params, const TokenQuantArgs& a) {
  const index_t D = a.in.D;
  const index_t code_bytes = a.symmetric ? D : D * a.bits / 8;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) {  // 8 rows at a time: their groups' parameters are computed 8 at once
    constexpr index_t kRows = 8;
    at::parallel_for(0, a.in.rows(), grain_rows(D), [&](int64_t r0, int64_t r1) {
      std::vector<float> scratch(std::is_same_v<T, float> ? 0 : kRows * D);
      const T* rows[kRows];
      index_t index[kRows];
      uint8_t* dst[kRows];
      RowCursor cur(r0, a.in.H, a.in.T, a.in.stride);
      for (int64_t r = r0; r < r1; r += kRows) {
        const index_t n = std::min<index_t>(kRows, r1 - r);
        for (index_t i = 0; i < n; ++i, cur.next()) {
          rows[i] = x + cur.offset;
          index[i] = r + i;
          dst[i] = codes + (r + i) * code_bytes;
        }
        quantize_rows_avx2<T>(rows, index, dst, n, a, params, scratch.data());
      }
    });
    return;
  }
#endif
  auto* row_fn = &quantize_row_scalar;
  at::parallel_for(0, a.in.rows(), grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(D);
    RowCursor cur(r0, a.in.H, a.in.T, a.in.stride);
    for (int64_t r = r0; r < r1; ++r, cur.next()) {
      row_fn(row_as_float(x + cur.offset, D, scratch), a, params, r, codes + r * code_bytes);
    }
  });
}

template <typename T>
void dequantize_token_impl(const uint8_t* codes, const void* params, T* out, const TokenDequantArgs& a) {
  const index_t D = a.D;
  const index_t code_bytes = a.symmetric ? D : D * a.bits / 8;
  auto* row_fn = &dequantize_row_scalar<T>;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) row_fn = &dequantize_row_avx2<T>;
#endif
  at::parallel_for(0, a.rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_fn(codes + r * code_bytes, params, a, r, out + r * D);
  });
}

void channel_stats_scalar(const float* tile, index_t G, index_t D, float* mn, float* mx, uint32_t* bad) {
  std::copy(tile, tile + D, mn);
  std::copy(tile, tile + D, mx);
  std::fill(bad, bad + D, 0u);
  for (index_t t = 0; t < G; ++t) {
    const float* v = tile + t * D;
    for (index_t c = 0; c < D; ++c) {
      mn[c] = fminf(mn[c], v[c]);
      mx[c] = fmaxf(mx[c], v[c]);
      bad[c] |= !std::isfinite(v[c]);
    }
  }
}

void channel_codes_scalar(const float* v, const float* zero_half, const float* inv2, int bits, index_t D,
                          uint8_t* dst) {
  for (index_t c = 0; c < D; c += 8) {
    uint64_t b = 0;
    for (int k = 0; k < 8; ++k) {
      AsymParams p{};
      p.zero_half = zero_half[c + k];
      p.inv2 = inv2[c + k];
      b |= (uint64_t)asym_code(v[c + k], p, bits) << (8 * k);
    }
    store_packed8(dst + c / 8 * bits, b, bits);
  }
}

// The D channels' parameters of one token group (first parameter index 2 * p0), and the code constants
// zero_half / inv2 per channel. A non-finite channel encodes as 0: inv2 is 0 and zero_half 0, so
// t = x / 2 * 0 is 0 or NaN (x = +-Inf or NaN), which asym_code and the AVX2 clamp turn into 0.
template <typename Ops>
TROUS_FORCE_INLINE void channel_params(const float* mn, const float* mx, const uint32_t* bad, const ChannelQuantArgs& a,
                                       void* params, index_t p0, float* zero_half, float* inv2) {
  for (index_t c = 0; c < a.in.D; ++c) {
    const AsymParams p =
        asym_params_rounded(mn[c], mx[c], bad[c] == 0, a.bits, a.limit, typename Ops::Rounding{a.ptype});
    Ops::store_param(params, (p0 + c) * 2, p.scale, a.ptype);
    Ops::store_param(params, (p0 + c) * 2 + 1, p.zero, a.ptype);
    zero_half[c] = bad[c] ? 0.f : p.zero_half;
    inv2[c] = p.inv2;
  }
}

void channel_params_scalar(const float* mn, const float* mx, const uint32_t* bad, const ChannelQuantArgs& a,
                           void* params, index_t p0, float* zero_half, float* inv2) {
  channel_params<ScalarOps>(mn, mx, bad, a, params, p0, zero_half, inv2);
}
#if TROUS_HAVE_AVX2_PATH
// channel_params, 8 channels at once (asym_params8: the same bits).
TROUS_AVX2 void channel_params_avx2(const float* mn, const float* mx, const uint32_t* bad, const ChannelQuantArgs& a,
                                    void* params, index_t p0, float* zero_half, float* inv2) {
  Params8 o;
  for (index_t c = 0; c < a.in.D; c += 8) {
    const __m256i flags = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bad + c));
    const unsigned bad8 =
        0xffu & ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256())));
    asym_params8(_mm256_loadu_ps(mn + c), _mm256_loadu_ps(mx + c), bad8, a.bits, a.limit, a.ptype, o);
    store_params8(params, (p0 + c) * 2, o.scale, o.zero, 8, a.ptype);
    const __m256 is_bad =
        _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256()), _mm256_set1_epi32(-1)));
    _mm256_storeu_ps(zero_half + c, _mm256_blendv_ps(_mm256_load_ps(o.zero_half), _mm256_setzero_ps(), is_bad));
    _mm256_storeu_ps(inv2 + c, _mm256_load_ps(o.inv2));
  }
}
#endif

// The channel-wise functions of the machine (AVX2 or scalar), chosen once.
struct KeyGroupFns {
  void (*stats)(const float*, index_t, index_t, float*, float*, uint32_t*) = &channel_stats_scalar;
  void (*codes)(const float*, const float*, const float*, int, index_t, uint8_t*) = &channel_codes_scalar;
  void (*params)(const float*, const float*, const uint32_t*, const ChannelQuantArgs&, void*, index_t, float*,
                 float*) = &channel_params_scalar;
  KeyGroupFns() {
#if TROUS_HAVE_AVX2_PATH
    if (has_avx2()) {
      stats = &channel_stats_tile_avx2;
      codes = &channel_codes_avx2;
      params = &channel_params_avx2;
    }
#endif
  }
};

// Scratch of one key group: D floats each (bad: D flags).
struct KeyGroupScratch {
  std::vector<float> mn, mx, zero, inv;
  std::vector<uint32_t> bad;
  explicit KeyGroupScratch(index_t D) : mn(D), mx(D), zero(D), inv(D), bad(D) {}
};

// One token group of G rows (tile, row-major, fp32): channel min / max, the D parameter pairs at pair
// index p0, then the codes of row t at dst + t * code_bytes.
// The parameters and codes of one token group of G rows (tile, row-major, fp32) whose channel
// statistics are in s: the D parameter pairs at pair index p0, the codes of row t at dst + t *
// code_bytes. next_rows (G pointers, or nullptr): the input rows of the next group, whose row_bytes
// are requested one row per encoded row (reading a group after the computation of the previous one
// stalls on memory; spread this way the requests overlap that computation: 1.28x on fp16 KIVI-2).
void encode_key_group(const KeyGroupFns& fn, const float* tile, const ChannelQuantArgs& a, void* params, index_t p0,
                      uint8_t* dst, KeyGroupScratch& s, const char* const* next_rows = nullptr, index_t row_bytes = 0) {
  const index_t D = a.in.D, G = a.group, code_bytes = D * a.bits / 8;
  fn.params(s.mn.data(), s.mx.data(), s.bad.data(), a, params, p0, s.zero.data(), s.inv.data());
  for (index_t t = 0; t < G; ++t) {
    if (next_rows) cpu::prefetch_row(next_rows[t], row_bytes);
    fn.codes(tile + t * D, s.zero.data(), s.inv.data(), a.bits, D, dst + t * code_bytes);
  }
}

// One token group: channel statistics of the tile, then encode_key_group.
void quantize_key_group(const KeyGroupFns& fn, const float* tile, const ChannelQuantArgs& a, void* params, index_t p0,
                        uint8_t* dst, KeyGroupScratch& s) {
  fn.stats(tile, a.group, a.in.D, s.mn.data(), s.mx.data(), s.bad.data());
  encode_key_group(fn, tile, a, params, p0, dst, s);
}

// KIVI keys: one task = one token group of one (b, h), G rows reduced channel-wise.
template <typename T>
void quantize_channel_impl(const T* x, uint8_t* codes, void* params, const ChannelQuantArgs& a) {
  const index_t D = a.in.D, G = a.group, token_groups = a.in.T / G;
  const index_t code_bytes = D * a.bits / 8;
  const KeyGroupFns fn;
  at::parallel_for(0, a.in.B * a.in.H * token_groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(G * D);
    std::vector<const char*> next_rows(G);
    KeyGroupScratch s(D);
    const auto first_row = [&](int64_t task) { return (task / token_groups) * a.in.T + (task % token_groups) * G; };
    for (int64_t task = t0; task < t1; ++task) {
      const index_t row0 = first_row(task);
      // The G rows of a task are consecutive tokens of one (b, h) (T % G == 0): stride a.in.stride.t.
      const T* first = x + row_offset(row0, a.in.H, a.in.T, a.in.stride);
#if TROUS_HAVE_AVX2_PATH
      if (has_avx2()) {  // statistics and the conversion to fp32 in one pass over the input rows
        channel_stats_avx2(first, a.in.stride.t, G, D, tile.data(), s.mn.data(), s.mx.data(), s.bad.data());
      } else
#endif
      {
        for (index_t t = 0; t < G; ++t) cpu::to_float_row(first + t * a.in.stride.t, tile.data() + t * D, D);
        fn.stats(tile.data(), G, D, s.mn.data(), s.mx.data(), s.bad.data());
      }
      const bool ahead = task + 1 < t1;
      if (ahead) {
        const T* next = x + row_offset(first_row(task + 1), a.in.H, a.in.T, a.in.stride);
        for (index_t t = 0; t < G; ++t) next_rows[t] = reinterpret_cast<const char*>(next + t * a.in.stride.t);
      }
      encode_key_group(fn, tile.data(), a, params, task * D, codes + row0 * code_bytes, s,
                       ahead ? next_rows.data() : nullptr, D * (index_t)sizeof(T));
    }
  });
}

// One decoded row: codes (8 per step) times per-channel scale plus min, as in asym_decode.
template <typename T>
void channel_decode_row_scalar(const uint8_t* src, const float* scale, const float* zero, int bits, index_t D, T* out) {
  for (index_t c = 0; c < D; c += 8) {
    const uint64_t b = load_packed8(src + c / 8 * bits, bits);
    for (int k = 0; k < 8; ++k)
      out[c + k] = static_cast<T>(asym_decode((uint32_t)(b >> (8 * k)) & 0xffu, scale[c + k], zero[c + k]));
  }
}

#if TROUS_HAVE_AVX2_PATH
template <typename T>
TROUS_AVX2 void channel_decode_row_avx2(const uint8_t* src, const float* scale, const float* zero, int bits, index_t D,
                                        T* out) {
  index_t c = 0;
  for (; c + 32 <= D; c += 32) {
    __m128i lo, hi;
    load_codes32(src + c / 8 * bits, bits, lo, hi);
    for (int k = 0; k < 4; ++k) {
      const index_t o = c + 8 * k;
      cpu::store8(out + o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes8_of32(lo, hi, k, false)),
                                           _mm256_loadu_ps(scale + o), _mm256_loadu_ps(zero + o)));
    }
  }
  for (; c < D; c += 8) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)load_packed8(src + c / 8 * bits, bits)));
    cpu::store8(out + c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(scale + c), _mm256_loadu_ps(zero + c)));
  }
}
#endif

// One task = one token group of one (b, h): its D scales and mins are decoded once for G rows.
template <typename T>
void dequantize_channel_impl(const uint8_t* codes, const void* params, T* out, const ChannelDequantArgs& a) {
  const index_t D = a.D, G = a.group;
  const index_t code_bytes = D * a.bits / 8;
  auto* row_fn = &channel_decode_row_scalar<T>;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) row_fn = &channel_decode_row_avx2<T>;
#endif
  at::parallel_for(0, a.rows / std::max<index_t>(G, 1), std::max<int64_t>(1, grain_rows(D) / G),
                   [&](int64_t t0, int64_t t1) {
                     std::vector<float> scale(D), zero(D);
                     for (int64_t task = t0; task < t1; ++task) {
                       for (index_t c = 0; c < D; ++c) {
                         scale[c] = load_param_cpu(params, (task * D + c) * 2, a.ptype);
                         zero[c] = load_param_cpu(params, (task * D + c) * 2 + 1, a.ptype);
                       }
                       for (index_t r = task * G; r < (task + 1) * G; ++r) {
                         row_fn(codes + r * code_bytes, scale.data(), zero.data(), a.bits, D, out + r * D);
                       }
                     }
                   });
}

void fp8_row_scalar(const float* v, float s, Fp8Format f, index_t D, uint8_t* dst) {
  for (index_t c = 0; c < D; ++c) dst[c] = float_to_fp8(v[c] / s, f);
}

template <typename T>
void quantize_fp8_impl(const T* x, const float* scale, uint8_t* codes, const Fp8Args& a) {
  const index_t D = a.in.D;
  at::parallel_for(0, a.in.rows(), grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(D);
    RowCursor cur(r0, a.in.H, a.in.T, a.in.stride);
    for (int64_t r = r0; r < r1; ++r, cur.next()) {
      const float s = scale[a.per_head ? cur.h : 0];
#if TROUS_HAVE_AVX2_PATH
      if (has_avx2()) {
        fp8_row_avx2(x + cur.offset, s, a.format, D, codes + r * D);
        continue;
      }
#endif
      fp8_row_scalar(row_as_float(x + cur.offset, D, scratch), s, a.format, D, codes + r * D);
    }
  });
}

template <typename T>
void fp8_decode_row_scalar(const uint8_t* src, const float* table, Fp8Format, float s, index_t D, T* out) {
  for (index_t c = 0; c < D; ++c) out[c] = static_cast<T>(table[src[c]] * s);
}

#if TROUS_HAVE_AVX2_PATH
// fp8_to_float through fp16 bits (e5m2 is the top byte of an fp16; e4m3 moves into an fp16 exponent
// and is rescaled by 2^8, exactly), NaN codes replaced by the table's NaN (sign | 0x7fc00000), then
// times s: the same bits as table[c] * s, without a gather.
template <typename T>
TROUS_AVX2 void fp8_decode_row_avx2(const uint8_t* src, const float*, Fp8Format f, float s, index_t D, T* out) {
  const __m128i low7 = _mm_set1_epi16(0x7f), sign_bit = _mm_set1_epi16(0x80);
  const __m256 vs = _mm256_set1_ps(s);
  for (index_t c = 0; c < D; c += 8) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c)));
    const __m128i mag = _mm_and_si128(w, low7);
    __m128i h, nan;
    if (f == Fp8Format::kE5M2) {
      h = _mm_slli_epi16(w, 8);
      nan = _mm_cmpgt_epi16(mag, _mm_set1_epi16(0x7c));
    } else {
      h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(w, sign_bit), 8));
      nan = _mm_cmpeq_epi16(mag, low7);
    }
    __m256 v = _mm256_cvtph_ps(h);
    if (f == Fp8Format::kE4M3) v = _mm256_mul_ps(v, _mm256_set1_ps(256.f));
    const __m256i sign = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_and_si128(w, sign_bit)), 24);
    const __m256 canonical = _mm256_castsi256_ps(_mm256_or_si256(sign, _mm256_set1_epi32(0x7fc00000)));
    v = _mm256_blendv_ps(v, canonical, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan)));
    cpu::store8(out + c, _mm256_mul_ps(v, vs));
  }
}
#endif

template <typename T>
void dequantize_fp8_impl(const uint8_t* codes, const float* scale, T* out, index_t rows, index_t H, index_t T_len,
                         index_t D, Fp8Format format, bool per_head) {
  // All 256 codes decoded once: the per-element work becomes a lookup (a gather) and a multiply.
  float table[256];
  for (int c = 0; c < 256; ++c) table[c] = fp8_to_float((uint8_t)c, format);
  auto* row_fn = &fp8_decode_row_scalar<T>;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) row_fn = &fp8_decode_row_avx2<T>;
#endif
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row_fn(codes + r * D, table, format, scale[per_head ? (r / T_len) % H : 0], D, out + r * D);
    }
  });
}

}  // namespace

// ---- Row kernels shared with kv_append (append_cpu.h).

void cpu_quantize_token_rows(const float* const* rows, const index_t* row_index, uint8_t* const* dst, index_t n,
                             const TokenQuantArgs& a, void* params) {
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) return quantize_rows_avx2<float>(rows, row_index, dst, n, a, params, nullptr);
#endif
  for (index_t i = 0; i < n; ++i) quantize_row_scalar(rows[i], a, params, row_index[i], dst[i]);
}

void cpu_quantize_key_group(const float* tile, const ChannelQuantArgs& a, void* params, index_t p0, uint8_t* dst) {
  static const KeyGroupFns fn;
  KeyGroupScratch s(a.in.D);
  quantize_key_group(fn, tile, a, params, p0, dst, s);
}

void cpu_quantize_fp8_row(const float* row, float scale, Fp8Format format, index_t D, uint8_t* dst) {
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) return fp8_row_avx2(row, scale, format, D, dst);
#endif
  fp8_row_scalar(row, scale, format, D, dst);
}

void cpu_quantize_token(DType dtype, const void* x, uint8_t* codes, void* params, const TokenQuantArgs& a) {
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_token_impl(static_cast<const T*>(x), codes, params, a);
  });
}

void cpu_dequantize_token(DType dtype, const uint8_t* codes, const void* params, void* out, const TokenDequantArgs& a) {
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_token_impl(codes, params, static_cast<T*>(out), a);
  });
}

void cpu_quantize_channel(DType dtype, const void* x, uint8_t* codes, void* params, const ChannelQuantArgs& a) {
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_channel_impl(static_cast<const T*>(x), codes, params, a);
  });
}

void cpu_dequantize_channel(DType dtype, const uint8_t* codes, const void* params, void* out,
                            const ChannelDequantArgs& a) {
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_channel_impl(codes, params, static_cast<T*>(out), a);
  });
}

void cpu_quantize_fp8(DType dtype, const void* x, const float* scale, uint8_t* codes, const Fp8Args& a) {
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_fp8_impl(static_cast<const T*>(x), scale, codes, a);
  });
}

void cpu_dequantize_fp8(DType dtype, const uint8_t* codes, const float* scale, void* out, index_t rows, index_t H,
                        index_t T, index_t D, Fp8Format format, bool per_head) {
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    dequantize_fp8_impl(codes, scale, static_cast<Elem*>(out), rows, H, T, D, format, per_head);
  });
}

}  // namespace kv
}  // namespace trous
