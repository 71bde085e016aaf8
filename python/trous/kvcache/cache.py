"""``trous.QuantizedKVCache``: a quantized KV cache (all layers of a model) that attention reads directly.

The cache owns, per layer, the tensors laid out in ``csrc/kvcache/cache.h``; ``append`` quantizes a step's
keys and values into it with one ``trous::kv_append`` call and ``attend`` runs
``trous::quantized_decode_attention`` over the quantized tokens plus the full-precision residual.

Formats (``scheme``, ``bits``): "kivi" 2 / 4 / 8 (keys per channel over ``group_size`` tokens, values per token
over ``group_size`` channels), "per_token" 2 / 4 / 8 (groups of ``group_size`` channels of each (token, head)),
"symmetric" int8, "fp8" (e4m3 / e5m2 with a fixed fp32 scale per tensor or per KV head). The ``residual``
most recent tokens of every sequence stay in full precision (KIVI: plus the up to G - 1 tokens of an
incomplete key group); older tokens are quantized once, never re-quantized.

Layouts: contiguous (``paged=False``: every sequence owns ``max_tokens`` token slots) or paged
(``paged=True``: a pool of ``num_pages`` pages of ``page_size`` tokens shared by all sequences, handed out as
sequences grow and given back by ``free(seq)``; one block table for all layers).

Lengths are tracked on the host as well, so capacity is checked before any op runs (a CUDA kernel cannot
check without a device sync) and a call that raises changes nothing.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from . import cache_ops

__all__ = ["QuantizedKVCache", "SCHEMES"]

SCHEMES = ("kivi", "per_token", "symmetric", "fp8")
FP8_FORMATS = {"e4m3": 448.0, "e5m2": 57344.0}

SeqsArg = Union[None, int, range, slice, Sequence[int], torch.Tensor]


def _ops():
    """The op namespace (looked up at call time, so tests can substitute it)."""
    return torch.ops.trous


class QuantizedKVCache:
    """A quantized KV cache for ``num_layers`` attention layers of ``num_kv_heads`` heads of ``head_dim``.

    Args:
        num_layers, num_kv_heads, head_dim: the model's layers, KV heads (Hkv) and head dimension (D).
        bits: 2, 4 or 8 for "kivi" / "per_token" (default 4); 8 for "symmetric" and "fp8" (the default there).
        scheme: "kivi" (default), "per_token", "symmetric" (int8) or "fp8".
        group_size: G, channels per parameter group (D % G == 0; "kivi": also tokens per key group).
            Default min(32, D). Ignored by "fp8".
        residual: R, the most recent tokens kept in full precision (a multiple of G for "kivi"). Default 128.
        paged: page pool + block table (True) or one slab of ``max_tokens`` per sequence (False).
        page_size: tokens per page (paged; a multiple of G for "kivi"). Default 64 (a multiple of G).
        max_batch: sequences the cache holds at once.
        max_tokens: tokens per sequence (contiguous: the slab; paged: the block table's reach).
        num_pages: pages in the pool (paged). Default: enough for every sequence at ``max_tokens``.
        dtype: activation dtype (float16, bfloat16, float32); the residual is kept in it and ``append`` /
            ``attend`` take and return it.
        device: where the tensors live.
        fp8_format: "e4m3" or "e5m2" ("fp8" only).
        fp8_scale: fp8 scale: a float or fp32 tensor [] / [Hkv] used for keys and values of every layer, or
            None: each layer's key and value scales are calibrated on its first append (amax / fp8 max of that
            append, per KV head if ``fp8_per_head``) and fixed afterwards.
        fp8_per_head: calibrate one scale per KV head instead of one per tensor.
        growable: a contiguous cache that would overflow ``max_tokens`` reallocates (doubling) instead of
            raising (used by ``trous.hf.QuantizedCache``). Paged caches never grow.

    Tensors of layer ``l`` (``layer_tensors(l)``): codes [pages, Hkv, page_size, D*bits/8] (uint8; int8 for
    symmetric), params [pages, Hkv, page_size, D/G, 2|1] (KIVI keys [pages, Hkv, page_size/G, D, 2]; fp8: the
    scale), residual [max_batch, Hkv, R + g - 1, D] (g = G for KIVI, else 1), lengths int32 [max_batch].
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, bits: Optional[int] = None,
                 scheme: str = "kivi", group_size: Optional[int] = None, residual: int = 128, paged: bool = False,
                 page_size: Optional[int] = None, max_batch: int = 1, max_tokens: int = 4096,
                 num_pages: Optional[int] = None, dtype: torch.dtype = torch.float16,
                 device: Union[str, torch.device] = "cpu", fp8_format: str = "e4m3",
                 fp8_scale: Union[None, float, torch.Tensor] = None, fp8_per_head: bool = False,
                 growable: bool = False):
        if scheme not in SCHEMES:
            raise ValueError(f"QuantizedKVCache: scheme must be one of {SCHEMES}, got {scheme!r}")
        if bits is None:
            bits = 8 if scheme in ("symmetric", "fp8") else 4
        if scheme in ("symmetric", "fp8") and bits != 8:
            raise ValueError(f"QuantizedKVCache: scheme {scheme!r} stores 8 bits, got bits={bits}")
        if bits not in (2, 4, 8):
            raise ValueError(f"QuantizedKVCache: bits must be 2, 4 or 8, got {bits}")
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_batch", max_batch), ("max_tokens", max_tokens)):
            if int(value) < 1:
                raise ValueError(f"QuantizedKVCache: {name} must be >= 1, got {value}")
        if head_dim % 8:
            raise ValueError(f"QuantizedKVCache: head_dim must be a multiple of 8, got {head_dim}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"QuantizedKVCache: dtype must be float16, bfloat16 or float32, got {dtype}")
        if fp8_format not in FP8_FORMATS:
            raise ValueError(f"QuantizedKVCache: fp8_format must be one of {sorted(FP8_FORMATS)}, got {fp8_format!r}")
        if residual < 0:
            raise ValueError(f"QuantizedKVCache: residual must be >= 0, got {residual}")
        if group_size is None:
            group_size = min(32, head_dim)
        if scheme != "fp8":
            if group_size < 1 or head_dim % group_size:
                raise ValueError(f"QuantizedKVCache: group_size must divide head_dim {head_dim}, got {group_size}")
            if (group_size * bits) % 8:
                raise ValueError(f"QuantizedKVCache: group_size * bits must be a multiple of 8, got {group_size} * "
                                 f"{bits}")
        if scheme == "kivi" and residual % group_size:
            raise ValueError(f"QuantizedKVCache: residual must be a multiple of group_size {group_size} for KIVI, "
                             f"got {residual}")
        self.num_layers, self.num_kv_heads, self.head_dim = int(num_layers), int(num_kv_heads), int(head_dim)
        self.scheme, self.bits, self.group_size, self.residual = scheme, int(bits), int(group_size), int(residual)
        self.fp8_format, self.fp8_per_head = fp8_format, bool(fp8_per_head)
        self.dtype, self.device = dtype, torch.device(device)
        self.paged, self.max_batch, self.max_tokens = bool(paged), int(max_batch), int(max_tokens)
        self.growable = bool(growable) and not self.paged
        self.token_group = cache_ops.token_group(scheme, group_size)
        self.residual_capacity = cache_ops.residual_capacity(scheme, group_size, residual)
        # Parameters: fp16 for fp16 activations (half the bytes, fp16 holds fp16's range), else fp32.
        self.param_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        if self.paged:
            if page_size is None:
                page_size = 64 if 64 % self.token_group == 0 else self.token_group
            if page_size < 1 or page_size % self.token_group:
                raise ValueError(f"QuantizedKVCache: page_size must be a positive multiple of group_size "
                                 f"{self.token_group} for KIVI, got {page_size}")
            self.page_size = int(page_size)
            self.max_pages = -(-self.max_tokens // self.page_size)
            self.num_pages = int(num_pages) if num_pages is not None else self.max_pages * self.max_batch
            if self.num_pages < 1:
                raise ValueError(f"QuantizedKVCache: num_pages must be >= 1, got {num_pages}")
        else:
            if scheme == "kivi" and self.max_tokens % self.token_group:
                self.max_tokens = -(-self.max_tokens // self.token_group) * self.token_group  # whole key groups
            self.page_size = self.max_tokens
            self.max_pages = 1
            self.num_pages = self.max_batch
        self._fixed_scale = None
        if scheme == "fp8" and fp8_scale is not None:
            s = torch.as_tensor(fp8_scale, dtype=torch.float32)
            if s.dim() > 1 or (s.dim() == 1 and s.numel() != self.num_kv_heads):
                raise ValueError(f"QuantizedKVCache: fp8_scale must be a scalar or have shape [{self.num_kv_heads}], "
                                 f"got {list(s.shape)}")
            if not bool(torch.isfinite(s).all() and (s > 0).all()):
                raise ValueError("QuantizedKVCache: fp8_scale must be finite and positive")
            self._fixed_scale = s.to(self.device)
        self._allocate()

    # ---- storage -------------------------------------------------------------------------------------------
    def _code_bytes(self) -> int:
        return self.head_dim * self.bits // 8

    def _params_shapes(self, pages: int, page_size: int):
        H, D, G = self.num_kv_heads, self.head_dim, self.group_size
        if self.scheme == "fp8":
            return None, None
        n = 1 if self.scheme == "symmetric" else 2
        v = (pages, H, page_size, D // G, n)
        k = (pages, H, page_size // G, D, 2) if self.scheme == "kivi" else v
        return k, v

    def _new_layer(self, pages: int, page_size: int) -> dict:
        H, D, dev = self.num_kv_heads, self.head_dim, self.device
        code_dtype = torch.int8 if self.scheme == "symmetric" else torch.uint8
        kp, vp = self._params_shapes(pages, page_size)
        t = {
            "k_codes": torch.zeros((pages, H, page_size, self._code_bytes()), dtype=code_dtype, device=dev),
            "v_codes": torch.zeros((pages, H, page_size, self._code_bytes()), dtype=code_dtype, device=dev),
        }
        if kp is None:  # fp8: the scales (set by fp8_scale or calibrated on the first append)
            shape = (H,) if self.fp8_per_head else ()
            if self._fixed_scale is not None:
                shape = tuple(self._fixed_scale.shape)
            t["k_params"] = torch.ones(shape, dtype=torch.float32, device=dev)
            t["v_params"] = torch.ones(shape, dtype=torch.float32, device=dev)
            if self._fixed_scale is not None:
                t["k_params"].copy_(self._fixed_scale)
                t["v_params"].copy_(self._fixed_scale)
        else:
            t["k_params"] = torch.zeros(kp, dtype=self.param_dtype, device=dev)
            t["v_params"] = torch.zeros(vp, dtype=self.param_dtype, device=dev)
        res = (self.max_batch, H, self.residual_capacity, D)
        t["k_residual"] = torch.zeros(res, dtype=self.dtype, device=dev)
        t["v_residual"] = torch.zeros(res, dtype=self.dtype, device=dev)
        t["lengths"] = torch.zeros(self.max_batch, dtype=torch.int32, device=dev)
        return t

    def _allocate(self) -> None:
        self._layers = [self._new_layer(self.num_pages, self.page_size) for _ in range(self.num_layers)]
        self._len = [[0] * self.max_batch for _ in range(self.num_layers)]  # host copy of every layer's lengths
        self._calibrated = [self.scheme != "fp8" or self._fixed_scale is not None] * self.num_layers
        if self.paged:
            self.block_table = torch.zeros((self.max_batch, self.max_pages), dtype=torch.int32, device=self.device)
            self._free_pages: List[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first
            self._pages: List[List[int]] = [[] for _ in range(self.max_batch)]
        else:
            self.block_table = None

    def layer_tensors(self, layer: int) -> dict:
        """The tensors of ``layer`` (k_codes, k_params, v_codes, v_params, k_residual, v_residual, lengths)."""
        self._check_layer(layer)
        return self._layers[layer]

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per sequence (int64 [max_batch], host), as layer 0 holds them (every layer holds the
        same once a model step has gone through all of them)."""
        return torch.tensor(self._len[0], dtype=torch.int64)

    def seq_length(self, seq: int = 0, layer: int = 0) -> int:
        """Tokens held by sequence ``seq`` in ``layer``."""
        self._check_layer(layer)
        return self._len[layer][self._check_seq(seq)]

    def capacity(self, seq: int = 0) -> int:
        """Tokens sequence ``seq`` can hold: max_tokens (paged: also bounded by the pages left in the pool)."""
        self._check_seq(seq)
        if not self.paged:
            return self.max_tokens
        reach = (len(self._pages[seq]) + len(self._free_pages)) * self.page_size
        return min(self.max_tokens, reach)

    def quantized_length(self, T: int) -> int:
        """Tokens [0, quantized_length(T)) of a sequence holding T are quantized (cache.h's rule)."""
        return cache_ops.quantized_length(self.scheme, self.group_size, self.residual, T)

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"QuantizedKVCache: layer must be in [0, {self.num_layers}), got {layer!r}")

    def _check_seq(self, seq: int) -> int:
        seq = int(seq)
        if not 0 <= seq < self.max_batch:
            raise IndexError(f"QuantizedKVCache: seq must be in [0, {self.max_batch}), got {seq}")
        return seq

    def _seq_list(self, seqs: SeqsArg, batch: int, arg: str) -> List[int]:
        if seqs is None:
            if batch > self.max_batch:
                raise ValueError(f"QuantizedKVCache: {arg} has batch {batch} > max_batch {self.max_batch}")
            return list(range(batch))
        seqs = self._as_seqs(seqs)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"QuantizedKVCache: seqs has repeated sequences {seqs}")
        if len(seqs) != batch:
            raise ValueError(f"QuantizedKVCache: {arg} has batch {batch} but seqs names {len(seqs)} sequences")
        return seqs

    def _as_seqs(self, seqs: SeqsArg) -> List[int]:
        if isinstance(seqs, int):
            return [self._check_seq(seqs)]
        if isinstance(seqs, slice):
            return list(range(*seqs.indices(self.max_batch)))
        if isinstance(seqs, torch.Tensor):
            seqs = seqs.flatten().tolist()
        return [self._check_seq(s) for s in seqs]

    @staticmethod
    def _runs(seqs: List[int]):
        """(position in seqs, first seq, count) of every run of consecutive sequence ids."""
        i = 0
        while i < len(seqs):
            j = i + 1
            while j < len(seqs) and seqs[j] == seqs[j - 1] + 1:
                j += 1
            yield i, seqs[i], j - i
            i = j

    def _check_kv(self, x: torch.Tensor, arg: str, layer: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"QuantizedKVCache.append: {arg} must be a [batch, Hkv, n_new, D] tensor, got "
                             f"{getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.num_kv_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"QuantizedKVCache.append: {arg} must have Hkv {self.num_kv_heads} heads of D "
                             f"{self.head_dim} (layer {layer}), got shape {list(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"QuantizedKVCache.append: {arg} must be {self.dtype} (the cache's dtype), got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"QuantizedKVCache.append: {arg} must be on {self.device}, got {x.device}")

    # ---- growth / pages ------------------------------------------------------------------------------------
    def _grow(self, tokens: int) -> None:
        """Contiguous, growable: reallocates every layer for at least ``tokens`` tokens per sequence."""
        new_T = max(tokens, 2 * self.max_tokens)
        new_T = -(-new_T // self.token_group) * self.token_group
        G = self.group_size
        for i, old in enumerate(self._layers):
            t = self._new_layer(self.num_pages, new_T)
            T = self.max_tokens
            for name in ("k_codes", "v_codes"):
                t[name][:, :, :T].copy_(old[name])
            if self.scheme != "fp8":
                if self.scheme == "kivi":
                    t["k_params"][:, :, :T // G].copy_(old["k_params"])
                else:
                    t["k_params"][:, :, :T].copy_(old["k_params"])
                t["v_params"][:, :, :T].copy_(old["v_params"])
            else:
                t["k_params"], t["v_params"] = old["k_params"], old["v_params"]
            for name in ("k_residual", "v_residual", "lengths"):
                t[name] = old[name]
            self._layers[i] = t
        self.max_tokens = self.page_size = new_T

    def _reserve(self, seqs: List[int], new_lengths: List[int]) -> None:
        """Makes room for every sequence to hold new_lengths tokens, or raises changing nothing."""
        over = [(s, n) for s, n in zip(seqs, new_lengths) if n > self.max_tokens]
        if over and self.growable:
            self._grow(max(n for _, n in over))
            over = []
        if over:
            s, n = over[0]
            raise ValueError(f"QuantizedKVCache.append: sequence {s} would hold {n} tokens, beyond max_tokens "
                             f"{self.max_tokens}")
        if not self.paged:
            return
        need = [max(0, -(-n // self.page_size) - len(self._pages[s])) for s, n in zip(seqs, new_lengths)]
        if sum(need) > len(self._free_pages):
            raise ValueError(f"QuantizedKVCache.append: the page pool has {len(self._free_pages)} free pages of "
                             f"{self.page_size} tokens, this append needs {sum(need)} (num_pages {self.num_pages}; "
                             "free finished sequences with free(seq))")
        rows = {}
        for s, k in zip(seqs, need):
            for _ in range(k):
                self._pages[s].append(self._free_pages.pop())
            if k:
                rows[s] = self._pages[s]
        for s, pages in rows.items():
            self.block_table[s, :len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def _calibrate(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        from .quantize import fp8_scale
        t = self._layers[layer]
        t["k_params"].copy_(fp8_scale(k, self.fp8_format, self.fp8_per_head))
        t["v_params"].copy_(fp8_scale(v, self.fp8_format, self.fp8_per_head))
        self._calibrated[layer] = True

    # ---- the ops -------------------------------------------------------------------------------------------
    def _views(self, layer: int, first: int, count: int):
        """Arguments of the ops for sequences [first, first + count) of layer (sliced, all contiguous)."""
        t = self._layers[layer]
        sl = slice(first, first + count)
        if self.paged:
            kc, vc, kp, vp = t["k_codes"], t["v_codes"], t["k_params"], t["v_params"]
            bt = self.block_table[sl]
        else:  # contiguous: page b is sequence b, so the pages are sliced too
            kc, vc = t["k_codes"][sl], t["v_codes"][sl]
            if self.scheme == "fp8":
                kp, vp = t["k_params"], t["v_params"]
            else:
                kp, vp = t["k_params"][sl], t["v_params"][sl]
            bt = None
        return kc, kp, vc, vp, t["k_residual"][sl], t["v_residual"][sl], t["lengths"][sl], bt

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, seqs: SeqsArg = None) -> None:
        """Appends this step's keys and values of ``layer``.

        k, v: [batch, Hkv, n_new, D] in the cache's dtype (last dimension contiguous; any other strides).
        seqs: the sequences the batch rows are (ints, a range or slice; default 0 .. batch - 1).
        Tokens the residual rule moves out of the full-precision residual are quantized (one
        ``trous::kv_append`` per run of consecutive sequences). Raises ValueError, changing nothing, when a
        sequence would exceed its capacity (max_tokens, or the free pages of a paged cache).
        """
        self._check_layer(layer)
        self._check_kv(k, "k", layer)
        self._check_kv(v, "v", layer)
        if k.shape != v.shape:
            raise ValueError(f"QuantizedKVCache.append: k and v must have the same shape, got {list(k.shape)} and "
                             f"{list(v.shape)}")
        seqs = self._seq_list(seqs, k.shape[0], "k")
        n_new = k.shape[2]
        if n_new == 0 or not seqs:
            return
        new_lengths = [self._len[layer][s] + n_new for s in seqs]
        self._reserve(seqs, new_lengths)
        if not self._calibrated[layer]:
            self._calibrate(layer, k, v)
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        op = _ops().kv_append
        for pos, first, count in self._runs(seqs):
            op(*self._views(layer, first, count), k[pos:pos + count], v[pos:pos + count], self.scheme, self.bits,
               self.group_size, self.residual, self.fp8_format)
        for s, n in zip(seqs, new_lengths):
            self._len[layer][s] = n

    def attend(self, layer: int, q: torch.Tensor, scale: Optional[float] = None, softcap: float = 0.0,
               return_lse: bool = False, seqs: SeqsArg = None):
        """Attention of ``q`` over ``layer``'s cache (quantized tokens + residual), after this step's append.

        q: [batch, Hq, Sq, D] in the cache's dtype, Hq a multiple of Hkv (GQA). Query s of a sequence holding
        T tokens sits at position T - Sq + s and sees tokens [0, that position] (causal).
        scale: default D ** -0.5. softcap: > 0 applies softcap * tanh(s / softcap) to the scores.
        Returns out [batch, Hq, Sq, D] (and lse fp32 [batch, Hq, Sq], natural log, if ``return_lse``).
        """
        self._check_layer(layer)
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"QuantizedKVCache.attend: q must be a [batch, Hq, Sq, D] tensor, got "
                             f"{getattr(q, 'shape', type(q))}")
        if q.shape[3] != self.head_dim or q.shape[1] % self.num_kv_heads or q.shape[1] == 0:
            raise ValueError(f"QuantizedKVCache.attend: q must have a multiple of Hkv {self.num_kv_heads} heads of D "
                             f"{self.head_dim}, got shape {list(q.shape)}")
        if q.dtype != self.dtype or q.device != self.device:
            raise ValueError(f"QuantizedKVCache.attend: q must be {self.dtype} on {self.device}, got {q.dtype} on "
                             f"{q.device}")
        seqs = self._seq_list(seqs, q.shape[0], "q")
        scale = self.head_dim ** -0.5 if scale is None else float(scale)
        q = q if q.stride(-1) == 1 else q.contiguous()
        op = _ops().quantized_decode_attention
        outs, lses = [], []
        for pos, first, count in self._runs(seqs):
            out, lse = op(q[pos:pos + count], *self._views(layer, first, count), self.scheme, self.bits,
                          self.group_size, self.residual, self.fp8_format, scale, float(softcap))
            outs.append(out)
            lses.append(lse)
        if not outs:
            out = q.new_empty(q.shape)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        else:
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            lse = lses[0] if len(lses) == 1 else torch.cat(lses)
        return (out, lse) if return_lse else out

    # ---- memory --------------------------------------------------------------------------------------------
    def bytes_per_token(self) -> float:
        """Bytes of one quantized token (K and V, all heads and layers), parameters included."""
        H, D, G, L = self.num_kv_heads, self.head_dim, self.group_size, self.num_layers
        codes = 2 * self._code_bytes()
        if self.scheme == "fp8":
            params = 0.0
        else:
            pb = torch.empty((), dtype=self.param_dtype).element_size()
            n = 1 if self.scheme == "symmetric" else 2
            v = D // G * n * pb
            k = D * 2 * pb / G if self.scheme == "kivi" else v
            params = k + v
        return L * H * (codes + params)

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache owns (codes, parameters, residuals, lengths, block table)."""
        total = sum(t.numel() * t.element_size() for layer in self._layers for t in layer.values())
        if self.block_table is not None:
            total += self.block_table.numel() * self.block_table.element_size()
        return total

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empties every sequence (lengths 0, pages back to the pool, fp8 scales re-calibrated if they were)."""
        for layer in range(self.num_layers):
            self._layers[layer]["lengths"].zero_()
            self._len[layer] = [0] * self.max_batch
        self._calibrated = [self.scheme != "fp8" or self._fixed_scale is not None] * self.num_layers
        if self.paged:
            self._free_pages = list(range(self.num_pages - 1, -1, -1))
            self._pages = [[] for _ in range(self.max_batch)]
            self.block_table.zero_()

    def free(self, seq: int) -> None:
        """Empties sequence ``seq`` in every layer; a paged cache returns its pages to the pool."""
        seq = self._check_seq(seq)
        for layer in range(self.num_layers):
            self._layers[layer]["lengths"][seq] = 0
            self._len[layer][seq] = 0
        if self.paged:
            self._free_pages.extend(reversed(self._pages[seq]))
            self._pages[seq] = []
            self.block_table[seq].zero_()

    def free_pages(self) -> int:
        """Pages left in the pool (paged caches; 0 for contiguous ones)."""
        return len(self._free_pages) if self.paged else 0

    def truncate(self, length: int, seqs: SeqsArg = None) -> None:
        """Drops the newest tokens so that ``seqs`` (default all) hold ``length`` tokens. Possible only while
        every dropped token is still in the full-precision residual and the quantized part is unchanged
        (quantized_length(length) equals the current one); otherwise raises ValueError, changing nothing."""
        seqs = list(range(self.max_batch)) if seqs is None else self._as_seqs(seqs)
        for layer in range(self.num_layers):
            for s in seqs:
                T = self._len[layer][s]
                if length > T:
                    raise ValueError(f"QuantizedKVCache.truncate: sequence {s} holds {T} tokens, cannot grow to "
                                     f"{length}")
                if self.quantized_length(length) != self.quantized_length(T):
                    raise ValueError(f"QuantizedKVCache.truncate: sequence {s} holds {T} tokens of which "
                                     f"{self.quantized_length(T)} are quantized; keeping {length} would need "
                                     f"{self.quantized_length(length)} quantized (dropped tokens must still be in the "
                                     f"full-precision residual of {self.residual})")
        for layer in range(self.num_layers):
            for s in seqs:
                self._len[layer][s] = length
                self._layers[layer]["lengths"][s] = length

    def reorder(self, index: torch.Tensor, batch: Optional[int] = None) -> None:
        """Sequences [0, batch) become sequences ``index`` (beam search): contiguous caches only.

        index: int64 [batch'] of sequence ids < batch (default batch = len(index)); batch' <= max_batch."""
        if self.paged:
            raise NotImplementedError("QuantizedKVCache.reorder: paged caches share no pages between sequences; "
                                      "reorder a contiguous cache (paged=False)")
        index = torch.as_tensor(index, dtype=torch.int64).flatten()
        n = index.numel()
        if n > self.max_batch:
            raise ValueError(f"QuantizedKVCache.reorder: index names {n} sequences > max_batch {self.max_batch}")
        if n and (int(index.min()) < 0 or int(index.max()) >= self.max_batch):
            raise ValueError(f"QuantizedKVCache.reorder: index must be in [0, {self.max_batch}), got {index.tolist()}")
        idx = index.to(self.device)
        for layer in range(self.num_layers):
            t = self._layers[layer]
            for name, x in t.items():
                if name in ("k_params", "v_params") and self.scheme == "fp8":
                    continue
                x[:n] = x.index_select(0, idx)
            lens = self._len[layer]
            self._len[layer] = [lens[i] for i in index.tolist()] + lens[n:]

    def __repr__(self) -> str:
        fmt = f"{self.scheme}-{self.bits}" if self.scheme != "fp8" else f"fp8-{self.fp8_format}"
        layout = f"paged({self.num_pages} x {self.page_size})" if self.paged else f"contiguous({self.max_tokens})"
        return (f"QuantizedKVCache({fmt}, G={self.group_size}, R={self.residual}, layers={self.num_layers}, "
                f"Hkv={self.num_kv_heads}, D={self.head_dim}, batch={self.max_batch}, {layout}, {self.dtype})")
