// Direct depthwise DCLS convolution ops: argument checks (one place), geometry, parameter
// preparation, and the call into the CPU kernel or the CUDA launcher on the current stream.
// Schemas are in ops.cpp; fake kernels and autograd in python/trous/_dcls_conv.py.
#include <torch/library.h>

#include <array>
#include <string>

#include "trous/checks_ops.h"
#include "dcls/conv.h"
#include "dcls/params_ops.h"
#include "dcls/conv_cpu.h"
#ifdef TROUS_WITH_CUDA
#include "dcls/conv_cuda.h"
#endif

namespace trous {
namespace dcls {
namespace {

std::vector<int64_t> per_axis(at::IntArrayRef v, int64_t ndim, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 1 || (int64_t)v.size() == ndim, op, ": ", name, " must have 1 or ", ndim,
              " entries (one per spatial axis), got ", v);
  std::vector<int64_t> out(ndim);
  for (int64_t i = 0; i < ndim; ++i) out[i] = v.size() == 1 ? v[0] : v[i];
  return out;
}

// Everything the kernels need, checked: x contiguous, parameters in the accumulation type.
struct Prepared {
  ConvGeom g;
  at::Tensor x, w, P, SIG, bias;
  at::ScalarType acc;
};

Prepared prepare(const char* op, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& P,
                 const std::optional<at::Tensor>& SIG, const std::optional<at::Tensor>& bias, at::IntArrayRef dks,
                 c10::string_view version, at::IntArrayRef stride, at::IntArrayRef padding) {
  Prepared r;
  ConvGeom& g = r.g;
  g.version = parse_version(version, op);
  const int64_t ndim = (int64_t)dks.size();
  TORCH_CHECK(ndim >= 1 && ndim <= 3, op, ": dilated_kernel_size must have 1, 2 or 3 entries, got ", dks);
  for (int64_t d : dks) {
    TORCH_CHECK(d >= 1 && d < 1024, op, ": dilated_kernel_size entries must be in [1, 1023], got ", dks);
  }
  TORCH_CHECK(x_in.dim() == ndim + 2, op, ": x must have shape [N, C, *spatial] with ", ndim,
              " spatial dimensions (len(dilated_kernel_size)), got ", x_in.sizes());
  const bool cuda = x_in.device().is_cuda();
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 || (xt == at::kDouble && !cuda), op,
              ": x must be float32, float16 or bfloat16", cuda ? "" : " (or float64 on CPU)", ", got ", xt);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == C && weight.size(1) == 1, op,
              ": weight must have shape [C, 1, kernel_count] with C = x.size(1) = ", C,
              " (depthwise: in_channels = out_channels = groups), got ", weight.sizes());
  const int64_t kc = weight.size(2);
  TORCH_CHECK(kc >= 1, op, ": kernel_count must be at least 1, got weight of shape ", weight.sizes());
  const std::vector<int64_t> pshape{ndim, C, 1, kc};
  TORCH_CHECK(P.sizes() == at::IntArrayRef(pshape), op, ": P must have shape ", at::IntArrayRef(pshape),
              " ([ndim, C, 1, kernel_count]), got ", P.sizes());
  g.ndim = (int)ndim;
  const bool need_sig = has_sigma(g.version);
  if (need_sig) {
    TORCH_CHECK(SIG.has_value() && SIG->defined(), op, ": version \"", std::string(version), "\" needs SIG (shape ",
                at::IntArrayRef(pshape), ")");
    TORCH_CHECK(SIG->sizes() == at::IntArrayRef(pshape), op, ": SIG must have the shape of P ", at::IntArrayRef(pshape),
                ", got ", SIG->sizes());
  }
  const bool with_bias = bias.has_value() && bias->defined();
  if (with_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [", C, "], got ", bias->sizes());
  }
  for (const at::Tensor* t : {&weight, &P}) {
    check_same_device(*t, x_in, op, t == &weight ? "weight" : "P");
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": parameters must be floating point, got ",
                t->scalar_type());
  }
  if (need_sig) {
    check_same_device(*SIG, x_in, op, "SIG");
    TORCH_CHECK(at::isFloatingType(SIG->scalar_type()), op, ": SIG must be floating point, got ", SIG->scalar_type());
  }
  if (with_bias) {
    check_same_device(*bias, x_in, op, "bias");
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point, got ",
                bias->scalar_type());
  }
  const auto st = per_axis(stride, ndim, op, "stride");
  const auto pd = per_axis(padding, ndim, op, "padding");
  g.N = N;
  g.C = C;
  g.kc = (int)kc;
  int sdks[3];
  for (int64_t i = 0; i < ndim; ++i) sdks[i] = (int)dks[i];
  set_axis_map(g, (int)ndim, sdks);
  const int lead = kAxes - (int)ndim;
  index_t padded_plane = 1;
  for (int j = 0; j < kAxes; ++j) {
    if (j < lead) {
      g.in[j] = g.out[j] = g.stride[j] = 1;
      g.pad[j] = 0;
      continue;
    }
    const int64_t s = j - lead;
    TORCH_CHECK(st[s] >= 1, op, ": stride must be positive, got ", stride);
    TORCH_CHECK(pd[s] >= 0, op, ": padding must be non-negative, got ", padding);
    const int64_t in = x_in.size(2 + s);
    TORCH_CHECK(in >= 1, op, ": spatial sizes of x must be positive, got ", x_in.sizes());
    TORCH_CHECK(in + 2 * pd[s] >= dks[s], op, ": padded input size ", in + 2 * pd[s], " of spatial axis ", s,
                " is smaller than the dilated kernel size ", dks[s]);
    const int64_t out = (in + 2 * pd[s] - dks[s]) / st[s] + 1;
    TORCH_CHECK(in < (1 << 30) && pd[s] < (1 << 20) && st[s] < (1 << 20), op, ": spatial size too large");
    g.in[j] = (int)in;
    g.out[j] = (int)out;
    g.stride[j] = (int)st[s];
    g.pad[j] = (int)pd[s];
    padded_plane *= in + 2 * pd[s] + dks[s];
  }
  TORCH_CHECK(padded_plane * g.stride[2] < ((index_t)1 << 30), op,
              ": a (padded) spatial plane of more than 2^30 elements is not supported");
  r.acc = xt == at::kDouble ? at::kDouble : at::kFloat;
  r.x = x_in.contiguous();
  r.w = weight.reshape({C, kc}).to(r.acc).contiguous();
  r.P = P.reshape({ndim, C, kc}).to(r.acc).contiguous();
  if (need_sig) r.SIG = SIG->reshape({ndim, C, kc}).to(r.acc).contiguous();
  if (with_bias) r.bias = bias->to(r.acc).contiguous();
  return r;
}

