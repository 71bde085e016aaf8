// CPU kernels of the sparse attention core.
//
// Layout of the tile products: keys are the M side. S^T (keys x queries) = K Q^T reads the K rows in
// place (a broadcast operand with the tensor's row stride: no packing of K or V for fp32, also for a
// dilation class, whose keys are d rows apart) against Q^T packed once per query tile; the online
// softmax then runs along keys, vectorised over 8 queries at a time; O += P V reads P^T with strides
// and the V rows in place. Keys of a global-key span (not evenly spaced) are gathered per block.
// 16-bit K / V are converted to fp32 once per call.
//
// Forward: one work item per (batch, query head, query tile of pattern.h), handed out dynamically (an
// atomic counter: causal tiles differ in cost); each writes only its active rows, so the result does
// not depend on the thread count. Per block of kCpuKeyTile keys of each key span the pattern says
// kSkip (never visited), kFull (no mask) or kPartial (pair_counted's element mask, mask_block). A block
// layout is AND-ed per tile (classify_blocks; its partial blocks masked by mask_block_layout), with
// tiles that divide its blocks and key tiles aligned to them (next_key_tile).
//
// Backward (recomputation, no S x S memory): work items are (batch, kv head) pairs, split into a fixed
// number of chunks of their (query head of the GQA group, query tile) sequence when there are fewer
// than kBwdItems pairs. Per block an item recomputes P^T = exp(S^T - lse), dP^T = V dO^T,
// dS^T = P^T (dP^T - rowsum(dO o O)), then dV += P^T dO and dK += dS^T Q into its own fp32 key rows
// (the outputs themselves for fp32 and one chunk) and dQ += dS K into the tile's fp32 accumulator;
// chunks' rows are summed in chunk order at the end. The split depends on the shapes only and every
// gradient element is summed in one fixed order: bitwise the same whatever the thread count
// (deterministic=True costs nothing).
#include "attention/attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "attention/tile_gemm_cpu.h"
#include "trous/simd_cpu.h"

namespace trous {
namespace attention {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Backward work items wanted at least (see bwd_impl).
constexpr index_t kBwdItems = 8;

index_t round8(index_t n) { return (n + 7) / 8 * 8; }

// Runs body(item, after) for every item in [0, n) on at::parallel_for's threads, items handed out in
// order by an atomic counter (load balance when items differ in cost; results never depend on the
// thread). A thread claims its next item before running this one: `after` (-1 if none) is what it
// runs next, so that a body can fetch that item's inputs while it computes.
template <typename F>
void for_items(index_t n, F&& body) {
  if (n <= 0) return;
  std::atomic<index_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (index_t it = next.fetch_add(1); it < n;) {
      const index_t after = next.fetch_add(1);
      body(it, after < n ? after : -1);
      it = after;
    }
  });
}

// K and V of one (batch, kv head) as fp32 rows: the tensors themselves for fp32, a converted copy
// (contiguous (B, Hkv, Sk, D)) for 16-bit types.
struct KvRows {
  const float* k;
  const float* v;
  index_t k_row, v_row;  // row strides (elements)
};

template <typename T>
struct KvSource {
  std::vector<float> conv;
  const T* k;
  const T* v;
  const CpuAttnArgs* a;
  void prepare(bool parallel) {
    if constexpr (!std::is_same_v<T, float>) {
      const index_t D = a->D, Sk = a->Sk, H = a->Hkv;
      conv.resize(static_cast<size_t>(2 * a->B * H * Sk * D));
      if (!parallel) return;
      at::parallel_for(0, a->B * H * Sk, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) convert(r);
      });
    }
  }
  void convert(index_t r) {  // row r of (B, Hkv, Sk)
    const index_t D = a->D, Sk = a->Sk, H = a->Hkv;
    const index_t j = r % Sk, bh = r / Sk, hk = bh % H, b = bh / H;
    float* base = conv.data();
    trous::cpu::to_float_row(k + b * a->k.b + j * a->k.s + hk * a->k.h, base + r * D, D);
    trous::cpu::to_float_row(v + b * a->v.b + j * a->v.s + hk * a->v.h, base + (a->B * H * Sk + r) * D, D);
  }
  KvRows rows(index_t b, index_t hk) const {
    if constexpr (std::is_same_v<T, float>) {
      return KvRows{k + b * a->k.b + hk * a->k.h, v + b * a->v.b + hk * a->v.h, a->k.s, a->v.s};
    } else {
      const index_t D = a->D, Sk = a->Sk, H = a->Hkv;
      const float* base = conv.data() + (b * H + hk) * Sk * D;
      return KvRows{base, base + a->B * H * Sk * D, D, D};
    }
  }
};

// Rows prefetched ahead of the one being loaded (query rows are strided by Hq * D: a few misses in
// flight at once matter for narrow bands, where loading the rows is a tenth of a tile's time).
constexpr index_t kAhead = 8;

