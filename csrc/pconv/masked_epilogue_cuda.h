// Torch-free declarations of the mask-aware partial convolution epilogue's CUDA launchers (kernels:
// masked_epilogue_kernels.cuh). `stream` is a cudaStream_t; pointers are device pointers.
#pragma once
#include "pconv/masked_epilogue.h"
#include "trous/dtype.h"

namespace trous {
namespace pconv {

constexpr index_t kMaskedMaxBlocks = 524280;
// Same arguments as cpu_masked_epilogue.
void launch_masked_epilogue(DType dtype, const void* raw, const void* S, const void* bias, void* out, void* new_mask,
                            const MaskedEpilogueArgs& a, void* stream, index_t max_blocks = kMaskedMaxBlocks);
// grad_raw and, when a.has_bias, grad_bias_partial: [chunks, C] fp32 (fp64 for fp64) partial sums, with
// chunks = masked_backward_chunks(a) (the caller sums over the chunks).
index_t masked_backward_chunks(const MaskedEpilogueArgs& a);
void launch_masked_epilogue_backward(DType dtype, const void* grad_out, const void* S, void* grad_raw,
                                     void* grad_bias_partial, const MaskedEpilogueArgs& a, void* stream);

}  // namespace pconv
}  // namespace trous