RawParams raw_params(const Prepared& r) {
  return RawParams{r.w.data_ptr(), r.P.data_ptr(), r.SIG.defined() ? r.SIG.data_ptr() : nullptr,
                   r.bias.defined() ? r.bias.data_ptr() : nullptr};
}

#ifdef TROUS_WITH_CUDA
Params<float> cuda_params(const Prepared& r) {
  return Params<float>{r.w.data_ptr<float>(), r.P.data_ptr<float>(),
                       r.SIG.defined() ? r.SIG.data_ptr<float>() : nullptr,
                       r.bias.defined() ? r.bias.data_ptr<float>() : nullptr};
}

void check_cuda_geometry(const ConvGeom& g, const char* op) {
  TORCH_CHECK(cuda_geometry_supported(g), op, ": this geometry needs ", cuda_smem_bytes(g),
              " bytes of shared memory per block (window ", g.window(), ", kernel_count ", g.kc,
              "), more than the device provides, or more than 65535 channels; use the construct strategy");
}
#endif

std::vector<int64_t> out_shape(const Prepared& r) {
  std::vector<int64_t> s{r.g.N, r.g.C};
  for (int j = kAxes - r.g.ndim; j < kAxes; ++j) s.push_back(r.g.out[j]);
  return s;
}

at::Tensor dcls_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
                     const std::optional<at::Tensor>& SIG, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef dilated_kernel_size, c10::string_view version, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  const char* op = "trous.dcls_conv";
  const Prepared r = prepare(op, x, weight, P, SIG, bias, dilated_kernel_size, version, stride, padding);
  at::Tensor out = at::empty(out_shape(r), r.x.options());
  const ConvGeom& g = r.g;
  run_on_device(
      r.x, op,
      [&] {
        cpu_forward(float_dtype(r.x.scalar_type(), op, "x", /*with_float64=*/true), r.x.data_ptr(), out.data_ptr(), g,
                    raw_params(r));
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(check_cuda_geometry(g, op);
                        launch_forward(float_dtype(r.x.scalar_type(), op, "x"), r.x.data_ptr(), out.data_ptr(), g,
                                       cuda_params(r), stream));
      });
  return out;
}

