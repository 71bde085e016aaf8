"""Property-based tests of trous.sparse_attention (tests/props.py): (1) random patterns (causal,
windows with -1, chunks, dilation, global counts and flags), odd sizes (empty lengths, 1s), GQA,
layouts (slices of a fused QKV, transposed last dims), fp32 and bf16 match the fp64 reference, and a
NaN injected into one query row stays in that row; (2) an invalid input raises naming its argument,
on CPU and on meta alike; (3) nothing crashes on extreme pattern values (a subprocess)."""
import pytest
import torch
from props import assert_refused, assert_same_nan_and_close, given, run_isolated, sizes, st

import trous
from trous.attention import reference as ref
from trous.attention.pattern import AttentionPattern

pytestmark = pytest.mark.props


@st.composite
def patterns(draw, Sk):
    side = st.one_of(st.just(-1), st.integers(0, 6))
    g = draw(st.sampled_from(["none", "count", "flags"]))
    if g == "count":
        glob = draw(st.integers(0, Sk + 2))
    elif g == "flags":
        glob = draw(st.lists(st.booleans(), min_size=Sk, max_size=Sk))
    else:
        glob = None
    return AttentionPattern(causal=draw(st.booleans()), window=(draw(side), draw(side)),
                            chunk_size=draw(st.sampled_from([0, 0, 1, 3, 8, 50])), dilation=draw(st.integers(1, 4)),
                            global_tokens=glob)


def _layout(t, kind):
    if kind == "fused":  # a slice of a (B, S, 3, H, D) tensor
        wide = torch.empty(t.shape[0], t.shape[1], 3, t.shape[2], t.shape[3], dtype=t.dtype)
        wide[:, :, 1] = t
        return wide[:, :, 1]
    if kind == "transposed":  # last dim not contiguous: the op layer copies
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@st.composite
def attention_inputs(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    B, Sq, Sk = draw(sizes(0, 2)), draw(sizes(0, 23)), draw(sizes(0, 23))
    Hkv = draw(sizes(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    D = draw(st.sampled_from([32, 40, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
    if draw(st.booleans()) and q.numel():
        b, i, h = (draw(st.integers(0, n - 1)) for n in (B, Sq, Hq))
        q[b, i, h, draw(st.integers(0, D - 1))] = float("nan")
    layouts = ("contiguous", "fused", "transposed")
    q, k, v = (_layout(t, draw(st.sampled_from(layouts))) for t in (q, k, v))
    return dict(q=q, k=k, v=v, pattern=draw(patterns(Sk)), softcap=draw(st.sampled_from([0.0, 0.0, 2.5])))


@given(attention_inputs())
def test_matches_reference_nan_stays_in_its_row(c):
    q, k, v, p = c["q"], c["k"], c["v"], c["pattern"]
    out, lse = trous.sparse_attention(q, k, v, pattern=p, softcap=c["softcap"], return_lse=True)
    rout, rlse = ref.attention(q.double(), k.double(), v.double(), p, softcap=c["softcap"])
    tol = 3e-4 if q.dtype == torch.float32 else 3e-2
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_same_nan_and_close(out, rout, rtol=tol, atol=tol)
    assert_same_nan_and_close(lse, rlse, rtol=tol, atol=tol)
    nan_rows = q.isnan().any(-1)  # (B, Sq, Hq)
    mask = p.materialize(q.shape[1], k.shape[1])
    reached = nan_rows & mask.any(1)[None, :, None]  # a fully masked row ignores its NaN query
    assert torch.equal(out.isnan().any(-1), reached)


@st.composite
def bad_inputs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    B, Sq, Sk, Hkv, D = draw(sizes(1, 2)), draw(sizes(1, 9)), draw(sizes(1, 9)), draw(sizes(1, 2)), 32
    Hq = 2 * Hkv
    q, k, v = torch.randn(B, Sq, Hq, D, generator=g), torch.randn(B, Sk, Hkv, D, generator=g), \
        torch.randn(B, Sk, Hkv, D, generator=g)
    kwargs = {}
    what = draw(st.sampled_from(["heads", "dim", "dtype", "window", "chunk", "dilation", "flags", "count",
                                 "pattern", "scale", "softcap", "vshape"]))
    if what == "heads":
        k = torch.randn(B, Sk, Hq + 1, D, generator=g)
        v = torch.randn(B, Sk, Hq + 1, D, generator=g)
        names = ["k", "q"]
    elif what == "dim":
        d = draw(st.sampled_from([8, 20, 33, 264]))
        q, k, v = (torch.randn(*t.shape[:3], d, generator=g) for t in (q, k, v))
        names = ["q"]
    elif what == "dtype":
        which = draw(st.sampled_from(["k", "v"]))
        if which == "k":
            k = k.bfloat16()
        else:
            v = v.bfloat16()
        names = [which]
    elif what == "window":
        kwargs["window"] = (draw(st.integers(-50, -2)), draw(st.integers(-1, 5)))[::draw(st.sampled_from([1, -1]))]
        names = ["window"]
    elif what == "chunk":
        kwargs["chunk_size"] = draw(st.integers(-50, -1))
        names = ["chunk_size"]
    elif what == "dilation":
        kwargs["dilation"] = draw(st.integers(-5, 0))
        names = ["dilation"]
    elif what == "flags":
        n = draw(st.integers(0, 12).filter(lambda n: n != Sk))
        kwargs["global_tokens"] = torch.ones(n, dtype=torch.bool)
        names = ["global_tokens"]
    elif what == "count":
        kwargs["global_tokens"] = draw(st.integers(-9, -1))
        names = ["global_tokens"]
    elif what == "pattern":
        kwargs.update(pattern=AttentionPattern(causal=True), chunk_size=draw(st.integers(1, 5)))
        names = ["pattern"]
    elif what == "scale":
        kwargs["scale"] = draw(st.sampled_from([0.0, -1.0, float("inf"), float("nan")]))
        names = ["scale"]
    elif what == "softcap":
        kwargs["softcap"] = draw(st.sampled_from([-1.0, float("inf"), float("nan")]))
        names = ["softcap"]
    else:
        v = torch.randn(B, Sk + 1, Hkv, D, generator=g)
        names = ["v"]
    return (q, k, v), kwargs, names


@given(bad_inputs())
def test_invalid_input_names_its_argument_on_cpu_and_meta(case):
    args, kwargs, names = case
    assert_refused(trous.sparse_attention, args, kwargs, names)


def test_extreme_pattern_values_do_not_crash():
    """Windows, chunks and dilations far beyond the lengths (products near 2^62) behave like their
    unbounded forms; run in a subprocess so that a crash fails this test only."""
    code = """
import torch, trous
from trous.attention import reference as ref
from trous.attention.pattern import AttentionPattern
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 13, 2, 32, generator=g) for _ in range(3))
for kw in [dict(window=(2**40, 2**40)), dict(window=(2**31, 0), dilation=2**20), dict(chunk_size=2**62),
           dict(window=(2**62, 2**62)), dict(dilation=2**40, window=(3, 3)), dict(global_tokens=2**62)]:
    p = AttentionPattern(**kw)
    out = trous.sparse_attention(q, k, v, pattern=p)
    want, _ = ref.attention(q.double(), k.double(), v.double(), p)
    err = (out.double() - want).abs().max().item()
    assert err < 1e-4, (kw, err)
print("ok")
"""
    p = run_isolated(code, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr
