"""Issue 9 (reliability) for the KV-cache ops: one validation for the real and the fake kernel,
parameters that cannot overflow or underflow, the fp8 dynamic scale under non-finite input, the
dtype dequantize() returns, refused gradients, the scalar (TROUS_CPU_SIMD=0) paths, edge semantics.
"""
import math

import pytest
import torch
from props import assert_refused, mixed_devices, run_isolated

from trous import kvcache as kv
from trous.kvcache import reference as ref

ops = torch.ops.trous
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


def _x(shape=(1, 2, 4, 64), dtype=torch.float32):
    return randn(shape, dtype, seed=1)


def _token_codes(bits=4, G=32, symmetric=False):
    codes, params = ops.kv_quantize(_x(), bits, G, symmetric, torch.float32)
    return codes, params


# ---------------------------------------------------------------- one validation: CPU and meta alike
# (op, args, names the message must contain one of). Every refusal must be identical on meta tensors.
def _bad_cases():
    x = _x()
    c4, p4 = _token_codes(4, 32)
    c8s, p8s = _token_codes(8, 32, True)
    cc, cp = ops.kv_quantize_channel(x, 2, 4, torch.float32)
    s1 = torch.tensor(0.1)
    f8 = ops.kv_quantize_fp8(x, s1, "e4m3")
    return [
        # kv_quantize
        ("bits=3", ops.kv_quantize, (x, 3, 32, False, torch.float32), ["bits"]),
        ("D=12", ops.kv_quantize, (_x((1, 2, 4, 12)), 8, 12, False, torch.float32), ["D"]),
        ("D=0", ops.kv_quantize, (_x((1, 2, 4, 0)), 8, 0, False, torch.float32), ["D"]),
        ("group 12", ops.kv_quantize, (x, 8, 12, False, torch.float32), ["group_size"]),
        ("group 48", ops.kv_quantize, (x, 8, 48, False, torch.float32), ["group_size"]),
        ("group 0", ops.kv_quantize, (x, 8, 0, False, torch.float32), ["group_size"]),
        ("group -8", ops.kv_quantize, (x, 8, -8, False, torch.float32), ["group_size"]),
        ("sym bits 4", ops.kv_quantize, (x, 4, 32, True, torch.float32), ["bits"]),
        ("3-D x", ops.kv_quantize, (x[0], 8, 32, False, torch.float32), ["x"]),
        ("int x", ops.kv_quantize, (x.int(), 8, 32, False, torch.float32), ["x"]),
        ("bf16 params", ops.kv_quantize, (x, 8, 32, False, torch.bfloat16), ["param_dtype"]),
        ("fp16 params fp32 x", ops.kv_quantize, (x, 8, 32, False, torch.float16), ["param_dtype"]),
        ("fp16 params bf16 x", ops.kv_quantize, (x.bfloat16(), 8, 32, False, torch.float16), ["param_dtype"]),
        # kv_dequantize
        ("deq bits=3", ops.kv_dequantize, (c4, p4, 3, 32, False, torch.float32), ["bits"]),
        ("deq params shape", ops.kv_dequantize, (c4, p4[..., :1, :], 4, 32, False, torch.float32), ["params"]),
        ("deq params 4-D", ops.kv_dequantize, (c4, p4[..., 0], 4, 32, False, torch.float32), ["params"]),
        ("deq codes dtype", ops.kv_dequantize, (c4.char(), p4, 4, 32, False, torch.float32), ["codes"]),
        ("deq sym codes dtype", ops.kv_dequantize, (c8s.byte(), p8s, 8, 32, True, torch.float32), ["codes"]),
        ("deq group", ops.kv_dequantize, (c4, p4, 4, 24, False, torch.float32), ["group_size"]),
        ("deq D=12", ops.kv_dequantize, (c4[..., :6].contiguous(), p4, 4, 12, False, torch.float32), ["D"]),
        ("deq out dtype", ops.kv_dequantize, (c4, p4, 4, 32, False, torch.int32), ["dtype"]),
        ("deq bf16 params", ops.kv_dequantize, (c4, p4.bfloat16(), 4, 32, False, torch.float32), ["params"]),
        ("deq codes 3-D", ops.kv_dequantize, (c4[0], p4, 4, 32, False, torch.float32), ["codes"]),
        ("deq codes strided", ops.kv_dequantize, (c4.transpose(1, 2), p4, 4, 32, False, torch.float32), ["codes"]),
        # kv_quantize_channel
        ("ch bits=3", ops.kv_quantize_channel, (x, 3, 4, torch.float32), ["bits"]),
        ("ch T%G", ops.kv_quantize_channel, (x, 2, 3, torch.float32), ["T", "group_size"]),
        ("ch group 0", ops.kv_quantize_channel, (x, 2, 0, torch.float32), ["group_size"]),
        ("ch D=12", ops.kv_quantize_channel, (_x((1, 2, 4, 12)), 2, 4, torch.float32), ["D"]),
        ("ch fp16 params", ops.kv_quantize_channel, (x, 2, 4, torch.float16), ["param_dtype"]),
        ("ch 5-D x", ops.kv_quantize_channel, (x[None], 2, 4, torch.float32), ["x"]),
        # kv_dequantize_channel
        ("dch params shape", ops.kv_dequantize_channel, (cc, cp[:, :, :, :8], 2, 4, torch.float32), ["params"]),
        ("dch T%G", ops.kv_dequantize_channel, (cc, cp, 2, 3, torch.float32), ["T", "group_size"]),
        ("dch bits", ops.kv_dequantize_channel, (cc, cp, 5, 4, torch.float32), ["bits"]),
        ("dch dtype", ops.kv_dequantize_channel, (cc, cp, 2, 4, torch.int64), ["dtype"]),
        # fp8
        ("fp8 bogus", ops.kv_quantize_fp8, (x, s1, "bogus"), ["format"]),
        ("fp8 scale shape", ops.kv_quantize_fp8, (x, torch.ones(3), "e4m3"), ["scale"]),
        ("fp8 scale 2-D", ops.kv_quantize_fp8, (x, torch.ones(1, 1), "e4m3"), ["scale"]),
        ("fp8 scale dtype", ops.kv_quantize_fp8, (x, s1.double(), "e4m3"), ["scale"]),
        ("fp8 D=12", ops.kv_quantize_fp8, (_x((1, 2, 4, 12)), s1, "e4m3"), ["D"]),
        ("fp8 3-D", ops.kv_quantize_fp8, (x[0], s1, "e4m3"), ["x"]),
        ("dfp8 bogus", ops.kv_dequantize_fp8, (f8, s1, "bogus", torch.float32), ["format"]),
        ("dfp8 codes dtype", ops.kv_dequantize_fp8, (f8.char(), s1, "e4m3", torch.float32), ["codes"]),
        ("dfp8 scale shape", ops.kv_dequantize_fp8, (f8, torch.ones(5), "e4m3", torch.float32), ["scale"]),
        ("dfp8 D", ops.kv_dequantize_fp8, (f8[..., :12].contiguous(), s1, "e4m3", torch.float32), ["D", "codes"]),
        ("dfp8 dtype", ops.kv_dequantize_fp8, (f8, s1, "e4m3", torch.uint8), ["dtype"]),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_refused_alike_on_cpu_and_meta(case):
    _, op, args, names = case
    msg = assert_refused(op, args, names=names)
    assert msg.startswith("trous.kv_"), msg


def test_d0_with_default_group_size_talks_about_x():
    """group_size defaults to D: with D = 0 the error is about x / D, not the group size."""
    for fn in (lambda t: kv.quantize_per_token(t), lambda t: kv.quantize_per_token(t, 8, symmetric=True)):
        with pytest.raises(RuntimeError) as e:
            fn(torch.zeros(1, 2, 3, 0))
        assert "D = x.size(3) must be a positive multiple of 8, got 0" in str(e.value)
        assert "group_size" not in str(e.value)


# Every op with two tensor arguments: the stray meta one is named.
def _two_tensor_cases():
    c4, p4 = _token_codes(4, 32)
    cc, cp = ops.kv_quantize_channel(_x(), 2, 4, torch.float32)
    s1 = torch.tensor(0.1)
    f8 = ops.kv_quantize_fp8(_x(), s1, "e4m3")
    return [
        (ops.kv_dequantize, [c4, p4, 4, 32, False, torch.float32], ("codes", "params")),
        (ops.kv_dequantize_channel, [cc, cp, 2, 4, torch.float32], ("codes", "params")),
        (ops.kv_quantize_fp8, [_x(), s1, "e4m3"], ("x", "scale")),
        (ops.kv_dequantize_fp8, [f8, s1, "e4m3", torch.float32], ("codes", "scale")),
    ]


@pytest.mark.parametrize("i", range(4))
def test_mixed_devices_name_the_stray_argument(i):
    op, args, (first, second) = _two_tensor_cases()[i]
    with pytest.raises(RuntimeError, match=rf"{second} must be on the device of {first} \(cpu\), got meta"):
        op(*mixed_devices(args, [1]))
    with pytest.raises(RuntimeError, match=rf"{second} must be on the device of {first} \(meta\), got cpu"):
        op(*mixed_devices(args, [0]))


# ---------------------------------------------------------------- no autograd: refuse, never drop
def _grad_cases():
    x = _x()
    c4, p4 = _token_codes(4, 32)
    cc, cp = ops.kv_quantize_channel(x, 2, 4, torch.float32)
    s1 = torch.tensor(0.1)
    f8 = ops.kv_quantize_fp8(x, s1, "e4m3")
    return [
        (ops.kv_quantize, [x, 4, 32, False, torch.float32], 0, "x"),
        (ops.kv_dequantize, [c4, p4, 4, 32, False, torch.float32], 1, "params"),
        (ops.kv_quantize_channel, [x, 2, 4, torch.float32], 0, "x"),
        (ops.kv_dequantize_channel, [cc, cp, 2, 4, torch.float32], 1, "params"),
        (ops.kv_quantize_fp8, [x, s1, "e4m3"], 0, "x"),
        (ops.kv_quantize_fp8, [x, s1, "e4m3"], 1, "scale"),
        (ops.kv_dequantize_fp8, [f8, s1, "e4m3", torch.float32], 1, "scale"),
    ]


@pytest.mark.parametrize("i", range(7))
def test_inputs_that_require_grad_are_refused(i):
    op, args, k, name = _grad_cases()[i]
    args = list(args)
    args[k] = args[k].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"{name} requires grad, but this op has no derivative"):
        op(*args)
    with torch.no_grad():  # without grad mode the op runs
        op(*args)


