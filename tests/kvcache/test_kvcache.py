"""KV-cache quantize / dequantize against the reference formulas (trous.kvcache.reference)."""
import math

import pytest
import torch

from trous import kvcache as kv
from trous.kvcache import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gaussian(shape, dtype, device, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype).to(device)


def assert_codes_match(codes, expected, bits):
    """Codes equal the reference except +-1 at exact ties (>= 99.99% exact)."""
    assert codes.shape == expected.shape and codes.dtype == expected.dtype
    if bits < 8:
        codes, expected = ref.unpack_lsb_first(codes.cpu(), bits), ref.unpack_lsb_first(expected.cpu(), bits)
    diff = (codes.cpu().int() - expected.cpu().int()).abs()
    assert diff.max().item() <= 1
    assert (diff == 0).float().mean().item() >= 0.9999


def step_bound(x, xq, params, group, param_dtype, dim_groups="token"):
    """|x - x^| <= s/2 + parameter rounding (2^-11 (|z| + q s) for fp16 params, fp32 rounding else)."""
    B, H, T, D = x.shape
    p = params.float().cpu()
    if dim_groups == "token":
        s = p[..., 0].repeat_interleave(group, dim=-1)
        z = p[..., 1].repeat_interleave(group, dim=-1)
    else:
        s = p[..., 0].repeat_interleave(group, dim=2)
        z = p[..., 1].repeat_interleave(group, dim=2)
    rel = 2.0**-11 if param_dtype == torch.float16 else 2.0**-22
    err = (x.float().cpu() - xq.float().cpu()).abs()
    bound = s / 2 + rel * (z.abs() + x.float().cpu().abs() + s) + 1e-6 * s
    return err, bound


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D,group", [(64, 32), (64, 64), (80, 80), (80, 16), (96, 32), (128, 128), (128, 32),
                                     (256, 64), (256, 256), (96, 48)])
def test_per_token_matches_reference(device, bits, D, group):
    x = gaussian((2, 3, 7, D), torch.float32, device, seed=D + bits)
    q = kv.quantize_per_token(x, bits, group)
    codes, params = ref.quantize_per_token(x.cpu(), bits, group, param_dtype=torch.float32)
    assert_codes_match(q.codes, codes, bits)
    torch.testing.assert_close(q.params.cpu(), params, rtol=0, atol=0)
    out = kv.dequantize(q, torch.float32)
    torch.testing.assert_close(out.cpu(), ref.dequantize_per_token(codes, params, bits, group), rtol=1e-6, atol=1e-6)
    err, bound = step_bound(x, out, q.params, group, torch.float32)
    assert (err <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_dtypes(device, dtype, param_dtype, bits):
    x = gaussian((1, 4, 33, 128), dtype, device, seed=bits, scale=3.0, shift=0.5)
    if param_dtype == torch.float16 and dtype != torch.float16:  # fp16 cannot hold fp32 / bf16 ranges
        with pytest.raises(RuntimeError, match=r"param_dtype float16 cannot hold the range of x's dtype"):
            kv.quantize_per_token(x, bits, 32, param_dtype=param_dtype)
        return
    q = kv.quantize_per_token(x, bits, 32, param_dtype=param_dtype)
    assert q.params.dtype == param_dtype
    codes, params = ref.quantize_per_token(x.cpu(), bits, 32, param_dtype=param_dtype)
    assert_codes_match(q.codes, codes, bits)
    torch.testing.assert_close(q.params.cpu(), params, rtol=0, atol=0)
    for out_dtype in DTYPES:
        out = kv.dequantize(q, out_dtype)
        assert out.dtype == out_dtype and out.shape == x.shape
        expected = ref.dequantize_per_token(codes, params, bits, 32, dtype=out_dtype)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-6 if out_dtype == torch.float32 else 1e-2, atol=1e-6)
    err, bound = step_bound(x, kv.dequantize(q, torch.float32), q.params, 32, param_dtype)
    assert (err <= bound).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rmse_is_uniform_step_noise(device, bits):
    """On Gaussian data the rounding error is uniform within a step: RMSE / (s / sqrt(12)) ~ 1."""
    x = gaussian((1, 8, 512, 128), torch.float32, device, seed=11)
    q = kv.quantize_per_token(x, bits, 32)
    out = kv.dequantize(q, torch.float32)
    s = q.params[..., 0].float().repeat_interleave(32, dim=-1)
    ratio = ((x - out) / s).pow(2).mean().sqrt().item() / (1 / math.sqrt(12))
    assert 0.9 <= ratio <= 1.1, ratio


