"""Edge semantics of the DCLS ops (issue 9), each claim of the README's "Edge semantics" rows:

* one validation per op: a bad input raises the same message on CPU and on meta (the Meta kernel is
  the real kernel's validation), naming the argument that is wrong; CPU tensors mixed with meta ones
  raise naming the stray argument; the backward ops and tap_counts refuse inputs that require grad;
  torch.compile(fullgraph=True, dynamic=True) traces each op file through the Meta kernels;
* non-finite parameters: NaN where the reference (python/trous/dcls/reference.py) is non-finite, in
  construct, the direct depthwise convolution and the banded one (every output of a poisoned channel);
* non-finite x: the direct routes only spread NaN through taps of the kernel's support, the dense
  route (the reference, F.convNd) through the whole window;
* empty inputs and out-of-range positions;
* the 64-bit indexing promise: one slow test per op above 2^31 elements.
"""
import re

import pytest
import torch
from props import assert_refused, assert_same_nan_and_close

from dcls_helpers import VERSIONS
from helpers import seeded
from trous.dcls import banded as db
from trous.dcls import conv as dc
from trous.dcls import reference as ref

ops = torch.ops.trous
NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------ valid samples
def construct_args(version="gauss", O=3, I=2, kc=4, dks=(5, 3), dtype=torch.float64, seed=0):
    g = seeded(seed)
    w = torch.randn(O, I, kc, generator=g, dtype=dtype)
    P = (torch.rand(len(dks), O, I, kc, generator=g, dtype=dtype) * 2 - 1) * 2
    SIG = (torch.rand(P.shape, generator=g, dtype=dtype) + 0.2) if version in ("max", "gauss") else None
    return [w, P, SIG, list(dks), version]


def conv_args(version="gauss", N=2, C=3, kc=3, sp=(7, 6), dks=(5, 3), stride=(1, 1), padding=(2, 1),
              dtype=torch.float64, seed=0, bias=True):
    g = seeded(seed)
    x = torch.randn(N, C, *sp, generator=g, dtype=dtype)
    w, P, SIG, _, _ = construct_args(version, C, 1, kc, dks, dtype, seed + 1)
    b = torch.randn(C, generator=g, dtype=dtype) if bias else None
    return [x, w, P, SIG, b, list(dks), version, list(stride), list(padding)]


