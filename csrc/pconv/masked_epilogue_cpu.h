// CPU kernels of the mask-aware partial convolution's epilogue (math: masked_epilogue.h); same
// arguments as the CUDA launchers.
#pragma once
#include "pconv/masked_epilogue.h"
#include "trous/dtype.h"

namespace trous {
namespace pconv {

// raw, out: [N, C, P] with the strides of `a`; S: fp32 (fp64 for fp64) contiguous [Ns, G, P]; bias:
// [C] of raw's dtype or null; new_mask: [Ns, G, P] of raw's dtype.
void cpu_masked_epilogue(DType dtype, const void* raw, const void* S, const void* bias, void* out, void* new_mask,
                         const MaskedEpilogueArgs& a);
// grad_raw (strides of `a`, like grad_out) and, when a.has_bias, grad_bias_partial: [N, C] fp32 (fp64
// for fp64) partial sums over P (the caller sums over N).
void cpu_masked_epilogue_backward(DType dtype, const void* grad_out, const void* S, void* grad_raw,
                                  void* grad_bias_partial, const MaskedEpilogueArgs& a);

}  // namespace pconv
}  // namespace trous
