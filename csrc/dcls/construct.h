// DCLS kernel construction math (../shared/spec/dcls.md), shared by the CPU kernels (cpu/dcls.cpp),
// the CUDA kernels (dcls_kernels.cuh) and the emulation tests. Torch-free.
//
// Every element k of a channel c contributes w[c, k] * prod_axes g_axis / D to the dense window:
// one 1-D profile g per axis (the construction is separable), D = prod_axes sum(g) + 1e-7 for
// v1 / max / gauss, D = 1 for v0. Windows are handled as 3-D (n0, n1, n2); a 1-D or 2-D window has
// leading axes of size 1 whose profile is the constant 1.
#pragma once
#include <math.h>

#include <cstdint>

#include "trous/common.h"

namespace trous {
namespace dcls {
// Nested: the direct convolution (dcls_conv.h) has its own names in trous::dcls.
namespace construct {

enum class Version : int { kV0 = 0, kV1 = 1, kMax = 2, kGauss = 3 };

constexpr int kAxes = 3;

// v[i] for i in 0..2 written as selects: a dynamic index into a kernel-parameter array would make
// nvcc copy the array to local memory.
TROUS_INLINE int pick(const int (&v)[3], int i) { return i == 0 ? v[0] : (i == 1 ? v[1] : v[2]); }

struct ConstructArgs {
  index_t channels;   // C = out_channels * in_channels / groups: one window per channel
  int kc;             // kernel elements per channel
  int ndim;           // learnable axes = P.size(0), 1..3
  int size[kAxes];    // window (n0, n1, n2), row-major
  int axis[kAxes];    // window axis along which P[j] moves (j < ndim)
  int offset[kAxes];  // dilated_kernel_size[j] // 2, added to P[j] (whatever axis it moves along)
  Version version;

