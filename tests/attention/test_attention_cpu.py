"""CPU kernels of the sparse attention core: torch.ops.trous.sparse_attention_fwd / _bwd against an
fp64 reference written here from the pattern rules of ../shared/spec/attention.md (a materialised
mask, never the kernel's tiles), for every pattern alone and combined, Sq != Sk both ways, odd
lengths, fully masked rows, GQA, every head dim, fp32 and bf16; determinism, layouts, opcheck, and
refusals alike on CPU and meta. The Makefile's TROUS_CPU_SIMD=0 rerun covers the scalar twins too
(and test_scalar_twin_matches runs them in a subprocess)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import trous  # noqa: F401  (loads the ops)
from helpers import seeded
from trous.attention import reference as ref

OPS = torch.ops.trous
INF = float("inf")


def close(a, b, rtol, floor=0.1):
    """max |a - b| <= rtol * max(max |b|, floor), in fp64 (the floor: gradients that vanish analytically,
    e.g. a window (0, 0), are compared with the inputs' unit scale)."""
    scale = max(b.abs().max().item(), floor)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rtol * scale, f"max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


# ---- the mask, re-derived here from the spec rules (an oracle independent of AttentionPattern) ----

def ref_mask(Sq, Sk, causal=False, window=(-1, -1), chunk=0, dilation=1, flags=None):
    """allowed[i, j] from the spec: i' = i + Sk - Sq; dilation d: (i' - j) % d == 0 and the window
    holds for (i' - j) / d; chunk C: i' // C == j // C; global flags OR-ed; causal AND-ed on top."""
    i = torch.arange(Sq).view(-1, 1) + (Sk - Sq)
    j = torch.arange(Sk).view(1, -1)
    diff = i - j
    local = torch.ones(Sq, Sk, dtype=torch.bool)
    if dilation > 1:
        local &= diff % dilation == 0
    steps = torch.div(diff, dilation, rounding_mode="floor")
    left, right = window
    if left >= 0:
        local &= steps <= left
    if right >= 0:
        local &= -steps <= right
    if chunk > 0:
        local &= torch.div(i, chunk, rounding_mode="floor") == torch.div(j, chunk, rounding_mode="floor")
    allowed = local
    if flags is not None:
        f = flags.bool()
        gk = f.view(1, -1).expand(Sq, Sk)
        inside = (i >= 0) & (i < Sk)
        gq = torch.zeros(Sq, 1, dtype=torch.bool)
        gq[inside] = f[i[inside]]
        allowed = allowed | gk | gq.expand(Sq, Sk)
    if causal:
        allowed = allowed & (j <= i)
    return allowed


def make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed=0):
    g = seeded(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64)
    go = torch.randn(B, Sq, Hq, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, go)]


