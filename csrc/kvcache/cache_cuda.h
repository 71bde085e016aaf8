// Torch-free declarations of the CUDA launchers of the quantized KV cache (cache_cuda.cu):
// kv_append and quantized_decode_attention. `stream` is a cudaStream_t; every pointer in the params
// is a device pointer; the op layer has validated shapes, dtypes and lengths (cache_params.h).
#pragma once
#include <cstddef>

#include "kvcache/cache_params.h"

namespace trous {
namespace kv {

// One launch for all K and V of a layer: quantizes the tokens the residual rule moves out of the
// ring, writes the rest to the ring and adds n_new to lengths (on the device).
void launch_kv_append(const AppendParams& p, void* stream);

// Bytes of device workspace (uint8) quantized_decode_attention needs for its split-KV partials; the
// op layer allocates it and passes it as DecodeParams::workspace. May be 0.
size_t decode_workspace_bytes(const DecodeParams& p);

// Split-KV decode attention over the quantized cache and the residual ring; writes out and lse.
void launch_quantized_decode(const DecodeParams& p, void* stream);

}  // namespace kv
}  // namespace trous
