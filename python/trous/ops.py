"""The registered ops (``torch.ops.trous.*``) under plain names.

Each family's module registers its fake kernels and autograd when ``trous`` is imported; this
module only gives the ops stable Python names.
"""
import torch

_lib = torch.ops.trous


def has_cuda_kernel(op: str) -> bool:
    """Whether this build registered a CUDA kernel for ``trous::<op>`` (never raises)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"trous::{op}", "CUDA")
    except Exception:  # pragma: no cover - private API moved
        return False


# KV-cache quantization (trous.kvcache has the friendlier wrappers).
kv_quantize = _lib.kv_quantize
kv_dequantize = _lib.kv_dequantize
kv_quantize_channel = _lib.kv_quantize_channel
kv_dequantize_channel = _lib.kv_dequantize_channel
kv_quantize_fp8 = _lib.kv_quantize_fp8
kv_dequantize_fp8 = _lib.kv_dequantize_fp8

# DCLS kernel construction (trous.dcls has the modules and construct_kernel).
dcls_construct_kernel = _lib.dcls_construct_kernel
dcls_construct_kernel_backward = _lib.dcls_construct_kernel_backward

# Direct depthwise DCLS convolution (trous._dcls_conv has the wrappers and the cost model).
dcls_conv = _lib.dcls_conv
dcls_conv_backward = _lib.dcls_conv_backward
dcls_conv_tap_counts = _lib.dcls_conv_tap_counts

# Banded grouped 1-D DCLS convolution (trous._dcls_banded has the wrapper, the band and the cost model).
dcls_banded_conv1d = _lib.dcls_banded_conv1d
dcls_banded_conv1d_backward = _lib.dcls_banded_conv1d_backward
