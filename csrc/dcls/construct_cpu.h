// Torch-free declarations of the DCLS construction CPU kernels (csrc/cpu/dcls.cpp); same arguments
// as the CUDA launchers in dcls_cuda.h, so the op layer treats both devices alike.
// Layouts (contiguous): weight [C, kc], P and SIG [ndim, C, kc], K and grad_K [C, window].
#pragma once
#include "trous/common.h"
#include "dcls/construct.h"

namespace trous {
namespace dcls {
namespace construct {

// K = the dense kernel; SIG may be null for v0 / v1.
void cpu_construct_forward(DType dtype, const void* weight, const void* P, const void* SIG, void* K,
                           const ConstructArgs& a);

// grad_weight [C, kc], grad_P [ndim, C, kc] and, when SIG is not null, grad_SIG [ndim, C, kc], in one pass.
void cpu_construct_backward(DType dtype, const void* grad_K, const void* weight, const void* P, const void* SIG,
                            void* grad_weight, void* grad_P, void* grad_SIG, const ConstructArgs& a);

}  // namespace construct
}  // namespace dcls
}  // namespace trous
