"""Sparse-attention cases (``python -m trous.bench --family attention``): trous.sparse_attention on
each pattern of issue 11's performance section against, in the same run, SDPA with a dense boolean
mask, SDPA's own kernel (is_causal / dense; on GPU the FlashAttention backend), FlexAttention
compiled (forward on CPU: it has no CPU backward) and trous's own dense time (cost follows density).

Rows (op names): ``<pattern> <fwd|fwd+bwd> vs <baseline>``; shape ``BxHxSxD``. CPU: fp32, B1 H8 D64,
S = 8192 (and window +-128 against trous dense at S = 16384); CUDA: bf16, B1 H16 D128, S 4k..16k.
Tensors are stored (B, S, H, D) (trous's layout); SDPA and Flex get (B, H, S, D) views of the same
memory. fwd+bwd is ``torch.autograd.grad`` of the output for a fixed random grad_out (no grad
accumulation). ``extra`` of each row: the pattern, its density and its FLOPs (4 * D per allowed pair
and head forward, 2.5x that backward), and for Flex rows the compile and create_block_mask times.
The effective FLOP/s (allowed pairs only) is ``extra["flops"] / trous_ms``: ``python -m
trous.attention.bench <results.json>`` prints it with the machine's FMA peak.

Targets (``--check``; full runs only, --quick has small shapes and no targets):
- CPU window +-128 fwd and chunk-256 causal fwd: >= 1.2x faster than Flex compiled;
- CPU window +-128 fwd+bwd: >= 20x faster than SDPA with the dense mask;
- dense and causal, fwd and fwd+bwd: within 1.3x of SDPA's kernel (speed-up >= 1 / 1.3; GPU >= 0.6);
- every sparse pattern: effective throughput >= 70% of trous dense (speed-up over trous dense
  >= 0.7 / density);
- S = 16384, window +-128: cost <= 1.3 x density x trous dense (speed-up >= 1 / (1.3 density));
- GPU window / chunk / global: >= 1.2x faster than Flex compiled.

Block-sparse rows (issue 12), CPU fp32: ``bigbird-b64-w3r2g2 fwd+bwd vs SDPA dense mask`` (B1 H8 D64
S = 8192, ``trous.attention.layouts.bigbird``, block 64, 3 window + 2 random + 2 global blocks, random
blocks per head; target >= 10x) and ``... fwd vs Flex compiled`` (Flex on the same layout through
``to_bcsr()`` and ``flex_attention.BlockMask.from_kv_blocks``; target >= 1.2x); ``block-mask build
doc-causal 8 docs b128 vs Flex create_block_mask`` (S = 65536, 8 documents of seeded random lengths:
``trous.BlockMask.from_documents(ids, causal=True)`` against FlexAttention's ``create_block_mask`` of
the document-causal mask_mod, eager or compiled, the faster of the two in the run; target >= 10x;
eager is skipped, saying so in ``extra``, when its dense S x S mask would not fit in memory).
--quick: QUICK_SHAPE and S = 4096, no Flex compile, no targets.

Last, on CPU: the Hugging Face rows ``hf-mistral-sw512 fwd+bwd vs HF sdpa|eager``: a tiny Mistral
(2 layers, H8 / KV2, D64, random weights) forward + backward of the LM loss at 4096 tokens (--quick:
1024), sliding window 512, attn_implementation "trous" against "sdpa" and "eager" (times and
ratios, no target; skipped without transformers). Its ``flops`` count the attention part only.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..bench.harness import Case
from .pattern import AttentionPattern

FAMILY = "attention"
CPU_SHAPE = (1, 8, 8192, 64)  # (B, H, S, D): issue 11's CPU shape
CPU_LONG_S = 16384
QUICK_SHAPE = (1, 2, 1024, 64)
GPU_SHAPE = (1, 16, 0, 128)  # S from GPU_LENGTHS
GPU_LENGTHS = (4096, 8192, 16384)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def patterns(S: int) -> Dict[str, AttentionPattern]:
    """The rows of issue 11: dense, causal, window +-128, chunk-256 causal, a dilated window (the
    count of window +-128, dilation 2) and global tokens (16, with window +-128)."""
    return {
        "dense": AttentionPattern(),
        "causal": AttentionPattern(causal=True),
        "window+-128": AttentionPattern(window=(128, 128)),
        "chunk256-causal": AttentionPattern(chunk_size=256, causal=True),
        "dilated-window+-128-d2": AttentionPattern(window=(128, 128), dilation=2),
        "global16+window+-128": AttentionPattern(window=(128, 128), global_tokens=16),
    }


SPARSE = ("window+-128", "chunk256-causal", "dilated-window+-128-d2", "global16+window+-128")


def targets(device: str) -> dict:
    """The uniform part of the bars: the rows against SDPA's own kernel (dense, causal). The other
    rows carry their own speed-up target (see the module docstring)."""
    return {"speedup": 0.6 if device == "cuda" else 1 / 1.3}


def _inputs(shape, dtype, device, seed: int, grad: bool, Hkv: Optional[int] = None):
    B, H, S, D = shape
    g = torch.Generator().manual_seed(3000 + seed)
    q = torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv or H, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv or H, D, generator=g).to(device=device, dtype=dtype)
    go = torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v, go


def _trous(p: AttentionPattern, bwd: bool) -> Callable:
    from .sparse import sparse_attention

    def fwd(q, k, v, go):
        with torch.no_grad():
            return sparse_attention(q, k, v, pattern=p)

    def fwd_bwd(q, k, v, go):
        out = sparse_attention(q, k, v, pattern=p)
        return torch.autograd.grad(out, (q, k, v), go)

    return fwd_bwd if bwd else fwd


def _bhsd(*ts):
    return [t.transpose(1, 2) for t in ts]


class _Mask:
    """The dense boolean mask of a pattern, materialised on first use (S x S bytes) and shared by the
    rows of that pattern."""

    def __init__(self, p: AttentionPattern, S: int):
        self.p, self.S, self.mask = p, S, None

    def __call__(self, device) -> torch.Tensor:
        if self.mask is None:
            self.mask = self.p.materialize(self.S, self.S, device=device)
        return self.mask


def _sdpa(bwd: bool, mask: Optional[_Mask] = None, is_causal: bool = False, flash: bool = False) -> Callable:
    def call(q, k, v):
        qh, kh, vh = _bhsd(q, k, v)
        if flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=is_causal).transpose(1, 2)
        m = mask(q.device) if mask is not None else None
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m, is_causal=is_causal).transpose(1, 2)

    def fwd(q, k, v, go):
        with torch.no_grad():
            return call(q, k, v)

    def fwd_bwd(q, k, v, go):
        return torch.autograd.grad(call(q, k, v), (q, k, v), go)

    return fwd_bwd if bwd else fwd


def flex_available(device: str) -> Optional[str]:
    """None when FlexAttention can be compiled here, else why not."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"no FlexAttention in torch {torch.__version__} ({e})"
    if device == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        return "no C++ compiler for inductor's CPU code"
    return None


