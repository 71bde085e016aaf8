"""Sparse, chunked and local attention: ``sparse_attention`` (one fused online-softmax kernel for
causal, sliding-window, chunked, dilated and global-token patterns, forward and backward, CPU and
CUDA) and ``AttentionPattern`` (the same pattern as an object: ``materialize``, ``density``, ``flops``).

``trous.nn.SparseMultiheadAttention`` (``module``) is the multi-head layer: projections, optional rotary
embedding, GQA, weights loadable from ``nn.MultiheadAttention``.

``block_mask`` holds ``BlockMask`` (block-sparse layouts, FlexAttention's BlockMask converted), ``pattern``
the pattern and its rules, ``sparse`` the function and the autograd of the ops, ``layouts`` the layouts
of the seed papers (BigBird, Scale-DiT, NATTEN's 2-D neighbourhoods) and LongNet's dilated attention
(``trous.longnet_attention``), ``reference`` the slow fp64 reference with the materialised mask,
``bench`` and ``smoke`` the cases of ``python -m trous.bench --family attention`` / ``trous.smoke``.
"""
from .block_mask import BlockMask
from .layouts import bigbird, bigbird_layout, longnet_attention, neighborhood_2d, scale_dit
from .module import SparseMultiheadAttention
from .pattern import AttentionPattern
from .sparse import sparse_attention, sparse_attention_varlen

TOP_LEVEL = ("sparse_attention", "sparse_attention_varlen", "AttentionPattern", "BlockMask", "longnet_attention")
# The layers, as trous.nn.SparseMultiheadAttention (module.py).
NN = ("SparseMultiheadAttention",)

__all__ = ["sparse_attention", "sparse_attention_varlen", "AttentionPattern", "BlockMask", "SparseMultiheadAttention",
           "bigbird", "bigbird_layout", "longnet_attention", "neighborhood_2d", "scale_dit"]
