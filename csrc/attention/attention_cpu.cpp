// CPU kernels of the sparse attention core.
//
// Forward: one work item per (batch, query head, query tile of pattern.h); items are handed out
// dynamically to the threads (an atomic counter: causal tiles differ in cost) and each writes only its
// own active rows, so the result does not depend on the thread count. Per item: the Q rows are
// gathered (dilation classes and global rows are not consecutive) and pre-scaled into an fp32 tile;
// for every key span of the tile and every block of kCpuKeyTile keys the pattern classifies (kSkip:
// never visited, kFull: no mask, kPartial: pair_counted per element), K^T and V are packed once per
// block in fp32 and S = Q K^T, the online softmax and O += P V run on the register-blocked
// microkernels of tile_gemm_cpu.h.
//
// Backward (recomputation, no S x S memory): one work item per (batch, kv head): the query heads of
// its GQA group and their query tiles in a fixed order; per block it recomputes P = exp(S - lse),
// dP = dO V^T, dS = P (dP - rowsum(dO o O)), and accumulates dQ (per tile, in registers' tile),
// dK += dS^T Q and dV += P^T dO into the item's own fp32 rows. Every gradient element is summed in one
// fixed order by one item: bitwise the same whatever the thread count (deterministic always).
#include "attention/attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/tile_gemm_cpu.h"
#include "trous/simd_cpu.h"

namespace trous {
namespace attention {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

index_t round8(index_t n) { return (n + 7) / 8 * 8; }

// Runs body(item) for every item in [0, n) on at::parallel_for's threads, items handed out in order
// by an atomic counter (load balance when items differ in cost; results never depend on the thread).
template <typename F>
void for_items(index_t n, F&& body) {
  if (n <= 0) return;
  std::atomic<index_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (index_t it = next.fetch_add(1); it < n; it = next.fetch_add(1)) body(it);
  });
}

// ---- row operations (AVX2 and scalar twins) ----

// The row maximum; NaN when the row holds a NaN (which then reaches that row's output only).

float row_max(const float* s, index_t n) {
  float m = kNegInf;
  index_t i = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2() && n >= 8) {
    m = [&]() TROUS_AVX2 {
      __m256 v = _mm256_set1_ps(kNegInf), nan = _mm256_setzero_ps();
      for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(s + i);
        v = _mm256_max_ps(v, x);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      }
      if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      return _mm_cvtss_f32(h);
    }();
  }
#endif
  for (; i < n; ++i) {
    if (std::isnan(s[i])) return s[i];
    m = std::max(m, s[i]);
  }
  return m;
}

// s = exp(s - m) in place; returns the sum.
float exp_sum(float* s, index_t n, float m) {
  float sum = 0.f;
  index_t i = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2() && n >= 8) {
    sum = [&]() TROUS_AVX2 {
      const __m256 mv = _mm256_set1_ps(m);
      __m256 acc = _mm256_setzero_ps();
      for (; i + 8 <= n; i += 8) {
        const __m256 e = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      return _mm_cvtss_f32(h);
    }();
  }
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

void scale_row(float* o, index_t n, float f) {
  for (index_t i = 0; i < n; ++i) o[i] *= f;
}

// Softcap in place: t = tanh(s) (kept for the backward when t != nullptr), s = cap * t.
void softcap_row(float* s, float* t, index_t n, float cap) {
  for (index_t i = 0; i < n; ++i) {
    const float th = std::tanh(s[i]);
    if (t) t[i] = th;
    s[i] = cap * th;
  }
}

// Backward of one row of a block: p = exp(s - lse) (0 where masked), ds = p * (dp - dv), times
// cap * (1 - t^2) under softcap (t: the tanh of the row). s becomes p, dp becomes ds.
void bwd_row(float* s, float* dp, const float* t, index_t n, float lse, float dv, float cap) {
  index_t i = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2() && t == nullptr) {
    [&]() TROUS_AVX2 {
      const __m256 l = _mm256_set1_ps(lse), d = _mm256_set1_ps(dv);
      for (; i + 8 <= n; i += 8) {
        const __m256 p = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), l));
        _mm256_storeu_ps(s + i, p);
        _mm256_storeu_ps(dp + i, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + i), d)));
      }
    }();
  }
#endif
  for (; i < n; ++i) {
    const float p = std::exp(s[i] - lse);
    s[i] = p;
    float ds = p * (dp[i] - dv);
    if (t) ds *= cap * (1.f - t[i] * t[i]);
    dp[i] = ds;
  }
}

// ---- forward ----

