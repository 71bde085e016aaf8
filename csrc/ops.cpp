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
  // dcls 0.1.1's ConstructKernel{1,2,3}d, axis quirks included: weight [O, I/g, kc], P and SIG
  // [ndim, O, I/g, kc] (SIG None for v0 / v1), version v0 | v1 | max | gauss -> K [O, I/g, *dks].
  m.def("dcls_construct_kernel(Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, str version) -> Tensor");
  // (grad_weight, grad_P, grad_SIG) in one pass; grad_SIG is an empty tensor when SIG is None.
  m.def("dcls_construct_kernel_backward(Tensor grad_K, Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, str version) -> (Tensor, Tensor, Tensor)");

  // ---- DCLS direct depthwise convolution (dcls_conv_ops.cpp).
  // Depthwise only (in = out = groups = C): x [N, C, *spatial] (1-3 spatial dims, contiguous copy
  // if needed), weight [C, 1, kc], P / SIG [ndim, C, 1, kc] in the dcls layout and axis conventions
  // (SIG only for "gauss" / "max"), bias [C]; zero padding; out [N, C, *out] in x's dtype.
  m.def("dcls_conv(Tensor x, Tensor weight, Tensor P, Tensor? SIG, Tensor? bias, int[] dilated_kernel_size, str version, int[] stride, int[] padding) -> Tensor");
  // (grad_x, grad_weight, grad_P, grad_SIG); output_mask = [input, parameters]; what is not asked
  // for (and grad_SIG of v0 / v1) is an empty [0] tensor. grad_bias = grad_out summed (caller).
  m.def("dcls_conv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, str version, int[] stride, int[] padding, bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // CPU only: taps (support size of the dense window) per channel, int32 [C].
  m.def("dcls_conv_tap_counts(Tensor weight, Tensor P, Tensor? SIG, int[] dilated_kernel_size, str version) -> Tensor");

  // ---- DCLS banded grouped 1-D convolution (dcls_banded_ops.cpp): the direct route of Dcls1d layers
  // that are not depthwise. x [N, C_in, L]; K [C_out, C_in / groups, dks] (the constructed kernel);
  // band int32 [C_out, C_in / groups, 2]: only taps lo <= s < hi of each K row are visited; zero padding.
  m.def("dcls_banded_conv1d(Tensor x, Tensor K, Tensor band, Tensor? bias, int stride, int padding, int groups) -> Tensor");
  // (grad_x, grad_K); output_mask = [x, K]; grad_K is 0 outside the bands; not asked for: empty [0].
  m.def("dcls_banded_conv1d_backward(Tensor grad_out, Tensor x, Tensor K, Tensor band, int stride, int padding, int groups, bool[2] output_mask) -> (Tensor, Tensor)");
}