def test_symmetric_int8(device):
    x = gaussian((2, 2, 9, 64), torch.float16, device, seed=3)
    q = kv.quantize_per_token(x, 8, 32, symmetric=True, param_dtype=torch.float16)
    assert q.codes.dtype == torch.int8 and q.params.shape == (2, 2, 9, 2, 1)
    codes, params = ref.quantize_per_token(x.cpu(), 8, 32, symmetric=True, param_dtype=torch.float16)
    assert_codes_match(q.codes, codes, 8)
    assert q.codes.min() >= -127
    torch.testing.assert_close(q.params.cpu(), params, rtol=0, atol=0)
    out = kv.dequantize(q, torch.float32)
    torch.testing.assert_close(out.cpu(), ref.dequantize_per_token(codes, params, 8, 32, symmetric=True),
                               rtol=1e-6, atol=1e-6)
    s = q.params[..., 0].float().repeat_interleave(32, dim=-1)
    assert ((x.float() - out).abs() <= s / 2 + 2.0**-11 * x.float().abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_kivi_per_channel(device, dtype, bits, D):
    x = gaussian((2, 2, 64, D), dtype, device, seed=bits * D)
    q = kv.quantize_per_channel(x, bits, 32)
    assert q.params.shape == (2, 2, 2, D, 2)
    codes, params = ref.quantize_per_channel(x.cpu(), bits, 32, param_dtype=q.params.dtype)
    assert_codes_match(q.codes, codes, bits)
    torch.testing.assert_close(q.params.cpu(), params, rtol=0, atol=0)
    out = kv.dequantize(q, torch.float32)
    torch.testing.assert_close(out.cpu(), ref.dequantize_per_channel(codes, params, bits, 32), rtol=1e-6, atol=1e-6)
    err, bound = step_bound(x, out, q.params, 32, q.params.dtype, dim_groups="channel")
    assert (err <= bound).all()


def test_kivi_rejects_incomplete_group(device):
    x = gaussian((1, 1, 40, 64), torch.float32, device)
    with pytest.raises(RuntimeError, match=r"T = x.size\(2\) = 40 must be a multiple of group_size 32"):
        kv.quantize_per_channel(x, 2, 32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8(device, fmt, per_head, dtype):
    x = gaussian((2, 4, 17, 64), dtype, device, seed=5, scale=4.0)
    x[0, 1] *= 30  # heads with different ranges make per-head scales differ
    q = kv.quantize_fp8(x, fmt=fmt, per_head=per_head)
    assert q.params.shape == ((4,) if per_head else ())
    expected = ref.quantize_fp8(x.cpu(), q.params.cpu(), fmt)
    assert torch.equal(q.codes.cpu(), expected)
    out = kv.dequantize(q, torch.float32)
    torch.testing.assert_close(out.cpu(), ref.dequantize_fp8(expected, q.params.cpu(), fmt), rtol=1e-6, atol=0)
    # Relative error of a normal fp8 value: half an ulp, 2^-4 (e4m3) or 2^-3 (e5m2).
    s = q.params.float().reshape(1, -1, 1, 1) if per_head else q.params.float()
    normal = x.float().abs() / s >= (2.0**-6 if fmt == "e4m3" else 2.0**-14)
    rel = ((out - x.float()).abs() / x.float().abs())[normal]
    assert rel.max() <= (2.0**-4 if fmt == "e4m3" else 2.0**-3)


def test_fp8_non_finite_and_saturation(device):
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 1e6, -1e6, 0.0, -0.0], device=device)
    x = x.reshape(1, 1, 1, 8)
    q = kv.quantize_fp8(x, torch.tensor(1.0, device=device), "e4m3")
    out = kv.dequantize(q, torch.float32).flatten().cpu()
    assert out[0] == 1 and math.isnan(out[1])
    assert out[2:6].tolist() == [448.0, -448.0, 448.0, -448.0]
    assert out[6] == 0 and out[7] == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_are_exact(device, bits):
    x = torch.full((1, 2, 5, 64), 0.3, device=device)
    x[0, 1] = -7.25
    x[0, 0, 2, 32:] = 0.0
    for q in (kv.quantize_per_token(x, bits, 32), kv.quantize_per_channel(x[:, :, :4], bits, 4),
              kv.quantize_per_token(x, 8, 32, symmetric=True)):
        out = kv.dequantize(q, torch.float32)
        assert torch.isfinite(out).all()
        expected = x if out.shape == x.shape else x[:, :, :4]
        torch.testing.assert_close(out, expected, rtol=2.0**-20, atol=0)


