// Sparse attention ops: schemas, the one validation per op (CPU, CUDA and Meta run the same function),
// the Pattern built once per call (global key / row lists from the flags), and the call into the CPU
// kernels or the CUDA launchers.
//
//   sparse_attention_fwd(q, k, v, global_flags, causal, left, right, chunk, dilation, scale, softcap)
//       -> (out, lse)
//   sparse_attention_bwd(grad_out, q, k, v, out, lse, global_flags, causal, left, right, chunk,
//       dilation, scale, softcap, deterministic) -> (grad_q, grad_k, grad_v)
//
// q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D) with any outer strides (a strided last dimension is copied),
// Hq % Hkv == 0, D in 32..256 and a multiple of 8; out (B, Sq, Hq, D) contiguous, lse fp32 (B, Hq, Sq).
// global_flags: bool / uint8 (Sk,) on q's device (query i is global iff flag[i + Sk - Sq]). The pattern
// rules are those of ../shared/spec/attention.md (bottom-right alignment). Fully masked rows: out 0,
// lse -inf, gradients 0.
#include <torch/library.h>

#include <cmath>

#include "attention/attention_cpu.h"
#include "attention/pattern.h"
#include "attention/pattern_ops.h"
#include "trous/checks_ops.h"
#ifdef TROUS_WITH_CUDA
#include "attention/attention_cuda.h"
#define TROUS_ATTENTION_CUDA 1
#else
#define TROUS_ATTENTION_CUDA 0
#endif

namespace trous {
namespace attention {
namespace {

constexpr int64_t kMinHeadDim = 32, kMaxHeadDim = 256;

// Checks q, k, v and the pattern arguments (sym sizes only); returns the kernels' dtype.
DType check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& global_flags, int64_t left, int64_t right, int64_t chunk,
                int64_t dilation, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (B, Sq, Hq, D), got ", q.dim(), " dimensions ", q.sym_sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape (B, Sk, Hkv, D), got ", k.dim(), " dimensions ", k.sym_sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must have shape (B, Sk, Hkv, D), got ", v.dim(), " dimensions ", v.sym_sizes());
  const DType dt = trous::float_dtype(q.scalar_type(), op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": v must have q's dtype ", q.scalar_type(), ", got ",
              v.scalar_type());
  const c10::SymInt D = q.sym_size(3);
  TORCH_CHECK(D >= kMinHeadDim && D <= kMaxHeadDim && D % 8 == 0, op,
              ": head dimension D = q.size(3) must be a multiple of 8 in 32..256, got ", D);
  TORCH_CHECK(k.sym_size(0) == q.sym_size(0), op, ": k must have q's batch size B = ", q.sym_size(0), ", got ",
              k.sym_size(0), " (k of shape ", k.sym_sizes(), ")");
  TORCH_CHECK(k.sym_size(3) == D, op, ": k must have q's head dimension D = ", D, ", got ", k.sym_size(3),
              " (k of shape ", k.sym_sizes(), ")");
  TORCH_CHECK(k.sym_size(2) > 0 || q.sym_size(2) == 0, op,
              ": k must have at least one head (Hkv = k.size(2) > 0), got shape ", k.sym_sizes());
  TORCH_CHECK(k.sym_size(2) == 0 || q.sym_size(2) % k.sym_size(2) == 0, op,
              ": the query heads Hq = q.size(2) = ", q.sym_size(2),
              " must be a multiple of the key/value heads Hkv = k.size(2) = ", k.sym_size(2), " (k of shape ",
              k.sym_sizes(), ")");
  TORCH_CHECK(v.sym_sizes() == k.sym_sizes(), op, ": v must have k's shape ", k.sym_sizes(), ", got ", v.sym_sizes());
  check_pattern_args(op, k.sym_size(1), global_flags, left, right, chunk, dilation);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0: off), got ",
                    softcap);
  return dt;
}

at::Tensor rows_input(const at::Tensor& x) { return x.stride(3) == 1 || x.size(3) <= 1 ? x : x.contiguous(); }

SeqStrides seq_strides(const at::Tensor& x) { return SeqStrides{x.stride(0), x.stride(1), x.stride(2)}; }

