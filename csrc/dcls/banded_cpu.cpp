// Banded grouped 1-D DCLS convolution, CPU kernels (math in trous/dcls_banded.h).
//
// Forward and input gradient are the same loop: a destination row is a weighted sum of shifted
// source rows, one (offset, weight) tap per band entry, listed once per call in a Plan. Rows are
// swept in chunks of up to 64 outputs held in AVX2 registers (each tap: one load and one FMA per 8
// outputs, no accumulator traffic through memory), and the source rows are cut into blocks whose
// chunk window fits in L1: all destination rows sweep one block before the next (partial sums are
// added back). The input gradient runs the same loop over the spread grad_out (zero-inserted for
// stride > 1, padded by dks - 1), with mirrored offsets. Kernel gradients are dot products of a
// grad_out row with shifted input rows, over input-row blocks that stay in L1; the band's shifts
// are taken four at a time so each grad_out vector load feeds four FMAs (AVX-512 where the CPU has
// it: half the loop and a masked tail; the sweeps gain nothing from it on a 2-core Zen 4).
//
// These per-sample kernels serve fp64, small batches and strides > 1. fp32 batches of 10 and more
// on AVX-512 CPUs go to the batch-lane kernels (cpu/dcls_banded_lanes.cpp, the same plans): about
// 1.5x (v1) to 3x (gauss) faster at the SNN shape.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "trous/simd_cpu.h"
#include "dcls/banded_plan_cpu.h"
#include "dcls/banded_cpu.h"

