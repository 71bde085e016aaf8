"""channel_partial_conv2d (FasterNet PConv): outputs and gradients against the float64 reference on
random, odd shapes, every dtype, both routes, contiguous / channels_last / strided inputs; the
in-place variant; NaN / Inf propagation; empty tensors; bad input (CPU and meta alike); opcheck;
torch.compile(dynamic=True); PConv2d and convert_fasternet against timm."""
import os

import pytest
import torch
import torch.nn.functional as F
from props import assert_refused, mixed_devices

import trous
from trous.pconv import PConv2d, channel_partial_conv2d, convert_fasternet
from trous.pconv import reference as ref

ops = torch.ops.trous
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
# (N, C, H, W, cp, (kh, kw), (dh, dw)): odd H and W, W not a multiple of 16, cp not of 4, cp == C.
SHAPES = [
    (2, 12, 9, 19, 3, (3, 3), (1, 1)),
    (1, 5, 7, 33, 5, (3, 3), (2, 1)),
    (3, 16, 6, 5, 4, (5, 3), (1, 2)),
    (1, 9, 11, 17, 2, (1, 1), (1, 1)),
    (2, 7, 4, 40, 7, (3, 5), (3, 2)),
]


def _make(shape, dtype, seed=0, layout="contiguous"):
    N, C, H, W, cp, (kh, kw), _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(cp, cp, kh, kw, generator=g, dtype=torch.float64) / (cp * kh * kw) ** 0.5
    x, w = x.to(dtype), w.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.empty(N, C, H, 2 * W, dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x, w


def _close(out, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("algo", ["direct", "aten", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
def test_forward_matches_reference(shape, dtype, algo, layout):
    x, w = _make(shape, dtype, seed=hash((shape, layout)) % 1000, layout=layout)
    dil = shape[6]
    out = channel_partial_conv2d(x, w, dilation=dil, algo=algo)
    want = ref.channel_partial_conv2d(x, w, dil)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, want, dtype)
    cp = shape[4]
    assert torch.equal(out[:, cp:], x[:, cp:]), "pass-through channels must be copied bit for bit"
    if layout in ("contiguous", "channels_last"):
        assert out.stride() == x.stride(), "the output keeps x's memory format"


@pytest.mark.parametrize("algo", ["direct", "aten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_matches_and_keeps_the_other_channels(dtype, algo):
    shape = SHAPES[0]
    x, w = _make(shape, dtype, seed=3)
    want = ref.channel_partial_conv2d(x, w, shape[6])
    y = x.clone()
    ptr = y.data_ptr()
    with torch.no_grad():
        r = channel_partial_conv2d(y, w, dilation=shape[6], inplace=True, algo=algo)
    assert r is y and y.data_ptr() == ptr
    _close(y, want, dtype)
    assert torch.equal(y[:, shape[4]:], x[:, shape[4]:])


def test_inplace_refused_when_autograd_needs_x():
    x, w = _make(SHAPES[0], torch.float32)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match=r"inplace=True.*x requires grad"):
        channel_partial_conv2d(x, w, inplace=True)
    # The registered op itself refuses too (its Autograd kernel), naming x.
    with pytest.raises(RuntimeError, match=r"channel_partial_conv2d_: x requires grad"):
        ops.channel_partial_conv2d_(x, w)
    with torch.no_grad():
        channel_partial_conv2d(x.detach().clone(), w, inplace=True)


@pytest.mark.parametrize("algo", ["direct", "aten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_gradients_match_reference(shape, dtype, algo):
    x, w = _make(shape, dtype, seed=5, layout="channels_last" if algo == "aten" else "contiguous")
    dil = shape[6]
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = channel_partial_conv2d(xl, wl, dilation=dil, algo=algo)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    gx, gw = torch.autograd.grad(out, (xl, wl), g)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    cp = shape[4]
    pad = (dil[0] * (w.shape[2] - 1) // 2, dil[1] * (w.shape[3] - 1) // 2)
    outr = torch.cat([F.conv2d(xr[:, :cp], wr, None, 1, pad, dil), xr[:, cp:]], 1)
    rgx, rgw = torch.autograd.grad(outr, (xr, wr), g.double())
    assert gx.dtype == dtype and gw.dtype == dtype
    _close(gx, rgx, dtype)
    _close(gw, rgw, dtype if dtype == torch.float32 else torch.bfloat16)
    assert torch.equal(gx[:, cp:], g[:, cp:])


def test_gradcheck_float64():
    x, w = _make((1, 6, 5, 7, 3, (3, 3), (2, 1)), torch.float64, seed=11)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: channel_partial_conv2d(a, b, dilation=(2, 1)), (x, w))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nan_and_inf_reach_only_their_window(dtype, layout):
    """Also in fp16 / bf16 and channels_last: oneDNN's bf16 convolution on AVX512-BF16 CPUs turns an
    Inf into NaN at its neighbours, so the "aten" route must not hand it half-precision inputs."""
    N, C, H, W, cp = 1, 8, 9, 11, 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.rand(cp, cp, 3, 3, generator=g) + 0.1  # positive: an Inf stays an Inf
    x[0, 1, 4, 5] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    x[0, 5, 2, 3] = float("nan")  # pass-through channel
    x[0, 6, 1, 1] = float("-inf")
    x, w = x.to(dtype), w.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for algo in ("direct", "aten"):
        out = channel_partial_conv2d(x, w, algo=algo)
        nan = out.isnan()
        want_nan = torch.zeros_like(nan)
        want_nan[0, :cp, 3:6, 4:7] = True
        want_nan[0, 5, 2, 3] = True
        assert torch.equal(nan, want_nan), algo
        inf = out.isinf()
        want_inf = torch.zeros_like(inf)
        want_inf[0, :cp, 0:2, 0:2] = True
        want_inf[0, 6, 1, 1] = True
        assert torch.equal(inf & ~nan, want_inf & ~want_nan), algo
        assert out[0, 6, 1, 1] == float("-inf") and bool((out[0, :cp, 0:2, 0:2] == float("inf")).all())


@pytest.mark.parametrize("case", ["props", "smoke"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_inf_in_a_row_kernel_matches_the_reference(dtype, case):
    """Two counterexamples found on an AVX512-BF16 CPU (Zen 4), where oneDNN's bf16 convolution with a
    1 x k kernel gave NaN next to an Inf or NaN input (for one -Inf: NaN at three outputs, one of them
    finite, two +-Inf in exact arithmetic): both routes must give the reference's NaN / Inf positions."""
    g = torch.Generator().manual_seed(7)
    if case == "props":  # the property test's shrunk example: C = cp = 1, (1, 3) kernel
        x = torch.randn(1, 1, 3, 5, generator=g)
        x[0, 0, 2, 2] = float("-inf")
        w, dilation = torch.randn(1, 1, 1, 3, generator=g) / 2, (1, 1)
    else:  # trous.smoke's case: cp = 5 of 8, (1, 5) kernel, dilation (1, 2), channels_last
        x = torch.randn(1, 8, 6, 33, generator=g)
        x.view(-1)[1], x.view(-1)[-2] = float("nan"), float("inf")
        w, dilation = torch.randn(5, 5, 1, 5, generator=g) / 5, (1, 2)
    x, w = x.to(dtype), w.to(dtype)
    want = ref.channel_partial_conv2d(x.double(), w.double(), dilation)
    for layout in ("contiguous", "channels_last"):
        xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for algo in ("direct", "aten"):
            out = channel_partial_conv2d(xl, w, dilation=dilation, algo=algo).double()
            assert torch.equal(out.isnan(), want.isnan()), (layout, algo)
            assert torch.equal(out.isinf(), want.isinf()) and torch.equal(out[out.isinf()], want[want.isinf()])
            finite = want.isfinite()
            torch.testing.assert_close(out[finite], want[finite], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("algo", ["direct", "aten"])
@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5), (2, 8, 5, 0)], ids=str)
def test_empty_inputs(shape, algo):
    x = torch.randn(shape)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    xl = x.clone().requires_grad_()
    out = channel_partial_conv2d(xl, w, algo=algo)
    assert out.shape == x.shape
    gx, gw = torch.autograd.grad(out, (xl, w), torch.ones_like(out))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))
    with torch.no_grad():
        assert channel_partial_conv2d(x.clone(), w, inplace=True, algo=algo).shape == x.shape


def _bad_cases():
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(2, 2, 3, 3)
    op = ops.channel_partial_conv2d
    return [
        ("stride", op, (x, w, [2, 2], [1, 1], "auto"), ["stride"]),
        ("dilation", op, (x, w, [1, 1], [0, 1], "auto"), ["dilation"]),
        ("cp > C", op, (x, torch.randn(9, 9, 3, 3), [1, 1], [1, 1], "auto"), ["cp", "weight"]),
        ("cp = 0", op, (x, torch.randn(0, 0, 3, 3), [1, 1], [1, 1], "auto"), ["cp", "weight"]),
        ("not square", op, (x, torch.randn(2, 3, 3, 3), [1, 1], [1, 1], "auto"), ["weight"]),
        ("even kernel", op, (x, torch.randn(2, 2, 2, 3), [1, 1], [1, 1], "auto"), ["weight"]),
        ("x rank", op, (x[0], w, [1, 1], [1, 1], "auto"), ["x"]),
        ("weight rank", op, (x, w[0], [1, 1], [1, 1], "auto"), ["weight"]),
        ("x dtype", op, (x.int(), w.int(), [1, 1], [1, 1], "auto"), ["x"]),
        ("weight dtype", op, (x, w.half(), [1, 1], [1, 1], "auto"), ["weight"]),
        ("algo", op, (x, w, [1, 1], [1, 1], "fast"), ["algo"]),
        ("direct fp64", op, (x.double(), w.double(), [1, 1], [1, 1], "direct"), ["algo"]),
        ("inplace stride", ops.channel_partial_conv2d_, (x.clone(), w, [1, 2], [1, 1], "auto"), ["stride"]),
        ("inplace cp > C", ops.channel_partial_conv2d_, (x.clone(), torch.randn(9, 9, 1, 1), [1, 1], [1, 1], "auto"),
         ["cp", "weight"]),
        ("backward grad_out shape", ops.channel_partial_conv2d_backward,
         (torch.randn(2, 8, 5, 4), x, w, [1, 1], [True, True]), ["grad_out"]),
        ("backward grad_out dtype", ops.channel_partial_conv2d_backward,
         (x.half(), x, w, [1, 1], [True, True]), ["grad_out"]),
        ("backward weight", ops.channel_partial_conv2d_backward,
         (x, x, torch.randn(2, 3, 3, 3), [1, 1], [True, True]), ["weight"]),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_refused_on_cpu_and_meta_alike(case):
    _, fn, args, names = case
    msg = assert_refused(fn, args, names=names)
    assert "trous.channel_partial_conv2d" in msg


def test_mixed_devices_name_the_stray_argument():
    x, w = _make(SHAPES[0], torch.float32)
    with pytest.raises(RuntimeError, match=r"channel_partial_conv2d: weight must be on the device of x \(cpu\)"):
        ops.channel_partial_conv2d(*mixed_devices([x, w], [1]))
    with pytest.raises(RuntimeError, match=r"channel_partial_conv2d_: weight must be on the device of x \(cpu\)"):
        ops.channel_partial_conv2d_(*mixed_devices([x.clone(), w], [1]))
    g = torch.randn_like(x)
    with pytest.raises(RuntimeError, match=r"channel_partial_conv2d_backward: x must be on the device of grad_out"):
        ops.channel_partial_conv2d_backward(g, x.to("meta"), w, [1, 1], [True, True])


def test_meta_gives_shape_dtype_and_strides():
    x, w = _make(SHAPES[1], torch.bfloat16, layout="channels_last")
    out = ops.channel_partial_conv2d(x.to("meta"), w.to("meta"), [1, 1], [2, 1], "auto")
    real = ops.channel_partial_conv2d(x, w, [1, 1], [2, 1], "auto")
    assert out.device.type == "meta" and out.shape == real.shape and out.stride() == real.stride()
    assert out.dtype == real.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(dtype, layout):
    x, w = _make(SHAPES[0], dtype, seed=2, layout=layout)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(ops.channel_partial_conv2d, (xg, wg, [1, 1], [1, 1], "auto"))
    torch.library.opcheck(ops.channel_partial_conv2d, (x, w, [1, 1], [1, 2], "aten"))
    if dtype != torch.float64:
        torch.library.opcheck(ops.channel_partial_conv2d, (x, w, [1, 1], [1, 1], "direct"))
    torch.library.opcheck(ops.channel_partial_conv2d_, (x.clone(), w, [1, 1], [1, 1], "auto"))
    g = torch.randn_like(x)
    torch.library.opcheck(ops.channel_partial_conv2d_backward, (g, x, w, [1, 1], [True, True]))
    torch.library.opcheck(ops.channel_partial_conv2d_backward, (g, x, w, [1, 1], [False, True]))


def test_compile_dynamic_fullgraph_matches_eager():
    torch._dynamo.reset()

    def fn(x, w):
        return channel_partial_conv2d(x, w) * 2 + 1

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for shape in SHAPES[:2]:
        x, w = _make(shape, torch.float32, seed=4)
        torch.testing.assert_close(compiled(x, w), fn(x, w))


# ------------------------------------------------------------------ modules
def test_pconv2d_state_dict_and_split_cat_equivalence():
    m = PConv2d(40, n_div=4, kernel_size=3)
    assert list(m.state_dict()) == ["partial_conv3.weight"]
    assert tuple(m.partial_conv3.weight.shape) == (10, 10, 3, 3)
    x = torch.randn(2, 40, 13, 11)
    want = ref.split_cat(x, m.partial_conv3.weight.detach())
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_div"):
        PConv2d(3, n_div=4)
    with pytest.raises(ValueError, match="kernel_size"):
        PConv2d(8, kernel_size=4)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 40"):
        m(torch.randn(1, 39, 4, 4))
    assert trous.PConv2d is PConv2d and trous.convert_fasternet is convert_fasternet


def _timm():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install trous[timm])")
    try:
        return timm.create_model("fasternet_t0", pretrained=False)
    except Exception as e:  # pragma: no cover - an older timm without fasternet
        pytest.skip(f"timm has no fasternet_t0: {e}")


def test_pconv2d_loads_timm_partial_conv3_state_dict():
    model = _timm()
    blocks = [m for m in model.modules() if type(m).__name__ == "Partial_conv3"]
    src = blocks[0]
    dim = src.dim_conv3 + src.dim_untouched
    m = PConv2d(dim, n_div=dim // src.dim_conv3)
    m.load_state_dict(src.state_dict())
    x = torch.randn(2, dim, 9, 9)
    torch.testing.assert_close(m(x), src.forward_split_cat(x), rtol=1e-5, atol=1e-5)


def test_convert_fasternet_same_outputs_and_gradients():
    model = _timm()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    ref_model = _timm()
    ref_model.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    convert_fasternet(model)
    assert list(model.state_dict()) == keys
    n = sum(isinstance(m, PConv2d) for m in model.modules())
    assert n == sum(type(m).__name__ == "Partial_conv3" for m in ref_model.modules()) and n > 0
    assert not any(type(m).__name__ == "Partial_conv3" for m in model.modules())
    for mdl in (model, ref_model):
        mdl.train()
    out, want = model(x), ref_model(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    want.square().sum().backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-3, atol=1e-4, msg=name)
    model.eval()
    ref_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algo", ["direct", "aten"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_accumulates_in_fp32_and_overflows_to_inf(dtype, algo):
    # Partial sums beyond fp16's range (65504) stay finite: 60000 + 60000 - 60000 = 60000.
    x = torch.zeros(1, 4, 1, 3)
    x[0, 0, 0] = torch.tensor([60000.0, 60000.0, -60000.0])
    w = torch.zeros(1, 1, 1, 3)
    w[0, 0, 0] = torch.tensor([1.0, 1.0, 1.0])
    out = channel_partial_conv2d(x.to(dtype), w.to(dtype), algo=algo)
    assert float(out[0, 0, 0, 1]) == float(torch.tensor(60000.0).to(dtype))
    # A result beyond the type's range rounds to +Inf (fp16) like any fp32 -> fp16 conversion.
    big = torch.zeros(1, 2, 1, 3)
    big[0, 0, 0] = 60000.0
    res = channel_partial_conv2d(big.to(dtype), w.to(dtype), algo=algo)
    want = torch.tensor(180000.0).to(dtype)  # 3 taps of 60000: +Inf in fp16
    assert float(res[0, 0, 0, 1]) == float(want)
    if dtype == torch.float16:
        assert res[0, 0, 0, 1] == float("inf")


def test_inplace_refuses_x_with_shared_elements_and_outofplace_accepts_it():
    base = torch.randn(1, 6, 5, 7)
    x = base.expand(3, 6, 5, 7)  # stride 0 over the batch
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"channel_partial_conv2d_: x is overwritten in place and must not have "
                                           r"overlapping elements"):
        with torch.no_grad():
            channel_partial_conv2d(x, w, inplace=True)
    out = channel_partial_conv2d(x, w)
    _close(out, ref.channel_partial_conv2d(x, w), torch.float32)


# Larger images through both routes (odd N, cp == C, kernel 5x3 with dilation, W not a multiple of
# 8), and the view x[:, :cp] with cp == C (pconv_pointwise's call, returning the convolution itself).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 20, 32, 33, 5, (3, 3), (1, 1)), (2, 6, 37, 29, 6, (5, 3), (2, 1)),
                                   (5, 17, 35, 31, 16, (3, 3), (1, 2))], ids=str)
def test_larger_images_match_reference(shape, dtype):
    x, w = _make(shape, dtype, seed=11)
    dil, cp = shape[6], shape[4]
    want = ref.channel_partial_conv2d(x, w, dil)
    for algo in ("aten", "auto", "direct"):
        out = channel_partial_conv2d(x, w, dilation=dil, algo=algo)
        assert out.dtype == dtype and out.is_contiguous()
        _close(out, want, dtype)
        assert torch.equal(out[:, cp:], x[:, cp:])
        view = channel_partial_conv2d(x[:, :cp], w, dilation=dil, algo=algo)
        assert view.is_contiguous() and view.shape == (shape[0], cp, *shape[2:4])
        _close(view, want[:, :cp], dtype)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = channel_partial_conv2d(xl, wl, dilation=dil, algo="aten")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    gx, gw = torch.autograd.grad(out, (xl, wl), g)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = torch.cat([ref.cp_conv(xr[:, :cp], wr, dil), xr[:, cp:]], 1)
    rgx, rgw = torch.autograd.grad(yr, (xr, wr), g.double())
    _close(gx, rgx, dtype)
    _close(gw, rgw, dtype)


def test_auto_route_choices():
    """The CPU "auto" choices that the bench measured (csrc/pconv/channel_partial_ops.cpp, `route`):
    the direct kernel for cp < 16 on NCHW rows of >= 16 columns and, on AVX-512 CPUs (oneDNN's
    16-channel blocks), where the padding to 16 is >= 1/4 of the padded width; oneDNN otherwise
    (other cp, short rows, channels_last, float64)."""
    route = ops.channel_partial_conv2d_route
    simd = os.environ.get("TROUS_CPU_SIMD", "1") != "0"
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and simd
    padded = "direct" if avx512 else "aten"

    def r(N, C, H, W, algo="auto", fmt=torch.contiguous_format, dtype=torch.float32):
        x = torch.empty(N, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
        return route(x, torch.empty(C // 4, C // 4, 3, 3, dtype=dtype), algo)

    assert r(32, 40, 56, 56) == "direct"  # FasterNet-T0 stage 1 (cp = 10)
    assert r(32, 60, 20, 16) == "direct"  # cp = 15, 16 columns
    assert r(8, 96, 56, 56) == padded  # the bench shape (cp = 24: 8 of 32 padding)
    assert r(32, 80, 28, 28) == padded  # cp = 20
    assert r(8, 144, 28, 28) == padded  # cp = 36 (48)
    assert r(8, 112, 56, 56) == "aten"  # cp = 28: 4 of 32
    assert r(8, 128, 56, 56) == "aten"  # cp = 32: no padding
    assert r(8, 96, 56, 15) == "aten"  # short rows
    assert r(32, 320, 7, 7) == "aten"
    assert r(32, 40, 56, 15) == "aten"  # rows shorter than 16 columns
    assert r(32, 40, 56, 56, fmt=torch.channels_last) == "aten"
    assert r(32, 40, 56, 56, dtype=torch.float64) == "aten"
    assert r(32, 40, 56, 56, dtype=torch.bfloat16) == "direct"
    assert r(8, 96, 56, 56, "direct") == "direct"
    assert r(32, 40, 56, 56, "aten") == "aten"
    x = torch.empty(8, 40, 56, 56)
    assert route(x[:, :10], torch.empty(10, 10, 3, 3)) == "direct"  # strided views: rows still contiguous
    assert route(x.to("meta"), torch.empty(10, 10, 3, 3, device="meta")) == "aten"
    with pytest.raises(ValueError, match="algo"):
        r(8, 96, 56, 56, "fast")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "expanded", "sliced"])
def test_backward_grad_x_through_the_direct_kernel(dtype, grad_layout):
    """cp < 16 on NCHW rows: grad_x comes from the direct kernel with the flipped, transposed kernel
    (one pass, the untouched channels copied on the way); other grad_out layouts take oneDNN. Both
    against the float64 reference, with and without the weight gradient."""
    shape = (3, 14, 9, 21, 5, (3, 5), (2, 1))
    x, w = _make(shape, dtype, seed=21)
    N, C, H, W, cp = shape[:5]
    assert ops.channel_partial_conv2d_route(x, w) == "direct"
    g = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(4)).to(dtype)
    if grad_layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "expanded":
        g = g[:1].expand(N, C, H, W)
    elif grad_layout == "sliced":
        wide = torch.zeros(N, C, H, 2 * W, dtype=dtype)
        wide[..., ::2] = g
        g = wide[..., ::2]
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = torch.cat([ref.cp_conv(xr[:, :cp], wr, shape[6]), xr[:, cp:]], 1)
    rgx, rgw = torch.autograd.grad(yr, (xr, wr), g.double())
    gx, gw = ops.channel_partial_conv2d_backward(g, x, w, list(shape[6]), [True, True])
    _close(gx, rgx, dtype)
    _close(gw, rgw, dtype)
    assert torch.equal(gx[:, cp:], g[:, cp:])
    gx_only, empty = ops.channel_partial_conv2d_backward(g, x, w, list(shape[6]), [True, False])
    assert empty.numel() == 0 and torch.equal(gx_only, gx)