template <typename T>
void fwd_impl(const T* q, const T* k, const T* v, T* out, float* lse, const CpuAttnArgs& a) {
  const Pattern& p = a.pat;
  const index_t D = a.D, Tq = kCpuQueryTile, Tk = kCpuKeyTile;
  const index_t ntiles = num_query_tiles(p, Tq);
  const index_t G = a.Hq / a.Hkv;
  const bool cap = a.softcap > 0.f;
  const float qscale = cap ? a.scale / a.softcap : a.scale;
  const index_t items = a.B * a.Hq * ntiles;
  for_items(items, [&](index_t it) {
    thread_local std::vector<float> buf;
    thread_local std::vector<index_t> ibuf;
    const size_t need = static_cast<size_t>(Tq * D * 2 + D * Tk + Tk * D + Tq * Tk + 2 * Tq + D);
    if (buf.size() < need) buf.resize(need);
    if (ibuf.size() < static_cast<size_t>(Tq + Tk)) ibuf.resize(Tq + Tk);
    float* Qs = buf.data();
    float* O = Qs + Tq * D;
    float* Kt = O + Tq * D;
    float* Vs = Kt + D * Tk;
    float* S = Vs + Tk * D;
    float* m = S + Tq * Tk;
    float* l = m + Tq;
    float* tmp = l + Tq;
    index_t* rows = ibuf.data();
    index_t* keys = rows + Tq;

    const index_t tile = it % ntiles;
    const index_t bh = it / ntiles;
    const index_t h = bh % a.Hq, b = bh / a.Hq, hk = h / G;
    const QueryTile qt = query_tile(p, Tq, tile);
    const index_t n = std::min<index_t>(qt.count, Tq);
    if (n <= 0) return;
    for (index_t t = 0; t < n; ++t) {
      const index_t i = query_row(p, qt, t);
      rows[t] = i;
      trous::cpu::to_float_row(q + b * a.q.b + i * a.q.s + h * a.q.h, Qs + t * D, D);
      scale_row(Qs + t * D, D, qscale);
      m[t] = kNegInf;
      l[t] = 0.f;
    }
    std::fill(O, O + n * D, 0.f);
    KeySpan spans[2];
    const int nspans = key_spans(p, qt, spans);
    for (int si = 0; si < nspans; ++si) {
      const KeySpan& sp = spans[si];
      for (index_t u0 = sp.first; u0 < sp.end; u0 += Tk) {
        const index_t u1 = std::min(u0 + Tk, sp.end);
        const TileKind kind = classify(p, qt, sp, u0, u1);
        if (kind == kSkip) continue;
        const index_t nk = u1 - u0, nkp = round8(nk);
        for (index_t c = 0; c < nk; ++c) {
          const index_t j = key_index(p, sp, u0 + c);
          keys[c] = j;
          trous::cpu::to_float_row(k + b * a.k.b + j * a.k.s + hk * a.k.h, tmp, D);
          for (index_t d = 0; d < D; ++d) Kt[d * Tk + c] = tmp[d];
          trous::cpu::to_float_row(v + b * a.v.b + j * a.v.s + hk * a.v.h, Vs + c * D, D);
        }
        for (index_t c = nk; c < nkp; ++c) {
          for (index_t d = 0; d < D; ++d) Kt[d * Tk + c] = 0.f;
          std::fill(Vs + c * D, Vs + (c + 1) * D, 0.f);
        }
        cpu::gemm(n, nkp, D, Qs, D, 1, Kt, Tk, S, Tk, false);
        for (index_t t = 0; t < n; ++t) {
          float* s = S + t * Tk;
          if (cap) softcap_row(s, nullptr, nk, a.softcap);
          if (kind == kPartial) {
            const index_t i = rows[t];
            for (index_t c = 0; c < nk; ++c)
              if (!pair_counted(p, sp.kind, i, keys[c])) s[c] = kNegInf;
          }
          for (index_t c = nk; c < nkp; ++c) s[c] = kNegInf;
          const float mx = row_max(s, nkp);
          const float mnew = std::isnan(mx) ? mx : std::max(m[t], mx);
          if (mnew == kNegInf) {
            std::fill(s, s + nkp, 0.f);
            continue;
          }
          const float alpha = m[t] == kNegInf ? 0.f : std::exp(m[t] - mnew);
          const float sum = exp_sum(s, nkp, mnew);
          if (alpha != 1.f) scale_row(O + t * D, D, alpha);
          l[t] = l[t] * alpha + sum;
          m[t] = mnew;
        }
        cpu::gemm(n, D, nkp, S, Tk, 1, Vs, D, O, D, true);
      }
    }
    for (index_t t = 0; t < n; ++t) {
      const index_t i = rows[t];
      if (!row_active(p, qt, i)) continue;
      const bool any = l[t] != 0.f;  // (NaN stays NaN)
      const float inv = any ? 1.f / l[t] : 0.f;
      float* o = O + t * D;
      for (index_t d = 0; d < D; ++d) o[d] = any ? o[d] * inv : 0.f;
      trous::cpu::from_float_row(o, out + ((b * a.Sq + i) * a.Hq + h) * D, D);
      lse[(b * a.Hq + h) * a.Sq + i] = any ? m[t] + std::log(l[t]) : kNegInf;
    }
  });
}

