// Mask-aware partial convolution (NVIDIA's PartialConv2d/3d): the fused epilogue ops, their one
// validation (shared by the CPU, CUDA and Meta kernels) and registrations. The convolution of the
// masked input and the box sum S of the mask run in ATen (oneDNN / cuDNN); the forward composition
// and the autograd are in python/trous/pconv/masked.py.
//
//   masked_partial_epilogue(raw, S, bias, K, mode) -> (out, new_mask): one pass reading raw and
//     writing out (ratio, bias and mask update; math in masked_epilogue.h), the new mask written by
//     the same kernel;
//   masked_partial_epilogue_backward(grad_out, S, K, mode, has_bias) -> (grad_raw, grad_bias): one
//     pass reading grad_out and writing grad_raw, the bias gradient reduced on the way.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <string>

#include "pconv/masked_epilogue_cpu.h"
#include "trous/checks_ops.h"
#ifdef TROUS_WITH_CUDA
#include "pconv/masked_epilogue_cuda.h"
#endif

namespace trous {
namespace pconv {
namespace {

MaskedMode parse_mode(c10::string_view s, const char* op) {
  if (s == "exact") return MaskedMode::kExact;
  TORCH_CHECK_VALUE(s == "nvidia", op, ": form (the mode) must be \"exact\" or \"nvidia\", got \"", std::string(s),
                    "\"");
  return MaskedMode::kNvidia;
}

// raw (or grad_out): [N, C, spatial...] (3 to 5 dimensions), fp32/fp16/bf16/fp64; S: [N or 1, G, spatial...]
// of the accumulation dtype (fp32; fp64 for fp64) with G dividing C.
DType check_common(const char* op, const char* rname, const at::Tensor& raw, const at::Tensor& S, double K) {
  TORCH_CHECK(raw.dim() >= 3 && raw.dim() <= 5, op, ": ", rname,
              " must have shape [N, C, spatial...] (3 to 5 dims), got ", raw.dim(), " dimensions ", raw.sym_sizes());
  const DType dt = float_dtype(raw.scalar_type(), op, rname, /*with_float64=*/true);
  const at::ScalarType sdt = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(S.scalar_type() == sdt, op, ": S must be ", sdt, " (the accumulation dtype of ", rname, "), got ",
              S.scalar_type());
  TORCH_CHECK(S.dim() == raw.dim(), op, ": S must have ", raw.dim(), " dimensions [N or 1, G, spatial...], got ",
              S.dim(), " dimensions ", S.sym_sizes());
  TORCH_CHECK(S.sym_size(0) == 1 || S.sym_size(0) == raw.sym_size(0), op, ": S.size(0) must be 1 or ", rname,
              ".size(0) = ", raw.sym_size(0), ", got ", S.sym_sizes());
  TORCH_CHECK(S.sym_size(1) >= 1 && raw.sym_size(1) % S.sym_size(1) == 0, op, ": S.size(1) (groups of the mask) must ",
              "divide ", rname, ".size(1) = ", raw.sym_size(1), ", got ", S.sym_sizes());
  for (int64_t d = 2; d < raw.dim(); ++d)
    TORCH_CHECK(S.sym_size(d) == raw.sym_size(d), op, ": S must have the spatial shape of ", rname, " (",
                raw.sym_sizes(), "), got ", S.sym_sizes());
  TORCH_CHECK_VALUE(K > 0, op, ": K (the window size) must be > 0, got ", K);
  return dt;
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.dim() >= 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

MaskedEpilogueArgs make_args(const at::Tensor& t, const at::Tensor& S, double K, MaskedMode mode, bool has_bias,
                             at::MemoryFormat mf) {
  MaskedEpilogueArgs a{};
  a.N = t.size(0);
  a.C = t.size(1);
  a.P = 1;
  for (int64_t d = 2; d < t.dim(); ++d) a.P *= t.size(d);
  a.Ns = S.size(0);
  a.G = S.size(1);
  if (mf == at::MemoryFormat::Contiguous) {
    a.sn = a.C * a.P, a.sc = a.P, a.sp = 1;
  } else {
    a.sn = a.P * a.C, a.sc = 1, a.sp = a.C;
  }
  a.K = K;
  a.mode = mode;
  a.has_bias = has_bias;
  return a;
}

void check_bias(const char* op, const at::Tensor& raw, const std::optional<at::Tensor>& bias) {
  if (!(bias.has_value() && bias->defined())) return;
  TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == raw.sym_size(1), op, ": bias must have shape [", raw.sym_size(1),
              "] (raw.size(1)), got ", bias->sym_sizes());
  TORCH_CHECK(bias->scalar_type() == raw.scalar_type(), op, ": bias must have the dtype of raw (", raw.scalar_type(),
              "), got ", bias->scalar_type());
}

// The kernel from r into out (out may be r itself).
void run_epilogue(const char* op, DType dt, const at::Tensor& r, const at::Tensor& S,
                  const std::optional<at::Tensor>& bias, double K, MaskedMode mode, const at::Tensor& out,
                  const at::Tensor& new_mask, at::MemoryFormat mf) {
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor s = S.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const MaskedEpilogueArgs a = make_args(r, s, K, mode, has_bias, mf);
  run_on_device(
      r, op,
      [&] {
        cpu_masked_epilogue(dt, r.data_ptr(), s.data_ptr(), has_bias ? b.data_ptr() : nullptr, out.data_ptr(),
                            new_mask.data_ptr(), a);
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(launch_masked_epilogue(dt, r.data_ptr(), s.data_ptr(), has_bias ? b.data_ptr() : nullptr,
                                               out.data_ptr(), new_mask.data_ptr(), a, stream));
      });
}

// In place (inference: no derivative): raw is overwritten with out; returns the new mask.
at::Tensor masked_partial_epilogue_(at::Tensor& raw, const at::Tensor& S, const std::optional<at::Tensor>& bias,
                                    double K, c10::string_view mode_name) {
  const char* op = "trous.masked_partial_epilogue_";
  check_devices(op, {{"raw", raw}, {"S", S}, {"bias", defined_or_empty(bias)}});
  const DType dt = check_common(op, "raw", raw, S, K);
  const MaskedMode mode = parse_mode(mode_name, op);
  check_bias(op, raw, bias);
  at::Tensor new_mask = at::empty_symint(S.sym_sizes(), raw.options().memory_format(at::MemoryFormat::Contiguous));
  if (raw.is_meta()) return new_mask;
  const at::MemoryFormat mf = format_of(raw);
  if (raw.is_contiguous(mf)) {
    run_epilogue(op, dt, raw, S, bias, K, mode, raw, new_mask, mf);
  } else {
    TORCH_CHECK(at::has_internal_overlap(raw) != at::MemOverlap::Yes || raw.numel() == 0, op,
                ": raw is overwritten in place and must not have overlapping elements, got strides ", raw.strides());
    const at::Tensor r = raw.contiguous(mf);
    run_epilogue(op, dt, r, S, bias, K, mode, r, new_mask, mf);
    raw.copy_(r);
  }
  return new_mask;
}

std::tuple<at::Tensor, at::Tensor> masked_partial_epilogue(const at::Tensor& raw, const at::Tensor& S,
                                                           const std::optional<at::Tensor>& bias, double K,
                                                           c10::string_view mode_name) {
  const char* op = "trous.masked_partial_epilogue";
  check_devices(op, {{"raw", raw}, {"S", S}, {"bias", defined_or_empty(bias)}});
  const DType dt = check_common(op, "raw", raw, S, K);
  const MaskedMode mode = parse_mode(mode_name, op);
  check_bias(op, raw, bias);
  const at::MemoryFormat mf = format_of(raw);
  at::Tensor out = at::empty_symint(raw.sym_sizes(), raw.options().memory_format(mf));
  at::Tensor new_mask = at::empty_symint(S.sym_sizes(), raw.options().memory_format(at::MemoryFormat::Contiguous));
  if (raw.is_meta()) return {out, new_mask};
  run_epilogue(op, dt, raw.contiguous(mf), S, bias, K, mode, out, new_mask, mf);
  return {out, new_mask};
}

// grad_raw = grad_out * ratio (elementwise, into grad_raw) and the bias gradient (returned).
at::Tensor epilogue_backward_into(const char* op, DType dt, const at::Tensor& grad_out, const at::Tensor& S, double K,
                                  MaskedMode mode, bool has_bias, at::MemoryFormat mf, const at::Tensor& grad_raw) {
  at::Tensor grad_bias = has_bias ? at::empty_symint({grad_out.sym_size(1)}, grad_out.options())
                                  : at::empty_symint({0}, grad_out.options());
  if (grad_out.is_meta()) return grad_bias;
  const at::Tensor g = grad_out.contiguous(mf);
  const at::Tensor s = S.contiguous();
  const MaskedEpilogueArgs a = make_args(g, s, K, mode, has_bias, mf);
  const auto acc = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
  at::Tensor partial;
  run_on_device(
      grad_out, op,
      [&] {
        partial = at::zeros({a.N, a.C}, grad_out.options().dtype(acc));
        cpu_masked_epilogue_backward(dt, g.data_ptr(), s.data_ptr(), grad_raw.data_ptr(), partial.data_ptr(), a);
      },
      [&](void* stream) {
        TROUS_CUDA_ONLY(partial = at::zeros({masked_backward_chunks(a), a.C}, grad_out.options().dtype(acc));
                        launch_masked_epilogue_backward(dt, g.data_ptr(), s.data_ptr(), grad_raw.data_ptr(),
                                                        partial.data_ptr(), a, stream));
      });
  if (has_bias) grad_bias.copy_(partial.sum(0));
  return grad_bias;
}

std::tuple<at::Tensor, at::Tensor> masked_partial_epilogue_backward(const at::Tensor& grad_out, const at::Tensor& S,
                                                                    double K, c10::string_view mode_name,
                                                                    bool has_bias) {
  const char* op = "trous.masked_partial_epilogue_backward";
  check_devices(op, {{"grad_out", grad_out}, {"S", S}});
  const DType dt = check_common(op, "grad_out", grad_out, S, K);
  const MaskedMode mode = parse_mode(mode_name, op);
  const at::MemoryFormat mf = format_of(grad_out);
  at::Tensor grad_raw = at::empty_symint(grad_out.sym_sizes(), grad_out.options().memory_format(mf));
  at::Tensor grad_bias = epilogue_backward_into(op, dt, grad_out, S, K, mode, has_bias, mf, grad_raw);
  return {grad_raw, grad_bias};
}

// The same into a caller's buffer (python/trous/pconv/masked.py passes a reused scratch tensor):
// grad_raw must have grad_out's shape and dtype and be contiguous in grad_out's memory format; it is
// overwritten entirely. Returns the bias gradient.
at::Tensor masked_partial_epilogue_backward_into(const at::Tensor& grad_out, const at::Tensor& S, double K,
                                                 c10::string_view mode_name, bool has_bias, at::Tensor& grad_raw) {
  const char* op = "trous.masked_partial_epilogue_backward_into";
  check_devices(op, {{"grad_out", grad_out}, {"S", S}, {"grad_raw", grad_raw}});
  const DType dt = check_common(op, "grad_out", grad_out, S, K);
  const MaskedMode mode = parse_mode(mode_name, op);
  const at::MemoryFormat mf = format_of(grad_out);
  TORCH_CHECK(grad_raw.sym_sizes() == grad_out.sym_sizes(), op, ": grad_raw must have the shape of grad_out (",
              grad_out.sym_sizes(), "), got ", grad_raw.sym_sizes());
  TORCH_CHECK(grad_raw.scalar_type() == grad_out.scalar_type(), op, ": grad_raw must have the dtype of grad_out (",
              grad_out.scalar_type(), "), got ", grad_raw.scalar_type());
  TORCH_CHECK(grad_raw.is_contiguous(mf), op, ": grad_raw must be contiguous in grad_out's memory format (", mf,
              "), got strides ", grad_raw.strides());
  if (!grad_out.is_meta() && grad_raw.numel() > 0) {
    TORCH_CHECK(!grad_raw.is_same(grad_out) && at::get_overlap_status(grad_raw, grad_out) == at::MemOverlapStatus::No,
                op, ": grad_raw must not overlap grad_out");
  }
  return epilogue_backward_into(op, dt, grad_out, S, K, mode, has_bias, mf, grad_raw);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(trous, m) {
  // raw: [N, C, spatial...] (the convolution of the masked input, no bias); S: [N or 1, G, spatial...]
  // fp32 (fp64 for fp64 raw), the mask's window sums; K: the window size; form: the mode, "exact" or
  // "nvidia" (not named `mode`: torch's mode redirection of in-place ops takes that keyword).
  m.def(
      "masked_partial_epilogue(Tensor raw, Tensor S, Tensor? bias, float K, str form=\"exact\") -> (Tensor, "
      "Tensor)");
  // In place (inference): raw overwritten with out; returns the new mask.
  m.def("masked_partial_epilogue_(Tensor(a!) raw, Tensor S, Tensor? bias, float K, str form=\"exact\") -> Tensor");
  m.def(
      "masked_partial_epilogue_backward(Tensor grad_out, Tensor S, float K, str form, bool has_bias) -> (Tensor, "
      "Tensor)");
  // The same into grad_raw (overwritten; grad_out's shape, dtype and memory format); returns grad_bias.
  m.def(
      "masked_partial_epilogue_backward_into(Tensor grad_out, Tensor S, float K, str form, bool has_bias, "
      "Tensor(a!) grad_raw) -> Tensor");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("masked_partial_epilogue_backward_into", &masked_partial_epilogue_backward_into);
  m.impl("masked_partial_epilogue", &masked_partial_epilogue);
  m.impl("masked_partial_epilogue_", &masked_partial_epilogue_);
  m.impl("masked_partial_epilogue_backward", &masked_partial_epilogue_backward);
}

TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("masked_partial_epilogue_backward_into", &masked_partial_epilogue_backward_into);
  m.impl("masked_partial_epilogue", &masked_partial_epilogue);
  m.impl("masked_partial_epilogue_", &masked_partial_epilogue_);
  m.impl("masked_partial_epilogue_backward", &masked_partial_epilogue_backward);
}

TORCH_LIBRARY_IMPL(trous, Autograd, m) {
  TROUS_NO_AUTOGRAD(m, "masked_partial_epilogue_");
  TROUS_NO_AUTOGRAD(m, "masked_partial_epilogue_backward");
  TROUS_NO_AUTOGRAD(m, "masked_partial_epilogue_backward_into");
}

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("masked_partial_epilogue_backward_into", &masked_partial_epilogue_backward_into);
  m.impl("masked_partial_epilogue", &masked_partial_epilogue);
  m.impl("masked_partial_epilogue_", &masked_partial_epilogue_);
  m.impl("masked_partial_epilogue_backward", &masked_partial_epilogue_backward);
}
#endif

}  // namespace pconv
}  // namespace trous
