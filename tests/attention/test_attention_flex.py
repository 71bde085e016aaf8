"""FlexAttention BlockMask conversion (``trous.BlockMask.from_flex``) against FlexAttention itself:
Flex's ``create_block_mask`` on CPU for causal, sliding-window, document (packed ids), prefix-LM,
per-head and batch-dependent masks, block sizes 64 and 128, Sq != Sk and lengths that are not
multiples of the block; trous.sparse_attention with the converted mask against Flex's own eager
forward (fp32) and the fp64 reference (outputs and gradients), ``materialize()`` against Flex's
``create_mask``. A ``BlockMask.from_kv_blocks`` mask with partial and full blocks, converted with
its mask_mod and with ``partial_masks=``. ``from_documents`` against ``from_mask_mod`` of the same
document(-causal) mask_mod. Every bad input raises ValueError before any kernel runs.

Flex's eager forward applies only the mask_mod to every (q, kv) pair (it ignores the block lists;
the compiled kernel uses them), so a Flex mask built from block lists carries a mask_mod that is
exactly its layout here.
"""
import warnings

import pytest
import torch

import trous
from trous.attention import reference as ref
from trous.attention import sparse as sparse_mod

flex = pytest.importorskip("torch.nn.attention.flex_attention",
                           reason="FlexAttention (torch.nn.attention.flex_attention) is not available in this torch")
create_block_mask, create_mask, flex_attention = flex.create_block_mask, flex.create_mask, flex.flex_attention
FlexBlockMask = flex.BlockMask

D = 32
LENGTHS = [(197, 261), (331, 130)]  # Sq < Sk and Sq > Sk, neither a multiple of 64


def _doc_ids(n: int, lengths, device="cpu") -> torch.Tensor:
    """Packed ids: document d has lengths[d] tokens (the last one takes the rest up to n)."""
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    at = 0
    for d, L in enumerate(lengths):
        ids[at:at + L] = d
        at += L
    ids[at:] = len(lengths)
    return ids


