// CPU kernel of quantized_decode_attention: one task per (sequence, KV head, token split). A task
// walks its tokens in blocks of kBlock: it computes the scores of ALL query rows of the KV head (its
// Hq / Hkv query heads times Sq query tokens) against the block's K rows, updates an online softmax
// in base 2 per row, then accumulates P V for all rows. Each K / V element is decoded once per call
// (once per slab of 4 rows in the fused kernels) and used by every query head of its KV head (GQA).
// Splits of one (sequence, KV head) are merged with their log-sum-exp.
//
// Up to 4 (K) / 8 (V) rows with per-token groups or KIVI keys, the AVX2 kernels decode the codes in
// registers: K dequantized just before its FMAs (qk_fused_avx2), V not dequantized at all, its
// scales folded into P and its zeros added per group (pv_fused_avx2). Other formats and larger row
// counts dequantize the block into an fp32 L1 scratch first (residual tokens: converted from the
// activation dtype). Every block-level step has a scalar twin (TROUS_CPU_SIMD=0, or a CPU without
// AVX2); both compute the same math in fp32 (rounding order and the exponential differ by ulps).
#include "kvcache/decode_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/quantize.h"
#include "trous/simd_cpu.h"

namespace trous {
namespace kv {
namespace {

using cpu::has_avx2;

constexpr index_t kBlock = 32;  // tokens per block (a multiple of 4: the QK tile)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Where one token's K or V row is: codes + its group parameters, or (codes == nullptr) a residual row.
struct Src {
  const uint8_t* codes;
  const void* params;  // asym / sym: the row's [D / G, n_params]; KIVI keys: the token group's [D, 2]
  const void* resid;   // residual row of D activation elements
};

enum class Kind : int { kAsym, kSym, kKiviKey, kFp8 };

// Per-task decoding state of one of K / V.
struct Deq {
  Kind kind;
  int bits;
  index_t D, G;
  ParamType ptype;
  bool e4m3;
  float fp8_scale;                              // the KV head's scale (fp8)
  void (*resid)(const void*, float*, index_t);  // activation row -> fp32
  // KIVI keys: the current token group's scales and minima, de-interleaved to fp32 [D] each.
  float* kS;
  float* kZ;
  const void* kivi_group;
  // Channel order of the fp32 rows (see perm_pos): 1 = natural, 2 / 4 = the codes' byte order.
  int per = 1;
  float* tmp;  // D floats
  float* row;  // D floats (fused QK: a residual row in the rows' order)
};

// AVX2 path for 4- and 2-bit codes: the per = 8 / bits codes of each byte are unpacked to separate
// vectors, so within each chunk of 8 * per channels the fp32 rows hold channel l * per + i at
// position i * 8 + l. q rows, K / V rows and the output accumulator all use that order (dot products
// and P V do not depend on it); the output is put back in channel order when it is written.
inline index_t perm_pos(index_t d, int per) {
  if (per == 1) return d;
  const index_t C = 8 * per, c = d - d % C, r = d % C;
  return c + (r % per) * 8 + r / per;
}

template <typename T>
void resid_row(const void* src, float* dst, index_t n) {
  cpu::to_float_row(static_cast<const T*>(src), dst, n);
}

inline float load_param(const void* p, index_t i, ParamType t) {
  return t == ParamType::kFloat32 ? static_cast<const float*>(p)[i]
                                  : half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
}

// KIVI keys: refresh the de-interleaved parameters when the block reaches a new token group.
inline void kivi_prepare(Deq& q, const void* group) {
  if (group == q.kivi_group) return;
  for (index_t d = 0; d < q.D; ++d) {
    q.kS[perm_pos(d, q.per)] = load_param(group, 2 * d, q.ptype);
    q.kZ[perm_pos(d, q.per)] = load_param(group, 2 * d + 1, q.ptype);
  }
  q.kivi_group = group;
}

// A residual (full-precision) row in the rows' channel order.
inline void resid_into(Deq& q, const void* src, float* out) {
  if (q.per == 1) {
    q.resid(src, out, q.D);
    return;
  }
  q.resid(src, q.tmp, q.D);
  for (index_t d = 0; d < q.D; ++d) out[perm_pos(d, q.per)] = q.tmp[d];
}

inline uint32_t code_at(const uint8_t* c, index_t d, int bits) {
  if (bits == 8) return c[d];
  const int per = 8 / bits;
  return (c[d / per] >> ((d % per) * bits)) & ((1u << bits) - 1u);
}

// ---- scalar twins

void dequant_rows_scalar(Deq& q, const Src* src, index_t nb, float* dst) {
  const index_t D = q.D, G = q.G, ng = G > 0 ? D / G : 0;  // fp8: no groups
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src& s = src[j];
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    switch (q.kind) {
      case Kind::kAsym:
        for (index_t g = 0; g < ng; ++g) {
          const float sc = load_param(s.params, 2 * g, q.ptype), z = load_param(s.params, 2 * g + 1, q.ptype);
          for (index_t d = g * G; d < (g + 1) * G; ++d) out[d] = asym_decode(code_at(s.codes, d, q.bits), sc, z);
        }
        break;
      case Kind::kSym:
        for (index_t g = 0; g < ng; ++g) {
          const float sc = load_param(s.params, g, q.ptype);
          for (index_t d = g * G; d < (g + 1) * G; ++d) out[d] = (float)(int8_t)s.codes[d] * sc;
        }
        break;
      case Kind::kKiviKey:
        kivi_prepare(q, s.params);
        for (index_t d = 0; d < D; ++d) out[d] = asym_decode(code_at(s.codes, d, q.bits), q.kS[d], q.kZ[d]);
        break;
      case Kind::kFp8: {
        const Fp8Format f = q.e4m3 ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
        for (index_t d = 0; d < D; ++d) out[d] = fp8_to_float(s.codes[d], f) * q.fp8_scale;
        break;
      }
    }
  }
}

// S[m][j] = Q[m] . K[j] for rows m < M and tokens j < nb4 (nb rounded up to 4).
void qk_scalar(const float* Q, index_t M, const float* K, index_t nb4, index_t D, float* S) {
  for (index_t m = 0; m < M; ++m) {
    for (index_t j = 0; j < nb4; ++j) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (index_t d = 0; d < D; d += 8) {
        for (int l = 0; l < 8; ++l) acc[l] = fmaf(Q[m * D + d + l], K[j * D + d + l], acc[l]);
      }
      S[m * kBlock + j] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
}

// The new running maximum of a row after a block and the block's sum of 2^(s - max).
struct BlockSoftmax {
  float max, sum;
};

// s[0, valid) are the row's base-2 scores in the block (valid >= 1), s[valid, nb) masked. Replaces
// s[j] by 2^(s[j] - max) (0 for masked j < nb) where max = max(old_max, max of s[0, valid)).
BlockSoftmax softmax_scalar(float* s, index_t valid, index_t nb, float old_max) {
  float mx = old_max;
  for (index_t j = 0; j < valid; ++j) mx = s[j] > mx ? s[j] : mx;
  if (mx == kNegInf) return BlockSoftmax{mx, 0.f};
  float sum = 0.f;
  for (index_t j = 0; j < valid; ++j) {
    s[j] = std::exp2(s[j] - mx);
    sum += s[j];
  }
  for (index_t j = valid; j < nb; ++j) s[j] = 0.f;
  return BlockSoftmax{mx, sum};
}

// O[m] = O[m] * alpha[m] + sum_j P[m][j] V[j].
void pv_scalar(float* O, const float* alpha, const float* P, index_t M, const float* V, index_t nb, index_t D) {
  for (index_t m = 0; m < M; ++m) {
    float* o = O + m * D;
    for (index_t d = 0; d < D; ++d) o[d] *= alpha[m];
    for (index_t j = 0; j < nb; ++j) {
      const float p = P[m * kBlock + j];
      for (index_t d = 0; d < D; ++d) o[d] = fmaf(p, V[j * D + d], o[d]);
    }
  }
}

// ---- AVX2 + FMA + F16C
#if TROUS_HAVE_AVX2_PATH

// 8 consecutive codes, the first at element 8k of the row (c points at its byte), as fp32.
template <int kBits>
TROUS_AVX2 inline __m256 codes8(const uint8_t* c) {
  if constexpr (kBits == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
  } else if constexpr (kBits == 4) {
    uint32_t w;
    memcpy(&w, c, 4);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  } else {
    uint16_t w;
    memcpy(&w, c, 2);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(3)));
  }
}

TROUS_AVX2 inline float load_param_avx2(const void* p, index_t i, ParamType t) {
  if (t == ParamType::kFloat32) return static_cast<const float*>(p)[i];
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<const uint16_t*>(p)[i])));
}

