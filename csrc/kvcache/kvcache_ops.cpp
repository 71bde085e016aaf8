// KV-cache quantization ops: argument checks (one place per op), dtype mapping, and the call into the
// CPU kernel or the CUDA launcher on the current stream, and the schemas.
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

// Every op below is ONE function registered for CPU, CUDA and Meta: check_devices first, then every
// argument validated from sym sizes, dtypes and the non-tensor arguments only (symbolic shapes of
// torch.compile(dynamic=True) pass), outputs allocated with empty_symint, and a return before any
// data is read when the tensors are meta. The fake kernel therefore refuses exactly what the real
// kernel refuses, with the same message.

DType out_dtype(at::ScalarType t, const char* op) { return trous::float_dtype(t, op, "dtype"); }

// Parameters are fp32, or fp16 for fp16 input only: bf16 parameters are refused (their error on the
// minimum exceeds an 8-bit step, kvcache.md) and fp16 ones cannot hold the range of fp32 or bf16
// input (a group above 65504 would get an infinite minimum or scale).
ParamType param_type(at::ScalarType t, const char* op, const char* name) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf, op, ": ", name, " must be float32 or float16, got ", t);
  return t == at::kHalf ? ParamType::kFloat16 : ParamType::kFloat32;
}

ParamType quant_param_type(at::ScalarType t, at::ScalarType x, const char* op) {
  const ParamType p = param_type(t, op, "param_dtype");
  TORCH_CHECK(p == ParamType::kFloat32 || x == at::kHalf, op,
              ": param_dtype float16 cannot hold the range of x's dtype ", x,
              " (values beyond 65504 would overflow the scale and minimum); use float32, got param_dtype ", t,
              " for x of dtype ", x);
  return p;
}

void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8, got ", bits);
}

void check_symmetric(bool symmetric, int64_t bits, const char* op) {
  TORCH_CHECK(!symmetric || bits == 8, op, ": symmetric quantization is int8 only, got bits = ", bits);
}

// x: [B, H, T, D] fp32/fp16/bf16 with D a positive multiple of 8 (any strides).
DType check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape [B, H, T, D], got ", x.dim(), " dimensions ", x.sym_sizes());
  const DType dt = trous::float_dtype(x.scalar_type(), op, "x");
  TORCH_CHECK(x.sym_size(3) > 0 && x.sym_size(3) % 8 == 0, op,
              ": head dimension D = x.size(3) must be a positive multiple of 8, got ", x.sym_size(3));
  return dt;
}

// Rows with the last dimension contiguous (other strides free); a strided last dimension is copied once.
at::Tensor rows_input(const at::Tensor& x) { return x.stride(3) == 1 || x.size(3) == 1 ? x : x.contiguous(); }

RowLayout row_layout(const at::Tensor& x) {
  return RowLayout{x.size(0), x.size(1), x.size(2), x.size(3), RowStrides{x.stride(0), x.stride(1), x.stride(2)}};
}

void check_codes(const at::Tensor& codes, const char* op, at::ScalarType dtype) {
  TORCH_CHECK(codes.dim() == 4, op, ": codes must have shape [B, H, T, D_packed], got ", codes.dim(), " dimensions ",
              codes.sym_sizes());
  TORCH_CHECK(codes.scalar_type() == dtype, op, ": codes must be ", dtype, ", got ", codes.scalar_type());
  TORCH_CHECK(codes.is_contiguous(), op, ": codes must be contiguous (as produced by the quantize op)");
}

// D of packed codes: codes.size(3) * 8 / bits (symmetric int8: codes.size(3)), a positive multiple of 8.
c10::SymInt codes_head_dim(const at::Tensor& codes, int64_t bits, bool unpacked, const char* op) {
  const c10::SymInt D = unpacked ? codes.sym_size(3) : codes.sym_size(3) * 8 / bits;
  TORCH_CHECK(D > 0 && D % 8 == 0, op, ": head dimension D = codes.size(3)", unpacked ? "" : " * 8 / bits",
              " must be a positive multiple of 8, got ", D);
  return D;
}

void check_params(const at::Tensor& params, const char* op, c10::SymIntArrayRef expected) {
  TORCH_CHECK(params.sym_sizes() == expected, op, ": params must have shape ", expected, ", got ", params.sym_sizes());
  TORCH_CHECK(params.is_contiguous(), op, ": params must be contiguous");
}

void check_token_group(int64_t group, const c10::SymInt& D, const char* what, const char* op) {
  TORCH_CHECK(group > 0 && group % 8 == 0, op, ": group_size must be a positive multiple of 8, got ", group);
  TORCH_CHECK(D % group == 0, op, ": group_size ", group, " must divide ", what, " = ", D);
}