namespace trous {
namespace dcls {
namespace {

constexpr int kChunk = 64;               // outputs per sweep (8 AVX2 accumulators)
constexpr index_t kL1Bytes = 16 * 1024;  // source window per block: half of a 32 KiB L1

// out[t] (t < len) = (accumulate ? out[t] : init) + sum_k w[k] src[off[k] + t stride].
template <typename Acc>
void sweep_scalar(const Acc* src, const int32_t* off, const Acc* w, index_t nt, Acc init, bool accumulate, Acc* out,
                  int len, int stride) {
  if (!accumulate) {
    for (int t = 0; t < len; ++t) out[t] = init;
  }
  for (index_t k = 0; k < nt; ++k) {
    const Acc* p = src + off[k];
    const Acc wk = w[k];
    for (int t = 0; t < len; ++t) out[t] += wk * p[(index_t)t * stride];
  }
}

#if TROUS_HAVE_AVX2_PATH
TROUS_AVX2 inline __m256 load_lanes(const float* p, bool masked, __m256i mask) {
  return masked ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
}

// V vectors of 8 outputs (the last one masked to `tail` lanes when tail < 8; masked-off lanes are
// never read). Below four vectors the taps alternate between two accumulator sets, so the FMA
// latency chain stays hidden.
template <int V>
TROUS_AVX2 inline void sweep_block(const float* src, const int32_t* off, const float* w, index_t nt, float init,
                                   bool accumulate, float* out, int tail) {
  constexpr bool kTwoChains = V <= 4;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 a[V], b[V];
  for (int v = 0; v < V; ++v) {
    a[v] = accumulate ? load_lanes(out + 8 * v, v == V - 1 && tail < 8, mask) : _mm256_set1_ps(init);
    b[v] = _mm256_setzero_ps();
  }
  index_t k = 0;
  if (kTwoChains) {
    for (; k + 2 <= nt; k += 2) {
      const float* p0 = src + off[k];
      const float* p1 = src + off[k + 1];
      const __m256 w0 = _mm256_set1_ps(w[k]), w1 = _mm256_set1_ps(w[k + 1]);
      for (int v = 0; v < V; ++v) {
        a[v] = _mm256_fmadd_ps(w0, load_lanes(p0 + 8 * v, v == V - 1 && tail < 8, mask), a[v]);
        b[v] = _mm256_fmadd_ps(w1, load_lanes(p1 + 8 * v, v == V - 1 && tail < 8, mask), b[v]);
      }
    }
  }
  for (; k < nt; ++k) {
    const float* p = src + off[k];
    const __m256 wk = _mm256_set1_ps(w[k]);
    for (int v = 0; v < V; ++v) a[v] = _mm256_fmadd_ps(wk, load_lanes(p + 8 * v, v == V - 1 && tail < 8, mask), a[v]);
  }
  for (int v = 0; v < V; ++v) {
    const __m256 r = kTwoChains ? _mm256_add_ps(a[v], b[v]) : a[v];
    if (v == V - 1 && tail < 8) {
      _mm256_maskstore_ps(out + 8 * v, mask, r);
    } else {
      _mm256_storeu_ps(out + 8 * v, r);
    }
  }
}

// Stride-1 sweep of one chunk of 1 to 64 outputs.
TROUS_AVX2 void sweep_avx2(const float* src, const int32_t* off, const float* w, index_t nt, float init,
                           bool accumulate, float* out, int len) {
  const int vecs = (len + 7) / 8, tail = len - 8 * (vecs - 1);
  switch (vecs) {
    case 1: sweep_block<1>(src, off, w, nt, init, accumulate, out, tail); break;
    case 2: sweep_block<2>(src, off, w, nt, init, accumulate, out, tail); break;
    case 3: sweep_block<3>(src, off, w, nt, init, accumulate, out, tail); break;
    case 4: sweep_block<4>(src, off, w, nt, init, accumulate, out, tail); break;
    case 5: sweep_block<5>(src, off, w, nt, init, accumulate, out, tail); break;
    case 6: sweep_block<6>(src, off, w, nt, init, accumulate, out, tail); break;
    case 7: sweep_block<7>(src, off, w, nt, init, accumulate, out, tail); break;
    default: sweep_block<8>(src, off, w, nt, init, accumulate, out, tail); break;
  }
}

// The four horizontal sums of a, b, c, d in one transpose-add tree (half the shuffles of four
// separate reductions).
TROUS_AVX512 inline void sum4_avx512(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  auto half = [](__m512 v) TROUS_AVX512 {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// AVX-512 twin of dots_avx2: 16 lanes, masked tail, no scalar loop.
template <int J>
TROUS_AVX512 inline void dots_avx512(const float* gy, const float* x, int L, float* acc) {
  __m512 a[J];
  for (int j = 0; j < J; ++j) a[j] = _mm512_setzero_ps();
  int t = 0;
  for (; t + 16 <= L; t += 16) {
    const __m512 g = _mm512_loadu_ps(gy + t);
    for (int j = 0; j < J; ++j) a[j] = _mm512_fmadd_ps(g, _mm512_loadu_ps(x + t + j), a[j]);
  }
  if (t < L) {
    const __mmask16 m = (__mmask16)((1u << (L - t)) - 1u);
    const __m512 g = _mm512_maskz_loadu_ps(m, gy + t);
    for (int j = 0; j < J; ++j) a[j] = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, x + t + j), a[j]);
  }
  if constexpr (J == 4) {
    float sums[4];
    sum4_avx512(a[0], a[1], a[2], a[3], sums);
    for (int j = 0; j < 4; ++j) acc[j] += sums[j];
  } else {
    for (int j = 0; j < J; ++j) acc[j] += _mm512_reduce_add_ps(a[j]);
  }
}

// Two rows of two shifts each (v0 / v1 at kc 1): one grad_out load feeds four FMAs.
TROUS_AVX512 inline void dots_pair_avx512(const float* gy, const float* xa, const float* xb, int L, float* acc_a,
                                          float* acc_b) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  int t = 0;
  for (; t + 16 <= L; t += 16) {
    const __m512 g = _mm512_loadu_ps(gy + t);
    a0 = _mm512_fmadd_ps(g, _mm512_loadu_ps(xa + t), a0);
    a1 = _mm512_fmadd_ps(g, _mm512_loadu_ps(xa + t + 1), a1);
    b0 = _mm512_fmadd_ps(g, _mm512_loadu_ps(xb + t), b0);
    b1 = _mm512_fmadd_ps(g, _mm512_loadu_ps(xb + t + 1), b1);
  }
  if (t < L) {
    const __mmask16 m = (__mmask16)((1u << (L - t)) - 1u);
    const __m512 g = _mm512_maskz_loadu_ps(m, gy + t);
    a0 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, xa + t), a0);
    a1 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, xa + t + 1), a1);
    b0 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, xb + t), b0);
    b1 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, xb + t + 1), b1);
  }
  float sums[4];
  sum4_avx512(a0, a1, b0, b1, sums);
  acc_a[0] += sums[0];
  acc_a[1] += sums[1];
  acc_b[0] += sums[2];
  acc_b[1] += sums[3];
}