// Returns (grad_x, grad_weight, grad_P, grad_SIG). output_mask = [input, parameters]; outputs not
// asked for, and grad_SIG of v0 / v1, are empty tensors of shape [0]. grad_bias is grad_out's sum
// (computed by the caller).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcls_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
    const std::optional<at::Tensor>& SIG, at::IntArrayRef dilated_kernel_size, c10::string_view version,
    at::IntArrayRef stride, at::IntArrayRef padding, std::array<bool, 2> output_mask) {
  const char* op = "trous.dcls_conv_backward";
  const Prepared r = prepare(op, x, weight, P, SIG, std::nullopt, dilated_kernel_size, version, stride, padding);
  const ConvGeom& g = r.g;
  const auto oshape = out_shape(r);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(oshape), op, ": grad_out must have shape ", at::IntArrayRef(oshape),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == r.x.scalar_type(), op, ": grad_out must have the dtype of x (",
              r.x.scalar_type(), "), got ", grad_out.scalar_type());
  check_same_device(grad_out, r.x, op, "grad_out");
  const at::Tensor go = grad_out.contiguous();
  const bool want_x = output_mask[0], want_p = output_mask[1];
  const bool sig = has_sigma(g.version);
  at::Tensor gx = want_x ? at::empty(r.x.sizes(), r.x.options()) : at::empty({0}, r.x.options());
  at::Tensor gw, gP, gS;
  if (want_p) {
    gw = at::empty({g.C, g.kc}, r.w.options());
    gP = at::empty({g.ndim, g.C, g.kc}, r.w.options());
    if (sig) gS = at::empty({g.ndim, g.C, g.kc}, r.w.options());
  }
  const RawGrads rg{want_p ? gw.data_ptr() : nullptr, want_p ? gP.data_ptr() : nullptr,
                    want_p && sig ? gS.data_ptr() : nullptr};
  if (want_x || want_p) {
    run_on_device(
        r.x, op,
        [&] {
          cpu_backward(float_dtype(r.x.scalar_type(), op, "x", /*with_float64=*/true), go.data_ptr(), r.x.data_ptr(),
                       want_x ? gx.data_ptr() : nullptr, g, raw_params(r), rg);
        },
        [&](void* stream) {
          TROUS_CUDA_ONLY(check_cuda_geometry(g, op);
                          at::Tensor ws =
                              want_p ? at::empty({(int64_t)cuda_backward_workspace(g)}, r.w.options()) : at::Tensor();
                          launch_backward(float_dtype(r.x.scalar_type(), op, "x"), go.data_ptr(), r.x.data_ptr(),
                                          want_x ? gx.data_ptr() : nullptr, g, cuda_params(r),
                                          ParamGrads<float>{static_cast<float*>(rg.gw), static_cast<float*>(rg.gP),
                                                            static_cast<float*>(rg.gSIG)},
                                          want_p ? ws.data_ptr<float>() : nullptr, stream));
        });
  }
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor out_w = want_p ? gw.reshape(weight.sizes()).to(weight.scalar_type()) : empty(weight);
  at::Tensor out_P = want_p ? gP.reshape(P.sizes()).to(P.scalar_type()) : empty(P);
  at::Tensor out_S = want_p && sig ? gS.reshape(SIG->sizes()).to(SIG->scalar_type()) : empty(P);
  return {gx, out_w, out_P, out_S};
}

