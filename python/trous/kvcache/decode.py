"""Decode attention straight from a quantized KV cache (``trous.ops.quantized_decode_attention``).

The cache of one layer is laid out as in ``csrc/kvcache/cache.h`` (``trous.QuantizedKVCache`` owns
it): codes ``[pages, Hkv, page_size, D * bits / 8]`` (contiguous: pages = batch, page_size = T_max;
paged: a page pool plus ``block_table`` int32 ``[batch, max_pages]``), group parameters (per-token
and KIVI values ``[pages, Hkv, page_size, D / G, 2 | 1]``, KIVI keys ``[pages, Hkv, page_size / G,
D, 2]``, fp8: the fixed fp32 scale ``[]`` or ``[Hkv]``), the full-precision residual ring
``[batch, Hkv, residual_capacity, D]`` and ``lengths`` int32 ``[batch]``. With T tokens held, tokens
``[0, quantized_length(T))`` are quantized and the rest sit in the residual ring at slot
``t % residual_capacity``.

The kernel dequantizes every K / V element once, in registers, and uses it for all the query heads
of its KV head (GQA); long contexts are split across threads and merged with their log-sum-exp.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = ["quantized_decode_attention"]

_ops = torch.ops.trous


def quantized_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_params: torch.Tensor,
                               v_codes: torch.Tensor, v_params: torch.Tensor, k_residual: torch.Tensor,
                               v_residual: torch.Tensor, lengths: torch.Tensor,
                               block_table: Optional[torch.Tensor] = None, *, scheme: str = "kivi", bits: int = 4,
                               group_size: int = 32, residual: int = 128, fp8_format: str = "e4m3",
                               scale: Optional[float] = None, softcap: float = 0.0,
                               return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of one or a few new query tokens per sequence over its quantized cache.

    Args:
        q: ``[batch, Hq, Sq, D]`` (float32, float16 or bfloat16; ``Hq % Hkv == 0``). Query ``s`` of
            sequence ``b`` sits at position ``lengths[b] - Sq + s`` and attends cache tokens
            ``[0, position]`` (append this step's K / V first): causal among the Sq new tokens.
        k_codes, v_codes: ``[pages, Hkv, page_size, D * bits / 8]`` uint8 (int8 for "symmetric").
        k_params, v_params: the group parameters (float32, or float16 for float16 activations), or
            for "fp8" the fp32 scales (shape ``[]`` / ``[1]`` or ``[Hkv]``).
        k_residual, v_residual: ``[batch, Hkv, residual_capacity, D]`` in q's dtype, where
            ``residual_capacity = residual + (group_size - 1 if scheme == "kivi" else 0)``.
        lengths: int32 ``[batch]``, tokens held per sequence.
        block_table: int32 ``[batch, max_pages]`` for the paged layout, None for contiguous.
        scheme: "per_token" (2/4/8 bits), "symmetric" (int8), "kivi" (2/4/8 bits) or "fp8".
        bits, group_size, residual, fp8_format: the format the cache was built with (group_size
            is ignored for "fp8", fp8_format for every other scheme).
        scale: the score scale, ``1 / sqrt(D)`` by default.
        softcap: > 0 maps each score s to ``softcap * tanh(s / softcap)``; 0 turns it off.
        return_lse: also return the log-sum-exp (natural log) of each query's scores.

    Returns:
        out ``[batch, Hq, Sq, D]`` in q's dtype, and with ``return_lse`` the fp32 lse
        ``[batch, Hq, Sq]``. A query that sees no token (position < 0) gives out 0 and lse -inf.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _ops.quantized_decode_attention(q, k_codes, k_params, v_codes, v_params, k_residual, v_residual,
                                               lengths, block_table, scheme, bits, group_size, residual, fp8_format,
                                               float(scale), float(softcap))
    return (out, lse) if return_lse else out
