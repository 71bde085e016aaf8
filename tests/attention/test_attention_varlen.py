"""trous.sparse_attention_varlen (packed sequences, FlashAttention's cu_seqlens layout) against the
fp64 reference with the block-diagonal materialised mask: outputs, LSE and gradients for the
patterns of the core (each sequence bottom-right aligned), empty and length-1 sequences, Sq != Sk
per sequence, GQA, bf16, deterministic backward, opcheck, and every bad cu_seqlens / max_seqlen
named before any kernel runs (CPU and meta alike for the shape errors)."""
import pytest
import torch
from props import assert_refused

import trous
from trous.attention import reference as ref
from trous.attention.pattern import AttentionPattern

ops = torch.ops.trous

PATTERNS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window(3,2)": dict(window=(3, 2)),
    "window(4,0) causal": dict(window=(4, -1), causal=True),
    "chunk5 causal": dict(chunk_size=5, causal=True),
    "window(2,2) d2": dict(window=(2, 2), dilation=2),
}
# per-sequence (q, k) lengths: empty, length 1, Sq != Sk both ways, odd lengths
LENGTHS = [[(7, 7), (0, 0), (1, 1), (13, 13)], [(5, 9), (11, 4), (0, 3), (3, 0), (17, 17)]]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _packed(lengths, Hq=4, Hkv=2, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q = torch.randn(tq, Hq, D, generator=g).to(dtype)
    k = torch.randn(tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(tk, Hkv, D, generator=g).to(dtype)
    go = torch.randn(tq, Hq, D, generator=g).to(dtype)
    cu_q, cu_k = _cu([a for a, _ in lengths]), _cu([b for _, b in lengths])
    return q, k, v, go, cu_q, cu_k, max(a for a, _ in lengths), max(b for _, b in lengths)


def _grads(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, go.to(out.dtype))


@pytest.mark.parametrize("lengths", range(len(LENGTHS)))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_matches_the_block_diagonal_reference(name, lengths):
    q, k, v, go, cu_q, cu_k, mq, mk = _packed(LENGTHS[lengths], seed=lengths)
    p = AttentionPattern(**PATTERNS[name])
    out, lse = trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, pattern=p, softcap=0.0, return_lse=True)
    rout, rlse = ref.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, p)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    torch.testing.assert_close(out.double(), rout, rtol=0, atol=3e-4)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isinf(lse), ~fin)  # rows with no key: lse -inf (and out 0)
    torch.testing.assert_close(lse.double()[fin], rlse[fin], rtol=0, atol=1e-4)
    _, g = _grads(lambda q, k, v: trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, pattern=p), q, k, v, go)
    _, rg = _grads(lambda q, k, v: ref.attention_varlen(q, k, v, cu_q, cu_k, p)[0], q.double(), k.double(),
                   v.double(), go)
    for name_g, a, b in zip(("grad_q", "grad_k", "grad_v"), g, rg):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-3, msg=name_g)


def test_no_attention_across_sequences():
    """A NaN planted in one sequence's keys and values stays in that sequence."""
    lengths = [(6, 6), (9, 9), (4, 4)]
    q, k, v, _, cu_q, cu_k, mq, mk = _packed(lengths)
    k[6:15] = float("nan")
    v[6:15] = float("nan")
    out = trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    assert torch.isfinite(out[:6]).all() and torch.isfinite(out[15:]).all()
    assert torch.isnan(out[6:15]).all()


def test_softcap_scale_and_bf16():
    lengths = [(12, 12), (1, 1), (20, 20)]
    q, k, v, go, cu_q, cu_k, mq, mk = _packed(lengths, Hq=6, Hkv=3, D=40, dtype=torch.bfloat16, seed=3)
    p = AttentionPattern(window=(5, 1))
    out = trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, pattern=p, softcap=3.0, scale=0.2)
    rout, _ = ref.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, p, 0.2, 3.0)
    pt, _ = ref.attention_varlen(q, k, v, cu_q, cu_k, p, 0.2, 3.0, compute_dtype=torch.bfloat16)
    e, e_pt = (out.double() - rout).abs().max().item(), (pt.double() - rout).abs().max().item()
    assert out.dtype == torch.bfloat16 and e <= max(2 * e_pt, 1e-3), (e, e_pt)


