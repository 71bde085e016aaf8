// Torch-free declarations of the banded grouped 1-D DCLS convolution CPU kernels (banded_cpu.cpp);
// math in banded.h. Everything is contiguous and in the accumulation type (float, or double for
// gradcheck): the op layer converts. Padding (and the spreading of grad_out for the input gradient)
// happens per sample inside the kernels, in cache-sized scratch.
#pragma once
#include "trous/common.h"
#include "dcls/banded.h"

namespace trous {
namespace dcls {

// x: [N, c_in, l_in]; out: [N, c_out, l_out]; bias may be null.
void cpu_banded_forward(const float* x, const float* K, const int32_t* band, const float* bias, float* out,
                        const BandedGeom& g);
void cpu_banded_forward(const double* x, const double* K, const int32_t* band, const double* bias, double* out,
                        const BandedGeom& g);

// grad_out: [N, c_out, l_out]; x: [N, c_in, l_in]; grad_x: [N, c_in, l_in] and grad_K:
// [c_out, I, dks] (every entry written, zero outside the bands), each skipped when null. One call
// for both: the kernels share the repacked grad_out.
void cpu_banded_backward(const float* grad_out, const float* x, const float* K, const int32_t* band, float* grad_x,
                         float* grad_K, const BandedGeom& g);
void cpu_banded_backward(const double* grad_out, const double* x, const double* K, const int32_t* band, double* grad_x,
                         double* grad_K, const BandedGeom& g);

// Whether a forward of this batch, stride and input dtype runs the batch-lane kernels (16 samples per
// AVX-512 vector): the decision the kernels take, read by the Python cost model through
// trous::dcls_banded_uses_batch_lanes.
bool cpu_banded_uses_batch_lanes(index_t batch, int stride, DType x_dtype);

}  // namespace dcls
}  // namespace trous
