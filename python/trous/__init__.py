"""trous: hand-written CPU and CUDA kernels for the operators that skip work.

Loading the package loads the compiled library ``trous._C``, which registers every op under
``torch.ops.trous``, then each op family's package (``trous.kvcache``, ``trous.dcls``, ...), which
registers the autograd of its ops (the fake kernels are the C++ Meta kernels); ``trous.ops`` names the ops.
"""
import importlib as _importlib

import torch  # noqa: F401  (the extension links against the already-loaded torch)

from ._version_check import check as _check_torch

# Before the extension loads: next to another torch than the one it was built against, one clear
# ImportError (both versions, how to rebuild) instead of an undefined symbol. TROUS_SKIP_TORCH_CHECK=1 skips it.
_check_torch()

from . import (  # noqa: E402
    _C,  # noqa: F401  (registers the ops)
    _families,
    ops,
)

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]

# Families are found by name (trous._families); each one's TOP_LEVEL names are exported here.
for _name in _families.names():
    _family = _importlib.import_module(f".{_name}", __name__)
    globals()[_name] = _family
    __all__.append(_name)
    for _export in getattr(_family, "TOP_LEVEL", ()):
        globals()[_export] = getattr(_family, _export)
        __all__.append(_export)
del _name, _family, _export

from . import nn  # noqa: E402, F401  (every family's layers: trous.nn.Dcls2d, trous.nn.PConv2d, ...)

__all__.append("nn")
