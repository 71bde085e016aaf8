"""Mask-aware partial convolution: mode="nvidia" against NVIDIA's PartialConv2d forward written out
line by line; mode="exact" against the spec's exact form; all-hole / no-hole / isolated-hole masks,
soft masks, bool / uint8 / float masks, batch-broadcast masks, multi_channel, groups, stride 2,
dilation 2, 3-D; gradients (fp64 gradcheck), bad input; the modules."""
import pytest
import torch
import torch.nn.functional as F

from trous.pconv.masked import PartialConv2d, PartialConv3d, masked_partial_conv2d, masked_partial_conv3d


def nvidia_partial_conv(x, mask_in, weight, bias, stride, padding, dilation, groups, multi_channel, nd=2):
    """NVIDIA/partialconv PartialConv2d.forward, line by line (without its shape-keyed cache)."""
    conv = F.conv2d if nd == 2 else F.conv3d
    ks = weight.shape[2:]
    cout, cin = weight.shape[0], x.shape[1]
    if multi_channel:
        weight_maskUpdater = torch.ones(cout, cin, *ks, dtype=x.dtype)
    else:
        weight_maskUpdater = torch.ones(1, 1, *ks, dtype=x.dtype)
    slide_winsize = weight_maskUpdater.shape[1] * weight_maskUpdater[0, 0].numel()
    with torch.no_grad():
        if mask_in is None:
            mask = torch.ones(x.shape[0], cin if multi_channel else 1, *x.shape[2:], dtype=x.dtype)
        else:
            mask = mask_in
        update_mask = conv(mask, weight_maskUpdater, bias=None, stride=stride, padding=padding, dilation=dilation,
                           groups=1)
        mask_ratio = slide_winsize / (update_mask + 1e-8)
        update_mask = torch.clamp(update_mask, 0, 1)
        mask_ratio = torch.mul(mask_ratio, update_mask)
    raw_out = conv(torch.mul(x, mask) if mask_in is not None else x, weight, bias, stride, padding, dilation, groups)
    if bias is not None:
        bias_view = bias.view(1, cout, *([1] * nd))
        output = torch.mul(raw_out - bias_view, mask_ratio) + bias_view
        output = torch.mul(output, update_mask)
    else:
        output = torch.mul(raw_out, mask_ratio)
    return output, update_mask


def exact_reference(x, m, weight, bias, stride, padding, dilation, groups, multi_channel):
    """out = (W * (X . M)) * K / S + b where S > 0, 0 where S = 0, per output position (float64)."""
    x, w = x.double(), weight.double()
    m = torch.ones(1, x.shape[1] if multi_channel else 1, *x.shape[2:]) if m is None else m
    m = m.double().expand(x.shape[0], x.shape[1] if multi_channel else 1, *x.shape[2:])
    raw = F.conv2d(x * m, w, None, stride, padding, dilation, groups)
    cin_g, cout_g = x.shape[1] // groups, w.shape[0] // groups
    ks = w.shape[2:]
    out = torch.zeros_like(raw)
    new = torch.zeros_like(raw[:, :1]) if not multi_channel else torch.zeros_like(raw)
    for o in range(w.shape[0]):
        g = o // cout_g
        mm = m[:, g * cin_g:(g + 1) * cin_g] if multi_channel else m
        S = F.conv2d(mm.sum(1, keepdim=True), torch.ones(1, 1, *ks, dtype=torch.float64), None, stride, padding,
                     dilation)[:, 0]
        K = ks[0] * ks[1] * (cin_g if multi_channel else 1)
        val = raw[:, o] * K / S.clamp_min(1e-300) + (bias[o].double() if bias is not None else 0)
        out[:, o] = torch.where(S > 0, val, torch.zeros_like(val))
        if multi_channel:
            new[:, o] = torch.where(S > 0, S.clamp(max=1), torch.zeros_like(S))
        elif o == 0:
            new[:, 0] = torch.where(S > 0, S.clamp(max=1), torch.zeros_like(S))
    return out, new


