"""Runs every registered trous op once or a few times on small and edge shapes, for compute-sanitizer
(memcheck / racecheck / synccheck) and as a quick device smoke test.

    python bench/gpu_kernels_smoke.py [--device cuda|cpu] [--quick] [--no-compare]

Each family adds one function to SMOKE (qualified op names it exercises -> function). The script
fails if an op that has a kernel for the device is not exercised, if an op raises, or (unless
--no-compare) if a result disagrees with trous.reference beyond a loose tolerance (the full
correctness tests are in tests/; this only catches gross breakage). Grids stay small (a few blocks)
so the sanitizers finish in minutes. Exit status: 0 ok, 1 failures (listed on stderr).
"""
import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import trous  # noqa: E402
from trous.bench.dcls import smoke_dcls_banded, smoke_dcls_conv  # noqa: E402
from trous.info import op_kernels, op_names  # noqa: E402


class Runner:
    def __init__(self, device: str, compare: bool):
        self.device, self.compare = device, compare
        self.calls = {}  # op -> number of calls
        self.failures = []
        self.n_checks = 0

    def call(self, op: str, *args):
        self.calls[op] = self.calls.get(op, 0) + 1
        return getattr(torch.ops.trous, op.split("::")[1])(*args)

    def case(self, label: str, fn):
        try:
            fn()
        except Exception as e:  # keep going: report every broken case
            self.failures.append(f"{label}: {type(e).__name__}: {e}")
            if os.environ.get("TROUS_SMOKE_TRACEBACK"):
                traceback.print_exc()

    def check(self, label: str, ok: bool, detail: str = ""):
        self.n_checks += 1
        if not ok:
            self.failures.append(f"{label}: {detail}")


# ---------------------------------------------------------------------------------------------
# KV-cache quantization


