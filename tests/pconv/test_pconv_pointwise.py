"""pconv_pointwise (PConv + 1x1 without the PConv output): outputs and gradients against the unfused
pair, every dtype, odd shapes, cp == C, channels_last; what autograd saves; bad input."""
import pytest
import torch
import torch.nn.functional as F

import trous  # noqa: F401
from trous.pconv import channel_partial_conv2d, pconv_pointwise

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 12, 9, 7, 3, 24, 1), (1, 5, 4, 3, 5, 2, 1), (3, 8, 5, 11, 2, 7, 2)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_the_unfused_pair(shape, dtype, layout):
    N, C, H, W, cp, O, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(N, C, H, W, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cp, cp, 3, 3, generator=g) / 3).to(dtype)
    pw = (torch.randn(O, C, 1, 1, generator=g) / C**0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, pw)]
    z = pconv_pointwise(*leaves, dilation=d)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, pw)]
    zr = F.conv2d(channel_partial_conv2d(ref_leaves[0], ref_leaves[1], dilation=d), ref_leaves[2])
    assert z.dtype == dtype and z.shape == zr.shape
    tol = TOL[dtype]
    torch.testing.assert_close(z.double(), zr, rtol=tol, atol=tol)
    gz = torch.randn(z.shape, generator=g).to(dtype)
    got = torch.autograd.grad(z, leaves, gz)
    want = torch.autograd.grad(zr, ref_leaves, gz.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def test_never_saves_the_pconv_output():
    N, C, H, W, cp, O = 2, 16, 6, 5, 4, 32
    x = torch.randn(N, C, H, W, requires_grad=True)
    w = torch.randn(cp, cp, 3, 3, requires_grad=True)
    pw = torch.randn(O, C, 1, 1, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = pconv_pointwise(x, w, pw)
    # x itself (not a copy), t = conv(x[:, :cp]) of cp channels, and the two weights.
    assert sum(t.numel() for t in saved) == x.numel() + N * cp * H * W + w.numel() + pw.numel()
    assert any(t is x for t in saved)
    z.sum().backward()
    assert x.grad is not None and w.grad is not None and pw.grad is not None


def test_bad_input():
    x = torch.randn(1, 8, 4, 4)
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="pw_weight must have shape"):
        pconv_pointwise(x, w, torch.randn(4, 7, 1, 1))
    with pytest.raises(ValueError, match="pw_weight must have the dtype"):
        pconv_pointwise(x, w, torch.randn(4, 8, 1, 1).double())
    with pytest.raises(ValueError, match="cp must be in 1..C"):
        pconv_pointwise(x, torch.randn(9, 9, 3, 3), torch.randn(4, 8, 1, 1))
    with pytest.raises(ValueError, match="stride"):
        channel_partial_conv2d(x, w, stride=2)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channel_sliced"])
def test_other_layouts_and_partial_gradients(layout):
    """Inputs that are neither NCHW nor channels_last (made contiguous first), and backward with only
    some of the gradients asked for (each path: grad_pw only, grad_x only, grad_weight only)."""
    N, C, H, W, cp, O = 2, 10, 7, 9, 3, 6
    g = torch.Generator().manual_seed(7)
    base = torch.randn(N, C, H, W, generator=g)
    if layout == "transposed":
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = torch.zeros(N, C, H, 2 * W)
        x[..., ::2] = base
        x = x[..., ::2]
    else:  # NCHW planes with a channel stride larger than H * W
        x = torch.zeros(N, C + 3, H, W)
        x[:, 2:2 + C] = base
        x = x[:, 2:2 + C]
    w = torch.randn(cp, cp, 3, 3, generator=g) / 3
    pw = torch.randn(O, C, 1, 1, generator=g) / C**0.5
    gz = torch.randn(N, O, H, W, generator=g)
    ref_leaves = [t.double().requires_grad_() for t in (base, w, pw)]
    zr = F.conv2d(channel_partial_conv2d(ref_leaves[0], ref_leaves[1]), ref_leaves[2])
    want = torch.autograd.grad(zr, ref_leaves, gz.double())
    for k in range(3):
        leaves = [t.clone() if i != 0 else x for i, t in enumerate((x, w, pw))]
        leaves[k] = leaves[k].detach().clone().requires_grad_() if k else x.detach().requires_grad_()
        z = pconv_pointwise(*leaves)
        torch.testing.assert_close(z.double(), zr.detach(), rtol=1e-4, atol=1e-4)
        (got,) = torch.autograd.grad(z, [leaves[k]], gz)
        torch.testing.assert_close(got.double(), want[k], rtol=1e-4, atol=1e-4)
