// CPU kernels of the fused, separable DCLS kernel construction. Channels are split across threads
// with at::parallel_for; a channel needs O(kc * (n0 + n1 + n2)) work memory (one profile per axis
// per element) instead of the reference's ~9 kernel-sized temporaries. Half types compute in fp32,
// double in double. Only the taps where a profile (or its derivative) can be non-zero are visited:
// v0 / v1 elements cost 2^ndim taps, gauss the whole window.
//
// The per-channel loops are cloned for AVX2/FMA (x86-64-v3) with a portable default picked at load
// time; they are written so that the compiler vectorises them (contiguous axpy loops, a
// branch-free exp for the gauss profiles).
#include "dcls/construct_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "trous/simd_cpu.h"

namespace trous {
namespace dcls {
namespace construct {
namespace {

// Multiply-adds per parallel task: enough to amortise scheduling, few enough to balance two cores.
constexpr int64_t kGrainWork = 1 << 15;

// The selects below (clamps that keep NaN) only if-convert, and so vectorise, when comparisons may
// not raise FP exceptions; nothing here reads the exception flags.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// exp(x) for x <= 0 (or NaN) without branches or calls, so that loops over it vectorise
// (Cephes expf: ~1 ulp). Below -87.3 (fp32's normal range) it returns 0 instead of a denormal.
inline float exp_nonpositive(float x) {
  const float lo = -87.33654f;
  const float xc = x < lo ? lo : x;  // NaN passes through
  const float kMagic = 12582912.f;   // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float fn_biased = xc * 1.44269504088896341f + kMagic;
  int32_t n;
  std::memcpy(&n, &fn_biased, 4);
  n -= 0x4B400000;
  const float fn = fn_biased - kMagic;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t sbits = (n + 127) << 23;  // 2^n, n in [-126, 0]
  float s;
  std::memcpy(&s, &sbits, 4);
  return x < lo ? 0.f : p * s;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// params.h's gauss taps of one element along one axis (values and, if dmu, derivatives), all n
// taps, with the exponential written so that the loop vectorises.
template <typename A>
inline void gauss_row_impl(A mu, A inv_sigma, int n, A* g, A* dmu, A* dsig) {
  for (int t = 0; t < n; ++t) {
    const A z = (A(t) - mu) * inv_sigma;
    g[t] = exp_nonpositive(A(-0.5) * z * z);
  }
  if (dmu) {
    for (int t = 0; t < n; ++t) {
      const Tap<A> tp = gauss_tap(g[t], (A(t) - mu) * inv_sigma, inv_sigma);
      dmu[t] = tp.dmu;
      dsig[t] = tp.dsig;
    }
  }
}
TROUS_CPU_CLONES void gauss_row(float mu, float inv_sigma, int n, float* g, float* dmu, float* dsig) {
  gauss_row_impl(mu, inv_sigma, n, g, dmu, dsig);
}
TROUS_CPU_CLONES void gauss_row(double mu, double inv_sigma, int n, double* g, double* dmu, double* dsig) {
  gauss_row_impl(mu, inv_sigma, n, g, dmu, dsig);
}

#pragma GCC pop_options

// Profiles of all kc elements of one channel (the work memory of that channel).
template <typename A>
struct Profiles {
  Profiles(const ConstructArgs& a, bool derivs)
      : taps(a.taps()),
        g((size_t)a.kc * taps),
        dmu(derivs ? g.size() : 0),
        dsig(derivs ? g.size() : 0),
        lo((size_t)a.kc * kAxes),
        hi(lo.size()),
        sum(lo.size()),
        sig_sign(lo.size()),
        scale(a.kc),
        denom(a.kc) {
    for (int ax = 0; ax < kAxes; ++ax) pj[ax] = a.p_index(ax), start[ax] = a.row_start(ax);
  }
  int taps;
  int pj[kAxes], start[kAxes];   // P index of each window axis (-1: padding axis), its row offset
  std::vector<A> g, dmu, dsig;   // [kc][taps]: axis 0's row, then axis 1's, then axis 2's
  std::vector<int> lo, hi;       // [kc][3]: taps outside [lo, hi) are exactly 0 (value and derivatives)
  std::vector<A> sum, sig_sign;  // [kc][3]
  std::vector<A> scale, denom;   // [kc]: weight / denom, denom
  size_t row(int k, int ax) const { return (size_t)k * taps + start[ax]; }
};

template <typename T, typename A>
void compute_profiles(const ConstructArgs& a, const T* w, const T* P, const T* SIG, index_t c, bool derivs,
                      Profiles<A>& pr) {
  const index_t plane = a.channels * a.kc;
  for (int k = 0; k < a.kc; ++k) {
    A prod = A(1);
    const A wk = static_cast<A>(w[c * a.kc + k]);
    bool poisoned = !acc_finite(wk);
    for (int ax = 0; ax < kAxes; ++ax) {
      const size_t e = (size_t)k * kAxes + ax, row = pr.row(k, ax);
      A* g = pr.g.data() + row;
      A* dmu = derivs ? pr.dmu.data() + row : nullptr;
      A* dsig = derivs ? pr.dsig.data() + row : nullptr;
      const int j = pr.pj[ax];
      if (j < 0) {  // padding axis of size 1: profile 1
        g[0] = A(1);
        if (derivs) dmu[0] = dsig[0] = A(0);
        pr.lo[e] = 0, pr.hi[e] = 1, pr.sum[e] = A(1), pr.sig_sign[e] = A(0);
        continue;
      }
      const index_t off = j * plane + c * a.kc + k;
      const AxisParams<A> ap =
          axis_params(a.version, static_cast<A>(P[off]), SIG ? static_cast<A>(SIG[off]) : A(0), a.offset[j]);
      int lo, hi;
      tap_range(a.version, ap.mu, ap.sigma, a.size[ax], lo, hi);
      if (axis_poisons(a.version, static_cast<A>(P[off]), SIG ? static_cast<A>(SIG[off]) : A(0))) poisoned = true;
      if (a.version == Version::kGauss) {  // dense: the vectorised row
        gauss_row(ap.mu, ap.inv_sigma, a.size[ax], g, dmu, dsig);
      } else {
        for (int t = lo; t < hi; ++t) {
          const Tap<A> tp = tap(a.version, t, ap.mu, ap.sigma, ap.inv_sigma);
          g[t] = tp.g;
          if (derivs) dmu[t] = tp.dmu, dsig[t] = tp.dsig;
        }
      }
      A s = A(0);
      for (int t = lo; t < hi; ++t) s += g[t];
      pr.lo[e] = lo, pr.hi[e] = hi, pr.sum[e] = s, pr.sig_sign[e] = ap.sig_sign;
      prod *= s;
    }
    pr.denom[k] = norm_denominator(a.version, prod);
    pr.scale[k] = wk / pr.denom[k];
    if (poisoned) {  // params.h: NaN over the whole window (profiles, sums, derivatives)
      const A nan = acc_nan<A>();
      for (int ax = 0; ax < kAxes; ++ax) {
        const size_t e = (size_t)k * kAxes + ax, row = pr.row(k, ax);
        const int n = a.size[ax];
        std::fill(pr.g.begin() + row, pr.g.begin() + row + n, nan);
        if (derivs) {
          std::fill(pr.dmu.begin() + row, pr.dmu.begin() + row + n, nan);
          std::fill(pr.dsig.begin() + row, pr.dsig.begin() + row + n, nan);
        }
        pr.lo[e] = 0, pr.hi[e] = n, pr.sum[e] = nan;
      }
      pr.denom[k] = pr.scale[k] = nan;
    }
  }
}

// Forward of one channel: acc[window] = sum_k scale_k * g0 (x) g1 (x) g2 over the elements' supports.
template <typename A>
inline void accumulate_impl(const ConstructArgs& a, const Profiles<A>& pr, A* acc) {
  const int n1 = a.size[1], n2 = a.size[2];
  std::fill(acc, acc + a.window(), A(0));
  for (int k = 0; k < a.kc; ++k) {
    const int* lo = &pr.lo[(size_t)k * kAxes];
    const int* hi = &pr.hi[(size_t)k * kAxes];
    const A* g0 = pr.g.data() + pr.row(k, 0);
    const A* g1 = pr.g.data() + pr.row(k, 1);
    const A* g2 = pr.g.data() + pr.row(k, 2);
    for (int i0 = lo[0]; i0 < hi[0]; ++i0) {
      const A s0 = pr.scale[k] * g0[i0];
      for (int i1 = lo[1]; i1 < hi[1]; ++i1) {
        const A s01 = s0 * g1[i1];
        A* out = acc + ((index_t)i0 * n1 + i1) * n2;
        for (int i2 = lo[2]; i2 < hi[2]; ++i2) out[i2] += s01 * g2[i2];
      }
    }
  }
}
TROUS_CPU_CLONES void accumulate(const ConstructArgs& a, const Profiles<float>& pr, float* acc) {
  accumulate_impl(a, pr, acc);
}
TROUS_CPU_CLONES void accumulate(const ConstructArgs& a, const Profiles<double>& pr, double* acc) {
  accumulate_impl(a, pr, acc);
}

// The two axes other than ax, in window order.
inline void other_axes(int ax, int& p, int& q) { p = ax == 0 ? 1 : 0, q = ax == 2 ? 1 : 2; }

// grad_K of one channel re-laid out once per moving axis ax as [p][q][ax] (ax contiguous), so that
// the contraction with the other axes' profiles is a sum of contiguous axpys.
template <typename A>
void make_layouts(const ConstructArgs& a, const Profiles<A>& pr, const A* G, std::vector<A>* layout) {
  const int n[kAxes] = {a.size[0], a.size[1], a.size[2]};
  for (int ax = 0; ax < 2; ++ax) {  // axis 2 reads G itself
    if (pr.pj[ax] < 0) continue;
    int p, q;
    other_axes(ax, p, q);
    std::vector<A>& L = layout[ax];
    for (int i0 = 0; i0 < n[0]; ++i0)
      for (int i1 = 0; i1 < n[1]; ++i1)
        for (int i2 = 0; i2 < n[2]; ++i2) {
          const int i[kAxes] = {i0, i1, i2};
          L[((index_t)i[p] * n[q] + i[q]) * n[ax] + i[ax]] = G[((index_t)i0 * n[1] + i1) * n[2] + i2];
        }
  }
}

// Backward of one channel, in A: gw [kc], gP and gS [ndim][kc] (gS only for max / gauss).
template <typename A>
inline void backward_channel_impl(const ConstructArgs& a, const Profiles<A>& pr, const A* const* L, A* u, A* gw, A* gP,
                                  A* gS) {
  const int n[kAxes] = {a.size[0], a.size[1], a.size[2]};
  for (int k = 0; k < a.kc; ++k) {
    const int* lo = &pr.lo[(size_t)k * kAxes];
    const int* hi = &pr.hi[(size_t)k * kAxes];
    const A* g = pr.g.data() + pr.row(k, 0);  // the element's three rows, at pr.start[ax]
    // u_ax[t] = sum over the other axes of grad_K * their profiles (only moving axes are needed).
    for (int ax = 0; ax < kAxes; ++ax) {
      if (pr.pj[ax] < 0) continue;
      int p, q;
      other_axes(ax, p, q);
      A* ua = u + pr.start[ax];
      const A* gp = g + pr.start[p];
      const A* gq = g + pr.start[q];
      for (int t = lo[ax]; t < hi[ax]; ++t) ua[t] = A(0);
      for (int ip = lo[p]; ip < hi[p]; ++ip)
        for (int iq = lo[q]; iq < hi[q]; ++iq) {
          const A wpq = gp[ip] * gq[iq];
          const A* row = L[ax] + ((index_t)ip * n[q] + iq) * n[ax];
          for (int t = lo[ax]; t < hi[ax]; ++t) ua[t] += wpq * row[t];
        }
    }
    // dL/d(scale_k * g0 g1 g2) summed over the window; axis 2 always moves.
    A amp = A(0);
    for (int t = lo[2]; t < hi[2]; ++t) amp += u[pr.start[2] + t] * g[pr.start[2] + t];
    const A scale = pr.scale[k], denom = pr.denom[k];
    gw[k] = amp / denom;
    // d/dsum_ax of w / (prod sums + eps), times the other sums, reaches every tap of the axis.
    const A norm = a.version == Version::kV0 ? A(0) : -amp * scale / denom;
    const A* s = &pr.sum[(size_t)k * kAxes];
    for (int ax = 0; ax < kAxes; ++ax) {
      const int j = pr.pj[ax];
      if (j < 0) continue;
      const A others = (ax == 0 ? A(1) : s[0]) * (ax == 1 ? A(1) : s[1]) * (ax == 2 ? A(1) : s[2]);
      const size_t row = pr.row(k, ax);
      const A* ua = u + pr.start[ax];
      A dmu = A(0), dsig = A(0);
      for (int t = lo[ax]; t < hi[ax]; ++t) {
        const A dg = scale * ua[t] + norm * others;
        dmu += dg * pr.dmu[row + t];
        dsig += dg * pr.dsig[row + t];
      }
      gP[j * a.kc + k] = dmu;
      gS[j * a.kc + k] = has_sigma(a.version) ? dsig * pr.sig_sign[(size_t)k * kAxes + ax] : A(0);
    }
  }
}
TROUS_CPU_CLONES void backward_channel(const ConstructArgs& a, const Profiles<float>& pr, const float* const* L,
                                       float* u, float* gw, float* gP, float* gS) {
  backward_channel_impl(a, pr, L, u, gw, gP, gS);
}
TROUS_CPU_CLONES void backward_channel(const ConstructArgs& a, const Profiles<double>& pr, const double* const* L,
                                       double* u, double* gw, double* gP, double* gS) {
  backward_channel_impl(a, pr, L, u, gw, gP, gS);
}

int64_t grain_channels(const ConstructArgs& a) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, (int64_t)a.kc * a.window()));
}

template <typename T, typename A>
void forward_impl(const T* w, const T* P, const T* SIG, T* K, const ConstructArgs& a) {
  const index_t window = a.window();
  at::parallel_for(0, a.channels, grain_channels(a), [&](int64_t c0, int64_t c1) {
    Profiles<A> pr(a, false);
    std::vector<A> acc(window);
    for (int64_t c = c0; c < c1; ++c) {
      compute_profiles(a, w, P, SIG, c, false, pr);
      accumulate(a, pr, acc.data());
      T* dst = K + c * window;
      for (index_t i = 0; i < window; ++i) dst[i] = static_cast<T>(acc[i]);
    }
  });
}

template <typename T, typename A>
void backward_impl(const T* gK, const T* w, const T* P, const T* SIG, T* gw, T* gP, T* gSIG, const ConstructArgs& a) {
  const index_t window = a.window();
  const index_t plane = a.channels * a.kc;
  at::parallel_for(0, a.channels, grain_channels(a), [&](int64_t c0, int64_t c1) {
    Profiles<A> pr(a, true);
    std::vector<A> layout[kAxes];  // [0], [1]: re-laid-out grad_K; [2]: grad_K as A (if T is not A)
    for (int ax = 0; ax < 2; ++ax)
      if (pr.pj[ax] >= 0) layout[ax].resize(window);
    if (!std::is_same_v<T, A>) layout[2].resize(window);
    std::vector<A> u(pr.taps), gw_c(a.kc), gP_c((size_t)a.ndim * a.kc), gS_c(gP_c.size());
    for (int64_t c = c0; c < c1; ++c) {
      compute_profiles(a, w, P, SIG, c, true, pr);
      const A* G;
      if constexpr (std::is_same_v<T, A>) {
        G = gK + c * window;
      } else {
        for (index_t i = 0; i < window; ++i) layout[2][i] = static_cast<A>(gK[c * window + i]);
        G = layout[2].data();
      }
      make_layouts(a, pr, G, layout);
      const A* L[kAxes] = {layout[0].data(), layout[1].data(), G};
      backward_channel(a, pr, L, u.data(), gw_c.data(), gP_c.data(), gS_c.data());
      for (int k = 0; k < a.kc; ++k) gw[c * a.kc + k] = static_cast<T>(gw_c[k]);
      for (int j = 0; j < a.ndim; ++j)
        for (int k = 0; k < a.kc; ++k) {
          gP[j * plane + c * a.kc + k] = static_cast<T>(gP_c[j * a.kc + k]);
          if (gSIG) gSIG[j * plane + c * a.kc + k] = static_cast<T>(gS_c[j * a.kc + k]);
        }
    }
  });
}

}  // namespace

void cpu_construct_forward(DType dtype, const void* weight, const void* P, const void* SIG, void* K,
                           const ConstructArgs& a) {
  if (a.channels == 0 || a.window() == 0) return;
  dispatch_dtype<cpu::CpuTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T, acc_t<T>>(static_cast<const T*>(weight), static_cast<const T*>(P), static_cast<const T*>(SIG),
                              static_cast<T*>(K), a);
  });
}

void cpu_construct_backward(DType dtype, const void* grad_K, const void* weight, const void* P, const void* SIG,
                            void* grad_weight, void* grad_P, void* grad_SIG, const ConstructArgs& a) {
  if (a.channels == 0 || a.kc == 0) return;
  dispatch_dtype<cpu::CpuTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T, acc_t<T>>(static_cast<const T*>(grad_K), static_cast<const T*>(weight), static_cast<const T*>(P),
                               static_cast<const T*>(SIG), static_cast<T*>(grad_weight), static_cast<T*>(grad_P),
                               static_cast<T*>(grad_SIG), a);
  });
}

}  // namespace construct
}  // namespace dcls
}  // namespace trous
