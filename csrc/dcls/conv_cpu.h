// Torch-free declarations of the direct depthwise DCLS convolution CPU kernels (cpu/dcls_conv.cpp).
// Tensors are contiguous: x / out / grad_out / grad_x [N, C, D, H, W] of `dtype` (1-D / 2-D layers
// use leading sizes of 1). Parameters and their gradients are contiguous in the accumulation type:
// double for kFloat64, float otherwise (weight [C, kc], P / SIG [ndim, C, kc], bias [C]).
#pragma once
#include "trous/common.h"
#include "dcls/conv.h"

namespace trous {
namespace dcls {

// Parameter pointers whose element type is the accumulation type of the call.
struct RawParams {
  const void* w;
  const void* P;
  const void* SIG;   // null for v0 / v1
  const void* bias;  // null without bias
};

struct RawGrads {
  void* gw;  // null: no parameter gradients
  void* gP;
  void* gSIG;  // null for v0 / v1
};

void cpu_forward(DType dtype, const void* x, void* out, const ConvGeom& g, const RawParams& p);

// grad_x null: no input gradient; gr.gw null: no parameter gradients.
void cpu_backward(DType dtype, const void* grad_out, const void* x, void* grad_x, const ConvGeom& g, const RawParams& p,
                  const RawGrads& gr);

// Number of taps (support size of the dense window) of every channel, for cost models and tests.
void cpu_tap_counts(DType dtype, const ConvGeom& g, const RawParams& p, int32_t* counts);

}  // namespace dcls
}  // namespace trous
