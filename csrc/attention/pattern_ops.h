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

// The block layout arguments of the attention ops (trous.BlockMask's kernel form): block_table int32
// (Bm, Hm, nqb, nkb) with Bm in {1, B}, Hm in {1, Hq}, nqb = ceil(Sq / block_q), nkb = ceil(Sk / block_k);
// block_elems bool / uint8 (P, block_q, block_k) or absent (then P = 0); block sizes multiples of 64.
// Sizes only (runs on meta too); the table's values are checked by check_block_values.
inline void check_block_args(const char* op, const std::optional<at::Tensor>& table,
                             const std::optional<at::Tensor>& elems, int64_t block_q, int64_t block_k,
                             const c10::SymInt& B, const c10::SymInt& Hq, const c10::SymInt& Sq,
                             const c10::SymInt& Sk) {
  if (!table.has_value()) {
    TORCH_CHECK_VALUE(!elems.has_value(), op, ": block_elems given without block_table");
    return;
  }
  const at::Tensor& t = *table;
  TORCH_CHECK_VALUE(block_q > 0 && block_q % 64 == 0 && block_k > 0 && block_k % 64 == 0, op,
                    ": block mask block sizes must be positive multiples of 64, got (", block_q, ", ", block_k, ")");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": block_table must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, op,
                    ": block_table must have shape (B or 1, Hq or 1, ceil(Sq / block_q), "
                    "ceil(Sk / block_k)), got ",
                    t.dim(), " dimensions ", t.sym_sizes());
  TORCH_CHECK_VALUE(t.sym_size(0) == 1 || t.sym_size(0) == B, op, ": block mask batch size must be 1 or B = ", B,
                    ", got ", t.sym_size(0));
  TORCH_CHECK_VALUE(t.sym_size(1) == 1 || t.sym_size(1) == Hq, op, ": block mask head count must be 1 or Hq = ", Hq,
                    ", got ", t.sym_size(1));
  const c10::SymInt nqb = (Sq + block_q - 1) / block_q, nkb = (Sk + block_k - 1) / block_k;
  TORCH_CHECK_VALUE(t.sym_size(2) == nqb && t.sym_size(3) == nkb, op, ": block mask of (", t.sym_size(2), ", ",
                    t.sym_size(3), ") blocks does not fit Sq = ", Sq, ", Sk = ", Sk, " at block size (", block_q, ", ",
                    block_k, "): expected (", nqb, ", ", nkb, ") blocks");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": block_table must be contiguous");
  if (elems.has_value()) {
    const at::Tensor& e = *elems;
    TORCH_CHECK_VALUE(e.scalar_type() == at::kBool || e.scalar_type() == at::kByte, op,
                      ": block_elems must be bool or uint8, got ", e.scalar_type());
    TORCH_CHECK_VALUE(e.dim() == 3 && e.sym_size(1) == block_q && e.sym_size(2) == block_k, op,
                      ": block_elems must have shape (P, ", block_q, ", ", block_k, "), got ", e.sym_sizes());
    TORCH_CHECK_VALUE(e.is_contiguous(), op, ": block_elems must be contiguous");
  }
}

// Every state of the table is none (0), full (1) or 2 + e with e < P (the partial blocks' element
// masks): an out-of-range state would read outside block_elems. One min / max (a sync on CUDA).
inline void check_block_values(const char* op, const at::Tensor& table, const std::optional<at::Tensor>& elems) {
  if (table.numel() == 0) return;
  const int64_t P = elems.has_value() ? elems->size(0) : 0;
  const auto [lo, hi] = at::aminmax(table);
  const int64_t vlo = lo.item<int64_t>(), vhi = hi.item<int64_t>();
  TORCH_CHECK_VALUE(vlo >= 0 && vhi < 2 + P, op, ": block_table states must be 0 (none), 1 (full) or 2 + e with ",
                    "e < block_elems.size(0) = ", P, ", got values in [", vlo, ", ", vhi, "]");
}

// The kernels' BlockLayout over checked tensors (kept alive by the caller); batch / head strides 0
// where the table is broadcast. `batch` selects the table's batch entry for a one-sequence call (varlen).
inline BlockLayout block_layout(const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& elems,
                                int64_t block_q, int64_t block_k, int64_t batch = 0) {
  BlockLayout L;
  if (!table.has_value()) return L;
  const at::Tensor& t = *table;
  L.bq = block_q, L.bk = block_k, L.nqb = t.size(2), L.nkb = t.size(3);
  L.stride_h = t.size(1) > 1 ? t.stride(1) : 0;
  L.stride_b = t.size(0) > 1 ? t.stride(0) : 0;
  L.table = t.data_ptr<int32_t>() + batch * L.stride_b;
  if (elems.has_value() && elems->numel() > 0)
    L.elems = elems->scalar_type() == at::kBool ? reinterpret_cast<const uint8_t*>(elems->data_ptr<bool>())
                                                : elems->data_ptr<uint8_t>();
  return L;
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
