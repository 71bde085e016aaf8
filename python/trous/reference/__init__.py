"""Slow, obviously-correct references written from the specs (one module per family), used by the
tests and as the plain-PyTorch baselines of the benchmarks."""
from . import kvcache  # noqa: F401
from . import dcls  # noqa: F401