def _mask(shape, kind, g):
    if kind == "random":
        return (torch.rand(shape, generator=g) > 0.25).float()
    if kind == "all_hole":
        return torch.zeros(shape)
    if kind == "no_hole":
        return torch.ones(shape)
    if kind == "isolated":
        m = torch.ones(shape)
        m[..., 2, 3] = 0
        m[..., -1, 0] = 0
        return m
    return torch.rand(shape, generator=g)  # soft


CASES = [  # (N, Cin, Cout, H, W, k, stride, padding, dilation, groups, multi_channel, bias, mask_N)
    (2, 4, 6, 9, 11, 3, 1, 1, 1, 1, False, True, 2),
    (1, 3, 5, 8, 7, 3, 2, 1, 1, 1, False, False, 1),
    (2, 4, 4, 10, 9, 3, 1, 2, 2, 1, True, True, 2),
    (3, 8, 8, 7, 7, 3, 1, 1, 1, 4, False, True, 1),
    (2, 6, 6, 6, 8, 5, 2, 2, 1, 1, True, False, 2),
]


@pytest.mark.parametrize("kind", ["random", "all_hole", "no_hole", "isolated", "soft"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_nvidia_mode_matches_the_reference_layer(case, kind):
    N, Cin, Cout, H, W, k, s, p, d, groups, mc, has_bias, mN = case
    if mc and groups > 1:
        pytest.skip("the reference ignores groups in its mask sum")
    g = torch.Generator().manual_seed(hash((case, kind)) % 10000)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Cout, Cin // groups, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(Cout, generator=g, dtype=torch.float64) if has_bias else None
    m = _mask((mN, Cin if mc else 1, H, W), kind, g).double()
    out, new = masked_partial_conv2d(x, m, w, b, s, p, d, groups, multi_channel=mc, mode="nvidia")
    want, want_mask = nvidia_partial_conv(x, m, w, b, s, p, d, groups, mc)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new.expand_as(want_mask) if not mc else new, want_mask.expand_as(new) if mc else
                               want_mask, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "all_hole", "no_hole", "isolated", "soft"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_exact_mode_matches_the_exact_form(case, kind):
    N, Cin, Cout, H, W, k, s, p, d, groups, mc, has_bias, mN = case
    g = torch.Generator().manual_seed(7 + hash((case, kind)) % 10000)
    x = torch.randn(N, Cin, H, W, generator=g)
    w = torch.randn(Cout, Cin // groups, k, k, generator=g)
    b = torch.randn(Cout, generator=g) if has_bias else None
    m = _mask((mN, Cin if mc else 1, H, W), kind, g)
    out, new = masked_partial_conv2d(x, m, w, b, s, p, d, groups, multi_channel=mc)
    want, want_mask = exact_reference(x, m, w, b, s, p, d, groups, mc)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new.double().expand_as(want_mask), want_mask, rtol=1e-6, atol=1e-6)
    if kind == "all_hole":
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(new, torch.zeros_like(new))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_never_gives_inf_or_nan_from_the_ratio(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    m = (torch.rand(2, 1, 16, 16, generator=g) > 0.9).float()  # mostly holes: S = 0 or tiny
    w = torch.randn(4, 4, 3, 3, generator=g) / 6
    b = torch.randn(4, generator=g)
    out, new = masked_partial_conv2d(x.to(dtype), m.to(dtype), w.to(dtype), b.to(dtype), 1, 1)
    assert torch.isfinite(out).all() and out.dtype == dtype
    want, _ = exact_reference(x.to(dtype).float(), m, w.to(dtype).float(), b.to(dtype).float(), 1, 1, 1, 1, False)
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32], ids=str)
def test_mask_dtypes_and_batch_broadcast(mask_dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 6, 6, generator=g)
    m = torch.rand(1, 1, 6, 6, generator=g) > 0.3
    w = torch.randn(3, 2, 3, 3, generator=g)
    out, new = masked_partial_conv2d(x, m.to(mask_dtype), w, None, 1, 1)
    ref, ref_new = masked_partial_conv2d(x, m.float().expand(3, 1, 6, 6), w, None, 1, 1)
    torch.testing.assert_close(out, ref)
    assert new.shape[1] == 1


def test_gradients_flow_to_x_weight_bias_not_mask_and_gradcheck():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(1, 1, 5, 6, generator=g) > 0.3).double().requires_grad_()
    for mode in ("exact", "nvidia"):
        assert torch.autograd.gradcheck(
            lambda a, c, d, mode=mode: masked_partial_conv2d(a, m.detach(), c, d, 1, 1, mode=mode)[0], (x, w, b))
    out, _ = masked_partial_conv2d(x, m, w, b, 1, 1)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_3d_matches_nvidia_partial_conv3d():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 5, 6, 4, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 1, 5, 6, 4, generator=g) > 0.3).double()
    w = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    out, new = masked_partial_conv3d(x, m, w, b, 1, 1, mode="nvidia")
    want, want_mask = nvidia_partial_conv(x, m, w, b, 1, 1, 1, 1, False, nd=3)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)  # S and the ratio are fp32 here
    torch.testing.assert_close(new, want_mask)
    out_e, _ = masked_partial_conv3d(x, m, w, b, 1, 1)
    torch.testing.assert_close(out_e, want, rtol=1e-6, atol=1e-6)  # binary masks: the modes agree to eps


