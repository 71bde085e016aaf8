"""trous.quantized_decode_attention on CPU: every format, both layouts, GQA 1/4/8, odd contexts, Sq > 1,
softcap, lse, split-KV, the scalar twin, opcheck and bad input (CPU and meta alike).

The caches are filled here from a random history with the bulk quantize ops, placed where cache.h
says (a random page permutation for the paged layout; unused codes random, unused parameters and
residual slots NaN, so that a read of anything outside the history shows up as NaN)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import trous  # noqa: F401
from trous.kvcache import (
    fp8_scale,
    quantize_fp8,
    quantize_per_channel,
    quantize_per_token,
    quantized_decode_attention,
)
from trous.kvcache import reference as ref

OP = torch.ops.trous.quantized_decode_attention


def _param_dtype(dtype):
    return torch.float16 if dtype == torch.float16 else torch.float32


def build_cache(scheme, bits, G, residual, dtype, lengths, Hkv, D, paged=False, page_size=None, seed=0,
                fp8_format="e4m3", per_head=False, spare_pages=2):
    """A cache holding a random history of lengths[b] tokens per sequence. Returns the op's cache
    arguments (a dict) and the history."""
    gen = torch.Generator().manual_seed(seed)
    B, Lmax = len(lengths), max(max(lengths), 1)
    hk = (torch.randn(B, Hkv, Lmax, D, generator=gen) * 1.5 + 0.3).to(dtype)
    hv = torch.randn(B, Hkv, Lmax, D, generator=gen).to(dtype)
    g = ref.ref_token_group(scheme, G)
    cap = ref.ref_residual_capacity(scheme, G, residual)
    if paged:
        ps = page_size
        need = [math.ceil(L / ps) for L in lengths]
        max_pages = max(max(need), 1) + 1
        pool = sum(need) + spare_pages
        perm = torch.randperm(pool, generator=gen)
        bt = torch.full((B, max_pages), -1, dtype=torch.int32)
        k = 0
        for b, n in enumerate(need):
            bt[b, :n] = perm[k:k + n].to(torch.int32)
            k += n
    else:
        ps = page_size or (math.ceil((Lmax + 5) / max(g, 1)) * max(g, 1))
        pool, bt = B, None
    cb = D * bits // 8
    code_dtype = torch.int8 if scheme == "symmetric" else torch.uint8
    k_codes = torch.randint(0, 256, (pool, Hkv, ps, cb), generator=gen, dtype=torch.uint8).view(code_dtype)
    v_codes = torch.randint(0, 256, (pool, Hkv, ps, cb), generator=gen, dtype=torch.uint8).view(code_dtype)
    pdt = _param_dtype(dtype)
    nan = float("nan")
    if scheme == "fp8":
        k_params = fp8_scale(hk, fp8_format, per_head)
        v_params = fp8_scale(hv, fp8_format, per_head)
    else:
        np_ = 1 if scheme == "symmetric" else 2
        v_params = torch.full((pool, Hkv, ps, D // G, np_), nan, dtype=pdt)
        if scheme == "kivi":
            k_params = torch.full((pool, Hkv, ps // G, D, 2), nan, dtype=pdt)
        else:
            k_params = torch.full((pool, Hkv, ps, D // G, np_), nan, dtype=pdt)
    k_res = torch.full((B, Hkv, cap, D), nan, dtype=dtype)
    v_res = torch.full((B, Hkv, cap, D), nan, dtype=dtype)
    for b, L in enumerate(lengths):
        qlen = ref.ref_quantized_length(scheme, G, residual, L)
        xk, xv = hk[b:b + 1, :, :qlen], hv[b:b + 1, :, :qlen]
        if qlen:
            if scheme == "fp8":
                kq = quantize_fp8(xk, k_params, fp8_format)
                vq = quantize_fp8(xv, v_params, fp8_format)
            elif scheme == "kivi":
                kq = quantize_per_channel(xk, bits, G, pdt)
                vq = quantize_per_token(xv, bits, G, param_dtype=pdt)
            else:
                sym = scheme == "symmetric"
                kq = quantize_per_token(xk, bits, G, sym, pdt)
                vq = quantize_per_token(xv, bits, G, sym, pdt)
            t = torch.arange(qlen)
            page = bt[b].long()[t // ps] if paged else torch.full_like(t, b)
            off = t % ps
            k_codes[page, :, off] = kq.codes[0].transpose(0, 1)
            v_codes[page, :, off] = vq.codes[0].transpose(0, 1)
            if scheme != "fp8":
                v_params[page, :, off] = vq.params[0].transpose(0, 1)
                if scheme == "kivi":
                    gt = torch.arange(0, qlen, G)
                    k_params[page[gt], :, (gt % ps) // G] = kq.params[0].transpose(0, 1)
                else:
                    k_params[page, :, off] = kq.params[0].transpose(0, 1)
        slots = torch.arange(qlen, L) % max(cap, 1)
        k_res[b][:, slots] = hk[b, :, qlen:L]
        v_res[b][:, slots] = hv[b, :, qlen:L]
    cache = dict(k_codes=k_codes, k_params=k_params, v_codes=v_codes, v_params=v_params, k_residual=k_res,
                 v_residual=v_res, lengths=torch.tensor(lengths, dtype=torch.int32), block_table=bt, scheme=scheme,
                 bits=bits, group_size=G, residual=residual, fp8_format=fp8_format)
    return cache, hk, hv


def op_args(q, c, scale, softcap=0.0):
    return (q, c["k_codes"], c["k_params"], c["v_codes"], c["v_params"], c["k_residual"], c["v_residual"],
            c["lengths"], c["block_table"], c["scheme"], c["bits"], c["group_size"], c["residual"], c["fp8_format"],
            scale, softcap)


def history(c):
    """The float32 (k, v) [B, Hkv, max length, D] the cache holds (the reference reader)."""
    return ref.reference_dequantize_cache(c["k_codes"], c["k_params"], c["v_codes"], c["v_params"], c["k_residual"],
                                          c["v_residual"], c["lengths"], c["block_table"], c["scheme"], c["bits"],
                                          c["group_size"], c["residual"], c["fp8_format"])


def plain_error(q, c, want, scale, softcap):
    """Max error of plain PyTorch at q's precision on the same dequantized cache (the spec's bar)."""
    dt = q.dtype
    B, Hq, Sq, D = q.shape
    Hkv = c["k_codes"].shape[1]
    err = 0.0
    hist = history(c)
    for b in range(B):
        T = int(c["lengths"][b])
        if T == 0:
            continue
        K, V = (h[b, :, :T].to(dt) for h in hist)
        K = K.repeat_interleave(Hq // Hkv, 0)
        V = V.repeat_interleave(Hq // Hkv, 0)
        s = (q[b] @ K.transpose(1, 2)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = T - Sq + torch.arange(Sq)
        allowed = torch.arange(T)[None, :] <= pos[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s.float(), -1).to(dt).nan_to_num(0.0)
        o = (p @ V).float()
        err = max(err, float((o - want[b]).abs().max()))
    return err


def check_decode(q, c, scale=None, softcap=0.0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    before = {k: v.clone() for k, v in c.items() if isinstance(v, torch.Tensor)}
    out, lse = OP(*op_args(q, c, scale, softcap))
    for k, v in before.items():  # bitwise (NaN slots included): the op writes nothing into the cache
        assert torch.equal(v.reshape(-1).view(torch.uint8), c[k].reshape(-1).view(torch.uint8)), f"{k} was changed"
    want, want_lse = ref.reference_decode_attention(*op_args(q, c, scale, softcap))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(want).all(), "the test cache reads outside the history"
    err = float((out.float() - want).abs().max())
    eps = torch.finfo(q.dtype).eps
    bound = 2 * plain_error(q, c, want, scale, softcap) + (1e-5 if q.dtype == torch.float32 else eps) * max(
        1.0, float(want.abs().max()))
    assert err <= bound, f"error {err} > bound {bound}"
    # lse: -inf exactly where the reference has it, close elsewhere.
    inf = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), inf)
    assert (lse[inf] < 0).all()
    torch.testing.assert_close(lse[~inf], want_lse[~inf], atol=2e-4, rtol=1e-5)
    assert (out[inf.unsqueeze(-1).expand_as(out)] == 0).all()
    return out, lse


def _q(B, Hq, Sq, D, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Sq, D, generator=g).to(dtype)


# (scheme, bits, G) covering every format; D chosen per case so that G in {32, 64, 128, D} appear.
FORMATS = [
    ("per_token", 2, 32, 64), ("per_token", 4, 64, 128), ("per_token", 8, 128, 128), ("per_token", 4, 96, 96),
    ("per_token", 2, 128, 128), ("per_token", 8, 32, 96), ("symmetric", 8, 32, 64), ("symmetric", 8, 128, 128),
    ("kivi", 2, 32, 64), ("kivi", 4, 32, 128), ("kivi", 8, 16, 96),
    ("fp8", 8, 0, 64), ("fp8", 8, 0, 128),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("fi", range(len(FORMATS)))
def test_formats_layouts(fi, paged):
    scheme, bits, G, D = FORMATS[fi]
    k = fi + 3 * paged
    dtype = DTYPES[k % 3]
    gqa = [1, 4, 8][(k // 3) % 3]
    Hkv = 2
    G_ = G or 32
    residual = [0, 2 * G_ if scheme == "kivi" else 5, 64][k % 3] if scheme != "kivi" else [0, G, 2 * G][k % 3]
    lengths = [1, 37, 150, 83][: 2 + k % 3]  # contexts not multiples of G or of the page size
    page = 16 if scheme != "kivi" else 2 * G
    c, _, _ = build_cache(scheme, bits, G, residual, dtype, lengths, Hkv, D, paged=paged,
                          page_size=page if paged else None, seed=k, per_head=bool(k % 2),
                          fp8_format="e5m2" if (scheme == "fp8" and k % 2) else "e4m3")
    q = _q(len(lengths), Hkv * gqa, 1, D, dtype, seed=k)
    check_decode(q, c)


@pytest.mark.parametrize("scheme,bits,G", [("per_token", 4, 32), ("kivi", 2, 32), ("fp8", 8, 0)])
@pytest.mark.parametrize("residual_state", ["empty", "partial", "full"])
def test_residual_states(scheme, bits, G, residual_state):
    # empty: R = 0 (everything quantized, KIVI keeps < G tokens); partial: fewer than R tokens held
    # (nothing quantized); full: more than R tokens (R, or R .. R + G - 1 for KIVI, in the ring).
    R = {"empty": 0, "partial": 64, "full": 32}[residual_state]
    lengths = {"empty": [70, 33], "partial": [40, 1], "full": [100, 75]}[residual_state]
    paged = residual_state == "full"
    c, _, _ = build_cache(scheme, bits, G, R, torch.float32, lengths, 2, 64, paged=paged,
                          page_size=32 if paged else None, seed=3)
    check_decode(_q(2, 8, 1, 64, torch.float32), c)


@pytest.mark.parametrize("scheme,bits,G,D", [("per_token", 4, 32, 64), ("per_token", 8, 64, 128),
                                               ("per_token", 2, 32, 96), ("kivi", 4, 32, 64)])
@pytest.mark.parametrize("gqa,Sq", [(2, 1), (3, 1), (1, 5), (2, 3), (7, 1), (4, 2)])
def test_row_counts(scheme, bits, G, D, gqa, Sq):
    # M = gqa * Sq rows per KV head: the fused kernels take them in slabs of <= 4 (every slab size, two
    # slabs up to 8); blocks whose tokens end in the residual, and fp16 activations (fp16 parameters).
    dtype = torch.float16 if gqa % 2 else torch.float32
    residual = 2 * G if scheme == "kivi" else 7
    c, _, _ = build_cache(scheme, bits, G, residual, dtype, [70, 45], 2, D, seed=gqa * 10 + Sq)
    check_decode(_q(2, 2 * gqa, Sq, D, dtype, seed=Sq), c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sq_causal_softcap(dtype):
    # Sq = 3 new tokens per sequence, causal among them; a sequence shorter than Sq has masked queries
    # (out 0, lse -inf), one of length 0 masks everything.
    lengths = [1, 0, 45, 130]
    c, _, _ = build_cache("kivi", 4, 32, 32, dtype, lengths, 2, 64, paged=True, page_size=32, seed=11)
    q = _q(4, 8, 3, 64, dtype, seed=12)
    out, lse = check_decode(q, c)
    assert torch.isinf(lse[0, :, :2]).all() and torch.isfinite(lse[0, :, 2]).all()
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()
    check_decode(q * 4, c, softcap=5.0)
    check_decode(_q(4, 8, 8, 64, dtype, seed=13), c, scale=0.3)


def test_context_one_and_python_api():
    c, _, hv = build_cache("per_token", 8, 64, 0, torch.float32, [1], 1, 64, seed=2)
    q = _q(1, 4, 1, 64, torch.float32)
    out, lse = check_decode(q, c, scale=0.125)
    # One token: the output is that token's (dequantized) value for every head.
    v = history(c)[1]
    torch.testing.assert_close(out[0, :, 0], v[0, 0, 0].expand(4, 64), rtol=1e-6, atol=1e-6)
    args = {k: c[k] for k in ("scheme", "bits", "group_size", "residual", "fp8_format")}
    o2, l2 = quantized_decode_attention(q, c["k_codes"], c["k_params"], c["v_codes"], c["v_params"], c["k_residual"],
                                        c["v_residual"], c["lengths"], None, scale=0.125, return_lse=True, **args)
    assert torch.equal(o2, out) and torch.equal(l2, lse)
    o3 = quantized_decode_attention(q, c["k_codes"], c["k_params"], c["v_codes"], c["v_params"], c["k_residual"],
                                    c["v_residual"], c["lengths"], **args)  # default scale 1 / sqrt(D)
    assert torch.equal(o3, OP(*op_args(q, c, 1 / 8.0))[0])


def test_split_kv_matches():
    # batch * Hkv = 1 < threads: the tokens of the one (b, h) are split across threads and merged.
    c, _, _ = build_cache("per_token", 4, 32, 16, torch.float32, [1500], 1, 128, seed=4)
    q = _q(1, 8, 2, 128, torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        o2, l2 = check_decode(q, c)
        torch.set_num_threads(1)
        o1, l1 = check_decode(q, c)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-5)


_SCALAR_SCRIPT = r"""
import sys, torch, trous
sys.path.insert(0, sys.argv[1])
from test_kv_decode import build_cache, op_args, _q
outs = []
for scheme, bits, G, dt in [("per_token", 2, 32, torch.float16), ("symmetric", 8, 64, torch.float32),
                            ("kivi", 4, 32, torch.bfloat16), ("fp8", 8, 0, torch.float32)]:
    c, _, _ = build_cache(scheme, bits, G, 32, dt, [77, 200], 2, 64, paged=True, page_size=32, seed=9,
                          fp8_format="e4m3")
    outs.append(torch.ops.trous.quantized_decode_attention(*op_args(_q(2, 8, 2, 64, dt), c, 0.2, 0.0)))
