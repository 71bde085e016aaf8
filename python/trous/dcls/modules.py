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
import contextlib
import math
import numbers
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter, init
from torch.nn.modules.utils import _reverse_repeat_tuple

from . import banded, conv
from .versions import SIG_VERSIONS, VERSIONS, check_version

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

_NO_SCRIPT = ("torch.jit.script does not support trous's DCLS modules ({}): their forward picks a route in Python "
              "(cost model, custom ops with Python autograd). Use torch.compile(model) or "
              "torch.export.export(model, (x,)) instead (both run them), or torch.jit.trace.")


# ---- argument checks (ValueError naming the argument, what is expected and what was got, as torch.nn)

def _int_arg(owner: str, name: str, value, minimum: int = 1) -> int:
    """A Python int >= minimum (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return int(value)


def _ints_arg(owner: str, name: str, value, n: int, minimum: int) -> Tuple[int, ...]:
    """An int (repeated n times) or a tuple / list of n ints (one entry is repeated), each >= minimum."""
    items = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value,)
    if len(items) == 1:
        items = items * n
    ok = len(items) == n and all(
        not isinstance(v, bool) and isinstance(v, numbers.Integral) and int(v) >= minimum for v in items)
    if not ok:
        what = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        shape = "an int or a 1-tuple" if n == 1 else f"an int or a tuple of {n} ints"
        raise ValueError(f"{owner}: {name} must be {shape}, each {what}, got {value!r}")
    return tuple(int(v) for v in items)


def _groups_arg(owner: str, in_channels: int, out_channels: int, groups) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or int(groups) < 1:
        raise ValueError(f"{owner}: groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    if in_channels % groups != 0:
        raise ValueError(f"{owner}: in_channels must be divisible by groups, got in_channels={in_channels}, "
                         f"groups={groups}")
    if out_channels % groups != 0:
        raise ValueError(f"{owner}: out_channels must be divisible by groups, got out_channels={out_channels}, "
                         f"groups={groups}")
    return groups


def _choice_arg(owner: str, name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _bool_arg(owner: str, name: str, value) -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise ValueError(f"{owner}: {name} must be a bool, got {value!r}")
    return bool(value)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_param(owner: str, name: str, t, expected: Sequence[int], meaning: str) -> None:
    """RuntimeError unless t is a tensor of shape ``expected`` (``meaning``: the names of its dims)."""
    if not isinstance(t, Tensor):
        raise RuntimeError(f"{owner}: {name} must be a tensor of shape {_shape_str(expected)} ({meaning}), "
                           f"got {type(t).__name__}")
    if t.dim() != len(expected) or any(a != b for a, b in zip(t.shape, expected)):
        raise RuntimeError(f"{owner}: {name} must have shape {_shape_str(expected)} ({meaning}), "
                           f"got {_shape_str(t.shape)}")


def _quiet_trace():
    """Under torch.jit.trace the sizes the checks compare are traced values: the checks still run
    (on the example input) but without a TracerWarning per comparison."""
    return _ignore_tracer_warnings() if torch.jit.is_tracing() else contextlib.nullcontext()


@contextlib.contextmanager
def _ignore_tracer_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _auto_constructs() -> bool:
    """Whether strategy "auto" takes the construct route whatever its cost model says: inside
    torch.compile / torch.export (the banded cost model reads P and SIG, a data-dependent value)
    and torch.jit.trace (a traced graph must not depend on grad mode, which the cost model reads)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def construct_kernel(weight: Tensor, P: Tensor, SIG: Optional[Tensor], dilated_kernel_size,
                     version: str = "gauss") -> Tensor:
    """Dense DCLS kernel ``[O, I/g, *dilated_kernel_size]`` from weight ``[O, I/g, kc]`` and P, SIG
    ``[ndim, O, I/g, kc]`` (SIG may be None for v0 / v1), exactly as dcls 0.1.1's ConstructKernelNd,
    including its axis conventions (2-D v1/max/gauss: P[0] moves along the width).
    ``dilated_kernel_size``: an int (the same on each of the P.shape[0] axes) or one per axis."""
    if isinstance(dilated_kernel_size, numbers.Integral) and not isinstance(dilated_kernel_size, bool):
        dilated_kernel_size = (int(dilated_kernel_size),) * (P.shape[0] if isinstance(P, Tensor) else 1)
    return torch.ops.trous.dcls_construct_kernel(weight, P, SIG, list(dilated_kernel_size), version)