TROUS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[j] += sum_t gy[t] x[t + j] for j < J (J <= 4), t < L: stride-1 kernel-gradient dots.
template <int J>
TROUS_AVX2 inline void dots_avx2(const float* gy, const float* x, int L, float* acc) {
  __m256 a[J];
  for (int j = 0; j < J; ++j) a[j] = _mm256_setzero_ps();
  int t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 g = _mm256_loadu_ps(gy + t);
    for (int j = 0; j < J; ++j) a[j] = _mm256_fmadd_ps(g, _mm256_loadu_ps(x + t + j), a[j]);
  }
  for (int j = 0; j < J; ++j) {
    float s = hsum(a[j]);
    for (int u = t; u < L; ++u) s += gy[u] * x[u + j];
    acc[j] += s;
  }
}

// acc[s] += dot(gy, x[s:]) for every shift s in [lo, hi), four shifts per pass over gy.
struct Avx2Dots {
  template <int J>
  static void run(const float* gy, const float* x, int L, float* acc) {
    dots_avx2<J>(gy, x, L, acc);
  }
};
struct Avx512Dots {
  template <int J>
  static void run(const float* gy, const float* x, int L, float* acc) {
    dots_avx512<J>(gy, x, L, acc);
  }
};

template <typename Dots>
void band_dots(const float* gy, const float* x, int L, int lo, int hi, float* acc) {
  int s = lo;
  for (; s + 4 <= hi; s += 4) Dots::template run<4>(gy, x + s, L, acc + s);
  switch (hi - s) {
    case 3: Dots::template run<3>(gy, x + s, L, acc + s); break;
    case 2: Dots::template run<2>(gy, x + s, L, acc + s); break;
    case 1: Dots::template run<1>(gy, x + s, L, acc + s); break;
    default: break;
  }
}
#endif

template <typename Acc>
bool use_avx2(int stride) {
  return std::is_same_v<Acc, float> && stride == 1 && cpu::has_avx2();
}

// One sample's source plane with the margins the plans assume: row r of `src` (len elements) at
// lead + t * step of a row of padded_len, zeros elsewhere. The rows are written to `scratch`
// (per thread, reused across calls: no page faults, stays in L2) unless no margin is needed.
template <typename Acc>
const Acc* sample_plane(const Acc* src, index_t rows, int len, int lead, int step, index_t padded_len,
                        std::vector<Acc>& scratch) {
  if (lead == 0 && step == 1 && padded_len == len) return src;
  scratch.assign((size_t)(rows * padded_len), Acc(0));
  for (index_t r = 0; r < rows; ++r) {
    Acc* dst = scratch.data() + r * padded_len + lead;
    const Acc* row = src + r * len;
    if (step == 1) {
      std::copy(row, row + len, dst);
    } else {
      for (int t = 0; t < len; ++t) dst[(index_t)t * step] = row[t];
    }
  }
  return scratch.data();
}

