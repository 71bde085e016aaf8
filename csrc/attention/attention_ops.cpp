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
//
// Every op also takes an optional block layout (trous.BlockMask's kernel form, attention/pattern.h's
// BlockLayout): block_table int32 (B or 1, Hq or 1, ceil(Sq / block_q), ceil(Sk / block_k)), block_elems
// bool (P, block_q, block_k), block sizes multiples of 64; AND-ed with the pattern (varlen: the table's
// batch entry per sequence, in the sequence's own indices, for (max_seqlen_q, max_seqlen_k)).
//
//   sparse_attention_varlen_fwd / _bwd: the same over packed sequences (q (total_q, Hq, D), k / v
//       (total_k, Hkv, D), cu_seqlens_q / _k int32 (B + 1), max_seqlen_q / _k; lse (Hq, total_q));
//       no global tokens (see the varlen section below).
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

// Runs the forward kernels on checked tensors: q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), into out
// (B, Sq, Hq, D) with out's (batch, seq, head) rows of Hq * D and lse (B, Hq, Sq), both contiguous in
// their last dimensions as allocated by the ops (a sequence of a packed varlen tensor is such a view).
void fwd_into(const char* op, DType dt, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
              at::Tensor& out, at::Tensor& lse, const std::optional<at::Tensor>& global_flags, bool causal,
              int64_t left, int64_t right, int64_t chunk, int64_t dilation, double scale, double softcap,
              const BlockLayout& blocks) {
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
  a.pat.blocks = blocks;
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
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& global_flags, bool causal, int64_t left, int64_t right, int64_t chunk,
    int64_t dilation, double scale, double softcap, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& block_elems, int64_t block_q, int64_t block_k) {
  const char* op = "trous.sparse_attention_fwd";
  check_devices(op, {{"q", q_in},
                     {"k", k_in},
                     {"v", v_in},
                     {"global_tokens", defined_or_empty(global_flags)},
                     {"block_table", defined_or_empty(block_table)},
                     {"block_elems", defined_or_empty(block_elems)}});
  const DType dt = check_qkv(op, q_in, k_in, v_in, global_flags, left, right, chunk, dilation, scale, softcap);
  check_block_args(op, block_table, block_elems, block_q, block_k, q_in.sym_size(0), q_in.sym_size(2), q_in.sym_size(1),
                   k_in.sym_size(1));
  const auto qs = q_in.sym_sizes();
  auto out = at::empty_symint(qs, q_in.options());
  auto lse = at::empty_symint({qs[0], qs[2], qs[1]}, q_in.options().dtype(at::kFloat));
  if (q_in.is_meta()) return {out, lse};
  if (block_table.has_value()) check_block_values(op, *block_table, block_elems);
  if (out.numel() == 0) return {out, lse};
  fwd_into(op, dt, q_in, k_in, v_in, out, lse, global_flags, causal, left, right, chunk, dilation, scale, softcap,
           block_layout(block_table, block_elems, block_q, block_k));
  return {out, lse};
}