class _Flex:
    """FlexAttention compiled on the pattern's block mask, built on first use: create_block_mask and
    the compile (first call) are timed separately and recorded in the case's ``extra``; when the
    compile fails the case drops its baseline and targets and says why."""

    def __init__(self, p: AttentionPattern, S: int, device: str, bwd: bool):
        self.p, self.S, self.device, self.bwd = p, S, device, bwd
        self.fn = None
        self.case: Optional[Case] = None

    def prepare(self, q, k, v) -> None:
        if self.fn is not None or self.case.baseline is None:
            return
        from torch.nn.attention.flex_attention import flex_attention

        try:
            t0 = time.perf_counter()
            bm = self._block_mask()
            t_mask = time.perf_counter() - t0
            compiled = torch.compile(flex_attention, dynamic=False)
            fn = (lambda q, k, v: compiled(q, k, v, block_mask=bm))
            t0 = time.perf_counter()
            qh, kh, vh = (t.detach().transpose(1, 2) for t in (q, k, v))
            with torch.no_grad():
                fn(qh, kh, vh)
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._block_mask()
            t_mask_warm = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (any compile failure: skip the row, say why)
            msg = f"FlexAttention skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"trous.bench attention: {self.case.op}: {msg}", file=sys.stderr)
            self.case.baseline = None
            self.case.targets.clear()
            self.case.extra["flex"] = msg
            return
        self.fn = fn
        self.case.extra.update(flex_compile_s=round(t_compile, 2), flex_block_mask_s=round(t_mask, 3),
                               flex_block_mask_warm_s=round(t_mask_warm, 3))
        print(f"trous.bench attention: {self.case.op}: Flex compile + first call {t_compile:.1f} s, "
              f"create_block_mask {t_mask:.3f} s (again: {t_mask_warm:.3f} s)", file=sys.stderr)

    def _block_mask(self):
        """Flex's BlockMask of the pattern (create_block_mask, as users build it)."""
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(self.p.mask_mod(self.S, self.S, self.device), None, None, self.S, self.S,
                                 device=self.device)

    def __call__(self, q, k, v, go):
        qh, kh, vh = _bhsd(q, k, v)
        if not self.bwd:
            with torch.no_grad():
                return self.fn(qh, kh, vh).transpose(1, 2)
        return torch.autograd.grad(self.fn(qh, kh, vh).transpose(1, 2), (q, k, v), go)


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _case(name: str, p: AttentionPattern, shape, dt: str, device: str, bwd: bool, baseline: Optional[Callable],
          baseline_name: str, tg: dict, flex: Optional[_Flex] = None) -> Case:
    B, H, S, D = shape
    dtype = _DTYPES[dt]
    esize = torch.empty((), dtype=dtype).element_size()
    qkv_bytes = 3 * B * S * H * D * esize
    n = p.count(S, S)
    flops = 4.0 * B * H * D * n * (3.5 if bwd else 1.0)
    # Bytes: q, k, v read and out written (fwd); fwd+bwd adds grad_out, out, lse read, three grads written.
    moved = (4 if not bwd else 9) * B * S * H * D * esize

    def make(i):
        inputs = _inputs(shape, dtype, device, i, bwd)
        if flex is not None:
            flex.prepare(*inputs[:3])
        return inputs

    c = Case(family=FAMILY, op=f"{name} {'fwd+bwd' if bwd else 'fwd'} vs {baseline_name}", shape=_shape_str(shape),
             dtype=dt, make_inputs=make, fn=_trous(p, bwd), baseline=baseline, bytes_moved=moved,
             input_bytes=qkv_bytes, baseline_name=baseline_name, targets=dict(tg),
             extra={"pattern": repr(p), "density": round(n / (S * S), 6), "allowed_pairs": n, "flops": flops})
    if flex is not None:
        flex.case = c
    return c


