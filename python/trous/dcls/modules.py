"""Dilated Convolution with Learnable Spacings (DCLS): drop-in replacements for the ``dcls`` 0.1.1
package (``DCLS.construct.modules``), built on trous's fused kernel construction.

Migrating: replace ``from DCLS.construct.modules import Dcls2d`` by ``from trous import Dcls2d``;
class names, constructor arguments, defaults, parameter names and shapes, initialisation and
state-dict keys are the same, so checkpoints load unchanged.

Parameters of a layer with ``ndim`` spatial axes and ``kc = kernel_count`` elements per kernel::

    weight  [out_channels, in_channels // groups, kc]
    P       [ndim, out_channels, in_channels // groups, kc]   positions, P[j] + dks[j] // 2 = centre
    SIG     same as P for version "gauss" / "max", else None   widths
    bias    [out_channels] or None

The dense kernel ``[out_channels, in_channels // groups, *dilated_kernel_size]`` is built by
``torch.ops.trous.dcls_construct_kernel`` (separable, one 1-D profile per axis per element; its
backward gives the gradients of weight, P and SIG in one pass and saves no kernel-sized tensor),
then the layer runs ``F.conv{1,2,3}d`` with dilation 1. Depthwise layers can instead run the direct
DCLS convolution (``strategy``), which never materialises the kernel.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter, init
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple, _single, _triple

from . import banded, conv
from .versions import VERSIONS, check_version

__all__ = [
    "construct_kernel",
    "ConstructKernel1d",
    "ConstructKernel2d",
    "ConstructKernel3d",
    "ConstructKernel3_1d",
    "Dcls1d",
    "Dcls2d",
    "Dcls3d",
    "Dcls3_1d",
    "Dcls2dK1d",
    "VERSIONS",
    "STRATEGIES",
]

STRATEGIES = ("auto", "construct", "direct")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def construct_kernel(weight: Tensor, P: Tensor, SIG: Optional[Tensor], dilated_kernel_size: Sequence[int],
                     version: str = "gauss") -> Tensor:
    """Dense DCLS kernel ``[O, I/g, *dilated_kernel_size]`` from weight ``[O, I/g, kc]`` and P, SIG
    ``[ndim, O, I/g, kc]`` (SIG may be None for v0 / v1), exactly as dcls 0.1.1's ConstructKernelNd,
    including its axis conventions (2-D v1/max/gauss: P[0] moves along the width)."""
    return torch.ops.trous.dcls_construct_kernel(weight, P, SIG, list(dilated_kernel_size), version)


class _ConstructKernelNd(Module):
    """``forward(W, P, SIG)`` returns the dense kernel; no parameters, buffers or cached grids."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dilated_kernel_size, version):
        super().__init__()
        check_version(version)
        self.version = version
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.groups = groups
        self.dilated_kernel_size = tuple(dilated_kernel_size)
        self.kernel_count = kernel_count

    def forward(self, W: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        return construct_kernel(W, P, SIG, self.dilated_kernel_size, self.version)

    def extra_repr(self):
        s = "{in_channels}, {out_channels}, kernel_count={kernel_count}, version={version}"
        if self.dilated_kernel_size != (1,) * len(self.dilated_kernel_size):
            s += ", dilated_kernel_size={dilated_kernel_size}"
        if self.groups != 1:
            s += ", groups={groups}"
        return s.format(**self.__dict__)


class ConstructKernel1d(_ConstructKernelNd):
    """W [O, I/g, kc], P / SIG [1, O, I/g, kc] -> K [O, I/g, dks]."""


class ConstructKernel2d(_ConstructKernelNd):
    """W [O, I/g, kc], P / SIG [2, O, I/g, kc] -> K [O, I/g, dks0, dks1].
    v1/max/gauss: P[0] moves along dks1 (width) offset by dks0 // 2; v0: P[0] along dks0."""


class ConstructKernel3d(_ConstructKernelNd):
    """W [O, I/g, kc], P / SIG [3, O, I/g, kc] -> K [O, I/g, dks0, dks1, dks2]
    (v1/max/gauss: P0 -> dks2, P1 -> dks1, P2 -> dks0; v0: P0 -> dks0, P1 -> dks2, P2 -> dks1)."""


class ConstructKernel3_1d(Module):
    """Positions learned along the last axis only: W [O, I/g, d0, d1, kc], P / SIG
    [1, O, I/g, d0, d1, kc] -> K [O, I/g, d0, d1, dks]. (dcls 0.1.1 has no v0 here; trous does.)"""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dense_kernel_size, dilated_kernel_size,
                 version):
        super().__init__()
        check_version(version)
        self.version = version
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.groups = groups
        self.dense_kernel_size = tuple(dense_kernel_size)
        self.dilated_kernel_size = tuple(dilated_kernel_size)
        self.kernel_count = kernel_count

    def forward(self, W: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        # Every dense tap (d0, d1) is one more 1-D "channel": a view, then the 1-D construction.
        o, i, kc = W.shape[0], W.shape[1], W.shape[-1]
        rows = i * math.prod(self.dense_kernel_size)
        sig = None if SIG is None else SIG.reshape(1, o, rows, kc)
        K = construct_kernel(W.reshape(o, rows, kc), P.reshape(1, o, rows, kc), sig, self.dilated_kernel_size,
                             self.version)
        return K.reshape(o, i, *self.dense_kernel_size, self.dilated_kernel_size[0])

    extra_repr = _ConstructKernelNd.extra_repr


class _DclsNd(Module):
    """Common part of Dcls1d/2d/3d and Dcls2dK1d (dcls 0.1.1's ``_DclsNd``)."""

    __constants__ = ["stride", "padding", "dilated_kernel_size", "groups", "padding_mode", "output_padding",
                     "in_channels", "out_channels", "kernel_count", "version"]
    __annotations__ = {"bias": Optional[torch.Tensor]}
    _kernel_dims = 1  # learnable axes; the first len(dks) axes are the dense kernel's spatial axes

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride: Tuple[int, ...],
                 padding: Tuple[int, ...], dilated_kernel_size: Tuple[int, ...], transposed: bool,
                 output_padding: Tuple[int, ...], groups: int, bias: bool, padding_mode: str, version: str,
                 dense_kernel_size: Tuple[int, ...] = (), strategy: str = "auto") -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {set(_PADDING_MODES)}, "
                             f"but got padding_mode='{padding_mode}'")
        if transposed:
            raise NotImplementedError("transposed DCLS layers are not supported (neither does dcls 0.1.1 define one)")
        check_version(version)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_count = kernel_count
        self.stride = stride
        self.padding = padding
        self.dilated_kernel_size = dilated_kernel_size
        self.transposed = transposed
        self.output_padding = output_padding
        self.groups = groups
        self.padding_mode = padding_mode
        self.version = version
        self.strategy = strategy
        # F.pad takes the paddings last axis first, both sides.
        self._reversed_padding_repeated_twice = _reverse_repeat_tuple(self.padding, 2)
        shape = (out_channels, in_channels // groups, *dense_kernel_size, kernel_count)
        self.weight = Parameter(torch.empty(shape))
        self.P = Parameter(torch.empty((len(dilated_kernel_size), *shape)))
        if version in ("gauss", "max"):
            self.SIG = Parameter(torch.empty((len(dilated_kernel_size), *shape)))
        else:
            self.register_parameter("SIG", None)
        if bias:
            self.bias = Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def strategy(self) -> str:
        """How forward runs: "construct" (dense kernel + F.convNd), "direct" (depthwise Dcls1d/2d/3d:
        trous.dcls.conv's direct depthwise DCLS convolution, never materialises the kernel; other
        Dcls1d: trous.dcls.banded, the constructed kernel visited only inside each row's band of
        taps; batched input only) or "auto" (direct where it applies and its cost model says it is
        faster; under torch.compile "auto" constructs, since the banded cost model reads P and SIG)."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {value!r}")
        self._strategy = value

    def _init_positions(self, lim: int, p: Tensor) -> None:
        init.normal_(p, 0, 0.5).clamp_(-lim, lim)

    def reset_parameters(self) -> None:
        # Same draws in the same order as dcls 0.1.1: a seeded layer gets the same initial values.
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            for i in range(len(self.dilated_kernel_size)):
                self._init_positions(self.dilated_kernel_size[i] // 2, self.P.select(0, i))
            if self.SIG is not None:
                init.constant_(self.SIG, 0.23 if self.version == "gauss" else 0.0)

    def clamp_parameters(self) -> None:
        """Clamps P[i] to +-(dilated_kernel_size[i] // 2); never called automatically."""
        with torch.no_grad():
            for i in range(len(self.dilated_kernel_size)):
                lim = self.dilated_kernel_size[i] // 2
                self.P.select(0, i).clamp_(-lim, lim)

    def extra_repr(self):
        s = ("{in_channels}, {out_channels}, kernel_count={kernel_count} (previous kernel_size)"
             ", stride={stride}, version={version}")
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilated_kernel_size != (1,) * len(self.dilated_kernel_size):
            s += ", dilated_kernel_size={dilated_kernel_size} (learnable)"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        if self._strategy != "auto":
            s += ", strategy={_strategy}"
        return s.format(**self.__dict__)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "padding_mode"):
            self.padding_mode = "zeros"
        if "_strategy" not in self.__dict__:
            self._strategy = "auto"

    # ---- forward

    def _is_depthwise(self) -> bool:
        return self.in_channels == self.out_channels == self.groups

    def _pad(self, input: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """Input and the zero padding left for the convolution (other modes go through F.pad)."""
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * len(self.padding)
        return input, self.padding

    def _direct(self, x: Tensor, weight: Tensor, P: Tensor, SIG: Optional[Tensor], padding):
        """``run(bias) -> output`` for the direct route if the strategy picks it, else None."""
        if self._strategy == "construct" or (self._strategy == "auto" and torch.compiler.is_compiling()):
            return None  # "auto"'s cost model reads P (data-dependent): compiled graphs construct
        if type(self) is Dcls1d and not self._is_depthwise():
            return self._banded(x, weight, P, SIG, padding)
        depthwise = type(self) in (Dcls1d, Dcls2d, Dcls3d) and self._is_depthwise()
        args = (x, weight, P, SIG, self.dilated_kernel_size, self.version, self.stride, padding)
        if depthwise and conv.dcls_direct_supported(*args):
            if self._strategy == "direct" or conv.dcls_direct_is_faster(*args):
                return lambda bias: conv.dcls_depthwise_conv(*args, bias)
            return None
        if self._strategy == "direct":
            why = ("it needs a depthwise Dcls1d/2d/3d (in_channels == out_channels == groups) or a Dcls1d"
                   if not depthwise else
                   "trous.dcls.conv.dcls_direct_supported() refuses these inputs (batched input of the layer's "
                   "rank, device, dtype and sizes)")
            raise RuntimeError(f"{type(self).__name__}: strategy='direct' is unavailable: {why}")
        return None

    def _banded(self, x: Tensor, weight: Tensor, P: Tensor, SIG: Optional[Tensor], padding):
        """The banded grouped 1-D route (trous.dcls.banded) of a Dcls1d that is not depthwise."""
        args = (x, weight, P, SIG, self.dilated_kernel_size[0], self.version, self.stride[0], padding[0], self.groups)
        if not banded.banded_supported(*args):
            if self._strategy == "direct":
                raise RuntimeError(f"{type(self).__name__}: strategy='direct' is unavailable: "
                                   "trous.dcls.banded.banded_supported() refuses these inputs (batched [N, C, L] "
                                   "input, parameters on its device, a floating dtype the build has kernels for)")
            return None
        band = None
        if self._strategy == "auto":
            if x.device.type != "cpu":
                return None  # the cost model reads the band on the CPU only (no device sync)
            band = banded.dcls_band1d(P, SIG, self.dilated_kernel_size[0], self.version)
            if not banded.banded_is_faster(x, band, self.dilated_kernel_size[0], self.stride[0]):
                return None
        return lambda bias: banded.dcls_banded_conv1d(*args[:-1], groups=self.groups, bias=bias, band=band)

    def _conv(self, x: Tensor, K: Tensor, bias: Optional[Tensor], padding) -> Tensor:
        nd = K.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        if nd == 2 and x.dim() == 4 and x.device.type == "cpu" and self.groups == self.in_channels > 1 \
                and not x.is_contiguous(memory_format=torch.channels_last) \
                and (K.shape[-1] * K.shape[-2] >= 81 or x.requires_grad or K.requires_grad):
            # oneDNN's fast depthwise path is channels_last (2 cores: 17x17 forward ~6-15x faster,
            # forward + backward 1.2-4x, copies included; only small-kernel inference is faster in
            # NCHW). The result goes back to the caller's contiguous layout.
            out = conv(x.contiguous(memory_format=torch.channels_last),
                       K.contiguous(memory_format=torch.channels_last), bias, self.stride, padding, 1, self.groups)
            return out.contiguous()
        return conv(x, K, bias, self.stride, padding, 1, self.groups)

    def _construct(self, weight: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        return self.DCK(weight, P, SIG)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], P: Tensor,
                      SIG: Optional[Tensor]) -> Tensor:
        x, padding = self._pad(input)
        direct = self._direct(x, weight, P, SIG, padding)
        if direct is not None:
            return direct(bias)
        return self._conv(x, self._construct(weight, P, SIG), bias, padding)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias, self.P, self.SIG)

    def route(self, input: Tensor) -> str:
        """The route ``forward(input)`` takes with the current parameters and ``strategy``:
        "direct" (trous.dcls.conv's direct depthwise convolution), "banded" (trous.dcls.banded, a
        Dcls1d that is not depthwise) or "construct" (dense kernel, then F.convNd). Makes the same
        choice as forward, the cost model of "auto" included, without convolving; raises as forward
        does when strategy="direct" cannot run these inputs."""
        x, padding = self._pad(input)
        if self._direct(x, self.weight, self.P, self.SIG, padding) is None:
            return "construct"
        return "banded" if type(self) is Dcls1d and not self._is_depthwise() else "direct"


