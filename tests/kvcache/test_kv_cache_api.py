"""trous.QuantizedKVCache: append / attend against attention over the dequantized history, paged vs contiguous
bit for bit, subsets of sequences, memory arithmetic at 32k tokens, capacity checks that change nothing,
freeing pages, reorder / truncate, fp8 scale calibration, and the errors of bad arguments.

The cache runs ``torch.ops.trous.kv_append`` / ``quantized_decode_attention``; what it holds is read back by the
reference reader (``trous.kvcache.reference.reference_dequantize_cache``).
"""
import pytest
import torch

import trous
from trous.kvcache import reference as ref

FORMATS = [("kivi", 2), ("kivi", 4), ("per_token", 2), ("per_token", 4), ("per_token", 8), ("symmetric", 8),
           ("fp8", 8)]
REL_ERR = {2: 0.9, 4: 0.3, 8: 0.06}  # vs attention over the exact history (random keys: no structure to keep)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes: one thread is faster than two (and much faster on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(scheme, bits, paged=False, dtype=torch.float32, **kw):
    opts = dict(num_layers=2, num_kv_heads=2, head_dim=64, bits=bits, scheme=scheme, group_size=32, residual=32,
                paged=paged, page_size=32, max_batch=3, max_tokens=160, dtype=dtype)
    opts.update(kw)
    return trous.QuantizedKVCache(**opts)


def _history(c, layer, b):
    """Keys and values [Hkv, T, D] (fp32) that sequence b of the layer holds."""
    t = c.layer_tensors(layer)
    lengths = t["lengths"].cpu()
    k, v = ref.reference_dequantize_cache(t["k_codes"], t["k_params"], t["v_codes"], t["v_params"], t["k_residual"],
                                          t["v_residual"], lengths, c.block_table, c.scheme, c.bits, c.group_size,
                                          c.residual, c.fp8_format)
    T = int(lengths[b])
    return k[b, :, :T], v[b, :, :T]


def _attention(q, K, V, scale):
    """fp32 causal attention of q [Hq, Sq, D] over K, V [Hkv, T, D] (the queries are the last Sq positions)."""
    Hq, Sq, _ = q.shape
    r = Hq // K.shape[0]
    K, V = K.repeat_interleave(r, 0), V.repeat_interleave(r, 0)
    T = K.shape[1]
    s = scale * q.float() @ K.transpose(1, 2)
    allowed = torch.ones(Sq, T, dtype=torch.bool).tril(T - Sq)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ V


def _steps(seed, c, layer_count=2, batch=3, sizes=(45, 1, 2, 33, 1, 7)):
    """A seeded interleaving of prefill-sized and decode appends; returns the full-precision history."""
    g = torch.Generator().manual_seed(seed)
    ks = [[] for _ in range(layer_count)]
    vs = [[] for _ in range(layer_count)]
    for n in sizes:
        for layer in range(layer_count):
            k = (torch.randn(batch, c.num_kv_heads, n, c.head_dim, generator=g) * 2 + 0.3).to(c.dtype)
            v = torch.randn(batch, c.num_kv_heads, n, c.head_dim, generator=g).to(c.dtype)
            c.append(layer, k, v)
            ks[layer].append(k)
            vs[layer].append(v)
    return [torch.cat(x, 2) for x in ks], [torch.cat(x, 2) for x in vs]


@pytest.mark.parametrize("scheme,bits,dtype", [(s, b, torch.float32) for s, b in FORMATS]
                         + [("kivi", 2, torch.float16), ("per_token", 4, torch.bfloat16), ("fp8", 8, torch.bfloat16)])
def test_attend_matches_attention_over_dequantized_history(scheme, bits, dtype):
    c = _make(scheme, bits, dtype=dtype)
    K, V = _steps(1, c)
    T = K[0].shape[2]
    assert c.lengths.tolist() == [T] * 3
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 8, 2, 64, generator=g).to(dtype)  # GQA 4, two queries per sequence
    for layer in range(2):
        out, lse = c.attend(layer, q, return_lse=True)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (3, 8, 2) and lse.dtype == torch.float32
        for b in range(3):
            Kq, Vq = _history(c, layer, b)
            assert Kq.shape == (2, T, 64)
            # The residual holds the last tokens exactly; the quantized part is within the format's error.
            ql = c.quantized_length(T)
            assert torch.equal(Kq[:, ql:], K[layer][b, :, ql:].float())
            want = _attention(q[b], Kq, Vq, 64 ** -0.5)
            err = (out[b].float() - want).abs().max().item()
            assert err <= TOL[dtype] * 4, (b, err)
            exact = _attention(q[b], K[layer][b].float(), V[layer][b].float(), 64 ** -0.5)
            rel = ((out[b].float() - exact).norm() / exact.norm()).item()
            assert rel < REL_ERR[bits], (b, rel)


