"""PATNet blocks against the spec's formulas written out here with plain torch ops (eval mode with
random BatchNorm statistics, and train mode), gradients to every parameter, bad input, and
torch.compile(fullgraph=True)."""
import math

import pytest
import torch
import torch.nn.functional as F

import trous
from trous.pconv import PATChannel, PATSelf, PATSpatial


def _hardsigmoid(v):
    return torch.clamp(v / 6 + 0.5, 0, 1)


def _bn(bn, v):
    return F.batch_norm(v, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return m.eval()


def _ref_channel(m, x):
    cp = m.dim_conv
    x1, x2 = x[:, :cp], x[:, cp:]
    conv = F.conv2d(x1, m.partial_conv3.weight, padding=m.partial_conv3.weight.shape[-1] // 2)
    mu = x2.mean(dim=(2, 3))
    sigma = x2.var(dim=(2, 3), unbiased=True).sqrt()
    stats = torch.stack([mu, sigma], dim=-1)[:, :, None, :]  # [N, cu, 1, 2]
    z = torch.einsum("oiw,niw->no", m.attn_conv.weight[:, :, 0, :], stats[:, :, 0, :])[:, :, None, None]
    g = _hardsigmoid(_bn(m.norm, z))
    return torch.cat([conv, _bn(m.norm2, x2 * g)], 1)


@pytest.mark.parametrize("shape", [(2, 16, 7, 9, 4), (3, 10, 5, 5, 2), (1, 12, 6, 3, 4)], ids=str)
def test_pat_channel_matches_the_formula(shape):
    N, C, H, W, n_div = shape
    m = _randomize(PATChannel(C, n_div), sum(shape))
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(x), _ref_channel(m, x), rtol=1e-5, atol=1e-5)
    if N == 1:  # the BatchNorm over the per-channel statistics needs N > 1 in training
        return
    m.train()
    out = m(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_pat_spatial_matches_the_formula():
    m = _randomize(PATSpatial(11), 3)
    x = torch.randn(2, 11, 6, 7, generator=torch.Generator().manual_seed(2))
    a, b = x[:, :6], x[:, 6:]
    w = _hardsigmoid(torch.einsum("ci,nihw->nchw", m.attn_conv.weight[:, :, 0, 0], a))
    want = torch.cat([_bn(m.norm_a, a * w), torch.einsum("oi,nihw->nohw", m.conv_b.weight[:, :, 0, 0],
                                                         _bn(m.norm_b, b))], 1)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("heads", [1, 3])
def test_pat_self_matches_the_formula(heads):
    N, C, H, W = 2, 16, 4, 5
    m = _randomize(PATSelf(C, (H, W), n_div=4, num_heads=heads), 5)
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(3))
    cp, cu = 4, 12
    d = cu // heads
    conv = F.conv2d(x[:, :cp], m.partial_conv3.weight, padding=1)
    tok = F.layer_norm(x[:, cp:].permute(0, 2, 3, 1).reshape(N, H * W, cu), (cu,), m.norm.weight, m.norm.bias,
                       m.norm.eps)
    qkv = tok @ m.qkv.weight.t()
    q, k, v = (qkv[..., i * cu:(i + 1) * cu].reshape(N, H * W, heads, d).transpose(1, 2) for i in range(3))
    bias = torch.empty(heads, H * W, H * W)
    for i in range(H * W):
        for j in range(H * W):
            dy, dx = i // W - j // W, i % W - j % W
            bias[:, i, j] = m.relative_position_bias_table[(dy + H - 1) * (2 * W - 1) + dx + W - 1]
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1) @ v
    y = att.transpose(1, 2).reshape(N, H * W, cu) @ m.proj.weight.t()
    want = torch.cat([conv, y.transpose(1, 2).reshape(N, cu, H, W)], 1)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_bad_input():
    with pytest.raises(ValueError, match="n_div"):
        PATChannel(3, n_div=4)
    with pytest.raises(ValueError, match="attention channel"):
        PATChannel(1, n_div=1)
    with pytest.raises(ValueError, match="num_heads"):
        PATSelf(16, 4, num_heads=5)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 16"):
        PATChannel(16)(torch.randn(1, 15, 4, 4))
    with pytest.raises(ValueError, match="input_size"):
        PATSelf(16, 4)(torch.randn(1, 16, 5, 4))
    assert trous.PATChannel is PATChannel and trous.PATSelf is PATSelf and trous.PATSpatial is PATSpatial


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    m = _randomize(PATChannel(16, 4), 9)
    x = torch.randn(2, 16, 7, 5)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)
