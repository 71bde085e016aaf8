"""Shared test fixtures: the devices to test on (CPU always, CUDA when a GPU is present)."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a, b, rtol):
    """max |a - b| <= rtol * max(max |b|, 1e-3), in fp64."""
    scale = max(b.abs().max().item(), 1e-3)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rtol * scale, f"max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def dcls_package_modules():
    """The dcls 0.1.1 package's DCLS.construct.modules, or a pytest skip saying how to install it."""
    try:
        from DCLS.construct import modules
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the dcls package (pip install --no-deps dcls==0.1.1) is not importable: {e}")
    return modules
