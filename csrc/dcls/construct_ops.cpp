// DCLS kernel-construction ops: argument checks, dtype mapping, and the call into the CPU kernel or
// the CUDA launcher on the current stream. Schemas are in ops.cpp; semantics are dcls 0.1.1's
// ConstructKernel{1,2,3}d, axis quirks included (trous/dcls.h, make_args).
#include <torch/library.h>

#include <string>
#include <vector>

#include "trous/checks_ops.h"
#include "dcls/construct.h"
#include "dcls/params_ops.h"
#include "dcls/construct_cpu.h"
#ifdef TROUS_WITH_CUDA
#include "dcls/construct_cuda.h"
#endif

namespace trous {
namespace dcls {
namespace construct {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& weight, at::IntArrayRef shape, const char* op, const char* name,
                const char* shape_text) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_text, " = ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " must have the dtype of weight (",
              weight.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, weight, op, name);
}

struct Inputs {
  at::Tensor weight, P, SIG;  // contiguous; SIG undefined when not given
  ConstructArgs args;
  DType dtype;
  std::vector<int64_t> kernel_shape;  // [O, I / groups, *dilated_kernel_size]
};

Inputs check_inputs(const char* op, const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                    at::IntArrayRef dks, c10::string_view version) {
  const Version v = parse_version(version, op);
  const int64_t ndim = (int64_t)dks.size();
  TORCH_CHECK(ndim >= 1 && ndim <= 3, op, ": dilated_kernel_size must have 1, 2 or 3 entries, got ", dks);
  int64_t window = 1;
  for (int64_t j = 0; j < ndim; ++j) {
    TORCH_CHECK(dks[j] >= 1, op, ": dilated_kernel_size[", j, "] must be >= 1, got ", dks);
    window *= dks[j];
    TORCH_CHECK(window <= INT32_MAX, op, ": the dilated kernel window ", dks, " has more than 2^31 - 1 taps");
  }
  TORCH_CHECK(weight.dim() == 3, op,
              ": weight must have shape [out_channels, in_channels / groups, kernel_count], got ", weight.sizes());
  const DType dt = float_dtype(weight.scalar_type(), op, "weight", /*with_float64=*/true);
  const int64_t O = weight.size(0), I = weight.size(1), kc = weight.size(2);
  TORCH_CHECK(kc <= INT32_MAX, op, ": kernel_count must be < 2^31, got ", kc);
  const std::vector<int64_t> p_shape{ndim, O, I, kc};
  check_like(P, weight, p_shape, op, "P",
             "[len(dilated_kernel_size), out_channels, in_channels / groups, kernel_count]");
  const bool has_sig = SIG.has_value() && SIG->defined();
  TORCH_CHECK(has_sig || !has_sigma(v), op, ": SIG is required for version \"", std::string(version),
              "\" (it is only optional for v0 / v1), got None");
  if (has_sig) check_like(*SIG, weight, p_shape, op, "SIG", "P.shape");
  Inputs in;
  in.weight = weight.contiguous();
  in.P = P.contiguous();
  if (has_sig) in.SIG = SIG->contiguous();
  in.dtype = dt;
  in.args = make_args(O * I, (int)kc, (int)ndim, dks.data(), v);
  in.kernel_shape = {O, I};
  in.kernel_shape.insert(in.kernel_shape.end(), dks.begin(), dks.end());
  return in;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor dcls_construct_kernel(const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                                 at::IntArrayRef dilated_kernel_size, c10::string_view version) {
  const char* op = "trous.dcls_construct_kernel";
  const Inputs in = check_inputs(op, weight, P, SIG, dilated_kernel_size, version);
  at::Tensor K = at::empty(in.kernel_shape, in.weight.options());
  const void* sig = ptr_or_null(in.SIG);
  run_on_device(
      in.weight, op,
      [&] { cpu_construct_forward(in.dtype, in.weight.data_ptr(), in.P.data_ptr(), sig, K.data_ptr(), in.args); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_construct_forward(in.dtype, in.weight.data_ptr(), in.P.data_ptr(), sig, K.data_ptr(),
                                                 in.args, stream));
      });
  return K;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcls_construct_kernel_backward(
    const at::Tensor& grad_K, const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
    at::IntArrayRef dilated_kernel_size, c10::string_view version) {
  const char* op = "trous.dcls_construct_kernel_backward";
  const Inputs in = check_inputs(op, weight, P, SIG, dilated_kernel_size, version);
  check_like(grad_K, in.weight, in.kernel_shape, op, "grad_K",
             "[out_channels, in_channels / groups, *dilated_kernel_size]");
  const at::Tensor gK = grad_K.contiguous();
  at::Tensor g_weight = at::empty_like(in.weight);
  at::Tensor g_P = at::empty_like(in.P);
  // Without SIG (v0 / v1) the third gradient is an empty tensor; the autograd formula maps it to None.
  at::Tensor g_SIG = in.SIG.defined() ? at::empty_like(in.SIG) : at::empty({0}, in.weight.options());
  const void* sig = ptr_or_null(in.SIG);
  void* g_sig = in.SIG.defined() ? g_SIG.data_ptr() : nullptr;
  run_on_device(
      in.weight, op,
      [&] {
        cpu_construct_backward(in.dtype, gK.data_ptr(), in.weight.data_ptr(), in.P.data_ptr(), sig, g_weight.data_ptr(),
                               g_P.data_ptr(), g_sig, in.args);
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_construct_backward(in.dtype, gK.data_ptr(), in.weight.data_ptr(), in.P.data_ptr(), sig,
                                                  g_weight.data_ptr(), g_P.data_ptr(), g_sig, in.args, stream));
      });
  return {g_weight, g_P, g_SIG};
}

}  // namespace

// Schemas (fake kernels and autograd: python/trous/).
TORCH_LIBRARY_FRAGMENT(trous, m) {
  // DCLS kernel construction.
  // dcls 0.1.1's ConstructKernel{1,2,3}d, axis quirks included: weight [O, I/g, kc], P and SIG
  // [ndim, O, I/g, kc] (SIG None for v0 / v1), version v0 | v1 | max | gauss -> K [O, I/g, *dks].
  m.def(
      "dcls_construct_kernel(Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, str version) -> Tensor");
  // (grad_weight, grad_P, grad_SIG) in one pass; grad_SIG is an empty tensor when SIG is None.
  m.def(
      "dcls_construct_kernel_backward(Tensor grad_K, Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, "
      "str version) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("dcls_construct_kernel", &dcls_construct_kernel);
  m.impl("dcls_construct_kernel_backward", &dcls_construct_kernel_backward);
}

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("dcls_construct_kernel", &dcls_construct_kernel);
  m.impl("dcls_construct_kernel_backward", &dcls_construct_kernel_backward);
}
#endif

}  // namespace construct
}  // namespace dcls
}  // namespace trous
