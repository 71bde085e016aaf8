// Torch-free declarations of the DCLS construction CUDA launchers (csrc/cuda/dcls.cu).
// `stream` is a cudaStream_t; pointers are device pointers; shapes were checked by the caller.
// Same layouts as dcls_cpu.h. Throws std::invalid_argument when one element's profiles do not fit
// in shared memory (window axes totalling more than ~1500 taps).
#pragma once
#include "trous/common.h"
#include "dcls/construct.h"

namespace trous {
namespace dcls {
namespace construct {

void launch_construct_forward(DType dtype, const void* weight, const void* P, const void* SIG, void* K,
                              const ConstructArgs& a, void* stream);

void launch_construct_backward(DType dtype, const void* grad_K, const void* weight, const void* P, const void* SIG,
                               void* grad_weight, void* grad_P, void* grad_SIG, const ConstructArgs& a, void* stream);

}  // namespace construct
}  // namespace dcls
}  // namespace trous
