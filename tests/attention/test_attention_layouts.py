"""Layout constructors of trous.attention.layouts (BigBird, Scale-DiT, NATTEN 2-D neighbourhoods,
LongNet): each materialised mask against a dense definition written here from the papers' rules
(loops or broadcast formulas, never the constructors' code), attention through
trous.sparse_attention(block_mask=) on the permuted tokens against the fp64 reference with the
un-permuted mask, forward and backward; LongNet against a dense fp64 reference of its branches;
bad arguments raise ValueError naming the argument."""

import math

import pytest
import torch

import trous
from trous.attention import layouts
from trous.attention import reference as ref


def close(a, b, rtol, floor=0.1):
    """max |a - b| <= rtol * max(max |b|, floor), in fp64."""
    scale = max(b.abs().max().item(), floor)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rtol * scale, f"max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def qkv(B, S, Hq, Hkv, D, dtype=torch.float64, seed=0, Sk=None):
    g = torch.Generator().manual_seed(seed)
    Sk = S if Sk is None else Sk
    q = torch.randn(B, S, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64)
    go = torch.randn(B, S, Hq, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, go)]


def grads(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, go.to(out.dtype)))


def expand_blocks(layout, S, bs):
    """(..., nb, nb) block layout -> (..., S, S) element mask, by loops over the blocks."""
    nb = layout.shape[-1]
    out = torch.zeros(*layout.shape[:-2], S, S, dtype=torch.bool)
    for a in range(nb):
        for b in range(nb):
            out[..., a * bs:(a + 1) * bs, b * bs:(b + 1) * bs] = layout[..., a, b, None, None]
    return out


# ---- BigBird ----------------------------------------------------------------------------------

@pytest.mark.parametrize("S,bs,w,r,g,H", [(1000, 64, 3, 2, 2, 3), (700, 128, 3, 3, 1, 2), (64 * 9 + 5, 64, 5, 2, 0, 1),
                                          (200, 64, 3, 4, 1, 2), (64 * 12, 64, 1, 0, 3, 1)])
