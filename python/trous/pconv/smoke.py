"""``python -m trous.smoke`` cases of the partial-convolution ops (small and edge shapes)."""
import torch

from ..smoke import close
from . import reference as ref


def _inputs(shape, cp, k, dtype, device, seed, layout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    w = torch.randn(cp, cp, k[0], k[1], generator=g) / (cp * k[0] * k[1]) ** 0.5
    if x.numel() > 3:
        x.view(-1)[1] = float("nan")
        x.view(-1)[-2] = float("inf")
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w.to(device=device, dtype=dtype)


def run(r, quick: bool):
    """channel_partial_conv2d (both routes, out-of-place and in-place) and its backward on every
    dtype, odd shapes, partial blocks (W not a multiple of 16, cp not of 4), dilation, channels_last,
    NaN / Inf inputs and empty tensors."""
    dev = r.device
    specs = [((1, 4, 5, 7), 1, (3, 3), (1, 1)), ((2, 10, 9, 19), 3, (3, 3), (2, 1)), ((1, 8, 6, 33), 5, (1, 5), (1, 2)),
             ((2, 6, 0, 5), 2, (3, 3), (1, 1))]
    if not quick:
        specs += [((2, 96, 14, 14), 24, (3, 3), (1, 1)), ((1, 16, 17, 3), 4, (5, 3), (2, 2))]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    k = 0
    for shape, cp, ks, dil in specs:
        for algo in ("direct", "aten"):
            dtype = dtypes[k % 3]
            layout = ["contiguous", "channels_last"][(k // 3) % 2]
            k += 1
            label = f"channel_partial_conv2d {shape} cp={cp} k={ks} d={dil} {dtype} {layout} {algo}"

            def case(shape=shape, cp=cp, ks=ks, dil=dil, dtype=dtype, layout=layout, algo=algo, seed=k,
                     label=label):
                x, w = _inputs(shape, cp, ks, dtype, dev, seed, layout)
                out = r.call("trous::channel_partial_conv2d", x, w, [1, 1], list(dil), algo)
                y = x.clone()
                r.call("trous::channel_partial_conv2d_", y, w, [1, 1], list(dil), algo)
                g = torch.randn_like(out)
                gx, gw = r.call("trous::channel_partial_conv2d_backward", g, x, w, list(dil), [True, True])
                if r.compare:
                    want = ref.channel_partial_conv2d(x, w, dil)
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    r.check(label, close(out, want, tol, tol), "output differs")
                    r.check(label + " inplace", close(y, want, tol, tol), "in-place output differs")
                    r.check(label + " grad_x[cp:]", bool((gx[:, cp:] == g[:, cp:]).all()), "pass-through grad")
                    r.check(label + " grad_w shape", tuple(gw.shape) == tuple(w.shape), "grad_weight shape")

            r.case(label, case)