using ::trous::cpu::prefetch_row;

// The K or V rows of keys [u0, u1) of a span towards L2 (locality 2: the tile's working set already
// fills L1).
void prefetch_keys(const Pattern& p, const KeySpan& sp, index_t u0, index_t u1, const float* base, index_t row,
                   index_t D) {
  for (index_t u = u0; u < u1; ++u) prefetch_row(base + key_index(p, sp, u) * row, D, trous::cpu::Prefetch::kL2);
}

// A key tile a query tile visits: keys [u0, u1) of its span and the two parts of its kind.
struct Visit {
  index_t u0, u1;
  TileKind kind, bkind;
};

// ---- vector helpers over the query axis (AVX2 and scalar twins) ----

// mx[t] = max(mx[t], St[c * ld + t]) over the nk rows c of a block, t < n (n % 8 == 0): mx stays in
// registers across the rows. A NaN may or may not survive (the exp passes it on).
void block_col_max(float* mx, const float* St, index_t ld, index_t nk, index_t n) {
  index_t t = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2()) {
    // (Arguments, not captures: the lambda is not inlined, and its stores may alias its closure,
    // which would make it reload every pointer from there per vector.)
    t = [](float* mx, const float* St, index_t ld, index_t nk, index_t n) TROUS_AVX2 {
      index_t t = 0;
      for (; t + 32 <= n; t += 32) {
        __m256 m0 = _mm256_loadu_ps(mx + t), m1 = _mm256_loadu_ps(mx + t + 8);
        __m256 m2 = _mm256_loadu_ps(mx + t + 16), m3 = _mm256_loadu_ps(mx + t + 24);
        for (index_t c = 0; c < nk; ++c) {
          const float* s = St + c * ld + t;
          m0 = _mm256_max_ps(m0, _mm256_loadu_ps(s));
          m1 = _mm256_max_ps(m1, _mm256_loadu_ps(s + 8));
          m2 = _mm256_max_ps(m2, _mm256_loadu_ps(s + 16));
          m3 = _mm256_max_ps(m3, _mm256_loadu_ps(s + 24));
        }
        _mm256_storeu_ps(mx + t, m0), _mm256_storeu_ps(mx + t + 8, m1);
        _mm256_storeu_ps(mx + t + 16, m2), _mm256_storeu_ps(mx + t + 24, m3);
      }
      for (; t + 8 <= n; t += 8) {
        __m256 m0 = _mm256_loadu_ps(mx + t);
        for (index_t c = 0; c < nk; ++c) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(St + c * ld + t));
        _mm256_storeu_ps(mx + t, m0);
      }
      return t;
    }(mx, St, ld, nk, n);
  }
#endif
  for (; t < n; ++t)
    for (index_t c = 0; c < nk; ++c) mx[t] = St[c * ld + t] > mx[t] ? St[c * ld + t] : mx[t];
}

// St[c * ld + t] = exp(St[c * ld + t] - m[t]) and sum[t] += it, row after row (the sums keep the
// order c = 0, 1, ...: bitwise the per-row loop), for the nk rows of a block and t < n (n % 8 == 0).
void block_exp(float* St, index_t ld, index_t nk, const float* m, float* sum, index_t n) {
  index_t t = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2()) {
    t = [](float* St, index_t ld, index_t nk, const float* m, float* sum, index_t n) TROUS_AVX2 {  // (as above)
      index_t t = 0;
      for (; t + 16 <= n; t += 16) {
        const __m256 m0 = _mm256_loadu_ps(m + t), m1 = _mm256_loadu_ps(m + t + 8);
        __m256 l0 = _mm256_loadu_ps(sum + t), l1 = _mm256_loadu_ps(sum + t + 8);
        for (index_t c = 0; c < nk; ++c) {
          float* s = St + c * ld + t;
          const __m256 e0 = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s), m0));
          const __m256 e1 = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + 8), m1));
          _mm256_storeu_ps(s, e0), _mm256_storeu_ps(s + 8, e1);
          l0 = _mm256_add_ps(l0, e0), l1 = _mm256_add_ps(l1, e1);
        }
        _mm256_storeu_ps(sum + t, l0), _mm256_storeu_ps(sum + t + 8, l1);
      }
      for (; t + 8 <= n; t += 8) {
        const __m256 m0 = _mm256_loadu_ps(m + t);
        __m256 l0 = _mm256_loadu_ps(sum + t);
        for (index_t c = 0; c < nk; ++c) {
          float* s = St + c * ld + t;
          const __m256 e0 = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s), m0));
          _mm256_storeu_ps(s, e0);
          l0 = _mm256_add_ps(l0, e0);
        }
        _mm256_storeu_ps(sum + t, l0);
      }
      return t;
    }(St, ld, nk, m, sum, n);
  }