def test_bigbird_structure(S, bs, w, r, g, H):
    bm = layouts.bigbird(S, block_size=bs, window_blocks=w, random_blocks=r, global_blocks=g, num_heads=H, seed=5)
    nb = -(-S // bs)
    lay = layouts.bigbird_layout(S, block_size=bs, window_blocks=w, random_blocks=r, global_blocks=g, num_heads=H,
                                 seed=5)
    assert lay.shape == (H, nb, nb) and bm.shape == (1, H, S, S) and bm.block_size == (bs, bs)
    for h in range(H):
        for i in range(nb):
            row = set(lay[h, i].nonzero().flatten().tolist())
            if i < g:
                assert row == set(range(nb))  # global rows
                continue
            fixed = {j for j in range(nb) if abs(i - j) <= w // 2} | set(range(min(g, nb)))
            assert fixed <= row
            extra = row - fixed
            assert len(extra) == min(r, nb - len(fixed))
    # the element mask: every allowed block whole, cut at S
    dense = expand_blocks(lay, nb * bs, bs)[:, :S, :S]
    assert torch.equal(bm.materialize()[0], dense)
    assert (bm.table <= 1).all() and bm.elems is None  # all blocks full
    assert bm.count() == int(dense.sum())


def test_bigbird_seeded_and_per_head():
    kw = dict(block_size=64, num_heads=4)
    a = layouts.bigbird_layout(64 * 30, seed=1, **kw)
    b = layouts.bigbird_layout(64 * 30, seed=1, **kw)
    c = layouts.bigbird_layout(64 * 30, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # heads differ in their random blocks
    m = layouts.bigbird(64 * 30, seed=1, batch=3, **kw)
    assert m.shape == (3, 4, 64 * 30, 64 * 30)
    assert torch.equal(m.table[0], m.table[2])  # batch entries share the layout
    assert torch.equal(m.table[1] == 1, a)


def test_bigbird_density():
    # nb = 128: rows see 3 + 2 + 2 = 7 blocks (interior), global rows all 128.
    S, nb = 64 * 128, 128
    m = layouts.bigbird(S, num_heads=2, seed=0)
    lay = m.table[0] == 1
    per_row = lay.sum(-1)
    assert (per_row[:, :2] == nb).all()
    assert (per_row[:, 3:-1] == 7).all()  # (row 2 touches the global block 1 with its window)
    assert (per_row[:, 2] == 6).all() and (per_row[:, -1] == 6).all()  # window overlaps a global / is clipped
    assert m.density() == (2 * nb + (nb - 4) * 7 + 2 * 6) / nb ** 2
    assert m.density() < 0.08


def test_bigbird_through_attention():
    S, H, D = 64 * 5 + 13, 4, 32
    m = layouts.bigbird(S, num_heads=H, random_blocks=1, global_blocks=1, seed=3, batch=2)
    q, k, v, go = qkv(2, S, H, 2, D, seed=4)  # (batch 2 and 4 heads of the mask, GQA)
    mask = m.materialize()
    want = grads(lambda a, b, c: ref.attention_from_mask(a, b, c, mask)[0], q, k, v, go)
    got = grads(lambda a, b, c: trous.sparse_attention(a, b, c, block_mask=m), *(t.float() for t in (q, k, v, go)))
    close(got[0], want[0], 1e-4)
    for x, y in zip(got[1:], want[1:]):
        close(x, y, 3e-4)


@pytest.mark.parametrize("kw,name", [(dict(seq_len=0), "seq_len"), (dict(block_size=96), "block_size"),
                                     (dict(block_size=32), "block_size"), (dict(window_blocks=2), "window_blocks"),
                                     (dict(random_blocks=-1), "random_blocks"), (dict(global_blocks=1.5),
                                                                                 "global_blocks"),
                                     (dict(num_heads=0), "num_heads"), (dict(batch=0), "batch"),
                                     (dict(seed=-3), "seed")])
def test_bigbird_bad_arguments(kw, name):
    args = dict(seq_len=300)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        layouts.bigbird(args.pop("seq_len"), **args)


# ---- LongNet ----------------------------------------------------------------------------------

def longnet_ref(q, k, v, segments, rates, causal=False, compute_dtype=torch.float64):
    """Dense reference of LongNet from the branch definitions: branch (w, r), head h, offset h % r:
    (i // w == j // w) and i % r == j % r == h % r (and j <= i); the branches' (out, lse) merged with
    lse = logsumexp_b lse_b, out = sum_b exp(lse_b - lse) out_b."""
    S, Hq = q.shape[1], q.shape[2]
    i = torch.arange(S).view(1, -1, 1)
    j = torch.arange(S).view(1, 1, -1)
    h = torch.arange(Hq).view(-1, 1, 1)
    outs, lses = [], []
    for w, r in zip(segments, rates):
        mask = (i // w == j // w) & (i % r == h % r) & (j % r == h % r)
        if causal:
            mask = mask & (j <= i)
        o, lse = ref.attention_from_mask(q, k, v, mask[None], compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(lse)
    lse = torch.logsumexp(torch.stack(lses), 0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = sum(torch.exp(lb - safe).transpose(1, 2)[..., None] * ob for ob, lb in zip(outs, lses))
    return out, lse


def longnet_grads(fn, q, k, v, go, gl):
    """out, lse and the gradients of sum(out * go) + sum(lse * gl) over the covered rows."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    fin = torch.isfinite(lse.detach())
    loss = (out * go.to(out.dtype)).sum() + torch.where(fin, lse * gl.to(lse.dtype), torch.zeros_like(lse)).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves))


LONGNET = [  # (B, S, Hq, Hkv, segments, rates, causal)
    (1, 45, 4, 2, (8, 16, 32), (1, 2, 4), False),  # LongNet's geometric branches, S not a multiple of w
    (2, 37, 6, 2, (6, 12), (2, 3), True),  # GQA group 3 with r = 2: KV heads gathered
    (1, 50, 3, 3, (10, 64), (2, 4), False),  # rates > 1 only: uncovered rows; w > S; r > Hq
    (1, 29, 2, 1, (4,), (4,), True),  # MQA, one branch
]


@pytest.mark.parametrize("case", range(len(LONGNET)))
def test_longnet_fp32(case):
    B, S, Hq, Hkv, segs, rates, causal = LONGNET[case]
    q, k, v, go = qkv(B, S, Hq, Hkv, 32, seed=case)
    gl = torch.randn(B, Hq, S, generator=torch.Generator().manual_seed(case + 100), dtype=torch.float64)
    want = longnet_grads(lambda a, b, c: longnet_ref(a, b, c, segs, rates, causal), q, k, v, go, gl)
    got = longnet_grads(lambda a, b, c: trous.longnet_attention(a, b, c, segs, rates, causal=causal,
                                                                return_lse=True),
                        *(t.float() for t in (q, k, v, go)), gl.float())
    assert got[0].dtype == torch.float32 and got[1].shape == (B, Hq, S)
    close(got[0], want[0], 1e-4)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    fin = torch.isfinite(want[1])
    close(got[1][fin], want[1][fin], 1e-5)
    for x, y in zip(got[2:], want[2:]):
        assert not x.isnan().any()
        close(x, y, 3e-4)
    if not fin.all():  # rows no branch covers: out 0, lse -inf
        assert (got[0].transpose(1, 2)[~fin] == 0).all()


def test_longnet_bf16():
    """FlashAttention's rule: error <= 2x that of the same dense computation in bf16 (gradients 3x)."""
    B, S, Hq, Hkv, segs, rates = 2, 61, 4, 2, (8, 16, 64), (1, 2, 4)
    q, k, v, go = qkv(B, S, Hq, Hkv, 64, dtype=torch.bfloat16, seed=11)
    gl = torch.randn(B, Hq, S, generator=torch.Generator().manual_seed(12)).bfloat16()
    want = longnet_grads(lambda a, b, c: longnet_ref(a, b, c, segs, rates), *(t.double() for t in (q, k, v, go)),
                         gl.double())
    low = longnet_grads(lambda a, b, c: longnet_ref(a, b, c, segs, rates, compute_dtype=torch.bfloat16),
                        q, k, v, go, gl)
    got = longnet_grads(lambda a, b, c: trous.longnet_attention(a, b, c, segs, rates, return_lse=True), q, k, v, go,
                        gl)
    assert got[0].dtype == torch.bfloat16
    for idx, factor in [(0, 2.0), (2, 3.0), (3, 3.0), (4, 3.0)]:
        err = (got[idx].double() - want[idx]).abs().max().item()
        err_pt = (low[idx].double() - want[idx]).abs().max().item()
        assert err <= factor * err_pt + 1e-6, (idx, err, err_pt)
    assert (got[1].double() - want[1]).abs().max().item() < 2e-2


def test_longnet_one_dense_branch_is_chunked_attention():
    q, k, v, _ = qkv(1, 40, 2, 2, 32, dtype=torch.float32, seed=3)
    a = trous.longnet_attention(q, k, v, [16], [1])
    b = trous.sparse_attention(q, k, v, chunk_size=16)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("segs,rates,name", [((8, 6), (2, 4), "segments\\[1\\]"), ((8,), (1, 2), "rates"),
                                             ((0,), (1,), "segments\\[0\\]"), ((8,), (0,), "rates\\[0\\]"),
                                             (8, 1, "segments"), ((), (), "segments")])
def test_longnet_bad_arguments(segs, rates, name):
    q, k, v, _ = qkv(1, 16, 2, 2, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=name):
        trous.longnet_attention(q, k, v, segs, rates)


def test_longnet_bad_shapes():
    q, k, v, _ = qkv(1, 16, 3, 2, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="Hq = 3"):
        trous.longnet_attention(q, k, v, [8], [1])
    q, k, v, _ = qkv(1, 16, 2, 2, 32, dtype=torch.float32, Sk=20)
    with pytest.raises(ValueError, match="k and v"):
        trous.longnet_attention(q, k, v, [8], [1])
    with pytest.raises(ValueError, match="q must be"):
        trous.longnet_attention(q[0], k, v, [8], [1])


# ---- NATTEN 2-D neighbourhoods ----------------------------------------------------------------

def natten_mask(H, W, kh, kw, dh, dw):
    """(H*W, H*W) row-major pixels, by loops: pixel (y, x) sees the kh x kw pixels of its own
    residue class (y % dh, x % dw) whose class positions lie in NATTEN's window
    [clamp(p - k // 2, 0, n - k), ... + k) on each axis (n: the class's size on that axis)."""
    m = torch.zeros(H * W, H * W, dtype=torch.bool)
    for y in range(H):
        rows = list(range(y % dh, H, dh))
        p = rows.index(y)
        sy = min(max(p - kh // 2, 0), len(rows) - kh)
        for x in range(W):
            cols = list(range(x % dw, W, dw))
            px = cols.index(x)
            sx = min(max(px - kw // 2, 0), len(cols) - kw)
            for yy in rows[sy:sy + kh]:
                for xx in cols[sx:sx + kw]:
                    m[y * W + x, yy * W + xx] = True
    return m


NATTEN = [  # (H, W, kernel_size, dilation, block_size, tile)
    (13, 11, 3, 1, 64, None), (17, 14, 5, 2, 64, None), (12, 19, (3, 5), (3, 2), 64, (4, 4)),
    (16, 16, 7, 1, 128, None), (9, 23, (1, 7), (1, 3), 64, (2, 8)), (10, 10, 5, 2, 64, (1, 1)),
]


@pytest.mark.parametrize("case", range(len(NATTEN)))
def test_neighborhood_2d_mask(case):
    H, W, ks, dil, bs, tile = NATTEN[case]
    bm, perm = layouts.neighborhood_2d(H, W, ks, dilation=dil, block_size=bs, tile=tile)
    S = H * W
    assert perm.dtype == torch.int64 and torch.equal(torch.sort(perm).values, torch.arange(S))  # a permutation
    kh, kw = ks if isinstance(ks, tuple) else (ks, ks)
    dh, dw = dil if isinstance(dil, tuple) else (dil, dil)
    want = natten_mask(H, W, kh, kw, dh, dw)
    assert (want.sum(1) == kh * kw).all()  # (the definition: every query sees k_h * k_w keys)
    assert bm.shape == (1, 1, S, S)
    assert torch.equal(bm.materialize()[0, 0], want[perm][:, perm])


def test_neighborhood_2d_groups_classes_and_tiles():
    # With dilation 2 the first quarter of the permuted positions are the pixels (even, even); with 8 x 8
    # tiles each interior tile is one 64-block, and a query block's neighbours lie in at most 3 x 3 tiles.
    H = W = 48
    bm, perm = layouts.neighborhood_2d(H, W, 5, dilation=2)
    y, x = perm // W, perm % W
    first = perm[: (H // 2) * (W // 2)]
    assert ((first // W) % 2 == 0).all() and ((first % W) % 2 == 0).all()
    blk = (y[:64] // 2, x[:64] // 2)  # block 0: tile (0, 0) of class (0, 0)
    assert blk[0].max() == 7 and blk[1].max() == 7
    per_row = (bm.table[0, 0] > 0).sum(-1)
    assert per_row.max() <= 9
    # each class: a 24 x 24 sub-grid = 3 x 3 tiles = 9 blocks; a tile's window reaches its neighbour tiles
    # only (corners 4, edges 6, centre 9 blocks), never another class: 4 * 49 of the 36 * 36 blocks
    assert int((bm.table > 0).sum()) == 4 * (4 * 4 + 4 * 6 + 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neighborhood_2d_attention(dtype):
    H, W, B, Hq, Hkv, D = 11, 13, 2, 2, 1, 32
    bm, perm = layouts.neighborhood_2d(H, W, (5, 3), dilation=(2, 1))
    inv = torch.argsort(perm)
    mask = natten_mask(H, W, 5, 3, 2, 1)
    q, k, v, go = qkv(B, H * W, Hq, Hkv, D, seed=17)
    want = grads(lambda a, b, c: ref.attention_from_mask(a, b, c, mask)[0], q, k, v, go)

    def ours(a, b, c):
        return trous.sparse_attention(a[:, perm], b[:, perm], c[:, perm], block_mask=bm)[:, inv]

    low = [t.to(dtype) for t in (q, k, v, go)]
    got = grads(ours, *low)
    assert got[0].dtype == dtype
    if dtype == torch.float32:
        close(got[0], want[0], 1e-4)
        for a, b in zip(got[1:], want[1:]):
            close(a, b, 3e-4)
    else:  # FlashAttention's rule against the same dense computation in bf16
        pt = grads(lambda a, b, c: ref.attention_from_mask(a, b, c, mask, compute_dtype=dtype)[0], *low)
        for idx, factor in [(0, 2.0), (1, 3.0), (2, 3.0), (3, 3.0)]:
            err = (got[idx].double() - want[idx]).abs().max().item()
            err_pt = (pt[idx].double() - want[idx]).abs().max().item()
            assert err <= factor * err_pt + 1e-6, (idx, err, err_pt)


@pytest.mark.parametrize("kw,name", [(dict(kernel_size=0), "kernel_size"), (dict(kernel_size=(3, 3, 3)), "kernel_size"),
                                     (dict(dilation=0), "dilation"), (dict(kernel_size=7, dilation=2), "kernel_size"),
                                     (dict(block_size=100), "block_size"), (dict(tile=(0, 4)), "tile"),
                                     (dict(height=0), "height"), (dict(width=2.0), "width")])
def test_neighborhood_2d_bad_arguments(kw, name):
    args = dict(height=12, width=12, kernel_size=3)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        layouts.neighborhood_2d(args.pop("height"), args.pop("width"), args.pop("kernel_size"), **args)


# ---- Scale-DiT --------------------------------------------------------------------------------

def scale_dit_mask(H, W, wh, ww, A):
    """(H*W + A)^2 in the original order (row-major image tokens, then the anchors): image tokens
    see their window's tokens ((y // wh, x // ww) equal) and every anchor; anchors see the anchors."""
    y = torch.arange(H * W) // W
    x = torch.arange(H * W) % W
    same = (y[:, None] // wh == y[None, :] // wh) & (x[:, None] // ww == x[None, :] // ww)
    m = torch.zeros(H * W + A, H * W + A, dtype=torch.bool)
    m[:H * W, :H * W] = same
    m[:, H * W:] = True
    return m


SCALE_DIT = [  # (H, W, window, anchor_stride, block_size)
    (16, 24, (8, 8), None, 64), (13, 11, (4, 3), None, 64), (20, 12, (4, 8), 2, 64), (9, 30, 5, (3, 10), 128),
    (16, 16, (16, 8), (4, 4), 128),
]


@pytest.mark.parametrize("case", range(len(SCALE_DIT)))
def test_scale_dit_mask(case):
    H, W, win, stride, bs = SCALE_DIT[case]
    bm, perm = layouts.scale_dit(H, W, window=win, anchor_stride=stride, block_size=bs)
    wh, ww = win if isinstance(win, tuple) else (win, win)
    st = (wh, ww) if stride is None else (stride if isinstance(stride, tuple) else (stride, stride))
    A = math.ceil(H / st[0]) * math.ceil(W / st[1])
    N = H * W
    assert torch.equal(torch.sort(perm).values, torch.arange(N))
    assert bm.shape == (1, 1, N + A, N + A)
    P = torch.cat([perm, torch.arange(N, N + A)])
    want = scale_dit_mask(H, W, wh, ww, A)
    assert torch.equal(bm.materialize()[0, 0], want[P][:, P])
    # each window is contiguous in the permuted order
    wid = (perm // W // wh) * math.ceil(W / ww) + (perm % W) // ww
    assert (wid[1:] >= wid[:-1]).all()


def test_scale_dit_whole_blocks():
    # 8 x 8 windows dividing a 32 x 40 grid, block 64: every window one block, every visited block full
    bm, perm = layouts.scale_dit(32, 40, window=(8, 8), block_size=64)
    assert bm.elems is None and int((bm.table >= 2).sum()) == 0
    n_win = 4 * 5
    table = bm.table[0, 0]
    assert table.shape == (n_win + 1, n_win + 1)  # 20 window blocks and one block of 20 anchors
    assert torch.equal(table[:n_win, :n_win] == 1, torch.eye(n_win, dtype=torch.bool))
    assert (table[:, n_win] == 1).all() and (table[n_win, :n_win] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_dit_attention(dtype):
    H, W, B, Hq, Hkv, D = 12, 10, 1, 3, 3, 32
    bm, perm = layouts.scale_dit(H, W, window=(4, 5), anchor_stride=(3, 5))
    A = 4 * 2
    N = H * W
    P = torch.cat([perm, torch.arange(N, N + A)])
    inv = torch.argsort(P)
    mask = scale_dit_mask(H, W, 4, 5, A)
    q, k, v, go = qkv(B, N + A, Hq, Hkv, D, seed=23)
    want = grads(lambda a, b, c: ref.attention_from_mask(a, b, c, mask)[0], q, k, v, go)

    def ours(a, b, c):
        return trous.sparse_attention(a[:, P], b[:, P], c[:, P], block_mask=bm)[:, inv]

    low = [t.to(dtype) for t in (q, k, v, go)]
    got = grads(ours, *low)
    if dtype == torch.float32:
        close(got[0], want[0], 1e-4)
        for a, b in zip(got[1:], want[1:]):
            close(a, b, 3e-4)
    else:
        pt = grads(lambda a, b, c: ref.attention_from_mask(a, b, c, mask, compute_dtype=dtype)[0], *low)
        for idx, factor in [(0, 2.0), (1, 3.0), (2, 3.0), (3, 3.0)]:
            err = (got[idx].double() - want[idx]).abs().max().item()
            err_pt = (pt[idx].double() - want[idx]).abs().max().item()
            assert err <= factor * err_pt + 1e-6, (idx, err, err_pt)


@pytest.mark.parametrize("kw,name", [(dict(window=0), "window"), (dict(window=(2, 2, 2)), "window"),
                                     (dict(anchor_stride=(1, 0)), "anchor_stride"), (dict(block_size=48), "block_size"),
                                     (dict(height=-1), "height"), (dict(width="4"), "width")])
def test_scale_dit_bad_arguments(kw, name):
    args = dict(height=8, width=8)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        layouts.scale_dit(args.pop("height"), args.pop("width"), **args)


def test_longnet_empty_sequence():
    q, k, v, _ = qkv(2, 0, 2, 1, 32, dtype=torch.float32)
    out, lse = trous.longnet_attention(q, k, v, [8, 16], [1, 2], return_lse=True)
    assert out.shape == (2, 0, 2, 32) and lse.shape == (2, 2, 0)


def test_longnet_deterministic_gradients():
    q, k, v, go = qkv(2, 70, 4, 2, 32, dtype=torch.float32, seed=8)
    runs = [grads(lambda a, b, c: trous.longnet_attention(a, b, c, (16, 32), (1, 2), deterministic=True), q, k, v, go)
            for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)
