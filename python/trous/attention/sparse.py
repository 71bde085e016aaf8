"""``trous.sparse_attention``: one fused online-softmax attention for causal, sliding-window, chunked,
dilated and global-token patterns, forward and backward, whose cost follows the pattern's density.

The registered ops (``csrc/attention/attention_ops.cpp``; their fake kernels are the C++ Meta kernels):
``torch.ops.trous.sparse_attention_fwd(q, k, v, global_flags, causal, left, right, chunk, dilation,
scale, softcap) -> (out, lse)`` and ``torch.ops.trous.sparse_attention_bwd(grad_out, q, k, v, out,
lse, global_flags, causal, left, right, chunk, dilation, scale, softcap, deterministic) -> (grad_q,
grad_k, grad_v)``. The autograd of the forward op is registered here (and the public function runs it
through an ``autograd.Function`` that also carries ``deterministic``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .block_mask import BlockMask
from .pattern import AttentionPattern, GlobalTokens

__all__ = ["sparse_attention", "sparse_attention_varlen"]

_ops = torch.ops.trous
_DEFAULT_WINDOW = (-1, -1)


def _op_flags(pattern: AttentionPattern, Sk, device) -> Optional[torch.Tensor]:
    """The op's ``global_flags`` (bool, Sk, on q's device) or None. A flag tensor is passed as given
    (the op checks its length, naming ``global_tokens``); a count n becomes flags[:n] = True."""
    g = pattern.global_tokens
    if g is None or (isinstance(g, int) and g == 0):
        return None
    if isinstance(g, int):
        return torch.arange(Sk, device=device) < g
    return g.to(device)


_NO_BLOCKS = (None, None, 0, 0)


def _block_args(block_mask: Optional[BlockMask], Sq: int, Sk: int, fn: str):
    """The ops' (block_table, block_elems, block_q, block_k) of a trous.BlockMask (checked: its
    lengths must be the call's), or the no-mask defaults."""
    if block_mask is None:
        return _NO_BLOCKS
    if not isinstance(block_mask, BlockMask):
        hint = (" (convert a FlexAttention BlockMask with trous.BlockMask.from_flex)"
                if hasattr(block_mask, "kv_num_blocks") else "")
        raise ValueError(f"trous.{fn}: block_mask must be a trous.BlockMask or None, got "
                         f"{type(block_mask).__name__}{hint}")
    if tuple(block_mask.seq_lengths) != (Sq, Sk):
        raise ValueError(f"trous.{fn}: block_mask is for (Sq, Sk) = {tuple(block_mask.seq_lengths)}, the call has "
                         f"({Sq}, {Sk})")
    return (block_mask.table, block_mask.elems, *block_mask.block_size)


def _backward(saved, args, grad_out, grad_lse, deterministic: bool, blocks=_NO_BLOCKS):
    """Gradients to q, k, v: one ``sparse_attention_bwd`` call for grad_out and, when the LSE has a
    gradient g, a second one that turns it into dS_ij = P_ij * g_i.

    The backward computes dS_ij = P_ij * (grad_out_i . v_j - delta_i) with delta_i = grad_out_i . out_i,
    and dlse_i / ds_ij = P_ij; so calling it with v = 0, out = e_0 (the first channel) and
    grad_out = -g * e_0 gives delta_i = -g_i and dS_ij = P_ij * g_i exactly (softcap and GQA included);
    its grad_v is discarded.
    """
    q, k, v, out, lse, flags = saved
    gq = gk = gv = None
    if grad_out is not None:
        gq, gk, gv = _ops.sparse_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, flags, *args, deterministic,
                                               *blocks)
    if grad_lse is not None:
        g = torch.where(torch.isinf(lse), torch.zeros_like(lse), grad_lse.float())  # (B, H, Sq); masked rows: 0
        e0 = torch.zeros_like(out)
        e0[..., 0] = 1
        go = torch.zeros_like(out)
        go[..., 0] = -g.transpose(1, 2).to(out.dtype)
        lq, lk, _ = _ops.sparse_attention_bwd(go, q, k, torch.zeros_like(v), e0, lse, flags, *args, deterministic,
                                              *blocks)
        gq = lq if gq is None else gq + lq
        gk = lk if gk is None else gk + lk
    return gq, gk, gv


class _SparseAttention(torch.autograd.Function):
    """sparse_attention_fwd with its backward; carries ``deterministic`` (not an input of the forward
    op) and ``lse_grad`` (False: the LSE was not returned to the caller, so it has no gradient)."""

    @staticmethod
    def forward(q, k, v, flags, causal, left, right, chunk, dilation, scale, softcap, deterministic, lse_grad,
                table, elems, block_q, block_k):
        return _ops.sparse_attention_fwd(q, k, v, flags, causal, left, right, chunk, dilation, scale, softcap, table,
                                         elems, block_q, block_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (q, k, v, flags, causal, left, right, chunk, dilation, scale, softcap, deterministic, lse_grad, table, elems,
         block_q, block_k) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, flags)
        ctx.args = (causal, left, right, chunk, dilation, scale, softcap)
        ctx.blocks = (table, elems, block_q, block_k)  # (no gradient: plain attributes)
        ctx.deterministic = deterministic
        ctx.lse_grad = lse_grad
        if not lse_grad:
            ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        gq, gk, gv = _backward(ctx.saved_tensors, ctx.args, grad_out, grad_lse if ctx.lse_grad else None,
                               ctx.deterministic, ctx.blocks)
        return (gq, gk, gv) + (None,) * 14


