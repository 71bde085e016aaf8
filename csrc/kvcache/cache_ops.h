// The one validation of a layer's cache tensors (layout: cache.h) for every op that reads or writes
// the cache (kv_append, quantized_decode_attention): the format arguments, shapes, dtypes and
// contiguity (sym sizes only: the Meta kernels run them too), and on CPU the data (lengths, the
// block-table entries a call touches, fp8 scales). Every message names the argument, the expected
// and the actual. `op` prefixes the messages; `act` is the activation tensor whose dtype the
// residual ring holds and whose last dimension is D (k for kv_append, q for the decode).
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/cache_params.h"
#include "trous/checks_ops.h"

namespace trous {
namespace kv {

struct CacheTensors {
  const at::Tensor& k_codes;
  const at::Tensor& k_params;
  const at::Tensor& v_codes;
  const at::Tensor& v_params;
  const at::Tensor& k_residual;
  const at::Tensor& v_residual;
  const at::Tensor& lengths;
  const std::optional<at::Tensor>& block_table;
};

struct CacheArgs {
  c10::string_view scheme;
  int64_t bits, group_size, residual;
  c10::string_view fp8_format;
};

// What the checks establish: the format (head_dim filled in by cache_ref) and the fp8 scale layout.
struct CheckedCache {
  CacheFormat fmt;
  bool fp8_scale_per_head;
  int64_t capacity;  // residual ring slots
};

namespace detail {

inline CacheScheme parse_scheme(const char* op, c10::string_view scheme) {
  const std::string s(scheme);
  if (s == "per_token") return CacheScheme::kPerToken;
  if (s == "symmetric") return CacheScheme::kSymmetric;
  if (s == "kivi") return CacheScheme::kKivi;
  if (s == "fp8") return CacheScheme::kFp8;
  TORCH_CHECK_VALUE(false, op, ": scheme must be \"per_token\", \"symmetric\", \"kivi\" or \"fp8\", got \"", s, "\"");
}

inline void check_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (the cache's own storage), got strides ",
              t.sym_strides());
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, std::vector<c10::SymInt> expected,
                        const char* layout) {
  TORCH_CHECK(t.sym_sizes() == c10::SymIntArrayRef(expected), op, ": ", name, " must have shape ", layout, " = ",
              c10::SymIntArrayRef(expected), ", got ", t.sym_sizes());
}

inline std::pair<const at::Tensor&, const char*> named(const at::Tensor& t, const char* name) { return {t, name}; }

}  // namespace detail

// Sizes, dtypes and layout of the cache (no data read).
inline CheckedCache check_cache(const char* op, const CacheTensors& c, const CacheArgs& a, const at::Tensor& act,
                                const char* act_name) {
  using detail::check_contiguous;
  using detail::check_shape;
  using detail::named;
  // The format.
  const CacheScheme scheme = detail::parse_scheme(op, a.scheme);
  const bool fp8 = scheme == CacheScheme::kFp8, kivi = scheme == CacheScheme::kKivi;
  const std::string scheme_s(a.scheme);
  if (scheme == CacheScheme::kPerToken || kivi) {
    TORCH_CHECK_VALUE(a.bits == 2 || a.bits == 4 || a.bits == 8, op, ": bits must be 2, 4 or 8 for scheme \"", scheme_s,
                      "\", got ", a.bits);
  } else {
    TORCH_CHECK_VALUE(a.bits == 8, op, ": bits must be 8 for scheme \"", scheme_s, "\", got ", a.bits);
  }
  Fp8Format f8 = Fp8Format::kE4M3;
  if (fp8) {
    const std::string f(a.fp8_format);
    TORCH_CHECK_VALUE(f == "e4m3" || f == "e5m2", op, ": fp8_format must be \"e4m3\" or \"e5m2\", got \"", f, "\"");
    f8 = f == "e4m3" ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
  }
  TORCH_CHECK_VALUE(a.residual >= 0, op, ": residual must be >= 0, got ", a.residual);
  const c10::SymInt D = act.sym_size(3);
  TORCH_CHECK(D > 0 && D % 8 == 0, op, ": head dimension D = ", act_name,
              ".size(3) must be a positive multiple of 8, got ", D);
  if (!fp8) {
    TORCH_CHECK_VALUE(a.group_size > 0 && a.group_size % 8 == 0, op,
                      ": group_size must be a positive multiple of 8, got ", a.group_size);
    TORCH_CHECK_VALUE(D % a.group_size == 0, op, ": group_size ", a.group_size,
                      " must divide the head dimension D = ", act_name, ".size(3) = ", D);
  }
  if (kivi) {
    TORCH_CHECK_VALUE(a.residual % a.group_size == 0, op, ": residual ", a.residual,
                      " must be a multiple of group_size = ", a.group_size, " for scheme \"kivi\"");
  }
  const int64_t G = fp8 ? 1 : a.group_size;

  // lengths int32 [batch].
  TORCH_CHECK(c.lengths.dim() == 1 && c.lengths.scalar_type() == at::kInt, op,
              ": lengths must be an int32 tensor of shape [batch], got ", c.lengths.scalar_type(), " of shape ",
              c.lengths.sym_sizes());
  check_contiguous(op, c.lengths, "lengths");
  const c10::SymInt batch = c.lengths.sym_size(0);

  // Codes [pages, Hkv, page_size, D * bits / 8].
  const at::ScalarType code_dtype = scheme == CacheScheme::kSymmetric ? at::kChar : at::kByte;
  TORCH_CHECK(c.k_codes.dim() == 4, op, ": k_codes must have shape [pages, Hkv, page_size, D * bits / 8], got ",
              c.k_codes.dim(), " dimensions ", c.k_codes.sym_sizes());
  for (const auto& [t, name] : {named(c.k_codes, "k_codes"), named(c.v_codes, "v_codes")}) {
    TORCH_CHECK(t.scalar_type() == code_dtype, op, ": ", name, " must be ", code_dtype, " for scheme \"", scheme_s,
                "\", got ", t.scalar_type());
    check_contiguous(op, t, name);
  }
  const auto cs = c.k_codes.sym_sizes();
  const c10::SymInt pages = cs[0], Hkv = cs[1], page_size = cs[2];
  TORCH_CHECK(Hkv > 0, op, ": the KV heads Hkv = k_codes.size(1) must be positive, got ", Hkv);
  TORCH_CHECK(cs[3] == D * a.bits / 8, op, ": k_codes.size(3) must be D * bits / 8 = ", D * a.bits / 8, " (D = ", D,
              " from ", act_name, ", bits = ", a.bits, "), got ", cs[3]);
  check_shape(op, c.v_codes, "v_codes", std::vector<c10::SymInt>(cs.begin(), cs.end()), "k_codes.shape");
  TORCH_CHECK(page_size > 0, op, ": page_size = k_codes.size(2) must be positive, got ", page_size);
  if (kivi) {
    TORCH_CHECK(page_size % a.group_size == 0, op, ": page_size = k_codes.size(2) = ", page_size,
                " must be a multiple of group_size = ", a.group_size,
                " for scheme \"kivi\" (a page holds whole key groups)");
  }

  // Pages: a block table [batch, max_pages] (paged) or one page per sequence (contiguous).
  if (c.block_table.has_value()) {
    const at::Tensor& bt = *c.block_table;
    TORCH_CHECK(bt.dim() == 2 && bt.sym_size(0) == batch && bt.scalar_type() == at::kInt, op,
                ": block_table must be an int32 tensor of shape [batch = lengths.size(0), max_pages] = [", batch,
                ", max_pages], got ", bt.scalar_type(), " of shape ", bt.sym_sizes());
    check_contiguous(op, bt, "block_table");
  } else {
    TORCH_CHECK(pages == batch, op,
                ": without block_table (contiguous layout) k_codes.size(0) must be batch = lengths.size(0) = ", batch,
                " (one page per sequence), got ", pages);
  }

  // Parameters.
  ParamType ptype = ParamType::kFloat32;
  bool per_head = false;
  if (fp8) {
    for (const auto& [t, name] : {named(c.k_params, "k_params"), named(c.v_params, "v_params")}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " (the fp8 scale) must be float32, got ",
                  t.scalar_type());
      const bool one = t.dim() == 0 || (t.dim() == 1 && t.sym_size(0) == 1);
      TORCH_CHECK(one || (t.dim() == 1 && t.sym_size(0) == Hkv), op, ": ", name,
                  " (the fp8 scale) must have shape [] or [1] (per tensor) or [Hkv] = [", Hkv, "] (per head), got ",
                  t.sym_sizes());
      check_contiguous(op, t, name);
    }
    const bool k_one = c.k_params.dim() == 0 || c.k_params.sym_size(0) == 1;
    const bool v_one = c.v_params.dim() == 0 || c.v_params.sym_size(0) == 1;
    TORCH_CHECK(k_one == v_one, op, ": k_params and v_params must both be per tensor or both per head, got shapes ",
                c.k_params.sym_sizes(), " and ", c.v_params.sym_sizes());
    per_head = !k_one;
  } else {
    const at::ScalarType pt = c.k_params.scalar_type();
    TORCH_CHECK(pt == at::kFloat || pt == at::kHalf, op, ": k_params must be float32 or float16, got ", pt);
    TORCH_CHECK(pt == at::kFloat || act.scalar_type() == at::kHalf, op,
                ": float16 parameters are for float16 activations only: k_params float16 cannot hold the range of ",
                act_name, "'s dtype ", act.scalar_type(), " (use float32 parameters)");
    TORCH_CHECK(c.v_params.scalar_type() == pt, op, ": v_params must be ", pt, " (k_params' dtype), got ",
                c.v_params.scalar_type());
    ptype = pt == at::kHalf ? ParamType::kFloat16 : ParamType::kFloat32;
    const bool sym = scheme == CacheScheme::kSymmetric;
    const char* token_layout =
        sym ? "[pages, Hkv, page_size, D / group_size, 1]" : "[pages, Hkv, page_size, D / group_size, 2]";
    const std::vector<c10::SymInt> token_params{pages, Hkv, page_size, D / G, sym ? 1 : 2};
    if (kivi) {
      check_shape(op, c.k_params, "k_params", {pages, Hkv, page_size / G, D, 2},
                  "[pages, Hkv, page_size / group_size, D, 2] (KIVI key groups)");
    } else {
      check_shape(op, c.k_params, "k_params", token_params, token_layout);
    }
    check_shape(op, c.v_params, "v_params", token_params, token_layout);
    check_contiguous(op, c.k_params, "k_params");
    check_contiguous(op, c.v_params, "v_params");
  }