// Runs the backward kernels on checked, non-empty tensors (shapes as fwd_into; lse contiguous), into
// grad_q (B, Sq, Hq, D) and grad_k / grad_v (B, Sk, Hkv, D) with rows of H * D (allocated by the ops,
// or a sequence's view of the packed varlen gradients).
void bwd_into(const char* op, DType dt, const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
              const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse, at::Tensor& grad_q,
              at::Tensor& grad_k, at::Tensor& grad_v, const std::optional<at::Tensor>& global_flags, bool causal,
              int64_t left, int64_t right, int64_t chunk, int64_t dilation, double scale, double softcap,
              bool deterministic, const BlockLayout& blocks) {
  const at::Tensor q = rows_input(q_in), k = rows_input(k_in), v = rows_input(v_in);
  const at::Tensor go = rows_input(grad_out_in), out = rows_input(out_in);
  const PatternHolder ph = build_pattern(q.size(1), k.size(1), global_flags, causal, left, right, chunk, dilation);
  CpuAttnArgs a{};
  a.B = q.size(0), a.Sq = q.size(1), a.Sk = k.size(1), a.Hq = q.size(2), a.Hkv = k.size(2), a.D = q.size(3);
  a.q = seq_strides(q), a.k = seq_strides(k), a.v = seq_strides(v);
  a.o = seq_strides(out), a.go = seq_strides(go);
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.pat = ph.p;
  a.pat.blocks = blocks;
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
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& global_flags, bool causal,
    int64_t left, int64_t right, int64_t chunk, int64_t dilation, double scale, double softcap, bool deterministic,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& block_elems, int64_t block_q,
    int64_t block_k) {
  const char* op = "trous.sparse_attention_bwd";
  check_devices(op, {{"grad_out", grad_out_in},
                     {"q", q_in},
                     {"k", k_in},
                     {"v", v_in},
                     {"out", out_in},
                     {"lse", lse_in},
                     {"global_tokens", defined_or_empty(global_flags)},
                     {"block_table", defined_or_empty(block_table)},
                     {"block_elems", defined_or_empty(block_elems)}});
  const DType dt = check_qkv(op, q_in, k_in, v_in, global_flags, left, right, chunk, dilation, scale, softcap);
  check_block_args(op, block_table, block_elems, block_q, block_k, q_in.sym_size(0), q_in.sym_size(2), q_in.sym_size(1),
                   k_in.sym_size(1));
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
  if (block_table.has_value()) check_block_values(op, *block_table, block_elems);
  if (grad_k.numel() == 0 && grad_q.numel() == 0) return {grad_q, grad_k, grad_v};
  if (grad_q.numel() == 0 || grad_k.numel() == 0) {
    // No query rows (or no keys): nothing attends, every gradient is 0.
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  bwd_into(op, dt, grad_out_in, q_in, k_in, v_in, out_in, lse_in.contiguous(), grad_q, grad_k, grad_v, global_flags,
           causal, left, right, chunk, dilation, scale, softcap, deterministic,
           block_layout(block_table, block_elems, block_q, block_k));
  return {grad_q, grad_k, grad_v};
}

// ---- variable length (packed sequences, FlashAttention's varlen layout) ----
// q (total_q, Hq, D), k / v (total_k, Hkv, D); sequence b holds rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
// of q and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k / v (int32, B + 1 entries, from 0, non-decreasing,
// ending at the totals). Every sequence gets the pattern with its own lengths (bottom-right aligned
// within the sequence); no pair crosses a sequence boundary. out (total_q, Hq, D), lse fp32
// (Hq, total_q). The kernels run once per non-empty sequence on views of the packed tensors; the
// offsets are read on the host (on CUDA: one copy of the B + 1 offsets per call).

// Shape and dtype checks of a cu_seqlens argument (sym sizes only: the Meta kernel runs them too).
void check_cu_seqlens_shape(const char* op, const char* name, const at::Tensor& cu, const c10::SymInt& batch1) {
  TORCH_CHECK(cu.dim() == 1, op, ": ", name, " must be 1-D (B + 1 offsets), got shape ", cu.sym_sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.sym_size(0) == batch1, op, ": ", name, " must have B + 1 = ", batch1,
              " entries (cu_seqlens_q's), got ", cu.sym_size(0));
}

DType check_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, int64_t left,
                   int64_t right, int64_t chunk, int64_t dilation, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape (total_q, Hq, D), got ", q.dim(), " dimensions ", q.sym_sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must have shape (total_k, Hkv, D), got ", k.dim(), " dimensions ", k.sym_sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must have shape (total_k, Hkv, D), got ", v.dim(), " dimensions ", v.sym_sizes());
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.sym_size(0) >= 1, op,
              ": cu_seqlens_q must be 1-D with B + 1 >= 1 offsets, got shape ", cu_q.sym_sizes());
  check_cu_seqlens_shape(op, "cu_seqlens_q", cu_q, cu_q.sym_size(0));
  check_cu_seqlens_shape(op, "cu_seqlens_k", cu_k, cu_q.sym_size(0));
  TORCH_CHECK_VALUE(max_q >= 0, op, ": max_seqlen_q must be >= 0, got ", max_q);
  TORCH_CHECK_VALUE(max_k >= 0, op, ": max_seqlen_k must be >= 0, got ", max_k);
  // (the 4-D checks on one-sequence views: heads, head dim, dtypes, pattern, scale, softcap)
  return check_qkv(op, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), std::nullopt, left, right, chunk, dilation,
                   scale, softcap);
}