def _op_setup_context(ctx, inputs, output):
    q, k, v, flags, causal, left, right, chunk, dilation, scale, softcap = inputs[:11]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, flags)
    ctx.args = (causal, left, right, chunk, dilation, scale, softcap)
    ctx.blocks = tuple(inputs[11:]) + _NO_BLOCKS[len(inputs) - 11:]
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)


def _op_backward(ctx, grad_out, grad_lse):
    gq, gk, gv = _backward(ctx.saved_tensors, ctx.args, grad_out, grad_lse, False, ctx.blocks)
    return (gq, gk, gv) + (None,) * (ctx.n_inputs - 3)


# Direct calls of the registered op get the same derivative (deterministic=False).
torch.library.register_autograd("trous::sparse_attention_fwd", _op_backward, setup_context=_op_setup_context)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     window: Sequence[int] = _DEFAULT_WINDOW, chunk_size: int = 0, dilation: int = 1,
                     global_tokens: GlobalTokens = None, scale: Optional[float] = None, softcap: float = 0.0,
                     return_lse: bool = False, deterministic: bool = False,
                     pattern: Optional[AttentionPattern] = None, block_mask: Optional[BlockMask] = None
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of q over k, v restricted to a pattern, in one fused kernel that skips the masked
    tiles (cost proportional to the pattern's density; memory O(S * D), no S x S mask or scores).

    Shapes (FlashAttention's layout): q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); returns out
    (B, Sq, Hq, D) in q's dtype and, with ``return_lse=True``, also lse (B, Hq, Sq) in float32, the
    log-sum-exp of each row's scores (to merge partial results: context parallelism, LongNet
    branches; it is differentiable). Any outer strides (a slice of a fused QKV projection works); the
    last dimension is copied when it is not contiguous. CPU: float32 and bfloat16; CUDA: float16,
    bfloat16 and float32. D from 32 to 256 in multiples of 8.

    GQA / MQA: Hq must be a multiple of Hkv; query head h reads KV head h // (Hq / Hkv), without
    repeating K and V in memory.

    The pattern (see :class:`trous.AttentionPattern` for the rules and drawn examples), with
    s = Sk - Sq and i' = i + s (bottom-right alignment: the last query meets the last key):

    - ``window=(left, right)``: FlashAttention-2's window, ``i' - left <= j <= i' + right``; -1 is
      unbounded on that side; ``left`` does not count the query's own key (``(w, w)`` holds 2w + 1
      keys); ``(-1, 0)`` is causal.
    - ``dilation=d``: the window counts steps of d, ``(i' - j) % d == 0`` (Longformer's dilated
      window); computed on each residue class as a dense sub-sequence, so it costs what an undilated
      window of the same count costs.
    - ``chunk_size=C``: ``i' // C == j // C``.
    - ``global_tokens``: a count n (the first n key positions) or Sk bool flags; OR-ed with window,
      chunk and dilation: every query sees the global keys, and query i (global iff key position i'
      is) sees every key.
    - ``causal=True``: ``j <= i'``, AND-ed on top of everything, global tokens included (global keys
      then act as attention sinks).
    - ``pattern=``: an :class:`AttentionPattern` instead of these keywords (not both).
    - ``block_mask=``: a :class:`trous.BlockMask` for (Sq, Sk), batch 1 or B, heads 1 or Hq (its
      q_idx / kv_idx are query and key indices, not aligned), AND-ed with all of the above; only its
      allowed blocks are visited, full blocks without an element mask.

    ``scale`` defaults to 1 / sqrt(D); ``softcap`` > 0 applies ``softcap * tanh(s / softcap)`` to
    the scaled scores before masking (0: off).

    A row with no allowed key (e.g. causal with Sq > Sk, or a query whose i' < 0 under a window)
    gives out 0 and lse -inf, never NaN, and zero gradients. A NaN in one query row stays in that
    row; a NaN in a key reaches only the rows that may attend it; a NaN in a value reaches those rows
    and may reach the others of its tile (0 * NaN in the tile's P V product, as in FlashAttention).

    Autograd: gradients to q, k and v (and through lse when it is returned and used). Saved for the
    backward: q, k, v, out and lse (and the global flags); the backward recomputes the scores tile by
    tile. ``deterministic=True`` makes the gradients bitwise repeatable (no atomics, fixed reduction
    order). Works under ``torch.compile(fullgraph=True)`` with no graph break.
    """
    if pattern is not None:
        if not isinstance(pattern, AttentionPattern):
            raise ValueError(f"trous.sparse_attention: pattern must be a trous.AttentionPattern or None, "
                             f"got {type(pattern).__name__}")
        given = [name for name, differs in (
            ("causal", causal is not False), ("window", tuple(window) != _DEFAULT_WINDOW),
            ("chunk_size", chunk_size != 0), ("dilation", dilation != 1), ("global_tokens", global_tokens is not None))
            if differs]
        if given:
            raise ValueError(f"trous.sparse_attention: pass pattern= or the pattern keywords, not both; got "
                             f"pattern and {', '.join(given)}")
    else:
        pattern = AttentionPattern(causal=causal, window=window, chunk_size=chunk_size, dilation=dilation,
                                   global_tokens=global_tokens)
    Sk = k.shape[1] if k.dim() >= 2 else 0
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() >= 1 and q.shape[-1] > 0 else 1.0
    flags = _op_flags(pattern, Sk, q.device)
    left, right = pattern.window
    Sq = q.shape[1] if q.dim() >= 2 else 0
    blocks = _block_args(block_mask, Sq, Sk, "sparse_attention")
    out, lse = _SparseAttention.apply(q, k, v, flags, pattern.causal, left, right, pattern.chunk_size,
                                      pattern.dilation, float(scale), float(softcap), bool(deterministic),
                                      bool(return_lse), *blocks)
    return (out, lse) if return_lse else out


class _SparseAttentionVarlen(torch.autograd.Function):
    """sparse_attention_varlen_fwd with its backward (``deterministic`` carried, not an op input)."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, left, right, chunk, dilation, scale, softcap,
                deterministic, table, elems, block_q, block_k):
        return _ops.sparse_attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, left, right, chunk,
                                                dilation, scale, softcap, table, elems, block_q, block_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, causal, left, right, chunk, dilation, scale, softcap, det = inputs[:15]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, left, right, chunk, dilation, scale, softcap, det) + tuple(inputs[15:])
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 19
        gq, gk, gv = _ops.sparse_attention_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return (gq, gk, gv) + (None,) * 16


