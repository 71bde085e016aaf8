"""The route strategy="auto" picks (issue 9): asserted for shapes where the dense (construct) route
must win and where each direct route (depthwise conv, banded Dcls1d) must win, in training and in
inference; the route is stable (same input and grad mode: same route) and is the one forward runs."""
import contextlib

import pytest
import torch

import trous
from trous.dcls import banded, conv, modules


def _dw(version, c=16, kc=6, dks=7, **kw):
    torch.manual_seed(0)
    return trous.Dcls2d(c, c, kc, dilated_kernel_size=dks, padding=dks // 2, groups=c, version=version, **kw)


def _mode(mode):
    return torch.no_grad() if mode == "inference" else contextlib.nullcontext()


# (version, input shape, mode, route). Inference on a small image: building the elements costs more
# than the dense window, the dense route wins; large inputs and training (oneDNN's depthwise
# backward is 10-20x its forward on CPU) take the direct depthwise kernels.
DEPTHWISE = [
    ("gauss", (1, 16, 8, 8), "inference", "construct"),
    ("gauss", (2, 16, 16, 16), "inference", "construct"),
    ("gauss", (8, 16, 32, 32), "inference", "direct"),
    ("max", (2, 16, 16, 16), "inference", "construct"),
    ("v1", (1, 16, 8, 8), "inference", "construct"),
    ("v1", (2, 16, 16, 16), "inference", "direct"),  # v1: at most 4 taps per element, sparse wins sooner
    ("v0", (2, 16, 16, 16), "inference", "direct"),
    ("gauss", (1, 16, 8, 8), "training", "direct"),
    ("v1", (1, 16, 8, 8), "training", "direct"),
    ("max", (8, 16, 32, 32), "training", "direct"),
]


@pytest.mark.parametrize("version,shape,mode,want", DEPTHWISE, ids=[f"{v}-{s}-{m}" for v, s, m, _ in DEPTHWISE])
def test_auto_route_depthwise(version, shape, mode, want):
    layer = _dw(version)
    x = torch.randn(shape)
    with _mode(mode):
        assert layer.route(x) == want


def test_auto_route_convnext_stages():
    """ConvNeXt-dcls (gauss, kc 34, dks 17): stage 1 (96 ch, 56x56) direct even in inference;
    stage 4 (768 ch, 7x7, batch 2) builds the kernel (cheap window, costly elements)."""
    s1 = _dw("gauss", c=96, kc=34, dks=17)
    s4 = _dw("gauss", c=768, kc=34, dks=17)
    with torch.no_grad():
        assert s1.route(torch.randn(8, 96, 56, 56)) == "direct"
        assert s4.route(torch.randn(2, 768, 7, 7)) == "construct"
    assert s4.route(torch.randn(2, 768, 7, 7)) == "direct"  # training


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_auto_route_banded(mode):
    """SNN delays Dcls1d(12, 16, kc 1, dks 25, gauss): the init sigma (0.5) covers ~7 of 25 taps, the
    banded route wins; SIG 8 covers the window, the dense route wins; v1 (2 taps) is banded."""
    torch.manual_seed(0)
    layer = trous.Dcls1d(12, 16, 1, dilated_kernel_size=25, version="gauss")
    x = torch.randn(2, 12, 40)
    with _mode(mode):
        assert layer.route(x) == "banded"
        with torch.no_grad():
            layer.SIG.fill_(8.0)
        assert layer.route(x) == "construct"
        assert trous.Dcls1d(12, 16, 1, dilated_kernel_size=25, version="v1").route(x) == "banded"


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("make,shape", [
    (lambda: trous.Dcls2d(4, 8, 3, dilated_kernel_size=5, padding=2), (2, 4, 16, 16)),  # not depthwise
    (lambda: trous.Dcls3d(4, 4, 3, dilated_kernel_size=3, padding=1, groups=2), (2, 4, 6, 6, 6)),
    (lambda: trous.Dcls3_1d(4, 4, 3, dense_kernel_size=3, dilated_kernel_size=5, padding=2, groups=4),
     (2, 4, 6, 6, 6)),
    (lambda: trous.Dcls2dK1d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4), (2, 4, 16, 16)),
], ids=["Dcls2d-dense", "Dcls3d-grouped", "Dcls3_1d", "Dcls2dK1d"])
def test_auto_route_without_a_direct_kernel_constructs(make, shape, mode):
    with _mode(mode):
        assert make().route(torch.randn(shape)) == "construct"


