// Direct depthwise DCLS convolution: per-element math shared by the CPU kernels (conv_cpu.cpp) and
// the CUDA kernels (conv_kernels.cuh). Torch-free. Semantics: ../shared/spec/dcls.md.
//
// One kernel element k of channel c has a weight w, one position P[r] per P row r and (gauss/max) one
// SIG[r]. Every version is separable: the element's dense footprint is coef * f_z(a) f_y(b) f_x(e),
// one 1-D profile per spatial axis (params.h's taps, mu = P[r] + dks[r] // 2 for the P row r of that
// axis), coef = w for v0 and w / (S + 1e-7) otherwise,
// with S the product over axes of each profile's sum over the whole window (the reference's
// X.sum(window), mass outside the window is renormalised away). The dense kernel of the channel is
// the sum of the element footprints; it only ever exists as a per-channel window in scratch.
//
// Support: each profile's taps form an interval [lo, hi): v0/v1/max where f > 0 (or, for v0, the
// two bilinear taps even when one weight is 0, since its position derivative is not), gauss where
// f >= tau * max f. Gauss taps below that threshold (tau = 2^-28 / d in fp32, 2^-56 / d in fp64:
// the dropped mass of an element is < 2^-27 of its total) are skipped; they are below fp32 (fp64)
// resolution of the result. The channel's tap set is the union of its elements' support boxes.
//
// Internally every convolution has three spatial axes (D, H, W); 1-D and 2-D layers use leading
// axes of size 1 with a constant profile [1] ("unlearned" axes, prow = -1).
#pragma once
#include <cmath>

#include "trous/common.h"
#include "dcls/params.h"

// Full unrolling of the 3-axis loops on the device (keeps per-axis arrays in registers).
#if defined(__CUDACC__)
#define TROUS_DCLS_UNROLL _Pragma("unroll")
#else
#define TROUS_DCLS_UNROLL
#endif

namespace trous {
namespace dcls {

// Shape and options of one depthwise DCLS convolution, spatial arrays in (D, H, W) order.
struct ConvGeom {
  index_t N, C;
  int kc;    // elements per channel
  int ndim;  // rows of P / SIG (1, 2 or 3)
  Version version;
  int in[kAxes], out[kAxes];
  int dks[kAxes];  // window extent per axis (1 for unlearned axes)
  int stride[kAxes], pad[kAxes];
  int prow[kAxes];    // row of P / SIG driving each axis, -1 for unlearned axes
  int offset[kAxes];  // integer added to P on that axis: dks[prow] // 2 in the user's axis order

