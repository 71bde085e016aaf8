// KV-cache quantization ops: argument checks (one place per op), dtype mapping, and the call into the
// CPU kernel or the CUDA launcher on the current stream. Schemas are in ops.cpp.
#include <torch/library.h>

#include "trous/checks_ops.h"
#include "kvcache/quantize.h"
#include "kvcache/quantize_cpu.h"
#ifdef TROUS_WITH_CUDA
#include "kvcache/quantize_cuda.h"
#endif

namespace trous {
namespace kv {
namespace {

DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  return trous::float_dtype(t.scalar_type(), op, name);
}

DType out_dtype(at::ScalarType t, const char* op) { return trous::float_dtype(t, op, "dtype"); }

ParamType param_type(at::ScalarType t, const char* op, const char* name = "param_dtype") {
  // bf16 parameters are refused: their error on the minimum exceeds an 8-bit step (kvcache.md).
  TORCH_CHECK(t == at::kFloat || t == at::kHalf, op, ": ", name, " must be float32 or float16, got ", t);
  return t == at::kHalf ? ParamType::kFloat16 : ParamType::kFloat32;
}

at::ScalarType param_scalar_type(ParamType t) { return t == ParamType::kFloat16 ? at::kHalf : at::kFloat; }

void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8, got ", bits);
}

// x is [B, H, T, D] with D contiguous (stride 1) and D % 8 == 0; other strides are free. Inputs whose
// last dimension is strided are copied once into a contiguous tensor.
at::Tensor rows_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape [B, H, T, D], got ", x.dim(), " dimensions ", x.sizes());
  float_dtype(x, op, "x");
  TORCH_CHECK(x.size(3) % 8 == 0, op, ": head dimension D = x.size(3) must be a multiple of 8, got ", x.size(3));
  return x.stride(3) == 1 || x.size(3) == 1 ? x : x.contiguous();
}

RowLayout row_layout(const at::Tensor& x) {
  return RowLayout{x.size(0), x.size(1), x.size(2), x.size(3), RowStrides{x.stride(0), x.stride(1), x.stride(2)}};
}

