// CUDA launchers of the mask-aware partial convolution's epilogue (kernels: masked_epilogue_kernels.cuh).
// No torch.
#include "trous/launch.cuh"
// (launch.cuh first: it brings the CUDA runtime and half types)
#include "pconv/masked_epilogue_cuda.h"
#include "pconv/masked_epilogue_kernels.cuh"

namespace trous {
namespace pconv {

void launch_masked_epilogue(DType dtype, const void* raw, const void* S, const void* bias, void* out, void* new_mask,
                            const MaskedEpilogueArgs& a, void* stream, index_t max_blocks) {
  const index_t total = a.numel();
  if (total == 0) return;
  const index_t want = ceil_div(total, kMaskedBlock);
  const index_t blocks = want < max_blocks ? want : max_blocks;
  dispatch_dtype<CudaTypes, true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    TROUS_LAUNCH(static_cast<unsigned>(blocks), kMaskedBlock, 0, static_cast<cudaStream_t>(stream),
                 masked_epilogue_kernel<T, Acc>)(static_cast<const T*>(raw), static_cast<const Acc*>(S),
                                                 static_cast<const T*>(bias), static_cast<T*>(out),
                                                 static_cast<T*>(new_mask), a);
  });
  check_launch("trous.masked_partial_epilogue");
}

index_t masked_backward_chunks(const MaskedEpilogueArgs& a) {
  const index_t want = ceil_div(a.N * a.P, kMaskedBlock);
  const index_t cap = ceil_div(65536, a.C > 0 ? a.C : 1);
  const index_t c = want < cap ? want : cap;
  return c > 0 ? c : 1;
}

void launch_masked_epilogue_backward(DType dtype, const void* grad_out, const void* S, void* grad_raw,
                                     void* grad_bias_partial, const MaskedEpilogueArgs& a, void* stream) {
  if (a.numel() == 0) return;
  const index_t chunks = masked_backward_chunks(a);
  dispatch_dtype<CudaTypes, true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    TROUS_LAUNCH(static_cast<unsigned>(chunks * a.C), kMaskedBlock, 0, static_cast<cudaStream_t>(stream),
                 masked_epilogue_backward_kernel<T, Acc>)(static_cast<const T*>(grad_out), static_cast<const Acc*>(S),
                                                          static_cast<T*>(grad_raw),
                                                          static_cast<Acc*>(grad_bias_partial), a, chunks);
  });
  check_launch("trous.masked_partial_epilogue_backward");
}

}  // namespace pconv
}  // namespace trous
