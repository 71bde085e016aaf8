"""DCLS (dilated convolution with learnable spacings): drop-in modules for the ``dcls`` 0.1.1 package.

``modules`` holds the layers; ``construct``, ``conv`` and ``banded`` the three sub-ops (fused kernel
construction, direct depthwise convolution, banded grouped 1-D convolution) with their
autograd and cost models; ``versions`` the version names; ``reference`` the slow reference written
from the spec; ``bench`` and ``smoke`` the cases of ``python -m trous.bench`` / ``trous.smoke``.
"""
from . import banded, construct, conv  # noqa: F401  (autograd of the ops)
from .modules import (
                      STRATEGIES,
                      VERSIONS,
                      ConstructKernel1d,
                      ConstructKernel2d,
                      ConstructKernel3_1d,
                      ConstructKernel3d,
                      Dcls1d,
                      Dcls2d,
                      Dcls2dK1d,
                      Dcls3_1d,
                      Dcls3d,
                      construct_kernel,
)

__all__ = ["construct_kernel", "ConstructKernel1d", "ConstructKernel2d", "ConstructKernel3d", "ConstructKernel3_1d",
           "Dcls1d", "Dcls2d", "Dcls3d", "Dcls3_1d", "Dcls2dK1d", "VERSIONS", "STRATEGIES"]

# Exported by trous itself (trous.Dcls2d), as the dcls package's module names.
TOP_LEVEL = ("Dcls1d", "Dcls2d", "Dcls3d", "Dcls3_1d", "Dcls2dK1d", "ConstructKernel1d", "ConstructKernel2d",
             "ConstructKernel3d", "ConstructKernel3_1d")

# trous.nn's DCLS layers.
NN = TOP_LEVEL
