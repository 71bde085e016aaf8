// CUDA launcher of the channel-partial convolution (kernel: channel_partial_kernels.cuh). No torch.
#include "trous/launch.cuh"
// (launch.cuh first: it brings the CUDA runtime and half types)
#include "pconv/channel_partial_cuda.h"
#include "pconv/channel_partial_kernels.cuh"

namespace trous {
namespace pconv {

void launch_channel_partial_conv2d(DType dtype, const void* x, const void* weight, void* out,
                                   const ChannelPartialArgs& a, void* stream, index_t max_blocks) {
  const index_t total = a.out_numel();
  if (total == 0) return;
  constexpr int kBlock = 256;
  // Grid-stride: at most max_blocks blocks; every thread loops over the rest (64-bit indices).
  const index_t want = ceil_div(total, kBlock);
  const index_t blocks = want < max_blocks ? want : max_blocks;
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH(static_cast<unsigned>(blocks), kBlock, 0, static_cast<cudaStream_t>(stream),
                 channel_partial_conv2d_kernel<T>)(static_cast<const T*>(x), static_cast<const T*>(weight),
                                                   static_cast<T*>(out), a);
  });
  check_launch("trous.channel_partial_conv2d");
}

}  // namespace pconv
}  // namespace trous