def test_non_finite_group_becomes_nan(device):
    x = gaussian((1, 1, 3, 64), torch.float32, device, seed=9)
    x[0, 0, 0, 5] = float("nan")
    x[0, 0, 1, 40] = float("inf")
    for q in (kv.quantize_per_token(x, 4, 32), kv.quantize_per_token(x, 8, 32, symmetric=True)):
        out = kv.dequantize(q, torch.float32)
        group_bytes = 32 * q.bits // 8
        assert (q.codes[0, 0, 0, :group_bytes] == 0).all() and (q.codes[0, 0, 1, group_bytes:] == 0).all()
        assert torch.isnan(out[0, 0, 0, :32]).all() and torch.isnan(out[0, 0, 1, 32:]).all()
        clean = torch.ones_like(out, dtype=torch.bool)
        clean[0, 0, 0, :32] = False
        clean[0, 0, 1, 32:] = False
        assert torch.isfinite(out[clean]).all()
        assert ((out - x)[clean].abs() < 0.5).all()


def test_strided_inputs(device):
    """Non-contiguous inputs (a [B, T, H, D] cache viewed as [B, H, T, D], a channel slice) quantize
    exactly like their contiguous copies."""
    base = gaussian((2, 9, 4, 64), torch.float16, device, seed=21)
    views = [base.transpose(1, 2), gaussian((2, 4, 9, 128), torch.float16, device)[..., ::2],
             gaussian((2, 4, 9, 72), torch.float16, device)[..., 4:68]]
    for x in views:
        assert not x.is_contiguous()
        for quant in (lambda t: kv.quantize_per_token(t, 4, 32), lambda t: kv.quantize_per_token(t, 8, 64, True),
                      lambda t: kv.quantize_fp8(t, torch.tensor(0.01, device=device))):
            a, b = quant(x), quant(x.contiguous())
            assert torch.equal(a.codes, b.codes) and torch.equal(a.params, b.params)
        a, b = kv.quantize_per_channel(x[:, :, :8], 2, 4), kv.quantize_per_channel(x[:, :, :8].contiguous(), 2, 4)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.params, b.params)


def test_empty(device):
    x = torch.empty((2, 4, 0, 64), device=device)
    q = kv.quantize_per_token(x, 4, 32)
    assert q.codes.shape == (2, 4, 0, 32) and kv.dequantize(q).shape == (2, 4, 0, 64)
    q = kv.quantize_per_channel(x, 4, 32)
    assert q.params.shape == (2, 4, 0, 64, 2) and kv.dequantize(q).shape == (2, 4, 0, 64)
    assert kv.dequantize(kv.quantize_fp8(x, torch.tensor(1.0, device=device))).shape == (2, 4, 0, 64)


