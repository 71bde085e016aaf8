"""`python -m trous.bench`: times every trous op against its baselines.

Each op family's ``trous.<family>.bench`` module (found by name) has ``FAMILY`` (the name
``--family`` takes, e.g. "kv"), ``cases(device, quick, shape=None) -> list[Case]`` and
``targets(device) -> dict``. A new family adds that module and edits nothing here.
"""
from typing import Dict

from .. import _families


def _discover() -> Dict[str, str]:
    found = {}
    for family in _families.names():
        mod = _families.submodule(family, "bench")
        if mod is not None:
            found[getattr(mod, "FAMILY", family)] = mod.__name__
    return found


# bench family name -> module name, e.g. {"kv": "trous.kvcache.bench", "dcls": "trous.dcls.bench"}.
FAMILIES: Dict[str, str] = _discover()


def load_family(name: str):
    """The bench module of a family."""
    import importlib

    if name not in FAMILIES:
        raise KeyError(f"unknown benchmark family {name!r}; found: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])


__all__ = ["FAMILIES", "load_family"]
