// kv_append: the schema, its one validation (CPU, CUDA and Meta alike) and the call into the CPU kernel
// or the CUDA launcher. Storage, residual rule and addressing: cache.h; kernel parameters:
// cache_params.h. Nothing in the cache is written by a call that raises: every argument (on CPU also
// the lengths, the block table entries and the fp8 scales) is checked before the kernel runs.
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "kvcache/append_cpu.h"
#include "kvcache/cache.h"
#include "kvcache/cache_params.h"
#include "trous/checks_ops.h"
#ifdef TROUS_WITH_CUDA
#include "kvcache/cache_cuda.h"
#endif

namespace trous {
namespace kv {
namespace {

constexpr const char* kOp = "trous.kv_append";

CacheScheme parse_scheme(c10::string_view scheme) {
  const std::string s(scheme);
  if (s == "per_token") return CacheScheme::kPerToken;
  if (s == "symmetric") return CacheScheme::kSymmetric;
  if (s == "kivi") return CacheScheme::kKivi;
  if (s == "fp8") return CacheScheme::kFp8;
  TORCH_CHECK_VALUE(false, kOp, ": scheme must be \"per_token\", \"symmetric\", \"kivi\" or \"fp8\", got \"", s, "\"");
}

void check_scheme_bits(CacheScheme scheme, int64_t bits) {
  if (scheme == CacheScheme::kPerToken || scheme == CacheScheme::kKivi) {
    TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, kOp, ": bits must be 2, 4 or 8 for this scheme, got ", bits);
  } else {
    TORCH_CHECK_VALUE(bits == 8, kOp, ": bits must be 8 for scheme ",
                      scheme == CacheScheme::kFp8 ? "\"fp8\"" : "\"symmetric\"", ", got ", bits);
  }
}

Fp8Format parse_fp8_format(c10::string_view format) {
  const std::string f(format);
  TORCH_CHECK_VALUE(f == "e4m3" || f == "e5m2", kOp, ": fp8_format must be \"e4m3\" or \"e5m2\", got \"", f, "\"");
  return f == "e4m3" ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
}

using Shape = std::vector<c10::SymInt>;

void check_shape(const at::Tensor& t, const char* name, const Shape& expected, const char* layout) {
  TORCH_CHECK(t.sym_sizes() == c10::SymIntArrayRef(expected), kOp, ": ", name, " must have shape ", layout, " = ",
              c10::SymIntArrayRef(expected), ", got ", t.sym_sizes());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (as allocated by the cache), got strides ",
              t.sym_strides());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected, const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, kOp, ": ", name, " must be ", expected, why, ", got ", t.scalar_type());
}

// The strides of a [B, H, T, D] activation with a contiguous last dimension.
BHTStrides bht_strides(const at::Tensor& x) { return BHTStrides{x.stride(0), x.stride(1), x.stride(2)}; }

