// quantized_decode_attention: the schema, its one validation (CPU, CUDA and Meta alike) and the call
// into the CPU kernel (decode_cpu.h) or the CUDA launcher (cache_cuda.h). The cache layout and the
// residual rule are those of cache.h; the parameters those of cache_params.h.
#include <torch/library.h>

#include <cmath>
#include <string>

#include "kvcache/cache.h"
#include "kvcache/cache_params.h"
#include "kvcache/decode_cpu.h"
#include "trous/checks_ops.h"
#ifdef TROUS_WITH_CUDA
#include "kvcache/cache_cuda.h"
#endif

namespace trous {
namespace kv {
namespace {

constexpr const char* kOp = "trous.quantized_decode_attention";

CacheScheme parse_scheme(c10::string_view s) {
  const std::string v(s);
  if (v == "per_token") return CacheScheme::kPerToken;
  if (v == "symmetric") return CacheScheme::kSymmetric;
  if (v == "kivi") return CacheScheme::kKivi;
  if (v == "fp8") return CacheScheme::kFp8;
  TORCH_CHECK_VALUE(false, kOp, ": scheme must be \"per_token\", \"symmetric\", \"kivi\" or \"fp8\", got \"", v, "\"");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (the cache's own storage), got strides ",
              t.sym_strides());
}

void check_shape(const at::Tensor& t, const char* name, c10::SymIntArrayRef expected) {
  TORCH_CHECK(t.sym_sizes() == expected, kOp, ": ", name, " must have shape ", expected, ", got ", t.sym_sizes());
}

// The data checks (CPU only, after the meta return): every length within the sequence's pages, and
// every block-table entry that the call reads within the page pool. On CUDA reading them would need
// a host sync: the caller (trous.QuantizedKVCache) guarantees them.
void check_lengths_cpu(const at::Tensor& lengths, const c10::optional<at::Tensor>& block_table, const CacheFormat& f,
                       int64_t page_size, int64_t pages) {
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int64_t B = lengths.size(0);
  const int32_t* bt = block_table ? block_table->data_ptr<int32_t>() : nullptr;
  const int64_t max_pages = block_table ? block_table->size(1) : 1;
  const int64_t capacity = page_size * max_pages;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= capacity, kOp, ": lengths[", b, "] = ", len[b],
                      " is beyond the cache: a sequence holds 0 to ", capacity, " tokens (",
                      block_table ? "block_table.size(1) = " + std::to_string(max_pages) + " pages of " : "",
                      "page_size = k_codes.size(2) = ", page_size, ")");
    if (bt == nullptr) continue;
    const int64_t used = ceil_div(quantized_length(f, len[b]), page_size);
    for (int64_t i = 0; i < used; ++i) {
      const int32_t e = bt[b * max_pages + i];
      TORCH_CHECK_VALUE(e >= 0 && e < pages, kOp, ": block_table[", b, "][", i, "] = ", e,
                        " is out of range: the page pool (k_codes.size(0)) holds ", pages, " pages");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> quantized_decode_attention(
    const at::Tensor& q_in, const at::Tensor& k_codes, const at::Tensor& k_params, const at::Tensor& v_codes,
    const at::Tensor& v_params, const at::Tensor& k_residual, const at::Tensor& v_residual, const at::Tensor& lengths,
    const c10::optional<at::Tensor>& block_table, c10::string_view scheme_s, int64_t bits, int64_t group_size,
    int64_t residual, c10::string_view fp8_format_s, double scale, double softcap) {
  const char* op = kOp;
  check_devices(op, {{"q", q_in},
                     {"k_codes", k_codes},
                     {"k_params", k_params},
                     {"v_codes", v_codes},
                     {"v_params", v_params},
                     {"k_residual", k_residual},
                     {"v_residual", v_residual},
                     {"lengths", lengths},
                     {"block_table", defined_or_empty(block_table)}});
  // Format.
  const CacheScheme scheme = parse_scheme(scheme_s);
  if (scheme == CacheScheme::kSymmetric || scheme == CacheScheme::kFp8) {
    TORCH_CHECK_VALUE(bits == 8, op, ": bits must be 8 for scheme \"", std::string(scheme_s), "\", got ", bits);
  } else {
    TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8, got ", bits);
  }
  Fp8Format fp8 = Fp8Format::kE4M3;
  if (scheme == CacheScheme::kFp8) {
    const std::string f(fp8_format_s);
    TORCH_CHECK_VALUE(f == "e4m3" || f == "e5m2", op, ": fp8_format must be \"e4m3\" or \"e5m2\", got \"", f, "\"");
    fp8 = f == "e4m3" ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
  }
  TORCH_CHECK_VALUE(residual >= 0, op, ": residual must be >= 0, got ", residual);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be >= 0 (0 = off) and finite, got ",
                    softcap);

  // q [B, Hq, Sq, D] and lengths [B].
  TORCH_CHECK(q_in.dim() == 4, op, ": q must have shape [batch, Hq, Sq, D], got ", q_in.dim(), " dimensions ",
              q_in.sym_sizes());
  const DType act = float_dtype(q_in.scalar_type(), op, "q");
  const auto qs = q_in.sym_sizes();
  const c10::SymInt& B = qs[0];
  const c10::SymInt& Hq = qs[1];
  const c10::SymInt& Sq = qs[2];
  const c10::SymInt& D = qs[3];
  TORCH_CHECK(D > 0 && D % 8 == 0, op, ": head dimension D = q.size(3) must be a positive multiple of 8, got ", D);
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kInt, op,
              ": lengths must be an int32 tensor of shape [batch], got ", lengths.scalar_type(), " of shape ",
              lengths.sym_sizes());
  TORCH_CHECK(lengths.sym_size(0) == B, op, ": lengths.size(0) (batch) must equal q.size(0) = ", B, ", got ",
              lengths.sym_size(0));
  check_contiguous(lengths, "lengths");