  TROUS_HOST_DEVICE index_t in_plane() const { return (index_t)in[0] * in[1] * in[2]; }
  TROUS_HOST_DEVICE index_t out_plane() const { return (index_t)out[0] * out[1] * out[2]; }
  TROUS_HOST_DEVICE int window() const { return dks[0] * dks[1] * dks[2]; }
  TROUS_HOST_DEVICE int dsum() const { return dks[0] + dks[1] + dks[2]; }
  TROUS_HOST_DEVICE int axis_base(int j) const { return j == 0 ? 0 : (j == 1 ? dks[0] : dks[0] + dks[1]); }
  TROUS_HOST_DEVICE bool normalised() const { return version != Version::kV0; }
};

// Fills dks / prow / offset of the 3 internal axes from the user's dilated_kernel_size `spatial_dks`
// (first spatial axis first) with params.h's axis quirks.
inline void set_axis_map(ConvGeom& g, int ndim, const int* spatial_dks) {
  const int lead = kAxes - ndim;
  for (int j = 0; j < kAxes; ++j) {
    g.dks[j] = j < lead ? 1 : spatial_dks[j - lead];
    g.prow[j] = -1;
    g.offset[j] = 0;
  }
  for (int s = 0; s < ndim; ++s) {
    const int r = p_row_of_spatial_axis(ndim, g.version, s);
    g.prow[lead + s] = r;
    g.offset[lead + s] = spatial_dks[r] / 2;  // the reference adds lim[r] // 2 to P[r]
  }
}

// Arguments below which exp rounds to +0 (fp32: e^-105 < half the smallest subnormal; fp64: e^-746).
template <typename Acc> TROUS_INLINE Acc exp_underflow();
template <> TROUS_INLINE float exp_underflow<float>() { return -105.f; }
template <> TROUS_INLINE double exp_underflow<double>() { return -746.0; }

// Relative threshold of the gauss support (times the profile's maximum), per axis of extent d.
template <typename Acc> TROUS_INLINE Acc gauss_tau(int d);
template <> TROUS_INLINE float gauss_tau<float>(int d) { return acc_div(3.7252903e-9f, (float)d); }      // 2^-28 / d
template <> TROUS_INLINE double gauss_tau<double>(int d) { return 1.3877787807814457e-17 / (double)d; }  // 2^-56 / d

// ln(1 / tau) + 1 for d up to 1023: 28 ln 2 + ln 1023 + 1 (fp32), 56 ln 2 + ln 1023 + 1 (fp64).
template <typename Acc> TROUS_INLINE Acc gauss_skip_margin();
template <> TROUS_INLINE float gauss_skip_margin<float>() { return 27.34f; }
template <> TROUS_INLINE double gauss_skip_margin<double>() { return 46.75; }

// What the gradient of an element needs from one axis besides the per-tap arrays.
template <typename Acc>
struct AxisSummary {
  int lo, hi;    // support [lo, hi) (empty when lo >= hi)
  Acc sum_f;     // sum of f over the whole window (the normaliser's factor)
  Acc sum_dmu;   // sum of df/dmu over the whole window
  Acc sum_dsig;  // sum of df/dSIG over the whole window
};

// Profile of one element along one axis of extent d: f[i] and, when dmu / dsig are not null, df/dP
// and df/dSIG (the chain through |SIG| included; torch's abs'(0) = 0, relu'(0) = 0, sign(0) = 0 are
// reproduced). Only entries inside the returned support [lo, hi) are defined (the only ones any
// caller reads); the sums cover the whole window. NaN parameters give a NaN window. `p` and `sig`
// are the raw P and SIG values, `learned` false for the constant profile [1] of an unlearned axis.
template <typename Acc>
TROUS_INLINE AxisSummary<Acc> axis_profile(Version v, bool learned, int d, Acc p, Acc sig, int offset, Acc* f, Acc* dmu,
                                           Acc* dsig) {
  AxisSummary<Acc> s{0, 0, Acc(0), Acc(0), Acc(0)};
  if (!learned) {
    f[0] = Acc(1);
    if (dmu) dmu[0] = Acc(0);
    if (dsig) dsig[0] = Acc(0);
    s.lo = 0, s.hi = 1, s.sum_f = Acc(1);
    return s;
  }
  const Acc mu = p + (Acc)offset;
  if (!(mu == mu) || !(sig == sig)) {  // NaN parameters poison the whole window, as in the reference
    for (int i = 0; i < d; ++i) {
      f[i] = mu + sig;
      if (dmu) dmu[i] = mu + sig;
      if (dsig) dsig[i] = mu + sig;
    }
    s.lo = 0, s.hi = d, s.sum_f = s.sum_dmu = s.sum_dsig = mu + sig;
    return s;
  }
  if (v == Version::kV0) {
    const Acc fl = acc_floor(mu);
    s.lo = s.hi = 0;
    if (!(fl >= Acc(-1) && fl <= (Acc)(d - 1))) return s;  // both taps outside
    const int i0 = (int)fl;
    s.lo = i0 < 0 ? 0 : i0;
    s.hi = i0 + 2 > d ? d : i0 + 2;
    for (int i = s.lo; i < s.hi; ++i) {  // the two bilinear taps, also where one weight is 0
      const Tap<Acc> tp = tap(v, i, mu, Acc(1), Acc(1));
      f[i] = tp.g;
      if (dmu) dmu[i] = tp.dmu;
      if (dsig) dsig[i] = Acc(0);
    }
    return s;
  }
  const Acc sgn_sig = acc_sign(sig);
  Acc fmax = Acc(0);
  if (v == Version::kGauss) {
    const Acc sigma = sigma_of(v, sig);
    // One reciprocal per element and axis (u within an ulp of torch's (i - mu) / sigma).
    const Acc inv = acc_div(Acc(1), sigma);
    // Exponents below `skip` are 0 without calling exp: under the largest exponent of the window
    // (at the grid point nearest mu) by more than ln(1 / tau) + 1 for any d < 1024, so those taps
    // are outside the support anyway and their mass is below rounding of the sums; and never
    // below exp's underflow to +0 (libm's slow path).
    const Acc nearest = mu < Acc(0) ? Acc(0) : (mu > (Acc)(d - 1) ? (Acc)(d - 1) : acc_floor(mu + Acc(0.5)));
    const Acc un = (nearest - mu) * inv;
    Acc skip = Acc(-0.5) * (un * un) - gauss_skip_margin<Acc>();
    skip = skip > exp_underflow<Acc>() ? skip : exp_underflow<Acc>();
    for (int i = 0; i < d; ++i) {
      const Acc u = ((Acc)i - mu) * inv;
      const Acc e = Acc(-0.5) * (u * u);
      const Tap<Acc> tp = gauss_tap(e > skip ? acc_exp(e) : Acc(0), u, inv);
      f[i] = tp.g;
      fmax = tp.g > fmax ? tp.g : fmax;
      s.sum_f += tp.g;
      if (dmu) {
        dmu[i] = tp.dmu;
        s.sum_dmu += dmu[i];
      }
      if (dsig) {
        dsig[i] = tp.dsig * sgn_sig;
        s.sum_dsig += dsig[i];
      }
    }
    const Acc thr = fmax * gauss_tau<Acc>(d);
    int lo = d, hi = 0;
    for (int i = 0; i < d; ++i) {
      if (f[i] > Acc(0) && f[i] >= thr) {
        lo = i < lo ? i : lo;
        hi = i + 1;
      }
    }
    s.lo = lo < hi ? lo : 0;
    s.hi = lo < hi ? hi : 0;
    return s;
  }
  // v1 (sigma 1) and max (sigma |SIG| + 1): triangle of half-width sigma, zero outside
  // (mu - sigma, mu + sigma): only that range is visited (the sums over the window are the same).
  const bool is_max = v == Version::kMax;
  const Acc sigma = sigma_of(v, sig);
  s.lo = s.hi = 0;
  const Acc from = mu - sigma, to = mu + sigma;
  if (!(to >= Acc(0) && from <= (Acc)(d - 1))) return s;  // the triangle misses the window
  const int i0 = from > Acc(0) ? (int)acc_floor(from) : 0;
  const int i1 = to < (Acc)(d - 1) ? (int)acc_floor(to) + 1 : d - 1;  // inclusive
  int lo = d, hi = 0;
  for (int i = i0; i <= i1; ++i) {
    const Tap<Acc> tp = tap(v, i, mu, sigma, Acc(1));
    f[i] = tp.g;
    s.sum_f += tp.g;
    if (tp.g > Acc(0)) {
      lo = i < lo ? i : lo;
      hi = i + 1;
    }
    if (dmu) {
      dmu[i] = tp.dmu;
      s.sum_dmu += dmu[i];
    }
    if (dsig) {
      dsig[i] = is_max ? tp.dsig * sgn_sig : Acc(0);
      s.sum_dsig += dsig[i];
    }
  }
  s.lo = lo < hi ? lo : 0;
  s.hi = lo < hi ? hi : 0;
  return s;
}

// The normaliser's denominator S + 1e-7 (v0: 1, no normalisation).
template <typename Acc>
TROUS_INLINE Acc element_norm(const ConvGeom& g, const AxisSummary<Acc>* ax) {
  if (!g.normalised()) return Acc(1);
  return ax[0].sum_f * ax[1].sum_f * ax[2].sum_f + Acc(1e-7);
}

// Gradients of one element from the channel's kernel gradient G (window layout [dks0][dks1][dks2],
// read only inside the element's support box). f / dmu / dsig hold the element's profiles, axis j
// starting at g.axis_base(j). Returns dL/dw and, per internal axis, dL/dP[prow] and dL/dSIG[prow].
template <typename Acc, typename GT>
TROUS_INLINE void element_grads(const ConvGeom& g, const Acc* f, const Acc* dmu, const Acc* dsig,
                                const AxisSummary<Acc>* ax, Acc w, const GT* G, Acc* gw, Acc* gmu, Acc* gsig) {
  const Acc* fz = f + g.axis_base(0);
  const Acc* fy = f + g.axis_base(1);
  const Acc* fx = f + g.axis_base(2);
  const Acc* mz = dmu + g.axis_base(0);
  const Acc* my = dmu + g.axis_base(1);
  const Acc* mx = dmu + g.axis_base(2);
  const Acc* sz = dsig + g.axis_base(0);
  const Acc* sy = dsig + g.axis_base(1);
  const Acc* sx = dsig + g.axis_base(2);
  Acc A = 0, Tmu[kAxes] = {0, 0, 0}, Tsig[kAxes] = {0, 0, 0};
  for (int z = ax[0].lo; z < ax[0].hi; ++z) {
    for (int y = ax[1].lo; y < ax[1].hi; ++y) {
      const GT* row = G + ((index_t)z * g.dks[1] + y) * g.dks[2];
      Acc rx = 0, rm = 0, rs = 0;
      for (int x = ax[2].lo; x < ax[2].hi; ++x) {
        const Acc gv = (Acc)row[x];
        rx += gv * fx[x];
        rm += gv * mx[x];
        rs += gv * sx[x];
      }
      const Acc fzy = fz[z] * fy[y];
      A += fzy * rx;
      Tmu[2] += fzy * rm;
      Tsig[2] += fzy * rs;
      Tmu[1] += fz[z] * my[y] * rx;
      Tsig[1] += fz[z] * sy[y] * rx;
      Tmu[0] += mz[z] * fy[y] * rx;
      Tsig[0] += sz[z] * fy[y] * rx;
    }
  }
  if (!g.normalised()) {
    *gw = A;
    TROUS_DCLS_UNROLL
    for (int j = 0; j < kAxes; ++j) {
      gmu[j] = w * Tmu[j];
      gsig[j] = Acc(0);
    }
    return;
  }
  const Acc n = element_norm(g, ax);
  *gw = acc_div(A, n);
  const Acc wa_n2 = acc_div(w * A, n * n);
  TROUS_DCLS_UNROLL
  for (int j = 0; j < kAxes; ++j) {
    Acc others = Acc(1);
    TROUS_DCLS_UNROLL
    for (int i = 0; i < kAxes; ++i) others = i == j ? others : others * ax[i].sum_f;
    gmu[j] = acc_div(w * Tmu[j], n) - wa_n2 * others * ax[j].sum_dmu;
    gsig[j] = acc_div(w * Tsig[j], n) - wa_n2 * others * ax[j].sum_dsig;
  }
}

// Parameter pointers as the kernels read them: fp32 (fp64 on CPU for gradcheck), contiguous,
// weight [C, kc], P / SIG [ndim, C, kc] (SIG null for v0 / v1).
template <typename Acc>
struct Params {
  const Acc* w;
  const Acc* P;
  const Acc* SIG;
  const Acc* bias;  // [C] or null
};

// Gradient outputs, same layouts as Params (gSIG null for v0 / v1).
template <typename Acc>
struct ParamGrads {
  Acc* gw;
  Acc* gP;
  Acc* gSIG;
};

// Builds the profiles of element k of channel c: f (and dmu / dsig when not null) each g.dsum()
// long, axis j at g.axis_base(j); ax gets the 3 summaries. Returns the coefficient w / norm.
template <typename Acc>
TROUS_INLINE AxisSummary<Acc> element_axis(const ConvGeom& g, const Params<Acc>& p, index_t ck, int j, Acc* f, Acc* dmu,
                                           Acc* dsig, bool poisoned) {
  const int r = g.prow[j];
  const index_t row_stride = g.C * g.kc;
  const Acc pv = r >= 0 ? (poisoned ? acc_nan<Acc>() : p.P[r * row_stride + ck]) : Acc(0);
  const Acc sv = (r >= 0 && p.SIG) ? p.SIG[r * row_stride + ck] : Acc(0);
  const int base = g.axis_base(j);
  return axis_profile<Acc>(g.version, r >= 0, g.dks[j], pv, sv, g.offset[j], f + base, dmu ? dmu + base : nullptr,
                           dsig ? dsig + base : nullptr);
}

// Builds the profiles of element k of channel c: f (and dmu / dsig when not null) each g.dsum()
// long, axis j at g.axis_base(j); ax gets the 3 summaries. Returns the coefficient w / norm.
// An element with a non-finite weight or a poisoning P / SIG (params.h) gets NaN profiles over the
// whole window on every learned axis (axis_profile's NaN path, fed a NaN position), so its channel's
// window is NaN everywhere and every output is NaN.
template <typename Acc>
TROUS_INLINE bool element_poisoned(const ConvGeom& g, const Params<Acc>& p, index_t ck) {
  if (!acc_finite(p.w[ck])) return true;
  const index_t row_stride = g.C * g.kc;
  bool bad = false;
  TROUS_DCLS_UNROLL
  for (int j = 0; j < kAxes; ++j) {
    const int r = g.prow[j];
    if (r < 0) continue;
    const Acc pv = p.P[r * row_stride + ck];
    const Acc sv = p.SIG ? p.SIG[r * row_stride + ck] : Acc(0);
    bad = bad || axis_poisons(g.version, pv, sv);
  }
  return bad;
}

template <typename Acc>
TROUS_INLINE Acc element_profiles(const ConvGeom& g, const Params<Acc>& p, index_t c, int k, Acc* f, Acc* dmu,
                                  Acc* dsig, AxisSummary<Acc>* ax) {
  const index_t ck = c * g.kc + k;
  const bool poisoned = element_poisoned(g, p, ck);
  ax[0] = element_axis<Acc>(g, p, ck, 0, f, dmu, dsig, poisoned);
  ax[1] = element_axis<Acc>(g, p, ck, 1, f, dmu, dsig, poisoned);
  ax[2] = element_axis<Acc>(g, p, ck, 2, f, dmu, dsig, poisoned);
  return acc_div(p.w[ck], element_norm(g, ax));
}

}  // namespace dcls
}  // namespace trous