  // Residual ring [batch, Hkv, residual_capacity, D] in the activation dtype.
  const CacheFormat fmt{scheme, static_cast<int>(a.bits), G, ptype, f8, 0, a.residual};
  const int64_t capacity = residual_capacity(fmt);
  for (const auto& [t, name] : {named(c.k_residual, "k_residual"), named(c.v_residual, "v_residual")}) {
    check_shape(op, t, name, {batch, Hkv, capacity, D},
                kivi ? "[batch, Hkv, residual + group_size - 1, D]" : "[batch, Hkv, residual, D]");
    TORCH_CHECK(t.scalar_type() == act.scalar_type(), op, ": ", name, " must be ", act.scalar_type(), " (", act_name,
                "'s dtype), got ", t.scalar_type());
    check_contiguous(op, t, name);
  }
  return CheckedCache{fmt, per_head, capacity};
}

// The data checks (CPU tensors only: on CUDA they would cost a host sync per call, and the caller,
// trous.QuantizedKVCache, guarantees them): every lengths[b] + n_new within the sequence's pages,
// the block-table entries of the pages the call touches (the quantized tokens [first, last) with
// first = quantized_length(lengths[b]) when writing n_new > 0 tokens, 0 when reading) within the page
// pool, and usable fp8 scales.
inline void check_cache_data_cpu(const char* op, const CacheTensors& c, const CheckedCache& cc, int64_t n_new) {
  if (!c.lengths.device().is_cpu()) return;
  const CacheFormat& f = cc.fmt;
  const int32_t* len = c.lengths.data_ptr<int32_t>();
  const int32_t* bt = c.block_table ? c.block_table->data_ptr<int32_t>() : nullptr;
  const int64_t max_pages = bt ? c.block_table->size(1) : 1, page = c.k_codes.size(2), pages = c.k_codes.size(0);
  const int64_t capacity = max_pages * page;
  const std::string where =
      bt ? "block_table.size(1) * page_size = " + std::to_string(max_pages) + " * " + std::to_string(page)
         : "page_size = k_codes.size(2) = " + std::to_string(page);
  for (int64_t b = 0; b < c.lengths.size(0); ++b) {
    const int64_t L = len[b];
    TORCH_CHECK_VALUE(L >= 0, op, ": lengths[", b, "] must be >= 0, got ", L);
    if (n_new > 0) {
      TORCH_CHECK_VALUE(L + n_new <= capacity && L + n_new <= std::numeric_limits<int32_t>::max(), op, ": lengths[", b,
                        "] + n_new = ", L, " + ", n_new, " = ", L + n_new, " exceeds the sequence's capacity of ",
                        capacity, " tokens (", where, ")");
    } else {
      TORCH_CHECK_VALUE(L <= capacity, op, ": lengths[", b, "] = ", L, " is beyond the sequence's capacity of ",
                        capacity, " tokens (", where, ")");
    }
    if (bt == nullptr) continue;
    const int64_t first = n_new > 0 ? quantized_length(f, L) : 0, last = quantized_length(f, L + n_new);
    for (int64_t pi = first / page; last > first && pi <= (last - 1) / page; ++pi) {
      const int64_t e = bt[b * max_pages + pi];
      TORCH_CHECK_VALUE(e >= 0 && e < pages, op, ": block_table[", b, "][", pi, "] = ", e,
                        " is out of range: it must be a page index in [0, pages = k_codes.size(0) = ", pages, ")");
    }
  }
  if (f.scheme != CacheScheme::kFp8) return;
  for (const auto& [t, name] : {detail::named(c.k_params, "k_params"), detail::named(c.v_params, "v_params")}) {
    const float* s = t.data_ptr<float>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK_VALUE(fp8_scale_ok(s[i]), op, ": ", name, " (the fp8 scale) must be finite and positive, got ", name,
                        "[", i, "] = ", s[i]);
    }
  }
}

// The kernels' view of checked cache tensors (host sizes: not for meta tensors).
inline CacheRef cache_ref(const CacheTensors& c, const CheckedCache& cc, int64_t head_dim, DType act) {
  CacheRef r;
  r.fmt = cc.fmt;
  r.fmt.head_dim = head_dim;
  const bool paged = c.block_table.has_value();
  r.map = PageMap{paged ? c.block_table->data_ptr<int32_t>() : nullptr, paged ? c.block_table->size(1) : 1,
                  c.k_codes.size(2), c.k_codes.size(1)};
  r.k_codes = c.k_codes.data_ptr();
  r.v_codes = c.v_codes.data_ptr();
  r.k_params = c.k_params.data_ptr();
  r.v_params = c.v_params.data_ptr();
  r.fp8_scale_per_head = cc.fp8_scale_per_head;
  r.k_residual = cc.capacity > 0 ? c.k_residual.data_ptr() : nullptr;
  r.v_residual = cc.capacity > 0 ? c.v_residual.data_ptr() : nullptr;
  r.lengths = c.lengths.data_ptr<int32_t>();
  r.batch = c.lengths.size(0);
  r.act = act;
  return r;
}

}  // namespace kv
}  // namespace trous
