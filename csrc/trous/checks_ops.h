// Helpers shared by every <family>_ops.cpp: dtype mapping, device dispatch, argument checks.
// Torch-dependent; never included by kernels.
#pragma once
#include <ATen/ATen.h>

#include "trous/common.h"
#ifdef TROUS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
// The statement only exists in builds with CUDA kernels (launchers are not linked otherwise).
#define TROUS_CUDA_ONLY(...) __VA_ARGS__
#else
#define TROUS_CUDA_ONLY(...)
#endif

namespace trous {

// The kernels' DType of a tensor's dtype; anything else is refused naming the argument.
inline DType float_dtype(at::ScalarType t, const char* op, const char* name, bool with_float64 = false) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble:
      if (with_float64) return DType::kFloat64;
      break;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, ", with_float64 ? "float64, " : "", "float16 or bfloat16, got ",
              t);
}

// Runs `cpu()` for CPU tensors or `cuda(stream)` (a cudaStream_t as void*) for CUDA tensors, on the
// current stream of the tensor's device. The CUDA callable must wrap its launcher in TROUS_CUDA_ONLY.
template <typename Cpu, typename Cuda>
void run_on_device(const at::Tensor& t, const char* op, Cpu&& cpu, Cuda&& cuda) {
  if (t.device().is_cuda()) {
#ifdef TROUS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(t.device());
    cuda(static_cast<void*>(at::cuda::getCurrentCUDAStream(t.device().index()).stream()));
#else
    (void)cuda;
    TORCH_CHECK(false, op, ": this trous build has no CUDA kernels (built without nvcc or with TROUS_CUDA=0)");
#endif
  } else {
    TORCH_CHECK(t.device().is_cpu(), op, ": unsupported device ", t.device());
    cpu();
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
}

}  // namespace trous
