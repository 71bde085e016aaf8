// Launchers of the quantized KV cache kernels (cache_kernels.cuh): raw pointers and a stream, no
// torch headers. The op layers (kv_append, quantized_decode_attention) validate everything first.
#include <stdexcept>
#include <string>

#include "kvcache/cache_cuda.h"
#include "kvcache/cache_kernels.cuh"
#include "trous/launch.cuh"

namespace trous {
namespace kv {
namespace {

int device_attr(cudaDeviceAttr attr, const char* what) {
  int dev = 0, v = 0;
  cuda_check(cudaGetDevice(&dev), what);
  cuda_check(cudaDeviceGetAttribute(&v, attr, dev), what);
  return v;
}

// What the kernels assume of the format (the op layer has checked it; a violation would corrupt
// memory, so the launchers refuse it too): packs of 8 channels, whole groups, whole KIVI key groups
// per page, 8-bit codes for symmetric int8 and fp8.
void check_format(const CacheRef& c, const char* what) {
  const CacheFormat& f = c.fmt;
  const bool fp8 = f.scheme == CacheScheme::kFp8;
  const bool ok =
      f.head_dim > 0 && f.head_dim % kPack == 0 && f.residual >= 0 &&
      (fp8 || (f.group > 0 && f.group % kPack == 0 && f.head_dim % f.group == 0)) &&
      (f.scheme != CacheScheme::kKivi || (c.map.page_size % f.group == 0 && f.residual % f.group == 0)) &&
      ((fp8 || f.scheme == CacheScheme::kSymmetric) ? f.bits == 8 : (f.bits == 2 || f.bits == 4 || f.bits == 8));
  if (!ok)
    throw std::invalid_argument(std::string(what) + " (CUDA): unsupported cache format (head_dim " +
                                std::to_string(f.head_dim) + ", group " + std::to_string(f.group) + ", bits " +
                                std::to_string(f.bits) + ", page_size " + std::to_string(c.map.page_size) +
                                ", residual " + std::to_string(f.residual) +
                                "): head_dim and group must be multiples of 8, group must divide head_dim");
}

// Tokens a sequence can hold: its pages (contiguous: one page of T_max tokens).
index_t token_capacity(const CacheRef& c) {
  return c.map.block_table ? c.map.max_pages * c.map.page_size : c.map.page_size;
}

// The split-KV plan: enough (sequence, KV head, split) blocks for about four per SM (several
// resident at once hide the load latency), never more splits than tiles in the capacity; query rows beyond
// kDecodeMaxRows (or beyond the shared memory of a block) go to more blocks along z.
DecodePlan decode_plan(const DecodeParams& p) {
  const char* what = "trous quantized_decode_attention";
  const CacheRef& c = p.cache;
  const index_t D = c.fmt.head_dim;
  check_format(c, what);
  DecodePlan plan;
  plan.nq = (p.Hq / c.map.num_heads) * p.Sq;
  const int optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, what);
  plan.rows = (int)(plan.nq < kDecodeMaxRows ? plan.nq : kDecodeMaxRows);
  while (plan.rows > 1 && (size_t)decode_smem_floats(plan.rows, D) * sizeof(float) > (size_t)optin)
    plan.rows = (plan.rows + 1) / 2;
  plan.smem = (size_t)decode_smem_floats(plan.rows, D) * sizeof(float);
  if (plan.smem > (size_t)optin)
    throw std::runtime_error(std::string(what) + " (CUDA): head_dim " + std::to_string(D) + " needs " +
                             std::to_string(plan.smem) + " B of shared memory per block, the device allows " +
                             std::to_string(optin));
  plan.row_blocks = (int)ceil_div(plan.nq, plan.rows);
  const auto a16 = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  plan.vec = a16(c.k_residual) && a16(c.v_residual) && (c.fmt.scheme != CacheScheme::kKivi || a16(c.k_params));
  const index_t cap = token_capacity(c);
  plan.capacity = cap;
  const index_t blocks = c.batch * c.map.num_heads * plan.row_blocks;
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, what);
  index_t target = blocks > 0 ? ceil_div(4 * (index_t)sms, blocks) : 1;
  const index_t tiles = ceil_div(cap > 0 ? cap : 1, kDecodeTile);
  target = target > tiles ? tiles : target;
  plan.splits = (int)(target < 1 ? 1 : (target > 256 ? 256 : target));
  return plan;
}

template <typename K>
void allow_smem(K* kernel, size_t bytes, const char* what) {
  if (bytes > 48 * 1024)
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               what);
}

}  // namespace

void launch_kv_append(const AppendParams& p, void* stream) {
  if (p.cache.batch == 0 || p.n_new == 0) return;
  check_format(p.cache, "trous kv_append");
  const auto s = static_cast<cudaStream_t>(stream);
  const float limit = finite_limit(p.cache.act);
  dispatch_dtype<CudaTypes>(p.cache.act, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH((unsigned)p.cache.batch, kAppendThreads, 0, s, kv_append_kernel<T>)(p, limit, token_capacity(p.cache));
  });
  check_launch("trous kv_append");
}

size_t decode_workspace_bytes(const DecodeParams& p) {
  if (p.cache.batch == 0 || p.Hq == 0 || p.Sq == 0) return 0;
  const DecodePlan plan = decode_plan(p);
  const size_t rows = (size_t)plan.splits * (size_t)(p.cache.batch * p.cache.map.num_heads) * (size_t)plan.nq;
  return rows * (size_t)(p.cache.fmt.head_dim + 1) * sizeof(float);
}

void launch_quantized_decode(const DecodeParams& p, void* stream) {
  if (p.cache.batch == 0 || p.Hq == 0 || p.Sq == 0) return;
  const char* what = "trous quantized_decode_attention";
  const auto s = static_cast<cudaStream_t>(stream);
  const DecodePlan plan = decode_plan(p);
  const index_t bh = p.cache.batch * p.cache.map.num_heads;
  if (plan.row_blocks > 65535)
    throw std::runtime_error(std::string(what) + " (CUDA): " + std::to_string(plan.nq) +
                             " query rows per KV head need more row blocks than the CUDA grid allows (65535)");
  dispatch_dtype<CudaTypes>(p.cache.act, [&](auto tag) {
    using T = decltype(tag);
    allow_smem(quantized_decode_kernel<T>, plan.smem, what);
    const dim3 grid((unsigned)bh, (unsigned)plan.splits, (unsigned)plan.row_blocks);
    TROUS_LAUNCH(grid, kDecodeThreads, plan.smem, s, quantized_decode_kernel<T>)(p, plan);
    TROUS_LAUNCH((unsigned)(bh * plan.nq), kDecodeThreads, 0, s, quantized_decode_merge<T>)(p, plan);
  });
  check_launch(what);
}

}  // namespace kv
}  // namespace trous
