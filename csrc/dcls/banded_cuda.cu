// Launchers of the banded grouped 1-D DCLS convolution kernels: raw pointers and a stream, no torch.
#include "trous/launch.cuh"
#include "dcls/banded_cuda.h"
#include "dcls/banded_kernels.cuh"

namespace trous {
namespace dcls {
namespace {

// One thread per work item, capped: the kernels' grid-stride loops cover the rest.
unsigned blocks_for(index_t work) {
  const index_t b = ceil_div(work, (index_t)banded::kThreads);
  return (unsigned)(b < (index_t)banded::kMaxBlocks ? b : (index_t)banded::kMaxBlocks);
}

}  // namespace

void launch_banded_forward(DType dtype, const void* x, const float* K, const int32_t* band, const float* bias,
                           void* out, const BandedGeom& g, void* stream) {
  const index_t total = g.N * g.c_out * g.l_out;
  if (total <= 0) return;  // a zero-block grid is an invalid launch
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH(blocks_for(total), banded::kThreads, 0, s, banded::forward_kernel<T>)(
        static_cast<const T*>(x), K, band, bias, static_cast<T*>(out), g);
  });
  check_launch("trous dcls_banded forward");
}

void launch_banded_backward_input(DType dtype, const void* grad_out, const float* K, const int32_t* band, void* grad_x,
                                  const BandedGeom& g, void* stream) {
  const index_t total = g.N * g.c_in * g.l_in;
  if (total <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH(blocks_for(total), banded::kThreads, 0, s, banded::backward_input_kernel<T>)(
        static_cast<const T*>(grad_out), K, band, static_cast<T*>(grad_x), g);
  });
  check_launch("trous dcls_banded backward (input)");
}

void launch_banded_backward_kernel(DType dtype, const void* grad_out, const void* x, const int32_t* band, float* grad_K,
                                   const BandedGeom& g, void* stream) {
  // Launched even when N * l_out == 0: the kernel then writes the zeros grad_K must hold.
  const index_t rows = (index_t)g.c_out * g.in_per_group();
  if (rows <= 0 || g.dks <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = (unsigned)(rows < (index_t)banded::kMaxBlocks ? rows : (index_t)banded::kMaxBlocks);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH(blocks, banded::kThreads, 0, s, banded::backward_kernel_kernel<T>)(
        static_cast<const T*>(grad_out), static_cast<const T*>(x), band, grad_K, g);
  });
  check_launch("trous dcls_banded backward (kernel)");
}

}  // namespace dcls
}  // namespace trous
