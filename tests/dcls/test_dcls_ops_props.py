"""Property suite of the DCLS ops (tests/props.py): construct, the direct depthwise convolution and the
banded grouped 1-D convolution, against python/trous/dcls/reference.py.

Generators: shapes with 1s, odd sizes and empty batches; 1-D / 2-D (conv), 1-3-D (construct)
windows; every version; kernel_count; dilated sizes; stride / padding; dtypes fp32 / fp64 / fp16 /
bf16; x layouts (contiguous, transposed, sliced, channels_last, expanded and overlapping where the
values allow: the ops take any strides and copy); non-finite x, P, SIG and weight; CPU + meta mixes.

Properties: (1) a valid input matches the reference, NaN where the reference is non-finite for
non-finite parameters (a poisoned channel is NaN throughout, see csrc/dcls/params.h); for non-finite
x the direct routes agree wherever the dense reference is finite and are non-finite only where it is
(they spread NaN only through the kernel's support, the dense route through the whole window);
(2) an invalid input raises a RuntimeError naming one of its arguments, on CPU and meta alike, and
a meta tensor among CPU ones is refused naming one of them; (3) nothing crashes (run_isolated).
"""
import pytest
import torch
from props import (
    assert_refused,
    assert_same_nan_and_close,
    given,
    layouts,
    mixed_devices,
    nonfinite,
    run_isolated,
    sizes,
    st,
    with_layout,
)

from trous.dcls import banded as db
from trous.dcls import reference as ref

