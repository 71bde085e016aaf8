"""KV-cache quantization: int8 / int4 / int2 (per-token groups, symmetric int8, KIVI per-channel keys)
and fp8 (e4m3fn, e5m2) with a per-tensor or per-head scale.

Shapes: ``x`` is ``[B, H, T, D]`` (float32, float16 or bfloat16; any strides; ``D % 8 == 0``).

=====================  ================================  ====================================
scheme                 codes                             parameters
=====================  ================================  ====================================
per-token, b bits      uint8 ``[B, H, T, D*b/8]``        ``[B, H, T, D/G, 2]`` (scale, min)
symmetric int8         int8 ``[B, H, T, D]``             ``[B, H, T, D/G, 1]`` (scale)
KIVI keys, b bits      uint8 ``[B, H, T, D*b/8]``        ``[B, H, T/G, D, 2]`` (scale, min)
fp8                    uint8 bits ``[B, H, T, D]``       fp32 scale ``[]`` or ``[H]``
=====================  ================================  ====================================

Codes are packed LSB-first (4-bit: ``byte = e[2k] | e[2k+1] << 4``), bit-identical to KIVI's packing.
Parameters are stored in float16 or float32 (never bfloat16: its error on the minimum exceeds an
8-bit step) and codes are computed with the stored, rounded parameters.

Non-finite input: a group holding NaN or +-Inf gets NaN scale and min and codes 0, so the whole group
dequantizes to NaN (the poison stays visible; nothing silently becomes finite). fp8: NaN stays NaN,
+-Inf and values beyond the format's range saturate to +-max (448 for e4m3, 57344 for e5m2).
"""
from typing import NamedTuple, Optional

import torch

__all__ = [
    "QuantizedKV",
    "quantize_per_token",
    "quantize_per_channel",
    "quantize_fp8",
    "dequantize",
    "FP8_MAX",
]

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
_ops = torch.ops.trous


class QuantizedKV(NamedTuple):
    """Codes plus what is needed to decode them (``scheme``: "token", "symmetric", "channel", "fp8")."""

    codes: torch.Tensor
    params: torch.Tensor  # group parameters, or the fp8 scale
    scheme: str
    bits: int
    group_size: int
    format: str = ""


def _default_param_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16 parameters for 16-bit caches (half the parameter bytes); fp32 inputs keep fp32 so values
    # beyond fp16's range stay representable.
    return torch.float32 if x.dtype == torch.float32 else torch.float16


def quantize_per_token(x: torch.Tensor, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = False,
                       param_dtype: Optional[torch.dtype] = None) -> QuantizedKV:
    """Min-max quantization of groups of ``group_size`` channels of each (token, head) row.

    x: [B, H, T, D]. group_size defaults to D (TurboMind int8/int4). ``symmetric`` is int8 only.
    Returns codes [B, H, T, D*bits/8] (int8 [B, H, T, D] if symmetric) and params [B, H, T, D/G, 2|1].
    """
    group_size = x.shape[-1] if group_size is None else group_size
    param_dtype = param_dtype or _default_param_dtype(x)
    codes, params = _ops.kv_quantize(x, bits, group_size, symmetric, param_dtype)
    return QuantizedKV(codes, params, "symmetric" if symmetric else "token", bits, group_size)


def quantize_per_channel(x: torch.Tensor, bits: int = 2, group_size: int = 32,
                         param_dtype: Optional[torch.dtype] = None) -> QuantizedKV:
    """KIVI key quantization: each (head, channel) gets one scale / min per ``group_size`` tokens.

    x: [B, H, T, D] with T a multiple of group_size (KIVI keeps the incomplete tail group, the
    residual, in full precision). Returns codes [B, H, T, D*bits/8] and params [B, H, T/G, D, 2].
    """
    param_dtype = param_dtype or _default_param_dtype(x)
    codes, params = _ops.kv_quantize_channel(x, bits, group_size, param_dtype)
    return QuantizedKV(codes, params, "channel", bits, group_size)


def fp8_scale(x: torch.Tensor, fmt: str = "e4m3", per_head: bool = False) -> torch.Tensor:
    """Dynamic fp8 scale amax / max_fp8 as fp32: shape [] (per tensor) or [H] (per KV head).

    An all-zero tensor (or head) gets scale 1 so that it still encodes exactly.
    """
    if fmt not in FP8_MAX:
        raise ValueError(f"fp8 format must be one of {sorted(FP8_MAX)}, got {fmt!r}")
    amax = x.detach().abs().float()
    amax = amax.amax(dim=(0, 2, 3)) if per_head else amax.amax()
    scale = amax / FP8_MAX[fmt]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, scale: Optional[torch.Tensor] = None, fmt: str = "e4m3",
                 per_head: bool = False) -> QuantizedKV:
    """fp8 quantization q = satfinite_rne(x / scale); codes are the fp8 bit patterns as uint8
    [B, H, T, D] (``codes.view(torch.float8_e4m3fn)`` gives the torch fp8 tensor).

    scale: fp32 [] or [H]; None computes the dynamic scale amax / max_fp8 (see :func:`fp8_scale`).
    """
    if scale is None:
        scale = fp8_scale(x, fmt, per_head)
    codes = _ops.kv_quantize_fp8(x, scale, fmt)
    return QuantizedKV(codes, scale, "fp8", 8, 0, fmt)


def dequantize(q: QuantizedKV, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Decodes any :class:`QuantizedKV` to a [B, H, T, D] tensor of ``dtype`` (computed in fp32)."""
    if q.scheme in ("token", "symmetric"):
        return _ops.kv_dequantize(q.codes, q.params, q.bits, q.group_size, q.scheme == "symmetric", dtype)
    if q.scheme == "channel":
        return _ops.kv_dequantize_channel(q.codes, q.params, q.bits, q.group_size, dtype)
    if q.scheme == "fp8":
        return _ops.kv_dequantize_fp8(q.codes, q.params, q.format, dtype)
    raise ValueError(f"unknown quantization scheme {q.scheme!r}")


# ---- fake kernels: shapes and dtypes only, for torch.compile / export.

def _packed(d: int, bits: int) -> int:
    return d * bits // 8


@torch.library.register_fake("trous::kv_quantize")
def _(x, bits, group_size, symmetric, param_dtype):
    b, h, t, d = x.shape
    codes = x.new_empty((b, h, t, d if symmetric else _packed(d, bits)), dtype=torch.int8 if symmetric else torch.uint8)
    params = x.new_empty((b, h, t, d // group_size, 1 if symmetric else 2), dtype=param_dtype)
    return codes, params


@torch.library.register_fake("trous::kv_dequantize")
def _(codes, params, bits, group_size, symmetric, dtype):
    b, h, t, dp = codes.shape
    return codes.new_empty((b, h, t, dp if symmetric else dp * 8 // bits), dtype=dtype)


@torch.library.register_fake("trous::kv_quantize_channel")
def _(x, bits, group_size, param_dtype):
    b, h, t, d = x.shape
    codes = x.new_empty((b, h, t, _packed(d, bits)), dtype=torch.uint8)
    params = x.new_empty((b, h, t // group_size, d, 2), dtype=param_dtype)
    return codes, params


@torch.library.register_fake("trous::kv_dequantize_channel")
def _(codes, params, bits, group_size, dtype):
    b, h, t, dp = codes.shape
    return codes.new_empty((b, h, t, dp * 8 // bits), dtype=dtype)


@torch.library.register_fake("trous::kv_dequantize_fp8")
def _(codes, scale, format, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)
