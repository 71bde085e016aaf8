// Banded DCLS sweeps with sixteen samples in the lanes of one AVX-512 vector (math in
// trous/dcls_banded.h, plans in dcls_banded_plan.h).
//
// With time in the lanes (cpu/dcls_banded.cpp) every tap is an unaligned load feeding one FMA, and
// half of those loads split a cache line: the sweep tops out near one FMA per cycle. Here the
// source is repacked so that one vector holds one (row, time) element of sixteen samples: every
// load is an aligned line, and a run of J consecutive taps of one row reuses each loaded vector J
// times across a register tile of up to 16 outputs (R + J - 1 loads for R J FMAs). A batch that is
// not a multiple of 16 leaves zero lanes in its last vector.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "dcls/banded_plan_cpu.h"
#include "trous/simd_cpu.h"

namespace trous {
namespace dcls {

namespace {
constexpr int kLanes = 16;
constexpr int kLanesMinBatch = 10;          // measured crossover at the SNN shape: v1 ties at 10, gauss at 8
constexpr int kMaxTile = 16;                // outputs per register tile
constexpr int kMaxRun = 4;                  // consecutive taps fused into one pass over the tile
constexpr index_t kBlockBytes = 96 * 1024;  // source window per block (measured best on Zen 4)
}  // namespace

bool lanes_apply(const BandedGeom& g) { return g.N >= kLanesMinBatch && cpu::has_avx512(); }
index_t lanes_bytes_per_source_row(int dks) { return (index_t)(kMaxTile + dks - 1) * kLanes * sizeof(float); }
index_t lanes_block_bytes() { return kBlockBytes; }

#if TROUS_HAVE_AVX2_PATH
namespace {

// Up to kMaxRun consecutive taps of one source row: source vector `off` (in the sample plane's
// elements) feeds output 0 with w[0], off + 1 with w[1], ...
struct Run {
  int32_t off, taps;
  float w[kMaxRun];
};

// The plan's taps fused into runs, with the plan's (row, block) segments.
struct Runs {
  std::vector<Run> runs;
  std::vector<index_t> seg;
  int rows, blocks;

  explicit Runs(const Plan<float>& plan) : rows(plan.rows), blocks(plan.blocks) {
    seg.assign(plan.seg.size(), 0);
    runs.reserve(plan.off.size());
    for (int r = 0; r < rows; ++r) {
      for (int b = 0; b < blocks; ++b) {
        seg[(size_t)r * (blocks + 1) + b] = (index_t)runs.size();
        for (index_t k = plan.begin(r, b); k < plan.end(r, b);) {
          Run q{plan.off[k], 0, {0.f, 0.f, 0.f, 0.f}};
          while (k < plan.end(r, b) && q.taps < kMaxRun && plan.off[k] == q.off + q.taps) q.w[q.taps++] = plan.w[k++];
          runs.push_back(q);
        }
      }
      seg[(size_t)r * (blocks + 1) + blocks] = (index_t)runs.size();
    }
  }
  index_t begin(int r, int b) const { return seg[(size_t)r * (blocks + 1) + b]; }
  index_t end(int r, int b) const { return seg[(size_t)r * (blocks + 1) + b + 1]; }
};

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;

AlignedFloats aligned_floats(index_t count) {
  const size_t bytes = ((size_t)count * sizeof(float) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
  TORCH_CHECK(p != nullptr, "trous.dcls_banded: out of memory for a ", bytes, "-byte repacked plane");
  return AlignedFloats(p);
}

// The repacked source of a call. Up to kKeepBytes it stays with the calling thread for the next
// call: a fresh activation-sized buffer costs a page fault per 4 KiB on every call (about as much
// as packing it).
constexpr index_t kKeepBytes = 16 << 20;
struct PackBuffer {
  AlignedFloats owned, kept;
  index_t kept_count = 0;
  float* get(index_t count) {
    if ((index_t)sizeof(float) * count > kKeepBytes) {
      owned = aligned_floats(count);
      return owned.get();
    }
    if (kept_count < count) kept = aligned_floats(count), kept_count = count;
    return kept.get();
  }
};

}  // namespace

LanePlanes lanes_pack(const float* src, index_t N, const SourceLayout& lay, int slot) {
  static thread_local PackBuffer buffers[2];
  TORCH_INTERNAL_ASSERT(slot == 0 || slot == 1);
  const index_t nb_count = (N + kLanes - 1) / kLanes, row_floats = lay.padded_len * kLanes;
  float* dst = buffers[slot].get(nb_count * lay.rows * row_floats);
  at::parallel_for(0, nb_count * lay.rows, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const index_t nb = q / lay.rows, r = q % lay.rows;
      float* d = dst + q * row_floats;
      std::memset(d, 0, sizeof(float) * (size_t)row_floats);
      const index_t lanes = std::min<index_t>(kLanes, N - nb * kLanes);
      for (index_t j = 0; j < lanes; ++j) {
        const float* row = src + ((nb * kLanes + j) * lay.rows + r) * lay.len;
        float* col = d + (index_t)lay.lead * kLanes + j;
        for (int t = 0; t < lay.len; ++t) col[(index_t)t * lay.step * kLanes] = row[t];
      }
    }
  });
  return LanePlanes{dst, lay, N};
}

namespace {

// acc[r] += sum_j w[j] src[r + j] for r < R, j < J: each source vector is loaded once.
template <int R, int J>
TROUS_AVX512 inline void run_taps(const float* src, const float* w, __m512* acc) {
  __m512 wv[J];
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) wv[j] = _mm512_set1_ps(w[j]);
#pragma GCC unroll 32
  for (int m = 0; m < R + J - 1; ++m) {
    __m512 v = _mm512_load_ps(src + (index_t)kLanes * m);
    if (J > 1) asm("" : "+v"(v));  // one load per vector, not one folded load per FMA
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      const int r = m - j;
      if (r >= 0 && r < R) acc[r] = _mm512_fmadd_ps(wv[j], v, acc[r]);
    }
  }
}

