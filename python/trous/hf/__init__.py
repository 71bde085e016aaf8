"""Hugging Face transformers integration (optional dependency ``trous[hf]``, imported lazily).

- ``trous.hf.register()``: registers the "trous" attention implementation with transformers'
  ``AttentionInterface`` (``attention.py``, sparse attention family).
- ``trous.hf.QuantizedCache``: a transformers ``Cache`` over ``trous.QuantizedKVCache``
  (``cache.py``, KV-cache family).

Importing ``trous.hf`` does not import transformers; the first use does, and raises an ImportError
that says how to install it when it is missing.
"""
import importlib

__all__ = ["register", "QuantizedCache"]

# Public name -> (submodule, attribute): each family's integration lives in its own file.
_LAZY = {
    "register": ("attention", "register"),
    "QuantizedCache": ("cache", "QuantizedCache"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'trous.hf' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


def require_transformers():
    """Imports and returns transformers, or raises an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("trous.hf needs the transformers package: pip install 'trous[hf]' "
                          "(or pip install transformers)") from e
    return transformers