def test_dequantize_with_params_requiring_grad_no_longer_drops_the_gradient():
    q = kv.quantize_per_token(_x(), 4, 32)
    with pytest.raises(RuntimeError, match="params requires grad"):
        kv.dequantize(q._replace(params=q.params.clone().requires_grad_()))


# ---------------------------------------------------------------- defaults
def test_default_param_dtype_per_input_dtype():
    for dtype, want in [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32)]:
        x = _x(dtype=dtype)
        assert kv.quantize_per_token(x, 4, 32).params.dtype == want
        assert kv.quantize_per_token(x, 8, 32, symmetric=True).params.dtype == want
        assert kv.quantize_per_channel(x, 2, 4).params.dtype == want


def test_other_defaults():
    x = _x()
    q = kv.quantize_per_token(x)
    assert (q.bits, q.group_size, q.scheme, q.dtype) == (8, 64, "token", torch.float32)
    assert q.params.shape == (1, 2, 4, 1, 2)
    k = kv.quantize_per_channel(randn((1, 2, 32, 64)))
    assert (k.bits, k.group_size, k.scheme) == (2, 32, "channel")
    f = kv.quantize_fp8(x)
    assert (f.format, f.params.shape, f.params.dtype) == ("e4m3", (), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_returns_the_quantized_dtype(dtype):
    x = randn((1, 2, 32, 64), dtype, seed=3)
    for q in (kv.quantize_per_token(x, 4, 32), kv.quantize_per_token(x, 8, 32, symmetric=True),
              kv.quantize_per_channel(x, 4, 8), kv.quantize_fp8(x)):
        assert q.dtype == dtype
        assert kv.dequantize(q).dtype == dtype
        assert kv.dequantize(q, torch.float32).dtype == torch.float32


def test_fp32_value_1e5_comes_back_finite_without_a_dtype():
    x = randn((1, 1, 8, 64), seed=4) * 3e4 + 1e5
    step = (x.max() - x.min()).item() / 255
    for q in (kv.quantize_per_token(x, 8, 64), kv.quantize_per_channel(x, 8, 8), kv.quantize_fp8(x)):
        out = kv.dequantize(q)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        err = (out - x).abs()
        assert (err <= (2.0**-4 * x.abs() if q.scheme == "fp8" else torch.full_like(x, step))).all(), q.scheme


def test_positional_quantizedkv_without_dtype_still_works():
    q = kv.quantize_per_token(_x(), 4, 32)
    old = kv.QuantizedKV(q.codes, q.params, q.scheme, q.bits, q.group_size)
    assert old.dtype is None and old.format == ""
    assert torch.equal(kv.dequantize(old), kv.dequantize(q))  # float32, as q's dtype here
    assert kv.dequantize(old).dtype == torch.float32


# ---------------------------------------------------------------- parameters cannot overflow
def _quantizers(x):
    """Every integer scheme with its default parameters."""
    return [kv.quantize_per_token(x, b, 32) for b in (2, 4, 8)] + [
        kv.quantize_per_token(x, 8, 32, symmetric=True)] + [kv.quantize_per_channel(x, b, 8) for b in (2, 4, 8)]


def test_bf16_beyond_fp16_range_reconstructs():
    x = randn((1, 2, 16, 64), torch.bfloat16, seed=6, scale=1e30, shift=2e30)
    for q in _quantizers(x):
        out = kv.dequantize(q, torch.float32)
        assert torch.isfinite(out).all(), q.scheme
        s = q.params[..., 0].float().max()
        assert ((out - x.float()).abs() <= s).all()


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.bfloat16, 3.38e38), (torch.float16, 65504.0)])
def test_group_spanning_the_whole_dtype_range_reconstructs_finitely(dtype, big):
    x = randn((1, 1, 8, 64), seed=7).clamp(-1, 1) * big
    x[..., 0], x[..., 1] = big, -big  # every group (also the KIVI channel groups) spans [-big, big]
    x[:, :, 0, :], x[:, :, 1, :] = big, -big
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    for q in _quantizers(x):
        out = kv.dequantize(q)  # the input dtype
        assert out.dtype == dtype and torch.isfinite(out).all(), (q.scheme, q.bits)
        p = q.params.float()
        assert torch.isfinite(p).all() and (p[..., 0] > 0).all()
        codes, params = (ref.quantize_per_channel(x, q.bits, 8, q.params.dtype) if q.scheme == "channel" else
                         ref.quantize_per_token(x, q.bits, 32, q.scheme == "symmetric", q.params.dtype))
        torch.testing.assert_close(q.params, params, rtol=0, atol=0)
        # the extremes come back within a step (the top code may sit one parameter ulp below max)
        s = p[..., 0].max().item()
        err = (out.float() - x.float()).abs().max().item()
        assert err <= s * (0.5 if q.scheme != "symmetric" else 1.0) + 2.0**-7 * big, (q.scheme, q.bits, err, s)


