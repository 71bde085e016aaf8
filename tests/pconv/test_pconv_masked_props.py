"""Property suite of the mask-aware partial convolution (tests/props.py): masked_partial_conv2d
(exact and nvidia modes; its fused epilogue ops masked_partial_epilogue, masked_partial_epilogue_ and
masked_partial_epilogue_backward), (1) a valid input (sizes with 0, 1 and odd values, every dtype,
mask kind and dtype, batch-broadcast masks, multi_channel, groups, stride, dilation, bias, NaN in x)
matches the float64 reference with NaN positions equal: a NaN in x reaches exactly the outputs whose
window covers it (exact mode: not those with S = 0, which are 0); fp16 / bf16 never give Inf or NaN
from the ratio; (2) an invalid input raises naming one of its arguments, on CPU and on meta alike;
(3) nothing crashes or hangs (extreme values in a subprocess).

Layouts: x of every layout of props.LAYOUTS except "overlapping" (the convolution reads it through
ATen); the epilogue ops take raw of any strides (it is made dense in its suggested memory format)."""
import pytest
import torch
import torch.nn.functional as F
from props import (
    assert_refused,
    assert_same_nan_and_close,
    given,
    layouts,
    run_isolated,
    settings,
    sizes,
    st,
    with_layout,
)

import trous  # noqa: F401
from trous.pconv import reference as ref
from trous.pconv.masked import masked_partial_conv2d

pytestmark = pytest.mark.props
ops = torch.ops.trous
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference(x, m, w, b, stride, padding, dilation, groups, mc, mode):
    """float64, from the spec's formulas (shared/spec/partial_conv.md section 2)."""
    x, w = x.double(), w.double()
    b = b.double() if b is not None else None
    if mode == "nvidia":
        mm = torch.ones(1, x.shape[1] if mc else 1, *x.shape[2:], dtype=torch.float64) if m is None else m.double()
        mm = mm.expand(x.shape[0], *mm.shape[1:])
        return ref.nvidia_partial_conv(x, mm if m is not None else None, w, b, stride, padding, dilation, groups,
                                       mc)[0]
    mm = torch.ones(1, x.shape[1] if mc else 1, *x.shape[2:], dtype=torch.float64) if m is None else m.double()
    raw = F.conv2d(x * mm if m is not None else x, w, None, stride, padding, dilation, groups)
    cin_g, cout_g = x.shape[1] // groups, w.shape[0] // groups
    out = torch.empty_like(raw)
    ones = torch.ones(1, 1, *w.shape[2:], dtype=torch.float64)
    for o in range(w.shape[0]):
        gi = o // cout_g
        msum = mm[:, gi * cin_g:(gi + 1) * cin_g].sum(1, keepdim=True) if mc else mm
        S = F.conv2d(msum, ones, None, stride, padding, dilation)[:, 0].expand(raw.shape[0], *raw.shape[2:])
        K = w.shape[2] * w.shape[3] * (cin_g if mc else 1)
        val = raw[:, o] * K / S.clamp_min(1e-300) + (b[o] if b is not None else 0)
        out[:, o] = torch.where(S > 0, val, torch.zeros_like(val))
    return out


