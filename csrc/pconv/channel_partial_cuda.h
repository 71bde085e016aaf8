// Torch-free declaration of the channel-partial convolution's CUDA launcher.
// `stream` is a cudaStream_t; pointers are device pointers; shapes were checked by the caller.
#pragma once
#include "pconv/channel_partial.h"
#include "trous/common.h"

namespace trous {
namespace pconv {

// max_blocks caps the grid (threads then loop over the rest); the tests lower it to exercise the loop.
constexpr index_t kChannelPartialMaxBlocks = 524280;
void launch_channel_partial_conv2d(DType dtype, const void* x, const void* weight, void* out,
                                   const ChannelPartialArgs& a, void* stream,
                                   index_t max_blocks = kChannelPartialMaxBlocks);

}  // namespace pconv
}  // namespace trous