torch.save(outs, sys.argv[2])
"""


def test_scalar_twin_matches_simd(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    paths = {}
    for simd in ("1", "0"):
        paths[simd] = str(tmp_path / f"out{simd}.pt")
        env = dict(os.environ, TROUS_CPU_SIMD=simd)
        subprocess.run([sys.executable, "-c", _SCALAR_SCRIPT, here, paths[simd]], check=True, env=env, timeout=300)
    a, b = torch.load(paths["1"]), torch.load(paths["0"])
    for (oa, la), (ob, lb) in zip(a, b):
        tol = 1e-5 if oa.dtype == torch.float32 else (2e-3 if oa.dtype == torch.float16 else 1.6e-2)
        torch.testing.assert_close(oa.float(), ob.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


def test_opcheck():
    for paged, scheme in [(False, "per_token"), (True, "kivi"), (True, "fp8")]:
        c, _, _ = build_cache(scheme, 4 if scheme != "fp8" else 8, 32, 32, torch.float32, [40, 70], 2, 64,
                              paged=paged, page_size=32 if paged else None, seed=1)
        torch.library.opcheck(OP, op_args(_q(2, 4, 2, 64, torch.float32), c, 0.125))


def _to_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


def _refused(args, match, meta=True):
    with pytest.raises((RuntimeError, ValueError), match=match):
        OP(*args)
    if meta:
        with pytest.raises((RuntimeError, ValueError), match=match):
            OP(*_to_meta(args))


def test_bad_input_named():
    c, _, _ = build_cache("per_token", 4, 32, 32, torch.float32, [40, 70], 2, 64, paged=True, page_size=16, seed=1)
    q = _q(2, 4, 1, 64, torch.float32)
    good = list(op_args(q, c, 0.125))
    OP(*good)
    OP(*_to_meta(good))

    def bad(i, v):
        a = list(good)
        a[i] = v
        return tuple(a)

    _refused(bad(0, _q(2, 3, 1, 64, torch.float32)), r"q\.size\(1\) = 3")  # head counts
    _refused(bad(0, _q(2, 4, 1, 32, torch.float32)), r"k_codes\.size\(3\)")  # head dim
    _refused(bad(0, q.double()), r"q must be float32")  # dtype
    _refused(bad(0, q.half()), r"k_residual must be Half \(q's dtype\), got Float")
    _refused(bad(5, c["k_residual"][:, :, :3]), r"k_residual must have shape")
    _refused(bad(1, c["k_codes"].view(torch.int8)), r"k_codes must be")
    _refused(bad(9, "int4"), r"scheme must be")
    _refused(bad(10, 8), r"k_codes\.size\(3\)")  # bits not matching the tensors
    _refused(bad(9, "symmetric"), r"bits must be 8")
    _refused(bad(9, "kivi"), r"page_size = k_codes\.size\(2\) = 16 must be a multiple of group_size")
    _refused(bad(12, 5), r"k_residual must have shape")  # a format the cache was not built with
    _refused(bad(11, 48), r"group_size 48 must divide")
    _refused(bad(7, c["lengths"][:1]), r"lengths\.size\(0\)")
    _refused(bad(7, c["lengths"].long()), r"lengths must be an int32")
    _refused(bad(8, c["block_table"][:, :1].contiguous().long()), r"block_table must be an int32")
    _refused(bad(2, c["k_params"].half()), r"float16 parameters are for float16")
    _refused(bad(15, -1.0), r"softcap must be")
    # Data checks (CPU only): lengths beyond the cache, block table entries out of range.
    _refused(bad(7, torch.tensor([40, 1000], dtype=torch.int32)),
             r"lengths\[1\] = 1000 is beyond the sequence.s capacity of \d+ tokens \(block_table.size\(1\)",
             meta=False)
    bt = c["block_table"].clone()
    bt[1, 1] = 99
    _refused(bad(8, bt), r"block_table\[1\]\[1\] = 99 is out of range", meta=False)
    bt[1, 1] = -1
    _refused(bad(8, bt), r"block_table\[1\]\[1\] = -1", meta=False)
    # Contiguous layout: codes hold one page per sequence.
    c2, _, _ = build_cache("fp8", 8, 0, 0, torch.float32, [5, 9], 2, 64, seed=1)
    args = list(op_args(q, c2, 0.125))
    args[1], args[3] = c2["k_codes"][:1], c2["v_codes"][:1]
    _refused(tuple(args), r"k_codes\.size\(0\) must be batch = lengths.size\(0\) = 2")
    args = list(op_args(q, c2, 0.125))
    args[2] = torch.tensor(-0.5)
    _refused(tuple(args), r"k_params \(the fp8 scale\) must be finite and positive", meta=False)
    args[2] = torch.ones(3)
    _refused(tuple(args), r"k_params \(the fp8 scale\) must have shape")
    args[2] = torch.ones(2)
    _refused(tuple(args), r"must both be per tensor or both per head")
    # A meta tensor among CPU ones is refused, naming it.
    args = list(good)
    args[3] = args[3].to("meta")
    with pytest.raises(RuntimeError, match="v_codes must be on the device"):
        OP(*args)


@pytest.mark.parametrize("scheme,bits,G,R,dtype,paged", [
    ("kivi", 4, 32, 32, torch.float16, True), ("per_token", 2, 32, 16, torch.float32, False),
    ("fp8", 8, 0, 8, torch.bfloat16, True), ("symmetric", 8, 64, 0, torch.float32, True)])
def test_after_kv_append(scheme, bits, G, R, dtype, paged):
    """The cache kv_append fills (prefill, then decode steps) decodes exactly like the one placed from
    the same history with the bulk quantize ops, and like the reference on it."""
    from trous.kvcache.cache_ops import kv_append

    B, Hkv, D, steps = 2, 2, 64, [45, 1, 1, 2, 1]
    T = sum(steps)
    placed, hk, hv = build_cache(scheme, bits, G, R, dtype, [T] * B, Hkv, D, paged=paged,
                                 page_size=32 if paged else None, seed=21,
                                 per_head=True)
    c = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in placed.items()}
    for name in ("k_codes", "v_codes", "k_residual", "v_residual"):
        c[name].zero_()
    if scheme != "fp8":
        c["k_params"].zero_()
        c["v_params"].zero_()
    c["lengths"].zero_()
    q = _q(B, 8, 1, D, dtype, seed=22)
    t = 0
    for n in steps:
        kv_append(c["k_codes"], c["k_params"], c["v_codes"], c["v_params"], c["k_residual"], c["v_residual"],
                  c["lengths"], c["block_table"], hk[:, :, t:t + n], hv[:, :, t:t + n], scheme, bits, G, R, "e4m3")
        t += n
        if t >= 3:  # decode after every step (Sq = 1 query over the cache so far)
            check_decode(q, c)
    assert c["lengths"].tolist() == [T] * B
    want, want_lse = OP(*op_args(q, placed, 0.125))
    got, got_lse = OP(*op_args(q, c, 0.125))
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