def _kv_input(shape, dtype, device, seed, layout="contiguous", special=False):
    """x of `shape`: contiguous, "transposed" (H and T swapped in memory) or "unaligned" (rows padded
    by 4 elements, so row starts are not 16-byte aligned and the kernels take their scalar path)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, H, T, D = shape
    if layout == "unaligned":
        base = torch.randn(B, H, T, D + 4, generator=g)
        x = base.to(device=device, dtype=dtype)[..., :D]
    elif layout == "transposed":
        x = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    if special and x.numel() >= 3 * D:
        flat = x  # edge groups: one constant row, one NaN, one +Inf
        flat[0, 0, 0, :] = 0.5
        if T > 1:
            flat[0, 0, 1, 3] = float("nan")
        if T > 2:
            flat[0, 0, 2, 5] = float("inf")
    return x


def _close(a, b, rtol, atol):
    return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def _codes_agree(r, label, got, want, bits, symmetric):
    from trous.reference import kvcache as ref

    if symmetric or bits == 8:
        g, w = got.to(torch.int32).cpu(), want.to(torch.int32).cpu()
    else:
        g, w = ref.unpack_lsb_first(got.cpu(), bits), ref.unpack_lsb_first(want.cpu(), bits)
    diff = (g - w).abs()
    bad = int((diff > 1).sum())
    near = int((diff == 1).sum())
    r.check(label + " codes", bad == 0 and near <= max(1, g.numel() // 1000),
            f"{bad} codes off by more than 1, {near} off by 1 of {g.numel()}")


def smoke_kv(r: Runner, quick: bool):
    from trous.reference import kvcache as ref

    dev = r.device
    dtypes = [torch.float16, torch.float32, torch.bfloat16]
    # (shape, group sizes): every per-token kernel path (G/8 lanes in 1..32, the serial fallback
    # for other G), rows not a multiple of the block, a single row, and empty tensors.
    token_shapes = [
        ((1, 1, 1, 8), [8]),
        ((2, 3, 37, 64), [16, 32, 64]),
        ((1, 2, 19, 256), [256, 128] if quick else [8, 32, 128, 256]),
        ((1, 2, 33, 80), [80, 40]),  # G/8 = 10, 5: serial kernel
        ((1, 1, 0, 128), [32]),
    ]
    if not quick:
        token_shapes += [((3, 1, 300, 128), [32, 128]), ((1, 4, 17, 96), [32, 96, 24])]
    k = 0
    for shape, groups in token_shapes:
        for G in groups:
            for bits in ([8, 4, 2] if not quick or G in (8, 256, 80, 32) else [4]):
                for symmetric in ([False, True] if bits == 8 else [False]):
                    dtype = dtypes[k % 3]
                    layout = ["contiguous", "unaligned", "transposed"][(k // 3) % 3]
                    pdt = [torch.float16, torch.float32][k % 2]
                    k += 1
                    label = f"kv_quantize {shape} G={G} bits={bits} sym={symmetric} {dtype} {layout} {pdt}"

                    def run(shape=shape, G=G, bits=bits, symmetric=symmetric, dtype=dtype, layout=layout, pdt=pdt,
                            label=label):
                        x = _kv_input(shape, dtype, dev, k, layout, special=True)
                        codes, params = r.call("trous::kv_quantize", x, bits, G, symmetric, pdt)
                        out = r.call("trous::kv_dequantize", codes, params, bits, G, symmetric, dtype)
                        if r.compare:
                            rc, rp = ref.quantize_per_token(x, bits, G, symmetric, pdt)
                            _codes_agree(r, label, codes, rc, bits, symmetric)
                            r.check(label + " params", _close(params, rp, 1e-3, 1e-6), "parameters differ")
                            want = ref.dequantize_per_token(codes, params, bits, G, symmetric, torch.float32)
                            r.check(label + " dequant", _close(out, want, 1e-2, 1e-3), "dequantized values differ")

                    r.case(label, run)

    channel = [((1, 2, 64, 64), 32, [2, 4, 8]), ((2, 1, 24, 128), 8, [2]), ((1, 1, 0, 64), 32, [4])]
    if not quick:
        channel += [((1, 3, 96, 80), 32, [2, 4]), ((2, 2, 256, 128), 32, [2, 4, 8])]
    for shape, G, bit_list in channel:
        for bits in bit_list:
            dtype = dtypes[k % 3]
            layout = ["contiguous", "unaligned", "transposed"][(k // 3) % 3]
            pdt = [torch.float16, torch.float32][k % 2]
            k += 1
            label = f"kv_quantize_channel {shape} G={G} bits={bits} {dtype} {layout} {pdt}"

            def run(shape=shape, G=G, bits=bits, dtype=dtype, layout=layout, pdt=pdt, label=label):
                x = _kv_input(shape, dtype, dev, k, layout, special=True)
                codes, params = r.call("trous::kv_quantize_channel", x, bits, G, pdt)
                out = r.call("trous::kv_dequantize_channel", codes, params, bits, G, dtype)
                if r.compare:
                    rc, rp = ref.quantize_per_channel(x, bits, G, pdt)
                    _codes_agree(r, label, codes, rc, bits, False)
                    r.check(label + " params", _close(params, rp, 1e-3, 1e-6), "parameters differ")
                    want = ref.dequantize_per_channel(codes, params, bits, G, torch.float32)
                    r.check(label + " dequant", _close(out, want, 1e-2, 1e-3), "dequantized values differ")

            r.case(label, run)

    fp8 = [((1, 4, 19, 64), "e4m3", False), ((2, 3, 5, 128), "e4m3", True), ((1, 2, 33, 8), "e5m2", True),
           ((1, 1, 0, 64), "e4m3", False)]
    if not quick:
        fp8 += [((2, 8, 100, 128), "e5m2", False), ((1, 8, 64, 96), "e4m3", True)]
    for shape, fmt, per_head in fp8:
        for dtype in (dtypes if not quick else [dtypes[k % 3]]):
            layout = ["contiguous", "unaligned", "transposed"][k % 3]
            k += 1
            label = f"kv_quantize_fp8 {shape} {fmt} per_head={per_head} {dtype} {layout}"

            def run(shape=shape, fmt=fmt, per_head=per_head, dtype=dtype, layout=layout, label=label):
                x = _kv_input(shape, dtype, dev, k, layout, special=True)
                if per_head:
                    scale = torch.rand(shape[1], device=dev, dtype=torch.float32) * 0.01 + 0.002
                else:
                    scale = torch.tensor(0.004, device=dev, dtype=torch.float32)
                codes = r.call("trous::kv_quantize_fp8", x, scale, fmt)
                out = r.call("trous::kv_dequantize_fp8", codes, scale, fmt, dtype)
                if r.compare:
                    want = ref.quantize_fp8(x, scale, fmt)
                    same = codes.cpu() == want.cpu()
                    r.check(label + " codes", bool(same.all()), f"{int((~same).sum())} of {same.numel()} differ")
                    back = ref.dequantize_fp8(codes, scale, fmt, torch.float32)
                    r.check(label + " dequant", _close(out, back, 1e-2, 1e-6), "dequantized values differ")

            r.case(label, run)


# qualified op names -> the function that exercises them. One line per family.
# ---------------------------------------------------------------------------------------------
# DCLS kernel construction


def smoke_dcls_construct(r: Runner, quick: bool):
    """Forward and backward of the fused construction, every version, 1/2/3-D (non-square), against
    the fp64 reference's autograd."""
    from trous.reference import dcls as ref

    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if r.device == "cuda" and not quick else [])
    for dks in ((7,), (5, 9), (3, 5, 7)):
        for version in ("v0", "v1", "max", "gauss"):
            for dtype in dtypes:
                label = f"dcls_construct_kernel {version} {dks} {dtype}"

                def run(dks=dks, version=version, dtype=dtype, label=label):
                    g = torch.Generator().manual_seed(1)
                    nd, O, I, kc = len(dks), 5, 3, 4
                    w = torch.randn(O, I, kc, generator=g, dtype=torch.float64)
                    P = (torch.rand(nd, O, I, kc, generator=g, dtype=torch.float64) * 2 - 1) * (max(dks) // 2)
                    SIG = 0.2 + torch.rand(P.shape, generator=g, dtype=torch.float64) if version in ("max", "gauss") else None
                    dev = [t.to(r.device, dtype) if t is not None else None for t in (w, P, SIG)]
                    K = r.call("trous::dcls_construct_kernel", *dev, list(dks), version)
                    gK = torch.randn(K.shape, generator=g, dtype=torch.float64)
                    grads = r.call("trous::dcls_construct_kernel_backward", gK.to(r.device, dtype), *dev, list(dks), version)
                    if not r.compare:
                        return
                    leaves = [t.clone().requires_grad_() for t in (w, P) + ((SIG,) if SIG is not None else ())]
                    want = ref.construct_kernel(leaves[0], leaves[1], leaves[2] if SIG is not None else None, dks, version)
                    wgrads = torch.autograd.grad(want, leaves, gK)
                    tol = 2e-5 if dtype == torch.float32 else 3e-2
                    r.check(label + " K", _close(K, want.detach(), tol, tol), "kernel differs")
                    for name, a, e in zip(("grad_w", "grad_P", "grad_SIG"), grads, wgrads):
                        r.check(f"{label} {name}", _close(a, e, 5 * tol, 5 * tol), f"{name} differs")

                r.case(label, run)


SMOKE = {
    ("trous::kv_quantize", "trous::kv_dequantize", "trous::kv_quantize_channel", "trous::kv_dequantize_channel",
     "trous::kv_quantize_fp8", "trous::kv_dequantize_fp8"): smoke_kv,
    ("trous::dcls_construct_kernel", "trous::dcls_construct_kernel_backward"): smoke_dcls_construct,
    ("trous::dcls_conv", "trous::dcls_conv_backward", "trous::dcls_conv_tap_counts"): smoke_dcls_conv,
    ("trous::dcls_banded_conv1d", "trous::dcls_banded_conv1d_backward"): smoke_dcls_banded,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes (for the sanitizers)")
    p.add_argument("--no-compare", action="store_true", help="run the ops only, no reference comparison")
    p.add_argument("--allow-missing", action="store_true",
                   help="ops without a smoke case are a warning, not a failure (the sanitizer runs use this, so "
                        "their status reflects what the sanitizer found)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kernels_smoke: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.device == "cuda" and not trous._C.build_info()["cuda_kernels"]:
        print("gpu_kernels_smoke: this trous build has no CUDA kernels", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    r = Runner(args.device, compare=not args.no_compare)
    for ops, fn in SMOKE.items():
        fn(r, args.quick)
    if args.device == "cuda":
        torch.cuda.synchronize()

    key = "cuda" if args.device == "cuda" else "cpu"
    registered = [n for n in op_names() if op_kernels(n)[key]]
    missing = [n for n in registered if n not in r.calls]
    for n in missing:
        msg = f"{n}: has a {key.upper()} kernel but no smoke case (add it to SMOKE in {__file__})"
        if args.allow_missing:
            print("WARNING " + msg, file=sys.stderr)
        else:
            r.failures.append(msg)
    n_calls = sum(r.calls.values())
    print(f"gpu_kernels_smoke on {args.device}: {n_calls} op calls over {len(r.calls)} ops, {r.n_checks} checks, "
          f"{len(r.failures)} failures, {time.perf_counter() - t0:.1f} s")
    for op, n in sorted(r.calls.items()):
        print(f"  {op}: {n} calls")
    for f in r.failures:
        print("FAIL " + f, file=sys.stderr)
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