template <int kBits>
TROUS_AVX2 void dequant_asym_avx2(Deq& q, const Src* src, index_t nb, float* dst) {
  const index_t D = q.D, G = q.G, ng = G > 0 ? D / G : 0;  // fp8: no groups
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src s = src[j];  // a copy: the stores to out cannot alias it
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    for (index_t g = 0; g < ng; ++g) {
      const __m256 sc = _mm256_set1_ps(load_param_avx2(s.params, 2 * g, q.ptype));
      const __m256 z = _mm256_set1_ps(load_param_avx2(s.params, 2 * g + 1, q.ptype));
      for (index_t d = g * G; d < (g + 1) * G; d += 8) {
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(codes8<kBits>(s.codes + (d * kBits >> 3)), sc, z));
      }
    }
  }
}

TROUS_AVX2 void dequant_sym_avx2(Deq& q, const Src* src, index_t nb, float* dst) {
  const index_t D = q.D, G = q.G, ng = G > 0 ? D / G : 0;  // fp8: no groups
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src s = src[j];
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    for (index_t g = 0; g < ng; ++g) {
      const __m256 sc = _mm256_set1_ps(load_param_avx2(s.params, g, q.ptype));
      for (index_t d = g * G; d < (g + 1) * G; d += 8) {
        const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.codes + d)));
        _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_cvtepi32_ps(c), sc));
      }
    }
  }
}

template <int kBits>
TROUS_AVX2 void dequant_kivi_avx2(Deq& q, const Src* src, index_t nb, float* dst) {
  const index_t D = q.D;
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src s = src[j];
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    kivi_prepare(q, s.params);
    for (index_t d = 0; d < D; d += 8) {
      const __m256 c = codes8<kBits>(s.codes + (d * kBits >> 3));
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(c, _mm256_loadu_ps(q.kS + d), _mm256_loadu_ps(q.kZ + d)));
    }
  }
}

// 8 bytes of 4- or 2-bit codes (8 * per channels) as per vectors of 8 codes each, in perm_pos order.
template <int kBits>
TROUS_AVX2 inline void codes_perm(const uint8_t* c, __m256* v) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  const __m256i mask = _mm256_set1_epi32((1 << kBits) - 1);
  constexpr int per = 8 / kBits;
  for (int i = 0; i < per; ++i) {
    const __m256i e =
        i == per - 1 ? _mm256_srli_epi32(x, i * kBits) : _mm256_and_si256(_mm256_srli_epi32(x, i * kBits), mask);
    v[i] = _mm256_cvtepi32_ps(e);
  }
}

template <int kBits>
TROUS_AVX2 void dequant_asym_perm_avx2(Deq& q, const Src* src, index_t nb, float* dst) {
  constexpr int per = 8 / kBits, C = 8 * per;
  const index_t D = q.D, G = q.G, ng = G > 0 ? D / G : 0;  // fp8: no groups
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src s = src[j];
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    for (index_t g = 0; g < ng; ++g) {
      const __m256 sc = _mm256_set1_ps(load_param_avx2(s.params, 2 * g, q.ptype));
      const __m256 z = _mm256_set1_ps(load_param_avx2(s.params, 2 * g + 1, q.ptype));
      for (index_t d = g * G; d < (g + 1) * G; d += C) {
        __m256 v[per];
        codes_perm<kBits>(s.codes + (d * kBits >> 3), v);
        for (int i = 0; i < per; ++i) _mm256_storeu_ps(out + d + 8 * i, _mm256_fmadd_ps(v[i], sc, z));
      }
    }
  }
}

