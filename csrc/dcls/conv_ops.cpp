// Direct depthwise DCLS convolution ops: argument checks (one place), geometry, parameter
// preparation, and the call into the CPU kernel or the CUDA launcher on the current stream.
// Registered for CPU, CUDA and Meta (the fake kernel is this validation); autograd of the forward
// in python/trous/dcls/conv.py.
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

using c10::SymInt;

std::vector<int64_t> per_axis(at::IntArrayRef v, int64_t ndim, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 1 || (int64_t)v.size() == ndim, op, ": ", name, " must have 1 or ", ndim,
              " entries (one per spatial axis), got ", v);
  std::vector<int64_t> out(ndim);
  for (int64_t i = 0; i < ndim; ++i) out[i] = v.size() == 1 ? v[0] : v[i];
  return out;
}

bool same_shape(c10::SymIntArrayRef a, const std::vector<SymInt>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Everything validated from sizes, dtypes and the non-tensor arguments only (sym sizes: the Meta
// kernel runs the same checks as the real one, under torch.compile(dynamic=True) too).
struct Checked {
  Version v;
  int64_t ndim;
  bool need_sig, with_bias;
  std::vector<int64_t> st, pd;
  std::vector<SymInt> out_shape;  // [N, C, *out]
};

Version check_dks(const char* op, at::IntArrayRef dks, c10::string_view version) {
  const Version v = parse_version(version, op);
  const int64_t ndim = (int64_t)dks.size();
  TORCH_CHECK(ndim >= 1 && ndim <= 3, op, ": dilated_kernel_size must have 1, 2 or 3 entries, got ", dks);
  for (int64_t d : dks) {
    TORCH_CHECK(d >= 1 && d < 1024, op, ": dilated_kernel_size entries must be in [1, 1023], got ", dks);
  }
  return v;
}

// weight [C, 1, kc], P / SIG [ndim, C, 1, kc] for C channels; each error names the tensor that
// disagrees with the ones before it (x, then weight, then P, SIG).
void check_params(const char* op, const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                  const SymInt& C, const char* c_from, int64_t ndim, Version v, c10::string_view version) {
  TORCH_CHECK(weight.dim() == 3 && weight.sym_size(0) == C && weight.sym_size(1) == 1, op,
              ": weight must have shape [C, 1, kernel_count] with C = ", c_from, " = ", C,
              " (depthwise: in_channels = out_channels = groups), got ", weight.sym_sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ",
              weight.scalar_type());
  const SymInt kc = weight.sym_size(2);
  TORCH_CHECK(kc >= 1, op, ": kernel_count = weight.size(2) must be at least 1, got weight of shape ",
              weight.sym_sizes());
  TORCH_CHECK(kc <= INT32_MAX, op, ": kernel_count = weight.size(2) must be < 2^31, got ", kc);
  const std::vector<SymInt> pshape{SymInt(ndim), C, SymInt(1), kc};
  TORCH_CHECK(same_shape(P.sym_sizes(), pshape), op, ": P must have shape ", c10::SymIntArrayRef(pshape),
              " ([len(dilated_kernel_size), C, 1, kernel_count], from dilated_kernel_size and weight), got ",
              P.sym_sizes());
  TORCH_CHECK(at::isFloatingType(P.scalar_type()), op, ": P must be floating point, got ", P.scalar_type());
  if (has_sigma(v)) {
    TORCH_CHECK(SIG.has_value() && SIG->defined(), op, ": version \"", std::string(version), "\" needs SIG (shape ",
                c10::SymIntArrayRef(pshape), "), got None");
    TORCH_CHECK(same_shape(SIG->sym_sizes(), pshape), op, ": SIG must have the shape of P ",
                c10::SymIntArrayRef(pshape), ", got ", SIG->sym_sizes());
    TORCH_CHECK(at::isFloatingType(SIG->scalar_type()), op, ": SIG must be floating point, got ", SIG->scalar_type());
  }
}

void check_x_dtype(const char* op, const at::Tensor& x) {
  const bool cuda = x.device().is_cuda();
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 || (xt == at::kDouble && !cuda), op,
              ": x must be float32, float16 or bfloat16", cuda ? "" : " (or float64 on CPU)", ", got ", xt);
}

Checked validate(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
                 const std::optional<at::Tensor>& SIG, const std::optional<at::Tensor>& bias, at::IntArrayRef dks,
                 c10::string_view version, at::IntArrayRef stride, at::IntArrayRef padding) {
  Checked r;
  r.v = check_dks(op, dks, version);
  r.ndim = (int64_t)dks.size();
  TORCH_CHECK(x.dim() == r.ndim + 2, op, ": x must have shape [N, C, *spatial] with ", r.ndim,
              " spatial dimensions (len(dilated_kernel_size)), got ", x.sym_sizes());
  check_x_dtype(op, x);
  const SymInt C = x.sym_size(1);
  check_params(op, weight, P, SIG, C, "x.size(1)", r.ndim, r.v, version);
  r.need_sig = has_sigma(r.v);
  r.with_bias = bias.has_value() && bias->defined();
  if (r.with_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == C, op, ": bias must have shape [", C,
                "] ([C], C = x.size(1)), got ", bias->sym_sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point, got ",
                bias->scalar_type());
  }
  r.st = per_axis(stride, r.ndim, op, "stride");
  r.pd = per_axis(padding, r.ndim, op, "padding");
  r.out_shape = {x.sym_size(0), C};
  SymInt padded_plane = 1;
  for (int64_t s = 0; s < r.ndim; ++s) {
    TORCH_CHECK(r.st[s] >= 1 && r.st[s] < (1 << 20), op, ": stride must be positive and below 2^20, got ", stride);
    TORCH_CHECK(r.pd[s] >= 0 && r.pd[s] < (1 << 20), op, ": padding must be non-negative and below 2^20, got ",
                padding);
    const SymInt in = x.sym_size(2 + s);
    TORCH_CHECK(in >= 1, op, ": spatial sizes of x must be positive, got ", x.sym_sizes());
    TORCH_CHECK(in < (1 << 30), op, ": spatial size x.size(", 2 + s, ") = ", in, " must be < 2^30");
    TORCH_CHECK(in + 2 * r.pd[s] >= dks[s], op, ": padded input size ", in + 2 * r.pd[s], " of spatial axis ", s,
                " of x is smaller than the dilated kernel size ", dks[s]);
    r.out_shape.push_back((in + 2 * r.pd[s] - dks[s]) / r.st[s] + 1);
    padded_plane = padded_plane * (in + 2 * r.pd[s] + dks[s]);
  }
  TORCH_CHECK(padded_plane * r.st[r.ndim - 1] < ((int64_t)1 << 30), op,
              ": a (padded) spatial plane of x of more than 2^30 elements is not supported, got x of shape ",
              x.sym_sizes());
  return r;
}