@pytest.mark.parametrize("scheme,bits", [("kivi", 2), ("symmetric", 8)])
def test_paged_and_contiguous_agree_bit_for_bit(scheme, bits):
    a = _make(scheme, bits, paged=False, dtype=torch.float16)
    b = _make(scheme, bits, paged=True, dtype=torch.float16, num_pages=17)
    _steps(3, a)
    _steps(3, b)
    q = torch.randn(3, 4, 1, 64, generator=torch.Generator().manual_seed(2)).half()
    for layer in range(2):
        assert torch.equal(a.attend(layer, q), b.attend(layer, q))
        for s in range(3):
            ka, va = _history(a, layer, s)
            kb, vb = _history(b, layer, s)
            assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert b.free_pages() == 17 - 3 * 3  # 89 tokens in pages of 32


def test_subsets_of_sequences():
    c = _make("kivi", 4, max_batch=4)
    g = torch.Generator().manual_seed(5)
    full = _make("kivi", 4, max_batch=4)
    ks = torch.randn(4, 2, 40, 64, generator=g)
    vs = torch.randn(4, 2, 40, 64, generator=g)
    full.append(0, ks, vs)
    c.append(0, ks[[0, 2, 3]], vs[[0, 2, 3]], seqs=[0, 2, 3])  # two runs: [0] and [2, 3]
    c.append(0, ks[1:2], vs[1:2], seqs=1)
    assert c.lengths.tolist()[:4] == [40] * 4 and c.seq_length(1, layer=1) == 0
    q = torch.randn(4, 4, 1, 64, generator=g)
    want = full.attend(0, q)
    assert torch.equal(c.attend(0, q), want)
    assert torch.equal(c.attend(0, q[[3, 1]], seqs=[3, 1]), want[[3, 1]])
    # Growing one sequence only.
    c.append(0, ks[2:3, :, :5], vs[2:3, :, :5], seqs=range(2, 3))
    assert c.lengths.tolist() == [40, 40, 45, 40]