@pytest.mark.parametrize("call,message", [
    (lambda x: torch.ops.trous.kv_quantize(x, 3, 32, False, torch.float16), r"bits must be 2, 4 or 8, got 3"),
    (lambda x: torch.ops.trous.kv_quantize(x, 4, 48, False, torch.float16), r"group_size 48 must divide D = x.size\(3\) = 64"),
    (lambda x: torch.ops.trous.kv_quantize(x, 4, 12, False, torch.float16), r"group_size must be a positive multiple of 8, got 12"),
    (lambda x: torch.ops.trous.kv_quantize(x, 4, 32, True, torch.float16), r"symmetric quantization is int8 only, got bits = 4"),
    (lambda x: torch.ops.trous.kv_quantize(x, 8, 32, False, torch.bfloat16), r"param_dtype must be float32 or float16, got BFloat16"),
    (lambda x: torch.ops.trous.kv_quantize(x[..., :60], 8, 20, False, torch.float16), r"D = x.size\(3\) must be a positive multiple of 8, got 60"),
    (lambda x: torch.ops.trous.kv_quantize(x[0], 8, 32, False, torch.float16), r"x must have shape \[B, H, T, D\], got 3 dimensions"),
    (lambda x: torch.ops.trous.kv_quantize(x.int(), 8, 32, False, torch.float16), r"x must be float32, float16 or bfloat16, got Int"),
    (lambda x: torch.ops.trous.kv_quantize_fp8(x, torch.ones(3), "e4m3"), r"scale must have shape \[\] or \[1\] \(per tensor\) or \[H\] = \[2\]"),
    (lambda x: torch.ops.trous.kv_quantize_fp8(x, torch.ones(()), "e3m4"), r"format must be \"e4m3\" or \"e5m2\", got \"e3m4\""),
    (lambda x: torch.ops.trous.kv_quantize_fp8(x, torch.ones((), dtype=torch.float64), "e4m3"), r"scale must be float32, got Double"),
    (lambda x: torch.ops.trous.kv_dequantize(torch.zeros(1, 2, 3, 32, dtype=torch.uint8), torch.zeros(1, 2, 3, 1, 2), 4, 32, False, torch.float32),
     r"params must have shape \[1, 2, 3, 2, 2\], got \[1, 2, 3, 1, 2\]"),
    (lambda x: torch.ops.trous.kv_dequantize(torch.zeros(1, 2, 3, 32, dtype=torch.int8), torch.zeros(1, 2, 3, 2, 2), 4, 32, False, torch.float32),
     r"codes must be Byte, got Char"),
    (lambda x: torch.ops.trous.kv_dequantize(torch.zeros(1, 2, 3, 32, dtype=torch.uint8), torch.zeros(1, 2, 3, 2, 2), 4, 32, False, torch.int32),
     r"dtype must be float32, float16 or bfloat16, got Int"),
    (lambda x: torch.ops.trous.kv_dequantize(torch.zeros(1, 2, 3, 32, dtype=torch.uint8), torch.zeros(1, 2, 3, 2, 2, dtype=torch.bfloat16), 4, 32, False, torch.float32),
     r"params must be float32 or float16, got BFloat16"),
    (lambda x: torch.ops.trous.kv_dequantize_channel(torch.zeros(1, 2, 30, 32, dtype=torch.uint8), torch.zeros(1, 2, 1, 64, 2), 4, 32, torch.float32),
     r"T = codes.size\(2\) = 30 must be a multiple of group_size 32"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    x = gaussian((1, 2, 3, 64), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=message):
        call(x)


def _samples(device):
    x16 = gaussian((2, 3, 8, 64), torch.float16, device, seed=1)
    x32 = gaussian((1, 2, 32, 80), torch.float32, device, seed=2).transpose(1, 2).contiguous().transpose(1, 2)
    codes, params = torch.ops.trous.kv_quantize(x16, 4, 32, False, torch.float16)
    ccodes, cparams = torch.ops.trous.kv_quantize_channel(x32[:, :, :16], 2, 16, torch.float32)
    scale = torch.tensor([0.01, 0.02, 0.03], device=device)
    fp8 = torch.ops.trous.kv_quantize_fp8(x16, scale, "e5m2")
    return [
        (torch.ops.trous.kv_quantize.default, (x16, 4, 32, False, torch.float16)),
        (torch.ops.trous.kv_quantize.default, (x32, 8, 80, True, torch.float32)),
        (torch.ops.trous.kv_quantize.default, (x32, 2, 16, False, torch.float32)),
        (torch.ops.trous.kv_quantize.default, (x16, 8, 16, True, torch.float16)),
        (torch.ops.trous.kv_dequantize.default, (codes, params, 4, 32, False, torch.bfloat16)),
        (torch.ops.trous.kv_quantize_channel.default, (x32[:, :, :16], 2, 16, torch.float32)),
        (torch.ops.trous.kv_dequantize_channel.default, (ccodes, cparams, 2, 16, torch.float16)),
        (torch.ops.trous.kv_quantize_fp8.default, (x16, scale, "e5m2")),
        (torch.ops.trous.kv_dequantize_fp8.default, (fp8, scale, "e5m2", torch.float32)),
    ]


def test_opcheck(device):
    for op, args in _samples(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    def roundtrip(x):
        q = kv.quantize_per_token(x, 4, 32)
        k = kv.quantize_per_channel(x, 2, 8)
        f = kv.quantize_fp8(x, torch.tensor(0.05, device=x.device), "e4m3")
        return kv.dequantize(q, torch.float32) + kv.dequantize(k, torch.float32) + kv.dequantize(f, torch.float32)

    x = gaussian((1, 2, 16, 64), torch.float16, device, seed=4)
    compiled = torch.compile(roundtrip, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), roundtrip(x), rtol=0, atol=0)
    y = gaussian((2, 3, 24, 96), torch.float16, device, seed=5)  # other sizes: the same symbolic graph
    torch.testing.assert_close(compiled(y), roundtrip(y), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CPU and GPU codes bit-identical")
def test_cpu_and_gpu_codes_bit_identical():
    x = gaussian((2, 4, 65, 128), torch.bfloat16, "cpu", seed=8, scale=2.0)
    for quant in (lambda t: kv.quantize_per_token(t, 2, 32), lambda t: kv.quantize_per_token(t, 4, 128),
                  lambda t: kv.quantize_per_token(t, 8, 64, True), lambda t: kv.quantize_per_channel(t[:, :, :64], 4, 32),
                  lambda t: kv.quantize_fp8(t, fmt="e5m2", per_head=True)):
        a, b = quant(x), quant(x.cuda())
        assert torch.equal(a.codes, b.codes.cpu()) and torch.equal(a.params, b.params.cpu())
