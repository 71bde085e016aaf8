// Helpers shared by every <family>_ops.cpp: dtype mapping, device dispatch, argument checks.
// Torch-dependent; never included by kernels.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>

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
// current stream of the tensor's device; nothing for meta tensors. The CUDA callable must wrap its
// launcher in TROUS_CUDA_ONLY.
//
// Every op registers one function for CPU, CUDA and Meta: it validates (reading only sym_sizes,
// sym_strides, dtypes and devices, so that symbolic shapes of torch.compile pass), allocates its
// outputs with at::empty_symint, and returns them before touching data when they are meta. The
// fake kernel is then the real kernel's own validation: it refuses what the real kernel refuses,
// with the same message.
template <typename Cpu, typename Cuda>
void run_on_device(const at::Tensor& t, const char* op, Cpu&& cpu, Cuda&& cuda) {
  if (t.is_meta()) return;
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

// An op's tensor arguments by name; an undefined (absent optional) tensor is skipped.
struct NamedTensor {
  const char* name;
  const at::Tensor& t;
};

inline const at::Tensor& defined_or_empty(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

// Every defined tensor on one device. Must run first in every op: a meta tensor among CPU or CUDA
// ones sends the call to the Meta kernel, which would otherwise return uninitialised memory on the
// wrong device. The error names a tensor that is not on the device most of them share (the first
// tensor's device on a tie).
inline void check_devices(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor* first = nullptr;
  bool all_same = true;
  for (const NamedTensor& a : tensors) {
    if (!a.t.defined()) continue;
    if (first == nullptr) first = &a;
    all_same = all_same && a.t.device() == first->t.device();
  }
  if (all_same) return;
  const auto count = [&](const c10::Device& d) {
    int n = 0;
    for (const NamedTensor& a : tensors) n += a.t.defined() && a.t.device() == d;
    return n;
  };
  const NamedTensor* ref = first;
  for (const NamedTensor& a : tensors) {
    if (a.t.defined() && count(a.t.device()) > count(ref->t.device())) ref = &a;
  }
  for (const NamedTensor& a : tensors) {
    if (!a.t.defined() || a.t.device() == ref->t.device()) continue;
    TORCH_CHECK(false, op, ": ", a.name, " must be on the device of ", ref->name, " (", ref->t.device(), "), got ",
                a.t.device());
  }
}

// Autograd kernel of an op with no derivative: refuses, naming the argument, any tensor input that
// requires grad while grad mode is on (instead of an output whose backward silently skips it), then
// runs the op below autograd. Register with TROUS_NO_AUTOGRAD(m, "op_name") in a
// registration block of the Autograd key.
void refuse_grad_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);
#define TROUS_NO_AUTOGRAD(m, name) \
  (m).impl(name, torch::CppFunction::makeFromBoxedFunction<&::trous::refuse_grad_kernel>())

}  // namespace trous
