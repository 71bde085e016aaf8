"""Helpers shared by the tests of every family: seeded generators, tolerances, device checks."""
import torch


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a, b, rtol):
    """max |a - b| <= rtol * max(max |b|, 1e-3), in fp64."""
    scale = max(b.abs().max().item(), 1e-3)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rtol * scale, f"max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def output_and_grads(tensors, forward, seed=99):
    """forward(*leaves) on fresh leaf copies of tensors, and the gradients of every leaf that is not
    None for a seeded random grad_out."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = forward(*leaves)
    g = torch.randn(out.shape, generator=seeded(seed), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], g)
    return out.detach(), grads


def assert_matches_on_device(tensors, run_impl, run_ref, device):
    """fp32 copies of (x, parameters...) on device through run_impl (tensors -> (out, grads))
    against run_ref on the fp64 CPU originals."""
    on_dev = [t.float().to(device) if t is not None else None for t in tensors]
    out, grads = run_impl(on_dev)
    rout, rgrads = run_ref(tensors)
    assert out.device.type == device
    close(out.cpu(), rout, 2e-5)
    for a, b in zip(grads, rgrads):
        close(a.cpu(), b, 1e-4)


def assert_cuda_low_precision(tensors, run_impl, run_ref, dtype):
    """x in fp16 / bf16 on CUDA (parameters fp32) through run_impl against run_ref on the fp64 CPU
    copy of that rounded x: the output keeps x's dtype, errors within its precision."""
    low = [tensors[0].to(dtype).cuda()] + [t.float().cuda() if t is not None else None for t in tensors[1:]]
    out, grads = run_impl(low)
    rout, rgrads = run_ref([low[0].double().cpu()] + list(tensors[1:]))
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    close(out.cpu(), rout, tol)
    for a, b in zip(grads, rgrads):
        close(a.cpu(), b, 2 * tol)