// Where a tile goes: dst[(n0 + lane) rows + r) len + t0 + t] for the valid lanes.
struct TileOut {
  float* dst;
  int rows, len, t0, lanes;
  index_t n0;
};

// One register tile of R outputs starting at t0 for sixteen samples: every block, every row.
template <int R>
TROUS_AVX512 void sweep_tile(const Runs& runs, const float* plane, const float* init, float* partial,
                             const TileOut& to) {
  alignas(64) float tile[R][kLanes];
  for (int b = 0; b < runs.blocks; ++b) {
    const bool last = b == runs.blocks - 1;
    for (int r = 0; r < runs.rows; ++r) {
      const index_t k0 = runs.begin(r, b), k1 = runs.end(r, b);
      if (b > 0 && !last && k0 == k1) continue;
      float* part = partial + (index_t)r * kMaxTile * kLanes;
      __m512 acc[R];
#pragma GCC unroll 16
      for (int t = 0; t < R; ++t) {
        acc[t] = b == 0 ? _mm512_set1_ps(init ? init[r] : 0.f) : _mm512_load_ps(part + t * kLanes);
      }
      for (index_t k = k0; k < k1; ++k) {
        const Run& q = runs.runs[k];
        const float* src = plane + (index_t)q.off * kLanes;
        switch (q.taps) {
          case 1: run_taps<R, 1>(src, q.w, acc); break;
          case 2: run_taps<R, 2>(src, q.w, acc); break;
          case 3: run_taps<R, 3>(src, q.w, acc); break;
          default: run_taps<R, 4>(src, q.w, acc); break;
        }
      }
      if (!last) {
#pragma GCC unroll 16
        for (int t = 0; t < R; ++t) _mm512_store_ps(part + t * kLanes, acc[t]);
        continue;
      }
#pragma GCC unroll 16
      for (int t = 0; t < R; ++t) _mm512_store_ps(tile[t], acc[t]);
      for (int j = 0; j < to.lanes; ++j) {
        float* out = to.dst + ((to.n0 + j) * to.rows + r) * (index_t)to.len + to.t0;
        for (int t = 0; t < R; ++t) out[t] = tile[t][j];
      }
    }
  }
}

using TileFn = void (*)(const Runs&, const float*, const float*, float*, const TileOut&);

template <int... Rs>
constexpr std::array<TileFn, sizeof...(Rs)> tile_table(std::integer_sequence<int, Rs...>) {
  return {&sweep_tile<Rs + 1>...};
}

// out[j] += sum_{t < L} <g[t], x[t + j]> (16-lane dots) for j < J. The x vectors slide through
// registers (one new load per output step, shared by the J shifts); even and odd steps use two
// accumulator sets so 2J FMA chains are in flight.
template <int J>
TROUS_AVX512 inline void dot_run(const float* g, const float* x, int L, float* out) {
  __m512 a[J], b[J], xw[J + 1];
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) a[j] = b[j] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int j = 0; j < J - 1; ++j) xw[j] = _mm512_load_ps(x + (index_t)kLanes * j);
  int t = 0;
  for (; t + 2 <= L; t += 2) {
    xw[J - 1] = _mm512_load_ps(x + (index_t)kLanes * (t + J - 1));
    xw[J] = _mm512_load_ps(x + (index_t)kLanes * (t + J));
    const __m512 g0 = _mm512_load_ps(g + (index_t)kLanes * t), g1 = _mm512_load_ps(g + (index_t)kLanes * (t + 1));
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      a[j] = _mm512_fmadd_ps(g0, xw[j], a[j]);
      b[j] = _mm512_fmadd_ps(g1, xw[j + 1], b[j]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < J - 1; ++j) xw[j] = xw[j + 2];
  }
  if (t < L) {
    xw[J - 1] = _mm512_load_ps(x + (index_t)kLanes * (t + J - 1));
    const __m512 g0 = _mm512_load_ps(g + (index_t)kLanes * t);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) a[j] = _mm512_fmadd_ps(g0, xw[j], a[j]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) out[j] += _mm512_reduce_add_ps(_mm512_add_ps(a[j], b[j]));
}

}  // namespace

