"""Banded grouped 1-D DCLS convolution: the direct route of ``Dcls1d`` layers that are not depthwise
(SNN synaptic delays: ``Dcls1d(in, out, kernel_count=1, groups=1, dilated_kernel_size=25)``).

The dense kernel ``K [C_out, C_in / groups, dks]`` is built by the fused construction
(``trous.ops.dcls_construct_kernel``: small, ``C_out * C_in / groups * dks``), but the convolution
visits only the taps of each (out, in) row that can be non-zero: ``band [C_out, C_in / groups, 2]``
(int32 lo, hi) covers the support of every element of the row. v0 / v1 elements have 2 taps, max
elements ``2 (|SIG| + 1)``, gauss elements the taps within ``sigma * sqrt(2 ln(1 / tau))`` of the
centre (tau = 2^-28 / dks of the element's peak in fp32, 2^-56 / dks in fp64: the dropped mass is
below rounding of the result; a large sigma gives the whole window). Cost: ``N * C_out * L_out *
sum(band widths) / C_out`` multiply-adds per pass instead of ``... * C_in / groups * dks``.

    dcls_banded_conv1d(x, weight, P, SIG, dilated_kernel_size, version, stride=1, padding=0, groups=1, bias=None)

* ``x`` ``[N, C_in, L]``: float32 / float16 / bfloat16 (float64 on CPU); computed in fp32 (fp64).
* ``weight`` ``[C_out, C_in / groups, kc]``, ``P`` / ``SIG`` ``[1, C_out, C_in / groups, kc]`` (SIG
  only for gauss / max), ``bias`` ``[C_out]`` or None.
* Returns ``[N, C_out, L_out]``, ``L_out = (L + 2 padding - dks) // stride + 1``: dcls's
  ``F.conv1d(x, K, bias, stride, padding, groups=groups)`` to fp32 rounding. Zero padding only.
* Saved for backward: x, K and the band; gradients of K flow into the construction's backward.
* Non-finite parameters make the constructed K row non-finite (``construct``); such a row's band is
  the whole window, so every output of that output channel is NaN / Inf as with ``F.conv1d``.
* Non-finite x: **NaN / Inf in x reach only outputs that read them through a tap inside a row's
  band**; ``F.conv1d`` (the dense route) multiplies every tap, so 0 * NaN spreads NaN further: the
  two routes give different NaN sets for the same layer (the finite outputs agree).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops import inputs_supported
from .versions import SIG_VERSIONS, check_version

__all__ = ["dcls_banded_conv1d", "dcls_band1d", "banded_supported", "banded_is_faster"]

_ops = torch.ops.trous


def dcls_band1d(P: torch.Tensor, SIG: Optional[torch.Tensor], dilated_kernel_size: int, version: str) -> torch.Tensor:
    """int32 ``[C_out, C_in / groups, 2]``: per kernel row, [lo, hi) covering every element's support
    (a superset by at most one tap per side; (0, 0) when no element reaches the window). Non-finite
    parameters give the whole window, so NaN reaches the output as in the reference. Not
    differentiable; no device sync."""
    d = int(dilated_kernel_size)
    with torch.no_grad():
        acc = torch.float64 if P.dtype == torch.float64 else torch.float32
        mu = P[0].to(acc) + (d // 2)
        if version in ("v0", "v1"):
            # v0: bilinear taps floor(mu), floor(mu) + 1; v1: |i - mu| < 1 only there.
            lo = torch.floor(mu)
            hi = lo + 2
            bad = torch.isnan(mu)
        elif version == "max":
            sigma = SIG[0].to(acc).abs() + 1
            lo = torch.floor(mu - sigma)  # relu(sigma - |i - mu|) > 0, one tap of margin for rounding
            hi = torch.floor(mu + sigma) + 2
            bad = torch.isnan(mu) | torch.isnan(sigma)
        elif version == "gauss":
            sigma = SIG[0].to(acc).abs() + 0.27
            ln_inv_tau = (28 if acc == torch.float32 else 56) * math.log(2.0) + math.log(d)
            # f(i) >= tau * (peak over the grid) <=> (i - mu)^2 <= (nearest - mu)^2 + 2 sigma^2 ln(1 / tau).
            nearest = torch.round(mu).clamp(0, d - 1)
            radius = torch.sqrt((nearest - mu) ** 2 + 2 * sigma * sigma * ln_inv_tau) * (1 + 1e-6)
            lo = torch.ceil(mu - radius)
            hi = torch.floor(mu + radius) + 1
            bad = ~torch.isfinite(mu) | ~torch.isfinite(sigma)
        else:
            check_version(version)
            raise AssertionError(f"unhandled version {version!r}")
        lo = torch.where(bad, torch.zeros_like(lo), lo).clamp(0, d)
        hi = torch.where(bad, torch.full_like(hi, d), hi).clamp(0, d)
        empty = lo >= hi
        row_lo = torch.where(empty, torch.full_like(lo, d), lo).amin(-1)
        row_hi = torch.where(empty, torch.zeros_like(hi), hi).amax(-1)
        none = row_lo >= row_hi
        row_lo = torch.where(none, torch.zeros_like(row_lo), row_lo)
        row_hi = torch.where(none, torch.zeros_like(row_hi), row_hi)
        return torch.stack([row_lo, row_hi], -1).to(torch.int32)


def dcls_banded_conv1d(x: torch.Tensor, weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                       dilated_kernel_size: int, version: str, stride: int = 1, padding: int = 0, groups: int = 1,
                       bias: Optional[torch.Tensor] = None, band: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped 1-D DCLS convolution visiting only each kernel row's band (see the module docstring).
    ``band``: :func:`dcls_band1d` of these P and SIG when the caller already has it. NaN / Inf in
    ``x`` reach only outputs that read them through a tap inside a band, unlike ``F.conv1d`` (0 *
    NaN); a non-finite parameter makes every output of its output channel non-finite."""
    d = int(dilated_kernel_size)
    sig = SIG if version in SIG_VERSIONS else None
    # The op sees K, built from weight: a weight that does not fit x is reported as weight (the same
    # check on meta tensors, before any kernel runs).
    if x.dim() == 3 and weight.dim() == 3 and int(groups) >= 1 and x.shape[1] % int(groups) == 0:
        if weight.shape[1] != x.shape[1] // int(groups) or weight.shape[0] % int(groups) != 0:
            raise ValueError(f"trous.dcls_banded_conv1d: weight must have shape [C_out, C_in / groups = "
                             f"{x.shape[1] // int(groups)}, kernel_count] with C_out a multiple of groups = {groups} "
                             f"(C_in = x.size(1) = {x.shape[1]}), got {list(weight.shape)}")
    K = _ops.dcls_construct_kernel(weight, P, sig, [d], version)
    if band is None:
        band = dcls_band1d(P, sig, d, version)
    if K.dim() == 3 and band.dim() == 3 and band.shape[-1] == 2:
        # A row with a non-finite tap (a poisoned element: non-finite weight, P or SIG) is visited
        # whole, so that its NaN reaches every output as in F.conv1d with that K. No device sync.
        bad = ~torch.isfinite(K.detach()).all(-1, keepdim=True)
        full = torch.tensor([0, K.shape[-1]], dtype=band.dtype, device=band.device)
        band = torch.where(bad, full, band)
    return _ops.dcls_banded_conv1d(x, K, band, bias, int(stride), int(padding), int(groups))