def _cpu_cases(shape, dt: str, quick: bool, default_shape: bool = True) -> List[Case]:
    B, H, S, D = shape
    device = "cpu"
    ps = patterns(S)
    sdpa_t = {} if quick else targets(device)
    flex_why = "--quick" if quick else flex_available(device)
    if flex_why:
        print(f"trous.bench attention: FlexAttention rows skipped ({flex_why})", file=sys.stderr)
    out: List[Case] = []
    out.append(_case("dense", ps["dense"], shape, dt, device, False, _sdpa(False), "SDPA", sdpa_t))
    out.append(_case("dense", ps["dense"], shape, dt, device, True, _sdpa(True), "SDPA", sdpa_t))
    out.append(_case("causal", ps["causal"], shape, dt, device, False, _sdpa(False, is_causal=True),
                     "SDPA is_causal", sdpa_t))
    out.append(_case("causal", ps["causal"], shape, dt, device, True, _sdpa(True, is_causal=True),
                     "SDPA is_causal", sdpa_t))
    dense_fwd, dense_bwd = _trous(ps["dense"], False), _trous(ps["dense"], True)
    for name in SPARSE:
        p = ps[name]
        mask = _Mask(p, S)
        density = p.density(S, S)
        for bwd in (False, True):
            tg = {}
            if not quick and name == "window+-128":
                tg = {"speedup": 20.0} if bwd else {}
            out.append(_case(name, p, shape, dt, device, bwd, _sdpa(bwd, mask=mask), "SDPA dense mask", tg))
            out.append(_case(name, p, shape, dt, device, bwd, dense_bwd if bwd else dense_fwd, "trous dense",
                             {} if quick else {"speedup": 0.7 / density}))
        if not flex_why:
            flex = _Flex(p, S, device, bwd=False)
            tg = {"speedup": 1.2} if name in ("window+-128", "chunk256-causal") else {}
            out.append(_case(name, p, shape, dt, device, False, flex, "Flex compiled", tg, flex=flex))
    if not quick and default_shape:  # cost follows density at S = 16384
        long = (B, H, CPU_LONG_S, D)
        p = patterns(CPU_LONG_S)["window+-128"]
        density = p.density(CPU_LONG_S, CPU_LONG_S)
        dense = patterns(CPU_LONG_S)["dense"]
        for bwd in (False, True):
            out.append(_case("window+-128", p, long, dt, device, bwd, _trous(dense, bwd), "trous dense",
                             {"speedup": 1 / (1.3 * density)}))
    return out


