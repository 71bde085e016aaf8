"""The registered ops (``torch.ops.trous.*``) under plain names: ``trous.ops.kv_quantize`` is
``torch.ops.trous.kv_quantize``. Each family's package registers its ops'
autograd when ``trous`` is imported; this module lists no op, so no family edits it.
"""
import torch

_lib = torch.ops.trous


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(_lib, name)
    except (AttributeError, RuntimeError) as e:
        raise AttributeError(f"trous.ops has no op {name!r} (torch.ops.trous.{name} is not registered)") from e


def __dir__():
    from .info import op_names

    return sorted(set(globals()) | {n.split("::", 1)[1] for n in op_names()})


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
