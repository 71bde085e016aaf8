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

import math
import operator

import torch

from .block_mask import BlockMask, _bcsr
from .sparse import _backward as _sparse_backward
from .sparse import sparse_attention

__all__ = ["bigbird", "bigbird_layout", "longnet_attention", "neighborhood_2d", "scale_dit"]


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


# ---- LongNet ---------------------------------------------------------------------------------------

def _progression(values):
    """A slice for a list of ints in arithmetic progression (step >= 1), else None."""
    if len(values) == 1:
        return slice(values[0], values[0] + 1)
    step = values[1] - values[0]
    if step < 1 or any(b - a != step for a, b in zip(values, values[1:])):
        return None
    return slice(values[0], values[-1] + 1, step)


def _branch_pairs(segments, rates):
    fn = "longnet_attention"
    if isinstance(segments, int) or isinstance(rates, int):
        raise ValueError(f"trous.{fn}: segments and rates must be sequences of integers (one per branch), got "
                         f"{segments!r} and {rates!r}")
    segments, rates = list(segments), list(rates)
    if not segments or len(segments) != len(rates):
        raise ValueError(f"trous.{fn}: segments and rates must have the same length >= 1 (one (w, r) per branch), "
                         f"got {len(segments)} and {len(rates)}")
    pairs = []
    for n, (w, r) in enumerate(zip(segments, rates)):
        w = _int(fn, f"segments[{n}]", w, 1)
        r = _int(fn, f"rates[{n}]", r, 1)
        if w % r:
            raise ValueError(f"trous.{fn}: segments[{n}] must be a multiple of rates[{n}] (w % r == 0), got w = {w}, "
                             f"r = {r}")
        pairs.append((w, r))
    return pairs


