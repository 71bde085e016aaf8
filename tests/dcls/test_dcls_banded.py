"""Banded grouped 1-D DCLS convolution (trous.ops.dcls_banded_conv1d, the direct route of Dcls1d
layers that are not depthwise): forward and every gradient against (1) the spec reference
trous.dcls.reference (fp64 autograd through the dense kernel + F.conv1d) and (2) the dcls 0.1.1
package itself (skipped if it is not installed); fp64 gradcheck, opcheck, the band, the module's
strategy choice, and argument errors."""

import os

import pytest
import torch

import trous
from dcls_helpers import VERSIONS, dcls_package_modules
from helpers import (
    assert_cuda_low_precision,
    assert_matches_on_device,
    close,
    output_and_grads,
    seeded,
)
from trous.dcls import banded as db
from trous.dcls import reference as ref

# (id, N, C_in, C_out, L, kc, dks, stride, padding, groups)
CONFIGS = [
    ("g1", 2, 5, 4, 23, 3, 9, 1, 2, 1),
    ("g1-kc1-snn", 3, 6, 7, 30, 1, 11, 1, 0, 1),
    ("g2-stride2", 1, 4, 6, 17, 2, 5, 2, 1, 2),
    ("g4-stride3-pad", 2, 8, 8, 31, 2, 7, 3, 4, 4),
    ("g1-lout1", 2, 3, 2, 9, 2, 9, 1, 0, 1),
]


