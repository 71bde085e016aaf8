"""Property suite of the DCLS modules (issue 9): drawn constructor arguments (valid and invalid) and
inputs of random shapes. (1) Every valid module matches the dense reference (trous.dcls.reference's
kernel, then F.convNd), outputs and gradients, NaN positions equal on the construct route and a
subset of them on the direct routes; (2) an invalid argument or input raises ValueError /
RuntimeError naming it, on CPU and meta alike; (3) edge shapes of the direct kernels do not crash
(in a subprocess)."""
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from props import assert_refused, assert_same_nan_and_close, given, nonfinite, run_isolated, settings, st

import trous
from trous.dcls import reference

pytestmark = pytest.mark.props


def examples(n):
    """n examples per parametrization under the default profile (make test, ~40 s here); the loaded
    profile's count under any other (make fuzz: TROUS_HYPOTHESIS_PROFILE=fuzz)."""
    if os.environ.get("TROUS_HYPOTHESIS_PROFILE", "default") == "default":
        return settings(max_examples=n)
    return settings()

LAYERS = ("Dcls1d", "Dcls2d", "Dcls3d", "Dcls3_1d", "Dcls2dK1d")
CONV_DIMS = {"Dcls1d": 1, "Dcls2d": 2, "Dcls3d": 3, "Dcls3_1d": 3, "Dcls2dK1d": 2}
DKS_DIMS = {"Dcls1d": 1, "Dcls2d": 2, "Dcls3d": 3, "Dcls3_1d": 1, "Dcls2dK1d": 1}
VERSIONS = ("v0", "v1", "max", "gauss")  # from the spec, not read from trous
MODES = ("zeros", "reflect", "replicate", "circular")


