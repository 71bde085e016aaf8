"""Block-sparse layouts (trous.BlockMask, ``block_mask=``) on the CPU kernels: random layouts (seeded,
varying density, query blocks with no key block, all full), partial blocks with random element
masks, per-(batch, head) and broadcast tables, GQA, Sq != Sk both ways, odd lengths, every closed-form
pattern AND-ed on top, softcap, bf16, varlen with block masks, deterministic gradients, opcheck, and
every refusal (bad BCSR, wrong shape / block size / lengths, out-of-range states) before any kernel.

The oracle mask is written here from the random block states and element masks (never from the
kernels' block_ok or BlockMask.materialize), AND-ed with the spec mask of test_attention_cpu.ref_mask.
"""
import math

import pytest
import torch
from test_attention_cpu import close, ref_mask

import trous
from helpers import seeded
from trous.attention import reference as ref

OPS = torch.ops.trous


def random_layout(Bm, Hm, Sq, Sk, bq, bk, density, seed, empty_row=False):
    """(states (Bm, Hm, nqb, nkb) in {0 none, 1 full, 2 partial}, element bits (Bm, Hm, Sq, Sk), the
    dense oracle mask (Bm, Hm, Sq, Sk))."""
    g = seeded(seed)
    nqb, nkb = -(-Sq // bq), -(-Sk // bk)
    u = torch.rand(Bm, Hm, nqb, nkb, generator=g)
    states = torch.where(u < density / 2, 1, torch.where(u < density, 2, 0))
    if empty_row:
        states[:, :, nqb // 2] = 0
    bits = torch.rand(Bm, Hm, Sq, Sk, generator=g) < 0.6
    dense_states = states.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :Sq, :Sk]
    return states, bits, (dense_states == 1) | ((dense_states == 2) & bits)


def bcsr_of(states, bits, bq, bk, seed):
    """FlexAttention's BCSR of the states (indices sorted, the unused tail of each row filled with
    noise) and the partial blocks' element masks in the order of the partial entries."""
    g = seeded(seed + 1)
    Bm, Hm, nqb, nkb = states.shape
    K = nkb + 1
    num_p = torch.zeros(Bm, Hm, nqb, dtype=torch.int32)
    num_f = torch.zeros_like(num_p)
    idx_p = torch.randint(-5, 50, (Bm, Hm, nqb, K), generator=g, dtype=torch.int32)
    idx_f = torch.randint(-5, 50, (Bm, Hm, nqb, K), generator=g, dtype=torch.int32)
    masks = []
    for b in range(Bm):
        for h in range(Hm):
            for qb in range(nqb):
                p = (states[b, h, qb] == 2).nonzero().flatten()
                f = (states[b, h, qb] == 1).nonzero().flatten()
                num_p[b, h, qb], num_f[b, h, qb] = p.numel(), f.numel()
                idx_p[b, h, qb, :p.numel()] = p.int()
                idx_f[b, h, qb, :f.numel()] = f.int()
                for kb in p.tolist():
                    blk = torch.zeros(bq, bk, dtype=torch.bool)
                    part = bits[b, h, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
                    blk[:part.shape[0], :part.shape[1]] = part
                    masks.append(blk)
    pm = torch.stack(masks) if masks else torch.zeros(0, bq, bk, dtype=torch.bool)
    return num_p, idx_p, num_f, idx_f, pm


def make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = seeded(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
            for s in ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D), (B, Sq, Hq, D))]


