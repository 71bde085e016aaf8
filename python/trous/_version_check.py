"""The import-time check that the running torch is the one ``trous._C`` was compiled against.

A C++ extension is bound to the exact torch it was built with: next to another torch it fails to load
with an undefined symbol (or loads and misbehaves). ``import trous`` therefore reads the build's
``_build_info.json`` (written by setup.py) before it loads the extension, and on a mismatch of
torch's major.minor.patch, or of the CUDA major when the build has CUDA kernels, raises an
ImportError that names both versions and says how to rebuild. Without a ``_build_info.json`` (a
source checkout before its first build) the check is skipped and the extension reports for itself.
``TROUS_SKIP_TORCH_CHECK=1`` skips it for those who know better. Torch-free at module level.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional, Tuple

SKIP_ENV = "TROUS_SKIP_TORCH_CHECK"
BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def build_info(path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The build's ``_build_info.json`` (or ``path``), or None when there is none (or it is unreadable)."""
    try:
        with open(path or BUILD_INFO) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def release(version: Optional[str]) -> Optional[Tuple[int, int, int]]:
    """'2.14.1+cu130' -> (2, 14, 1); '2.15.0a0+git12ab' -> (2, 15, 0); None when unparsable."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version or ""))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def cuda_major(version: Optional[str]) -> Optional[int]:
    """'13.0' -> 13; None for a CPU-only torch."""
    m = re.match(r"^\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else None


def mismatch(info: Dict[str, Any], torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """Why a build described by ``info`` cannot load next to this torch, or None when it can."""
    built = info.get("torch")
    if built and release(built) and release(built) != release(torch_version):
        return f"torch {built}, but the running torch is {torch_version}"
    if info.get("cuda_kernels"):
        built_cuda = info.get("cuda") or info.get("torch_cuda")
        if cuda_major(built_cuda) != cuda_major(torch_cuda):
            running = f"CUDA {torch_cuda}" if torch_cuda else "no CUDA (a CPU-only torch)"
            return f"torch {built} with CUDA {built_cuda} kernels, but the running torch {torch_version} has {running}"
    return None


def message(info: Dict[str, Any], why: str) -> str:
    version = info.get("version") or "?"
    requires = " ".join(info.get("requires") or []) or f"torch=={str(info.get('torch')).split('+')[0]}"
    return (
        f"trous {version} was built against {why}. A C++ extension only loads with the torch it was "
        f"compiled against. Either install that torch (pip install '{requires}'), or rebuild trous against "
        f"the running one: from a source checkout or an unpacked sdist, pip install --no-build-isolation "
        f"--force-reinstall --no-deps . (or make build). Set {SKIP_ENV}=1 to skip this check."
    )


def check() -> None:
    """Raises ImportError when the running torch is not the one this build needs (see the module doc)."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    info = build_info()
    if info is None:
        return
    import torch

    why = mismatch(info, torch.__version__, torch.version.cuda)
    if why:
        raise ImportError(message(info, why))
