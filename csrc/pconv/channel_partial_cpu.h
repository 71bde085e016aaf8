// CPU kernel of the channel-partial convolution: same arguments as the CUDA launcher.
#pragma once
#include "pconv/channel_partial.h"
#include "trous/common.h"

namespace trous {
namespace pconv {

// x, out: host pointers with the strides of `a`; weight: contiguous [cp, cp, kh, kw] of x's dtype.
void cpu_channel_partial_conv2d(DType dtype, const void* x, const void* weight, void* out, const ChannelPartialArgs& a);

}  // namespace pconv
}  // namespace trous