def banded_supported(x: torch.Tensor, weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                     dilated_kernel_size: int, version: str, stride: int, padding: int, groups: int,
                     reasons: Optional[list] = None) -> bool:
    """Whether :func:`dcls_banded_conv1d` accepts these arguments (never raises).

    ``reasons``: a list that receives one sentence per actual cause of a refusal (every failing
    check, and only those), for the error of ``strategy="direct"``."""
    why = []
    try:
        d = int(dilated_kernel_size)
        if d < 1:
            why.append(f"dilated_kernel_size must be >= 1, got {d}")
        if stride < 1:
            why.append(f"stride must be >= 1, got {stride}")
        if padding < 0:
            why.append(f"padding must be >= 0, got {padding}")
        if groups < 1:
            why.append(f"groups must be >= 1, got {groups}")
        if x.dim() != 3:
            why.append(f"x must be batched [N, C_in, L] (3-D), got a {x.dim()}-D x of shape {list(x.shape)}")
        if weight.dim() != 3:
            why.append(f"weight must be [C_out, C_in / groups, kernel_count], got {list(weight.shape)}")
        if P.dim() != 4 or P.shape[0] != 1 or (weight.dim() == 3 and tuple(P.shape[1:]) != tuple(weight.shape)):
            why.append(f"P must have shape [1, *weight.shape] = {[1, *weight.shape]}, got {list(P.shape)}")
        if version in SIG_VERSIONS and (SIG is None or SIG.shape != P.shape):
            why.append(f"SIG must have the shape of P {list(P.shape)} for version {version!r}, got "
                       f"{None if SIG is None else list(SIG.shape)}")
        if x.dim() == 3 and weight.dim() == 3 and groups >= 1:
            if x.shape[1] % groups or weight.shape[0] % groups or weight.shape[1] != x.shape[1] // groups:
                why.append(f"x's {x.shape[1]} channels, weight {list(weight.shape)} and groups={groups} do not "
                           f"match (weight.shape[1] must be C_in / groups)")
            if padding >= 0 and d >= 1 and x.shape[2] + 2 * padding < d:
                why.append(f"x's length {x.shape[2]} plus 2 * padding {padding} is smaller than dilated_kernel_size "
                           f"{d}")
        tensors = [("x", x), ("weight", weight), ("P", P)] + ([("SIG", SIG)] if version in SIG_VERSIONS and
                                                                SIG is not None else [])
        if not inputs_supported(x, [t for _, t in tensors], "dcls_banded_conv1d"):
            stray = [f"{n} on {t.device}" for n, t in tensors[1:] if t.device != x.device]
            ints = [f"{n} is {t.dtype}" for n, t in tensors if not t.is_floating_point()]
            if stray:
                why.append(f"x is on {x.device} but " + ", ".join(stray))
            if ints:
                why.append("the tensors must be floating point: " + ", ".join(ints))
            if not stray and not ints:
                why.append(f"no banded kernels for x of dtype {x.dtype} on {x.device} in this build (CPU: float32, "
                           "float64, float16, bfloat16; CUDA: float32, float16, bfloat16 when built with CUDA)")
    except Exception as e:  # malformed arguments (not tensors, wrong types): refused with the cause
        why.append(f"{type(e).__name__}: {e}")
    if reasons is not None:
        reasons.extend(why)
    return not why


