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
                route = r.call("trous::channel_partial_conv2d_route", x, w, algo)
                if r.compare:
                    want = ref.channel_partial_conv2d(x, w, dil)
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    r.check(label, close(out, want, tol, tol), "output differs")
                    r.check(label + " inplace", close(y, want, tol, tol), "in-place output differs")
                    r.check(label + " grad_x[cp:]", bool((gx[:, cp:] == g[:, cp:]).all()), "pass-through grad")
                    r.check(label + " grad_w shape", tuple(gw.shape) == tuple(w.shape), "grad_weight shape")
                    r.check(label + " route", route == algo, f"route {route!r} for algo {algo!r}")

            r.case(label, case)
    _masked(r, quick)


def _masked(r, quick: bool):
    """masked_partial_epilogue (out-of-place and in-place) and its backward on every dtype, both
    modes, S broadcast over the batch, mask groups, channels_last, NaN in raw, empty tensors."""
    dev = r.device
    specs = [((1, 3, 5, 7), (1, 1, 5, 7)), ((2, 6, 9, 19), (2, 3, 9, 19)), ((2, 4, 0, 5), (1, 1, 0, 5)),
             ((1, 5, 2, 3, 4), (1, 1, 2, 3, 4))]
    if not quick:
        specs += [((4, 64, 32, 32), (4, 1, 32, 32))]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for k, (shape, sshape) in enumerate(specs):
        dtype = dtypes[k % 3]
        mode = ("exact", "nvidia")[k % 2]
        cl = len(shape) == 4 and k % 2 == 1
        label = f"masked_partial_epilogue {shape} S {sshape} {dtype} {mode}{' channels_last' if cl else ''}"

        def case(shape=shape, sshape=sshape, dtype=dtype, mode=mode, cl=cl, label=label, seed=k):
            g = torch.Generator().manual_seed(100 + seed)
            raw = torch.randn(shape, generator=g)
            if raw.numel() > 3:
                raw.view(-1)[1] = float("nan")
            S = (torch.rand(sshape, generator=g) * 10).floor()
            b = torch.randn(shape[1], generator=g)
            raw, S, b = raw.to(device=dev, dtype=dtype), S.to(dev), b.to(device=dev, dtype=dtype)
            if cl:
                raw = raw.contiguous(memory_format=torch.channels_last)
            out, m = r.call("trous::masked_partial_epilogue", raw, S, b, 9.0, mode)
            y = raw.clone()
            m2 = r.call("trous::masked_partial_epilogue_", y, S, b, 9.0, mode)
            gr, gb = r.call("trous::masked_partial_epilogue_backward", raw, S, 9.0, mode, True)
            gr_into = torch.empty_like(raw)
            gb_into = r.call("trous::masked_partial_epilogue_backward_into", raw, S, 9.0, mode, True, gr_into)
            if r.compare:
                Sb = S.repeat_interleave(shape[1] // S.shape[1], 1).expand(shape)
                bv = b.float().view(1, -1, *([1] * (len(shape) - 2)))
                if mode == "exact":
                    want = torch.where(Sb > 0, raw.float() * 9.0 / Sb.clamp_min(1e-30) + bv, torch.zeros(()))
                else:
                    U = Sb.clamp(0, 1)
                    want = ((raw.float() * (9.0 / (Sb + 1e-8) * U)) + bv) * U
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                r.check(label, close(out.float(), want, tol, tol), "output differs")
                r.check(label + " inplace", close(out, y, 0, 0) and torch.equal(m, m2), "in-place differs")
                r.check(label + " grads", tuple(gr.shape) == tuple(raw.shape) and tuple(gb.shape) == (shape[1],),
                        "gradient shapes")
                r.check(label + " grads into", close(gr_into, gr, 0, 0) and close(gb_into, gb, 0, 0),
                        "backward_into differs from backward")

        r.case(label, case)

