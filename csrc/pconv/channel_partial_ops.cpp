// Channel-partial convolution (FasterNet PConv): schemas, the one validation of each op (shared by
// the CPU, CUDA and Meta kernels) and their registrations. Autograd of the out-of-place op:
// python/trous/pconv/channel_partial.py.
//
// Routes (`algo`):
//   "direct": one trous kernel writes the convolved channels and copies the others (one pass).
//   "aten":   the cp-channel convolution runs in oneDNN / cuDNN on the view x[:, :cp], then one
//             concatenation writes out (FasterNet's split_cat, into out's memory format; cp == C:
//             the convolution's result itself).
//   "auto":   CPU: the direct kernel for cp < 16 on NCHW rows, oneDNN otherwise (see `route`);
//             CUDA: cuDNN until the direct CUDA kernel is measured on a GPU.
// trous::channel_partial_conv2d_route(x, weight, algo) names the route a call takes ("direct" or
// "aten"): the tests assert the CPU choices.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <string>

#include "pconv/channel_partial_cpu.h"
#include "trous/checks_ops.h"
#include "trous/simd_cpu.h"
#ifdef TROUS_WITH_CUDA
#include "pconv/channel_partial_cuda.h"
#endif

namespace trous {
namespace pconv {
namespace {

enum class Algo { kAuto, kAten, kDirect };

// float64 (for gradcheck) always takes the ATen route: the direct kernels accumulate in fp32.
Algo parse_algo(c10::string_view s, const char* op, DType dt) {
  Algo a = Algo::kAuto;
  if (s == "aten") {
    a = Algo::kAten;
  } else if (s == "direct") {
    a = Algo::kDirect;
  } else {
    TORCH_CHECK_VALUE(s == "auto", op, ": algo must be \"auto\", \"aten\" or \"direct\", got \"", std::string(s), "\"");
  }
  TORCH_CHECK_VALUE(!(a == Algo::kDirect && dt == DType::kFloat64), op,
                    ": algo \"direct\" has no float64 kernel (x is float64); use algo \"auto\" or \"aten\"");
  return a;
}

// Every check of the three ops: devices, ranks, dtypes, stride, dilation, the weight's shape against
// x (cp = weight.size(0) <= C, square in channels, odd kernel). Reads only sym sizes, so that the Meta
// kernel (FakeTensorMode, torch.compile(dynamic=True)) refuses exactly what the real kernels refuse.
DType check_args(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                 at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape [N, C, H, W], got ", x.dim(), " dimensions ", x.sym_sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must have shape [cp, cp, kh, kw], got ", weight.dim(), " dimensions ",
              weight.sym_sizes());
  const DType dt = float_dtype(x.scalar_type(), op, "x", /*with_float64=*/true);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (", x.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] == 1 && stride[1] == 1, op,
                    ": stride must be [1, 1] (the untouched channels cannot change resolution), got ", stride);
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
                    ": dilation must be two integers >= 1, got ", dilation);
  const c10::SymInt& cp = weight.sym_size(0);
  TORCH_CHECK_VALUE(cp >= 1, op, ": weight.size(0) = cp must be >= 1 (C // n_div = 0?), got ", cp);
  TORCH_CHECK_VALUE(cp <= x.sym_size(1), op, ": weight.size(0) = cp must be <= x.size(1) = ", x.sym_size(1),
                    " (n_div > C?), got ", cp);
  TORCH_CHECK_VALUE(weight.sym_size(1) == cp, op, ": weight must have shape [cp, cp, kh, kw] with cp = ", cp, ", got ",
                    weight.sym_sizes());
  TORCH_CHECK_VALUE(weight.sym_size(2) % 2 == 1 && weight.sym_size(3) % 2 == 1, op,
                    ": weight's kernel size must be odd (\"same\" padding), got ", weight.sym_sizes());
  return dt;
}

ChannelPartialArgs make_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
                             at::IntArrayRef dilation) {
  ChannelPartialArgs a{};
  a.N = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.cp = weight.size(0);
  a.out_channels = out.size(1);
  a.kh = static_cast<int>(weight.size(2));
  a.kw = static_cast<int>(weight.size(3));
  a.dh = static_cast<int>(dilation[0]);
  a.dw = static_cast<int>(dilation[1]);
  a.xs = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  a.os = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  return a;
}

