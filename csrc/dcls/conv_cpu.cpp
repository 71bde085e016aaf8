// CPU kernels of the direct depthwise DCLS convolution.
//
// Per channel, the element profiles (dcls_conv.h) give a sparse list of taps: the support of the
// dense window and its coefficients (built in a per-channel scratch window, never as a layer-sized
// dense kernel). Each (batch, channel) plane is then one task of at::parallel_for:
//   * the plane is copied, zero padded and split into `stride_w` column phases, into a scratch
//     buffer, so that every tap is one linear offset and every output row a contiguous vector loop;
//   * forward:   out_row = sum_t coef_t * buf[row_base + off_t + 0..W)         (gather)
//   * grad_x:    stride 1: the same gather on the zero-padded grad_out with flipped taps;
//                otherwise buf[row_base + off_t + ...] += coef_t * g_row          (scatter)
//   * grad taps: G_t += sum_x g_row[x] * buf[row_base + off_t + x]                (dot per tap)
// then per channel G (reduced over the batch in a fixed order, so results are deterministic) gives
// dL/dw, dL/dP, dL/dSIG of every element (element_grads). The row loops use 32-byte GCC vectors and
// are cloned for AVX2/FMA (x86-64-v3) with a portable default, picked at load time.
#include "dcls/conv_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "trous/simd_cpu.h"