@st.composite
def configs(draw, names=LAYERS, strategy=None):
    """Valid constructor keyword arguments of one layer class (small sizes, odd ones included);
    ``strategy="direct"``: a layer with a direct route (depthwise Dcls1d/2d/3d or any Dcls1d)."""
    name = draw(st.sampled_from(names))
    nd, nk = CONV_DIMS[name], DKS_DIMS[name]
    small_3d = nd == 3
    if draw(st.sampled_from([True, False])) or (strategy == "direct" and name != "Dcls1d"):  # depthwise
        c = draw(st.integers(1, 3 if small_3d else 4))
        cin = cout = groups = c
    else:
        groups = draw(st.integers(1, 2))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    kw = dict(in_channels=cin, out_channels=cout, kernel_count=draw(st.integers(1, 3 if small_3d else 4)),
              groups=groups, version=draw(st.sampled_from(VERSIONS)), bias=draw(st.booleans()),
              padding_mode="zeros" if strategy == "direct" else draw(st.sampled_from(MODES)))
    hi = 3 if small_3d else 6
    dks = tuple(draw(st.integers(1, hi)) for _ in range(nk))
    kw["dilated_kernel_size"] = dks if nk > 1 or draw(st.booleans()) else dks[0]
    kw["stride"] = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    kw["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    if name == "Dcls3_1d":
        kw["dense_kernel_size"] = tuple(draw(st.integers(1, 2)) for _ in range(2))
    if name == "Dcls2dK1d":
        kw["flat_dim"] = draw(st.integers(0, 1))
    direct_ok = name in ("Dcls1d", "Dcls2d", "Dcls3d") and (cin == cout == groups or name == "Dcls1d") \
        and kw["padding_mode"] == "zeros"
    kw["strategy"] = strategy or draw(st.sampled_from(("auto", "direct", "construct") if direct_ok else
                                                      ("auto", "construct")))
    assert kw["strategy"] != "direct" or direct_ok
    return name, kw


def extent(layer, name):
    if name == "Dcls3_1d":
        return (*layer.dense_kernel_size, layer.dilated_kernel_size[0])
    if name == "Dcls2dK1d":
        d = layer.dilated_kernel_size[0]
        return (d, 1) if layer.flat_dim == 0 else (1, d)
    return layer.dilated_kernel_size


def make_layer(name, kw, seed):
    """The layer in float64 with random parameters (positions off the integer grid, widths > 0)."""
    torch.manual_seed(seed)
    layer = getattr(trous, name)(**kw).double()
    with torch.no_grad():
        layer.weight.normal_()
        for j, d in enumerate(layer.dilated_kernel_size):
            layer.P[j].normal_(0, max(d, 1) / 4)
        if layer.SIG is not None:
            layer.SIG.uniform_(0.05, 1.0)
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


@st.composite
def inputs(draw, layer, name):
    """An input the layer accepts: padded size >= the kernel, reflect / circular padding < size."""
    nd = CONV_DIMS[name]
    ext = extent(layer, name)
    sizes = []
    for i in range(nd):
        lo = max(1, ext[i] - 2 * layer.padding[i])
        if layer.padding_mode != "zeros":
            lo = max(lo, layer.padding[i] + 1)
        sizes.append(draw(st.integers(lo, lo + (3 if nd == 3 else 6))))
    batched = draw(st.sampled_from([True, False])) or layer.strategy == "direct"
    shape = ([draw(st.sampled_from([2, 1, 3, 0]))] if batched else []) + [layer.in_channels] + sizes
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def ref_kernel(layer, name, weight, P, SIG):
    """The dense kernel from reference.construct_kernel (Dcls3_1d: one 1-D kernel per dense tap)."""
    if name == "Dcls3_1d":
        o, i, d0, d1, kc = weight.shape
        rows = i * d0 * d1
        sig = None if SIG is None else SIG.reshape(1, o, rows, kc)
        K = reference.construct_kernel(weight.reshape(o, rows, kc), P.reshape(1, o, rows, kc), sig,
                                       layer.dilated_kernel_size, layer.version)
        return K.reshape(o, i, d0, d1, -1)
    K = reference.construct_kernel(weight, P, SIG, layer.dilated_kernel_size, layer.version)
    return K.unsqueeze(-1 - layer.flat_dim) if name == "Dcls2dK1d" else K


def ref_forward(layer, name, x, weight, P, SIG, bias):
    K = ref_kernel(layer, name, weight, P, SIG)
    conv = (F.conv1d, F.conv2d, F.conv3d)[K.dim() - 3]
    if layer.padding_mode != "zeros":
        pad = [p for p in reversed(layer.padding) for _ in range(2)]
        return conv(F.pad(x, pad, mode=layer.padding_mode), K, bias, layer.stride, 0, 1, layer.groups)
    return conv(x, K, bias, layer.stride, layer.padding, 1, layer.groups)


ROUTED = [(n, s) for n in LAYERS for s in ("auto", "construct", "direct")
          if s != "direct" or n in ("Dcls1d", "Dcls2d", "Dcls3d")]


@pytest.mark.parametrize("name,strategy", ROUTED, ids=[f"{n}-{s}" for n, s in ROUTED])
@examples(12)
@given(data=st.data())
def test_valid_module_matches_the_reference(name, strategy, data):
    name, kw = data.draw(configs(names=(name,), strategy=strategy))
    layer = make_layer(name, kw, data.draw(st.integers(0, 1000)))
    x = data.draw(inputs(layer, name)).requires_grad_()
    route = layer.route(x)
    assert route in ("construct", "direct", "banded")
    out = layer(x)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.P)]
    sig = None if layer.SIG is None else layer.SIG.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = ref_forward(layer, name, xr, params[0], params[1], sig, bias)
    assert_same_nan_and_close(out, ref, rtol=1e-6, atol=1e-6)
    if out.numel() == 0:
        return
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    pairs = [(x, xr), (layer.weight, params[0]), (layer.P, params[1])]
    pairs += [(layer.SIG, sig)] if sig is not None else []
    pairs += [(layer.bias, bias)] if bias is not None else []
    for ours, theirs in pairs:
        scale = max(1.0, theirs.grad.abs().max().item())
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6 * scale)


NAN_ROUTED = [("Dcls1d", "direct"), ("Dcls1d", "construct"), ("Dcls2d", "direct"), ("Dcls2d", "construct"),
              ("Dcls2dK1d", "auto")]


@pytest.mark.parametrize("name,strategy", NAN_ROUTED, ids=[f"{n}-{s}" for n, s in NAN_ROUTED])
@examples(10)
@given(data=st.data())
def test_nonfinite_input_nan_sets(name, strategy, data):
    """NaN / +-Inf in x: the construct route has the reference's NaN positions exactly (0 * NaN
    spreads over the whole window); the direct routes visit only the support, so their NaN set is
    a subset of the reference's and they agree wherever the reference is finite."""
    name, kw = data.draw(configs(names=(name,), strategy=strategy))
    layer = make_layer(name, kw, data.draw(st.integers(0, 1000)))
    x = nonfinite(data.draw, data.draw(inputs(layer, name)), p=0.1)
    with torch.no_grad():
        route = layer.route(x)
        out = layer(x)
        ref = ref_forward(layer, name, x, layer.weight, layer.P, layer.SIG, layer.bias)
    if route == "construct":
        assert_same_nan_and_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        assert not (out.isnan() & ~ref.isnan()).any(), "NaN where the dense reference has none"
        fin = ref.isfinite()
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-6, atol=1e-6)


# ---- invalid constructor arguments

