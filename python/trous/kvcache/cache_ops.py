"""The cache op of one layer's quantized KV cache: :func:`kv_append` (``torch.ops.trous.kv_append``).

Storage, residual rule and addressing are those of ``csrc/kvcache/cache.h``; ``trous.QuantizedKVCache``
(``cache.py``) allocates the tensors and calls this once per layer and step.
"""
from typing import Optional

import torch

__all__ = ["kv_append", "residual_capacity", "quantized_length", "token_group"]

_ops = torch.ops.trous


def token_group(scheme: str, group_size: int) -> int:
    """Tokens quantized together along the sequence: G for KIVI (its keys are per channel over G tokens),
    1 for every other scheme."""
    return group_size if scheme == "kivi" else 1


def residual_capacity(scheme: str, group_size: int, residual: int) -> int:
    """Slots of the residual ring: R plus the G - 1 tokens of an incomplete KIVI group."""
    return residual + token_group(scheme, group_size) - 1


def quantized_length(scheme: str, group_size: int, residual: int, length: int) -> int:
    """Tokens [0, quantized_length) of a sequence holding ``length`` tokens are quantized: the largest
    multiple of the token group that leaves at least ``residual`` tokens in full precision."""
    g = token_group(scheme, group_size)
    return 0 if length <= residual else (length - residual) // g * g


def kv_append(k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor, v_params: torch.Tensor,
              k_residual: torch.Tensor, v_residual: torch.Tensor, lengths: torch.Tensor,
              block_table: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, scheme: str, bits: int,
              group_size: int, residual: int, fp8_format: str = "e4m3") -> None:
    """Appends this step's keys and values to a layer's quantized cache, in place, in one op call.

    ``k``, ``v``: ``[batch, Hkv, n_new, D]`` (float32, float16 or bfloat16, the cache's activation dtype;
    any strides; ``D % 8 == 0``). Prefill (``n_new`` large) and decode (``n_new = 1``) are the same call.
    Every sequence ``b`` receives its tokens at positions ``[lengths[b], lengths[b] + n_new)`` and
    ``lengths[b] += n_new``.

    The residual rule: with ``T`` tokens held, tokens ``[0, quantized_length(T))`` are quantized and the
    rest (at least ``residual`` of them) stay in full precision in the ring, token ``t`` at slot
    ``t % residual_capacity``. A call quantizes exactly the tokens that the rule moves out of full
    precision (old residual tokens first read from the ring, then new ones), each once: KIVI keys in
    whole groups of ``group_size`` tokens (per channel), everything else per token. Codes and
    parameters are bit-identical to ``trous.kvcache.quantize_*`` applied to the same groups.

    Cache tensors (all contiguous, as ``trous.QuantizedKVCache`` allocates them; ``pages = batch`` and
    ``page_size = T_max`` for the contiguous layout, ``block_table`` None):

    ==============  ===================================================================================
    ``k_codes``     uint8 ``[pages, Hkv, page_size, D * bits / 8]`` (int8 ``[..., D]`` for "symmetric")
    ``v_codes``     the same
    ``k_params``    ``[pages, Hkv, page_size, D / G, 2]`` (scale, min); "symmetric": ``[..., 1]``;
                    "kivi": ``[pages, Hkv, page_size / G, D, 2]`` (one group of G tokens);
                    "fp8": the fixed fp32 scale, ``[]`` or ``[Hkv]``
    ``v_params``    ``[pages, Hkv, page_size, D / G, 2]`` ("symmetric": ``[..., 1]``; "fp8": as k_params)
    ``k_residual``  ``[batch, Hkv, residual_capacity, D]`` in k's dtype (``residual_capacity`` =
                    ``residual + G - 1`` for "kivi", ``residual`` otherwise; may be 0)
    ``v_residual``  the same
    ``lengths``     int32 ``[batch]``
    ``block_table`` int32 ``[batch, max_pages]`` (paged layout): token ``t`` of sequence ``b`` is in page
                    ``block_table[b, t // page_size]`` at offset ``t % page_size``
    ==============  ===================================================================================

    ``scheme``: "per_token" (bits 2 / 4 / 8, groups of ``group_size`` channels), "symmetric" (int8),
    "kivi" (bits 2 / 4 / 8; ``residual`` and ``page_size`` multiples of ``group_size``) or "fp8"
    (``fp8_format`` "e4m3" or "e5m2"; ``bits`` 8; ``group_size`` ignored). Parameters are float32, or
    float16 for float16 activations.

    Errors name the argument; a call that raises changes nothing in the cache (on CPU the lengths, the
    block table entries of the pages written and the fp8 scales are checked before anything is written).
    """
    _ops.kv_append(k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths, block_table, k, v, scheme,
                   bits, group_size, residual, fp8_format)