class _LongNet(torch.autograd.Function):
    """The merged branches of :func:`longnet_attention`, forward and backward.

    Forward: each (branch, offset) sub-problem through :func:`trous.sparse_attention` (dense
    strided sub-sequences, ``chunk_size=w // r``), merged with the LSE. Backward: the merged
    result is attention over the union (with multiplicity) of the branches' pairs, with
    P_ij = exp(s_ij - lse_i) and dS_ij = P_ij (dO_i . v_j - dO_i . out_i) for the merged out and lse;
    so each sub-problem's backward op runs once with the *merged* out and lse of its rows (no
    gradient through the per-branch LSE, which would cost a second backward pass per branch), and
    the gradient of the returned lse (dlse_i / ds_ij = P_ij) is folded in as sparse_attention does.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, causal, scale, deterministic):
        B, S, Hq, D = q.shape
        subs = []
        for w, r, o, kv_sel in plan:
            qs, ks, vs = _sub_views(q, k, v, r, o, kv_sel)
            out_s, lse_s = sparse_attention(qs, ks, vs, chunk_size=w // r, causal=causal, scale=scale,
                                            return_lse=True)
            subs.append((out_s, lse_s))
        neg_inf = float("-inf")
        lse_all = torch.full((len(plan), B, Hq, S), neg_inf, dtype=torch.float32, device=q.device)
        for n, ((_w, r, o, _kv), (_out, lse_s)) in enumerate(zip(plan, subs)):
            lse_all[n, :, o::r, o::r] = lse_s
        lse = torch.logsumexp(lse_all, 0)  # (B, Hq, S); -inf where no branch covers the row
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        out = torch.zeros(B, S, Hq, D, dtype=torch.float32, device=q.device)
        for (_w, r, o, _kv), (out_s, lse_s) in zip(plan, subs):
            weight = torch.exp(lse_s - lse_safe[:, o::r, o::r])  # (B, Hsel, n)
            out[:, o::r, o::r] += out_s.float() * weight.transpose(1, 2)[..., None]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.causal, ctx.scale, ctx.deterministic = plan, causal, scale, deterministic
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        gq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        gk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        gv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for w, r, o, kv_sel in ctx.plan:
            qs, ks, vs = _sub_views(q, k, v, r, o, kv_sel)
            saved = (qs, ks, vs, out[:, o::r, o::r].contiguous(), lse[:, o::r, o::r].contiguous(), None)
            args = (ctx.causal, -1, -1, w // r, 1, ctx.scale, 0.0)
            go = None if grad_out is None else grad_out[:, o::r, o::r].contiguous()
            gl = None if grad_lse is None else grad_lse[:, o::r, o::r].contiguous()
            if go is None and gl is None:
                continue
            dq, dk, dv = _sparse_backward(saved, args, go, gl, ctx.deterministic)
            gq[:, o::r, o::r] += dq.float()
            for g, d in ((gk, dk), (gv, dv)):
                if d is None:
                    continue
                if isinstance(kv_sel, slice):
                    g[:, o::r, kv_sel] += d.float()
                else:
                    g[:, o::r].index_add_(2, kv_sel, d.float())
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None, None


def _sub_views(q, k, v, r, o, kv_sel):
    """The rows i = o (mod r) of the query heads o, o + r, ... (views) and of the KV heads they read
    (views for a slice, gathered for an index tensor)."""
    if isinstance(kv_sel, slice):
        return q[:, o::r, o::r], k[:, o::r, kv_sel], v[:, o::r, kv_sel]
    return q[:, o::r, o::r], k[:, o::r].index_select(2, kv_sel), v[:, o::r].index_select(2, kv_sel)


def longnet_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments, rates, *,
                      scale=None, causal: bool = False, return_lse: bool = False, deterministic: bool = False):
    """LongNet's dilated attention (Ding et al. 2023, "LongNet: Scaling Transformers to
    1,000,000,000 Tokens", sections 2.2 and 2.3, multi-head offsets included): self-attention as a
    mixture of branches b = (w_b, r_b) = (``segments[b]``, ``rates[b]``) merged with their
    log-sum-exp.

    In branch (w, r), query head h has offset o = h mod r; query i and key j meet iff
    floor(i / w) == floor(j / w) and i = j = o (mod r) (and j <= i with ``causal=True``). A branch's
    rows i != o (mod r) are not covered (lse_b = -inf there). The branches are merged as
    lse = logsumexp_b lse_b and out = sum_b exp(lse_b - lse) out_b (LongNet's softmax-denominator
    weights): out is the attention over the union of the branches' pairs, a pair counted once per
    branch holding it. A row no branch covers gives out 0 and lse -inf.

    Cost proportional to the pairs: for each branch and offset class o, the rows i = o (mod r)
    (a strided view, no copy) of the heads with that offset (heads o, o + r, ...) form a dense
    sub-sequence of length ceil((S - o) / r) where the segment condition becomes chunks of w / r
    (hence ``w % r == 0`` is required), run by :func:`trous.sparse_attention` (``chunk_size=w // r,
    return_lse=True``) and scattered back. GQA: the KV heads read by those query heads are passed
    as a strided view when they form a progression (always when Hq / Hkv divides r or r divides
    Hq / Hkv), else gathered. The backward runs each sub-problem's backward once, with the merged
    out and lse (see ``_LongNet``).

    Shapes: q (B, S, Hq, D), k and v (B, S, Hkv, D), Hq % Hkv == 0 (query head h reads KV head
    h // (Hq / Hkv)); ``segments``, ``rates``: sequences of positive integers of one length (w_b
    may exceed S: one segment). dtypes and head dims those of :func:`trous.sparse_attention`.
    Returns out (B, S, Hq, D) in q's dtype and, with ``return_lse=True``, lse (B, Hq, S) float32.
    ``scale`` defaults to 1 / sqrt(D). Differentiable in q, k and v, through out and lse;
    ``deterministic=True``: bitwise repeatable gradients.
    """
    fn = "longnet_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"trous.{fn}: {name} must be a 4-D tensor (B, S, H, D), got {got}")
    B, S, Hq, D = q.shape
    if k.shape[:2] != (B, S) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"trous.{fn}: k and v must be (B, S, Hkv, D) = ({B}, {S}, Hkv, {D}) (self-attention: "
                         f"the length of q), got k {list(k.shape)} and v {list(v.shape)}")
    Hkv = k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"trous.{fn}: the query heads Hq = {Hq} must be a multiple of the KV heads Hkv = {Hkv}")
    pairs = _branch_pairs(segments, rates)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    group = Hq // Hkv
    plan = []  # (w, r, o, KV heads: a slice or an index tensor)
    for w, r in pairs:
        for o in range(min(r, Hq, S)):
            heads = list(range(o, Hq, r))
            reads = [h // group for h in heads]
            kv = sorted(set(reads))
            per = len(heads) // len(kv)
            structured = len(heads) % len(kv) == 0 and reads == [x for x in kv for _ in range(per)]
            kv_sel = _progression(kv) if structured else None
            if kv_sel is None:  # query heads read KV heads in no GQA order: one KV head per query head
                kv_sel = torch.tensor(reads, device=k.device)
            plan.append((w, r, o, kv_sel))
    if not plan:  # S = 0
        out = q.new_zeros(B, S, Hq, D)
        return (out, torch.full((B, Hq, S), float("-inf"), device=q.device)) if return_lse else out
    out, lse = _LongNet.apply(q, k, v, plan, bool(causal), float(scale), bool(deterministic))
    return (out, lse) if return_lse else out


# ---- 2-D grids: shared helpers ---------------------------------------------------------------------

def _pair(fn: str, name: str, value, minimum: int):
    """An int or a pair of ints >= minimum, as a pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"trous.{fn}: {name} must be an integer or a pair of integers >= {minimum}, got "
                             f"{value!r}")
        return (_int(fn, name, value[0], minimum), _int(fn, name, value[1], minimum))
    v = _int(fn, name, value, minimum)
    return (v, v)


