"""Slow, obviously correct references of the partial convolutions, written from
shared/spec/partial_conv.md section 1 (float64 on the CPU), and FasterNet's two forms of
``Partial_conv3`` (split_cat, slicing) as the baselines of the benchmarks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_partial_conv2d", "split_cat", "slicing", "cp_conv"]


def channel_partial_conv2d(x: torch.Tensor, weight: torch.Tensor, dilation=(1, 1)) -> torch.Tensor:
    """y[:, :cp] = conv2d(x[:, :cp], W, stride 1, "same" padding); y[:, cp:] = x[:, cp:] (float64,
    returned in x's dtype and device)."""
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    cp = weight.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    xd = x.detach().to("cpu", torch.float64)
    if xd.numel() == 0:
        return xd.clone().to(x.device, x.dtype)
    y1 = F.conv2d(xd[:, :cp], weight.detach().to("cpu", torch.float64), None, 1,
                  (d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2), d)
    return torch.cat([y1, xd[:, cp:]], 1).to(x.device, x.dtype)


def cp_conv(x1: torch.Tensor, weight: torch.Tensor, dilation=(1, 1)) -> torch.Tensor:
    """The convolution of the cp channels alone (the floor of the benchmarks)."""
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return F.conv2d(x1, weight, None, 1, (d[0] * (weight.shape[2] - 1) // 2, d[1] * (weight.shape[3] - 1) // 2), d)


def split_cat(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FasterNet's ``forward_split_cat`` (training and inference)."""
    cp = weight.shape[0]
    x1, x2 = torch.split(x, [cp, x.shape[1] - cp], dim=1)
    return torch.cat((cp_conv(x1, weight), x2), 1)


def slicing(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FasterNet's ``forward_slicing`` (clone, then overwrite the first cp channels; inference). With
    autograd on, the conv reads x's view instead of the clone's (the original in-place form fails in
    backward)."""
    cp = weight.shape[0]
    y = x.clone()
    y[:, :cp] = cp_conv((x if torch.is_grad_enabled() and x.requires_grad else y)[:, :cp], weight)
    return y
