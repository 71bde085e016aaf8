"""A small inpainting U-Net of partial convolutions: the PConv-UNet of Liu et al. 2018 ("Image
Inpainting for Irregular Holes Using Partial Convolutions") at reduced width and depth.

Encoder: ``depth`` partial convs with stride 2 (kernel 7, then 5, 5, then 3), BatchNorm (not on the
first), ReLU. Decoder: nearest x2 upsampling of features and mask, concatenation with the encoder's
skip (features and masks, hence multi-channel masks), a 3x3 partial conv, BatchNorm (not on the last)
and LeakyReLU(0.2); the last layer maps to the image channels with bias and no activation. Every
layer is ``layer(in, out, k, stride, padding, multi_channel=True, return_mask=True, **layer_kwargs)``:
trous.nn.PartialConv2d by default, or the reference layer
(:class:`trous.pconv.reference.NvidiaPartialConv2d`) for comparisons.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .masked import PartialConv2d

__all__ = ["PConvUNet"]


class _Enc(nn.Module):
    def __init__(self, layer, cin, cout, k, bn, **kw):
        super().__init__()
        self.conv = layer(cin, cout, k, 2, k // 2, bias=not bn, multi_channel=True, return_mask=True, **kw)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()

    def forward(self, x, m):
        x, m = self.conv(x, m)
        return F.relu(self.bn(x)), m


class _Dec(nn.Module):
    def __init__(self, layer, cin, cout, bn, act, **kw):
        super().__init__()
        self.conv = layer(cin, cout, 3, 1, 1, bias=not bn, multi_channel=True, return_mask=True, **kw)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = act

    def forward(self, x, m, skip_x, skip_m):
        x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip_x], 1)
        m = torch.cat([F.interpolate(m, scale_factor=2, mode="nearest"), skip_m], 1)
        x, m = self.conv(x, m)
        x = self.bn(x)
        return (F.leaky_relu(x, 0.2) if self.act else x), m


class PConvUNet(nn.Module):
    """``PConvUNet(in_channels=3, widths=(16, 32, 64, 64), layer=PartialConv2d, **layer_kwargs)``;
    ``forward(image, mask) -> (output, mask)``, image [N, C, H, W] with H, W multiples of
    2 ** len(widths), mask [N, C, H, W] (1 = valid)."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 64), layer: Optional[type] = None,
                 **layer_kwargs):
        super().__init__()
        layer = layer or PartialConv2d
        ks = [7, 5, 5] + [3] * max(0, len(widths) - 3)
        self.enc = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            self.enc.append(_Enc(layer, cin, w, ks[i], i > 0, **layer_kwargs))
            cin = w
        self.dec = nn.ModuleList()
        skips = [in_channels] + list(widths[:-1])
        for i in reversed(range(len(widths))):
            last = i == 0
            cout = in_channels if last else skips[i]
            self.dec.append(_Dec(layer, cin + skips[i], cout, not last, not last, **layer_kwargs))
            cin = cout

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        xs, ms = [x], [mask]
        for e in self.enc:
            x, mask = e(x, mask)
            xs.append(x)
            ms.append(mask)
        for j, d in enumerate(self.dec):
            i = len(self.enc) - 1 - j
            x, mask = d(x, mask, xs[i], ms[i])
        return x, mask