template <int kBits>
TROUS_AVX2 void dequant_kivi_perm_avx2(Deq& q, const Src* src, index_t nb, float* dst) {
  constexpr int per = 8 / kBits, C = 8 * per;
  const index_t D = q.D;
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src s = src[j];
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    kivi_prepare(q, s.params);
    for (index_t d = 0; d < D; d += C) {
      __m256 v[per];
      codes_perm<kBits>(s.codes + (d * kBits >> 3), v);
      for (int i = 0; i < per; ++i) {
        const index_t o = d + 8 * i;
        _mm256_storeu_ps(out + o, _mm256_fmadd_ps(v[i], _mm256_loadu_ps(q.kS + o), _mm256_loadu_ps(q.kZ + o)));
      }
    }
  }
}

// fp8 -> fp16 bits -> fp32 (F16C, exact): e5m2 is the top byte of an fp16; e4m3 (bias 7) becomes
// the fp16 with the same exponent and mantissa bits (bias 15), times 2^8; its NaN (0x7f) stays NaN.
TROUS_AVX2 void dequant_fp8_avx2(Deq& q, const Src* src, index_t nb, float* dst) {
  const index_t D = q.D;
  const __m256 sc = _mm256_set1_ps(q.fp8_scale);
  const __m256 pow8 = _mm256_set1_ps(256.f);
  for (index_t j = 0; j < nb; ++j) {
    float* out = dst + j * D;
    const Src s = src[j];
    if (s.codes == nullptr) {
      resid_into(q, s.resid, out);
      continue;
    }
    for (index_t d = 0; d < D; d += 8) {
      const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.codes + d)));
      __m256 f;
      if (q.e4m3) {
        const __m128i mag = _mm_and_si128(w, _mm_set1_epi16(0x7f));
        __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
        h = _mm_blendv_epi8(h, _mm_set1_epi16(0x7e00), _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f)));
        f = _mm256_mul_ps(_mm256_cvtph_ps(h), pow8);
      } else {
        f = _mm256_cvtph_ps(_mm_slli_epi16(w, 8));
      }
      _mm256_storeu_ps(out + d, _mm256_mul_ps(f, sc));
    }
  }
}

// The 4 horizontal sums of a0..a3.
TROUS_AVX2 inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// Tiles of 2 query rows x 4 tokens (8 accumulators; 6 loads per 8 FMAs), then a single-row tail.
TROUS_AVX2 void qk_avx2(const float* Q, index_t M, const float* K, index_t nb4, index_t D, float* S) {
  for (index_t j = 0; j < nb4; j += 4) {
    const float* k0 = K + j * D;
    const float* k1 = k0 + D;
    const float* k2 = k1 + D;
    const float* k3 = k2 + D;
    index_t m = 0;
    for (; m + 2 <= M; m += 2) {
      const float* q0 = Q + m * D;
      const float* q1 = q0 + D;
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
      __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
      for (index_t d = 0; d < D; d += 8) {
        const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
        __m256 k = _mm256_loadu_ps(k0 + d);
        a00 = _mm256_fmadd_ps(x0, k, a00);
        a10 = _mm256_fmadd_ps(x1, k, a10);
        k = _mm256_loadu_ps(k1 + d);
        a01 = _mm256_fmadd_ps(x0, k, a01);
        a11 = _mm256_fmadd_ps(x1, k, a11);
        k = _mm256_loadu_ps(k2 + d);
        a02 = _mm256_fmadd_ps(x0, k, a02);
        a12 = _mm256_fmadd_ps(x1, k, a12);
        k = _mm256_loadu_ps(k3 + d);
        a03 = _mm256_fmadd_ps(x0, k, a03);
        a13 = _mm256_fmadd_ps(x1, k, a13);
      }
      _mm_storeu_ps(S + m * kBlock + j, hsum4(a00, a01, a02, a03));
      _mm_storeu_ps(S + (m + 1) * kBlock + j, hsum4(a10, a11, a12, a13));
    }
    for (; m < M; ++m) {
      const float* q0 = Q + m * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (index_t d = 0; d < D; d += 8) {
        const __m256 x0 = _mm256_loadu_ps(q0 + d);
        a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k1 + d), a1);
        a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k2 + d), a2);
        a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k3 + d), a3);
      }
      _mm_storeu_ps(S + m * kBlock + j, hsum4(a0, a1, a2, a3));
    }
  }
}

// 2^x: x = n + f with n = round(x), |f| <= 1/2, 2^f by its Taylor polynomial of degree 7 (relative
// error < 3e-9 before rounding), times 2^n through the exponent bits. x < -126 gives 0 (-inf
// included), NaN stays NaN; x <= 128 here (scores minus their running maximum are <= 0).
TROUS_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(1.5252733804059841e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284770e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  r = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ));
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

TROUS_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

TROUS_AVX2 inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// The rows of S hold kBlock floats, so whole vectors up to nb rounded up to 8 are in bounds.
TROUS_AVX2 BlockSoftmax softmax_avx2(float* s, index_t valid, index_t nb, float old_max) {
  const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  __m256 vm = ninf;
  for (index_t j = 0; j < valid; j += 8) {
    const __m256 in =
        _mm256_cmp_ps(_mm256_add_ps(iota, _mm256_set1_ps((float)j)), _mm256_set1_ps((float)valid), _CMP_LT_OQ);
    vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), in));
  }
  float mx = hmax8(vm);
  mx = mx > old_max ? mx : old_max;
  if (mx == kNegInf) return BlockSoftmax{mx, 0.f};
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  for (index_t j = 0; j < nb; j += 8) {
    const __m256 in =
        _mm256_cmp_ps(_mm256_add_ps(iota, _mm256_set1_ps((float)j)), _mm256_set1_ps((float)valid), _CMP_LT_OQ);
    const __m256 e = _mm256_blendv_ps(_mm256_setzero_ps(), exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx)), in);
    _mm256_storeu_ps(s + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  return BlockSoftmax{mx, hsum8(vs)};
}

