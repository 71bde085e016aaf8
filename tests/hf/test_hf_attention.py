"""trous.hf.register(): the "trous" attention implementation of transformers. Tiny random-weight models
built from configs (Llama, Mistral with a sliding window, Qwen2 with sliding layers, Gemma-2 with
softcap and alternating sliding layers, Gemma-3 text, Llama-4 text with chunked layers), a few hundred
tokens, fp32: the same logits and gradients as attn_implementation="eager" (spec: fp32 ~1e-4
relative), the same per-layer pattern as the model's eager mask (the window convention: HF's
sliding_window W counts the query itself), no dense mask built, greedy generation with a
DynamicCache equal to eager's, a few optimizer steps reduce the loss, and what is not expressible
yet (padding, packed sequences, custom 4-D masks, StaticCache, dropout) is refused."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'trous[hf]'); "
                                   "the Hugging Face integration tests are skipped")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

import trous  # noqa: E402
import trous.hf  # noqa: E402
from helpers import close  # noqa: E402
from trous.hf.attention import TrousMask, attention_forward, pattern_of  # noqa: E402

S = 256  # tokens per row
W = 64  # sliding window (HF convention: W keys, the query included)
C = 96  # Llama-4 chunk size (S is not a multiple of it)
RTOL = 1e-4

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, initializer_range=0.1,
               attention_dropout=0.0)


def _config(name, **overrides):
    c = transformers
    if overrides:
        cfg = _config(name)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg
    if name == "llama":
        return c.LlamaConfig(**_COMMON)
    if name == "mistral":
        return c.MistralConfig(**_COMMON, sliding_window=W)
    if name == "qwen2":  # layer 0 full, layer 1 sliding
        return c.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=W, max_window_layers=1)
    if name == "gemma2":
        return c.Gemma2Config(**_COMMON, sliding_window=W, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                              query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"])
    if name == "gemma3":
        return c.Gemma3TextConfig(**_COMMON, sliding_window=W, query_pre_attn_scalar=32,
                                  layer_types=["sliding_attention", "full_attention"])
    if name == "llama4":  # layer 0 chunked (rope), layer 1 full (no rope)
        return c.Llama4TextConfig(**_COMMON, intermediate_size_mlp=96, num_local_experts=2, attention_chunk_size=C,
                                  no_rope_layers=[1, 0])
    raise KeyError(name)


MODELS = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "llama4"]
# The pattern each layer must run (trous.AttentionPattern keywords).
SLIDING = dict(causal=True, window=(W - 1, -1))
CAUSAL = dict(causal=True)
EXPECTED = {
    "llama": [CAUSAL, CAUSAL],
    "mistral": [SLIDING, SLIDING],
    "qwen2": [CAUSAL, SLIDING],
    "gemma2": [SLIDING, CAUSAL],
    "gemma3": [SLIDING, CAUSAL],
    "llama4": [dict(causal=True, chunk_size=C), CAUSAL],
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert trous.hf.register() == "trous"


def _model(name, impl="eager", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(name, **overrides), attn_implementation=impl)


def _ids(B=1, n=S, seed=0):
    return torch.randint(0, _COMMON["vocab_size"], (B, n), generator=torch.Generator().manual_seed(seed))


def _attn_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def _capture_masks(model, ids):
    """The attention_mask each layer's attention module receives."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, i=i: seen.__setitem__(i, kw.get("attention_mask")),
                                         with_kwargs=True) for i, m in enumerate(_attn_modules(model))]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(seen))]


def test_register_is_idempotent_and_lazy():
    assert trous.hf.register() == "trous" and trous.hf.register() == "trous"
    assert "trous" in transformers.AttentionInterface() and "trous" in mu.AttentionMaskInterface()


@pytest.mark.parametrize("sw", [1, 2, 5, 64])
def test_window_convention_matches_eager_mask(sw):
    """masking_utils' sliding_window_overlay (kv_idx > q_idx - W): W keys including the query, i.e.
    trous window (W - 1, ...) with causal; the bidirectional overlay |q - kv| <= W is (W, W)."""
    n = 80
    for fn, expected in ((mu.sliding_window_causal_mask_function(sw), dict(causal=True, window=(sw - 1, -1))),
                         (mu.sliding_window_bidirectional_mask_function(sw), dict(window=(sw, sw))),
                         (mu.chunked_causal_mask_function(sw + 7, torch.zeros(1, dtype=torch.long)),
                          dict(causal=True, chunk_size=sw + 7)),
                         (mu.causal_mask_function, dict(causal=True)),
                         (mu.bidirectional_mask_function, dict())):
        eager = mu.eager_mask(batch_size=1, q_length=n, kv_length=n, mask_function=fn, dtype=torch.float32)
        p, want = pattern_of(fn), trous.AttentionPattern(**expected)
        assert (p.causal, p.window, p.chunk_size) == (want.causal, want.window, want.chunk_size)
        assert torch.equal(p.materialize(n, n), eager[0, 0] == 0), (fn, expected)


