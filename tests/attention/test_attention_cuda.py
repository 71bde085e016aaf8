"""The CUDA attention kernels with block-sparse layouts (trous.BlockMask) against the CPU op on the
same inputs (float16 / bfloat16 on CUDA, the same values upcast to float32 on CPU): out, lse and the
gradients for random layouts (none / full / partial blocks with random element masks, seeded; block
sizes 64 and 128; one table per (batch, head), per head or broadcast) AND-ed with causal, windows,
chunks, dilation and global tokens, GQA, Sq != Sk both ways, query blocks masked whole by the layout
(out 0, lse -inf), varlen with one layout per sequence, and a bitwise repeatable backward.
Skipped without a CUDA device (the GPU check runs them)."""
import pytest
import torch

import trous

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# name: ((B, Sq, Sk, Hq, Hkv, D), pattern keywords, (block_q, block_k), table batch Bm, table heads Hm)
CASES = {
    "dense, blocks 64, per (batch, head), GQA 2": ((2, 200, 200, 4, 2, 64), dict(), (64, 64), 2, 4),
    "causal, blocks 128x64, broadcast, Sq < Sk": ((1, 150, 260, 4, 2, 64), dict(causal=True), (128, 64), 1, 1),
    "window, blocks 64x128, per head, Sq > Sk": ((1, 270, 140, 2, 1, 64), dict(window=(48, 16)), (64, 128), 1, 2),
    "window + dilation 2": ((1, 220, 210, 2, 2, 64), dict(window=(30, 30), dilation=2), (64, 64), 1, 2),
    "global tokens + causal window": ((1, 200, 200, 2, 1, 64), dict(global_tokens=5, window=(16, 0), causal=True),
                                      (64, 64), 1, 2),
    "chunk + causal, D 128, blocks 128": ((1, 230, 230, 2, 2, 128), dict(chunk_size=96, causal=True), (128, 128), 1,
                                          1),
}


def random_block_mask(Bm, Hm, Sq, Sk, block_size, seed, p_none=0.3, p_full=0.3):
    """A seeded trous.BlockMask for (Sq, Sk) with table (Bm, Hm, nqb, nkb): each block none, full or
    partial (random element mask of density 1/2), the last query block empty (fully masked rows).
    Returns the mask and its dense bool form (Bm, Hm, Sq, Sk)."""
    bq, bk = block_size
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-Sq // bq), -(-Sk // bk)
    r = torch.rand(Bm, Hm, nqb, nkb, generator=g)
    state = torch.where(r < p_none, 0, torch.where(r < p_none + p_full, 1, 2))
    state[:, :, -1, :] = 0
    blocks = state.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :Sq, :Sk]
    dense = (blocks == 1) | ((blocks == 2) & (torch.rand(Bm, Hm, Sq, Sk, generator=g) < 0.5))
    return trous.BlockMask.from_dense(dense, block_size=block_size), dense


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    go = torch.randn(B, Sq, Hq, D, generator=g).to(dtype)
    return q, k, v, go


def _run(fn, device, dtype, tensors):
    """out, lse and (dq, dk, dv) of fn(q, k, v) -> (out, lse) on `device` in `dtype`, from grad_out."""
    q, k, v, go = (t.to(device=device, dtype=dtype) for t in tensors)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, go)
    return out.detach(), lse.detach(), grads


def _close(got, want, atol, what):
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=atol, atol=atol, msg=lambda m: f"{what}: {m}")


def compare(name, dtype, device="cuda"):
    """CUDA (or `device`) in dtype against the CPU op in float32 on the same values."""
    shape, pattern, bs, Bm, Hm = CASES[name]
    B, Sq, Sk, Hq, Hkv, D = shape
    bm, _ = random_block_mask(Bm, Hm, Sq, Sk, bs, seed=list(CASES).index(name) + 1)
    tensors = [t.to(dtype) for t in _inputs(*shape, dtype, seed=7)]
    fn_cpu = lambda q, k, v: trous.sparse_attention(q, k, v, block_mask=bm, return_lse=True, **pattern)  # noqa: E731
    bm_dev = bm.to(device)
    fn_dev = lambda q, k, v: trous.sparse_attention(q, k, v, block_mask=bm_dev, return_lse=True,  # noqa: E731
                                                    **pattern)
    want, wlse, wg = _run(fn_cpu, "cpu", torch.float32, tensors)
    got, glse, gg = _run(fn_dev, device, dtype, tensors)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    _close(got, want, tol, "out")
    masked = torch.isinf(wlse)
    assert bool(masked.any()), "the layout masks whole rows"
    assert torch.equal(torch.isinf(glse).cpu(), masked), "fully masked rows: lse -inf exactly there"
    _close(glse[~masked.to(glse.device)], wlse[~masked], tol, "lse")
    assert bool((got.cpu()[masked.transpose(1, 2)] == 0).all()), "fully masked rows: out 0"
    for what, a, b in zip(("dq", "dk", "dv"), gg, wg):
        _close(a, b, 2.5 * tol, what)
    # the layout matters: without it the output differs
    plain = trous.sparse_attention(*(t.to(device) for t in tensors[:3]), **pattern)
    assert not torch.allclose(plain.cpu().float(), got.cpu().float(), atol=10 * tol)
    return gg


@needs_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_block_mask_matches_cpu(name):
    compare(name, torch.float16)


@needs_cuda
@pytest.mark.parametrize("name", ["dense, blocks 64, per (batch, head), GQA 2", "global tokens + causal window"])
def test_cuda_block_mask_bf16_matches_cpu_and_repeats_bitwise(name):
    g1 = compare(name, torch.bfloat16)
    g2 = compare(name, torch.bfloat16)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), "the CUDA backward is bitwise deterministic"


def compare_varlen(dtype, device="cuda"):
    """Packed sequences with a layout per sequence (table batch = B), causal, on `device` in dtype
    against the CPU op in float32."""
    lengths = [(130, 130), (0, 0), (70, 200), (200, 90), (1, 1)]
    Hq, Hkv, D = 4, 2, 64
    g = torch.Generator().manual_seed(3)
    tq, tk = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q, k, v, go = (torch.randn(n, h, D, generator=g).half() for n, h in ((tq, Hq), (tk, Hkv), (tk, Hkv), (tq, Hq)))
    cu_q = torch.tensor([0] + torch.tensor([a for a, _ in lengths]).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor([b for _, b in lengths]).cumsum(0).tolist(), dtype=torch.int32)
    mq, mk = max(a for a, _ in lengths), max(b for _, b in lengths)
    bm, _ = random_block_mask(len(lengths), Hq, mq, mk, (64, 64), seed=5)

    def fn(device, dtype):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
        mask = bm.to(device)
        out = trous.sparse_attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), mq, mk, causal=True,
                                            block_mask=mask)
        return out.detach(), torch.autograd.grad(out, leaves, go.to(device=device, dtype=dtype))

    want, wg = fn("cpu", torch.float32)
    got, gg = fn(device, dtype)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    _close(got, want, tol, "out")
    for what, a, b in zip(("dq", "dk", "dv"), gg, wg):
        _close(a, b, 2.5 * tol, what)


@needs_cuda
def test_cuda_varlen_block_mask_matches_cpu():
    compare_varlen(torch.float16)