@pytest.mark.parametrize("scheme,bits", FORMATS)
def test_memory_bytes_matches_format_arithmetic_at_32k(scheme, bits):
    L, H, D, T, B = 2, 8, 128, 32768, 1
    for dtype in (torch.float16, torch.float32):
        c = trous.QuantizedKVCache(L, H, D, bits=bits, scheme=scheme, group_size=32, residual=128, max_tokens=T,
                                   max_batch=B, dtype=dtype, device="meta")
        pb = 2 if dtype == torch.float16 else 4
        per_token = {  # bytes of one token of one head, K + V
            ("kivi", 2): 2 * D // 4 + (D * 2 * pb) / 32 + D // 32 * 2 * pb,
            ("kivi", 4): 2 * D // 2 + (D * 2 * pb) / 32 + D // 32 * 2 * pb,
            ("per_token", 2): 2 * (D // 4 + D // 32 * 2 * pb),
            ("per_token", 4): 2 * (D // 2 + D // 32 * 2 * pb),
            ("per_token", 8): 2 * (D + D // 32 * 2 * pb),
            ("symmetric", 8): 2 * (D + D // 32 * pb),
            ("fp8", 8): 2 * D,
        }[(scheme, bits)]
        residual = 2 * B * H * (128 + (32 if scheme == "kivi" else 1) - 1) * D * (2 if pb == 2 else 4)
        scales = 2 * 4 if scheme == "fp8" else 0
        want = L * (T * H * per_token + residual + scales + 4 * B)
        assert c.memory_bytes() == want
        assert c.bytes_per_token() == L * H * per_token
    # fp16 KIVI-2 (G 32, fp16 parameters): 96 bytes per token and head against 512 in fp16.
    c = trous.QuantizedKVCache(L, H, D, bits=2, scheme="kivi", max_tokens=T, dtype=torch.float16, device="meta")
    assert 2 * L * H * D * 2 / c.bytes_per_token() == pytest.approx(512 / 96)


def test_capacity_beyond_cache_raises_and_changes_nothing():
    c = _make("kivi", 2, max_tokens=96)
    _steps(0, c, sizes=(90,))
    before = {k: v.clone() for k, v in c.layer_tensors(0).items()}
    k = torch.randn(3, 2, 7, 64)
    with pytest.raises(ValueError, match="max_tokens"):
        c.append(0, k, k)
    assert c.lengths.tolist() == [90] * 3
    for name, x in c.layer_tensors(0).items():
        assert torch.equal(x, before[name]), name
    c.append(0, k[:, :, :6], k[:, :, :6])  # exactly full
    assert c.seq_length(0) == 96
    # Paged: the pool runs out.
    p = _make("per_token", 4, paged=True, page_size=32, num_pages=4, max_tokens=1024)
    p.append(0, torch.randn(3, 2, 32, 64), torch.randn(3, 2, 32, 64))
    assert p.free_pages() == 1
    with pytest.raises(ValueError, match="free pages"):
        p.append(0, torch.randn(3, 2, 2, 64), torch.randn(3, 2, 2, 64))
    assert p.free_pages() == 1 and p.lengths.tolist() == [32] * 3
    assert p.capacity(0) == 64


def test_free_returns_pages_and_keeps_the_others():
    c = _make("kivi", 4, paged=True, page_size=32, num_pages=6, max_tokens=128)
    _steps(4, c, sizes=(50, 1))
    q = torch.randn(3, 2, 1, 64, generator=torch.Generator().manual_seed(1))
    keep = c.attend(0, q)
    assert c.free_pages() == 0
    c.free(1)
    assert c.free_pages() == 2 and c.lengths.tolist() == [51, 0, 51]
    assert torch.equal(c.attend(0, q[[0, 2]], seqs=[0, 2]), keep[[0, 2]])
    k = torch.randn(1, 2, 64, 64)
    c.append(0, k, k, seqs=[1])  # reuses the freed pages
    assert c.free_pages() == 0 and c.seq_length(1) == 64
    assert torch.equal(c.attend(0, q[[0, 2]], seqs=[0, 2]), keep[[0, 2]])
    c.reset()
    assert c.free_pages() == 6 and c.lengths.tolist() == [0, 0, 0]


def test_reorder_and_truncate():
    c = _make("kivi", 2)
    _steps(6, c, sizes=(70, 1))
    q = torch.randn(3, 2, 1, 64, generator=torch.Generator().manual_seed(3))
    before = c.attend(1, q)
    c.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(c.attend(1, q[[2, 2, 0]]), before[[2, 2, 0]])
    T = c.seq_length(0)  # 71: 32 quantized (one KIVI group), 39 in the residual
    assert c.quantized_length(T) == 32
    c.truncate(T - 3)
    assert c.lengths.tolist() == [T - 3] * 3
    with pytest.raises(ValueError, match="quantized"):
        c.truncate(40)
    assert c.lengths.tolist() == [T - 3] * 3
    with pytest.raises(NotImplementedError, match="paged"):
        _make("kivi", 2, paged=True).reorder(torch.tensor([0, 1, 2]))


def test_fp8_scale_calibrated_on_first_append_then_fixed():
    c = _make("fp8", 8, fp8_per_head=True, residual=0)
    k = torch.randn(3, 2, 20, 64) * torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    c.append(0, k, k)
    scale = c.layer_tensors(0)["k_params"].clone()
    assert scale.shape == (2,) and torch.allclose(scale, k.abs().amax((0, 2, 3)) / 448)
    c.append(0, 100 * k[:, :, :1], k[:, :, :1])
    assert torch.equal(c.layer_tensors(0)["k_params"], scale)
    assert c.layer_tensors(1)["k_params"].eq(1).all()  # layer 1 not calibrated yet
    fixed = _make("fp8", 8, fp8_scale=0.05, fp8_format="e5m2")
    fixed.append(0, k, k)
    assert fixed.layer_tensors(0)["v_params"].item() == pytest.approx(0.05)


def test_bad_arguments_name_what_is_wrong():
    c = _make("kivi", 4)
    good = torch.randn(3, 2, 4, 64)
    for bad, match in [(torch.randn(3, 3, 4, 64), "Hkv 2"), (torch.randn(3, 2, 4, 32), "D 64"),
                       (good.half(), "float32"), (torch.randn(3, 2, 64), r"\[batch, Hkv, n_new, D\]"),
                       (torch.randn(4, 2, 4, 64), "max_batch")]:
        with pytest.raises(ValueError, match=match):
            c.append(0, bad, bad)
    with pytest.raises(ValueError, match="same shape"):
        c.append(0, good, good[:, :, :3])
    with pytest.raises(IndexError, match="layer"):
        c.append(2, good, good)
    with pytest.raises(ValueError, match="repeated"):
        c.append(0, good[:2], good[:2], seqs=[1, 1])
    with pytest.raises(IndexError, match="seq"):
        c.append(0, good[:1], good[:1], seqs=[3])
    assert c.lengths.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="multiple of Hkv"):
        c.attend(0, torch.randn(3, 3, 1, 64))
    with pytest.raises(ValueError, match="float32"):
        c.attend(0, torch.randn(3, 2, 1, 64).half())
    for kw, match in [(dict(scheme="int4"), "scheme"), (dict(bits=3), "bits"), (dict(scheme="symmetric", bits=4),
                      "8 bits"), (dict(residual=40), "multiple of group_size"), (dict(group_size=48), "divide"),
                      (dict(paged=True, page_size=48), "page_size"), (dict(dtype=torch.int8), "dtype"),
                      (dict(scheme="fp8", bits=8, fp8_format="e3m4"), "fp8_format"),
                      (dict(scheme="fp8", bits=8, fp8_scale=torch.ones(3)), "fp8_scale"),
                      (dict(scheme="fp8", bits=8, fp8_scale=-1.0), "positive")]:
        opts = dict(scheme="kivi", bits=4)
        opts.update(kw)
        with pytest.raises(ValueError, match=match):
            _make(**opts)


def test_growable_contiguous_cache_keeps_its_tokens():
    c = _make("kivi", 2, max_tokens=64, growable=True)
    K, V = _steps(8, c, sizes=(60, 1, 30))
    assert c.max_tokens >= 91 and c.lengths.tolist() == [91] * 3
    q = torch.randn(3, 2, 1, 64, generator=torch.Generator().manual_seed(4))
    ref = _make("kivi", 2, max_tokens=128)
    _steps(8, ref, sizes=(60, 1, 30))
    assert torch.equal(c.attend(0, q), ref.attend(0, q))
