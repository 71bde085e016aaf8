"""Mask-aware partial convolution (image inpainting; NVIDIA's PartialConv2d / PartialConv3d), from
shared/spec/partial_conv.md section 2, fused:

    S   = sum of the mask over each output's window (zero padding counts as holes): a box sum of the
          single-channel mask (multi_channel: the mask summed over each group's input channels once,
          then box-summed), in fp32 (fp64 for fp64 x), [N|1, 1|groups, out spatial]: 1/Cout of the
          output, never a Cout x Cin convolution;
    K   = kh * kw (* Cin / groups with multi_channel);
    raw = conv(X * M, W)  (no bias; oneDNN / cuDNN through ATen, X * M computed once: one pass over
          the input, into a per-thread scratch buffer reused between calls on the CPU (a fresh
          input-sized tensor page-faults on first touch); with mask_in=None x is read as is);
    out, new_mask = trous.masked_partial_epilogue_(raw, S, bias, K, mode): ONE pass that reads raw
          and writes out over it (ratio, bias and mask update; csrc/pconv/masked_epilogue.h; raw is
          not needed for backward, so no second output-sized buffer).

So the output-sized memory is touched twice in all (the convolution writes raw, the epilogue reads it
and writes out) instead of NVIDIA's ~12 passes; backward likewise (grad_raw = grad_out * ratio and the
bias gradient in one pass, into a scratch buffer, then ATen's convolution backward from X * M
recomputed into the other scratch buffer, and grad_x = grad_xm * M in place). The scratch buffers
(``_scratch``) hold no state: each is filled and consumed inside one op call, never saved or
returned; :func:`release_scratch` frees them.
The out-of-place op ``masked_partial_epilogue`` (with its registered autograd) is there for direct use.

mode="exact" (default): out = raw * K / S + b where S > 0, 0 where S = 0 (a NaN or Inf in x does not
reach an output whose window has no valid pixel); new mask 1[S > 0] (min(S, 1) for soft masks). S and
the ratio are fp32, so fp16 / bf16 never give Inf or NaN from the ratio.
mode="nvidia": NVIDIA's numbers: ratio = K / (S + 1e-8) * clamp(S, 0, 1), U = clamp(S, 0, 1); with
bias out = ((raw - b) * ratio + b) * U (raw including b), without out = raw * ratio; the mask sum
ignores ``groups`` (K = Cin * kh * kw with multi_channel), as the reference layer does; S and the
ratio are still fp32 (the reference's fp16 overflow, inf * 0 = NaN, is not reproduced); NaN * 0 stays
NaN as in the reference.

NaN in x: it reaches (as NaN) exactly the outputs whose window covers it (a NaN at a hole too: X * M
is NaN * 0 = NaN, as in the reference), except, in exact mode, outputs with S = 0 (0 there).

Stateless: nothing is cached by input shape (the reference's stale-ratio bug cannot happen). The
mask gets no gradient; x, weight and bias do. Saved for backward: x (the caller's tensor, not a
copy: changing it in place before backward raises, as for nn.Conv2d), the mask (for grad_x and X * M),
weight, and S (1/Cout of the output).
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_partial_conv2d", "masked_partial_conv3d", "PartialConv2d", "PartialConv3d", "release_scratch"]

_ops = torch.ops.trous


def _tuple(v, n):
    return (int(v),) * n if isinstance(v, int) else tuple(int(e) for e in v)


def _setup_context(ctx, inputs, output):
    raw, S, bias, K, mode = inputs
    ctx.K, ctx.mode, ctx.has_bias = K, mode, bias is not None
    ctx.save_for_backward(S)


def _backward(ctx, grad_out, grad_mask):
    (S,) = ctx.saved_tensors
    need_raw = ctx.needs_input_grad[0]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    if grad_out is None or not (need_raw or need_b):
        return None, None, None, None, None
    graw, gb = _ops.masked_partial_epilogue_backward(grad_out, S, ctx.K, ctx.mode, need_b)
    return graw if need_raw else None, None, gb if need_b else None, None, None


torch.library.register_autograd("trous::masked_partial_epilogue", _backward, setup_context=_setup_context)


_WS = threading.local()
_WS_MIN_BYTES = 1 << 22  # below 4 MiB the allocator reuses freed memory anyway


def _scratch(slot: str, like: torch.Tensor) -> torch.Tensor:
    """A CPU scratch tensor with the shape, dtype and strides of ``like`` (contiguous or channels_last;
    contents undefined), from a per-thread buffer kept between calls: a fresh tensor of 33.5 MB is a
    fresh mmap whose first touch page-faults (X * M into a fresh buffer 10.8 ms, into a reused one
    2.6 ms at (8, 64, 128, 128) fp32). Safe because a scratch tensor never outlives the call that
    fills it: it is the transient input of one ATen convolution (forward) or convolution backward,
    whose results never alias it, and it is never saved for backward or returned. One buffer per
    slot and thread (grown, never shrunk; :func:`release_scratch` frees them). Not under
    torch.compile (it traces the plain allocation), not on CUDA (its caching allocator reuses
    memory already), not for small or other-layout tensors."""
    nbytes = like.numel() * like.element_size()
    if like.device.type != "cpu" or nbytes < _WS_MIN_BYTES or torch.compiler.is_compiling():
        return torch.empty_like(like)
    if like.is_contiguous():
        fmt = torch.contiguous_format
    elif like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    else:
        return torch.empty_like(like)
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = bufs[slot] = None  # free the old one first
        buf = bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)
    t = buf[:nbytes].view(like.dtype)
    if fmt is torch.contiguous_format:
        return t.view(like.shape)
    return t.as_strided(like.shape, torch.empty(like.shape, device="meta", memory_format=fmt).stride())


def release_scratch() -> None:
    """Frees this thread's scratch buffers of the mask-aware partial convolution (they are kept
    between calls, at most two of the largest masked input seen)."""
    _WS.bufs = {}


class _MaskedPartialConv(torch.autograd.Function):
    """conv(X * M) in ATen, then the in-place epilogue over the convolution's own output (it is not
    needed for backward). Backward: grad_raw (one pass, the bias gradient on the way), ATen's
    convolution backward from X * M recomputed into a scratch buffer, then grad_x = grad_xm * M in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, mx, S, K, mode, stride, padding, dilation, groups):
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        xm = x if mx is None else torch.mul(x, mx, out=_scratch("xm", x))
        raw = conv(xm, weight, None, stride, padding, dilation, groups)
        new_mask = _ops.masked_partial_epilogue_(raw, S, bias, K, mode)
        # x (the caller's tensor) rather than X * M: backward recomputes X * M into the scratch
        # buffer (one pass) instead of keeping a fresh input-sized tensor alive.
        ctx.save_for_backward(x, weight, mx, S)
        ctx.args = (K, mode, stride, padding, dilation, groups, bias is not None)
        ctx.mark_non_differentiable(new_mask)
        return raw, new_mask

    @staticmethod
    def backward(ctx, grad_out, grad_mask):
        x, weight, mx, S = ctx.saved_tensors
        K, mode, stride, padding, dilation, groups, has_bias = ctx.args
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = has_bias and ctx.needs_input_grad[2]
        none = (None,) * 8
        if grad_out is None:
            return (None, None, None) + none
        dense = grad_out.is_contiguous() or any(
            grad_out.dim() == d and grad_out.is_contiguous(memory_format=f)
            for d, f in ((4, torch.channels_last), (5, torch.channels_last_3d)))
        if dense and (need_x or need_w):  # grad_raw only feeds the convolution backward: a scratch
            graw = _scratch("graw", grad_out)
            gb = _ops.masked_partial_epilogue_backward_into(grad_out, S, K, mode, need_b, graw)
        else:
            graw, gb = _ops.masked_partial_epilogue_backward(grad_out, S, K, mode, need_b)
        gx = gw = None
        if need_x or need_w:
            # grad_x needs no X * M (only the weight gradient reads the input).
            xm = x if mx is None or not need_w else torch.mul(x, mx, out=_scratch("xm", x))
            gx, gw, _ = torch.ops.aten.convolution_backward(graw, xm, weight, None, list(stride), list(padding),
                                                             list(dilation), False, [0] * len(stride), groups,
                                                             [need_x, need_w, False])
            if need_x and mx is not None:
                gx = gx.mul_(mx)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None) + none


