// Banded grouped 1-D convolution: the direct DCLS convolution of Dcls1d layers that are not depthwise
// (the SNN-delay case: groups 1, kernel_count 1, dks 25). Torch-free; shared by the CPU kernels
// (cpu/dcls_banded.cpp), the CUDA kernels (dcls_banded_kernels.cuh) and the emulation tests.
//
// The dense DCLS kernel K [C_out, I, dks] (I = C_in / groups) comes from the fused construction;
// band [C_out, I, 2] (int32 lo, hi) bounds the taps of each (out, in) row: every element's support
// lies in [lo, hi) (v0 / v1: at most 2 taps per element, gauss: the taps above fp32 resolution), so
// the convolution only visits hi - lo taps per row instead of dks:
//   out[n, o, t] = bias[o] + sum_{i < I} sum_{lo <= s < hi} K[o, i, s] x[n, g I + i, t stride + s - pad]
// with g = o / (C_out / groups) and x = 0 outside [0, L_in). Its gradients:
//   grad_x[n, g I + i, u] = sum_{o in group g} sum_{s in band(o, i), (u + pad - s) = t stride, 0 <= t < L_out}
//                           K[o, i, s] grad_out[n, o, t]
//   grad_K[o, i, s] = sum_{n, t} grad_out[n, o, t] x[n, g I + i, t stride + s - pad] inside the band, 0 outside.
#pragma once
#include "trous/common.h"

namespace trous {
namespace dcls {

struct BandedGeom {
  index_t N;
  int c_in, c_out, groups;  // I = c_in / groups inputs and c_out / groups outputs per group
  int l_in, l_out;          // l_out = (l_in + 2 pad - dks) / stride + 1
  int dks, stride, pad;

  TROUS_HOST_DEVICE int in_per_group() const { return c_in / groups; }
  TROUS_HOST_DEVICE int out_per_group() const { return c_out / groups; }
};

// The band of row (o, i), clamped to [0, dks] (lo > hi reads as empty): kernels never trust it for
// memory safety. The op layer checks it on the CPU.
TROUS_INLINE void band_of(const int32_t* band, const BandedGeom& g, index_t row, int& lo, int& hi) {
  lo = band[2 * row];
  hi = band[2 * row + 1];
  lo = lo < 0 ? 0 : (lo > g.dks ? g.dks : lo);
  hi = hi < lo ? lo : (hi > g.dks ? g.dks : hi);
}

}  // namespace dcls
}  // namespace trous
