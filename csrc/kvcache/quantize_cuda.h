// Torch-free declarations of the KV-cache CUDA launchers (csrc/cuda/kvcache.cu).
// `stream` is a cudaStream_t; pointers are device pointers; shapes were checked by the caller.
#pragma once
#include "trous/common.h"
#include "kvcache/quantize.h"

namespace trous {
namespace kv {

void launch_quantize_token(DType dtype, const void* x, uint8_t* codes, void* params, const TokenQuantArgs& a,
                           void* stream);
void launch_dequantize_token(DType dtype, const uint8_t* codes, const void* params, void* out,
                             const TokenDequantArgs& a, void* stream);
void launch_quantize_channel(DType dtype, const void* x, uint8_t* codes, void* params, const ChannelQuantArgs& a,
                             void* stream);
void launch_dequantize_channel(DType dtype, const uint8_t* codes, const void* params, void* out,
                               const ChannelDequantArgs& a, void* stream);
void launch_quantize_fp8(DType dtype, const void* x, const float* scale, uint8_t* codes, const Fp8Args& a,
                         void* stream);
void launch_dequantize_fp8(DType dtype, const uint8_t* codes, const float* scale, void* out, index_t rows, index_t H,
                           index_t T, index_t D, Fp8Format format, bool per_head, void* stream);

}  // namespace kv
}  // namespace trous