class _ConstructKernelNd(Module):
    """``forward(W, P, SIG)`` returns the dense kernel; no parameters, buffers or cached grids."""

    _ndim = 1

    def __init__(self, out_channels, in_channels, groups, kernel_count, dilated_kernel_size, version):
        super().__init__()
        owner = type(self).__name__
        self.out_channels = _int_arg(owner, "out_channels", out_channels)
        self.in_channels = _int_arg(owner, "in_channels", in_channels)
        self.groups = _groups_arg(owner, self.in_channels, self.out_channels, groups)
        self.kernel_count = _int_arg(owner, "kernel_count", kernel_count)
        self.dilated_kernel_size = _ints_arg(owner, "dilated_kernel_size", dilated_kernel_size, self._ndim, 1)
        check_version(version, owner)
        self.version = version

    def _lead_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups)

    def _check_inputs(self, W, P, SIG) -> None:
        owner = type(self).__name__
        w_shape = (*self._lead_shape(), self.kernel_count)
        names = "out_channels, in_channels // groups, " + ("dense_kernel_size..., " if len(w_shape) > 3 else "")
        _check_param(owner, "W", W, w_shape, names + "kernel_count")
        p_shape = (len(self.dilated_kernel_size), *w_shape)
        _check_param(owner, "P", P, p_shape, "len(dilated_kernel_size), *W.shape")
        if self.version in SIG_VERSIONS:
            if SIG is None:
                raise RuntimeError(f"{owner}: SIG is required for version {self.version!r} (shape "
                                   f"{_shape_str(p_shape)}, as P), got None")
            _check_param(owner, "SIG", SIG, p_shape, "the shape of P")

    def forward(self, W: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        with _quiet_trace():
            self._check_inputs(W, P, SIG)
        return construct_kernel(W, P, SIG, self.dilated_kernel_size, self.version)

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT.format(type(self).__name__))

    def extra_repr(self):
        s = "{in_channels}, {out_channels}, kernel_count={kernel_count}, version={version}"
        if self.dilated_kernel_size != (1,) * len(self.dilated_kernel_size):
            s += ", dilated_kernel_size={dilated_kernel_size}"
        if self.groups != 1:
            s += ", groups={groups}"
        return s.format(**self.__dict__)


class ConstructKernel1d(_ConstructKernelNd):
    """W [O, I/g, kc], P / SIG [1, O, I/g, kc] -> K [O, I/g, dks]."""

    _ndim = 1


class ConstructKernel2d(_ConstructKernelNd):
    """W [O, I/g, kc], P / SIG [2, O, I/g, kc] -> K [O, I/g, dks0, dks1].
    v1/max/gauss: P[0] moves along dks1 (width) offset by dks0 // 2; v0: P[0] along dks0."""

    _ndim = 2


class ConstructKernel3d(_ConstructKernelNd):
    """W [O, I/g, kc], P / SIG [3, O, I/g, kc] -> K [O, I/g, dks0, dks1, dks2]
    (v1/max/gauss: P0 -> dks2, P1 -> dks1, P2 -> dks0; v0: P0 -> dks0, P1 -> dks2, P2 -> dks1)."""

    _ndim = 3


