"""Sparse, chunked and local attention: ``sparse_attention`` (one fused online-softmax kernel for
causal, sliding-window, chunked, dilated and global-token patterns, forward and backward, CPU and
CUDA) and ``AttentionPattern`` (the same pattern as an object: ``materialize``, ``density``, ``flops``).

``pattern`` holds the pattern and its rules, ``sparse`` the function and the autograd of the ops,
``reference`` the slow fp64 reference with the materialised mask, ``bench`` and ``smoke`` the cases
of ``python -m trous.bench --family attention`` / ``trous.smoke``.
"""
from .pattern import AttentionPattern
from .sparse import sparse_attention

TOP_LEVEL = ("sparse_attention", "AttentionPattern")

__all__ = ["sparse_attention", "AttentionPattern"]