def test_bad_input_names_the_argument():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"mask must have shape \[N or 1, 1, 6, 6\]"):
        masked_partial_conv2d(x, torch.ones(2, 3, 6, 6), w)
    with pytest.raises(ValueError, match=r"mask must have shape \[N or 1, 3, 6, 6\] \(multi_channel\)"):
        masked_partial_conv2d(x, torch.ones(2, 1, 6, 6), w, multi_channel=True)
    with pytest.raises(ValueError, match="mask must be on the device of x"):
        masked_partial_conv2d(x, torch.ones(2, 1, 6, 6, device="meta"), w)
    with pytest.raises(ValueError, match="mode must be"):
        masked_partial_conv2d(x, None, w, mode="fast")
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        masked_partial_conv2d(x[0], None, w)


def test_modules_take_nvidia_keywords_and_state_dicts():
    torch.manual_seed(0)
    layer = PartialConv2d(3, 4, 3, stride=1, padding=1, bias=True, multi_channel=False, return_mask=True)
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    x = torch.randn(2, 3, 8, 8)
    m = (torch.rand(2, 1, 8, 8) > 0.3).float()
    out, new = layer(x, m)
    want, want_mask = masked_partial_conv2d(x, m, layer.weight, layer.bias, 1, 1)
    torch.testing.assert_close(out, want)
    # Stateless: a mask-less call after a masked call of the same shape uses a full mask.
    out2, _ = layer(x)
    torch.testing.assert_close(out2, masked_partial_conv2d(x, None, layer.weight, layer.bias, 1, 1)[0])
    plain = PartialConv2d(3, 4, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(plain(x), torch.Tensor)  # return_mask defaults to False, as in the reference
    import trous

    assert trous.PartialConv2d is PartialConv2d and trous.PartialConv3d is PartialConv3d
    l3 = PartialConv3d(3, 2, 3, padding=1, return_mask=True, mode="nvidia")
    o3, m3 = l3(torch.randn(1, 3, 4, 5, 6), torch.ones(1, 1, 4, 5, 6))
    assert o3.shape == (1, 2, 4, 5, 6) and m3.shape == (1, 1, 4, 5, 6)


def _epilogue_samples():
    g = torch.Generator().manual_seed(11)
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for mode in ("exact", "nvidia"):
            for shape, sshape in (((2, 4, 5, 7), (1, 1, 5, 7)), ((2, 6, 3, 4), (2, 3, 3, 4)),
                                  ((1, 3, 2, 3, 4), (1, 1, 2, 3, 4))):
                raw = torch.randn(shape, generator=g).to(dtype)
                S = (torch.rand(sshape, generator=g) * 9).floor().to(acc)
                b = torch.randn(shape[1], generator=g).to(dtype)
                out.append((raw, S, b, 9.0, mode))
                if len(shape) == 4:
                    out.append((raw.contiguous(memory_format=torch.channels_last), S, None, 9.0, mode))
    return out


def test_opcheck_on_the_epilogue_ops():
    for raw, S, b, K, mode in _epilogue_samples():
        torch.library.opcheck(torch.ops.trous.masked_partial_epilogue, (raw, S, b, K, mode))
        torch.library.opcheck(torch.ops.trous.masked_partial_epilogue_, (raw.clone(), S, b, K, mode))
        torch.library.opcheck(torch.ops.trous.masked_partial_epilogue_backward, (raw, S, K, mode, b is not None))


def test_inplace_epilogue_equals_out_of_place_and_refuses_grad():
    for raw, S, b, K, mode in _epilogue_samples():
        out, m = torch.ops.trous.masked_partial_epilogue(raw, S, b, K, mode)
        y = raw.clone()
        m2 = torch.ops.trous.masked_partial_epilogue_(y, S, b, K, mode)
        assert torch.equal(out, y) and torch.equal(m, m2)
        assert out.is_contiguous(memory_format=torch.channels_last) == raw.is_contiguous(
            memory_format=torch.channels_last) or raw.dim() != 4
    raw, S, b, K, mode = _epilogue_samples()[0]
    with pytest.raises(RuntimeError, match="raw"):
        torch.ops.trous.masked_partial_epilogue_(raw.clone().requires_grad_(), S, b, K, mode)


def test_nan_in_x_reaches_exactly_its_windows():
    x = torch.randn(1, 2, 8, 8)
    x[0, 1, 4, 4] = float("nan")  # a valid pixel
    x[0, 0, 0, 0] = float("nan")  # a hole inside an all-hole corner
    m = torch.ones(1, 1, 8, 8)
    m[..., :3, :3] = 0
    w = torch.randn(3, 2, 3, 3)
    b = torch.randn(3)
    reach = torch.zeros(8, 8, dtype=torch.bool)
    reach[3:6, 3:6] = True
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[:2, :2] = True  # the outputs that read x[0, 0, 0, 0]
    S = F.conv2d(m, torch.ones(1, 1, 3, 3), None, 1, 1)[0, 0]
    for mode in ("exact", "nvidia"):
        out, new = masked_partial_conv2d(x, m, w, b, 1, 1, mode=mode)
        want = reach | (corner & (S > 0)) if mode == "exact" else reach | corner  # nvidia: NaN * 0 stays NaN
        for o in range(3):
            assert torch.equal(out[0, o].isnan(), want), mode
        assert not new.isnan().any()
        if mode == "exact":
            assert bool((out[0][:, S == 0] == 0).all())


@pytest.mark.parametrize("nd", [2, 3])
def test_compile_fullgraph_of_the_modules(nd):
    torch.manual_seed(12)
    cls = PartialConv2d if nd == 2 else PartialConv3d
    layer = cls(3, 4, 3, padding=1, multi_channel=nd == 3, return_mask=True)
    sp = (6, 7) if nd == 2 else (4, 5, 6)
    x = torch.randn(2, 3, *sp)
    m = (torch.rand(2, 3 if nd == 3 else 1, *sp) > 0.3).float()
    compiled = torch.compile(layer, fullgraph=True, dynamic=nd == 2)
    for xx, mm in ((x, m), (x[:1], m[:1])):
        xe = xx.clone().requires_grad_()
        xc = xx.clone().requires_grad_()
        want, want_m = layer(xe, mm)
        got, got_m = compiled(xc, mm)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_m, want_m)
        ge = torch.autograd.grad(want.sum(), (xe, layer.weight, layer.bias))
        gc = torch.autograd.grad(got.sum(), (xc, layer.weight, layer.bias))
        for a, c in zip(gc, ge):
            torch.testing.assert_close(a, c)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, m)[0], layer(x, m)[0])