def test_fp16_symmetric_top_code_would_overflow_without_the_step_down():
    """amax 65504 with fp16 params: amax / 127 rounds up to 516 and 127 * 516 = 65532 is inf in
    fp16; the scale steps down one ulp (515.5) so the reconstruction is 65468.5 (finite)."""
    x = torch.full((1, 1, 1, 32), 65504.0, dtype=torch.float16)
    q = kv.quantize_per_token(x, 8, 32, symmetric=True)
    assert q.params.flatten().tolist() == [515.5]
    assert q.codes.flatten().tolist() == [127] * 32
    assert kv.dequantize(q).flatten().tolist() == [65472.0] * 32  # 65468.5 in fp16


def test_tiny_groups_keep_a_positive_scale():
    # fp32 subnormal inputs (~1e-40): the scale floors at 2^-126 (so 1/scale stays finite).
    x = randn((1, 1, 8, 64), seed=8) * 1e-40 + 2e-40
    for q in _quantizers(x):
        p = q.params.float()
        assert (p[..., 0] >= 2.0**-126).all() and torch.isfinite(p).all()
        out = kv.dequantize(q)
        assert torch.isfinite(out).all() and ((out - x).abs() <= p[..., 0].max()).all()
    # fp16 parameters for values around 1e-6: the scale is a fp16 subnormal, never 0.
    x = (randn((1, 1, 8, 64), seed=9) * 1e-6 + 1e-6).half()
    for q in _quantizers(x):
        p = q.params.float()
        assert q.params.dtype == torch.float16 and (p[..., 0] >= 2.0**-24).all()
        out = kv.dequantize(q, torch.float32)
        assert ((out - x.float()).abs() <= p[..., 0].max() * 0.5 + 2.0**-25).all()
        assert (out != out[..., :1]).any()  # not collapsed onto one value


