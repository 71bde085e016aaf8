"""``AttentionPattern``: which keys each query may attend, written from the composition rules of
shared/spec/attention.md (the same rules the kernels' ``csrc/attention/pattern.h`` implements).

The pattern is a boolean mask over (query i, key j) pairs, never stored by the kernels: they ask it,
per tile, "skip, full or partial?". ``materialize`` builds the dense mask, for users to check a
pattern and for the references of the tests.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["AttentionPattern", "GlobalTokens"]

GlobalTokens = Union[None, int, torch.Tensor, Sequence[bool]]

# Pairs materialised at once when counting (memory of a block of the mask and its index tensors).
_COUNT_BLOCK = 1 << 22


def _index(value, name: str, what: str) -> int:
    """``value`` as a Python int (bools refused: ``window=(True, 0)`` is a mistake, not a 1)."""
    if isinstance(value, bool):
        raise ValueError(f"trous.AttentionPattern: {name} must be {what}, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"trous.AttentionPattern: {name} must be {what}, got {value!r}") from None


def _window(window) -> Tuple[int, int]:
    what = "a pair (left, right) of integers >= -1 (-1: unbounded)"
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise ValueError(f"trous.AttentionPattern: window must be {what}, got {window!r}")
    left, right = (_index(w, "window", what) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"trous.AttentionPattern: window must be {what}, got ({left}, {right})")
    return left, right


def _global_tokens(g: GlobalTokens) -> Union[None, int, torch.Tensor]:
    what = ("None, a count n >= 0 (the first n key positions) or a 1-D bool tensor / list over the Sk key "
            "positions")
    if g is None:
        return None
    if isinstance(g, torch.Tensor):
        if g.dim() != 1 or g.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"trous.AttentionPattern: global_tokens must be {what}, got a tensor of shape "
                             f"{list(g.shape)} and dtype {g.dtype}")
        return g if g.dtype == torch.bool else g != 0
    if isinstance(g, (list, tuple)):
        if not all(isinstance(v, (bool, int)) for v in g):
            raise ValueError(f"trous.AttentionPattern: global_tokens must be {what}, got a list holding "
                             f"{sorted({type(v).__name__ for v in g})}")
        return torch.tensor([bool(v) for v in g], dtype=torch.bool)
    n = _index(g, "global_tokens", what)
    if n < 0:
        raise ValueError(f"trous.AttentionPattern: global_tokens must be {what}, got {n}")
    return n


class AttentionPattern:
    """The keys each query may attend: causal, sliding window (FlashAttention-2 semantics), chunks,
    dilation and global tokens, composed by fixed rules.

    Arguments
        causal: keys after the (aligned) query are masked, global tokens included.
        window: ``(left, right)``, FlashAttention-2's ``window_size``: query i sees keys
            ``i' - left <= j <= i' + right``; ``-1`` means unbounded on that side. ``left`` counts the
            keys *before* the query's own aligned key (which is always in a window with
            ``left, right >= 0``): ``(w, w)`` holds 2w + 1 keys, ``(0, 0)`` the diagonal only,
            ``(-1, 0)`` equals ``causal=True``.
        chunk_size: C > 0 splits the keys into chunks of C (MEGA, Llama-4 chunked local attention);
            query i sees the keys of its own chunk: ``i' // C == j // C``. 0: no chunks.
        dilation: d >= 1; the window counts steps of d: ``(i' - j) % d == 0`` and
            ``-right <= (i' - j) / d <= left`` (``window=(w, w), dilation=d`` is Longformer's dilated
            window of 2w + 1 keys). With an unbounded window it keeps the residue class of the
            query only.
        global_tokens: a count n (the first ``min(n, Sk)`` key positions are global) or a bool
            tensor / list of Sk flags. Every query sees the global keys, and query i is a global row
            (sees every key) iff key position ``i'`` is global.

    Rules, with s = Sk - Sq and i' = i + s (bottom-right alignment, as FlashAttention, applied to
    every part; // and % round towards -inf, so a query with i' < 0 has no local keys)::

        local(i, j)   = window(i, j) and dilation(i, j) and chunk(i, j)     (absent parts are true)
        allowed(i, j) = (local(i, j) or global_key[j] or global_row[i]) and (not causal or j <= i')

    A row with no allowed key (e.g. causal with Sq > Sk) is fully masked: the attention gives 0 and
    its LSE is -inf. Drawn examples (Sq = Sk = 8; ``#`` allowed, ``.`` masked; row i, column j)::

        window=(2, 1)   window=(1, 1),     chunk_size=3,      window=(1, 0),
                        dilation=2         causal=True        global_tokens=1
        ##......        #.#.....           #.......           ########
        ###.....        .#.#....           ##......           ##......
        ####....        #.#.#...           ###.....           ###.....
        .####...        .#.#.#..           ...#....           #.##....
        ..####..        ..#.#.#.           ...##...           #..##...
        ...####.        ...#.#.#           ...###..           #...##..
        ....####        ....#.#.           ......#.           #....##.
        .....###        .....#.#           ......##           #.....##

    ``AttentionPattern(window=(1, 0), global_tokens=1)`` (last drawing): key 0 is global (column 0),
    and so is query 0 (row 0), since i' = i here. With Sq != Sk the last query is aligned with
    the last key: ``causal=True`` with Sq = 3, Sk = 6 gives the rows ``####..``, ``#####.``,
    ``######`` (and with Sq = 6, Sk = 3 the first three rows are fully masked).
    """

    def __init__(self, causal: bool = False, window: Sequence[int] = (-1, -1), chunk_size: int = 0,
                 dilation: int = 1, global_tokens: GlobalTokens = None):
        if not isinstance(causal, bool):
            raise ValueError(f"trous.AttentionPattern: causal must be a bool, got {causal!r}")
        self.causal = causal
        self.window = _window(window)
        self.chunk_size = _index(chunk_size, "chunk_size", "an integer >= 0 (0: no chunks)")
        if self.chunk_size < 0:
            raise ValueError(f"trous.AttentionPattern: chunk_size must be an integer >= 0 (0: no chunks), "
                             f"got {self.chunk_size}")
        self.dilation = _index(dilation, "dilation", "an integer >= 1")
        if self.dilation < 1:
            raise ValueError(f"trous.AttentionPattern: dilation must be an integer >= 1, got {self.dilation}")
        self.global_tokens = _global_tokens(global_tokens)

    def __repr__(self) -> str:
        g = self.global_tokens
        if isinstance(g, torch.Tensor):
            g = f"<{int(g.sum())} of {g.numel()} flags>"
        return (f"AttentionPattern(causal={self.causal}, window={self.window}, chunk_size={self.chunk_size}, "
                f"dilation={self.dilation}, global_tokens={g})")

    # -- the flags ---------------------------------------------------------------------------

    def global_flags(self, Sk: int, device=None) -> Optional[torch.Tensor]:
        """The Sk global-key flags (bool), or None when no key is global by construction (no
        global_tokens, or a count of 0). A flag tensor must have Sk entries."""
        g = self.global_tokens
        if g is None or (isinstance(g, int) and g == 0):
            return None
        if isinstance(g, int):
            return torch.arange(Sk, device=device) < g
        if g.numel() != Sk:
            raise ValueError(f"trous.AttentionPattern: global_tokens must have Sk = {Sk} flags, got {g.numel()}")
        return g.to(device) if device is not None else g

    def _row_flags(self, flags: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
        """Query i is a global row iff key position i + (Sk - Sq) is global (false outside [0, Sk))."""
        ip = torch.arange(Sq, device=flags.device) + (Sk - Sq)
        inside = (ip >= 0) & (ip < Sk)
        return inside & flags[ip.clamp(0, max(Sk - 1, 0))] if Sk > 0 else torch.zeros(Sq, dtype=torch.bool,
                                                                                        device=flags.device)

    # -- the element predicate ---------------------------------------------------------------

    def _local(self, i: torch.Tensor, j: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
        """window and dilation and chunk, for broadcastable int64 index tensors."""
        ip = i + (Sk - Sq)
        delta = ip - j
        left, right = self.window
        d = self.dilation
        local = torch.ones_like(delta, dtype=torch.bool)
        if d > 1:
            local = local & (torch.remainder(delta, d) == 0)
        if left >= 0:
            local = local & (delta <= left * d)
        if right >= 0:
            local = local & (delta >= -right * d)
        if self.chunk_size > 0:
            local = local & (torch.div(ip, self.chunk_size, rounding_mode="floor")
                             == torch.div(j, self.chunk_size, rounding_mode="floor"))
        return local

    def _allowed(self, i: torch.Tensor, j: torch.Tensor, Sq: int, Sk: int, key_flags: Optional[torch.Tensor],
                 row_flags: Optional[torch.Tensor]) -> torch.Tensor:
        """allowed(i, j) for broadcastable int64 index tensors (the rules of the class docstring)."""
        allowed = self._local(i, j, Sq, Sk)
        if key_flags is not None:
            allowed = allowed | key_flags[j] | row_flags[i]
        if self.causal:
            allowed = allowed & (j <= i + (Sk - Sq))
        return allowed

    def _local_counts(self, Sq: int, Sk: int) -> torch.Tensor:
        """Per row, the number of keys that are local and (under causal) not after i', in closed form:
        the local keys of a row are the j of one interval with j = i' (mod d)."""
        ip = torch.arange(Sq, dtype=torch.int64) + (Sk - Sq)
        left, right = self.window
        d, C = self.dilation, self.chunk_size
        lo = torch.zeros_like(ip)
        hi = torch.full_like(ip, Sk - 1)
        if left >= 0:
            lo = torch.maximum(lo, ip - left * d)
        if right >= 0:
            hi = torch.minimum(hi, ip + right * d)
        if C > 0:
            start = torch.div(ip, C, rounding_mode="floor") * C
            lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + C - 1)
        if self.causal:
            hi = torch.minimum(hi, ip)
        n = torch.div(hi - ip, d, rounding_mode="floor") - torch.div(lo - 1 - ip, d, rounding_mode="floor")
        return torch.where(hi >= lo, n, torch.zeros_like(n))

    def _rows(self, Sq: int, Sk: int, rows: torch.Tensor, device) -> torch.Tensor:
        key_flags = self.global_flags(Sk, device)
        row_flags = self._row_flags(key_flags, Sq, Sk) if key_flags is not None else None
        j = torch.arange(Sk, device=device)
        return self._allowed(rows[:, None], j[None, :], Sq, Sk, key_flags, row_flags)

    def materialize(self, Sq: int, Sk: int, device=None) -> torch.Tensor:
        """The dense boolean mask, shape (Sq, Sk): ``mask[i, j]`` is True iff query i may attend key j."""
        Sq, Sk = _index(Sq, "Sq", "an integer >= 0"), _index(Sk, "Sk", "an integer >= 0")
        if Sq < 0 or Sk < 0:
            raise ValueError(f"trous.AttentionPattern.materialize: Sq and Sk must be >= 0, got ({Sq}, {Sk})")
        if Sq == 0 or Sk == 0:
            self.global_flags(Sk, device)  # still checks the length of a flag tensor
            return torch.zeros(Sq, Sk, dtype=torch.bool, device=device)
        return self._rows(Sq, Sk, torch.arange(Sq, device=device), device)

    def count(self, Sq: int, Sk: int) -> int:
        """The number of allowed (query, key) pairs, without the dense mask (fast at long lengths):
        per row, the local keys in closed form, plus the global keys that are not local (evaluated
        on the global keys only, in blocks), or every causal key for a global row."""
        if Sq == 0 or Sk == 0:
            self.global_flags(Sk)
            return 0
        per_row = self._local_counts(Sq, Sk)
        key_flags = self.global_flags(Sk)
        if key_flags is not None:
            ip = torch.arange(Sq, dtype=torch.int64) + (Sk - Sq)
            gkeys = key_flags.nonzero().flatten()
            if self.causal:  # global keys j <= i', minus those already local
                before = torch.cat([torch.zeros(1, dtype=torch.int64), key_flags.cumsum(0)])
                n_global = before[(ip + 1).clamp(0, Sk)]
            else:
                n_global = torch.full_like(ip, gkeys.numel())
            step = max(1, _COUNT_BLOCK // max(gkeys.numel(), 1))
            both = torch.cat([(self._local(torch.arange(r, min(r + step, Sq))[:, None], gkeys[None, :], Sq, Sk)
                               & ((gkeys[None, :] <= ip[r:r + step, None]) if self.causal else True)).sum(1)
                              for r in range(0, Sq, step)])
            per_row = per_row + n_global - both
            every = (ip + 1).clamp(0, Sk) if self.causal else torch.full_like(ip, Sk)
            per_row = torch.where(self._row_flags(key_flags, Sq, Sk), every, per_row)
        return int(per_row.sum())

    def density(self, Sq: int, Sk: int) -> float:
        """Allowed pairs / (Sq * Sk) (0.0 when either length is 0)."""
        return self.count(Sq, Sk) / (Sq * Sk) if Sq and Sk else 0.0

    def flops(self, B: int, H: int, D: int, Sq: int, Sk: int, backward: bool = False) -> float:
        """FLOPs by the convention of FlashAttention (and shared/spec/attention.md): forward
        4 * B * H * D * (allowed pairs); ``backward=True`` gives the backward pass alone, 2.5x the
        forward (so forward + backward is ``flops(...) + flops(..., backward=True)``)."""
        f = 4.0 * B * H * D * self.count(Sq, Sk)
        return 2.5 * f if backward else f

    def mask_mod(self, Sq: int, Sk: int, device=None) -> Callable:
        """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for lengths (Sq, Sk)."""
        key_flags = self.global_flags(Sk, device)
        row_flags = self._row_flags(key_flags, Sq, Sk) if key_flags is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            return self._allowed(q_idx, kv_idx, Sq, Sk, key_flags, row_flags)

        return mask_mod
