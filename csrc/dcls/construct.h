// DCLS kernel construction arguments (../shared/spec/dcls.md), shared by the CPU kernels
// (construct_cpu.cpp), the CUDA kernels (construct_kernels.cuh) and the emulation tests; the profile
// math is params.h's. Torch-free.
//
// Every element k of a channel c contributes w[c, k] * prod_axes g_axis / D to the dense window:
// one 1-D profile g per axis (the construction is separable), D = prod_axes sum(g) + 1e-7 for
// v1 / max / gauss, D = 1 for v0. Windows are handled as 3-D (n0, n1, n2); a 1-D or 2-D window has
// leading axes of size 1 whose profile is the constant 1.
#pragma once
#include <math.h>

#include <cstdint>

#include "trous/common.h"
#include "dcls/params.h"

namespace trous {
namespace dcls {
// Nested: the direct convolution (conv.h) has its own names in trous::dcls.
namespace construct {

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

// Arguments of one construction; the axis quirks come from params.h.
inline ConstructArgs make_args(index_t channels, int kc, int ndim, const int64_t* dks, Version v) {
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
    a.axis[j] = lead + spatial_axis_of_p_row(ndim, v, j);
  }
  return a;
}

// Position and width of one element along one axis, from P[j] and SIG[j] (sig unused for v0 / v1).
template <typename A>
struct AxisParams {
  A mu, sigma, inv_sigma, sig_sign;  // sig_sign = dsigma / dSIG
};

template <typename A>
TROUS_INLINE AxisParams<A> axis_params(Version v, A p, A sig, int offset) {
  AxisParams<A> r;
  r.mu = p + A(offset);
  r.sigma = sigma_of(v, sig);
  r.inv_sigma = acc_div(A(1), r.sigma);
  r.sig_sign = has_sigma(v) ? acc_sign(sig) : A(0);
  return r;
}

}  // namespace construct
}  // namespace dcls
}  // namespace trous
