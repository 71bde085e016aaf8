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

using c10::SymInt;

bool same_shape(c10::SymIntArrayRef a, const std::vector<SymInt>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

void check_like(const at::Tensor& t, const at::Tensor& weight, const std::vector<SymInt>& shape, const char* op,
                const char* name, const char* shape_text) {
  TORCH_CHECK(same_shape(t.sym_sizes(), shape), op, ": ", name, " must have shape ", shape_text, " = ",
              c10::SymIntArrayRef(shape), ", got ", t.sym_sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " must have the dtype of weight (",
              weight.scalar_type(), "), got ", t.scalar_type());
}

// Validated from sizes, dtypes and the non-tensor arguments only (sym sizes: the Meta kernel runs
// the same checks as the real one).
struct Checked {
  Version v;
  DType dtype;
  bool has_sig;
  std::vector<SymInt> kernel_shape;  // [O, I / groups, *dilated_kernel_size]
};

Checked validate(const char* op, const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                 at::IntArrayRef dks, c10::string_view version) {
  Checked c;
  c.v = parse_version(version, op);
  const int64_t ndim = (int64_t)dks.size();
  TORCH_CHECK(ndim >= 1 && ndim <= 3, op, ": dilated_kernel_size must have 1, 2 or 3 entries, got ", dks);
  int64_t window = 1;
  for (int64_t j = 0; j < ndim; ++j) {
    TORCH_CHECK(dks[j] >= 1, op, ": dilated_kernel_size[", j, "] must be >= 1, got ", dks);
    window *= dks[j];
    TORCH_CHECK(window <= INT32_MAX, op, ": the dilated kernel window ", dks, " has more than 2^31 - 1 taps");
  }
  TORCH_CHECK(weight.dim() == 3, op,
              ": weight must have shape [out_channels, in_channels / groups, kernel_count], got ", weight.sym_sizes());
  c.dtype = float_dtype(weight.scalar_type(), op, "weight", /*with_float64=*/true);
  const SymInt O = weight.sym_size(0), I = weight.sym_size(1), kc = weight.sym_size(2);
  TORCH_CHECK(kc <= INT32_MAX, op, ": kernel_count = weight.size(2) must be < 2^31, got ", kc);
  const std::vector<SymInt> p_shape{SymInt(ndim), O, I, kc};
  check_like(P, weight, p_shape, op, "P",
             "[len(dilated_kernel_size), out_channels, in_channels / groups, kernel_count] (from dilated_kernel_size "
             "and weight)");
  c.has_sig = SIG.has_value() && SIG->defined();
  TORCH_CHECK(c.has_sig || !has_sigma(c.v), op, ": SIG is required for version \"", std::string(version),
              "\" (it is only optional for v0 / v1), got None");
  if (c.has_sig) check_like(*SIG, weight, p_shape, op, "SIG", "P.shape");
  c.kernel_shape = {O, I};
  for (int64_t d : dks) c.kernel_shape.emplace_back(d);
  return c;
}

// The kernels' arguments and contiguous inputs (after the meta return: reads sizes as ints).
struct Inputs {
  at::Tensor weight, P, SIG;  // contiguous; SIG undefined when not given
  ConstructArgs args;
};

Inputs prepare(const Checked& c, const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
               at::IntArrayRef dks) {
  Inputs in;
  in.weight = weight.contiguous();
  in.P = P.contiguous();
  if (c.has_sig) in.SIG = SIG->contiguous();
  in.args = make_args(weight.size(0) * weight.size(1), (int)weight.size(2), (int)dks.size(), dks.data(), c.v);
  return in;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor dcls_construct_kernel(const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                                 at::IntArrayRef dilated_kernel_size, c10::string_view version) {
  const char* op = "trous.dcls_construct_kernel";
  check_devices(op, {{"weight", weight}, {"P", P}, {"SIG", defined_or_empty(SIG)}});
  const Checked c = validate(op, weight, P, SIG, dilated_kernel_size, version);
  at::Tensor K = at::empty_symint(c.kernel_shape, weight.options());
  if (weight.is_meta()) return K;
  const Inputs in = prepare(c, weight, P, SIG, dilated_kernel_size);
  const void* sig = ptr_or_null(in.SIG);
  run_on_device(
      in.weight, op,
      [&] { cpu_construct_forward(c.dtype, in.weight.data_ptr(), in.P.data_ptr(), sig, K.data_ptr(), in.args); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_construct_forward(c.dtype, in.weight.data_ptr(), in.P.data_ptr(), sig, K.data_ptr(),
                                                 in.args, stream));
      });
  return K;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcls_construct_kernel_backward(
    const at::Tensor& grad_K, const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
    at::IntArrayRef dilated_kernel_size, c10::string_view version) {
  const char* op = "trous.dcls_construct_kernel_backward";
  check_devices(op, {{"weight", weight}, {"grad_K", grad_K}, {"P", P}, {"SIG", defined_or_empty(SIG)}});
  const Checked c = validate(op, weight, P, SIG, dilated_kernel_size, version);
  check_like(grad_K, weight, c.kernel_shape, op, "grad_K",
             "[out_channels, in_channels / groups, *dilated_kernel_size]");
  at::Tensor g_weight = at::empty_symint(weight.sym_sizes(), weight.options());
  at::Tensor g_P = at::empty_symint(P.sym_sizes(), P.options());
  // Without SIG (v0 / v1) the third gradient is an empty tensor; the autograd formula maps it to None.
  at::Tensor g_SIG = c.has_sig ? at::empty_symint(SIG->sym_sizes(), SIG->options()) : at::empty({0}, weight.options());
  if (weight.is_meta()) return {g_weight, g_P, g_SIG};
  const Inputs in = prepare(c, weight, P, SIG, dilated_kernel_size);
  const at::Tensor gK = grad_K.contiguous();
  const void* sig = ptr_or_null(in.SIG);
  void* g_sig = in.SIG.defined() ? g_SIG.data_ptr() : nullptr;
  run_on_device(
      in.weight, op,
      [&] {
        cpu_construct_backward(c.dtype, gK.data_ptr(), in.weight.data_ptr(), in.P.data_ptr(), sig, g_weight.data_ptr(),
                               g_P.data_ptr(), g_sig, in.args);
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_construct_backward(c.dtype, gK.data_ptr(), in.weight.data_ptr(), in.P.data_ptr(), sig,
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

// The fake kernels are the real kernels' own validation (checks_ops.h).
TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("dcls_construct_kernel", &dcls_construct_kernel);
  m.impl("dcls_construct_kernel_backward", &dcls_construct_kernel_backward);
}

// dcls_construct_kernel's derivative is python/trous/dcls/construct.py's register_autograd.
TORCH_LIBRARY_IMPL(trous, Autograd, m) { TROUS_NO_AUTOGRAD(m, "dcls_construct_kernel_backward"); }

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("dcls_construct_kernel", &dcls_construct_kernel);
  m.impl("dcls_construct_kernel_backward", &dcls_construct_kernel_backward);
}
#endif

}  // namespace construct
}  // namespace dcls
}  // namespace trous
