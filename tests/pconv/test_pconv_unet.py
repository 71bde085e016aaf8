"""PConv-UNet (Liu et al. 2018 shape, reduced width) built from trous.nn.PartialConv2d: matches the same
network built from NVIDIA's reference layer in mode="nvidia" (outputs, masks and every gradient),
and trains for a few steps on random masks with the loss going down (exact and nvidia modes)."""

import pytest
import torch

import trous
import trous.nn
from trous.pconv.reference import NvidiaPartialConv2d
from trous.pconv.unet import PConvUNet


def _batch(g, n=2, c=3, hw=32):
    img = torch.rand(n, c, hw, hw, generator=g) * 2 - 1
    # Random irregular holes: blocks of holes on a 4x4 grid plus isolated pixels, the same for each channel.
    m = (torch.rand(n, 1, hw // 4, hw // 4, generator=g) > 0.3).float()
    m = m.repeat_interleave(4, 2).repeat_interleave(4, 3)
    m = m * (torch.rand(n, 1, hw, hw, generator=g) > 0.05).float()
    return img, m.expand(n, c, hw, hw).contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unet_matches_the_reference_layer_network(dtype):
    torch.manual_seed(0)
    net = PConvUNet(3, (8, 16, 16, 16), mode="nvidia").to(dtype)
    ref = PConvUNet(3, (8, 16, 16, 16), layer=NvidiaPartialConv2d).to(dtype)
    ref.load_state_dict(net.state_dict())  # same parameter names as NVIDIA's layer
    assert isinstance(net.enc[0].conv, trous.nn.PartialConv2d) and trous.nn.PConvUNet is PConvUNet
    g = torch.Generator().manual_seed(1)
    img, m = _batch(g)
    img, m = img.to(dtype), m.to(dtype)
    with torch.no_grad():  # the inference route (in-place epilogue)
        out0, _ = net(img * m, m)
    out, mask = net(img * m, m)
    want, want_mask = ref(img * m, m)
    torch.testing.assert_close(out0, out, rtol=0, atol=0)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    torch.testing.assert_close(mask, want_mask, rtol=0, atol=0)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    net(img * m, m)[0].backward(go)
    ref(img * m, m)[0].backward(go)
    n_checked = 0
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        torch.testing.assert_close(p.grad, q.grad, rtol=tol * 10, atol=tol * 10, msg=name)
        n_checked += 1
    assert n_checked == len(list(ref.parameters())) > 10


@pytest.mark.parametrize("mode", ["exact", "nvidia"])
def test_unet_trains_on_random_masks(mode):
    torch.manual_seed(2)
    net = PConvUNet(3, (8, 16, 16, 16), mode=mode)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    img, m = _batch(g, n=4)
    losses = []
    for _ in range(12):
        out, _ = net(img * m, m)
        # Liu et al.'s L_hole + L_valid (the perceptual and style terms need a VGG).
        loss = ((1 - m) * (out - img)).abs().mean() * 6 + (m * (out - img)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