// Support size (number of taps of the dense window) of every channel, int32 [C]. CPU only: cost
// models and tests use it; the CUDA kernels build the same set per block.
at::Tensor dcls_conv_tap_counts(const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                                at::IntArrayRef dilated_kernel_size, c10::string_view version) {
  const char* op = "trous.dcls_conv_tap_counts";
  TORCH_CHECK(weight.dim() == 3, op, ": weight must have shape [C, 1, kernel_count], got ", weight.sizes());
  // A 1-wide dummy input of the right rank, padded so that every window fits.
  std::vector<int64_t> xs{0, weight.size(0)};
  for (size_t i = 0; i < dilated_kernel_size.size(); ++i) xs.push_back(dilated_kernel_size[i]);
  const at::Tensor x =
      at::empty(xs, weight.options().dtype(weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const Prepared r = prepare(op, x, weight, P, SIG, std::nullopt, dilated_kernel_size, version, {1}, {0});
  TORCH_CHECK(weight.device().is_cpu(), op, ": CPU tensors only");
  at::Tensor counts = at::empty({r.g.C}, weight.options().dtype(at::kInt));
  cpu_tap_counts(float_dtype(r.x.scalar_type(), op, "x", /*with_float64=*/true), r.g, raw_params(r),
                 counts.data_ptr<int32_t>());
  return counts;
}

bool dcls_conv_cuda_supported(int64_t device, int64_t channels, int64_t kernel_count, at::IntArrayRef dks) {
#ifdef TROUS_WITH_CUDA
  if (device < 0 || device >= (int64_t)c10::cuda::device_count()) return false;  // no such device
  if (channels < 1 || kernel_count < 1 || dks.empty() || dks.size() > (size_t)kAxes) return false;
  ConvGeom g{};
  g.C = channels;
  g.kc = (int)kernel_count;
  g.ndim = (int)dks.size();
  for (int j = 0; j < kAxes; ++j) {
    const int s = j - (kAxes - g.ndim);
    g.dks[j] = s < 0 ? 1 : (int)dks[s];
    if (g.dks[j] < 1) return false;
  }
  const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
  return cuda_geometry_supported(g);
#else
  (void)device, (void)channels, (void)kernel_count, (void)dks;
  return false;
#endif
}

}  // namespace

// Schemas (fake kernels and autograd: python/trous/).
TORCH_LIBRARY_FRAGMENT(trous, m) {
  // DCLS direct depthwise convolution.
  // Depthwise only (in = out = groups = C): x [N, C, *spatial] (1-3 spatial dims, contiguous copy
  // if needed), weight [C, 1, kc], P / SIG [ndim, C, 1, kc] in the dcls layout and axis conventions
  // (SIG only for "gauss" / "max"), bias [C]; zero padding; out [N, C, *out] in x's dtype.
  m.def(
      "dcls_conv(Tensor x, Tensor weight, Tensor P, Tensor? SIG, Tensor? bias, int[] dilated_kernel_size, str version, "
      "int[] stride, int[] padding) -> Tensor");
  // (grad_x, grad_weight, grad_P, grad_SIG); output_mask = [input, parameters]; what is not asked
  // for (and grad_SIG of v0 / v1) is an empty [0] tensor. grad_bias = grad_out summed (caller).
  m.def(
      "dcls_conv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, "
      "str version, int[] stride, int[] padding, bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // CPU only: taps (support size of the dense window) per channel, int32 [C].
  m.def("dcls_conv_tap_counts(Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, str version) -> Tensor");
  // CUDA limit, for the routing: whether CUDA device `device` runs a layer of this many channels,
  // kernel_count and window (shared memory per block, tap packing, grid); false in CPU-only builds.
  m.def("dcls_conv_cuda_supported(int device, int channels, int kernel_count, int[] dilated_kernel_size) -> bool",
        &dcls_conv_cuda_supported);
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("dcls_conv", &dcls_conv);
  m.impl("dcls_conv_backward", &dcls_conv_backward);
  m.impl("dcls_conv_tap_counts", &dcls_conv_tap_counts);
}

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("dcls_conv", &dcls_conv);
  m.impl("dcls_conv_backward", &dcls_conv_backward);
}
#endif

}  // namespace dcls
}  // namespace trous
