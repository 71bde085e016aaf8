// Register-blocked fp32 tile GEMMs and a vectorised exp for the CPU attention kernels.
//
// gemm(M, N, K, A, ars, acs, B, ldb, C, ldc, acc): C[M x N] (acc ? += : =) A[M x K] * B[K x N] with
// A(r, k) = A[r * ars + k * acs] (any strides: a row-major tile or a transposed one), B row-major with
// row stride ldb, C row-major with row stride ldc, N a multiple of 8. Every product the attention
// kernels need is this one form (Q K^T and dO V^T read a packed K^T / V^T tile as B; P V, dS K, P^T dO
// and dS^T Q read V, K, dO, Q tiles as B and a strided A).
//
// AVX2+FMA: 6 x 16 blocks (12 accumulators, 2 B loads and 1 broadcast per k), 6 x 8 for an 8-wide
// tail, fewer rows for the M tail. The scalar twin (TROUS_CPU_SIMD=0 or no AVX2) sums in the same
// k order per element, so both are deterministic; they differ from each other by FMA rounding only.
#pragma once
#include <cmath>
#include <cstring>
#include <limits>

#include "trous/common.h"
#include "trous/simd_cpu.h"

namespace trous {
namespace attention {
namespace cpu {

inline void gemm_scalar(index_t M, index_t N, index_t K, const float* A, index_t ars, index_t acs, const float* B,
                        index_t ldb, float* C, index_t ldc, bool acc) {
  for (index_t r = 0; r < M; ++r) {
    float* c = C + r * ldc;
    if (!acc) std::memset(c, 0, sizeof(float) * N);
    const float* a = A + r * ars;
    for (index_t k = 0; k < K; ++k) {
      const float av = a[k * acs];
      const float* b = B + k * ldb;
      for (index_t n = 0; n < N; ++n) c[n] += av * b[n];
    }
  }
}

#if TROUS_HAVE_AVX2_PATH
template <int MR, int NV>
TROUS_AVX2 inline void micro_avx2(index_t K, const float* A, index_t ars, index_t acs, const float* B, index_t ldb,
                                  float* C, index_t ldc, bool acc) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  const float* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
  for (index_t k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a[r]);
      a[r] += acs;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(av, b[v], c[r][v]);
    }
    B += ldb;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

template <int MR>
TROUS_AVX2 inline void row_block_avx2(index_t N, index_t K, const float* A, index_t ars, index_t acs, const float* B,
                                      index_t ldb, float* C, index_t ldc, bool acc) {
  index_t n = 0;
  for (; n + 16 <= N; n += 16) micro_avx2<MR, 2>(K, A, ars, acs, B + n, ldb, C + n, ldc, acc);
  if (n < N) micro_avx2<MR, 1>(K, A, ars, acs, B + n, ldb, C + n, ldc, acc);
}

TROUS_AVX2 inline void gemm_avx2(index_t M, index_t N, index_t K, const float* A, index_t ars, index_t acs,
                                 const float* B, index_t ldb, float* C, index_t ldc, bool acc) {
  // A tail of 1 or 2 rows has too few accumulators to hide the FMA latency: the last 6 + tail rows
  // go as 4 + (2 + tail) instead (a 32-row tile: 6 x 4 + 4 + 4, not 6 x 5 + 2).
  const index_t tail = M % 6;
  const index_t six = M >= 6 && tail > 0 && tail < 3 ? M / 6 - 1 : M / 6;
  index_t r = 0;
  for (; r < 6 * six; r += 6) row_block_avx2<6>(N, K, A + r * ars, ars, acs, B, ldb, C + r * ldc, ldc, acc);
  if (M - r > 6) {
    row_block_avx2<4>(N, K, A + r * ars, ars, acs, B, ldb, C + r * ldc, ldc, acc);
    r += 4;
  }
  const float* a = A + r * ars;
  float* c = C + r * ldc;
  switch (M - r) {
    case 5: row_block_avx2<5>(N, K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 4: row_block_avx2<4>(N, K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 3: row_block_avx2<3>(N, K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 2: row_block_avx2<2>(N, K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 1: row_block_avx2<1>(N, K, a, ars, acs, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

// exp(x) for 8 lanes (Cephes-style: 2^n * p(r), |error| ~ 2 ulp); 0 below -87.3 (and for -inf), +inf
// above 88.7, NaN stays NaN.
TROUS_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.3365f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_andnot_ps(under, y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_ps(y, x, nan);
}
#endif

// dst[d * ldd + t] = f * src[t * lds + d] for t < M, d < N (M, N multiples of 8): a row-major Q or dO
// tile into the D x Tq operand of the S^T products. 8 x 8 blocks through registers (the scalar
// loop's strided stores cost as much as a narrow window's whole softmax).
inline void transpose_scaled(index_t M, index_t N, const float* src, index_t lds, float* dst, index_t ldd, float f) {
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2()) {
    [&]() TROUS_AVX2 {
      const __m256 fv = _mm256_set1_ps(f);
      for (index_t t0 = 0; t0 < M; t0 += 8)
        for (index_t d0 = 0; d0 < N; d0 += 8) {
          __m256 r[8], u[8];
          for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (t0 + i) * lds + d0);
          for (int i = 0; i < 8; i += 2) {
            u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
          }
          for (int i = 0; i < 8; i += 4) {
            r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
            r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xee);
            r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
            r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xee);
          }
          // r[c] (c < 4): column c of rows 0-3 | column c + 4 of rows 0-3; r[c + 4] the same of rows 4-7.
          for (int i = 0; i < 4; ++i) {
            const __m256 lo = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
            const __m256 hi = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
            _mm256_storeu_ps(dst + (d0 + i) * ldd + t0, _mm256_mul_ps(lo, fv));
            _mm256_storeu_ps(dst + (d0 + i + 4) * ldd + t0, _mm256_mul_ps(hi, fv));
          }
        }
    }();
    return;
  }
#endif
  for (index_t t = 0; t < M; ++t)
    for (index_t d = 0; d < N; ++d) dst[d * ldd + t] = f * src[t * lds + d];
}

inline void gemm(index_t M, index_t N, index_t K, const float* A, index_t ars, index_t acs, const float* B, index_t ldb,
                 float* C, index_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2()) {
    if (K <= 0) {
      if (!acc)
        for (index_t r = 0; r < M; ++r) std::memset(C + r * ldc, 0, sizeof(float) * N);
      return;
    }
    gemm_avx2(M, N, K, A, ars, acs, B, ldb, C, ldc, acc);
    return;
  }
#endif
  gemm_scalar(M, N, K, A, ars, acs, B, ldb, C, ldc, acc);
}

}  // namespace cpu
}  // namespace attention
}  // namespace trous
