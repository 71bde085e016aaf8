"""DCLS modules refuse bad constructor arguments and bad forward inputs with errors that name the
argument, what is expected and what was got (issue 9), before any op runs; module defaults are
dcls 0.1.1's. The strategy="direct" refusals state the actual cause(s) only."""
import inspect
import re

import pytest
import torch
from props import assert_refused

import trous
from dcls_helpers import dcls_package_modules
from trous.dcls import banded, conv, modules
from trous.dcls.reference import dcls_conv as ref_dcls_conv

LAYERS = ["Dcls1d", "Dcls2d", "Dcls3d", "Dcls3_1d", "Dcls2dK1d"]
CONSTRUCTS = ["ConstructKernel1d", "ConstructKernel2d", "ConstructKernel3d", "ConstructKernel3_1d"]

# Valid keyword arguments of each public class (small, depthwise-able: in = out = 4).
GOOD = {
    "Dcls1d": dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=5),
    "Dcls2d": dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=5),
    "Dcls3d": dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=3),
    "Dcls3_1d": dict(in_channels=4, out_channels=4, kernel_count=3, dense_kernel_size=3, dilated_kernel_size=5),
    "Dcls2dK1d": dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=5),
    "ConstructKernel1d": dict(out_channels=4, in_channels=4, groups=1, kernel_count=3, dilated_kernel_size=(5,),
                              version="v1"),
    "ConstructKernel2d": dict(out_channels=4, in_channels=4, groups=1, kernel_count=3, dilated_kernel_size=(5, 5),
                              version="v1"),
    "ConstructKernel3d": dict(out_channels=4, in_channels=4, groups=1, kernel_count=3,
                              dilated_kernel_size=(3, 3, 3), version="v1"),
    "ConstructKernel3_1d": dict(out_channels=4, in_channels=4, groups=1, kernel_count=3, dense_kernel_size=(3, 3),
                                dilated_kernel_size=(5,), version="v1"),
}

CONV_DIMS = {"Dcls1d": 1, "Dcls2d": 2, "Dcls3d": 3, "Dcls3_1d": 3, "Dcls2dK1d": 2}
DKS_DIMS = {"Dcls1d": 1, "Dcls2d": 2, "Dcls3d": 3, "Dcls3_1d": 1, "Dcls2dK1d": 1, "ConstructKernel1d": 1,
            "ConstructKernel2d": 2, "ConstructKernel3d": 3, "ConstructKernel3_1d": 1}


def _bad_values(name):
    """(argument, bad value) pairs for one class: every constructor argument it has."""
    nd, nk = CONV_DIMS.get(name), DKS_DIMS[name]
    out = [("in_channels", 0), ("in_channels", -1), ("in_channels", 2.5), ("in_channels", True),
           ("out_channels", 0), ("out_channels", -1), ("out_channels", "4"),
           ("kernel_count", 0), ("kernel_count", -1), ("kernel_count", 1.5),
           ("dilated_kernel_size", 0), ("dilated_kernel_size", -3), ("dilated_kernel_size", (5,) * (nk + 1)),
           ("dilated_kernel_size", 2.0), ("groups", 0), ("groups", -1), ("groups", 1.5), ("version", "v3"),
           ("version", None)]
    if nk > 1:
        out.append(("dilated_kernel_size", (5,) * (nk - 1) + (0,)))
    if name in ("Dcls3_1d", "ConstructKernel3_1d"):
        out += [("dense_kernel_size", 0), ("dense_kernel_size", (3, 0)), ("dense_kernel_size", (3, 3, 3)),
                ("dense_kernel_size", -1)]
    if nd is not None:  # layers
        out += [("stride", 0), ("stride", -1), ("stride", (1,) * nd + (1,)), ("stride", "2"),
                ("padding", -1), ("padding", "same"), ("padding", (0,) * (nd + 1)), ("padding", 1.5),
                ("bias", "yes"), ("padding_mode", "zero"), ("padding_mode", 0), ("strategy", "fast")]
        if nd > 1:
            out += [("stride", (1,) * (nd - 1) + (0,)), ("padding", (0,) * (nd - 1) + (-1,))]
    if name == "Dcls2d":
        out.append(("use_implicit_gemm", "maybe"))
    if name == "Dcls2dK1d":
        out += [("flat_dim", 2), ("flat_dim", -1), ("flat_dim", 5), ("flat_dim", 0.5)]
    return out


CASES = [(name, arg, value) for name in LAYERS + CONSTRUCTS for arg, value in _bad_values(name)]