std::tuple<at::Tensor, at::Tensor> kv_quantize(const at::Tensor& x_in, int64_t bits, int64_t group_size, bool symmetric,
                                               at::ScalarType param_dtype) {
  const char* op = "trous.kv_quantize";
  check_devices(op, {{"x", x_in}});
  const DType dt = check_x(x_in, op);
  check_bits(bits, op);
  check_symmetric(symmetric, bits, op);
  const c10::SymInt D = x_in.sym_size(3);
  check_token_group(group_size, D, "D = x.size(3)", op);
  const ParamType pt = quant_param_type(param_dtype, x_in.scalar_type(), op);
  const auto sz = x_in.sym_sizes();
  auto codes = at::empty_symint({sz[0], sz[1], sz[2], symmetric ? D : D * bits / 8},
                                x_in.options().dtype(symmetric ? at::kChar : at::kByte));
  auto params =
      at::empty_symint({sz[0], sz[1], sz[2], D / group_size, symmetric ? 1 : 2}, x_in.options().dtype(param_dtype));
  if (x_in.is_meta()) return {codes, params};
  const at::Tensor x = rows_input(x_in);
  TokenQuantArgs a{row_layout(x), (int)bits, (int)group_size, symmetric, pt};
  a.limit = finite_limit(dt);
  auto* codes_ptr = static_cast<uint8_t*>(codes.data_ptr());
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
  check_devices(op, {{"codes", codes}, {"params", params}});
  check_bits(bits, op);
  check_symmetric(symmetric, bits, op);
  check_codes(codes, op, symmetric ? at::kChar : at::kByte);
  const c10::SymInt D = codes_head_dim(codes, bits, symmetric, op);
  check_token_group(group_size, D, "D", op);
  const auto sz = codes.sym_sizes();
  check_params(params, op, {sz[0], sz[1], sz[2], D / group_size, symmetric ? 1 : 2});
  const ParamType pt = param_type(params.scalar_type(), op, "params");
  const DType dt = out_dtype(dtype, op);
  auto out = at::empty_symint({sz[0], sz[1], sz[2], D}, codes.options().dtype(dtype));
  if (codes.is_meta()) return out;
  const TokenDequantArgs a{codes.size(0) * codes.size(1) * codes.size(2),
                           codes.size(3) * (symmetric ? 1 : 8 / bits),
                           (int)bits,
                           (int)group_size,
                           symmetric,
                           pt};
  auto* codes_ptr = static_cast<const uint8_t*>(codes.data_ptr());
  run_on_device(
      codes, op, [&] { cpu_dequantize_token(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_dequantize_token(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a, stream));
      });
  return out;
}

void check_channel_group(int64_t group, const c10::SymInt& T, const char* what, const char* op) {
  TORCH_CHECK(group > 0, op, ": group_size must be positive, got ", group);
  TORCH_CHECK(T % group == 0, op, ": T = ", what, " = ", T, " must be a multiple of group_size ", group,
              " (KIVI quantizes complete token groups only; keep the rest as the full-precision residual)");
}

std::tuple<at::Tensor, at::Tensor> kv_quantize_channel(const at::Tensor& x_in, int64_t bits, int64_t group_size,
                                                       at::ScalarType param_dtype) {
  const char* op = "trous.kv_quantize_channel";
  check_devices(op, {{"x", x_in}});
  const DType dt = check_x(x_in, op);
  check_bits(bits, op);
  const auto sz = x_in.sym_sizes();
  check_channel_group(group_size, sz[2], "x.size(2)", op);
  const ParamType pt = quant_param_type(param_dtype, x_in.scalar_type(), op);
  auto codes = at::empty_symint({sz[0], sz[1], sz[2], sz[3] * bits / 8}, x_in.options().dtype(at::kByte));
  auto params = at::empty_symint({sz[0], sz[1], sz[2] / group_size, sz[3], 2}, x_in.options().dtype(param_dtype));
  if (x_in.is_meta()) return {codes, params};
  const at::Tensor x = rows_input(x_in);
  ChannelQuantArgs a{row_layout(x), (int)bits, (int)group_size, pt};
  a.limit = finite_limit(dt);
  auto* codes_ptr = static_cast<uint8_t*>(codes.data_ptr());
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
  check_devices(op, {{"codes", codes}, {"params", params}});
  check_bits(bits, op);
  check_codes(codes, op, at::kByte);
  const c10::SymInt D = codes_head_dim(codes, bits, false, op);
  const auto sz = codes.sym_sizes();
  check_channel_group(group_size, sz[2], "codes.size(2)", op);
  check_params(params, op, {sz[0], sz[1], sz[2] / group_size, D, 2});
  const ParamType pt = param_type(params.scalar_type(), op, "params");
  const DType dt = out_dtype(dtype, op);
  auto out = at::empty_symint({sz[0], sz[1], sz[2], D}, codes.options().dtype(dtype));
  if (codes.is_meta()) return out;
  const ChannelDequantArgs a{codes.size(0) * codes.size(1) * codes.size(2),
                             codes.size(2),
                             codes.size(3) * 8 / bits,
                             (int)bits,
                             (int)group_size,
                             pt};
  auto* codes_ptr = static_cast<const uint8_t*>(codes.data_ptr());
  run_on_device(
      codes, op, [&] { cpu_dequantize_channel(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a); },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_dequantize_channel(dt, codes_ptr, params.data_ptr(), out.data_ptr(), a, stream));
      });
  return out;
}