def banded_args(N=2, c_in=4, c_out=6, groups=2, L=11, dks=5, dtype=torch.float64, seed=0):
    g = seeded(seed)
    x = torch.randn(N, c_in, L, generator=g, dtype=dtype)
    K = torch.randn(c_out, c_in // groups, dks, generator=g, dtype=dtype)
    band = torch.zeros(c_out, c_in // groups, 2, dtype=torch.int32)
    band[..., 1] = dks
    b = torch.randn(c_out, generator=g, dtype=dtype)
    return [x, K, band, b, 1, 2, groups]


def conv_out(args):
    return ops.dcls_conv(*args)


def conv_bwd_args(args):
    x, w, P, SIG, _, dks, version, stride, padding = args
    go = torch.randn(conv_out(args).shape, dtype=x.dtype)
    return [go, x, w, P, SIG, dks, version, stride, padding, [True, True]]


def banded_bwd_args(args):
    x, K, band, _, s, p, g = args
    go = torch.randn(ops.dcls_banded_conv1d(*args).shape, dtype=x.dtype)
    return [go, x, K, band, s, p, g, [True, True]]


def with_(args, i, v):
    a = list(args)
    a[i] = v
    return a


# ------------------------------------------------------------------- the same refusal on meta
C_ARGS = construct_args()
V_ARGS = conv_args()
B_ARGS = banded_args()

BAD = [
    # (id, op, args, names the message must contain one of)
    ("construct-dks-0", ops.dcls_construct_kernel, with_(C_ARGS, 3, [0, 5]), ["dilated_kernel_size"]),
    ("construct-P-shape", ops.dcls_construct_kernel, with_(C_ARGS, 1, torch.randn(2, 3, 2, 5, dtype=torch.float64)),
     ["P"]),
    ("construct-weight-2d", ops.dcls_construct_kernel, with_(C_ARGS, 0, torch.randn(3, 2, dtype=torch.float64)),
     ["weight"]),
    ("construct-bogus", ops.dcls_construct_kernel, with_(C_ARGS, 4, "bogus"), ["version"]),
    ("construct-SIG-none", ops.dcls_construct_kernel, with_(C_ARGS, 2, None), ["SIG"]),
    ("construct-SIG-dtype", ops.dcls_construct_kernel, with_(C_ARGS, 2, C_ARGS[2].float()), ["SIG"]),
    ("construct-bwd-gradK", ops.dcls_construct_kernel_backward,
     [torch.randn(3, 2, 5, 4, dtype=torch.float64)] + C_ARGS, ["grad_K"]),
    ("construct-bwd-dks", ops.dcls_construct_kernel_backward,
     [torch.randn(3, 2, 5, 3, dtype=torch.float64)] + with_(C_ARGS, 3, [5, -3]), ["dilated_kernel_size"]),
    ("conv-dks-0", ops.dcls_conv, with_(V_ARGS, 5, [0, 5]), ["dilated_kernel_size"]),
    ("conv-P-shape", ops.dcls_conv, with_(V_ARGS, 2, torch.randn(2, 3, 1, 4, dtype=torch.float64)), ["P"]),
    ("conv-weight-channels", ops.dcls_conv, with_(V_ARGS, 1, torch.randn(4, 1, 3, dtype=torch.float64)),
     ["weight"]),
    ("conv-weight-not-depthwise", ops.dcls_conv, with_(V_ARGS, 1, torch.randn(3, 2, 3, dtype=torch.float64)),
     ["weight"]),
    ("conv-bogus", ops.dcls_conv, with_(V_ARGS, 6, "bogus"), ["version"]),
    ("conv-SIG-none", ops.dcls_conv, with_(V_ARGS, 3, None), ["SIG"]),
    ("conv-bias", ops.dcls_conv, with_(V_ARGS, 4, torch.randn(4, dtype=torch.float64)), ["bias"]),
    ("conv-x-rank", ops.dcls_conv, with_(V_ARGS, 0, torch.randn(2, 3, 7, dtype=torch.float64)), ["x"]),
    ("conv-x-int", ops.dcls_conv, with_(V_ARGS, 0, torch.ones(2, 3, 7, 6, dtype=torch.int32)), ["x"]),
    ("conv-x-small", ops.dcls_conv, with_(with_(V_ARGS, 0, torch.randn(2, 3, 1, 6, dtype=torch.float64)), 8, [0, 0]),
     ["x"]),
    ("conv-stride-0", ops.dcls_conv, with_(V_ARGS, 7, [0]), ["stride"]),
    ("conv-padding-neg", ops.dcls_conv, with_(V_ARGS, 8, [-1, 0]), ["padding"]),
    ("conv-padding-len", ops.dcls_conv, with_(V_ARGS, 8, [1, 1, 1]), ["padding"]),
    ("conv-bwd-grad-out", ops.dcls_conv_backward,
     with_(conv_bwd_args(V_ARGS), 0, torch.randn(2, 3, 7, 5, dtype=torch.float64)), ["grad_out"]),
    ("conv-bwd-grad-out-dtype", ops.dcls_conv_backward,
     with_(conv_bwd_args(V_ARGS), 0, torch.randn(2, 3, 7, 6)), ["grad_out"]),
    ("tap-counts-P", ops.dcls_conv_tap_counts,
     [V_ARGS[1], torch.randn(1, 3, 1, 3, dtype=torch.float64), V_ARGS[3], [5, 3], "gauss"], ["P"]),
    ("tap-counts-dks", ops.dcls_conv_tap_counts, [V_ARGS[1], V_ARGS[2], V_ARGS[3], [5, 0], "gauss"],
     ["dilated_kernel_size"]),
    ("banded-groups-0", ops.dcls_banded_conv1d, with_(B_ARGS, 6, 0), ["groups"]),
    ("banded-groups-3", ops.dcls_banded_conv1d, with_(B_ARGS, 6, 3), ["groups"]),
    ("banded-K-channels", ops.dcls_banded_conv1d, with_(B_ARGS, 1, torch.randn(6, 3, 5, dtype=torch.float64)),
     ["K"]),
    ("banded-band-shape", ops.dcls_banded_conv1d, with_(B_ARGS, 2, torch.zeros(6, 2, 3, dtype=torch.int32)),
     ["band"]),
    ("banded-band-dtype", ops.dcls_banded_conv1d, with_(B_ARGS, 2, torch.zeros(6, 2, 2, dtype=torch.int64)),
     ["band"]),
    ("banded-bias", ops.dcls_banded_conv1d, with_(B_ARGS, 3, torch.randn(5, dtype=torch.float64)), ["bias"]),
    ("banded-x-rank", ops.dcls_banded_conv1d, with_(B_ARGS, 0, torch.randn(2, 4, dtype=torch.float64)), ["x"]),
    ("banded-stride", ops.dcls_banded_conv1d, with_(B_ARGS, 4, 0), ["stride"]),
    ("banded-bwd-grad-out", ops.dcls_banded_conv1d_backward,
     with_(banded_bwd_args(B_ARGS), 0, torch.randn(2, 6, 10, dtype=torch.float64)), ["grad_out"]),
]


@pytest.mark.parametrize("op, args, names", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_meta_refuses_what_cpu_refuses_naming_the_argument(op, args, names):
    assert_refused(op, args, names=names)


GOOD = [
    ("construct", ops.dcls_construct_kernel, C_ARGS),
    ("construct-bwd", ops.dcls_construct_kernel_backward, [torch.randn(3, 2, 5, 3, dtype=torch.float64)] + C_ARGS),
    ("conv", ops.dcls_conv, V_ARGS),
    ("conv-bwd", ops.dcls_conv_backward, conv_bwd_args(V_ARGS)),
    ("tap-counts", ops.dcls_conv_tap_counts, [V_ARGS[1], V_ARGS[2], V_ARGS[3], [5, 3], "gauss"]),
    ("banded", ops.dcls_banded_conv1d, B_ARGS),
    ("banded-bwd", ops.dcls_banded_conv1d_backward, banded_bwd_args(B_ARGS)),
]


def _meta(v):
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("op, args", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_meta_shapes_match_cpu(op, args):
    cpu = _flat(op(*args))
    meta = _flat(op(*[_meta(a) for a in args]))
    assert [t.shape for t in meta] == [t.shape for t in cpu]
    assert [t.dtype for t in meta] == [t.dtype for t in cpu]
    assert all(t.device.type == "meta" for t in meta)


@pytest.mark.parametrize("op, args", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_opcheck_every_op(op, args):
    torch.library.opcheck(op.default, tuple(args))


@pytest.mark.parametrize("op, args", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_mixed_devices_name_the_stray_argument(op, args):
    """Every tensor argument in turn on meta (the others on CPU): refused before any kernel runs,
    naming it (as the stray argument, or as the device reference the others are compared with)."""
    names = [a.name for a in op.default._schema.arguments]
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        mixed = [_meta(v) if j == i else v for j, v in enumerate(args)]
        with pytest.raises(RuntimeError, match=r"must be on the device of") as e:
            op(*mixed)
        msg = str(e.value).splitlines()[0]
        assert re.search(rf"(?<![A-Za-z_]){names[i]}(?![A-Za-z_])", msg) and "meta" in msg, msg


def test_dcls_conv_cpu_x_with_meta_weight_is_refused():
    """Issue 9: this returned a CPU tensor of garbage."""
    a = list(V_ARGS)
    a[1] = a[1].to("meta")
    with pytest.raises(RuntimeError, match=r"trous.dcls_conv: weight must be on the device of x \(cpu\), got meta"):
        ops.dcls_conv(*a)


@pytest.mark.parametrize("op, args, which", [
    (ops.dcls_construct_kernel_backward, [torch.randn(3, 2, 5, 3, dtype=torch.float64)] + C_ARGS, 1),
    (ops.dcls_conv_backward, conv_bwd_args(V_ARGS), 1),
    (ops.dcls_conv_tap_counts, [V_ARGS[1], V_ARGS[2], V_ARGS[3], [5, 3], "gauss"], 1),
    (ops.dcls_banded_conv1d_backward, banded_bwd_args(B_ARGS), 2),
], ids=["construct-bwd", "conv-bwd", "tap-counts", "banded-bwd"])
def test_ops_without_derivative_refuse_grad(op, args, which):
    a = list(args)
    a[which] = a[which].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=r"requires grad, but this op has no derivative"):
        op(*a)
    with torch.no_grad():
        op(*a)


def test_forward_ops_keep_their_autograd():
    w, P, SIG, dks, v = construct_args()
    w.requires_grad_()
    ops.dcls_construct_kernel(w, P, SIG, dks, v).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    a = conv_args()
    a[0] = a[0].clone().requires_grad_()
    ops.dcls_conv(*a).sum().backward()
    assert a[0].grad.shape == a[0].shape
    b = banded_args()
    b[1] = b[1].clone().requires_grad_()
    ops.dcls_banded_conv1d(*b).sum().backward()
    assert b[1].grad.shape == b[1].shape


def test_fake_tensor_mode_runs_the_meta_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        a = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in V_ARGS]
        assert ops.dcls_conv(*a).shape == (2, 3, 7, 6)
        with pytest.raises(RuntimeError, match=r"dilated_kernel_size entries must be in \[1, 1023\]"):
            ops.dcls_conv(*with_(a, 5, [0, 5]))
        with pytest.raises(RuntimeError, match=r"version must be one of"):
            ops.dcls_conv(*with_(a, 6, "bogus"))


@pytest.mark.parametrize("which", ["construct", "conv", "banded"])
def test_compile_dynamic_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    if which == "construct":
        def fn(w, P, SIG):
            return ops.dcls_construct_kernel(w, P, SIG, [5, 3], "gauss") * 2

        inputs = [construct_args(O=o, I=2, kc=3, dtype=torch.float32, seed=o)[:3] for o in (3, 5)]
    elif which == "conv":
        def fn(x, w, P, SIG):
            return dc.dcls_depthwise_conv(x, w, P, SIG, [5, 3], "v1", 1, [2, 1]) + 1

        inputs = []
        for n, h in ((2, 7), (3, 9)):
            a = conv_args("v1", N=n, sp=(h, 6), dtype=torch.float32, seed=n)
            inputs.append([a[0], a[1], a[2], None])
    else:
        def fn(x, w, P):
            return db.dcls_banded_conv1d(x, w, P, None, 5, "v1", 1, 2, 2) - 1

        inputs = []
        for n, L in ((2, 11), (3, 14)):
            g = seeded(n)
            inputs.append([torch.randn(n, 4, L, generator=g), torch.randn(6, 2, 2, generator=g),
                           torch.rand(1, 6, 2, 2, generator=g) * 4 - 2])
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for args in inputs:
        torch.testing.assert_close(compiled(*args), fn(*args))


# --------------------------------------------------------------------- non-finite parameters
def expected_nan(r):
    """What the kernels give where the reference is non-finite: NaN (an infinite weight gives
    +-inf on the element's support and NaN elsewhere in the reference, NaN throughout here)."""
    return torch.where(torch.isinf(r), torch.full_like(r, NAN), r)


# (which tensor, its value, the versions) -> all cases; the reference decides what is NaN.
NONFINITE = [(t, v) for t in ("P", "SIG", "weight") for v in (NAN, INF, -INF)]
# Every version with every poisoned parameter it has (v0 / v1 have no SIG).
POISONED = [(ver, t, v) for ver in VERSIONS for t, v in NONFINITE if t != "SIG" or ver in ("max", "gauss")]
POISONED_IDS = [f"{ver}-{t}={v}" for ver, t, v in POISONED]


def _poison(args, which, value, idx):
    a = list(args)
    pos = {"weight": 0, "P": 1, "SIG": 2}[which]
    if a[pos] is None:
        return None
    a[pos] = a[pos].clone()
    a[pos][idx] = value
    return a


@pytest.mark.parametrize("version, which, value", POISONED, ids=POISONED_IDS)
def test_construct_nonfinite_parameters_nan_where_the_reference_is(version, which, value):
    args = construct_args(version, O=3, I=2, kc=3, dks=(5, 4))
    idx = (0, 1, 0, 2) if which != "weight" else (1, 0, 2)
    a = _poison(args, which, value, idx)
    assert a is not None
    got = ops.dcls_construct_kernel(*a)
    want = ref.construct_kernel(*a)
    assert_same_nan_and_close(got, expected_nan(want), rtol=1e-9, atol=1e-12)
    # Only the channel of the element is affected; the others are the reference's finite values.
    assert torch.isfinite(got[2]).all()


def test_v0_infinite_position_gives_nan_not_zero():
    """Issue 9: v0 with P = +-inf gave a zero kernel where the reference gives NaN."""
    for value in (INF, -INF):
        w, P, _, dks, _ = construct_args("v0", O=1, I=1, kc=2, dks=(5,))
        P[0, 0, 0, 1] = value
        assert torch.isnan(ref.construct_kernel(w, P, None, dks, "v0")).all()
        assert torch.isnan(ops.dcls_construct_kernel(w, P, None, dks, "v0")).all()
        x = torch.randn(2, 1, 9, dtype=torch.float64)
        assert torch.isnan(ops.dcls_conv(x, w, P, None, None, dks, "v0", [1], [2])).all()
        assert ops.dcls_conv_tap_counts(w, P, None, dks, "v0").tolist() == [5]  # the whole window


def test_infinite_positions_that_the_reference_keeps_finite():
    """v1 / max / gauss elements at P = +-inf lie outside the window (they contribute 0), and a gauss
    SIG = +-inf spreads an element evenly over the window: finite, as in the reference."""
    for version in ("v1", "max", "gauss"):
        args = construct_args(version, O=2, I=1, kc=2, dks=(5,))
        a = _poison(args, "P", INF, (0, 0, 0, 1))
        got, want = ops.dcls_construct_kernel(*a), ref.construct_kernel(*a)
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    a = _poison(construct_args("gauss", O=1, I=1, kc=1, dks=(5,)), "SIG", INF, (0, 0, 0, 0))
    got = ops.dcls_construct_kernel(*a)
    torch.testing.assert_close(got, a[0][..., :1] * torch.full((1, 1, 5), 1 / (5 + 1e-7), dtype=torch.float64))


@pytest.mark.parametrize("version, which, value", POISONED, ids=POISONED_IDS)
def test_conv_nonfinite_parameters_poison_the_channel(version, which, value):
    args = conv_args(version, N=2, C=3, kc=3, sp=(7, 6), dks=(5, 3), padding=(2, 1))
    idx = (1, 1, 0, 2) if which != "weight" else (1, 0, 2)
    p = _poison([args[1], args[2], args[3]], which, value, idx)
    assert p is not None
    a = [args[0], *p, *args[4:]]
    got = ops.dcls_conv(*a)
    want = ref.dcls_depthwise_conv(a[0], a[1], a[2], a[3], a[5], version, a[7], a[8], a[4])
    assert_same_nan_and_close(got, expected_nan(want), rtol=1e-9, atol=1e-10)
    # A channel is either all finite or all NaN (every output of a poisoned channel).
    bad = torch.isnan(got).flatten(2)
    assert torch.equal(bad.any(-1), bad.all(-1))


@pytest.mark.parametrize("version, which, value", POISONED, ids=POISONED_IDS)
def test_banded_nonfinite_parameters_poison_the_output_channel(version, which, value):
    g = seeded(5)
    x = torch.randn(2, 4, 13, generator=g, dtype=torch.float64)
    w = torch.randn(6, 2, 2, generator=g, dtype=torch.float64)
    P = torch.rand(1, 6, 2, 2, generator=g, dtype=torch.float64) * 4 - 2
    SIG = torch.rand(P.shape, generator=g, dtype=torch.float64) + 0.2 if version in ("max", "gauss") else None
    p = _poison([w, P, SIG], which, value, (0, 4, 1, 1) if which != "weight" else (4, 1, 1))
    assert p is not None
    w, P, SIG = p
    got = db.dcls_banded_conv1d(x, w, P, SIG, 7, version, 1, 3, 2)
    want = ref.dcls_conv(x, w, P, SIG, None, [7], version, 1, 3, groups=2)
    assert_same_nan_and_close(got, expected_nan(want), rtol=1e-9, atol=1e-10)
    assert torch.isfinite(got[:, :4]).all() and torch.isfinite(got[:, 5:]).all()


def test_reference_nan_claims():
    """What the reference (dcls's formulas) does with non-finite parameters, checked: the cases
    above rest on it. Poisoning: the whole window of the element's channel is non-finite."""
    def K(version, which, value):
        a = _poison(construct_args(version, O=1, I=1, kc=2, dks=(5, 4)), which, value,
                    (0, 0, 0, 1) if which != "weight" else (0, 0, 1))
        return ref.construct_kernel(*a)

    for version in VERSIONS:
        assert torch.isnan(K(version, "P", NAN)).all()
        assert (~torch.isfinite(K(version, "weight", INF))).all()
        assert torch.isnan(K(version, "weight", NAN)).all()
    assert torch.isnan(K("v0", "P", INF)).all() and torch.isnan(K("v0", "P", -INF)).all()
    assert torch.isfinite(K("v1", "P", INF)).all() and torch.isfinite(K("max", "P", -INF)).all()
    assert torch.isnan(K("max", "SIG", INF)).all() and torch.isnan(K("max", "SIG", NAN)).all()
    assert torch.isfinite(K("gauss", "SIG", INF)).all() and torch.isfinite(K("gauss", "P", INF)).all()
    a = construct_args("gauss", O=1, I=1, kc=1, dks=(5,))
    a[1][0, 0, 0, 0] = INF
    a[2][0, 0, 0, 0] = INF
    assert torch.isnan(ref.construct_kernel(*a)).all()
    assert torch.isnan(ops.dcls_construct_kernel(*a)).all()


# ------------------------------------------------------------------------------ non-finite x
def _one_tap_layer(C=2, dks=9):
    """v1 elements at integer positions: each channel's support is one tap (the window's centre)."""
    w = torch.randn(C, 1, 1, dtype=torch.float64)
    P = torch.zeros(1, C, 1, 1, dtype=torch.float64)
    return w, P


@pytest.mark.parametrize("value", [NAN, INF])
def test_nan_in_x_direct_route_only_through_the_support(value):
    """Decided (issue 9): on the direct routes NaN / Inf in x reach only outputs that read them
    through a tap of the kernel's support; the dense route (F.conv1d with the constructed kernel,
    the reference) spreads NaN to every output whose window covers it (0 * NaN = NaN)."""
    w, P = _one_tap_layer()
    x = torch.randn(2, 2, 20, dtype=torch.float64)
    x[1, 0, 10] = value
    direct = ops.dcls_conv(x, w, P, None, None, [9], "v1", [1], [4])
    dense = ref.dcls_depthwise_conv(x, w, P, None, [9], "v1", 1, 4)
    bad_direct = ~torch.isfinite(direct)
    assert bad_direct.sum() == 1 and not torch.isfinite(direct[1, 0, 10])
    assert (~torch.isfinite(dense[1, 0, 6:15])).all() and torch.isnan(dense).sum() == 8 + (value != value)
    if value != value:
        assert torch.isnan(direct[1, 0, 10])
    keep = torch.isfinite(dense)
    torch.testing.assert_close(direct[keep], dense[keep])


def test_nan_in_x_banded_route_only_through_the_band():
    """The banded route visits taps lo <= s < hi of each row: NaN in x reaches an output only
    through them (v1 at an integer position: band [4, 6), 2 of the 9 taps)."""
    g = seeded(2)
    x = torch.randn(2, 2, 20, generator=g, dtype=torch.float64)
    x[0, 1, 7] = NAN
    w = torch.randn(3, 2, 1, generator=g, dtype=torch.float64)
    P = torch.zeros(1, 3, 2, 1, dtype=torch.float64)
    band = db.dcls_band1d(P, None, 9, "v1")
    assert (band[..., 0] == 4).all() and (band[..., 1] == 6).all()
    direct = db.dcls_banded_conv1d(x, w, P, None, 9, "v1", 1, 4, 1)
    dense = ref.dcls_conv(x, w, P, None, None, [9], "v1", 1, 4)
    # out[t] reads x[t + s - 4] for s in [4, 6): t = 7 and t = 6.
    want = torch.zeros_like(direct, dtype=torch.bool)
    want[0, :, 6:8] = True
    assert torch.equal(torch.isnan(direct), want)
    assert torch.isnan(dense[0, :, 3:12]).all() and torch.isnan(dense).sum() == 27
    keep = torch.isfinite(dense)
    torch.testing.assert_close(direct[keep], dense[keep])


# ------------------------------------------------------------------- empty and out of range
def test_empty_inputs():
    a = conv_args("gauss", N=0)
    out = ops.dcls_conv(*a)
    assert out.shape == (0, 3, 7, 6)
    a = conv_args("v1", C=0, kc=2)
    assert ops.dcls_conv(*a).shape == (2, 0, 7, 6)
    K = ops.dcls_construct_kernel(torch.randn(0, 2, 3), torch.randn(1, 0, 2, 3), None, [5], "v1")
    assert K.shape == (0, 2, 5)
    K = ops.dcls_construct_kernel(torch.randn(2, 2, 0), torch.randn(1, 2, 2, 0), None, [5], "v1")
    assert K.shape == (2, 2, 5) and (K == 0).all()
    b = banded_args(N=0)
    assert ops.dcls_banded_conv1d(*b).shape == (0, 6, 11)
    with pytest.raises(RuntimeError, match=r"kernel_count = weight.size\(2\) must be at least 1"):
        ops.dcls_conv(*conv_args("v1", kc=0))


@pytest.mark.parametrize("version", VERSIONS)
def test_positions_far_outside_the_window_give_the_bias(version):
    """Out-of-range (finite) positions, 1e6 taps away: every version's profile is 0 on the window
    (gauss underflows; nearer positions are renormalised onto the window, as in dcls), so the
    output is the bias, as the reference's."""
    a = conv_args(version, N=1, C=2, kc=2, sp=(6, 6), dks=(3, 3), padding=(1, 1))
    a[2] = torch.full_like(a[2], 1e6)
    got = ops.dcls_conv(*a)
    want = ref.dcls_depthwise_conv(a[0], a[1], a[2], a[3], a[5], version, a[7], a[8], a[4])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, a[4].view(1, 2, 1, 1).expand_as(got))
    K = ops.dcls_construct_kernel(a[1], a[2], a[3], a[5], version)
    assert (K == 0).all()


def test_banded_wrapper_names_weight_not_K():
    """Issue 9: the op sees the constructed K; a weight that does not fit x is reported as weight,
    with the same message on meta."""
    x = torch.randn(2, 4, 11)
    w = torch.randn(6, 3, 2)
    P = torch.rand(1, 6, 3, 2)
    msg = assert_refused(db.dcls_banded_conv1d, [x, w, P, None, 5, "v1", 1, 2, 2], names=["weight"])
    assert "C_in / groups = 2" in msg and "got [6, 3, 2]" in msg
    args = [x, torch.randn(5, 2, 2), torch.rand(1, 5, 2, 2), None, 5, "v1", 1, 2, 2]
    assert_refused(db.dcls_banded_conv1d, args, names=["weight"])


def test_band_is_the_whole_window_for_rows_with_nonfinite_taps():
    x = torch.randn(1, 2, 9, dtype=torch.float64)
    K = torch.zeros(2, 2, 5, dtype=torch.float64)
    K[0, 1, 0] = NAN
    band = torch.tensor([[[2, 3], [2, 3]], [[2, 3], [2, 3]]], dtype=torch.int32)
    w = torch.randn(2, 2, 1, dtype=torch.float64)
    P = torch.zeros(1, 2, 2, 1, dtype=torch.float64)
    P[0, 0, 1, 0] = NAN
    out = db.dcls_banded_conv1d(x, w, P, None, 5, "v1", 1, 2, 1, band=band)
    assert torch.isnan(out[:, 0]).all() and torch.isfinite(out[:, 1]).all()
    assert torch.isfinite(ops.dcls_banded_conv1d(x, K, band, None, 1, 2, 1)).all()  # the op trusts its band


# ------------------------------------------------------------------ 64-bit indexing (slow)
BIG = 2**31


@pytest.mark.slow
def test_conv_above_2_31_elements():
    """fp16 depthwise 2-D, kernel_count 1: x has 2 * 1024 * 1025 * 1025 > 2^31 elements (4.3 GB),
    out (stride 2) 1.1 GB; outputs of the last channels, whose inputs lie beyond 2^31, against the
    reference on that slice."""
    N, C, H = 2, 1024, 1025
    assert N * C * H * H > BIG
    x = torch.empty(N, C, H, H, dtype=torch.float16)
    g = seeded(0)
    for n in range(N):
        x[n].normal_(generator=g)
    w = torch.randn(C, 1, 1, generator=g)
    P = torch.rand(2, C, 1, 1, generator=g) * 2 - 1
    out = ops.dcls_conv(x, w, P, None, None, [3, 3], "v1", [2, 2], [1, 1])
    assert out.shape == (N, C, 513, 513)
    cs = slice(C - 3, C)
    want = ref.dcls_depthwise_conv(x[1:, cs].double(), w[cs].double(), P[:, cs].double(), None, [3, 3], "v1", 2, 1)
    assert x[1, C - 3].data_ptr() - x.data_ptr() > BIG * 2  # the slice's inputs lie beyond 2^31 elements
    torch.testing.assert_close(out[1:, cs].double(), want, rtol=4e-3, atol=4e-3)
    want0 = ref.dcls_depthwise_conv(x[:1, :2].double(), w[:2].double(), P[:, :2].double(), None, [3, 3], "v1", 2, 1)
    torch.testing.assert_close(out[:1, :2].double(), want0, rtol=4e-3, atol=4e-3)


@pytest.mark.slow
def test_construct_above_2_31_elements():
    """K of 2^21 * 1025 > 2^31 fp16 elements (4.3 GB): v1, kernel_count 1, 1-D window of 1025;
    the last channels (beyond 2^31) against the reference on that slice."""
    O, dks = 2**21, 1025
    assert O * dks > BIG
    g = seeded(1)
    w = torch.randn(O, 1, 1, generator=g).half()
    P = ((torch.rand(1, O, 1, 1, generator=g) * 2 - 1) * 500).half()
    K = ops.dcls_construct_kernel(w, P, None, [dks], "v1")
    assert K.shape == (O, 1, dks)
    for sl in (slice(O - 4, O), slice(0, 4), slice(O // 2, O // 2 + 4)):
        want = ref.construct_kernel(w[sl].double(), P[:, sl].double(), None, [dks], "v1")
        torch.testing.assert_close(K[sl].double(), want, rtol=2e-3, atol=2e-3)