@pytest.mark.parametrize("name,arg,value", CASES, ids=[f"{n}-{a}={v!r}" for n, a, v in CASES])
def test_constructor_refuses_bad_argument(name, arg, value):
    kw = dict(GOOD[name], **{arg: value})
    with pytest.raises(ValueError) as e:
        getattr(trous, name)(**kw)
    msg = str(e.value)
    assert msg.startswith(f"{name}: "), msg  # the class
    assert re.search(rf"\b{arg}\b", msg), msg  # the argument
    assert "must" in msg  # what is expected
    assert repr(value) in msg, msg  # what was got


@pytest.mark.parametrize("name", LAYERS + CONSTRUCTS)
def test_groups_must_divide_the_channels(name):
    with pytest.raises(ValueError, match=rf"^{name}: in_channels must be divisible by groups, got in_channels=4, "
                                         r"groups=3"):
        getattr(trous, name)(**dict(GOOD[name], groups=3))
    with pytest.raises(ValueError, match=rf"^{name}: out_channels must be divisible by groups, got out_channels=6, "
                                         r"groups=4"):
        getattr(trous, name)(**dict(GOOD[name], out_channels=6, groups=4))


@pytest.mark.parametrize("name", LAYERS)
def test_dilation_is_not_an_argument(name):
    """DCLS layers have no dilation (the spacings are learned): a dilation= is a TypeError naming it."""
    with pytest.raises(TypeError, match="dilation"):
        getattr(trous, name)(**GOOD[name], dilation=2)


@pytest.mark.parametrize("name", LAYERS)
def test_valid_argument_forms_are_accepted(name):
    nd, nk = CONV_DIMS[name], DKS_DIMS[name]
    kw = dict(GOOD[name], stride=[1] * nd, padding=(1,) * nd, dilated_kernel_size=(3,) * nk, groups=2, bias=False)
    layer = getattr(trous, name)(**kw)
    assert layer.stride == (1,) * nd and layer.padding == (1,) * nd and layer.dilated_kernel_size == (3,) * nk
    assert layer.groups == 2 and layer.bias is None
    one = getattr(trous, name)(**dict(GOOD[name], stride=(2,), padding=(1,)))  # one entry: every axis
    assert one.stride == (2,) * nd and one.padding == (1,) * nd


def test_flat_dim_refused_outside_0_and_1_and_both_implemented():
    """dcls 0.1.1 unsqueezes at -1 - flat_dim: flat_dim=2 gives [O, 1, I/g, dks], for a depthwise layer
    the same as flat_dim=1 (a silent alias), otherwise a conv error; -1 or 5 a raw view / conv error.
    trous takes 0 (kernel [dks, 1]) and 1 ([1, dks]) and refuses the rest."""
    for bad in (2, 3, -1, 5):
        with pytest.raises(ValueError, match=rf"Dcls2dK1d: flat_dim must be 0 .* or 1 .*, got {bad}"):
            trous.Dcls2dK1d(4, 4, 3, dilated_kernel_size=5, groups=4, flat_dim=bad)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    for flat_dim, shape in ((0, (2, 4, 3, 9)), (1, (2, 4, 7, 5))):
        layer = trous.Dcls2dK1d(4, 4, 3, dilated_kernel_size=5, groups=4, flat_dim=flat_dim).double()
        y = layer(x)
        assert y.shape == shape
        ref = ref_dcls_conv(x, layer.weight, layer.P, layer.SIG, layer.bias, layer.dilated_kernel_size, "v1",
                            groups=4, kernel_unsqueeze=-1 - flat_dim)
        torch.testing.assert_close(y, ref)


# ---- shape misuse: clear errors, not raw view / conv errors

def test_dcls3_1d_dilated_size_must_be_1d():
    with pytest.raises(ValueError, match=r"Dcls3_1d: dilated_kernel_size must be an int or a 1-tuple, each "
                                         r"positive, got \(5, 5\)"):
        trous.Dcls3_1d(4, 4, 3, dense_kernel_size=3, dilated_kernel_size=(5, 5))


def test_construct_kernel3_1d_dense_size_must_match():
    dck = trous.ConstructKernel3_1d(4, 4, 1, 3, (3, 3), (5,), "v1")
    W, P = torch.randn(4, 4, 3, 2, 3), torch.randn(1, 4, 4, 3, 2, 3)
    with pytest.raises(RuntimeError, match=r"ConstructKernel3_1d: W must have shape \[4, 4, 3, 3, 3\] .*got "
                                           r"\[4, 4, 3, 2, 3\]"):
        dck(W, P, None)
    W = torch.randn(4, 4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"ConstructKernel3_1d: P must have shape \[1, 4, 4, 3, 3, 3\]"):
        dck(W, torch.randn(1, 4, 4, 3, 2, 3), None)
    assert dck(W, torch.randn(1, 4, 4, 3, 3, 3), None).shape == (4, 4, 3, 3, 5)