def test_symmetric_int8_subnormal_fp16_scale():
    """amax = 178 * 2^-24 (fp16 subnormal): amax / 127 = 1.4 * 2^-24. Rounded to nearest it would be
    2^-24, amax / scale = 178 and the clamp to [-127, 127] would cut the top by a third of the
    range; fp16 scales round up (2^-23), so the codes are +-89 and every error is within s / 2."""
    x = torch.zeros(1, 1, 1, 32)
    x[..., 0] = 178 * 2.0**-24
    x[..., 1] = -178 * 2.0**-24
    x[..., 2:] = randn((30,), seed=10).clamp(-1, 1) * 100 * 2.0**-24
    x = x.half()
    q = kv.quantize_per_token(x, 8, 32, symmetric=True)
    assert q.params.dtype == torch.float16 and q.params.float().item() == 2.0**-23
    assert q.codes[..., 0].item() == 89 and q.codes[..., 1].item() == -89
    codes, params = ref.quantize_per_token(x, 8, 32, True, torch.float16)
    assert torch.equal(q.codes, codes) and torch.equal(q.params, params)
    assert q.codes.min() >= -127 and q.codes.max() <= 127
    out = kv.dequantize(q, torch.float32)
    assert ((out - x.float()).abs() <= 2.0**-24).all()


