"""``trous.nn``: the layers of every family in one namespace (``trous.nn.Dcls2d``,
``trous.nn.PConv2d``, ``trous.nn.PartialConv2d``, ``trous.nn.convert_fasternet``, ...).

Each family names its layers (and model converters) in ``NN``; they are found by name, like the
families themselves, so a new family edits nothing here.
"""
import importlib as _importlib

from . import _families

__all__ = []

for _name in _families.names():
    _family = _importlib.import_module(f"trous.{_name}")
    for _export in getattr(_family, "NN", ()):
        globals()[_export] = getattr(_family, _export)
        __all__.append(_export)
del _name, _family, _export