// For every (n, chunk): each source block in turn, every destination row. `plane_in` / `plane_out`
// are the per-sample sizes of the source and destination tensors, init[r] the row's start value
// (0 when init is null).
template <typename Acc>
void run_plan(const Plan<Acc>& plan, const Acc* src, const SourceLayout& lay, Acc* dst, int len, int stride, index_t N,
              const Acc* init) {
  // Equal chunks (multiples of 16): a short last chunk would be FMA-latency bound.
  const index_t chunks = (len + kChunk - 1) / kChunk;
  const int step = (int)((((len + chunks - 1) / chunks) + 15) / 16 * 16);
  const bool avx2 = use_avx2<Acc>(stride);
  at::parallel_for(0, N * chunks, 1, [&](int64_t q0, int64_t q1) {
    std::vector<Acc> scratch;
    index_t plane_n = -1;
    const Acc* plane = nullptr;
    for (int64_t q = q0; q < q1; ++q) {
      const index_t n = q / chunks;
      if (n != plane_n) {
        plane =
            sample_plane(src + n * lay.rows * lay.len, lay.rows, lay.len, lay.lead, lay.step, lay.padded_len, scratch);
        plane_n = n;
      }
      const int t0 = (int)(q % chunks) * step;
      const int clen = len - t0 < step ? len - t0 : step;
      if (clen <= 0) continue;
      const Acc* base = plane + (index_t)t0 * stride;
      for (int b = 0; b < plan.blocks; ++b) {
        for (int r = 0; r < plan.rows; ++r) {
          const index_t k0 = plan.begin(r, b), nt = plan.end(r, b) - k0;
          if (b > 0 && nt == 0) continue;
          Acc* out = dst + (n * plan.rows + r) * (index_t)len + t0;
#if TROUS_HAVE_AVX2_PATH
          if constexpr (std::is_same_v<Acc, float>) {
            if (avx2) {
              sweep_avx2(base, plan.off.data() + k0, plan.w.data() + k0, nt, init ? init[r] : Acc(0), b > 0, out, clen);
              continue;
            }
          }
#endif
          (void)avx2;
          sweep_scalar(base, plan.off.data() + k0, plan.w.data() + k0, nt, init ? init[r] : Acc(0), b > 0, out, clen,
                       stride);
        }
      }
    }
  });
}

// Source blocks sized for the kernel that runs the plan: a chunk window of each source row (one
// sample's lanes), or a 16-output window of sixteen samples (the batch-lane kernels).
template <typename Acc>
Plan<Acc> make_plan(int rows, int source_rows, index_t window, bool lanes, int dks) {
  if (lanes) return Plan<Acc>(rows, source_rows, lanes_bytes_per_source_row(dks), lanes_block_bytes());
  return Plan<Acc>(rows, source_rows, window * (index_t)sizeof(Acc), kL1Bytes);
}

// The lanes kernels take fp32 sweeps of stride 1 (the forward of a stride-1 convolution, any input
// gradient: it sweeps the spread grad_out).
template <typename Acc>
bool lanes_for(const BandedGeom& g, int sweep_stride) {
  return std::is_same_v<Acc, float> && sweep_stride == 1 && lanes_apply(g);
}

// x rows zero-padded by pad on both sides.
SourceLayout x_layout(const BandedGeom& g) { return {g.c_in, g.l_in, g.pad, 1, (index_t)g.l_in + 2 * g.pad}; }
// Spread grad_out rows: grad_out[t] at (dks - 1) + t stride, zeros around (every tap in range).
SourceLayout spread_layout(const BandedGeom& g) {
  return {g.c_out, g.l_out, g.dks - 1, g.stride, (index_t)g.l_in + 2 * g.pad + g.dks - 1};
}

template <typename Acc>
Plan<Acc> forward_plan(const Acc* K, const int32_t* band, const BandedGeom& g, bool lanes) {
  const int I = g.in_per_group(), Og = g.out_per_group();
  const index_t lp = x_layout(g).padded_len;
  // A chunk reads (kChunk - 1) stride + dks elements of each source row.
  Plan<Acc> plan = make_plan<Acc>(g.c_out, g.c_in, (index_t)(kChunk - 1) * g.stride + g.dks, lanes, g.dks);
  for (int o = 0; o < g.c_out; ++o) {
    plan.begin_row(o);
    const int c0 = (o / Og) * I;
    for (int i = 0; i < I; ++i) {
      const index_t row = (index_t)o * I + i;
      int lo, hi;
      band_of(band, g, row, lo, hi);
      for (int s = lo; s < hi; ++s) plan.add(c0 + i, (index_t)(c0 + i) * lp + s, K[row * g.dks + s]);
    }
    plan.end_row();
  }
  return plan;
}

