"""``python -m trous.smoke`` cases of the DCLS ops (small and edge shapes), against the fp64 reference."""
import torch

from ..smoke import close
from . import banded as db
from . import reference as ref
from .versions import VERSIONS


def run(r, quick: bool):
    smoke_construct(r, quick)
    smoke_conv(r, quick)
    smoke_banded(r, quick)
    smoke_limits(r)


def smoke_limits(r):
    """The limit and heuristic ops the routing reads: plain values, on every device."""
    def run():
        lanes = r.call("trous::dcls_banded_uses_batch_lanes", 16, 1, torch.float32)
        r.check("dcls_banded_uses_batch_lanes 16", isinstance(lanes, bool), f"got {lanes!r}")
        r.check("dcls_banded_uses_batch_lanes 2", r.call("trous::dcls_banded_uses_batch_lanes", 2, 1, torch.float32)
                is False, "batch 2 must not use the lanes")
        dev = torch.cuda.current_device() if r.device == "cuda" else -1
        fits = r.call("trous::dcls_conv_cuda_supported", dev, 96, 34, [17, 17])
        r.check("dcls_conv_cuda_supported", fits is (r.device == "cuda"), f"got {fits!r} on {r.device}")

    r.case("dcls limits", run)


def smoke_construct(r, quick: bool):
    """Forward and backward of the fused construction, every version, 1/2/3-D (non-square), against
    the fp64 reference's autograd."""
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if r.device == "cuda" and not quick else [])
    for dks in ((7,), (5, 9), (3, 5, 7)):
        for version in VERSIONS:
            for dtype in dtypes:
                label = f"dcls_construct_kernel {version} {dks} {dtype}"

                def run(dks=dks, version=version, dtype=dtype, label=label):
                    g = torch.Generator().manual_seed(1)
                    nd, O, I, kc = len(dks), 5, 3, 4
                    w = torch.randn(O, I, kc, generator=g, dtype=torch.float64)
                    P = (torch.rand(nd, O, I, kc, generator=g, dtype=torch.float64) * 2 - 1) * (max(dks) // 2)
                    sig = version in ("max", "gauss")
                    SIG = 0.2 + torch.rand(P.shape, generator=g, dtype=torch.float64) if sig else None
                    dev = [t.to(r.device, dtype) if t is not None else None for t in (w, P, SIG)]
                    K = r.call("trous::dcls_construct_kernel", *dev, list(dks), version)
                    gK = torch.randn(K.shape, generator=g, dtype=torch.float64)
                    grads = r.call("trous::dcls_construct_kernel_backward", gK.to(r.device, dtype), *dev, list(dks),
                                   version)
                    if not r.compare:
                        return
                    leaves = [t.clone().requires_grad_() for t in (w, P) + ((SIG,) if SIG is not None else ())]
                    want = ref.construct_kernel(leaves[0], leaves[1], leaves[2] if sig else None, dks, version)
                    wgrads = torch.autograd.grad(want, leaves, gK)
                    tol = 2e-5 if dtype == torch.float32 else 3e-2
                    r.check(label + " K", close(K, want.detach(), tol, tol), "kernel differs")
                    for name, a, e in zip(("grad_w", "grad_P", "grad_SIG"), grads, wgrads):
                        r.check(f"{label} {name}", close(a, e, 5 * tol, 5 * tol), f"{name} differs")

                r.case(label, run)


def smoke_conv(r, quick: bool):
    """The direct depthwise DCLS convolution: forward and backward (both masks), every version,
    1/2/3-D, strides, fp32 and (CUDA, not
    quick) fp16 / bf16, against the fp64 CPU reference's autograd."""
    dev = r.device
    shapes = [((2, 3, 23), (9,), [2], [4]), ((2, 3, 11, 13), (5, 7), [1, 2], [2, 3]),
              ((1, 2, 5, 6, 7), (3, 5, 3), [1, 2, 1], [1, 2, 1])]
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if dev == "cuda" and not quick else [])
    for shape, dks, stride, pad in shapes:
        for version in VERSIONS:
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
                    r.check(label + " out", close(out.double().cpu(), want.detach(), tol, tol), "output differs")
                    for name, a, e in zip(("grad_x", "grad_w", "grad_P", "grad_SIG"), got, wgrads):
                        r.check(f"{label} {name}", close(a.double().cpu(), e, 5 * tol, 5 * tol), f"{name} differs")

                r.case(label, run)


def smoke_banded(r, quick: bool):
    """The banded grouped 1-D convolution: forward and backward
    (every mask), every version, groups 1 / 2, strides 1 / 3, padding, fp32 and (CUDA, not quick)
    fp16 / bf16, against the fp64 CPU reference's autograd."""
    dev = r.device
    # (N, C_in, C_out, L, kc, dks, stride, padding, groups)
    shapes = [(2, 5, 4, 37, 1, 25, 1, 0, 1), (1, 4, 6, 19, 3, 7, 3, 2, 2)]
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if dev == "cuda" and not quick else [])
    for N, ci, co, L, kc, d, st, pd, groups in shapes:
        for version in VERSIONS:
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
                    r.check(label + " out", close(out.double().cpu(), want.detach(), tol, tol), "output differs")
                    for name, a, e in zip(("grad_x", "grad_K"), got, wgrads):
                        r.check(f"{label} {name}", close(a.double().cpu(), e, 5 * tol, 5 * tol), f"{name} differs")

                r.case(label, run)