def test_explicit_strategies_route():
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert _dw("gauss", strategy="direct").route(x) == "direct"  # auto would construct here
        assert _dw("gauss", strategy="construct").route(x) == "construct"
    assert _dw("gauss", strategy="construct").route(x) == "construct"  # auto would go direct here
    b = trous.Dcls1d(12, 16, 1, dilated_kernel_size=25, strategy="direct")
    with torch.no_grad():
        b.SIG.fill_(8.0)
    assert b.route(torch.randn(2, 12, 40)) == "banded"


def test_cost_model_directly():
    """dcls_direct_is_faster itself: a mutant that always (or never) says "direct" fails here."""
    x_small, x_big = torch.randn(1, 16, 8, 8), torch.randn(8, 16, 32, 32)
    w, P, SIG = torch.randn(16, 1, 6), torch.randn(2, 16, 1, 6), torch.full((2, 16, 1, 6), 0.23)
    args = (w, P, SIG, (7, 7), "gauss", 1, 3)
    assert not conv.dcls_direct_is_faster(x_small, *args, training=False)
    assert conv.dcls_direct_is_faster(x_big, *args, training=False)
    assert conv.dcls_direct_is_faster(x_small, *args, training=True)
    # training defaults to "grad mode on and something requires grad"
    assert not conv.dcls_direct_is_faster(x_small, *args)
    assert conv.dcls_direct_is_faster(x_small, w.requires_grad_(), P, SIG, (7, 7), "gauss", 1, 3)
    with torch.no_grad():
        assert not conv.dcls_direct_is_faster(x_small, *args)
    assert conv._expected_taps(6, (7, 7), "v1") == 24.0 and conv._expected_taps(20, (7, 7), "v1") == 49.0
    assert conv._expected_taps(6, (7, 7), "gauss") == 49.0 and conv._expected_taps(2, (9,), "v0") == 4.0


def test_banded_cost_model_directly():
    x = torch.randn(2, 12, 40)
    narrow = torch.tensor([[[10, 13]]], dtype=torch.int32).expand(16, 12, 2)
    full = torch.tensor([[[0, 25]]], dtype=torch.int32).expand(16, 12, 2)
    assert banded.banded_is_faster(x, narrow, 25, 1)
    assert not banded.banded_is_faster(x, full, 25, 1)
    assert not banded.banded_is_faster(x.to("meta"), narrow, 25, 1)  # CPU only


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("case", ["small-gauss", "big-gauss", "banded", "banded-full"])
def test_route_is_stable_and_is_what_forward_runs(case, mode, monkeypatch):
    if case.startswith("banded"):
        torch.manual_seed(0)
        layer = trous.Dcls1d(12, 16, 1, dilated_kernel_size=25, version="gauss")
        if case == "banded-full":
            with torch.no_grad():
                layer.SIG.fill_(8.0)
        x = torch.randn(2, 12, 40)
    else:
        layer = _dw("gauss")
        x = torch.randn((1, 16, 8, 8) if case == "small-gauss" else (8, 16, 32, 32))
    ran = []
    for mod, name, tag in ((conv, "dcls_depthwise_conv", "direct"), (banded, "dcls_banded_conv1d", "banded"),
                           (modules, "construct_kernel", "construct")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _tag=tag, **k: (ran.append(_tag), _real(*a, **k))[1])
    with _mode(mode):
        routes = {layer.route(x) for _ in range(3)} | {layer.route(x.clone())}
        assert len(routes) == 1, routes
        route = routes.pop()
        for _ in range(2):
            ran.clear()
            layer(x)
            assert ran == [route], (route, ran)


# ---- edge semantics, the same on every route (the README's "Edge semantics" rows of the modules)

def _every_route(version, nd=2, **kw):
    """(route, layer) for each route of a depthwise layer and of a (non-depthwise) Dcls1d, float64,
    the same parameters on every route."""
    torch.manual_seed(0)
    cls = (trous.Dcls1d, trous.Dcls2d, trous.Dcls3d)[nd - 1]
    out = []
    for strategy in ("construct", "direct"):
        layer = cls(3, 3, 3, dilated_kernel_size=5, padding=2, groups=3, version=version, strategy=strategy,
                    **kw).double()
        out.append((f"{nd}d-{strategy}", layer))
    for strategy in ("construct", "direct"):
        torch.manual_seed(0)
        out.append((f"banded-{strategy}", trous.Dcls1d(2, 3, 3, dilated_kernel_size=5, padding=2, version=version,
                                                       strategy=strategy, **kw).double()))
    return out


