"""Shared fixtures: the devices to test on (CPU always, CUDA when a GPU is present). Shared helper
functions live in tests/helpers.py (``from helpers import close``; pyproject puts tests/ on the path)."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
