"""DCLS cases (ops read "direct <pass> vs <baseline>"): trous' direct depthwise DCLS convolution (``trous._dcls_conv``) against the dcls
0.1.1 package (eager and under torch.compile), trous' own "construct the dense kernel, then the best
dense depthwise convolution" route, and plain depthwise convolutions of 7x7 and of the dilated size
(channels_last: oneDNN's fast layout on CPU), all measured in the same run.

Shapes (``../shared/spec/dcls.md``): ConvNeXt-T stage 1 (8, 96, 56, 56) and stage 4 (8, 768, 7, 7)
with kc 34, dks 17, padding 8; DCLS-Audio gauss kc 26, dks 23 at stage-1 size. Positions are drawn
two ways: ``init`` (the dcls initialisation, N(0, 0.5) clamped: most elements near the centre) and
``trained`` (uniform over the window, as after training); SIG is the gauss init 0.23 (sigma 0.5).

Baselines: "dcls" = the package's Dcls2d eager, "dcls compiled" = the same under torch.compile,
"construct+cl" = trous' Dcls2d(strategy="construct") (fused kernel construction, then oneDNN's
channels_last depthwise conv), "dense kxk cl" = F.conv2d with a given kxk kernel, channels_last.
Every timed call is forward + backward (``torch.autograd.grad`` of all inputs: no accumulation)
unless the op says ``fwd``. ``extra`` holds the bytes saved for backward by each side, over the
input size (issue 3: <= 1.5x for depthwise layers; the dcls package: ~4.5x), and the mean taps per
channel of the direct kernel.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .harness import Case

FAMILY = "dcls"

# (name, N, C, H, kc, dks); padding dks // 2, stride 1.
STAGE1 = ("stage1", 8, 96, 56, 34, 17)
STAGE4 = ("stage4", 8, 768, 7, 34, 17)
AUDIO = ("audio", 8, 96, 56, 26, 23)
# SNN synaptic delays: Dcls1d(140, 256, kernel_count=1, groups=1, dilated_kernel_size=25), input
# (64, 140, 160) padded left by dks - 1 by the user (output length 136).
SNN = ("snn", 64, 140, 256, 160, 1, 25)


def targets(device: str) -> dict:
    """Issue 3: CPU >= 4x dcls eager (stage 1) and >= 5x (stage 4), fwd+bwd; GPU >= 3x."""
    return {"speedup": 3.0 if device == "cuda" else 4.0}


def _params(C: int, kc: int, d: int, version: str, placement: str, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, 1, kc, generator=g) * 2 - 1) / math.sqrt(kc)
    if placement == "init":
        P = (torch.randn(2, C, 1, kc, generator=g) * 0.5).clamp(-(d // 2), d // 2)
    else:
        P = (torch.rand(2, C, 1, kc, generator=g) * 2 - 1) * (d // 2)
    SIG = torch.full_like(P, 0.23) if version in ("gauss", "max") else None
    b = torch.rand(C, generator=g) * 0.1
    out = [t.to(device).requires_grad_() if t is not None else None for t in (w, P, SIG, b)]
    return out


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    sizes = {}

    def pack(t):
        sizes[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def _grad_all(y: torch.Tensor, leaves: Sequence[torch.Tensor]):
    return torch.autograd.grad(y, [t for t in leaves if t is not None], torch.ones_like(y))


def _no_grad(fn):
    def run(x):
        with torch.no_grad():
            return fn(x)
    return run


def _peer_modules():
    """The dcls package's DCLS.construct.modules, or None when it is not installed."""
    try:
        import logging

        logging.getLogger().setLevel(logging.ERROR)  # its "implicit GEMM not installed" warnings
        from DCLS.construct import modules
    except Exception:  # noqa: BLE001
        return None
    return modules


