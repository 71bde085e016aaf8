"""DCLS kernel construction and convolution written directly from ../shared/spec/dcls.md in plain
PyTorch: dense broadcasting over the whole window, autograd for the gradients. Slow and memory-hungry
on purpose (it materialises [window..., O, I/g, kc]); independent of the kernels and of the `dcls`
package: no shared code, only the documented formulas and axis conventions.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .versions import check_version


def axis_map(ndim: int, version: str) -> list:
    """Window axis along which P[j] moves (spec "Quirks"); P[j] is always offset by dks[j] // 2."""
    if ndim == 1:
        return [0]
    if ndim == 2:
        return [0, 1] if version == "v0" else [1, 0]  # v1/max/gauss: P0 -> width, P1 -> height
    return [0, 2, 1] if version == "v0" else [2, 1, 0]  # v0: P0->D, P1->W, P2->H; else P0->W, P1->H, P2->D


def construct_kernel(weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor],
                     dilated_kernel_size: Sequence[int], version: str) -> torch.Tensor:
    """Dense kernel [O, I/g, *dks] from weight [O, I/g, kc], P and SIG [ndim, O, I/g, kc]."""
    check_version(version)
    dks = [int(d) for d in dilated_kernel_size]
    ndim = len(dks)
    axes = axis_map(ndim, version)
    f = None
    zsq = 0
    for j in range(ndim):
        ax, n = axes[j], dks[axes[j]]
        mu = P[j] + dks[j] // 2                                        # [O, I, kc]
        idx = torch.arange(n, device=P.device, dtype=P.dtype).view(n, 1, 1, 1)
        d = idx - mu                                                   # [n, O, I, kc]
        if version == "v0":  # bilinear through floor, no normalisation
            p = torch.floor(mu).detach()
            r = mu - p
            g = (1 - r) * (idx == p).to(P.dtype) + r * (idx == p + 1).to(P.dtype)
        elif version == "v1":
            g = torch.relu(1 - d.abs())
        elif version == "max":
            g = torch.relu(SIG[j].abs() + 1 - d.abs())
        else:
            zsq = (d / (SIG[j].abs() + 0.27)) ** 2
            g = None
        shape = [1] * ndim + list(mu.shape)
        shape[ax] = n
        if g is None:
            zsq = zsq.reshape(shape)
            f = zsq if f is None else f + zsq
        else:
            g = g.reshape(shape)
            f = g if f is None else f * g
    if version == "gauss":
        f = torch.exp(-0.5 * f)  # exp(-0.5 * sum over axes of ((idx - mu) / sigma)^2)
    window_dims = tuple(range(ndim))
    if version != "v0":  # each element renormalised over the window
        f = f / (f.sum(window_dims, keepdim=True) + 1e-7)
    K = (f * weight).sum(-1)                                           # [*dks, O, I]
    return K.permute(ndim, ndim + 1, *window_dims)


def dcls_conv(x: torch.Tensor, weight, P, SIG, bias, dilated_kernel_size, version: str, stride=1, padding=0,
              groups: int = 1, padding_mode: str = "zeros", kernel_unsqueeze: Optional[int] = None) -> torch.Tensor:
    """The layer: construct the kernel, then F.conv{1,2,3}d with dilation 1 (F.pad first for a
    non-zero padding_mode). `kernel_unsqueeze` turns a 1-D kernel into a 2-D one (Dcls2dK1d)."""
    K = construct_kernel(weight, P, SIG, dilated_kernel_size, version)
    if kernel_unsqueeze is not None:
        K = K.unsqueeze(kernel_unsqueeze)
    nd = K.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    padding = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    if padding_mode != "zeros":
        pad = [p for p in reversed(padding) for _ in range(2)]
        return conv(F.pad(x, pad, mode=padding_mode), K, bias, stride, 0, 1, groups)
    return conv(x, K, bias, stride, padding, 1, groups)


def dcls_depthwise_conv(x: torch.Tensor, weight, P, SIG, dilated_kernel_size, version: str, stride=1, padding=0,
                        bias=None) -> torch.Tensor:
    """A depthwise layer (in = out = groups = C: weight [C, 1, kc], P / SIG [ndim, C, 1, kc]) with
    zero padding, kernel and bias in x's dtype: what the direct depthwise route computes."""
    K = construct_kernel(weight, P, SIG, dilated_kernel_size, version).to(x.dtype)
    conv = (F.conv1d, F.conv2d, F.conv3d)[K.dim() - 3]
    return conv(x, K, None if bias is None else bias.to(x.dtype), stride, padding, 1, x.shape[1])
