// CUDA kernel of the channel-partial convolution (math: channel_partial.h). Torch-free.
//
// One thread per output element, grid-stride over the 64-bit flat index (n, c, h, w; w fastest, so a
// warp reads and writes consecutive columns): channels c < cp accumulate the cp x kh x kw window in
// fp32 (fp64 never: the op refuses it), the others copy x. One pass, no concat, no clone.
#pragma once
#include "pconv/channel_partial.h"
#include "trous/convert.cuh"

namespace trous {
namespace pconv {

template <typename T>
__global__ void channel_partial_conv2d_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                              T* __restrict__ out, ChannelPartialArgs a) {
  const index_t total = a.out_numel();
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    index_t n, c, h, w;
    unflatten(a, idx, n, c, h, w);
    const index_t o = n * a.os.n + c * a.os.c + h * a.os.h + w * a.os.w;
    if (c < a.cp) {
      const float v = channel_partial_point<float>(
          a, n, c, h, w, [&](index_t off) { return to_float(x[off]); }, [&](index_t i) { return to_float(weight[i]); });
      out[o] = from_float<T>(v);
    } else {
      out[o] = x[n * a.xs.n + c * a.xs.c + h * a.xs.h + w * a.xs.w];
    }
  }
}

}  // namespace pconv
}  // namespace trous