namespace trous {
namespace dcls {
namespace {

#define TROUS_ALWAYS_INLINE __attribute__((always_inline)) inline

template <typename Acc> struct VecT;
template <> struct VecT<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int n = 8;
};
template <> struct VecT<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int n = 4;
};

template <typename Acc> constexpr int kLanes = VecT<Acc>::n;
// A block is RB output rows x U vectors with RB * U <= 8 accumulators (+ a broadcast and loads: 16
// ymm registers). Narrow planes take more rows per block, so that every tap feeds several
// independent FMA chains (a single chain would wait on the FMA latency at every tap).
constexpr int kMaxAcc = 8;

// dst row r [0 .. U*V) = sum_t c[t] * src[r * rstep + off[t] + 0 .. U*V), r < RB
template <typename Acc, int RB, int U>
TROUS_ALWAYS_INLINE void gather_chunk(const Acc* src, index_t rstep, const int* off, const Acc* c, int nt, Acc* dst,
                                      index_t dstep) {
  using V = typename VecT<Acc>::type;
  constexpr int L = kLanes<Acc>;
  V acc[RB][U];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = V{};
  for (int t = 0; t < nt; ++t) {
    const Acc* p = src + off[t];
    const Acc ct = c[t];
    for (int r = 0; r < RB; ++r) {
      for (int u = 0; u < U; ++u) {
        V v;
        __builtin_memcpy(&v, p + r * rstep + u * L, sizeof(V));
        acc[r][u] += ct * v;
      }
    }
  }
  for (int r = 0; r < RB; ++r) __builtin_memcpy(dst + r * dstep, acc[r], sizeof(acc[r]));
}

// dst[r * rstep + off[t] + 0 .. U*V) += c[t] * g row r, for every tap
template <typename Acc, int RB, int U>
TROUS_ALWAYS_INLINE void scatter_chunk(Acc* dst, index_t rstep, const int* off, const Acc* c, int nt, const Acc* g,
                                       index_t gstep) {
  using V = typename VecT<Acc>::type;
  constexpr int L = kLanes<Acc>;
  V gv[RB][U];
  for (int r = 0; r < RB; ++r) __builtin_memcpy(gv[r], g + r * gstep, sizeof(gv[r]));
  for (int t = 0; t < nt; ++t) {
    Acc* p = dst + off[t];
    const Acc ct = c[t];
    for (int r = 0; r < RB; ++r) {
      for (int u = 0; u < U; ++u) {
        V v;
        __builtin_memcpy(&v, p + r * rstep + u * L, sizeof(V));
        v += ct * gv[r][u];
        __builtin_memcpy(p + r * rstep + u * L, &v, sizeof(V));
      }
    }
  }
}

// accs[t] += sum_{r, u} g[r][u] * src[r * rstep + off[t] + u*V ...] (lane-wise; the caller reduces lanes)
template <typename Acc, int RB, int U>
TROUS_ALWAYS_INLINE void dot_chunk(const Acc* src, index_t rstep, const int* off, int nt, const Acc* g, index_t gstep,
                                   Acc* accs) {
  using V = typename VecT<Acc>::type;
  constexpr int L = kLanes<Acc>;
  V gv[RB][U];
  for (int r = 0; r < RB; ++r) __builtin_memcpy(gv[r], g + r * gstep, sizeof(gv[r]));
  for (int t = 0; t < nt; ++t) {
    const Acc* p = src + off[t];
    V a0, a1 = V{};
    __builtin_memcpy(&a0, accs + t * L, sizeof(V));
    for (int r = 0; r < RB; ++r) {
      for (int u = 0; u < U; ++u) {
        V v;
        __builtin_memcpy(&v, p + r * rstep + u * L, sizeof(V));
        if ((r * U + u) % 2 == 0) {
          a0 += gv[r][u] * v;
        } else {
          a1 += gv[r][u] * v;
        }
      }
    }
    a0 += a1;
    __builtin_memcpy(accs + t * L, &a0, sizeof(V));
  }
}

// A plane's worth of rows: output row (z, y) starts at z * zstep + y * ystep in the tap buffer.
template <typename Acc>
struct RowJob {
  const int* off;
  const Acc* coef;
  int ntaps;
  int rows0, rows1;  // output rows: rows0 * rows1
  index_t zstep, ystep;
  int nvec;  // vectors per row (rows of the row-major side are nvec * lanes long)
};

// Calls F::template run<RB, U>(y, v) over every (row block, vector chunk) of one z slab: row blocks
// of RB rows (RB from the row width), chunks of up to kMaxAcc / RB (at most 4) vectors.
template <int RB, typename F>
TROUS_ALWAYS_INLINE void chunks_of_rows(int nvec, int y, F& f) {
  constexpr int UM = kMaxAcc / RB < 4 ? kMaxAcc / RB : 4;
  int v = 0;
  for (; v + UM <= nvec; v += UM) f.template run<RB, UM>(y, v);
  const int rest = nvec - v;
  if constexpr (UM > 3) {
    if (rest == 3) f.template run<RB, 3>(y, v);
  }
  if constexpr (UM > 2) {
    if (rest == 2) f.template run<RB, 2>(y, v);
  }
  if constexpr (UM > 1) {
    if (rest == 1) f.template run<RB, 1>(y, v);
  }
}

// Row blocks: as many rows as the accumulators allow (8 / vectors per row, at most 8), and the rows
// left over as one smaller block, so that every block keeps several independent FMA chains.
template <int RB, typename F>
TROUS_ALWAYS_INLINE void tail_rows(int rest, int nvec, int y, F& f) {
  if constexpr (RB > 1) {
    if (rest == RB - 1) return chunks_of_rows<RB - 1>(nvec, y, f);
    tail_rows<RB - 1>(rest, nvec, y, f);
  }
}

template <int RB, typename F>
TROUS_ALWAYS_INLINE void rows_in_blocks(int rows1, int nvec, F& f) {
  int y = 0;
  for (; y + RB <= rows1; y += RB) chunks_of_rows<RB>(nvec, y, f);
  if (y < rows1) tail_rows<RB>(rows1 - y, nvec, y, f);
}

template <typename F>
TROUS_ALWAYS_INLINE void for_row_blocks(int rows1, int nvec, F& f) {
  if (nvec >= 3) {
    rows_in_blocks<2>(rows1, nvec, f);
  } else if (nvec == 2) {
    rows_in_blocks<4>(rows1, nvec, f);
  } else {
    rows_in_blocks<8>(rows1, nvec, f);
  }
}

// rows_out[(z, y)] = gather over the taps of buf at the row base (row-major, nvec * lanes per row)
template <typename Acc>
struct GatherRows {
  const RowJob<Acc>& j;
  const Acc* src;  // slab base
  Acc* dst;        // slab base
  index_t row_len;
  template <int RB, int U>
  TROUS_ALWAYS_INLINE void run(int y, int v) {
    constexpr int L = kLanes<Acc>;
    gather_chunk<Acc, RB, U>(src + y * j.ystep + v * L, j.ystep, j.off, j.coef, j.ntaps, dst + y * row_len + v * L,
                             row_len);
  }
};

template <typename Acc>
struct ScatterRows {
  const RowJob<Acc>& j;
  Acc* dst;
  const Acc* g;
  index_t row_len;
  template <int RB, int U>
  TROUS_ALWAYS_INLINE void run(int y, int v) {
    constexpr int L = kLanes<Acc>;
    // Row blocks of a scatter overlap in the buffer: one row at a time keeps the += order per tap.
    for (int r = 0; r < RB; ++r) {
      scatter_chunk<Acc, 1, U>(dst + (y + r) * j.ystep + v * L, j.ystep, j.off, j.coef, j.ntaps,
                               g + (y + r) * row_len + v * L, row_len);
    }
  }
};

template <typename Acc>
struct DotRows {
  const RowJob<Acc>& j;
  const Acc* src;
  const Acc* g;
  index_t row_len;
  Acc* accs;
  template <int RB, int U>
  TROUS_ALWAYS_INLINE void run(int y, int v) {
    constexpr int L = kLanes<Acc>;
    dot_chunk<Acc, RB, U>(src + y * j.ystep + v * L, j.ystep, j.off, j.ntaps, g + y * row_len + v * L, row_len, accs);
  }
};

template <typename Acc>
TROUS_ALWAYS_INLINE void gather_plane_impl(const RowJob<Acc>& j, const Acc* buf, Acc* rows_out) {
  const index_t row_len = (index_t)j.nvec * kLanes<Acc>;
  for (int z = 0; z < j.rows0; ++z) {
    GatherRows<Acc> f{j, buf + z * j.zstep, rows_out + (index_t)z * j.rows1 * row_len, row_len};
    for_row_blocks(j.rows1, j.nvec, f);
  }
}

template <typename Acc>
TROUS_ALWAYS_INLINE void scatter_plane_impl(const RowJob<Acc>& j, const Acc* rows_g, Acc* buf) {
  const index_t row_len = (index_t)j.nvec * kLanes<Acc>;
  for (int z = 0; z < j.rows0; ++z) {
    ScatterRows<Acc> f{j, buf + z * j.zstep, rows_g + (index_t)z * j.rows1 * row_len, row_len};
    for (int y = 0; y < j.rows1; ++y) chunks_of_rows<1>(j.nvec, y, f);
  }
}

template <typename Acc>
TROUS_ALWAYS_INLINE void dot_plane_impl(const RowJob<Acc>& j, const Acc* buf, const Acc* rows_g, Acc* accs) {
  const index_t row_len = (index_t)j.nvec * kLanes<Acc>;
  for (int z = 0; z < j.rows0; ++z) {
    DotRows<Acc> f{j, buf + z * j.zstep, rows_g + (index_t)z * j.rows1 * row_len, row_len, accs};
    for_row_blocks(j.rows1, j.nvec, f);
  }
}

TROUS_CPU_CLONES void gather_plane(const RowJob<float>& j, const float* buf, float* out) {
  gather_plane_impl(j, buf, out);
}
TROUS_CPU_CLONES void gather_plane(const RowJob<double>& j, const double* buf, double* out) {
  gather_plane_impl(j, buf, out);
}
TROUS_CPU_CLONES void scatter_plane(const RowJob<float>& j, const float* g, float* buf) {
  scatter_plane_impl(j, g, buf);
}
TROUS_CPU_CLONES void scatter_plane(const RowJob<double>& j, const double* g, double* buf) {
  scatter_plane_impl(j, g, buf);
}
TROUS_CPU_CLONES void dot_plane(const RowJob<float>& j, const float* buf, const float* g, float* accs) {
  dot_plane_impl(j, buf, g, accs);
}
TROUS_CPU_CLONES void dot_plane(const RowJob<double>& j, const double* buf, const double* g, double* accs) {
  dot_plane_impl(j, buf, g, accs);
}

// ---- per-channel taps

template <typename Acc>
struct ChannelTaps {
  int window = 0;  // capacity per channel (the window size)
  int max_count = 0;
  std::vector<int> count;  // [C]
  std::vector<int> pos;    // [C, window]: window index (z * dks1 + y) * dks2 + x
  std::vector<int> pack;   // [C, window]: z | y << 10 | x << 20
  std::vector<Acc> coef;   // [C, window]
  std::vector<int> off;    // [C, window]: offset of each tap in a buffer (see with_offsets)
};

// Support and coefficients of channel c's dense window, in window order. `f` has g.dsum() entries,
// `dense` g.window(), `mask` g.window().
template <typename Acc>
int build_channel(const ConvGeom& g, const Params<Acc>& p, index_t c, Acc* f, Acc* dense, uint8_t* mask, int* pos,
                  int* pack, Acc* coef) {
  const int W = g.window();
  std::fill(dense, dense + W, Acc(0));
  std::fill(mask, mask + W, uint8_t(0));
  const Acc* fz = f + g.axis_base(0);
  const Acc* fy = f + g.axis_base(1);
  const Acc* fx = f + g.axis_base(2);
  AxisSummary<Acc> ax[kAxes];
  for (int k = 0; k < g.kc; ++k) {
    const Acc ck = element_profiles<Acc>(g, p, c, k, f, nullptr, nullptr, ax);
    for (int z = ax[0].lo; z < ax[0].hi; ++z) {
      for (int y = ax[1].lo; y < ax[1].hi; ++y) {
        const Acc czy = ck * fz[z] * fy[y];
        const int row = (z * g.dks[1] + y) * g.dks[2];
        for (int x = ax[2].lo; x < ax[2].hi; ++x) {
          dense[row + x] += czy * fx[x];
          mask[row + x] = 1;
        }
      }
    }
  }
  int n = 0;
  for (int z = 0, i = 0; z < g.dks[0]; ++z) {
    for (int y = 0; y < g.dks[1]; ++y) {
      for (int x = 0; x < g.dks[2]; ++x, ++i) {
        if (mask[i]) {
          pos[n] = i;
          pack[n] = z | y << 10 | x << 20;
          coef[n] = dense[i];
          ++n;
        }
      }
    }
  }
  return n;
}

template <typename Acc>
ChannelTaps<Acc> build_taps(const ConvGeom& g, const Params<Acc>& p) {
  ChannelTaps<Acc> t;
  t.window = g.window();
  t.count.assign(g.C, 0);
  t.pos.assign((size_t)g.C * t.window, 0);
  t.pack.assign((size_t)g.C * t.window, 0);
  t.coef.assign((size_t)g.C * t.window, Acc(0));
  at::parallel_for(0, g.C, 16, [&](int64_t c0, int64_t c1) {
    std::vector<Acc> f(g.dsum()), dense(t.window);
    std::vector<uint8_t> mask(t.window);
    for (int64_t c = c0; c < c1; ++c) {
      t.count[c] = build_channel<Acc>(g, p, c, f.data(), dense.data(), mask.data(), t.pos.data() + c * t.window,
                                      t.pack.data() + c * t.window, t.coef.data() + c * t.window);
    }
  });
  for (int64_t c = 0; c < g.C; ++c) t.max_count = std::max(t.max_count, t.count[c]);
  return t;
}

// ---- plane buffers

// The zero-padded input plane split into stride_w column phases: element (z, y, j) of the padded
// plane (j the padded column) lives at (j % sw) * phase + (z * Hp + y) * Wq + j / sw. Tap (tz, ty, tx)
// of output row (oz, oy) column ox reads (tx % sw) * phase + ((oz*sz + tz) * Hp + oy*sy + ty) * Wq
// + tx / sw + ox: one offset per tap, contiguous in ox.
struct PadLayout {
  int Dp, Hp, Wq, sw;
  index_t phase;
  index_t size() const { return phase * sw; }
};

PadLayout pad_layout(const ConvGeom& g, int nvec_out, int lanes) {
  PadLayout l;
  l.Dp = g.in[0] + 2 * g.pad[0];
  l.Hp = g.in[1] + 2 * g.pad[1];
  l.sw = g.stride[2];
  const int Wp = g.in[2] + 2 * g.pad[2];
  const int need = nvec_out * lanes + (g.dks[2] - 1) / l.sw;  // last column a vector chunk reads + 1
  l.Wq = std::max((Wp + l.sw - 1) / l.sw, need);
  l.phase = (index_t)l.Dp * l.Hp * l.Wq;
  return l;
}

template <typename T, typename Acc>
void fill_padded(const ConvGeom& g, const PadLayout& l, const T* plane, Acc* buf) {
  for (int z = 0; z < g.in[0]; ++z) {
    for (int y = 0; y < g.in[1]; ++y) {
      const T* src = plane + ((index_t)z * g.in[1] + y) * g.in[2];
      const index_t row = ((index_t)(z + g.pad[0]) * l.Hp + (y + g.pad[1])) * l.Wq;
      if (l.sw == 1) {
        Acc* dst = buf + row + g.pad[2];
        for (int x = 0; x < g.in[2]; ++x) dst[x] = static_cast<Acc>(src[x]);
      } else {
        for (int x = 0; x < g.in[2]; ++x) {
          const int j = x + g.pad[2];
          buf[(j % l.sw) * l.phase + row + j / l.sw] = static_cast<Acc>(src[x]);
        }
      }
    }
  }
}

template <typename T, typename Acc>
void crop_padded(const ConvGeom& g, const PadLayout& l, const Acc* buf, T* plane) {
  for (int z = 0; z < g.in[0]; ++z) {
    for (int y = 0; y < g.in[1]; ++y) {
      T* dst = plane + ((index_t)z * g.in[1] + y) * g.in[2];
      const index_t row = ((index_t)(z + g.pad[0]) * l.Hp + (y + g.pad[1])) * l.Wq;
      for (int x = 0; x < g.in[2]; ++x) {
        const int j = x + g.pad[2];
        dst[x] = static_cast<T>(buf[(j % l.sw) * l.phase + row + j / l.sw]);
      }
    }
  }
}

// Fills taps.off: for every tap, f(tz, ty, tx) (a linear buffer offset), once per call.
template <typename Acc, typename F>
void with_offsets(const ConvGeom& g, ChannelTaps<Acc>& taps, F&& f) {
  taps.off.assign(taps.pos.size(), 0);
  at::parallel_for(0, g.C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int* pack = taps.pack.data() + c * taps.window;
      int* off = taps.off.data() + c * taps.window;
      for (int t = 0; t < taps.count[c]; ++t) off[t] = f(pack[t] & 1023, (pack[t] >> 10) & 1023, pack[t] >> 20);
    }
  });
}

