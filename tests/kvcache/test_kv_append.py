"""kv_append (issue 13): a layer's quantized cache after any interleaving of prefill and decode steps
dequantizes to the reference of the whole history; codes and parameters are bit-identical to the
bulk ops on the same groups; paged and contiguous agree bit for bit; bad input raises naming the
argument and changes nothing."""
import random
import zlib

import pytest
import torch

from trous.kvcache import reference as ref
from trous.kvcache.cache_ops import kv_append, quantized_length, residual_capacity

ops = torch.ops.trous


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + 0.25).to(dtype)


class Cache:
    """The tensors of one layer's cache (the layouts of trous.kvcache.kv_append), filled with random
    bytes so that nothing passes by accident of zeros. Paged: pages handed out in a shuffled order."""

    def __init__(self, B, H, D, scheme, bits, G, R, dtype, param_dtype=torch.float32, paged=False, page_size=None,
                 t_max=64, fmt="e4m3", per_head=False, seed=0, spare_pages=3):
        self.B, self.H, self.D, self.scheme, self.bits, self.G, self.R = B, H, D, scheme, bits, G, R
        self.dtype, self.fmt = dtype, fmt
        g = torch.Generator().manual_seed(seed)
        page = page_size if paged else t_max
        max_pages = -(-t_max // page)
        pages = B * max_pages + spare_pages if paged else B
        self.block_table = None
        if paged:
            perm = torch.randperm(pages, generator=g)[: B * max_pages]
            self.block_table = perm.reshape(B, max_pages).to(torch.int32).contiguous()
        cb = D if scheme in ("symmetric", "fp8") else D * bits // 8
        code_dtype = torch.int8 if scheme == "symmetric" else torch.uint8

        def codes():
            return torch.randint(-128 if code_dtype == torch.int8 else 0, 128 if code_dtype == torch.int8 else 256,
                                 (pages, H, page, cb), generator=g, dtype=torch.int32).to(code_dtype)

        def params(kivi_key):
            if scheme == "fp8":
                shape = (H,) if per_head else ()
                return (torch.rand(shape, generator=g) * 0.02 + 0.004).float()
            if kivi_key:
                shape = (pages, H, page // G, D, 2)
            else:
                shape = (pages, H, page, D // G, 1 if scheme == "symmetric" else 2)
            return torch.randn(shape, generator=g).to(param_dtype)

        self.k_codes, self.v_codes = codes(), codes()
        self.k_params, self.v_params = params(scheme == "kivi"), params(False)
        cap = residual_capacity(scheme, G, R)
        self.k_residual = torch.randn(B, H, cap, D, generator=g).to(dtype)
        self.v_residual = torch.randn(B, H, cap, D, generator=g).to(dtype)
        self.lengths = torch.zeros(B, dtype=torch.int32)

    def tensors(self):
        return [self.k_codes, self.k_params, self.v_codes, self.v_params, self.k_residual, self.v_residual,
                self.lengths]

    def args(self, k, v, **over):
        a = dict(k_codes=self.k_codes, k_params=self.k_params, v_codes=self.v_codes, v_params=self.v_params,
                 k_residual=self.k_residual, v_residual=self.v_residual, lengths=self.lengths,
                 block_table=self.block_table, k=k, v=v, scheme=self.scheme, bits=self.bits, group_size=self.G,
                 residual=self.R, fp8_format=self.fmt)
        a.update(over)
        return a

    def append(self, k, v):
        kv_append(**self.args(k, v))

    def dequantized(self):
        return ref.reference_dequantize_cache(self.k_codes, self.k_params, self.v_codes, self.v_params,
                                              self.k_residual, self.v_residual, self.lengths, self.block_table,
                                              self.scheme, self.bits, self.G, self.R, self.fmt)

    def quantized(self, b):
        """Sequence b's quantized codes and parameters, gathered through the block table:
        ([H, Tq, cb] codes, params) for K and for V."""
        n = int(self.lengths[b])
        tq = quantized_length(self.scheme, self.G, self.R, n)
        page = self.k_codes.shape[2]
        n_pages = -(-tq // page)
        out = []
        for codes, params, key in ((self.k_codes, self.k_params, True), (self.v_codes, self.v_params, False)):
            c = ref._gather_pages(codes, b, self.block_table, n_pages)[:, :tq]
            if self.scheme == "fp8":
                p = params
            elif self.scheme == "kivi" and key:
                p = ref._gather_pages(params, b, self.block_table, n_pages)[:, :tq // self.G]
            else:
                p = ref._gather_pages(params, b, self.block_table, n_pages)[:, :tq]
            out += [c, p]
        return out

    def residual_rows(self, b):
        n = int(self.lengths[b])
        tq = quantized_length(self.scheme, self.G, self.R, n)
        slots = torch.arange(tq, n) % max(residual_capacity(self.scheme, self.G, self.R), 1)
        return self.k_residual[b][:, slots], self.v_residual[b][:, slots]


def bulk(x, cache, key):
    """The bulk op's codes and params of x [1, H, T, D] under the cache's format."""
    c = cache
    pdt = c.k_params.dtype
    if c.scheme == "fp8":
        return ops.kv_quantize_fp8(x, c.k_params if key else c.v_params, c.fmt), None
    if c.scheme == "kivi" and key:
        return ops.kv_quantize_channel(x, c.bits, c.G, pdt)
    return ops.kv_quantize(x, c.bits, c.G, c.scheme == "symmetric", pdt)


def check_against_history(cache, k_hist, v_hist):
    """Bit-identical to the bulk ops on the same groups, residual exact, and the dequantized cache equal
    to the reference of the whole history (exact except +-1 code at exact ties)."""
    c = cache
    for b in range(c.B):
        n = int(c.lengths[b])
        assert n == k_hist[b].shape[1]
        tq = quantized_length(c.scheme, c.G, c.R, n)
        kc, kp, vc, vp = c.quantized(b)
        for x, codes, params, key in ((k_hist[b], kc, kp, True), (v_hist[b], vc, vp, False)):
            want_c, want_p = bulk(x[None, :, :tq], c, key)
            assert torch.equal(codes, want_c[0]), f"sequence {b}: codes differ from the bulk op's"
            if want_p is not None:
                assert torch.equal(params, want_p[0]), f"sequence {b}: params differ from the bulk op's"
        kr, vr = c.residual_rows(b)
        assert torch.equal(kr, k_hist[b][:, tq:]) and torch.equal(vr, v_hist[b][:, tq:])
    k_deq, v_deq = c.dequantized()
    T = max(h.shape[1] for h in k_hist)
    for b in range(c.B):
        n = k_hist[b].shape[1]
        pad = lambda h, n=n: torch.nn.functional.pad(h[None], (0, 0, 0, T - n))  # noqa: E731
        rk, rv = ref.reference_cache_history(pad(k_hist[b]), pad(v_hist[b]), c.scheme, c.bits, c.G, c.R,
                                             c.k_params.dtype if c.scheme != "fp8" else torch.float32, c.fmt,
                                             c.k_params, c.v_params, lengths=[n])
        for got, want in ((k_deq[b], rk[0]), (v_deq[b], rv[0])):
            exact = (got == want) | (torch.isnan(got) & torch.isnan(want))
            # exact but for a code one apart at an exact tie (the reference rounds in another order)
            assert exact.float().mean().item() >= 0.999, "dequantized cache differs from the history's reference"


# (scheme, bits, G, R, D): every format; KIVI with R = 0, G, 2G; per-token with R = 0.
CONFIGS = [
    ("per_token", 2, 32, 5, 64), ("per_token", 4, 64, 0, 64), ("per_token", 8, 128, 3, 128),
    ("per_token", 4, 80, 2, 80), ("per_token", 8, 32, 0, 96), ("symmetric", 8, 32, 4, 64),
    ("kivi", 2, 8, 0, 64), ("kivi", 4, 8, 8, 80), ("kivi", 8, 16, 32, 64), ("kivi", 2, 32, 32, 64),
    ("fp8", 8, 0, 3, 64), ("fp8", 8, 0, 0, 64),
]


def config_id(c):
    return "-".join(str(x) for x in c)


def random_steps(seed, t_max, n_steps):
    rng = random.Random(seed)
    steps, T = [], 0
    for _ in range(n_steps):
        n = rng.choice([1, 1, 1, 2, rng.randint(3, 40)])
        n = min(n, t_max - T)
        if n <= 0:
            break
        steps.append(n)
        T += n
    return steps


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_interleaving_matches_history(cfg, dtype):
    scheme, bits, G, R, D = cfg
    seed = zlib.crc32(f"{cfg}{dtype}".encode()) % 1000
    fmt = "e5m2" if dtype == torch.bfloat16 else "e4m3"
    pdt = torch.float16 if dtype == torch.float16 and seed % 2 else torch.float32
    B, H, t_max = 3, 2, 96
    page = 2 * G if scheme == "kivi" else 7
    paged = dtype != torch.float16  # both layouts for every format; fp8 e4m3 / e5m2, per tensor / per head
    cache = Cache(B, H, D, scheme, bits, G, R, dtype, pdt, paged=paged, page_size=page, t_max=t_max, fmt=fmt,
                  per_head=dtype != torch.float32, seed=seed)
    k_hist = [torch.empty(H, 0, D, dtype=dtype) for _ in range(B)]
    v_hist = [torch.empty(H, 0, D, dtype=dtype) for _ in range(B)]
    for i, n in enumerate(random_steps(seed, t_max - 8, 12)):
        k = randn((B, H, n, D), dtype, 2 * i + seed, scale=2.0)
        v = randn((B, H, n, D), dtype, 2 * i + 1 + seed)
        cache.append(k, v)
        k_hist = [torch.cat([h, k[b]], 1) for b, h in enumerate(k_hist)]
        v_hist = [torch.cat([h, v[b]], 1) for b, h in enumerate(v_hist)]
        if i == 3:
            check_against_history(cache, k_hist, v_hist)
    check_against_history(cache, k_hist, v_hist)


def run_steps(cache, steps, seqs, dtype, seed):
    """Appends to a subset of sequences (as the Python class does: slices of lengths, block table and
    residual; contiguous codes sliced too)."""
    D, H = cache.D, cache.H
    for i, (n, b0, b1) in enumerate(zip(steps, *zip(*seqs))):
        k = randn((b1 - b0, H, n, D), dtype, seed + 2 * i, 3.0)
        v = randn((b1 - b0, H, n, D), dtype, seed + 2 * i + 1)
        paged = cache.block_table is not None
        sl = slice(b0, b1)
        kv_append(cache.k_codes if paged else cache.k_codes[sl], cache.k_params if paged or cache.scheme == "fp8"
                  else cache.k_params[sl], cache.v_codes if paged else cache.v_codes[sl],
                  cache.v_params if paged or cache.scheme == "fp8" else cache.v_params[sl], cache.k_residual[sl],
                  cache.v_residual[sl], cache.lengths[sl], cache.block_table[sl] if paged else None, k, v,
                  cache.scheme, cache.bits, cache.G, cache.R, cache.fmt)


@pytest.mark.parametrize("cfg", [("kivi", 4, 8, 16, 64), ("per_token", 2, 32, 3, 64), ("fp8", 8, 0, 2, 64),
                                 ("symmetric", 8, 64, 0, 64)], ids=config_id)
def test_paged_and_contiguous_agree_bit_for_bit(cfg):
    scheme, bits, G, R, D = cfg
    B, H, t_max = 4, 3, 80
    page = 16 if scheme == "kivi" else 6  # tokens cross page ends
    caches = [Cache(B, H, D, scheme, bits, G, R, torch.float16, torch.float16, paged=p, page_size=page, t_max=t_max,
                    per_head=True, seed=5 + p) for p in (False, True)]
    if scheme == "fp8":  # the same fixed scales
        caches[1].k_params, caches[1].v_params = caches[0].k_params.clone(), caches[0].v_params.clone()
    rng = random.Random(3)
    steps, seqs, used = [], [], [0] * B
    for _ in range(14):
        b0 = rng.randrange(B)
        b1 = rng.randrange(b0 + 1, B + 1)
        n = rng.choice([1, 1, 5, 23])
        n = min([n] + [t_max - used[b] for b in range(b0, b1)])
        if n <= 0:
            continue
        for b in range(b0, b1):
            used[b] += n
        steps.append(n)
        seqs.append((b0, b1))
    for c in caches:
        run_steps(c, steps, seqs, torch.float16, 11)
    a, b = caches
    assert torch.equal(a.lengths, b.lengths) and a.lengths.tolist() == used
    for s in range(B):
        for x, y in zip(a.quantized(s), b.quantized(s)):
            assert torch.equal(x, y)
        for x, y in zip(a.residual_rows(s), b.residual_rows(s)):
            assert torch.equal(x, y)
    for x, y in zip(a.dequantized(), b.dequantized()):
        assert torch.equal(x, y)


def test_prefill_longer_than_ring_reads_old_residual_first():
    """KIVI G 8, R 8: 13 tokens sit in the ring (15 slots); a 40-token prefill wraps onto their
    slots while quantizing them: they must be read before they are overwritten."""
    D, H = 64, 2
    cache = Cache(1, H, D, "kivi", 4, 8, 8, torch.float32, t_max=64, seed=2)
    k1, v1 = randn((1, H, 13, D), torch.float32, 1), randn((1, H, 13, D), torch.float32, 2)
    k2, v2 = randn((1, H, 40, D), torch.float32, 3), randn((1, H, 40, D), torch.float32, 4)
    cache.append(k1, v1)
    assert cache.lengths.tolist() == [13]
    cache.append(k2, v2)
    assert cache.lengths.tolist() == [53] and quantized_length("kivi", 8, 8, 53) == 40
    check_against_history(cache, [torch.cat([k1, k2], 2)[0]], [torch.cat([v1, v2], 2)[0]])


def test_decode_steps_quantize_each_group_once():
    """Per-token R 2: a decode step quantizes exactly the token that leaves the ring; KIVI: a group is
    quantized when its last token is 2 groups old and never rewritten."""
    D, H = 64, 1
    c = Cache(1, H, D, "kivi", 2, 8, 8, torch.float32, t_max=48, seed=4)
    before = None
    for t in range(40):
        c.append(randn((1, H, 1, D), torch.float32, 100 + t), randn((1, H, 1, D), torch.float32, 200 + t))
        tq = quantized_length("kivi", 8, 8, t + 1)
        assert tq == max(0, (t + 1 - 8) // 8 * 8)
        kc = c.k_codes[0, :, :tq].clone()
        if before is not None:
            assert torch.equal(kc[:, :before.shape[1]], before)  # history never re-quantized
        before = kc


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_k_v(layout):
    D, H, n = 64, 3, 9
    base = randn((2, n, H, D), torch.bfloat16, 7) if layout == "transposed" else randn((2, H, n, 2 * D),
                                                                                       torch.bfloat16, 7)
    k = base.transpose(1, 2) if layout == "transposed" else base[..., D:]
    v = k * 0.5 + 1
    assert not k.is_contiguous()
    a = Cache(2, H, D, "per_token", 4, 32, 2, torch.bfloat16, t_max=16, seed=1)
    b = Cache(2, H, D, "per_token", 4, 32, 2, torch.bfloat16, t_max=16, seed=1)
    a.append(k, v)
    b.append(k.contiguous(), v.contiguous())
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)


def test_empty_calls_change_nothing():
    c = Cache(2, 2, 64, "kivi", 4, 8, 8, torch.float16, t_max=32, seed=3)
    c.append(randn((2, 2, 5, 64), torch.float16, 1), randn((2, 2, 5, 64), torch.float16, 2))
    saved = [t.clone() for t in c.tensors()]
    c.append(torch.empty(2, 2, 0, 64, dtype=torch.float16), torch.empty(2, 2, 0, 64, dtype=torch.float16))
    for x, y in zip(saved, c.tensors()):
        assert torch.equal(x, y)
    kv_append(c.k_codes[:0], c.k_params[:0], c.v_codes[:0], c.v_params[:0], c.k_residual[:0], c.v_residual[:0],
              c.lengths[:0], None, torch.empty(0, 2, 3, 64, dtype=torch.float16),
              torch.empty(0, 2, 3, 64, dtype=torch.float16), "kivi", 4, 8, 8, "e4m3")


def test_non_finite_tokens_poison_only_their_group():
    D, H = 64, 1
    c = Cache(1, H, D, "per_token", 4, 32, 0, torch.float32, t_max=8, seed=6)
    k = randn((1, H, 3, D), torch.float32, 1)
    k[0, 0, 1, 40] = float("nan")
    c.append(k, k.clone())
    kd, _ = c.dequantized()
    assert torch.isnan(kd[0, 0, 1, 32:]).all() and torch.isfinite(kd[0, 0, 1, :32]).all()
    assert torch.isfinite(kd[0, 0, [0, 2]]).all()


# ---- bad input: each argument named, on CPU and meta alike, and nothing in the cache changed

def _bad_cases():
    """(label, cache kwargs, overrides of the call given the cache, message regex, meta too)."""
    D = 64

    def kv(c, n=2, dtype=None, D=D, H=None, B=None):
        dtype = dtype or c.dtype
        return randn((B or c.B, H or c.H, n, D), dtype, 9)

    per_token = dict(scheme="per_token", bits=4, G=32, R=2)
    kivi = dict(scheme="kivi", bits=2, G=8, R=8)
    fp8 = dict(scheme="fp8", bits=8, G=0, R=1)
    return [
        ("scheme", per_token, lambda c: dict(scheme="int4"), r"scheme must be \"per_token\", \"symmetric\"", True),
        ("bits", per_token, lambda c: dict(bits=3), r"bits must be 2, 4 or 8 for scheme \"per_token\", got 3", True),
        ("symmetric bits", dict(per_token, scheme="symmetric", bits=8), lambda c: dict(bits=4),
         r"bits must be 8 for scheme \"symmetric\", got 4", True),
        ("group vs codes", per_token, lambda c: dict(group_size=16), r"k_params must have shape", True),
        ("group multiple of 8", per_token, lambda c: dict(group_size=12),
         r"group_size must be a positive multiple of 8",
         True),
        ("group divides D", per_token, lambda c: dict(group_size=48),
         r"group_size 48 must divide the head dimension D = k.size\(3\) = 64",
         True),
        ("bits vs codes", per_token, lambda c: dict(bits=2), r"k_codes.size\(3\) must be D \* bits / 8 = 16", True),
        ("scheme vs codes", per_token, lambda c: dict(scheme="symmetric", bits=8),
         r"k_codes must be Char for scheme \"symmetric\", got Byte", True),
        ("kivi residual", kivi, lambda c: dict(residual=4), r"residual 4 must be a multiple of group_size = 8", True),
        ("residual vs ring", per_token, lambda c: dict(residual=3),
         r"k_residual must have shape \[batch, Hkv, residual, D\] = \[2, 2, 3, 64\], got \[2, 2, 2, 64\]", True),
        ("negative residual", per_token, lambda c: dict(residual=-1), r"residual must be >= 0, got -1", True),
        ("fp8 format", fp8, lambda c: dict(fp8_format="e3m4"), r"fp8_format must be \"e4m3\" or \"e5m2\"", True),
        ("head count", per_token, lambda c: dict(k=kv(c, H=3), v=kv(c, H=3)),
         r"k.size\(1\) must be the cache's KV heads Hkv = k_codes.size\(1\) = 2, got 3", True),
        ("head dim", per_token, lambda c: dict(k=kv(c, D=128), v=kv(c, D=128)),
         r"k_codes.size\(3\) must be D \* bits / 8", True),
        ("head dim multiple of 8", per_token, lambda c: dict(k=kv(c, D=60), v=kv(c, D=60)),
         r"D = k.size\(3\) must be a positive multiple of 8, got 60", True),
        ("batch", per_token, lambda c: dict(k=kv(c, B=3), v=kv(c, B=3)),
         r"k.size\(0\) must be batch = lengths.size\(0\)",
         True),
        ("v shape", per_token, lambda c: dict(v=kv(c, n=3)), r"v must have shape k.shape", True),
        ("k dtype", per_token, lambda c: dict(k=kv(c, dtype=torch.float64), v=kv(c, dtype=torch.float64)),
         r"k must be float32, float16 or bfloat16, got Double", True),
        ("v dtype", per_token, lambda c: dict(v=kv(c, dtype=torch.float16)), r"v must be Float \(k's dtype\)", True),
        ("activation vs ring dtype", per_token,
         lambda c: dict(k=kv(c, dtype=torch.float16), v=kv(c, dtype=torch.float16)),
         r"k_residual must be Half \(k's dtype\), got Float", True),
        ("lengths dtype", per_token, lambda c: dict(lengths=c.lengths.long()),
         r"lengths must be an int32 tensor of shape \[batch\], got Long", True),
        ("params dtype", per_token, lambda c: dict(k_params=c.k_params.bfloat16()),
         r"k_params must be float32 or float16, got BFloat16", True),
        ("fp16 params for fp32", per_token, lambda c: dict(k_params=c.k_params.half(), v_params=c.v_params.half()),
         r"k_params float16 cannot hold the range of k's dtype Float", True),
        ("v params dtype", per_token, lambda c: dict(v_params=c.v_params.double()),
         r"v_params must be Float \(k_params' dtype\), got Double", True),
        ("codes dtype", per_token, lambda c: dict(v_codes=c.v_codes.to(torch.int8)),
         r"v_codes must be Byte for scheme \"per_token\", got Char",
         True),
        ("codes contiguous", per_token, lambda c: dict(k_codes=c.k_codes.transpose(0, 1).contiguous().transpose(0, 1)),
         r"k_codes must be contiguous", True),
        ("kivi key params", kivi, lambda c: dict(k_params=c.v_params),
         r"k_params must have shape \[pages, Hkv, page_size / group_size, D, 2\]", True),
        ("kivi page size", dict(kivi, page_size=12, paged=True, prefill=False), lambda c: {},
         r"page_size = k_codes.size\(2\) = 12 must be a multiple of group_size = 8", True),
        ("fp8 scale shape", fp8, lambda c: dict(k_params=torch.ones(3)),
         r"k_params \(the fp8 scale\) must have shape \[\] or \[1\] \(per tensor\) or \[Hkv\] = \[2\] "
         r"\(per head\), got \[3\]", True),
        ("fp8 scale dtype", fp8, lambda c: dict(v_params=torch.ones((), dtype=torch.float64)),
         r"v_params \(the fp8 scale\) must be float32, got Double", True),
        ("fp8 scale value", fp8, lambda c: dict(v_params=torch.tensor(float("inf"))),
         r"v_params \(the fp8 scale\) must be finite and positive, got v_params\[0\] = inf", False),
        ("contiguous pages", per_token, lambda c: dict(lengths=torch.zeros(1, dtype=torch.int32), k=kv(c, B=1),
                                                        v=kv(c, B=1), k_residual=c.k_residual[:1],
                                                        v_residual=c.v_residual[:1]),
         r"without block_table \(contiguous layout\) k_codes.size\(0\) must be batch = lengths.size\(0\) = 1", True),
        ("block table shape", dict(per_token, paged=True, page_size=8), lambda c: dict(block_table=c.block_table[:1]),
         r"block_table must be an int32 tensor of shape \[batch = lengths.size\(0\), max_pages\] = "
         r"\[2, max_pages\], got Int of shape \[1, 4\]", True),
        ("block table dtype", dict(per_token, paged=True, page_size=8),
         lambda c: dict(block_table=c.block_table.long()),
         r"block_table must be an int32 tensor .*, got Long", True),
        ("lengths overflow", per_token, lambda c: dict(k=kv(c, n=30), v=kv(c, n=30)),
         r"lengths\[0\] \+ n_new = 3 \+ 30 = 33 exceeds the sequence's capacity of 32 tokens", False),
        ("lengths overflow paged", dict(per_token, paged=True, page_size=8),
         lambda c: dict(k=kv(c, n=30), v=kv(c, n=30)),
         r"lengths\[0\] \+ n_new = 3 \+ 30 = 33 exceeds the sequence's capacity of 32 tokens \(block_table.size\(1\)",
         False),
        ("negative lengths", per_token, lambda c: dict(lengths=torch.tensor([3, -1], dtype=torch.int32)),
         r"lengths\[1\] must be >= 0, got -1", False),
        ("block table out of range", dict(per_token, paged=True, page_size=8),
         lambda c: dict(block_table=torch.where(torch.arange(4) == 0, 99, c.block_table).to(torch.int32)),
         r"block_table\[0\]\[0\] = 99 is out of range: it must be a page index in "
         r"\[0, pages = k_codes.size\(0\) = 11\)",
         False),
        ("block table negative", dict(per_token, paged=True, page_size=8),
         lambda c: dict(block_table=torch.where(torch.arange(4) == 0, -1, c.block_table).to(torch.int32)),
         r"block_table\[1\]\[0\] = -1 is out of range", False),
        ("device", per_token, lambda c: dict(v=kv(c).to("meta")),
         r"v must be on the device of k_codes \(cpu\), got meta",
         False),
    ]


BAD = _bad_cases()


def _bad_cache(kw):
    kw = dict(kw)
    c = Cache(2, 2, 64, kw.pop("scheme"), kw.pop("bits"), kw.pop("G"), kw.pop("R"), torch.float32, t_max=32, seed=8,
              paged=kw.pop("paged", False), page_size=kw.pop("page_size", None))
    if kw.pop("prefill", True):  # three tokens in every sequence first: the ring and the codes hold data
        c.append(randn((2, 2, 3, 64), torch.float32, 1), randn((2, 2, 3, 64), torch.float32, 2))
    return c


@pytest.mark.parametrize("label,cache_kw,over,message,meta", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(label, cache_kw, over, message, meta):
    c = _bad_cache(cache_kw)
    k, v = randn((2, 2, 2, 64), torch.float32, 5), randn((2, 2, 2, 64), torch.float32, 6)
    if label == "block table negative":  # entry of a page this call writes (sequence 1, page 0)
        bt = c.block_table.clone()
        bt[1, 0] = -1
        over = lambda c, bt=bt: dict(block_table=bt)  # noqa: E731
    args = c.args(k, v)
    args.update(over(c))
    saved = [t.clone() for t in c.tensors()]
    with pytest.raises((RuntimeError, ValueError), match=message):
        kv_append(**args)
    for x, y in zip(saved, c.tensors()):
        assert torch.equal(x, y), "a call that raised changed the cache"
    if meta:  # the fake kernel refuses it with the same message
        margs = {n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
        with pytest.raises((RuntimeError, ValueError), match=message):
            kv_append(**margs)


def test_requires_grad_refused():
    c = _bad_cache(dict(scheme="per_token", bits=4, G=32, R=2))
    k = randn((2, 2, 1, 64), torch.float32, 5).requires_grad_()
    with pytest.raises(RuntimeError, match="k"):
        kv_append(**c.args(k, k.detach()))


def _opcheck_samples():
    out = []
    for scheme, bits, G, R, paged, dtype in [("kivi", 4, 8, 8, True, torch.float16), ("per_token", 2, 32, 0, False,
                                                                                    torch.float32),
                                             ("fp8", 8, 0, 2, True, torch.bfloat16),
                                             ("symmetric", 8, 64, 1, False, torch.float16)]:
        c = Cache(2, 2, 64, scheme, bits, G, R, dtype, torch.float16 if dtype == torch.float16 else torch.float32,
                  paged=paged, page_size=16, t_max=256, seed=4)
        a = c.args(randn((2, 2, 5, 64), dtype, 1), randn((2, 2, 5, 64), dtype, 2))
        out.append(tuple(a.values()))
    return out


def test_opcheck():
    for args in _opcheck_samples():
        torch.library.opcheck(ops.kv_append.default, args)


def test_meta_kernel_accepts_valid_call():
    c = Cache(2, 2, 64, "kivi", 2, 8, 8, torch.float16, paged=True, page_size=16, t_max=32, seed=1)
    a = c.args(randn((2, 2, 4, 64), torch.float16, 1), randn((2, 2, 4, 64), torch.float16, 2))
    kv_append(**{n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in a.items()})


# ---- the AVX2 kernels and their scalar twins (TROUS_CPU_SIMD=0) write the same bytes

_TWIN_SCRIPT = r"""
import sys, torch, trous
ops = torch.ops.trous
g = torch.Generator().manual_seed(0)
out = {}
for dt in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn(2, 3, 32, 128, generator=g) * 3).to(dt)
    x[0, 0, 1, 5] = float("nan"); x[0, 1, 2, 7] = float("inf"); x[1, 0, 3, :] = 0.5; x[1, 1, 4, :64] = 1e-30
    for pdt in ((torch.float32, torch.float16) if dt == torch.float16 else (torch.float32,)):
        for bits, G, sym in ((2, 32, False), (4, 64, False), (8, 128, False), (4, 16, False), (8, 32, True)):
            c, p = ops.kv_quantize(x, bits, G, sym, pdt)
            out[f"q{dt}{pdt}{bits}{G}{sym}"] = [c, p] + [ops.kv_dequantize(c, p, bits, G, sym, o)
                                                         for o in (torch.float32, torch.float16)]
        for bits in (2, 4, 8):
            c, p = ops.kv_quantize_channel(x, bits, 32, pdt)
            out[f"c{dt}{pdt}{bits}"] = [c, p, ops.kv_dequantize_channel(c, p, bits, 32, dt)]
    out[f"f{dt}"] = [ops.kv_quantize_fp8(x, torch.tensor(0.01), "e5m2")]
codes = torch.arange(256, dtype=torch.uint8).repeat(24).reshape(2, 3, 64, 16)
for fmt in ("e4m3", "e5m2"):
    out[fmt] = [ops.kv_dequantize_fp8(codes, torch.tensor([0.01, 3.0, 1e-3]), fmt, o)
                for o in (torch.float32, torch.float16)]
torch.save(out, sys.argv[1])
"""


def test_simd_and_scalar_kernels_write_the_same_bytes(tmp_path):
    import os
    import subprocess
    import sys

    files = {}
    for simd in ("1", "0"):
        path = tmp_path / f"simd{simd}.pt"
        env = dict(os.environ, TROUS_CPU_SIMD=simd)
        subprocess.run([sys.executable, "-c", _TWIN_SCRIPT, str(path)], check=True, env=env, timeout=300)
        files[simd] = torch.load(path)
    for key, tensors in files["1"].items():
        for a, b in zip(tensors, files["0"][key]):
            a, b = a.contiguous(), b.contiguous()
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