#endif
  for (; t < n; ++t)
    for (index_t c = 0; c < nk; ++c) {
      float& s = St[c * ld + t];
      s = std::exp(s - m[t]);
      sum[t] += s;
    }
}

// The online-softmax step of a block for rows t < np (np % 8 == 0): m = max(m, mx), ms = m (0 while
// -inf, so exp(s - ms) stays 0 for masked entries), alpha = exp(m_old - m) (0 while m_old is -inf),
// l *= alpha. Returns whether a row t < n needs its output rescaled (alpha != 1, NaN included).
bool online_update(float* m, const float* mx, float* ms, float* alpha, float* l, index_t n, index_t np) {
  bool rescale = false;
  index_t t = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2()) {
    [&]() TROUS_AVX2 {
      const __m256 ninf = _mm256_set1_ps(kNegInf), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (; t + 8 <= np; t += 8) {
        const __m256 mo = _mm256_loadu_ps(m + t);
        const __m256 mn = _mm256_max_ps(_mm256_loadu_ps(mx + t), mo);  // (std::max(m, mx) on NaN)
        _mm256_storeu_ps(ms + t, _mm256_blendv_ps(mn, zero, _mm256_cmp_ps(mn, ninf, _CMP_EQ_OQ)));
        const __m256 al = _mm256_blendv_ps(cpu::exp8(_mm256_sub_ps(mo, mn)), zero, _mm256_cmp_ps(mo, ninf, _CMP_EQ_OQ));
        _mm256_storeu_ps(alpha + t, al);
        _mm256_storeu_ps(l + t, _mm256_mul_ps(_mm256_loadu_ps(l + t), al));
        _mm256_storeu_ps(m + t, mn);
        const __m256 live =
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - t)), lane));  // t + lane < n
        rescale = rescale || _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(al, one, _CMP_NEQ_UQ), live)) != 0;
      }
    }();
  }
#endif
  for (; t < np; ++t) {
    const float mn = std::max(m[t], mx[t]);
    ms[t] = mn == kNegInf ? 0.f : mn;
    alpha[t] = m[t] == kNegInf ? 0.f : std::exp(m[t] - mn);
    rescale = rescale || (alpha[t] != 1.f && t < n);
    l[t] *= alpha[t];
    m[t] = mn;
  }
  return rescale;
}

// Backward of one key row of a block: p = exp(s - lse) (lse: +inf where the row is inactive or fully
// masked, giving p = 0), ds = p (dp - dv) (times cap (1 - th^2) under softcap). s becomes p, dp ds.
void bwd_col(float* s, float* dp, const float* th, const float* lse, const float* dv, index_t n, float cap) {
  index_t t = 0;
#if TROUS_HAVE_AVX2_PATH
  if (trous::cpu::has_avx2() && th == nullptr) {
    t = [](float* s, float* dp, const float* lse, const float* dv, index_t n) TROUS_AVX2 {  // (see block_col_max)
      index_t t = 0;
      for (; t + 8 <= n; t += 8) {
        const __m256 p = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_loadu_ps(lse + t)));
        _mm256_storeu_ps(s + t, p);
        _mm256_storeu_ps(dp + t, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + t), _mm256_loadu_ps(dv + t))));
      }
      return t;
    }(s, dp, lse, dv, n);
  }
#endif
  for (; t < n; ++t) {
    const float p = std::exp(s[t] - lse[t]);
    s[t] = p;
    float ds = p * (dp[t] - dv[t]);
    if (th) ds *= cap * (1.f - th[t] * th[t]);
    dp[t] = ds;
  }
}

// Softcap in place: th = tanh(s) (kept for the backward when th != nullptr), s = cap * th.
void softcap_row(float* s, float* th, index_t n, float cap) {
  for (index_t i = 0; i < n; ++i) {
    const float t = std::tanh(s[i]);
    if (th) th[i] = t;
    s[i] = cap * t;
  }
}

// The keys of one block [u0, u1) of a span: their indices, and whether they are evenly spaced (then
// the K / V rows are read in place with stride step * row stride).
struct BlockKeys {
  index_t nk, j0, step;
  bool even;
};

BlockKeys block_keys(const Pattern& p, const KeySpan& sp, index_t u0, index_t u1, index_t* keys) {
  BlockKeys bk{u1 - u0, 0, 1, true};
  for (index_t c = 0; c < bk.nk; ++c) keys[c] = key_index(p, sp, u0 + c);
  bk.j0 = keys[0];
  bk.step = bk.nk > 1 ? keys[1] - keys[0] : 1;
  for (index_t c = 2; c < bk.nk && bk.even; ++c) bk.even = keys[c] - keys[c - 1] == bk.step;
  bk.even = bk.even && bk.step > 0;
  return bk;
}