@pytest.mark.parametrize("name", ["ConstructKernel1d", "ConstructKernel2d", "ConstructKernel3d"])
def test_construct_kernel_forward_names_the_wrong_tensor(name):
    nk = DKS_DIMS[name]
    dck = getattr(trous, name)(**dict(GOOD[name], version="gauss"))
    W, P, SIG = torch.randn(4, 4, 3), torch.randn(nk, 4, 4, 3), torch.rand(nk, 4, 4, 3)
    assert dck(W, P, SIG).shape == (4, 4) + dck.dilated_kernel_size
    with pytest.raises(RuntimeError, match=rf"{name}: W must have shape \[4, 4, 3\] .*got \[4, 4, 2\]"):
        dck(W[..., :2], P, SIG)
    with pytest.raises(RuntimeError, match=rf"{name}: P must have shape \[{nk}, 4, 4, 3\] .*got \[{nk + 1}, 4, 4, 3\]"):
        dck(W, torch.randn(nk + 1, 4, 4, 3), SIG)
    with pytest.raises(RuntimeError, match=rf"{name}: SIG must have shape \[{nk}, 4, 4, 3\]"):
        dck(W, P, SIG[..., :1])
    with pytest.raises(RuntimeError, match=rf"{name}: SIG is required for version 'gauss'"):
        dck(W, P, None)


def test_plain_int_where_a_tuple_is_taken():
    """ConstructKernel2d(..., dilated_kernel_size=5) and construct_kernel(..., 5): the int is used on
    every axis (dcls 0.1.1 fails inside tuple() / a view)."""
    a = trous.ConstructKernel2d(4, 4, 1, 3, 5, "v1")
    b = trous.ConstructKernel2d(4, 4, 1, 3, (5, 5), "v1")
    assert a.dilated_kernel_size == b.dilated_kernel_size == (5, 5)
    W, P = torch.randn(4, 4, 3), torch.randn(2, 4, 4, 3)
    torch.testing.assert_close(a(W, P, None), b(W, P, None))
    torch.testing.assert_close(trous.dcls.construct_kernel(W, P, None, 5, "v1"), b(W, P, None))


def _layer(name, **kw):
    torch.manual_seed(0)
    return getattr(trous, name)(**dict(GOOD[name], **kw))


def _input(name, batch=2, size=7, channels=4):
    return torch.randn(batch, channels, *(size,) * CONV_DIMS[name])