def _gpu_cases(dt: str, quick: bool, shape=None) -> List[Case]:
    device = "cuda"
    lengths = (shape[2],) if shape is not None else ((2048,) if quick else GPU_LENGTHS)
    B, H, _, D = shape if shape is not None else GPU_SHAPE
    flex_why = flex_available(device)
    out: List[Case] = []
    for S in lengths:
        sh = (B, H, S, D)
        ps = patterns(S)
        for bwd in (False, True):
            out.append(_case("dense", ps["dense"], sh, dt, device, bwd, _sdpa(bwd, flash=True), "SDPA flash",
                             {"speedup": 0.6}))
            out.append(_case("causal", ps["causal"], sh, dt, device, bwd, _sdpa(bwd, is_causal=True, flash=True),
                             "SDPA flash", {"speedup": 0.6}))
            for name in ("window+-128", "chunk256-causal", "global16+window+-128", "dilated-window+-128-d2"):
                if flex_why:
                    continue
                flex = _Flex(ps[name], S, device, bwd)
                tg = {} if name.startswith("dilated") else {"speedup": 1.2}
                out.append(_case(name, ps[name], sh, dt, device, bwd, flex, "Flex compiled", tg, flex=flex))
    if flex_why:
        print(f"trous.bench attention: FlexAttention rows skipped ({flex_why})", file=sys.stderr)
    return out


# The Hugging Face row (issue 12, "Performance" third bullet): a tiny Mistral (random weights, built
# from a config) with a sliding window of 512, forward + backward of the LM loss at 4096 tokens
# (--quick: 1024) with attn_implementation "trous" against "sdpa" and "eager" in the same run.
HF_TOKENS, HF_QUICK_TOKENS, HF_WINDOW = 4096, 1024, 512
HF_CONFIG = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                 attention_dropout=0.0)


class _HFModel:
    """The tiny model for one attn_implementation, built on first use (same seed, so the same
    weights for every implementation); calling it runs the loss's forward and backward
    (``torch.autograd.grad`` over the parameters: no accumulation)."""

    def __init__(self, impl: str, device: str):
        self.impl, self.device, self.model = impl, device, None

    def __call__(self, ids):
        if self.model is None:
            from transformers import AutoModelForCausalLM, MistralConfig

            if self.impl == "trous":
                from ..hf import register

                register()
            torch.manual_seed(0)
            cfg = MistralConfig(**HF_CONFIG, sliding_window=HF_WINDOW)
            self.model = AutoModelForCausalLM.from_config(cfg, attn_implementation=self.impl).to(self.device)
        loss = self.model(ids, labels=ids).loss
        return torch.autograd.grad(loss, [p for p in self.model.parameters() if p.requires_grad])


