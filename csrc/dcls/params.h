// DCLS parameters, written once for the construction, the direct convolution and the banded
// convolution, CPU and CUDA: the versions, the axis quirks of dcls 0.1.1, and the 1-D profile of one
// kernel element along one axis (its taps and the tap range outside which they are exactly 0).
// Torch-free. Semantics: ../shared/spec/dcls.md.
//
// One element of a kernel has a weight w, per learnable axis a position P (mu = P + dks // 2) and,
// for max / gauss, a width SIG. Its profile along an axis of n taps is
//   v0    g(t) = 1 - frac(mu) at t = floor(mu), frac(mu) at floor(mu) + 1 (bilinear, no normalisation)
//   v1    g(t) = relu(1 - |t - mu|)
//   max   g(t) = relu(sigma - |t - mu|),            sigma = |SIG| + 1
//   gauss g(t) = exp(-0.5 ((t - mu) / sigma)^2),     sigma = |SIG| + 0.27
// and the element's dense footprint is w * prod_axes g / (prod_axes sum(g) + 1e-7) (v0: w * prod g).
#pragma once
#include <math.h>

#include "trous/common.h"

namespace trous {
namespace dcls {

enum class Version : int { kV0 = 0, kV1 = 1, kMax = 2, kGauss = 3 };

// The names the op layer accepts, in Version order, and the list its error message quotes.
constexpr const char* kVersionNames[] = {"v0", "v1", "max", "gauss"};
constexpr const char* kVersionList = "\"v0\", \"v1\", \"max\", \"gauss\"";

constexpr int kAxes = 3;  // kernels treat every window as 3-D; 1-D / 2-D windows lead with axes of size 1

TROUS_INLINE bool has_sigma(Version v) { return v == Version::kMax || v == Version::kGauss; }

// dcls 0.1.1's axis conventions (spec "Quirks"): the spatial axis (0 = the layer's first spatial
// axis) along which P row j moves, for a layer of ndim learnable axes. P row j is always offset by
// dilated_kernel_size[j] // 2, whatever axis it moves along.
//   2-D v1/max/gauss: P0 -> W, P1 -> H;            2-D v0: P0 -> H, P1 -> W;
//   3-D v1/max/gauss: P0 -> W, P1 -> H, P2 -> D;   3-D v0: P0 -> D, P1 -> W, P2 -> H.
TROUS_INLINE int spatial_axis_of_p_row(int ndim, Version v, int j) {
  if (ndim == 2) return v == Version::kV0 ? j : 1 - j;
  if (ndim == 3) return v == Version::kV0 ? (j == 0 ? 0 : 3 - j) : 2 - j;
  return 0;
}

// The P row that moves along spatial axis s (the inverse map).
TROUS_INLINE int p_row_of_spatial_axis(int ndim, Version v, int s) {
  for (int j = 0; j < ndim; ++j)
    if (spatial_axis_of_p_row(ndim, v, j) == s) return j;
  return -1;
}

// Scalar math that resolves to the float or double function on host and device alike.
template <typename A> TROUS_INLINE A acc_exp(A v);
template <> TROUS_INLINE float acc_exp<float>(float v) { return expf(v); }
template <> TROUS_INLINE double acc_exp<double>(double v) { return exp(v); }
template <typename A> TROUS_INLINE A acc_floor(A v);
template <> TROUS_INLINE float acc_floor<float>(float v) { return floorf(v); }
template <> TROUS_INLINE double acc_floor<double>(double v) { return floor(v); }
template <typename A> TROUS_INLINE A acc_abs(A v) { return v < A(0) ? -v : v; }
// torch's sign: sign(0) = 0, which is why abs() has a zero gradient at 0 (max's SIG never learns there).
template <typename A> TROUS_INLINE A acc_sign(A v) { return v > A(0) ? A(1) : (v < A(0) ? A(-1) : A(0)); }

// Division: exact on the host; on the GPU the fast reciprocal-multiply (2 ulp), since IEEE fp32
// division calls a slow-path subroutine whose register save spills (the build forbids local memory).
template <typename A> TROUS_INLINE A acc_div(A a, A b) { return a / b; }
#if defined(__CUDA_ARCH__)
template <> TROUS_INLINE float acc_div<float>(float a, float b) { return __fdividef(a, b); }
#endif

// sigma of max (|SIG| + 1) and gauss (|SIG| + 0.27), 1 for v0 / v1; dsigma / dSIG = sign(SIG).
template <typename A>
TROUS_INLINE A sigma_of(Version v, A sig) {
  return v == Version::kMax ? acc_abs(sig) + A(1) : (v == Version::kGauss ? acc_abs(sig) + A(0.27) : A(1));
}

// One tap of a profile and its derivatives with respect to mu and sigma (not SIG: callers apply
// sign(SIG)). Gradient conventions are torch's, so that gradients match the reference where it is
// not differentiable: relu'(0) = 0 and |x|'(0) = 0 (an integer mu has a zero v1 position gradient).
template <typename A>
struct Tap {
  A g, dmu, dsig;
};

// The gauss tap from g = exp(-z^2 / 2), z = (t - mu) / sigma (callers that skip negligible taps pass g = 0).
template <typename A>
TROUS_INLINE Tap<A> gauss_tap(A g, A z, A inv_sigma) {
  const A dmu = g * z * inv_sigma;
  return {g, dmu, dmu * z};
}

// Tap t of the profile of an element at mu of width sigma (inv_sigma = 1 / sigma, computed once per
// element and axis). NaN propagates as in torch.
template <typename A>
TROUS_INLINE Tap<A> tap(Version v, int t, A mu, A sigma, A inv_sigma) {
  const A d = A(t) - mu;
  if (v == Version::kGauss) {
    const A z = d * inv_sigma;
    return gauss_tap(acc_exp(A(-0.5) * z * z), z, inv_sigma);
  }
  Tap<A> r{A(0), A(0), A(0)};
  if (v == Version::kV0) {  // bilinear through floor: (1 - r) at floor(mu), r at floor(mu) + 1
    const A p = acc_floor(mu);
    if (A(t) == p) {
      r.g = A(1) - (mu - p);
      r.dmu = A(-1);
    } else if (A(t) == p + A(1)) {
      r.g = mu - p;
      r.dmu = A(1);
    }
    return r;
  }
  // v1 (sigma 1) and max: relu(sigma - |t - mu|)
  const A h = sigma - acc_abs(d);
  if (!(h <= A(0))) {
    r.g = h;
    r.dmu = acc_sign(d);
    r.dsig = A(1);
  }
  return r;
}

// Taps [lo, hi) of an axis of n taps outside which the profile and its derivatives are exactly 0
// (v0 / v1: at most 2 taps; max: the support, one tap of margin against rounding; gauss: the whole
// axis, which the direct convolution narrows to the taps above fp32 resolution). Non-finite
// positions take the whole axis so that the formulas propagate NaN as the reference does.
template <typename A>
TROUS_INLINE void tap_range(Version v, A mu, A sigma, int n, int& lo, int& hi) {
  A l, h;
  if (v == Version::kV0 || v == Version::kV1) {
    // v1: |t - mu| < 1 only for t in {floor(mu), floor(mu) + 1}, also after rounding (monotone).
    l = acc_floor(mu);
    h = l + A(2);
  } else if (v == Version::kMax) {
    l = acc_floor(mu - sigma);
    h = acc_floor(mu + sigma) + A(2);
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

// Non-finite parameters (issue 9): an element "poisons" its channel when the reference's formula
// gives NaN over the element's whole window: a NaN P (or, for max / gauss, a NaN SIG) on any axis,
// an infinite P for v0 (mu - floor(mu) = inf - inf), an infinite SIG for max (inf / inf in the
// normalisation), an infinite P and SIG on the same axis for gauss ((t - mu) / sigma = inf / inf), or
// a non-finite weight (the reference gives NaN where the profile is 0 and +-inf on its support; the
// kernels give NaN throughout). A poisoned element makes every tap of its channel's window NaN, so
// that the constructed kernel, the direct convolution (every output of the channel) and the banded
// one are NaN there. Other infinite positions move the element out of the window (it contributes
// 0, as in the reference), and an infinite gauss SIG spreads it uniformly (as in the reference).
template <typename A> TROUS_INLINE bool acc_finite(A v) { return v - v == A(0); }

template <typename A>
TROUS_INLINE bool axis_poisons(Version v, A p, A sig) {
  if (!(p == p)) return true;
  if (!has_sigma(v)) return v == Version::kV0 && !acc_finite(p);
  if (!(sig == sig)) return true;
  if (v == Version::kMax) return !acc_finite(sig);
  return !acc_finite(p) && !acc_finite(sig);  // gauss
}

// The NaN that a poisoned element writes (math.h's nanf / nan exist on host and device alike).
template <typename A> TROUS_INLINE A acc_nan();
template <> TROUS_INLINE float acc_nan<float>() { return nanf(""); }
template <> TROUS_INLINE double acc_nan<double>() { return nan(""); }

// Denominator of the normalisation from the product of the profile sums (v0: none).
template <typename A>
TROUS_INLINE A norm_denominator(Version v, A sum_product) {
  return v == Version::kV0 ? A(1) : sum_product + A(1e-7);
}

}  // namespace dcls
}  // namespace trous
