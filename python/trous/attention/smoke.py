"""``python -m trous.smoke`` cases of the sparse-attention ops: every pattern once (alone and
combined) on small and edge shapes (lengths not multiples of any tile, Sq != Sk both ways, GQA, fully
masked rows, all tokens global, empty lengths), forward and backward, against the reference."""
import torch

from ..smoke import close
from . import reference as ref
from .block_mask import BlockMask
from .pattern import AttentionPattern
from .sparse import _op_flags


def _patterns():
    return [
        ("dense", AttentionPattern()),
        ("causal", AttentionPattern(causal=True)),
        ("window(3,2)", AttentionPattern(window=(3, 2))),
        ("window(0,0)", AttentionPattern(window=(0, 0))),
        ("chunk5 causal", AttentionPattern(chunk_size=5, causal=True)),
        ("chunk>S", AttentionPattern(chunk_size=1000)),
        ("dilated window(2,2) d3", AttentionPattern(window=(2, 2), dilation=3)),
        ("global2 + window(1,1) causal", AttentionPattern(window=(1, 1), global_tokens=2, causal=True)),
        ("all global + window(0,0)", AttentionPattern(window=(0, 0), global_tokens=10 ** 6)),
        ("everything", AttentionPattern(window=(4, 1), chunk_size=7, dilation=2, global_tokens=1, causal=True)),
    ]


def _coverage(r, quick: bool):
    """The tile walk of pattern.h (a host op): every allowed pair counted exactly once, both walks."""
    for Sq, Sk in [(37, 37), (19, 45), (45, 19)] + ([] if quick else [(130, 70)]):
        for name, p in _patterns():
            for transposed in (False, True):
                label = f"attention_pattern_coverage {name} Sq{Sq} Sk{Sk} transposed={transposed}"

                def case(Sq=Sq, Sk=Sk, p=p, transposed=transposed, label=label):
                    left, right = p.window
                    counted, _ = r.call("trous::attention_pattern_coverage", Sq, Sk, _op_flags(p, Sk, "cpu"),
                                        p.causal, left, right, p.chunk_size, p.dilation, 16, 8, transposed)
                    want = p.materialize(Sq, Sk).to(counted.dtype)
                    r.check(label, torch.equal(counted.cpu(), want), "a pair is not counted exactly once")

                r.case(label, case)


def _varlen(r, quick: bool):
    """The packed (cu_seqlens) ops: empty, length-1 and Sq != Sk sequences, GQA, forward and backward,
    against the block-diagonal reference."""
    dev = r.device
    dtype = torch.float32 if dev == "cpu" else torch.float16
    lengths = [(7, 7), (0, 0), (1, 1), (5, 12), (13, 3)]
    for name, p in _patterns()[:5] if quick else [x for x in _patterns() if x[1].global_tokens is None]:
        label = f"sparse_attention_varlen {name} lengths {lengths}"

        def case(p=p, label=label):
            g = torch.Generator().manual_seed(3)
            cu_q = torch.tensor([0] + torch.tensor([a for a, _ in lengths]).cumsum(0).tolist(), dtype=torch.int32)
            cu_k = torch.tensor([0] + torch.tensor([b for _, b in lengths]).cumsum(0).tolist(), dtype=torch.int32)
            q = torch.randn(int(cu_q[-1]), 4, 32, generator=g).to(dev, dtype)
            kk = torch.randn(int(cu_k[-1]), 2, 32, generator=g).to(dev, dtype)
            v = torch.randn(int(cu_k[-1]), 2, 32, generator=g).to(dev, dtype)
            go = torch.randn(int(cu_q[-1]), 4, 32, generator=g).to(dev, dtype)
            left, right = p.window
            args = (cu_q.to(dev), cu_k.to(dev), 13, 12, p.causal, left, right, p.chunk_size, p.dilation, 32 ** -0.5,
                    0.0)
            out, lse = r.call("trous::sparse_attention_varlen_fwd", q, kk, v, *args)
            gq, gk, gv = r.call("trous::sparse_attention_varlen_bwd", go, q, kk, v, out, lse, *args, False)
            if not r.compare:
                return
            leaves = [t.detach().cpu().double().requires_grad_() for t in (q, kk, v)]
            ro, rl = ref.attention_varlen(*leaves, cu_q, cu_k, p)
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            r.check(label + " out", close(out, ro, tol, tol), "out differs from the reference")
            r.check(label + " lse", close(lse, rl, tol, tol), "lse differs from the reference")
            want = torch.autograd.grad(ro, leaves, go.cpu().double())
            for nm, a, b in zip(("grad_q", "grad_k", "grad_v"), (gq, gk, gv), want):
                r.check(f"{label} {nm}", close(a, b, 4 * tol, 4 * tol), f"{nm} differs from the reference")

        r.case(label, case)


