"""PConv followed by a pointwise 1x1 convolution (the first two layers of the FasterNet block,
``spatial_mixing`` then ``mlp[0]``), without the PConv output in memory.

    z = W1 @ [conv(x[:, :cp]); x[:, cp:]] = W1[:, :cp] @ t + W1[:, cp:] @ x[:, cp:],  t = conv(x[:, :cp])

Forward: t (cp = C / n_div channels) comes from ``channel_partial_conv2d`` on the view x[:, :cp]
(its cp channels only), then z is two matrix products per sample, the second accumulating into
the first (``baddbmm``): the concatenated PConv output (C channels) is never written.

Saved for backward: x (the caller's tensor, not a copy), t (cp channels: 1 / n_div of the PConv
output) and the two weights. Backward: grad_pw from t and x[:, cp:]; grad of the PConv output
g_y = W1^T @ grad_z (C channels, transient), then ``channel_partial_conv2d_backward``.
"""
from __future__ import annotations

import torch

from .channel_partial import _pair

__all__ = ["pconv_pointwise"]

_ops = torch.ops.trous


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3])


class _PConvPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, pw_weight, dilation):
        cp = weight.shape[0]
        N, C, H, W = x.shape
        t = _ops.channel_partial_conv2d(x[:, :cp], weight, [1, 1], dilation, "auto")
        w1 = pw_weight.reshape(pw_weight.shape[0], C)
        z = torch.matmul(w1[:, cp:], _flat(x[:, cp:]))
        z.baddbmm_(w1[:, :cp].expand(N, -1, -1), _flat(t))
        ctx.save_for_backward(x, t, weight, pw_weight)
        ctx.dilation = dilation
        return z.view(N, -1, H, W)

    @staticmethod
    def backward(ctx, gz):
        x, t, weight, pw_weight = ctx.saved_tensors
        cp = weight.shape[0]
        N, C, H, W = x.shape
        w1 = pw_weight.reshape(pw_weight.shape[0], C)
        g = _flat(gz.to(x.dtype))
        gx = gw = gpw = None
        if ctx.needs_input_grad[2]:
            ga = torch.matmul(g, _flat(t).transpose(1, 2)).sum(0)
            gb = torch.matmul(g, _flat(x[:, cp:]).transpose(1, 2)).sum(0)
            gpw = torch.cat([ga, gb], 1).reshape(pw_weight.shape)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gy = torch.matmul(w1.t(), g).view(N, C, H, W)
            gx, gw = _ops.channel_partial_conv2d_backward(gy, x, weight, ctx.dilation,
                                                          [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
            gx = gx if ctx.needs_input_grad[0] else None
            gw = gw if ctx.needs_input_grad[1] else None
        return gx, gw, gpw, None


def pconv_pointwise(x: torch.Tensor, weight: torch.Tensor, pw_weight: torch.Tensor, dilation=1) -> torch.Tensor:
    """conv1x1(channel_partial_conv2d(x, weight, dilation), pw_weight) without the PConv output.

    x [N, C, H, W]; weight [cp, cp, kh, kw]; pw_weight [O, C, 1, 1] (no bias), same dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"pconv_pointwise: x must have shape [N, C, H, W], got {tuple(x.shape)}")
    if pw_weight.dim() != 4 or pw_weight.shape[1] != x.shape[1] or pw_weight.shape[2:] != (1, 1):
        raise ValueError(f"pconv_pointwise: pw_weight must have shape [O, {x.shape[1]}, 1, 1], "
                         f"got {tuple(pw_weight.shape)}")
    if pw_weight.dtype != x.dtype:
        raise ValueError(f"pconv_pointwise: pw_weight must have the dtype of x ({x.dtype}), got {pw_weight.dtype}")
    if weight.dim() == 4 and not 1 <= weight.shape[0] <= x.shape[1]:
        raise ValueError(f"pconv_pointwise: weight.size(0) = cp must be in 1..C = {x.shape[1]}, got {weight.shape[0]}")
    return _PConvPointwise.apply(x, weight, pw_weight, _pair(dilation))
