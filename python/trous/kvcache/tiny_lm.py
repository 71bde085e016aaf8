"""The tiny byte-level Llama-style LM of the KV-cache end-to-end tests and bench (tests/data/tiny_lm.pt).

A causal LM built with transformers from a config (3 layers, hidden 128, 4 query heads over 2 KV
heads of head_dim 64, vocabulary: the 256 byte values), trained on the Python standard library's own
``.py`` sources (text that ships with every Python), so that its attention is structured (indentation,
brackets, identifiers repeated at a distance), not random. Seeded and a fixed number of steps on one
CPU thread: the same torch build reproduces the same checkpoint. About 10 minutes on one (shared) core.

    nice -n 10 python -m trous.kvcache.tiny_lm             # writes tests/data/tiny_lm.pt (fp16, ~1.5 MB)

``load_tiny_lm()`` rebuilds the model from the checkpoint (config stored beside the weights).
"""
import argparse
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

# The checkpoint lives in the source tree's tests/data (not in the wheel): python/trous/kvcache -> repo root.
CHECKPOINT = Path(__file__).resolve().parents[3] / "tests" / "data" / "tiny_lm.pt"

CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def corpus_files():
    """The standard library's top-level .py files, sorted (deterministic for one Python version)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in lib.glob("*.py") if p.is_file())


def load_corpus(max_bytes=None):
    data = b"".join(p.read_bytes() + b"\n" for p in corpus_files())
    return data[:max_bytes] if max_bytes else data


def prompt_text(n_bytes=384, offset=None):
    """A held-out piece of source to prompt the model with (from the end of the corpus: not trained on)."""
    data = load_corpus()
    start = len(data) - 4 * n_bytes if offset is None else offset
    return data[start:start + n_bytes]


def build_model(config=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(config or CONFIG))
    return LlamaForCausalLM(cfg)


def load_tiny_lm(path=CHECKPOINT, dtype=torch.float32):
    """The trained model (eval mode) in ``dtype``; raises FileNotFoundError when the checkpoint is missing."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(CONFIG)
    config.update(state.get("config", {}))
    model = build_model(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state["weights"].items()}, strict=False)
    # Tied output embedding is not stored; anything else missing is an error.
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"tiny LM checkpoint {path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(dtype).eval()


def train(steps, seq_len, batch, lr, seed, log_every=50):
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    holdout = 64 * 1024  # the last 64 KiB are never trained on (prompts come from there)
    train_data = data[:-holdout]
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus {len(data)} bytes ({len(corpus_files())} files), model {n_params} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        cos = 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.1 + 0.9 * cos)
        starts = torch.randint(0, len(train_data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([train_data[s:s + seq_len + 1] for s in starts.tolist()])
        out = model(input_ids=x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        x = data[-holdout:-holdout + 8 * seq_len + 1]
        logits = model(input_ids=x[:-1].reshape(1, -1)).logits
        val = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[1:]).item()
    print(f"held-out loss {val:.3f} nats/byte ({time.time() - t0:.0f} s)", flush=True)
    return model, val


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    args = ap.parse_args(argv)
    model, val = train(args.steps, args.seq_len, args.batch, args.lr, args.seed)
    weights = {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(steps=args.steps, seq_len=args.seq_len, batch=args.batch, lr=args.lr, seed=args.seed,
                heldout_loss=val, python=sys.version.split()[0], torch=str(torch.__version__))
    torch.save({"config": CONFIG, "weights": weights, "train": meta}, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


# ---- accuracy of a cache against the full-precision one ------------------------------------------------------
# The formats of the README's accuracy table: name -> trous.hf.QuantizedCache options (G 32, R 128).
ACCURACY_FORMATS = {
    "int8 (symmetric)": dict(scheme="symmetric", bits=8),
    "fp8 e4m3": dict(scheme="fp8", bits=8),
    "KIVI-4": dict(scheme="kivi", bits=4),
    "KIVI-2": dict(scheme="kivi", bits=2),
    "per-token-2": dict(scheme="per_token", bits=2),
}


def _step_logits(model, tokens, n_prompt, cache):
    """Logits [n_new, vocab] (fp32) of each decode step when feeding ``tokens`` [1, T] one by one after a
    prefill of the first n_prompt (teacher forcing on one fixed trajectory)."""
    out = []
    with torch.no_grad():
        model(input_ids=tokens[:, :n_prompt], cache=cache, use_cache=True)
        for t in range(n_prompt, tokens.shape[1]):
            logits = model(input_ids=tokens[:, t:t + 1], cache=cache, use_cache=True).logits
            out.append(logits[0, -1].float())
    return torch.stack(out)


def cache_accuracy(model, prompt: torch.Tensor, n_new: int, make_cache, reference=None):
    """KL(full precision || cache) of the next-token distributions (nats, mean over the n_new - 1 decode steps) and
    the greedy-token agreement, along the full-precision greedy trajectory of ``n_new`` tokens after ``prompt``
    [1, P]. make_cache() builds a fresh cache for the model; ``reference`` = (tokens, logits) reuses the
    full-precision run. Returns (kl, agreement, reference)."""
    from transformers import DynamicCache

    if reference is None:
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=n_new, do_sample=False,
                                    cache=DynamicCache(config=model.config))
        # Each step's token is fed (its logits are the next step's): n_new - 1 decode steps after the prefill.
        logits = _step_logits(model, tokens[:, :-1], prompt.shape[1], DynamicCache(config=model.config))
        reference = (tokens, logits)
    tokens, ref_logits = reference
    logits = _step_logits(model, tokens[:, :-1], prompt.shape[1], make_cache())
    lp, lq = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return kl, agree, reference


def accuracy_table(model=None, prompts=2, prompt_bytes=384, n_new=64, formats=None, group_size=32, residual=128,
                   hf_fp8=True):
    """{format: (KL, agreement)} averaged over ``prompts`` held-out prompts of the tiny LM (trous caches and, if
    ``hf_fp8``, transformers' own QuantizedCache fp8 backend, the one that needs no extra package)."""
    from transformers import QuantizedCache as HFQuantizedCache

    from ..hf.cache import QuantizedCache

    model = model or load_tiny_lm()
    formats = formats or ACCURACY_FORMATS
    data = load_corpus()
    rows = {}
    for i in range(prompts):
        start = len(data) - (i + 1) * 8 * prompt_bytes
        prompt = torch.tensor(list(data[start:start + prompt_bytes]), dtype=torch.long).reshape(1, -1)
        ref = None
        makers = {name: (lambda o=o: QuantizedCache(model.config, **{"group_size": group_size, "residual": residual,
                                                                     **o}))
                  for name, o in formats.items()}
        if hf_fp8:
            makers["HF QuantizedCache fp8"] = lambda: HFQuantizedCache("fp8", model.config)
        for name, make in makers.items():
            kl, agree, ref = cache_accuracy(model, prompt, n_new, make, ref)
            k0, a0 = rows.get(name, (0.0, 0.0))
            rows[name] = (k0 + kl / prompts, a0 + agree / prompts)
    return rows


if __name__ == "__main__":
    main()