void lanes_run_plan(const Plan<float>& plan, const LanePlanes& src, float* dst, int len, const float* init) {
  static constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kMaxTile>{});
  const Runs runs(plan);
  const SourceLayout& lay = src.lay;
  const index_t N = src.N;
  const index_t nb_count = (N + kLanes - 1) / kLanes, plane_floats = lay.rows * lay.padded_len * kLanes;
  // Tiles of equal size (within one): a short last tile would waste the loads it shares.
  const int tiles = (len + kMaxTile - 1) / kMaxTile, base = len / tiles, extra = len % tiles;
  at::parallel_for(0, nb_count * tiles, 1, [&](int64_t q0, int64_t q1) {
    AlignedFloats partial = aligned_floats((index_t)plan.rows * kMaxTile * kLanes);
    for (int64_t q = q0; q < q1; ++q) {
      const index_t nb = q / tiles;
      const int tile = (int)(q % tiles), R = base + (tile < extra ? 1 : 0);
      const int t0 = tile * base + std::min(tile, extra);
      const TileOut to{dst, plan.rows, len, t0, (int)std::min<index_t>(kLanes, N - nb * kLanes), nb * kLanes};
      kTiles[R - 1](runs, src.data + nb * plane_floats + (index_t)t0 * kLanes, init, partial.get(), to);
    }
  });
}

void lanes_backward_kernel(const LanePlanes& gy, const LanePlanes& x, const int32_t* band, float* gK,
                           const BandedGeom& g) {
  const int I = g.in_per_group(), Og = g.out_per_group(), L = g.l_out;
  const index_t lp = x.lay.padded_len, lq = gy.lay.padded_len;
  const index_t nb_count = (g.N + kLanes - 1) / kLanes;
  // Input rows per block: whole packed rows that stay in L2 while every output row of the thread
  // takes its dots with them.
  const index_t fit = kBlockBytes * 4 / (lp * kLanes * (index_t)sizeof(float));
  const int block_rows = (int)std::max<index_t>(1, std::min<index_t>(fit, g.c_in));
  // Threads own disjoint output rows of grad_K: no reduction across threads.
  at::parallel_for(0, g.c_out, 1, [&](int64_t oa, int64_t ob) {
    std::fill(gK + oa * I * g.dks, gK + ob * I * g.dks, 0.f);
    for (index_t nb = 0; nb < nb_count; ++nb) {
      const float* xn = x.data + nb * g.c_in * lp * kLanes;
      for (int cb = 0; cb < g.c_in; cb += block_rows) {
        const int ce = std::min(cb + block_rows, g.c_in);
        for (int64_t o = oa; o < ob; ++o) {
          const int c0 = (int)(o / Og) * I, from = std::max(cb, c0), to = std::min(ce, c0 + I);
          const float* gyr = gy.data + ((nb * g.c_out + o) * lq + gy.lay.lead) * kLanes;
          for (int c = from; c < to; ++c) {
            const index_t row = o * I + (c - c0);
            int lo, hi;
            band_of(band, g, row, lo, hi);
            for (int s = lo; s < hi; s += kMaxRun) {
              const float* xr = xn + ((index_t)c * lp + s) * kLanes;
              float* acc = gK + row * g.dks + s;
              switch (std::min(kMaxRun, hi - s)) {
                case 1: dot_run<1>(gyr, xr, L, acc); break;
                case 2: dot_run<2>(gyr, xr, L, acc); break;
                case 3: dot_run<3>(gyr, xr, L, acc); break;
                default: dot_run<4>(gyr, xr, L, acc); break;
              }
            }
          }
        }
      }
    }
  });
}

#else
LanePlanes lanes_pack(const float*, index_t, const SourceLayout&, int) {
  TORCH_CHECK(false, "trous.dcls_banded: the batch-lane kernels need x86-64 (AVX-512)");
}
void lanes_run_plan(const Plan<float>&, const LanePlanes&, float*, int, const float*) {
  TORCH_CHECK(false, "trous.dcls_banded: the batch-lane kernels need x86-64 (AVX-512)");
}
void lanes_backward_kernel(const LanePlanes&, const LanePlanes&, const int32_t*, float*, const BandedGeom&) {
  TORCH_CHECK(false, "trous.dcls_banded: the batch-lane kernels need x86-64 (AVX-512)");
}
#endif

}  // namespace dcls
}  // namespace trous