// Offsets into the phase-split padded plane (PadLayout).
template <typename Acc>
void pad_offsets(const ConvGeom& g, const PadLayout& l, ChannelTaps<Acc>& taps) {
  with_offsets(g, taps, [&](int tz, int ty, int tx) {
    return (int)((tx % l.sw) * l.phase + ((index_t)tz * l.Hp + ty) * l.Wq + tx / l.sw);
  });
}

template <typename Acc>
RowJob<Acc> out_rows_job(const ConvGeom& g, const PadLayout& l, int nvec) {
  RowJob<Acc> j{};
  j.rows0 = g.out[0];
  j.rows1 = g.out[1];
  j.zstep = (index_t)g.stride[0] * l.Hp * l.Wq;
  j.ystep = (index_t)g.stride[1] * l.Wq;
  j.nvec = nvec;
  return j;
}

int vecs_for(int n, int lanes) { return (n + lanes - 1) / lanes; }

// ---- forward

template <typename T, typename Acc>
void forward_impl(const T* x, T* out, const ConvGeom& g, const Params<Acc>& p) {
  constexpr int L = kLanes<Acc>;
  ChannelTaps<Acc> taps = build_taps<Acc>(g, p);
  const int nvec = vecs_for(g.out[2], L);
  const PadLayout l = pad_layout(g, nvec, L);
  pad_offsets(g, l, taps);
  const index_t in_plane = g.in_plane(), out_plane = g.out_plane();
  const index_t rows = (index_t)g.out[0] * g.out[1];
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<Acc> buf(l.size() + L, Acc(0));
    std::vector<Acc> rows_out(rows * nvec * L);
    RowJob<Acc> job = out_rows_job<Acc>(g, l, nvec);
    for (int64_t pl = p0; pl < p1; ++pl) {
      const index_t c = pl % g.C;
      const int nt = taps.count[c];
      fill_padded(g, l, x + pl * in_plane, buf.data());
      job.off = taps.off.data() + c * taps.window;
      job.coef = taps.coef.data() + c * taps.window;
      job.ntaps = nt;
      gather_plane(job, buf.data(), rows_out.data());
      const Acc b = p.bias ? p.bias[c] : Acc(0);
      T* o = out + pl * out_plane;
      for (index_t r = 0; r < rows; ++r) {
        const Acc* src = rows_out.data() + r * nvec * L;
        T* dst = o + r * g.out[2];
        for (int xo = 0; xo < g.out[2]; ++xo) dst[xo] = static_cast<T>(src[xo] + b);
      }
    }
  });
}

