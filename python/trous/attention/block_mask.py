"""``trous.BlockMask``: a block-sparse attention layout, AND-ed with the closed-form patterns of
:func:`trous.sparse_attention` (``block_mask=``).

The layout lists, per (batch or 1, query head or 1) and per query block, the key blocks that hold
allowed pairs, and marks the blocks whose every pair is allowed as *full* (no element mask), as
FlexAttention's ``BlockMask`` does (``kv_num_blocks`` / ``kv_indices`` for the partial blocks,
``full_kv_num_blocks`` / ``full_kv_indices`` for the full ones). A partial block's pairs come from an
element mask: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` evaluated once, on the blocks' device,
or a dense (block_q, block_k) boolean per partial block.

The kernels read one dense state table per mask (``table``: int32 (Bm, Hm, nqb, nkb), 0 = no pair,
1 = full, 2 + e = partial with element mask ``elems[e]``), built once here, on the mask's device; the
same table serves the query-outer forward and the key-outer backward, so no transposed index is
built per call. Memory: 4 bytes per block pair and head entry, plus block_q * block_k bytes per
distinct partial-block element mask (at most one per partial block).
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["BlockMask"]

NONE, FULL, PARTIAL0 = 0, 1, 2
# Element masks evaluated at once when refining blocks with a mask_mod (bounds the index tensors).
_EVAL_PAIRS = 1 << 24

BlockSize = Union[int, Sequence[int]]


def _block_size(block_size: BlockSize) -> Tuple[int, int]:
    what = "an integer or a pair (block_q, block_k) of positive multiples of 64"
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"trous.BlockMask: block_size must be {what}, got {block_size!r}")
        bq, bk = block_size
    else:
        bq = bk = block_size
    try:
        bq, bk = operator.index(bq), operator.index(bk)
    except TypeError:
        raise ValueError(f"trous.BlockMask: block_size must be {what}, got {block_size!r}") from None
    if bq <= 0 or bk <= 0 or bq % 64 or bk % 64:
        raise ValueError(f"trous.BlockMask: block_size must be {what}, got ({bq}, {bk})")
    return bq, bk


def _lengths(seq_lengths) -> Tuple[int, int]:
    try:
        Sq, Sk = (operator.index(x) for x in seq_lengths)
    except (TypeError, ValueError):
        raise ValueError(f"trous.BlockMask: seq_lengths must be a pair (Sq, Sk) of integers >= 0, "
                         f"got {seq_lengths!r}") from None
    if Sq < 0 or Sk < 0:
        raise ValueError(f"trous.BlockMask: seq_lengths must be >= 0, got ({Sq}, {Sk})")
    return Sq, Sk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockMask:
    """A block-sparse layout for :func:`trous.sparse_attention` (``block_mask=``), AND-ed with its
    closed-form pattern (causal, window, chunk, dilation, global tokens).

    Build one from FlexAttention's BCSR form (this constructor, same argument names as
    ``torch.nn.attention.flex_attention.BlockMask.from_kv_blocks``), from a FlexAttention BlockMask
    (:meth:`from_flex`), from a block-level boolean layout (:meth:`from_layout`: the constructors of
    ``trous.attention.layouts`` use it), from a ``mask_mod`` (:meth:`from_mask_mod`), from document
    ids (:meth:`from_documents`, fast at long lengths) or from a dense mask (:meth:`from_dense`).

    Arguments
        kv_num_blocks: int32 (Bm, Hm, nqb): per query block, how many partial key blocks it has;
            Bm is 1 or the batch size B, Hm 1 or the query head count Hq (broadcast when 1);
            nqb = ceil(Sq / block_q).
        kv_indices: int32 (Bm, Hm, nqb, K): the partial key blocks of each query block, the first
            ``kv_num_blocks`` entries of each row, strictly increasing, in [0, nkb), nkb =
            ceil(Sk / block_k); the rest of a row is ignored.
        full_kv_num_blocks, full_kv_indices: the same for the full key blocks (every pair allowed);
            None: no full blocks. A block may not be both partial and full.
        seq_lengths: (Sq, Sk), the query and key lengths the mask is for (checked at every call).
        block_size: block_q = block_k, or (block_q, block_k); positive multiples of 64
            (FlexAttention's default is 128).
        mask_mod: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``, evaluated once on the
            partial blocks with broadcast int64 index tensors (b and h of shape (P, 1, 1), q_idx
            (P, block_q, 1), kv_idx (P, 1, block_k)): it must be written with tensor operations
            (indexing, comparisons, ``&``), as FlexAttention's are. Not with ``partial_masks``.
        partial_masks: bool (P, block_q, block_k): the element mask of each partial block, in the
            order of the partial entries (b, h, query block, then the entry's place in its row).
        Without ``mask_mod`` and ``partial_masks``, partial blocks are computed whole (as
        FlexAttention does with its default no-op mask_mod).

    Positions past Sq or Sk in the last blocks are never attended. A partial block whose element
    mask turns out all True becomes full, all False no block. Indices out of range, unsorted or
    repeated, a block both partial and full, or shapes that do not match raise ValueError before
    any kernel runs (one host read of a check flag).

    Attributes (the kernels' form, on the mask's device): ``table`` int32 (Bm, Hm, nqb, nkb) with
    0 = no pair, 1 = full, 2 + e = partial with element mask ``elems[e]``; ``elems`` bool
    (E, block_q, block_k) or None (E <= the partial blocks: blocks may share an element mask);
    ``block_size`` (block_q, block_k); ``seq_lengths`` (Sq, Sk).
    """

    def __init__(self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                 full_kv_num_blocks: Optional[torch.Tensor] = None, full_kv_indices: Optional[torch.Tensor] = None,
                 *, seq_lengths: Sequence[int], block_size: BlockSize = 128, mask_mod: Optional[Callable] = None,
                 partial_masks: Optional[torch.Tensor] = None):
        bq, bk = _block_size(block_size)
        Sq, Sk = _lengths(seq_lengths)
        nqb, nkb = _cdiv(Sq, bq), _cdiv(Sk, bk)
        if mask_mod is not None and partial_masks is not None:
            raise ValueError("trous.BlockMask: pass mask_mod or partial_masks, not both")
        partial, partial_n = self._rows("kv_num_blocks", "kv_indices", kv_num_blocks, kv_indices, nqb, nkb, None)
        dims = tuple(kv_num_blocks.shape[:2])
        table = torch.zeros(*dims, nqb, nkb + 1, dtype=torch.int32, device=kv_num_blocks.device)
        hits = torch.zeros_like(table)
        if full_kv_num_blocks is not None or full_kv_indices is not None:
            if full_kv_num_blocks is None or full_kv_indices is None:
                raise ValueError("trous.BlockMask: pass both full_kv_num_blocks and full_kv_indices, or neither")
            full, _ = self._rows("full_kv_num_blocks", "full_kv_indices", full_kv_num_blocks, full_kv_indices, nqb,
                                 nkb, dims)
            table.scatter_(3, full, FULL)
            hits.scatter_add_(3, full, torch.ones_like(full, dtype=torch.int32))
        hits.scatter_add_(3, partial, torch.ones_like(partial, dtype=torch.int32))
        if bool((hits[..., :nkb] > 1).any()):
            raise ValueError("trous.BlockMask: a key block is listed twice for one query block (partial and full, "
                             "or twice in one row of kv_indices)")
        # Partial entries in (b, h, query block, slot) order: their element masks.
        valid = torch.arange(partial.shape[-1], device=partial.device) < partial_n[..., None]
        P = int(valid.sum())
        if partial_masks is not None:
            if (not isinstance(partial_masks, torch.Tensor) or partial_masks.dtype != torch.bool
                    or tuple(partial_masks.shape) != (P, bq, bk)):
                got = (f"{partial_masks.dtype} {list(partial_masks.shape)}" if isinstance(partial_masks, torch.Tensor)
                       else type(partial_masks).__name__)
                raise ValueError(f"trous.BlockMask: partial_masks must be bool of shape (P, block_q, block_k) = "
                                 f"({P}, {bq}, {bk}) (one per partial block), got {got}")
        where = valid.nonzero()  # (P, 4): b, h, query block, slot
        kb = partial[where[:, 0], where[:, 1], where[:, 2], where[:, 3]] if P else where[:, 0]
        self.block_size = (bq, bk)
        self.seq_lengths = (Sq, Sk)
        if mask_mod is not None and P:
            partial_masks = _evaluate(mask_mod, where[:, 0], where[:, 1], where[:, 2], kb, bq, bk, Sq, Sk)
        if partial_masks is None:  # computed whole
            state = torch.full((P,), FULL, dtype=torch.int32, device=table.device)
            self.elems = None
        else:
            partial_masks = partial_masks.to(table.device)
            state, self.elems = _compact(partial_masks, _inside(where[:, 2], kb, bq, bk, Sq, Sk))
        if P:
            table[where[:, 0], where[:, 1], where[:, 2], kb] = state
        self.table = table[..., :nkb].contiguous()

    # -- validation of one BCSR pair -------------------------------------------------------------

    @staticmethod
    def _rows(num_name, idx_name, num, idx, nqb, nkb, dims) -> Tuple[torch.Tensor, torch.Tensor]:
        """Checks a (num, indices) pair; returns the indices as int64 with invalid slots set to nkb
        (a scratch column) and the counts."""
        for name, t, nd in ((num_name, num, 3), (idx_name, idx, 4)):
            if not isinstance(t, torch.Tensor) or t.dim() != nd or t.dtype not in (torch.int32, torch.int64):
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"trous.BlockMask: {name} must be an int32 tensor of {nd} dimensions, got {got}")
        if tuple(num.shape) != (*idx.shape[:2], nqb) or idx.shape[2] != nqb:
            raise ValueError(f"trous.BlockMask: {num_name} {list(num.shape)} and {idx_name} {list(idx.shape)} must "
                             f"be (Bm, Hm, nqb) and (Bm, Hm, nqb, K) with nqb = ceil(Sq / block_q) = {nqb}")
        if dims is not None and tuple(num.shape[:2]) != dims:
            raise ValueError(f"trous.BlockMask: {num_name} must have the (Bm, Hm) = {dims} of kv_num_blocks, got "
                             f"{list(num.shape[:2])}")
        if idx.device != num.device:
            raise ValueError(f"trous.BlockMask: {idx_name} must be on {num_name}'s device {num.device}, got "
                             f"{idx.device}")
        num = num.long()
        K = idx.shape[3]
        valid = torch.arange(K, device=idx.device) < num[..., None]
        idx = idx.long()
        bad_num = (num < 0) | (num > min(K, nkb))
        bad_idx = valid & ((idx < 0) | (idx >= nkb))
        unsorted = valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
        flags = torch.stack([bad_num.any(), bad_idx.any(), unsorted.any()]).tolist()
        if flags[0]:
            raise ValueError(f"trous.BlockMask: {num_name} must be in [0, min(K, nkb)] = [0, {min(K, nkb)}], got "
                             f"values in [{int(num.min())}, {int(num.max())}]")
        if flags[1]:
            raise ValueError(f"trous.BlockMask: {idx_name} must be in [0, nkb) = [0, {nkb}) (nkb = ceil(Sk / "
                             f"block_k)), got {int(idx[valid].min())} .. {int(idx[valid].max())}")
        if flags[2]:
            raise ValueError(f"trous.BlockMask: the first {num_name} entries of each row of {idx_name} must be "
                             f"strictly increasing (sorted, no repeats)")
        return torch.where(valid, idx, torch.full_like(idx, nkb)), num

    # -- other constructors ----------------------------------------------------------------------

    @classmethod
    def from_layout(cls, layout: torch.Tensor, *, seq_lengths: Sequence[int], block_size: BlockSize = 128,
                    mask_mod: Optional[Callable] = None) -> "BlockMask":
        """From a block-level layout: bool (Bm, Hm, nqb, nkb), True where a block may hold pairs.
        Without ``mask_mod`` every such block is full; with one, it is evaluated on every such block
        (full, partial or dropped by its result)."""
        if not isinstance(layout, torch.Tensor) or layout.dim() != 4 or layout.dtype != torch.bool:
            got = f"{layout.dtype} {list(layout.shape)}" if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise ValueError(f"trous.BlockMask.from_layout: layout must be bool of shape (Bm, Hm, nqb, nkb), got {got}")
        num, idx = _bcsr(layout)
        if mask_mod is None:
            return cls(torch.zeros_like(num), idx, num, idx, seq_lengths=seq_lengths, block_size=block_size)
        return cls(num, idx, seq_lengths=seq_lengths, block_size=block_size, mask_mod=mask_mod)

    @classmethod
    def from_mask_mod(cls, mask_mod: Callable, B: int, H: int, Sq: int, Sk: int, *, block_size: BlockSize = 128,
                      device=None) -> "BlockMask":
        """FlexAttention's ``create_block_mask(mask_mod, B, H, Sq, Sk)``: ``mask_mod`` evaluated on every
        block (Sq * Sk pairs per (b, h): for tests and short lengths; :meth:`from_documents` builds
        document masks without that). B or H of 1 broadcast."""
        bq, bk = _block_size(block_size)
        layout = torch.ones(B, H, _cdiv(Sq, bq), _cdiv(Sk, bk), dtype=torch.bool, device=device)
        return cls.from_layout(layout, seq_lengths=(Sq, Sk), block_size=(bq, bk), mask_mod=mask_mod)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, *, block_size: BlockSize = 128) -> "BlockMask":
        """From a dense bool mask (Bm, Hm, Sq, Sk) or (Sq, Sk): True where query i may attend key j."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 4):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"trous.BlockMask.from_dense: mask must be bool (Bm, Hm, Sq, Sk) or (Sq, Sk), got {got}")
        m = mask if mask.dim() == 4 else mask[None, None]
        Sq, Sk = m.shape[2], m.shape[3]
        bq, bk = _block_size(block_size)
        return cls.from_mask_mod(lambda b, h, i, j: m[b, h, i, j], m.shape[0], m.shape[1], Sq, Sk,
                                 block_size=(bq, bk), device=m.device)

    @classmethod
    def from_documents(cls, document_ids: torch.Tensor, *, causal: bool = False,
                       document_ids_k: Optional[torch.Tensor] = None, block_size: BlockSize = 128) -> "BlockMask":
        """The document (packed-sequence) mask: query i may attend key j iff they belong to the same
        document (and, with ``causal=True``, j <= i). ``document_ids`` (Sq,) non-decreasing integers
        (packed documents); ``document_ids_k`` (Sk,) for the keys (default: the same).

        Fast at long lengths: the layout comes from each block's first and last document (O(nqb *
        nkb)); element masks are built only for the blocks at document ends and on the diagonal, and
        only once per distinct mask (blocks with the same row and column documents, lengths and
        diagonal offset share one entry of ``elems``).
        """
        dq = document_ids
        dk = dq if document_ids_k is None else document_ids_k
        for name, d in (("document_ids", dq), ("document_ids_k", dk)):
            if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.is_floating_point() or d.dtype == torch.bool:
                raise ValueError(f"trous.BlockMask.from_documents: {name} must be a 1-D integer tensor")
        if bool(((dq[1:] < dq[:-1]).any()) | ((dk[1:] < dk[:-1]).any())):
            raise ValueError("trous.BlockMask.from_documents: document ids must be non-decreasing (packed documents)")
        bq, bk = _block_size(block_size)
        Sq, Sk = dq.numel(), dk.numel()
        nqb, nkb = _cdiv(Sq, bq), _cdiv(Sk, bk)
        dev = dq.device
        dq, dk = dq.long(), dk.to(dev).long()
        q_first, q_last = dq[::bq], dq[torch.clamp(torch.arange(1, nqb + 1, device=dev) * bq, max=Sq) - 1]
        k_first, k_last = dk[::bk], dk[torch.clamp(torch.arange(1, nkb + 1, device=dev) * bk, max=Sk) - 1]
        overlap = (q_first[:, None] <= k_last[None, :]) & (k_first[None, :] <= q_last[:, None])
        one_doc = (q_first[:, None] == q_last[:, None]) & (k_first[None, :] == k_last[None, :]) & (
            q_first[:, None] == k_first[None, :])
        if causal:
            qb = torch.arange(nqb, device=dev)[:, None]
            kb = torch.arange(nkb, device=dev)[None, :]
            overlap = overlap & (kb * bk <= torch.clamp((qb + 1) * bq, max=Sq) - 1)
            one_doc = one_doc & ((kb + 1) * bk - 1 <= qb * bq)
        table = (overlap & one_doc).to(torch.int32)[None, None]  # FULL = 1
        where = (overlap & ~one_doc).nonzero()  # (P, 2): the partial blocks
        elems = None
        if where.shape[0]:
            qb, kb = where[:, 0], where[:, 1]
            ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
            rows = (qb[:, None] * bq + ar_q).clamp(max=Sq - 1)
            cols = (kb[:, None] * bk + ar_k).clamp(max=Sk - 1)
            nq, nk = (Sq - qb * bq).clamp(max=bq), (Sk - kb * bk).clamp(max=bk)
            # j <= i  <=>  (j - kb bk) - (i - qb bq) <= qb bq - kb bk; clamped: the same mask.
            off = (qb * bq - kb * bk).clamp(min=-bq, max=bk - 1) if causal else torch.zeros_like(qb)
            # A block's element mask depends on its row and column documents, valid lengths and
            # offset only: built once per distinct key.
            keys = torch.cat([dq[rows], dk[cols], torch.stack([nq, nk, off], 1)], 1)
            uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
            rq, rk = uniq[:, :bq], uniq[:, bq:bq + bk]
            nq, nk, off = uniq[:, -3, None, None], uniq[:, -2, None, None], uniq[:, -1, None, None]
            masks = rq[:, :, None] == rk[:, None, :]
            if causal:
                masks &= (ar_k[None, None, :] - ar_q[None, :, None]) <= off
            inside = (ar_q[None, :, None] < nq) & (ar_k[None, None, :] < nk)
            state, elems = _compact(masks, inside)
            table[0, 0, qb, kb] = state[inverse]
        out = object.__new__(cls)
        out.block_size, out.seq_lengths = (bq, bk), (Sq, Sk)
        out.table, out.elems = table.contiguous(), elems
        return out

    @classmethod
    def from_flex(cls, flex_block_mask, *, partial_masks: Optional[torch.Tensor] = None) -> "BlockMask":
        """Converts FlexAttention's ``BlockMask`` (``torch.nn.attention.flex_attention``) on its own
        device, without copying the layout to the host: its ``kv_num_blocks`` / ``kv_indices``,
        ``full_kv_num_blocks`` / ``full_kv_indices``, ``BLOCK_SIZE`` and ``seq_lengths``; the partial
        blocks' element mask from its ``mask_mod`` (evaluated once on those blocks) or from
        ``partial_masks`` (bool (P, block_q, block_k), in the order of the partial entries).

        Cannot be converted (ValueError): block sizes that are not multiples of 64; a ``mask_mod``
        that does not evaluate on broadcast index tensors (data-dependent Python control flow such
        as ``if q_idx > ...``, or ops that only work under ``torch.vmap``; pass ``partial_masks``
        then); a mask sliced to other lengths than its ``seq_lengths``.
        """
        for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths"):
            if not hasattr(flex_block_mask, attr):
                raise ValueError(f"trous.BlockMask.from_flex: expected a FlexAttention BlockMask (no attribute "
                                 f"{attr!r} on {type(flex_block_mask).__name__})")
        mask_mod = None if partial_masks is not None else getattr(flex_block_mask, "mask_mod", None)
        if mask_mod is not None and getattr(mask_mod, "__name__", "") == "noop_mask":
            mask_mod = None
        return cls(flex_block_mask.kv_num_blocks, flex_block_mask.kv_indices, flex_block_mask.full_kv_num_blocks,
                   flex_block_mask.full_kv_indices, seq_lengths=tuple(flex_block_mask.seq_lengths),
                   block_size=tuple(flex_block_mask.BLOCK_SIZE), mask_mod=mask_mod, partial_masks=partial_masks)

    # -- views -----------------------------------------------------------------------------------

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(Bm, Hm, Sq, Sk)."""
        return (self.table.shape[0], self.table.shape[1], *self.seq_lengths)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def to(self, device) -> "BlockMask":
        """The same mask on another device."""
        other = object.__new__(BlockMask)
        other.block_size, other.seq_lengths = self.block_size, self.seq_lengths
        other.table = self.table.to(device)
        other.elems = None if self.elems is None else self.elems.to(device)
        return other

    def to_bcsr(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), int32, FlexAttention's
        form (partial blocks, then full ones), e.g. for ``flex_attention.BlockMask.from_kv_blocks``."""
        num_p, idx_p = _bcsr(self.table >= PARTIAL0)
        num_f, idx_f = _bcsr(self.table == FULL)
        return num_p, idx_p, num_f, idx_f

    def materialize(self, device=None) -> torch.Tensor:
        """The dense bool mask (Bm, Hm, Sq, Sk) (for tests and to inspect a layout)."""
        bq, bk = self.block_size
        Sq, Sk = self.seq_lengths
        t = self.table
        i = torch.arange(Sq, device=t.device)
        j = torch.arange(Sk, device=t.device)
        state = t[:, :, i // bq][:, :, :, j // bk]  # (Bm, Hm, Sq, Sk)
        out = state == FULL
        if self.elems is not None and self.elems.shape[0]:
            e = (state - PARTIAL0).clamp(min=0)
            part = self.elems[e, (i % bq)[:, None], (j % bk)[None, :]]
            out = out | ((state >= PARTIAL0) & part)
        return out if device is None else out.to(device)

    def count(self) -> int:
        """Allowed pairs, summed over the (Bm, Hm) entries."""
        bq, bk = self.block_size
        Sq, Sk = self.seq_lengths
        rows = torch.clamp(Sq - torch.arange(self.table.shape[2], device=self.device) * bq, max=bq)
        cols = torch.clamp(Sk - torch.arange(self.table.shape[3], device=self.device) * bk, max=bk)
        full = ((self.table == FULL) * rows[:, None] * cols[None, :]).sum()
        part = 0
        if self.elems is not None and self.elems.shape[0]:
            # Element masks are cut at Sq / Sk when built; one may serve several blocks.
            uses = torch.bincount((self.table[self.table >= PARTIAL0] - PARTIAL0).long(), minlength=self.elems.shape[0])
            part = (self.elems.flatten(1).sum(1) * uses).sum()
        return int(full + part)

    def density(self) -> float:
        """Allowed pairs / (Bm * Hm * Sq * Sk)."""
        Bm, Hm, Sq, Sk = self.shape
        return self.count() / (Bm * Hm * Sq * Sk) if Sq and Sk else 0.0

    def __repr__(self) -> str:
        full = int((self.table == FULL).sum())
        part = int((self.table >= PARTIAL0).sum())
        return (f"trous.BlockMask(shape={self.shape}, block_size={self.block_size}, full_blocks={full}, "
                f"partial_blocks={part}, density={self.density():.4f})")


def _bcsr(layout: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(num, indices) int32 of a bool (..., nqb, nkb) layout: the True key blocks of each row,
    sorted, first (a stable sort of the negated flags)."""
    num = layout.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def _inside(qb: torch.Tensor, kb: torch.Tensor, bq: int, bk: int, Sq: int, Sk: int) -> torch.Tensor:
    """(P, bq, bk) True where a block's element lies inside (Sq, Sk)."""
    i = qb[:, None, None] * bq + torch.arange(bq, device=qb.device)[None, :, None]
    j = kb[:, None, None] * bk + torch.arange(bk, device=qb.device)[None, None, :]
    return (i < Sq) & (j < Sk)


def _evaluate(mask_mod: Callable, b, h, qb, kb, bq: int, bk: int, Sq: int, Sk: int) -> torch.Tensor:
    """mask_mod on the P blocks (b, h, qb, kb), bool (P, bq, bk), False outside (Sq, Sk); indices are
    clamped into range before the call (a mask_mod may index per-position tensors)."""
    P = b.numel()
    out = torch.empty(P, bq, bk, dtype=torch.bool, device=b.device)
    step = max(1, _EVAL_PAIRS // (bq * bk))
    ar_q = torch.arange(bq, device=b.device)
    ar_k = torch.arange(bk, device=b.device)
    for s in range(0, P, step):
        e = slice(s, min(s + step, P))
        i = (qb[e, None, None] * bq + ar_q[None, :, None]).clamp(max=max(Sq - 1, 0))
        j = (kb[e, None, None] * bk + ar_k[None, None, :]).clamp(max=max(Sk - 1, 0))
        try:
            m = mask_mod(b[e, None, None], h[e, None, None], i, j)
        except Exception as exc:  # (the user's function: any failure means "not evaluable this way")
            raise ValueError(f"trous.BlockMask: mask_mod could not be evaluated on broadcast index tensors "
                             f"({type(exc).__name__}: {exc}); write it with tensor operations, or pass "
                             f"partial_masks") from exc
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"trous.BlockMask: mask_mod must return a bool tensor, got "
                             f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        out[e] = torch.broadcast_to(m, (e.stop - e.start, bq, bk))
    return out & _inside(qb, kb, bq, bk, Sq, Sk)


def _compact(masks: torch.Tensor, inside: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """States of P partial blocks from their element masks: FULL where every pair inside the
    lengths is allowed, NONE where none is, else PARTIAL0 + e with the kept masks in ``elems``."""
    masks = masks & inside
    any_ = masks.flatten(1).any(1)
    all_ = (masks | ~inside).flatten(1).all(1)
    partial = any_ & ~all_
    rank = torch.cumsum(partial.to(torch.int32), 0) - 1
    state = torch.where(all_, torch.full_like(rank, FULL), torch.where(partial, rank + PARTIAL0,
                                                                       torch.full_like(rank, NONE)))
    return state.to(torch.int32), masks[partial].contiguous()
