"""PConv followed by a pointwise 1x1 convolution (the first two layers of the FasterNet block,
``spatial_mixing`` then ``mlp[0]``), without the PConv output in memory.

    z = W1 @ [conv(x[:, :cp]); x[:, cp:]] = W1[:, :cp] @ t + W1[:, cp:] @ x[:, cp:],  t = conv(x[:, :cp])

Forward: t (cp = C / n_div channels) comes from ``channel_partial_conv2d`` on the view x[:, :cp]
(its cp channels only), then z is two matrix products, the second accumulating into the first: the
concatenated PConv output (C channels) is never written. NCHW inputs: one batched product per part
(``bmm`` / ``baddbmm_``, the weight broadcast over the batch with stride 0, the channel slices of x
read in place); channels_last inputs: two plain products over the N*H*W pixel rows (``mm`` /
``addmm_``, again on the channel slices in place); z keeps x's memory format. Other layouts are
made contiguous first.

Saved for backward: x (the caller's tensor, not a copy, when it is NCHW or channels_last), t (cp
channels: 1 / n_div of the PConv output) and the two weights. Backward, in the same two layouts:
grad_pw from the products of grad_z with t and with x[:, cp:] (channels_last: into the two column
blocks of grad_pw; NCHW: one product with [t; x[:, cp:]], concatenated in backward and freed there:
the two narrow batched products cost 10-15% of the fwd+bwd more at (8, 96, 56, 56)); the gradient of
the PConv output g_y = W1^T @ grad_z is written once (C channels) and becomes grad_x in place: its
last C - cp channels are already grad_x[:, cp:], its first cp channels are replaced by the 3x3's
input gradient (ATen's convolution backward of g_y[:, :cp], which also gives grad_weight). Apart
from that transient [t; x[:, cp:]], no other C-channel tensor is allocated or copied.
"""
from __future__ import annotations

import torch

from .channel_partial import _pair

__all__ = ["pconv_pointwise"]

_ops = torch.ops.trous


def _nchw(t: torch.Tensor) -> bool:
    """Each channel plane is contiguous (x[:, a:b] flattens to [N, b - a, H * W] as a view)."""
    return t.shape[3] <= 1 or t.stride(3) == 1 and (t.shape[2] <= 1 or t.stride(2) == t.shape[3])


def _nhwc(t: torch.Tensor) -> bool:
    """channels_last: the pixels of x form an [N * H * W, C] row-major matrix (a view)."""
    return t.is_contiguous(memory_format=torch.channels_last)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, c, H, W] as the [N*H*W, c] matrix of its pixels (a view for channels_last tensors and their
    channel slices)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _nhwc_view(rows: torch.Tensor, N: int, H: int, W: int) -> torch.Tensor:
    return rows.view(N, H, W, rows.shape[1]).permute(0, 3, 1, 2)


def _layout(x: torch.Tensor) -> str:
    return "nhwc" if _nhwc(x) and not x.is_contiguous() else "nchw"


class _PConvPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, pw_weight, dilation):
        layout = _layout(x)
        if layout == "nchw" and not _nchw(x):
            x = x.contiguous()
        cp = weight.shape[0]
        N, C, H, W = x.shape
        O = pw_weight.shape[0]
        w1 = pw_weight.reshape(O, C)
        t = _ops.channel_partial_conv2d(x[:, :cp], weight, [1, 1], dilation, "auto")
        if layout == "nhwc":
            t = t.contiguous(memory_format=torch.channels_last)
            zr = torch.mm(_rows(t), w1[:, :cp].t())
            if C > cp:
                zr.addmm_(_rows(x[:, cp:]), w1[:, cp:].t())
            z = _nhwc_view(zr, N, H, W)
        else:
            t = t.contiguous()
            z = torch.bmm(w1[:, :cp].expand(N, O, cp), _flat(t))
            if C > cp:
                z.baddbmm_(w1[:, cp:].expand(N, O, C - cp), _flat(x[:, cp:]))
            z = z.view(N, O, H, W)
        ctx.save_for_backward(x, t, weight, pw_weight)
        ctx.dilation, ctx.layout = dilation, layout
        return z

    @staticmethod
    def backward(ctx, gz):
        x, t, weight, pw_weight = ctx.saved_tensors
        cp = weight.shape[0]
        N, C, H, W = x.shape
        O = pw_weight.shape[0]
        w1 = pw_weight.reshape(O, C)
        need_x, need_w, need_pw = ctx.needs_input_grad[:3]
        gz = gz.to(x.dtype)
        gx = gw = gpw = None
        if ctx.layout == "nhwc":
            g = _rows(gz.contiguous(memory_format=torch.channels_last))  # [N*H*W, O]
            if need_pw:
                gpw = x.new_empty(O, C)
                torch.mm(g.t(), _rows(t), out=gpw[:, :cp])
                if C > cp:
                    torch.mm(g.t(), _rows(x[:, cp:]), out=gpw[:, cp:])
                gpw = gpw.view(pw_weight.shape)
            if need_x or need_w:
                gy = _nhwc_view(torch.mm(g, w1), N, H, W)  # [N, C, H, W], channels_last
        else:
            g = _flat(gz.contiguous())  # [N, O, H*W]
            if need_pw:  # one product over the 1x1's input [t; x[:, cp:]], rebuilt here for backward only
                y = torch.cat([t, x[:, cp:]], 1) if C > cp else t
                gpw = torch.bmm(g, _flat(y).transpose(1, 2)).sum(0).reshape(pw_weight.shape)
                del y
            if need_x or need_w:
                gy = torch.bmm(w1.t().expand(N, C, O), g).view(N, C, H, W)
        if need_x or need_w:
            d = ctx.dilation
            pad = [d[0] * (weight.shape[2] - 1) // 2, d[1] * (weight.shape[3] - 1) // 2]
            gi, gw, _ = torch.ops.aten.convolution_backward(gy[:, :cp], x[:, :cp], weight, None, [1, 1], pad, d,
                                                             False, [0, 0], 1, [need_x, need_w, False])
            if need_x:
                gx = gy
                gx[:, :cp].copy_(gi)
        return gx if need_x else None, gw if need_w else None, gpw, None


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