_ARGS_DOC = """
    Args:
        in_channels, out_channels (int): channels of the input and of the output.
        kernel_count (int): kc, learnable elements per (out, in) kernel.
        stride, padding: as in torch.nn.Conv{n}d (dilation is always 1).
        dilated_kernel_size (int or tuple): extent of the dense kernel the elements move in.
        groups (int): blocked connections, as in torch.nn.Conv{n}d (depthwise: groups = in = out).
        bias (bool): learnable bias [out_channels].
        padding_mode (str): "zeros", "reflect", "replicate" or "circular".
        version (str): "v0" (bilinear via floor, no normalisation), "v1" (triangle), "max"
            (triangle of width |SIG| + 1) or "gauss" (sigma = |SIG| + 0.27); all but v0 normalise
            each element over the window.
        strategy (str): "auto", "construct" or "direct" (see ``_DclsNd.strategy``); trous only.
"""


class Dcls1d(_DclsNd):
    __doc__ = """1-D DCLS convolution. Input [N, C_in, L] or [C_in, L] -> output [N, C_out, L_out],
    L_out = (L + 2 * padding - dks) // stride + 1. Kernel [C_out, C_in / groups, dks].
    """ + _ARGS_DOC.format(n=1)

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, _single(stride), _single(padding),
                         _single(dilated_kernel_size), False, _single(0), groups, bias, padding_mode, version,
                         strategy=strategy)
        self.DCK = ConstructKernel1d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)