// R rows (R <= 4) x 16 channels of accumulators per pass over the block's tokens; 8-channel tail.
template <int R>
TROUS_AVX2 void pv_rows_avx2(float* O, const float* alpha, const float* P, const float* V, index_t nb, index_t D) {
  index_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m256 acc[R][2];
    __m256 pr[R];
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_set1_ps(alpha[r]);
      acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(O + r * D + d), a);
      acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(O + r * D + d + 8), a);
    }
    for (index_t j = 0; j < nb; ++j) {
      const __m256 v0 = _mm256_loadu_ps(V + j * D + d), v1 = _mm256_loadu_ps(V + j * D + d + 8);
      for (int r = 0; r < R; ++r) {
        pr[r] = _mm256_broadcast_ss(P + r * kBlock + j);
        acc[r][0] = _mm256_fmadd_ps(pr[r], v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(pr[r], v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(O + r * D + d, acc[r][0]);
      _mm256_storeu_ps(O + r * D + d + 8, acc[r][1]);
    }
  }
  for (; d < D; d += 8) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_mul_ps(_mm256_loadu_ps(O + r * D + d), _mm256_set1_ps(alpha[r]));
    for (index_t j = 0; j < nb; ++j) {
      const __m256 v0 = _mm256_loadu_ps(V + j * D + d);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r * kBlock + j), v0, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(O + r * D + d, acc[r]);
  }
}

TROUS_AVX2 void pv_avx2(float* O, const float* alpha, const float* P, index_t M, const float* V, index_t nb,
                        index_t D) {
  index_t m = 0;
  for (; m + 4 <= M; m += 4) pv_rows_avx2<4>(O + m * D, alpha + m, P + m * kBlock, V, nb, D);
  switch (M - m) {
    case 3: pv_rows_avx2<3>(O + m * D, alpha + m, P + m * kBlock, V, nb, D); break;
    case 2: pv_rows_avx2<2>(O + m * D, alpha + m, P + m * kBlock, V, nb, D); break;
    case 1: pv_rows_avx2<1>(O + m * D, alpha + m, P + m * kBlock, V, nb, D); break;
    default: break;
  }
}

// 16 channels of a quantized row from channel d (d % 16 == 0), as two fp32 vectors of codes in the
// rows' channel order: 8-bit codes in channel order, 4- / 2-bit codes in perm_pos order (the 16
// positions from d of the chunk of 8 * per channels that d falls in).
template <int kBits>
TROUS_AVX2 inline void codes16(const uint8_t* codes, index_t d, __m256& v0, __m256& v1) {
  if constexpr (kBits == 8) {
    v0 = codes8<8>(codes + d);
    v1 = codes8<8>(codes + d + 8);
  } else if constexpr (kBits == 4) {  // exactly one chunk of codes_perm
    __m256 v[2];
    codes_perm<4>(codes + (d >> 1), v);
    v0 = v[0];
    v1 = v[1];
  } else {  // half a chunk of codes_perm<2> (positions i * 8 + l: bit 2 i of byte l), only those two
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + ((d >> 5) << 3))));
    const __m256i mask = _mm256_set1_epi32(3);
    const int sh = (int)(d & 16) >> 2;
    v0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(sh)), mask));
    v1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(sh + 2)), mask));
  }
}

template <int R>
TROUS_AVX2 inline void store_scores(const __m256* acc, float* S, index_t j) {
  if constexpr (R == 4) {
    alignas(16) float h4[4];
    _mm_store_ps(h4, hsum4(acc[0], acc[1], acc[2], acc[3]));
    for (int r = 0; r < 4; ++r) S[r * kBlock + j] = h4[r];
  } else {
    for (int r = 0; r < R; ++r) S[r * kBlock + j] = hsum8(acc[r]);
  }
}

// Scores of R <= 4 query rows with the K rows dequantized in registers (no scratch): each 8-channel
// vector of a token is decoded once and used by the R rows. Per-token groups (kKivi = false) or KIVI
// per-channel parameters; 16 channels at a time (codes16) into two accumulators per row, so that
// 2 R FMA chains hide the FMA latency.
template <int kBits, bool kKivi, int R>
TROUS_AVX2 void qk_fused_avx2(Deq& q, const Src* src, index_t nb, const float* Q, float* S) {
  const index_t D = q.D, G = kKivi ? D : q.G, ng = D / G;  // KIVI: one "group" of per-channel parameters
  for (index_t j = 0; j < nb; ++j) {
    const Src s = src[j];
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    if (s.codes == nullptr) {
      resid_into(q, s.resid, q.row);
      for (index_t d = 0; d < D; d += 8) {
        const __m256 k = _mm256_loadu_ps(q.row + d);
        for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + d), k, acc[r][0]);
      }
    } else {
      if constexpr (kKivi) kivi_prepare(q, s.params);
      for (index_t g = 0; g < ng; ++g) {
        __m256 sc = _mm256_setzero_ps(), z = sc;
        if constexpr (!kKivi) {
          sc = _mm256_set1_ps(load_param_avx2(s.params, 2 * g, q.ptype));
          z = _mm256_set1_ps(load_param_avx2(s.params, 2 * g + 1, q.ptype));
        }
        for (index_t d = g * G; d < (g + 1) * G; d += 16) {
          __m256 k0, k1;
          codes16<kBits>(s.codes, d, k0, k1);
          if constexpr (kKivi) {
            k0 = _mm256_fmadd_ps(k0, _mm256_loadu_ps(q.kS + d), _mm256_loadu_ps(q.kZ + d));
            k1 = _mm256_fmadd_ps(k1, _mm256_loadu_ps(q.kS + d + 8), _mm256_loadu_ps(q.kZ + d + 8));
          } else {
            k0 = _mm256_fmadd_ps(k0, sc, z);
            k1 = _mm256_fmadd_ps(k1, sc, z);
          }
          for (int r = 0; r < R; ++r) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + d), k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + d + 8), k1, acc[r][1]);
          }
        }
      }
    }
    __m256 sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_add_ps(acc[r][0], acc[r][1]);
    store_scores<R>(sum, S, j);
  }
}

