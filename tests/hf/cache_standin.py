"""A slow plain-PyTorch stand-in for ``trous::kv_append`` / ``trous::quantized_decode_attention``, written from
the schemas and the addressing of csrc/kvcache/cache.h, quantizing with the existing bulk ops
(``trous.kvcache.quantize_*``, bit-identical to the kernels' codes).

Two uses: the API tests run through it while the fused ops are not built (``ops()`` picks the real ops when
``torch.ops.trous`` has them), and, where both exist, it is an independent check of the fused ops'
end result (tests/kvcache/test_kv_cache_api.py compares them).
"""
import os
import types

import torch

import trous.kvcache as kvq


def _tok_group(scheme, G):
    return G if scheme == "kivi" else 1


def _qlen(scheme, G, R, T):
    g = _tok_group(scheme, G)
    return 0 if T <= R else ((T - R) // g) * g


def _page_rows(codes_like, block_table, b, t0, t1, page_size):
    """Pages holding tokens [t0, t1) of sequence b: (page ids, first token of the first page)."""
    if block_table is None:
        return [b], 0
    p0, p1 = t0 // page_size, -(-t1 // page_size)
    return [int(block_table[b, p]) for p in range(p0, p1)], p0 * page_size


def _gather(x, pages, dim_tokens=2):
    """Concatenates the given pages along the token dim: [H, n_pages * page_size, ...]."""
    return torch.cat([x[p] for p in pages], dim=dim_tokens - 1)


def _scatter(x, pages, first, values, t0, per):
    """Writes values [H, n, ...] (rows t0 .. t0 + n, in units of `per` tokens) into the pages."""
    page_rows = x.shape[2]
    r = torch.arange(values.shape[1]) + (t0 // per) - first // per
    pid = torch.tensor(pages, dtype=torch.int64)[r // page_rows].to(x.device)
    x[pid, :, (r % page_rows).to(x.device)] = values.transpose(0, 1)


def kv_append(k_codes, k_params, v_codes, v_params, k_res, v_res, lengths, block_table, k, v, scheme, bits,
              group_size, residual, fp8_format):
    G, R = group_size, residual
    g = _tok_group(scheme, G)
    cap = R + g - 1
    page_size = k_codes.shape[2]
    n = k.shape[2]
    for b in range(lengths.shape[0]):
        T0 = int(lengths[b])
        T1 = T0 + n
        q0, q1 = _qlen(scheme, G, R, T0), _qlen(scheme, G, R, T1)
        # Full precision tokens [q0, T1): the ring then the new ones.
        ring = (torch.arange(q0, T0) % max(cap, 1)).to(k.device)
        fk = torch.cat([k_res[b][:, ring], k[b]], 1)
        fv = torch.cat([v_res[b][:, ring], v[b]], 1)
        if q1 > q0:
            xk, xv = fk[:, :q1 - q0].unsqueeze(0), fv[:, :q1 - q0].unsqueeze(0)
            pages, first = _page_rows(k_codes, block_table, b, q0, q1, page_size)
            if scheme == "fp8":
                ck = kvq.quantize_fp8(xk, k_params, fp8_format).codes[0]
                cv = kvq.quantize_fp8(xv, v_params, fp8_format).codes[0]
                _scatter(k_codes, pages, first, ck, q0, 1)
                _scatter(v_codes, pages, first, cv, q0, 1)
            else:
                pd = k_params.dtype
                if scheme == "kivi":
                    qk = kvq.quantize_per_channel(xk, bits, G, param_dtype=pd)
                    qv = kvq.quantize_per_token(xv, bits, G, param_dtype=pd)
                    _scatter(k_params, pages, first, qk.params[0], q0, G)
                else:
                    sym = scheme == "symmetric"
                    qk = kvq.quantize_per_token(xk, bits, G, symmetric=sym, param_dtype=pd)
                    qv = kvq.quantize_per_token(xv, bits, G, symmetric=sym, param_dtype=pd)
                    _scatter(k_params, pages, first, qk.params[0], q0, 1)
                _scatter(v_params, pages, first, qv.params[0], q0, 1)
                _scatter(k_codes, pages, first, qk.codes[0], q0, 1)
                _scatter(v_codes, pages, first, qv.codes[0], q0, 1)
        if T1 > q1:
            slots = (torch.arange(q1, T1) % cap).to(k.device)
            k_res[b][:, slots] = fk[:, q1 - q0:]
            v_res[b][:, slots] = fv[:, q1 - q0:]
        lengths[b] = T1


def dequantized_history(k_codes, k_params, v_codes, v_params, k_res, v_res, lengths, block_table, scheme, bits,
                        group_size, residual, fp8_format, b):
    """Keys and values [H, T, D] (fp32) of sequence b: dequantized tokens then the residual."""
    G, R = group_size, residual
    g = _tok_group(scheme, G)
    cap = R + g - 1
    T = int(lengths[b])
    ql = _qlen(scheme, G, R, T)
    page_size = k_codes.shape[2]
    H, D = k_res.shape[1], k_res.shape[3]
    if ql:
        pages, _ = _page_rows(k_codes, block_table, b, 0, ql, page_size)
        ck = _gather(k_codes, pages)[:, :ql].unsqueeze(0).contiguous()
        cv = _gather(v_codes, pages)[:, :ql].unsqueeze(0).contiguous()
        if scheme == "fp8":
            qk = kvq.QuantizedKV(ck, k_params, "fp8", 8, 0, fp8_format)
            qv = kvq.QuantizedKV(cv, v_params, "fp8", 8, 0, fp8_format)
        else:
            pv = _gather(v_params, pages)[:, :ql].unsqueeze(0).contiguous()
            if scheme == "kivi":
                pk = _gather(k_params, pages)[:, :ql // G].unsqueeze(0).contiguous()
                qk = kvq.QuantizedKV(ck, pk, "channel", bits, G)
                qv = kvq.QuantizedKV(cv, pv, "token", bits, G)
            else:
                pk = _gather(k_params, pages)[:, :ql].unsqueeze(0).contiguous()
                s = "symmetric" if scheme == "symmetric" else "token"
                qk = kvq.QuantizedKV(ck, pk, s, bits, G)
                qv = kvq.QuantizedKV(cv, pv, s, bits, G)
        kq, vq = kvq.dequantize(qk, torch.float32)[0], kvq.dequantize(qv, torch.float32)[0]
    else:
        kq = vq = torch.zeros(H, 0, D, device=k_res.device)
    if T > ql:
        slots = (torch.arange(ql, T) % cap).to(k_res.device)
        kq = torch.cat([kq, k_res[b][:, slots].float()], 1)
        vq = torch.cat([vq, v_res[b][:, slots].float()], 1)
    return kq, vq


def quantized_decode_attention(q, k_codes, k_params, v_codes, v_params, k_res, v_res, lengths, block_table, scheme,
                               bits, group_size, residual, fp8_format, scale, softcap):
    B, Hq, Sq, D = q.shape
    H = k_res.shape[1]
    out = torch.zeros(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        K, V = dequantized_history(k_codes, k_params, v_codes, v_params, k_res, v_res, lengths, block_table, scheme,
                                   bits, group_size, residual, fp8_format, b)
        T = K.shape[1]
        K = K.repeat_interleave(Hq // H, 0)
        V = V.repeat_interleave(Hq // H, 0)
        s = scale * (q[b].float() @ K.transpose(1, 2))  # [Hq, Sq, T]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = T - Sq + torch.arange(Sq, device=q.device)
        mask = torch.arange(T, device=q.device)[None, :] <= pos[:, None]
        s = s.masked_fill(~mask, float("-inf"))
        valid = pos >= 0
        m = torch.logsumexp(s, -1)
        p = torch.exp(s - m[..., None]).nan_to_num(0.0)
        o = p @ V
        out[b] = torch.where(valid[None, :, None], o, torch.zeros_like(o)).to(q.dtype)
        lse[b] = torch.where(valid[None, :], m, torch.full_like(m, float("-inf")))
    return out, lse


STANDIN = types.SimpleNamespace(kv_append=kv_append, quantized_decode_attention=quantized_decode_attention)


def have_fused_ops():
    return hasattr(torch.ops.trous, "kv_append") and hasattr(torch.ops.trous, "quantized_decode_attention")


def ops():
    """The fused ops when built (and TROUS_CACHE_STANDIN is not 1), else the stand-in."""
    if os.environ.get("TROUS_CACHE_STANDIN") == "1":
        return STANDIN
    return torch.ops.trous if have_fused_ops() else STANDIN