def test_matches_per_sequence_calls_and_deterministic_backward_repeats():
    lengths = [(33, 33), (70, 70), (2, 2)]
    q, k, v, go, cu_q, cu_k, mq, mk = _packed(lengths, Hq=2, Hkv=1, D=64, seed=5)
    kw = dict(chunk_size=16, causal=True)
    out = trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, **kw)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        one = trous.sparse_attention(q[a:b][None], k[a:b][None], v[a:b][None], **kw)[0]
        assert torch.equal(out[a:b], one)
    run = lambda: _grads(lambda q, k, v: trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk,  # noqa: E731
                                                                       deterministic=True, **kw), q, k, v, go)[1]
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_opcheck():
    q, k, v, go, cu_q, cu_k, mq, mk = _packed([(5, 7), (0, 2), (9, 9)], D=32, seed=7)
    args = (q, k, v, cu_q, cu_k, mq, mk, True, -1, 0, 0, 1, 0.25, 0.0)
    torch.library.opcheck(ops.sparse_attention_varlen_fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = ops.sparse_attention_varlen_fwd(*args)
    torch.library.opcheck(ops.sparse_attention_varlen_bwd, (go, q, k, v, out, lse, cu_q, cu_k, mq, mk, True, -1, 0,
                                                            0, 1, 0.25, 0.0, False),
                          test_utils=("test_schema", "test_faketensor"))


def _fwd_args(**over):
    q, k, v, _, cu_q, cu_k, mq, mk = _packed([(5, 5), (3, 3)], seed=9)
    a = dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, mq=mq, mk=mk)
    a.update(over)
    return (a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["mq"], a["mk"], False, -1, -1, 0, 1, 0.5, 0.0)


@pytest.mark.parametrize("over, names", [
    (dict(cu_q=torch.tensor([0, 5, 8], dtype=torch.int64)), ["cu_seqlens_q"]),
    (dict(cu_k=torch.tensor([0, 8], dtype=torch.int32)), ["cu_seqlens_k"]),
    (dict(q=torch.randn(1, 8, 4, 32)), ["q"]),
    (dict(mq=-1), ["max_seqlen_q"]),
])
def test_shape_errors_are_named_on_cpu_and_meta(over, names):
    assert_refused(ops.sparse_attention_varlen_fwd, _fwd_args(**over), {}, names)


@pytest.mark.parametrize("over, match", [
    (dict(cu_q=torch.tensor([0, 6, 5], dtype=torch.int32), mq=9), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_q=torch.tensor([1, 5, 8], dtype=torch.int32)), "cu_seqlens_q must start at 0"),
    (dict(cu_k=torch.tensor([0, 5, 7], dtype=torch.int32)), "cu_seqlens_k must end at the number of packed rows 8"),
    (dict(mq=4), "max_seqlen_q = 4 is smaller than sequence 0's length 5"),
    (dict(mk=2), "max_seqlen_k = 2 is smaller"),
])
def test_offset_errors_are_named_before_any_kernel(over, match):
    with pytest.raises(ValueError, match=match):
        ops.sparse_attention_varlen_fwd(*_fwd_args(**over))


def test_global_tokens_are_refused():
    q, k, v, _, cu_q, cu_k, mq, mk = _packed([(5, 5)])
    with pytest.raises(ValueError, match="global_tokens are not supported"):
        trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, pattern=AttentionPattern(global_tokens=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["causal", "window(3,2)", "chunk5 causal"])
def test_cuda_varlen_matches_cpu(name):
    """The CUDA kernels on per-sequence views (offsets read on the host) against the CPU op, fp16."""
    q, k, v, go, cu_q, cu_k, mq, mk = _packed(LENGTHS[1], D=64, dtype=torch.float16, seed=11)
    p = AttentionPattern(**PATTERNS[name])
    want, wg = _grads(lambda q, k, v: trous.sparse_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, pattern=p), q, k, v,
                      go)
    got, gg = _grads(lambda q, k, v: trous.sparse_attention_varlen(q, k, v, cu_q.cuda(), cu_k.cuda(), mq, mk,
                                                                   pattern=p), q.cuda(), k.cuda(), v.cuda(), go.cuda())
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=2e-2, atol=2e-2)