def flags_of(Sk, spec):
    if spec is None:
        return None
    f = torch.zeros(Sk, dtype=torch.bool)
    if spec == "all":
        f[:] = True
    elif spec == "ends":
        f[:2] = True
        f[-3:] = True
    elif spec == "first":
        f[:3] = True
    elif spec == "mid":
        f[Sk // 2] = True
    return f


def op_args(pat):
    left, right = pat.get("window", (-1, -1))
    return (pat.get("causal", False), left, right, pat.get("chunk", 0), pat.get("dilation", 1))


def run_ours(q, k, v, go, flags, pat, scale, softcap=0.0):
    out, lse = OPS.sparse_attention_fwd(q, k, v, flags, *op_args(pat), scale, softcap)
    gq, gk, gv = OPS.sparse_attention_bwd(go, q, k, v, out, lse, flags, *op_args(pat), scale, softcap, False)
    return out, lse, gq, gk, gv


def run_ref(q, k, v, go, flags, pat, scale, softcap=0.0):
    """fp64 (or the inputs' dtype) reference outputs and gradients."""
    Sq, Sk = q.shape[1], k.shape[1]
    mask = ref_mask(Sq, Sk, pat.get("causal", False), pat.get("window", (-1, -1)), pat.get("chunk", 0),
                    pat.get("dilation", 1), flags)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ref.attention_from_mask(*leaves, mask, scale, softcap, compute_dtype=leaves[0].dtype)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    return (out.detach(), lse.detach(), *grads)


def check_fp32(Sq, Sk, pat, flags_spec=None, B=1, Hq=3, Hkv=3, D=64, softcap=0.0, seed=0):
    q, k, v, go = make_inputs(B, Sq, Sk, Hq, Hkv, D, torch.float64, seed)
    flags = flags_of(Sk, flags_spec)
    scale = 1.0 / math.sqrt(D)
    ref = run_ref(q, k, v, go, flags, pat, scale, softcap)
    ours = run_ours(*(t.float() for t in (q, k, v, go)), flags, pat, scale, softcap)
    out, lse = ours[0], ours[1]
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    close(out, ref[0], 1e-4)
    # lse: equal infinities (fully masked rows), close elsewhere
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
    fin = torch.isfinite(ref[1])
    if fin.any():
        close(lse[fin], ref[1][fin], 1e-5)
    for a, b in zip(ours[2:], ref[2:]):
        assert not a.isnan().any()
        close(a, b, 3e-4)
    return ref


# ---- patterns alone and combined ----

PATTERNS = {
    "dense": {},
    "causal": {"causal": True},
    "window": {"window": (5, 3)},
    "window_left": {"window": (7, -1)},
    "window_right": {"window": (-1, 4)},
    "window_00": {"window": (0, 0)},
    "window_causal_equiv": {"window": (-1, 0)},
    "window_causal": {"window": (9, 9), "causal": True},
    "chunk": {"chunk": 16},
    "chunk_causal": {"chunk": 24, "causal": True},
    "chunk_big": {"chunk": 1000},
    "dilated": {"window": (4, 4), "dilation": 3},
    "dilated_causal": {"window": (6, 0), "dilation": 2},
    "dilation_only": {"dilation": 4},
    "dilated_chunk": {"window": (3, 3), "dilation": 2, "chunk": 32},
    "window_chunk": {"window": (10, 2), "chunk": 40},
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("Sq,Sk", [(77, 77), (53, 131), (131, 45)])
def test_pattern_fp32(name, Sq, Sk):
    check_fp32(Sq, Sk, PATTERNS[name], seed=sum(map(ord, name)))


@pytest.mark.parametrize("flags_spec", ["ends", "first", "mid", "all"])
@pytest.mark.parametrize("name", ["dense", "causal", "window", "chunk_causal", "dilated", "dilated_causal"])
def test_global_tokens_fp32(name, flags_spec):
    check_fp32(97, 97, PATTERNS[name], flags_spec, seed=7)


@pytest.mark.parametrize("Sq,Sk", [(40, 150), (150, 40)])
@pytest.mark.parametrize("name", ["window", "causal", "dilated"])
def test_global_tokens_unequal_lengths(name, Sq, Sk):
    check_fp32(Sq, Sk, PATTERNS[name], "ends", seed=3)


def test_fully_masked_rows_are_zero():
    # Sq > Sk with causal: the first Sq - Sk rows see nothing; chunk too; a window pointing past the keys.
    cases = [(90, 30, {"causal": True}), (70, 20, {"chunk": 8}), (50, 50, {"window": (-1, 0), "causal": True}),
             (40, 60, {"window": (3, 3), "dilation": 5, "chunk": 2})]
    for Sq, Sk, pat in cases:
        mask = ref_mask(Sq, Sk, pat.get("causal", False), pat.get("window", (-1, -1)), pat.get("chunk", 0),
                        pat.get("dilation", 1))
        empty = ~mask.any(1)
        ref = check_fp32(Sq, Sk, pat, B=2, Hq=2, Hkv=1)
        if empty.any():
            q, k, v, go = make_inputs(2, Sq, Sk, 2, 1, 64, torch.float32)
            out, lse, gq, gk, gv = run_ours(q, k, v, go, None, pat, 0.125)
            assert (out[:, empty] == 0).all() and (gq[:, empty] == 0).all()
            assert (lse[:, :, empty] == -INF).all()
        del ref


def test_window_equal_to_causal():
    q, k, v, go = make_inputs(1, 70, 90, 2, 2, 32, torch.float32, seed=5)
    a = run_ours(q, k, v, go, None, {"causal": True}, 0.2)
    b = run_ours(q, k, v, go, None, {"window": (-1, 0)}, 0.2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# ---- shapes, heads, dtypes ----

@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
def test_head_dims(D):
    check_fp32(45, 69, {"window": (8, 8), "causal": True}, B=1, Hq=2, Hkv=1, D=D, seed=D)
    check_fp32(33, 33, {}, B=1, Hq=1, Hkv=1, D=D, seed=D + 1)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (8, 2), (5, 5)])
def test_gqa(Hq, Hkv):
    check_fp32(67, 80, {"window": (12, 3)}, "ends", B=2, Hq=Hq, Hkv=Hkv, seed=Hq * 10 + Hkv)
    check_fp32(67, 80, {"causal": True}, B=1, Hq=Hq, Hkv=Hkv, seed=Hq * 10 + Hkv + 1)


def test_long_tiles_and_batch():
    # More than one query tile and key block in every direction, B > 1, odd H.
    check_fp32(200, 260, {"window": (70, 20), "causal": True}, "first", B=2, Hq=3, Hkv=1, D=32, seed=11)
    check_fp32(257, 257, {"dilation": 3, "window": (30, 30)}, "mid", B=1, Hq=1, Hkv=1, D=32, seed=12)


@pytest.mark.parametrize("softcap", [2.0, 30.0])
@pytest.mark.parametrize("name", ["dense", "causal", "dilated"])
def test_softcap(name, softcap):
    check_fp32(61, 75, PATTERNS[name], "first" if name == "dense" else None, softcap=softcap, seed=21)


LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", ["dense", "causal", "window", "dilated_causal", "chunk_causal"])
def test_low_precision(name, dtype):
    """FA rule: error <= 2x the error of the same computation in plain PyTorch at that dtype (grads 3x)."""
    pat = PATTERNS[name]
    Sq, Sk, D = 73, 91, 64
    q, k, v, go = make_inputs(2, Sq, Sk, 4, 2, D, dtype, seed=31)
    flags = flags_of(Sk, "ends") if name == "window" else None
    scale = D ** -0.5
    ref = run_ref(*(t.double() for t in (q, k, v, go)), flags, pat, scale)
    low = run_ref(q, k, v, go, flags, pat, scale)
    ours = run_ours(q, k, v, go, flags, pat, scale)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    for idx, factor in [(0, 2.0), (2, 3.0), (3, 3.0), (4, 3.0)]:
        err = (ours[idx].double() - ref[idx]).abs().max().item()
        err_pt = (low[idx].double() - ref[idx]).abs().max().item()
        assert err <= factor * err_pt + 1e-6, (idx, err, err_pt)
    fin = torch.isfinite(ref[1])
    assert (ours[1][fin].double() - ref[1][fin]).abs().max().item() < 2e-2


def test_empty_lengths():
    q, k, v, go = make_inputs(1, 0, 10, 2, 2, 32, torch.float32)
    out, lse, gq, gk, gv = run_ours(q, k, v, go, None, {}, 0.3)
    assert out.shape == (1, 0, 2, 32) and lse.shape == (1, 2, 0) and (gk == 0).all() and (gv == 0).all()
    q, k, v, go = make_inputs(1, 7, 0, 2, 2, 32, torch.float32)
    out, lse, gq, gk, gv = run_ours(q, k, v, go, None, {}, 0.3)
    assert (out == 0).all() and (lse == -INF).all() and (gq == 0).all() and gk.shape == (1, 0, 2, 32)


def test_nan_stays_in_its_row():
    q, k, v, go = make_inputs(1, 50, 50, 2, 2, 32, torch.float32, seed=41)
    q[0, 17, 1, 3] = float("nan")
    out, lse, gq, gk, gv = run_ours(q, k, v, go, None, {"window": (4, 4)}, 0.2)
    bad = out.isnan().any(-1)
    assert bad[0, 17, 1] and bad.sum() == 1
    assert not out[:, :, 0].isnan().any()


# ---- layouts, determinism ----

def test_noncontiguous_qkv_slices():
    B, S, H, D = 2, 83, 4, 64
    g = seeded(51)
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    go = torch.randn(B, S, H, D, generator=g)
    pat = {"window": (9, 9), "causal": True}
    a = run_ours(q, k, v, go, None, pat, 0.125)
    b = run_ours(q.contiguous(), k.contiguous(), v.contiguous(), go, None, pat, 0.125)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a strided last dimension is copied
    qt = torch.randn(B, S, H, D * 2, generator=g)[..., ::2]
    c = run_ours(qt, k, v, go, None, pat, 0.125)
    d = run_ours(qt.contiguous(), k, v, go, None, pat, 0.125)
    for x, y in zip(c, d):
        assert torch.equal(x, y)
    # grad_out / out with other strides
    out, lse = OPS.sparse_attention_fwd(q, k, v, None, True, 9, 9, 0, 1, 0.125, 0.0)
    go_t = go.transpose(0, 1).contiguous().transpose(0, 1)
    g1 = OPS.sparse_attention_bwd(go_t, q, k, v, out, lse, None, True, 9, 9, 0, 1, 0.125, 0.0, False)
    g2 = OPS.sparse_attention_bwd(go, q, k, v, out, lse, None, True, 9, 9, 0, 1, 0.125, 0.0, False)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype,B,Hq,Hkv", [(torch.float32, 2, 4, 2), (torch.bfloat16, 2, 4, 2),
                                             (torch.float32, 1, 1, 1), (torch.float32, 1, 4, 1),
                                             (torch.float32, 9, 1, 1)])