enum class Route { kDirect, kAten };

// CPU "auto" (measured on 2-core EPYCs, fp32, FasterNet's shapes; tests/pconv asserts it): the
// direct kernel where oneDNN pads the convolved channels to its blocks (8 wide with AVX2, 16 with
// AVX-512) and the padding is large, on NCHW rows of at least 16 columns; oneDNN otherwise.
// - AVX2 (Zen 2 / 3): cp < 16. FasterNet-T0 stage 1, cp = 10 at 56x56: the direct kernel 2.4x
//   faster than split_cat; from cp = 16 up oneDNN's arithmetic is faster.
// - AVX-512 (Zen 4): also where the padding to 16 is >= 1/4 of the padded width. Forward, direct
//   over oneDNN: cp 18 1.7-1.9x, 20 1.3-1.8x, 24 1.3-1.4x, 36 1.4x; fwd+bwd 1.0-1.2x. With less
//   padding oneDNN wins: cp 28 (32) 0.98x, 40 (48) 0.70x, 16 / 32 / 48 / 80 (none) 0.43-0.84x.
// Short rows (7x7, 14x14) go to oneDNN: the direct kernel's 8/16-column register blocks are mostly
// padding there (2x slower at (32, 320, 7, 7)). (oneDNN per sample, reading x[n, :cp] in place
// instead of copying x[:, :cp], was measured too: 0.87x of split_cat at (8, 96, 56, 56), batch-1
// convolutions being less efficient than the copy they save.) channels_last goes to oneDNN (its
// NHWC path is its fastest; the direct kernel's strided twin is scalar). CUDA: cuDNN until the
// direct kernel is measured on a GPU. float64: ATen (the direct kernels accumulate in fp32).
Route route(Algo algo, const at::Tensor& x, const at::Tensor& weight) {
  if (algo != Algo::kAuto) return algo == Algo::kDirect ? Route::kDirect : Route::kAten;
  if (x.scalar_type() == at::kDouble || !x.device().is_cpu()) return Route::kAten;
  const bool rows = x.stride(3) == 1 || x.size(3) == 1;
  const int64_t cp = weight.size(0), padded = (cp + 15) / 16 * 16;
  const bool padded_heavily = cpu::has_avx512() && 4 * (padded - cp) >= padded;
  return rows && x.size(3) >= 16 && (cp < 16 || padded_heavily) ? Route::kDirect : Route::kAten;
}

// The direct kernel into `out` (C channels: conv + pass-through; cp channels: conv only).
void run_direct(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& out, at::IntArrayRef dilation,
                DType dt, const char* op) {
  const at::Tensor weight = weight_in.contiguous();
  const ChannelPartialArgs a = make_args(x, weight, out, dilation);
  run_on_device(
      x, op, [&] { cpu_channel_partial_conv2d(dt, x.data_ptr(), weight.data_ptr(), out.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_channel_partial_conv2d(dt, x.data_ptr(), weight.data_ptr(), out.data_ptr(), a, stream));
      });
}

// fp16 / bf16 on CPU run in fp32 and are rounded once: on CPUs with AVX512-BF16 (Zen 4 here) oneDNN's
// bf16 convolution turns one -Inf among finite inputs into NaN at three outputs, one of them finite
// in fp32 (found by the property tests on such a machine), against "NaN / Inf reach only the outputs
// they reach"; fp32 is also what the direct kernel accumulates in.
at::Tensor aten_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dilation) {
  const int64_t cp = weight.size(0);
  const std::vector<int64_t> padding{dilation[0] * (weight.size(2) - 1) / 2, dilation[1] * (weight.size(3) - 1) / 2};
  const at::Tensor xs = x.narrow(1, 0, cp);
  if (x.is_cpu() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)) {
    return at::conv2d(xs.to(at::kFloat), weight.to(at::kFloat), {}, 1, padding, dilation).to(x.scalar_type());
  }
  return at::conv2d(xs, weight, {}, 1, padding, dilation);
}