def _hf_cases(device: str, quick: bool) -> List[Case]:
    """The tiny Mistral fwd+bwd rows (CPU fp32): "trous" vs "sdpa" and vs "eager"; skipped with a
    message when transformers is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("trous.bench attention: Hugging Face rows skipped (transformers is not installed: pip install "
              "'trous[hf]')", file=sys.stderr)
        return []
    S = HF_QUICK_TOKENS if quick else HF_TOKENS
    c = HF_CONFIG
    H, D, L = c["num_attention_heads"], c["head_dim"], c["num_hidden_layers"]
    # HF's sliding_window counts the query itself: trous window (W - 1, 0), causal.
    p = AttentionPattern(causal=True, window=(HF_WINDOW - 1, 0))
    n = p.count(S, S)
    flops = 4.0 * H * D * n * 3.5 * L  # the attention part only (allowed pairs), forward + backward

    def make(i):
        g = torch.Generator().manual_seed(4000 + i)
        return (torch.randint(0, c["vocab_size"], (1, S), generator=g).to(device),)

    trous_model = _HFModel("trous", device)
    shape = f"1x{S} L{L} H{H}/{c['num_key_value_heads']} D{D}"
    out = []
    for impl in ("sdpa", "eager"):
        out.append(Case(family=FAMILY, op=f"hf-mistral-sw{HF_WINDOW} fwd+bwd vs HF {impl}", shape=shape, dtype="fp32",
                        make_inputs=make, fn=trous_model, baseline=_HFModel(impl, device), bytes_moved=8 * S,
                        input_bytes=8 * S, baseline_name=f"HF {impl}", targets={},
                        extra={"pattern": repr(p), "density": round(n / (S * S), 6), "allowed_pairs": n,
                               "flops": flops, "flops_of": "attention only", "model": "MistralForCausalLM",
                               "config": dict(c, sliding_window=HF_WINDOW),
                               "transformers": transformers.__version__}))
    return out


# The packed-batch rows (issue 12, "Performance" second bullet): 8 documents of random lengths
# (seeded) totalling 16384 tokens (--quick: 2048), causal, fwd+bwd, B1 H8 D64 (--quick H2): the varlen op
# against the sum of per-document dense-causal calls (target: within 1.3x) and against SDPA with the
# block-diagonal causal mask (target: >= 5x).
VARLEN_TOKENS, VARLEN_QUICK_TOKENS, VARLEN_DOCS = 16384, 2048, 8


def _doc_lengths(total: int, docs: int, seed: int = 0) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(total - 1, generator=g)[:docs - 1].add(1).tolist())
    edges = [0] + cuts + [total]
    return [b - a for a, b in zip(edges, edges[1:])]


def _varlen_cases(device: str, quick: bool) -> List[Case]:
    from . import reference as ref
    from .sparse import sparse_attention, sparse_attention_varlen

    total = VARLEN_QUICK_TOKENS if quick else VARLEN_TOKENS
    H, D = (2, 64) if quick else (8, 64)
    lengths = _doc_lengths(total, VARLEN_DOCS)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    causal = AttentionPattern(causal=True)
    n = sum(causal.count(L, L) for L in lengths)
    flops = 4.0 * H * D * n * 3.5
    moved = 9 * total * H * D * 4

    def make(i):
        q, k, v, go = _inputs((1, H, total, D), torch.float32, device, i, True)
        return q[0], k[0], v[0], go[0]

    def packed(q, k, v, go):
        out = sparse_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
        return torch.autograd.grad(out, (q, k, v), go)

    def per_document(q, k, v, go):
        outs = [sparse_attention(q[a:b][None], k[a:b][None], v[a:b][None], causal=True)[0]
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.autograd.grad(outs, (q, k, v), [go[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    block_mask = ref.varlen_mask(cu.cpu(), cu.cpu(), causal, device=device)

    def sdpa_block_diagonal(q, k, v, go):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=block_mask).transpose(0, 1)
        return torch.autograd.grad(out, (q, k, v), go)

    shape = f"{total}x{H}x{D} ({VARLEN_DOCS} docs {min(lengths)}..{max(lengths)})"
    extra = {"pattern": "causal per document", "documents": lengths, "density": round(n / total ** 2, 6),
             "allowed_pairs": n, "flops": flops}
    rows = []
    for name, base, tg in (("per-document trous causal calls", per_document, {"speedup": 1 / 1.3}),
                           ("SDPA block-diagonal mask", sdpa_block_diagonal, {"speedup": 5.0})):
        rows.append(Case(family=FAMILY, op=f"varlen {VARLEN_DOCS} docs causal fwd+bwd vs {name}", shape=shape,
                         dtype="fp32", make_inputs=make, fn=packed, baseline=base, bytes_moved=moved,
                         input_bytes=3 * total * H * D * 4, baseline_name=name, targets={} if quick else tg,
                         extra=dict(extra)))
    return rows


# The block-sparse rows (issue 12, "Performance" first and fourth bullets), CPU fp32:
# - a BigBird layout (block 64, 3 window + 2 random + 2 global blocks, random blocks per head) at B1 H8
#   D64 S = 8192 (--quick: QUICK_SHAPE): trous with the block mask fwd+bwd against SDPA with its dense
#   (1, H, S, S) boolean mask (target >= 10x) and fwd against FlexAttention compiled on the same
#   BlockMask (to_bcsr() -> flex_attention.BlockMask.from_kv_blocks; target >= 1.2x);
# - building a document-causal block mask at S = 65536 (8 documents of random, seeded lengths, block
#   128; --quick 4096): trous.BlockMask.from_documents against FlexAttention's create_block_mask of
#   the document-causal mask_mod, eager (as users call it) or compiled (torch.compile(create_block_mask),
#   what create_block_mask(_compile=True) runs), whichever is faster in the run (target >= 10x).
BIGBIRD = dict(block_size=64, window_blocks=3, random_blocks=2, global_blocks=2)
DOCMASK_S, DOCMASK_QUICK_S, DOCMASK_BLOCK, DOCMASK_DOCS = 65536, 4096, 128, 8
# Eager create_block_mask materialises the (B, H, Sq, Sk) mask and its vmapped temporaries: peak
# memory measured at 12.3 bytes per pair (3.3 GB at S = 16384, torch 2.14.1); refused when it
# would not fit in the available memory.
_FLEX_EAGER_BYTES_PER_PAIR = 13


class _BigBird:
    """The BigBird BlockMask of the rows (built on first use, shared): also its dense mask for SDPA
    and the allowed-pair counts written into the cases' ``extra``."""

    def __init__(self, S: int, H: int, D: int, device: str):
        self.S, self.H, self.D, self.device = S, H, D, device
        self.bm, self.dense = None, None
        self.cases: List[Tuple[Case, bool]] = []

    def mask(self):
        if self.bm is None:
            from .layouts import bigbird

            t0 = time.perf_counter()
            self.bm = bigbird(self.S, **BIGBIRD, num_heads=self.H, device=self.device)
            built = time.perf_counter() - t0
            n = self.bm.count() * (self.H // self.bm.shape[1])  # allowed pairs over every head
            for c, bwd in self.cases:
                c.extra.update(density=round(n / (self.H * self.S * self.S), 6), allowed_pairs=n,
                               flops=4.0 * self.D * n * (3.5 if bwd else 1.0), trous_block_mask_s=round(built, 3))
        return self.bm

    def dense_mask(self) -> torch.Tensor:
        if self.dense is None:
            self.dense = self.mask().materialize()  # (1, H, S, S) bool
        return self.dense


class _FlexBlocks(_Flex):
    """FlexAttention compiled on a trous BlockMask converted to Flex's (``to_bcsr()`` ->
    ``BlockMask.from_kv_blocks``; partial blocks, if any, get a mask_mod that reads the dense mask)."""

    def __init__(self, blocks: _BigBird, device: str):
        super().__init__(None, blocks.S, device, bwd=False)
        self.blocks = blocks

    def _block_mask(self):
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        bm = self.blocks.mask()
        mask_mod = None
        if bm.elems is not None and bm.elems.shape[0]:
            dense = bm.materialize()
            Bm, Hm = dense.shape[:2]
            mask_mod = (lambda b, h, q, kv: dense[b if Bm > 1 else 0, h if Hm > 1 else 0, q, kv])
        return FlexBlockMask.from_kv_blocks(*bm.to_bcsr(), BLOCK_SIZE=bm.block_size, mask_mod=mask_mod,
                                            seq_lengths=bm.seq_lengths)


def _block_sparse_fn(blocks: _BigBird, bwd: bool) -> Callable:
    from .sparse import sparse_attention

    def fwd(q, k, v, go):
        with torch.no_grad():
            return sparse_attention(q, k, v, block_mask=blocks.mask())

    def fwd_bwd(q, k, v, go):
        return torch.autograd.grad(sparse_attention(q, k, v, block_mask=blocks.mask()), (q, k, v), go)

    return fwd_bwd if bwd else fwd


def _sdpa_blocks(blocks: _BigBird) -> Callable:
    def fwd_bwd(q, k, v, go):
        qh, kh, vh = _bhsd(q, k, v)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=blocks.dense_mask()).transpose(1, 2)
        return torch.autograd.grad(out, (q, k, v), go)

    return fwd_bwd