def _dcls_peer(C, kc, d, version, w, P, SIG, b, device):
    """The dcls package's Dcls2d (depthwise) holding the same parameter values, or None."""
    modules = _peer_modules()
    if modules is None:
        return None
    m = modules.Dcls2d(C, C, kc, padding=d // 2, dilated_kernel_size=d, groups=C, version=version).to(device)
    with torch.no_grad():
        m.weight.copy_(w)
        m.P.copy_(P)
        if SIG is not None:
            m.SIG.copy_(SIG)
        m.bias.copy_(b)
    return m


def _cases_for(spec, version: str, placement: str, device: str, quick: bool, tg: dict) -> List[Case]:
    from .. import _dcls_conv as dc
    from .. import dcls as tdcls

    name, N, C, H, kc, d = spec
    pad = d // 2
    w, P, SIG, b = _params(C, kc, d, version, placement, device, seed=7)
    x_bytes = N * C * H * H * 4
    shape = f"{name} {N}x{C}x{H}x{H} kc{kc} d{d} {version} {placement}"
    taps = float(dc.dcls_tap_counts(w, P, SIG, (d, d), version).float().mean())

    def make_x(i):
        g = torch.Generator().manual_seed(100 + i)
        return (torch.randn(N, C, H, H, generator=g).to(device).requires_grad_(),)

    def make_x_cl(i):
        (x,) = make_x(i)
        return (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),)

    def direct(x):
        return dc.dcls_depthwise_conv(x, w, P, SIG, (d, d), version, 1, pad, bias=b)

    def direct_fb(x):
        return _grad_all(direct(x), [x, w, P, SIG, b])

    direct_f = _no_grad(direct)

    x0 = make_x(0)[0]
    saved_direct = _saved_bytes(lambda: direct(x0))
    peer = _dcls_peer(C, kc, d, version, w.detach(), P.detach(), None if SIG is None else SIG.detach(),
                      b.detach(), device)
    common = dict(family=FAMILY, shape=shape, dtype="fp32", bytes_moved=4 * x_bytes, input_bytes=x_bytes)
    extra = {"taps_per_channel": round(taps, 1), "window": d * d,
             "saved_vs_input_trous": round(saved_direct / x_bytes, 3)}
    out: List[Case] = []
    if peer is not None:
        peer_params = [peer.weight, peer.P, peer.SIG, peer.bias]
        saved_peer = _saved_bytes(lambda: peer(x0))
        ex = dict(extra, saved_vs_input_baseline=round(saved_peer / x_bytes, 3))
        out.append(Case(op="direct fwd+bwd vs dcls", make_inputs=make_x, fn=direct_fb,
                        baseline=lambda x: _grad_all(peer(x), [x] + peer_params),
                        baseline_name="dcls 0.1.1 eager", targets=dict(tg), extra=ex, **common))
        out.append(Case(op="direct fwd vs dcls", make_inputs=make_x, fn=direct_f,
                        baseline=_no_grad(peer),
                        baseline_name="dcls 0.1.1 eager (no grad)", extra=ex, **common))
        if not quick:
            compiled = torch.compile(peer, dynamic=False)  # dynamic shapes trip an inductor bug here
            out.append(Case(op="direct fwd+bwd vs dcls compiled", make_inputs=make_x, fn=direct_fb,
                            baseline=lambda x: _grad_all(compiled(x), [x] + peer_params),
                            baseline_name="dcls 0.1.1 torch.compile", extra=ex, **common))

    # trous' construct route: fused kernel construction + the dense conv (channels_last on CPU).
    tmod = tdcls.Dcls2d(C, C, kc, padding=pad, dilated_kernel_size=d, groups=C, version=version,
                        strategy="construct").to(device)
    with torch.no_grad():
        tmod.weight.copy_(w)
        tmod.P.copy_(P)
        if SIG is not None:
            tmod.SIG.copy_(SIG)
        tmod.bias.copy_(b)
    tparams = [tmod.weight, tmod.P, tmod.SIG, tmod.bias]
    out.append(Case(op="direct fwd+bwd vs construct+cl", make_inputs=make_x, fn=direct_fb,
                    baseline=lambda x: _grad_all(tmod(x), [x] + tparams),
                    baseline_name="trous construct + dense conv (channels_last)", extra=dict(extra), **common))
    out.append(Case(op="direct fwd vs construct+cl", make_inputs=make_x, fn=direct_f,
                    baseline=_no_grad(tmod),
                    baseline_name="trous construct + dense conv (channels_last), no grad", extra=dict(extra),
                    **common))

    # Plain depthwise convolutions, kernel given (no construction): dks x dks and 7x7, channels_last.
    if not quick or name == "stage1":
        for k in ([d, 7] if not quick else [d]):
            K = (torch.randn(C, 1, k, k) / k).to(device).contiguous(memory_format=torch.channels_last)
            K.requires_grad_()
            bb = b.detach().clone().requires_grad_()

            def dense_fb(x, K=K, k=k, bb=bb):
                return _grad_all(F.conv2d(x, K, bb, 1, k // 2, 1, C), [x, K, bb])

            # Same (channels_last) input on both sides: the direct op makes its contiguous copy.
            out.append(Case(op=f"direct fwd+bwd vs dense {k}x{k} cl", make_inputs=make_x_cl, fn=direct_fb,
                            baseline=dense_fb,
                            baseline_name=f"depthwise {k}x{k} conv, channels_last, kernel given",
                            extra=dict(extra), **common))
    return out


def _snn_cases(version: str, sig: Optional[float], device: str, quick: bool) -> List[Case]:
    """The SNN delay layer (groups 1, kc 1): trous.Dcls1d (strategy "auto": the banded route when
    its cost model says so) against the dcls package's Dcls1d (eager and compiled) and a plain
    conv1d of the dilated size with the kernel given. ``sig`` sets SIG (gauss): 0.23 is the
    initialisation (sigma 0.5), a large value the start of SNN delay training."""
    from .. import _dcls_banded as db
    from .. import dcls as tdcls

    name, N, ci, co, L, kc, d = SNN
    shape = f"{name} {N}x{ci}x{L} -> {co} kc{kc} d{d} {version}" + (f" SIG {sig}" if sig is not None else "")
    torch.manual_seed(11)
    ours = tdcls.Dcls1d(ci, co, kc, dilated_kernel_size=d, version=version).to(device)
    if sig is not None:
        with torch.no_grad():
            ours.SIG.fill_(sig)
    params = [p for p in (ours.weight, ours.P, ours.SIG, ours.bias) if p is not None]
    band = db.dcls_band1d(ours.P, ours.SIG, d, version)
    width = float((band[..., 1] - band[..., 0]).float().mean())
    x_bytes = N * ci * L * 4

    def make_x(i):
        g = torch.Generator().manual_seed(200 + i)
        return (torch.randn(N, ci, L, generator=g).to(device).requires_grad_(),)

    def ours_fb(x):
        return _grad_all(ours(x), [x] + params)

    x0 = make_x(0)[0]
    saved = _saved_bytes(lambda: ours(x0))
    route = "banded" if ours._direct(x0, ours.weight, ours.P, ours.SIG, ours.padding) is not None else "construct"
    common = dict(family=FAMILY, shape=shape, dtype="fp32", bytes_moved=4 * x_bytes, input_bytes=x_bytes)
    extra = {"band_width_mean": round(width, 2), "window": d, "route": route,
             "saved_vs_input_trous": round(saved / x_bytes, 3)}
    tg = {"speedup": 5.0} if device == "cpu" and (sig is None or sig < 1) else {}  # issue 3, at init
    out: List[Case] = []
    modules = _peer_modules()
    if modules is not None:
        peer = modules.Dcls1d(ci, co, kc, dilated_kernel_size=d, version=version).to(device)
        peer.load_state_dict(ours.state_dict())
        pparams = [p for p in (peer.weight, peer.P, peer.SIG, peer.bias) if p is not None]
        ex = dict(extra, saved_vs_input_baseline=round(_saved_bytes(lambda: peer(x0)) / x_bytes, 3))
        out.append(Case(op=f"{route} fwd+bwd vs dcls", make_inputs=make_x, fn=ours_fb,
                        baseline=lambda x: _grad_all(peer(x), [x] + pparams), baseline_name="dcls 0.1.1 eager",
                        targets=dict(tg), extra=ex, **common))
        out.append(Case(op=f"{route} fwd vs dcls", make_inputs=make_x, fn=_no_grad(ours), baseline=_no_grad(peer),
                        baseline_name="dcls 0.1.1 eager (no grad)", extra=ex, **common))
        if not quick:
            compiled = torch.compile(peer, dynamic=False)  # dynamic shapes trip an inductor bug here
            out.append(Case(op=f"{route} fwd+bwd vs dcls compiled", make_inputs=make_x, fn=ours_fb,
                            baseline=lambda x: _grad_all(compiled(x), [x] + pparams),
                            baseline_name="dcls 0.1.1 torch.compile", extra=ex, **common))
    K = (torch.randn(co, ci, d) / math.sqrt(ci * d)).to(device).requires_grad_()
    out.append(Case(op=f"{route} fwd+bwd vs dense conv1d k{d}", make_inputs=make_x, fn=ours_fb,
                    baseline=lambda x: _grad_all(F.conv1d(x, K), [x, K]),
                    baseline_name=f"conv1d k{d}, kernel given", extra=dict(extra), **common))
    return out


def cases(device: str, quick: bool, shape: Optional[Sequence[int]] = None) -> List[Case]:
    """Stage 1 and stage 4 (v1 and gauss, init and trained positions), DCLS-Audio gauss and the SNN
    delay layer (v1, gauss at init SIG and at a large SIG). --quick: stage 1 and stage 4 with
    trained positions and the SNN layer at init, fewer baselines. ``shape`` (N, C, H, kc, dks)
    replaces the 2-D shapes (and drops the SNN layer)."""
    tg = targets(device)
    specs = [STAGE1, STAGE4] + ([] if quick else [AUDIO])
    if shape is not None:
        if len(shape) != 5:
            raise SystemExit("dcls --shape is N,C,H,kc,dks")
        specs = [("custom",) + tuple(int(s) for s in shape)]
    out: List[Case] = []
    for spec in specs:
        versions = ["gauss"] if spec[0] == "audio" else ["v1", "gauss"]
        placements = ["trained"] if quick else ["init", "trained"]
        for version in versions:
            for placement in placements:
                tgs = dict(tg)
                if spec[0] == "stage4" and device != "cuda":
                    tgs = {"speedup": 5.0}
                out += _cases_for(spec, version, placement, device, quick, tgs)
    if shape is None:
        snn = [("v1", None), ("gauss", 0.23)] + ([] if quick else [("gauss", 5.0)])
        for version, sig in snn:
            out += _snn_cases(version, sig, device, quick)
    return out


# ---- smoke case for bench/gpu_kernels_smoke.py (compute-sanitizer runs on a GPU machine)

def _smoke_close(a, b, rtol, atol):
    return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def smoke_dcls_conv(r, quick: bool):
    """bench/gpu_kernels_smoke.py's case for the direct depthwise DCLS convolution (``r`` is its
    Runner): forward and backward (both masks), every version, 1/2/3-D, strides, fp32 and (CUDA, not
    quick) fp16 / bf16, against the fp64 CPU reference's autograd. SMOKE entry:
    ``("trous::dcls_conv", "trous::dcls_conv_backward", "trous::dcls_conv_tap_counts"): smoke_dcls_conv``
    (``from trous.bench.dcls import smoke_dcls_conv``)."""
    from trous.reference import dcls_conv as ref

    dev = r.device
    shapes = [((2, 3, 23), (9,), [2], [4]), ((2, 3, 11, 13), (5, 7), [1, 2], [2, 3]),
              ((1, 2, 5, 6, 7), (3, 5, 3), [1, 2, 1], [1, 2, 1])]
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if dev == "cuda" and not quick else [])
    for shape, dks, stride, pad in shapes:
        for version in ("v0", "v1", "max", "gauss"):
            for dtype in dtypes:
                label = f"dcls_conv {version} {tuple(shape)} {dtype}"

                def run(shape=shape, dks=dks, stride=stride, pad=pad, version=version, dtype=dtype, label=label):
                    g = torch.Generator().manual_seed(0)
                    nd, C = len(dks), shape[1]
                    sig = version in ("max", "gauss")
                    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
                    w = torch.randn(C, 1, 4, generator=g, dtype=torch.float64)
                    P = (torch.rand(nd, C, 1, 4, generator=g, dtype=torch.float64) * 2 - 1) * (max(dks) // 2 + 0.5)
                    SIG = 0.2 + torch.rand(P.shape, generator=g, dtype=torch.float64) if sig else None
                    b = torch.randn(C, generator=g, dtype=torch.float64)
                    dx = x.to(dev, dtype)
                    dw, dP, dS, db = [t.to(dev, torch.float32) if t is not None else None for t in (w, P, SIG, b)]
                    out = r.call("trous::dcls_conv", dx, dw, dP, dS, db, list(dks), version, stride, pad)
                    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
                    got = r.call("trous::dcls_conv_backward", gout.to(dev), dx, dw, dP, dS, list(dks), version, stride,
                                 pad, [True, True])
                    r.call("trous::dcls_conv_backward", gout.to(dev), dx, dw, dP, dS, list(dks), version, stride, pad,
                           [False, True])
                    if dev == "cpu":
                        r.call("trous::dcls_conv_tap_counts", dw, dP, dS, list(dks), version)
                    if not r.compare:
                        return
                    leaves = [t.clone().requires_grad_() for t in (x, w, P) + ((SIG,) if sig else ())]
                    want = ref.dcls_depthwise_conv(leaves[0], leaves[1], leaves[2], leaves[3] if sig else None, dks,
                                                   version, stride, pad, bias=b)
                    wgrads = torch.autograd.grad(want, leaves, gout.double())
                    tol = 2e-5 if dtype == torch.float32 else 3e-2
                    r.check(label + " out", _smoke_close(out.double().cpu(), want.detach(), tol, tol), "output differs")
                    for name, a, e in zip(("grad_x", "grad_w", "grad_P", "grad_SIG"), got, wgrads):
                        r.check(f"{label} {name}", _smoke_close(a.double().cpu(), e, 5 * tol, 5 * tol), f"{name} differs")

                r.case(label, run)


def smoke_dcls_banded(r, quick: bool):
    """bench/gpu_kernels_smoke.py's case for the banded grouped 1-D convolution: forward and backward
    (every mask), every version, groups 1 / 2, strides 1 / 3, padding, fp32 and (CUDA, not quick)
    fp16 / bf16, against the fp64 CPU reference's autograd. SMOKE entry:
    ``("trous::dcls_banded_conv1d", "trous::dcls_banded_conv1d_backward"): smoke_dcls_banded``."""
    from trous import _dcls_banded as db
    from trous.reference import dcls as ref

    dev = r.device
    # (N, C_in, C_out, L, kc, dks, stride, padding, groups)
    shapes = [(2, 5, 4, 37, 1, 25, 1, 0, 1), (1, 4, 6, 19, 3, 7, 3, 2, 2)]
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if dev == "cuda" and not quick else [])
    for N, ci, co, L, kc, d, st, pd, groups in shapes:
        for version in ("v0", "v1", "max", "gauss"):
            for dtype in dtypes:
                label = f"dcls_banded_conv1d {version} {(N, ci, co, L)} g{groups} s{st} {dtype}"

                def run(N=N, ci=ci, co=co, L=L, kc=kc, d=d, st=st, pd=pd, groups=groups, version=version,
                        dtype=dtype, label=label):
                    g = torch.Generator().manual_seed(3)
                    sig = version in ("max", "gauss")
                    x = torch.randn(N, ci, L, generator=g, dtype=torch.float64).to(dtype).double()
                    w = torch.randn(co, ci // groups, kc, generator=g, dtype=torch.float64)
                    P = (torch.rand(1, co, ci // groups, kc, generator=g, dtype=torch.float64) * 2 - 1) * (d // 2 + 1)
                    SIG = 0.2 + torch.rand(P.shape, generator=g, dtype=torch.float64) if sig else None
                    b = torch.randn(co, generator=g, dtype=torch.float64)
                    K = ref.construct_kernel(w, P, SIG, (d,), version).float()
                    band = db.dcls_band1d(P.float(), SIG.float() if sig else None, d, version)
                    dx, dK, dband, db_ = x.to(dev, dtype), K.to(dev), band.to(dev), b.float().to(dev)
                    out = r.call("trous::dcls_banded_conv1d", dx, dK, dband, db_, st, pd, groups)
                    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
                    got = r.call("trous::dcls_banded_conv1d_backward", gout.to(dev), dx, dK, dband, st, pd, groups,
                                 [True, True])
                    r.call("trous::dcls_banded_conv1d_backward", gout.to(dev), dx, dK, dband, st, pd, groups,
                           [False, True])
                    if not r.compare:
                        return
                    xl, Kl = x.clone().requires_grad_(), K.double().requires_grad_()
                    want = torch.nn.functional.conv1d(xl, Kl, b, st, pd, 1, groups)
                    wgrads = torch.autograd.grad(want, [xl, Kl], gout.double())
                    # grad_K is only defined inside the bands (zero elsewhere by contract).
                    s = torch.arange(d)
                    inside = (s >= band[..., :1]) & (s < band[..., 1:])
                    wgrads = (wgrads[0], wgrads[1] * inside)
                    tol = 2e-5 if dtype == torch.float32 else 3e-2
                    r.check(label + " out", _smoke_close(out.double().cpu(), want.detach(), tol, tol), "output differs")
                    for name, a, e in zip(("grad_x", "grad_K"), got, wgrads):
                        r.check(f"{label} {name}", _smoke_close(a.double().cpu(), e, 5 * tol, 5 * tol), f"{name} differs")

                r.case(label, run)