std::string channel_partial_conv2d_route(const at::Tensor& x, const at::Tensor& weight, c10::string_view algo_name) {
  const char* op = "trous.channel_partial_conv2d_route";
  check_devices(op, {{"x", x}, {"weight", weight}});
  const int64_t one[2] = {1, 1};
  const DType dt = check_args(op, x, weight, one, one);
  switch (route(parse_algo(algo_name, op, dt), x, weight)) {
    case Route::kDirect: return "direct";
    default: return "aten";
  }
}

at::Tensor channel_partial_conv2d(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef dilation, c10::string_view algo_name) {
  const char* op = "trous.channel_partial_conv2d";
  check_devices(op, {{"x", x}, {"weight", weight}});
  const DType dt = check_args(op, x, weight, stride, dilation);
  const Algo algo = parse_algo(algo_name, op, dt);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  if (x.is_meta()) return out;
  if (out.numel() == 0) return out;
  const Route r = route(algo, x, weight);
  if (r == Route::kDirect) {
    run_direct(x, weight, out, dilation, dt, op);
    return out;
  }
  const int64_t cp = weight.size(0), C = x.size(1);
  if (C == cp) {
    at::Tensor conv = aten_conv(x, weight, dilation);
    if (conv.strides() == out.strides()) return conv;  // already in out's layout: no copy
    out.copy_(conv);
  } else {
    at::cat_out(out, {aten_conv(x, weight, dilation), x.narrow(1, cp, C - cp)}, 1);  // one pass over out
  }
  return out;
}

// Returns nothing (a custom op cannot return an alias of its input); the Python wrapper returns x.
// Inference only (no derivative: the Autograd kernel refuses inputs that require grad): x[:, :cp] is
// overwritten with the convolution of x[:, :cp]; the other channels are not touched. The convolved
// channels are computed into a scratch of cp channels first (each output reads a neighbourhood of
// the input), then copied over x[:, :cp].
void channel_partial_conv2d_(at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef dilation,
                             c10::string_view algo_name) {
  const char* op = "trous.channel_partial_conv2d_";
  check_devices(op, {{"x", x}, {"weight", weight}});
  const DType dt = check_args(op, x, weight, stride, dilation);
  const Algo algo = parse_algo(algo_name, op, dt);
  if (x.is_meta()) return;
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes || x.numel() == 0, op,
              ": x is overwritten in place and must not have overlapping elements (an expanded view?), got strides ",
              x.strides());
  if (x.numel() == 0) return;
  const int64_t cp = weight.size(0);
  at::Tensor conv;
  if (route(algo, x, weight) == Route::kDirect) {
    conv = at::empty({x.size(0), cp, x.size(2), x.size(3)}, x.options());
    run_direct(x, weight, conv, dilation, dt, op);
  } else {
    conv = aten_conv(x, weight, dilation);
  }
  x.narrow(1, 0, cp).copy_(conv);
}