// ---- backward

template <typename T, typename Acc>
void backward_impl(const T* gout, const T* x, T* gx, const ConvGeom& g, const Params<Acc>& p,
                   const ParamGrads<Acc>& gr) {
  constexpr int L = kLanes<Acc>;
  const bool want_params = gr.gw != nullptr;
  const bool want_x = gx != nullptr;
  ChannelTaps<Acc> taps = build_taps<Acc>(g, p);
  const int nvec = vecs_for(g.out[2], L);
  const PadLayout l = pad_layout(g, nvec, L);
  pad_offsets(g, l, taps);
  const bool unit_stride = g.stride[0] == 1 && g.stride[1] == 1 && g.stride[2] == 1;
  const index_t in_plane = g.in_plane(), out_plane = g.out_plane();
  const index_t out_rows = (index_t)g.out[0] * g.out[1];
  const index_t in_rows = (index_t)g.in[0] * g.in[1];
  // Stride-1 input gradient: gather over grad_out zero-padded by L = dks - 1 - pad on each axis.
  const int nvec_in = vecs_for(g.in[2], L);
  int Lo[kAxes], Gd[kAxes];
  for (int a = 0; a < kAxes; ++a) {
    Lo[a] = g.dks[a] - 1 - g.pad[a];
    Gd[a] = g.in[a] + g.dks[a] - 1;
  }
  const int Gw = std::max(Gd[2], nvec_in * L + g.dks[2] - 1);
  const index_t gp_size = (index_t)Gd[0] * Gd[1] * Gw;
  const int maxT = std::max(taps.max_count, 1);
  // Per-plane kernel-gradient partials: every entry the reduction reads is written first.
  std::unique_ptr<Acc[]> partial(want_params ? new Acc[(size_t)(g.N * g.C) * maxT] : nullptr);
  // Flipped taps over the padded grad_out (stride-1 input gradient).
  std::vector<int> flips;
  if (want_x && unit_stride) {
    std::vector<int> keep;
    keep.swap(taps.off);
    with_offsets(g, taps, [&](int tz, int ty, int tx) {
      return (int)(((index_t)(g.dks[0] - 1 - tz) * Gd[1] + (g.dks[1] - 1 - ty)) * Gw + (g.dks[2] - 1 - tx));
    });
    flips.swap(taps.off);
    taps.off.swap(keep);
  }

  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<Acc> xbuf(want_params ? l.size() + L : 0, Acc(0));
    std::vector<Acc> sbuf(want_x && !unit_stride ? l.size() + L : 0, Acc(0));
    std::vector<Acc> gp(want_x && unit_stride ? gp_size + L : 0, Acc(0));
    std::vector<Acc> grows(out_rows * nvec * L, Acc(0));  // grad_out rows, zero tails
    std::vector<Acc> xrows(want_x && unit_stride ? in_rows * nvec_in * L : 0);
    std::vector<Acc> accs((size_t)maxT * L);
    for (int64_t pl = p0; pl < p1; ++pl) {
      const index_t c = pl % g.C;
      const int nt = taps.count[c];
      const Acc* coef = taps.coef.data() + c * taps.window;
      const T* gplane = gout + pl * out_plane;
      RowJob<Acc> job = out_rows_job<Acc>(g, l, nvec);
      job.off = taps.off.data() + c * taps.window;
      job.coef = coef;
      job.ntaps = nt;
      if (want_params || !unit_stride) {
        for (index_t r = 0; r < out_rows; ++r) {
          const T* src = gplane + r * g.out[2];
          Acc* dst = grows.data() + r * nvec * L;
          for (int xo = 0; xo < g.out[2]; ++xo) dst[xo] = static_cast<Acc>(src[xo]);
        }
      }
      if (want_params) {
        fill_padded(g, l, x + pl * in_plane, xbuf.data());
        std::fill(accs.begin(), accs.begin() + (size_t)nt * L, Acc(0));
        dot_plane(job, xbuf.data(), grows.data(), accs.data());
        Acc* dst = partial.get() + pl * maxT;
        for (int t = 0; t < nt; ++t) {
          Acc s = 0;
          for (int k = 0; k < L; ++k) s += accs[t * L + k];
          dst[t] = s;
        }
      }
      if (want_x && unit_stride) {
        // gp[m] = g[m - Lo] inside the grad_out plane, 0 elsewhere (borders stay 0 between planes).
        for (int oz = 0; oz < g.out[0]; ++oz) {
          const int mz = oz + Lo[0];
          if (mz < 0 || mz >= Gd[0]) continue;
          for (int oy = 0; oy < g.out[1]; ++oy) {
            const int my = oy + Lo[1];
            if (my < 0 || my >= Gd[1]) continue;
            const T* src = gplane + ((index_t)oz * g.out[1] + oy) * g.out[2];
            Acc* dst = gp.data() + ((index_t)mz * Gd[1] + my) * Gw;
            for (int ox = 0; ox < g.out[2]; ++ox) {
              const int mx = ox + Lo[2];
              if (mx >= 0 && mx < Gd[2]) dst[mx] = static_cast<Acc>(src[ox]);
            }
          }
        }
        RowJob<Acc> bj{};
        bj.off = flips.data() + c * taps.window;
        bj.coef = coef;
        bj.ntaps = nt;
        bj.rows0 = g.in[0];
        bj.rows1 = g.in[1];
        bj.zstep = (index_t)Gd[1] * Gw;
        bj.ystep = Gw;
        bj.nvec = nvec_in;
        gather_plane(bj, gp.data(), xrows.data());
        T* o = gx + pl * in_plane;
        for (index_t r = 0; r < in_rows; ++r) {
          const Acc* src = xrows.data() + r * nvec_in * L;
          T* dst = o + r * g.in[2];
          for (int xi = 0; xi < g.in[2]; ++xi) dst[xi] = static_cast<T>(src[xi]);
        }
      } else if (want_x) {
        std::fill(sbuf.begin(), sbuf.end(), Acc(0));
        scatter_plane(job, grows.data(), sbuf.data());
        crop_padded(g, l, sbuf.data(), gx + pl * in_plane);
      }
    }
  });

  if (!want_params) return;
  const index_t row_stride = g.C * g.kc;
  at::parallel_for(0, g.C, 4, [&](int64_t c0, int64_t c1) {
    const int ds = g.dsum();
    std::vector<Acc> f(ds), dmu(ds), dsig(ds), G(taps.window);
    for (int64_t c = c0; c < c1; ++c) {
      const int nt = taps.count[c];
      const int* pos = taps.pos.data() + c * taps.window;
      std::fill(G.begin(), G.end(), Acc(0));
      for (int t = 0; t < nt; ++t) {
        Acc s = 0;
        for (index_t n = 0; n < g.N; ++n) s += partial[(n * g.C + c) * maxT + t];
        G[pos[t]] = s;
      }
      for (int k = 0; k < g.kc; ++k) {
        AxisSummary<Acc> ax[kAxes];
        element_profiles<Acc>(g, p, c, k, f.data(), dmu.data(), dsig.data(), ax);
        const index_t ck = c * g.kc + k;
        Acc gw, gmu[kAxes], gsig[kAxes];
        element_grads<Acc, Acc>(g, f.data(), dmu.data(), dsig.data(), ax, p.w[ck], G.data(), &gw, gmu, gsig);
        gr.gw[ck] = gw;
        for (int j = 0; j < kAxes; ++j) {
          const int r = g.prow[j];
          if (r < 0) continue;
          gr.gP[r * row_stride + ck] = gmu[j];
          if (gr.gSIG) gr.gSIG[r * row_stride + ck] = gsig[j];
        }
      }
    }
  });
}