// The input gradient's taps over the spread grad_out rows.
template <typename Acc>
Plan<Acc> input_plan(const Acc* K, const int32_t* band, const BandedGeom& g, bool lanes) {
  const int I = g.in_per_group(), Og = g.out_per_group();
  const index_t lq = spread_layout(g).padded_len;
  Plan<Acc> plan = make_plan<Acc>(g.c_in, g.c_out, (index_t)kChunk + g.dks, lanes, g.dks);
  for (int c = 0; c < g.c_in; ++c) {
    plan.begin_row(c);
    const int i = c % I, o0 = (c / I) * Og;
    for (int o = o0; o < o0 + Og; ++o) {
      const index_t row = (index_t)o * I + i;
      int lo, hi;
      band_of(band, g, row, lo, hi);
      // grad_x[u] takes grad_out[t] where t stride = u + pad - s. In the spread rows grad_out[t]
      // sits at (dks - 1) + t stride, so the tap reads index u + pad + dks - 1 - s (listed in
      // increasing offsets: the lanes kernel fuses consecutive taps).
      for (int s = hi - 1; s >= lo; --s) plan.add(o, (index_t)o * lq + g.pad + g.dks - 1 - s, K[row * g.dks + s]);
    }
    plan.end_row();
  }
  return plan;
}

template <typename Acc>
void forward_impl(const Acc* x, const Acc* K, const int32_t* band, const Acc* bias, Acc* out, const BandedGeom& g) {
  const bool lanes = lanes_for<Acc>(g, g.stride);
  const Plan<Acc> plan = forward_plan(K, band, g, lanes);
  if constexpr (std::is_same_v<Acc, float>) {
    if (lanes) return lanes_run_plan(plan, lanes_pack(x, g.N, x_layout(g), 0), out, g.l_out, bias);
  }
  run_plan(plan, x, x_layout(g), out, g.l_out, g.stride, g.N, bias);
}

template <typename Acc>
void backward_kernel_impl(const Acc* gy, const Acc* x, const int32_t* band, Acc* gK, const BandedGeom& g) {
  const int I = g.in_per_group(), Og = g.out_per_group();
  const index_t lp = (index_t)g.l_in + 2 * g.pad;
  const int L = g.l_out, st = g.stride;
  const bool avx2 = use_avx2<Acc>(st);
  // Input rows per block: whole padded rows that fit in L1 while every output row of the thread
  // takes its dots with them.
  index_t fit = kL1Bytes / (lp * (index_t)sizeof(Acc));
  const int block_rows = (int)(fit < 1 ? 1 : (fit > g.c_in ? g.c_in : fit));
  // Threads own disjoint output rows of grad_K: no reduction across threads.
  at::parallel_for(0, g.c_out, 1, [&](int64_t oa, int64_t ob) {
    for (int64_t o = oa; o < ob; ++o) {
      for (index_t e = 0; e < (index_t)I * g.dks; ++e) gK[o * I * g.dks + e] = Acc(0);
    }
    std::vector<Acc> scratch;
    for (index_t n = 0; n < g.N; ++n) {
      const Acc* xn = sample_plane(x + n * g.c_in * g.l_in, g.c_in, g.l_in, g.pad, 1, lp, scratch);
      for (int cb = 0; cb < g.c_in; cb += block_rows) {
        const int ce = cb + block_rows < g.c_in ? cb + block_rows : g.c_in;
        for (int64_t o = oa; o < ob; ++o) {
          const int c0 = (int)(o / Og) * I;
          const int from = cb > c0 ? cb : c0, to = ce < c0 + I ? ce : c0 + I;
          const Acc* gyr = gy + (n * g.c_out + o) * L;
          for (int c = from; c < to; ++c) {
            const index_t row = (index_t)o * I + (c - c0);
            int lo, hi;
            band_of(band, g, row, lo, hi);
            Acc* acc = gK + row * g.dks;
            const Acc* xr = xn + (index_t)c * lp;
            int s = lo;
#if TROUS_HAVE_AVX2_PATH
            if constexpr (std::is_same_v<Acc, float>) {
              if (avx2 && cpu::has_avx512()) {
                if (hi - lo == 2 && c + 1 < to) {
                  int lo2, hi2;
                  band_of(band, g, row + 1, lo2, hi2);
                  if (hi2 - lo2 == 2) {
                    dots_pair_avx512(gyr, xr + lo, xr + lp + lo2, L, acc + lo, acc + g.dks + lo2);
                    ++c;
                    continue;
                  }
                }
                band_dots<Avx512Dots>(gyr, xr, L, lo, hi, acc);
                continue;
              }
              if (avx2) {
                band_dots<Avx2Dots>(gyr, xr, L, lo, hi, acc);
                continue;
              }
            }
#endif
            (void)avx2;
            for (; s < hi; ++s) {
              Acc d = Acc(0);
              for (int t = 0; t < L; ++t) d += gyr[t] * xr[s + (index_t)t * st];
              acc[s] += d;
            }
          }
        }
      }
    }
  });
}

