"""The mask-aware partial convolution's reused scratch buffers (X * M in forward and its recomputation
in backward, grad_raw in backward; python/trous/pconv/masked.py ``_scratch``) and the op that writes
grad_raw into one (``masked_partial_epilogue_backward_into``): results bitwise equal to fresh buffers
in every layout / dtype / mode, several forwards before their backwards, threads, version checks."""
import threading

import pytest
import torch

import trous.pconv.masked as M
from trous.pconv.masked import masked_partial_conv2d, masked_partial_conv3d, release_scratch

ops = torch.ops.trous


@pytest.fixture
def scratch_always(monkeypatch):
    monkeypatch.setattr(M, "_WS_MIN_BYTES", 0)  # every CPU tensor goes through the scratch buffers
    release_scratch()
    yield
    release_scratch()


def _fresh(slot, like):
    return torch.empty_like(like)


def _case(seed, nd, dtype, fmt, mc, groups, stride, masked):
    g = torch.Generator().manual_seed(seed)
    N, C, O = 3, 4, 8
    sp = (9, 7) if nd == 2 else (5, 6, 3)
    x = torch.randn(N, C, *sp, generator=g).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = (torch.randn(O, C // groups, *([3] * nd), generator=g) / 3).to(dtype)
    b = torch.randn(O, generator=g).to(dtype)
    m = (torch.rand(N if seed % 2 else 1, C if mc else 1, *sp, generator=g) < 0.7).to(dtype) if masked else None
    return x, m, w, b


def _run(x, m, w, b, nd, mc, groups, stride, mode):
    fn = masked_partial_conv2d if nd == 2 else masked_partial_conv3d
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out, new_mask = fn(leaves[0], m, leaves[1], leaves[2], stride, 1, 1, groups, multi_channel=mc, mode=mode)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, new_mask) + torch.autograd.grad(out, leaves, go)


@pytest.mark.parametrize("nd,dtype,fmt", [(2, torch.float32, None), (2, torch.bfloat16, None),
                                           (2, torch.float32, torch.channels_last), (3, torch.float32, None),
                                           (3, torch.float16, torch.channels_last_3d)], ids=str)
@pytest.mark.parametrize("mc,groups,stride,masked,mode", [(False, 1, 1, True, "exact"), (True, 2, 2, True, "exact"),
                                                          (True, 1, 1, True, "nvidia"), (False, 1, 1, False, "exact")],
                         ids=str)
def test_scratch_equals_fresh_buffers(scratch_always, monkeypatch, nd, dtype, fmt, mc, groups, stride, masked, mode):
    args = _case(sum(map(ord, str((nd, dtype, fmt, mc)))), nd, dtype, fmt, mc, groups, stride, masked)
    got = _run(*args, nd, mc, groups, stride, mode)
    if masked:
        assert M._WS.bufs.get("xm") is not None and M._WS.bufs.get("graw") is not None
    monkeypatch.setattr(M, "_scratch", _fresh)
    want = _run(*args, nd, mc, groups, stride, mode)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_several_forwards_before_their_backwards(scratch_always, monkeypatch):
    """The scratch X * M of a forward is dead once its convolution has run: two forwards, then the
    two backwards in the reverse order, give each call's own gradients; the buffer is reused."""
    cases = [_case(s, 2, torch.float32, None, False, 1, 1, True) for s in (1, 2)]
    outs, leaves = [], []
    for x, m, w, b in cases:
        lv = [t.clone().requires_grad_() for t in (x, w, b)]
        outs.append(masked_partial_conv2d(lv[0], m, lv[1], lv[2], 1, 1, return_mask=False))
        leaves.append(lv)
    ptr = M._WS.bufs["xm"].data_ptr()
    got = [torch.autograd.grad(outs[i].sum(), leaves[i]) for i in (1, 0)][::-1]
    assert M._WS.bufs["xm"].data_ptr() == ptr  # reused, not reallocated
    monkeypatch.setattr(M, "_scratch", _fresh)
    for (x, m, w, b), g in zip(cases, got):
        lv = [t.clone().requires_grad_() for t in (x, w, b)]
        want = torch.autograd.grad(masked_partial_conv2d(lv[0], m, lv[1], lv[2], 1, 1, return_mask=False).sum(), lv)
        for a, e in zip(g, want):
            assert torch.equal(a, e)


def test_x_modified_in_place_before_backward_is_refused(scratch_always):
    """x (not a copy of X * M) is saved: changing it before backward raises, as for nn.Conv2d."""
    x, m, w, b = _case(3, 2, torch.float32, None, False, 1, 1, True)
    x.requires_grad_(False)
    w.requires_grad_()
    out = masked_partial_conv2d(x, m, w, b, 1, 1, return_mask=False)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_threads_have_their_own_buffers(scratch_always, monkeypatch):
    cases = [_case(10 + i, 2, torch.float32, None, True, 1, 1, True) for i in range(4)]
    results, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = _run(*cases[i], 2, True, 1, 1, "exact")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    monkeypatch.setattr(M, "_scratch", _fresh)
    for i in range(4):
        for a, e in zip(results[i], _run(*cases[i], 2, True, 1, 1, "exact")):
            assert torch.equal(a, e)


def test_small_tensors_and_release(monkeypatch):
    release_scratch()
    x, m, w, b = _case(4, 2, torch.float32, None, False, 1, 1, True)
    masked_partial_conv2d(x, m, w, b, 1, 1)
    assert not getattr(M._WS, "bufs", {})  # below _WS_MIN_BYTES: plain allocations
    monkeypatch.setattr(M, "_WS_MIN_BYTES", 0)
    masked_partial_conv2d(x, m, w, b, 1, 1)
    assert "xm" in M._WS.bufs
    release_scratch()
    assert not M._WS.bufs


def test_backward_into_op():
    g = torch.Generator().manual_seed(5)
    go = torch.randn(2, 6, 5, 4, generator=g)
    S = torch.randint(0, 10, (2, 1, 5, 4), generator=g).float()
    want_raw, want_b = ops.masked_partial_epilogue_backward(go, S, 9.0, "exact", True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        gof = go.contiguous(memory_format=fmt)
        out = torch.full_like(gof, float("nan"))
        gb = ops.masked_partial_epilogue_backward_into(gof, S, 9.0, "exact", True, out)
        assert torch.equal(out, want_raw)
        torch.testing.assert_close(gb, want_b)  # channels_last sums in another order
    torch.library.opcheck(ops.masked_partial_epilogue_backward_into, (go, S, 9.0, "nvidia", True, torch.empty_like(go)))
    bad = [(torch.empty(2, 6, 5, 3), "shape"), (torch.empty(2, 6, 5, 4, dtype=torch.float64), "dtype"),
           (torch.empty(2, 6, 5, 4).contiguous(memory_format=torch.channels_last), "contiguous"),
           (go, "overlap")]
    for t, what in bad:
        with pytest.raises(RuntimeError, match=f"grad_raw must .*{what}|grad_raw must not {what}"):
            ops.masked_partial_epilogue_backward_into(go, S, 9.0, "exact", True, t)
    with pytest.raises(RuntimeError, match="grad_raw"):
        ops.masked_partial_epilogue_backward_into(go.to("meta"), S.to("meta"), 9.0, "exact", True,
                                                  torch.empty(2, 6, 5, 3, device="meta"))