def _masked_partial_conv(x, mask, weight, bias, stride, padding, dilation, groups, multi_channel, return_mask,
                         mode, nd, who):
    conv = F.conv2d if nd == 2 else F.conv3d
    if mode not in ("exact", "nvidia"):
        raise ValueError(f"{who}: mode must be \"exact\" or \"nvidia\", got {mode!r}")
    if x.dim() != nd + 2:
        raise ValueError(f"{who}: x must have {nd + 2} dimensions [N, Cin, ...], got {tuple(x.shape)}")
    N, Cin = x.shape[:2]
    stride, padding, dilation = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
    ks = tuple(weight.shape[2:])
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    want_c = Cin if multi_channel else 1
    if mask is not None:
        if mask.device != x.device:
            raise ValueError(f"{who}: mask must be on the device of x ({x.device}), got {mask.device}")
        if mask.dim() != x.dim() or mask.shape[0] not in (1, N) or mask.shape[1] != want_c or \
                mask.shape[2:] != x.shape[2:]:
            raise ValueError(f"{who}: mask must have shape [N or 1, {want_c}, {', '.join(map(str, x.shape[2:]))}]"
                             f"{' (multi_channel)' if multi_channel else ''}, got {tuple(mask.shape)}")
        mask = mask.detach()
        m = mask.to(acc)
    else:
        m = torch.ones((1, 1, *x.shape[2:]), device=x.device, dtype=acc)  # mask-sized, 1 channel
    window = 1
    for k in ks:
        window *= k
    box = dict(stride=stride, padding=padding, dilation=dilation)
    if mode == "nvidia" or not multi_channel or groups == 1:
        msum = m.sum(1, keepdim=True) if (multi_channel and m.shape[1] > 1) else m
        if multi_channel and mask is None:
            msum = msum * Cin
        S = conv(msum, torch.ones((1, 1, *ks), device=x.device, dtype=acc), **box)  # [N|1, 1, ...]
        K = window * ((Cin if mode == "nvidia" else Cin // groups) if multi_channel else 1)
    else:
        if mask is None:
            msum = m.expand(1, groups, *m.shape[2:]) * (Cin // groups)
        else:
            msum = m.reshape(m.shape[0], groups, Cin // groups, *m.shape[2:]).sum(2)  # [N|1, groups, ...]
        S = conv(msum, torch.ones((groups, 1, *ks), device=x.device, dtype=acc), groups=groups, **box)
        K = window * (Cin // groups)
    mx = None if mask is None else mask.to(x.dtype)
    out, new_mask = _MaskedPartialConv.apply(x, weight, bias, mx, S.contiguous(), float(K), mode, stride, padding,
                                             dilation, groups)
    if multi_channel and new_mask.shape[1] != weight.shape[0]:
        G = new_mask.shape[1]
        sp = new_mask.shape[2:]
        new_mask = new_mask.unsqueeze(2).expand(new_mask.shape[0], G, weight.shape[0] // G, *sp)
        new_mask = new_mask.reshape(new_mask.shape[0], weight.shape[0], *sp)
    return (out, new_mask) if return_mask else out


def masked_partial_conv2d(x: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                          multi_channel: bool = False, return_mask: bool = True, mode: str = "exact"):
    """Partial convolution of x [N, Cin, H, W] with mask [N|1, 1|Cin, H, W] (bool, uint8 or float);
    returns (out, new_mask) or out. See the module docstring for the two modes."""
    return _masked_partial_conv(x, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                                return_mask, mode, 2, "masked_partial_conv2d")


def masked_partial_conv3d(x: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                          multi_channel: bool = False, return_mask: bool = True, mode: str = "exact"):
    """The 3-D twin of :func:`masked_partial_conv2d` (x [N, Cin, D, H, W])."""
    return _masked_partial_conv(x, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                                return_mask, mode, 3, "masked_partial_conv3d")


class _PartialConvNd:
    _fn = None

    def _init_partial(self, multi_channel, return_mask, mode):
        self.multi_channel = multi_channel
        self.return_mask = return_mask
        self.mode = mode

    def forward(self, input: torch.Tensor, mask_in: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__}: padding_mode must be 'zeros' (the reference pads the input "
                             f"and the mask inconsistently otherwise), got {self.padding_mode!r}")
        return type(self)._fn(input, mask_in, self.weight, self.bias, self.stride, self.padding, self.dilation,
                              self.groups, self.multi_channel, self.return_mask, self.mode)


class PartialConv2d(_PartialConvNd, nn.Conv2d):
    """Drop-in for NVIDIA's PartialConv2d: nn.Conv2d's arguments plus ``multi_channel`` and
    ``return_mask`` (keywords, as in the reference) and ``mode`` ("exact" or "nvidia");
    ``forward(input, mask_in=None)``. Parameters are nn.Conv2d's (``weight``, ``bias``), so NVIDIA
    state dicts load. Stateless (no shape-keyed cache)."""

    _fn = staticmethod(masked_partial_conv2d)

    def __init__(self, *args, multi_channel: bool = False, return_mask: bool = False, mode: str = "exact", **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_partial(multi_channel, return_mask, mode)


class PartialConv3d(_PartialConvNd, nn.Conv3d):
    """The 3-D twin of :class:`PartialConv2d` (NVIDIA's PartialConv3d)."""

    _fn = staticmethod(masked_partial_conv3d)

    def __init__(self, *args, multi_channel: bool = False, return_mask: bool = False, mode: str = "exact", **kwargs):
        nn.Conv3d.__init__(self, *args, **kwargs)
        self._init_partial(multi_channel, return_mask, mode)
