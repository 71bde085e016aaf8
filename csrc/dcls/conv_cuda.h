// Torch-free declarations of the direct depthwise DCLS convolution CUDA launchers (cuda/dcls_conv.cu).
// `stream` is a cudaStream_t; pointers are device pointers; shapes were checked by the caller.
// x / out / grad_out / grad_x: contiguous [N, C, D, H, W] of `dtype`; parameters and their gradients
// fp32 contiguous (weight [C, kc], P / SIG [ndim, C, kc], bias [C]).
#pragma once
#include <cstddef>

#include "trous/common.h"
#include "dcls/conv.h"

namespace trous {
namespace dcls {

// Shared memory the kernels need for this geometry, and whether the current device provides it.
size_t cuda_smem_bytes(const ConvGeom& g);
bool cuda_geometry_supported(const ConvGeom& g);

// Workspace (fp32 elements) the backward pass needs for the parameter gradients.
size_t cuda_backward_workspace(const ConvGeom& g);

void launch_forward(DType dtype, const void* x, void* out, const ConvGeom& g, const Params<float>& p, void* stream);

// grad_x null: no input gradient; gr.gw null: no parameter gradients (workspace may then be null).
void launch_backward(DType dtype, const void* grad_out, const void* x, void* grad_x, const ConvGeom& g,
                     const Params<float>& p, const ParamGrads<float>& gr, float* workspace, void* stream);

}  // namespace dcls
}  // namespace trous
