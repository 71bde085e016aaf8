"""Helpers of the DCLS tests: the versions (written from the spec, not read from trous) and the
dcls 0.1.1 peer package (tests that need it skip with a message saying how to install it)."""
import pytest

VERSIONS = ["v0", "v1", "max", "gauss"]

try:
    from DCLS.construct import modules as dcls_pkg
    _NO_DCLS = None
except Exception as e:  # ImportError, or an incompatible torch
    dcls_pkg = None
    _NO_DCLS = f"the dcls package is not importable ({e!r}); install it with pip install --no-deps dcls==0.1.1"

needs_dcls = pytest.mark.skipif(dcls_pkg is None, reason=_NO_DCLS or "")


def dcls_package_modules():
    """The dcls 0.1.1 package's DCLS.construct.modules, or a pytest skip saying how to install it."""
    if dcls_pkg is None:
        pytest.skip(_NO_DCLS)
    return dcls_pkg
