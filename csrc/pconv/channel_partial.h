// Channel-partial convolution (FasterNet PConv), the math shared by the CPU and CUDA kernels.
// Torch-free.
//
//   out[n, c, h, w] = sum_{i < cp, a < kh, b < kw} W[c, i, a, b] * x[n, i, h + a*dh - ph, w + b*dw - pw]
//                                                          for c < cp ("same" zero padding, stride 1)
//   out[n, c, h, w] = x[n, c, h, w]                        for cp <= c < out_channels
//
// out_channels is C (the out-of-place op: conv + pass-through in one pass) or cp (only the convolved
// channels, for the in-place variant, which then copies them over x[:, :cp]). Strides are in elements
// and 64-bit (an activation can exceed 2^31 elements); the weight is contiguous [cp, cp, kh, kw].
#pragma once
#include "trous/common.h"

namespace trous {
namespace pconv {

struct Strides4 {
  index_t n, c, h, w;
};

struct ChannelPartialArgs {
  index_t N, C, H, W;    // x: [N, C, H, W]
  index_t cp;            // convolved channels (weight [cp, cp, kh, kw])
  index_t out_channels;  // C or cp
  int kh, kw, dh, dw;    // odd kernel size, dilation
  Strides4 xs, os;       // strides of x and out
  TROUS_INLINE int ph() const { return dh * (kh - 1) / 2; }
  TROUS_INLINE int pw() const { return dw * (kw - 1) / 2; }
  TROUS_INLINE index_t out_numel() const { return N * out_channels * H * W; }
};

// One convolved output value (c < cp), accumulated in Acc. `load(offset)` reads x at an element
// offset and converts it to Acc; weights are read through `wload(index)` (device-only callables on
// CUDA: the execution-space check is off for this host-device template).
#if defined(__CUDACC__) && !defined(TROUS_CUDA_EMULATION)
#pragma nv_exec_check_disable
#endif
template <typename Acc, typename Load, typename WLoad>
TROUS_INLINE Acc channel_partial_point(const ChannelPartialArgs& a, index_t n, index_t c, index_t h, index_t w,
                                       Load load, WLoad wload) {
  Acc acc = Acc(0);
  const int ph = a.ph(), pw = a.pw();
  for (index_t i = 0; i < a.cp; ++i) {
    const index_t base = n * a.xs.n + i * a.xs.c;
    const index_t wbase = (c * a.cp + i) * a.kh * a.kw;
    for (int r = 0; r < a.kh; ++r) {
      const index_t y = h + r * a.dh - ph;
      if (y < 0 || y >= a.H) continue;
      for (int s = 0; s < a.kw; ++s) {
        const index_t xx = w + s * a.dw - pw;
        if (xx < 0 || xx >= a.W) continue;
        acc += wload(wbase + r * a.kw + s) * load(base + y * a.xs.h + xx * a.xs.w);
      }
    }
  }
  return acc;
}

// Decomposes a flat output index (n, c, h, w, w fastest) into its coordinates.
TROUS_INLINE void unflatten(const ChannelPartialArgs& a, index_t idx, index_t& n, index_t& c, index_t& h, index_t& w) {
  w = idx % a.W;
  idx /= a.W;
  h = idx % a.H;
  idx /= a.H;
  c = idx % a.out_channels;
  n = idx / a.out_channels;
}

}  // namespace pconv
}  // namespace trous
