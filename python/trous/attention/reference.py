"""Slow, obviously correct attention with the materialised mask (shared/spec/attention.md, "How
peers test"): scores in float64 on upcast inputs, the dense (Sq, Sk) mask of the pattern, GQA by
repeating the KV heads, softcap, fully masked rows 0 with LSE -inf. Differentiable (the tests take
its gradients); ``compute_dtype`` runs the same formula in a low precision, the "plain PyTorch at
the low precision" of FlashAttention's tolerance rule.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .pattern import AttentionPattern

__all__ = ["attention", "attention_from_mask", "attention_varlen", "varlen_mask"]


def attention_from_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: Optional[float] = None, softcap: float = 0.0,
                        compute_dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Sq, Hq, D) over k, v (B, Sk, Hkv, D) where ``mask`` is True: (Sq, Sk), or
    (B or 1, Hq or 1, Sq, Sk) for a mask per batch / head (a block mask's materialize()); query head
    h reads KV head h // (Hq / Hkv).

    Returns ``out`` (B, Sq, Hq, D) and ``lse`` (B, Hq, Sq), both in ``compute_dtype``:
    s = scale * q.k (then ``softcap * tanh(s / softcap)`` when softcap > 0), masked entries -inf,
    lse = log sum_j exp(s), out = softmax(s) @ v; a row with no allowed key gives out 0 and
    lse -inf. A non-finite value reaches only the rows that may attend it (masked keys never
    contribute, not even 0 * NaN).
    """
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % max(Hkv, 1) != 0:
        raise ValueError(f"reference: Hq = {Hq} is not a multiple of Hkv = {Hkv}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    if Hkv != Hq:
        kd = kd.repeat_interleave(Hq // Hkv, dim=1)
        vd = vd.repeat_interleave(Hq // Hkv, dim=1)
    m = mask.to(q.device, torch.bool)
    m = m if m.dim() == 4 else m[None, None]
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~m, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
    empty = row_max == float("-inf")
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)  # masked: exp(-inf) = 0
    total = e.sum(dim=-1, keepdim=True)  # >= 1 where a key is allowed (NaN where a score is NaN)
    has = ~empty
    p = e / torch.where(has, total, torch.ones_like(total))
    lse = torch.where(has, row_max + torch.log(torch.where(has, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    if bool(torch.isfinite(vd).all()):
        out = torch.matmul(p, vd)
    else:  # 0 * NaN must not leak from masked keys: sum only the allowed terms
        terms = p[..., None] * vd[:, :, None, :, :]
        out = torch.where(m[..., None], terms, torch.zeros_like(terms)).sum(dim=-2)
    return out.transpose(1, 2), lse.squeeze(-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Optional[AttentionPattern] = None,
              scale: Optional[float] = None, softcap: float = 0.0,
              compute_dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_from_mask` with ``pattern.materialize(Sq, Sk)`` (default: dense)."""
    pattern = pattern if pattern is not None else AttentionPattern()
    mask = pattern.materialize(q.shape[1], k.shape[1], device=q.device)
    return attention_from_mask(q, k, v, mask, scale, softcap, compute_dtype)


def varlen_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, pattern: Optional[AttentionPattern] = None,
                device=None) -> torch.Tensor:
    """The (total_q, total_k) mask of packed sequences: block-diagonal, each block the pattern
    materialised at that sequence's lengths (bottom-right aligned within the sequence)."""
    pattern = pattern if pattern is not None else AttentionPattern()
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    mask = torch.zeros(cq[-1], ck[-1], dtype=torch.bool, device=device)
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq and lk:
            mask[cq[b]:cq[b + 1], ck[b]:ck[b + 1]] = pattern.materialize(lq, lk, device=device)
    return mask


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, pattern: Optional[AttentionPattern] = None,
                     scale: Optional[float] = None, softcap: float = 0.0,
                     compute_dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed q (total_q, Hq, D) over k, v (total_k, Hkv, D) with :func:`varlen_mask`: returns out
    (total_q, Hq, D) and lse (Hq, total_q) in ``compute_dtype``."""
    mask = varlen_mask(cu_seqlens_q, cu_seqlens_k, pattern, q.device)
    out, lse = attention_from_mask(q[None], k[None], v[None], mask, scale, softcap, compute_dtype)
    return out[0], lse[0]