@pytest.mark.parametrize("name", MODELS)
def test_layer_patterns_match_the_models_eager_masks(name):
    """Per layer: the pattern trous receives (no dense mask) is the model's own eager mask."""
    model = _model(name)
    ids = _ids(n=150)
    eager = _capture_masks(model, ids)
    model.set_attn_implementation("trous")
    ours = _capture_masks(model, ids)
    for i, (e, t, exp) in enumerate(zip(eager, ours, EXPECTED[name])):
        assert isinstance(t, TrousMask), (i, type(t))
        want = trous.AttentionPattern(**exp)
        assert (t.pattern.causal, t.pattern.window, t.pattern.chunk_size) == (want.causal, want.window,
                                                                             want.chunk_size), (i, t.pattern)
        assert torch.equal(t.pattern.materialize(150, 150), e[0, 0] == 0), i


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_gradients_match_eager(name):
    model = _model(name)
    ids = _ids(B=2)
    res = {}
    for impl in ("eager", "trous"):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        res[impl] = out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (le, ge), (lt, gt) = res["eager"], res["trous"]
    close(lt, le, RTOL)
    assert ge.keys() == gt.keys() and len(ge) > 0
    for n in ge:
        close(gt[n], ge[n], RTOL)


@pytest.mark.parametrize("name, overrides", [("mistral", dict(sliding_window=12)),
                                             ("llama4", dict(attention_chunk_size=10))])
def test_generation_with_dynamic_cache_matches_eager(name, overrides):
    """Greedy decoding past the window / across chunk boundaries (the cache's offsets: the sliding
    cache keeps W - 1 keys, so chunks start mid-cache)."""
    model = _model(name, **overrides)
    ids = _ids(n=7, seed=1)
    want = model.generate(ids, max_new_tokens=30, do_sample=False)
    model.set_attn_implementation("trous")
    got = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(got, want)


def test_training_reduces_the_loss():
    model = _model("gemma2", "trous")
    ids = _ids(B=2, n=96, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_padding_is_refused():
    model = _model("mistral", "trous")
    ids = _ids(B=2, n=40)
    mask = torch.ones(2, 40, dtype=torch.long)
    model(ids, attention_mask=mask)  # no padding: fine
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)


def test_packed_sequences_are_refused():
    model = _model("llama", "trous")
    ids = _ids(n=40)
    pos = torch.cat([torch.arange(20), torch.arange(20)])[None]
    with pytest.raises(NotImplementedError, match="packed"):
        model(ids, position_ids=pos, use_cache=False)  # (with a cache transformers itself ignores packing)


def test_dense_masks_static_cache_and_dropout_are_refused():
    model = _model("llama", "trous")
    ids = _ids(n=40)
    with pytest.raises(ValueError, match="dense mask"):
        model(ids, attention_mask=torch.zeros(1, 1, 40, 40))
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        model(ids, cache=cache, use_cache=True)
    cfg = _config("llama")
    cfg.attention_dropout = 0.1
    drop = AutoModelForCausalLM.from_config(cfg, attn_implementation="trous").train()
    with pytest.raises(ValueError, match="dropout"):
        drop(ids)


def test_unsupported_mask_function_is_refused():
    with pytest.raises(NotImplementedError, match="not expressible"):
        pattern_of(mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < 4))


def test_attention_function_without_a_mask_reads_the_call_and_module():
    """A model that builds no mask: causal from module.is_causal, W keys (query included) from
    sliding_window; (B, H, S, D) in, (B, S, H, D) out; flattened packed batches are refused."""
    q, k, v = (torch.randn(2, h, 40, 32, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
    mod = torch.nn.Module()
    mod.is_causal = True
    out, weights = attention_forward(mod, q, k, v, None, scaling=0.2, sliding_window=6)
    want = trous.sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  window=(5, 0), scale=0.2)
    assert weights is None and torch.equal(out, want)
    with pytest.raises(NotImplementedError, match="packed"):
        attention_forward(mod, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 20, 40], dtype=torch.int32))