def _block_masks(r, quick: bool):
    """block_mask=: a random layout (none / full / partial blocks with random element masks, per head)
    AND-ed with closed-form patterns, GQA, Sq != Sk, forward and backward, against the reference."""
    dev = r.device
    dtype = torch.float32 if dev == "cpu" else torch.float16
    for Sq, Sk in [(150, 150), (100, 230)] + ([] if quick else [(257, 190)]):
        for name, p in _patterns()[:4] if quick else _patterns():
            label = f"sparse_attention block_mask {name} Sq{Sq} Sk{Sk}"

            def case(Sq=Sq, Sk=Sk, p=p, label=label):
                g = torch.Generator().manual_seed(Sq + Sk)
                states = torch.randint(0, 3, (1, 4, -(-Sq // 64), -(-Sk // 64)), generator=g)
                dense = states.repeat_interleave(64, 2).repeat_interleave(64, 3)[:, :, :Sq, :Sk]
                mask = (dense == 1) | ((dense == 2) & (torch.rand(1, 4, Sq, Sk, generator=g) < 0.5))
                bm = BlockMask.from_dense(mask, block_size=64).to(dev)
                q = torch.randn(1, Sq, 4, 64, generator=g).to(dev, dtype)
                kk = torch.randn(1, Sk, 2, 64, generator=g).to(dev, dtype)
                v = torch.randn(1, Sk, 2, 64, generator=g).to(dev, dtype)
                go = torch.randn(1, Sq, 4, 64, generator=g).to(dev, dtype)
                left, right = p.window
                args = (_op_flags(p, Sk, dev), p.causal, left, right, p.chunk_size, p.dilation, 0.125, 0.0)
                blocks = (bm.table, bm.elems, 64, 64)
                out, lse = r.call("trous::sparse_attention_fwd", q, kk, v, *args, *blocks)
                gq, gk, gv = r.call("trous::sparse_attention_bwd", go, q, kk, v, out, lse, *args, False, *blocks)
                if not r.compare:
                    return
                leaves = [t.detach().cpu().double().requires_grad_() for t in (q, kk, v)]
                ro, rl = ref.attention_from_mask(*leaves, mask & p.materialize(Sq, Sk)[None, None], 0.125)
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                r.check(label + " out", close(out, ro, tol, tol), "out differs from the reference")
                r.check(label + " lse", close(lse, rl, tol, tol), "lse differs from the reference")
                want = torch.autograd.grad(ro, leaves, go.cpu().double())
                for nm, a, b in zip(("grad_q", "grad_k", "grad_v"), (gq, gk, gv), want):
                    r.check(f"{label} {nm}", close(a, b, 4 * tol, 4 * tol), f"{nm} differs from the reference")

            r.case(label, case)


def run(r, quick: bool):
    _coverage(r, quick)
    _varlen(r, quick)
    _block_masks(r, quick)
    dev = r.device
    dtypes = [torch.float32, torch.bfloat16] if dev == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    # (B, Sq, Sk, Hq, Hkv, D)
    shapes = [(1, 37, 37, 2, 1, 32), (2, 19, 45, 4, 2, 64), (1, 45, 19, 2, 2, 40), (1, 1, 70, 1, 1, 128),
              (1, 0, 5, 1, 1, 32), (1, 5, 0, 1, 1, 32)]
    if not quick:
        shapes += [(1, 130, 130, 8, 1, 80), (1, 65, 200, 3, 3, 256)]
    k = 0
    for B, Sq, Sk, Hq, Hkv, D in shapes:
        for name, p in _patterns():
            if quick and k % 2:
                k += 1
                continue
            dtype = dtypes[k % len(dtypes)]
            softcap = 5.0 if k % 3 == 0 else 0.0
            k += 1
            label = f"sparse_attention {name} B{B} Sq{Sq} Sk{Sk} H{Hq}/{Hkv} D{D} {dtype} softcap={softcap}"

            def case(B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, p=p, dtype=dtype, softcap=softcap, seed=k, label=label):
                g = torch.Generator().manual_seed(seed)
                q = torch.randn(B, Sq, Hq, D, generator=g).to(dev, dtype)
                kk = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, dtype)
                v = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, dtype)
                go = torch.randn(B, Sq, Hq, D, generator=g).to(dev, dtype)
                flags = _op_flags(p, Sk, dev)
                left, right = p.window
                args = (flags, p.causal, left, right, p.chunk_size, p.dilation, D ** -0.5, softcap)
                out, lse = r.call("trous::sparse_attention_fwd", q, kk, v, *args)
                gq, gk, gv = r.call("trous::sparse_attention_bwd", go, q, kk, v, out, lse, *args, False)
                if not r.compare:
                    return
                leaves = [t.detach().cpu().double().requires_grad_() for t in (q, kk, v)]
                ro, rl = ref.attention(*leaves, pattern=p, softcap=softcap)
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                r.check(label + " out", close(out, ro, tol, tol), "out differs from the reference")
                r.check(label + " lse", close(lse, rl, tol, tol), "lse differs from the reference")
                if ro.numel():
                    want = torch.autograd.grad(ro, leaves, go.cpu().double())
                    for nm, a, b in zip(("grad_q", "grad_k", "grad_v"), (gq, gk, gv), want):
                        r.check(f"{label} {nm}", close(a, b, 4 * tol, 4 * tol), f"{nm} differs from the reference")

            r.case(label, case)
