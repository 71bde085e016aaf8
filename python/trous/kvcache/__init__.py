"""KV-cache quantization: int8 / int4 / int2 per-token groups, KIVI per-channel keys, fp8.

``quantize`` holds the functions (fake kernels: the C++ Meta kernels), ``reference`` the slow reference
written from the spec, ``bench`` and ``smoke`` the cases of ``python -m trous.bench`` / ``trous.smoke``.
"""
from .cache_ops import kv_append  # noqa: F401  (kv_append: the cache op of one layer)
from .decode import quantized_decode_attention
from .quantize import (
                       FP8_MAX,
                       QuantizedKV,
                       dequantize,
                       fp8_scale,
                       quantize_fp8,
                       quantize_per_channel,
                       quantize_per_token,
)

__all__ = ["QuantizedKV", "quantize_per_token", "quantize_per_channel", "quantize_fp8", "dequantize", "fp8_scale",
           "FP8_MAX"]
__all__ += ["quantized_decode_attention"]
