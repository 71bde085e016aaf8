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
    out += _append_cases(device)
    out += decode_cases(device, quick)
    out += _generate_cases(device, quick)
    return out


APPEND_SHAPE = (8, 8, 1, 128)  # one decode step of a layer: B 8, Hkv 8, n_new 1, D 128


def _append_cases(device: str) -> List[Case]:
    """kv_append of one decode step of all K and V of a layer (int4 per-token groups of 32, fp16
    activations and parameters, contiguous cache of 4096 tokens holding 1000):
    - against a plain copy_ of the same K and V bytes into a preallocated buffer (issue 13: < 2x the
      copy's time; a bar no op call meets on CPU, where dispatch and validation alone cost ~4x the
      copy of these 32 KB);
    - the restated bar: against an empty kv_append call (n_new = 0: dispatch and every check) plus two
      such copies, speed-up >= 1, i.e. the append's own work costs at most 2x the copy."""
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
    def empty_call_and_two_copies(kc, kp, vc, vp, kr, vr, lengths, kv, buf):
        none = kv[:, :, :, :0]
        ops.kv_append(kc, kp, vc, vp, kr, vr, lengths, None, none[0], none[1], "per_token", bits, G, 0, "e4m3")
        buf.copy_(kv)
        buf.copy_(kv)

    common = dict(family=FAMILY, shape=_shape_str(APPEND_SHAPE), dtype="fp16", make_inputs=make_inputs, fn=append,
                  bytes_moved=x_bytes + written, input_bytes=x_bytes + 2 * _nbytes(B * H * t_max * D // 2, torch.uint8))
    return [
        Case(op="append decode step int4 G=32 (K+V of a layer)", baseline=lambda *a: a[-1].copy_(a[-2]),
             baseline_name="copy_ of the same K and V bytes into a preallocated buffer", targets={"speedup": 0.5},
             **common),
        Case(op="append decode step int4 G=32 vs empty call + 2x copy", baseline=empty_call_and_two_copies,
             baseline_name="kv_append with n_new = 0 (dispatch + checks) plus two copy_ of the K and V bytes",
             targets={"speedup": 1.0}, **common),
    ]



# ---- decode attention over the quantized cache (issue 13 "Performance")
# 32 query heads over 8 KV heads, D 128, one query token, contexts 4k / 16k / 32k (quick: 4k), batch 1
# and 8, every token quantized (residual 0: codes and parameters are the quantize op's output, which
# is the contiguous cache layout). Each format is timed against three baselines in the same run,
# one row each: the grouped matmul + softmax over the fp32 cache (query heads of a KV head batched as
# rows: the strongest CPU baseline), SDPA with enable_gqa over the fp32 cache, and dequantize-then-
# SDPA. ``bytes`` is the cache bytes the decode op reads (codes + parameters + q), so GB/s is the
# effective bandwidth; ``extra["flops"]`` counts 4 D FLOPs per (query head, token) pair, so
# GFLOP/s = extra["flops"] / trous_ms / 1e6 (``python -m trous.kvcache.bench <results.json>``).

DECODE_HEADS = (32, 8, 128)  # Hq, Hkv, D
DECODE_FORMATS = [  # (label, scheme, bits, G, targets against the grouped matmul)
    ("int4 G=32", "per_token", 4, 32, 2.5),
    ("int8 G=D", "per_token", 8, 128, 1.6),
]
DECODE_DEQUANT_TARGET = 10.0
_decode_memo: dict = {}


def grouped_matmul_attention(q, k, v, scale):
    """Softmax attention with the query heads of each KV head batched as the rows of one matmul."""
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (Hq // Hkv) * Sq, D)
    p = torch.softmax((qg @ k.transpose(-1, -2)) * scale, -1)
    return (p @ v).reshape(B, Hq, Sq, D)


def _decode_inputs(B, T, scheme, bits, G, i):
    key = (B, T, scheme, bits, G)
    if key not in _decode_memo:
        _decode_memo.clear()  # one configuration at a time (its cases run one after another)
        _decode_memo[key] = {}
    sets = _decode_memo[key]
    if i not in sets:
        ops = torch.ops.trous
        Hq, Hkv, D = DECODE_HEADS
        g = torch.Generator().manual_seed(2000 + i)
        k = torch.randn(B, Hkv, T, D, generator=g)
        v = torch.randn(B, Hkv, T, D, generator=g)
        q = torch.randn(B, Hq, 1, D, generator=g)
        kc, kp = ops.kv_quantize(k, bits, G, False, torch.float32)
        vc, vp = ops.kv_quantize(v, bits, G, False, torch.float32)
        res = torch.empty(B, Hkv, 0, D)
        lengths = torch.full((B,), T, dtype=torch.int32)
        sets[i] = (q, kc, kp, vc, vp, res, res, lengths, k, v)
    return sets[i]


def _decode_config_cases(B, T, label, scheme, bits, G, target) -> List[Case]:
    import torch.nn.functional as F

    import trous  # noqa: F401

    ops = torch.ops.trous
    Hq, Hkv, D = DECODE_HEADS
    scale = D ** -0.5
    code_bytes = 2 * B * Hkv * T * D * bits // 8
    param_bytes = 2 * B * Hkv * T * (D // G) * 2 * 4
    read = code_bytes + param_bytes + B * Hq * D * 4
    fp32_bytes = 2 * B * Hkv * T * D * 4
    flops = 4.0 * B * Hq * T * D

    def make(i):
        return _decode_inputs(B, T, scheme, bits, G, i)

    def fn(q, kc, kp, vc, vp, kr, vr, lengths, k, v):
        return ops.quantized_decode_attention(q, kc, kp, vc, vp, kr, vr, lengths, None, scheme, bits, G, 0, "e4m3",
                                              scale, 0.0)

    def grouped(q, kc, kp, vc, vp, kr, vr, lengths, k, v):
        return grouped_matmul_attention(q, k, v, scale)

    def sdpa(q, kc, kp, vc, vp, kr, vr, lengths, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def dequant_sdpa(q, kc, kp, vc, vp, kr, vr, lengths, k, v):
        kd = ops.kv_dequantize(kc, kp, bits, G, False, torch.float32)
        vd = ops.kv_dequantize(vc, vp, bits, G, False, torch.float32)
        return F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)

    common = dict(family=FAMILY, shape=f"B={B} T={T} Hq={Hq} Hkv={Hkv} D={D}", dtype="fp32", bytes_moved=read,
                  input_bytes=read + fp32_bytes, make_inputs=make, fn=fn)
    op = f"decode {label}"
    return [
        Case(op=f"{op} vs grouped matmul fp32", baseline=grouped, baseline_name="grouped matmul + softmax, fp32 cache",
             targets={"speedup": target}, extra={"flops": flops, "fp32_cache_bytes": fp32_bytes}, **common),
        Case(op=f"{op} vs SDPA gqa fp32", baseline=sdpa, baseline_name="SDPA enable_gqa, fp32 cache",
             extra={"flops": flops, "fp32_cache_bytes": fp32_bytes}, **common),
        Case(op=f"{op} vs dequantize+SDPA", baseline=dequant_sdpa, baseline_name="kv_dequantize + SDPA enable_gqa",
             targets={"speedup": DECODE_DEQUANT_TARGET}, extra={"flops": flops, "fp32_cache_bytes": fp32_bytes},
             **common),
    ]


def decode_cases(device: str, quick: bool) -> List[Case]:
    """The decode rows (CPU; the CUDA kernel's rows come with it)."""
    if device != "cpu":
        return []
    out: List[Case] = []
    for T in ([4096] if quick else [4096, 16384, 32768]):
        for B in (1, 8):
            for label, scheme, bits, G, target in DECODE_FORMATS:
                out += _decode_config_cases(B, T, label, scheme, bits, G, target)
    return out


def decode_table(rows) -> str:
    """ms, GB/s of cache bytes read, GFLOP/s (and % of the FMA peak) and the baselines of each decode row."""
    from ..attention.bench import fma_peak_gflops

    peak, how = fma_peak_gflops("cpu")
    lines = [f"{'decode':28s} {'shape':32s} {'trous ms':>9s} {'GB/s':>6s} {'GFLOP/s':>8s} {'of peak':>7s}  baseline"]
    for r in rows:
        if r.get("family") != FAMILY or not r["op"].startswith("decode "):
            continue
        name, _, base = r["op"].partition(" vs ")
        gf = r["extra"]["flops"] / r["trous_ms"] / 1e6
        of = f"{100 * gf / peak:6.1f}%" if peak else "      -"
        lines.append(f"{name:28s} {r['shape']:32s} {r['trous_ms']:9.3f} {r['gbps']:6.1f} {gf:8.1f} {of}  "
                     f"{base} {r['baseline_ms']:.3f} ms ({r['speedup']:.2f}x)")
    if peak:
        lines.append(f"FMA peak {peak:.0f} GFLOP/s ({how})")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(decode_table(json.load(f)["rows"]))


# ---- generate() with the tiny LM: trous.hf.QuantizedCache vs transformers' caches -----------------------------
def _generate_cases(device: str, quick: bool) -> List[Case]:
    """A whole ``model.generate()`` of 256 new tokens after a 4k prompt (quick: 32 after 256) with the tiny LM of
    trous.kvcache.tiny_lm (trained weights when tests/data has them; timing does not need them), greedy, batch 1.
    fn: trous.hf.QuantizedCache of one format; baseline: transformers' DynamicCache (and a row for its
    QuantizedCache fp8 backend, the one that installs with transformers). ``extra`` has the new tokens (time
    per token = time / new_tokens) and the cache bytes at the end (the peak: caches only grow)."""
    if not (hasattr(torch.ops.trous, "kv_append") and hasattr(torch.ops.trous, "quantized_decode_attention")):
        return []
    try:
        import transformers
    except ImportError:
        return []
    from ..hf.cache import QuantizedCache
    from . import tiny_lm
    from .cache import QuantizedKVCache

    cfg = transformers.LlamaConfig(**tiny_lm.CONFIG)
    P, N = (256, 32) if quick else (4096, 256)
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dense_bytes = 2 * L * H * D * (P + N) * 4  # fp32 model: DynamicCache holds every token in fp32
    state = {}

    def model():  # loaded on first use: listing the cases costs nothing
        if "model" not in state:
            m = tiny_lm.load_tiny_lm() if tiny_lm.CHECKPOINT.is_file() else tiny_lm.build_model().eval()
            state["model"] = m.to(device)
            state["prompt"] = torch.randint(0, 256, (1, P), generator=torch.Generator().manual_seed(0)).to(device)
        return state["model"]

    def run(make):
        m = model()
        with torch.no_grad():
            return m.generate(state["prompt"], max_new_tokens=N, min_new_tokens=N, do_sample=False, cache=make(m))

    def dynamic():
        return run(lambda m: transformers.DynamicCache(config=m.config))

    formats = {"KIVI-2": dict(scheme="kivi", bits=2), "KIVI-4": dict(scheme="kivi", bits=4),
               "int8": dict(scheme="symmetric", bits=8), "fp8 e4m3": dict(scheme="fp8", bits=8)}
    if quick:
        formats = {"KIVI-2": formats["KIVI-2"]}
    common = dict(family=FAMILY, shape=f"1x{P}+{N}", dtype="fp32", make_inputs=lambda i: (), input_bytes=0,
                  baseline_name="transformers DynamicCache (SDPA)", baseline=dynamic)
    out = []
    for name, opts in formats.items():
        # The bytes the cache holds at the end (its peak: caches only grow), from the same arithmetic.
        cache_bytes = QuantizedKVCache(L, H, D, max_tokens=P + N, dtype=torch.float32, device="meta",
                                       **opts).memory_bytes()
        out.append(Case(op=f"generate {N} after {P} (tiny LM) trous {name}",
                        fn=lambda o=opts: run(lambda m: QuantizedCache(m.config, max_cache_len=P + N, **o)),
                        bytes_moved=cache_bytes,
                        extra={"new_tokens": N, "cache_bytes": cache_bytes, "dense_cache_bytes": dense_bytes},
                        **common))
    hf_fp8 = transformers.QuantizedCache
    out.append(Case(op=f"generate {N} after {P} (tiny LM) HF QuantizedCache fp8",
                    fn=lambda: run(lambda m: hf_fp8("fp8", m.config)), bytes_moved=dense_bytes // 4,
                    extra={"new_tokens": N, "cache_bytes": dense_bytes // 4, "dense_cache_bytes": dense_bytes},
                    **common))
    return out