def test_fp16_asymmetric_subnormal_scale_rounds_up():
    """range = 1.31 * 255 * 2^-24: the fp16 scale is 2 * 2^-24 (rounded up, not down to 2^-24), so
    the top of the group is not clamped and every element is within half a step."""
    x = torch.linspace(0, 1.31 * 255 * 2.0**-24, 32).reshape(1, 1, 1, 32).half()
    x = x + 2.0**-10  # offset: the minimum is stored exactly
    q = kv.quantize_per_token(x, 8, 32)
    assert q.params[..., 0].float().item() == 2.0**-23
    out = kv.dequantize(q, torch.float32)
    assert ((out - x.float()).abs() <= 2.0**-24 + 2.0**-30).all()


# ---------------------------------------------------------------- constant groups (README claim)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups(dtype):
    """Asymmetric (per token and KIVI) constant groups reconstruct exactly (the minimum is stored
    exactly in the default parameter dtype and the code is 0); symmetric int8 reconstructs
    127 * round(c / 127): within 2^-11 |c| (fp16 params) / 2^-23 |c| (fp32), not always exactly."""
    x = torch.full((1, 2, 8, 64), 0.3)
    x[0, 1] = -7.25
    x[0, 0, 2, 32:] = 0.0
    x[0, 0, 3, :32] = 1e-30
    x = x.to(dtype)
    for q in (kv.quantize_per_token(x, 2, 32), kv.quantize_per_token(x, 4, 32), kv.quantize_per_token(x, 8, 32),
              kv.quantize_per_channel(x[:, :, :4], 4, 4)):
        want = x if q.scheme == "token" else x[:, :, :4]
        assert torch.equal(kv.dequantize(q), want), q.scheme
    q = kv.quantize_per_token(x, 8, 32, symmetric=True)
    out = kv.dequantize(q, torch.float32)
    rel = 2.0**-11 if q.params.dtype == torch.float16 else 2.0**-23
    assert ((out - x.float()).abs() <= rel * x.float().abs()).all()
    if dtype == torch.float16:
        assert not torch.equal(out, x.float())  # 0.3 in fp16 does not come back exactly