def check(q, k, v, go, bm, mask, rtol_out=1e-4, rtol_grad=3e-4, **kw):
    """sparse_attention(block_mask=bm, **kw) forward and backward against the fp64 reference on
    ``mask`` (B or 1, Hq or 1, Sq, Sk)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = trous.sparse_attention(*leaves, block_mask=bm, return_lse=True, **kw)
    grads = torch.autograd.grad(out, leaves, go)
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = ref.attention_from_mask(*r, mask, kw.get("scale"), kw.get("softcap", 0.0))
    rg = torch.autograd.grad(ro, r, go.double())
    assert not out.isnan().any()
    close(out, ro, rtol_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    if fin.any():
        close(lse[fin], rl[fin], 1e-5 if q.dtype == torch.float32 else 2e-2)
    for a, b in zip(grads, rg):
        assert not a.isnan().any()
        close(a, b, rtol_grad)


def test_bcsr_constructor_matches_the_states():
    states, bits, mask = random_layout(2, 3, 150, 200, 64, 64, 0.6, seed=1)
    num_p, idx_p, num_f, idx_f, pm = bcsr_of(states, bits, 64, 64, seed=1)
    bm = trous.BlockMask(num_p, idx_p, num_f, idx_f, seq_lengths=(150, 200), block_size=64, partial_masks=pm)
    assert bm.shape == (2, 3, 150, 200) and bm.block_size == (64, 64)
    assert torch.equal(bm.materialize(), mask)
    assert bm.count() == int(mask.sum())
    assert bm.density() == pytest.approx(mask.float().mean().item())
    # back to BCSR and again: the same mask
    again = trous.BlockMask(*bm.to_bcsr(), seq_lengths=(150, 200), block_size=64, partial_masks=bm.elems)
    assert torch.equal(again.materialize(), mask)
    # without element masks the partial blocks are computed whole (FlexAttention's no-op mask_mod)
    whole = trous.BlockMask(num_p, idx_p, num_f, idx_f, seq_lengths=(150, 200), block_size=64)
    dense_states = states.repeat_interleave(64, 2).repeat_interleave(64, 3)[:, :, :150, :200]
    assert torch.equal(whole.materialize(), dense_states > 0)


def test_partial_blocks_that_are_all_true_or_all_false_become_full_or_none():
    m = torch.zeros(130, 130, dtype=torch.bool)
    m[:64, :64] = True  # a whole block
    m[64:128, 64:70] = True  # a partial one
    bm = trous.BlockMask.from_dense(m, block_size=64)
    t = bm.table[0, 0]
    assert t[0, 0] == 1 and t[0, 1] == 0 and t[1, 0] == 0 and t[1, 1] >= 2 and t[2].eq(0).all()
    assert bm.elems.shape == (1, 64, 64)
    assert torch.equal(bm.materialize()[0, 0], m)


CASES = [  # (B, Hq, Hkv, Sq, Sk, Bm, Hm, block, density, empty_row)
    (1, 2, 2, 200, 200, 1, 2, 64, 0.5, False),
    (2, 4, 2, 150, 300, 2, 4, 64, 0.3, True),  # GQA, Sq < Sk, per-(batch, head) tables
    (2, 3, 1, 300, 130, 1, 1, 64, 0.7, False),  # MQA, Sq > Sk, one broadcast table
    (1, 2, 2, 257, 257, 1, 1, 128, 0.5, True),  # block 128, odd length
    (1, 2, 2, 190, 190, 1, 2, (64, 128), 0.5, False),  # block_q != block_k
    (1, 2, 1, 100, 100, 1, 1, 64, 1.0, False),  # dense layout: full and partial blocks only
    (1, 1, 1, 128, 128, 1, 1, 64, 0.05, True),  # nearly empty: most rows fully masked
]


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,Bm,Hm,block,density,empty_row", CASES)
def test_random_layouts_match_the_reference(B, Hq, Hkv, Sq, Sk, Bm, Hm, block, density, empty_row):
    bq, bk = (block, block) if isinstance(block, int) else block
    states, bits, mask = random_layout(Bm, Hm, Sq, Sk, bq, bk, density, seed=Sq + Hq, empty_row=empty_row)
    num_p, idx_p, num_f, idx_f, pm = bcsr_of(states, bits, bq, bk, seed=Sq)
    bm = trous.BlockMask(num_p, idx_p, num_f, idx_f, seq_lengths=(Sq, Sk), block_size=(bq, bk), partial_masks=pm)
    q, k, v, go = make_qkv(B, Sq, Sk, Hq, Hkv, 64, torch.float32, seed=Sk)
    check(q, k, v, go, bm, mask)


def test_all_full_layout_equals_dense_attention():
    layout = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    bm = trous.BlockMask.from_layout(layout, seq_lengths=(150, 170), block_size=64)
    q, k, v, go = make_qkv(1, 150, 170, 2, 2, 32, torch.float32, seed=3)
    a = trous.sparse_attention(q, k, v, block_mask=bm)
    b = trous.sparse_attention(q, k, v)
    close(a, b, 1e-6)


def test_empty_layout_gives_zero_output_minus_inf_lse_and_zero_gradients():
    bm = trous.BlockMask.from_layout(torch.zeros(1, 1, 2, 2, dtype=torch.bool), seq_lengths=(100, 100), block_size=64)
    q, k, v, go = make_qkv(1, 100, 100, 2, 2, 32, torch.float32, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = trous.sparse_attention(*leaves, block_mask=bm, return_lse=True)
    assert out.eq(0).all() and torch.isinf(lse).all() and (lse < 0).all()
    for g in torch.autograd.grad(out, leaves, go):
        assert g.eq(0).all()


PATTERNS = [
    dict(causal=True),
    dict(window=(40, 25)),
    dict(chunk_size=96, causal=True),
    dict(dilation=3, window=(20, 20)),
    dict(global_tokens=5, window=(16, 8)),
    dict(global_tokens=3, causal=True, dilation=2),
    dict(window=(60, 0), softcap=5.0),
]


@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("Sq,Sk", [(190, 190), (130, 250)])
def test_closed_form_patterns_are_anded_with_the_layout(kw, Sq, Sk):
    states, bits, mask = random_layout(1, 2, Sq, Sk, 64, 64, 0.6, seed=Sq + len(kw))
    bm = trous.BlockMask.from_dense(mask, block_size=64)
    pat = {k: v for k, v in kw.items() if k != "softcap"}
    flags = None
    if "global_tokens" in pat:
        flags = torch.zeros(Sk, dtype=torch.bool)
        flags[:pat["global_tokens"]] = True
    spec = ref_mask(Sq, Sk, pat.get("causal", False), pat.get("window", (-1, -1)), pat.get("chunk_size", 0),
                    pat.get("dilation", 1), flags)
    q, k, v, go = make_qkv(1, Sq, Sk, 2, 1, 64, torch.float32, seed=Sk)
    check(q, k, v, go, bm, mask & spec, **kw)


def test_bf16():
    states, bits, mask = random_layout(1, 2, 200, 200, 64, 64, 0.6, seed=7)
    bm = trous.BlockMask.from_dense(mask, block_size=64)
    q, k, v, go = make_qkv(1, 200, 200, 2, 2, 64, torch.bfloat16, seed=7)
    check(q, k, v, go, bm, mask & ref_mask(200, 200, window=(100, 100)), rtol_out=2e-2, rtol_grad=4e-2,
          window=(100, 100))


def test_deterministic_gradients_repeat_bitwise():
    states, bits, mask = random_layout(1, 4, 260, 260, 64, 64, 0.5, seed=8)
    bm = trous.BlockMask.from_dense(mask, block_size=64)
    q, k, v, go = make_qkv(1, 260, 260, 4, 2, 64, torch.float32, seed=8)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = trous.sparse_attention(*leaves, block_mask=bm, deterministic=True, causal=True)
        return torch.autograd.grad(out, leaves, go)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_varlen_with_block_masks(per_sequence):
    lengths = [(70, 90), (0, 5), (1, 1), (130, 130), (64, 40)]
    cu_q = torch.tensor([0] + [sum(a for a, _ in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(b for _, b in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    mq, mk = max(a for a, _ in lengths), max(b for _, b in lengths)
    Bm = len(lengths) if per_sequence else 1
    states, bits, mask = random_layout(Bm, 2, mq, mk, 64, 64, 0.7, seed=9)
    bm = trous.BlockMask.from_dense(mask, block_size=64)
    g = seeded(10)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, go = (torch.randn(tq, 2, 64, generator=g) for _ in range(2))
    k, v = (torch.randn(tk, 1, 64, generator=g) for _ in range(2))
    pat = trous.AttentionPattern(causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = trous.sparse_attention_varlen(*leaves, cu_q, cu_k, mq, mk, pattern=pat, block_mask=bm)
    grads = torch.autograd.grad(out, leaves, go)
    # reference: the packed mask, block-diagonal, each block the pattern AND the sequence's own layout
    full = torch.zeros(2, tq, tk, dtype=torch.bool)
    for b, (lq, lk) in enumerate(lengths):
        if lq and lk:
            qs, ks = int(cu_q[b]), int(cu_k[b])
            m = mask[b if per_sequence else 0][:, :lq, :lk] & pat.materialize(lq, lk)
            full[:, qs:qs + lq, ks:ks + lk] = m
    r = [t.detach().double().unsqueeze(0).requires_grad_() for t in (q, k, v)]
    ro, _ = ref.attention_from_mask(*r, full[None])
    rg = torch.autograd.grad(ro, r, go.double().unsqueeze(0))
    close(out, ro[0], 1e-4)
    for a, b in zip(grads, rg):
        close(a, b[0], 3e-4)


def test_opcheck():
    states, bits, mask = random_layout(1, 2, 140, 140, 64, 64, 0.6, seed=11)
    bm = trous.BlockMask.from_dense(mask, block_size=64)
    q, k, v, go = make_qkv(1, 140, 140, 2, 2, 32, torch.float32, seed=11)
    blocks = (bm.table, bm.elems, 64, 64)
    args = (q, k, v, None, True, -1, -1, 0, 1, 0.2, 0.0) + blocks
    torch.library.opcheck(OPS.sparse_attention_fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = OPS.sparse_attention_fwd(*args)
    torch.library.opcheck(OPS.sparse_attention_bwd, (go, q, k, v, out, lse, None, True, -1, -1, 0, 1, 0.2, 0.0, False)
                          + blocks, test_utils=("test_schema", "test_faketensor"))


# ---- refusals ----

def _bcsr_one(nqb=2, nkb=2, rows=((0,), (0, 1))):
    num = torch.tensor([[[len(r) for r in rows]]], dtype=torch.int32)
    idx = torch.zeros(1, 1, nqb, nkb, dtype=torch.int32)
    for qb, r in enumerate(rows):
        idx[0, 0, qb, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return num, idx


@pytest.mark.parametrize("change,match", [
    (dict(rows=((0,), (2,))), "kv_indices must be in \\[0, nkb\\)"),
    (dict(rows=((1, 0), (0,))), "strictly increasing"),
    (dict(rows=((0, 0), (0,))), "strictly increasing"),
    (dict(nqb=3), "nqb = ceil"),
])
def test_bad_bcsr_is_refused(change, match):
    num, idx = _bcsr_one(**change)
    with pytest.raises(ValueError, match=match):
        trous.BlockMask(num, idx, seq_lengths=(128, 128), block_size=64)


def test_bad_block_mask_arguments_are_refused():
    num, idx = _bcsr_one()
    with pytest.raises(ValueError, match="partial and full"):
        trous.BlockMask(num, idx, num, idx, seq_lengths=(128, 128), block_size=64)
    with pytest.raises(ValueError, match="block_size must be"):
        trous.BlockMask(num, idx, seq_lengths=(128, 128), block_size=32)
    with pytest.raises(ValueError, match="block_size must be"):
        trous.BlockMask(num, idx, seq_lengths=(128, 128), block_size=(64, 100))
    with pytest.raises(ValueError, match="kv_num_blocks must be in"):
        trous.BlockMask(num + 5, idx, seq_lengths=(128, 128), block_size=64)
    with pytest.raises(ValueError, match="partial_masks must be bool of shape"):
        trous.BlockMask(num, idx, seq_lengths=(128, 128), block_size=64, partial_masks=torch.ones(2, 64, 64))
    with pytest.raises(ValueError, match="mask_mod or partial_masks"):
        trous.BlockMask(num, idx, seq_lengths=(128, 128), block_size=64, mask_mod=lambda b, h, i, j: i >= j,
                        partial_masks=torch.ones(3, 64, 64, dtype=torch.bool))


def test_calls_with_a_mask_of_other_lengths_or_shapes_are_refused():
    bm = trous.BlockMask.from_layout(torch.ones(2, 3, 2, 2, dtype=torch.bool), seq_lengths=(128, 128), block_size=64)
    q, k, v, _ = make_qkv(2, 120, 128, 3, 3, 32, torch.float32, seed=12)
    with pytest.raises(ValueError, match="block_mask is for"):
        trous.sparse_attention(q, k, v, block_mask=bm)
    q, k, v, _ = make_qkv(1, 128, 128, 3, 3, 32, torch.float32, seed=12)
    with pytest.raises(ValueError, match="batch size must be 1 or B"):
        trous.sparse_attention(q, k, v, block_mask=bm)
    q, k, v, _ = make_qkv(2, 128, 128, 2, 2, 32, torch.float32, seed=12)
    with pytest.raises(ValueError, match="head count must be 1 or Hq"):
        trous.sparse_attention(q, k, v, block_mask=bm)
    with pytest.raises(ValueError, match="block_mask must be a trous.BlockMask"):
        trous.sparse_attention(q, k, v, block_mask=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_op_level_refusals_on_cpu_and_meta(device):
    q, k, v, _ = (t.to(device) for t in make_qkv(1, 128, 128, 2, 2, 32, torch.float32, seed=13))
    base = (q, k, v, None, False, -1, -1, 0, 1, 0.2, 0.0)
    table = torch.ones(1, 1, 2, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="block sizes must be positive multiples of 64"):
        OPS.sparse_attention_fwd(*base, table, None, 32, 64)
    with pytest.raises(ValueError, match="does not fit Sq = 128"):
        OPS.sparse_attention_fwd(*base, torch.ones(1, 1, 3, 2, dtype=torch.int32, device=device), None, 64, 64)
    with pytest.raises(ValueError, match="block_table must be int32"):
        OPS.sparse_attention_fwd(*base, table.long(), None, 64, 64)
    with pytest.raises(ValueError, match="block_elems must have shape"):
        OPS.sparse_attention_fwd(*base, table, torch.ones(1, 64, 32, dtype=torch.bool, device=device), 64, 64)
    with pytest.raises(ValueError, match="block_elems given without block_table"):
        OPS.sparse_attention_fwd(*base, None, torch.ones(1, 64, 64, dtype=torch.bool, device=device), 64, 64)


def test_out_of_range_states_are_refused_before_any_kernel():
    q, k, v, _ = make_qkv(1, 128, 128, 2, 2, 32, torch.float32, seed=14)
    base = (q, k, v, None, False, -1, -1, 0, 1, 1 / math.sqrt(32), 0.0)
    table = torch.ones(1, 1, 2, 2, dtype=torch.int32)
    table[0, 0, 1, 1] = 3  # partial block e = 1, but one element mask only
    with pytest.raises(ValueError, match="block_table states must be"):
        OPS.sparse_attention_fwd(*base, table, torch.ones(1, 64, 64, dtype=torch.bool), 64, 64)
    table[0, 0, 1, 1] = -1
    with pytest.raises(ValueError, match="block_table states must be"):
        OPS.sparse_attention_fwd(*base, table, None, 64, 64)