// For the NG groups from g0 and every token t < nq: ps[g][t][0, 4) = pt[t] * scale[t][g], and
// zs[g][0, 4) = sum_t pt[t] * zero[t][g] (in registers: NG independent chains).
template <int NG>
TROUS_AVX2 inline void group_factors_avx2(const Deq& q, const Src* src, index_t nq, const float* pt, index_t g0,
                                          float* ps, float* zs) {
  __m128 za[NG];
  for (int i = 0; i < NG; ++i) za[i] = _mm_setzero_ps();
  for (index_t t = 0; t < nq; ++t) {
    const __m128 p4 = _mm_load_ps(pt + t * 4);
    const void* prm = src[t].params;
    for (int i = 0; i < NG; ++i) {
      const index_t g = g0 + i;
      const __m128 sc = _mm_set1_ps(load_param_avx2(prm, 2 * g, q.ptype));
      const __m128 z = _mm_set1_ps(load_param_avx2(prm, 2 * g + 1, q.ptype));
      _mm_storeu_ps(ps + (g * kBlock + t) * 4, _mm_mul_ps(p4, sc));  // [ng][kBlock][4]
      za[i] = _mm_fmadd_ps(p4, z, za[i]);
    }
  }
  for (int i = 0; i < NG; ++i) _mm_storeu_ps(zs + 4 * (g0 + i), za[i]);
}

// O[r] = O[r] * alpha[r] + sum_t P[r][t] V[t] for R <= 4 rows over nq quantized tokens with
// per-token (scale, zero) groups, V never dequantized: P[r][t] * scale[t][g] multiplies the raw codes
// and the zeros add sum_t P[r][t] zero[t][g] to the group's channels once per block. That leaves the
// FMAs of P V and the code conversion per element (no dequantize FMA, no scratch store and reload).
// ps: scratch of (D / G) * kBlock * 4 + 4 * (D / G) floats.
template <int kBits, int R>
TROUS_AVX2 void pv_fused_rows_avx2(const Deq& q, const Src* src, index_t nq, const float* P, const float* alpha,
                                   float* O, float* ps) {
  const index_t D = q.D, G = q.G, ng = D / G;
  float* zs = ps + ng * kBlock * 4;  // [ng][4]
  // Each token's R row probabilities as one 4-lane vector (rows >= R zero).
  alignas(16) float pt[kBlock * 4];
  for (index_t t = 0; t < nq; ++t) {
    for (int r = 0; r < 4; ++r) pt[t * 4 + r] = r < R ? P[r * kBlock + t] : 0.f;
  }
  index_t g0 = 0;
  for (; g0 + 4 <= ng; g0 += 4) group_factors_avx2<4>(q, src, nq, pt, g0, ps, zs);
  for (; g0 + 2 <= ng; g0 += 2) group_factors_avx2<2>(q, src, nq, pt, g0, ps, zs);
  for (; g0 < ng; ++g0) group_factors_avx2<1>(q, src, nq, pt, g0, ps, zs);
  for (index_t g = 0; g < ng; ++g) {
    const float* pg = ps + g * kBlock * 4;
    for (index_t d = g * G; d < (g + 1) * G; d += 16) {
      __m256 acc[R][2];
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_set1_ps(alpha[r]);
        acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(O + r * D + d), a);
        acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(O + r * D + d + 8), a);
      }
      for (index_t t = 0; t < nq; ++t) {
        __m256 v0, v1;
        codes16<kBits>(src[t].codes, d, v0, v1);
        for (int r = 0; r < R; ++r) {
          const __m256 b = _mm256_broadcast_ss(pg + t * 4 + r);
          acc[r][0] = _mm256_fmadd_ps(b, v0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(b, v1, acc[r][1]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 z = _mm256_set1_ps(zs[4 * g + r]);
        _mm256_storeu_ps(O + r * D + d, _mm256_add_ps(acc[r][0], z));
        _mm256_storeu_ps(O + r * D + d + 8, _mm256_add_ps(acc[r][1], z));
      }
    }
  }
}

template <int kBits>
TROUS_AVX2 void pv_fused_avx2(const Deq& q, const Src* src, index_t nq, const float* P, const float* alpha, index_t M,
                              float* O, float* ps) {
  const index_t D = q.D;
  index_t m = 0;
  for (; m + 4 <= M; m += 4) pv_fused_rows_avx2<kBits, 4>(q, src, nq, P + m * kBlock, alpha + m, O + m * D, ps);
  switch (M - m) {
    case 3: pv_fused_rows_avx2<kBits, 3>(q, src, nq, P + m * kBlock, alpha + m, O + m * D, ps); break;
    case 2: pv_fused_rows_avx2<kBits, 2>(q, src, nq, P + m * kBlock, alpha + m, O + m * D, ps); break;
    case 1: pv_fused_rows_avx2<kBits, 1>(q, src, nq, P + m * kBlock, alpha + m, O + m * D, ps); break;
    default: break;
  }
}

#endif  // TROUS_HAVE_AVX2_PATH

using FusedQkFn = void (*)(Deq&, const Src*, index_t, const float*, float*);

template <int kBits, bool kKivi>
FusedQkFn pick_fused_rows(index_t M) {
#if TROUS_HAVE_AVX2_PATH
  switch (M) {
    case 1: return &qk_fused_avx2<kBits, kKivi, 1>;
    case 2: return &qk_fused_avx2<kBits, kKivi, 2>;
    case 3: return &qk_fused_avx2<kBits, kKivi, 3>;
    case 4: return &qk_fused_avx2<kBits, kKivi, 4>;
    default: return nullptr;
  }
#else
  (void)M;
  return nullptr;
#endif
}

// The fused QK of up to 4 query rows for per-token and KIVI keys (AVX2); nullptr: scratch path.
FusedQkFn pick_fused_qk(const Deq& q, index_t M, bool avx2) {
  if (!avx2 || M > 4 || (q.kind != Kind::kAsym && q.kind != Kind::kKiviKey)) return nullptr;
  if (q.bits < 8 && q.per == 1) return nullptr;  // groups or D not made of whole unpacked chunks
  if ((q.kind == Kind::kKiviKey ? q.D : q.G) % 16 != 0) return nullptr;  // codes16's unit
  const bool kivi = q.kind == Kind::kKiviKey;
  switch (q.bits) {
    case 8: return kivi ? pick_fused_rows<8, true>(M) : pick_fused_rows<8, false>(M);
    case 4: return kivi ? pick_fused_rows<4, true>(M) : pick_fused_rows<4, false>(M);
    default: return kivi ? pick_fused_rows<2, true>(M) : pick_fused_rows<2, false>(M);
  }
}