Fp8Format fp8_format(c10::string_view format, const char* op) {
  const std::string f(format);
  TORCH_CHECK(f == "e4m3" || f == "e5m2", op, ": format must be \"e4m3\" or \"e5m2\", got \"", f, "\"");
  return f == "e4m3" ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
}

// scale: fp32, one value ([] or [1]) or one per head ([H]), any strides; returns whether it is per head.
bool check_fp8_scale(const at::Tensor& scale, const c10::SymInt& H, const char* op) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  const bool per_tensor = scale.dim() == 0 || (scale.dim() == 1 && scale.sym_size(0) == 1);
  TORCH_CHECK(per_tensor || (scale.dim() == 1 && scale.sym_size(0) == H), op,
              ": scale must have shape [] or [1] (per tensor) or [H] = [", H, "] (per head), got ", scale.sym_sizes());
  return !per_tensor;
}

// The scale's values (data, so after the meta return): on CPU every value must be finite and positive.
// On CUDA reading them would cost a host sync per call: the kernels turn an invalid scale into NaN
// codes / outputs instead (fp8_scale_ok).
const float* fp8_scale_values(const at::Tensor& scale_c, const char* op) {
  const float* s = scale_c.data_ptr<float>();
  if (scale_c.device().is_cpu()) {
    for (int64_t i = 0; i < scale_c.numel(); ++i) {
      TORCH_CHECK_VALUE(fp8_scale_ok(s[i]), op, ": scale must be finite and positive, got scale[", i, "] = ", s[i]);
    }
  }
  return s;
}

at::Tensor kv_quantize_fp8(const at::Tensor& x_in, const at::Tensor& scale, c10::string_view format) {
  const char* op = "trous.kv_quantize_fp8";
  check_devices(op, {{"x", x_in}, {"scale", scale}});
  const DType dt = check_x(x_in, op);
  const Fp8Format f = fp8_format(format, op);
  const bool per_head = check_fp8_scale(scale, x_in.sym_size(1), op);
  auto codes = at::empty_symint(x_in.sym_sizes(), x_in.options().dtype(at::kByte));
  if (x_in.is_meta()) return codes;
  const at::Tensor x = rows_input(x_in);
  const at::Tensor scale_c = scale.contiguous();
  const float* s = fp8_scale_values(scale_c, op);
  const Fp8Args a{row_layout(x), f, per_head};
  auto* codes_ptr = static_cast<uint8_t*>(codes.data_ptr());
  run_on_device(
      x, op, [&] { cpu_quantize_fp8(dt, x.data_ptr(), s, codes_ptr, a); },
      [&](void* stream) { TROUS_CUDA_ONLY(launch_quantize_fp8(dt, x.data_ptr(), s, codes_ptr, a, stream)); });
  return codes;
}

at::Tensor kv_dequantize_fp8(const at::Tensor& codes, const at::Tensor& scale, c10::string_view format,
                             at::ScalarType dtype) {
  const char* op = "trous.kv_dequantize_fp8";
  check_devices(op, {{"codes", codes}, {"scale", scale}});
  check_codes(codes, op, at::kByte);
  codes_head_dim(codes, 8, true, op);
  const Fp8Format f = fp8_format(format, op);
  const bool per_head = check_fp8_scale(scale, codes.sym_size(1), op);
  const DType dt = out_dtype(dtype, op);
  auto out = at::empty_symint(codes.sym_sizes(), codes.options().dtype(dtype));
  if (codes.is_meta()) return out;
  const at::Tensor scale_c = scale.contiguous();
  const float* s = fp8_scale_values(scale_c, op);
  const int64_t rows = codes.size(0) * codes.size(1) * codes.size(2);
  auto* codes_ptr = static_cast<const uint8_t*>(codes.data_ptr());
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

// The fake kernels are the ops themselves (they return before reading data on meta tensors).
TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("kv_quantize", &kv_quantize);
  m.impl("kv_dequantize", &kv_dequantize);
  m.impl("kv_quantize_channel", &kv_quantize_channel);
  m.impl("kv_dequantize_channel", &kv_dequantize_channel);
  m.impl("kv_quantize_fp8", &kv_quantize_fp8);
  m.impl("kv_dequantize_fp8", &kv_dequantize_fp8);
}

// No KV op has a derivative: inputs that require grad are refused (instead of an output whose
// backward silently leaves their .grad None).
TORCH_LIBRARY_IMPL(trous, Autograd, m) {
  TROUS_NO_AUTOGRAD(m, "kv_quantize");
  TROUS_NO_AUTOGRAD(m, "kv_dequantize");
  TROUS_NO_AUTOGRAD(m, "kv_quantize_channel");
  TROUS_NO_AUTOGRAD(m, "kv_dequantize_channel");
  TROUS_NO_AUTOGRAD(m, "kv_quantize_fp8");
  TROUS_NO_AUTOGRAD(m, "kv_dequantize_fp8");
}

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
