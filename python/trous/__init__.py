"""trous: hand-written CPU and CUDA kernels for the operators that skip work.

Loading the package loads the compiled library ``trous._C``, which registers every op under
``torch.ops.trous``; ``trous.ops`` holds their Python-facing functions.
"""
import torch  # noqa: F401  (the extension links against the already-loaded torch)

from . import _C  # noqa: F401  (registers the ops)
from . import ops
from . import kvcache

__version__ = "0.1.0"

__all__ = ["ops", "kvcache", "__version__"]