pytestmark = pytest.mark.props
ops = torch.ops.trous
VERSIONS = ["v0", "v1", "max", "gauss"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _rand(draw, shape, dtype, lo=-1.0, hi=1.0):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _params(draw, shape_w, ndim, dks, version, dtype, bad):
    """weight, P (positions over the window and one tap beyond), SIG; non-finite where `bad` says."""
    w = _rand(draw, shape_w, dtype)
    P = torch.stack([_rand(draw, shape_w, torch.float64, -(d // 2) - 1.5, d // 2 + 1.5) for d in dks]).to(dtype)
    SIG = _rand(draw, P.shape, dtype, 0.0, 1.5) if version in ("max", "gauss") else None
    if "weight" in bad:
        w = nonfinite(draw, w, p=0.15)
    if "P" in bad:
        P = nonfinite(draw, P, p=0.15)
    if "SIG" in bad and SIG is not None:
        SIG = nonfinite(draw, SIG, p=0.15)
    return w, P, SIG


def _bad_sets():
    return st.sampled_from([(), (), (), ("x",), ("P",), ("SIG",), ("weight",), ("P", "SIG"), ("x", "weight")])


def expected_nan(r):
    """The kernels give NaN where the reference is +-inf for non-finite parameters (an infinite
    weight: the reference is +-inf on the element's support and NaN elsewhere; NaN throughout here)."""
    return torch.where(torch.isinf(r), torch.full_like(r, float("nan")), r)


def check_against_reference(got, want, bad, dtype):
    tol = TOL[dtype]
    if "x" not in bad:
        assert_same_nan_and_close(got, expected_nan(want), rtol=tol, atol=tol)
        return
    # Non-finite x: the direct routes read x only through the support (a subset of the window).
    a, b = got.double(), want.double()
    fin = torch.isfinite(b)
    assert not (~torch.isfinite(a) & fin).any(), "non-finite where the dense reference is finite"
    # Rows whose parameters poison them are NaN throughout in both (the reference: non-finite).
    torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------- construct
@st.composite
def construct_case(draw):
    ndim = draw(st.integers(1, 3))
    dks = [draw(sizes(1, 5)) for _ in range(ndim)]
    O, I, kc = draw(sizes(0, 3)), draw(sizes(0, 3)), draw(sizes(0, 3))
    version = draw(st.sampled_from(VERSIONS))
    dtype = draw(st.sampled_from(DTYPES))
    bad = tuple(b for b in draw(_bad_sets()) if b != "x")
    w, P, SIG = _params(draw, (O, I, kc), ndim, dks, version, dtype, bad)
    if version in ("v0", "v1") and draw(st.booleans()):
        SIG = None if draw(st.booleans()) else torch.rand(P.shape).to(dtype)  # optional, ignored
    return w, P, SIG, dks, version, bad


@given(construct_case())
def test_construct_matches_reference(case):
    w, P, SIG, dks, version, bad = case
    got = ops.dcls_construct_kernel(w, P, SIG, dks, version)
    sig = SIG.double() if (SIG is not None and version in ("max", "gauss")) else None
    want = ref.construct_kernel(w.double(), P.double(), sig, dks, version)
    assert got.dtype == w.dtype and got.shape == (*w.shape[:2], *dks)
    check_against_reference(got, want, bad, w.dtype)
    meta = ops.dcls_construct_kernel(w.to("meta"), P.to("meta"), None if SIG is None else SIG.to("meta"), dks,
                                     version)
    assert meta.shape == got.shape and meta.dtype == got.dtype


# ------------------------------------------------------------------------- direct depthwise conv
@st.composite
def conv_case(draw):
    ndim = draw(st.integers(1, 2))
    N, C, kc = draw(sizes(0, 3)), draw(sizes(1, 3)), draw(sizes(1, 3))
    sp = [draw(sizes(1, 8)) for _ in range(ndim)]
    pad = [draw(sizes(0, 2)) for _ in range(ndim)]
    dks = [min(draw(sizes(1, 6)), s + 2 * p) for s, p in zip(sp, pad)]
    stride = [draw(st.integers(1, 2)) for _ in range(ndim)]
    version = draw(st.sampled_from(VERSIONS))
    dtype = draw(st.sampled_from(DTYPES))
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    bad = draw(_bad_sets())
    x = _rand(draw, (N, C, *sp), dtype)
    if "x" in bad:
        x = nonfinite(draw, x, p=0.1)
    x = with_layout(x, draw(layouts()))
    w, P, SIG = _params(draw, (C, 1, kc), ndim, dks, version, pdtype, bad)
    bias = _rand(draw, (C,), pdtype) if draw(st.booleans()) else None
    return x, w, P, SIG, bias, dks, version, stride, pad, bad


@given(conv_case())
def test_conv_matches_reference(case):
    x, w, P, SIG, bias, dks, version, stride, pad, bad = case
    got = ops.dcls_conv(x, w, P, SIG, bias, dks, version, stride, pad)
    sig = None if SIG is None else SIG.double()
    want = ref.dcls_depthwise_conv(x.double(), w.double(), P.double(), sig, dks, version, stride, pad,
                                   None if bias is None else bias.double())
    assert got.dtype == x.dtype and got.is_contiguous()
    check_against_reference(got, want, bad, x.dtype)


@given(conv_case())
def test_conv_meta_and_fake_shapes(case):
    x, w, P, SIG, bias, dks, version, stride, pad, _ = case
    got = ops.dcls_conv(x, w, P, SIG, bias, dks, version, stride, pad)
    m = [None if t is None else t.to("meta") for t in (x, w, P, SIG, bias)]
    meta = ops.dcls_conv(*m, dks, version, stride, pad)
    assert meta.shape == got.shape and meta.dtype == got.dtype and meta.device.type == "meta"


# ---------------------------------------------------------------------------------- banded conv
@st.composite
def banded_case(draw):
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(sizes(1, 2)), groups * draw(sizes(1, 3))
    N, kc, L, pad = draw(sizes(0, 3)), draw(sizes(1, 2)), draw(sizes(1, 12)), draw(sizes(0, 3))
    dks = min(draw(sizes(1, 7)), L + 2 * pad)
    stride = draw(st.integers(1, 2))
    version = draw(st.sampled_from(VERSIONS))
    dtype = draw(st.sampled_from(DTYPES))
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    bad = draw(_bad_sets())
    x = _rand(draw, (N, c_in, L), dtype)
    if "x" in bad:
        x = nonfinite(draw, x, p=0.1)
    x = with_layout(x, draw(layouts()))
    w, P, SIG = _params(draw, (c_out, c_in // groups, kc), 1, [dks], version, pdtype, bad)
    bias = _rand(draw, (c_out,), pdtype) if draw(st.booleans()) else None
    return x, w, P, SIG, bias, dks, version, stride, pad, groups, bad


@given(banded_case())
def test_banded_matches_reference(case):
    x, w, P, SIG, bias, dks, version, stride, pad, groups, bad = case
    got = db.dcls_banded_conv1d(x, w, P, SIG, dks, version, stride, pad, groups, bias)
    sig = None if SIG is None else SIG.double()
    want = ref.dcls_conv(x.double(), w.double(), P.double(), sig, None if bias is None else bias.double(), [dks],
                         version, stride, pad, groups=groups)
    assert got.dtype == x.dtype
    check_against_reference(got, want, bad, x.dtype)


# ------------------------------------------------------------------------------ invalid inputs
def _valid_conv(draw):
    case = draw(conv_case().filter(lambda c: not c[-1]))
    return list(case[:-1])


CONV_MUTATIONS = [
    # (argument named, how to break it)
    ("weight", lambda a: a.__setitem__(1, torch.randn(a[1].shape[0] + 1, 1, a[1].shape[2]))),
    ("weight", lambda a: a.__setitem__(1, torch.randn(a[1].shape[0], 2, a[1].shape[2]))),
    ("P", lambda a: a.__setitem__(2, torch.randn(a[2].shape[0], a[2].shape[1], 1, a[2].shape[3] + 1))),
    ("P", lambda a: a.__setitem__(2, torch.randn(a[2].shape[0] + 1, *a[2].shape[1:]))),
    ("version", lambda a: a.__setitem__(6, "bogus")),
    ("SIG", lambda a: (a.__setitem__(6, "gauss"), a.__setitem__(3, None))),
    ("dilated_kernel_size", lambda a: a.__setitem__(5, [0] + a[5][1:])),
    ("dilated_kernel_size", lambda a: a.__setitem__(5, [3] * 4)),
    ("stride", lambda a: a.__setitem__(7, [0] * len(a[7]))),
    ("padding", lambda a: a.__setitem__(8, [-1] * len(a[8]))),
    ("bias", lambda a: a.__setitem__(4, torch.randn(a[1].shape[0] + 2))),
    ("x", lambda a: a.__setitem__(0, a[0].to(torch.int32))),
    ("x", lambda a: a.__setitem__(0, a[0][:, :, None])),
]


@given(st.data(), st.sampled_from(range(len(CONV_MUTATIONS))))
def test_conv_invalid_input_refused_alike_on_cpu_and_meta(data, m):
    args = _valid_conv(data.draw)
    name, mutate = CONV_MUTATIONS[m]
    mutate(args)
    names = [name, "x", "weight"] if name == "x" else [name]
    assert_refused(ops.dcls_conv, args, names=names)


@given(st.data(), st.integers(0, 4))
def test_conv_mixed_devices_refused(data, which):
    args = _valid_conv(data.draw)
    arg_names = ["x", "weight", "P", "SIG", "bias"]
    if args[which] is None:
        return
    mixed = mixed_devices(args, [which])
    with pytest.raises(RuntimeError, match=r"must be on the device of") as e:
        ops.dcls_conv(*mixed)
    assert arg_names[which] in str(e.value)


CONSTRUCT_MUTATIONS = [
    ("P", lambda a: a.__setitem__(1, torch.randn(a[1].shape[0], a[1].shape[1] + 1, *a[1].shape[2:]))),
    ("weight", lambda a: a.__setitem__(0, a[0].flatten(1))),
    ("version", lambda a: a.__setitem__(4, "bogus")),
    ("dilated_kernel_size", lambda a: a.__setitem__(3, [0] * len(a[3]))),
    ("SIG", lambda a: (a.__setitem__(4, "max"), a.__setitem__(2, None))),
    ("SIG", lambda a: (a.__setitem__(4, "gauss"), a.__setitem__(2, torch.randn(1, 1, 1, 1)))),
    ("weight", lambda a: a.__setitem__(0, a[0].to(torch.int32))),
]


@given(construct_case(), st.sampled_from(range(len(CONSTRUCT_MUTATIONS))))
def test_construct_invalid_input_refused_alike_on_cpu_and_meta(case, m):
    w, P, SIG, dks, version, _ = case
    args = [w, P, SIG, list(dks), version]
    name, mutate = CONSTRUCT_MUTATIONS[m]
    mutate(args)
    if name == "SIG" and args[2] is not None and args[2].shape == args[1].shape:
        return  # the drawn shape happened to be [1, 1, 1, 1]
    assert_refused(ops.dcls_construct_kernel, args, names=[name, "P"] if name == "dilated_kernel_size" else [name])


BANDED_MUTATIONS = [
    ("groups", lambda a: a.__setitem__(6, 0)),
    ("K", lambda a: a.__setitem__(1, torch.randn(a[1].shape[0], a[1].shape[1] + 1, a[1].shape[2]))),
    ("band", lambda a: a.__setitem__(2, a[2][:, :, :1].contiguous())),
    ("band", lambda a: a.__setitem__(2, a[2].long())),
    ("stride", lambda a: a.__setitem__(4, 0)),
    ("padding", lambda a: a.__setitem__(5, -1)),
    ("bias", lambda a: a.__setitem__(3, torch.randn(a[1].shape[0] + 1))),
    ("x", lambda a: a.__setitem__(0, a[0].flatten(1))),
]


@given(banded_case().filter(lambda c: not c[-1]), st.sampled_from(range(len(BANDED_MUTATIONS))))
def test_banded_invalid_input_refused_alike_on_cpu_and_meta(case, m):
    x, w, P, SIG, bias, dks, version, stride, pad, groups, _ = case
    K = ops.dcls_construct_kernel(w, P, SIG, [dks], version)
    band = db.dcls_band1d(P, SIG, dks, version)
    args = [x, K, band, bias, stride, pad, groups]
    name, mutate = BANDED_MUTATIONS[m]
    mutate(args)
    assert_refused(ops.dcls_banded_conv1d, args, names=[name])


# ---------------------------------------------------------------------------- nothing crashes
def test_extreme_inputs_do_not_crash():
    code = r"""
import torch, trous
ops = torch.ops.trous
big = torch.tensor([1e30, -1e30, 3e38, float('nan'), float('inf'), 1e-45])
for v in ("v0", "v1", "max", "gauss"):
    for p in big:
        P = torch.full((2, 2, 1, 3), float(p))
        SIG = torch.full((2, 2, 1, 3), float(p)) if v in ("max", "gauss") else None
        w = torch.randn(2, 1, 3)
        ops.dcls_construct_kernel(w, P, SIG, [5, 1023], v)
        x = torch.randn(1, 2, 3, 1030)
        ops.dcls_conv(x, w, P, SIG, None, [5, 1023], v, [1], [1, 0])
        g = ops.dcls_conv_backward(torch.randn(1, 2, 1, 8), x, w, P, SIG, [5, 1023], v, [1], [1, 0], [True, True])
        ops.dcls_conv_tap_counts(w, P, SIG, [5, 1023], v)
    K = torch.randn(4, 2, 1)
    ops.dcls_banded_conv1d(torch.randn(0, 2, 1), K, torch.tensor([[[0, 1]] * 2] * 4, dtype=torch.int32), None, 1, 0, 1)
    ops.dcls_banded_conv1d(torch.randn(3, 2, 1), K, torch.tensor([[[0, 1]] * 2] * 4, dtype=torch.int32), None,
                           (1 << 20) - 1, 0, 1)
print("ok")
"""
    res = run_isolated(code, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
