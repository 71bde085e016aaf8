"""Direct depthwise DCLS convolution (trous.ops.dcls_conv): forward and every gradient against
(1) the spec reference trous.dcls.reference (fp64 autograd through a dense kernel) and
(2) the dcls 0.1.1 package itself (ConstructKernel + F.convNd; skipped if it is not installed),
fp64 gradcheck, opcheck on every sample, sparsity of the tap sets, and argument errors."""

import pytest
import torch
import torch.nn.functional as F

from dcls_helpers import VERSIONS, dcls_package_modules
from helpers import (
    assert_cuda_low_precision,
    assert_matches_on_device,
    close,
    output_and_grads,
    seeded,
)
from trous.dcls import conv as dc
from trous.dcls import reference as ref

# (id, N, C, kc, spatial, dks, stride, padding)
CONFIGS = [
    ("1d", 2, 3, 5, (23,), (9,), (1,), (4,)),
    ("1d-stride2-kc1", 1, 2, 1, (20,), (7,), (2,), (0,)),
    ("2d-nonsquare", 2, 3, 4, (11, 13), (5, 7), (1, 1), (2, 3)),
    ("2d-stride2-odd", 1, 2, 3, (9, 12), (7, 3), (2, 2), (3, 1)),
    ("2d-stride-mixed", 2, 2, 3, (10, 9), (3, 5), (1, 2), (0, 2)),
    ("3d", 1, 2, 3, (5, 6, 7), (3, 5, 3), (1, 2, 1), (1, 2, 1)),
]


def make(cfg, version, dtype=torch.float64, seed=0, p_spread=0.7, sig=0.3):
    """Random inputs; P uniform over the window plus p_spread beyond each edge."""
    _, N, C, kc, sp, dks, stride, padding = cfg
    g = seeded(seed)
    nd = len(dks)
    x = torch.randn(N, C, *sp, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, kc, generator=g, dtype=torch.float64)
    P = torch.empty(nd, C, 1, kc, dtype=torch.float64)
    for r in range(nd):
        lim = dks[r] // 2 + p_spread
        P[r] = (torch.rand(C, 1, kc, generator=g, dtype=torch.float64) * 2 - 1) * lim
    SIG = None
    if version in ("gauss", "max"):
        sign = torch.where(torch.rand(P.shape, generator=g) < 0.5, -1.0, 1.0).double()
        SIG = sig * (0.5 + torch.rand(P.shape, generator=g, dtype=torch.float64)) * sign
    b = torch.randn(C, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) if t is not None else None for t in (x, w, P, SIG, b)]
    return cast, dict(dilated_kernel_size=dks, version=version, stride=stride, padding=padding)


def run_both(tensors, kw, impl):
    """Output and gradients of impl(x, w, P, SIG, dks, version, stride, padding, bias)."""
    return output_and_grads(tensors, lambda x, w, P, SIG, b: impl(
        x, w, P, SIG, kw["dilated_kernel_size"], kw["version"], kw["stride"], kw["padding"], bias=b))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference_fp64(cfg, version):
    tensors, kw = make(cfg, version)
    out, grads = run_both(tensors, kw, dc.dcls_depthwise_conv)
    rout, rgrads = run_both(tensors, kw, ref.dcls_depthwise_conv)
    close(out, rout, 1e-12)
    for a, b in zip(grads, rgrads):
        close(a, b, 1e-11)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[5]], ids=["1d", "2d", "3d"])
def test_fp32_matches_fp64_reference(cfg, version):
    tensors, kw = make(cfg, version, seed=1)
    out, grads = run_both([t.float() if t is not None else None for t in tensors], kw, dc.dcls_depthwise_conv)
    rout, rgrads = run_both(tensors, kw, ref.dcls_depthwise_conv)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    close(out, rout, 2e-6)
    for a, b in zip(grads, rgrads):
        close(a, b, 2e-5)