using FusedPvFn = void (*)(const Deq&, const Src*, index_t, const float*, const float*, index_t, float*, float*);

// P V straight from per-token-group V codes (AVX2) for up to 8 rows (two passes of 4 over the codes;
// beyond that the scratch path, which decodes once for all rows, costs less); nullptr: scratch path.
FusedPvFn pick_fused_pv(const Deq& q, index_t M, bool avx2) {
#if TROUS_HAVE_AVX2_PATH
  if (!avx2 || M > 8 || q.kind != Kind::kAsym || q.G % 16 != 0) return nullptr;
  if (q.bits < 8 && q.per == 1) return nullptr;  // 4- / 2-bit codes only in the unpacked order
  return q.bits == 8 ? &pv_fused_avx2<8> : q.bits == 4 ? &pv_fused_avx2<4> : &pv_fused_avx2<2>;
#else
  (void)q;
  (void)M;
  (void)avx2;
  return nullptr;
#endif
}

using DequantFn = void (*)(Deq&, const Src*, index_t, float*);

DequantFn pick_dequant(const Deq& q, bool avx2) {
#if TROUS_HAVE_AVX2_PATH
  if (avx2) {
    switch (q.kind) {
      case Kind::kAsym:
        if (q.per > 1) return q.bits == 4 ? &dequant_asym_perm_avx2<4> : &dequant_asym_perm_avx2<2>;
        return q.bits == 8 ? &dequant_asym_avx2<8> : q.bits == 4 ? &dequant_asym_avx2<4> : &dequant_asym_avx2<2>;
      case Kind::kSym: return &dequant_sym_avx2;
      case Kind::kKiviKey:
        if (q.per > 1) return q.bits == 4 ? &dequant_kivi_perm_avx2<4> : &dequant_kivi_perm_avx2<2>;
        return q.bits == 8 ? &dequant_kivi_avx2<8> : q.bits == 4 ? &dequant_kivi_avx2<4> : &dequant_kivi_avx2<2>;
      case Kind::kFp8: return &dequant_fp8_avx2;
    }
  }
#endif
  (void)avx2;
  return &dequant_rows_scalar;
}

struct Kernels {
  void (*qk)(const float*, index_t, const float*, index_t, index_t, float*);
  BlockSoftmax (*softmax)(float*, index_t, index_t, float);
  void (*pv)(float*, const float*, const float*, index_t, const float*, index_t, index_t);
};

Kernels pick_kernels(bool avx2) {
#if TROUS_HAVE_AVX2_PATH
  if (avx2) return Kernels{&qk_avx2, &softmax_avx2, &pv_avx2};
#endif
  (void)avx2;
  return Kernels{&qk_scalar, &softmax_scalar, &pv_scalar};
}

template <typename T>
void load_q_rows(const DecodeParams& p, index_t b, index_t h, index_t ngroup, float qscale, int per, float* tmp,
                 float* Q) {
  const index_t D = p.cache.fmt.head_dim;
  const T* q = static_cast<const T*>(p.q);
  for (index_t i = 0; i < ngroup; ++i) {
    for (index_t s = 0; s < p.Sq; ++s) {
      const T* row = q + b * p.sq.b + (h * ngroup + i) * p.sq.h + s * p.sq.t;
      float* dst = Q + (i * p.Sq + s) * D;
      cpu::to_float_row(row, tmp, D);
      for (index_t d = 0; d < D; ++d) dst[perm_pos(d, per)] = tmp[d] * qscale;
    }
  }
}

template <typename T>
void store_out_row(const float* o, float inv_l, T* dst, index_t D, int per, float* tmp) {
  for (index_t d = 0; d < D; ++d) tmp[d] = o[perm_pos(d, per)] * inv_l;
  cpu::from_float_row(tmp, dst, D);
}

// One (sequence b, KV head h, tokens [t_begin, t_end)) task: its unnormalised O [M, D] and its
// base-2 running maximum and sum per row.
struct TaskOut {
  float* O;
  float* mx;
  float* sum;
};