def make(cfg, version, dtype=torch.float64, seed=0, p_spread=1.0, sig=0.3):
    """Random non-zero inputs; P uniform over the window plus p_spread beyond each edge."""
    _, N, ci, co, L, kc, d, stride, padding, groups = cfg
    g = seeded(seed)
    x = torch.randn(N, ci, L, generator=g, dtype=torch.float64)
    w = torch.randn(co, ci // groups, kc, generator=g, dtype=torch.float64)
    P = (torch.rand(1, co, ci // groups, kc, generator=g, dtype=torch.float64) * 2 - 1) * (d // 2 + p_spread)
    SIG = None
    if version in ("gauss", "max"):
        sign = torch.where(torch.rand(P.shape, generator=g) < 0.5, -1.0, 1.0).double()
        SIG = sig * (0.5 + torch.rand(P.shape, generator=g, dtype=torch.float64)) * sign
    b = torch.randn(co, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) if t is not None else None for t in (x, w, P, SIG, b)]
    return cast, dict(d=d, version=version, stride=stride, padding=padding, groups=groups)


def banded(x, w, P, SIG, b, kw):
    return db.dcls_banded_conv1d(x, w, P, SIG, kw["d"], kw["version"], kw["stride"], kw["padding"], kw["groups"], b)


def reference(x, w, P, SIG, b, kw):
    return ref.dcls_conv(x, w, P, SIG, b, (kw["d"],), kw["version"], kw["stride"], kw["padding"], kw["groups"])


def run(tensors, kw, impl, seed=99):
    """Output and gradients of every input that is not None."""
    return output_and_grads(tensors, lambda *leaves: impl(*leaves, kw), seed)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference_fp64(cfg, version):
    tensors, kw = make(cfg, version)
    out, grads = run(tensors, kw, banded)
    rout, rgrads = run(tensors, kw, reference)
    close(out, rout, 1e-12)
    for a, b in zip(grads, rgrads):
        close(a, b, 1e-11)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=[c[0] for c in CONFIGS[:4]])
def test_fp32_matches_fp64_reference(cfg, version):
    tensors, kw = make(cfg, version, seed=1)
    out, grads = run([t.float() if t is not None else None for t in tensors], kw, banded)
    rout, rgrads = run(tensors, kw, reference)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    close(out, rout, 2e-6)
    for a, b in zip(grads, rgrads):
        close(a, b, 2e-5)


def test_long_rows_cross_chunks_and_blocks():
    """Rows longer than one 64-output chunk and more input / output channels than one L1 block:
    the partial sums over source blocks and the masked chunk tails."""
    cfg = ("long", 2, 150, 130, 203, 1, 25, 1, 12, 1)
    for version in ("v1", "gauss"):
        tensors, kw = make(cfg, version, seed=3)
        out, grads = run([t.float() if t is not None else None for t in tensors], kw, banded)
        rout, rgrads = run(tensors, kw, reference)
        close(out, rout, 2e-6)
        for a, b in zip(grads, rgrads):
            close(a, b, 2e-5)




# Batches of 10 and more take the batch-lane CPU kernels (fp32, AVX-512): a batch that is not a
# multiple of 16, several source blocks and output tiles, runs of more than four taps, grouped
# rows, and stride 2 (its forward and grad_K stay on the per-sample kernels, its grad_x does not).
LANES_CONFIGS = [
    ("n11", 11, 5, 6, 26, 2, 9, 1, 1, 1),
    ("n17", 17, 6, 7, 30, 1, 11, 1, 0, 1),
    ("n33-g2-pad", 33, 8, 6, 41, 2, 9, 1, 3, 2),
    ("n16-stride2", 16, 5, 4, 23, 2, 7, 2, 1, 1),
    ("n20-blocks", 20, 40, 50, 70, 1, 25, 1, 12, 1),
]


@pytest.mark.skipif(not db.uses_batch_lanes(torch.empty(16, 1, 1), 1),
                    reason="the batch-lane kernels need AVX-512")
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", LANES_CONFIGS, ids=[c[0] for c in LANES_CONFIGS])
def test_batch_lane_kernels_match_reference_and_per_sample_kernels(cfg, version):
    tensors, kw = make(cfg, version, seed=5, sig=0.6)
    as_fp32 = [t.float() if t is not None else None for t in tensors]
    out, grads = run(as_fp32, kw, banded)
    rout, rgrads = run(tensors, kw, reference)
    close(out, rout, 2e-6)
    for a, b in zip(grads, rgrads):
        close(a, b, 2e-5)
    # Slices of fewer than 16 samples take the per-sample kernels: the same numbers to fp32 rounding.
    x = as_fp32[0]
    with torch.no_grad():
        slices = [banded(x[i:i + 8], *as_fp32[1:], kw) for i in range(0, x.shape[0], 8)]
    close(out, torch.cat(slices), 2e-6)
    # Each gradient alone (an input that needs no grad) equals its half of the pair.
    x, K, band, _, kw = _op_args(cfg, version)
    gy = torch.randn(x.shape[0], K.shape[0], out.shape[2], generator=seeded(6))
    args = (gy, x, K, band, kw["stride"], kw["padding"], kw["groups"])
    gx, gK = torch.ops.trous.dcls_banded_conv1d_backward(*args, [True, True])
    close(torch.ops.trous.dcls_banded_conv1d_backward(*args, [True, False])[0], gx, 1e-6)
    close(torch.ops.trous.dcls_banded_conv1d_backward(*args, [False, True])[1], gK, 1e-6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", [(5, 7, 3, 9, 2, 1), (6, 4, 1, 25, 2, 2), (4, 8, 2, 7, 1, 4)],
                         ids=["g1", "snn-kc1-g2", "g4"])
def test_layer_matches_dcls_package(shape, version, padding_mode):
    """trous.Dcls1d(strategy="direct") holding a dcls 0.1.1 layer's state dict: same outputs and
    gradients of the input and of every parameter (fp32)."""
    modules = dcls_package_modules()
    ci, co, kc, d, pad, groups = shape
    torch.manual_seed(5)
    peer = modules.Dcls1d(ci, co, kc, stride=1, padding=pad, dilated_kernel_size=d, groups=groups,
                          padding_mode=padding_mode, version=version)
    ours = trous.Dcls1d(ci, co, kc, stride=1, padding=pad, dilated_kernel_size=d, groups=groups,
                        padding_mode=padding_mode, version=version, strategy="direct")
    with torch.no_grad():
        peer.P.uniform_(-(d // 2) - 0.5, d // 2 + 0.5)  # trained positions, some past the window
        if peer.SIG is not None:
            peer.SIG.uniform_(0.1, 2.0)
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(3, ci, 29, generator=seeded(6))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [peer(xs[0]), ours(xs[1])]
    g = torch.randn(ys[0].shape, generator=seeded(7))
    pp = [p for p in (peer.weight, peer.P, peer.SIG, peer.bias) if p is not None]
    op = [p for p in (ours.weight, ours.P, ours.SIG, ours.bias) if p is not None]
    pg = torch.autograd.grad(ys[0], [xs[0]] + pp, g)
    og = torch.autograd.grad(ys[1], [xs[1]] + op, g)
    close(ys[1].detach(), ys[0].detach(), 5e-6)
    for a, b in zip(og, pg):
        close(a, b, 5e-5)


@pytest.mark.parametrize("sig", [3.0, 12.0])
def test_gauss_large_sigma_snn(sig):
    """SNN delay training starts with a large SIG: the band grows to the whole window, still exact."""
    cfg = ("snn", 2, 6, 5, 40, 1, 25, 1, 0, 1)
    tensors, kw = make(cfg, "gauss", seed=8, sig=sig)
    band = db.dcls_band1d(tensors[2], tensors[3], 25, "gauss")
    assert (band[..., 1] - band[..., 0]).float().mean() > 20
    out, grads = run(tensors, kw, banded)
    rout, rgrads = run(tensors, kw, reference)
    close(out, rout, 1e-12)
    for a, b in zip(grads, rgrads):
        close(a, b, 1e-11)


def test_band_is_tight():
    """v0 / v1 at kc 1: at most 2 taps; gauss at init sigma (0.5): at most 8 of 25 taps; elements
    entirely outside the window: empty rows; NaN positions: the whole window."""
    g = seeded(9)
    P = (torch.rand(1, 16, 8, 1, generator=g) * 2 - 1) * 12
    for version in ("v0", "v1"):
        band = db.dcls_band1d(P, None, 25, version)
        width = band[..., 1] - band[..., 0]
        assert band.dtype == torch.int32 and tuple(band.shape) == (16, 8, 2)
        assert width.max() <= 2 and width.min() >= 1
    band = db.dcls_band1d(P, torch.full_like(P, 0.23), 25, "gauss")
    width = band[..., 1] - band[..., 0]
    assert width.max() <= 8 and width.min() >= 4  # 4: a centre near the window's edge
    # Gauss, any sigma: every tap outside the band is below 2^-28 / dks of the element's peak (what
    # the band may drop), and the band holds at most one more tap per side than the taps above it.
    sig = (torch.rand(P.shape, generator=g) * 6 - 3) ** 3
    band = db.dcls_band1d(P, sig, 25, "gauss")
    i = torch.arange(25, dtype=torch.float64)
    f = torch.exp(-0.5 * ((i - (P[0].double() + 12)) / (sig[0].double().abs() + 0.27)) ** 2)
    f = f / f.amax(-1, keepdim=True)
    inside = (i >= band[..., :1]) & (i < band[..., 1:])
    assert f[~inside].max() < 2.0 ** -28 / 25
    needed = (f >= 2.0 ** -28 / 25).sum(-1)
    assert ((band[..., 1] - band[..., 0]) <= needed.squeeze(-1) + 2).all()
    far = torch.full((1, 2, 3, 1), 40.0)
    for version in VERSIONS:
        sig = torch.full_like(far, 0.23) if version in ("gauss", "max") else None
        if version == "gauss":
            continue  # a gauss element renormalises its far tail: never empty
        assert db.dcls_band1d(far, sig, 9, version).abs().sum() == 0
    nan = P.clone()
    nan[0, 3, 2, 0] = float("nan")
    band = db.dcls_band1d(nan, None, 25, "v1")
    assert band[3, 2].tolist() == [0, 25]
    x = torch.randn(1, 8, 30)
    w = torch.randn(16, 8, 1)
    out = db.dcls_banded_conv1d(x, w, nan, None, 25, "v1")
    assert torch.isnan(out[0, 3]).all() and not torch.isnan(out[0, 4]).any()


def test_elements_outside_the_window_give_the_bias():
    x = torch.randn(2, 3, 12)
    w = torch.randn(4, 3, 2)
    P = torch.full((1, 4, 3, 2), 30.0)
    b = torch.randn(4)
    for version in ("v0", "v1", "max"):
        sig = torch.zeros_like(P) if version == "max" else None
        out = db.dcls_banded_conv1d(x, w, P, sig, 5, version, bias=b)
        torch.testing.assert_close(out, b[None, :, None].expand_as(out), rtol=0, atol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_gradcheck_fp64(version):
    tensors, kw = make(("gc", 2, 4, 4, 11, 2, 5, 2, 2, 2), version, seed=10)
    x, w, P, SIG, b = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    if SIG is None:
        fn, inputs = (lambda x, w, P, b: banded(x, w, P, None, b, kw)), (x, w, P, b)
    else:
        fn, inputs = (lambda x, w, P, S, b: banded(x, w, P, S, b, kw)), (x, w, P, SIG, b)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_op_x_and_K():
    g = seeded(11)
    x = torch.randn(2, 4, 13, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    band = torch.tensor([[[0, 5], [1, 3]], [[2, 2], [4, 5]], [[0, 1], [0, 5]]] * 2, dtype=torch.int32)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, K, b: torch.ops.trous.dcls_banded_conv1d(x, K, band, b, 2, 1, 2),
                                    (x, K, b))


def _op_args(cfg, version, dtype=torch.float32):
    tensors, kw = make(cfg, version, dtype=dtype, seed=12)
    x, w, P, SIG, b = tensors
    K = torch.ops.trous.dcls_construct_kernel(w, P, SIG, [kw["d"]], version)
    band = db.dcls_band1d(P, SIG, kw["d"], version)
    return x, K, band, b, kw


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=[c[0] for c in CONFIGS[:4]])
def test_opcheck(cfg):
    x, K, band, b, kw = _op_args(cfg, "gauss")
    args = (x.requires_grad_(), K.requires_grad_(), band, b, kw["stride"], kw["padding"], kw["groups"])
    torch.library.opcheck(torch.ops.trous.dcls_banded_conv1d.default, args)
    torch.library.opcheck(torch.ops.trous.dcls_banded_conv1d.default, args[:3] + (None,) + args[4:])
    out = torch.ops.trous.dcls_banded_conv1d(*args)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.trous.dcls_banded_conv1d_backward.default,
                              (torch.randn_like(out), x.detach(), K.detach(), band) + args[4:] + (mask,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    """bf16 / fp16 input on the CPU: fp32 computation, output and grad_x in the input's dtype."""
    tensors, kw = make(CONFIGS[0], "gauss", seed=13)
    low = [tensors[0].to(dtype)] + [t.float() for t in tensors[1:]]
    out, grads = run(low, kw, banded)
    rout, rgrads = run([low[0].double()] + tensors[1:], kw, reference)
    assert out.dtype == dtype and grads[0].dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    close(out, rout, tol)
    for a, b in zip(grads, rgrads):
        close(a, b, 2 * tol)


def test_strided_input_and_empty_batch():
    tensors, kw = make(CONFIGS[0], "v1", dtype=torch.float32, seed=14)
    x = tensors[0]
    wide = torch.randn(x.shape[0], x.shape[1], 2 * x.shape[2])[:, :, ::2]
    wide.copy_(x)
    assert not wide.is_contiguous()
    torch.testing.assert_close(banded(wide, *tensors[1:], kw), banded(x, *tensors[1:], kw))
    empty = torch.randn(0, *x.shape[1:])
    out = banded(empty.requires_grad_(), *tensors[1:], kw)
    assert out.shape[0] == 0
    out.sum().backward()


def test_saves_only_x_and_the_kernel():
    """Saved for backward: x, the constructed kernel (C_out x C_in/g x dks), the band, and the
    construction's small parameters: nothing else of activation size."""
    tensors, kw = make(("snn", 4, 16, 32, 60, 1, 25, 1, 0, 1), "gauss", dtype=torch.float32, seed=15)
    leaves = [t.requires_grad_() for t in tensors]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        banded(*leaves, kw)
    x, w, P, SIG, _ = leaves
    K_size, band_size = 32 * 16 * 25, 32 * 16 * 2
    assert sorted(sizes) == sorted([x.numel(), K_size, band_size, w.numel(), P.numel(), SIG.numel()])


def test_compiles():
    tensors, kw = make(CONFIGS[2], "gauss", dtype=torch.float32, seed=16)
    fn = torch.compile(lambda *a: banded(*a, kw), fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in tensors]
    out = fn(*leaves)
    torch.testing.assert_close(out, banded(*leaves, kw))
    out.sum().backward()


# ---- the module's strategy

@pytest.mark.parametrize("batch", [2, 16], ids=["per-sample-kernels", "batch-lane-kernels"])
def test_module_auto_picks_banded_when_sparse_and_dense_when_not(batch):
    layer = trous.Dcls1d(12, 16, 1, dilated_kernel_size=25, version="gauss")
    x = torch.randn(batch, 12, 40)
    calls = []
    real = db.dcls_banded_conv1d

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    db.dcls_banded_conv1d, saved = spy, db.dcls_banded_conv1d
    try:
        y_auto = layer(x)
        assert calls, "init SIG (sigma 0.5, ~7 of 25 taps): auto must take the banded route"
        calls.clear()
        with torch.no_grad():
            layer.SIG.fill_(8.0)  # the whole window
        layer(x)
        assert not calls, "a full band is not faster than the dense convolution: auto must construct"
    finally:
        db.dcls_banded_conv1d = saved
    with torch.no_grad():
        layer.SIG.fill_(0.23)
    layer.strategy = "construct"
    torch.testing.assert_close(layer(x), y_auto, rtol=2e-6, atol=2e-6)


def test_module_direct_errors_are_clear():
    layer = trous.Dcls1d(4, 6, 2, dilated_kernel_size=5, version="v1", strategy="direct")
    with pytest.raises(RuntimeError, match=r"strategy='direct' is unavailable: .*banded_supported"):
        layer(torch.randn(4, 12))  # unbatched input
    assert layer(torch.randn(1, 4, 12)).shape == (1, 6, 8)


# ---- argument errors

def _good():
    x = torch.randn(2, 4, 10)
    K = torch.randn(6, 2, 5)
    band = torch.zeros(6, 2, 2, dtype=torch.int32)
    band[..., 1] = 5
    return [x, K, band, None, 1, 0, 2]


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, torch.randn(2, 4)), r"x must have shape \[N, C_in, L\]"),
    (lambda a: a.__setitem__(0, torch.randn(2, 4, 10).int()), r"x must be float32, float16 or bfloat16"),
    (lambda a: a.__setitem__(6, 3), r"x.size\(1\) = 4 must be divisible by groups = 3"),
    (lambda a: a.__setitem__(1, torch.randn(6, 3, 5)), r"K must have shape \[C_out, C_in / groups = 2"),
    (lambda a: a.__setitem__(1, torch.randn(5, 2, 5)), r"K.size\(0\) = 5 must be a positive multiple of groups = 2"),
    (lambda a: a.__setitem__(2, a[2].long()), r"band must be int32, got Long"),
    (lambda a: a.__setitem__(2, a[2][:5]), r"band must have shape \[6, 2, 2\]"),
    (lambda a: a[2].__setitem__((0, 0, 1), 6), r"band entries must satisfy 0 <= lo <= hi <= dilated_kernel_size = 5"),
    (lambda a: a[2].__setitem__((0, 0, 0), -1), r"band entries must satisfy"),
    (lambda a: a.__setitem__(4, 0), r"stride must be in \[1, 2\^20\), got 0"),
    (lambda a: a.__setitem__(5, -1), r"padding must be in \[0, 2\^20\), got -1"),
    (lambda a: a.__setitem__(0, torch.randn(2, 4, 3)),
     r"padded input length 3 is smaller than the dilated kernel size 5"),
    (lambda a: a.__setitem__(3, torch.randn(5)), r"bias must have shape \[6\], got \[5\]"),
])
def test_bad_arguments(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.trous.dcls_banded_conv1d(*args)


def test_backward_bad_grad_out():
    x, K, band, _, s, p, g = _good()
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[2, 6, 6\]"):
        torch.ops.trous.dcls_banded_conv1d_backward(torch.randn(2, 6, 5), x, K, band, s, p, g, [True, True])
    with pytest.raises(RuntimeError, match=r"grad_out must have the dtype of x"):
        torch.ops.trous.dcls_banded_conv1d_backward(torch.randn(2, 6, 6).double(), x, K, band, s, p, g, [True, True])


# ---- every available device (CUDA when present)

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=[c[0] for c in CONFIGS[:4]])
def test_device_fp32(device, cfg, version):
    tensors, kw = make(cfg, version, seed=17)
    assert_matches_on_device(tensors, lambda t: run(t, kw, banded), lambda t: run(t, kw, reference), device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_low_precision(dtype, version):
    tensors, kw = make(CONFIGS[0], version, seed=18)
    assert_cuda_low_precision(tensors, lambda t: run(t, kw, banded), lambda t: run(t, kw, reference), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_opcheck_snn_shape():
    x, K, band, b, kw = _op_args(("snn", 4, 20, 24, 60, 1, 25, 1, 0, 1), "v1")
    cuda = [t.cuda() for t in (x, K, band, b)]
    torch.library.opcheck(torch.ops.trous.dcls_banded_conv1d.default, (*cuda, 1, 0, 1))
    torch.testing.assert_close(torch.ops.trous.dcls_banded_conv1d(*cuda, 1, 0, 1).cpu(),
                               torch.ops.trous.dcls_banded_conv1d(x, K, band, b, 1, 0, 1), rtol=2e-5, atol=2e-5)


def test_batch_lane_decision_is_the_kernels():
    """The cost model asks the kernels' own decision: never below the batch threshold, for fp64 or for
    stride 2; at batch 16, fp32 and stride 1 exactly when the CPU has AVX-512 (the kernels' CPUID)
    and the SIMD paths are allowed (TROUS_CPU_SIMD=0 forces the scalar twins)."""
    x16 = torch.empty(16, 3, 5)
    assert not db.uses_batch_lanes(torch.empty(2, 3, 5), 1)
    assert not db.uses_batch_lanes(x16.double(), 1)
    assert not db.uses_batch_lanes(x16, 2)
    simd = os.environ.get("TROUS_CPU_SIMD", "1") != "0"
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and simd
    assert db.uses_batch_lanes(x16, 1) == avx512
    assert db.uses_batch_lanes(x16.bfloat16(), 1) == avx512
