"""``trous.nn.SparseMultiheadAttention``: multi-head attention (q / k / v / out projections, optional
rotary embedding, GQA) whose attention is :func:`trous.sparse_attention` on a fixed pattern, with the
calling convention of ``torch.nn.MultiheadAttention`` where it makes sense and its weights loadable.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .pattern import AttentionPattern, GlobalTokens
from .sparse import sparse_attention

__all__ = ["SparseMultiheadAttention"]

_PATTERN_KEYS = ("causal", "window", "chunk_size", "dilation", "global_tokens")
_ROPE_BASE = 10000.0


def _make_pattern(pattern, keywords: dict) -> AttentionPattern:
    given = {k: v for k, v in keywords.items() if v is not None}
    if pattern is None:
        return AttentionPattern(**given)
    if isinstance(pattern, AttentionPattern):
        if given:
            raise ValueError(f"trous.nn.SparseMultiheadAttention: pass pattern= or the pattern keywords, not both; "
                             f"got pattern and {', '.join(sorted(given))}")
        return pattern
    if isinstance(pattern, Mapping):
        unknown = sorted(set(pattern) - set(_PATTERN_KEYS))
        if unknown:
            raise ValueError(f"trous.nn.SparseMultiheadAttention: pattern keywords are {', '.join(_PATTERN_KEYS)}; "
                             f"got {', '.join(unknown)}")
        both = sorted(set(pattern) & set(given))
        if both:
            raise ValueError(f"trous.nn.SparseMultiheadAttention: {', '.join(both)} given twice (in pattern and as "
                             f"keywords)")
        return AttentionPattern(**{**dict(pattern), **given})
    raise ValueError(f"trous.nn.SparseMultiheadAttention: pattern must be a trous.AttentionPattern, a dict of its "
                     f"keywords or None, got {type(pattern).__name__}")


def _rope_base(rotary) -> Optional[float]:
    if rotary is False or rotary is None:
        return None
    if rotary is True:
        return _ROPE_BASE
    if isinstance(rotary, (int, float)) and not isinstance(rotary, bool) and rotary > 1:
        return float(rotary)
    raise ValueError(f"trous.nn.SparseMultiheadAttention: rotary must be False, True (base {_ROPE_BASE:g}) or a "
                     f"base > 1, got {rotary!r}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding (RoFormer, in the "rotate half" layout of GPT-NeoX / Llama / Hugging
    Face: channel c is paired with channel c + D/2) of x (B, S, H, D) at ``positions`` (S,): channel
    pair c rotates by ``positions * base ** (-2c / D)``. Computed in float32, returned in x's dtype."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (S, D/2)
    emb = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, S, 1, D)
    xf = x.float()
    return (xf * emb.cos() + _rotate_half(xf) * emb.sin()).to(x.dtype)


class SparseMultiheadAttention(nn.Module):
    """Multi-head attention over a sparse pattern: ``out_proj(sparse_attention(rope(q_proj(query)),
    rope(k_proj(key)), v_proj(value)))``. The attention never materialises an S x S mask or score
    matrix; its cost follows the pattern's density (see :func:`trous.sparse_attention`).

    Arguments
        embed_dim: E, the model width (query features and output features).
        num_heads: Hq; the head dim is D = E / Hq (trous.sparse_attention takes D from 32 to 256 in
            multiples of 8).
        num_kv_heads: Hkv (GQA / MQA); Hq must be a multiple of it. Default: Hq. K and V are projected
            to Hkv * D features and not repeated in memory.
        pattern: a :class:`trous.AttentionPattern`, or a dict of its keywords; or give the keywords
            themselves: ``causal``, ``window``, ``chunk_size``, ``dilation``, ``global_tokens`` (not
            both). Default: dense.
        softcap: ``softcap * tanh(s / softcap)`` on the scaled scores (Gemma-2; 0: off).
        scale: the score scale, default 1 / sqrt(D).
        bias: biases in the four projections (nn.MultiheadAttention's ``bias``).
        batch_first: True (the default here; nn.MultiheadAttention's default is False): inputs and
            output are (B, S, E); False: (S, B, E).
        rotary: False (default), True (rotary embedding with base 10000) or a float base: rotates q
            and k (the "rotate half" layout of Llama / Hugging Face) at positions ``Sk - Sq + i`` for
            query i and ``j`` for key j (bottom-right aligned like the pattern; for self-attention
            both are 0..S-1); ``forward(..., positions=)`` overrides them for self-attention.
        dropout: attention dropout; only 0.0 is supported (a value > 0 raises: the fused kernel has
            no dropout). Use dropout on the output instead.
        kdim, vdim: features of key and value (default E), as nn.MultiheadAttention.
        deterministic: bitwise repeatable backward (see sparse_attention).

    Shapes (batch_first=True): query (B, Sq, E), key (B, Sk, kdim), value (B, Sk, vdim) -> output
    (B, Sq, E). Unbatched inputs (Sq, E) give (Sq, E). With batch_first=False: (Sq, B, E) etc.

    Differences from ``nn.MultiheadAttention``:
      - the pattern is fixed at construction (``is_causal=True`` in forward adds causal on top);
        ``attn_mask`` is refused (a dense mask is what this module avoids: express it as a pattern)
        and so is ``key_padding_mask`` (padding is not expressible yet);
      - ``need_weights`` defaults to False and True is refused (the weights are never formed); the
        return value is still the pair ``(output, None)``;
      - GQA (``num_kv_heads``), rotary embedding and softcap are extra; ``add_bias_kv``,
        ``add_zero_attn`` and dropout > 0 do not exist;
      - the projections are four ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)
        instead of one packed ``in_proj_weight``.

    Weights from ``nn.MultiheadAttention`` (when num_kv_heads == num_heads): with E = embed_dim,
    ``in_proj_weight[0:E]`` -> ``q_proj.weight``, ``[E:2E]`` -> ``k_proj.weight``, ``[2E:3E]`` ->
    ``v_proj.weight`` (likewise ``in_proj_bias`` -> the three biases; or ``q_proj_weight`` /
    ``k_proj_weight`` / ``v_proj_weight`` when kdim / vdim differ from E), ``out_proj.weight`` /
    ``out_proj.bias`` unchanged. ``load_state_dict(mha.state_dict())`` applies this mapping, and
    :meth:`from_torch` builds the module from an nn.MultiheadAttention. With the equivalent dense
    mask (``attn_mask=~pattern.materialize(S, S)``) both give the same output and gradients.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 pattern: Union[None, AttentionPattern, Mapping[str, Any]] = None, *,
                 causal: Optional[bool] = None, window=None, chunk_size: Optional[int] = None,
                 dilation: Optional[int] = None, global_tokens: GlobalTokens = None, softcap: float = 0.0,
                 scale: Optional[float] = None, bias: bool = True, batch_first: bool = True,
                 rotary: Union[bool, float] = False, dropout: float = 0.0, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, deterministic: bool = False, device=None, dtype=None):
        super().__init__()
        name = "trous.nn.SparseMultiheadAttention"
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"{name}: embed_dim and num_heads must be positive integers, got {embed_dim!r}, "
                             f"{num_heads!r}")
        if embed_dim % num_heads:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"{name}: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads!r})")
        if dropout != 0.0:
            raise ValueError(f"{name}: dropout={dropout} is not supported (the fused sparse-attention kernel has "
                             f"no attention dropout); use dropout=0.0 and, if needed, dropout on the output")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.pattern = _make_pattern(pattern, dict(causal=causal, window=window, chunk_size=chunk_size,
                                                   dilation=dilation, global_tokens=global_tokens))
        self.softcap = float(softcap)
        self.scale = scale
        self.batch_first = bool(batch_first)
        self.rope_base = _rope_base(rotary)
        if self.rope_base is not None and self.head_dim % 2:
            raise ValueError(f"{name}: rotary needs an even head dim, got {self.head_dim}")
        self.dropout = 0.0
        self.deterministic = bool(deterministic)
        fk = dict(device=device, dtype=dtype)
        kv = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, kv, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, kv, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self._reset_parameters()
        self._register_load_state_dict_pre_hook(self._map_torch_state_dict)

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation: xavier_uniform on the packed (3E, E) in-projection
        # (bound sqrt(6 / (4E)) for q, k and v alike), zero biases; out_proj as nn.Linear but bias 0.
        bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(lin.weight, -bound, bound)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        s = (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
             f"pattern={self.pattern!r}, batch_first={self.batch_first}")
        if self.softcap:
            s += f", softcap={self.softcap}"
        if self.rope_base is not None:
            s += f", rotary={self.rope_base:g}"
        return s

    # -- nn.MultiheadAttention weights ------------------------------------------------------

    def _map_torch_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """load_state_dict pre-hook: nn.MultiheadAttention's in_proj_weight / in_proj_bias (or
        q/k/v_proj_weight) become q_proj / k_proj / v_proj (see the class docstring)."""
        E = self.embed_dim
        packed_w, packed_b = prefix + "in_proj_weight", prefix + "in_proj_bias"
        if packed_w in state_dict or packed_b in state_dict or prefix + "q_proj_weight" in state_dict:
            if self.num_kv_heads != self.num_heads:
                raise ValueError(f"trous.nn.SparseMultiheadAttention: nn.MultiheadAttention weights need "
                                 f"num_kv_heads == num_heads, got {self.num_kv_heads} and {self.num_heads}")
            for extra in ("bias_k", "bias_v"):
                if prefix + extra in state_dict:
                    raise ValueError("trous.nn.SparseMultiheadAttention: nn.MultiheadAttention with add_bias_kv "
                                     "has no equivalent here")
        if packed_w in state_dict:
            w = state_dict.pop(packed_w)
            if w is not None:
                for i, part in enumerate(("q", "k", "v")):
                    state_dict[f"{prefix}{part}_proj.weight"] = w[i * E:(i + 1) * E]
        for part in ("q", "k", "v"):
            sep = state_dict.pop(f"{prefix}{part}_proj_weight", None)
            if sep is not None:
                state_dict[f"{prefix}{part}_proj.weight"] = sep
        if packed_b in state_dict:
            b = state_dict.pop(packed_b)
            if b is not None:
                for i, part in enumerate(("q", "k", "v")):
                    state_dict[f"{prefix}{part}_proj.bias"] = b[i * E:(i + 1) * E]

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, pattern: Union[None, AttentionPattern, Mapping[str, Any]] = None,
                   **kwargs) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention with the weights, width, heads, kdim / vdim, bias and
        batch_first of ``mha`` (an ``nn.MultiheadAttention``), and the given pattern and keyword
        arguments (those of the constructor). ``mha`` with ``add_bias_kv``, ``add_zero_attn`` or
        dropout > 0 is refused."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"trous.nn.SparseMultiheadAttention.from_torch: expected an nn.MultiheadAttention, "
                             f"got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("trous.nn.SparseMultiheadAttention.from_torch: add_bias_kv and add_zero_attn have no "
                             "equivalent here")
        if mha.dropout != 0.0:
            raise ValueError(f"trous.nn.SparseMultiheadAttention.from_torch: dropout={mha.dropout} is not supported "
                             f"(only 0.0)")
        ref = mha.out_proj.weight
        kwargs.setdefault("batch_first", mha.batch_first)
        m = cls(mha.embed_dim, mha.num_heads, pattern=pattern, bias=mha.out_proj.bias is not None, kdim=mha.kdim,
                vdim=mha.vdim, device=ref.device, dtype=ref.dtype, **kwargs)
        m.load_state_dict(mha.state_dict())
        return m

    # -- forward ---------------------------------------------------------------------------

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False,
                positions: Optional[torch.Tensor] = None, block_mask=None) -> Tuple[torch.Tensor, None]:
        """Attention of ``query`` over ``key`` / ``value`` on the module's pattern.

        query (B, Sq, E) (batch_first; (Sq, B, E) otherwise; or unbatched (Sq, E)); key (B, Sk,
        kdim) and value (B, Sk, vdim), both defaulting to query (self-attention; value defaults to
        key). Returns ``(output, None)`` with output shaped like query. ``is_causal=True`` ANDs
        causal onto the pattern for this call. ``positions`` (Sq,) integer: the rotary positions of
        a self-attention call (default 0..S-1). ``block_mask``: a :class:`trous.BlockMask` for
        (Sq, Sk) (batch 1 or B, heads 1 or num_heads) AND-ed with the pattern for this call (BigBird,
        document masks: the block-sparse layouts). ``attn_mask``, ``key_padding_mask`` and
        ``need_weights=True`` raise (see the class docstring); ``average_attn_weights`` is ignored.
        """
        name = "trous.nn.SparseMultiheadAttention"
        if attn_mask is not None:
            raise ValueError(f"{name}: attn_mask is not supported: a dense mask is what this module avoids. Give the "
                             f"pattern at construction instead (pattern=trous.AttentionPattern(...) or causal=, "
                             f"window=, chunk_size=, dilation=, global_tokens=); is_causal=True adds causal")
        if key_padding_mask is not None:
            raise ValueError(f"{name}: key_padding_mask is not supported yet (padded batches are not expressible "
                             f"as a pattern); pass unpadded sequences")
        if need_weights:
            raise ValueError(f"{name}: need_weights=True is not supported (the attention weights are never formed); "
                             f"use need_weights=False, or trous.AttentionPattern.materialize and a dense reference")
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"{name}: query, key and value must be 3-D (or all 2-D, unbatched), got shapes "
                             f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
        B, Sq, _ = query.shape
        Sk = key.shape[1]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"{name}: key and value must share (batch, length) with query's batch, got shapes "
                             f"{list(key.shape)} and {list(value.shape)} for query {list(query.shape)}")
        D = self.head_dim
        q = self.q_proj(query).view(B, Sq, self.num_heads, D)
        k = self.k_proj(key).view(B, Sk, self.num_kv_heads, D)
        v = self.v_proj(value).view(B, Sk, self.num_kv_heads, D)
        if self.rope_base is not None:
            if positions is not None:
                if Sq != Sk:
                    raise ValueError(f"{name}: positions= is for self-attention (Sq == Sk), got Sq = {Sq}, Sk = {Sk}")
                qpos = kpos = positions
            else:
                kpos = torch.arange(Sk, device=q.device)
                qpos = kpos[Sk - Sq:] if Sq <= Sk else torch.arange(Sk - Sq, Sk, device=q.device)
            q = apply_rotary(q, qpos, self.rope_base)
            k = apply_rotary(k, kpos, self.rope_base)
        p = self.pattern
        if is_causal and not p.causal:
            p = AttentionPattern(causal=True, window=p.window, chunk_size=p.chunk_size, dilation=p.dilation,
                                 global_tokens=p.global_tokens)
        out = sparse_attention(q, k, v, pattern=p, scale=self.scale, softcap=self.softcap,
                               deterministic=self.deterministic, block_mask=block_mask)
        out = self.out_proj(out.reshape(B, Sq, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
