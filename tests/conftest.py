"""Shared fixtures: the devices to test on (CPU always, CUDA when a GPU is present), and the
hypothesis profiles of the property suite. Shared helper functions live in tests/helpers.py and
tests/props.py (``from helpers import close``; pyproject puts tests/ on the path)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# "default" (make test): few examples, derandomized so that CI is repeatable. "fuzz" (make fuzz):
# many random examples; a failure prints the seed (--hypothesis-seed) and a @reproduce_failure blob.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("default", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=int(os.environ.get("TROUS_FUZZ_EXAMPLES", "1000")), deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("TROUS_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
