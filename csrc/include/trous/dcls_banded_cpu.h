// Torch-free declarations of the banded grouped 1-D DCLS convolution CPU kernels (cpu/dcls_banded.cpp);
// math in dcls_banded.h. Everything is contiguous and in the accumulation type (float, or double for
// gradcheck): the op layer converts and pads.
#pragma once
#include "trous/common.h"
#include "trous/dcls_banded.h"

namespace trous {
namespace dcls {

// xp: [N, c_in, l_in + 2 pad], x zero-padded on both sides; out: [N, c_out, l_out]; bias may be null.
void cpu_banded_forward(const float* xp, const float* K, const int32_t* band, const float* bias, float* out,
                        const BandedGeom& g);
void cpu_banded_forward(const double* xp, const double* K, const int32_t* band, const double* bias, double* out,
                        const BandedGeom& g);

// Length of a row of the spread gradient gq: grad_out[t] sits at (dks - 1) + t * stride, zeros elsewhere.
inline index_t banded_spread_length(const BandedGeom& g) { return (index_t)g.l_in + 2 * g.pad + g.dks - 1; }

// gq: [N, c_out, banded_spread_length(g)] spread grad_out; grad_x: [N, c_in, l_in].
void cpu_banded_backward_input(const float* gq, const float* K, const int32_t* band, float* grad_x,
                               const BandedGeom& g);
void cpu_banded_backward_input(const double* gq, const double* K, const int32_t* band, double* grad_x,
                               const BandedGeom& g);

// grad_out: [N, c_out, l_out]; xp as in the forward; grad_K: [c_out, I, dks], every entry written.
void cpu_banded_backward_kernel(const float* grad_out, const float* xp, const int32_t* band, float* grad_K,
                                const BandedGeom& g);
void cpu_banded_backward_kernel(const double* grad_out, const double* xp, const int32_t* band, double* grad_K,
                                const BandedGeom& g);

}  // namespace dcls
}  // namespace trous