def _masks(Sq: int, Sk: int):
    """name -> (mask_mod, B, H) in FlexAttention's convention (q_idx, kv_idx: raw positions)."""
    doc_q = _doc_ids(Sq, [Sq // 5, Sq // 3, 1, Sq // 4])
    doc_k = _doc_ids(Sk, [Sk // 5, Sk // 3, 1, Sk // 4])
    widths = torch.tensor([9, 70, 1000])  # per head
    q_len = torch.tensor([Sq - 40, Sq])  # per batch entry: rows past q_len[b] see nothing
    k_len = torch.tensor([Sk // 2 + 3, Sk])

    def causal(b, h, q, kv):
        return q >= kv

    def sliding(b, h, q, kv):
        return (kv <= q + 17) & (kv >= q - 45)

    def document(b, h, q, kv):
        return doc_q[q] == doc_k[kv]

    def prefix_lm(b, h, q, kv):
        return (kv <= q) | (kv < 70)

    def per_head(b, h, q, kv):
        return (q - kv).abs() <= widths[h]

    def per_batch(b, h, q, kv):
        return (kv < k_len[b]) & (q < q_len[b]) & (kv <= q + 64 * b + 5)

    return {"causal": (causal, None, None), "sliding": (sliding, None, None), "document": (document, None, None),
            "prefix-lm": (prefix_lm, None, None), "per-head": (per_head, None, 3), "per-batch": (per_batch, 2, None)}


def _qkv(B, H, Sq, Sk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g)
    k = torch.randn(B, Sk, H, D, generator=g)
    v = torch.randn(B, Sk, H, D, generator=g)
    go = torch.randn(B, Sq, H, D, generator=g)
    return q, k, v, go


def _flex_forward(q, k, v, fbm):
    """Flex's eager forward on (B, S, H, D) tensors (it takes (B, H, S, D) views)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=fbm)
    return out.transpose(1, 2)


_FLEX_OUT = {}


def _flex_forward_cached(key, q, k, v, fbm):
    """Flex's eager forward depends on the mask_mod only (not on the block size): computed once per
    (mask, lengths) and reused for every block size (the same q, k, v)."""
    if key not in _FLEX_OUT:
        _FLEX_OUT[key] = _flex_forward(q, k, v, fbm)
    return _FLEX_OUT[key]


def _entries(num: torch.Tensor):
    """((b, h, i), num[b, h, i]) for every entry of a (Bm, Hm, nqb) count tensor."""
    for index in torch.cartesian_prod(*(torch.arange(n) for n in num.shape)).reshape(-1, num.dim()).tolist():
        yield tuple(index), int(num[tuple(index)])


def _grads(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, go.to(out.dtype))


MASKS = ["causal", "sliding", "document", "prefix-lm", "per-head", "per-batch"]
# (mask, BLOCK_SIZE, (Sq, Sk)): every mask at blocks 64 and 128 with Sq < Sk; four of them with
# Sq > Sk (rows before the first key block's end, empty rows in per-batch); non-square blocks.
FLEX_CASES = ([(m, b, LENGTHS[0]) for m in MASKS for b in (64, 128)]
              + [(m, b, LENGTHS[1]) for m in ("causal", "document", "prefix-lm", "per-batch") for b in (64, 128)]
              + [(m, (64, 128), LENGTHS[0]) for m in ("sliding", "per-head")])


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name, block, lengths", FLEX_CASES, ids=[f"{m}-{b}-{L[0]}x{L[1]}" for m, b, L in FLEX_CASES])
def test_from_flex_matches_flex_forward(name, block, lengths):
    Sq, Sk = lengths
    mask_mod, Bf, Hf = _masks(Sq, Sk)[name]
    fbm = create_block_mask(mask_mod, Bf, Hf, Sq, Sk, device="cpu", BLOCK_SIZE=block)
    bm = trous.BlockMask.from_flex(fbm)
    bq, bk = (block, block) if isinstance(block, int) else block
    assert bm.block_size == (bq, bk) and bm.seq_lengths == (Sq, Sk)
    assert bm.shape == (Bf or 1, Hf or 1, Sq, Sk)
    dense = create_mask(mask_mod, Bf or 1, Hf or 1, Sq, Sk, device="cpu")
    assert torch.equal(bm.materialize(), dense)
    assert bm.count() == int(dense.sum())
    # The converted layout has the same full / non-empty blocks as Flex's (trous may turn a partial
    # block whose element mask is all True into a full one, never the reverse).
    flex_full = torch.zeros_like(bm.table, dtype=torch.bool)
    if fbm.full_kv_num_blocks is not None:
        for (b, h, i), n in _entries(fbm.full_kv_num_blocks):
            flex_full[b, h, i, fbm.full_kv_indices[b, h, i, :n].long()] = True
    assert bool((bm.table == 1)[flex_full].all())

    B, H = 2, 3  # broadcast masks (1, 1) are used with B, H > 1
    q, k, v, go = _qkv(B, H, Sq, Sk, seed=Sq)
    out = trous.sparse_attention(q, k, v, block_mask=bm)
    want = _flex_forward_cached((name, Sq, Sk), q, k, v, fbm)
    assert out.shape == want.shape == (B, Sq, H, D)
    err = (out - want).abs().max().item()
    assert err <= 1e-5, err
    # The tolerance separates masks: the unmasked output is far from Flex's.
    assert (trous.sparse_attention(q, k, v) - want).abs().max().item() > 100 * max(err, 1e-6)
    # Gradients (Flex has no CPU backward): against the fp64 reference with Flex's dense mask
    # (broadcast over (B, H) by the reference's masked_fill).
    full_mask = dense.expand(B, H, Sq, Sk)
    out, grads = _grads(lambda q, k, v: trous.sparse_attention(q, k, v, block_mask=bm), q, k, v, go)
    rout, rgrads = _grads(lambda q, k, v: ref.attention_from_mask(q, k, v, full_mask)[0], q.double(), k.double(),
                          v.double(), go.double())
    assert _max_err(out, rout) <= 2e-5
    for a, b_ in zip(grads, rgrads):
        assert _max_err(a, b_) <= 1e-4


def _random_bcsr(Hm, nqb, nkb, seed):
    """A random block state per (head, query block, key block): 0 none, 1 full, 2 partial, with
    one empty query block row; returns the states and Flex's four BCSR tensors (rows padded with
    junk past the counts, which must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(0, 3, (1, Hm, nqb, nkb), generator=g)
    state[0, 0, 1] = 0  # a query block with no key block
    state[0, -1, 0, 0] = 2  # at least one partial block

    def lists(sel):
        num = sel.sum(-1).to(torch.int32)
        idx = torch.full((*sel.shape[:-1], nkb), nkb - 1, dtype=torch.int32)  # junk padding
        for (b, h, i), n in _entries(num):
            idx[b, h, i, :n] = sel[b, h, i].nonzero().flatten().to(torch.int32)
        return num, idx

    return (state,) + lists(state == 2) + lists(state == 1)


def test_from_kv_blocks_with_partial_masks():
    Sq, Sk, bs, Hm = 201, 333, 64, 2
    nqb, nkb = -(-Sq // bs), -(-Sk // bs)
    state, num, idx, fnum, fidx = _random_bcsr(Hm, nqb, nkb, seed=5)
    g = torch.Generator().manual_seed(6)
    elem = torch.rand(1, Hm, nqb * bs, nkb * bs, generator=g) < 0.4  # the partial blocks' element masks
    st = state.repeat_interleave(bs, 2).repeat_interleave(bs, 3)
    allowed = ((st == 1) | ((st == 2) & elem))[..., :Sq, :Sk]  # the pairs the mask allows

    def mask_mod(b, h, q, kv):  # (b: the mask broadcasts over the batch; Flex's eager forward passes b < B)
        return allowed[0, h, q, kv]

    fbm = FlexBlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(Sq, Sk))
    # partial_masks: one (bs, bs) per partial entry, in (b, h, query block, slot) order.
    padded = torch.zeros(1, Hm, nqb * bs, nkb * bs, dtype=torch.bool)
    padded[..., :Sq, :Sk] = allowed
    pm = torch.stack([padded[0, h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
                      for h in range(Hm) for i in range(nqb) for j in idx[0, h, i, :num[0, h, i]].tolist()])
    assert pm.shape[0] == int(num.sum())
    by_masks = trous.BlockMask.from_flex(fbm, partial_masks=pm)
    by_mod = trous.BlockMask.from_flex(fbm)
    for bm in (by_masks, by_mod):
        assert bm.shape == (1, Hm, Sq, Sk)
        assert torch.equal(bm.materialize(), allowed)
        assert bool((bm.table[state == 0] == 0).all()) and bool((bm.table[state == 1] == 1).all())
    assert torch.equal(by_masks.table, by_mod.table) and torch.equal(by_masks.elems, by_mod.elems)
    # Without an element mask (Flex's default no-op mask_mod) partial blocks are computed whole.
    whole = trous.BlockMask.from_flex(FlexBlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=bs,
                                                                   seq_lengths=(Sq, Sk)))
    assert torch.equal(whole.materialize(), (st > 0)[..., :Sq, :Sk])

    q, k, v, go = _qkv(2, Hm, Sq, Sk, seed=7)
    want = _flex_forward(q, k, v, fbm)
    for bm in (by_masks, by_mod):
        out = trous.sparse_attention(q, k, v, block_mask=bm)
        assert (out - want).abs().max().item() <= 1e-5
    assert float(want[:, bs:2 * bs, 0].abs().max()) == 0.0  # head 0's empty query block: output 0
    rout = torch.cat([ref.attention_from_mask(q[:, :, h:h + 1].double(), k[:, :, h:h + 1].double(),
                                              v[:, :, h:h + 1].double(), allowed[0, h])[0] for h in range(Hm)], 2)
    torch.testing.assert_close(out.double(), rout, rtol=0, atol=2e-5)


# -- from_documents ------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("case", range(3))
def test_from_documents_equals_from_mask_mod(case, block, causal):
    g = torch.Generator().manual_seed(40 + case)
    S = [517, 1001, 389][case]
    cuts = sorted(torch.randperm(S - 1, generator=g)[:6].add(1).tolist())
    if case == 1:
        cuts = sorted(set(cuts + [cuts[0] + 1, 640, 641]))  # a length-1 document, block-aligned cut
    ids = torch.zeros(S, dtype=torch.int64)
    for c in cuts:
        ids[c:] += 1
    if case == 2:
        ids = ids * 3 + 7  # ids need only be non-decreasing, not 0..n-1

    def mask_mod(b, h, q, kv):
        same = ids[q] == ids[kv]
        return same & (q >= kv) if causal else same

    fast = trous.BlockMask.from_documents(ids, causal=causal, block_size=block)
    slow = trous.BlockMask.from_mask_mod(mask_mod, 1, 1, S, S, block_size=block)
    dense = (ids[:, None] == ids[None, :]) & (torch.ones(S, S, dtype=torch.bool).tril() if causal else True)
    assert torch.equal(fast.materialize()[0, 0], dense)
    assert torch.equal(fast.materialize(), slow.materialize())
    assert torch.equal(fast.table == 1, slow.table == 1) and torch.equal(fast.table > 1, slow.table > 1)
    assert fast.count() == int(dense.sum())
    if case == 0:  # also against Flex's create_block_mask of the same mask_mod
        fbm = create_block_mask(mask_mod, None, None, S, S, device="cpu", BLOCK_SIZE=block)
        assert torch.equal(trous.BlockMask.from_flex(fbm).materialize(), fast.materialize())


def test_from_documents_shared_element_masks_in_the_kernels():
    """from_documents builds one element mask per distinct block (documents, lengths, diagonal
    offset): blocks share entries of ``elems``; count(), the forward and the backward read them."""
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([150, 3, 200, 290]))  # S = 643
    bm = trous.BlockMask.from_documents(ids, causal=True, block_size=64)
    assert bm.elems.shape[0] < int((bm.table > 1).sum())  # shared
    dense = (ids[:, None] == ids[None, :]) & torch.ones(643, 643, dtype=torch.bool).tril()
    assert torch.equal(bm.materialize()[0, 0], dense) and bm.count() == int(dense.sum())
    q, k, v, go = _qkv(1, 2, 643, 643, seed=11)
    out, grads = _grads(lambda q, k, v: trous.sparse_attention(q, k, v, block_mask=bm), q, k, v, go)
    rout, rgrads = _grads(lambda q, k, v: ref.attention_from_mask(q, k, v, dense)[0], q.double(), k.double(),
                          v.double(), go.double())
    assert _max_err(out, rout) <= 2e-5
    for a, b_ in zip(grads, rgrads):
        assert _max_err(a, b_) <= 1e-4


def test_from_documents_with_key_ids():
    """document_ids_k: Sq != Sk (e.g. a chunk of queries over a longer key cache)."""
    dq = torch.tensor([0] * 70 + [1] * 5 + [2] * 130)
    dk = torch.tensor([0] * 100 + [1] * 1 + [2] * 200)
    for causal in (False, True):
        bm = trous.BlockMask.from_documents(dq, document_ids_k=dk, causal=causal, block_size=64)
        i, j = torch.arange(dq.numel())[:, None], torch.arange(dk.numel())[None, :]
        dense = (dq[:, None] == dk[None, :]) & ((j <= i) if causal else True)
        assert bm.seq_lengths == (205, 301) and torch.equal(bm.materialize()[0, 0], dense)


# -- bad input: ValueError naming the argument, before any kernel runs -----------------------------


def _branchy(b, h, q, kv):
    if q > kv:  # Python control flow on a tensor
        return torch.tensor(True)
    return torch.tensor(False)


class _NoKernel:
    def __getattr__(self, name):
        raise AssertionError(f"a kernel ran: torch.ops.trous.{name}")


def test_flex_block_size_not_a_multiple_of_64():
    def causal(b, h, q, kv):
        return q >= kv

    for bs in (32, (64, 96), (192, 32)):
        fbm = create_block_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=bs)
        with pytest.raises(ValueError, match=r"block_size must be .*multiples of 64, got \(\d+, \d+\)"):
            trous.BlockMask.from_flex(fbm)


def test_mask_mod_with_control_flow_names_mask_mod():
    num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32)
    fbm = FlexBlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=64, mask_mod=_branchy, seq_lengths=(100, 90))
    with pytest.raises(ValueError, match="mask_mod could not be evaluated.*partial_masks"):
        trous.BlockMask.from_flex(fbm)
    with pytest.raises(ValueError, match="mask_mod could not be evaluated"):
        trous.BlockMask.from_mask_mod(_branchy, 1, 1, 100, 90, block_size=64)
    with pytest.raises(ValueError, match="mask_mod must return a bool tensor, got torch.int64"):
        trous.BlockMask.from_mask_mod(lambda b, h, q, kv: q - kv, 1, 1, 100, 90, block_size=64)
    # partial_masks replace the mask_mod: the same Flex mask converts.
    pm = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) < 0.5
    assert trous.BlockMask.from_flex(fbm, partial_masks=pm).seq_lengths == (100, 90)


def test_flex_mask_passed_straight_to_sparse_attention(monkeypatch):
    fbm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 130, 130, device="cpu", BLOCK_SIZE=64)
    q, k, v, _ = _qkv(1, 2, 130, 130, seed=3)
    monkeypatch.setattr(sparse_mod, "_ops", _NoKernel())
    with pytest.raises(ValueError, match=r"block_mask must be a trous.BlockMask.*BlockMask.from_flex"):
        trous.sparse_attention(q, k, v, block_mask=fbm)
    cu = torch.tensor([0, 60, 130], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_mask must be a trous.BlockMask.*BlockMask.from_flex"):
        trous.sparse_attention_varlen(q[0], k[0], v[0], cu, cu, 70, 70, block_mask=fbm)
    with pytest.raises(ValueError, match="expected a FlexAttention BlockMask"):
        trous.BlockMask.from_flex(torch.ones(2, 2, dtype=torch.bool))
    # A trous mask for other lengths, also before any kernel.
    bm = trous.BlockMask.from_flex(create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 130, 129,
                                                     device="cpu", BLOCK_SIZE=64))
    with pytest.raises(ValueError, match=r"block_mask is for \(Sq, Sk\) = \(130, 129\), the call has \(130, 130\)"):
        trous.sparse_attention(q, k, v, block_mask=bm)