def _bigbird_cases(device: str, quick: bool) -> List[Case]:
    try:
        from . import layouts  # noqa: F401
    except ImportError as e:
        print(f"trous.bench attention: BigBird rows skipped (no trous.attention.layouts: {e})", file=sys.stderr)
        return []
    B, H, S, D = QUICK_SHAPE if quick else CPU_SHAPE
    shape = (B, H, S, D)
    blocks = _BigBird(S, H, D, device)
    flex_why = "--quick" if quick else flex_available(device)
    if flex_why:
        print(f"trous.bench attention: BigBird Flex row skipped ({flex_why})", file=sys.stderr)
    name = (f"bigbird-b{BIGBIRD['block_size']}-w{BIGBIRD['window_blocks']}r{BIGBIRD['random_blocks']}"
            f"g{BIGBIRD['global_blocks']}")
    specs = [(True, _sdpa_blocks(blocks), "SDPA dense mask", {"speedup": 10.0}, None)]
    if not flex_why:
        flex = _FlexBlocks(blocks, device)
        specs.append((False, flex, "Flex compiled", {"speedup": 1.2}, flex))
    out = []
    for bwd, baseline, baseline_name, tg, flex in specs:
        def make(i, flex=flex, bwd=bwd):
            inputs = _inputs(shape, torch.float32, device, i, bwd)
            blocks.mask()
            if flex is not None:
                flex.prepare(*inputs[:3])
            return inputs

        c = Case(family=FAMILY, op=f"{name} {'fwd+bwd' if bwd else 'fwd'} vs {baseline_name}", shape=_shape_str(shape),
                 dtype="fp32", make_inputs=make, fn=_block_sparse_fn(blocks, bwd), baseline=baseline,
                 bytes_moved=(9 if bwd else 4) * B * S * H * D * 4, input_bytes=3 * B * S * H * D * 4,
                 baseline_name=baseline_name, targets={} if quick else dict(tg),
                 extra={"pattern": f"bigbird({S}, {', '.join(f'{k}={v}' for k, v in BIGBIRD.items())}, "
                                   f"num_heads={H})"})
        blocks.cases.append((c, bwd))
        if flex is not None:
            flex.case = c
        out.append(c)
    return out


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _document_causal(ids: torch.Tensor) -> Callable:
    """FlexAttention's document-causal mask_mod over packed ids (the mask of the FlexAttention blog
    post's document masking, with causal)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


class _FlexCreateBlockMask:
    """The baseline of the construction row: FlexAttention's create_block_mask of the document-
    causal mask_mod, eager and (full runs) compiled, both tried once on first use (compile timed
    apart); the faster is timed by the harness, both times land in the case's ``extra``. Either one
    that cannot run says why there (eager: when the dense mask would not fit in memory)."""

    def __init__(self, S: int, device: str, quick: bool):
        self.S, self.device, self.quick = S, device, quick
        self.fn: Optional[Callable] = None
        self.case: Optional[Case] = None

    def _call(self, create, ids):
        return create(_document_causal(ids), 1, 1, self.S, self.S, device=self.device, BLOCK_SIZE=DOCMASK_BLOCK)

    def prepare(self, ids) -> None:
        if self.fn is not None or self.case.baseline is None:
            return
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except ImportError as e:
            self._give_up(f"no FlexAttention in torch {torch.__version__} ({e})")
            return
        extra, times = self.case.extra, {}
        need, avail = _FLEX_EAGER_BYTES_PER_PAIR * self.S * self.S, _mem_available()
        if avail is not None and need > 0.8 * avail:
            extra["flex_eager"] = (f"skipped: eager create_block_mask materialises the {self.S} x {self.S} mask, "
                                   f"~{need / 2**30:.0f} GiB at {_FLEX_EAGER_BYTES_PER_PAIR} bytes per pair, "
                                   f"{avail / 2**30:.0f} GiB available")
        else:
            try:
                t0 = time.perf_counter()
                self._call(create_block_mask, ids)
                times["eager"] = time.perf_counter() - t0
                extra["flex_eager_s"] = round(times["eager"], 3)
            except Exception as e:  # noqa: BLE001  (say why, keep the other)
                extra["flex_eager"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if self.quick:
            extra["flex_compiled"] = "skipped (--quick)"
        elif flex_available(self.device):
            extra["flex_compiled"] = f"skipped ({flex_available(self.device)})"
        else:
            try:
                compiled = torch.compile(create_block_mask)
                t0 = time.perf_counter()
                self._call(compiled, ids)
                extra["flex_compile_s"] = round(time.perf_counter() - t0, 2)
                t0 = time.perf_counter()
                self._call(compiled, ids)
                times["compiled"] = time.perf_counter() - t0
                extra["flex_compiled_s"] = round(times["compiled"], 3)
                self.compiled = compiled
            except Exception as e:  # noqa: BLE001
                extra["flex_compiled"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not times:
            self._give_up("; ".join(f"{k}: {v}" for k, v in extra.items() if k in ("flex_eager", "flex_compiled")))
            return
        best = min(times, key=times.get)
        extra["flex_baseline"] = best
        create = create_block_mask if best == "eager" else self.compiled
        self.fn = lambda ids: self._call(create, ids)
        self.case.baseline_name = f"Flex create_block_mask {best}"
        print(f"trous.bench attention: {self.case.op}: Flex create_block_mask "
              + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()) + f" (baseline: {best})", file=sys.stderr)

    def _give_up(self, why: str) -> None:
        print(f"trous.bench attention: {self.case.op}: FlexAttention skipped ({why})", file=sys.stderr)
        self.case.baseline = None
        self.case.targets.clear()
        self.case.extra["flex"] = why

    def __call__(self, ids):
        return self.fn(ids)


def _docmask_cases(device: str, quick: bool) -> List[Case]:
    from .block_mask import BlockMask

    S = DOCMASK_QUICK_S if quick else DOCMASK_S
    lengths = _doc_lengths(S, DOCMASK_DOCS, seed=1)
    flex = _FlexCreateBlockMask(S, device, quick)

    def make(i):
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        flex.prepare(ids)
        return (ids,)

    def build(ids):
        return BlockMask.from_documents(ids, causal=True, block_size=DOCMASK_BLOCK)

    c = Case(family=FAMILY, op=f"block-mask build doc-causal {DOCMASK_DOCS} docs b{DOCMASK_BLOCK} vs Flex "
                               f"create_block_mask", shape=f"S{S}", dtype="int64", make_inputs=make, fn=build,
             baseline=flex, bytes_moved=8 * S, input_bytes=8 * S, baseline_name="Flex create_block_mask",
             targets={} if quick else {"speedup": 10.0},
             extra={"pattern": "document causal", "documents": lengths, "block_size": DOCMASK_BLOCK})
    flex.case = c
    return [c]


def _block_cases(device: str, quick: bool) -> List[Case]:
    return _bigbird_cases(device, quick) + _docmask_cases(device, quick)


def cases(device: str, quick: bool, shape: Optional[Sequence[int]] = None) -> List[Case]:
    """CPU: fp32 (B, H, S, D) = (1, 8, 8192, 64) and the S = 16384 window rows (--quick: (1, 2, 1024,
    64), no Flex, no targets); CUDA: bf16 (1, 16, S, 128) for S in 4k, 8k, 16k. ``shape`` (B, H, S, D)
    replaces the shapes (and drops the S = 16384 rows). On CPU without ``shape``: the block-sparse
    rows (BigBird, block-mask construction) and the packed-batch rows. Last: the Hugging
    Face rows (a tiny Mistral, sliding window 512, fwd+bwd at 4096 tokens, --quick 1024: "trous" vs
    "sdpa" and "eager"; printed, no target)."""
    if device == "cuda":
        return _gpu_cases("bf16", quick, shape)
    if shape is not None:
        return _cpu_cases(tuple(shape), "fp32", quick, default_shape=False)
    return (_cpu_cases(QUICK_SHAPE if quick else CPU_SHAPE, "fp32", quick) + _block_cases(device, quick)
            + _varlen_cases(device, quick) + _hf_cases(device, quick))


# ---------------------------------------------------------------------------------------------
# Effective FLOP/s (python -m trous.attention.bench <results.json>)


def fma_lanes(isa: str, cpuinfo: str) -> int:
    """fp32 lanes per FMA unit and cycle: 16 with AVX-512, 8 with AVX2, except on AMD family 25 (Zen 3
    / Zen 4), whose AVX-512 FMAs execute as two 256-bit halves (the same peak as AVX2)."""
    if "512" not in isa:
        return 8
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25":
        return 8
    return 16


def fma_peak_gflops(device: str = "cpu") -> Tuple[Optional[float], str]:
    """The fp32 FMA peak of the CPU: cores x max clock x FMA lanes x 2 units x 2 FLOPs (fma_lanes),
    from /proc/cpuinfo and sysfs; (None, why) when the clock is unknown."""
    if device != "cpu":
        return None, "GPU: see the vendor's peak"
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    lanes = fma_lanes(isa, cpuinfo)
    ghz = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            ghz = int(f.read()) / 1e6
    except (OSError, ValueError):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("cpu MHz"):
                        ghz = float(line.split(":")[1]) / 1e3
                        break
        except (OSError, ValueError):
            pass
    cores = os.cpu_count() or 1
    if ghz is None:
        return None, "clock unknown"
    return cores * ghz * lanes * 2 * 2, f"{cores} cores x {ghz:.2f} GHz x {lanes} lanes x 2 FMA units x 2 ({isa})"


def flops_table(rows: Sequence[dict], peak: Optional[float] = None, peak_how: str = "") -> str:
    """One line per trous measurement (pattern, pass, shape): ms, density, effective GFLOP/s, % of
    the FMA peak, and each baseline's ms beside it."""
    by_key: Dict[tuple, dict] = {}
    for r in rows:
        if r.get("family") != FAMILY or "flops" not in r.get("extra", {}):
            continue  # (the block-mask construction row has no FLOPs)
        name, _, base = r["op"].partition(" vs ")
        key = (name, r["shape"], r["dtype"])
        e = by_key.setdefault(key, {"ms": [], "base": {}, "extra": r["extra"]})
        e["ms"].append(r["trous_ms"])
        if r.get("baseline_ms") is not None:
            e["base"][base] = r["baseline_ms"]
    head = (f"{'pattern pass':38s} {'shape':16s} {'density':>8s} {'trous ms':>9s} {'GFLOP/s':>8s} {'of peak':>7s}"
            "  baselines")
    lines = [head, "-" * len(head)]
    for (name, shape, dt), e in by_key.items():
        ms = sorted(e["ms"])[len(e["ms"]) // 2]
        gf = e["extra"]["flops"] / ms / 1e6
        of = f"{100 * gf / peak:6.1f}%" if peak else "      -"
        base = ", ".join(f"{b} {t:.1f} ms" for b, t in e["base"].items())
        lines.append(f"{name:38s} {shape + ' ' + dt:16s} {e['extra']['density']:8.4f} {ms:9.2f} {gf:8.1f} {of}  {base}")
    if peak:
        lines.append(f"FMA peak {peak:.0f} GFLOP/s ({peak_how}); FLOPs count allowed pairs only (4 D per pair "
                     f"forward, 2.5x backward)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m trous.attention.bench <results.json> (from python -m trous.bench --family "
              "attention)", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        report = json.load(f)
    device = report.get("device", {}).get("type", "cpu")
    peak, how = fma_peak_gflops(device)
    print(flops_table(report["rows"], peak, how))
    return 0


if __name__ == "__main__":
    sys.exit(main())
