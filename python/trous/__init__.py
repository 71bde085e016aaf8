"""trous: hand-written CPU and CUDA kernels for the operators that skip work.

Loading the package loads the compiled library ``trous._C``, which registers every op under
``torch.ops.trous``; ``trous.ops`` holds their Python-facing functions.
"""
import torch  # noqa: F401  (the extension links against the already-loaded torch)

from . import _C  # noqa: F401  (registers the ops)
from . import ops
from . import kvcache
from . import _dcls_conv  # noqa: F401  (fake kernels and autograd of dcls_conv)
from . import _dcls_banded  # noqa: F401  (fake kernels and autograd of dcls_banded_conv1d)
from . import dcls
from .dcls import (ConstructKernel1d, ConstructKernel2d, ConstructKernel3d, ConstructKernel3_1d, Dcls1d, Dcls2d,
                   Dcls2dK1d, Dcls3_1d, Dcls3d)

__version__ = "0.1.0"

__all__ = ["ops", "kvcache", "dcls", "Dcls1d", "Dcls2d", "Dcls3d", "Dcls3_1d", "Dcls2dK1d", "ConstructKernel1d",
           "ConstructKernel2d", "ConstructKernel3d", "ConstructKernel3_1d", "__version__"]