void kv_append(const at::Tensor& k_codes, const at::Tensor& k_params, const at::Tensor& v_codes,
               const at::Tensor& v_params, const at::Tensor& k_residual, const at::Tensor& v_residual,
               const at::Tensor& lengths, const std::optional<at::Tensor>& block_table_opt, const at::Tensor& k_in,
               const at::Tensor& v_in, c10::string_view scheme_str, int64_t bits, int64_t group_size, int64_t residual,
               c10::string_view fp8_format) {
  const at::Tensor& block_table = defined_or_empty(block_table_opt);
  check_devices(kOp, {{"k_codes", k_codes},
                      {"k_params", k_params},
                      {"v_codes", v_codes},
                      {"v_params", v_params},
                      {"k_residual", k_residual},
                      {"v_residual", v_residual},
                      {"lengths", lengths},
                      {"block_table", block_table},
                      {"k", k_in},
                      {"v", v_in}});

  // The format.
  const CacheScheme scheme = parse_scheme(scheme_str);
  check_scheme_bits(scheme, bits);
  const bool fp8 = scheme == CacheScheme::kFp8, kivi = scheme == CacheScheme::kKivi;
  const Fp8Format f8 = fp8 ? parse_fp8_format(fp8_format) : Fp8Format::kE4M3;
  TORCH_CHECK_VALUE(residual >= 0, kOp, ": residual must be >= 0, got ", residual);

  // The new tokens: k, v [batch, Hkv, n_new, D].
  TORCH_CHECK(k_in.dim() == 4, kOp, ": k must have shape [batch, Hkv, n_new, D], got ", k_in.dim(), " dimensions ",
              k_in.sym_sizes());
  const DType act = trous::float_dtype(k_in.scalar_type(), kOp, "k");
  check_shape(v_in, "v", Shape(k_in.sym_sizes().begin(), k_in.sym_sizes().end()), "k.shape");
  check_dtype(v_in, "v", k_in.scalar_type(), " (k's dtype)");
  const c10::SymInt Hkv = k_in.sym_size(1), n_new = k_in.sym_size(2), D = k_in.sym_size(3);
  TORCH_CHECK(D > 0 && D % 8 == 0, kOp, ": head dimension D = k.size(3) must be a positive multiple of 8, got ", D);

  if (!fp8) {
    TORCH_CHECK_VALUE(group_size > 0 && group_size % 8 == 0, kOp, ": group_size must be a positive multiple of 8, got ",
                      group_size);
    TORCH_CHECK_VALUE(D % group_size == 0, kOp, ": group_size ", group_size, " must divide D = k.size(3) = ", D);
  }
  if (kivi) {
    TORCH_CHECK_VALUE(residual % group_size == 0, kOp, ": residual ", residual,
                      " must be a multiple of group_size = ", group_size, " for scheme \"kivi\"");
  }

  // lengths int32 [batch].
  TORCH_CHECK(lengths.dim() == 1, kOp, ": lengths must have shape [batch], got ", lengths.sym_sizes());
  check_dtype(lengths, "lengths", at::kInt, "");
  check_contiguous(lengths, "lengths");
  const c10::SymInt batch = lengths.sym_size(0);
  TORCH_CHECK(k_in.sym_size(0) == batch, kOp, ": k.size(0) must be batch = lengths.size(0) = ", batch, ", got ",
              k_in.sym_size(0));

  // Codes [pages, Hkv, page_size, code_bytes].
  const at::ScalarType code_dtype = scheme == CacheScheme::kSymmetric ? at::kChar : at::kByte;
  TORCH_CHECK(k_codes.dim() == 4, kOp, ": k_codes must have shape [pages, Hkv, page_size, D * bits / 8], got ",
              k_codes.dim(), " dimensions ", k_codes.sym_sizes());
  const c10::SymInt pages = k_codes.sym_size(0), page_size = k_codes.sym_size(2);
  const c10::SymInt cbytes = D * bits / 8;
  const Shape codes_shape{pages, Hkv, page_size, cbytes};
  check_shape(k_codes, "k_codes", codes_shape, "[pages, Hkv = k.size(1), page_size, D * bits / 8]");
  check_shape(v_codes, "v_codes", codes_shape, "k_codes.shape");
  check_dtype(k_codes, "k_codes", code_dtype, scheme == CacheScheme::kSymmetric ? " for scheme \"symmetric\"" : "");
  check_dtype(v_codes, "v_codes", code_dtype, scheme == CacheScheme::kSymmetric ? " for scheme \"symmetric\"" : "");
  check_contiguous(k_codes, "k_codes");
  check_contiguous(v_codes, "v_codes");
  TORCH_CHECK(page_size > 0, kOp, ": page_size = k_codes.size(2) must be positive, got ", page_size);
  if (kivi) {
    TORCH_CHECK(page_size % group_size == 0, kOp, ": page_size = k_codes.size(2) = ", page_size,
                " must be a multiple of group_size = ", group_size,
                " for scheme \"kivi\" (a page holds whole key groups)");
  }

  // Parameters.
  ParamType ptype = ParamType::kFloat32;
  bool per_head = false;
  if (fp8) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_params, "k_params"},
                                  std::pair<const at::Tensor&, const char*>{v_params, "v_params"}}) {
      check_dtype(t, name, at::kFloat, " (the fp8 scale)");
      TORCH_CHECK(t.dim() == 0 || (t.dim() == 1 && t.sym_size(0) == Hkv), kOp, ": ", name,
                  " (the fp8 scale) must have shape [] or [Hkv] = [", Hkv, "], got ", t.sym_sizes());
      check_contiguous(t, name);
    }
    TORCH_CHECK(k_params.dim() == v_params.dim(), kOp, ": v_params must have the shape of k_params ",
                k_params.sym_sizes(), " (one scale layout per cache), got ", v_params.sym_sizes());
    per_head = k_params.dim() == 1;
  } else {
    const at::ScalarType pt = k_params.scalar_type();
    TORCH_CHECK(pt == at::kFloat || pt == at::kHalf, kOp, ": k_params must be float32 or float16, got ", pt);
    TORCH_CHECK(pt == at::kFloat || k_in.scalar_type() == at::kHalf, kOp,
                ": k_params float16 cannot hold the range of k's dtype ", k_in.scalar_type(),
                " (use float32 parameters), got k_params ", pt);
    check_dtype(v_params, "v_params", pt, " (k_params' dtype)");
    ptype = pt == at::kHalf ? ParamType::kFloat16 : ParamType::kFloat32;
    const int64_t np = scheme == CacheScheme::kSymmetric ? 1 : 2;
    const Shape token_params{pages, Hkv, page_size, D / group_size, np};
    if (kivi) {
      check_shape(k_params, "k_params", {pages, Hkv, page_size / group_size, D, 2},
                  "[pages, Hkv, page_size / group_size, D, 2] (KIVI key groups)");
    } else {
      check_shape(
          k_params, "k_params", token_params,
          np == 1 ? "[pages, Hkv, page_size, D / group_size, 1]" : "[pages, Hkv, page_size, D / group_size, 2]");
    }
    check_shape(v_params, "v_params", token_params,
                np == 1 ? "[pages, Hkv, page_size, D / group_size, 1]" : "[pages, Hkv, page_size, D / group_size, 2]");
    check_contiguous(k_params, "k_params");
    check_contiguous(v_params, "v_params");
  }

  // Residual ring [batch, Hkv, residual_capacity, D] in k's dtype.
  CacheFormat fmt{scheme, (int)bits, fp8 ? 1 : group_size, ptype, f8, 0, residual};
  const int64_t capacity = residual_capacity(fmt);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_residual, "k_residual"},
                                std::pair<const at::Tensor&, const char*>{v_residual, "v_residual"}}) {
    check_shape(t, name, {batch, Hkv, capacity, D},
                kivi ? "[batch, Hkv, residual + group_size - 1, D]" : "[batch, Hkv, residual, D]");
    check_dtype(t, name, k_in.scalar_type(), " (k's dtype)");
    check_contiguous(t, name);
  }

  // Pages: a block table [batch, max_pages] (paged) or one page per sequence (contiguous).
  if (block_table.defined()) {
    TORCH_CHECK(block_table.dim() == 2 && block_table.sym_size(0) == batch, kOp,
                ": block_table must have shape [batch = lengths.size(0), max_pages] = [", batch, ", max_pages], got ",
                block_table.sym_sizes());
    check_dtype(block_table, "block_table", at::kInt, "");
    check_contiguous(block_table, "block_table");
  } else {
    TORCH_CHECK(pages == batch, kOp,
                ": without block_table (contiguous layout) k_codes.size(0) must be batch = lengths.size(0) = ", batch,
                " (one page per sequence), got ", pages);
  }
  if (k_in.is_meta()) return;

  // Data checks (CPU): lengths within the sequence's pages, the pages written in range, fp8 scales
  // usable. On CUDA reading them would cost a host sync per call (the launcher's contract).
  const int64_t B = batch.expect_int(), n = n_new.expect_int(), P = pages.expect_int();
  const int64_t page = page_size.expect_int(), max_pages = block_table.defined() ? block_table.size(1) : 1;
  fmt.head_dim = D.expect_int();
  const PageMap map{block_table.defined() ? block_table.data_ptr<int32_t>() : nullptr, max_pages, page,
                    Hkv.expect_int()};
  if (lengths.device().is_cpu()) {
    const int32_t* len = lengths.data_ptr<int32_t>();
    const int64_t seq_capacity = max_pages * page;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = len[b];
      TORCH_CHECK_VALUE(L >= 0, kOp, ": lengths[", b, "] must be >= 0, got ", L);
      TORCH_CHECK_VALUE(L + n <= seq_capacity && L + n <= std::numeric_limits<int32_t>::max(), kOp, ": lengths[", b,
                        "] + n_new = ", L, " + ", n, " = ", L + n, " exceeds the sequence's capacity of ", seq_capacity,
                        " tokens (", block_table.defined() ? "block_table.size(1) * page_size" : "page_size", " = ",
                        max_pages, " * ", page, ")");
      if (!map.block_table) continue;
      // Pages that this call writes codes to: those of tokens [quantized_length(L), quantized_length(L + n)).
      const int64_t q0 = quantized_length(fmt, L), q1 = quantized_length(fmt, L + n);
      for (int64_t pi = q0 / page; q1 > q0 && pi <= (q1 - 1) / page; ++pi) {
        const int64_t e = map.block_table[b * max_pages + pi];
        TORCH_CHECK_VALUE(e >= 0 && e < P, kOp, ": block_table[", b, "][", pi, "] = ", e,
                          " is out of range: it must be a page index in [0, pages = k_codes.size(0) = ", P, ")");
      }
    }
    if (fp8) {
      for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_params, "k_params"},
                                    std::pair<const at::Tensor&, const char*>{v_params, "v_params"}}) {
        const float* s = t.data_ptr<float>();
        for (int64_t i = 0; i < t.numel(); ++i) {
          TORCH_CHECK_VALUE(fp8_scale_ok(s[i]), kOp, ": ", name, " (the fp8 scale) must be finite and positive, got ",
                            name, "[", i, "] = ", s[i]);
        }
      }
    }
  }
  if (B == 0 || n == 0) return;

  // Rows with a contiguous last dimension (other strides free).
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  AppendParams p;
  p.cache.fmt = fmt;
  p.cache.map = map;
  p.cache.k_codes = k_codes.data_ptr();
  p.cache.v_codes = v_codes.data_ptr();
  p.cache.k_params = k_params.data_ptr();
  p.cache.v_params = v_params.data_ptr();
  p.cache.fp8_scale_per_head = per_head;
  p.cache.k_residual = capacity > 0 ? k_residual.data_ptr() : nullptr;
  p.cache.v_residual = capacity > 0 ? v_residual.data_ptr() : nullptr;
  p.cache.lengths = lengths.data_ptr<int32_t>();
  p.cache.batch = B;
  p.cache.act = act;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.sk = bht_strides(k);
  p.sv = bht_strides(v);
  p.n_new = n;
  run_on_device(k, kOp, [&] { cpu_kv_append(p); }, [&](void* stream) { TROUS_CUDA_ONLY(launch_kv_append(p, stream)); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(trous, m) {
  // Appends k, v [batch, Hkv, n_new, D] to a layer's quantized cache (cache.h): the tokens that the
  // residual rule quantizes go to codes / params, the rest to the residual ring; lengths += n_new.
  m.def(
      "kv_append(Tensor(a!) k_codes, Tensor(b!) k_params, Tensor(c!) v_codes, Tensor(d!) v_params, "
      "Tensor(e!) k_residual, Tensor(f!) v_residual, Tensor(g!) lengths, Tensor? block_table, Tensor k, Tensor v, "
      "str scheme, int bits, int group_size, int residual, str fp8_format) -> ()");
}

TORCH_LIBRARY_IMPL(trous, CPU, m) { m.impl("kv_append", &kv_append); }

// The fake kernel is the op itself (it returns after the checks on meta tensors).
TORCH_LIBRARY_IMPL(trous, Meta, m) { m.impl("kv_append", &kv_append); }

TORCH_LIBRARY_IMPL(trous, Autograd, m) { TROUS_NO_AUTOGRAD(m, "kv_append"); }

#ifdef TROUS_WITH_CUDA
TORCH_LIBRARY_IMPL(trous, CUDA, m) { m.impl("kv_append", &kv_append); }
#endif

}  // namespace kv
}  // namespace trous