@pytest.mark.parametrize("name", LAYERS)
def test_forward_wrong_rank_and_channels_name_input(name):
    layer = _layer(name, padding=2)
    nd = CONV_DIMS[name]
    for bad in (torch.randn(2, 4, *(7,) * (nd + 1)), torch.randn(*(7,) * nd)):
        msg = assert_refused(layer, [bad], names=["input"])
        assert f"{nd + 2}-D or {nd + 1}-D), got a {bad.dim()}-D tensor" in msg
    msg = assert_refused(layer, [_input(name, channels=5)], names=["in_channels", "input"])
    assert "in_channels=4" in msg and "got 5" in msg
    # unbatched input works (as torch.nn.ConvNd)
    x = _input(name)
    torch.testing.assert_close(layer(x[0]), layer(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LAYERS)
def test_forward_input_smaller_than_the_kernel(name):
    layer = _layer(name)  # no padding
    x = _input(name, size=2)
    msg = assert_refused(layer, [x], names=["input"])
    assert "must be at least the kernel's size" in msg


@pytest.mark.parametrize("name", LAYERS)
def test_forward_names_the_wrong_parameter(name):
    """A wrong weight is reported as weight (not as a P-shape error), a wrong P as P, and so on."""
    layer = _layer(name, version="gauss", padding=2)
    x = _input(name)
    w, b, P, SIG = layer.weight, layer.bias, layer.P, layer.SIG
    with pytest.raises(RuntimeError, match=rf"^{name}: weight must have shape"):
        layer._conv_forward(x, w[..., :2], b, P, SIG)
    with pytest.raises(RuntimeError, match=rf"^{name}: P must have shape"):
        layer._conv_forward(x, w, b, P[..., :2], SIG)
    with pytest.raises(RuntimeError, match=rf"^{name}: SIG must have shape"):
        layer._conv_forward(x, w, b, P, SIG[..., :2])
    with pytest.raises(RuntimeError, match=rf"^{name}: SIG is required"):
        layer._conv_forward(x, w, b, P, None)
    with pytest.raises(RuntimeError, match=rf"^{name}: bias must have shape \[4\]"):
        layer._conv_forward(x, w, b[:3], P, SIG)
    with torch.no_grad():
        layer.weight = torch.nn.Parameter(w[..., :2].clone())
    with pytest.raises(RuntimeError, match=rf"^{name}: weight must have shape"):
        layer(x)


@pytest.mark.parametrize("name", LAYERS)
def test_forward_mixed_devices_name_the_stray_argument(name):
    layer = _layer(name, padding=2)
    with pytest.raises(RuntimeError, match=rf"^{name}: weight is on cpu but input is on meta"):
        layer(_input(name).to("meta"))
    layer.to("meta")
    assert layer(_input(name).to("meta")).device.type == "meta"  # all on meta: shapes only
    with pytest.raises(RuntimeError, match=rf"^{name}: weight is on meta but input is on cpu"):
        layer(_input(name))


# ---- strategy="direct": the actual cause(s) only

def _dw_args(size=9):
    x = torch.randn(2, 4, size, size)
    w, P, SIG = torch.randn(4, 1, 3), torch.randn(2, 4, 1, 3), torch.rand(2, 4, 1, 3)
    return x, w, P, SIG


CAUSES = ("version must", "stride must", "padding must", "spatial size", "batched", "weight must", "P must", "SIG must",
          "floating", "dtype", "is on", "CUDA")


def _only(reasons, *expected):
    assert len(reasons) == len(expected), reasons
    for r, e in zip(reasons, expected):
        assert e in r, (e, reasons)
        others = [c for c in CAUSES if c in r and c not in expected and c.strip() not in e]
        assert not others, f"{r!r} mentions {others}"


def test_direct_supported_states_each_actual_cause():
    x, w, P, SIG = _dw_args()
    r = []
    assert conv.dcls_direct_supported(x, w, P, SIG, (5, 5), "gauss", 1, 2, reasons=r) and r == []
    for kw, cause in [(dict(stride=0), "stride must"), (dict(stride=(1, -1)), "stride must"),
                      (dict(padding=-1), "padding must"),
                      (dict(x=torch.randn(2, 4, 3, 9)), "spatial size"), (dict(x=x[0]), "batched"),
                      (dict(x=x.int()), "floating"), (dict(version="v9"), "version must"),
                      (dict(SIG=None), "SIG must"), (dict(w=torch.randn(4, 2, 3)), "weight must")]:
        a = dict(x=x, w=w, P=P, SIG=SIG, version="gauss", stride=1, padding=0)
        a.update(kw)
        r = []
        assert not conv.dcls_direct_supported(a["x"], a["w"], a["P"], a["SIG"], (5, 5), a["version"], a["stride"],
                                              a["padding"], reasons=r)
        _only(r, cause)
    r = []  # two causes at once: both, and nothing else
    assert not conv.dcls_direct_supported(x, w, P, SIG, (5, 5), "gauss", 0, -1, reasons=r)
    _only(r, "stride must", "padding must")
    r = []
    assert not conv.dcls_direct_supported(x.to("meta"), w, P, SIG, (5, 5), "gauss", reasons=r)
    _only(r, "x is on meta but weight on cpu, P on cpu, SIG on cpu")


def test_banded_supported_states_each_actual_cause():
    x, w, P, SIG = torch.randn(2, 4, 12), torch.randn(6, 2, 3), torch.randn(1, 6, 2, 3), torch.rand(1, 6, 2, 3)
    r = []
    assert banded.banded_supported(x, w, P, SIG, 5, "gauss", 1, 0, 2, reasons=r) and r == []
    for args, cause in [((x, 5, 0, 0), "stride"), ((x, 5, 1, -1), "padding"), ((x[..., :3], 5, 1, 0), "smaller"),
                        ((x[0], 5, 1, 0), "batched"), ((x.int(), 5, 1, 0), "floating")]:
        r = []
        xx, d, s, p = args
        assert not banded.banded_supported(xx, w, P, SIG, d, "gauss", s, p, 2, reasons=r)
        assert len(r) == 1 and cause in r[0], r


def test_module_direct_refusal_names_the_actual_cause():
    layer = trous.Dcls2d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4, strategy="direct")
    with pytest.raises(RuntimeError) as e:
        layer(torch.randn(4, 9, 9))  # unbatched: the direct kernels take [N, C, H, W]
    msg = str(e.value)
    assert "strategy='direct' is unavailable" in msg and "batched" in msg
    for wrong in ("stride", "padding must", "smaller", "dtype", "device"):
        assert wrong not in msg, msg
    with pytest.raises(RuntimeError, match=r"strategy='direct' is unavailable: .*floating point: x is torch.int64"):
        layer(torch.randint(0, 3, (1, 4, 9, 9)))
    with pytest.raises(RuntimeError, match=r"strategy='direct' is unavailable: it needs a depthwise .*got a Dcls2d "
                                           r"with in_channels=4, out_channels=8, groups=1"):
        trous.Dcls2d(4, 8, 3, dilated_kernel_size=5, strategy="direct")(torch.randn(1, 4, 9, 9))
    with pytest.raises(RuntimeError, match=r"strategy='direct' is unavailable: it needs a depthwise .*Dcls2dK1d"):
        trous.Dcls2dK1d(4, 4, 3, dilated_kernel_size=5, groups=4, strategy="direct")(torch.randn(1, 4, 9, 9))
    banded_layer = trous.Dcls1d(4, 6, 2, dilated_kernel_size=5, version="v1", strategy="direct")
    with pytest.raises(RuntimeError, match=r"banded_supported\(\) refuses these inputs: x must be batched") as e:
        banded_layer(torch.randn(4, 12))
    assert "stride" not in str(e.value) and "padding" not in str(e.value)