template <typename Acc>
Params<Acc> typed(const RawParams& p) {
  return Params<Acc>{static_cast<const Acc*>(p.w), static_cast<const Acc*>(p.P), static_cast<const Acc*>(p.SIG),
                     static_cast<const Acc*>(p.bias)};
}

}  // namespace

void cpu_forward(DType dtype, const void* x, void* out, const ConvGeom& g, const RawParams& p) {
  if (g.N * g.C == 0) return;
  dispatch_dtype<cpu::CpuTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    forward_impl<T, Acc>(static_cast<const T*>(x), static_cast<T*>(out), g, typed<Acc>(p));
  });
}

void cpu_backward(DType dtype, const void* grad_out, const void* x, void* grad_x, const ConvGeom& g, const RawParams& p,
                  const RawGrads& gr) {
  dispatch_dtype<cpu::CpuTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const ParamGrads<Acc> pg{static_cast<Acc*>(gr.gw), static_cast<Acc*>(gr.gP), static_cast<Acc*>(gr.gSIG)};
    if (g.N * g.C == 0) {  // empty batch: parameter gradients are 0
      if (pg.gw) {
        std::fill(pg.gw, pg.gw + g.C * g.kc, Acc(0));
        std::fill(pg.gP, pg.gP + g.ndim * g.C * g.kc, Acc(0));
        if (pg.gSIG) std::fill(pg.gSIG, pg.gSIG + g.ndim * g.C * g.kc, Acc(0));
      }
      return;
    }
    backward_impl<T, Acc>(static_cast<const T*>(grad_out), static_cast<const T*>(x), static_cast<T*>(grad_x), g,
                          typed<Acc>(p), pg);
  });
}

void cpu_tap_counts(DType dtype, const ConvGeom& g, const RawParams& p, int32_t* counts) {
  dispatch_dtype<cpu::CpuTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using Acc = acc_t<decltype(tag)>;
    const ChannelTaps<Acc> taps = build_taps<Acc>(g, typed<Acc>(p));
    for (index_t c = 0; c < g.C; ++c) counts[c] = taps.count[c];
  });
}

}  // namespace dcls
}  // namespace trous
