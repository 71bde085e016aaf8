// Banded grouped 1-D DCLS convolution ops (math in trous/dcls_banded.h): argument checks in one
// place, then the CPU kernels (fp32 / fp64; other dtypes are converted) or the CUDA launchers (x's
// dtype, fp32 kernel). Schemas in ops.cpp; band computation, fake kernels and autograd in python/trous/_dcls_banded.py.
#include <torch/library.h>

#include <array>

#include "trous/checks_ops.h"
#include "dcls/banded.h"
#include "dcls/banded_cpu.h"
#ifdef TROUS_WITH_CUDA
#include "dcls/banded_cuda.h"
#endif

namespace trous {
namespace dcls {
namespace {

using c10::SymInt;

// Validated from sizes, dtypes and the non-tensor arguments only (sym sizes: the Meta kernel runs
// the same checks as the real one). Each error names the argument that disagrees with x (then K).
std::vector<SymInt> validate(const char* op, const at::Tensor& x, const at::Tensor& K, const at::Tensor& band,
                             const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding, int64_t groups) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape [N, C_in, L], got ", x.sym_sizes());
  const bool cuda = x.device().is_cuda();
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 || (xt == at::kDouble && !cuda), op,
              ": x must be float32, float16 or bfloat16", cuda ? "" : " (or float64 on CPU)", ", got ", xt);
  TORCH_CHECK(groups >= 1, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(stride >= 1 && stride < (1 << 20), op, ": stride must be in [1, 2^20), got ", stride);
  TORCH_CHECK(padding >= 0 && padding < (1 << 20), op, ": padding must be in [0, 2^20), got ", padding);
  const SymInt c_in = x.sym_size(1), l_in = x.sym_size(2);
  TORCH_CHECK(c_in % groups == 0, op, ": C_in = x.size(1) = ", c_in, " must be divisible by groups = ", groups);
  const SymInt i_per_g = c_in / groups;
  TORCH_CHECK(K.dim() == 3 && K.sym_size(1) == i_per_g, op, ": K must have shape [C_out, C_in / groups = ", i_per_g,
              ", dilated_kernel_size] (C_in = x.size(1)), got ", K.sym_sizes());
  TORCH_CHECK(at::isFloatingType(K.scalar_type()), op, ": K must be floating point, got ", K.scalar_type());
  const SymInt c_out = K.sym_size(0), dks = K.sym_size(2);
  TORCH_CHECK(c_out >= 1 && c_out % groups == 0, op, ": K.size(0) = ", c_out,
              " must be a positive multiple of groups = ", groups, " (K.size(0) is C_out)");
  TORCH_CHECK(dks >= 1 && dks < (1 << 20), op, ": K.size(2) (dilated_kernel_size) must be in [1, 2^20), got ", dks);
  TORCH_CHECK(band.scalar_type() == at::kInt, op, ": band must be int32, got ", band.scalar_type());
  TORCH_CHECK(band.dim() == 3 && band.sym_size(0) == c_out && band.sym_size(1) == i_per_g && band.sym_size(2) == 2, op,
              ": band must have shape [", c_out, ", ", i_per_g,
              ", 2] ([C_out, C_in / groups, 2]: lo, hi per row of K), got ", band.sym_sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == c_out, op, ": bias must have shape [", c_out, "], got ",
                bias->sym_sizes(), " (C_out = K.size(0))");
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point, got ",
                bias->scalar_type());
  }
  TORCH_CHECK(l_in >= 1 && l_in < (1 << 30), op, ": L = x.size(2) must be in [1, 2^30), got ", l_in);
  TORCH_CHECK(l_in + 2 * padding >= dks, op, ": the padded input length ", l_in + 2 * padding,
              " is smaller than the dilated kernel size ", dks, " (x.size(2) + 2 padding < K.size(2))");
  // The CPU kernels address one sample's (padded) plane with 32-bit offsets.
  TORCH_CHECK(
      c_in * (l_in + 2 * padding) < ((int64_t)1 << 31) && c_out * (l_in + 2 * padding + dks) < ((int64_t)1 << 31), op,
      ": one sample of more than 2^31 elements (C x padded length) is not supported, got C_in = ", c_in,
      ", C_out = ", c_out, ", padded length ", l_in + 2 * padding);
  return {x.sym_size(0), c_out, (l_in + 2 * padding - dks) / stride + 1};
}

// The kernels' int geometry and contiguous K / band (after the meta return).
struct Banded {
  BandedGeom g;
  at::ScalarType acc;  // accumulation type: double for fp64 x (CPU), float otherwise
  at::Tensor K, band;  // K in acc, band int32; both contiguous
};

