"""trous.nn.SparseMultiheadAttention: outputs and gradients equal to nn.MultiheadAttention with the
equivalent dense mask (causal, windows; weights through from_torch and load_state_dict, batch_first
both ways, kdim / vdim), against an fp64 reference built from the module's own weights (GQA, rotary,
softcap, cross-attention Sq != Sk, odd shapes, unbatched input), bf16 against fp32, and the refusals
(attn_mask, key_padding_mask, need_weights, dropout, bad arguments)."""
import math

import pytest
import torch
from torch import nn

import trous
from helpers import close
from trous.attention import reference as ref
from trous.attention.module import SparseMultiheadAttention

E, H = 96, 3  # head dim 32
PATTERNS = {
    "causal": dict(causal=True),
    "window(5,3)": dict(window=(5, 3)),
    "window(7,0) causal": dict(window=(7, -1), causal=True),
    "chunk8 causal": dict(chunk_size=8, causal=True),
}


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mha(batch_first=True, kdim=None, vdim=None, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim)
    with torch.no_grad():  # non-zero biases, so that the bias mapping is tested too
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
    return m


def _out_and_grads(module, inputs, grad_seed=5, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = module(*leaves, **kw)[0]
    go = _x(*out.shape, seed=grad_seed)
    params = [p for _, p in sorted(module.named_parameters())]
    grads = torch.autograd.grad(out, leaves + params, go)
    return out.detach(), grads


def _mha_param_grads_mapped(mha, grads_sorted):
    """nn.MultiheadAttention's gradients (sorted by parameter name) in the order of
    SparseMultiheadAttention's sorted parameters."""
    names = [n for n, _ in sorted(mha.named_parameters())]
    g = dict(zip(names, grads_sorted))
    mapped = {"out_proj.bias": g["out_proj.bias"], "out_proj.weight": g["out_proj.weight"]}
    for i, part in enumerate("qkv"):
        mapped[f"{part}_proj.bias"] = g["in_proj_bias"][i * E:(i + 1) * E]
        mapped[f"{part}_proj.weight"] = (g["in_proj_weight"][i * E:(i + 1) * E] if "in_proj_weight" in g
                                         else g[f"{part}_proj_weight"])
    return [mapped[n] for n in sorted(mapped)]


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_matches_nn_multihead_attention_with_the_dense_mask(name, batch_first):
    S, B = 37, 2
    mha = _mha(batch_first)
    ours = SparseMultiheadAttention.from_torch(mha, pattern=PATTERNS[name])
    assert ours.batch_first == batch_first
    x = _x(*((B, S, E) if batch_first else (S, B, E)))
    mask = ~ours.pattern.materialize(S, S)  # nn.MultiheadAttention: True = not allowed
    out_ref, g_ref = _out_and_grads(mha, [x, x, x], attn_mask=mask, need_weights=False)
    out, g = _out_and_grads(ours, [x])
    close(out, out_ref, 1e-4)
    gx_ref = g_ref[0] + g_ref[1] + g_ref[2]  # query, key and value are the same tensor here
    close(g[0], gx_ref, 1e-4)
    names = [n for n, _ in sorted(ours.named_parameters())]
    for n, a, b in zip(names, g[1:], _mha_param_grads_mapped(mha, g_ref[3:])):
        if n == "k_proj.bias":  # exactly 0 (softmax is shift-invariant): both are rounding noise
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-5
        else:
            close(a, b, 1e-4)


def test_load_state_dict_mapping_and_cross_attention_with_kdim_vdim():
    """kdim / vdim != E: nn.MultiheadAttention keeps q/k/v_proj_weight separately; Sq != Sk."""
    mha = _mha(kdim=48, vdim=40)
    ours = SparseMultiheadAttention(E, H, kdim=48, vdim=40, window=(4, 2))
    ours.load_state_dict(mha.state_dict())
    assert torch.equal(ours.k_proj.weight, mha.k_proj_weight) and torch.equal(ours.v_proj.weight, mha.v_proj_weight)
    assert torch.equal(ours.k_proj.bias, mha.in_proj_bias[E:2 * E])
    q, k, v = _x(2, 19, E, seed=1), _x(2, 30, 48, seed=2), _x(2, 30, 40, seed=3)
    mask = ~ours.pattern.materialize(19, 30)
    out_ref, g_ref = _out_and_grads(mha, [q, k, v], attn_mask=mask, need_weights=False)
    out, g = _out_and_grads(ours, [q, k, v])
    close(out, out_ref, 1e-4)
    for a, b in zip(g[:3], g_ref[:3]):
        close(a, b, 1e-4)
    # the packed layout maps slice by slice
    packed = _mha()
    m2 = SparseMultiheadAttention(E, H)
    m2.load_state_dict(packed.state_dict())
    for i, lin in enumerate((m2.q_proj, m2.k_proj, m2.v_proj)):
        assert torch.equal(lin.weight, packed.in_proj_weight[i * E:(i + 1) * E])
        assert torch.equal(lin.bias, packed.in_proj_bias[i * E:(i + 1) * E])
    assert torch.equal(m2.out_proj.weight, packed.out_proj.weight)


def _rope_complex(x, pos, base):
    """Rotary embedding as a complex product: channel pair (c, c + D/2) is x_c + i x_{c+D/2}."""
    D = x.shape[-1]
    z = torch.complex(x[..., :D // 2], x[..., D // 2:])
    theta = pos.double()[:, None] * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = z * torch.polar(torch.ones_like(theta), theta)[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def _reference(m, query, key, value, block_mask=None):
    """The module's computation in fp64 from its weights and the materialised mask (AND the block
    mask's, when given)."""
    def lin(layer, t):
        w = layer.weight.double()
        b = layer.bias.double() if layer.bias is not None else None
        return nn.functional.linear(t.double(), w, b)

    B, Sq, _ = query.shape
    Sk = key.shape[1]
    D = m.head_dim
    q = lin(m.q_proj, query).view(B, Sq, m.num_heads, D)
    k = lin(m.k_proj, key).view(B, Sk, m.num_kv_heads, D)
    v = lin(m.v_proj, value).view(B, Sk, m.num_kv_heads, D)
    if m.rope_base is not None:
        q = _rope_complex(q, torch.arange(Sk - Sq, Sk), m.rope_base)
        k = _rope_complex(k, torch.arange(Sk), m.rope_base)
    mask = m.pattern.materialize(Sq, Sk)
    if block_mask is not None:
        mask = mask & block_mask.materialize()
    out, _ = ref.attention_from_mask(q, k, v, mask, scale=m.scale, softcap=m.softcap)
    return lin(m.out_proj, out.reshape(B, Sq, m.embed_dim))


@pytest.mark.parametrize("kw", [
    dict(num_kv_heads=1, causal=True),
    dict(num_kv_heads=3, rotary=True, window=(6, 6)),
    dict(num_kv_heads=1, rotary=500.0, causal=True, softcap=3.0),
    dict(num_kv_heads=3, chunk_size=5, global_tokens=2, scale=0.3, bias=False),
], ids=["mqa causal", "rotary window", "gqa rotary softcap", "chunk global nobias"])
@pytest.mark.parametrize("lengths", [(37, 37), (1, 1), (13, 29)], ids=["S37", "S1", "Sq13 Sk29"])
def test_against_fp64_reference(kw, lengths):
    Sq, Sk = lengths
    torch.manual_seed(1)
    m = SparseMultiheadAttention(E, H, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    q, kv = _x(3, Sq, E, seed=4), _x(3, Sk, E, seed=5)
    out, g = _out_and_grads(m, [q, kv, kv])
    leaves = [t.detach().clone().requires_grad_() for t in (q, kv)]
    want = _reference(m, leaves[0], leaves[1], leaves[1])
    gw = torch.autograd.grad(want, leaves, _x(*want.shape, seed=5).double())
    close(out, want, 1e-4)
    close(g[1] + g[2], gw[1], 1e-4)
    # grad_q is exactly 0 with one key (S1): measure its rounding against the gradients' scale
    err, scale = (g[0].double() - gw[0]).abs().max().item(), max(gw[0].abs().max().item(), gw[1].abs().max().item())
    assert err <= 1e-4 * scale, (err, scale)


def test_block_mask_is_anded_with_the_pattern():
    S = 150
    g = torch.Generator().manual_seed(3)
    bm = trous.BlockMask.from_dense(torch.rand(1, H, S, S, generator=g) < 0.4, block_size=64)
    m = SparseMultiheadAttention(E, H, num_kv_heads=1, causal=True, rotary=True)
    x = _x(2, S, E, seed=6)
    out, g = _out_and_grads(m, [x], block_mask=bm)
    leaf = x.detach().clone().requires_grad_()
    want = _reference(m, leaf, leaf, leaf, block_mask=bm)
    gw = torch.autograd.grad(want, [leaf], _x(*want.shape, seed=5).double())
    close(out, want, 1e-4)
    close(g[0], gw[0], 1e-4)


def test_rotary_is_relative_and_positions_override():
    """Rotary scores depend on position differences only: shifting every position changes nothing."""
    m = SparseMultiheadAttention(E, H, rotary=True, causal=True)
    x = _x(2, 21, E, seed=6)
    base = m(x)[0]
    close(m(x, positions=torch.arange(21) + 1000)[0], base, 1e-4)
    assert not torch.allclose(m(x, positions=torch.arange(21) * 2)[0], base, atol=1e-4)


def test_bf16_matches_fp32():
    m32 = SparseMultiheadAttention(E, H, num_kv_heads=1, window=(8, 0), causal=True, rotary=True)
    m16 = SparseMultiheadAttention(E, H, num_kv_heads=1, window=(8, 0), causal=True, rotary=True,
                                   dtype=torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    x = _x(2, 45, E, seed=7)
    out32, g32 = _out_and_grads(m32, [x])
    out16, g16 = _out_and_grads(m16, [x.bfloat16()])
    assert out16.dtype == torch.bfloat16
    close(out16, out32, 5e-2)
    close(g16[0], g32[0], 5e-2)


def test_unbatched_and_is_causal():
    m = SparseMultiheadAttention(E, H)
    x = _x(2, 17, E, seed=8)
    close(m(x[1])[0], m(x)[0][1], 1e-5)
    causal = SparseMultiheadAttention(E, H, causal=True)
    causal.load_state_dict(m.state_dict())
    close(m(x, is_causal=True)[0], causal(x)[0], 1e-6)


def test_layer_is_in_trous_nn():
    assert trous.nn.SparseMultiheadAttention is SparseMultiheadAttention
    m = trous.nn.SparseMultiheadAttention(64, 2, pattern=trous.AttentionPattern(window=(3, 3)))
    assert m.pattern.window == (3, 3) and "window=(3, 3)" in repr(m)
    assert m(_x(1, 5, 64))[0].shape == (1, 5, 64)


def test_refusals():
    m = SparseMultiheadAttention(E, H, causal=True)
    x = _x(1, 9, E)
    with pytest.raises(ValueError, match="attn_mask.*pattern"):
        m(x, attn_mask=torch.zeros(9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="need_weights"):
        m(x, need_weights=True)
    with pytest.raises(ValueError, match="dropout"):
        SparseMultiheadAttention(E, H, dropout=0.1)
    with pytest.raises(ValueError, match="not both"):
        SparseMultiheadAttention(E, H, pattern=trous.AttentionPattern(causal=True), window=(2, 2))
    with pytest.raises(ValueError, match="divisible"):
        SparseMultiheadAttention(E, 5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        SparseMultiheadAttention(E, H, num_kv_heads=2)
    with pytest.raises(ValueError, match="rotary"):
        SparseMultiheadAttention(E, H, rotary="yes")
    with pytest.raises(ValueError, match="pattern keywords"):
        SparseMultiheadAttention(E, H, pattern={"sliding_window": 4})
    with pytest.raises(ValueError, match="add_bias_kv"):
        SparseMultiheadAttention.from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    gqa = SparseMultiheadAttention(E, H, num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
        gqa.load_state_dict(nn.MultiheadAttention(E, H).state_dict())


def test_default_init_is_nn_multihead_attentions():
    m = SparseMultiheadAttention(256, 4)
    bound = math.sqrt(6.0 / (4 * 256))
    assert m.q_proj.weight.abs().max() <= bound and m.q_proj.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(m.q_proj.bias) == 0 and torch.count_nonzero(m.out_proj.bias) == 0
