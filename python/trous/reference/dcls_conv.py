"""Slow, obviously-correct reference of the depthwise DCLS convolution, written from
../shared/spec/dcls.md (independent of the ``dcls`` package and of trous' kernels): build the dense
dilated kernel with plain broadcasting ops (autograd gives the gradients), then ``F.convNd``.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["p_rows", "dense_kernel", "dcls_depthwise_conv"]


def p_rows(ndim: int, version: str):
    """P row driving each spatial axis (first spatial axis first), per the dcls quirks."""
    if ndim == 1:
        return [0]
    if ndim == 2:
        return [0, 1] if version == "v0" else [1, 0]  # v1/max/gauss: P[0] moves along W
    return [0, 2, 1] if version == "v0" else [2, 1, 0]  # v0: P0->D, P1->W, P2->H; else P0->W, P1->H, P2->D


def _profile(version: str, d: int, p: torch.Tensor, sig: Optional[torch.Tensor], offset: int) -> torch.Tensor:
    """[..., d] profile of every element along one axis (p, sig: [...])."""
    i = torch.arange(d, dtype=p.dtype, device=p.device)
    mu = (p + offset).unsqueeze(-1)
    if version == "v0":
        fl = mu.floor()
        r = mu - fl
        return (i == fl).to(p.dtype) * (1 - r) + (i == fl + 1).to(p.dtype) * r
    if version == "v1":
        return (1 - (i - mu).abs()).relu()
    if version == "max":
        return ((sig.abs() + 1.0).unsqueeze(-1) - (i - mu).abs()).relu()
    if version == "gauss":
        u = (i - mu) / (sig.abs() + 0.27).unsqueeze(-1)
        return (-0.5 * u * u).exp()
    raise ValueError(f"unknown version {version!r}")


def dense_kernel(weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor], dks: Sequence[int],
                 version: str) -> torch.Tensor:
    """Dense depthwise kernel [C, 1, *dks] from weight [C, 1, kc], P / SIG [ndim, C, 1, kc]."""
    nd = len(dks)
    rows = p_rows(nd, version)
    X = None
    for s in range(nd):
        r = rows[s]
        f = _profile(version, dks[s], P[r], None if SIG is None else SIG[r], dks[r] // 2)  # [C, 1, kc, d_s]
        shape = list(f.shape[:3]) + [1] * nd
        shape[3 + s] = dks[s]
        f = f.reshape(shape)
        X = f if X is None else X * f
    if version != "v0":
        X = X / (X.sum(dim=tuple(range(3, 3 + nd)), keepdim=True) + 1e-7)
    w = weight.reshape(list(weight.shape) + [1] * nd)
    return (X * w).sum(2)


def dcls_depthwise_conv(x, weight, P, SIG, dilated_kernel_size, version, stride=1, padding=0, bias=None):
    nd = len(dilated_kernel_size)
    K = dense_kernel(weight, P, SIG, dilated_kernel_size, version).to(x.dtype)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, K, None if bias is None else bias.to(x.dtype), stride, padding, 1, x.shape[1])
