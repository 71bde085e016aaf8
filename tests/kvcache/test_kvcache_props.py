"""Property-based tests of the KV-cache ops (tests/props.py): (1) valid inputs (any shape incl. empty
dims and 1s, any layout, every dtype, bits / group sizes / symmetric / fp8 formats, non-finite values)
match trous.kvcache.reference with NaN positions equal; (2) invalid inputs raise naming an argument,
on CPU and on meta alike, and a stray meta tensor is named; (3) nothing crashes (a subprocess runs a
batch of edge calls).

Layouts: every layout of tests/props.py is accepted for x (quantize reads only; "expanded" and
"overlapping" are stride-0 views where x is constant along that dimension). Codes and parameters
must be contiguous (the dequantize ops refuse others).
"""
import pytest
import torch
from props import (
    assert_refused,
    assert_same_nan_and_close,
    given,
    layouts,
    nonfinite,
    run_isolated,
    sizes,
    st,
    with_layout,
)

from trous import kvcache as kv
from trous.kvcache import reference as ref

pytestmark = pytest.mark.props
ops = torch.ops.trous
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAGNITUDES = (1e-30, 1e-6, 1.0, 1e4, 1e30)  # clipped to what the dtype holds


def _values(draw, shape, dtype):
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from(MAGNITUDES))
    if dtype == torch.float16:
        mag = min(max(mag, 1e-3), 1e4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * mag + torch.randn((), generator=g) * mag
    x = x.to(dtype)
    if draw(st.booleans()):
        x = nonfinite(draw, x, p=draw(st.sampled_from([0.01, 0.1])))
    return x


@st.composite
def kv_inputs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B, H = draw(sizes(0, 3)), draw(sizes(0, 3))
    D = draw(st.sampled_from([8, 16, 24, 40, 64]))
    scheme = draw(st.sampled_from(["token", "symmetric", "channel", "fp8"]))
    if scheme == "channel":
        G = draw(st.sampled_from([1, 2, 3, 4]))
        T = G * draw(sizes(0, 3))
    else:
        T = draw(sizes(0, 7))
        G = draw(st.sampled_from([g for g in range(8, D + 1, 8) if D % g == 0]))
    bits = 8 if scheme in ("symmetric", "fp8") else draw(st.sampled_from([2, 4, 8]))
    fmt = draw(st.sampled_from(["e4m3", "e5m2"]))
    per_head = draw(st.booleans())
    x = _values(draw, (B, H, T, D), dtype)
    x = with_layout(x, draw(layouts()))
    return dict(x=x, scheme=scheme, bits=bits, G=G, fmt=fmt, per_head=per_head)


def _quantize(c):
    x = c["x"]
    if c["scheme"] == "token":
        return kv.quantize_per_token(x, c["bits"], c["G"])
    if c["scheme"] == "symmetric":
        return kv.quantize_per_token(x, 8, c["G"], symmetric=True)
    if c["scheme"] == "channel":
        return kv.quantize_per_channel(x, c["bits"], c["G"])
    return kv.quantize_fp8(x, fmt=c["fmt"], per_head=c["per_head"])


def _finite_amax(x, per_head):
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    if per_head:
        return torch.tensor([a[:, h].max().item() if a[:, h].numel() else 0.0 for h in range(x.shape[1])])
    return a.max() if a.numel() else torch.tensor(0.0)


@given(kv_inputs())
def test_valid_inputs_match_the_reference(c):
    x = c["x"]
    q = _quantize(c)
    assert q.dtype == x.dtype
    out = kv.dequantize(q)
    assert out.dtype == x.dtype and out.shape == x.shape
    xc = x.contiguous()
    if c["scheme"] == "fp8":
        amax = _finite_amax(xc, c["per_head"]) / kv.FP8_MAX[c["fmt"]]
        torch.testing.assert_close(q.params, torch.where(amax > 0, amax, torch.ones_like(amax)), rtol=0, atol=0)
        want = ref.quantize_fp8(xc, q.params, c["fmt"])
        got_v = ref.dequantize_fp8(q.codes, q.params, c["fmt"])
        assert_same_nan_and_close(got_v, ref.dequantize_fp8(want, q.params, c["fmt"]), rtol=0, atol=0)
        assert_same_nan_and_close(out, ref.dequantize_fp8(q.codes, q.params, c["fmt"], x.dtype), rtol=0, atol=0)
        return
    if c["scheme"] == "channel":
        codes, params = ref.quantize_per_channel(xc, c["bits"], c["G"], q.params.dtype)
        want = ref.dequantize_per_channel(q.codes, q.params, c["bits"], c["G"])
        unpack = True
    else:
        sym = c["scheme"] == "symmetric"
        codes, params = ref.quantize_per_token(xc, c["bits"], c["G"], sym, q.params.dtype)
        want = ref.dequantize_per_token(q.codes, q.params, c["bits"], c["G"], sym)
        unpack = not sym
    torch.testing.assert_close(q.params, params, rtol=0, atol=0, equal_nan=True)
    a, b = (ref.unpack_lsb_first(q.codes, c["bits"]), ref.unpack_lsb_first(codes, c["bits"])) if unpack else \
        (q.codes, codes)
    assert (a.int() - b.int()).abs().max().item() <= 1 if a.numel() else True  # +-1 only at exact ties
    assert_same_nan_and_close(kv.dequantize(q, torch.float32), want, rtol=1e-6, atol=0)
    # NaN exactly where a group holds a non-finite value; finite everywhere else.
    assert_same_nan_and_close(out, want.to(x.dtype), rtol=0, atol=0)


# ---------------------------------------------------------------- invalid inputs
@st.composite
def bad_calls(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B, H, T = draw(sizes(1, 3)), draw(sizes(1, 3)), 4 * draw(sizes(1, 2))
    D = draw(st.sampled_from([16, 32]))
    x = _values(draw, (B, H, T, D), dtype)
    x = with_layout(x, draw(layouts()))
    pdt = torch.float16 if dtype == torch.float16 else torch.float32
    which = draw(st.sampled_from([
        "bits", "sym_bits", "group", "group_div", "D", "ndim", "x_dtype", "pdt_bf16", "pdt_range",
        "ch_T", "ch_group", "deq_params", "deq_bits", "deq_codes", "deq_dtype", "dch_params", "fp8_fmt",
        "fp8_scale", "dfp8_scale", "meta_params", "meta_scale"]))
    bad_bits = draw(st.sampled_from([-1, 0, 1, 3, 5, 7, 16]))
    s1 = torch.tensor(0.5)
    if which == "bits":
        return ops.kv_quantize, (x, bad_bits, D, False, pdt), ["bits"]
    if which == "sym_bits":
        return ops.kv_quantize, (x, draw(st.sampled_from([2, 4])), D, True, pdt), ["bits"]
    if which == "group":
        return ops.kv_quantize, (x, 8, draw(st.sampled_from([-8, 0, 4, 12])), False, pdt), ["group_size"]
    if which == "group_div":
        return ops.kv_quantize, (x, 8, 24 if D == 16 else 48, False, pdt), ["group_size"]
    if which == "D":
        d = draw(st.sampled_from([0, 4, 12, 20 if D > 20 else 12]))
        return ops.kv_quantize, (x[..., :d], 8, 8, False, pdt), ["D"]
    if which == "ndim":
        return ops.kv_quantize_channel, (x[0], 2, 4, pdt), ["x"]
    if which == "x_dtype":
        return ops.kv_quantize, (x.to(draw(st.sampled_from([torch.int32, torch.float64]))), 8, D, False,
                                 torch.float32), ["x"]
    if which == "pdt_bf16":
        return ops.kv_quantize, (x, 8, D, False, torch.bfloat16), ["param_dtype"]
    if which == "pdt_range":
        return ops.kv_quantize, (x.float() if dtype == torch.float16 else x, 8, D, False, torch.float16), \
            ["param_dtype"]
    if which == "ch_T":
        return ops.kv_quantize_channel, (x[:, :, :T - 1], 2, 4, pdt), ["T", "group_size"]
    if which == "ch_group":
        return ops.kv_quantize_channel, (x, 2, draw(st.sampled_from([-4, 0])), pdt), ["group_size"]
    codes, params = ops.kv_quantize(x, 4, 8, False, pdt)
    if which == "deq_params":
        p = draw(st.sampled_from([params[..., :1, :], params[..., :1], params[0], params.transpose(1, 2)]))
        return ops.kv_dequantize, (codes, p, 4, 8, False, torch.float32), ["params"]
    if which == "deq_bits":
        return ops.kv_dequantize, (codes, params, bad_bits, 8, False, torch.float32), ["bits"]
    if which == "deq_codes":
        return ops.kv_dequantize, (codes.char(), params, 4, 8, False, torch.float32), ["codes"]
    if which == "deq_dtype":
        return ops.kv_dequantize, (codes, params, 4, 8, False, torch.int8), ["dtype"]
    ccodes, cparams = ops.kv_quantize_channel(x, 2, 4, pdt)
    if which == "dch_params":
        return ops.kv_dequantize_channel, (ccodes, cparams[:, :, :, :8], 2, 4, torch.float32), ["params"]
    if which == "fp8_fmt":
        return ops.kv_quantize_fp8, (x, s1, draw(st.sampled_from(["bogus", "E4M3", "", "e4m3fn"]))), ["format"]
    if which == "fp8_scale":
        s = draw(st.sampled_from([torch.ones(H + 1), torch.ones(1, 1), s1.double(), torch.ones(H, 1)]))
        return ops.kv_quantize_fp8, (x, s, "e4m3"), ["scale"]
    f8 = ops.kv_quantize_fp8(x, s1, "e5m2")
    if which == "dfp8_scale":
        return ops.kv_dequantize_fp8, (f8, torch.ones(H + 2), "e5m2", torch.float32), ["scale"]
    if which == "meta_params":
        return ops.kv_dequantize, (codes, params.to("meta"), 4, 8, False, torch.float32), ["params"]
    return ops.kv_quantize_fp8, (x, s1.to("meta"), "e4m3"), ["scale"]


@given(bad_calls())
def test_invalid_inputs_are_refused_alike_on_cpu_and_meta(call):
    op, args, names = call
    if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):  # a stray meta tensor: named
        with pytest.raises(RuntimeError, match=rf"{names[0]} must be on the device of \w+ \(cpu\), got meta"):
            op(*args)
        return
    assert_refused(op, args, names=names)


# ---------------------------------------------------------------- nothing crashes
_CRASH_CODE = r"""
import torch
from trous import kvcache as kv
ops = torch.ops.trous
g = torch.Generator().manual_seed(0)
special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, 65504.0])
n = 0
for i in range(300):
    dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
    B, H, T = [int(v) for v in torch.randint(0, 4, (3,), generator=g)]
    D = 8 * int(torch.randint(0, 5, (), generator=g))
    x = torch.randn((B, H, T, D), generator=g) * 10 ** float(torch.randint(-40, 39, (), generator=g))
    if x.numel():
        idx = torch.randint(0, x.numel(), (max(1, x.numel() // 7),), generator=g)
        x.view(-1)[idx] = special[torch.randint(0, len(special), idx.shape, generator=g)]
    x = x.to(dtype)
    bits = (2, 4, 8, 3)[i % 4]
    G = (8, D, 16, 1)[(i // 4) % 4]
    for f in (lambda: kv.dequantize(kv.quantize_per_token(x, bits, G)),
              lambda: kv.dequantize(kv.quantize_per_token(x, 8, G, symmetric=True)),
              lambda: kv.dequantize(kv.quantize_per_channel(x, bits, max(G // 8, 1))),
              lambda: kv.dequantize(kv.quantize_fp8(x, fmt=("e4m3", "e5m2")[i % 2], per_head=bool(i % 3)))):
        try:
            f()
            n += 1
        except (RuntimeError, ValueError):
            pass
print("ok", n)
"""


def test_nothing_crashes_on_edge_inputs():
    res = run_isolated(_CRASH_CODE, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok") and int(res.stdout.split()[1]) > 300