# Relative cost of one banded multiply-add against one multiply-add of the dense route (oneDNN's
# conv1d, forward + backward), measured on a 2-core Zen 4 EPYC at the SNN shape (dense conv1d
# 245-251 ms). The per-sample kernels: 2.3 with the whole window as band (gauss, SIG 5: 573 ms).
# The batch-lane kernels (batch >= 10, AVX-512, stride 1): 1.0 per tap plus about one tap of
# repacking per row (full window 247 ms, gauss SIG 0.23 at 6.8 taps 73 ms, v1 at 2 taps 31 ms).
_CPU_BANDED_MAC_COST = 2.3
_CPU_LANES_MAC_COST, _CPU_LANES_EXTRA_TAPS = 1.0, 1.0


def uses_batch_lanes(x: torch.Tensor, stride: int) -> bool:
    """Whether the CPU forward of x takes the batch-lane kernels: the kernels' own decision (batch
    threshold, AVX-512 found by their CPUID test, fp64 keeps the per-sample kernels), asked of C++."""
    return bool(_ops.dcls_banded_uses_batch_lanes(x.shape[0], int(stride), x.dtype))


def banded_is_faster(x: torch.Tensor, band: torch.Tensor, dilated_kernel_size: int, stride: int = 1) -> bool:
    """Cost model of ``strategy="auto"``: the banded route when the band's taps (:func:`dcls_band1d`),
    weighted by their relative cost, are fewer than the dense window's. On the CPU only: on CUDA the
    banded kernels are unmeasured (no GPU run yet) and the dense cuDNN route is kept."""
    if x.device.type != "cpu":
        return False
    width = (band[..., 1] - band[..., 0]).float().mean().item()
    if uses_batch_lanes(x, stride):
        return (width + _CPU_LANES_EXTRA_TAPS) * _CPU_LANES_MAC_COST < int(dilated_kernel_size)
    return width * _CPU_BANDED_MAC_COST < int(dilated_kernel_size)


# No register_fake: each op's C++ validation is also its Meta kernel (csrc/dcls/banded_ops.cpp), so
# FakeTensorMode refuses exactly what the real kernel refuses.


# ---- autograd: saves x, K and the band (K is C_out * C_in / groups * dks, no activation-sized tensor)

def _setup_context(ctx, inputs, output):
    x, K, band, bias, stride, padding, groups = inputs
    ctx.save_for_backward(x, K, band)
    ctx.conv_args = (stride, padding, groups)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    x, K, band = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx = gK = gb = None
    if need[0] or need[1]:
        rx, rk = _ops.dcls_banded_conv1d_backward(grad.to(x.dtype), x, K, band, *ctx.conv_args,
                                                  [bool(need[0]), bool(need[1])])
        gx = rx if need[0] else None
        gK = rk if need[1] else None
    if need[3]:
        gb = grad.sum(dim=(0, 2)).to(ctx.bias_dtype)
    return gx, gK, None, gb, None, None, None


torch.library.register_autograd("trous::dcls_banded_conv1d", _backward, setup_context=_setup_context)