@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[5]], ids=["1d", "2d", "2d-s2", "3d"])
def test_matches_dcls_package(cfg, version):
    """The peer's own construction + F.convNd, fp32, same parameters: outputs and all gradients."""
    modules = dcls_package_modules()
    tensors, kw = make(cfg, version, dtype=torch.float32, seed=2)
    C, kc, dks = tensors[0].shape[1], tensors[1].shape[2], kw["dilated_kernel_size"]
    construct = {1: modules.ConstructKernel1d, 2: modules.ConstructKernel2d, 3: modules.ConstructKernel3d}[len(dks)]
    dck = construct(C, C, C, kc, dks, version)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(dks)]

    def peer(x, w, P, SIG, dks_, version_, stride, padding, bias=None):
        return conv(x, dck(w, P, SIG), bias, stride, padding, 1, C)

    out, grads = run_both(tensors, kw, dc.dcls_depthwise_conv)
    pout, pgrads = run_both(tensors, kw, peer)
    close(out, pout, 5e-6)
    for a, b in zip(grads, pgrads):
        close(a, b, 5e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_dcls_layer_drop_in(version):
    """A Dcls2d depthwise layer of the peer (its parameters, padding dks // 2) through the direct op."""
    modules = dcls_package_modules()
    torch.manual_seed(3)
    m = modules.Dcls2d(6, 6, kernel_count=5, dilated_kernel_size=(7, 9), padding=(3, 4), groups=6, version=version)
    if version == "max":
        with torch.no_grad():
            m.SIG.uniform_(-0.5, 0.5)  # the package's init (0) never learns; test a learned value too
    x = torch.randn(2, 6, 12, 10)
    want = m(x)
    got = dc.dcls_depthwise_conv(x, m.weight, m.P, m.SIG, m.dilated_kernel_size, version, m.stride, m.padding,
                                 bias=m.bias)
    close(got.detach(), want.detach(), 5e-6)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_gradcheck_fp64(version, nd):
    cfg = {1: ("g1", 2, 2, 3, (9,), (5,), (2,), (2,)),
           2: ("g2", 1, 2, 2, (6, 7), (3, 5), (1, 2), (1, 2)),
           3: ("g3", 1, 1, 2, (4, 4, 5), (3, 3, 3), (1, 1, 2), (1, 0, 1))}[nd]
    tensors, kw = make(cfg, version, seed=4, p_spread=0.4)
    leaves = [t.clone().requires_grad_() for t in tensors if t is not None]
    has_sig = tensors[3] is not None

    def fn(*args):
        x, w, P = args[:3]
        SIG = args[3] if has_sig else None
        b = args[-1]
        return dc.dcls_depthwise_conv(x, w, P, SIG, kw["dilated_kernel_size"], version, kw["stride"], kw["padding"],
                                      bias=b)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(tensors, kw):
    x, w, P, SIG, b = tensors
    return (x, w, P, SIG if kw["version"] in ("gauss", "max") else None, b, list(kw["dilated_kernel_size"]),
            kw["version"], list(kw["stride"]), list(kw["padding"]))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[5]], ids=["1d", "2d", "3d"])
def test_opcheck(cfg, version):
    tensors, kw = make(cfg, version, dtype=torch.float32, seed=5)
    args = _op_args([t.requires_grad_() if t is not None else None for t in tensors], kw)
    torch.library.opcheck(torch.ops.trous.dcls_conv.default, args)
    x, w, P, SIG = args[:4]
    out = torch.ops.trous.dcls_conv(*args)
    bargs = (torch.randn_like(out).detach(), x.detach(), w.detach(), P.detach(),
             None if SIG is None else SIG.detach(), *args[5:], [True, True])
    torch.library.opcheck(torch.ops.trous.dcls_conv_backward.default, bargs)
    torch.library.opcheck(torch.ops.trous.dcls_conv_backward.default, bargs[:-1] + ([False, True],))
    torch.library.opcheck(torch.ops.trous.dcls_conv_tap_counts.default,
                          (w.detach(), P.detach(), None if SIG is None else SIG.detach(), args[5], version))