// The kernels' int geometry and contiguous parameters in the accumulation type (after the meta
// return: reads sizes as ints).
struct Prepared {
  ConvGeom g;
  at::Tensor x, w, P, SIG, bias;
  at::ScalarType acc;
};

Prepared prepare(const Checked& c, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& P,
                 const std::optional<at::Tensor>& SIG, const std::optional<at::Tensor>& bias, at::IntArrayRef dks) {
  Prepared r;
  ConvGeom& g = r.g;
  g.version = c.v;
  const int64_t ndim = c.ndim;
  const int64_t N = x_in.size(0), C = x_in.size(1), kc = weight.size(2);
  g.ndim = (int)ndim;
  g.N = N;
  g.C = C;
  g.kc = (int)kc;
  int sdks[3];
  for (int64_t i = 0; i < ndim; ++i) sdks[i] = (int)dks[i];
  set_axis_map(g, (int)ndim, sdks);
  const int lead = kAxes - (int)ndim;
  for (int j = 0; j < kAxes; ++j) {
    if (j < lead) {
      g.in[j] = g.out[j] = g.stride[j] = 1;
      g.pad[j] = 0;
      continue;
    }
    const int64_t s = j - lead;
    const int64_t in = x_in.size(2 + s);
    g.in[j] = (int)in;
    g.out[j] = (int)((in + 2 * c.pd[s] - dks[s]) / c.st[s] + 1);
    g.stride[j] = (int)c.st[s];
    g.pad[j] = (int)c.pd[s];
  }
  r.acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  r.x = x_in.contiguous();
  r.w = weight.reshape({C, kc}).to(r.acc).contiguous();
  r.P = P.reshape({ndim, C, kc}).to(r.acc).contiguous();
  if (c.need_sig) r.SIG = SIG->reshape({ndim, C, kc}).to(r.acc).contiguous();
  if (c.with_bias) r.bias = bias->to(r.acc).contiguous();
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

at::Tensor dcls_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
                     const std::optional<at::Tensor>& SIG, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef dilated_kernel_size, c10::string_view version, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  const char* op = "trous.dcls_conv";
  check_devices(
      op, {{"x", x}, {"weight", weight}, {"P", P}, {"SIG", defined_or_empty(SIG)}, {"bias", defined_or_empty(bias)}});
  const Checked c = validate(op, x, weight, P, SIG, bias, dilated_kernel_size, version, stride, padding);
  at::Tensor out = at::empty_symint(c.out_shape, x.options());
  if (x.is_meta()) return out;
  const Prepared r = prepare(c, x, weight, P, SIG, bias, dilated_kernel_size);
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
  check_devices(op, {{"x", x}, {"grad_out", grad_out}, {"weight", weight}, {"P", P}, {"SIG", defined_or_empty(SIG)}});
  const Checked c = validate(op, x, weight, P, SIG, std::nullopt, dilated_kernel_size, version, stride, padding);
  TORCH_CHECK(same_shape(grad_out.sym_sizes(), c.out_shape), op, ": grad_out must have shape ",
              c10::SymIntArrayRef(c.out_shape), " (the output's), got ", grad_out.sym_sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (", x.scalar_type(),
              "), got ", grad_out.scalar_type());
  const bool want_x = output_mask[0], want_p = output_mask[1];
  const bool sig = c.need_sig;
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor gx = want_x ? at::empty_symint(x.sym_sizes(), x.options()) : empty(x);
  if (x.is_meta()) {
    return {gx, want_p ? at::empty_symint(weight.sym_sizes(), weight.options()) : empty(weight),
            want_p ? at::empty_symint(P.sym_sizes(), P.options()) : empty(P),
            want_p && sig ? at::empty_symint(SIG->sym_sizes(), SIG->options()) : empty(P)};
  }
  const Prepared r = prepare(c, x, weight, P, SIG, std::nullopt, dilated_kernel_size);
  const ConvGeom& g = r.g;
  const at::Tensor go = grad_out.contiguous();
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
  at::Tensor out_w = want_p ? gw.reshape(weight.sizes()).to(weight.scalar_type()) : empty(weight);
  at::Tensor out_P = want_p ? gP.reshape(P.sizes()).to(P.scalar_type()) : empty(P);
  at::Tensor out_S = want_p && sig ? gS.reshape(SIG->sizes()).to(SIG->scalar_type()) : empty(P);
  return {gx, out_w, out_P, out_S};
}

// Support size (number of taps of the dense window) of every channel, int32 [C]. CPU (and meta)
// only: cost models and tests use it; the CUDA kernels build the same set per block.
at::Tensor dcls_conv_tap_counts(const at::Tensor& weight, const at::Tensor& P, const std::optional<at::Tensor>& SIG,
                                at::IntArrayRef dilated_kernel_size, c10::string_view version) {
  const char* op = "trous.dcls_conv_tap_counts";
  check_devices(op, {{"weight", weight}, {"P", P}, {"SIG", defined_or_empty(SIG)}});
  TORCH_CHECK(weight.device().is_cpu() || weight.is_meta(), op, ": CPU tensors only, got weight on ", weight.device());
  const Version v = check_dks(op, dilated_kernel_size, version);
  const int64_t ndim = (int64_t)dilated_kernel_size.size();
  TORCH_CHECK(weight.dim() == 3, op, ": weight must have shape [C, 1, kernel_count], got ", weight.sym_sizes());
  check_params(op, weight, P, SIG, weight.sym_size(0), "weight.size(0)", ndim, v, version);
  at::Tensor counts = at::empty_symint({weight.sym_size(0)}, weight.options().dtype(at::kInt));
  if (weight.is_meta()) return counts;
  // The geometry of a 1-wide output: an empty batch whose spatial sizes are the window.
  Checked c;
  c.v = v;
  c.ndim = ndim;
  c.need_sig = has_sigma(v);
  c.with_bias = false;
  c.st.assign(ndim, 1);
  c.pd.assign(ndim, 0);
  std::vector<int64_t> xs{0, weight.size(0)};
  for (int64_t d : dilated_kernel_size) xs.push_back(d);
  const at::Tensor x =
      at::empty(xs, weight.options().dtype(weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const Prepared r = prepare(c, x, weight, P, SIG, std::nullopt, dilated_kernel_size);
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

// The fake kernels are the real kernels' own validation (checks_ops.h).
TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("dcls_conv", &dcls_conv);
  m.impl("dcls_conv_backward", &dcls_conv_backward);
  m.impl("dcls_conv_tap_counts", &dcls_conv_tap_counts);
}

// dcls_conv's derivative is python/trous/dcls/conv.py's register_autograd; these have none.
TORCH_LIBRARY_IMPL(trous, Autograd, m) {
  TROUS_NO_AUTOGRAD(m, "dcls_conv_backward");
  TROUS_NO_AUTOGRAD(m, "dcls_conv_tap_counts");
}

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("dcls_conv", &dcls_conv);
  m.impl("dcls_conv_backward", &dcls_conv_backward);
}
#endif

}  // namespace dcls
}  // namespace trous
