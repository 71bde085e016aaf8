// Every schema of the trous library, one family per block. Implementations register in
// <family>_ops.cpp (TORCH_LIBRARY_IMPL), fake kernels and autograd in python/trous/.
#include <torch/library.h>

TORCH_LIBRARY(trous, m) {
  // ---- KV-cache quantization (kvcache_ops.cpp). x: [B, H, T, D] fp32/fp16/bf16, D % 8 == 0.
  // Per-token groups of G channels: codes uint8 [B, H, T, D * bits / 8] (int8 [B, H, T, D] when
  // symmetric), params [B, H, T, D / G, 2] (scale, min) or [..., 1] (scale) when symmetric.
  m.def("kv_quantize(Tensor x, int bits, int group_size, bool symmetric, ScalarType param_dtype) -> (Tensor, Tensor)");
  m.def("kv_dequantize(Tensor codes, Tensor params, int bits, int group_size, bool symmetric, ScalarType dtype) -> Tensor");
  // KIVI keys: per (head, channel) over G consecutive tokens (T % G == 0): params [B, H, T / G, D, 2].
  m.def("kv_quantize_channel(Tensor x, int bits, int group_size, ScalarType param_dtype) -> (Tensor, Tensor)");
  m.def("kv_dequantize_channel(Tensor codes, Tensor params, int bits, int group_size, ScalarType dtype) -> Tensor");
  // fp8 e4m3fn / e5m2 bit patterns in uint8 [B, H, T, D]; scale fp32 of shape [] or [H].
  m.def("kv_quantize_fp8(Tensor x, Tensor scale, str format) -> Tensor");
  m.def("kv_dequantize_fp8(Tensor codes, Tensor scale, str format, ScalarType dtype) -> Tensor");

  // ---- DCLS kernel construction (dcls_ops.cpp).

  // ---- DCLS direct depthwise convolution (dcls_conv_ops.cpp).
}
