"""Mask-aware partial convolution (image inpainting; NVIDIA's PartialConv2d / PartialConv3d), from
shared/spec/partial_conv.md section 2, composed of ATen ops (not yet a fused kernel).

    S   = sum of the mask over each output's window (zero padding counts as holes), from a box sum
          of the single-channel mask (multi_channel: the mask summed over each group's input channels
          once, then box-summed), in fp32;
    K   = kh * kw (* Cin / groups with multi_channel);
    raw = conv(X * M, W)  (the input masked while the convolution reads it; no bias)

mode="exact" (default): out = raw * K / S + b where S > 0, 0 where S = 0; new mask 1[S > 0]
(min(S, 1) for soft masks). S and the ratio are fp32, so fp16 / bf16 never give Inf or NaN from the
ratio.
mode="nvidia": NVIDIA's numbers: ratio = K / (S + 1e-8) * clamp(S, 0, 1), U = clamp(S, 0, 1); with
bias out = ((raw - b) * ratio + b) * U (raw including b), without out = raw * ratio; the mask sum
ignores ``groups`` (K = Cin * kh * kw with multi_channel), as the reference layer does; S and the
ratio are still fp32 (the reference's fp16 overflow, inf * 0 = NaN, is not reproduced).

Stateless: nothing is cached by input shape (the reference's stale-ratio bug cannot happen). The
mask gets no gradient; x, weight and bias do (through ATen's convolution).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_partial_conv2d", "masked_partial_conv3d", "PartialConv2d", "PartialConv3d"]


def _tuple(v, n):
    return (int(v),) * n if isinstance(v, int) else tuple(int(e) for e in v)


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
    if mask is None:
        mask = torch.ones((1, Cin if multi_channel else 1, *x.shape[2:]), device=x.device, dtype=torch.float32)
    if mask.device != x.device:
        raise ValueError(f"{who}: mask must be on the device of x ({x.device}), got {mask.device}")
    want_c = Cin if multi_channel else 1
    if mask.dim() != x.dim() or mask.shape[0] not in (1, N) or mask.shape[1] != want_c or \
            mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"{who}: mask must have shape [N or 1, {want_c}, {', '.join(map(str, x.shape[2:]))}]"
                         f"{' (multi_channel)' if multi_channel else ''}, got {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    window = 1
    for k in ks:
        window *= k
    ones_cfg = dict(stride=stride, padding=padding, dilation=dilation)
    if mode == "nvidia" or not multi_channel:
        msum = m.sum(1, keepdim=True) if multi_channel else m
        S = conv(msum, torch.ones((1, 1, *ks), device=x.device), **ones_cfg)  # [N|1, 1, ...]
        K = window * (Cin if multi_channel else 1)
    else:
        msum = m.reshape(m.shape[0], groups, Cin // groups, *m.shape[2:]).sum(2)  # [N|1, groups, ...]
        S = conv(msum, torch.ones((groups, 1, *ks), device=x.device), groups=groups, **ones_cfg)
        S = S.repeat_interleave(weight.shape[0] // groups, dim=1)  # [N|1, Cout, ...]
        K = window * (Cin // groups)
    raw = conv(x * mask.to(x.dtype), weight, None, stride, padding, dilation, groups)
    shape_b = (1, -1) + (1,) * nd
    if mode == "exact":
        ratio = torch.where(S > 0, K / S.clamp_min(1e-30), torch.zeros_like(S))
        out = raw * ratio.to(raw.dtype)
        if bias is not None:
            out = out + torch.where(S > 0, 1.0, 0.0).to(raw.dtype) * bias.view(shape_b)
        new_mask = torch.where(S > 0, S.clamp(max=1.0), torch.zeros_like(S))
    else:
        ratio = K / (S + 1e-8)
        U = torch.clamp(S, 0, 1)
        ratio = ratio * U
        if bias is not None:
            b = bias.view(shape_b)
            out = ((raw + b - b) * ratio.to(raw.dtype) + b) * U.to(raw.dtype)
        else:
            out = raw * ratio.to(raw.dtype)
        new_mask = U
    if multi_channel and new_mask.shape[1] == 1:
        new_mask = new_mask.expand(new_mask.shape[0], weight.shape[0], *new_mask.shape[2:])
    new_mask = new_mask.to(x.dtype)
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
