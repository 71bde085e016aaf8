"""``python -m trous.smoke`` cases of the KV-cache quantization ops (small and edge shapes)."""
import torch

from ..smoke import close
from . import reference as ref


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


def _codes_agree(r, label, got, want, bits, symmetric):
    if symmetric or bits == 8:
        g, w = got.to(torch.int32).cpu(), want.to(torch.int32).cpu()
    else:
        g, w = ref.unpack_lsb_first(got.cpu(), bits), ref.unpack_lsb_first(want.cpu(), bits)
    diff = (g - w).abs()
    bad = int((diff > 1).sum())
    near = int((diff == 1).sum())
    r.check(label + " codes", bad == 0 and near <= max(1, g.numel() // 1000),
            f"{bad} codes off by more than 1, {near} off by 1 of {g.numel()}")


def run(r, quick: bool):
    """Every KV kernel path (lane counts, the serial fallback, unaligned and transposed inputs, NaN /
    Inf groups, empty tensors) on every dtype, against the reference's codes and values."""
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
                    pdt = [torch.float16, torch.float32][k % 2] if dtype == torch.float16 else torch.float32
                    k += 1
                    label = f"kv_quantize {shape} G={G} bits={bits} sym={symmetric} {dtype} {layout} {pdt}"

                    def run(shape=shape, G=G, bits=bits, symmetric=symmetric, dtype=dtype, layout=layout, pdt=pdt,
                            label=label, seed=k):
                        x = _kv_input(shape, dtype, dev, seed, layout, special=True)
                        codes, params = r.call("trous::kv_quantize", x, bits, G, symmetric, pdt)
                        out = r.call("trous::kv_dequantize", codes, params, bits, G, symmetric, dtype)
                        if r.compare:
                            rc, rp = ref.quantize_per_token(x, bits, G, symmetric, pdt)
                            _codes_agree(r, label, codes, rc, bits, symmetric)
                            r.check(label + " params", close(params, rp, 1e-3, 1e-6), "parameters differ")
                            want = ref.dequantize_per_token(codes, params, bits, G, symmetric, torch.float32)
                            r.check(label + " dequant", close(out, want, 1e-2, 1e-3), "dequantized values differ")

                    r.case(label, run)

    channel = [((1, 2, 64, 64), 32, [2, 4, 8]), ((2, 1, 24, 128), 8, [2]), ((1, 1, 0, 64), 32, [4])]
    if not quick:
        channel += [((1, 3, 96, 80), 32, [2, 4]), ((2, 2, 256, 128), 32, [2, 4, 8])]
    for shape, G, bit_list in channel:
        for bits in bit_list:
            dtype = dtypes[k % 3]
            layout = ["contiguous", "unaligned", "transposed"][(k // 3) % 3]
            pdt = [torch.float16, torch.float32][k % 2] if dtype == torch.float16 else torch.float32
            k += 1
            label = f"kv_quantize_channel {shape} G={G} bits={bits} {dtype} {layout} {pdt}"

            def run(shape=shape, G=G, bits=bits, dtype=dtype, layout=layout, pdt=pdt, label=label, seed=k):
                x = _kv_input(shape, dtype, dev, seed, layout, special=True)
                codes, params = r.call("trous::kv_quantize_channel", x, bits, G, pdt)
                out = r.call("trous::kv_dequantize_channel", codes, params, bits, G, dtype)
                if r.compare:
                    rc, rp = ref.quantize_per_channel(x, bits, G, pdt)
                    _codes_agree(r, label, codes, rc, bits, False)
                    r.check(label + " params", close(params, rp, 1e-3, 1e-6), "parameters differ")
                    want = ref.dequantize_per_channel(codes, params, bits, G, torch.float32)
                    r.check(label + " dequant", close(out, want, 1e-2, 1e-3), "dequantized values differ")

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

            def run(shape=shape, fmt=fmt, per_head=per_head, dtype=dtype, layout=layout, label=label, seed=k):
                x = _kv_input(shape, dtype, dev, seed, layout, special=True)
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
                    r.check(label + " dequant", close(out, back, 1e-2, 1e-6), "dequantized values differ")

            r.case(label, run)

    _append_cases(r, quick, dev)
    _decode_smoke(r, quick)


def _append_cases(r, quick, dev):
    """kv_append: every scheme, contiguous and paged (pages out of order, tokens crossing page ends),
    a prefill then decode steps, dequantized through the block table and ring against the reference
    of the whole history."""
    # (scheme, bits, G, R, dtype, paged)
    configs = [("kivi", 2, 8, 16, torch.float16, True), ("per_token", 4, 32, 3, torch.bfloat16, False),
               ("symmetric", 8, 64, 0, torch.float32, True), ("fp8", 8, 0, 2, torch.float16, False)]
    if not quick:
        configs += [("kivi", 4, 32, 32, torch.bfloat16, False), ("per_token", 8, 128, 0, torch.float16, True),
                    ("fp8", 8, 0, 0, torch.bfloat16, True)]
    for i, (scheme, bits, G, R, dtype, paged) in enumerate(configs):
        label = f"kv_append {scheme} bits={bits} G={G} R={R} {dtype} {'paged' if paged else 'contiguous'}"

        def run(scheme=scheme, bits=bits, G=G, R=R, dtype=dtype, paged=paged, label=label, seed=100 + i):
            g = torch.Generator(device="cpu").manual_seed(seed)
            B, H, D, t_max = 3, 2, 128, 64
            page = 16 if paged else t_max
            max_pages = t_max // page
            pages = B * max_pages + 1 if paged else B
            table = torch.randperm(pages, generator=g)[:B * max_pages].reshape(B, max_pages) if paged else None
            table = table.to(device=dev, dtype=torch.int32) if paged else None
            cb = D if scheme in ("symmetric", "fp8") else D * bits // 8
            cdt = torch.int8 if scheme == "symmetric" else torch.uint8
            pdt = torch.float16 if dtype == torch.float16 else torch.float32
            cap = R + (G - 1 if scheme == "kivi" else 0)
            codes = [torch.zeros(pages, H, page, cb, dtype=cdt, device=dev) for _ in range(2)]
            if scheme == "fp8":
                params = [torch.full((H,), 0.01, device=dev), torch.tensor(0.02, device=dev)]
                params[1] = params[1].expand(H).contiguous()
            else:
                kshape = (pages, H, page // G, D, 2) if scheme == "kivi" else (pages, H, page, D // G, 2)
                vshape = (pages, H, page, D // G, 1 if scheme == "symmetric" else 2)
                if scheme == "symmetric":
                    kshape = vshape
                params = [torch.zeros(kshape, dtype=pdt, device=dev), torch.zeros(vshape, dtype=pdt, device=dev)]
            ring = [torch.zeros(B, H, cap, D, dtype=dtype, device=dev) for _ in range(2)]
            lengths = torch.zeros(B, dtype=torch.int32, device=dev)
            hist = [torch.randn(B, H, 45, D, generator=g).to(device=dev, dtype=dtype) for _ in range(2)]
            for t0, t1 in ((0, 37), (37, 38), (38, 39), (39, 45)):
                r.call("trous::kv_append", codes[0], params[0], codes[1], params[1], ring[0], ring[1], lengths,
                       table, hist[0][:, :, t0:t1], hist[1][:, :, t0:t1], scheme, bits, G, R, "e4m3")
            if r.compare:
                r.check(label + " lengths", lengths.cpu().tolist() == [45] * B, f"lengths {lengths.tolist()}")
                got = ref.reference_dequantize_cache(codes[0], params[0], codes[1], params[1], ring[0], ring[1],
                                                     lengths, table, scheme, bits, G, R)
                want = ref.reference_cache_history(hist[0], hist[1], scheme, bits, G, R, pdt, "e4m3", params[0],
                                                   params[1])
                for name, a, b in zip("kv", got, want):
                    r.check(f"{label} {name}", close(a, b, 1e-2, 1e-2),
                            "the cache differs from the history's reference")

        r.case(label, run)


def _decode_smoke(r, quick: bool):
    """quantized_decode_attention on small contiguous caches: every token quantized (the quantize
    ops' output is the contiguous layout), the rest of a shorter sequence in the residual ring, or
    everything in the residual; GQA, Sq > 1, softcap, fp16 / bf16 / fp32."""
    dev = r.device
    # (scheme, bits, G, residual, D, Hkv, Hq, Sq, T, lengths, dtype, softcap)
    cases = [
        ("per_token", 4, 32, 0, 64, 2, 8, 2, 37, [37, 20], torch.float16, 0.0),
        ("kivi", 2, 32, 0, 64, 2, 4, 1, 64, [64, 40], torch.float32, 0.0),
        ("fp8", 8, 0, 0, 128, 2, 16, 1, 19, [19, 1], torch.bfloat16, 30.0),
        ("per_token", 8, 64, 64, 64, 1, 1, 3, 64, [50, 2], torch.float32, 0.0),
    ]
    if not quick:
        cases += [("symmetric", 8, 32, 0, 96, 2, 16, 4, 45, [45, 44], torch.float16, 0.0),
                  ("kivi", 4, 16, 32, 128, 4, 16, 1, 96, [96, 57], torch.bfloat16, 0.0)]
    for k, (scheme, bits, G, R, D, Hkv, Hq, Sq, T, lengths, dtype, cap) in enumerate(cases):
        label = f"quantized_decode_attention {scheme} bits={bits} G={G} R={R} D={D} {Hq}/{Hkv} Sq={Sq} {dtype}"

        def run(scheme=scheme, bits=bits, G=G, R=R, D=D, Hkv=Hkv, Hq=Hq, Sq=Sq, T=T, lengths=lengths, dtype=dtype,
                cap=cap, seed=500 + k, label=label):
            B = len(lengths)
            k_hist = _kv_input((B, Hkv, T, D), dtype, dev, seed)
            v_hist = _kv_input((B, Hkv, T, D), dtype, dev, seed + 1)
            q = _kv_input((B, Hq, Sq, D), dtype, dev, seed + 2)
            pdt = torch.float16 if dtype == torch.float16 else torch.float32
            if scheme == "fp8":
                kp = torch.rand(Hkv, device=dev) * 0.01 + 0.004  # per-head scales
                vp = torch.rand(Hkv, device=dev) * 0.01 + 0.004
                kc = r.call("trous::kv_quantize_fp8", k_hist, kp, "e4m3")
                vc = r.call("trous::kv_quantize_fp8", v_hist, vp, "e4m3")
            elif scheme == "kivi":
                kc, kp = r.call("trous::kv_quantize_channel", k_hist, bits, G, pdt)
                vc, vp = r.call("trous::kv_quantize", v_hist, bits, G, False, pdt)
            else:
                sym = scheme == "symmetric"
                kc, kp = r.call("trous::kv_quantize", k_hist, bits, G, sym, pdt)
                vc, vp = r.call("trous::kv_quantize", v_hist, bits, G, sym, pdt)
            g = G if scheme == "kivi" else 1
            rcap = R + g - 1
            k_res = torch.zeros(B, Hkv, rcap, D, device=dev, dtype=dtype)
            v_res = torch.zeros_like(k_res)
            for b, L in enumerate(lengths):  # the tokens the residual rule keeps in full precision
                qlen = 0 if L <= R else ((L - R) // g) * g
                slots = torch.arange(qlen, L, device=dev) % max(rcap, 1)
                k_res[b][:, slots] = k_hist[b, :, qlen:L]
                v_res[b][:, slots] = v_hist[b, :, qlen:L]
            lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
            args = (q, kc, kp, vc, vp, k_res, v_res, lens, None, scheme, bits, G, R, "e4m3", D ** -0.5, cap)
            out, lse = r.call("trous::quantized_decode_attention", *args)
            if r.compare:
                want, want_lse = ref.reference_decode_attention(*args)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                r.check(label + " out", close(out.float(), want, tol, tol), "outputs differ")
                fin = torch.isfinite(want_lse)
                r.check(label + " lse", bool((torch.isinf(lse) == ~fin).all())
                        and close(lse[fin], want_lse[fin], 1e-4, 1e-4), "lse differs")

        r.case(label, run)
