// quantized_decode_attention: the schema, its one validation (CPU, CUDA and Meta alike) and the call
// into the CPU kernel (decode_cpu.h) or the CUDA launcher (cache_cuda.h). The cache layout and the
// residual rule are those of cache.h; the parameters those of cache_params.h.
#include <torch/library.h>

#include <cmath>

#include "kvcache/cache_ops.h"
#include "kvcache/decode_cpu.h"
#include "trous/checks_ops.h"
#ifdef TROUS_WITH_CUDA
#include "kvcache/cache_cuda.h"
#endif

namespace trous {
namespace kv {
namespace {

constexpr const char* kOp = "trous.quantized_decode_attention";

std::tuple<at::Tensor, at::Tensor> quantized_decode_attention(
    const at::Tensor& q_in, const at::Tensor& k_codes, const at::Tensor& k_params, const at::Tensor& v_codes,
    const at::Tensor& v_params, const at::Tensor& k_residual, const at::Tensor& v_residual, const at::Tensor& lengths,
    const std::optional<at::Tensor>& block_table, c10::string_view scheme, int64_t bits, int64_t group_size,
    int64_t residual, c10::string_view fp8_format, double scale, double softcap) {
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
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be >= 0 (0 = off) and finite, got ",
                    softcap);
  // q [B, Hq, Sq, D].
  TORCH_CHECK(q_in.dim() == 4, op, ": q must have shape [batch, Hq, Sq, D], got ", q_in.dim(), " dimensions ",
              q_in.sym_sizes());
  const DType act = float_dtype(q_in.scalar_type(), op, "q");
  const CacheTensors c{k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths, block_table};
  const CheckedCache cc = check_cache(op, c, CacheArgs{scheme, bits, group_size, residual, fp8_format}, q_in, "q");
  const auto qs = q_in.sym_sizes();
  TORCH_CHECK(lengths.sym_size(0) == qs[0], op, ": q.size(0) must be batch = lengths.size(0) = ", lengths.sym_size(0),
              ", got ", qs[0]);
  TORCH_CHECK(qs[1] % k_codes.sym_size(1) == 0, op, ": the query heads q.size(1) = ", qs[1],
              " must be a multiple of the KV heads k_codes.size(1) = ", k_codes.sym_size(1));

  auto out = at::empty_symint(qs, q_in.options());
  auto lse = at::empty_symint({qs[0], qs[1], qs[2]}, q_in.options().dtype(at::kFloat));
  if (q_in.is_meta()) return {out, lse};
  check_cache_data_cpu(op, c, cc, 0);
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();

  DecodeParams p;
  p.cache = cache_ref(c, cc, q_in.size(3), act);
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
