// kv_append: the schema, its one validation (CPU, CUDA and Meta alike) and the call into the CPU kernel
// or the CUDA launcher. Storage, residual rule and addressing: cache.h; kernel parameters:
// cache_params.h. Nothing in the cache is written by a call that raises: every argument (on CPU also
// the lengths, the block table entries and the fp8 scales) is checked before the kernel runs.
#include <torch/library.h>

#include "kvcache/append_cpu.h"
#include "kvcache/cache_ops.h"
#include "trous/checks_ops.h"
#ifdef TROUS_WITH_CUDA
#include "kvcache/cache_cuda.h"
#endif

namespace trous {
namespace kv {
namespace {

constexpr const char* kOp = "trous.kv_append";

// The strides of a [B, H, T, D] activation with a contiguous last dimension.
BHTStrides bht_strides(const at::Tensor& x) { return BHTStrides{x.stride(0), x.stride(1), x.stride(2)}; }

void kv_append(const at::Tensor& k_codes, const at::Tensor& k_params, const at::Tensor& v_codes,
               const at::Tensor& v_params, const at::Tensor& k_residual, const at::Tensor& v_residual,
               const at::Tensor& lengths, const std::optional<at::Tensor>& block_table, const at::Tensor& k_in,
               const at::Tensor& v_in, c10::string_view scheme, int64_t bits, int64_t group_size, int64_t residual,
               c10::string_view fp8_format) {
  check_devices(kOp, {{"k_codes", k_codes},
                      {"k_params", k_params},
                      {"v_codes", v_codes},
                      {"v_params", v_params},
                      {"k_residual", k_residual},
                      {"v_residual", v_residual},
                      {"lengths", lengths},
                      {"block_table", defined_or_empty(block_table)},
                      {"k", k_in},
                      {"v", v_in}});
  // The new tokens: k, v [batch, Hkv, n_new, D].
  TORCH_CHECK(k_in.dim() == 4, kOp, ": k must have shape [batch, Hkv, n_new, D], got ", k_in.dim(), " dimensions ",
              k_in.sym_sizes());
  const DType act = trous::float_dtype(k_in.scalar_type(), kOp, "k");
  TORCH_CHECK(v_in.sym_sizes() == k_in.sym_sizes(), kOp, ": v must have shape k.shape = ", k_in.sym_sizes(), ", got ",
              v_in.sym_sizes());
  TORCH_CHECK(v_in.scalar_type() == k_in.scalar_type(), kOp, ": v must be ", k_in.scalar_type(), " (k's dtype), got ",
              v_in.scalar_type());
  const CacheTensors c{k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths, block_table};
  const CheckedCache cc = check_cache(kOp, c, CacheArgs{scheme, bits, group_size, residual, fp8_format}, k_in, "k");
  TORCH_CHECK(k_in.sym_size(0) == lengths.sym_size(0), kOp,
              ": k.size(0) must be batch = lengths.size(0) = ", lengths.sym_size(0), ", got ", k_in.sym_size(0));
  TORCH_CHECK(k_in.sym_size(1) == k_codes.sym_size(1), kOp,
              ": k.size(1) must be the cache's KV heads Hkv = ", "k_codes.size(1) = ", k_codes.sym_size(1), ", got ",
              k_in.sym_size(1));
  if (k_in.is_meta()) return;
  const int64_t n = k_in.size(2);
  check_cache_data_cpu(kOp, c, cc, n);
  if (lengths.size(0) == 0 || n == 0) return;

  // Rows with a contiguous last dimension (other strides free).
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  AppendParams p;
  p.cache = cache_ref(c, cc, k_in.size(3), act);
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
