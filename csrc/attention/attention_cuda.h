// Torch-free declarations of the sparse attention CUDA launchers (kernels: attention_kernels.cuh).
// `stream` is a cudaStream_t; every pointer in the params is a device pointer.
//
// Supported: dtype fp16 / bf16 (tensor cores, mma m16n8k16 with fp32 accumulation) with head dims
// 1..256, and fp32 (the same kernels through a plain fp32 path, no tensor cores) with head dims
// 1..128 (its fp32 fragments would spill at 256). Each D runs in the smallest instance of 32, 64, 96,
// 128, 256 holding it, zero padded; 16-byte loads where the tensor's base and strides allow.
// sparse_attention_cuda_supported(dtype, D) says so for the op layer; the launchers throw
// std::invalid_argument otherwise.
//
// Block-sparse layouts: params.pattern.blocks (pattern.h's BlockLayout; table and elems are device
// arrays) is AND-ed with the closed-form pattern in every kernel, per (batch, query head): tiles
// whose blocks allow no pair are never loaded, tiles of full blocks (and a full closed-form tile)
// run unmasked, the rest apply both element masks. The grids do not depend on the layout.
//
// Backward workspace: the op layer fills AttnBwdParams (everything except `workspace`), allocates
// sparse_attention_bwd_workspace_bytes(params) bytes of device memory (256-byte aligned, e.g. a uint8
// tensor from the caching allocator; content irrelevant) and sets params.workspace to it. The
// backward is always deterministic (dK/dV key-tile-outer and dQ query-tile-outer, each output element
// written by one thread, no atomics): deterministic=True costs nothing extra, so the launcher takes
// no flag for it.
#pragma once
#include <cstddef>

#include "attention/attention.h"
#include "trous/dtype.h"

namespace trous {
namespace attention {

constexpr index_t kMaxHeadDimFp32 = 128;

// Whether the CUDA kernels take element type dtype with head dim D.
bool sparse_attention_cuda_supported(DType dtype, index_t D);

// Forward: writes out (0 for fully masked rows) and lse (-inf there). Throws std::invalid_argument
// for an unsupported dtype / D, std::runtime_error for a CUDA error.
void launch_sparse_attention_fwd(DType dtype, const AttnFwdParams& p, void* stream);

// Bytes of workspace launch_sparse_attention_bwd needs for these params (reads the sizes and the
// pattern's global-token counts only, never a pointer): fp32 (B, Hq, Sq) row sums of grad_out * out,
// plus, when the pattern has global tokens, fp32 partial dK / dV per key-tile kind.
size_t sparse_attention_bwd_workspace_bytes(const AttnBwdParams& p);

// Backward with recomputation: writes grad_q, grad_k, grad_v (bitwise deterministic).
void launch_sparse_attention_bwd(DType dtype, const AttnBwdParams& p, void* stream);

}  // namespace attention
}  // namespace trous
