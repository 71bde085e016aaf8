"""Direct depthwise DCLS convolution: ``trous.ops.dcls_conv`` (+ backward) never builds the dense
dilated kernel of the layer; each (batch, channel) plane is convolved with the channel's taps only.

Used by :mod:`trous.dcls` for ``strategy="direct"`` (depthwise layers: in = out = groups).

Interface for the modules (everything in the ``dcls`` package's layouts and axis conventions)::

    dcls_depthwise_conv(x, weight, P, SIG, dilated_kernel_size, version, stride=1, padding=0, bias=None)

* ``x``: ``[N, C, *spatial]`` with ``len(dilated_kernel_size)`` (1, 2 or 3) spatial dims; any
  strides (a contiguous copy is made when needed). float32 / float16 / bfloat16 (float64 on CPU).
* ``weight``: ``[C, 1, kernel_count]``; ``P``: ``[ndim, C, 1, kernel_count]``; ``SIG``: same shape
  as ``P`` for ``"gauss"`` / ``"max"``, ignored (may be None) for ``"v0"`` / ``"v1"``; ``bias``:
  ``[C]`` or None. Any floating dtype; computed in fp32 (fp64 for fp64 inputs); gradients come back
  in each parameter's dtype.
* ``dilated_kernel_size``: the dcls tuple (first spatial axis first). The axis quirks are those of
  ``dcls`` 0.1.1: 2-D v1/max/gauss: ``P[0]`` moves along W (offset ``dks[0] // 2``), ``P[1]`` along
  H (offset ``dks[1] // 2``); 2-D v0: ``P[0]`` along H, ``P[1]`` along W; 3-D v1/max/gauss:
  P0 -> W, P1 -> H, P2 -> D; 3-D v0: P0 -> D, P1 -> W, P2 -> H (offset ``dks[r] // 2`` for row r).
* ``stride``, ``padding``: an int or one per spatial axis. Padding is ZERO padding; for
  ``padding_mode`` other than ``"zeros"`` the caller applies ``F.pad`` first and passes 0.
* Returns ``[N, C, *out]`` (contiguous), ``out = (in + 2 * padding - dks) // stride + 1``; the same
  as ``F.convNd(x, dense_kernel, bias, stride, padding, groups=C)`` with the dcls dense kernel, to
  fp32 rounding (gauss taps below 2^-28 of an element's profile maximum are skipped).
* Saved for backward: x, weight, P, SIG (no kernel-sized tensors).
* Non-finite parameters: a channel holding an element with a non-finite weight, a NaN P / SIG or
  an infinite P / SIG where dcls's formula is NaN (v0: P; max: SIG; gauss: P and SIG on one axis)
  gives NaN at every output of that channel, as the dense convolution with dcls's (NaN) kernel.
* Non-finite x: **NaN / Inf in x reach only the outputs that read them through a tap of the
  channel's support.** A dense convolution multiplies every tap of the window, so 0 * NaN spreads
  NaN from x to every output whose window covers it: the dense ("construct") route and this direct
  route give different NaN sets for the same layer (the finite outputs agree).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ..ops import inputs_supported
from .versions import SIG_VERSIONS, VERSIONS

__all__ = [
    "dcls_depthwise_conv",
    "dcls_direct_supported",
    "dcls_direct_is_faster",
    "dcls_tap_counts",
    "VERSIONS",
]

_ops = torch.ops.trous

IntOrSeq = Union[int, Sequence[int]]


def _per_axis(v: IntOrSeq, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(e) for e in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"{name} must be an int or have {n} entries (one per spatial axis), got {v}")
    return v


def dcls_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                        dilated_kernel_size: IntOrSeq, version: str, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise DCLS convolution without the dense kernel (see the module docstring). NaN / Inf in
    ``x`` reach only outputs that read them through a tap of the kernel's support, unlike the dense
    route (0 * NaN); a non-finite parameter makes its whole channel NaN."""
    nd = P.shape[0] if isinstance(dilated_kernel_size, int) else len(dilated_kernel_size)
    dks = _per_axis(dilated_kernel_size, nd, "dilated_kernel_size")
    sig = SIG if version in SIG_VERSIONS else None
    return _ops.dcls_conv(x, weight, P, sig, bias, list(dks), version, list(_per_axis(stride, nd, "stride")),
                          list(_per_axis(padding, nd, "padding")))


def dcls_tap_counts(weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                    dilated_kernel_size: Sequence[int], version: str) -> torch.Tensor:
    """Taps per channel (support of the dense window the direct kernels visit), int32 [C].

    Computed on the CPU (parameters are copied there if needed: a device sync on GPU)."""
    sig = SIG.detach().cpu() if (SIG is not None and version in SIG_VERSIONS) else None
    return _ops.dcls_conv_tap_counts(weight.detach().cpu(), P.detach().cpu(), sig, list(dilated_kernel_size), version)