  // Codes [pages, Hkv, page_size, D * bits / 8].
  const at::ScalarType code_dtype = scheme == CacheScheme::kSymmetric ? at::kChar : at::kByte;
  TORCH_CHECK(k_codes.dim() == 4, op, ": k_codes must have shape [pages, Hkv, page_size, D * bits / 8], got ",
              k_codes.dim(), " dimensions ", k_codes.sym_sizes());
  const auto cs = k_codes.sym_sizes();
  const c10::SymInt& pages = cs[0];
  const c10::SymInt& Hkv = cs[1];
  const c10::SymInt& page_size = cs[2];
  TORCH_CHECK(Hkv > 0, op, ": the number of KV heads k_codes.size(1) must be positive, got ", Hkv);
  TORCH_CHECK(Hq % Hkv == 0, op, ": the query heads q.size(1) = ", Hq,
              " must be a multiple of the KV heads k_codes.size(1) = ", Hkv);
  TORCH_CHECK(cs[3] == D * bits / 8, op, ": k_codes.size(3) must be D * bits / 8 = ", D * bits / 8, " (D = ", D,
              " from q, bits = ", bits, "), got ", cs[3]);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_codes, "k_codes"}, {v_codes, "v_codes"}}) {
    TORCH_CHECK(t.scalar_type() == code_dtype, op, ": ", name, " must be ", code_dtype, " for scheme \"",
                std::string(scheme_s), "\", got ", t.scalar_type());
    check_contiguous(t, name);
  }
  check_shape(v_codes, "v_codes", cs);

  // Group size and layout.
  const bool paged = block_table.has_value();
  int64_t G = 0;
  if (scheme != CacheScheme::kFp8) {
    TORCH_CHECK_VALUE(group_size > 0 && group_size % 8 == 0, op, ": group_size must be a positive multiple of 8, got ",
                      group_size);
    TORCH_CHECK_VALUE(D % group_size == 0, op, ": group_size ", group_size, " must divide the head dimension D = ", D);
    G = group_size;
  }
  if (scheme == CacheScheme::kKivi) {
    TORCH_CHECK_VALUE(residual % group_size == 0, op, ": residual (", residual, ") must be a multiple of group_size (",
                      group_size, ") for scheme \"kivi\"");
    TORCH_CHECK(page_size % group_size == 0, op, ": the page size k_codes.size(2) = ", page_size,
                " must be a multiple of group_size ", group_size, " for scheme \"kivi\"");
  }
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.dim() == 2 && bt.scalar_type() == at::kInt, op,
                ": block_table must be an int32 tensor of shape [batch, max_pages], got ", bt.scalar_type(),
                " of shape ", bt.sym_sizes());
    TORCH_CHECK(bt.sym_size(0) == B, op, ": block_table.size(0) (batch) must equal q.size(0) = ", B, ", got ",
                bt.sym_size(0));
    check_contiguous(bt, "block_table");
  } else {
    TORCH_CHECK(pages == B, op,
                ": without block_table (contiguous layout) k_codes.size(0) must be the batch q.size(0) = ", B, ", got ",
                pages);
  }

  // Parameters.
  ParamType ptype = ParamType::kFloat32;
  bool per_head = false;
  if (scheme == CacheScheme::kFp8) {
    for (const auto& [t, name] :
         {std::pair<const at::Tensor&, const char*>{k_params, "k_params"}, {v_params, "v_params"}}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " (the fp8 scale) must be float32, got ",
                  t.scalar_type());
      const bool one = t.dim() == 0 || (t.dim() == 1 && t.sym_size(0) == 1);
      TORCH_CHECK(one || (t.dim() == 1 && t.sym_size(0) == Hkv), op, ": ", name,
                  " (the fp8 scale) must have shape [] or [1] (per tensor) or [Hkv] = [", Hkv, "] (per head), got ",
                  t.sym_sizes());
      check_contiguous(t, name);
    }
    const bool k_one = k_params.dim() == 0 || k_params.sym_size(0) == 1;
    const bool v_one = v_params.dim() == 0 || v_params.sym_size(0) == 1;
    TORCH_CHECK(k_one == v_one, op, ": k_params and v_params must both be per tensor or both per head, got shapes ",
                k_params.sym_sizes(), " and ", v_params.sym_sizes());
    per_head = !k_one;
  } else {
    TORCH_CHECK(k_params.scalar_type() == at::kFloat || k_params.scalar_type() == at::kHalf, op,
                ": k_params must be float32 or float16, got ", k_params.scalar_type());
    TORCH_CHECK(k_params.scalar_type() == at::kFloat || act == DType::kFloat16, op,
                ": float16 parameters are for float16 activations only, got k_params float16 with q of dtype ",
                q_in.scalar_type());
    TORCH_CHECK(v_params.scalar_type() == k_params.scalar_type(), op, ": v_params must have the dtype of k_params (",
                k_params.scalar_type(), "), got ", v_params.scalar_type());
    ptype = k_params.scalar_type() == at::kHalf ? ParamType::kFloat16 : ParamType::kFloat32;
    const int64_t np = scheme == CacheScheme::kSymmetric ? 1 : 2;
    const c10::SymInt ng = D / G;
    if (scheme == CacheScheme::kKivi) {
      check_shape(k_params, "k_params", {pages, Hkv, page_size / G, D, 2});
    } else {
      check_shape(k_params, "k_params", {pages, Hkv, page_size, ng, np});
    }
    check_shape(v_params, "v_params", {pages, Hkv, page_size, ng, np});
    check_contiguous(k_params, "k_params");
    check_contiguous(v_params, "v_params");
  }

  // Residual ring [batch, Hkv, residual_capacity, D] in the activation dtype.
  CacheFormat fmt{scheme, (int)bits, G, ptype, fp8, 0, residual};
  const int64_t cap = residual_capacity(fmt);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{k_residual, "k_residual"}, {v_residual, "v_residual"}}) {
    TORCH_CHECK(t.scalar_type() == q_in.scalar_type(), op, ": ", name, " must have q's dtype ", q_in.scalar_type(),
                ", got ", t.scalar_type());
    check_shape(t, name, {B, Hkv, c10::SymInt(cap), D});
    check_contiguous(t, name);
  }

  auto out = at::empty_symint(qs, q_in.options());
  auto lse = at::empty_symint({B, Hq, Sq}, q_in.options().dtype(at::kFloat));
  if (q_in.is_meta()) return {out, lse};

  fmt.head_dim = q_in.size(3);
  if (q_in.device().is_cpu()) {
    check_lengths_cpu(lengths, block_table, fmt, k_codes.size(2), k_codes.size(0));
    if (scheme == CacheScheme::kFp8) {
      for (const auto& [t, name] :
           {std::pair<const at::Tensor&, const char*>{k_params, "k_params"}, {v_params, "v_params"}}) {
        const float* s = t.data_ptr<float>();
        for (int64_t i = 0; i < t.numel(); ++i) {
          TORCH_CHECK_VALUE(fp8_scale_ok(s[i]), op, ": ", name, " (the fp8 scale) must be finite and positive, got ",
                            name, "[", i, "] = ", s[i]);
        }
      }
    }
  }
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();

  DecodeParams p;
  p.cache.fmt = fmt;
  p.cache.map = PageMap{paged ? block_table->data_ptr<int32_t>() : nullptr, paged ? block_table->size(1) : 1,
                        k_codes.size(2), k_codes.size(1)};
  p.cache.k_codes = k_codes.data_ptr();
  p.cache.v_codes = v_codes.data_ptr();
  p.cache.k_params = k_params.data_ptr();
  p.cache.v_params = v_params.data_ptr();
  p.cache.fp8_scale_per_head = per_head;
  p.cache.k_residual = k_residual.data_ptr();
  p.cache.v_residual = v_residual.data_ptr();
  p.cache.lengths = lengths.data_ptr<int32_t>();
  p.cache.batch = q.size(0);
  p.cache.act = act;
  p.q = q.data_ptr();
  p.sq = BHTStrides{q.stride(0), q.stride(1), q.stride(2)};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.Hq = q.size(1);
  p.Sq = q.size(2);
  p.scale = (float)scale;
  p.softcap = (float)softcap;
  if (out.numel() == 0) return {out, lse};
  run_on_device(
      q, op, [&] { cpu_quantized_decode(p); },
      [&](void* stream) {
        TROUS_CUDA_ONLY({
          const size_t ws = decode_workspace_bytes(p);
          at::Tensor workspace = at::empty({(int64_t)ws}, q.options().dtype(at::kByte));
          p.workspace = ws ? workspace.data_ptr() : nullptr;
          launch_quantized_decode(p, stream);
        });
      });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(trous, m) {
  // Decode attention straight from the quantized KV cache of one layer (cache.h) plus its
  // full-precision residual ring. q [batch, Hq, Sq, D]; query s of sequence b sits at position
  // lengths[b] - Sq + s and sees cache tokens [0, position]. Returns out [batch, Hq, Sq, D] (q's
  // dtype) and lse fp32 [batch, Hq, Sq] (natural log; -inf for a query that sees no token).
  m.def(
      "quantized_decode_attention(Tensor q, Tensor k_codes, Tensor k_params, Tensor v_codes, Tensor v_params, "
      "Tensor k_residual, Tensor v_residual, Tensor lengths, Tensor? block_table, str scheme, int bits, "
      "int group_size, int residual, str fp8_format, float scale, float softcap) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) { m.impl("quantized_decode_attention", &quantized_decode_attention); }

TORCH_LIBRARY_IMPL(trous, Meta, m) { m.impl("quantized_decode_attention", &quantized_decode_attention); }

TORCH_LIBRARY_IMPL(trous, Autograd, m) { TROUS_NO_AUTOGRAD(m, "quantized_decode_attention"); }

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) { m.impl("quantized_decode_attention", &quantized_decode_attention); }
#endif

}  // namespace kv
}  // namespace trous