# ---------------------------------------------------------------- non-finite input
def test_kivi_non_finite_at_the_first_token_of_a_group():
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = randn((1, 2, 16, 64), seed=11)
        x[0, 1, 8, 5] = bad  # first token of the second token group, channel 5
        x[0, 0, 0, 63] = bad  # first token of the first group, last channel
        for bits in (2, 4, 8):
            q = kv.quantize_per_channel(x, bits, 8)
            p = q.params
            assert torch.isnan(p[0, 1, 1, 5]).all() and torch.isnan(p[0, 0, 0, 63]).all()
            assert torch.isfinite(p).sum() == p.numel() - 4
            out = kv.dequantize(q)
            poisoned = torch.zeros_like(out, dtype=torch.bool)
            poisoned[0, 1, 8:16, 5] = True
            poisoned[0, 0, 0:8, 63] = True
            assert torch.isnan(out[poisoned]).all()
            assert torch.isfinite(out[~poisoned]).all()
            codes, params = ref.quantize_per_channel(x, bits, 8, torch.float32)
            assert torch.equal(q.codes, codes)
            torch.testing.assert_close(q.params, params, rtol=0, atol=0, equal_nan=True)


def test_fp8_dynamic_scale_ignores_nan_and_inf():
    x = randn((1, 2, 4, 64), seed=12)
    x[0, 0, 0, 0] = 1000.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[0, 0, 1, 3] = bad
        for per_head in (False, True):
            q = kv.quantize_fp8(y, per_head=per_head)
            s = q.params if not per_head else q.params[0]
            assert s.item() == pytest.approx(1000.0 / 448)
            out = kv.dequantize(q)
            assert out[0, 0, 0, 0].item() == pytest.approx(1000.0, rel=2**-4)
            if math.isnan(bad):
                assert math.isnan(out[0, 0, 1, 3].item())
            else:  # +-Inf saturates to +-max * scale
                assert out[0, 0, 1, 3].item() == math.copysign((448 * s).item(), bad)
            finite = torch.ones_like(out, dtype=torch.bool)
            finite[0, 0, 1, 3] = False
            assert torch.isfinite(out[finite]).all()


def test_fp8_all_non_finite_or_zero_gives_scale_one():
    x = torch.full((1, 2, 1, 8), float("nan"))
    x[0, 1] = 0.0
    assert kv.fp8_scale(x).item() == 1.0
    assert kv.fp8_scale(x, per_head=True).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_fp8_invalid_explicit_scale_is_refused_on_cpu(bad):
    x = _x()
    with pytest.raises(ValueError, match=r"trous.kv_quantize_fp8: scale must be finite and positive, got scale\[0\]"):
        kv.quantize_fp8(x, torch.tensor(bad))
    per_head = torch.tensor([0.1, bad])
    with pytest.raises(ValueError, match=r"scale must be finite and positive, got scale\[1\]"):
        kv.quantize_fp8(x, per_head)
    codes = ops.kv_quantize_fp8(x, torch.tensor(0.1), "e5m2")
    with pytest.raises(ValueError, match=r"trous.kv_dequantize_fp8: scale must be finite and positive"):
        ops.kv_dequantize_fp8(codes, per_head, "e5m2", torch.float32)