  TROUS_HOST_DEVICE index_t window() const { return (index_t)size[0] * size[1] * size[2]; }
  TROUS_HOST_DEVICE int taps() const { return size[0] + size[1] + size[2]; }  // profile entries per element
  TROUS_HOST_DEVICE int row_start(int ax) const { return ax == 0 ? 0 : (ax == 1 ? size[0] : size[0] + size[1]); }
  TROUS_HOST_DEVICE int n(int ax) const { return pick(size, ax); }
  TROUS_HOST_DEVICE int off(int j) const { return pick(offset, j); }
  // P index moving along window axis `ax`, or -1 for a padding axis.
  TROUS_HOST_DEVICE int p_index(int ax) const {
    return axis[0] == ax ? 0 : (ndim > 1 && axis[1] == ax ? 1 : (ndim > 2 && axis[2] == ax ? 2 : -1));
  }
};

// dcls 0.1.1's axis conventions (spec, "Quirks"): the window is dks[0] x ... x dks[ndim-1] and P[j]
// is offset by dks[j] // 2, but the axis P[j] moves along depends on the version:
//   2-D v1/max/gauss: P0 -> width, P1 -> height;   2-D v0: P0 -> height, P1 -> width;
//   3-D v1/max/gauss: P0 -> W, P1 -> H, P2 -> D;   3-D v0: P0 -> D, P1 -> W, P2 -> H.
inline ConstructArgs make_args(index_t channels, int kc, int ndim, const int64_t* dks, Version v) {
  static const int kV0Axis[kAxes][kAxes] = {{0, 0, 0}, {0, 1, 0}, {0, 2, 1}};
  static const int kV1Axis[kAxes][kAxes] = {{0, 0, 0}, {1, 0, 0}, {2, 1, 0}};
  ConstructArgs a{};
  a.channels = channels;
  a.kc = kc;
  a.ndim = ndim;
  a.version = v;
  const int lead = kAxes - ndim;
  for (int i = 0; i < kAxes; ++i) a.size[i] = 1, a.axis[i] = -1, a.offset[i] = 0;
  for (int j = 0; j < ndim; ++j) {
    a.size[lead + j] = (int)dks[j];
    a.offset[j] = (int)(dks[j] / 2);
    a.axis[j] = lead + (v == Version::kV0 ? kV0Axis : kV1Axis)[ndim - 1][j];
  }
  return a;
}

// Overloads that resolve to the float or double function on host and device alike.
TROUS_INLINE float floor_(float x) { return floorf(x); }
TROUS_INLINE double floor_(double x) { return floor(x); }
TROUS_INLINE float exp_(float x) { return expf(x); }
TROUS_INLINE double exp_(double x) { return exp(x); }
template <typename A> TROUS_INLINE A abs_(A x) { return x < A(0) ? -x : x; }
// torch's sign: sign(0) = 0, which is why abs() has a zero gradient at 0 (max's SIG never learns).
template <typename A> TROUS_INLINE A sign_(A x) { return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0)); }

TROUS_INLINE bool has_sigma(Version v) { return v == Version::kMax || v == Version::kGauss; }

// sigma of max (|SIG| + 1) and gauss (|SIG| + 0.27); dsigma / dSIG = sign(SIG).
template <typename A>
TROUS_INLINE A sigma_of(Version v, A sig) {
  return abs_(sig) + (v == Version::kMax ? A(1) : A(0.27));
}

// One tap t of a 1-D profile and its derivatives with respect to mu (= P + offset) and sigma.
// Gradient conventions are torch's, so that gradients match the reference where it is not
// differentiable: relu'(0) = 0 and |x|'(0) = 0 (an integer mu has a zero v1 position gradient).
template <typename A>
struct Tap {
  A g, dmu, dsig;
};

template <typename A>
TROUS_INLINE Tap<A> tap(Version v, int t, A mu, A sigma) {
  Tap<A> r{A(0), A(0), A(0)};
  const A d = A(t) - mu;
  if (v == Version::kV0) {  // bilinear through floor: (1 - r) at floor(mu), r at floor(mu) + 1
    const A p = floor_(mu);
    if (A(t) == p) {
      r.g = A(1) - (mu - p);
      r.dmu = A(-1);
    } else if (A(t) == p + A(1)) {
      r.g = mu - p;
      r.dmu = A(1);
    }
  } else if (v == Version::kGauss) {
    const A z = d / sigma;
    r.g = exp_(A(-0.5) * z * z);
    r.dmu = r.g * z / sigma;
    r.dsig = r.dmu * z;
  } else {  // v1 (sigma 1) and max: relu(sigma - |t - mu|); NaN propagates like torch.relu
    const A h = (v == Version::kV1 ? A(1) : sigma) - abs_(d);
    if (!(h <= A(0))) {
      r.g = h;
      r.dmu = sign_(d);
      r.dsig = A(1);
    }
  }
  return r;
}

// Taps [lo, hi) of an axis of n taps outside which the profile and its derivatives are exactly 0
// (v0 / v1: at most 2 taps; max: the support; gauss: the whole axis). Non-finite positions take
// the whole axis so that the formulas propagate NaN as the reference does.
template <typename A>
TROUS_INLINE void tap_range(Version v, A mu, A sigma, int n, int& lo, int& hi) {
  A l, h;
  if (v == Version::kV0 || v == Version::kV1) {
    // v1: |t - mu| < 1 only for t in {floor(mu), floor(mu) + 1}, also after rounding (monotone).
    l = floor_(mu);
    h = l + A(2);
  } else if (v == Version::kMax) {  // |t - mu| < sigma, one tap of margin against rounding
    l = floor_(mu - sigma);
    h = floor_(mu + sigma) + A(2);
  } else {
    l = A(0);
    h = A(n);
  }
  if (!(l == l) || !(h == h)) {
    lo = 0, hi = n;
    return;
  }
  lo = l <= A(0) ? 0 : (l >= A(n) ? n : (int)l);
  hi = h <= A(0) ? 0 : (h >= A(n) ? n : (int)h);
  if (hi < lo) hi = lo;
}

// Position and width of one element along one axis, from P[j] and SIG[j] (sig unused for v0 / v1).
template <typename A>
struct AxisParams {
  A mu, sigma, sig_sign;  // sig_sign = dsigma / dSIG
};

template <typename A>
TROUS_INLINE AxisParams<A> axis_params(Version v, A p, A sig, int offset) {
  AxisParams<A> r;
  r.mu = p + A(offset);
  r.sigma = has_sigma(v) ? sigma_of(v, sig) : A(1);
  r.sig_sign = has_sigma(v) ? sign_(sig) : A(0);
  return r;
}

// Denominator of the normalisation from the product of the profile sums (v0: none).
template <typename A>
TROUS_INLINE A norm_denominator(Version v, A sum_product) {
  return v == Version::kV0 ? A(1) : sum_product + A(1e-7);
}

}  // namespace construct
}  // namespace dcls
}  // namespace trous