Banded prepare_banded(const char* op, const at::Tensor& x, const at::Tensor& K, const at::Tensor& band, int64_t stride,
                      int64_t padding, int64_t groups) {
  const bool cuda = x.device().is_cuda();
  const int64_t dks = K.size(2);
  Banded r;
  BandedGeom& g = r.g;
  g.N = x.size(0);
  g.c_in = (int)x.size(1);
  g.c_out = (int)K.size(0);
  g.groups = (int)groups;
  g.l_in = (int)x.size(2);
  g.l_out = (int)((x.size(2) + 2 * padding - dks) / stride + 1);
  g.dks = (int)dks;
  g.stride = (int)stride;
  g.pad = (int)padding;
  r.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  r.K = K.to(r.acc).contiguous();
  r.band = band.contiguous();
  if (!cuda) {
    // The kernels clamp bands for memory safety; on the CPU a wrong band is also reported (a check
    // of values, which the meta kernel cannot make).
    const at::Tensor lo = r.band.select(2, 0), hi = r.band.select(2, 1);
    TORCH_CHECK(lo.ge(0).all().item<bool>() && lo.le(hi).all().item<bool>() && hi.le(dks).all().item<bool>(), op,
                ": band entries must satisfy 0 <= lo <= hi <= dilated_kernel_size = ", dks);
  }
  return r;
}

template <typename F>
void with_acc(const Banded& r, F&& f) {
  if (r.acc == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

at::Tensor dcls_banded_conv1d(const at::Tensor& x, const at::Tensor& K, const at::Tensor& band,
                              const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding, int64_t groups) {
  const char* op = "trous.dcls_banded_conv1d";
  check_devices(op, {{"x", x}, {"K", K}, {"band", band}, {"bias", defined_or_empty(bias)}});
  const std::vector<SymInt> oshape = validate(op, x, K, band, bias, stride, padding, groups);
  if (x.is_meta()) return at::empty_symint(oshape, x.options());
  const Banded r = prepare_banded(op, x, K, band, stride, padding, groups);
  const BandedGeom& g = r.g;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(r.acc).contiguous();
  at::Tensor out;
  run_on_device(
      x, op,
      [&] {
        const at::Tensor xa = x.to(r.acc).contiguous();
        at::Tensor acc_out = at::empty({g.N, g.c_out, g.l_out}, xa.options());
        with_acc(r, [&](auto t) {
          using A = decltype(t);
          cpu_banded_forward(xa.data_ptr<A>(), r.K.data_ptr<A>(), r.band.data_ptr<int32_t>(),
                             b.defined() ? b.data_ptr<A>() : nullptr, acc_out.data_ptr<A>(), g);
        });
        out = acc_out.to(x.scalar_type());
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(const at::Tensor xc = x.contiguous(); out = at::empty({g.N, g.c_out, g.l_out}, xc.options());
                        launch_banded_forward(float_dtype(xc.scalar_type(), op, "x"), xc.data_ptr(),
                                              r.K.data_ptr<float>(), r.band.data_ptr<int32_t>(),
                                              b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), g, stream));
      });
  return out;
}

// (grad_x, grad_K); output_mask = [x, K]; what is not asked for is an empty [0] tensor. grad_K is
// zero outside the bands; grad_bias is grad_out's sum (computed by the caller).
std::tuple<at::Tensor, at::Tensor> dcls_banded_conv1d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& K, const at::Tensor& band,
                                                               int64_t stride, int64_t padding, int64_t groups,
                                                               std::array<bool, 2> output_mask) {
  const char* op = "trous.dcls_banded_conv1d_backward";
  check_devices(op, {{"x", x}, {"grad_out", grad_out}, {"K", K}, {"band", band}});
  const std::vector<SymInt> oshape = validate(op, x, K, band, std::nullopt, stride, padding, groups);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.sym_size(0) == oshape[0] && grad_out.sym_size(1) == oshape[1] &&
                  grad_out.sym_size(2) == oshape[2],
              op, ": grad_out must have shape ", c10::SymIntArrayRef(oshape), " (the output's), got ",
              grad_out.sym_sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (", x.scalar_type(),
              "), got ", grad_out.scalar_type());
  if (x.is_meta()) {
    return {output_mask[0] ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options()),
            output_mask[1] ? at::empty_symint(K.sym_sizes(), K.options()) : at::empty({0}, K.options())};
  }
  const Banded r = prepare_banded(op, x, K, band, stride, padding, groups);
  const BandedGeom& g = r.g;
  const bool want_x = output_mask[0], want_k = output_mask[1];
  at::Tensor gx = at::empty({0}, x.options()), gK = at::empty({0}, K.options());
  run_on_device(
      x, op,
      [&] {
        const at::Tensor gy = grad_out.to(r.acc).contiguous();
        const at::Tensor xa = want_k ? x.to(r.acc).contiguous() : at::Tensor();  // grad_K's input only
        at::Tensor acc_gx = want_x ? at::empty({g.N, g.c_in, g.l_in}, gy.options()) : at::Tensor();
        at::Tensor acc_gK = want_k ? at::empty(r.K.sizes(), r.K.options()) : at::Tensor();
        with_acc(r, [&](auto t) {
          using A = decltype(t);
          cpu_banded_backward(gy.data_ptr<A>(), want_k ? xa.data_ptr<A>() : nullptr, r.K.data_ptr<A>(),
                              r.band.data_ptr<int32_t>(), want_x ? acc_gx.data_ptr<A>() : nullptr,
                              want_k ? acc_gK.data_ptr<A>() : nullptr, g);
        });
        if (want_x) gx = acc_gx.to(x.scalar_type());
        if (want_k) gK = acc_gK.to(K.scalar_type());
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(
            const at::Tensor go = grad_out.contiguous(); const at::Tensor xc = x.contiguous();
            const DType dt = float_dtype(xc.scalar_type(), op, "x"); if (want_x) {
              gx = at::empty(xc.sizes(), xc.options());
              launch_banded_backward_input(dt, go.data_ptr(), r.K.data_ptr<float>(), r.band.data_ptr<int32_t>(),
                                           gx.data_ptr(), g, stream);
            } if (want_k) {
              at::Tensor acc_gK = at::empty(r.K.sizes(), r.K.options());
              launch_banded_backward_kernel(dt, go.data_ptr(), xc.data_ptr(), r.band.data_ptr<int32_t>(),
                                            acc_gK.data_ptr<float>(), g, stream);
              gK = acc_gK.to(K.scalar_type());
            });
      });
  return {gx, gK};
}

}  // namespace