def test_deterministic_and_thread_independent(dtype, B, Hq, Hkv):
    # (fewer than 8 (batch, kv head) pairs: the backward splits them into chunks reduced in order)
    q, k, v, go = make_inputs(B, 150, 170, Hq, Hkv, 64, dtype, seed=61)
    flags = flags_of(170, "ends")
    pat = {"window": (40, 10), "dilation": 2}
    threads = torch.get_num_threads()
    try:
        first = run_ours(q, k, v, go, flags, pat, 0.125)
        again = run_ours(q, k, v, go, flags, pat, 0.125)
        torch.set_num_threads(1)
        single = run_ours(q, k, v, go, flags, pat, 0.125)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(first, again, single):
        assert torch.equal(x, y) and torch.equal(x, z)
    ref = run_ref(*(t.double() for t in (q, k, v, go)), flags, pat, 0.125)
    for x, y in zip(first[2:], ref[2:]):
        close(x, y, 3e-4 if dtype == torch.float32 else 3e-2)
    det = OPS.sparse_attention_bwd(go, q, k, v, first[0], first[1], flags, *op_args(pat), 0.125, 0.0, True)
    for x, y in zip(det, first[2:]):
        assert torch.equal(x, y)


def test_scalar_twin_matches():
    """TROUS_CPU_SIMD=0 (scalar microkernels and exp) in a subprocess: same results within fp32 rounding."""
    code = (
        "import torch, trous, math\n"
        "g = torch.Generator().manual_seed(3)\n"
        "q, k, v, go = (torch.randn(1, 75, 2, 40, generator=g) for _ in range(4))\n"
        "f = torch.zeros(75, dtype=torch.bool); f[0] = True\n"
        "out, lse = torch.ops.trous.sparse_attention_fwd(q, k, v, f, True, 20, 0, 0, 1, 0.15, 0.0)\n"
        "gr = torch.ops.trous.sparse_attention_bwd(go, q, k, v, out, lse, f, True, 20, 0, 0, 1, 0.15, 0.0, False)\n"
        "torch.save([out, lse, *gr], __import__('sys').argv[1])\n"
    )
    results = []
    for simd in ("1", "0"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"trous_attn_simd{simd}_{os.getpid()}.pt")
        env = dict(os.environ, TROUS_CPU_SIMD=simd)
        subprocess.run([sys.executable, "-c", code, path], check=True, env=env, timeout=120)
        results.append(torch.load(path))
        os.remove(path)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- opcheck and refusals ----

