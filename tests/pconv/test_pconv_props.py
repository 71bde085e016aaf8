"""Property suite of the partial-convolution family (tests/props.py): for channel_partial_conv2d
(out-of-place and in-place) and its backward, (1) a valid input (sizes with 0, 1 and odd values,
every layout, dtype, kernel size, dilation, route, NaN / +-Inf) matches the float64 reference with
NaN positions equal; (2) an invalid input raises naming one of its arguments, on CPU and on meta
alike; (3) nothing crashes or hangs (extreme parameters in a subprocess).

Layouts: the out-of-place op and the backward accept every layout of props.LAYOUTS (they only read
x); the in-place op refuses "expanded" / "overlapping" x (elements shared in memory) naming x."""
import pytest
import torch
from props import (
    assert_refused,
    assert_same_nan_and_close,
    given,
    layouts,
    nonfinite,
    run_isolated,
    settings,
    sizes,
    st,
    with_layout,
)

import trous  # noqa: F401
from trous.pconv import reference as ref

pytestmark = pytest.mark.props
ops = torch.ops.trous
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def problems(draw, with_nonfinite=True):
    N = draw(sizes(0, 3))
    C = draw(st.integers(1, 9))
    cp = draw(st.integers(1, C))
    H, W = draw(sizes(0, 9)), draw(sizes(0, 9))
    kh, kw = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3]))
    dil = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**20))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(cp, cp, kh, kw, generator=g) / (cp * kh * kw) ** 0.5
    if with_nonfinite:
        x = nonfinite(draw, x, p=0.05)
    layout = draw(layouts())
    if x.numel() == 0 and layout in ("expanded", "overlapping"):
        layout = "contiguous"  # props.with_layout narrows a size-0 dimension (reported)
    x = with_layout(x.to(dtype), layout)
    return x, w.to(dtype), dil, draw(st.sampled_from(["auto", "direct", "aten"]))


def _atol(x, w, dtype):
    return RTOL[dtype] * max(1.0, float(w.abs().sum()) if w.numel() else 1.0)


@settings(max_examples=40)
@given(problems())
def test_valid_input_matches_reference_with_nan_positions(p):
    x, w, dil, algo = p
    out = ops.channel_partial_conv2d(x, w, [1, 1], dil, algo)
    want = ref.channel_partial_conv2d(x, w, dil)
    assert_same_nan_and_close(out, want, RTOL[x.dtype], _atol(x, w, x.dtype))
    cp = w.shape[0]
    assert torch.equal(out[:, cp:].isnan(), x[:, cp:].isnan())
    same = out[:, cp:] == x[:, cp:]
    assert bool((same | x[:, cp:].isnan()).all()), "pass-through channels are copied exactly"


@settings(max_examples=25)
@given(problems())
def test_inplace_matches_reference_or_refuses_shared_memory(p):
    x, w, dil, algo = p
    want = ref.channel_partial_conv2d(x, w, dil)
    if x.numel() and torch._debug_has_internal_overlap(x) == 1:
        assert_refused(ops.channel_partial_conv2d_, (x, w, [1, 1], dil, algo), names=["x"])
        return
    y = x.clone()  # keeps transposed / channels_last strides
    ptr = y.data_ptr()
    assert ops.channel_partial_conv2d_(y, w, [1, 1], dil, algo) is None
    assert y.data_ptr() == ptr
    assert_same_nan_and_close(y, want, RTOL[x.dtype], _atol(x, w, x.dtype))


@settings(max_examples=20)
@given(problems(with_nonfinite=False))
def test_backward_matches_reference(p):
    x, w, dil, _ = p
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    gx, gw = ops.channel_partial_conv2d_backward(g, x, w, dil, [True, True])
    if x.numel() == 0:
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))
        return
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    cp = w.shape[0]
    outr = torch.cat([ref.cp_conv(xr[:, :cp], wr, dil), xr[:, cp:]], 1)
    rgx, rgw = torch.autograd.grad(outr, (xr, wr), g.double())
    assert_same_nan_and_close(gx, rgx, RTOL[x.dtype], _atol(x, w, x.dtype))
    scale = max(1.0, float(rgw.abs().max())) if rgw.numel() else 1.0
    assert_same_nan_and_close(gw, rgw, 2 * RTOL[x.dtype], 4 * RTOL[x.dtype] * scale)


