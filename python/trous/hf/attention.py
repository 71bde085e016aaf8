"""``trous.hf.register()``: the "trous" attention implementation of Hugging Face transformers.

After ``trous.hf.register()``, ``AutoModelForCausalLM.from_config(cfg, attn_implementation="trous")``
(or ``model.set_attn_implementation("trous")``) runs every attention layer through
:func:`trous.sparse_attention`, with the layer's own pattern, and never builds the model's dense mask:

- an attention *mask* function is registered under the same name (transformers'
  ``AttentionMaskInterface``). Where the model would build its (B, 1, Sq, Sk) mask, it returns a
  :class:`TrousMask` instead: the layer's :class:`trous.AttentionPattern`, read from the mask
  function transformers composed for that layer (``causal_mask_function``, ``sliding_window_overlay``
  of Mistral / Qwen2 / Gemma-2 / Gemma-3 sliding layers, ``chunked_overlay`` of Llama-4 chunked
  layers, bidirectional variants), so a model's own choice of mask per layer type is what runs;
- the attention function maps transformers' (B, H, S, D) tensors to trous's (B, S, H, D) layout by
  transposed views (no copy), takes ``scaling`` and ``softcap`` (Gemma-2's
  ``attn_logit_softcapping``) from the layer's call, and returns ``(out, None)``.

Window convention: transformers' ``sliding_window = W`` lets query i see keys ``i - W < j <= i``:
W keys *including the query itself*, i.e. trous's ``window=(W - 1, 0)`` with ``causal=True`` (FA2's
``left`` does not count the query). The bidirectional sliding window ``|i - j| <= W`` is
``window=(W, W)``. Chunked attention with chunk C: ``i // C == j // C`` and causal.

Not expressible yet, and refused with an error (never silently ignored): a 2-D ``attention_mask``
with padding (zeros), packed sequences (``position_ids`` restarting inside a row), a custom 4-D
mask, mask functions other than the ones above (e.g. image-token overlays), a ``StaticCache``
(keys beyond the last query), attention dropout > 0 in training, and attention sinks /
position biases. Generation with a ``DynamicCache`` works (the last query is aligned with the last
key, as trous aligns them).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..attention.pattern import AttentionPattern
from ..attention.sparse import sparse_attention
from . import require_transformers

__all__ = ["register", "TrousMask", "attention_forward", "mask_function", "pattern_of"]

NAME = "trous"


@dataclasses.dataclass(frozen=True)
class TrousMask:
    """What the "trous" mask function returns in place of a (B, 1, Sq, Sk) mask: the pattern of the
    layer type and the lengths and offsets the model computed (``q_offset`` / ``kv_offset``: the
    absolute positions of the first query and the first key). ``key_start`` keys at the front are to
    be dropped by the attention (chunked attention with a cache whose first key is not at a chunk
    boundary; those keys are visible to no query)."""

    pattern: AttentionPattern
    q_length: int
    kv_length: int
    q_offset: int = 0
    kv_offset: int = 0
    key_start: int = 0

    @property
    def shape(self):
        """The shape the dense mask would have had (broadcast over batch and heads)."""
        return (1, 1, self.q_length, self.kv_length - self.key_start)


class _Parts:
    def __init__(self):
        self.causal = False
        self.left = -1
        self.right = -1
        self.chunk = 0

    def window(self, left: int, right: int) -> None:
        self.left = left if self.left < 0 else min(self.left, left)
        self.right = right if self.right < 0 else min(self.right, right)


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code is not None else {}


def _decode(fn, parts: _Parts) -> None:
    """Reads a transformers mask function (masking_utils' causal / bidirectional functions, the
    sliding-window and chunked overlays, and their ``and_masks``) into ``parts``; anything else
    raises."""
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        parts.causal = True
        return
    if fn is mu.bidirectional_mask_function:
        return
    qn = getattr(fn, "__qualname__", type(fn).__name__)
    cl = _closure(fn)
    if qn == "and_masks.<locals>.and_mask" and "mask_functions" in cl:
        for f in cl["mask_functions"]:
            _decode(f, parts)
        return
    if qn == "sliding_window_overlay.<locals>.inner_mask" and "sliding_window" in cl:
        parts.window(int(cl["sliding_window"]) - 1, -1)  # kv_idx > q_idx - W: W - 1 keys before the query
        return
    if qn == "sliding_window_bidirectional_overlay.<locals>.inner_mask" and "sliding_window" in cl:
        w = int(cl["sliding_window"])  # |q_idx - kv_idx| <= W
        parts.window(w, w)
        return
    if qn == "chunked_overlay.<locals>.inner_mask" and "chunk_size" in cl:
        lp = cl.get("left_padding")
        if isinstance(lp, torch.Tensor) and bool((lp != 0).any()):
            raise ValueError("trous attention (transformers): the batch is left-padded (chunked attention with "
                             "padding); padded batches are not supported yet: pass unpadded sequences")
        c = int(cl["chunk_size"])
        if parts.chunk and parts.chunk != c:
            raise NotImplementedError(f"trous attention (transformers): two chunk sizes in one mask ({parts.chunk}, "
                                      f"{c})")
        parts.chunk = c
        return
    if qn.startswith("remap_positions_for_packed_sequence") or qn.startswith("packed_sequence_mask_function"):
        raise NotImplementedError("trous attention (transformers): packed sequences (position_ids restarting "
                                  "inside a row) are not supported yet; pass one sequence per row")
    raise NotImplementedError(f"trous attention (transformers): the model's mask function {qn} is not expressible as "
                              f"a trous.AttentionPattern (supported: causal, bidirectional, sliding window, chunked "
                              f"and their intersection); use attn_implementation='sdpa' or 'eager' for this model")


def pattern_of(mask_fn) -> AttentionPattern:
    """The :class:`trous.AttentionPattern` of a transformers mask function (see the module docstring
    for the conventions); raises NotImplementedError for one it cannot express."""
    require_transformers()
    parts = _Parts()
    _decode(mask_fn, parts)
    return AttentionPattern(causal=parts.causal, window=(parts.left, parts.right), chunk_size=parts.chunk)


def _as_int(x, what: str) -> int:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise NotImplementedError(f"trous attention (transformers): per-row {what} is not supported")
        return int(x.item())
    return int(x)


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask: Optional[torch.Tensor] = None, **kwargs) -> TrousMask:
    """The "trous" entry of transformers' ``AttentionMaskInterface``: validates the mask request and
    returns a :class:`TrousMask` (the pattern and the lengths) instead of a dense mask. O(B * S) work
    at most (the padding check)."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"trous attention (transformers): expected a 2-D padding mask, got shape "
                             f"{list(attention_mask.shape)}")
        if not bool(attention_mask.all()):
            raise ValueError("trous attention (transformers): attention_mask has padding (zeros); padded batches "
                             "are not supported yet (variable-length batches are another part of issue 12): pass "
                             "unpadded sequences of equal length, or attention_mask=None")
    pattern = pattern_of(mask_function)
    q_offset, kv_offset = _as_int(q_offset, "q_offset"), _as_int(kv_offset, "kv_offset")
    q_length, kv_length = int(q_length), int(kv_length)
    if q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError(f"trous attention (transformers): the last query (position "
                                  f"{q_offset + q_length - 1}) is not aligned with the last key (position "
                                  f"{kv_offset + kv_length - 1}), as with a StaticCache; trous aligns them "
                                  f"(bottom-right): use a DynamicCache")
    key_start = 0
    C = pattern.chunk_size
    if C and kv_offset % C:
        # Keys before the next chunk boundary belong to an earlier chunk; no query may see them when the
        # first query is at or after that boundary: drop them so that key 0 starts a chunk.
        key_start = -kv_offset % C
        if q_offset < kv_offset + key_start:
            raise NotImplementedError(f"trous attention (transformers): chunked attention with keys starting at "
                                      f"position {kv_offset}, not a multiple of the chunk size {C}")
    return TrousMask(pattern, q_length, kv_length, q_offset, kv_offset, key_start)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, **kwargs):
    """The "trous" entry of transformers' ``AttentionInterface``.

    query (B, Hq, Sq, D), key and value (B, Hkv, Sk, D) as transformers passes them (Hq % Hkv == 0:
    GQA without repeating K / V); returns ``(out, None)`` with out (B, Sq, Hq, D), the layout the
    models reshape. ``attention_mask`` is the :class:`TrousMask` of the "trous" mask function, or
    None (a model that builds no mask: the pattern then comes from the call and the module:
    ``is_causal`` or ``module.is_causal`` (default True) and ``sliding_window`` (W keys, the query
    included)). A tensor mask is refused.
    """
    if dropout and module.training:
        raise ValueError(f"trous attention (transformers): attention dropout ({dropout}) is not supported; set the "
                         f"config's attention_dropout to 0.0")
    for unsupported in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"trous attention (transformers): {unsupported} is not supported")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise NotImplementedError("trous attention (transformers): packed sequences (cu_seq_lens_q / cu_seq_lens_k) "
                                  "are not supported yet; pass one sequence per row")
    if isinstance(attention_mask, TrousMask):
        pattern = attention_mask.pattern
        if attention_mask.key_start:
            key = key[:, :, attention_mask.key_start:]
            value = value[:, :, attention_mask.key_start:]
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = (sliding_window - 1, 0 if causal else sliding_window - 1) if sliding_window else (-1, -1)
        pattern = AttentionPattern(causal=bool(causal), window=window)
    else:
        raise ValueError(f"trous attention (transformers): got a {type(attention_mask).__name__} attention mask "
                         f"(shape {list(getattr(attention_mask, 'shape', []))}); trous reads the layer's pattern "
                         f"instead of a dense mask. Was trous.hf.register() called before the model ran, and is "
                         f"the mask a model-built one (not a custom 4-D mask)?")
    out = sparse_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), pattern=pattern,
                           scale=scaling, softcap=float(softcap) if softcap else 0.0)
    return out, None


def register(name: str = NAME) -> str:
    """Registers ``attention_forward`` with transformers' ``AttentionInterface`` and ``mask_function``
    with its ``AttentionMaskInterface`` under ``name`` (default "trous"); idempotent. Returns the
    name, to pass as ``attn_implementation``. Raises ImportError (how to install) without
    transformers."""
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    return name