@st.composite
def problems(draw, with_nan=True):
    N = draw(sizes(0, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    Cin = groups * draw(st.integers(1, 3))
    Cout = groups * draw(st.integers(1, 3))
    H, W = draw(sizes(1, 9)), draw(sizes(1, 9))
    k = draw(st.sampled_from([1, 3, 5]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = dilation * (k // 2)
    mc = draw(st.booleans())
    mode = draw(st.sampled_from(["exact", "nvidia"]))
    if mode == "nvidia" and mc:
        groups, Cin, Cout = 1, Cin // groups, Cout  # the reference ignores groups in its mask sum
        Cout = max(Cout, 1)
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    x = torch.randn(N, Cin, H, W, generator=g)
    if with_nan and x.numel():
        x.view(-1)[torch.rand(x.numel(), generator=g) < 0.04] = float("nan")
    w = torch.randn(Cout, Cin // groups, k, k, generator=g) / (Cin * k * k / groups) ** 0.5
    b = torch.randn(Cout, generator=g) if draw(st.booleans()) else None
    kind = draw(st.sampled_from(["random", "all_hole", "no_hole", "soft", "none"]))
    mN = draw(st.sampled_from([1, N])) if N else 1
    mshape = (mN, Cin if mc else 1, H, W)
    m = {"random": (torch.rand(mshape, generator=g) > 0.3).float(), "all_hole": torch.zeros(mshape),
         "no_hole": torch.ones(mshape), "soft": torch.rand(mshape, generator=g), "none": None}[kind]
    if m is not None and kind != "soft":
        m = m.to(draw(st.sampled_from([torch.bool, torch.uint8, dtype])))
    elif m is not None:
        m = m.to(dtype)
    layout = draw(layouts(("contiguous", "transposed", "sliced", "channels_last", "expanded")))
    x = with_layout(x.to(dtype), layout)
    return dict(x=x, m=m, w=w.to(dtype), b=None if b is None else b.to(dtype), stride=stride, padding=padding,
                dilation=dilation, groups=groups, mc=mc, mode=mode)


def _call(p):
    return masked_partial_conv2d(p["x"], p["m"], p["w"], p["b"], p["stride"], p["padding"], p["dilation"],
                                 p["groups"], multi_channel=p["mc"], mode=p["mode"])


@settings(max_examples=50, deadline=None)
@given(problems())
def test_valid_input_matches_reference_with_nan_positions(p):
    out, new = _call(p)
    want = reference(p["x"], p["m"], p["w"], p["b"], p["stride"], p["padding"], p["dilation"], p["groups"], p["mc"],
                     p["mode"])
    dt = p["x"].dtype
    scale = max(1.0, float(want[torch.isfinite(want)].abs().max())) if torch.isfinite(want).any() else 1.0
    assert out.dtype == dt and new.dtype == dt
    assert_same_nan_and_close(out.double(), want, 2 * RTOL[dt], 4 * RTOL[dt] * scale)
    # No Inf ever (the ratio is fp32; x has no Inf here) and the new mask is in [0, 1], never NaN.
    assert not torch.isinf(out).any()
    assert bool(((new >= 0) & (new <= 1)).all())


@settings(max_examples=25, deadline=None)
@given(problems(with_nan=False))
def test_gradients_match_the_reference(p):
    x = p["x"].detach().clone().requires_grad_()
    w = p["w"].detach().clone().requires_grad_()
    b = None if p["b"] is None else p["b"].detach().clone().requires_grad_()
    out, _ = masked_partial_conv2d(x, p["m"], w, b, p["stride"], p["padding"], p["dilation"], p["groups"],
                                   multi_channel=p["mc"], mode=p["mode"])
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    got = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], go)
    x64 = p["x"].detach().double().requires_grad_()
    w64 = p["w"].detach().double().requires_grad_()
    b64 = None if p["b"] is None else p["b"].detach().double().requires_grad_()
    want_out = reference(x64, p["m"], w64, b64, p["stride"], p["padding"], p["dilation"], p["groups"], p["mc"],
                         p["mode"])
    want = torch.autograd.grad(want_out, [t for t in (x64, w64, b64) if t is not None], go.double())
    dt = p["x"].dtype
    for a, r in zip(got, want):
        scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
        assert_same_nan_and_close(a.double(), r, 4 * RTOL[dt], 8 * RTOL[dt] * scale)


@st.composite
def bad_calls(draw):
    N, C, H, W = draw(sizes(1, 3)), draw(st.integers(1, 6)), draw(sizes(1, 5)), draw(sizes(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    raw = torch.randn(N, C, H, W).to(dtype)
    S = torch.rand(draw(st.sampled_from([1, N])), 1, H, W) * 9
    b = torch.randn(C).to(dtype)
    kind = draw(st.sampled_from(["raw_rank", "raw_int", "S_dtype", "S_rank", "S_batch", "S_groups", "S_spatial",
                                 "bias_shape", "bias_dtype", "K", "mode", "grad_out_rank", "bwd_S_spatial"]))
    op = draw(st.sampled_from([ops.masked_partial_epilogue, ops.masked_partial_epilogue_]))
    args = [raw, S, b, 9.0, "exact"]
    names = []
    if kind == "raw_rank":
        args[0], names = raw.reshape(-1, 1), ["raw"]
    elif kind == "raw_int":
        args[0], names = raw.to(torch.int32), ["raw"]
    elif kind == "S_dtype":
        args[1], names = S.to(dtype if dtype != torch.float32 else torch.float64), ["S"]
    elif kind == "S_rank":
        args[1], names = S[:, 0], ["S"]
    elif kind == "S_batch":
        args[1], names = torch.rand(N + 1, 1, H, W), ["S"]
    elif kind == "S_groups":
        args[1], names = torch.rand(1, C + 1, H, W), ["S"]
    elif kind == "S_spatial":
        args[1], names = torch.rand(1, 1, H + 1, W), ["S"]
    elif kind == "bias_shape":
        args[2], names = torch.randn(C + 1).to(dtype), ["bias"]
    elif kind == "bias_dtype":
        args[2], names = b.to(torch.float64), ["bias"]
    elif kind == "K":
        args[3], names = draw(st.sampled_from([0.0, -1.0])), ["K"]
    elif kind == "mode":
        args[4], names = draw(st.sampled_from(["", "Exact", "nvidia2"])), ["form"]
    elif kind == "grad_out_rank":
        op, args, names = ops.masked_partial_epilogue_backward, [raw.reshape(-1), S, 9.0, "exact", True], ["grad_out"]
    else:
        op, args, names = ops.masked_partial_epilogue_backward, [raw, torch.rand(1, 1, H, W + 2), 9.0, "nvidia",
                                                                 False], ["S"]
    if op is ops.masked_partial_epilogue_:
        args[0] = args[0].clone()
    return op, args, names


@settings(max_examples=60, deadline=None)
@given(bad_calls())
def test_invalid_input_refused_naming_an_argument_on_cpu_and_meta(call):
    op, args, names = call
    assert_refused(op, args, names=names)


def test_mixed_cpu_and_meta_names_the_stray_argument():
    raw, S, b = torch.randn(2, 3, 4, 4), torch.rand(1, 1, 4, 4), torch.randn(3)
    for i, name in ((1, "S"), (2, "bias")):
        args = [raw, S, b, 9.0, "exact"]
        args[i] = args[i].to("meta")
        with pytest.raises(RuntimeError, match=rf"{name} must be on the device of raw"):
            ops.masked_partial_epilogue(*args)
    with pytest.raises(RuntimeError, match="S must be on the device of grad_out"):
        ops.masked_partial_epilogue_backward(raw, S.to("meta"), 9.0, "exact", True)


def test_nothing_crashes_on_extreme_values():
    code = """
import torch, trous
ops = torch.ops.trous
for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    acc = torch.float64 if dt == torch.float64 else torch.float32
    for shape, Sshape in [((1, 1, 1, 1), (1, 1, 1, 1)), ((0, 3, 2, 2), (1, 1, 2, 2)), ((2, 4, 0, 3), (2, 2, 0, 3)),
                          ((1, 6, 3, 3), (1, 6, 3, 3))]:
        raw = torch.full(shape, 6e4).to(dt)
        for S in (torch.full(Sshape, 1e-30), torch.full(Sshape, -5.0), torch.full(Sshape, float("nan")),
                  torch.full(Sshape, 1e30), torch.full(Sshape, float("inf"))):
            for mode in ("exact", "nvidia"):
                out, m = ops.masked_partial_epilogue(raw, S.to(acc), None, 1e9, mode)
                assert out.shape == raw.shape and m.shape == S.shape
                g, gb = ops.masked_partial_epilogue_backward(raw, S.to(acc), 1e9, mode, True)
                assert g.shape == raw.shape and gb.shape == (shape[1],)
print("done")
"""
    r = run_isolated(code, timeout=120)
    assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