# ---- support and cost model

@torch.compiler.assume_constant_result
def _cuda_supported(device: int, channels: int, kc: int, dks: Tuple[int, ...]) -> bool:
    """The CUDA kernels' own limits (shared memory per block on that device, tap packing, grid),
    asked of C++; a constant for torch.compile."""
    return bool(_ops.dcls_conv_cuda_supported(device, channels, kc, list(dks)))


def dcls_direct_supported(x: torch.Tensor, weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                          dilated_kernel_size: IntOrSeq, version: str, stride: IntOrSeq = 1,
                          padding: IntOrSeq = 0, reasons: Optional[list] = None) -> bool:
    """Whether :func:`dcls_depthwise_conv` accepts these arguments (never raises).

    ``reasons``: a list that receives one sentence per actual cause of a refusal (every failing
    check, and only those), for the error of ``strategy="direct"``."""
    why = []
    try:
        if version not in VERSIONS:
            why.append(f"version must be one of {VERSIONS}, got {version!r}")
        nd = P.shape[0] if isinstance(dilated_kernel_size, int) else len(dilated_kernel_size)
        if not 1 <= nd <= 3:
            why.append(f"dilated_kernel_size must have 1, 2 or 3 entries, got {nd}")
            raise StopIteration
        dks = _per_axis(dilated_kernel_size, nd, "dilated_kernel_size")
        st = _per_axis(stride, nd, "stride")
        pd = _per_axis(padding, nd, "padding")
        if any(d < 1 or d >= 1024 for d in dks):
            why.append(f"dilated_kernel_size must be in [1, 1023] on every axis, got {list(dks)}")
        if any(s < 1 for s in st):
            why.append(f"stride must be >= 1 on every axis, got {list(st)}")
        if any(p < 0 for p in pd):
            why.append(f"padding must be >= 0 on every axis, got {list(pd)}")
        if x.dim() != nd + 2:
            why.append(f"x must be batched [N, C, *spatial] with {nd} spatial axes ({nd + 2}-D), got a "
                       f"{x.dim()}-D x of shape {list(x.shape)}")
        else:
            c = x.shape[1]
            if weight.dim() != 3 or weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] < 1:
                why.append(f"weight must be [C, 1, kernel_count] with C = {c} (depthwise), got {list(weight.shape)}")
            elif tuple(P.shape) != (nd, c, 1, weight.shape[2]):
                why.append(f"P must have shape {[nd, c, 1, weight.shape[2]]}, got {list(P.shape)}")
            elif version in SIG_VERSIONS and (SIG is None or tuple(SIG.shape) != tuple(P.shape)):
                why.append(f"SIG must have the shape of P {list(P.shape)} for version {version!r}, got "
                           f"{None if SIG is None else list(SIG.shape)}")
            spatial = [x.shape[2 + i] for i in range(nd)]
            if any(n < 1 for n in spatial):
                why.append(f"x has an empty spatial axis: {spatial}")
            elif len(pd) == nd and len(dks) == nd and any(spatial[i] + 2 * pd[i] < dks[i] for i in range(nd)):
                why.append(f"x's spatial size {spatial} plus 2 * padding {list(pd)} is smaller than "
                           f"dilated_kernel_size {list(dks)}")
        tensors = [("x", x), ("weight", weight), ("P", P)] + ([("SIG", SIG)] if version in SIG_VERSIONS and
                                                                SIG is not None else [])
        if not inputs_supported(x, [t for _, t in tensors], "dcls_conv"):
            from ..ops import has_cuda_kernel

            stray = [f"{n} on {t.device}" for n, t in tensors[1:] if t.device != x.device]
            ints = [f"{n} is {t.dtype}" for n, t in tensors if not t.is_floating_point()]
            if stray:
                why.append(f"x is on {x.device} but " + ", ".join(stray))
            if ints:
                why.append("the tensors must be floating point: " + ", ".join(ints))
            if not stray and not ints:
                if x.device.type == "cpu":
                    why.append(f"x has dtype {x.dtype}; the CPU kernels take float32, float64, float16, bfloat16")
                elif x.device.type == "cuda" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    why.append(f"x has dtype {x.dtype}; the CUDA kernels take float32, float16, bfloat16")
                elif x.device.type == "cuda" and not has_cuda_kernel("dcls_conv"):
                    why.append("this build of trous has no CUDA kernels (built with TROUS_CUDA=0 or without nvcc)")
                else:
                    why.append(f"there are no direct kernels for device type {x.device.type!r}")
        elif x.device.type == "cuda" and not why:
            dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
            if not _cuda_supported(dev, int(c), int(weight.shape[2]), tuple(int(d) for d in dks)):
                why.append(f"the CUDA kernels' limits (shared memory per block, tap packing, grid) refuse "
                           f"C={int(c)}, kernel_count={int(weight.shape[2])}, dilated_kernel_size={list(dks)}")
    except StopIteration:
        pass
    except Exception as e:  # malformed arguments (not tensors, wrong lengths): refused with the cause
        why.append(f"{type(e).__name__}: {e}")
    if reasons is not None:
        reasons.extend(why)
    return not why


