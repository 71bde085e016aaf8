"""KV-cache quantization cases: trous ops vs the same quantization in plain PyTorch ops
(:mod:`trous.kvcache.reference`).

Every case times the raw registered op (``torch.ops.trous.kv_*``) and its reference with the same
arguments: same parameter dtype (fp16 for fp16 caches, fp32 for fp32 and bf16 ones, as trous.kvcache picks),
and for fp8 the same precomputed scale (the dynamic amax scale is a separate reduction, not timed).
Dequantize cases decode codes made by the trous quantizer, to the dtype of the original cache.

Bytes per op (``bytes`` in the json): quantize reads x and writes codes + parameters; dequantize
reads codes + parameters and writes the output.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..bench.harness import Case
from . import reference as ref

FAMILY = "kv"
REFERENCE_SHAPE = (1, 8, 8192, 128)  # kvcache.md's CPU reference shape
GPU_SHAPE = (8, 8, 16384, 128)
BASELINE = "trous.kvcache.reference (plain PyTorch ops)"

_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def targets(device: str) -> dict:
    """--check bars: on CPU >= 50% of copy bandwidth and >= 3x the PyTorch composition; on GPU
    >= 70% of copy bandwidth (kvcache.md asks >= 70% for bulk quantize / dequantize)."""
    if device == "cuda":
        return {"bw_fraction": 0.70}
    return {"bw_fraction": 0.50, "speedup": 3.0}


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.float32


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _randn(shape, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(1000 + seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _group_label(G: int, D: int) -> str:
    return f"G={G}" + ("=D" if G == D else "")


def _token_cases(shape, dt: str, device: str, bits: int, G: int, symmetric: bool, tg: dict) -> List[Case]:
    import trous  # noqa: F401  (registers the ops)

    ops = torch.ops.trous
    dtype = _DTYPES[dt]
    pdt = _param_dtype(dtype)
    B, H, T, D = shape
    N = _numel(shape)
    code_bytes = N if symmetric else N * bits // 8
    param_bytes = _nbytes(B * H * T * (D // G) * (1 if symmetric else 2), pdt)
    x_bytes = _nbytes(N, dtype)
    scheme = f"sym int8 {_group_label(G, D)}" if symmetric else f"int{bits} {_group_label(G, D)}"

    def make_x(i):
        return (_randn(shape, dtype, device, i),)

    def make_codes(i):
        codes, params = ops.kv_quantize(_randn(shape, dtype, device, i), bits, G, symmetric, pdt)
        return codes, params

    common = dict(family=FAMILY, shape=_shape_str(shape), dtype=dt, baseline_name=BASELINE, targets=dict(tg))
    return [
        Case(op=f"quantize {scheme}", make_inputs=make_x,
             fn=lambda x: ops.kv_quantize(x, bits, G, symmetric, pdt),
             baseline=lambda x: ref.quantize_per_token(x, bits, G, symmetric, pdt),
             bytes_moved=x_bytes + code_bytes + param_bytes, input_bytes=x_bytes, **common),
        Case(op=f"dequantize {scheme}", make_inputs=make_codes,
             fn=lambda c, p: ops.kv_dequantize(c, p, bits, G, symmetric, dtype),
             baseline=lambda c, p: ref.dequantize_per_token(c, p, bits, G, symmetric, dtype),
             bytes_moved=code_bytes + param_bytes + x_bytes, input_bytes=code_bytes + param_bytes, **common),
    ]


def _channel_cases(shape, dt: str, device: str, bits: int, G: int, tg: dict) -> List[Case]:
    import trous  # noqa: F401

    ops = torch.ops.trous
    dtype = _DTYPES[dt]
    pdt = _param_dtype(dtype)
    B, H, T, D = shape
    N = _numel(shape)
    code_bytes = N * bits // 8
    param_bytes = _nbytes(B * H * (T // G) * D * 2, pdt)
    x_bytes = _nbytes(N, dtype)
    scheme = f"KIVI int{bits} G={G}"

    def make_x(i):
        return (_randn(shape, dtype, device, i),)

    def make_codes(i):
        return ops.kv_quantize_channel(_randn(shape, dtype, device, i), bits, G, pdt)

    common = dict(family=FAMILY, shape=_shape_str(shape), dtype=dt, baseline_name=BASELINE, targets=dict(tg))
    return [
        Case(op=f"quantize {scheme}", make_inputs=make_x,
             fn=lambda x: ops.kv_quantize_channel(x, bits, G, pdt),
             baseline=lambda x: ref.quantize_per_channel(x, bits, G, pdt),
             bytes_moved=x_bytes + code_bytes + param_bytes, input_bytes=x_bytes, **common),
        Case(op=f"dequantize {scheme}", make_inputs=make_codes,
             fn=lambda c, p: ops.kv_dequantize_channel(c, p, bits, G, dtype),
             baseline=lambda c, p: ref.dequantize_per_channel(c, p, bits, G, dtype),
             bytes_moved=code_bytes + param_bytes + x_bytes, input_bytes=code_bytes + param_bytes, **common),
    ]


def _fp8_cases(shape, dt: str, device: str, fmt: str, per_head: bool, tg: dict) -> List[Case]:
    import trous  # noqa: F401
    from trous.kvcache import fp8_scale

    ops = torch.ops.trous
    dtype = _DTYPES[dt]
    N = _numel(shape)
    x_bytes = _nbytes(N, dtype)
    scale_bytes = 4 * (shape[1] if per_head else 1)
    scheme = f"fp8 {fmt} per-{'head' if per_head else 'tensor'}"

    def make_x(i):
        x = _randn(shape, dtype, device, i)
        return x, fp8_scale(x, fmt, per_head)

    def make_codes(i):
        x, s = make_x(i)
        return ops.kv_quantize_fp8(x, s, fmt), s

    common = dict(family=FAMILY, shape=_shape_str(shape), dtype=dt, baseline_name=BASELINE, targets=dict(tg))
    return [
        Case(op=f"quantize {scheme}", make_inputs=make_x,
             fn=lambda x, s: ops.kv_quantize_fp8(x, s, fmt),
             baseline=lambda x, s: ref.quantize_fp8(x, s, fmt),
             bytes_moved=x_bytes + scale_bytes + N, input_bytes=x_bytes, **common),
        Case(op=f"dequantize {scheme}", make_inputs=make_codes,
             fn=lambda c, s: ops.kv_dequantize_fp8(c, s, fmt, dtype),
             baseline=lambda c, s: ref.dequantize_fp8(c, s, fmt, dtype),
             bytes_moved=N + scale_bytes + x_bytes, input_bytes=N, **common),
    ]


def _cases_for_shape(shape: Tuple[int, ...], dtypes: Sequence[str], device: str, quick: bool) -> List[Case]:
    tg = targets(device)
    D = shape[3]
    out: List[Case] = []
    for dt in dtypes:
        if quick:
            token = [(8, D), (4, 32), (2, 32)]
            channel = [2]
            fp8 = [False]
        else:
            token = [(bits, G) for bits in (8, 4, 2) for G in (32, 64, 128, D) if D % G == 0]
            token = list(dict.fromkeys(token))  # G = D may repeat 128
            channel = [2, 4]
            fp8 = [False, True]
        for bits, G in token:
            out += _token_cases(shape, dt, device, bits, G, False, tg)
        out += _token_cases(shape, dt, device, 8, D, True, tg)
        for bits in channel:
            if shape[2] % 32 == 0:
                out += _channel_cases(shape, dt, device, bits, 32, tg)
        for per_head in fp8:
            out += _fp8_cases(shape, dt, device, "e4m3", per_head, tg)
    return out


def cases(device: str, quick: bool, shape: Optional[Sequence[int]] = None) -> List[Case]:
    """The KV family's cases. CPU: the reference shape (1, 8, 8192, 128) in fp16 and fp32; CUDA adds
    (8, 8, 16384, 128) fp16. --quick: fp16 only and a subset of schemes. ``shape`` replaces the shapes."""
    if shape is not None:
        return _cases_for_shape(tuple(shape), ["fp16"] if quick else ["fp16", "fp32"], device, quick)
    out = _cases_for_shape(REFERENCE_SHAPE, ["fp16"] if quick else ["fp16", "fp32"], device, quick)
    if device == "cuda":
        out += _cases_for_shape(GPU_SHAPE, ["fp16"], device, quick)
    out.append(_append_case(device))
    return out


APPEND_SHAPE = (8, 8, 1, 128)  # one decode step of a layer: B 8, Hkv 8, n_new 1, D 128


def _append_case(device: str) -> Case:
    """kv_append of one decode step of all K and V of a layer (int4 per-token groups of 32, fp16
    activations and parameters, contiguous cache of 4096 tokens holding 1000) against a plain copy_
    of the same K and V bytes into a preallocated buffer. Target (issue 13): < 2x the copy's time."""
    import trous  # noqa: F401

    ops = torch.ops.trous
    B, H, n, D = APPEND_SHAPE
    bits, G, t_max, start = 4, 32, 4096, 1000
    dtype = torch.float16

    def make_inputs(i):
        kv = _randn((2, B, H, n, D), dtype, device, i)
        codes = [torch.zeros(B, H, t_max, D * bits // 8, dtype=torch.uint8, device=device) for _ in range(2)]
        params = [torch.zeros(B, H, t_max, D // G, 2, dtype=dtype, device=device) for _ in range(2)]
        ring = [torch.zeros(B, H, 0, D, dtype=dtype, device=device) for _ in range(2)]
        lengths = torch.full((B,), start, dtype=torch.int32, device=device)
        return (codes[0], params[0], codes[1], params[1], ring[0], ring[1], lengths, kv, torch.empty_like(kv))

    # The harness calls fn at most warm-up + max_repeats (~52) times in all: the cache never fills.
    def append(kc, kp, vc, vp, kr, vr, lengths, kv, buf):
        ops.kv_append(kc, kp, vc, vp, kr, vr, lengths, None, kv[0], kv[1], "per_token", bits, G, 0, "e4m3")

    N = 2 * B * H * n * D
    x_bytes = _nbytes(N, dtype)
    written = N * bits // 8 + _nbytes(2 * B * H * n * (D // G) * 2, dtype)
    return Case(family=FAMILY, op="append decode step int4 G=32 (K+V of a layer)", shape=_shape_str(APPEND_SHAPE),
                dtype="fp16", make_inputs=make_inputs, fn=append,
                baseline=lambda *a: a[-1].copy_(a[-2]), bytes_moved=x_bytes + written,
                input_bytes=x_bytes + 2 * _nbytes(B * H * t_max * D // 2, torch.uint8),
                baseline_name="copy_ of the same K and V bytes into a preallocated buffer",
                targets={"speedup": 0.5})