template <typename T>
void run_task(const DecodeParams& p, const Kernels& kn, bool avx2, int per, index_t b, index_t h, index_t t_begin,
              index_t t_end, const TaskOut& to) {
  const CacheRef& c = p.cache;
  const CacheFormat& f = c.fmt;
  const index_t D = f.head_dim, Hkv = c.map.num_heads, ngroup = p.Hq / Hkv, M = ngroup * p.Sq;
  const index_t L = c.lengths[b];
  const index_t qlen = quantized_length(f, L);
  const bool capped = p.softcap > 0.f;
  const float qscale = p.scale * (capped ? 1.f : kLog2e);

  // L1 scratch: Q rows, K / V blocks, scores, KIVI key parameters.
  const index_t ng = f.group > 0 ? D / f.group : 0;
  std::vector<float> buf(M * D + 2 * kBlock * D + M * kBlock + 2 * M + 3 * D + ng * (4 * kBlock + 4), 0.f);
  float* Q = buf.data();
  float* Kb = Q + M * D;
  float* Vb = Kb + kBlock * D;
  float* S = Vb + kBlock * D;
  float* alpha = S + M * kBlock;
  float* kS = alpha + M;
  float* kZ = kS + D;
  float* tmp = kZ + D;
  float* ones = tmp + D;         // alpha of a second P V pass in the same block
  float* pv_scratch = ones + M;  // pv_fused_avx2's row factors
  std::fill(ones, ones + M, 1.f);
  load_q_rows<T>(p, b, h, ngroup, qscale, per, tmp, Q);
  for (index_t m = 0; m < M; ++m) {
    to.mx[m] = kNegInf;
    to.sum[m] = 0.f;
  }
  std::fill(to.O, to.O + M * D, 0.f);

  const int pbytes = f.param_type == ParamType::kFloat16 ? 2 : 4;
  const index_t cb = code_bytes(f);
  const bool kivi = f.scheme == CacheScheme::kKivi;
  const index_t tok_params = f.scheme == CacheScheme::kFp8 ? 0 : (D / f.group) * n_params(f);
  const uint8_t* kc = static_cast<const uint8_t*>(c.k_codes);
  const uint8_t* vc = static_cast<const uint8_t*>(c.v_codes);
  const uint8_t* kp = static_cast<const uint8_t*>(c.k_params);
  const uint8_t* vp = static_cast<const uint8_t*>(c.v_params);
  const T* kr = static_cast<const T*>(c.k_residual);
  const T* vr = static_cast<const T*>(c.v_residual);

  Deq dk{}, dv{};
  dk.D = dv.D = D;
  dk.G = dv.G = f.group;
  dk.bits = dv.bits = f.bits;
  dk.ptype = dv.ptype = f.param_type;
  dk.e4m3 = dv.e4m3 = f.fp8_format == Fp8Format::kE4M3;
  dk.resid = dv.resid = &resid_row<T>;
  switch (f.scheme) {
    case CacheScheme::kPerToken: dk.kind = dv.kind = Kind::kAsym; break;
    case CacheScheme::kSymmetric: dk.kind = dv.kind = Kind::kSym; break;
    case CacheScheme::kKivi:
      dk.kind = Kind::kKiviKey;
      dv.kind = Kind::kAsym;
      break;
    case CacheScheme::kFp8:
      dk.kind = dv.kind = Kind::kFp8;
      dk.fp8_scale = static_cast<const float*>(c.k_params)[c.fp8_scale_per_head ? h : 0];
      dv.fp8_scale = static_cast<const float*>(c.v_params)[c.fp8_scale_per_head ? h : 0];
      break;
  }
  dk.kS = kS;
  dk.kZ = kZ;
  dk.per = dv.per = per;
  dk.tmp = dv.tmp = tmp;
  dk.row = Kb;
  const DequantFn deq_k = pick_dequant(dk, avx2), deq_v = pick_dequant(dv, avx2);
  const FusedQkFn fused_qk = pick_fused_qk(dk, M, avx2);
  const FusedPvFn fused_pv = pick_fused_pv(dv, M, avx2);

  const index_t ps = c.map.page_size, G = f.group;
  // Sources of a block's tokens: rows are consecutive within a page (cache.h), so token_row /
  // key_group_row / residual_row are called once per page run and followed incrementally.
  const auto fill = [&](index_t t0, index_t nb, Src* ks, Src* vs) {
    index_t t = t0, j = 0;
    const index_t qe = std::min(t0 + nb, qlen);
    while (t < qe) {
      const index_t row0 = token_row(c.map, b, h, t);
      const index_t run = std::min(qe - t, ps - t % ps);
      index_t kg = kivi ? key_group_row(c.map, f, b, h, t) : 0, in_group = kivi ? (t % ps) % G : 0;
      for (index_t i = 0; i < run; ++i, ++j) {
        const index_t row = row0 + i;
        const index_t kprow = kivi ? kg * D * 2 : row * tok_params;
        ks[j] = Src{kc + row * cb, kp + kprow * pbytes, nullptr};
        vs[j] = Src{vc + row * cb, vp + row * tok_params * pbytes, nullptr};
        if (kivi && ++in_group == G) {
          in_group = 0;
          ++kg;
        }
      }
      t += run;
    }
    if (t < t0 + nb) {
      const index_t cap = residual_capacity(f);
      index_t slot = residual_slot(f, t);
      const index_t base = residual_row(f, Hkv, b, h, t) - slot;
      for (; t < t0 + nb; ++t, ++j) {
        const index_t rrow = (base + slot) * D;
        ks[j] = Src{nullptr, nullptr, kr + rrow};
        vs[j] = Src{nullptr, nullptr, vr + rrow};
        if (++slot == cap) slot = 0;
      }
    }
  };
  // (No software prefetch of the next block: the rows of a block are contiguous runs that the
  // hardware prefetcher follows, and a measured prefetch into L1 made int8 decode 1.2-1.5x slower.)
  Src ks[kBlock], vs[kBlock];
  for (index_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
    const index_t nb = std::min(kBlock, t_end - t0);
    fill(t0, nb, ks, vs);
    if (fused_qk != nullptr) {
      fused_qk(dk, ks, nb, Q, S);
    } else {
      deq_k(dk, ks, nb, Kb);
      kn.qk(Q, M, Kb, (nb + 3) / 4 * 4, D, S);
    }

    // Online softmax (base 2) per row; row m = (query head i, query token s) sees tokens <= pos.
    bool any = false;
    for (index_t m = 0; m < M; ++m) {
      float* s = S + m * kBlock;
      const index_t pos = L - p.Sq + m % p.Sq;
      const index_t valid = std::min(nb, std::max<index_t>(0, pos - t0 + 1));
      if (capped && valid > 0) {
        const float inv_cap = 1.f / p.softcap, cap2 = p.softcap * kLog2e;
        for (index_t jj = 0; jj < valid; ++jj) s[jj] = cap2 * std::tanh(s[jj] * inv_cap);
      }
      // p = 2^(s - new max) for the valid tokens, 0 for the rest; alpha = 2^(old max - new max).
      const BlockSoftmax r = valid > 0 ? kn.softmax(s, valid, nb, to.mx[m]) : BlockSoftmax{kNegInf, 0.f};
      if (r.max == kNegInf) {  // nothing for this row in the block
        alpha[m] = 1.f;
        for (index_t jj = 0; jj < nb; ++jj) s[jj] = 0.f;
        continue;
      }
      any = true;
      const float a = std::exp2(to.mx[m] - r.max);
      alpha[m] = a;
      to.sum[m] = to.sum[m] * a + r.sum;
      to.mx[m] = r.max;
    }
    if (!any) continue;
    // A block's quantized tokens come before its residual ones (positions < qlen).
    const index_t nq = fused_pv != nullptr ? std::clamp<index_t>(qlen - t0, 0, nb) : 0;
    if (nq > 0) {
      fused_pv(dv, vs, nq, S, alpha, M, to.O, pv_scratch);
      if (nq < nb) {
        deq_v(dv, vs + nq, nb - nq, Vb);
        kn.pv(to.O, ones, S + nq, M, Vb, nb - nq, D);
      }
    } else {
      deq_v(dv, vs, nb, Vb);
      kn.pv(to.O, alpha, S, M, Vb, nb, D);
    }
  }
}