def test_opcheck():
    q, k, v, go = make_inputs(1, 37, 45, 4, 2, 32, torch.float32, seed=71)
    flags = flags_of(45, "ends")
    args = (q, k, v, flags, True, 6, 2, 0, 2, 0.2, 0.0)
    torch.library.opcheck(OPS.sparse_attention_fwd, args)
    out, lse = OPS.sparse_attention_fwd(*args)
    torch.library.opcheck(OPS.sparse_attention_bwd, (go, q, k, v, out, lse, flags, True, 6, 2, 0, 2, 0.2, 0.0, False))
    torch.library.opcheck(OPS.sparse_attention_fwd, (q.bfloat16(), k.bfloat16(), v.bfloat16(), None, False, -1, -1,
                                                     16, 1, 0.2, 5.0))


def _fwd_call(q, k, v, flags=None, left=-1, right=-1, chunk=0, dilation=1, scale=0.1, softcap=0.0):
    return OPS.sparse_attention_fwd(q, k, v, flags, False, left, right, chunk, dilation, scale, softcap)


BAD = [
    ("k", lambda q, k, v: _fwd_call(q, k[:, :, :2], v[:, :, :2])),   # Hq = 3 not a multiple of Hkv = 2
    ("k", lambda q, k, v: _fwd_call(q, k[:1], v[:1])),             # batch
    ("q", lambda q, k, v: _fwd_call(q[..., :24], k[..., :24], v[..., :24])),   # D = 24
    ("q", lambda q, k, v: _fwd_call(q[..., :36], k[..., :36], v[..., :36])),   # D not a multiple of 8
    ("q", lambda q, k, v: _fwd_call(q[0], k[0], v[0])),            # 3-D
    ("k", lambda q, k, v: _fwd_call(q, k.double(), v)),
    ("v", lambda q, k, v: _fwd_call(q, k, v[:, :5])),
    ("q", lambda q, k, v: _fwd_call(q.long(), k.long(), v.long())),
    ("window", lambda q, k, v: _fwd_call(q, k, v, left=-2)),
    ("window", lambda q, k, v: _fwd_call(q, k, v, right=-3)),
    ("chunk_size", lambda q, k, v: _fwd_call(q, k, v, chunk=-1)),
    ("dilation", lambda q, k, v: _fwd_call(q, k, v, dilation=0)),
    ("global_tokens", lambda q, k, v: _fwd_call(q, k, v, flags=torch.zeros(k.shape[1] + 1, dtype=torch.bool,
                                                                            device=q.device))),
    ("global_tokens", lambda q, k, v: _fwd_call(q, k, v, flags=torch.zeros(k.shape[1], device=q.device))),
    ("scale", lambda q, k, v: _fwd_call(q, k, v, scale=0.0)),
    ("scale", lambda q, k, v: _fwd_call(q, k, v, scale=float("nan"))),
    ("softcap", lambda q, k, v: _fwd_call(q, k, v, softcap=-1.0)),
]


