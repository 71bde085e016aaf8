"""Slow, obviously correct references of the partial convolutions, written from
shared/spec/partial_conv.md sections 1 and 2 (float64 on the CPU): FasterNet's two forms of
``Partial_conv3`` (split_cat, slicing) and NVIDIA's PartialConv2d forward, also the baselines of the
benchmarks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_partial_conv2d", "split_cat", "slicing", "cp_conv", "nvidia_partial_conv", "NvidiaPartialConv2d"]


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


def nvidia_partial_conv(x, mask_in, weight, bias, stride, padding, dilation, groups, multi_channel):
    """NVIDIA/partialconv PartialConv2d/3d.forward (shared/spec/partial_conv.md section 2, "NVIDIA
    form"), line by line, without its shape-keyed cache: ~11 kernels (mask conv, +eps, divide, clamp,
    multiply, X*M, conv, -b, *ratio, +b, *U). Returns (out, update_mask)."""
    nd = x.dim() - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    ks = weight.shape[2:]
    cout, cin = weight.shape[0], x.shape[1]
    shape_w = (cout, cin, *ks) if multi_channel else (1, 1, *ks)
    weight_mask_updater = torch.ones(shape_w, dtype=x.dtype, device=x.device)
    slide_winsize = weight_mask_updater.shape[1] * weight_mask_updater[0, 0].numel()
    with torch.no_grad():
        if mask_in is None:
            mask = torch.ones(x.shape[0], cin if multi_channel else 1, *x.shape[2:], dtype=x.dtype, device=x.device)
        else:
            mask = mask_in
        update_mask = conv(mask, weight_mask_updater, bias=None, stride=stride, padding=padding, dilation=dilation,
                           groups=1)
        mask_ratio = slide_winsize / (update_mask + 1e-8)
        update_mask = torch.clamp(update_mask, 0, 1)
        mask_ratio = torch.mul(mask_ratio, update_mask)
    raw_out = conv(torch.mul(x, mask) if mask_in is not None else x, weight, bias, stride, padding, dilation, groups)
    if bias is not None:
        bias_view = bias.view(1, cout, *([1] * nd))
        output = torch.mul(raw_out - bias_view, mask_ratio) + bias_view
        output = torch.mul(output, update_mask)
    else:
        output = torch.mul(raw_out, mask_ratio)
    return output, update_mask


class NvidiaPartialConv2d(torch.nn.Conv2d):
    """The reference layer (NVIDIA's PartialConv2d with ``multi_channel`` / ``return_mask``), stateless,
    from :func:`nvidia_partial_conv`: the baseline of the PConv-UNet test and bench."""

    def __init__(self, *args, multi_channel: bool = False, return_mask: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.multi_channel, self.return_mask = multi_channel, return_mask

    def forward(self, input, mask_in=None):
        out, mask = nvidia_partial_conv(input, mask_in, self.weight, self.bias, self.stride, self.padding,
                                        self.dilation, self.groups, self.multi_channel)
        return (out, mask) if self.return_mask else out
