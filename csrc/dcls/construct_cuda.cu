// Launchers of the DCLS construction kernels: raw pointers and a stream, no torch headers.
#include "trous/launch.cuh"
#include "dcls/construct_cuda.h"
#include "dcls/construct_kernels.cuh"

namespace trous {
namespace dcls {
namespace construct {
namespace {

void check_plan(const Plan& p, const ConstructArgs& a, const char* what) {
  if (!p.ok)
    throw std::invalid_argument(std::string(what) + ": unsupported on CUDA: the profiles of one kernel element (" +
                                std::to_string(a.taps()) + " taps over all axes) must fit in " +
                                std::to_string(kSmemBudget) + " bytes of shared memory and the window (" +
                                std::to_string(a.window()) + " taps) in 65535 tiles");
}

}  // namespace

void launch_construct_forward(DType dtype, const void* weight, const void* P, const void* SIG, void* K,
                              const ConstructArgs& a, void* stream) {
  if (a.channels == 0 || a.window() == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const Plan plan = make_plan(a, kThreads, sizeof(A), true);
    check_plan(plan, a, "trous dcls_construct_kernel");
    const dim3 grid((unsigned)plan.blocks, (unsigned)plan.tiles);
    TROUS_LAUNCH(grid, kThreads, plan.smem, s, construct_forward<T, A>)(
        static_cast<const T*>(weight), static_cast<const T*>(P), static_cast<const T*>(SIG), static_cast<T*>(K), a,
        plan);
  });
  check_launch("trous dcls_construct_kernel");
}

void launch_construct_backward(DType dtype, const void* grad_K, const void* weight, const void* P, const void* SIG,
                               void* grad_weight, void* grad_P, void* grad_SIG, const ConstructArgs& a, void* stream) {
  if (a.channels == 0 || a.kc == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes, /*kWithFloat64=*/true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const Plan plan = make_plan(a, kThreads, sizeof(A), false);
    check_plan(plan, a, "trous dcls_construct_kernel_backward");
    TROUS_LAUNCH((unsigned)plan.blocks, kThreads, plan.smem, s, construct_backward<T, A>)(
        static_cast<const T*>(grad_K), static_cast<const T*>(weight), static_cast<const T*>(P),
        static_cast<const T*>(SIG), static_cast<T*>(grad_weight), static_cast<T*>(grad_P), static_cast<T*>(grad_SIG), a,
        plan);
  });
  check_launch("trous dcls_construct_kernel_backward");
}

}  // namespace construct
}  // namespace dcls
}  // namespace trous