# ---- defaults: the dcls package's

def _params(cls):
    return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", LAYERS + CONSTRUCTS)
def test_defaults_equal_the_dcls_package(name):
    pkg = dcls_package_modules()
    theirs, ours = _params(getattr(pkg, name)), _params(getattr(trous, name))
    ours_by_name = {p.name: p for p in ours}
    assert [p.name for p in ours][:len(theirs)] == [p.name for p in theirs]  # same order, positional too
    for p in theirs:
        assert ours_by_name[p.name].default == p.default, (name, p.name)
    extra = [p.name for p in ours[len(theirs):]]
    assert extra in ([], ["strategy"]), extra  # trous adds strategy, with default "auto"
    if extra:
        assert ours_by_name["strategy"].default == "auto"
    if name in LAYERS:  # the attributes a default layer ends with
        kw = {k: GOOD[name][k] for k in ("in_channels", "out_channels", "kernel_count")}
        a, b = getattr(pkg, name)(**kw), getattr(trous, name)(**kw)
        for attr in ("version", "padding_mode", "stride", "padding", "dilated_kernel_size", "groups", "kernel_count",
                     "in_channels", "out_channels", "dense_kernel_size", "flat_dim"):
            # (use_implicit_gemm: the same default argument; dcls turns its attribute off where its
            # optional depthwise-implicit-GEMM package is missing, trous ignores it)
            if hasattr(a, attr):
                assert getattr(b, attr) == getattr(a, attr), (name, attr)
        assert (a.bias is None) == (b.bias is None) and (a.SIG is None) == (b.SIG is None)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert b.strategy == "auto"


def test_defaults_written_down():
    """The defaults, as the spec says (also without the dcls package installed)."""
    layer = trous.Dcls2d(4, 4, 3)
    assert (layer.version, layer.padding_mode, layer.stride, layer.padding, layer.dilated_kernel_size,
            layer.groups, layer.strategy, layer.use_implicit_gemm) == ("gauss", "zeros", (1, 1), (0, 0), (1, 1), 1,
                                                                       "auto", True)
    assert layer.bias is not None and layer.SIG is not None
    assert trous.Dcls2dK1d(4, 4, 3).version == "v1" and trous.Dcls2dK1d(4, 4, 3).flat_dim == 0
    assert trous.Dcls1d(4, 4, 3).version == trous.Dcls3d(4, 4, 3).version == trous.Dcls3_1d(4, 4, 3).version == "gauss"
    assert trous.Dcls3_1d(4, 4, 3).dense_kernel_size == (1, 1)


def test_docstrings_state_the_nan_semantics():
    for name in LAYERS:
        doc = getattr(trous, name).__doc__
        assert "0 * NaN" in doc and "outside" in doc and "differ between routes" in doc, name
    assert modules.Dcls2d.__doc__.count("NaN") >= 2