// ---- backward ----

template <typename T>
void bwd_impl(const T* go, const T* q, const T* k, const T* v, const T* out, const float* lse, T* gq, T* gk, T* gv,
              const CpuAttnArgs& a) {
  const Pattern& p = a.pat;
  const index_t D = a.D, Tq = kCpuQueryTile, Tk = kCpuKeyTile;
  const index_t ntiles = num_query_tiles(p, Tq);
  const index_t G = a.Hq / a.Hkv;
  const bool cap = a.softcap > 0.f;
  const float qscale = cap ? a.scale / a.softcap : a.scale;
  constexpr bool kF32 = std::is_same_v<T, float>;
  for_items(a.B * a.Hkv, [&](index_t it) {
    const index_t hk = it % a.Hkv, b = it / a.Hkv;
    // dK / dV rows of (b, hk): the fp32 outputs themselves, or fp32 scratch for 16-bit outputs.
    std::vector<float> scratch(kF32 ? 0 : static_cast<size_t>(2 * a.Sk * D));
    float* dK;
    float* dV;
    index_t ld;
    if constexpr (kF32) {
      dK = gk + b * a.Sk * a.Hkv * D + hk * D;
      dV = gv + b * a.Sk * a.Hkv * D + hk * D;
      ld = a.Hkv * D;
    } else {
      dK = scratch.data();
      dV = dK + a.Sk * D;
      ld = D;
    }
    for (index_t j = 0; j < a.Sk; ++j) {
      std::fill(dK + j * ld, dK + j * ld + D, 0.f);
      std::fill(dV + j * ld, dV + j * ld + D, 0.f);
    }
    std::vector<float> buf(static_cast<size_t>(Tq * D * 3 + D * Tk * 2 + Tk * D * 3 + Tq * Tk * 3 + 2 * Tq + 2 * D));
    std::vector<index_t> rows(Tq), keys(Tk);
    std::vector<char> active(Tq);
    float* Qs = buf.data();
    float* dO = Qs + Tq * D;
    float* dQ = dO + Tq * D;
    float* Kt = dQ + Tq * D;
    float* Vt = Kt + D * Tk;
    float* Ks = Vt + D * Tk;
    float* dVb = Ks + Tk * D;
    float* dKb = dVb + Tk * D;
    float* S = dKb + Tk * D;
    float* dP = S + Tq * Tk;
    float* Th = dP + Tq * Tk;
    float* L = Th + Tq * Tk;
    float* Dv = L + Tq;
    float* tmp = Dv + Tq;
    float* tmp2 = tmp + D;
    for (index_t g = 0; g < G; ++g) {
      const index_t h = hk * G + g;
      for (index_t tile = 0; tile < ntiles; ++tile) {
        const QueryTile qt = query_tile(p, Tq, tile);
        const index_t n = std::min<index_t>(qt.count, Tq);
        if (n <= 0) continue;
        bool any_row = false;
        for (index_t t = 0; t < n; ++t) {
          const index_t i = query_row(p, qt, t);
          rows[t] = i;
          trous::cpu::to_float_row(q + b * a.q.b + i * a.q.s + h * a.q.h, Qs + t * D, D);
          scale_row(Qs + t * D, D, qscale);
          trous::cpu::to_float_row(go + b * a.go.b + i * a.go.s + h * a.go.h, dO + t * D, D);
          trous::cpu::to_float_row(out + b * a.o.b + i * a.o.s + h * a.o.h, tmp, D);
          float dv = 0.f;
          for (index_t d = 0; d < D; ++d) dv += dO[t * D + d] * tmp[d];
          Dv[t] = dv;
          L[t] = lse[(b * a.Hq + h) * a.Sq + i];
          active[t] = row_active(p, qt, i) && L[t] != kNegInf;
          any_row = any_row || active[t];
        }
        std::fill(dQ, dQ + n * D, 0.f);
        KeySpan spans[2];
        // (a tile of fully masked rows only writes its zero dQ rows)
        const int nspans = any_row ? key_spans(p, qt, spans) : 0;
        for (int si = 0; si < nspans; ++si) {
          const KeySpan& sp = spans[si];
          for (index_t u0 = sp.first; u0 < sp.end; u0 += Tk) {
            const index_t u1 = std::min(u0 + Tk, sp.end);
            const TileKind kind = classify(p, qt, sp, u0, u1);
            if (kind == kSkip) continue;
            const index_t nk = u1 - u0, nkp = round8(nk);
            for (index_t c = 0; c < nk; ++c) {
              const index_t j = key_index(p, sp, u0 + c);
              keys[c] = j;
              trous::cpu::to_float_row(k + b * a.k.b + j * a.k.s + hk * a.k.h, Ks + c * D, D);
              trous::cpu::to_float_row(v + b * a.v.b + j * a.v.s + hk * a.v.h, tmp2, D);
              for (index_t d = 0; d < D; ++d) {
                Kt[d * Tk + c] = Ks[c * D + d];
                Vt[d * Tk + c] = tmp2[d];
              }
            }
            for (index_t c = nk; c < nkp; ++c) {
              for (index_t d = 0; d < D; ++d) Kt[d * Tk + c] = Vt[d * Tk + c] = 0.f;
              std::fill(Ks + c * D, Ks + (c + 1) * D, 0.f);
            }
            cpu::gemm(n, nkp, D, Qs, D, 1, Kt, Tk, S, Tk, false);
            cpu::gemm(n, nkp, D, dO, D, 1, Vt, Tk, dP, Tk, false);
            for (index_t t = 0; t < n; ++t) {
              float* s = S + t * Tk;
              float* dp = dP + t * Tk;
              if (!active[t]) {
                std::fill(s, s + nkp, 0.f);
                std::fill(dp, dp + nkp, 0.f);
                continue;
              }
              float* th = cap ? Th + t * Tk : nullptr;
              if (cap) softcap_row(s, th, nk, a.softcap);
              if (kind == kPartial) {
                const index_t i = rows[t];
                for (index_t c = 0; c < nk; ++c)
                  if (!pair_counted(p, sp.kind, i, keys[c])) s[c] = kNegInf;
              }
              bwd_row(s, dp, th, nk, L[t], Dv[t], a.softcap);
              for (index_t c = nk; c < nkp; ++c) s[c] = dp[c] = 0.f;
            }
            // dV_b = P^T dO, dK_b = dS^T Q (scaled Q), dQ += dS K.
            cpu::gemm(nk, D, n, S, 1, Tk, dO, D, dVb, D, false);
            cpu::gemm(nk, D, n, dP, 1, Tk, Qs, D, dKb, D, false);
            cpu::gemm(n, D, nkp, dP, Tk, 1, Ks, D, dQ, D, true);
            for (index_t c = 0; c < nk; ++c) {
              float* kr = dK + keys[c] * ld;
              float* vr = dV + keys[c] * ld;
              const float* kb = dKb + c * D;
              const float* vb = dVb + c * D;
              for (index_t d = 0; d < D; ++d) {
                kr[d] += kb[d];
                vr[d] += vb[d];
              }
            }
          }
        }
        for (index_t t = 0; t < n; ++t) {
          const index_t i = rows[t];
          if (!row_active(p, qt, i)) continue;
          scale_row(dQ + t * D, D, qscale);
          trous::cpu::from_float_row(dQ + t * D, gq + ((b * a.Sq + i) * a.Hq + h) * D, D);
        }
      }
    }
    if constexpr (!kF32) {
      for (index_t j = 0; j < a.Sk; ++j) {
        trous::cpu::from_float_row(dK + j * D, gk + ((b * a.Sk + j) * a.Hkv + hk) * D, D);
        trous::cpu::from_float_row(dV + j * D, gv + ((b * a.Sk + j) * a.Hkv + hk) * D, D);
      }
    }
  });
}

}  // namespace

void cpu_sparse_attention_fwd(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                              const CpuAttnArgs& a) {
  dispatch_dtype<trous::cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    fwd_impl<T>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), lse,
                a);
  });
}

void cpu_sparse_attention_bwd(DType dtype, const void* grad_out, const void* q, const void* k, const void* v,
                              const void* out, const float* lse, void* grad_q, void* grad_k, void* grad_v,
                              const CpuAttnArgs& a) {
  dispatch_dtype<trous::cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    bwd_impl<T>(static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k),
                static_cast<const T*>(v), static_cast<const T*>(out), lse, static_cast<T*>(grad_q),
                static_cast<T*>(grad_k), static_cast<T*>(grad_v), a);
  });
}

}  // namespace attention
}  // namespace trous