// grad_x = grad_out with its first cp channels replaced by the transposed convolution of
// grad_out[:, :cp]; grad_weight from x[:, :cp] and grad_out[:, :cp] (ATen's convolution backward on
// the views). output_mask = (grad_x, grad_weight) to compute; a masked-off gradient is returned as a
// tensor of 0 elements.
std::tuple<at::Tensor, at::Tensor> channel_partial_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& weight, at::IntArrayRef dilation,
                                                                   std::array<bool, 2> output_mask) {
  const char* op = "trous.channel_partial_conv2d_backward";
  check_devices(op, {{"grad_out", grad_out}, {"x", x}, {"weight", weight}});
  const int64_t one[2] = {1, 1};
  const DType dt = check_args(op, x, weight, one, dilation);
  TORCH_CHECK(grad_out.sym_sizes() == x.sym_sizes(), op, ": grad_out must have the shape of x (", x.sym_sizes(),
              "), got ", grad_out.sym_sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (", x.scalar_type(),
              "), got ", grad_out.scalar_type());
  at::Tensor gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Preserve) : at::empty_symint({0}, x.options());
  at::Tensor gw =
      output_mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::empty_symint({0}, weight.options());
  if (x.is_meta()) return {gx, gw};
  const int64_t cp = weight.size(0), C = x.size(1);
  if (x.numel() == 0) {
    if (output_mask[1]) gw.zero_();
    return {gx, gw};
  }
  const std::vector<int64_t> padding{dilation[0] * (weight.size(2) - 1) / 2, dilation[1] * (weight.size(3) - 1) / 2};
  // grad_x where the forward's "auto" takes the direct kernel: the transposed convolution of
  // grad_out[:, :cp] (stride 1, "same" padding) is the correlation with the kernel flipped and its
  // channels transposed, so the forward's direct kernel writes all of grad_x in one pass (convolved
  // channels from the strided view, the others copied from grad_out): no contiguous copy of
  // grad_out[:, :cp], no second pass over grad_x.
  const bool direct_gx = output_mask[0] && route(Algo::kAuto, grad_out, weight) == Route::kDirect &&
                         (gx.stride(3) == 1 || gx.size(3) == 1);
  if (direct_gx) {
    run_direct(grad_out, weight.flip({2, 3}).transpose(0, 1), gx, dilation, dt, op);
    if (!output_mask[1]) return {gx, gw};
  }
  auto grads =
      at::convolution_backward(grad_out.narrow(1, 0, cp), x.narrow(1, 0, cp), weight, std::nullopt, {1, 1}, padding,
                               dilation, false, {0, 0}, 1, {output_mask[0] && !direct_gx, output_mask[1], false});
  if (output_mask[0] && !direct_gx) {
    gx.narrow(1, 0, cp).copy_(std::get<0>(grads));
    if (C > cp) gx.narrow(1, cp, C - cp).copy_(grad_out.narrow(1, cp, C - cp));
  }
  if (output_mask[1]) gw.copy_(std::get<1>(grads));
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(trous, m) {
  // x: [N, C, H, W] fp32/fp16/bf16 (any strides); weight: [cp, cp, kh, kw] (odd kh, kw), cp <= C.
  // out[:, :cp] = conv2d(x[:, :cp], weight, stride 1, "same" padding, dilation); out[:, cp:] = x[:, cp:].
  m.def(
      "channel_partial_conv2d(Tensor x, Tensor weight, int[2] stride=[1, 1], int[2] dilation=[1, 1], "
      "str algo=\"auto\") -> Tensor");
  m.def(
      "channel_partial_conv2d_(Tensor(a!) x, Tensor weight, int[2] stride=[1, 1], int[2] dilation=[1, 1], "
      "str algo=\"auto\") -> ()");
  m.def(
      "channel_partial_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] dilation, bool[2] "
      "output_mask) -> (Tensor, Tensor)");
  m.def("channel_partial_conv2d_route(Tensor x, Tensor weight, str algo=\"auto\") -> str");
}

TORCH_LIBRARY_IMPL(trous, CompositeExplicitAutograd, m) {
  m.impl("channel_partial_conv2d_route", &channel_partial_conv2d_route);
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("channel_partial_conv2d", &channel_partial_conv2d);
  m.impl("channel_partial_conv2d_", &channel_partial_conv2d_);
  m.impl("channel_partial_conv2d_backward", &channel_partial_conv2d_backward);
}

TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("channel_partial_conv2d", &channel_partial_conv2d);
  m.impl("channel_partial_conv2d_", &channel_partial_conv2d_);
  m.impl("channel_partial_conv2d_backward", &channel_partial_conv2d_backward);
}

TORCH_LIBRARY_IMPL(trous, Autograd, m) {
  TROUS_NO_AUTOGRAD(m, "channel_partial_conv2d_");
  TROUS_NO_AUTOGRAD(m, "channel_partial_conv2d_backward");
}

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("channel_partial_conv2d", &channel_partial_conv2d);
  m.impl("channel_partial_conv2d_", &channel_partial_conv2d_);
  m.impl("channel_partial_conv2d_backward", &channel_partial_conv2d_backward);
}
#endif

}  // namespace pconv
}  // namespace trous
