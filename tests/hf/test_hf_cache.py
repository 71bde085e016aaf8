"""trous.hf.QuantizedCache with transformers: generate() through both keywords on Llama / Mistral / Qwen2
style models, decode through the fused op, beam search, crop, clear errors; and the accuracy of the tiny
trained LM (KL and greedy agreement vs the full-precision cache, ordering and bounds).
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="trous.hf needs transformers (pip install 'trous[hf]')")

import trous  # noqa: E402, F401
from trous.hf import QuantizedCache  # noqa: E402
from trous.kvcache import cache as cache_mod  # noqa: E402
from trous.kvcache import tiny_lm  # noqa: E402

DynamicCache = transformers.DynamicCache


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is several times faster than two (and much faster on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _count_attend(monkeypatch):
    calls = []
    real = cache_mod.QuantizedKVCache.attend

    def attend(self, layer, q, *a, **kw):
        calls.append(q.shape[2])
        return real(self, layer, q, *a, **kw)

    monkeypatch.setattr(cache_mod.QuantizedKVCache, "attend", attend)
    return calls


def _model(kind):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    else:
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_generate_equals_dynamic_cache_while_nothing_is_quantized(kind, monkeypatch):
    model = _model(kind)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=9, do_sample=False, cache=DynamicCache(config=model.config))
    calls = _count_attend(monkeypatch)
    cache = QuantizedCache(model.config, scheme="kivi", bits=2, group_size=32, residual=64)  # 30 tokens < R
    got = model.generate(ids, max_new_tokens=9, do_sample=False, cache=cache)
    assert model.config._attn_implementation == "trous_kvcache"
    assert torch.equal(got, want)
    assert calls == [1] * (8 * 2)  # 8 decode steps x 2 layers through the fused op, prefill dense
    assert cache.get_seq_length() == 29 and cache.store.lengths.tolist() == [29, 29]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = model.generate(ids, max_new_tokens=9, do_sample=False,
                               past_key_values=QuantizedCache(model.config, scheme="symmetric", residual=64))
    assert torch.equal(again, want)


def test_decode_quantizes_the_history_and_stays_close():
    model = _model("llama")
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    want = model(ids).logits[0, -1]
    cache = QuantizedCache(model.config, scheme="symmetric", bits=8, residual=16)
    with torch.no_grad():
        model(input_ids=ids[:, :60], cache=cache)
        assert cache.store.quantized_length(60) == 44  # prefill leaves the last R tokens in full precision
        out = model(input_ids=ids[:, 60:], cache=cache).logits[0, -1]  # a 10-token chunk over the cache
    assert cache.get_seq_length() == 70
    assert (out - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_beam_search_reorders_the_cache():
    model = _model("llama")
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    want = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    got = model.generate(ids, cache=QuantizedCache(model.config, scheme="kivi", bits=4, residual=64), **kw)
    assert torch.equal(got, want)


def test_crop_within_the_residual_and_a_clear_error_beyond():
    model = _model("llama")
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(4))
    cache = QuantizedCache(model.config, scheme="kivi", bits=2, group_size=32, residual=32)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)  # 50 tokens: none quantized yet (50 - 32 < one group of 32)
        cache.crop(-5)
        assert cache.get_seq_length() == 45
        model(input_ids=ids[:, 45:50], cache=cache)
        model(input_ids=ids[:, :20], cache=cache)  # 70 tokens: one group of 32 quantized
    with pytest.raises(ValueError, match="quantized"):
        cache.crop(-40)
    assert cache.get_seq_length() == 70
    cache.crop(-6)
    assert cache.get_seq_length() == 64


def test_clear_errors():
    model = _model("llama")
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with pytest.raises(NotImplementedError, match="padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       cache=QuantizedCache(model.config))
    cfg = transformers.MistralConfig(sliding_window=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match="full-attention"):
        QuantizedCache(cfg)
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantizedCache(model.config, scheme="kivi", residual=40)


@pytest.fixture(scope="module")
def tiny():
    if not tiny_lm.CHECKPOINT.is_file():
        pytest.skip(f"no tiny LM checkpoint at {tiny_lm.CHECKPOINT} (python -m trous.kvcache.tiny_lm builds it)")
    torch.manual_seed(0)
    return tiny_lm.load_tiny_lm()


def test_tiny_lm_accuracy_ordering_and_bounds(tiny):
    rows = tiny_lm.accuracy_table(tiny, prompts=1, n_new=48)
    kl = {k: v[0] for k, v in rows.items()}
    agree = {k: v[1] for k, v in rows.items()}
    assert kl["int8 (symmetric)"] < 1e-3 and agree["int8 (symmetric)"] >= 0.97
    assert kl["fp8 e4m3"] < 1e-2 and agree["fp8 e4m3"] >= 0.9
    assert kl["KIVI-4"] < kl["KIVI-2"]
    assert kl["KIVI-2"] * 2 < kl["per-token-2"]  # the negative control is clearly worse
    assert agree["KIVI-2"] >= agree["per-token-2"]
    assert all(v >= -1e-6 for v in kl.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_equals_contiguous_with_quantized_history(dtype, monkeypatch):
    model = _model("qwen2").to(dtype)
    ids = torch.randint(0, 256, (1, 75), generator=torch.Generator().manual_seed(5))
    calls = _count_attend(monkeypatch)
    outs = []
    for paged in (False, True):
        cache = QuantizedCache(model.config, scheme="kivi", bits=2, group_size=32, residual=32, paged=paged,
                               page_size=32, max_cache_len=128)
        outs.append(model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache))
        assert cache.store.quantized_length(cache.get_seq_length()) == 32 and cache.store.dtype == dtype
    assert torch.equal(outs[0], outs[1]) and len(calls) == 2 * 11 * 2
