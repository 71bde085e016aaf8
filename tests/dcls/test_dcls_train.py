"""A small ConvNeXt-style network with Dcls2d trains: under torch.compile (loss goes down) and under
DistributedDataParallel (gloo, 2 CPU processes) with the gradients of the single-process run.

torch.compile uses the aot_eager backend (dynamo + AOT autograd through the ops' fake kernels, a few
seconds); TROUS_TEST_COMPILE_BACKEND=inductor also generates code (passes, ~80 s on 2 cores)."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import trous


class Block(nn.Module):
    """ConvNeXt block with a DCLS depthwise convolution (as in ConvNeXt-dcls)."""

    def __init__(self, dim, kernel_count=6, dks=7, version="gauss", strategy="auto"):
        super().__init__()
        self.dwconv = trous.Dcls2d(dim, dim, kernel_count, dilated_kernel_size=dks, padding=dks // 2, groups=dim,
                                   version=version, strategy=strategy)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def make_model(seed=0, dim=16, classes=5, version="gauss", strategy="auto"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, dim, 2, stride=2), Block(dim, version=version, strategy=strategy),
                         Block(dim, version=version, strategy=strategy), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(dim, classes))


def make_data(n=16, seed=1, classes=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("version", ["gauss", "v1"])
def test_trains_under_torch_compile(version):
    model = make_model(version=version)
    compiled = torch.compile(model, backend=os.environ.get("TROUS_TEST_COMPILE_BACKEND", "aot_eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    x, y = make_data()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for blk in (model[1], model[2]):  # positions and widths learn too
        assert blk.dwconv.P.grad is not None and blk.dwconv.P.grad.abs().sum() > 0
        if version == "gauss":
            assert blk.dwconv.SIG.grad.abs().sum() > 0


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y = make_data()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        F.cross_entropy(model(x[shard]), y[shard]).backward()  # DDP averages the gradients over ranks
        torch.save(_grads(model.module), os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks reach teardown before either closes its gloo pairs: a rank whose peer hung up
        # mid-exchange aborts ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo needed")
def test_ddp_gradients_equal_single_process():
    model = make_model()
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    want = _grads(model)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        got = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    assert set(got[0]) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[0][name], got[1][name], rtol=0, atol=0)  # replicas agree exactly
        torch.testing.assert_close(got[0][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("version,inference_route", [("gauss", "construct"), ("v1", "direct")])
def test_eager_training_takes_the_direct_route_with_the_construct_gradients(version, inference_route):
    """In eager training on CPU "auto" runs the direct depthwise kernels (the cost model's training
    choice); in inference on this small image gauss builds the kernel and v1 (4 taps per element)
    stays direct; both give the outputs and gradients of strategy="construct", and a few steps train."""
    x, y = make_data()
    auto, dense = make_model(version=version), make_model(version=version, strategy="construct")
    h = auto[0](x)
    assert auto[1].dwconv.route(h) == "direct"
    with torch.no_grad():
        assert auto[1].dwconv.route(h) == inference_route
        torch.testing.assert_close(auto(x), dense(x), rtol=1e-5, atol=1e-5)
    F.cross_entropy(auto(x), y).backward()
    F.cross_entropy(dense(x), y).backward()
    for (name, a), (_, b) in zip(auto.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    opt = torch.optim.AdamW(auto.parameters(), lr=2e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(auto(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