class Dcls2d(_DclsNd):
    __doc__ = """2-D DCLS convolution. Input [N, C_in, H, W] -> output [N, C_out, H_out, W_out],
    H_out = (H + 2 * padding[0] - dks[0]) // stride[0] + 1 (W likewise with index 1).
    Kernel [C_out, C_in / groups, dks[0], dks[1]]; for v1/max/gauss P[0] moves along the width
    (offset dks[0] // 2) and P[1] along the height, as in dcls 0.1.1; v0: P[0] along the height.
    ``use_implicit_gemm`` is accepted for compatibility and ignored (a speed hint in dcls).
    """ + _ARGS_DOC.format(n=2)

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", use_implicit_gemm: bool = True, strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, _pair(stride), _pair(padding),
                         _pair(dilated_kernel_size), False, _pair(0), groups, bias, padding_mode, version,
                         strategy=strategy)
        self.use_implicit_gemm = use_implicit_gemm
        self.DCK = ConstructKernel2d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)


class Dcls3d(_DclsNd):
    __doc__ = """3-D DCLS convolution. Input [N, C_in, D, H, W] -> output [N, C_out, D_out, H_out, W_out].
    Kernel [C_out, C_in / groups, dks[0], dks[1], dks[2]]; v1/max/gauss: P0 -> W, P1 -> H, P2 -> D;
    v0: P0 -> D, P1 -> W, P2 -> H (dcls 0.1.1's conventions).
    """ + _ARGS_DOC.format(n=3)

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, _triple(stride), _triple(padding),
                         _triple(dilated_kernel_size), False, _triple(0), groups, bias, padding_mode, version,
                         strategy=strategy)
        self.DCK = ConstructKernel3d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)