// Both gradients from one repacked grad_out on the lanes path (grad_K reads the spread rows past
// their lead); the per-sample kernels pad and spread per sample.
template <typename Acc>
void backward_impl(const Acc* gy, const Acc* x, const Acc* K, const int32_t* band, Acc* gx, Acc* gK,
                   const BandedGeom& g) {
  const bool lanes_x = gx && lanes_for<Acc>(g, 1), lanes_k = gK && lanes_for<Acc>(g, g.stride);
  if constexpr (std::is_same_v<Acc, float>) {
    if (lanes_x || lanes_k) {
      const LanePlanes spread = lanes_pack(gy, g.N, spread_layout(g), 0);
      if (gx) lanes_run_plan(input_plan(K, band, g, true), spread, gx, g.l_in, nullptr);
      if (lanes_k) return lanes_backward_kernel(spread, lanes_pack(x, g.N, x_layout(g), 1), band, gK, g);
      if (gK) backward_kernel_impl(gy, x, band, gK, g);
      return;
    }
  }
  if (gx) run_plan(input_plan(K, band, g, false), gy, spread_layout(g), gx, g.l_in, 1, g.N, (const Acc*)nullptr);
  if (gK) backward_kernel_impl(gy, x, band, gK, g);
}

}  // namespace

bool cpu_banded_uses_batch_lanes(index_t batch, int stride, DType x_dtype) {
  BandedGeom g{};
  g.N = batch;
  g.stride = stride;
  // fp16 / bf16 inputs run in fp32 (the op layer converts), fp64 in fp64.
  return x_dtype == DType::kFloat64 ? lanes_for<double>(g, stride) : lanes_for<float>(g, stride);
}

void cpu_banded_forward(const float* x, const float* K, const int32_t* band, const float* bias, float* out,
                        const BandedGeom& g) {
  forward_impl(x, K, band, bias, out, g);
}
void cpu_banded_forward(const double* x, const double* K, const int32_t* band, const double* bias, double* out,
                        const BandedGeom& g) {
  forward_impl(x, K, band, bias, out, g);
}
void cpu_banded_backward(const float* grad_out, const float* x, const float* K, const int32_t* band, float* grad_x,
                         float* grad_K, const BandedGeom& g) {
  backward_impl(grad_out, x, K, band, grad_x, grad_K, g);
}
void cpu_banded_backward(const double* grad_out, const double* x, const double* K, const int32_t* band, double* grad_x,
                         double* grad_K, const BandedGeom& g) {
  backward_impl(grad_out, x, K, band, grad_x, grad_K, g);
}

}  // namespace dcls
}  // namespace trous
