"""PATNet / PartialNet blocks (shared/spec/partial_conv.md section 1) built on the channel-partial
convolution: the first cp = C // n_div channels get the convolution, the other cu = C - cp channels
get an attention.

* :class:`PATChannel` (PAT_ch): per channel of x2 = x[:, cp:], mu = mean over HW and sigma = unbiased
  std; z = Conv2d(cu, cu, (1, 2), no bias) over [mu, sigma]; g = hardsigmoid(BN(z));
  out = cat(conv(x1), BN2(x2 * g)).
* :class:`PATSpatial` (PAT_sp, after the MLP's last 1x1): a = x[:, :C - C//2], b = x[:, C - C//2:];
  w = hardsigmoid(Conv1x1_{a -> 1}(a)); out = cat(BN(a * w), Conv1x1(BN(b))).
* :class:`PATSelf` (PAT_sf, last stage): y2 = multi-head self-attention over the HW tokens of
  LayerNorm2d(x2) with a learned relative position bias (window = the feature map, fixed at
  construction); out = cat(conv(x1), proj(attention)). Attention runs through
  ``torch.nn.functional.scaled_dot_product_attention`` (``PATSelf.attention``: the one line to switch
  to trous attention when that family lands).

Convolutions here have no bias (the spec names none); hardsigmoid(x) = clamp(x / 6 + 0.5, 0, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .channel_partial import channel_partial_conv2d

__all__ = ["PATChannel", "PATSpatial", "PATSelf"]


def _split(dim: int, n_div: int, who: str):
    if n_div < 1 or dim // n_div < 1:
        raise ValueError(f"{who}: n_div must be in 1..dim = {dim} (cp = dim // n_div >= 1), got n_div = {n_div}")
    cp = dim // n_div
    if dim - cp < 1:
        raise ValueError(f"{who}: needs at least one attention channel (dim - dim // n_div >= 1), got dim = {dim}, "
                         f"n_div = {n_div}")
    return cp, dim - cp


def _check_x(x: torch.Tensor, dim: int, who: str):
    if x.dim() != 4 or x.shape[1] != dim:
        raise ValueError(f"{who}: x must have shape [N, {dim}, H, W], got {tuple(x.shape)}")


class PATChannel(nn.Module):
    """PAT_ch: channel-partial conv on x[:, :cp], channel attention from (mean, std) on x[:, cp:]."""

    def __init__(self, dim: int, n_div: int = 4, kernel_size: int = 3, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.dim_conv, self.dim_untouched = _split(dim, n_div, "PATChannel")
        cp, cu = self.dim_conv, self.dim_untouched
        self.partial_conv3 = nn.Conv2d(cp, cp, kernel_size, 1, kernel_size // 2, bias=False, **dd)
        self.attn_conv = nn.Conv2d(cu, cu, (1, 2), bias=False, **dd)
        self.norm = nn.BatchNorm2d(cu, **dd)
        self.norm2 = nn.BatchNorm2d(cu, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.dim, "PATChannel")
        cp = self.dim_conv
        t = channel_partial_conv2d(x[:, :cp], self.partial_conv3.weight)  # the cp convolved channels only
        x2 = x[:, cp:]
        mu = x2.mean(dim=(2, 3), keepdim=True)
        sigma = x2.flatten(2).std(dim=2, unbiased=True).unsqueeze(-1).unsqueeze(-1)
        g = F.hardsigmoid(self.norm(self.attn_conv(torch.cat([mu, sigma], dim=3))))
        return torch.cat([t, self.norm2(x2 * g)], dim=1)


class PATSpatial(nn.Module):
    """PAT_sp: spatial attention on the first C - C // 2 channels, a 1x1 on the others."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        if dim < 2:
            raise ValueError(f"PATSpatial: dim must be >= 2, got {dim}")
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.dim_a, self.dim_b = dim - dim // 2, dim // 2
        self.attn_conv = nn.Conv2d(self.dim_a, 1, 1, bias=False, **dd)
        self.norm_a = nn.BatchNorm2d(self.dim_a, **dd)
        self.norm_b = nn.BatchNorm2d(self.dim_b, **dd)
        self.conv_b = nn.Conv2d(self.dim_b, self.dim_b, 1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.dim, "PATSpatial")
        a, b = x[:, :self.dim_a], x[:, self.dim_a:]
        w = F.hardsigmoid(self.attn_conv(a))
        return torch.cat([self.norm_a(a * w), self.conv_b(self.norm_b(b))], dim=1)


class PATSelf(nn.Module):
    """PAT_sf: channel-partial conv on x[:, :cp], multi-head self-attention over the HW tokens of
    LayerNorm2d(x[:, cp:]) with a relative position bias, for a fixed feature-map size."""

    attention = staticmethod(F.scaled_dot_product_attention)  # switch to trous attention here

    def __init__(self, dim: int, input_size, n_div: int = 4, num_heads: int = 1, kernel_size: int = 3, device=None,
                 dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.dim_conv, self.dim_untouched = _split(dim, n_div, "PATSelf")
        cp, cu = self.dim_conv, self.dim_untouched
        if num_heads < 1 or cu % num_heads:
            raise ValueError(f"PATSelf: num_heads must divide the attention channels {cu}, got {num_heads}")
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        H, W = self.input_size
        self.num_heads = num_heads
        self.partial_conv3 = nn.Conv2d(cp, cp, kernel_size, 1, kernel_size // 2, bias=False, **dd)
        self.norm = nn.LayerNorm(cu, **dd)  # LayerNorm2d: over the channels of each pixel
        self.qkv = nn.Linear(cu, 3 * cu, bias=False, **dd)
        self.proj = nn.Linear(cu, cu, bias=False, **dd)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * H - 1) * (2 * W - 1), num_heads, **dd))
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, HW]
        rel = coords[:, :, None] - coords[:, None, :]
        index = (rel[0] + H - 1) * (2 * W - 1) + (rel[1] + W - 1)
        self.register_buffer("relative_position_index", index, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        HW = self.input_size[0] * self.input_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(HW, HW, self.num_heads).permute(2, 0, 1)  # [heads, HW, HW]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.dim, "PATSelf")
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"PATSelf: x's spatial size must be the input_size {self.input_size} the relative "
                             f"position bias was built for, got {tuple(x.shape[2:])}")
        cp, cu = self.dim_conv, self.dim_untouched
        N, _, H, W = x.shape
        t = channel_partial_conv2d(x[:, :cp], self.partial_conv3.weight)
        tokens = self.norm(x[:, cp:].flatten(2).transpose(1, 2))  # [N, HW, cu]
        q, k, v = self.qkv(tokens).reshape(N, H * W, 3, self.num_heads, cu // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias().to(q.dtype)
        y = self.attention(q, k, v, attn_mask=bias)  # [N, heads, HW, d]
        y = self.proj(y.transpose(1, 2).reshape(N, H * W, cu))
        return torch.cat([t, y.transpose(1, 2).reshape(N, cu, H, W)], dim=1)