def _expected_taps(kc: int, dks: Sequence[int], version: str) -> float:
    """Upper estimate of the taps per channel that reads no parameter values: v0 / v1 have at most
    2^ndim taps per element; gauss / max are taken as dense (their support grows with SIG)."""
    window = math.prod(dks)
    if version in ("v0", "v1"):
        return float(min(window, kc * 2 ** len(dks)))
    return float(window)


def dcls_direct_is_faster(x: torch.Tensor, weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                          dilated_kernel_size: IntOrSeq, version: str, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                          training: Optional[bool] = None) -> bool:
    """Cost model: True when the direct kernels should beat "construct the dense kernel, then the
    best dense depthwise convolution" for this layer (assumes :func:`dcls_direct_supported`).
    Reads shapes only (no parameter values, no device sync).

    In units of one direct multiply-add (~0.035 ns per output and tap on a 2-core AVX2 EPYC):
    direct = outputs * taps * passes + C * kc * (element build: 4000 for gauss / max, 1000 for v0 /
    v1), x1.3 to prefer the dense route when close; dense = outputs * window * 1.5 (oneDNN's
    channels_last forward, 1.2-2.5 measured) + C * kc * window * (construction: 10 gauss / max, 4
    v0 / v1). Training on CPU always picks the direct route: oneDNN's depthwise backward is 10-20x
    slower than its forward (measured fwd+bwd: direct 3.9-27x faster than construct + channels_last
    at ConvNeXt stages 1 and 4). On GPU the same constants are used, unmeasured (no GPU yet).
    ``training`` defaults to "grad mode is on and something needs a gradient".
    """
    nd = P.shape[0] if isinstance(dilated_kernel_size, int) else len(dilated_kernel_size)
    dks = _per_axis(dilated_kernel_size, nd, "dilated_kernel_size")
    kc = weight.shape[2]
    window = math.prod(dks)
    if training is None:
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, P, SIG))
    cpu = x.device.type == "cpu"
    if cpu and training:
        return True
    taps = _expected_taps(kc, dks, version)
    c = x.shape[1]
    st = _per_axis(stride, nd, "stride")
    pd = _per_axis(padding, nd, "padding")
    outputs = x.shape[0] * c * math.prod((x.shape[2 + i] + 2 * pd[i] - dks[i]) // st[i] + 1 for i in range(nd))
    dense_version = version in ("gauss", "max")
    passes = 3.0 if training else 1.0
    dense_passes = 1.5 * (1.0 + (3.0 if training else 0.0))  # GPU guess: backward ~3x the forward
    direct = 1.3 * (outputs * taps * passes + c * kc * (4000.0 if dense_version else 1000.0))
    dense = outputs * window * dense_passes + c * kc * window * (10.0 if dense_version else 4.0)
    return direct <= dense


# No register_fake: each op's C++ validation is also its Meta kernel (csrc/dcls/conv_ops.cpp), so
# FakeTensorMode refuses exactly what the real kernel refuses.


# ---- autograd: saves x and the (small) parameters only

def _setup_context(ctx, inputs, output):
    x, weight, P, SIG, bias, dks, version, stride, padding = inputs
    sig = SIG if version in SIG_VERSIONS else None
    ctx.save_for_backward(x, weight, P, sig)
    ctx.conv_args = (list(dks), version, list(stride), list(padding))
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    x, weight, P, SIG = ctx.saved_tensors
    dks, version, stride, padding = ctx.conv_args
    need = ctx.needs_input_grad
    want_x = bool(need[0])
    want_p = bool(need[1] or need[2] or (SIG is not None and need[3]))
    gx = gw = gp = gs = gb = None
    if want_x or want_p:
        rx, rw, rp, rs = _ops.dcls_conv_backward(grad.to(x.dtype), x, weight, P, SIG, dks, version, stride, padding,
                                                 [want_x, want_p])
        gx = rx if want_x else None
        gw = rw if (want_p and need[1]) else None
        gp = rp if (want_p and need[2]) else None
        gs = rs if (want_p and SIG is not None and need[3]) else None
    if need[4]:
        gb = grad.sum(dim=[0] + list(range(2, grad.dim()))).to(ctx.bias_dtype)
    return gx, gw, gp, gs, gb, None, None, None, None


torch.library.register_autograd("trous::dcls_conv", _backward, setup_context=_setup_context)