class Dcls3_1d(_DclsNd):
    __doc__ = """3-D convolution whose kernel is dense on the first two axes (dense_kernel_size) and
    learnable along the last one (dilated_kernel_size, 1-D). Input [N, C_in, D, H, W].
    Parameters: weight [C_out, C_in / groups, d0, d1, kc], P and SIG [1, C_out, C_in / groups, d0, d1, kc];
    kernel [C_out, C_in / groups, d0, d1, dks]. Positions initialised uniform in +-(dks // 2).
    """ + _ARGS_DOC.format(n=3)

    __constants__ = _DclsNd.__constants__ + ["dense_kernel_size"]

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dense_kernel_size=1, dilated_kernel_size=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", version: str = "gauss", strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, _triple(stride), _triple(padding),
                         _single(dilated_kernel_size), False, _triple(0), groups, bias, padding_mode, version,
                         dense_kernel_size=_pair(dense_kernel_size), strategy=strategy)
        self.dense_kernel_size = _pair(dense_kernel_size)
        self.DCK = ConstructKernel3_1d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                       self.dense_kernel_size, self.dilated_kernel_size, self.version)

    def _init_positions(self, lim: int, p: Tensor) -> None:
        init.uniform_(p, -lim, lim)  # dcls 0.1.1's _DclsN_Md

    def extra_repr(self):
        s = super().extra_repr()
        if self.dense_kernel_size != (1,) * len(self.dense_kernel_size):
            s += ", dense_kernel_size={} (fixed)".format(self.dense_kernel_size)
        return s


class Dcls2dK1d(_DclsNd):
    __doc__ = """2-D convolution with a 1-D learnable kernel: the [C_out, C_in / groups, dks] kernel is
    unsqueezed to [.., dks, 1] (flat_dim=0) or [.., 1, dks] (flat_dim=1). Input [N, C_in, H, W].
    Parameters as Dcls1d (P [1, C_out, C_in / groups, kc]); default version "v1".
    """ + _ARGS_DOC.format(n=2)

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "v1", flat_dim: int = 0, strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, _pair(stride), _pair(padding),
                         _single(dilated_kernel_size), False, _pair(0), groups, bias, padding_mode, version,
                         strategy=strategy)
        self.DCK = ConstructKernel1d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)
        self.flat_dim = flat_dim

    def _construct(self, weight: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        return self.DCK(weight, P, SIG).unsqueeze(-1 - self.flat_dim)
