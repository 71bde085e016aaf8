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


def inputs_supported(x: torch.Tensor, tensors, cuda_op: str) -> bool:
    """x and `tensors` on one device and floating point, x of a dtype trous's kernels take there
    (CPU: fp32 / fp64 / fp16 / bf16; CUDA: fp32 / fp16 / bf16, when this build has `cuda_op`)."""
    if any(t.device != x.device or not t.is_floating_point() for t in tensors):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and has_cuda_kernel(cuda_op)
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
