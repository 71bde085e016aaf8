"""``trous.hf.QuantizedCache``: a transformers ``Cache`` whose attention reads the quantized cache directly.

    from trous.hf import QuantizedCache
    cache = QuantizedCache(model.config, scheme="kivi", bits=2)      # switches model.config to "trous_kvcache"
    out = model.generate(input_ids, cache=cache, max_new_tokens=256)  # (past_key_values= works too)

Every layer's keys and values go into one :class:`trous.QuantizedKVCache` (``cache.store``) through
``trous::kv_append``. The first forward of a sequence (prefill) attends with dense SDPA over its own
full-precision keys and values, as they come from the model; every later forward (decode, or a further
chunk of prompt) attends through ``trous::quantized_decode_attention`` over the quantized history plus its
full-precision residual: the history is never dequantized as a whole, never re-quantized.

The attention function is registered with transformers' ``AttentionInterface`` (and the SDPA mask with its
``AttentionMaskInterface``) under the name ``"trous_kvcache"``; on any call that is not on a trous cache it
is plain SDPA, so a model switched to it still runs with any other cache. Llama-, Mistral- and Qwen2-style
models (full attention, rotary embeddings applied before ``cache.update``) work; sliding-window layers and
padded batches (an attention mask that is not causal) raise a clear error.

Beam search: ``reorder_cache`` permutes the sequences (contiguous layout); ``crop`` works while the dropped
tokens are still in the full-precision residual and raises otherwise (assisted decoding beyond it is not
supported: the quantized part cannot be rolled back).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import require_transformers

transformers = require_transformers()
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from ..kvcache.cache import QuantizedKVCache  # noqa: E402

__all__ = ["QuantizedCache", "ATTN_IMPLEMENTATION", "register_attention", "trous_kvcache_attention"]

ATTN_IMPLEMENTATION = "trous_kvcache"
_MARK = "_trous_kvcache"  # attribute of the placeholder key tensor handed from update() to the attention


def trous_kvcache_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, softcap: Optional[float] = None, **kwargs):
    """The ``"trous_kvcache"`` attention: fused quantized decode attention when ``key`` is the placeholder
    of a :class:`QuantizedCache` layer, SDPA otherwise. query [B, Hq, Sq, D]; returns ([B, Sq, Hq, D], None)."""
    mark = getattr(key, _MARK, None)
    if mark is None:
        if softcap:
            raise ValueError("trous_kvcache attention: softcap is only supported on the quantized cache path")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("trous.hf.QuantizedCache: sliding-window attention layers are not supported")
    if len(mark) == 3:  # prefill of an empty cache: SDPA on the prompt's full-precision keys and values
        if not _is_causal_mask(attention_mask, query.shape[2], key.shape[2]):
            raise NotImplementedError("trous.hf.QuantizedCache: padded batches (an attention mask that is not the "
                                      "causal one) are not supported; generate one sequence per row without padding")
        if softcap:
            raise ValueError("trous_kvcache attention: softcap is not supported by the SDPA prefill")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cache, layer = mark
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = cache.store.attend(layer, query.to(cache.store.dtype), scale=scale, softcap=float(softcap or 0.0))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Registers "trous_kvcache" with transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, trous_kvcache_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _is_causal_mask(mask: Optional[torch.Tensor], q_len: int, kv_len: int) -> bool:
    """Whether a 4-D attention mask (bool or additive) is the plain causal mask (no padding)."""
    if mask is None:
        return True
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed[..., -q_len:, :kv_len]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    return bool((allowed == causal).all())


class _Layer(CacheLayerMixin):
    """One model layer's view of the shared store (what ``Cache.update`` dispatches to)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "QuantizedCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states, value_states):
        self.owner._build(key_states)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._update(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        store = self.owner.store
        return 0 if store is None else store.seq_length(0, self.index)

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:  # the owner resets the store once for all layers
        pass

    def reorder_cache(self, beam_idx) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass


class QuantizedCache(Cache):
    """A transformers ``Cache`` over :class:`trous.QuantizedKVCache` (see the module docstring).

    Args:
        config: the model's config (its text config gives the layers, KV heads and head dim). Unless
            ``attach=False``, its ``_attn_implementation`` is set to ``"trous_kvcache"`` (SDPA everywhere except on
            a trous cache), which is what routes decode attention to the fused op.
        scheme, bits, group_size, residual, fp8_format, fp8_scale, paged, page_size: the cache format, as in
            :class:`trous.QuantizedKVCache` (default KIVI-4, G 32, R 128).
        max_cache_len: tokens per sequence to allocate at first (contiguous layout: grows by doubling when
            exceeded; paged: the fixed reach). Default 4096.
        dtype: the cache's activation dtype (default: the dtype of the first keys appended).
    """

    def __init__(self, config, scheme: str = "kivi", bits: Optional[int] = None, group_size: int = 32,
                 residual: int = 128, fp8_format: str = "e4m3", fp8_scale=None, paged: bool = False,
                 page_size: Optional[int] = None, max_cache_len: int = 4096, dtype: Optional[torch.dtype] = None,
                 attach: bool = True):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None) or []
        bad = sorted(set(layer_types) - {"full_attention"})
        if bad or getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
            raise ValueError(f"trous.hf.QuantizedCache supports full-attention layers only; the config has "
                             f"{bad or ['sliding_window=' + str(text.sliding_window)]}")
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.options = dict(scheme=scheme, bits=bits, group_size=group_size, residual=residual,
                            fp8_format=fp8_format, fp8_scale=fp8_scale, paged=paged, page_size=page_size)
        self.max_cache_len, self.dtype = max_cache_len, dtype
        self.store: Optional[QuantizedKVCache] = None
        self._batch = 0
        # Validate the format now (a tiny throwaway store), not at the first forward.
        QuantizedKVCache(1, self.num_kv_heads, self.head_dim, max_tokens=max(group_size, 8), **self._store_options(1))
        register_attention()
        if attach:
            text._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(layers=[_Layer(self, i) for i in range(self.num_layers)])

    def _store_options(self, batch):
        o = dict(self.options)
        if o["scheme"] != "fp8":
            o.pop("fp8_scale")
        return dict(o, max_batch=batch)

    # ---- storage -------------------------------------------------------------------------------------------
    def _build(self, key_states: torch.Tensor) -> None:
        if self.store is not None:
            return
        batch = key_states.shape[0]
        opts = self._store_options(batch)
        self.store = QuantizedKVCache(self.num_layers, self.num_kv_heads, self.head_dim,
                                      max_tokens=self.max_cache_len, dtype=self.dtype or key_states.dtype,
                                      device=key_states.device, growable=not opts["paged"], **opts)
        self._batch = batch

    def _update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.store is None:
            self._build(key_states)
        store = self.store
        if key_states.shape[0] != self._batch:
            raise ValueError(f"trous.hf.QuantizedCache: batch {key_states.shape[0]} differs from the batch "
                             f"{self._batch} the cache was filled with (reset() it first)")
        first = store.seq_length(0, layer) == 0
        store.append(layer, key_states.to(store.dtype), value_states.to(store.dtype))
        if first:  # prefill: dense attention over the prompt's own full-precision keys and values
            k = key_states.view_as(key_states)
            setattr(k, _MARK, (self, layer, "prefill"))
            return k, value_states
        mark_k = key_states.new_empty((key_states.shape[0], key_states.shape[1], 0, key_states.shape[3]))
        setattr(mark_k, _MARK, (self, layer))
        return mark_k, mark_k

    # ---- Cache API -----------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.store is None else self.store.seq_length(0, layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.store is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def memory_bytes(self) -> int:
        """Bytes the quantized store holds (0 before the first forward)."""
        return 0 if self.store is None else self.store.memory_bytes()

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence i becomes the old sequence beam_idx[i] (contiguous layout)."""
        if self.store is None:
            return
        if beam_idx.numel() != self._batch:
            raise ValueError(f"trous.hf.QuantizedCache.reorder_cache: beam_idx has {beam_idx.numel()} entries, the "
                             f"cache holds {self._batch} sequences")
        self.store.reorder(beam_idx.cpu())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is None:
            return
        self.reorder_cache(indices) if indices.numel() == self._batch else self._reshape(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is None:
            return
        self._reshape(torch.arange(self._batch).repeat_interleave(repeats))

    def _reshape(self, index: torch.Tensor) -> None:
        """A new store holding sequences ``index`` of the old one (another batch size)."""
        old, n = self.store, index.numel()
        if old.paged:
            raise NotImplementedError("trous.hf.QuantizedCache: changing the batch of a paged cache is not supported")
        new = QuantizedKVCache(self.num_layers, self.num_kv_heads, self.head_dim, max_tokens=old.max_tokens,
                               dtype=old.dtype, device=old.device, growable=True, **self._store_options(n))
        idx = index.to(old.device)
        for layer in range(self.num_layers):
            src, dst = old.layer_tensors(layer), new.layer_tensors(layer)
            for name, x in src.items():
                if name in ("k_params", "v_params") and old.scheme == "fp8":
                    dst[name].copy_(x)
                else:
                    dst[name].copy_(x.index_select(0, idx))
            new._len[layer] = [old._len[layer][i] for i in index.tolist()]
        new._calibrated = list(old._calibrated)
        self.store, self._batch = new, n

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the newest ``-tokens_to_remove`` tokens (transformers 5 passes a negative count; a positive value is
        the legacy absolute length). Raises ValueError when a dropped token is already quantized (the quantized
        history cannot be rolled back), changing nothing."""
        if self.store is None or tokens_to_remove == 0:
            return
        T = self.get_seq_length()
        keep = T + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        if keep >= T:
            return
        self.store.truncate(max(keep, 0), seqs=range(self._batch))