// -inf in S^T (keys x queries, row stride ld) where a pair of a kPartial block is not counted. In a
// local-key or all-key span the counted keys of one row form an interval of the block whose ends never
// decrease from one row to the next (the window, chunk and causal bounds all grow with i'; rows
// counted elsewhere are empty), so two pointers find every row's interval with O(n + nk) evaluations
// of pair_counted instead of n * nk. A global-key span is tested pair by pair.
void mask_block(const Pattern& p, const KeySpan& sp, const index_t* rows, const index_t* keys, index_t n, index_t nk,
                float* St, index_t ld) {
  if (sp.kind == kGlobalKeys) {
    for (index_t c = 0; c < nk; ++c)
      for (index_t t = 0; t < n; ++t)
        if (!pair_counted(p, sp.kind, rows[t], keys[c])) St[c * ld + t] = kNegInf;
    return;
  }
  index_t a = 0, b = 0;  // the interval [a, b) of the last row that had one
  for (index_t t = 0; t < n; ++t) {
    const index_t i = rows[t];
    index_t lo = a;
    while (lo < nk && !pair_counted(p, sp.kind, i, keys[lo])) ++lo;
    index_t hi = nk;
    if (lo < nk) {
      hi = std::max(b, lo + 1);
      while (hi < nk && pair_counted(p, sp.kind, i, keys[hi])) ++hi;
      a = lo, b = hi;
    } else {
      lo = 0;  // an empty row: every key masked, the pointers stay
      hi = 0;
    }
    for (index_t c = 0; c < lo; ++c) St[c * ld + t] = kNegInf;
    for (index_t c = hi; c < nk; ++c) St[c * ld + t] = kNegInf;
  }
}

// -inf in S^T where the block layout masks a pair of a tile its table calls partial.
void mask_block_layout(const Pattern& p, const int32_t* tbl, const index_t* rows, const index_t* keys, index_t n,
                       index_t nk, float* St, index_t ld) {
  for (index_t c = 0; c < nk; ++c)
    for (index_t t = 0; t < n; ++t)
      if (!block_ok(p, tbl, rows[t], keys[c])) St[c * ld + t] = kNegInf;
}

// A tile size that divides the block layout's block (multiples of 64), so that an aligned tile never
// straddles two blocks; T itself without a block mask.
index_t block_aligned(index_t T, index_t block) { return block > 0 ? std::gcd(T, block) : T; }

// Query rows per tile: `narrow` for a narrow band (a window or chunk of at most kNarrowBand keys per
// row), where a taller tile would visit (rows + W) keys per row for W allowed; `full` otherwise (tall
// tiles read each K / V block once for more queries: dense S = 8192 went 39 -> 50 GF/s with 64 -> 256).
constexpr index_t kNarrowBand = 320;
index_t pick_query_tile(const Pattern& p, index_t full, index_t narrow) {
  index_t w = -1;  // keys per row of the local band in compact indices; -1: unbounded
  if (p.left >= 0 && (p.right >= 0 || p.causal)) w = p.left + (p.causal ? 0 : p.right) + 1;
  if (p.chunk > 0) {
    const index_t cw = p.chunk / p.dilation + 1;
    w = w < 0 ? cw : std::min(w, cw);
  }
  return w >= 0 && w <= kNarrowBand ? narrow : full;
}

// ---- forward ----

