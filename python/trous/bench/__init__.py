"""`python -m trous.bench`: times every trous op against its plain-PyTorch baseline.

Families are modules of this package with ``cases(device, quick, shape=None) -> list[Case]`` and
``targets(device) -> dict``; a new family adds its module and one line to ``FAMILIES``.
"""
import importlib
from typing import Dict

# family name -> module (relative to this package). One line per family.
FAMILIES: Dict[str, str] = {
    "kv": ".kvcache",
    "dcls": ".dcls",
}


def load_family(name: str):
    """The module of a registered family."""
    if name not in FAMILIES:
        raise KeyError(f"unknown benchmark family {name!r}; registered: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name], __name__)


__all__ = ["FAMILIES", "load_family"]
