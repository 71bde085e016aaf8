"""DCLS cases (ops read "direct <pass> vs <baseline>"): trous' direct depthwise DCLS convolution
(``trous.dcls.conv``) against the dcls
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

from ..bench.harness import Case

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
    from .. import dcls as tdcls
    from . import conv as dc

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
    from .. import dcls as tdcls
    from . import banded as db

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
    route = ours.route(x0)
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