// The offsets on the host, checked against the totals and the max lengths (before any kernel runs).
std::vector<int64_t> read_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                                     int64_t max_len, const char* max_name) {
  const at::Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  std::vector<int64_t> off(static_cast<size_t>(host.numel()));
  for (int64_t b = 0; b < host.numel(); ++b) off[b] = c[b];
  TORCH_CHECK_VALUE(off[0] == 0, op, ": ", name, " must start at 0, got ", off[0]);
  for (size_t b = 1; b < off.size(); ++b) {
    TORCH_CHECK_VALUE(off[b] >= off[b - 1], op, ": ", name, " must be non-decreasing, got ", off[b - 1], " then ",
                      off[b], " at entries ", b - 1, ", ", b);
    TORCH_CHECK_VALUE(off[b] - off[b - 1] <= max_len, op, ": ", max_name, " = ", max_len, " is smaller than sequence ",
                      b - 1, "'s length ", off[b] - off[b - 1], " (", name, ")");
  }
  TORCH_CHECK_VALUE(off.back() == total, op, ": ", name, " must end at the number of packed rows ", total, ", got ",
                    off.back());
  return off;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, bool causal, int64_t left, int64_t right, int64_t chunk, int64_t dilation,
    double scale, double softcap, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& block_elems, int64_t block_q, int64_t block_k) {
  const char* op = "trous.sparse_attention_varlen_fwd";
  check_devices(op, {{"q", q},
                     {"k", k},
                     {"v", v},
                     {"cu_seqlens_q", cu_q},
                     {"cu_seqlens_k", cu_k},
                     {"block_table", defined_or_empty(block_table)},
                     {"block_elems", defined_or_empty(block_elems)}});
  const DType dt = check_varlen(op, q, k, v, cu_q, cu_k, max_q, max_k, left, right, chunk, dilation, scale, softcap);
  check_block_args(op, block_table, block_elems, block_q, block_k, cu_q.sym_size(0) - 1, q.sym_size(1),
                   c10::SymInt(max_q), c10::SymInt(max_k));
  auto out = at::empty_symint(q.sym_sizes(), q.options());
  auto lse = at::empty_symint({q.sym_size(1), q.sym_size(0)}, q.options().dtype(at::kFloat));
  if (q.is_meta()) return {out, lse};
  if (block_table.has_value()) check_block_values(op, *block_table, block_elems);
  const std::vector<int64_t> oq = read_cu_seqlens(op, "cu_seqlens_q", cu_q, q.size(0), max_q, "max_seqlen_q");
  const std::vector<int64_t> ok = read_cu_seqlens(op, "cu_seqlens_k", cu_k, k.size(0), max_k, "max_seqlen_k");
  for (size_t b = 0; b + 1 < oq.size(); ++b) {
    const int64_t lq = oq[b + 1] - oq[b], lk = ok[b + 1] - ok[b];
    if (lq == 0 || q.size(1) == 0) continue;
    at::Tensor out_b = out.narrow(0, oq[b], lq).unsqueeze(0);
    at::Tensor lse_b = at::empty({1, q.size(1), lq}, lse.options());
    fwd_into(op, dt, q.narrow(0, oq[b], lq).unsqueeze(0), k.narrow(0, ok[b], lk).unsqueeze(0),
             v.narrow(0, ok[b], lk).unsqueeze(0), out_b, lse_b, std::nullopt, causal, left, right, chunk, dilation,
             scale, softcap, block_layout(block_table, block_elems, block_q, block_k, b));
    lse.narrow(1, oq[b], lq).copy_(lse_b[0]);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal,
    int64_t left, int64_t right, int64_t chunk, int64_t dilation, double scale, double softcap, bool deterministic,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& block_elems, int64_t block_q,
    int64_t block_k) {
  const char* op = "trous.sparse_attention_varlen_bwd";
  check_devices(op, {{"grad_out", grad_out},
                     {"q", q},
                     {"k", k},
                     {"v", v},
                     {"out", out},
                     {"lse", lse},
                     {"cu_seqlens_q", cu_q},
                     {"cu_seqlens_k", cu_k},
                     {"block_table", defined_or_empty(block_table)},
                     {"block_elems", defined_or_empty(block_elems)}});
  const DType dt = check_varlen(op, q, k, v, cu_q, cu_k, max_q, max_k, left, right, chunk, dilation, scale, softcap);
  check_block_args(op, block_table, block_elems, block_q, block_k, cu_q.sym_size(0) - 1, q.sym_size(1),
                   c10::SymInt(max_q), c10::SymInt(max_k));
  TORCH_CHECK(grad_out.sym_sizes() == q.sym_sizes(), op, ": grad_out must have q's shape ", q.sym_sizes(), ", got ",
              grad_out.sym_sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), op, ": grad_out must have q's dtype ", q.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(out.sym_sizes() == q.sym_sizes(), op, ": out must have q's shape ", q.sym_sizes(), ", got ",
              out.sym_sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), op, ": out must have q's dtype ", q.scalar_type(), ", got ",
              out.scalar_type());
  const c10::SymInt lse_shape[2] = {q.sym_size(1), q.sym_size(0)};
  TORCH_CHECK(lse.sym_sizes() == c10::SymIntArrayRef(lse_shape, 2), op,
              ": lse must have shape (Hq, total_q) = ", c10::SymIntArrayRef(lse_shape, 2), ", got ", lse.sym_sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  auto grad_q = at::empty_symint(q.sym_sizes(), q.options());
  auto grad_k = at::empty_symint(k.sym_sizes(), k.options());
  auto grad_v = at::empty_symint(v.sym_sizes(), v.options());
  if (q.is_meta()) return {grad_q, grad_k, grad_v};
  if (block_table.has_value()) check_block_values(op, *block_table, block_elems);
  const std::vector<int64_t> oq = read_cu_seqlens(op, "cu_seqlens_q", cu_q, q.size(0), max_q, "max_seqlen_q");
  const std::vector<int64_t> ok = read_cu_seqlens(op, "cu_seqlens_k", cu_k, k.size(0), max_k, "max_seqlen_k");
  for (size_t b = 0; b + 1 < oq.size(); ++b) {
    const int64_t lq = oq[b + 1] - oq[b], lk = ok[b + 1] - ok[b];
    at::Tensor gq_b = grad_q.narrow(0, oq[b], lq).unsqueeze(0);
    at::Tensor gk_b = grad_k.narrow(0, ok[b], lk).unsqueeze(0);
    at::Tensor gv_b = grad_v.narrow(0, ok[b], lk).unsqueeze(0);
    if (lq == 0 || lk == 0 || q.size(1) == 0) {  // nothing attends: zero gradients
      gq_b.zero_(), gk_b.zero_(), gv_b.zero_();
      continue;
    }
    const at::Tensor lse_b = lse.narrow(1, oq[b], lq).unsqueeze(0).contiguous();
    bwd_into(op, dt, grad_out.narrow(0, oq[b], lq).unsqueeze(0), q.narrow(0, oq[b], lq).unsqueeze(0),
             k.narrow(0, ok[b], lk).unsqueeze(0), v.narrow(0, ok[b], lk).unsqueeze(0),
             out.narrow(0, oq[b], lq).unsqueeze(0), lse_b, gq_b, gk_b, gv_b, std::nullopt, causal, left, right, chunk,
             dilation, scale, softcap, deterministic, block_layout(block_table, block_elems, block_q, block_k, b));
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(trous, m) {
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? global_flags, bool causal, int left, int right, "
      "int chunk, int dilation, float scale, float softcap, Tensor? block_table=None, Tensor? block_elems=None, int "
      "block_q=0, int block_k=0) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? global_flags, bool causal, int left, int right, int chunk, int dilation, float scale, float softcap, "
      "bool deterministic, Tensor? block_table=None, Tensor? block_elems=None, int block_q=0, int block_k=0) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "sparse_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, int left, int right, int chunk, int dilation, float scale, "
      "float softcap, Tensor? block_table=None, Tensor? block_elems=None, int block_q=0, int block_k=0) -> (Tensor "
      "out, Tensor lse)");
  m.def(
      "sparse_attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, int left, "
      "int right, int chunk, int dilation, float scale, float softcap, bool deterministic, Tensor? block_table=None, "
      "Tensor? block_elems=None, int block_q=0, int block_k=0) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd);
  m.impl("sparse_attention_varlen_fwd", &sparse_attention_varlen_fwd);
  m.impl("sparse_attention_varlen_bwd", &sparse_attention_varlen_bwd);
}

// The fake kernels are the ops themselves (they return before reading data on meta tensors).
TORCH_LIBRARY_IMPL(trous, Meta, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd);
  m.impl("sparse_attention_varlen_fwd", &sparse_attention_varlen_fwd);
  m.impl("sparse_attention_varlen_bwd", &sparse_attention_varlen_bwd);
}

// The backward op has no derivative of its own (no double backward); the forward's autograd is
// registered in Python (python/trous/attention/).
TORCH_LIBRARY_IMPL(trous, Autograd, m) {
  TROUS_NO_AUTOGRAD(m, "sparse_attention_bwd");
  TROUS_NO_AUTOGRAD(m, "sparse_attention_varlen_bwd");
}

#if TROUS_ATTENTION_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd);
  m.impl("sparse_attention_varlen_fwd", &sparse_attention_varlen_fwd);
  m.impl("sparse_attention_varlen_bwd", &sparse_attention_varlen_bwd);
}
#endif

}  // namespace attention
}  // namespace trous
