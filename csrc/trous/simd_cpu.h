// x86 AVX2 helpers for CPU kernels, chosen at run time (the wheel stays portable to CPUs without
// AVX2). The compiler does not vectorise min/max reductions or float compares without fast-math, so
// the hot loops of the kernels are written with intrinsics behind TROUS_AVX2 and have scalar twins.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "trous/common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TROUS_HAVE_AVX2_PATH 1
#define TROUS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TROUS_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#else
#define TROUS_HAVE_AVX2_PATH 0
#endif

// Whole-function clones for AVX2+FMA and a portable default, picked at load time (GCC ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TROUS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TROUS_CPU_CLONES
#endif

namespace trous {
namespace cpu {

// The CPU element types of DType::kFloat16 / kBFloat16, for dispatch_dtype (trous/dtype.h).
struct CpuTypes {
  using f16 = c10::Half;
  using bf16 = c10::BFloat16;
};

// Where prefetch_line sends a cache line: L1, L2, or L2 with write intent (the store that follows
// then needs no read of the line from memory).
enum class Prefetch { kL1, kL2, kWrite };

// One cache line requested ahead of its use. Volatile asm on x86, not __builtin_prefetch: GCC deems a
// function whose only effect is __builtin_prefetch `const` and deletes its calls when it is not
// inlined first (the attention kernel's K / V prefetches and the KV decode's code prefetches were
// never emitted).
inline void prefetch_line(const void* line, Prefetch to) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char& m = *static_cast<const char*>(line);
  switch (to) {
    case Prefetch::kL1: asm volatile("prefetcht0 %0" : : "m"(m)); break;
    case Prefetch::kL2: asm volatile("prefetcht1 %0" : : "m"(m)); break;
    case Prefetch::kWrite: asm volatile("prefetchw %0" : : "m"(m)); break;
  }
#else
  __builtin_prefetch(line, to == Prefetch::kWrite ? 1 : 0, to == Prefetch::kL1 ? 3 : 2);
#endif
}

// The cache lines of the n elements at row, requested ahead of their use (rows of a few hundred
// bytes, strided or reached after a long computation, are where the hardware prefetcher falls short).
template <typename T>
inline void prefetch_row(const T* row, index_t n, Prefetch to = Prefetch::kL1) {
  const char* p = reinterpret_cast<const char*>(row);
  for (index_t off = 0; off < n * static_cast<index_t>(sizeof(T)); off += 64) prefetch_line(p + off, to);
}

// TROUS_CPU_SIMD=0 in the environment (read once, at the first kernel call) makes every kernel take
// its scalar twin, so that the tests run those on AVX2 and AVX-512 hosts too.
inline bool simd_allowed() {
  static const bool yes = [] {
    const char* v = std::getenv("TROUS_CPU_SIMD");
    return v == nullptr || std::string(v) != "0";
  }();
  return yes;
}

inline bool has_avx2() {
#if TROUS_HAVE_AVX2_PATH
  static const bool yes = simd_allowed() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

// AVX-512 paths are taken only where they measured faster than AVX2 (and only with AVX2 too).
inline bool has_avx512() {
#if TROUS_HAVE_AVX2_PATH
  static const bool yes = has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

#if TROUS_HAVE_AVX2_PATH
TROUS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TROUS_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TROUS_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

TROUS_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
TROUS_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
TROUS_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even on the upper 16 bits; NaN stays a quiet NaN.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// Low byte of each 32-bit lane, in order, as 8 bytes.
TROUS_AVX2 inline uint64_t low_bytes(__m256i v) {
  const __m256i shuffle = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1,
                                           -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(v, shuffle);
  return (uint64_t)(uint32_t)_mm256_extract_epi32(b, 0) | (uint64_t)(uint32_t)_mm256_extract_epi32(b, 4) << 32;
}
#endif

// Converts n elements to fp32 (n % 8 == 0 on the AVX2 path; a scalar tail otherwise).
// The row helpers' AVX2 lambdas capture by value and return the index reached: captured by
// reference, every store through dst could alias the loop's own variables, which were then reloaded
// from memory per vector (a store-to-load round trip per 8 elements).
template <typename T>
void to_float_row(const T* src, float* dst, index_t n) {
  index_t i = 0;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) {
    i = [=]() TROUS_AVX2 {
      index_t k = 0;
      for (; k + 8 <= n; k += 8) store8(dst + k, load8(src + k));
      return k;
    }();
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_float_row(const float* src, T* dst, index_t n) {
  index_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) {
    i = [=]() TROUS_AVX2 {
      index_t k = 0;
      for (; k + 8 <= n; k += 8) store8(dst + k, load8(src + k));
      return k;
    }();
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// dst = float(src) * f for n elements.
template <typename T>
void to_float_row_scaled(const T* src, float f, float* dst, index_t n) {
  index_t i = 0;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) {
    i = [=]() TROUS_AVX2 {
      const __m256 fv = _mm256_set1_ps(f);
      index_t k = 0;
      for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_mul_ps(load8(src + k), fv));
      return k;
    }();
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * f;
}

// sum of a[i] * b[i] for n elements (8 partial sums on the AVX2 path, then reduced in a fixed order).
inline float dot_row(const float* a, const float* b, index_t n) {
  index_t i = 0;
  float s = 0.f;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2() && n >= 8) {
    [&]() TROUS_AVX2 {
      __m256 acc = _mm256_setzero_ps();
      for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      for (int l = 0; l < 8; ++l) s += lanes[l];
    }();
  }
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// dst = T(src * f) for n elements (one pass: a normalised output row straight into its tensor).
template <typename T>
void from_float_row_scaled(const float* src, float f, T* dst, index_t n) {
  index_t i = 0;
#if TROUS_HAVE_AVX2_PATH
  if (has_avx2()) {
    i = [=]() TROUS_AVX2 {
      const __m256 fv = _mm256_set1_ps(f);
      index_t k = 0;
      for (; k + 8 <= n; k += 8) store8(dst + k, _mm256_mul_ps(_mm256_loadu_ps(src + k), fv));
      return k;
    }();
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i] * f);
}

}  // namespace cpu
}  // namespace trous