def sparse_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                            window: Sequence[int] = _DEFAULT_WINDOW, chunk_size: int = 0, dilation: int = 1,
                            scale: Optional[float] = None, softcap: float = 0.0, return_lse: bool = False,
                            deterministic: bool = False, pattern: Optional[AttentionPattern] = None,
                            block_mask: Optional[BlockMask] = None
                            ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sparse_attention` over packed sequences of different lengths (FlashAttention's varlen
    layout): no query attends a key of another sequence.

    Shapes: q (total_q, Hq, D), k and v (total_k, Hkv, D); ``cu_seqlens_q`` / ``cu_seqlens_k`` int32
    (B + 1,) offsets (sequence b is rows ``cu[b]:cu[b + 1]``; from 0, non-decreasing, ending at the
    totals; empty sequences allowed); ``max_seqlen_q`` / ``max_seqlen_k`` at least every sequence's
    length (checked). Returns out (total_q, Hq, D) and, with ``return_lse=True``, lse (Hq, total_q)
    float32 (not differentiable here).

    Every pattern keyword of :func:`sparse_attention` applies to each sequence with its own lengths,
    bottom-right aligned within the sequence (its last query meets its last key). Global tokens are
    not accepted here (their positions would be per sequence). The offsets are read on the host: on
    CUDA each call copies the B + 1 offsets (one synchronisation).

    ``block_mask``: a :class:`trous.BlockMask` for (max_seqlen_q, max_seqlen_k) with batch 1 (the
    same layout for every sequence) or B (one per sequence), heads 1 or Hq, in each sequence's own
    query / key indices (0 at the sequence's start), AND-ed with the pattern.
    """
    if pattern is None:
        pattern = AttentionPattern(causal=causal, window=window, chunk_size=chunk_size, dilation=dilation)
    elif not isinstance(pattern, AttentionPattern):
        raise ValueError(f"trous.sparse_attention_varlen: pattern must be a trous.AttentionPattern or None, "
                         f"got {type(pattern).__name__}")
    if pattern.global_tokens is not None:
        raise ValueError("trous.sparse_attention_varlen: global_tokens are not supported with packed sequences "
                         "(pass each sequence to sparse_attention instead)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() >= 1 and q.shape[-1] > 0 else 1.0
    left, right = pattern.window
    blocks = _block_args(block_mask, int(max_seqlen_q), int(max_seqlen_k), "sparse_attention_varlen")
    out, lse = _SparseAttentionVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                            int(max_seqlen_k), pattern.causal, left, right, pattern.chunk_size,
                                            pattern.dilation, float(scale), float(softcap), bool(deterministic),
                                            *blocks)
    return (out, lse) if return_lse else out