def _ok():
    """A valid BCSR (Sq, Sk) = (150, 200), block 64: nqb 3, nkb 4."""
    num = torch.tensor([[[1, 1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 3, 3, 3], [2, 3, 3, 3], [1, 3, 3, 3]]]], dtype=torch.int32)
    fnum = torch.tensor([[[1, 1, 0]]], dtype=torch.int32)
    fidx = torch.tensor([[[[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]]], dtype=torch.int32)
    return num, idx, fnum, fidx


def _with(t, where, value):
    t = t.clone()
    t[where] = value
    return t


BAD_BCSR = {
    "index >= nkb": (lambda n, i, fn, fi: (n, _with(i, (0, 0, 1, 0), 4), fn, fi), r"kv_indices must be in \[0, nkb\)"),
    "negative index": (lambda n, i, fn, fi: (n, i, fn, _with(fi, (0, 0, 0, 0), -1)),
                       r"full_kv_indices must be in \[0, nkb\)"),
    "unsorted": (lambda n, i, fn, fi: (n, _with(i, (0, 0, 2, 1), 0), fn, fi), "strictly increasing"),
    "repeated": (lambda n, i, fn, fi: (n, _with(i, (0, 0, 2, 1), 1), fn, fi), "strictly increasing"),
    "partial and full": (lambda n, i, fn, fi: (n, _with(i, (0, 0, 0, 0), 1), fn, fi), "listed twice"),
    "count > K": (lambda n, i, fn, fi: (_with(n, (0, 0, 0), 5), i, fn, fi), r"kv_num_blocks must be in \[0, "),
    "negative count": (lambda n, i, fn, fi: (n, i, _with(fn, (0, 0, 1), -1), fi), "full_kv_num_blocks must be in"),
    "nqb mismatch": (lambda n, i, fn, fi: (n[..., :2], i[..., :2, :], fn, fi), r"nqb = ceil\(Sq / block_q\) = 3"),
    "3-D indices": (lambda n, i, fn, fi: (n, i[0], fn, fi), "kv_indices must be an int32 tensor of 4 dimensions"),
    "float counts": (lambda n, i, fn, fi: (n.float(), i, fn, fi), "kv_num_blocks must be an int32 tensor"),
    "full (Bm, Hm) differ": (lambda n, i, fn, fi: (n, i, fn.expand(1, 2, 3), fi.expand(1, 2, 3, 4)),
                             r"full_kv_num_blocks must have the \(Bm, Hm\) = \(1, 1\)"),
    "full without indices": (lambda n, i, fn, fi: (n, i, fn, None), "pass both full_kv_num_blocks and full_kv_indices"),
}


@pytest.mark.parametrize("name", list(BAD_BCSR))
def test_bad_bcsr_raises(name, monkeypatch):
    num, idx, fnum, fidx = _ok()
    assert trous.BlockMask(num, idx, fnum, fidx, seq_lengths=(150, 200), block_size=64).count() > 0
    make, message = BAD_BCSR[name]
    args = make(num, idx, fnum, fidx)
    monkeypatch.setattr(sparse_mod, "_ops", _NoKernel())
    with pytest.raises(ValueError, match=message):
        trous.BlockMask(*args, seq_lengths=(150, 200), block_size=64)
    # The same through FlexAttention's BlockMask (from_kv_blocks does not check its lists).
    if name not in ("3-D indices", "float counts", "full without indices", "nqb mismatch", "full (Bm, Hm) differ"):
        n, i, fn, fi = args
        fbm = FlexBlockMask.from_kv_blocks(n, i, fn, fi, BLOCK_SIZE=64, seq_lengths=(150, 200),
                                           compute_q_blocks=False)
        with pytest.raises(ValueError, match=message):
            trous.BlockMask.from_flex(fbm)


def test_bad_partial_masks_and_block_shapes():
    num, idx, fnum, fidx = _ok()
    good = torch.ones(4, 64, 64, dtype=torch.bool)
    for bad, got in ((good[:3], r"\[3, 64, 64\]"), (good.float(), "torch.float32"), (good[:, :32], r"\[4, 32, 64\]")):
        with pytest.raises(ValueError, match=rf"partial_masks must be bool of shape .* = \(4, 64, 64\).*got .*{got}"):
            trous.BlockMask(num, idx, fnum, fidx, seq_lengths=(150, 200), block_size=64, partial_masks=bad)
    with pytest.raises(ValueError, match="pass mask_mod or partial_masks, not both"):
        trous.BlockMask(num, idx, seq_lengths=(150, 200), block_size=64, partial_masks=good,
                        mask_mod=lambda b, h, q, kv: q >= kv)
    with pytest.raises(ValueError, match="seq_lengths must be"):
        trous.BlockMask(num, idx, seq_lengths=(150,), block_size=64)
    # A mask whose head count fits neither 1 nor Hq: named by the op's check (no kernel runs).
    bm = trous.BlockMask(num.expand(1, 2, 3), idx.expand(1, 2, 3, 4), seq_lengths=(150, 200), block_size=64)
    q, k, v, _ = _qkv(1, 3, 150, 200, seed=2)
    with pytest.raises(ValueError, match="block mask head count must be 1 or Hq = 3"):
        trous.sparse_attention(q, k, v, block_mask=bm)


def test_bad_document_ids():
    with pytest.raises(ValueError, match="non-decreasing"):
        trous.BlockMask.from_documents(torch.tensor([0, 0, 1, 0]))
    with pytest.raises(ValueError, match="document_ids must be a 1-D integer tensor"):
        trous.BlockMask.from_documents(torch.zeros(10))
    with pytest.raises(ValueError, match="document_ids_k must be a 1-D integer tensor"):
        trous.BlockMask.from_documents(torch.zeros(10, dtype=torch.int64), document_ids_k=torch.zeros(2, 5).long())
    with pytest.raises(ValueError, match="block_size"):
        trous.BlockMask.from_documents(torch.zeros(10, dtype=torch.int64), block_size=100)