#if TROUS_ATTENTION_CUDA
// The CUDA kernels' own head-dim limit by dtype (attention_cuda.h); a device limit, so checked once the
// tensors are known to be CUDA ones (the Meta kernel cannot know the device a fake tensor stands for).
void check_cuda_head_dim(const char* op, DType dt, index_t D) {
  TORCH_CHECK_VALUE(sparse_attention_cuda_supported(dt, D), op, ": head dimension D = q.size(3) = ", D,
                    " is not supported by the CUDA kernels for q of dtype ", dtype_name(dt),
                    " (float32 takes D <= ", kMaxHeadDimFp32, ", float16 / bfloat16 D <= 256)");
}

// The CUDA launchers' params (attention.h) from the same tensors, sizes and Pattern (device arrays).
BSHStrides bsh(const at::Tensor& x) { return BSHStrides{x.stride(0), x.stride(1), x.stride(2)}; }

AttnFwdParams cuda_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                              at::Tensor& lse, const CpuAttnArgs& a) {
  AttnFwdParams p;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = a.B, p.Sq = a.Sq, p.Sk = a.Sk, p.Hq = a.Hq, p.Hkv = a.Hkv, p.D = a.D;
  p.sq = bsh(q), p.sk = bsh(k), p.sv = bsh(v), p.so = bsh(out);
  p.scale = a.scale, p.softcap = a.softcap;
  p.pattern = a.pat;
  return p;
}

