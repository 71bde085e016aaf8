"""Partial-convolution cases: trous' channel_partial_conv2d against FasterNet's split_cat and
slicing+clone forms, and against the convolution of the first cp channels alone on a contiguous
input (the floor), forward and forward+backward; plus the direct kernel against the ATen route.

Bytes per op (``bytes``): x read once, the output written once (2 N C H W elements) plus weights.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..bench.harness import Case
from . import reference as ref

FAMILY = "pconv"
SHAPE = (8, 96, 56, 56)  # FasterNet stage 1 at batch 8 (partial_conv.md's CPU reference shape)
N_DIV = 4
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def targets(device: str) -> dict:
    """Issue 10: faster than split_cat and slicing+clone (speed-up >= 1), within 1.1x of the cp
    channel conv alone (speed-up >= 1 / 1.1 against the floor)."""
    return {"speedup": 1.0}


FLOOR_TARGET = {"speedup": 1 / 1.1}
POINTWISE_TARGET = {"speedup": 1.3}  # issue 10: fused PConv + 1x1 >= 1.3x the unfused pair


def _inputs(shape, dtype, device, seed, grad: bool):
    g = torch.Generator().manual_seed(2000 + seed)
    N, C, H, W = shape
    cp = C // N_DIV
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(cp, cp, 3, 3, generator=g) / (9 * cp) ** 0.5).to(device=device, dtype=dtype)
    x1 = x[:, :cp].contiguous()
    go = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if grad:
        x.requires_grad_()
        w.requires_grad_()
        x1.requires_grad_()
    return x, w, x1, go


def _fwd(fn):
    def run(x, w, x1, go):
        with torch.no_grad():
            return fn(x, w, x1)
    return run


def _fwd_bwd(fn, floor: bool = False):
    def run(x, w, x1, go):
        y = fn(x, w, x1)
        return torch.autograd.grad(y, (x1 if floor else x, w), go[:, :y.shape[1]] if floor else go)
    return run


def cases(device: str, quick: bool, shape: Optional[Sequence[int]] = None) -> List[Case]:
    import trous  # noqa: F401  (registers the ops)

    ops = torch.ops.trous
    shape = tuple(int(s) for s in shape) if shape is not None else SHAPE
    if len(shape) != 4:
        raise SystemExit("pconv --shape is N,C,H,W")
    dts = ["fp32"] if device != "cuda" else ["fp16", "bf16"]
    out: List[Case] = []
    N, C, H, W = shape
    for dt in dts:
        dtype = _DTYPES[dt]
        elt = torch.empty((), dtype=dtype).element_size()
        nbytes = 2 * N * C * H * W * elt
        in_bytes = 2 * N * C * H * W * elt + N * (C // N_DIV) * H * W * elt

        def trous_fn(x, w, x1):
            return ops.channel_partial_conv2d(x, w, [1, 1], [1, 1], "auto")

        def split_cat(x, w, x1):
            return ref.split_cat(x, w)

        def slicing(x, w, x1):
            return ref.slicing(x, w)

        def floor(x, w, x1):
            return ref.cp_conv(x1, w)

        def direct(x, w, x1):
            return ops.channel_partial_conv2d(x, w, [1, 1], [1, 1], "direct")

        def aten(x, w, x1):
            return ops.channel_partial_conv2d(x, w, [1, 1], [1, 1], "aten")

        sh = "x".join(map(str, shape)) + f" n_div {N_DIV}"
        modes = [("fwd", False)] if quick else [("fwd", False), ("fwd+bwd", True)]
        for mode, grad in modes:
            wrap = _fwd_bwd if grad else _fwd

            def make(i, grad=grad, dtype=dtype):
                return _inputs(shape, dtype, device, i, grad)

            rows = [("split_cat", split_cat, targets(device), False),
                    ("slicing+clone", slicing, targets(device), False),
                    ("cp conv floor", floor, dict(FLOOR_TARGET), True)]
            if not quick:
                rows.append(("aten route (direct kernel timed)", aten, {}, False))
            for base_name, base, tg, is_floor in rows:
                fn = direct if base is aten else trous_fn
                op = f"channel_partial {mode} vs {base_name}"
                out.append(Case(family=FAMILY, op=op, shape=sh, dtype=dt, make_inputs=make, fn=wrap(fn),
                                baseline=_fwd_bwd(base, is_floor) if grad else _fwd(base), bytes_moved=nbytes,
                                input_bytes=in_bytes, baseline_name=base_name, targets=dict(tg)))
            if not quick:
                out.append(_pointwise_case(shape, dtype, dt, device, grad, mode, sh, nbytes, in_bytes))
    if not quick and shape == SHAPE:
        out += _fasternet_cases(device, dts[0])
    return out


def _fasternet_cases(device: str, dt: str) -> List[Case]:
    """timm FasterNet-T0 at batch 32, 224x224, converted with convert_fasternet, against the
    unconverted model: inference, and one training step (forward, backward of a sum loss). Skipped
    (no rows) when timm or the model is missing."""
    import copy

    try:
        import timm

        base = timm.create_model("fasternet_t0", pretrained=False)
    except Exception:  # noqa: BLE001 - timm missing or without fasternet: no rows
        return []
    from .modules import convert_fasternet

    dtype = _DTYPES[dt]
    base = base.to(device=device, dtype=dtype)
    conv = convert_fasternet(copy.deepcopy(base))
    shape = (32, 3, 224, 224)
    elt = torch.empty((), dtype=dtype).element_size()

    def make(i):
        g = torch.Generator().manual_seed(4000 + i)
        return (torch.randn(shape, generator=g).to(device=device, dtype=dtype),)

    def infer(model):
        model = copy.deepcopy(model).eval()

        def run(x):
            with torch.no_grad():
                return model(x)
        return run

    def train_step(model):
        model = copy.deepcopy(model).train()

        def run(x):
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()
        return run

    tg = {"speedup": 1.0}
    nbytes = 32 * 3 * 224 * 224 * elt
    common = dict(family=FAMILY, shape="fasternet_t0 b32 224x224", dtype=dt, bytes_moved=nbytes, input_bytes=nbytes,
                  baseline_name="timm fasternet_t0 (split_cat)", targets=dict(tg))
    return [Case(op="fasternet_t0 inference, converted vs timm", make_inputs=make, fn=infer(conv),
                 baseline=infer(base), **common),
            Case(op="fasternet_t0 train step, converted vs timm", make_inputs=make, fn=train_step(conv),
                 baseline=train_step(base), **common)]


def _pointwise_case(shape, dtype, dt, device, grad, mode, sh, nbytes, in_bytes) -> Case:
    """PConv + 1x1 (C -> 2C, FasterNet's mlp[0]) through pconv_pointwise against the unfused pair
    (trous' PConv, then F.conv2d 1x1)."""
    import torch.nn.functional as F

    from .channel_partial import channel_partial_conv2d
    from .pointwise import pconv_pointwise

    C = shape[1]

    def make(i):
        x, w, _, _ = _inputs(shape, dtype, device, i, grad)
        g = torch.Generator().manual_seed(3000 + i)
        pw = (torch.randn(2 * C, C, 1, 1, generator=g) / C ** 0.5).to(device=device, dtype=dtype)
        gz = torch.randn((shape[0], 2 * C, shape[2], shape[3]), generator=g).to(device=device, dtype=dtype)
        return x, w, pw.requires_grad_(grad), gz

    def run(fn):
        def call(x, w, pw, gz):
            if not grad:
                with torch.no_grad():
                    return fn(x, w, pw)
            return torch.autograd.grad(fn(x, w, pw), (x, w, pw), gz)
        return call

    return Case(family=FAMILY, op=f"pconv+1x1 {mode} vs unfused pair", shape=sh, dtype=dt, make_inputs=make,
                fn=run(lambda x, w, pw: pconv_pointwise(x, w, pw)),
                baseline=run(lambda x, w, pw: F.conv2d(channel_partial_conv2d(x, w), pw)),
                bytes_moved=nbytes * 3 // 2, input_bytes=in_bytes * 2, baseline_name="unfused pair",
                targets=dict(POINTWISE_TARGET))
