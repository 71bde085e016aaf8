// Torch-free declarations of the KV-cache CPU kernels (csrc/cpu/kvcache.cpp); same arguments as the
// CUDA launchers in kvcache_cuda.h, so the op layer treats both devices alike.
#pragma once
#include "trous/common.h"
#include "kvcache/quantize.h"

namespace trous {
namespace kv {

void cpu_quantize_token(DType dtype, const void* x, uint8_t* codes, void* params, const TokenQuantArgs& a);
void cpu_dequantize_token(DType dtype, const uint8_t* codes, const void* params, void* out, const TokenDequantArgs& a);
void cpu_quantize_channel(DType dtype, const void* x, uint8_t* codes, void* params, const ChannelQuantArgs& a);
void cpu_dequantize_channel(DType dtype, const uint8_t* codes, const void* params, void* out,
                            const ChannelDequantArgs& a);
void cpu_quantize_fp8(DType dtype, const void* x, const float* scale, uint8_t* codes, const Fp8Args& a);
void cpu_dequantize_fp8(DType dtype, const uint8_t* codes, const float* scale, void* out, index_t rows, index_t H,
                        index_t T, index_t D, Fp8Format format, bool per_head);

}  // namespace kv
}  // namespace trous