@pytest.mark.parametrize("idx", range(len(BAD)))
def test_refusals_cpu_and_meta(idx):
    name, call = BAD[idx]
    msgs = []
    for device in ("cpu", "meta"):
        q = torch.randn(2, 9, 3, 64, device=device)
        k = torch.randn(2, 11, 3, 64, device=device)
        v = torch.randn(2, 11, 3, 64, device=device)
        with pytest.raises((RuntimeError, ValueError)) as e:
            call(q, k, v)
        assert name in str(e.value), str(e.value)
        msgs.append(str(e.value).split("\n")[0])
    assert msgs[0] == msgs[1]


def test_backward_refusals_and_meta_shapes():
    q, k, v, go = make_inputs(1, 9, 11, 2, 1, 32, torch.float32)
    out, lse = OPS.sparse_attention_fwd(q, k, v, None, False, -1, -1, 0, 1, 0.1, 0.0)
    for name, args in [("grad_out", (go[:, :5], q, k, v, out, lse)), ("out", (go, q, k, v, out.double(), lse)),
                       ("lse", (go, q, k, v, out, lse[:, :1])), ("lse", (go, q, k, v, out, lse.double()))]:
        for dev in ("cpu", "meta"):
            a = [t.to(dev) for t in args]
            with pytest.raises(RuntimeError, match=name):
                OPS.sparse_attention_bwd(*a, None, False, -1, -1, 0, 1, 0.1, 0.0, False)
    m = [t.to("meta") for t in (go, q, k, v, out, lse)]
    gq, gk, gv = OPS.sparse_attention_bwd(*m, None, False, -1, -1, 0, 1, 0.1, 0.0, False)
    assert gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape and gq.device.type == "meta"
    # a meta tensor among CPU ones is refused naming it
    with pytest.raises(RuntimeError, match="v must be on"):
        OPS.sparse_attention_fwd(q, k, v.to("meta"), None, False, -1, -1, 0, 1, 0.1, 0.0)
