"""Block-sparse layouts of the seed papers, as :class:`trous.BlockMask` for
:func:`trous.sparse_attention` (``block_mask=``), and LongNet's dilated attention.

- :func:`bigbird`: BigBird's ITC layout (Zaheer et al. 2020, "Big Bird: Transformers for Longer
  Sequences"): window + random + global blocks, seeded, per head.
- :func:`scale_dit`: Scale-DiT's hierarchical local attention over an H x W token grid (local
  windows plus low-resolution anchor tokens), windows made contiguous by an index permutation.
- :func:`neighborhood_2d`: NATTEN's 2-D neighbourhood attention (Hassani et al. 2023,
  "Neighborhood Attention Transformer"; dilation from "Dilated Neighborhood Attention
  Transformer", 2022), pixels regrouped into tiles by a permutation.
- :func:`longnet_attention`: LongNet's dilated attention (Ding et al. 2023, "LongNet: Scaling
  Transformers to 1,000,000,000 Tokens"), several (segment, rate) branches merged with their LSE,
  each branch computed on dense sub-sequences (cost proportional to its pairs).

Every layout is built on the device asked for (``device=``) with tensor operations; the random
draws of :func:`bigbird` come from a seeded CPU ``torch.Generator`` (the same layout on every
device).
"""
from __future__ import annotations

import operator

import torch

from .block_mask import BlockMask

__all__ = ["bigbird", "bigbird_layout"]


def _int(fn: str, name: str, value, minimum: int) -> int:
    """value as an int >= minimum, or a ValueError naming the argument."""
    if isinstance(value, bool):
        raise ValueError(f"trous.{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"trous.{fn}: {name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"trous.{fn}: {name} must be an integer >= {minimum}, got {v}")
    return v


def _block(fn: str, block_size) -> int:
    b = _int(fn, "block_size", block_size, 64)
    if b % 64:
        raise ValueError(f"trous.{fn}: block_size must be a positive multiple of 64, got {b}")
    return b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- BigBird ---------------------------------------------------------------------------------------

def bigbird_layout(seq_len: int, *, block_size: int = 64, window_blocks: int = 3, random_blocks: int = 2,
                   global_blocks: int = 2, num_heads: int = 1, seed: int = 0, device=None) -> torch.Tensor:
    """The block-level layout of :func:`bigbird`: bool (num_heads, nb, nb), nb = ceil(seq_len /
    block_size), True where query block i may attend key block j (same arguments)."""
    fn = "bigbird"
    S = _int(fn, "seq_len", seq_len, 1)
    bs = _block(fn, block_size)
    w = _int(fn, "window_blocks", window_blocks, 0)
    if w % 2 == 0 and w != 0:
        raise ValueError(f"trous.bigbird: window_blocks must be 0 or odd (blocks centred on the query block), got {w}")
    r = _int(fn, "random_blocks", random_blocks, 0)
    g = _int(fn, "global_blocks", global_blocks, 0)
    H = _int(fn, "num_heads", num_heads, 1)
    seed = _int(fn, "seed", seed, 0)
    nb = _cdiv(S, bs)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    window = (j - i).abs() <= w // 2 if w else torch.zeros(nb, nb, dtype=torch.bool, device=device)
    global_k = (j < g).expand(nb, nb)
    fixed = window | global_k  # (nb, nb)
    layout = fixed[None].expand(H, nb, nb).clone()
    if r:
        # Per (head, query block): the r smallest of uniform draws over the key blocks not already
        # attended (the excluded ones get 2 > any draw, so they are picked only when fewer than r
        # remain, and then dropped).
        gen = torch.Generator().manual_seed(seed)
        draw = torch.rand(H, nb, nb, generator=gen).to(device)
        draw = torch.where(fixed[None], torch.full_like(draw, 2.0), draw)
        vals, idx = torch.topk(draw, min(r, nb), dim=-1, largest=False)
        layout.scatter_(-1, idx, vals < 2.0)
        layout |= fixed[None]
    layout[:, :g] = True  # global rows
    return layout


def bigbird(seq_len: int, *, block_size: int = 64, window_blocks: int = 3, random_blocks: int = 2,
            global_blocks: int = 2, num_heads: int = 1, batch: int = 1, seed: int = 0, device=None) -> BlockMask:
    """BigBird's block-sparse ITC layout (Zaheer et al. 2020, "Big Bird: Transformers for Longer
    Sequences", section 2 and appendix D: the blocked window / random / global attention), for
    self-attention over ``seq_len`` tokens in blocks of ``block_size``.

    With nb = ceil(seq_len / block_size) blocks, query block i attends key block j when
    - window: |i - j| <= window_blocks // 2 (``window_blocks`` blocks centred on i: 3 is i and one
      block each side; clipped at the ends, so the first and last blocks see fewer);
    - random: j is one of ``random_blocks`` key blocks drawn uniformly per (head, query block),
      distinct from i's window and global blocks (fewer when not enough blocks remain);
    - global keys: j < ``global_blocks`` (every query sees the first blocks);
    - global rows: i < ``global_blocks`` (the first query blocks see every key block).
    Every allowed block is full (no element mask); positions past seq_len are never attended.

    Arguments: ``window_blocks`` 0 or odd; ``random_blocks``, ``global_blocks`` >= 0;
    ``block_size`` a positive multiple of 64; ``num_heads`` >= 1: heads differ in their random
    blocks (num_heads = 1: one layout broadcast to every head); ``batch`` >= 1: the mask's batch
    dimension, every entry the same layout (1 broadcasts to any batch); ``seed``: the random draws
    come from ``torch.Generator().manual_seed(seed)`` on the CPU, so a seed gives the same layout on
    every device. ``device``: where the mask lives (that of q in the call).

    Returns a :class:`trous.BlockMask` of shape (batch, num_heads, seq_len, seq_len), block size
    (block_size, block_size). The layout itself: :func:`bigbird_layout` (num_heads, nb, nb).
    """
    B = _int("bigbird", "batch", batch, 1)
    layout = bigbird_layout(seq_len, block_size=block_size, window_blocks=window_blocks, random_blocks=random_blocks,
                            global_blocks=global_blocks, num_heads=num_heads, seed=seed, device=device)
    layout = layout[None].expand(B, *layout.shape)
    return BlockMask.from_layout(layout.contiguous(), seq_lengths=(seq_len, seq_len), block_size=block_size)
