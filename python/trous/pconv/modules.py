"""Modules of the partial-convolution family: ``PConv2d`` (drop-in for timm's / FasterNet's
``Partial_conv3``) and ``convert_fasternet``."""
from __future__ import annotations

import torch
from torch import nn

from .channel_partial import channel_partial_conv2d

__all__ = ["PConv2d", "convert_fasternet"]


class PConv2d(nn.Module):
    """FasterNet's partial convolution: ``conv3x3`` on the first ``dim // n_div`` channels, the others
    passed through, in one trous op (no split / cat, no clone).

    The convolution is ``self.partial_conv3`` (``nn.Conv2d(cp, cp, kernel_size, bias=False)``), so
    the state dict key is ``partial_conv3.weight`` and timm / FasterNet checkpoints load unchanged.
    ``inplace=True`` (inference only: refused while autograd records) overwrites x[:, :cp]; the
    FasterNet block keeps a shortcut to x, so it must stay False there.
    """

    def __init__(self, dim: int, n_div: int = 4, kernel_size: int = 3, dilation: int = 1, inplace: bool = False,
                 algo: str = "auto", device=None, dtype=None):
        super().__init__()
        if n_div < 1 or dim // n_div < 1:
            raise ValueError(f"PConv2d: n_div must be in 1..dim = {dim} (cp = dim // n_div >= 1), got n_div = {n_div}")
        if kernel_size % 2 != 1:
            raise ValueError(f"PConv2d: kernel_size must be odd (\"same\" padding), got {kernel_size}")
        self.dim = dim
        self.n_div = n_div
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.dilation = dilation
        self.inplace = inplace
        self.algo = algo
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, kernel_size, 1,
                                       dilation * (kernel_size - 1) // 2, dilation=dilation, bias=False,
                                       device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"PConv2d: x must have shape [N, {self.dim}, H, W], got {tuple(x.shape)}")
        return channel_partial_conv2d(x, self.partial_conv3.weight, 1, self.dilation, self.inplace, self.algo)

    @classmethod
    def from_partial_conv3(cls, m: nn.Module) -> "PConv2d":
        """A PConv2d sharing ``m.partial_conv3`` (the same Parameter) of a timm ``Partial_conv3``."""
        conv = m.partial_conv3
        dim = m.dim_conv3 + m.dim_untouched
        if tuple(conv.stride) != (1, 1) or conv.groups != 1 or conv.bias is not None or \
                conv.dilation[0] != conv.dilation[1]:
            raise ValueError(f"PConv2d.from_partial_conv3: unsupported conv {conv}")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.dim, out.dim_conv3, out.dim_untouched = dim, m.dim_conv3, m.dim_untouched
        out.n_div = dim // m.dim_conv3
        out.dilation, out.inplace, out.algo = int(conv.dilation[0]), False, "auto"
        out.partial_conv3 = conv
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_div={self.n_div}, cp={self.dim_conv3}, dilation={self.dilation}, " \
               f"inplace={self.inplace}"


def convert_fasternet(model: nn.Module) -> nn.Module:
    """Replaces, in place, every timm ``Partial_conv3`` of ``model`` (``timm.create_model("fasternet_*")``)
    by a :class:`PConv2d` sharing its convolution (weights kept, same Parameters, same state dict);
    returns ``model``. The converted model gives the same outputs and gradients."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m).__name__ == "Partial_conv3" and hasattr(m, "partial_conv3")]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PConv2d.from_partial_conv3(m))
    return model