def _layout_of_pairs(qpos: torch.Tensor, kpos: torch.Tensor, bq: int, bk: int, nqb: int, nkb: int) -> torch.Tensor:
    """bool (nqb, nkb): True for the blocks of the (query position, key position) pairs given
    (int64 tensors of one shape)."""
    layout = torch.zeros(nqb * nkb, dtype=torch.bool, device=qpos.device)
    layout[(qpos // bq * nkb + kpos // bk).flatten()] = True
    return layout.view(nqb, nkb)


# ---- NATTEN 2-D neighbourhoods ---------------------------------------------------------------------

def _neighbour_start(p: torch.Tensor, n: torch.Tensor, k: int) -> torch.Tensor:
    """NATTEN's window start on an axis of n positions: clamp(p - k // 2, 0, n - k) (p, n: int64
    tensors of one shape, the result too)."""
    return torch.minimum(torch.clamp(p - k // 2, min=0), n - k)


def neighborhood_2d(height: int, width: int, kernel_size, *, dilation=1, block_size: int = 64, tile=None,
                    device=None):
    """NATTEN's 2-D neighbourhood attention (Hassani et al. 2023, "Neighborhood Attention
    Transformer"; dilation: Hassani and Shi 2022, "Dilated Neighborhood Attention Transformer") as a
    block mask over a height x width grid of tokens, by index remapping.

    Rule (per axis, here rows; columns alike): with dilation d, pixel row y belongs to the residue
    class c = y mod d, a sub-grid of n_c = ceil((height - c) / d) rows where it sits at p = y // d.
    Its neighbours are the rows of the same class at sub-grid positions [s, s + k) with NATTEN's
    start s = clamp(p - k // 2, 0, n_c - k): the window is shifted inside the image at the borders,
    so every query sees exactly k_h * k_w keys (itself included), all of its own class in both axes.
    Requires k * d <= the axis length (NATTEN's condition: every class holds k positions).

    Index remapping: ``perm`` (height * width,) int64 lists the row-major pixel indices in the order
    (class row, class column, tile row, tile column, row in tile, column in tile): the pixels of a
    dilation class are contiguous and, inside it, each ``tile`` = (t_h, t_w) of its sub-grid (border
    tiles smaller) is contiguous, so a query block's neighbours fall in few key blocks. Call with
    ``x[:, perm]`` for q, k and v (sequence dimension 1) and un-permute the output with
    ``out[:, inv]``, ``inv = torch.argsort(perm)`` (or ``out_orig[:, perm] = out``).

    The candidate blocks (those holding a neighbour pair) are found per query; the element mask is
    evaluated on them only (``BlockMask.from_layout(..., mask_mod=...)``), blocks whose pairs are all
    allowed become full.

    Arguments: ``kernel_size``, ``dilation``: int or (for rows, for columns), >= 1; ``block_size``: a
    positive multiple of 64 (query and key blocks); ``tile``: (t_h, t_w) >= 1, default
    (8, block_size // 8) (one block per interior tile: 8 x 8 for 64); ``device``: the mask's and
    perm's device.

    Returns (``BlockMask`` of shape (1, 1, S, S), S = height * width, in permuted positions;
    ``perm`` (S,) int64).
    """
    fn = "neighborhood_2d"
    Hh = _int(fn, "height", height, 1)
    Ww = _int(fn, "width", width, 1)
    kh, kw = _pair(fn, "kernel_size", kernel_size, 1)
    dh, dw = _pair(fn, "dilation", dilation, 1)
    bs = _block(fn, block_size)
    th, tw = _pair(fn, "tile", (8, max(1, bs // 8)) if tile is None else tile, 1)
    if kh * dh > Hh or kw * dw > Ww:
        raise ValueError(f"trous.{fn}: kernel_size * dilation must be <= (height, width) = ({Hh}, {Ww}) per axis "
                         f"(each dilation class must hold a full window), got kernel_size ({kh}, {kw}) and "
                         f"dilation ({dh}, {dw})")
    S = Hh * Ww
    y = torch.arange(Hh, device=device)[:, None].expand(Hh, Ww).reshape(-1)
    x = torch.arange(Ww, device=device)[None, :].expand(Hh, Ww).reshape(-1)
    cy, py, cx, px = y % dh, y // dh, x % dw, x // dw
    ny, nx = -(-(Hh - cy) // dh), -(-(Ww - cx) // dw)  # the class sub-grid's sizes, per pixel
    # sort key: class, tile, place in tile (row-major at each level; sizes bounded by class 0's)
    tiles_x = _cdiv(_cdiv(Ww, dw), tw)
    tiles_y = _cdiv(_cdiv(Hh, dh), th)
    key = (((cy * dw + cx) * tiles_y + py // th) * tiles_x + px // tw) * (th * tw) + (py % th) * tw + px % tw
    perm = torch.argsort(key, stable=True)
    inv = torch.argsort(perm)
    # per permuted position: class, sub-grid place, window starts
    P_cls, P_py, P_px = (cy * dw + cx)[perm], py[perm], px[perm]
    P_sy = _neighbour_start(py, ny, kh)[perm]
    P_sx = _neighbour_start(px, nx, kw)[perm]
    # candidate blocks: every (query, neighbour) pair, in chunks of queries
    nb = _cdiv(S, bs)
    layout = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    ay = torch.arange(kh, device=device)
    ax = torch.arange(kw, device=device)
    step = max(1, (1 << 22) // (kh * kw))
    for s in range(0, S, step):
        e = slice(s, min(s + step, S))
        orig = perm[e]
        yy = cy[orig, None, None] + (P_sy[e, None, None] + ay[None, :, None]) * dh
        xx = cx[orig, None, None] + (P_sx[e, None, None] + ax[None, None, :]) * dw
        kpos = inv[yy * Ww + xx]
        qpos = torch.arange(e.start, e.stop, device=device)[:, None, None].expand_as(kpos)
        layout |= _layout_of_pairs(qpos, kpos, bs, bs, nb, nb)

    def mask_mod(b, h, qi, kj):
        same = P_cls[qi] == P_cls[kj]
        dy = P_py[kj] - P_sy[qi]
        dx = P_px[kj] - P_sx[qi]
        return same & (dy >= 0) & (dy < kh) & (dx >= 0) & (dx < kw)

    bm = BlockMask.from_layout(layout[None, None], seq_lengths=(S, S), block_size=bs, mask_mod=mask_mod)
    return bm, perm


# ---- Scale-DiT -------------------------------------------------------------------------------------

def scale_dit(height: int, width: int, *, window=(8, 8), anchor_stride=None, block_size: int = 64, device=None):
    """Scale-DiT's hierarchical local attention (Zhang and Tai 2025, "Scale-DiT: Ultra-High-Resolution
    Image Generation with Hierarchical Local Attention") over a height x width grid of tokens: local
    attention inside fixed windows plus a low-resolution latent as global anchors.

    Tokens (S = height * width + A of them):
    - image tokens: the grid, cut into non-overlapping windows of ``window`` = (w_h, w_w) tokens
      (those at the bottom and right borders smaller when w does not divide the grid);
    - anchor tokens: A = ceil(height / s_h) * ceil(width / s_w) tokens of a low-resolution grid with
      ``anchor_stride`` = (s_h, s_w) (default: the window, one anchor per window), anchor (a, b)
      standing for the image region [a s_h, (a + 1) s_h) x [b s_w, (b + 1) s_w): the tokens of the
      low-resolution latent at scale 1 / s (Scale-DiT's global pathway) or the region's pooled
      tokens; appended after the image tokens in row-major order of their grid.
    Pattern (the paper's two pathways; guidance flows from global to local):
    - an image token attends every token of its own window and every anchor (the low-resolution
      latent injects global semantics into each window);
    - an anchor attends every anchor and no image token: the low-resolution pathway is full
      attention over the small grid, as the base model's own low-resolution attention, independent
      of the high-resolution tokens (cost A^2; no image token is read by it).
    So allowed(i, j) = window(i) == window(j) or j is an anchor (anchors: a window of their own).

    Index remapping: ``perm`` (height * width,) int64 lists the row-major image token indices window
    by window (windows row-major, tokens row-major inside): each window is contiguous, so with
    w_h * w_w a multiple of ``block_size`` and windows dividing the grid, every window is whole
    blocks and every visited block is full (else windows share boundary blocks, with an element
    mask there). Usage, x (B, height * width, ...) image tokens and a (B, A, ...) anchors:
    ``xs = torch.cat([x[:, perm], a], 1)`` for q, k and v, then ``out[:, :H*W][:, inv]`` with
    ``inv = torch.argsort(perm)`` gives the image tokens back in row-major order and
    ``out[:, H*W:]`` the anchors.

    Arguments: ``window``, ``anchor_stride``: int or (rows, columns) >= 1; ``block_size``: a
    positive multiple of 64; ``device``: the mask's and perm's device.
    Returns (``BlockMask`` of shape (1, 1, S, S) in the permuted order, ``perm`` (height * width,)).
    """
    fn = "scale_dit"
    Hh = _int(fn, "height", height, 1)
    Ww = _int(fn, "width", width, 1)
    wh, ww = _pair(fn, "window", window, 1)
    sh, sw = _pair(fn, "anchor_stride", (wh, ww) if anchor_stride is None else anchor_stride, 1)
    bs = _block(fn, block_size)
    nwy, nwx = _cdiv(Hh, wh), _cdiv(Ww, ww)
    n_win = nwy * nwx
    A = _cdiv(Hh, sh) * _cdiv(Ww, sw)
    N = Hh * Ww
    S = N + A
    y = torch.arange(Hh, device=device)[:, None].expand(Hh, Ww).reshape(-1)
    x = torch.arange(Ww, device=device)[None, :].expand(Hh, Ww).reshape(-1)
    win = (y // wh) * nwx + x // ww
    perm = torch.argsort(win * (wh * ww) + (y % wh) * ww + x % ww, stable=True)
    # per permuted position: its window (anchors: window n_win, last, so the ids are non-decreasing)
    doc = torch.cat([win[perm], torch.full((A,), n_win, dtype=win.dtype, device=win.device)])
    nb = _cdiv(S, bs)
    ends = torch.clamp(torch.arange(1, nb + 1, device=doc.device) * bs, max=S) - 1
    first, last = doc[::bs], doc[ends]
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    to_anchor = (last == n_win)[None, :].expand(nb, nb)  # key blocks holding anchors
    layout = overlap | to_anchor
    one = first == last  # blocks of one window (or anchors only)
    full = layout & one[:, None] & one[None, :] & ((first[:, None] == first[None, :]) | (first[None, :] == n_win))
    part = layout & ~full

    def mask_mod(b, h, qi, kj):
        return (doc[qi] == doc[kj]) | (doc[kj] == n_win)

    num_f, idx_f = _bcsr(full[None, None])
    num_p, idx_p = _bcsr(part[None, None])
    bm = BlockMask(num_p, idx_p, num_f, idx_f, seq_lengths=(S, S), block_size=bs, mask_mod=mask_mod)
    return bm, perm
