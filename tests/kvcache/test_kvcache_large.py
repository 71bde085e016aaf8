"""The 64-bit indexing promise of every KV op: inputs of more than 2^31 elements (fp16, 4.3 GB),
sampled rows (including ones beyond element 2^31) checked against the reference. Peak memory about
6.6 GB (x and the codes, then the codes and the output). Marked slow: `make fuzz` runs them."""
import gc

import pytest
import torch

from trous import kvcache as kv
from trous.kvcache import reference as ref

pytestmark = pytest.mark.slow

D = 128
N = 2**31 + 2**20  # elements
R = N // D  # rows (B * H * T)
H = 2
T = R // H
CHUNK = 1 << 20
# Rows to check: the first, the middle, the last below element 2^31, and three beyond it.
ROWS = [0, 1, R // 2, 2**31 // D - 1, 2**31 // D, 2**31 // D + 4097, R - 1]


def row_values(rows: torch.Tensor) -> torch.Tensor:
    """The fp16 values of the given rows (a pure function of the row index: no copy of x is kept)."""
    c = ((torch.arange(D) * 37) % D - 64).float() / 1024
    r = ((rows % 251) - 125).float()[:, None] / 64
    return (r + c * (1 + (rows % 7).float()[:, None])).half()


def make_x() -> torch.Tensor:
    x = torch.empty((1, H, T, D), dtype=torch.float16)
    rows = x.view(R, D)
    for a in range(0, R, CHUNK):
        b = min(a + CHUNK, R)
        rows[a:b] = row_values(torch.arange(a, b))
    return x


def test_large_per_token_int8():
    x = make_x()
    q = kv.quantize_per_token(x, 8, D)
    del x
    gc.collect()
    out = kv.dequantize(q)
    assert out.dtype == torch.float16 and out.shape == (1, H, T, D)
    idx = torch.tensor(ROWS)
    codes, params = ref.quantize_per_token(row_values(idx)[None, None], 8, D, param_dtype=torch.float16)
    assert torch.equal(q.codes.view(R, D)[idx], codes[0, 0])
    assert torch.equal(q.params.view(R, 2)[idx], params[0, 0, :, 0])
    want = ref.dequantize_per_token(codes, params, 8, D, dtype=torch.float16)[0, 0]
    assert torch.equal(out.view(R, D)[idx], want)


def test_large_per_channel_int8():
    G = 32
    x = make_x()
    q = kv.quantize_per_channel(x, 8, G)
    del x
    gc.collect()
    out = kv.dequantize(q)
    for r in ROWS:
        r0 = r // G * G  # the token group holding row r (T % G == 0: groups never straddle heads)
        idx = torch.arange(r0, r0 + G)
        codes, params = ref.quantize_per_channel(row_values(idx)[None, None], 8, G, param_dtype=torch.float16)
        assert torch.equal(q.codes.view(R, D)[r0:r0 + G], codes[0, 0]), r
        assert torch.equal(q.params.view(R // G, D, 2)[r0 // G], params[0, 0, 0]), r
        want = ref.dequantize_per_channel(codes, params, 8, G, dtype=torch.float16)[0, 0]
        assert torch.equal(out.view(R, D)[r0:r0 + G], want), r


def test_large_fp8_per_head():
    scale = torch.tensor([0.004, 0.008])
    x = make_x()
    q = kv.quantize_fp8(x, scale, "e4m3")
    del x
    gc.collect()
    out = kv.dequantize(q)
    idx = torch.tensor(ROWS)
    heads = idx // T
    for h in (0, 1):
        sel = idx[heads == h]
        want = ref.quantize_fp8(row_values(sel)[None, None], scale[h], "e4m3")[0, 0]
        assert torch.equal(q.codes.view(R, D)[sel], want)
        back = ref.dequantize_fp8(want, scale[h], "e4m3", torch.float16)
        assert torch.equal(out.view(R, D)[sel], back)