void check_codes(const at::Tensor& codes, const char* op, at::ScalarType dtype, int64_t last) {
  TORCH_CHECK(codes.dim() == 4, op, ": codes must have shape [B, H, T, D_packed], got ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == dtype, op, ": codes must be ", dtype, ", got ", codes.scalar_type());
  TORCH_CHECK(codes.is_contiguous(), op, ": codes must be contiguous (as produced by the quantize op)");
  TORCH_CHECK(last < 0 || codes.size(3) == last, op, ": codes.size(3) must be ", last, ", got ", codes.size(3));
}

void check_params(const at::Tensor& params, const at::Tensor& codes, const char* op, at::IntArrayRef expected) {
  check_same_device(params, codes, op, "params");
  TORCH_CHECK(params.sizes() == expected, op, ": params must have shape ", expected, ", got ", params.sizes());
  TORCH_CHECK(params.is_contiguous(), op, ": params must be contiguous");
  param_type(params.scalar_type(), op, "params");
}

void check_group(int64_t group, int64_t extent, const char* what, const char* op) {
  TORCH_CHECK(group > 0 && group % 8 == 0, op, ": group_size must be a positive multiple of 8, got ", group);
  TORCH_CHECK(extent % group == 0, op, ": group_size ", group, " must divide ", what, " = ", extent);
}

std::tuple<at::Tensor, at::Tensor> kv_quantize(const at::Tensor& x_in, int64_t bits, int64_t group_size, bool symmetric,
                                               at::ScalarType param_dtype) {
  const char* op = "trous.kv_quantize";
  const at::Tensor x = rows_input(x_in, op);
  check_bits(bits, op);
  TORCH_CHECK(!symmetric || bits == 8, op, ": symmetric quantization is int8 only, got bits = ", bits);
  check_group(group_size, x.size(3), "D = x.size(3)", op);
  const TokenQuantArgs a{row_layout(x), (int)bits, (int)group_size, symmetric, param_type(param_dtype, op)};
  auto codes = at::empty({x.size(0), x.size(1), x.size(2), symmetric ? x.size(3) : x.size(3) * bits / 8},
                         x.options().dtype(symmetric ? at::kChar : at::kByte));
  auto params = at::empty({x.size(0), x.size(1), x.size(2), x.size(3) / group_size, symmetric ? 1 : 2},
                          x.options().dtype(param_dtype));
  auto* codes_ptr = static_cast<uint8_t*>(codes.data_ptr());
  const DType dt = float_dtype(x, op, "x");
  run_on_device(
      x, op, [&] { cpu_quantize_token(dt, x.data_ptr(), codes_ptr, params.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_quantize_token(dt, x.data_ptr(), codes_ptr, params.data_ptr(), a, stream));
      });
  return {codes, params};
}

at::Tensor kv_dequantize(const at::Tensor& codes, const at::Tensor& params, int64_t bits, int64_t group_size,
                         bool symmetric, at::ScalarType dtype) {
  const char* op = "trous.kv_dequantize";
  check_bits(bits, op);
  TORCH_CHECK(!symmetric || bits == 8, op, ": symmetric quantization is int8 only, got bits = ", bits);
  check_codes(codes, op, symmetric ? at::kChar : at::kByte, -1);
  TORCH_CHECK((codes.size(3) * 8) % bits == 0, op, ": codes.size(3) * 8 must be a multiple of bits");
  const int64_t D = symmetric ? codes.size(3) : codes.size(3) * 8 / bits;
  TORCH_CHECK(D % 8 == 0, op, ": head dimension D must be a multiple of 8, got ", D);
  check_group(group_size, D, "D", op);
  check_params(params, codes, op, {codes.size(0), codes.size(1), codes.size(2), D / group_size, symmetric ? 1 : 2});
  const TokenDequantArgs a{codes.size(0) * codes.size(1) * codes.size(2), D, (int)bits, (int)group_size, symmetric,
                           param_type(params.scalar_type(), op)};
  const DType dt = out_dtype(dtype, op);
  auto out = at::empty({codes.size(0), codes.size(1), codes.size(2), D}, codes.options().dtype(dtype));
  auto* codes_ptr = static_cast<const uint8_t*>(codes.data_ptr());
  run_on_device(
      codes, op, [&] { cpu_dequantize_token(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_dequantize_token(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a, stream));
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kv_quantize_channel(const at::Tensor& x_in, int64_t bits, int64_t group_size,
                                                       at::ScalarType param_dtype) {
  const char* op = "trous.kv_quantize_channel";
  const at::Tensor x = rows_input(x_in, op);
  check_bits(bits, op);
  TORCH_CHECK(group_size > 0, op, ": group_size must be positive, got ", group_size);
  TORCH_CHECK(x.size(2) % group_size == 0, op, ": T = x.size(2) = ", x.size(2), " must be a multiple of group_size ",
              group_size, " (KIVI quantizes complete token groups only; keep the rest as the full-precision residual)");
  const ChannelQuantArgs a{row_layout(x), (int)bits, (int)group_size, param_type(param_dtype, op)};
  auto codes = at::empty({x.size(0), x.size(1), x.size(2), x.size(3) * bits / 8}, x.options().dtype(at::kByte));
  auto params = at::empty({x.size(0), x.size(1), x.size(2) / group_size, x.size(3), 2}, x.options().dtype(param_dtype));
  auto* codes_ptr = static_cast<uint8_t*>(codes.data_ptr());
  const DType dt = float_dtype(x, op, "x");
  run_on_device(
      x, op, [&] { cpu_quantize_channel(dt, x.data_ptr(), codes_ptr, params.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_quantize_channel(dt, x.data_ptr(), codes_ptr, params.data_ptr(), a, stream));
      });
  return {codes, params};
}

at::Tensor kv_dequantize_channel(const at::Tensor& codes, const at::Tensor& params, int64_t bits, int64_t group_size,
                                 at::ScalarType dtype) {
  const char* op = "trous.kv_dequantize_channel";
  check_bits(bits, op);
  check_codes(codes, op, at::kByte, -1);
  const int64_t D = codes.size(3) * 8 / bits;
  TORCH_CHECK(D % 8 == 0, op, ": head dimension D must be a multiple of 8, got ", D);
  TORCH_CHECK(group_size > 0 && codes.size(2) % group_size == 0, op, ": T = codes.size(2) = ", codes.size(2),
              " must be a multiple of group_size ", group_size);
  check_params(params, codes, op, {codes.size(0), codes.size(1), codes.size(2) / group_size, D, 2});
  const ChannelDequantArgs a{
      codes.size(0) * codes.size(1) * codes.size(2), codes.size(2), D, (int)bits, (int)group_size,
      param_type(params.scalar_type(), op)};
  const DType dt = out_dtype(dtype, op);
  auto out = at::empty({codes.size(0), codes.size(1), codes.size(2), D}, codes.options().dtype(dtype));
  auto* codes_ptr = static_cast<const uint8_t*>(codes.data_ptr());
  run_on_device(
      codes, op, [&] { cpu_dequantize_channel(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_dequantize_channel(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a, stream));
      });
  return out;
}

Fp8Format fp8_format(const std::string& f, const char* op) {
  TORCH_CHECK(f == "e4m3" || f == "e5m2", op, ": format must be \"e4m3\" or \"e5m2\", got \"", f, "\"");
  return f == "e4m3" ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
}

// scale: fp32, one value ([] or [1]) or one per head ([H]); returns whether it is per head.
bool check_fp8_scale(const at::Tensor& scale, const at::Tensor& data, int64_t H, const char* op) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  check_same_device(scale, data, op, "scale");
  TORCH_CHECK(scale.is_contiguous(), op, ": scale must be contiguous");
  const bool per_tensor = scale.numel() == 1 && scale.dim() <= 1;
  TORCH_CHECK(per_tensor || (scale.dim() == 1 && scale.size(0) == H), op,
              ": scale must have shape [] or [1] (per tensor) or [H] = [", H, "] (per head), got ", scale.sizes());
  return !per_tensor;
}

at::Tensor kv_quantize_fp8(const at::Tensor& x_in, const at::Tensor& scale, c10::string_view format) {
  const char* op = "trous.kv_quantize_fp8";
  check_devices(op, {{"x", x_in}, {"scale", scale}});
  TORCH_CHECK(x_in.dim() == 4, op, ": x must have shape [B, H, T, D], got ", x_in.dim(), " dimensions ",
              x_in.sym_sizes());
  const DType dt = float_dtype(x_in, op, "x");
  TORCH_CHECK(x_in.sym_size(3) % 8 == 0, op, ": head dimension D = x.size(3) must be a multiple of 8, got ",
              x_in.sym_size(3));
  const Fp8Format f = fp8_format(std::string(format), op);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  auto codes = at::empty_symint(x_in.sym_sizes(), x_in.options().dtype(at::kByte));
  if (x_in.is_meta()) return codes;
  const at::Tensor x = rows_input(x_in, op);
  const Fp8Args a{row_layout(x), f, check_fp8_scale(scale, x, x.size(1), op)};
  auto* codes_ptr = static_cast<uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  run_on_device(
      x, op, [&] { cpu_quantize_fp8(dt, x.data_ptr(), s, codes_ptr, a); },
      [&](void* stream) { TROUS_CUDA_ONLY(launch_quantize_fp8(dt, x.data_ptr(), s, codes_ptr, a, stream)); });
  return codes;
}

at::Tensor kv_dequantize_fp8(const at::Tensor& codes, const at::Tensor& scale, c10::string_view format,
                             at::ScalarType dtype) {
  const char* op = "trous.kv_dequantize_fp8";
  check_codes(codes, op, at::kByte, -1);
  TORCH_CHECK(codes.size(3) % 8 == 0, op, ": head dimension D = codes.size(3) must be a multiple of 8, got ",
              codes.size(3));
  const Fp8Format f = fp8_format(std::string(format), op);
  const bool per_head = check_fp8_scale(scale, codes, codes.size(1), op);
  const DType dt = out_dtype(dtype, op);
  auto out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  const int64_t rows = codes.size(0) * codes.size(1) * codes.size(2);
  auto* codes_ptr = static_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  run_on_device(
      codes, op,
      [&] {
        cpu_dequantize_fp8(dt, codes_ptr, s, out.data_ptr(), rows, codes.size(1), codes.size(2), codes.size(3), f,
                           per_head);
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_dequantize_fp8(dt, codes_ptr, s, out.data_ptr(), rows, codes.size(1), codes.size(2),
                                              codes.size(3), f, per_head, stream));
      });
  return out;
}

}  // namespace

// Schemas (fake kernels and autograd: python/trous/).
TORCH_LIBRARY_FRAGMENT(trous, m) {
  // KV-cache quantization. x: [B, H, T, D] fp32/fp16/bf16, D % 8 == 0.
  // Per-token groups of G channels: codes uint8 [B, H, T, D * bits / 8] (int8 [B, H, T, D] when
  // symmetric), params [B, H, T, D / G, 2] (scale, min) or [..., 1] (scale) when symmetric.
  m.def("kv_quantize(Tensor x, int bits, int group_size, bool symmetric, ScalarType param_dtype) -> (Tensor, Tensor)");
  m.def(
      "kv_dequantize(Tensor codes, Tensor params, int bits, int group_size, bool symmetric, ScalarType dtype) -> "
      "Tensor");
  // KIVI keys: per (head, channel) over G consecutive tokens (T % G == 0): params [B, H, T / G, D, 2].
  m.def("kv_quantize_channel(Tensor x, int bits, int group_size, ScalarType param_dtype) -> (Tensor, Tensor)");
  m.def("kv_dequantize_channel(Tensor codes, Tensor params, int bits, int group_size, ScalarType dtype) -> Tensor");
  // fp8 e4m3fn / e5m2 bit patterns in uint8 [B, H, T, D]; scale fp32 of shape [] or [H].
  m.def("kv_quantize_fp8(Tensor x, Tensor scale, str format) -> Tensor");
  m.def("kv_dequantize_fp8(Tensor codes, Tensor scale, str format, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("kv_quantize", &kv_quantize);
  m.impl("kv_dequantize", &kv_dequantize);
  m.impl("kv_quantize_channel", &kv_quantize_channel);
  m.impl("kv_dequantize_channel", &kv_dequantize_channel);
  m.impl("kv_quantize_fp8", &kv_quantize_fp8);
  m.impl("kv_dequantize_fp8", &kv_dequantize_fp8);
}

TORCH_LIBRARY_IMPL(trous, Meta, m) { m.impl("kv_quantize_fp8", &kv_quantize_fp8); }
TORCH_LIBRARY_IMPL(trous, Autograd, m) { TROUS_NO_AUTOGRAD(m, "kv_quantize_fp8"); }

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("kv_quantize", &kv_quantize);
  m.impl("kv_dequantize", &kv_dequantize);
  m.impl("kv_quantize_channel", &kv_quantize_channel);
  m.impl("kv_dequantize_channel", &kv_dequantize_channel);
  m.impl("kv_quantize_fp8", &kv_quantize_fp8);
  m.impl("kv_dequantize_fp8", &kv_dequantize_fp8);
}
#endif

}  // namespace kv
}  // namespace trous