BAD = {
    "in_channels": st.sampled_from([0, -1, -7, 2.5, "4", None, True]),
    "out_channels": st.sampled_from([0, -1, 1.5, None]),
    "kernel_count": st.sampled_from([0, -1, -3, 0.5, "3"]),
    "groups": st.sampled_from([0, -1, 1.0, "1"]),
    "stride": st.sampled_from([0, -1, (0,), "1", 1.5, (1, 1, 1, 1)]),
    "padding": st.sampled_from([-1, -5, "same", "valid", 0.5, (0, 0, 0, 0)]),
    "dilated_kernel_size": st.sampled_from([0, -1, (0,), 3.0, (3, 3, 3, 3), "3"]),
    "version": st.sampled_from(["v2", "gaussian", "", None, 1]),
    "padding_mode": st.sampled_from(["zero", "reflection", None, 0]),
    "strategy": st.sampled_from(["fast", "dense", "", None]),
    "bias": st.sampled_from(["yes", 2, None, 0.5]),
    "dense_kernel_size": st.sampled_from([0, -2, (2, 0), (2, 2, 2), 1.5]),
    "flat_dim": st.sampled_from([2, -1, 5, 0.5, None]),
}


@pytest.mark.parametrize("name", LAYERS)
@examples(15)
@given(data=st.data())
def test_invalid_constructor_argument_is_named(name, data):
    name, kw = data.draw(configs(names=(name,)))
    arg = data.draw(st.sampled_from(sorted(a for a in BAD if a in kw)))
    value = data.draw(BAD[arg])
    kw = dict(kw, **{arg: value})
    msg = assert_refused(lambda **k: getattr(trous, name)(**k), [], kw, names=[arg])
    assert msg.startswith(f"{name}: ") and repr(value) in msg, msg
    with pytest.raises(ValueError):
        getattr(trous, name)(**kw)


@given(st.data())
def test_groups_not_dividing_is_named(data):
    name, kw = data.draw(configs())
    groups = data.draw(st.integers(2, 5))
    cin, cout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    assume_bad = cin % groups or cout % groups
    if not assume_bad:
        cin += 1 if groups > 1 else 0
    kw = dict(kw, in_channels=cin, out_channels=cout, groups=groups)
    assert_refused(lambda **k: getattr(trous, name)(**k), [], kw, names=["groups"])


# ---- invalid forward inputs

@pytest.mark.parametrize("name", LAYERS)
@examples(10)
@given(data=st.data())
def test_invalid_input_is_named(name, data):
    name, kw = data.draw(configs(names=(name,)))
    layer = make_layer(name, dict(kw, strategy="auto"), 0)
    x = data.draw(inputs(layer, name))
    if x.dim() == CONV_DIMS[name] + 1:
        x = x.unsqueeze(0)
    how = data.draw(st.sampled_from(["channels", "rank+", "rank-", "small"]))
    if how == "channels":
        bad = torch.randn(x.shape[0], layer.in_channels + data.draw(st.integers(1, 3)), *x.shape[2:],
                          dtype=x.dtype)
        names = ["in_channels"]
    elif how == "rank+":
        bad = x.unsqueeze(0)
        names = ["input"]
    elif how == "rank-":
        bad = torch.randn(x.shape[2:], dtype=x.dtype)  # no batch, no channel axis
        names = ["input"]
    else:
        ext = extent(layer, name)
        if max(e - 2 * p for e, p in zip(ext, layer.padding)) <= 0:
            return  # no input is too small for this layer
        sizes = [max(0, e - 2 * p - 1) if e - 2 * p >= 1 else s for e, p, s in zip(ext, layer.padding, x.shape[2:])]
        bad = torch.randn(x.shape[0], layer.in_channels, *sizes, dtype=x.dtype)
        names = ["input"]
    assert_refused(layer, [bad], names=names)


# ---- nothing crashes: the direct kernels on edge shapes, in a subprocess

def test_direct_edge_shapes_do_not_crash():
    code = textwrap.dedent("""
        import torch, trous
        for version in ("v0", "v1", "max", "gauss"):
            for nd, cls in ((1, trous.Dcls1d), (2, trous.Dcls2d), (3, trous.Dcls3d)):
                for size, dks, stride, pad in ((1, 1, 1, 0), (3, 3, 5, 0), (2, 5, 1, 2), (1, 3, 7, 1)):
                    for batch in (0, 1, 3):
                        layer = cls(3, 3, 2, stride=stride, padding=pad, dilated_kernel_size=dks, groups=3,
                                    version=version, strategy="direct")
                        x = torch.randn(batch, 3, *(size,) * nd, requires_grad=True)
                        y = layer(x)
                        y.sum().backward()
                banded = trous.Dcls1d(2, 4, 2, dilated_kernel_size=5, padding=2, version=version, strategy="direct")
                for length in (1, 2, 9):
                    banded(torch.randn(2, 2, length, requires_grad=True)).sum().backward()
        print("ok")
    """)
    done = run_isolated(code, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
