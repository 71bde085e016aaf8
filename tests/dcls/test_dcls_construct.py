"""DCLS kernel construction (torch.ops.trous.dcls_construct_kernel) and the drop-in modules.

Ground truth: trous.dcls.reference (written from the spec, fp64 autograd) for the op, and the
`dcls` 0.1.1 package itself for the modules (skipped with a message when it cannot be imported).
"""
import logging

import pytest
import torch
import torch.nn.functional as F

import trous
from dcls_helpers import VERSIONS, dcls_pkg, needs_dcls
from trous import dcls as tdcls
from trous.dcls import reference as ref

op = torch.ops.trous.dcls_construct_kernel
op_bwd = torch.ops.trous.dcls_construct_kernel_backward


@pytest.fixture(autouse=True)
def _quiet_dcls():
    logging.disable(logging.WARNING)  # dcls's Dcls2d logs an implicit-GEMM warning per layer
    yield
    logging.disable(logging.NOTSET)


def make_params(O, I, kc, dks, version, dtype=torch.float64, seed=0, device="cpu", integer_p=False):
    """Random weight / P / SIG; P spreads beyond the window so that renormalisation is exercised."""
    g = torch.Generator().manual_seed(seed)
    nd = len(dks)
    w = torch.randn(O, I, kc, generator=g, dtype=torch.float64)
    P = torch.stack([torch.randn(O, I, kc, generator=g, dtype=torch.float64) * (d / 3.0) for d in dks])
    if integer_p:  # exact integers (and the clamp limits): where |x| and relu are not differentiable
        P = P.round()
        P.view(-1)[::5] = torch.tensor([d // 2 for d in dks], dtype=torch.float64).repeat_interleave(O * I * kc)[::5]
    SIG = None
    if version in ("max", "gauss"):
        SIG = torch.rand(nd, O, I, kc, generator=g, dtype=torch.float64) * 1.5 - 0.25  # both signs, some large
    to = lambda t: None if t is None else t.to(dtype=dtype, device=device).requires_grad_()
    return to(w), to(P), to(SIG)


def grads(K, inputs, G):
    return torch.autograd.grad(K, [t for t in inputs if t is not None], G)


def assert_close_scaled(actual, expected, rel, floor=1e-3):
    """|actual - expected| <= rel * max(max|expected|, floor): errors relative to the tensor's scale
    (the floor stands for the scale of the computation where a result cancels to ~0)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert actual.shape == expected.shape
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * scale {scale:.3g}"


# (O, I/g, kc, dks): 1-D / 2-D / 3-D, square and not, even sizes, kc 1, odd channel counts.
OP_CASES = [
    (3, 5, 4, (7,)),
    (2, 1, 1, (25,)),
    (3, 2, 5, (5, 5)),
    (5, 1, 6, (5, 7)),
    (2, 3, 1, (4, 9)),
    (1, 1, 3, (1, 6)),
    (3, 2, 4, (3, 5, 4)),
    (2, 1, 2, (5, 3, 6)),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", OP_CASES, ids=[str(c[3]) for c in OP_CASES])
@pytest.mark.parametrize("integer_p", [False, True], ids=["realP", "intP"])
def test_op_matches_reference_fp64(device, version, case, integer_p):
    O, I, kc, dks = case
    w, P, SIG = make_params(O, I, kc, dks, version, torch.float64, seed=O * 7 + kc, device=device,
                            integer_p=integer_p)
    K = op(w, P, SIG, list(dks), version)
    Kr = ref.construct_kernel(w, P, SIG, dks, version)
    assert K.shape == (O, I, *dks)
    assert_close_scaled(K, Kr, 1e-12)
    G = torch.randn(K.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    for a, b in zip(grads(K, (w, P, SIG), G), grads(Kr, (w, P, SIG), G)):
        assert_close_scaled(a, b, 1e-11)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", OP_CASES[::2], ids=[str(c[3]) for c in OP_CASES[::2]])
def test_op_fp32_against_fp64_reference(device, version, case):
    O, I, kc, dks = case
    w, P, SIG = make_params(O, I, kc, dks, version, torch.float32, seed=3, device=device)
    K = op(w, P, SIG, list(dks), version)
    d = lambda t: None if t is None else t.detach().double().requires_grad_()
    w64, P64, S64 = d(w), d(P), d(SIG)
    Kr = ref.construct_kernel(w64, P64, S64, dks, version)
    assert K.dtype == torch.float32
    assert_close_scaled(K, Kr, 1e-5)
    G = torch.randn(K.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for a, b in zip(grads(K, (w, P, SIG), G), grads(Kr, (w64, P64, S64), G.double())):
        assert_close_scaled(a, b, 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", ["v1", "gauss"])
def test_op_half_types_accumulate_in_fp32(device, dtype, version):
    w, P, SIG = make_params(6, 2, 8, (7, 9), version, torch.float32, seed=5, device=device)
    lo = lambda t: None if t is None else t.detach().to(dtype)
    K = op(lo(w), lo(P), lo(SIG), [7, 9], version)
    up = lambda t: None if t is None else t.float()
    K32 = op(up(lo(w)), up(lo(P)), up(lo(SIG)), [7, 9], version)  # same rounded inputs, fp32 throughout
    assert K.dtype == dtype
    assert_close_scaled(K.float(), K32, 2 ** -7)
    gw, gP, gS = op_bwd(torch.ones_like(K), lo(w), lo(P), lo(SIG), [7, 9], version)
    gw32, gP32, gS32 = op_bwd(torch.ones_like(K32), up(lo(w)), up(lo(P)), up(lo(SIG)), [7, 9], version)
    assert_close_scaled(gw.float(), gw32, 2 ** -7)
    assert_close_scaled(gP.float(), gP32, 2 ** -6)


def test_renormalisation_and_sparse_edges():
    # v1 with P = 4.6, dks 9: mu = 8.6, only tap 8 inside the window, still total weight 1.
    w = torch.ones(1, 1, 1, dtype=torch.float64)
    K = op(w, torch.full((1, 1, 1, 1), 4.6, dtype=torch.float64), None, [9], "v1")
    assert K[0, 0, 8].item() == pytest.approx(1.0, abs=1e-6) and K.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Far outside the window: v1 gives an all-zero kernel and zero gradients, not NaN.
    P = torch.full((2, 1, 1, 1), 40.0, dtype=torch.float64, requires_grad=True)
    w = w.clone().requires_grad_()
    K = op(w, P, None, [5, 5], "v1")
    assert (K == 0).all()
    gw, gP = torch.autograd.grad(K.sum(), (w, P))
    assert (gw == 0).all() and (gP == 0).all()
    # v0 is not normalised; its taps outside the window are dropped.
    K = op(torch.full((1, 1, 1), 2.0, dtype=torch.float64), torch.full((1, 1, 1, 1), 2.25, dtype=torch.float64), None,
           [5], "v0")
    assert K.flatten().tolist() == pytest.approx([0, 0, 0, 0, 1.5])
    # max: SIG = 0 has no gradient (abs at 0), as in the reference: SIG never learns.
    w, P, SIG = make_params(2, 1, 3, (5, 5), "max")
    with torch.no_grad():
        SIG.zero_()
    _, _, gS = torch.autograd.grad(op(w, P, SIG, [5, 5], "max").pow(2).sum(), (w, P, SIG))
    assert (gS == 0).all()


def test_nan_position_propagates():
    w, P, SIG = make_params(1, 1, 2, (5, 5), "gauss", torch.float32)
    P = P.detach().clone()
    P[0, 0, 0, 1] = float("nan")
    assert torch.isnan(op(w.detach(), P, SIG.detach(), [5, 5], "gauss")).all()


def test_empty_and_kc0():
    K = op(torch.randn(0, 3, 4), torch.randn(2, 0, 3, 4), None, [3, 3], "v1")
    assert K.shape == (0, 3, 3, 3)
    K = op(torch.randn(2, 3, 0), torch.randn(2, 2, 3, 0), None, [3, 5], "v1")
    assert K.shape == (2, 3, 3, 5) and (K == 0).all()
    gw, gP, gS = op_bwd(torch.randn(2, 3, 3, 5), torch.randn(2, 3, 0), torch.randn(2, 2, 3, 0), None, [3, 5], "v1")
    assert gw.shape == (2, 3, 0) and gP.shape == (2, 2, 3, 0) and gS.numel() == 0


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dks", [(5,), (4, 5), (3, 2, 4)])
def test_gradcheck_fp64(version, dks):
    w, P, SIG = make_params(2, 2, 2, dks, version, torch.float64, seed=11)
    if version == "v0":  # keep positions away from integers, where v0 is not differentiable
        with torch.no_grad():
            P.copy_(P.floor() + 0.2 + 0.6 * torch.rand(P.shape, generator=torch.Generator().manual_seed(0),
                                                         dtype=torch.float64))
    inputs = (w, P) if SIG is None else (w, P, SIG)
    fn = lambda w, P, SIG=None: op(w, P, SIG, list(dks), version)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dks", [(7,), (5, 6), (3, 4, 2)])
def test_opcheck(device, version, dks):
    for dtype in (torch.float32, torch.float64):
        w, P, SIG = make_params(3, 2, 3, dks, version, dtype, seed=len(dks), device=device)
        torch.library.opcheck(op, (w, P, SIG, list(dks), version))
        G = torch.randn(3, 2, *dks, dtype=dtype, device=device)
        d = lambda t: None if t is None else t.detach()
        torch.library.opcheck(op_bwd, (G, d(w), d(P), d(SIG), list(dks), version))


def test_torch_compile_fullgraph():
    w, P, SIG = make_params(4, 1, 5, (7, 7), "gauss", torch.float32, seed=4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, P, SIG):
        K = tdcls.construct_kernel(w, P, SIG, (7, 7), "gauss")
        return F.conv2d(x, K, None, 1, 3, 1, 4).square().mean()

    x = torch.randn(2, 4, 9, 9)
    loss = f(x, w, P, SIG)
    g = torch.autograd.grad(loss, (w, P, SIG))
    K = ref.construct_kernel(w, P, SIG, (7, 7), "gauss")
    loss_r = F.conv2d(x, K, None, 1, 3, 1, 4).square().mean()
    g_r = torch.autograd.grad(loss_r, (w, P, SIG))
    assert_close_scaled(loss, loss_r, 1e-5)
    for a, b in zip(g, g_r):
        assert_close_scaled(a, b, 1e-4)


def test_bad_inputs_raise_clear_errors():
    w, P, SIG = (t.detach() for t in make_params(2, 3, 4, (5, 5), "gauss", torch.float32))
    with pytest.raises(RuntimeError, match=r"P must have shape .* = \[2, 2, 3, 4\], got \[2, 2, 3, 5\]"):
        op(w, torch.randn(2, 2, 3, 5), SIG, [5, 5], "gauss")
    with pytest.raises(RuntimeError, match=r"P must have shape .* = \[1, 2, 3, 4\], got \[2, 2, 3, 4\]"):
        op(w, P, SIG, [5], "gauss")
    with pytest.raises(RuntimeError, match=r"version must be one of \"v0\", \"v1\", \"max\", \"gauss\", got \"v2\""):
        op(w, P, SIG, [5, 5], "v2")
    with pytest.raises(RuntimeError, match=r"P must have the dtype of weight \(Float\), got Double"):
        op(w, P.double(), SIG, [5, 5], "gauss")
    with pytest.raises(RuntimeError, match=r"SIG must have the dtype of weight \(Float\), got Half"):
        op(w, P, SIG.half(), [5, 5], "gauss")
    with pytest.raises(RuntimeError, match=r"SIG is required for version \"gauss\""):
        op(w, P, None, [5, 5], "gauss")
    with pytest.raises(RuntimeError, match=r"dilated_kernel_size must have 1, 2 or 3 entries, got \[\]"):
        op(w, P[:0], None, [], "v1")
    with pytest.raises(RuntimeError, match=r"dilated_kernel_size\[1\] must be >= 1, got \[5, 0\]"):
        op(w, P, None, [5, 0], "v1")
    with pytest.raises(RuntimeError, match=r"weight must be float32, float64, float16 or bfloat16, got Int"):
        op(w.int(), P, None, [5, 5], "v1")
    with pytest.raises(RuntimeError,
                       match=r"weight must have shape \[out_channels, in_channels / groups, kernel_count\]"):
        op(w[0], P, None, [5, 5], "v1")
    with pytest.raises(RuntimeError, match=r"grad_K must have shape .* = \[2, 3, 5, 5\], got \[2, 3, 5, 4\]"):
        op_bwd(torch.randn(2, 3, 5, 4), w, P, SIG, [5, 5], "gauss")
    with pytest.raises(ValueError, match=r"version must be one of .*, got 'v3'"):
        trous.Dcls2d(4, 4, 3, dilated_kernel_size=5, groups=4, version="v3")
    with pytest.raises(ValueError, match=r"strategy must be one of .*, got 'fast'"):
        trous.Dcls2d(4, 4, 3, dilated_kernel_size=5, groups=4, strategy="fast")
    with pytest.raises(RuntimeError, match=r"strategy='direct' is unavailable: .*depthwise"):
        trous.Dcls2d(4, 8, 3, dilated_kernel_size=5, strategy="direct")(torch.randn(1, 4, 6, 6))


# ---------------------------------------------------------------------------------------- modules
def _pkg_cls(name):
    return getattr(dcls_pkg, name)


def _pair_layers(name, seed=0, dtype=torch.float64, **kw):
    """A dcls layer and a trous layer loaded from its state dict; non-trivial SIG and bias."""
    torch.manual_seed(seed)
    theirs = _pkg_cls(name)(**kw)
    with torch.no_grad():
        if theirs.SIG is not None:
            theirs.SIG.uniform_(0.1, 1.2)
    theirs = theirs.to(dtype)
    ours = getattr(trous, name)(**kw, strategy="construct").to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _compare_layers(theirs, ours, x, rel_out=1e-12, rel_grad=1e-10):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    assert_close_scaled(yb, ya, rel_out)
    G = torch.randn(ya.shape, generator=torch.Generator().manual_seed(7), dtype=ya.dtype)
    pa = [xa] + [p for p in theirs.parameters()]
    pb = [xb] + [p for p in ours.parameters()]
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, ga, gb in zip(names, torch.autograd.grad(ya, pa, G), torch.autograd.grad(yb, pb, G)):
        try:
            assert_close_scaled(gb, ga, rel_grad)
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None


def _input(shape, dtype=torch.float64, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LAYER_CASES = [
    # (class, constructor kwargs, input shape)
    ("Dcls2d", dict(in_channels=6, out_channels=6, kernel_count=5, dilated_kernel_size=7, padding=3, groups=6),
     (2, 6, 9, 8)),
    ("Dcls2d", dict(in_channels=4, out_channels=6, kernel_count=3, dilated_kernel_size=(5, 7), padding=(2, 3)),
     (2, 4, 8, 9)),
    ("Dcls2d", dict(in_channels=8, out_channels=8, kernel_count=4, dilated_kernel_size=(4, 6), padding=2, groups=4,
                    stride=2), (1, 8, 9, 11)),
    ("Dcls2d", dict(in_channels=5, out_channels=5, kernel_count=2, dilated_kernel_size=5, padding=2, groups=5,
                    padding_mode="reflect", bias=False), (2, 5, 7, 8)),
    ("Dcls2d", dict(in_channels=3, out_channels=6, kernel_count=3, dilated_kernel_size=(3, 5), padding=(1, 2), groups=3,
                    padding_mode="circular", stride=(2, 1)), (1, 3, 8, 7)),
    ("Dcls2d", dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=5, padding=1, groups=1,
                    padding_mode="replicate"), (2, 4, 6, 6)),
    ("Dcls1d", dict(in_channels=4, out_channels=6, kernel_count=1, dilated_kernel_size=9, padding=4), (3, 4, 20)),
    ("Dcls1d", dict(in_channels=6, out_channels=6, kernel_count=3, dilated_kernel_size=8, padding=3, groups=6,
                    stride=2, padding_mode="circular"), (1, 6, 17)),
    ("Dcls3d", dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=(3, 5, 4), padding=(1, 2, 2),
                    groups=4), (2, 4, 5, 6, 7)),
    ("Dcls3d", dict(in_channels=2, out_channels=3, kernel_count=2, dilated_kernel_size=3, padding=1, stride=2,
                    padding_mode="replicate"), (1, 2, 5, 5, 6)),
]


@needs_dcls
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LAYER_CASES)])
def test_layers_match_dcls_fp64(case, version):
    name, kw, shape = case
    theirs, ours = _pair_layers(name, seed=len(shape), version=version, **kw)
    _compare_layers(theirs, ours, _input(shape))


@needs_dcls
@pytest.mark.parametrize("version", ["v1", "gauss"])
def test_layers_match_dcls_fp32(version):
    kw = dict(in_channels=8, out_channels=8, kernel_count=6, dilated_kernel_size=9, padding=4, groups=8)
    theirs, ours = _pair_layers("Dcls2d", dtype=torch.float32, version=version, **kw)
    _compare_layers(theirs, ours, _input((2, 8, 12, 12), torch.float32), rel_out=1e-5, rel_grad=2e-5)


@needs_dcls
@pytest.mark.parametrize("version", ["v1", "max", "gauss"])
def test_dcls3_1d_matches_dcls(version):
    kw = dict(in_channels=4, out_channels=6, kernel_count=3, dense_kernel_size=(2, 3), dilated_kernel_size=7,
              padding=(0, 1, 3), groups=2)
    theirs, ours = _pair_layers("Dcls3_1d", version=version, **kw)
    assert ours.weight.shape == (6, 2, 2, 3, 3) and ours.P.shape == (1, 6, 2, 2, 3, 3)
    _compare_layers(theirs, ours, _input((2, 4, 4, 5, 9)))


@needs_dcls
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flat_dim", [0, 1])
def test_dcls2dk1d_matches_dcls(version, flat_dim):
    kw = dict(in_channels=6, out_channels=6, kernel_count=3, dilated_kernel_size=7, groups=6, flat_dim=flat_dim,
              padding=(3, 0) if flat_dim == 0 else (0, 3))
    theirs, ours = _pair_layers("Dcls2dK1d", version=version, **kw)
    _compare_layers(theirs, ours, _input((2, 6, 9, 8)))


@needs_dcls
@pytest.mark.parametrize("name,kw", [
    ("Dcls1d", dict(in_channels=4, out_channels=6, kernel_count=3, dilated_kernel_size=9, groups=2)),
    ("Dcls2d", dict(in_channels=4, out_channels=4, kernel_count=5, dilated_kernel_size=(5, 7), groups=4)),
    ("Dcls3d", dict(in_channels=2, out_channels=4, kernel_count=2, dilated_kernel_size=(3, 5, 4))),
    ("Dcls3_1d", dict(in_channels=2, out_channels=4, kernel_count=2, dense_kernel_size=3, dilated_kernel_size=7)),
    ("Dcls2dK1d", dict(in_channels=2, out_channels=4, kernel_count=2, dilated_kernel_size=7)),
])
@pytest.mark.parametrize("version", ["v1", "gauss", "max"])
def test_same_parameters_init_and_state_dict(name, kw, version):
    torch.manual_seed(123)
    theirs = _pkg_cls(name)(**kw, version=version)
    torch.manual_seed(123)
    ours = getattr(trous, name)(**kw, version=version)
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert list(sa) == list(sb) and list(dict(ours.named_buffers())) == []
    for k in sa:  # same draws in the same order: identical initial values
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    ours.load_state_dict(sa, strict=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for attr in ("in_channels", "out_channels", "kernel_count", "stride", "padding", "dilated_kernel_size",
                 "groups", "padding_mode", "version"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr


@needs_dcls
def test_construct_kernel_modules_and_clamp_match_dcls():
    for nd, dks in ((1, (9,)), (2, (5, 7)), (3, (3, 5, 4))):
        for version in VERSIONS:
            w, P, SIG = make_params(3, 2, 4, dks, version)
            args = (3, 2, 1, 4, dks, version)
            ck = getattr(trous, f"ConstructKernel{nd}d")(*args)
            assert_close_scaled(ck(w, P, SIG), getattr(dcls_pkg, f"ConstructKernel{nd}d")(*args)(w, P, SIG), 1e-12)
    torch.manual_seed(0)
    theirs = dcls_pkg.Dcls2d(4, 4, 6, dilated_kernel_size=(5, 9), groups=4)
    ours = trous.Dcls2d(4, 4, 6, dilated_kernel_size=(5, 9), groups=4)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        with torch.no_grad():
            m.P.mul_(10)
        m.clamp_parameters()
    assert torch.equal(theirs.P, ours.P) and ours.P[0].abs().max() == 2 and ours.P[1].abs().max() == 4


@needs_dcls
def test_shared_positions_across_layers():
    torch.manual_seed(0)
    kw = dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=7, padding=3, groups=4)
    theirs = [dcls_pkg.Dcls2d(**kw).double() for _ in range(2)]
    ours = [trous.Dcls2d(**kw).double() for _ in range(2)]
    for a, b in zip(theirs, ours):
        b.load_state_dict(a.state_dict())
    for layers in (theirs, ours):  # one P and one SIG Parameter for the whole stage
        layers[1].P, layers[1].SIG = layers[0].P, layers[0].SIG
    x = _input((2, 4, 8, 8))
    ya, yb = theirs[1](theirs[0](x)), ours[1](ours[0](x))
    assert_close_scaled(yb, ya, 1e-12)
    ga = torch.autograd.grad(ya.square().sum(), [theirs[0].P, theirs[0].SIG])
    gb = torch.autograd.grad(yb.square().sum(), [ours[0].P, ours[0].SIG])
    for a, b in zip(ga, gb):
        assert_close_scaled(b, a, 1e-10)
    assert len(list(torch.nn.ModuleList(ours).parameters())) == 2 * 2 + 2  # weight, bias per layer + shared P, SIG


def test_layer_moves_after_forward():
    layer = trous.Dcls2d(3, 3, 4, dilated_kernel_size=5, padding=2, groups=3)
    x = _input((1, 3, 6, 6), torch.float32)
    y32 = layer(x)
    layer = layer.double()  # no cached index grid or limits: every forward follows the parameters
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    assert_close_scaled(y64, y32, 1e-5)
    meta = layer.to("meta")
    assert meta(torch.empty(1, 3, 6, 6, dtype=torch.float64, device="meta")).shape == (1, 3, 6, 6)
    if torch.cuda.is_available():
        layer = trous.Dcls2d(3, 3, 4, dilated_kernel_size=5, padding=2, groups=3)
        y = layer(x)
        assert_close_scaled(layer.cuda()(x.cuda()), y, 1e-5)


def test_module_torch_compile_and_strategies():
    layer = trous.Dcls2d(4, 4, 5, dilated_kernel_size=7, padding=3, groups=4, strategy="construct")
    x = _input((2, 4, 10, 10), torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    assert "strategy=construct" in repr(layer)
    layer.strategy = "auto"  # falls back to construct + conv when no direct convolution applies
    torch.testing.assert_close(layer(x), compiled(x), rtol=1e-5, atol=1e-6)


def test_batchless_input_and_channels_last():
    layer = trous.Dcls1d(3, 4, 2, dilated_kernel_size=5, padding=2)
    x = _input((3, 11), torch.float32)
    assert layer(x).shape == (4, 11)
    layer2 = trous.Dcls2d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4)
    x = _input((2, 4, 7, 7), torch.float32)
    y = layer2(x)
    assert y.is_contiguous()  # computed channels_last on CPU, returned in the caller's layout
    y_cl = layer2(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-6)
    K = layer2.DCK(layer2.weight, layer2.P, layer2.SIG)
    torch.testing.assert_close(y, F.conv2d(x, K, layer2.bias, 1, 2, 1, 4), rtol=1e-5, atol=1e-6)


@needs_dcls
@pytest.mark.parametrize("strategy", ["auto", "direct"])
@pytest.mark.parametrize("name,kw,shape", [
    ("Dcls2d", dict(in_channels=6, out_channels=6, kernel_count=5, dilated_kernel_size=(7, 5), padding=(3, 2), groups=6,
                    padding_mode="reflect"), (2, 6, 9, 8)),
    ("Dcls1d", dict(in_channels=4, out_channels=4, kernel_count=2, dilated_kernel_size=9, padding=4, groups=4,
                    stride=2), (2, 4, 19)),
])
def test_depthwise_strategies_match_dcls(strategy, name, kw, shape):
    theirs, ours = _pair_layers(name, version="gauss", **kw)
    ours.strategy = strategy
    _compare_layers(theirs, ours, _input(shape), rel_out=1e-10, rel_grad=1e-9)
