"""The op families: every subpackage of trous (one per folder of csrc/), found by name, never listed.

A family package may hold ``bench`` (cases for ``python -m trous.bench``), ``smoke`` (cases for
``python -m trous.smoke``) and ``reference`` modules, and names in ``TOP_LEVEL`` the objects that
``trous`` itself exports. Adding a family adds its folder and edits nothing else.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import List, Optional

# Subpackages of trous that are tools or integrations (trous.hf: transformers), not op families.
_TOOLS = frozenset({"bench", "hf"})


def names() -> List[str]:
    """Every family's package name, sorted."""
    here = str(Path(__file__).parent)
    return sorted(m.name for m in pkgutil.iter_modules([here])
                  if m.ispkg and not m.name.startswith("_") and m.name not in _TOOLS)


def submodule(family: str, name: str) -> Optional[ModuleType]:
    """``trous.<family>.<name>`` imported, or None when the family has no such module."""
    full = f"trous.{family}.{name}"
    if importlib.util.find_spec(full) is None:
        return None
    return importlib.import_module(full)
