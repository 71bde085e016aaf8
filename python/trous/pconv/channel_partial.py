"""Channel-partial convolution (FasterNet "PConv", PATNet): the first cp = C // n_div channels are
convolved (stride 1, "same" padding, optional dilation), the others pass through unchanged.

``torch.ops.trous.channel_partial_conv2d(x, weight, stride, dilation, algo)`` writes the whole output
in one call (no split, no concat, no clone); ``channel_partial_conv2d_`` is the in-place inference
variant (x[:, :cp] overwritten, the other channels untouched). Shapes: x [N, C, H, W], weight
[cp, cp, kh, kw] with odd kh, kw and 1 <= cp <= C; float32 / float16 / bfloat16 (fp32 accumulation),
any strides (contiguous and channels_last are the fast ones); the output keeps x's memory format.

Autograd (out-of-place op): grad to x and weight. Saved for backward: x and weight (only x[:, :cp]
is read by the backward); grad_x[:, cp:] is grad_out[:, cp:].

NaN / Inf: a non-finite value in x[:, :cp] reaches exactly the outputs whose window covers it (and
through them nothing else); the passed-through channels are copied bit for bit.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

__all__ = ["channel_partial_conv2d"]

_ops = torch.ops.trous
_Pair = Union[int, Tuple[int, int]]


def _pair(v: _Pair) -> list:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def channel_partial_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: _Pair = 1, dilation: _Pair = 1,
                           inplace: bool = False, algo: str = "auto") -> torch.Tensor:
    """out[:, :cp] = conv2d(x[:, :cp], weight, padding "same", dilation); out[:, cp:] = x[:, cp:].

    cp = weight.shape[0]. ``stride`` must be 1 (kept as an argument for a clear error otherwise).
    ``inplace=True`` overwrites x[:, :cp] and returns x: inference only, refused while autograd
    records (x or weight requiring grad with grad mode on). ``algo``: "auto", "direct" (trous'
    one-pass kernel) or "aten" (oneDNN / cuDNN on the view x[:, :cp], then the copies).
    """
    if inplace:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            name = "x" if x.requires_grad else "weight"
            raise RuntimeError(
                f"trous.channel_partial_conv2d(inplace=True): {name} requires grad and autograd would need x, "
                "which the in-place variant overwrites; use inplace=False for training, or run inference "
                "under torch.no_grad() / torch.inference_mode()")
        _ops.channel_partial_conv2d_(x, weight, _pair(stride), _pair(dilation), algo)
        return x
    return _ops.channel_partial_conv2d(x, weight, _pair(stride), _pair(dilation), algo)


def _setup_context(ctx, inputs, output):
    x, weight, stride, dilation, algo = inputs
    ctx.dilation = list(dilation)
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None, None, None, None
    gx, gw = _ops.channel_partial_conv2d_backward(grad.to(x.dtype), x, weight, ctx.dilation, [need_x, need_w])
    return gx if need_x else None, gw if need_w else None, None, None, None


torch.library.register_autograd("trous::channel_partial_conv2d", _backward, setup_context=_setup_context)