def test_no_bias_and_partial_grads():
    tensors, kw = make(CONFIGS[2], "gauss", dtype=torch.float32, seed=6)
    x, w, P, SIG, _ = tensors
    P.requires_grad_()
    out = dc.dcls_depthwise_conv(x, w, P, SIG, **kw)
    (gP,) = torch.autograd.grad(out.square().sum(), [P])
    rP = P.detach().clone().requires_grad_()
    rout = ref.dcls_depthwise_conv(x.double(), w.double(), rP.double(), SIG.double(), **kw)
    (rgP,) = torch.autograd.grad(rout.square().sum(), [rP])
    close(out, rout, 2e-6)
    close(gP, rgP, 5e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_edges_and_far_positions(version):
    """P exactly at, just beyond and far beyond the window edges (v1 renormalises partial mass)."""
    cfg = ("edge", 1, 6, 3, (11, 12), (9, 7), (1, 1), (4, 3))
    tensors, kw = make(cfg, version, seed=7)
    P = tensors[2]
    edge = torch.tensor([4.0, 4.6, -4.6, 3.999, 9.0, -30.0]).double()
    P[0, :, 0, 0] = edge
    P[1, :, 0, 1] = -edge
    out, grads = run_both(tensors, kw, dc.dcls_depthwise_conv)
    rout, rgrads = run_both(tensors, kw, ref.dcls_depthwise_conv)
    close(out, rout, 1e-12)
    for a, b in zip(grads, rgrads):
        close(a, b, 1e-11)


def test_v1_partial_mass_is_renormalised():
    """dcls quirk (spec): v1 with P = 4.6 in a 9-wide window still has total weight 1."""
    w = torch.ones(1, 1, 1)
    P = torch.full((1, 1, 1, 1), 4.6)
    x = torch.ones(1, 1, 9)
    out = dc.dcls_depthwise_conv(x, w, P, None, (9,), "v1", 1, 0)
    torch.testing.assert_close(out, torch.ones(1, 1, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sig", [3.0, 12.0, 60.0])
def test_gauss_large_sigma_snn(sig):
    """SNN delay learning: kc 1, dks 25, large SIG, causal left padding through F.pad."""
    torch.manual_seed(8)
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    w = torch.randn(5, 1, 1, dtype=torch.float64)
    P = torch.rand(1, 5, 1, 1, dtype=torch.float64) * 24 - 12
    SIG = torch.full_like(P, sig)
    xp = F.pad(x, (24, 0))
    tensors = [xp, w, P, SIG, None]
    kw = dict(dilated_kernel_size=(25,), version="gauss", stride=(1,), padding=(0,))
    out, grads = run_both(tensors, kw, dc.dcls_depthwise_conv)
    rout, rgrads = run_both(tensors, kw, ref.dcls_depthwise_conv)
    assert out.shape == (3, 5, 40)
    close(out, rout, 1e-12)
    for a, b in zip(grads, rgrads):
        close(a, b, 1e-11)
    counts = dc.dcls_tap_counts(w, P, SIG, (25,), "gauss")
    assert (counts == 25).all(), "a large sigma must keep the whole window"


def test_tap_sets_are_sparse():
    torch.manual_seed(9)
    C, kc, d = 8, 34, 17
    w = torch.randn(C, 1, kc)
    P = (torch.rand(2, C, 1, kc) * 2 - 1) * (d // 2)
    for version in ("v0", "v1"):
        counts = dc.dcls_tap_counts(w, P, None, (d, d), version)
        assert int(counts.max()) <= 4 * kc, version
    SIG = torch.full_like(P, 0.23)  # gauss init: sigma 0.5, 7 taps per axis
    P0 = torch.zeros_like(P)
    assert int(dc.dcls_tap_counts(w, P0, SIG, (d, d), "gauss").max()) == 49
    assert int(dc.dcls_tap_counts(w, P0, torch.zeros_like(P), (d, d), "max").max()) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    tensors, kw = make(CONFIGS[2], "gauss", seed=10)
    low = [tensors[0].to(dtype)] + [t.float() if t is not None else None for t in tensors[1:]]
    out, grads = run_both(low, kw, dc.dcls_depthwise_conv)
    rout, rgrads = run_both([low[0].double()] + tensors[1:], kw, ref.dcls_depthwise_conv)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    close(out, rout, tol)
    for a, b in zip(grads, rgrads):
        close(a, b, tol * 2)


def test_strided_input_and_empty_batch():
    tensors, kw = make(CONFIGS[2], "v1", dtype=torch.float32, seed=11)
    x = tensors[0]
    want = dc.dcls_depthwise_conv(x, *tensors[1:4], **kw, bias=tensors[4])
    got = dc.dcls_depthwise_conv(x.contiguous(memory_format=torch.channels_last), *tensors[1:4], **kw,
                                 bias=tensors[4])
    torch.testing.assert_close(got, want)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(dc.dcls_depthwise_conv(xt, *tensors[1:4], **kw, bias=tensors[4]), want)
    empty = x[:0].clone().requires_grad_()
    w = tensors[1].clone().requires_grad_()
    out = dc.dcls_depthwise_conv(empty, w, tensors[2], None, **kw)
    assert out.shape == (0, 3, 11, 13)
    out.sum().backward()
    assert empty.grad.shape == empty.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_compiles():
    tensors, kw = make(CONFIGS[2], "gauss", dtype=torch.float32, seed=12)
    x, w, P, SIG, b = [t.requires_grad_() for t in tensors]

    def f(x, w, P, SIG, b):
        return dc.dcls_depthwise_conv(x, w, P, SIG, **kw, bias=b).square().sum()

    eager = torch.autograd.grad(f(x, w, P, SIG, b), [x, w, P, SIG, b])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, P, SIG, b), [x, w, P, SIG, b])
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e)


def test_saves_only_inputs_for_backward():
    """Memory saved for backward: x, weight, P, SIG (the spec target is <= 1.5x the input)."""
    tensors, kw = make(("m", 2, 16, 34, (24, 24), (17, 17), (1, 1), (8, 8)), "gauss", dtype=torch.float32)
    x, w, P, SIG, b = [t.requires_grad_() for t in tensors]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dc.dcls_depthwise_conv(x, w, P, SIG, **kw, bias=b)
    assert sum(saved) <= 1.5 * x.numel() * x.element_size()


# ---- argument errors

def _ok_args():
    x = torch.randn(2, 4, 10, 10)
    w = torch.randn(4, 1, 3)
    P = torch.randn(2, 4, 1, 3)
    return x, w, P, P.abs()


@pytest.mark.parametrize("mutate, match", [
    (lambda a: dict(a, version="v2"), r"version must be one of"),
    (lambda a: dict(a, weight=torch.randn(4, 2, 3)), r"weight must have shape \[C, 1, kernel_count\]"),
    (lambda a: dict(a, weight=torch.randn(5, 1, 3)), r"weight must have shape"),
    (lambda a: dict(a, P=torch.randn(1, 4, 1, 3)), r"P must have shape \[2, 4, 1, 3\]"),
    (lambda a: dict(a, SIG=None), r"needs SIG"),
    (lambda a: dict(a, SIG=torch.randn(2, 4, 1, 2)), r"SIG must have the shape of P"),
    (lambda a: dict(a, x=torch.randn(2, 4, 10)), r"x must have shape \[N, C, \*spatial\] with 2 spatial"),
    (lambda a: dict(a, x=torch.randn(2, 4, 10, 10).int()), r"x must be float32"),
    (lambda a: dict(a, dks=[13, 13]), r"padded input size 10 .* smaller than the dilated kernel size 13"),
    (lambda a: dict(a, stride=[0]), r"stride must be positive"),
    (lambda a: dict(a, padding=[1, 2, 3]), r"padding must have 1 or 2 entries"),
    (lambda a: dict(a, bias=torch.randn(3)), r"bias must have shape \[4\]"),
    (lambda a: dict(a, dks=[3, 3, 3, 3]), r"dilated_kernel_size must have 1, 2 or 3 entries"),
])
def test_bad_arguments(mutate, match):
    x, w, P, SIG = _ok_args()
    a = mutate(dict(x=x, weight=w, P=P, SIG=SIG, bias=None, dks=[5, 5], version="gauss", stride=[1], padding=[0]))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.trous.dcls_conv(a["x"], a["weight"], a["P"], a["SIG"], a["bias"], a["dks"], a["version"],
                                  a["stride"], a["padding"])


def test_backward_bad_grad_shape():
    x, w, P, SIG = _ok_args()
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[2, 4, 6, 6\]"):
        torch.ops.trous.dcls_conv_backward(torch.randn(2, 4, 5, 5), x, w, P, SIG, [5, 5], "gauss", [1], [0],
                                           [True, True])


def test_supported_and_cost_model():
    x, w, P, SIG = _ok_args()
    assert dc.dcls_direct_supported(x, w, P, SIG, (5, 5), "gauss", 1, 2)
    assert dc.dcls_direct_supported(x, w, P, None, (5, 5), "v1")
    assert not dc.dcls_direct_supported(x, w, P, None, (5, 5), "gauss")  # no SIG
    assert not dc.dcls_direct_supported(x, torch.randn(8, 1, 3), P, SIG, (5, 5), "gauss")  # not depthwise
    assert not dc.dcls_direct_supported(x.int(), w, P, SIG, (5, 5), "gauss")
    assert not dc.dcls_direct_supported(x, w, P, SIG, (13, 13), "gauss")  # window larger than the input
    assert not dc.dcls_direct_supported(x, w, P, SIG, (5, 5), "v9")
    big = torch.randn(8, 96, 56, 56)
    wb, Pb = torch.randn(96, 1, 34), torch.randn(2, 96, 1, 34) * 0.5
    assert dc.dcls_direct_is_faster(big, wb, Pb, None, (17, 17), "v1", 1, 8, training=True)
    assert dc.dcls_direct_is_faster(big, wb, Pb, Pb.abs() * 0 + 0.23, (17, 17), "gauss", 1, 8, training=True)


def test_bench_family_tiny():
    """python -m trous.bench --family dcls builds its cases; on a tiny shape the direct op and the
    baselines it is timed against give the same gradients (the benchmark compares like with like)."""
    from trous.bench import load_family

    cases = load_family("dcls").cases("cpu", quick=True, shape=(1, 4, 12, 3, 5))
    assert {c.op for c in cases} >= {"direct fwd+bwd vs construct+cl", "direct fwd vs construct+cl"}
    for c in cases:
        if c.op not in ("direct fwd+bwd vs dcls", "direct fwd+bwd vs construct+cl"):
            continue
        inputs = c.make_inputs(0)
        for a, b in zip(c.fn(*inputs), c.baseline(*inputs)):
            close(a, b, 5e-5)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[5]], ids=["1d", "2d-s2", "3d"])