class ConstructKernel3_1d(_ConstructKernelNd):
    """Positions learned along the last axis only: W [O, I/g, d0, d1, kc], P / SIG
    [1, O, I/g, d0, d1, kc] -> K [O, I/g, d0, d1, dks]. (dcls 0.1.1 has no v0 here; trous does.)"""

    _ndim = 1

    def __init__(self, out_channels, in_channels, groups, kernel_count, dense_kernel_size, dilated_kernel_size,
                 version):
        owner = type(self).__name__
        dense = _ints_arg(owner, "dense_kernel_size", dense_kernel_size, 2, 1)
        super().__init__(out_channels, in_channels, groups, kernel_count, dilated_kernel_size, version)
        self.dense_kernel_size = dense

    def _lead_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.dense_kernel_size)

    def forward(self, W: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        with _quiet_trace():
            self._check_inputs(W, P, SIG)
        # Every dense tap (d0, d1) is one more 1-D "channel": a view, then the 1-D construction.
        o, i, kc = W.shape[0], W.shape[1], W.shape[-1]
        rows = i * math.prod(self.dense_kernel_size)
        sig = None if SIG is None else SIG.reshape(1, o, rows, kc)
        K = construct_kernel(W.reshape(o, rows, kc), P.reshape(1, o, rows, kc), sig, self.dilated_kernel_size,
                             self.version)
        return K.reshape(o, i, *self.dense_kernel_size, self.dilated_kernel_size[0])


class _DclsNd(Module):
    """Common part of Dcls1d/2d/3d, Dcls3_1d and Dcls2dK1d (dcls 0.1.1's ``_DclsNd`` / ``_DclsN_Md``).

    Every constructor argument is checked here, in signature order, before anything is allocated:
    a ValueError names the argument, what is expected and what was got (as torch.nn.ConvNd).
    ``forward`` checks the input and the parameters it is given (RuntimeError naming input / weight
    / P / SIG / bias) before any op runs.
    """

    __constants__ = ["stride", "padding", "dilated_kernel_size", "groups", "padding_mode", "output_padding",
                     "in_channels", "out_channels", "kernel_count", "version"]
    __annotations__ = {"bias": Optional[torch.Tensor]}
    _conv_dims = 1  # spatial axes of the input and of the convolution
    _dks_dims = 1  # learnable axes (len(dilated_kernel_size), P.shape[0])
    _dense_dims = 0  # fixed dense axes of the kernel (Dcls3_1d: 2)
    _input_doc = "[N, C_in, L] or [C_in, L]"

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride, padding, dilated_kernel_size,
                 groups: int, bias: bool, padding_mode: str, version: str, strategy: str = "auto",
                 dense_kernel_size=()) -> None:
        super().__init__()
        owner = type(self).__name__
        nd = self._conv_dims
        in_channels = _int_arg(owner, "in_channels", in_channels)
        out_channels = _int_arg(owner, "out_channels", out_channels)
        kernel_count = _int_arg(owner, "kernel_count", kernel_count)
        stride = _ints_arg(owner, "stride", stride, nd, 1)
        padding = _ints_arg(owner, "padding", padding, nd, 0)
        dense = _ints_arg(owner, "dense_kernel_size", dense_kernel_size, self._dense_dims, 1) \
            if self._dense_dims else ()
        dilated_kernel_size = _ints_arg(owner, "dilated_kernel_size", dilated_kernel_size, self._dks_dims, 1)
        groups = _groups_arg(owner, in_channels, out_channels, groups)
        bias = _bool_arg(owner, "bias", bias)
        if not isinstance(padding_mode, str) or padding_mode not in _PADDING_MODES:
            raise ValueError(f"{owner}: padding_mode must be one of {set(_PADDING_MODES)}, "
                             f"but got padding_mode={padding_mode!r}")
        check_version(version, owner)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_count = kernel_count
        self.stride = stride
        self.padding = padding
        self.dilated_kernel_size = dilated_kernel_size
        self.transposed = False
        self.output_padding = (0,) * nd
        self.groups = groups
        self.padding_mode = padding_mode
        self.version = version
        self.strategy = strategy
        # F.pad takes the paddings last axis first, both sides.
        self._reversed_padding_repeated_twice = _reverse_repeat_tuple(self.padding, 2)
        shape = (out_channels, in_channels // groups, *dense, kernel_count)
        self.weight = Parameter(torch.empty(shape))
        self.P = Parameter(torch.empty((len(dilated_kernel_size), *shape)))
        if version in SIG_VERSIONS:
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
        faster; under torch.compile, torch.export and torch.jit.trace "auto" constructs, since the
        banded cost model reads P and SIG and the cost models read grad mode).
        ``route(input)`` says which route forward takes; for given parameters, input shape, device
        and grad mode it is always the same one."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = _choice_arg(type(self).__name__, "strategy", value, STRATEGIES)

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

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT.format(type(self).__name__))

    # ---- forward

    def _kernel_extent(self) -> Tuple[int, ...]:
        """The dense kernel's spatial size, one entry per spatial axis of the input."""
        return self.dilated_kernel_size

    def _param_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_count)

    def _check_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], P: Tensor,
                       SIG: Optional[Tensor]) -> None:
        """RuntimeError naming input / weight / P / SIG / bias, before any op runs."""
        owner = type(self).__name__
        nd = self._conv_dims
        if not isinstance(input, Tensor):
            raise RuntimeError(f"{owner}: input must be a tensor {self._input_doc}, got {type(input).__name__}")
        if input.dim() not in (nd + 1, nd + 2):
            raise RuntimeError(f"{owner}: input must be {self._input_doc} ({nd + 2}-D or {nd + 1}-D), got a "
                               f"{input.dim()}-D tensor of shape {_shape_str(input.shape)}")
        c = input.shape[-nd - 1]
        if c != self.in_channels:
            raise RuntimeError(f"{owner}: input must have in_channels={self.in_channels} channels (dim "
                               f"{input.dim() - nd - 1} of {self._input_doc}), got {c} in an input of shape "
                               f"{_shape_str(input.shape)}")
        w_shape = self._param_shape()
        names = "out_channels, in_channels // groups, " + ("dense_kernel_size..., " if self._dense_dims else "")
        _check_param(owner, "weight", weight, w_shape, names + "kernel_count")
        p_shape = (len(self.dilated_kernel_size), *w_shape)
        _check_param(owner, "P", P, p_shape, "len(dilated_kernel_size), *weight.shape")
        if self.version in SIG_VERSIONS:
            if SIG is None:
                raise RuntimeError(f"{owner}: SIG is required for version {self.version!r} (shape "
                                   f"{_shape_str(p_shape)}, as P), got None")
            _check_param(owner, "SIG", SIG, p_shape, "the shape of P")
        if bias is not None:
            _check_param(owner, "bias", bias, (self.out_channels,), "out_channels")
        extent = self._kernel_extent()
        spatial = input.shape[input.dim() - nd:]
        if any(n == 0 for n in spatial):
            raise RuntimeError(f"{owner}: input must have non-empty spatial axes (as torch.nn.Conv{nd}d), got shape "
                               f"{_shape_str(input.shape)}")
        if any(spatial[i] + 2 * self.padding[i] < extent[i] for i in range(nd)):
            raise RuntimeError(f"{owner}: input's spatial size {_shape_str(spatial)} plus 2 * padding "
                               f"{_shape_str(self.padding)} must be at least the kernel's size "
                               f"{_shape_str(extent)} on every axis")
        # Devices last: a bad shape gets the same error whatever the devices (CPU and meta alike).
        for name, t in (("weight", weight), ("P", P), ("SIG", SIG), ("bias", bias)):
            if t is not None and t.device != input.device:
                raise RuntimeError(f"{owner}: {name} is on {t.device} but input is on {input.device}: the input "
                                   "and the layer's parameters must be on one device (move the layer with .to())")

    def _is_depthwise(self) -> bool:
        return self.in_channels == self.out_channels == self.groups

    def _pad(self, input: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """Input and the zero padding left for the convolution (other modes go through F.pad)."""
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * len(self.padding)
        return input, self.padding

    def _refuse_direct(self, cause: str):
        raise RuntimeError(f"{type(self).__name__}: strategy='direct' is unavailable: {cause}")

    def _direct(self, x: Tensor, weight: Tensor, P: Tensor, SIG: Optional[Tensor], padding):
        """``run(bias) -> output`` for the direct route if the strategy picks it, else None."""
        if self._strategy == "construct" or (self._strategy == "auto" and _auto_constructs()):
            return None
        if type(self) is Dcls1d and not self._is_depthwise():
            return self._banded(x, weight, P, SIG, padding)
        depthwise = type(self) in (Dcls1d, Dcls2d, Dcls3d) and self._is_depthwise()
        if not depthwise:
            if self._strategy == "direct":
                self._refuse_direct(
                    "it needs a depthwise Dcls1d/2d/3d (in_channels == out_channels == groups) or a Dcls1d, got a "
                    f"{type(self).__name__} with in_channels={self.in_channels}, out_channels={self.out_channels}, "
                    f"groups={self.groups}")
            return None
        args = (x, weight, P, SIG, self.dilated_kernel_size, self.version, self.stride, padding)
        reasons: Optional[List[str]] = [] if self._strategy == "direct" else None
        if conv.dcls_direct_supported(*args, reasons=reasons):
            if self._strategy == "direct" or conv.dcls_direct_is_faster(*args):
                return lambda bias: conv.dcls_depthwise_conv(*args, bias)
            return None
        if self._strategy == "direct":
            self._refuse_direct("trous.dcls.conv.dcls_direct_supported() refuses these inputs: " + "; ".join(reasons))
        return None

    def _banded(self, x: Tensor, weight: Tensor, P: Tensor, SIG: Optional[Tensor], padding):
        """The banded grouped 1-D route (trous.dcls.banded) of a Dcls1d that is not depthwise."""
        args = (x, weight, P, SIG, self.dilated_kernel_size[0], self.version, self.stride[0], padding[0], self.groups)
        reasons: Optional[List[str]] = [] if self._strategy == "direct" else None
        if not banded.banded_supported(*args, reasons=reasons):
            if self._strategy == "direct":
                self._refuse_direct("trous.dcls.banded.banded_supported() refuses these inputs: " + "; ".join(reasons))
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
        big = K.shape[-1] * K.shape[-2] >= 81 if nd == 2 else False
        # Under torch.jit.trace the layout may not depend on requires_grad (the trace check reruns
        # the module under no_grad and compares graphs).
        grads = not torch.jit.is_tracing() and (x.requires_grad or K.requires_grad)
        with _quiet_trace():
            channels_last = nd == 2 and x.dim() == 4 and x.device.type == "cpu" and \
                self.groups == self.in_channels > 1 and \
                not x.is_contiguous(memory_format=torch.channels_last) and bool(big or grads)
        if channels_last:
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
        with _quiet_trace():
            self._check_forward(input, weight, bias, P, SIG)
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
        choice as forward, the cost model of "auto" included (it reads the input's shape and
        device, the grad mode and requires_grad, and for "banded" the band of P and SIG), without
        convolving; raises as forward does on bad input or when strategy="direct" cannot run it."""
        self._check_forward(input, self.weight, self.bias, self.P, self.SIG)
        x, padding = self._pad(input)
        if self._direct(x, self.weight, self.P, self.SIG, padding) is None:
            return "construct"
        return "banded" if type(self) is Dcls1d and not self._is_depthwise() else "direct"


_ARGS_DOC = """
    Args:
        in_channels, out_channels (int): channels of the input and of the output (positive).
        kernel_count (int): kc, learnable elements per (out, in) kernel (positive).
        stride, padding: as in torch.nn.Conv{n}d (dilation is always 1): an int or one per axis;
            stride >= 1, padding >= 0 (no "same" / "valid").
        dilated_kernel_size (int or tuple): extent of the dense kernel the elements move in (>= 1).
        groups (int): blocked connections, as in torch.nn.Conv{n}d (depthwise: groups = in = out).
        bias (bool): learnable bias [out_channels].
        padding_mode (str): "zeros", "reflect", "replicate" or "circular".
        version (str): "v0" (bilinear via floor, no normalisation), "v1" (triangle), "max"
            (triangle of width |SIG| + 1) or "gauss" (sigma = |SIG| + 0.27); all but v0 normalise
            each element over the window.
        strategy (str): "auto", "construct" or "direct" (see ``_DclsNd.strategy``); trous only.
    A bad argument raises ValueError naming it, what is expected and what was got; a bad input
    (rank, channel count, a spatial size smaller than the kernel) raises RuntimeError naming
    ``input`` before any op runs.

    NaN and infinities: the construct route builds the dense kernel and convolves it, so a NaN (or
    +-Inf) in the input reaches every output whose window covers it, even through kernel taps that
    are exactly zero (0 * NaN = NaN). The direct routes ("direct" and the "banded" Dcls1d route) visit
    only the taps inside the kernel's support, so a NaN in x does not reach outputs through taps
    outside it: NaN sets (and so results) can differ between routes for non-finite inputs.
    A NaN in one element's weight (any version) or P / SIG (v1, max, gauss) makes every output of its
    output channel NaN, on every route. An empty batch gives an empty output; an empty spatial axis
    is refused (as torch.nn.ConvNd); positions far outside the window give the bias.
"""


class Dcls1d(_DclsNd):
    __doc__ = """1-D DCLS convolution. Input [N, C_in, L] or [C_in, L] -> output [N, C_out, L_out],
    L_out = (L + 2 * padding - dks) // stride + 1. Kernel [C_out, C_in / groups, dks].
    """ + _ARGS_DOC.format(n=1)

    _conv_dims, _dks_dims = 1, 1
    _input_doc = "[N, C_in, L] or [C_in, L]"

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                         padding_mode, version, strategy=strategy)
        self.DCK = ConstructKernel1d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)


class Dcls2d(_DclsNd):
    __doc__ = """2-D DCLS convolution. Input [N, C_in, H, W] -> output [N, C_out, H_out, W_out],
    H_out = (H + 2 * padding[0] - dks[0]) // stride[0] + 1 (W likewise with index 1).
    Kernel [C_out, C_in / groups, dks[0], dks[1]]; for v1/max/gauss P[0] moves along the width
    (offset dks[0] // 2) and P[1] along the height, as in dcls 0.1.1; v0: P[0] along the height.
    ``use_implicit_gemm`` is accepted for compatibility and ignored (a speed hint in dcls).
    """ + _ARGS_DOC.format(n=2)

    _conv_dims, _dks_dims = 2, 2
    _input_doc = "[N, C_in, H, W] or [C_in, H, W]"

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", use_implicit_gemm: bool = True, strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                         padding_mode, version, strategy=strategy)
        self.use_implicit_gemm = _bool_arg(type(self).__name__, "use_implicit_gemm", use_implicit_gemm)
        self.DCK = ConstructKernel2d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)


class Dcls3d(_DclsNd):
    __doc__ = """3-D DCLS convolution. Input [N, C_in, D, H, W] -> output [N, C_out, D_out, H_out, W_out].
    Kernel [C_out, C_in / groups, dks[0], dks[1], dks[2]]; v1/max/gauss: P0 -> W, P1 -> H, P2 -> D;
    v0: P0 -> D, P1 -> W, P2 -> H (dcls 0.1.1's conventions).
    """ + _ARGS_DOC.format(n=3)

    _conv_dims, _dks_dims = 3, 3
    _input_doc = "[N, C_in, D, H, W] or [C_in, D, H, W]"

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                         padding_mode, version, strategy=strategy)
        self.DCK = ConstructKernel3d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)


class Dcls3_1d(_DclsNd):
    __doc__ = """3-D convolution whose kernel is dense on the first two axes (dense_kernel_size) and
    learnable along the last one (dilated_kernel_size, 1-D: an int or a 1-tuple). Input [N, C_in, D, H, W].
    Parameters: weight [C_out, C_in / groups, d0, d1, kc], P and SIG [1, C_out, C_in / groups, d0, d1, kc];
    kernel [C_out, C_in / groups, d0, d1, dks]. Positions initialised uniform in +-(dks // 2).
    dense_kernel_size: an int or a 2-tuple, each >= 1.
    """ + _ARGS_DOC.format(n=3)

    __constants__ = _DclsNd.__constants__ + ["dense_kernel_size"]
    _conv_dims, _dks_dims, _dense_dims = 3, 1, 2
    _input_doc = "[N, C_in, D, H, W] or [C_in, D, H, W]"

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dense_kernel_size=1, dilated_kernel_size=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", version: str = "gauss", strategy: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                         padding_mode, version, strategy=strategy, dense_kernel_size=dense_kernel_size)
        self.dense_kernel_size = _ints_arg(type(self).__name__, "dense_kernel_size", dense_kernel_size, 2, 1)
        self.DCK = ConstructKernel3_1d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                       self.dense_kernel_size, self.dilated_kernel_size, self.version)

    def _kernel_extent(self) -> Tuple[int, ...]:
        return (*self.dense_kernel_size, self.dilated_kernel_size[0])

    def _param_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.dense_kernel_size, self.kernel_count)

    def _init_positions(self, lim: int, p: Tensor) -> None:
        init.uniform_(p, -lim, lim)  # dcls 0.1.1's _DclsN_Md

    def extra_repr(self):
        s = super().extra_repr()
        if self.dense_kernel_size != (1,) * len(self.dense_kernel_size):
            s += ", dense_kernel_size={} (fixed)".format(self.dense_kernel_size)
        return s


class Dcls2dK1d(_DclsNd):
    __doc__ = """2-D convolution with a 1-D learnable kernel: the [C_out, C_in / groups, dks] kernel is
    unsqueezed to [.., dks, 1] (flat_dim=0, along the height) or [.., 1, dks] (flat_dim=1, along the
    width). Input [N, C_in, H, W]. Parameters as Dcls1d (P [1, C_out, C_in / groups, kc]); default
    version "v1". ``flat_dim`` must be 0 or 1 (dcls 0.1.1 unsqueezes at -1 - flat_dim, so other values
    give a kernel of another rank or a silent alias of flat_dim=1: refused here).
    """ + _ARGS_DOC.format(n=2)

    _conv_dims, _dks_dims = 2, 1
    _input_doc = "[N, C_in, H, W] or [C_in, H, W]"

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "v1", flat_dim: int = 0, strategy: str = "auto"):
        if isinstance(flat_dim, bool) or not isinstance(flat_dim, numbers.Integral) or flat_dim not in (0, 1):
            raise ValueError(f"Dcls2dK1d: flat_dim must be 0 (kernel [dks, 1]) or 1 (kernel [1, dks]), "
                             f"got {flat_dim!r}")
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                         padding_mode, version, strategy=strategy)
        self.DCK = ConstructKernel1d(self.out_channels, self.in_channels, self.groups, self.kernel_count,
                                     self.dilated_kernel_size, self.version)
        self.flat_dim = int(flat_dim)

    def _kernel_extent(self) -> Tuple[int, ...]:
        d = self.dilated_kernel_size[0]
        return (d, 1) if self.flat_dim == 0 else (1, d)

    def _construct(self, weight: Tensor, P: Tensor, SIG: Optional[Tensor]) -> Tensor:
        return self.DCK(weight, P, SIG).unsqueeze(-1 - self.flat_dim)