// Schemas (fake kernels and autograd: python/trous/).
TORCH_LIBRARY_FRAGMENT(trous, m) {
  // DCLS banded grouped 1-D convolution: the direct route of Dcls1d layers
  // that are not depthwise. x [N, C_in, L]; K [C_out, C_in / groups, dks] (the constructed kernel);
  // band int32 [C_out, C_in / groups, 2]: only taps lo <= s < hi of each K row are visited; zero padding.
  m.def(
      "dcls_banded_conv1d(Tensor x, Tensor K, Tensor band, Tensor? bias, int stride, int padding, int groups) -> "
      "Tensor");
  // (grad_x, grad_K); output_mask = [x, K]; grad_K is 0 outside the bands; not asked for: empty [0].
  m.def(
      "dcls_banded_conv1d_backward(Tensor grad_out, Tensor x, Tensor K, Tensor band, int stride, int padding, int "
      "groups, bool[2] output_mask) -> (Tensor, Tensor)");
  // CPU heuristic, for the cost model: whether the forward of this batch, stride and x dtype runs the
  // batch-lane kernels (the kernels' own decision: batch threshold and AVX-512).
  m.def("dcls_banded_uses_batch_lanes(int batch, int stride, ScalarType dtype) -> bool",
        [](int64_t batch, int64_t stride, at::ScalarType dtype) {
          return cpu_banded_uses_batch_lanes(
              batch, (int)stride,
              float_dtype(dtype, "trous.dcls_banded_uses_batch_lanes", "dtype", /*with_float64=*/true));
        });
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("dcls_banded_conv1d", &dcls_banded_conv1d);
  m.impl("dcls_banded_conv1d_backward", &dcls_banded_conv1d_backward);
}

// The fake kernels are the real kernels' own validation (checks_ops.h).
TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("dcls_banded_conv1d", &dcls_banded_conv1d);
  m.impl("dcls_banded_conv1d_backward", &dcls_banded_conv1d_backward);
}

// dcls_banded_conv1d's derivative is python/trous/dcls/banded.py's register_autograd.
TORCH_LIBRARY_IMPL(trous, Autograd, m) { TROUS_NO_AUTOGRAD(m, "dcls_banded_conv1d_backward"); }

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("dcls_banded_conv1d", &dcls_banded_conv1d);
  m.impl("dcls_banded_conv1d_backward", &dcls_banded_conv1d_backward);
}
#endif

}  // namespace dcls
}  // namespace trous