AttnBwdParams cuda_bwd_params(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, at::Tensor& gq, at::Tensor& gk,
                              at::Tensor& gv, const CpuAttnArgs& a) {
  AttnBwdParams p;
  p.grad_out = go.data_ptr(), p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.grad_q = gq.data_ptr(), p.grad_k = gk.data_ptr(), p.grad_v = gv.data_ptr();
  p.B = a.B, p.Sq = a.Sq, p.Sk = a.Sk, p.Hq = a.Hq, p.Hkv = a.Hkv, p.D = a.D;
  p.sdo = bsh(go), p.sq = bsh(q), p.sk = bsh(k), p.sv = bsh(v), p.so = bsh(out);
  p.sdq = bsh(gq), p.sdk = bsh(gk), p.sdv = bsh(gv);
  p.scale = a.scale, p.softcap = a.softcap;
  p.pattern = a.pat;
  return p;
}
#endif

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const std::optional<at::Tensor>& global_flags, bool causal,
                                                        int64_t left, int64_t right, int64_t chunk, int64_t dilation,
                                                        double scale, double softcap) {
  const char* op = "trous.sparse_attention_fwd";
  check_devices(op, {{"q", q_in}, {"k", k_in}, {"v", v_in}, {"global_tokens", defined_or_empty(global_flags)}});
  const DType dt = check_qkv(op, q_in, k_in, v_in, global_flags, left, right, chunk, dilation, scale, softcap);
  const auto qs = q_in.sym_sizes();
  auto out = at::empty_symint(qs, q_in.options());
  auto lse = at::empty_symint({qs[0], qs[2], qs[1]}, q_in.options().dtype(at::kFloat));
  if (q_in.is_meta()) return {out, lse};
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q = rows_input(q_in), k = rows_input(k_in), v = rows_input(v_in);
  const PatternHolder ph = build_pattern(q.size(1), k.size(1), global_flags, causal, left, right, chunk, dilation);
  CpuAttnArgs a{};
  a.B = q.size(0), a.Sq = q.size(1), a.Sk = k.size(1), a.Hq = q.size(2), a.Hkv = k.size(2), a.D = q.size(3);
  a.q = seq_strides(q), a.k = seq_strides(k), a.v = seq_strides(v);
  a.o = seq_strides(out);
  a.go = a.o;
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.pat = ph.p;
  run_on_device(
      q, op,
      [&] {
        cpu_sparse_attention_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                 a);
      },
      [&](void* stream) {
#if TROUS_ATTENTION_CUDA
        check_cuda_head_dim(op, dt, a.D);
        const AttnFwdParams prm = cuda_fwd_params(q, k, v, out, lse, a);
        launch_sparse_attention_fwd(dt, prm, stream);
#else
        (void)stream;
        TORCH_CHECK(false, op, ": this trous build has no CUDA attention kernels");
#endif
      });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& global_flags, bool causal,
    int64_t left, int64_t right, int64_t chunk, int64_t dilation, double scale, double softcap, bool deterministic) {
  const char* op = "trous.sparse_attention_bwd";
  check_devices(op, {{"grad_out", grad_out_in},
                     {"q", q_in},
                     {"k", k_in},
                     {"v", v_in},
                     {"out", out_in},
                     {"lse", lse_in},
                     {"global_tokens", defined_or_empty(global_flags)}});
  const DType dt = check_qkv(op, q_in, k_in, v_in, global_flags, left, right, chunk, dilation, scale, softcap);
  const auto qs = q_in.sym_sizes();
  TORCH_CHECK(grad_out_in.sym_sizes() == qs, op, ": grad_out must have q's shape ", qs, ", got ",
              grad_out_in.sym_sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type(), op, ": grad_out must have q's dtype ",
              q_in.scalar_type(), ", got ", grad_out_in.scalar_type());
  TORCH_CHECK(out_in.sym_sizes() == qs, op, ": out must have q's shape ", qs, ", got ", out_in.sym_sizes());
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type(), op, ": out must have q's dtype ", q_in.scalar_type(),
              ", got ", out_in.scalar_type());
  const c10::SymInt lse_shape[3] = {qs[0], qs[2], qs[1]};
  TORCH_CHECK(lse_in.sym_sizes() == c10::SymIntArrayRef(lse_shape, 3), op,
              ": lse must have shape (B, Hq, Sq) = ", c10::SymIntArrayRef(lse_shape, 3), ", got ", lse_in.sym_sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  auto grad_q = at::empty_symint(qs, q_in.options());
  auto grad_k = at::empty_symint(k_in.sym_sizes(), k_in.options());
  auto grad_v = at::empty_symint(v_in.sym_sizes(), v_in.options());
  if (q_in.is_meta()) return {grad_q, grad_k, grad_v};
  if (grad_k.numel() == 0 && grad_q.numel() == 0) return {grad_q, grad_k, grad_v};
  if (grad_q.numel() == 0 || grad_k.numel() == 0) {
    // No query rows (or no keys): nothing attends, every gradient is 0.
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const at::Tensor q = rows_input(q_in), k = rows_input(k_in), v = rows_input(v_in);
  const at::Tensor go = rows_input(grad_out_in), out = rows_input(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const PatternHolder ph = build_pattern(q.size(1), k.size(1), global_flags, causal, left, right, chunk, dilation);
  CpuAttnArgs a{};
  a.B = q.size(0), a.Sq = q.size(1), a.Sk = k.size(1), a.Hq = q.size(2), a.Hkv = k.size(2), a.D = q.size(3);
  a.q = seq_strides(q), a.k = seq_strides(k), a.v = seq_strides(v);
  a.o = seq_strides(out), a.go = seq_strides(go);
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.pat = ph.p;
  run_on_device(
      q, op,
      [&] {
        cpu_sparse_attention_bwd(dt, go.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                 lse.data_ptr<float>(), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), a);
      },
      [&](void* stream) {
#if TROUS_ATTENTION_CUDA
        // (the CUDA backward is always deterministic: no atomics, see attention_cuda.h)
        (void)deterministic;
        check_cuda_head_dim(op, dt, a.D);
        AttnBwdParams prm = cuda_bwd_params(go, q, k, v, out, lse, grad_q, grad_k, grad_v, a);
        const at::Tensor ws = at::empty({static_cast<int64_t>(sparse_attention_bwd_workspace_bytes(prm)) + 256},
                                        q.options().dtype(at::kByte));
        const auto addr = reinterpret_cast<uintptr_t>(ws.data_ptr());
        prm.workspace = reinterpret_cast<void*>((addr + 255) / 256 * 256);
        launch_sparse_attention_bwd(dt, prm, stream);
#else
        (void)stream;
        (void)deterministic;
        TORCH_CHECK(false, op, ": this trous build has no CUDA attention kernels");
#endif
      });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(trous, m) {
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? global_flags, bool causal, int left, int right, "
      "int chunk, int dilation, float scale, float softcap) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? global_flags, bool causal, int left, int right, int chunk, int dilation, float scale, float softcap, "
      "bool deterministic) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd);
}

// The fake kernels are the ops themselves (they return before reading data on meta tensors).
TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd);
}

// The backward op has no derivative of its own (no double backward); the forward's autograd is
// registered in Python (python/trous/attention/).
TORCH_LIBRARY_IMPL(trous, Autograd, m) { TROUS_NO_AUTOGRAD(m, "sparse_attention_bwd"); }

#if TROUS_ATTENTION_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd);
}
#endif

}  // namespace attention
}  // namespace trous
