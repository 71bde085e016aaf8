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
Parameters are stored in float32 (the default) or, for float16 input only, float16 (the default for
float16 input). bfloat16 parameters are refused (their error on the minimum exceeds an 8-bit step),
and so are float16 parameters for float32 / bfloat16 input (they cannot hold its range). Codes are
computed with the stored, rounded parameters.

Supported range: every finite input. The scale is ``(max/2 - min/2) / L * 2`` rounded up (no overflow for a
group spanning [-FLT_MAX, FLT_MAX]), at least the smallest positive scale of the parameter dtype
(float32: 2^-126, float16: 2^-24, so a tiny or constant group never gets scale 0), and stepped down
by an ulp when the top code would reconstruct beyond the input dtype's range; codes are
``(x/2 - min/2) * (2/scale)`` and dequantization is ``fma(q, scale, min)``: a finite group always
dequantizes to finite values of its dtype. Error per element <= scale/2 (+ parameter rounding).

Non-finite input: a group holding NaN or +-Inf gets NaN scale and min and codes 0, so the whole group
dequantizes to NaN (the poison stays visible; nothing silently becomes finite). fp8: NaN stays NaN,
+-Inf and values beyond the format's range saturate to +-max (448 for e4m3, 57344 for e5m2); the
dynamic scale is the amax of the finite values (NaN and +-Inf ignored) / max. An explicit scale must
be finite and positive: the CPU op refuses others (ValueError); on CUDA, where checking would need a
host sync, an invalid scale gives NaN codes (quantize) and NaN values (dequantize).
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
    dtype: Optional[torch.dtype] = None  # the dtype that was quantized: what dequantize() returns


def _check_x(x: torch.Tensor, op: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"trous.{op}: x must have shape [B, H, T, D], got {x.dim()} dimensions {list(x.shape)}")


def _default_param_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16 parameters for fp16 caches (half the parameter bytes, and fp16 holds fp16's range); fp32
    # for everything else: fp16 parameters cannot hold bf16 or fp32 values beyond 65504.
    return torch.float16 if x.dtype == torch.float16 else torch.float32


def quantize_per_token(x: torch.Tensor, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = False,
                       param_dtype: Optional[torch.dtype] = None) -> QuantizedKV:
    """Min-max quantization of groups of ``group_size`` channels of each (token, head) row.

    x: [B, H, T, D]. group_size defaults to D (TurboMind int8/int4). ``symmetric`` is int8 only.
    Returns codes [B, H, T, D*bits/8] (int8 [B, H, T, D] if symmetric) and params [B, H, T, D/G, 2|1].
    """
    _check_x(x, "kv_quantize")
    group_size = x.shape[-1] if group_size is None else group_size
    param_dtype = param_dtype or _default_param_dtype(x)
    codes, params = _ops.kv_quantize(x, bits, group_size, symmetric, param_dtype)
    return QuantizedKV(codes, params, "symmetric" if symmetric else "token", bits, group_size, "", x.dtype)


def quantize_per_channel(x: torch.Tensor, bits: int = 2, group_size: int = 32,
                         param_dtype: Optional[torch.dtype] = None) -> QuantizedKV:
    """KIVI key quantization: each (head, channel) gets one scale / min per ``group_size`` tokens.

    x: [B, H, T, D] with T a multiple of group_size (KIVI keeps the incomplete tail group, the
    residual, in full precision). Returns codes [B, H, T, D*bits/8] and params [B, H, T/G, D, 2].
    """
    _check_x(x, "kv_quantize_channel")
    param_dtype = param_dtype or _default_param_dtype(x)
    codes, params = _ops.kv_quantize_channel(x, bits, group_size, param_dtype)
    return QuantizedKV(codes, params, "channel", bits, group_size, "", x.dtype)


def fp8_scale(x: torch.Tensor, fmt: str = "e4m3", per_head: bool = False) -> torch.Tensor:
    """Dynamic fp8 scale amax / max_fp8 as fp32: shape [] (per tensor) or [H] (per KV head).

    amax is over the finite values only: a NaN or +-Inf never decides the scale (NaN stays NaN
    elementwise, +-Inf saturates to +-max). A tensor (or head) with no nonzero finite value, empty
    ones included, gets scale 1 so that it still encodes exactly.
    """
    _check_x(x, "kv_quantize_fp8")
    if fmt not in FP8_MAX:
        raise ValueError(f"trous.kv_quantize_fp8: format must be one of {sorted(FP8_MAX)}, got {fmt!r}")
    # In x's own dtype (the amax of its values is one of them, exactly): no float32 copy of the cache.
    a = x.detach().abs().nan_to_num(nan=0.0, posinf=0.0)
    if a.numel() == 0:  # B = 0, T = 0 or H = 0: no value decides the scale
        amax = a.new_zeros((x.shape[1],) if per_head else (), dtype=torch.float32)
    else:
        amax = (a.amax(dim=(0, 2, 3)) if per_head else a.amax()).float()
    scale = amax / FP8_MAX[fmt]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, scale: Optional[torch.Tensor] = None, fmt: str = "e4m3",
                 per_head: bool = False) -> QuantizedKV:
    """fp8 quantization q = satfinite_rne(x / scale); codes are the fp8 bit patterns as uint8
    [B, H, T, D] (``codes.view(torch.float8_e4m3fn)`` gives the torch fp8 tensor).

    scale: fp32 [] or [H]; None computes the dynamic scale amax / max_fp8 (see :func:`fp8_scale`).
    """
    _check_x(x, "kv_quantize_fp8")
    if scale is None:
        scale = fp8_scale(x, fmt, per_head)
    codes = _ops.kv_quantize_fp8(x, scale, fmt)
    return QuantizedKV(codes, scale, "fp8", 8, 0, fmt, x.dtype)


def dequantize(q: QuantizedKV, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decodes any :class:`QuantizedKV` to a [B, H, T, D] tensor of ``dtype`` (computed in fp32).

    ``dtype`` defaults to the dtype that was quantized (``q.dtype``); a QuantizedKV built without
    it decodes to float32 (which holds every value any parameter dtype can reconstruct).
    """
    if dtype is None:
        dtype = q.dtype if q.dtype is not None else torch.float32
    if q.scheme in ("token", "symmetric"):
        return _ops.kv_dequantize(q.codes, q.params, q.bits, q.group_size, q.scheme == "symmetric", dtype)
    if q.scheme == "channel":
        return _ops.kv_dequantize_channel(q.codes, q.params, q.bits, q.group_size, dtype)
    if q.scheme == "fp8":
        return _ops.kv_dequantize_fp8(q.codes, q.params, q.format, dtype)
    raise ValueError(f"unknown quantization scheme {q.scheme!r}")
