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
#include "trous/checks_ops.h"
#if defined(TROUS_WITH_CUDA) && __has_include("attention/attention_cuda.h")
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
  TORCH_CHECK(left >= -1 && right >= -1, op, ": window = (left, right) must be >= -1 each (-1: unbounded), got (", left,
              ", ", right, ")");
  TORCH_CHECK(chunk >= 0, op, ": chunk_size must be >= 0 (0: no chunks), got ", chunk);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0: off), got ", softcap);
  if (global_flags.has_value()) {
    const at::Tensor& g = *global_flags;
    TORCH_CHECK(g.scalar_type() == at::kBool || g.scalar_type() == at::kByte, op,
                ": global_tokens (flags) must be bool or uint8, got ", g.scalar_type());
    TORCH_CHECK(g.dim() == 1 && g.sym_size(0) == k.sym_size(1), op, ": global_tokens (flags) must have shape (Sk,) = (",
                k.sym_size(1), ",), one per key position, got ", g.sym_sizes());
  }
  return dt;
}

at::Tensor rows_input(const at::Tensor& x) { return x.stride(3) == 1 || x.size(3) <= 1 ? x : x.contiguous(); }

SeqStrides seq_strides(const at::Tensor& x) { return SeqStrides{x.stride(0), x.stride(1), x.stride(2)}; }

// The Pattern of a call and the tensors its pointers read (global key positions and global query rows,
// int64 sorted). global lists are empty (null pointers) when no flag is set.
struct PatternHolder {
  Pattern p{};
  at::Tensor flags, keys, rows;
};

PatternHolder make_pattern(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& global_flags,
                           bool causal, int64_t left, int64_t right, int64_t chunk, int64_t dilation) {
  PatternHolder h;
  Pattern& p = h.p;
  p.Sq = q.size(1);
  p.Sk = k.size(1);
  p.shift = p.Sk - p.Sq;
  p.causal = causal;
  p.left = left;
  p.right = right;
  p.chunk = chunk;
  p.dilation = dilation;
  p.global_flags = nullptr;
  p.global_keys = nullptr;
  p.n_global_keys = 0;
  p.global_rows = nullptr;
  p.n_global_rows = 0;
  if (global_flags.has_value() && p.Sk > 0) {
    h.flags = global_flags->to(at::kByte).contiguous();
    h.keys = at::nonzero(h.flags).reshape({-1}).to(at::kLong).contiguous();
    p.n_global_keys = h.keys.size(0);
    if (p.n_global_keys > 0) {
      p.global_flags = h.flags.data_ptr<uint8_t>();
      p.global_keys = h.keys.data_ptr<int64_t>();
      // Query rows i = j - shift of the global keys j that are query positions (0 <= i < Sq).
      at::Tensor r = h.keys - p.shift;
      h.rows = r.index({(r >= 0).logical_and(r < p.Sq)}).contiguous();
      p.n_global_rows = h.rows.size(0);
      p.global_rows = p.n_global_rows > 0 ? h.rows.data_ptr<int64_t>() : nullptr;
    }
  }
  return h;
}

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
  const PatternHolder ph = make_pattern(q, k, global_flags, causal, left, right, chunk, dilation);
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
        AttnFwdParams prm = cuda_fwd_params(q, k, v, out, lse, a);
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
  const PatternHolder ph = make_pattern(q, k, global_flags, causal, left, right, chunk, dilation);
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
        AttnBwdParams prm = cuda_bwd_params(go, q, k, v, out, lse, grad_q, grad_k, grad_v, a, deterministic);
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