def _x(layer, batch=2, size=7, nd=None):
    nd = nd if nd is not None else len(layer.padding)
    return torch.randn(batch, layer.in_channels, *(size,) * nd, dtype=torch.float64)


@pytest.mark.parametrize("version", ["v0", "v1", "max", "gauss"])
def test_empty_batch_and_empty_spatial_every_route(version):
    for tag, layer in _every_route(version):
        y = layer(_x(layer, batch=0))
        assert y.shape == (0, layer.out_channels, *(7,) * len(layer.padding)), tag
    # an empty spatial axis: refused naming input (torch.nn.Conv2d and its kin refuses it too), even where
    # 2 * padding covers the kernel
    for layer in (trous.Dcls2d(3, 3, 3, dilated_kernel_size=5, padding=3, groups=3, version=version),
                  trous.Dcls1d(2, 3, 3, dilated_kernel_size=5, padding=3, version=version)):
        nd = len(layer.padding)
        with pytest.raises(RuntimeError, match=r"input must have non-empty spatial axes"):
            layer(torch.randn(1, layer.in_channels, *(0,) * nd))


@pytest.mark.parametrize("version", ["v0", "v1", "max", "gauss"])
def test_positions_far_outside_the_window_give_the_bias(version):
    """|P| far beyond dks // 2: no element reaches the window, the kernel is 0 (v1 / max / gauss
    renormalise only mass that is there), every route returns the bias."""
    for tag, layer in _every_route(version):
        with torch.no_grad():
            layer.P.fill_(100.0)
        x = _x(layer)
        y = layer(x)
        torch.testing.assert_close(y, layer.bias.view(1, -1, 1, 1)[..., 0, :].expand_as(y) if y.dim() == 3 else
                                   layer.bias.view(1, -1, 1, 1).expand_as(y), atol=1e-12, rtol=0, msg=tag)


@pytest.mark.parametrize("version", ["v0", "v1", "max", "gauss"])
def test_constant_input_gives_sum_of_kernel_plus_bias_inside(version):
    """A constant input c: every output whose window lies inside the input is c * sum(K) + bias, on
    every route (positions random, so the kernel is not trivial)."""
    for tag, layer in _every_route(version):
        with torch.no_grad():
            layer.P.normal_(0, 1.2)
        x = torch.full((1, layer.in_channels, *(9,) * len(layer.padding)), 1.75, dtype=torch.float64)
        y = layer(x)
        K = layer.DCK(layer.weight, layer.P, layer.SIG)
        want = 1.75 * K.sum(dim=tuple(range(1, K.dim()))) + layer.bias
        inner = y[..., 2:-2] if y.dim() == 3 else y[..., 2:-2, 2:-2]
        torch.testing.assert_close(inner, want.view(1, -1, *(1,) * (inner.dim() - 2)).expand_as(inner), msg=tag)


NONFINITE_PARAMS = [(v, p) for v in ("v0", "v1", "max", "gauss") for p in ("weight", "P", "SIG")
                    if p != "SIG" or v in ("max", "gauss")]


@pytest.mark.parametrize("version,param", NONFINITE_PARAMS, ids=[f"{v}-{p}" for v, p in NONFINITE_PARAMS])
def test_nonfinite_parameter_reaches_its_channel_on_every_route(version, param):
    """A NaN in one element's weight, P or SIG makes every output of its output channel NaN, and no
    other channel's, on every route (dense, direct and banded)."""
    for tag, layer in _every_route(version):
        hit = 1  # output channel 1, its first element
        with torch.no_grad():
            t = getattr(layer, param)
            if param == "weight":
                t[hit, 0, 0] = float("nan")
            else:
                t[0, hit, 0, 0] = float("nan")
        y = layer(_x(layer))
        assert y[:, hit].isnan().all(), tag
        others = [c for c in range(layer.out_channels) if c != hit]
        assert not y[:, others].isnan().any(), tag