def test_device_fp32(device, cfg, version):
    """fp32 on every available device (CUDA when present) against the fp64 CPU reference."""
    tensors, kw = make(cfg, version, seed=13)
    assert_matches_on_device(tensors, lambda t: run_both(t, kw, dc.dcls_depthwise_conv),
                             lambda t: run_both(t, kw, ref.dcls_depthwise_conv), device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_low_precision(dtype, version):
    tensors, kw = make(CONFIGS[2], version, seed=14)
    assert_cuda_low_precision(tensors, lambda t: run_both(t, kw, dc.dcls_depthwise_conv),
                              lambda t: run_both(t, kw, ref.dcls_depthwise_conv), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_opcheck_and_large_window():
    tensors, kw = make(("big", 2, 3, 40, (40, 41), (17, 17), (1, 1), (8, 8)), "gauss", seed=15, sig=4.0)
    cuda = [t.float().cuda() if t is not None else None for t in tensors]
    torch.library.opcheck(torch.ops.trous.dcls_conv.default, _op_args(cuda, kw))
    out, grads = run_both(cuda, kw, dc.dcls_depthwise_conv)
    cpu_out, cpu_grads = run_both([t.float() if t is not None else None for t in tensors], kw, dc.dcls_depthwise_conv)
    close(out.cpu(), cpu_out, 2e-5)
    for a, b in zip(grads, cpu_grads):
        close(a.cpu(), b, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_limits_come_from_the_kernels():
    """dcls_direct_supported reads the CUDA kernels' own limits: a ConvNeXt layer fits, a window
    whose tap build needs more shared memory than any GPU has does not, nor do 70000 channels."""
    dev = torch.cuda.current_device()
    assert dc._cuda_supported(dev, 96, 34, (17, 17))
    assert not dc._cuda_supported(dev, 96, 34, (1000, 1000))
    assert not dc._cuda_supported(dev, 70000, 34, (17, 17))
