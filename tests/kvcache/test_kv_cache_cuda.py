"""The cache ops on CUDA (run by bench/gpu_check.sh's `-k cuda` stage; skipped without a GPU): the same
appends on a CPU and a CUDA trous.QuantizedKVCache give bit-identical codes, parameters, rings and lengths
(the spec's CPU = GPU codes rule), decode agrees with the CPU op, and one decode step's append of a layer
is one kernel launch (issue 13)."""
import pytest
import torch

import trous

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = [("kivi", 2, False, torch.float16), ("kivi", 4, True, torch.bfloat16), ("per_token", 4, True, torch.float16),
           ("symmetric", 8, False, torch.bfloat16), ("fp8", 8, True, torch.float16)]


def _caches(scheme, bits, paged, dtype):
    kw = dict(num_layers=1, num_kv_heads=4, head_dim=128, bits=bits, scheme=scheme, group_size=32, residual=32,
              paged=paged, page_size=32, max_batch=3, max_tokens=256, dtype=dtype, fp8_scale=0.05)
    return trous.QuantizedKVCache(device="cpu", **kw), trous.QuantizedKVCache(device="cuda", **kw)


@pytest.mark.parametrize("scheme,bits,paged,dtype", CONFIGS)
def test_cuda_append_and_decode_match_cpu(scheme, bits, paged, dtype):
    cpu, gpu = _caches(scheme, bits, paged, dtype)
    g = torch.Generator().manual_seed(0)
    for n in (70, 1, 1, 33, 1):  # a prefill past the ring, decode steps, a chunk crossing groups and pages
        k = torch.randn(3, 4, n, 128, generator=g).to(dtype)
        v = torch.randn(3, 4, n, 128, generator=g).to(dtype)
        cpu.append(0, k, v)
        gpu.append(0, k.cuda(), v.cuda())
        a, b = cpu.layer_tensors(0), gpu.layer_tensors(0)
        for name in a:
            if torch.is_tensor(a[name]):
                assert torch.equal(a[name], b[name].cpu()), f"{name} differs after appending {n} tokens"
        q = torch.randn(3, 16, 1, 128, generator=g).to(dtype)
        out_c, lse_c = cpu.attend(0, q, return_lse=True)
        out_g, lse_g = gpu.attend(0, q.cuda(), return_lse=True)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(out_g.cpu().float(), out_c.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse_g.cpu(), lse_c, rtol=1e-3, atol=1e-3)


def test_cuda_append_of_a_decode_step_is_one_launch():
    _, gpu = _caches("kivi", 2, True, torch.float16)
    k = torch.randn(3, 4, 40, 128, device="cuda", dtype=torch.float16)
    gpu.append(0, k, k)
    step = torch.randn(3, 4, 1, 128, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gpu.append(0, step, step)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == 1, kernels