@st.composite
def bad_calls(draw):
    x, w, dil, algo = draw(problems(with_nonfinite=False))
    C, cp = x.shape[1], w.shape[0]
    kind = draw(st.sampled_from(["stride", "dilation", "cp_gt_C", "cp_zero", "not_square", "even", "x_rank",
                                 "w_rank", "int", "dtype_mismatch", "algo", "grad_out_shape", "grad_out_dtype"]))
    args = [x, w, [1, 1], dil, algo]
    op = ops.channel_partial_conv2d
    names = []
    if kind == "stride":
        args[2], names = [draw(st.integers(2, 3)), 1] if draw(st.booleans()) else [1, 0], ["stride"]
    elif kind == "dilation":
        args[3], names = [0, 1] if draw(st.booleans()) else [1, -2], ["dilation"]
    elif kind == "cp_gt_C":
        args[1], names = torch.randn(C + 1, C + 1, 3, 3).to(x.dtype), ["cp", "weight"]
    elif kind == "cp_zero":
        args[1], names = torch.randn(0, 0, 3, 3).to(x.dtype), ["cp", "weight"]
    elif kind == "not_square":
        args[1], names = torch.randn(cp, cp + 1, 3, 3).to(x.dtype), ["weight"]
    elif kind == "even":
        args[1], names = torch.randn(cp, cp, 2, 3).to(x.dtype), ["weight"]
    elif kind == "x_rank":
        args[0], names = x.reshape(-1), ["x"]
    elif kind == "w_rank":
        args[1], names = w.reshape(cp, -1), ["weight"]
    elif kind == "int":
        args[0], args[1], names = x.to(torch.int32), w.to(torch.int32), ["x"]
    elif kind == "dtype_mismatch":
        other = torch.float32 if x.dtype != torch.float32 else torch.float16
        args[1], names = w.to(other), ["weight"]
    elif kind == "algo":
        args[4], names = draw(st.sampled_from(["", "cudnn", "AUTO"])), ["algo"]
    elif kind == "grad_out_shape":
        op = ops.channel_partial_conv2d_backward
        args = [torch.randn(x.shape[0], C, x.shape[2], x.shape[3] + 1).to(x.dtype), x, w, dil, [True, True]]
        names = ["grad_out"]
    else:
        op = ops.channel_partial_conv2d_backward
        other = torch.float32 if x.dtype != torch.float32 else torch.bfloat16
        args = [torch.randn(x.shape).to(other), x, w, dil, [True, True]]
        names = ["grad_out"]
    if draw(st.booleans()) and op is ops.channel_partial_conv2d:
        op = ops.channel_partial_conv2d_
        args[0] = args[0].clone()
    return op, args, names


@settings(max_examples=60)
@given(bad_calls())
def test_invalid_input_refused_naming_an_argument_on_cpu_and_meta(call):
    op, args, names = call
    assert_refused(op, args, names=names)


def test_nothing_crashes_on_extreme_parameters():
    code = """
import torch, trous
ops = torch.ops.trous
for algo in ("direct", "aten"):
    for shape, cp, k, d in [((1, 3, 1, 1), 3, (5, 5), (1000, 1000)), ((2, 1, 1, 200), 1, (1, 7), (1, 50)),
                            ((1, 4, 3, 3), 1, (9, 9), (3, 3)), ((0, 0, 0, 0), 1, (1, 1), (1, 1))]:
        x = torch.randn(shape)
        w = torch.randn(cp, cp, *k)
        try:
            y = ops.channel_partial_conv2d(x, w, [1, 1], list(d), algo)
            assert y.shape == x.shape
            ops.channel_partial_conv2d_backward(torch.ones_like(x), x, w, list(d), [True, True])
        except (RuntimeError, ValueError) as e:
            assert "trous.channel_partial_conv2d" in str(e), e
print("done")
"""
    r = run_isolated(code, timeout=120)
    assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
