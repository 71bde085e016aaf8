"""KV-cache quantization written directly from the formulas of kvcache.md in plain PyTorch ops.

Independent of the kernels: no shared code, only the documented math and layouts.
"""
import torch

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def pack_lsb_first(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes along the last dim, element k of each byte at bit offset k * bits."""
    per_byte = 8 // bits
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_lsb_first(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    q = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*codes.shape[:-1], codes.shape[-1] * per_byte)


# The smallest scale of a finite group (a tiny or constant group never gets scale 0; 1 / scale is finite).
MIN_SCALE = {torch.float16: 2.0**-24, torch.float32: 2.0**-126}
# Reconstructions stay below this (exclusive) so that they convert to finite values of the input dtype.
FINITE_LIMIT = {torch.float32: float("inf"), torch.float16: 65520.0, torch.bfloat16: 1.99609375 * 2.0**127}


def _below(s, param_dtype):
    """The representable value one ulp below each positive s in param_dtype (as fp32)."""
    bits = s.to(param_dtype).view(torch.int16 if param_dtype == torch.float16 else torch.int32)
    return (bits - 1).view(param_dtype).float()


def _round_up(s, param_dtype):
    """s rounded to param_dtype upwards (the stored scale is never below the exact one)."""
    r = s.to(param_dtype)
    if param_dtype == torch.float32:
        return r
    up = (r.view(torch.int16) + 1).view(param_dtype)
    return torch.where(r.float() < s, up, r).float()


def _fit_scale(s, z, top, limit, param_dtype):
    """Floors s at MIN_SCALE, then steps it down (twice at most) while fma(top, s, z) >= limit."""
    floor = MIN_SCALE[param_dtype]
    s = torch.clamp(s, min=floor)
    for _ in range(2):
        hi = (top * s.double() + z.double()).float()  # the exact product, one rounding (as an fma)
        s = torch.where(~(hi < limit) & (s > floor), _below(s, param_dtype), s)
    return s


def _asym(x, dim, bits, param_dtype, limit):
    """Min-max over `dim` (kept). Returns codes and stored (rounded) scale and min."""
    L = 2**bits - 1
    finite = torch.isfinite(x).all(dim=dim, keepdim=True)
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    zero = mn.to(param_dtype).float()
    scale = _round_up((mx * 0.5 - mn * 0.5) / L * 2, param_dtype)  # (mx - mn) / L without overflow
    scale = _fit_scale(scale, zero, L, limit, param_dtype)
    nan = torch.full_like(scale, float("nan"))
    scale = torch.where(finite, scale, nan)
    zero = torch.where(finite, zero, nan)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.clamp(torch.round((x * 0.5 - zero * 0.5) * (2 * inv)), 0, 2**bits - 1)
    q = torch.where(finite, q, torch.zeros_like(q))
    return q.to(torch.int32), scale, zero


def quantize_per_token(x, bits, group_size, symmetric=False, param_dtype=torch.float32):
    """Returns (codes, params) in the layouts of trous.kvcache.quantize_per_token."""
    B, H, T, D = x.shape
    limit = FINITE_LIMIT[x.dtype]
    xg = x.float().reshape(B, H, T, D // group_size, group_size)
    if symmetric:
        finite = torch.isfinite(xg).all(-1, keepdim=True)
        scale = _round_up(xg.abs().amax(-1, keepdim=True) / 127, param_dtype)
        scale = _fit_scale(scale, torch.zeros_like(scale), 127, limit, param_dtype)
        scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.clamp(torch.round(xg * inv), -127, 127)
        q = torch.where(finite, q, torch.zeros_like(q))
        return q.reshape(B, H, T, D).to(torch.int8), scale.to(param_dtype)
    q, scale, zero = _asym(xg, -1, bits, param_dtype, limit)
    params = torch.cat([scale, zero], -1).to(param_dtype)
    return pack_lsb_first(q.reshape(B, H, T, D), bits), params


def _fma(q, s, z):
    """q * s + z with the exact product and one rounding (as the kernels' fma)."""
    return (q.double() * s.double() + z.double()).float()


def dequantize_per_token(codes, params, bits, group_size, symmetric=False, dtype=torch.float32):
    B, H, T, _ = codes.shape
    p = params.float()
    if symmetric:
        D = codes.shape[-1]
        q = codes.float().reshape(B, H, T, D // group_size, group_size)
        return (q * p[..., 0:1]).reshape(B, H, T, D).to(dtype)
    q = unpack_lsb_first(codes, bits).float()
    D = q.shape[-1]
    q = q.reshape(B, H, T, D // group_size, group_size)
    return _fma(q, p[..., 0:1], p[..., 1:2]).reshape(B, H, T, D).to(dtype)


def quantize_per_channel(x, bits, group_size, param_dtype=torch.float32):
    """KIVI keys: groups of G tokens per (head, channel). Returns (codes, params [B,H,T/G,D,2])."""
    B, H, T, D = x.shape
    xg = x.float().reshape(B, H, T // group_size, group_size, D)
    q, scale, zero = _asym(xg, 3, bits, param_dtype, FINITE_LIMIT[x.dtype])  # scale, zero: [B, H, T/G, 1, D]
    params = torch.stack([scale.squeeze(3), zero.squeeze(3)], -1).to(param_dtype)
    return pack_lsb_first(q.reshape(B, H, T, D), bits), params


def dequantize_per_channel(codes, params, bits, group_size, dtype=torch.float32):
    B, H, T, _ = codes.shape
    q = unpack_lsb_first(codes, bits).float()
    D = q.shape[-1]
    q = q.reshape(B, H, T // group_size, group_size, D)
    p = params.float().unsqueeze(3)  # [B, H, T/G, 1, D, 2]
    return _fma(q, p[..., 0], p[..., 1]).reshape(B, H, T, D).to(dtype)


def _scale_view(scale, x):
    per_head = scale.dim() == 1 and scale.shape[0] != 1
    return scale.float().reshape(1, scale.shape[0], 1, 1) if per_head else scale.float().reshape(())


def quantize_fp8(x, scale, fmt):
    """satfinite RNE of x / scale: out-of-range and +-Inf saturate to +-max, NaN stays NaN."""
    y = x.float() / _scale_view(scale, x)
    y = torch.where(torch.isnan(y), y, y.clamp(-FP8_MAX[fmt], FP8_MAX[fmt]))
    return y.to(FP8_DTYPES[fmt]).view(torch.uint8)


def dequantize_fp8(codes, scale, fmt, dtype=torch.float32):
    return (codes.view(FP8_DTYPES[fmt]).float() * _scale_view(scale, codes)).to(dtype)


# ---- cache: append reference
# What a layer's quantized cache (csrc/kvcache/cache.h) holds, from the spec alone: the residual rule
# and the layouts, then the per-format reference quantizers above.


def ref_token_group(scheme, group_size):
    """Tokens quantized together along the sequence: G for KIVI, 1 for every other scheme."""
    return group_size if scheme == "kivi" else 1


def ref_residual_capacity(scheme, group_size, residual):
    """Slots of the residual ring: R plus the G - 1 tokens of an incomplete KIVI group."""
    return residual + ref_token_group(scheme, group_size) - 1


def ref_quantized_length(scheme, group_size, residual, length):
    """The largest multiple of the token group that leaves at least `residual` tokens in full precision."""
    g = ref_token_group(scheme, group_size)
    return 0 if length <= residual else (length - residual) // g * g


def _ref_roundtrip(x, scheme, bits, group_size, param_dtype, fp8_format, scale, key):
    """x [B, H, T, D] through the scheme's reference quantizer and back, as float32."""
    if scheme == "fp8":
        return dequantize_fp8(quantize_fp8(x, scale, fp8_format), scale, fp8_format, torch.float32)
    if scheme == "kivi" and key:
        codes, params = quantize_per_channel(x, bits, group_size, param_dtype)
        return dequantize_per_channel(codes, params, bits, group_size, torch.float32)
    sym = scheme == "symmetric"
    codes, params = quantize_per_token(x, bits, group_size, sym, param_dtype)
    return dequantize_per_token(codes, params, bits, group_size, sym, torch.float32)


def reference_cache_history(k_hist, v_hist, scheme, bits, group_size, residual, param_dtype=torch.float32,
                            fp8_format="e4m3", k_scale=None, v_scale=None, lengths=None):
    """What the cache must dequantize to after appending the whole history ``k_hist``, ``v_hist``
    ``[B, Hkv, T, D]`` (in any interleaving of prefill and decode steps): tokens ``[0, Tq)`` through the
    reference quantizers, ``Tq = ref_quantized_length(T)`` (KIVI keys per channel over groups of G
    tokens, values per token; other schemes per token), tokens ``[Tq, T)`` exact. ``lengths`` (a list
    of B ints <= T) gives sequences of different lengths; positions beyond a sequence's length are 0.
    fp8: ``k_scale`` / ``v_scale`` are the fixed fp32 scales ([] or [Hkv]). Returns float32 (k, v)."""
    B, H, T, D = k_hist.shape
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    k_out = torch.zeros(B, H, T, D, dtype=torch.float32, device=k_hist.device)
    v_out = torch.zeros_like(k_out)
    for b, n in enumerate(lengths):
        tq = ref_quantized_length(scheme, group_size, residual, n)
        for hist, out, scale, key in ((k_hist, k_out, k_scale, True), (v_hist, v_out, v_scale, False)):
            x = hist[b:b + 1, :, :n]
            if tq > 0:
                out[b:b + 1, :, :tq] = _ref_roundtrip(x[:, :, :tq], scheme, bits, group_size, param_dtype, fp8_format,
                                                      scale, key)
            out[b:b + 1, :, tq:n] = x[:, :, tq:].float()
    return k_out, v_out


def _gather_pages(t, b, block_table, n_pages):
    """Sequence b's first n_pages pages of a [pages, H, page, ...] tensor, as [H, n_pages * page, ...]."""
    rows = t[b:b + 1] if block_table is None else t[block_table[b, :n_pages].long()]
    rows = rows.movedim(1, 0)  # [H, n_pages, page, ...]
    return rows.reshape(rows.shape[0], rows.shape[1] * rows.shape[2], *rows.shape[3:])


def reference_dequantize_cache(k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths, block_table,
                               scheme, bits, group_size, residual, fp8_format="e4m3"):
    """Reads a layer's cache tensors (the layouts of ``trous.kvcache.kv_append``) back into float32
    (k, v) ``[B, Hkv, max(lengths), D]``: quantized tokens gathered through the block table (contiguous:
    page b) and dequantized with the reference decoders, residual tokens read from ring slot
    ``t % capacity``; positions beyond a sequence's length are 0."""
    lens = [int(n) for n in lengths.tolist()]
    B, H = len(lens), k_residual.shape[1]
    D = k_residual.shape[3]
    page = k_codes.shape[2]
    cap = ref_residual_capacity(scheme, group_size, residual)
    T = max(lens, default=0)
    out = [torch.zeros(B, H, T, D, dtype=torch.float32, device=k_codes.device) for _ in range(2)]
    sides = ((k_codes, k_params, k_residual, True), (v_codes, v_params, v_residual, False))
    for b, n in enumerate(lens):
        tq = ref_quantized_length(scheme, group_size, residual, n)
        n_pages = -(-tq // page)
        for (codes, params, ring, key), o in zip(sides, out):
            if tq > 0:
                c = _gather_pages(codes, b, block_table, n_pages)[:, :tq].unsqueeze(0)
                if scheme == "fp8":
                    o[b:b + 1, :, :tq] = dequantize_fp8(c, params, fp8_format, torch.float32)
                elif scheme == "kivi" and key:
                    p = _gather_pages(params, b, block_table, n_pages)[:, :tq // group_size].unsqueeze(0)
                    o[b:b + 1, :, :tq] = dequantize_per_channel(c, p, bits, group_size, torch.float32)
                else:
                    p = _gather_pages(params, b, block_table, n_pages)[:, :tq].unsqueeze(0)
                    o[b:b + 1, :, :tq] = dequantize_per_token(c, p, bits, group_size, scheme == "symmetric",
                                                              torch.float32)
            if n > tq:
                slots = torch.arange(tq, n, device=ring.device) % cap
                o[b, :, tq:n] = ring[b, :, slots].float()
    return out[0], out[1]


# ---- cache: decode reference
# quantized_decode_attention from the history the cache holds (reference_dequantize_cache above:
# cache.h's layout and residual rule), attended in float64.

def reference_decode_attention(q, k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths, block_table,
                               scheme, bits, group_size, residual, fp8_format, scale, softcap=0.0):
    """(out float32 [B, Hq, Sq, D], lse float32 [B, Hq, Sq]) of trous.quantized_decode_attention:
    query s of sequence b sits at position lengths[b] - Sq + s and sees tokens [0, position];
    softcap > 0 maps each score s to softcap * tanh(s / softcap); a query that sees no token gives
    out 0 and lse -inf."""
    B, Hq, Sq, D = q.shape
    Hkv = k_codes.shape[1]
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float64, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64, device=q.device)
    k_hist, v_hist = reference_dequantize_cache(k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths,
                                                block_table, scheme, bits, group_size, residual, fp8_format)
    for b in range(B):
        T = int(lengths[b])
        K = k_hist[b, :, :T].double()  # [Hkv, T, D]
        V = v_hist[b, :, :T].double()
        K = K.repeat_interleave(Hq // Hkv, 0)  # [Hq, T, D]
        V = V.repeat_interleave(Hq // Hkv, 0)
        s = scale * (q[b].double() @ K.transpose(1, 2))  # [Hq, Sq, T]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = T - Sq + torch.arange(Sq, device=q.device)
        allowed = torch.arange(T, device=q.device)[None, :] <= pos[:, None]  # [Sq, T]
        s = s.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(1)  # [Sq]
        lse_b = torch.logsumexp(s, -1)
        p = torch.where(seen[None, :, None], torch.softmax(s, -1), torch.zeros_like(s))
        out[b] = p @ V
        lse[b] = torch.where(seen[None, :], lse_b, torch.full_like(lse_b, float("-inf")))
    return out.float(), lse.float()
