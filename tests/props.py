"""The property-based bad-input suite, shared by every family (``from props import ...``).

Each family's ``test_<family>*_props.py`` draws inputs with these strategies and checks three
properties: (1) a valid input matches the family's reference, NaN positions equal; (2) an invalid
input raises a RuntimeError or ValueError naming one of its arguments, on CPU and on meta alike
(the fake kernel is the real kernel's validation); (3) nothing crashes or hangs (cases that could
crash run in a subprocess, :func:`run_isolated`).

Profiles (tests/conftest.py): "default" is small and derandomized, for ``make test``; ``make fuzz``
runs "fuzz" (many random examples; a failure prints its seed and a ``@reproduce_failure`` blob).
"""
import re
import subprocess
import sys
from typing import Iterable, Sequence

import pytest
import torch
from hypothesis import assume, given, note, settings  # noqa: F401 (re-exported)
from hypothesis import strategies as st  # noqa: F401 (re-exported)

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last", "overlapping")


def sizes(min_value: int = 0, max_value: int = 9):
    """Small sizes, shrinking towards the edges that break kernels: 0, 1, then odd sizes."""
    return st.integers(min_value, max_value)


def layouts(allowed: Sequence[str] = LAYOUTS):
    return st.sampled_from(tuple(allowed))


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` with other strides.

    transposed: stored with the last two dimensions swapped (a transposed view of a copy);
    sliced: every other element of a twice-as-long last dimension; channels_last: dimension 1
    innermost; expanded: a size-1 dimension 0 broadcast (only where ``t.shape[0] == 1``, else
    contiguous); overlapping: an as_strided view whose last two dimensions share memory (only where
    that reproduces ``t``: ``t`` must be constant along dimension -2, else contiguous).
    """
    if layout == "contiguous" or t.dim() < 2:
        return t.contiguous()
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "channels_last":
        perm = (0, *range(2, t.dim()), 1)
        inverse = (0, t.dim() - 1, *range(1, t.dim() - 1))
        return t.permute(perm).contiguous().permute(inverse)
    if layout == "expanded":
        return _broadcast_along(t, 0)
    if layout == "overlapping":
        return _broadcast_along(t, t.dim() - 2)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _broadcast_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    # A stride-0 view along `dim` reproduces t only where t is constant along it.
    if t.shape[dim] < 2:
        return t.contiguous()
    first = t.narrow(dim, 0, 1)
    if not bool(((t == first) | (t.isnan() & first.isnan())).all()):
        return t.contiguous()
    base = first.contiguous()
    strides = list(base.stride())
    strides[dim] = 0
    return base.as_strided(t.shape, strides)


def nonfinite(draw, t: torch.Tensor, p: float = 0.1) -> torch.Tensor:
    """``t`` (floating point) with a drawn fraction of its elements (about ``p``) set to NaN, +Inf
    or -Inf. Call inside an ``@st.composite`` strategy with its ``draw``."""
    if t.numel() == 0:
        return t
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(t.shape, generator=g) < p
    kind = torch.randint(0, 3, t.shape, generator=g)
    values = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64)[kind]
    out = t.detach().clone()
    out[pick.to(t.device)] = values[pick].to(t.dtype).to(t.device)
    return out


def assert_same_nan_and_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float):
    """NaN where the reference has NaN and only there, infinities equal, the rest close (fp64)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    a, b = out.detach().double().cpu(), ref.detach().double().cpu()
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b), (f"NaN at {int((nan_a & ~nan_b).sum())} positions the reference has finite, "
                                       f"finite at {int((nan_b & ~nan_a).sum())} reference NaN positions")
    inf_a, inf_b = a.isinf(), b.isinf()
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), "infinities differ from the reference"
    keep = ~(nan_a | inf_a)
    torch.testing.assert_close(a[keep], b[keep], rtol=rtol, atol=atol)


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return v.detach().to("meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_to_meta(u) for u in v)
    if isinstance(v, dict):
        return {k: _to_meta(u) for k, u in v.items()}
    return v


def mixed_devices(args: Sequence, which: Iterable[int]) -> list:
    """``args`` with the tensors at positions ``which`` moved to meta (the others unchanged)."""
    which = set(which)
    return [_to_meta(a) if i in which else a for i, a in enumerate(args)]


def _refusal(fn, args, kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (RuntimeError, ValueError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    pytest.fail(f"accepted an invalid input: {_describe(args, kwargs)}")


def _describe(args, kwargs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor({tuple(v.shape)}, {v.dtype}, {v.device})"
        return repr(v)

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


def assert_refused(fn, args: Sequence, kwargs=None, names: Sequence[str] = ()):
    """fn(*args, **kwargs) raises RuntimeError or ValueError naming one of ``names`` (as a word), and
    raises the same first line with every tensor moved to meta (the fake kernel)."""
    kwargs = kwargs or {}
    message = _refusal(fn, args, kwargs)
    if names:
        assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names), \
            f"the error does not name any of {list(names)}: {message!r}"
    meta = _refusal(fn, _to_meta(list(args)), _to_meta(kwargs))
    assert meta == message, f"meta refuses differently:\n  cpu:  {message}\n  meta: {meta}"
    return message


def run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python (trous importable as here); a crash or hang fails the test
    there, not the whole run. Returns the finished process (check its returncode and output)."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for more than {timeout} s:\n{code}")
