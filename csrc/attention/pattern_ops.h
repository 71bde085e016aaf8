// Checks of the pattern arguments and the Pattern built from them, shared by every attention op
// (the kernels' ops and the coverage test op), so all refuse the same input with the same message.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "attention/pattern.h"
#include "trous/checks_ops.h"

namespace trous {
namespace attention {

// Reads sizes and scalars only (runs on meta too). Sk is the key length the flags index.
inline void check_pattern_args(const char* op, const c10::SymInt& Sk, const std::optional<at::Tensor>& global_flags,
                               int64_t left, int64_t right, int64_t chunk, int64_t dilation) {
  TORCH_CHECK_VALUE(left >= -1 && right >= -1, op,
                    ": window must be (left, right) with each >= -1 (-1 = unbounded), got (", left, ", ", right, ")");
  TORCH_CHECK_VALUE(chunk >= 0, op, ": chunk_size must be >= 0 (0 = no chunks), got ", chunk);
  TORCH_CHECK_VALUE(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  if (global_flags.has_value()) {
    const at::Tensor& g = *global_flags;
    TORCH_CHECK_VALUE(g.scalar_type() == at::kBool || g.scalar_type() == at::kByte, op,
                      ": global_tokens must be bool or uint8 flags over the key positions, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.dim() == 1 && g.sym_size(0) == Sk, op, ": global_tokens must have shape (Sk,) = (", Sk,
                      ",), got ", g.sym_sizes());
  }
}

// A Pattern and the tensors its pointers point into (keep the holder alive while kernels run).
struct PatternHolder {
  Pattern p;
  at::Tensor flags, keys, rows;
};

// Builds the pattern on the flags' device (one nonzero() per call: a host sync on CUDA when global
// tokens are given). Not for meta tensors.
inline PatternHolder build_pattern(int64_t Sq, int64_t Sk, const std::optional<at::Tensor>& global_flags, bool causal,
                                   int64_t left, int64_t right, int64_t chunk, int64_t dilation) {
  PatternHolder h;
  Pattern& p = h.p;
  p.Sq = Sq;
  p.Sk = Sk;
  p.shift = Sk - Sq;
  p.causal = causal;
  p.left = left;
  p.right = right;
  p.chunk = chunk;
  p.dilation = dilation;
  p.global_flags = nullptr;
  p.global_keys = p.global_rows = nullptr;
  p.n_global_keys = p.n_global_rows = 0;
  if (global_flags.has_value() && global_flags->numel() > 0) {
    h.flags = global_flags->to(at::kByte).contiguous();
    h.keys = at::nonzero(h.flags).reshape({-1}).contiguous();  // int64, sorted
    h.rows = (h.keys.masked_select(h.keys >= p.shift) - p.shift).contiguous();
    p.n_global_keys = h.keys.numel();
    p.n_global_rows = h.rows.numel();
    if (p.n_global_keys > 0) {  // all-zero flags are no global tokens: keep the fast tiles
      p.global_flags = h.flags.data_ptr<uint8_t>();
      p.global_keys = h.keys.data_ptr<int64_t>();
      p.global_rows = p.n_global_rows > 0 ? h.rows.data_ptr<int64_t>() : nullptr;
    }
  }
  return h;
}

}  // namespace attention
}  // namespace trous