def test_fp8_empty_and_3d_inputs():
    for shape in [(0, 2, 4, 64), (1, 2, 0, 64), (1, 0, 4, 64)]:
        x = torch.empty(shape)
        for per_head in (False, True):
            q = kv.quantize_fp8(x, per_head=per_head)
            assert q.params.shape == ((shape[1],) if per_head else ())
            assert (q.params == 1).all()
            assert kv.dequantize(q).shape == shape
    with pytest.raises(ValueError, match=r"trous.kv_quantize_fp8: x must have shape \[B, H, T, D\], got 3"):
        kv.quantize_fp8(torch.ones(2, 4, 64))
    with pytest.raises(ValueError, match=r"x must have shape \[B, H, T, D\], got 3"):
        kv.fp8_scale(torch.ones(2, 4, 64), per_head=True)


def test_empty_integer_schemes():
    for shape in [(0, 2, 4, 64), (1, 0, 8, 64), (1, 2, 0, 64)]:
        x = torch.empty(shape)
        for q in (kv.quantize_per_token(x, 4, 32), kv.quantize_per_token(x, 8, 64, True),
                  kv.quantize_per_channel(x, 2, 4)):
            assert kv.dequantize(q).shape == shape


# ---------------------------------------------------------------- the scalar twins (TROUS_CPU_SIMD=0)
_SIMD_CODE = r"""
import hashlib, os
os.environ["TROUS_CPU_SIMD"] = "{simd}"
import torch
from trous import kvcache as kv
g = torch.Generator().manual_seed(5)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn((2, 3, 16, 64), generator=g) * 3).to(dtype)
    x[0, 0, 0, 1] = float("nan"); x[0, 1, 8, 2] = float("inf"); x[1, 2, 0, 7] = -float("inf")
    x[1, 0, :8, 9] = 0.5  # a constant channel group
    x[1, 1, 3, 16:32] = 1e-7  # a tiny group
    x[0, 2, 5, 32:64] *= 1000; x[0, 2, 5, 40] = -3e4  # a wide group: codes at both ends of the range
    for q in (kv.quantize_per_token(x, 2, 32), kv.quantize_per_token(x, 4, 64), kv.quantize_per_token(x, 8, 32),
              kv.quantize_per_token(x, 8, 16, symmetric=True), kv.quantize_per_token(x, 8, 64, symmetric=True),
              kv.quantize_per_channel(x, 2, 8),
              kv.quantize_per_channel(x, 4, 8), kv.quantize_per_channel(x, 8, 16), kv.quantize_fp8(x, fmt="e4m3"),
              kv.quantize_fp8(x, fmt="e5m2", per_head=True)):
        for t in (q.codes, q.params, kv.dequantize(q), kv.dequantize(q, torch.float32)):
            raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            print(q.scheme, q.bits, dtype, hashlib.sha256(raw).hexdigest())
"""


def test_scalar_paths_are_bit_identical_to_simd():
    """TROUS_CPU_SIMD=0 (read once per process) forces the scalar twins: codes, parameters and
    values bit-identical to the AVX2 path, NaN / Inf groups included (the scalar KIVI path used to
    convert NaN to an integer: undefined behaviour)."""
    outs = []
    for simd in ("1", "0"):
        res = run_isolated(_SIMD_CODE.replace("{simd}", simd), timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(res.stdout.splitlines())
    assert len(outs[0]) == 3 * 10 * 4
    for a, b in zip(*outs):
        assert a == b
