// Torch-free declarations of the banded grouped 1-D DCLS convolution CUDA launchers
// (cuda/dcls_banded.cu); math and layouts in dcls_banded.h. Device pointers, `stream` a cudaStream_t.
// x / out / grad_out / grad_x: contiguous [N, C, L] of `dtype`; K / grad_K fp32 [c_out, I, dks];
// band int32 [c_out, I, 2]; bias fp32 [c_out] or null.
#pragma once
#include "trous/common.h"
#include "dcls/banded.h"

namespace trous {
namespace dcls {

void launch_banded_forward(DType dtype, const void* x, const float* K, const int32_t* band, const float* bias,
                           void* out, const BandedGeom& g, void* stream);

void launch_banded_backward_input(DType dtype, const void* grad_out, const float* K, const int32_t* band, void* grad_x,
                                  const BandedGeom& g, void* stream);

// Writes every entry of grad_K (zeros outside the bands).
void launch_banded_backward_kernel(DType dtype, const void* grad_out, const void* x, const int32_t* band, float* grad_K,
                                   const BandedGeom& g, void* stream);

}  // namespace dcls
}  // namespace trous
