"""Shared test fixtures: the devices to test on (CPU always, CUDA when a GPU is present)."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