template <typename T>
void write_rows(const DecodeParams& p, int per, index_t b, index_t h, const float* O, const float* mx, const float* sum,
                float* tmp) {
  const index_t D = p.cache.fmt.head_dim, ngroup = p.Hq / p.cache.map.num_heads;
  T* out = static_cast<T*>(p.out);
  for (index_t i = 0; i < ngroup; ++i) {
    for (index_t s = 0; s < p.Sq; ++s) {
      const index_t m = i * p.Sq + s;
      const index_t orow = (b * p.Hq + h * ngroup + i) * p.Sq + s;
      const bool empty = !(sum[m] > 0.f);
      store_out_row<T>(O + m * D, empty ? 0.f : 1.f / sum[m], out + orow * D, D, per, tmp);
      p.lse[orow] = empty ? kNegInf : (mx[m] + std::log2(sum[m])) * kLn2;
    }
  }
}

template <typename T>
void decode_typed(const DecodeParams& p) {
  const CacheRef& c = p.cache;
  const index_t B = c.batch, Hkv = c.map.num_heads, D = c.fmt.head_dim, M = (p.Hq / Hkv) * p.Sq;
  if (B == 0 || p.Hq == 0 || p.Sq == 0) return;
  const bool avx2 = has_avx2() && D % 8 == 0;
  const Kernels kn = pick_kernels(avx2);
  // The unpacked channel order of 4- / 2-bit codes (perm_pos) where chunks of 8 * per channels fit
  // the head dimension and the groups.
  int per = 1;
  const CacheFormat& f = c.fmt;
  if (avx2 && f.bits < 8 && (f.scheme == CacheScheme::kPerToken || f.scheme == CacheScheme::kKivi)) {
    const index_t C = 8 * (8 / f.bits);
    if (D % C == 0 && f.group % C == 0) per = 8 / f.bits;
  }
  index_t max_len = 0;
  for (index_t b = 0; b < B; ++b) max_len = std::max<index_t>(max_len, c.lengths[b]);
  const index_t nsplit = cpu_decode_splits(B * Hkv, max_len, at::get_num_threads());
  const index_t BH = B * Hkv;
  // Per-task results: O [M, D], max [M], sum [M].
  const index_t per_task = M * (D + 2);
  if (nsplit == 1) {
    at::parallel_for(0, BH, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> res(per_task + D);
      for (int64_t task = lo; task < hi; ++task) {
        const index_t b = task / Hkv, h = task % Hkv;
        TaskOut to{res.data(), res.data() + M * D, res.data() + M * D + M};
        run_task<T>(p, kn, avx2, per, b, h, 0, c.lengths[b], to);
        write_rows<T>(p, per, b, h, to.O, to.mx, to.sum, res.data() + per_task);
      }
    });
    return;
  }
  std::vector<float> parts(BH * nsplit * per_task);
  at::parallel_for(0, BH * nsplit, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const index_t bh = task / nsplit, k = task % nsplit, b = bh / Hkv, h = bh % Hkv;
      const index_t L = c.lengths[b];
      const index_t chunk = ceil_div(ceil_div(L, nsplit), kBlock) * kBlock;
      float* r = parts.data() + task * per_task;
      TaskOut to{r, r + M * D, r + M * D + M};
      run_task<T>(p, kn, avx2, per, b, h, std::min(L, k * chunk), std::min(L, (k + 1) * chunk), to);
    }
  });
  // Merge the splits of each (b, h) with their log-sum-exp (base 2).
  at::parallel_for(0, BH, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> res(per_task + D);
    for (int64_t bh = lo; bh < hi; ++bh) {
      float* O = res.data();
      float* mx = O + M * D;
      float* sum = mx + M;
      for (index_t m = 0; m < M; ++m) {
        float gmax = kNegInf;
        for (index_t k = 0; k < nsplit; ++k) gmax = std::max(gmax, parts[(bh * nsplit + k) * per_task + M * D + m]);
        mx[m] = gmax;
        sum[m] = 0.f;
        std::fill(O + m * D, O + (m + 1) * D, 0.f);
        if (gmax == kNegInf) continue;
        for (index_t k = 0; k < nsplit; ++k) {
          const float* r = parts.data() + (bh * nsplit + k) * per_task;
          if (!(r[M * D + M + m] > 0.f)) continue;
          const float w = std::exp2(r[M * D + m] - gmax);
          sum[m] += r[M * D + M + m] * w;
          for (index_t d = 0; d < D; ++d) O[m * D + d] = fmaf(r[m * D + d], w, O[m * D + d]);
        }
      }
      write_rows<T>(p, per, bh / Hkv, bh % Hkv, O, mx, sum, res.data() + per_task);
    }
  });
}

}  // namespace

index_t cpu_decode_splits(index_t batch_heads, index_t max_len, index_t threads) {
  if (batch_heads <= 0 || threads <= 1 || batch_heads >= 2 * threads) return 1;
  // Fewer (b, h) than twice the threads: split so that there are >= 2 tasks per thread, but keep
  // at least 256 tokens per split (below that the merge costs more than it balances).
  const index_t want = ceil_div(2 * threads, batch_heads);
  const index_t by_len = std::max<index_t>(1, max_len / 256);
  return std::max<index_t>(1, std::min(want, by_len));
}

void cpu_quantized_decode(const DecodeParams& p) {
  dispatch_dtype<cpu::CpuTypes>(p.cache.act, [&](auto tag) { decode_typed<decltype(tag)>(p); });
}

}  // namespace kv
}  // namespace trous