template <typename T>
void fwd_impl(const T* q, const T* k, const T* v, T* out, float* lse, const CpuAttnArgs& a) {
  const Pattern& p = a.pat;
  const index_t D = a.D, Tk = block_aligned(kCpuKeyTile, p.blocks.bk);
  const index_t Tq = block_aligned(pick_query_tile(a.pat, kCpuQueryTile, kCpuNarrowQueryTile), p.blocks.bq);
  const index_t ntiles = num_query_tiles(p, Tq);
  const index_t G = a.Hq / a.Hkv;
  const bool cap = a.softcap > 0.f;
  const float qscale = cap ? a.scale / a.softcap : a.scale;
  KvSource<T> kv{{}, k, v, &a};
  kv.prepare(true);
  for_items(a.B * a.Hq * ntiles, [&](index_t it, index_t after) {
    thread_local std::vector<float> buf;
    thread_local std::vector<index_t> ibuf;
    const size_t need = static_cast<size_t>(D * Tq + Tq * D + Tk * Tq + 2 * Tk * D + 5 * Tq + D);
    if (buf.size() < need) buf.resize(need);
    if (ibuf.size() < static_cast<size_t>(Tq + Tk)) ibuf.resize(Tq + Tk);
    float* Qt = buf.data();    // D x Tq: scaled Q^T
    float* O = Qt + D * Tq;    // Tq x D
    float* St = O + Tq * D;    // Tk x Tq: S^T, then P^T
    float* Kg = St + Tk * Tq;  // Tk x D gathered keys
    float* Vg = Kg + Tk * D;   // Tk x D
    float* m = Vg + Tk * D;    // running max (per query)
    float* l = m + Tq;         // running sum
    float* mx = l + Tq;        // block max
    float* alpha = mx + Tq;
    float* ms = alpha + Tq;  // max used by the exp (0 where still -inf)
    index_t* rows = ibuf.data();
    index_t* keys = rows + Tq;

    const index_t tile = it % ntiles;
    const index_t bh = it / ntiles;
    const index_t h = bh % a.Hq, b = bh / a.Hq, hk = h / G;
    const QueryTile qt = query_tile(p, Tq, tile);
    const index_t n = std::min<index_t>(qt.count, Tq);
    if (n <= 0) return;
    const int32_t* tbl = head_blocks(p, b, h);
    const index_t np = round8(n);
    // Q rows into O (free until the first P V), then transposed and scaled into Qt; padding rows 0.
    const T* q_bh = q + b * a.q.b + h * a.q.h;
    for (index_t t = 0; t < std::min(n, kAhead); ++t) prefetch_row(q_bh + query_row(p, qt, t) * a.q.s, D);
    for (index_t t = 0; t < n; ++t) {
      if (t + kAhead < n) prefetch_row(q_bh + query_row(p, qt, t + kAhead) * a.q.s, D);
      const index_t i = query_row(p, qt, t);
      rows[t] = i;
      trous::cpu::to_float_row(q_bh + i * a.q.s, O + t * D, D);
    }
    std::fill(O + n * D, O + np * D, 0.f);
    cpu::transpose_scaled(np, D, O, D, Qt, Tq, qscale);
    std::fill(m, m + np, kNegInf);
    std::fill(l, l + np, 0.f);
    std::fill(O, O + n * D, 0.f);
    const KvRows kvr = kv.rows(b, hk);
    // While this tile computes, a share of the Q rows of the item this thread runs next per visited
    // key tile: a narrow band's tile visits 1-6 key tiles, too few to hide the misses of rows strided
    // by Hq * D (no hardware prefetcher follows them across pages) when they are loaded cold.
    const QueryTile qt_after = after < 0 ? QueryTile{} : query_tile(p, Tq, after % ntiles);
    const index_t n_after = after < 0 ? 0 : std::min<index_t>(qt_after.count, Tq);
    const T* q_after = after < 0 ? q : q + (after / ntiles / a.Hq) * a.q.b + (after / ntiles % a.Hq) * a.q.h;
    auto rows_ahead = [&](index_t part, index_t parts) {
      for (index_t t = n_after * part / parts; t < n_after * (part + 1) / parts; ++t)
        prefetch_row(q_after + query_row(p, qt_after, t) * a.q.s, D, trous::cpu::Prefetch::kL2);
    };
    KeySpan spans[2];
    const int nspans = key_spans(p, qt, spans);
    if (nspans == 0) rows_ahead(0, 1);
    thread_local std::vector<Visit> visits;
    for (int si = 0; si < nspans; ++si) {
      const KeySpan& sp = spans[si];
      // The visited tiles first, so that the next one's K rows (and this one's V rows) are fetched
      // while this one computes: a block layout jumps between distant key blocks, which no hardware
      // prefetcher follows.
      visits.clear();
      for (index_t u0 = sp.first, u1 = 0; u0 < sp.end; u0 = u1) {
        u1 = next_key_tile(p, sp, u0, Tk);
        const TileKind kind = classify(p, qt, sp, u0, u1);
        if (kind == kSkip) continue;
        const TileKind bkind = classify_blocks(p, tbl, qt, sp, u0, u1);
        if (bkind != kSkip) visits.push_back(Visit{u0, u1, kind, bkind});
      }
      for (size_t vi = 0; vi < visits.size(); ++vi) {
        const index_t u0 = visits[vi].u0, u1 = visits[vi].u1;
        const TileKind kind = visits[vi].kind, bkind = visits[vi].bkind;
        if (vi + 1 < visits.size()) prefetch_keys(p, sp, visits[vi + 1].u0, visits[vi + 1].u1, kvr.k, kvr.k_row, D);
        prefetch_keys(p, sp, u0, u1, kvr.v, kvr.v_row, D);
        if (si == 0) rows_ahead(static_cast<index_t>(vi), static_cast<index_t>(visits.size()));
        const BlockKeys bk = block_keys(p, sp, u0, u1, keys);
        const index_t nk = bk.nk;
        const float *Kb, *Vb;
        index_t ldk, ldv;
        if (bk.even) {
          Kb = kvr.k + bk.j0 * kvr.k_row, ldk = bk.step * kvr.k_row;
          Vb = kvr.v + bk.j0 * kvr.v_row, ldv = bk.step * kvr.v_row;
        } else {
          for (index_t c = 0; c < nk; ++c) {
            std::copy(kvr.k + keys[c] * kvr.k_row, kvr.k + keys[c] * kvr.k_row + D, Kg + c * D);
            std::copy(kvr.v + keys[c] * kvr.v_row, kvr.v + keys[c] * kvr.v_row + D, Vg + c * D);
          }
          Kb = Kg, Vb = Vg, ldk = ldv = D;
        }
        // S^T = K Q^T (nk x np)
        cpu::gemm(nk, np, D, Kb, ldk, 1, Qt, Tq, St, Tq, false);
        if (cap)
          for (index_t c = 0; c < nk; ++c) softcap_row(St + c * Tq, nullptr, n, a.softcap);
        if (kind == kPartial) mask_block(p, sp, rows, keys, n, nk, St, Tq);
        if (bkind == kPartial) mask_block_layout(p, tbl, rows, keys, n, nk, St, Tq);
        std::fill(mx, mx + np, kNegInf);
        block_col_max(mx, St, Tq, nk, np);
        const bool rescale = online_update(m, mx, ms, alpha, l, n, np);
        if (rescale)
          for (index_t t = 0; t < n; ++t)
            if (alpha[t] != 1.f) trous::cpu::from_float_row_scaled(O + t * D, alpha[t], O + t * D, D);
        block_exp(St, Tq, nk, ms, l, np);
        // O += P V: A(t, c) = P^T[c][t]
        cpu::gemm(n, D, nk, St, 1, Tq, Vb, ldv, O, D, true);
      }
    }
    for (index_t t = 0; t < n; ++t) {
      const index_t i = rows[t];
      if (!row_active(p, qt, i)) continue;
      const bool any = l[t] != 0.f;  // (NaN stays NaN)
      T* dst = out + ((b * a.Sq + i) * a.Hq + h) * D;
      if (any)
        trous::cpu::from_float_row_scaled(O + t * D, 1.f / l[t], dst, D);
      else
        std::fill(dst, dst + D, T(0.f));
      lse[(b * a.Hq + h) * a.Sq + i] = any ? m[t] + std::log(l[t]) : kNegInf;
    }
  });
}

// ---- backward ----

template <typename T>
void bwd_impl(const T* go, const T* q, const T* k, const T* v, const T* out, const float* lse, T* gq, T* gk, T* gv,
              const CpuAttnArgs& a) {
  const Pattern& p = a.pat;
  const index_t D = a.D, Tk = block_aligned(kCpuBwdKeyTile, p.blocks.bk);
  const index_t Tq = block_aligned(pick_query_tile(a.pat, kCpuBwdQueryTile, kCpuNarrowQueryTile), p.blocks.bq);
  const index_t ntiles = num_query_tiles(p, Tq);
  const index_t G = a.Hq / a.Hkv;
  const bool cap = a.softcap > 0.f;
  const float qscale = cap ? a.scale / a.softcap : a.scale;
  constexpr bool kF32 = std::is_same_v<T, float>;
  KvSource<T> kv{{}, k, v, &a};
  kv.prepare(true);
  // Work items: (batch, kv head), each split into nch chunks of its (query head, query tile) sequence
  // when there are fewer than kBwdItems (batch, kv head) pairs. nch depends on the shapes only, and
  // every chunk sums into its own fp32 dK / dV rows, reduced in chunk order at the end: the result
  // is bitwise the same whatever the thread count. One chunk of fp32 writes the outputs directly.
  const index_t units = a.B * a.Hkv, work = G * ntiles;
  const index_t nch = units >= kBwdItems ? 1 : std::max<index_t>(1, std::min(ceil_div(kBwdItems, units), work));
  const bool direct = kF32 && nch == 1;
  // (uninitialised: only the rows a chunk can reach are zeroed, below)
  const std::unique_ptr<float[]> parts(direct ? nullptr : new float[static_cast<size_t>(units * nch * 2 * a.Sk * D)]);
  // The key rows [jlo, jhi) a chunk's spans can reach (the same for every (batch, kv head)): only these
  // are zeroed and reduced (a window's chunk touches a small part of Sk).
  std::vector<index_t> jlo(static_cast<size_t>(nch), a.Sk), jhi(static_cast<size_t>(nch), 0);
  for (index_t c = 0; c < nch && !direct; ++c) {
    for (index_t w = work * c / nch; w < work * (c + 1) / nch; ++w) {
      const QueryTile qt = query_tile(p, Tq, w % ntiles);
      if (qt.count <= 0) continue;
      KeySpan spans[2];
      const int nspans = key_spans(p, qt, spans);
      for (int si = 0; si < nspans; ++si) {
        if (spans[si].end <= spans[si].first) continue;
        jlo[c] = std::min(jlo[c], key_index(p, spans[si], spans[si].first));
        jhi[c] = std::max(jhi[c], key_index(p, spans[si], spans[si].end - 1) + 1);
      }
    }
  }
  for_items(units * nch, [&](index_t it, index_t) {
    const index_t ch = it % nch, unit = it / nch;
    const index_t hk = unit % a.Hkv, b = unit / a.Hkv;
    const KvRows kvr = kv.rows(b, hk);
    float *dK, *dV;
    index_t ld;
    if (direct) {
      dK = reinterpret_cast<float*>(gk) + b * a.Sk * a.Hkv * D + hk * D;
      dV = reinterpret_cast<float*>(gv) + b * a.Sk * a.Hkv * D + hk * D;
      ld = a.Hkv * D;
    } else {
      dK = parts.get() + (unit * nch + ch) * 2 * a.Sk * D;
      dV = dK + a.Sk * D;
      ld = D;
    }
    for (index_t j = direct ? 0 : jlo[ch]; j < (direct ? a.Sk : jhi[ch]); ++j) {
      std::fill(dK + j * ld, dK + j * ld + D, 0.f);
      std::fill(dV + j * ld, dV + j * ld + D, 0.f);
    }
    std::vector<float> buf(static_cast<size_t>(4 * Tq * D + 3 * Tk * Tq + 4 * Tk * D + 2 * Tq + D));
    std::vector<index_t> rows(Tq), keys(Tk);
    float* Qs = buf.data();     // Tq x D scaled Q
    float* Qt = Qs + Tq * D;    // D x Tq
    float* dO = Qt + D * Tq;    // Tq x D
    float* dOt = dO + Tq * D;   // D x Tq
    float* St = dOt + D * Tq;   // Tk x Tq: S^T then P^T
    float* dPt = St + Tk * Tq;  // Tk x Tq: dP^T then dS^T
    float* Th = dPt + Tk * Tq;  // Tk x Tq tanh (softcap)
    float* Kg = Th + Tk * Tq;   // gathered keys (uneven spans)
    float* Vg = Kg + Tk * D;
    float* dKg = Vg + Tk * D;  // their gradients before the scatter
    float* dVg = dKg + Tk * D;
    float* L = dVg + Tk * D;  // lse per query (+inf: inactive row)
    float* Dv = L + Tq;
    float* tmp = Dv + Tq;
    std::vector<float> dQbuf(static_cast<size_t>(Tq * D));
    float* dQ = dQbuf.data();
    for (index_t w = work * ch / nch; w < work * (ch + 1) / nch; ++w) {
      const index_t h = hk * G + w / ntiles;
      {
        const index_t tile = w % ntiles;
        const QueryTile qt = query_tile(p, Tq, tile);
        const index_t n = std::min<index_t>(qt.count, Tq);
        if (n <= 0) continue;
        const index_t np = round8(n);
        const int32_t* tbl = head_blocks(p, b, h);
        bool any_row = false;
        for (index_t t = 0; t < np; ++t) {
          if (t >= n) {  // padding queries: zero operands, p = 0
            std::fill(Qs + t * D, Qs + (t + 1) * D, 0.f);
            std::fill(dO + t * D, dO + (t + 1) * D, 0.f);
            L[t] = std::numeric_limits<float>::infinity();
            Dv[t] = 0.f;
            continue;
          }
          const index_t i = query_row(p, qt, t);
          rows[t] = i;
          if (t + kAhead < n) {  // (strided rows: keep a few misses in flight, as in the forward)
            const index_t ia = query_row(p, qt, t + kAhead);
            prefetch_row(q + b * a.q.b + ia * a.q.s + h * a.q.h, D);
            prefetch_row(go + b * a.go.b + ia * a.go.s + h * a.go.h, D);
            prefetch_row(out + b * a.o.b + ia * a.o.s + h * a.o.h, D);
          }
          trous::cpu::to_float_row_scaled(q + b * a.q.b + i * a.q.s + h * a.q.h, qscale, Qs + t * D, D);
          trous::cpu::to_float_row(go + b * a.go.b + i * a.go.s + h * a.go.h, dO + t * D, D);
          trous::cpu::to_float_row(out + b * a.o.b + i * a.o.s + h * a.o.h, tmp, D);
          Dv[t] = trous::cpu::dot_row(dO + t * D, tmp, D);
          const float lv = lse[(b * a.Hq + h) * a.Sq + i];
          const bool act = row_active(p, qt, i) && lv != kNegInf;
          L[t] = act ? lv : std::numeric_limits<float>::infinity();
          any_row = any_row || act;
        }
        cpu::transpose_scaled(np, D, Qs, D, Qt, Tq, 1.f);
        cpu::transpose_scaled(np, D, dO, D, dOt, Tq, 1.f);
        std::fill(dQ, dQ + n * D, 0.f);
        KeySpan spans[2];
        // (a tile of fully masked rows only writes its zero dQ rows)
        const int nspans = any_row ? key_spans(p, qt, spans) : 0;
        for (int si = 0; si < nspans; ++si) {
          const KeySpan& sp = spans[si];
          for (index_t u0 = sp.first, u1 = 0; u0 < sp.end; u0 = u1) {
            u1 = next_key_tile(p, sp, u0, Tk);
            const TileKind kind = classify(p, qt, sp, u0, u1);
            if (kind == kSkip) continue;
            const TileKind bkind = classify_blocks(p, tbl, qt, sp, u0, u1);
            if (bkind == kSkip) continue;
            const BlockKeys bk = block_keys(p, sp, u0, u1, keys.data());
            const index_t nk = bk.nk;
            const float *Kb, *Vb;
            float *dKb, *dVb;
            index_t ldk, ldv, ldd;
            if (bk.even) {
              Kb = kvr.k + bk.j0 * kvr.k_row, ldk = bk.step * kvr.k_row;
              Vb = kvr.v + bk.j0 * kvr.v_row, ldv = bk.step * kvr.v_row;
              dKb = dK + bk.j0 * ld, dVb = dV + bk.j0 * ld, ldd = bk.step * ld;
            } else {
              for (index_t c = 0; c < nk; ++c) {
                std::copy(kvr.k + keys[c] * kvr.k_row, kvr.k + keys[c] * kvr.k_row + D, Kg + c * D);
                std::copy(kvr.v + keys[c] * kvr.v_row, kvr.v + keys[c] * kvr.v_row + D, Vg + c * D);
              }
              Kb = Kg, Vb = Vg, ldk = ldv = D;
              dKb = dKg, dVb = dVg, ldd = D;
            }
            cpu::gemm(nk, np, D, Kb, ldk, 1, Qt, Tq, St, Tq, false);    // S^T = K Q^T
            cpu::gemm(nk, np, D, Vb, ldv, 1, dOt, Tq, dPt, Tq, false);  // dP^T = V dO^T
            if (cap)
              for (index_t c = 0; c < nk; ++c) softcap_row(St + c * Tq, Th + c * Tq, np, a.softcap);
            if (kind == kPartial) mask_block(p, sp, rows.data(), keys.data(), n, nk, St, Tq);
            if (bkind == kPartial) mask_block_layout(p, tbl, rows.data(), keys.data(), n, nk, St, Tq);
            for (index_t c = 0; c < nk; ++c)
              bwd_col(St + c * Tq, dPt + c * Tq, cap ? Th + c * Tq : nullptr, L, Dv, np, a.softcap);
            // dV += P^T dO, dK += dS^T Q (scaled Q), dQ += dS K.
            const bool acc = bk.even;
            cpu::gemm(nk, D, np, St, Tq, 1, dO, D, dVb, ldd, acc);
            cpu::gemm(nk, D, np, dPt, Tq, 1, Qs, D, dKb, ldd, acc);
            cpu::gemm(n, D, nk, dPt, 1, Tq, Kb, ldk, dQ, D, true);
            if (!bk.even) {
              for (index_t c = 0; c < nk; ++c) {
                float* kr = dK + keys[c] * ld;
                float* vr = dV + keys[c] * ld;
                for (index_t d = 0; d < D; ++d) {
                  kr[d] += dKg[c * D + d];
                  vr[d] += dVg[c * D + d];
                }
              }
            }
          }
        }
        for (index_t t = 0; t < n; ++t) {
          const index_t i = rows[t];
          if (!row_active(p, qt, i)) continue;
          trous::cpu::from_float_row_scaled(dQ + t * D, qscale, gq + ((b * a.Sq + i) * a.Hq + h) * D, D);
        }
      }
    }
  });
  if (direct) return;
  at::parallel_for(0, units * a.Sk, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(static_cast<size_t>(2 * D));
    for (int64_t r = r0; r < r1; ++r) {
      const index_t unit = r / a.Sk, j = r % a.Sk, hk = unit % a.Hkv, b = unit / a.Hkv;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (index_t c = 0; c < nch; ++c) {
        if (j < jlo[c] || j >= jhi[c]) continue;
        const float* dK = parts.get() + (unit * nch + c) * 2 * a.Sk * D + j * D;
        const float* dV = dK + a.Sk * D;
        for (index_t d = 0; d < D; ++d) {
          acc[d] += dK[d];
          acc[D + d] += dV[d];
        }
      }
      trous::cpu::from_float_row(acc.data(), gk + ((b * a.Sk + j) * a.Hkv + hk) * D, D);
      trous::cpu::from_float_row(acc.data() + D, gv + ((b * a.Sk + j) * a.Hkv + hk) * D, D);
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
