"""trous.AttentionPattern against brute-force Python loops written from the composition rules of
shared/spec/attention.md (the reference's reference), on small sizes, for every part alone and in
combination; density, flops, the FlexAttention mask_mod, the docstring's drawings and bad arguments."""
import itertools
import re

import pytest
import torch

import trous
from trous.attention import pattern as pattern_module
from trous.attention.pattern import AttentionPattern

WINDOWS = [(-1, -1), (0, 0), (2, 1), (-1, 0), (3, -1), (0, 2)]
CHUNKS = [0, 3, 20]
DILATIONS = [1, 2, 3]
SIZES = [(7, 7), (5, 9), (9, 5), (1, 6), (6, 1)]


def brute_force(Sq, Sk, causal=False, window=(-1, -1), chunk_size=0, dilation=1, global_tokens=None):
    """The rules, one pair at a time with Python ints (// and % round towards -inf)."""
    s = Sk - Sq
    left, right = window
    if global_tokens is None:
        flags = [False] * Sk
    elif isinstance(global_tokens, int):
        flags = [j < global_tokens for j in range(Sk)]
    else:
        flags = [bool(f) for f in global_tokens]
    mask = [[False] * Sk for _ in range(Sq)]
    for i in range(Sq):
        ip = i + s
        row_global = 0 <= ip < Sk and flags[ip]
        for j in range(Sk):
            delta = ip - j
            local = delta % dilation == 0
            if local and left != -1 and delta // dilation > left:
                local = False
            if local and right != -1 and delta // dilation < -right:
                local = False
            if chunk_size > 0 and ip // chunk_size != j // chunk_size:
                local = False
            ok = local or flags[j] or row_global
            if causal and j > ip:
                ok = False
            mask[i][j] = ok
    return torch.tensor(mask, dtype=torch.bool).reshape(Sq, Sk)


def _globals_for(Sk):
    flags = [(j * 7 + 3) % 5 == 0 for j in range(Sk)]  # scattered, neither end necessarily
    ends = [j == 0 or j == Sk - 1 for j in range(Sk)]  # both ends
    return [None, 2, flags, ends, [True] * Sk]


def _check(Sq, Sk, **kw):
    p = AttentionPattern(**kw)
    got = p.materialize(Sq, Sk)
    want = brute_force(Sq, Sk, **kw)
    assert got.dtype == torch.bool and got.shape == (Sq, Sk)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        pytest.fail(f"{kw} at Sq={Sq}, Sk={Sk}: differs at (i, j) {bad}")
    assert p.count(Sq, Sk) == int(want.sum()), (kw, Sq, Sk)  # the closed-form count


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", SIZES)
def test_materialize_matches_brute_force_every_combination(causal, Sq, Sk):
    for window, chunk, dilation in itertools.product(WINDOWS, CHUNKS, DILATIONS):
        for g in _globals_for(Sk):
            _check(Sq, Sk, causal=causal, window=window, chunk_size=chunk, dilation=dilation, global_tokens=g)


@pytest.mark.parametrize("kw", [dict(window=(5, 3), dilation=4), dict(chunk_size=8, causal=True),
                                dict(window=(6, 0), chunk_size=16, dilation=3, global_tokens=3, causal=True),
                                dict(window=(2, 2), global_tokens=[j % 9 == 4 for j in range(37)])])
@pytest.mark.parametrize("Sq,Sk", [(37, 37), (23, 37), (37, 23)])
def test_materialize_matches_brute_force_longer(kw, Sq, Sk):
    if isinstance(kw.get("global_tokens"), list) and len(kw["global_tokens"]) != Sk:
        kw = dict(kw, global_tokens=[j % 9 == 4 for j in range(Sk)])
    _check(Sq, Sk, **kw)


def test_known_equivalences():
    for Sq, Sk in [(9, 9), (5, 12), (12, 5)]:
        causal = AttentionPattern(causal=True).materialize(Sq, Sk)
        assert torch.equal(AttentionPattern(window=(-1, 0)).materialize(Sq, Sk), causal)
        assert torch.equal(AttentionPattern(window=(-1, 0), causal=True).materialize(Sq, Sk), causal)
        dense = torch.ones(Sq, Sk, dtype=torch.bool)
        assert torch.equal(AttentionPattern(chunk_size=1).materialize(Sq, Sk),
                           AttentionPattern(window=(0, 0)).materialize(Sq, Sk))
        assert torch.equal(AttentionPattern().materialize(Sq, Sk), dense)
        assert torch.equal(AttentionPattern(chunk_size=100).materialize(Sq, Sk),
                           AttentionPattern(window=(-1, -1)).materialize(Sq, Sk) & (torch.arange(Sq)[:, None]
                                                                                     + Sk - Sq >= 0))
        assert torch.equal(AttentionPattern(global_tokens=Sk, window=(0, 0)).materialize(Sq, Sk), dense)
        assert torch.equal(AttentionPattern(global_tokens=Sk, window=(0, 0), causal=True).materialize(Sq, Sk),
                           causal)
    # window (0, 0): the diagonal, bottom-right aligned
    m = AttentionPattern(window=(0, 0)).materialize(3, 5)
    assert m.nonzero().tolist() == [[0, 2], [1, 3], [2, 4]]
    # dilation d with window (w, w): 2w + 1 keys per interior row
    m = AttentionPattern(window=(2, 2), dilation=3).materialize(40, 40)
    assert m[20].nonzero().flatten().tolist() == [14, 17, 20, 23, 26]
    # causal with Sq > Sk: the first Sq - Sk rows are fully masked
    m = AttentionPattern(causal=True).materialize(6, 3)
    assert not m[:3].any() and m[3:].sum(1).tolist() == [1, 2, 3]
    # a query with i' < 0 has no chunk-local key (floor division), only global ones
    m = AttentionPattern(chunk_size=4, global_tokens=1).materialize(6, 3)
    assert m[:3].nonzero().tolist() == [[0, 0], [1, 0], [2, 0]]


def test_global_tokens_forms_agree():
    Sq, Sk = 6, 10
    count = AttentionPattern(window=(1, 0), global_tokens=3).materialize(Sq, Sk)
    as_list = AttentionPattern(window=(1, 0), global_tokens=[True] * 3 + [False] * 7).materialize(Sq, Sk)
    as_bool = AttentionPattern(window=(1, 0), global_tokens=torch.arange(Sk) < 3).materialize(Sq, Sk)
    as_u8 = AttentionPattern(window=(1, 0), global_tokens=(torch.arange(Sk) < 3).to(torch.uint8)).materialize(Sq, Sk)
    assert torch.equal(count, as_list) and torch.equal(count, as_bool) and torch.equal(count, as_u8)
    assert torch.equal(AttentionPattern(global_tokens=0, window=(1, 1)).materialize(Sq, Sk),
                       AttentionPattern(window=(1, 1)).materialize(Sq, Sk))
    # a count larger than Sk makes every key global
    assert AttentionPattern(global_tokens=50, window=(0, 0)).materialize(Sq, Sk).all()
    assert AttentionPattern(global_tokens=3).global_flags(Sk).tolist() == [True] * 3 + [False] * 7
    assert AttentionPattern().global_flags(Sk) is None and AttentionPattern(global_tokens=0).global_flags(Sk) is None


def test_density_count_and_flops():
    p = AttentionPattern(window=(2, 1), chunk_size=5, global_tokens=1, causal=True)
    for Sq, Sk in [(13, 13), (7, 19), (19, 7), (0, 5), (5, 0)]:
        n = int(brute_force(Sq, Sk, window=(2, 1), chunk_size=5, global_tokens=1, causal=True).sum())
        assert p.count(Sq, Sk) == n
        assert p.density(Sq, Sk) == (n / (Sq * Sk) if Sq * Sk else 0.0)
        assert p.flops(2, 3, 64, Sq, Sk) == 4 * 2 * 3 * 64 * n
        assert p.flops(2, 3, 64, Sq, Sk, backward=True) == 2.5 * 4 * 2 * 3 * 64 * n
    assert AttentionPattern().density(8, 8) == 1.0
    assert AttentionPattern(causal=True).density(8, 8) == 36 / 64


def test_count_in_blocks_equals_the_whole_mask(monkeypatch):
    monkeypatch.setattr(pattern_module, "_COUNT_BLOCK", 50)  # a few rows per block, the last one partial
    for p in [AttentionPattern(window=(3, 2), dilation=2, global_tokens=[j % 7 == 0 for j in range(61)]),
              AttentionPattern(chunk_size=9, causal=True, global_tokens=[j % 3 == 0 for j in range(61)]),
              AttentionPattern(window=(4, 0), global_tokens=61)]:
        assert p.count(45, 61) == int(p.materialize(45, 61).sum())


def test_count_at_long_lengths_is_analytic_where_known():
    S = 16384
    assert AttentionPattern(causal=True).count(S, S) == S * (S + 1) // 2
    w = 128
    assert AttentionPattern(window=(w, w)).count(S, S) == S * (2 * w + 1) - w * (w + 1)
    assert AttentionPattern(chunk_size=256, causal=True).count(S, S) == (S // 256) * 256 * 257 // 2


def test_mask_mod_equals_materialize():
    for kw in [dict(window=(2, 1), dilation=2, global_tokens=2, causal=True), dict(chunk_size=3),
               dict(global_tokens=[j in (0, 8) for j in range(9)], window=(0, 0))]:
        for Sq, Sk in [(9, 9), (5, 9)]:
            if isinstance(kw.get("global_tokens"), list) and len(kw["global_tokens"]) != Sk:
                continue
            p = AttentionPattern(**kw)
            mod = p.mask_mod(Sq, Sk)
            got = mod(0, 0, torch.arange(Sq)[:, None], torch.arange(Sk)[None, :])
            assert torch.equal(got, p.materialize(Sq, Sk))


def _drawings(doc):
    """The four 8x8 masks drawn side by side in AttentionPattern's docstring."""
    rows = [line.split() for line in doc.splitlines() if re.fullmatch(r"\s*([#.]{8}\s+){3}[#.]{8}\s*", line)]
    assert len(rows) == 8, "the docstring's drawing has changed shape"
    return [torch.tensor([[c == "#" for c in r[k]] for r in rows]) for k in range(4)]


def test_docstring_drawings_are_what_materialize_gives():
    want = [AttentionPattern(window=(2, 1)), AttentionPattern(window=(1, 1), dilation=2),
            AttentionPattern(chunk_size=3, causal=True), AttentionPattern(window=(1, 0), global_tokens=1)]
    for drawn, p in zip(_drawings(AttentionPattern.__doc__), want):
        assert torch.equal(drawn, p.materialize(8, 8)), p


def test_exported_from_trous():
    assert trous.AttentionPattern is AttentionPattern
    assert "AttentionPattern" in trous.__all__ and "sparse_attention" in trous.__all__
    assert "window=(1, 1)" in repr(AttentionPattern(window=[1, 1]))


@pytest.mark.parametrize("kw,name", [
    (dict(window=(-2, 0)), "window"), (dict(window=(0, -5)), "window"), (dict(window=3), "window"),
    (dict(window=(1, 2, 3)), "window"), (dict(window=(0.5, 1)), "window"), (dict(window=(True, 0)), "window"),
    (dict(window="ab"), "window"), (dict(chunk_size=-1), "chunk_size"), (dict(chunk_size=2.0), "chunk_size"),
    (dict(dilation=0), "dilation"), (dict(dilation=-3), "dilation"), (dict(global_tokens=-1), "global_tokens"),
    (dict(global_tokens=1.5), "global_tokens"), (dict(global_tokens=torch.ones(3)), "global_tokens"),
    (dict(global_tokens=torch.ones(2, 3, dtype=torch.bool)), "global_tokens"),
    (dict(global_tokens=["a"]), "global_tokens"), (dict(causal=1), "causal"),
])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        AttentionPattern(**kw)


def test_flags_of_the_wrong_length_are_refused():
    p = AttentionPattern(global_tokens=[True, False, True])
    with pytest.raises(ValueError, match=r"global_tokens must have Sk = 5 flags, got 3"):
        p.materialize(5, 5)
    with pytest.raises(ValueError, match=r"global_tokens"):
        p.count(4, 4)
    assert p.materialize(2, 3).shape == (2, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_tile_walk_counts_exactly_the_materialized_pairs(causal):
    """The kernels' pattern (csrc/attention/pattern.h, through its coverage op) and this one agree:
    each pair the mask allows is counted once by the tile walk, and no other, in both walks."""
    combos = itertools.product([(7, 7), (5, 9), (9, 5)], WINDOWS, CHUNKS, DILATIONS)
    for n, ((Sq, Sk), window, chunk, dilation) in enumerate(combos):
        g = _globals_for(Sk)[n % 5]
        p = AttentionPattern(causal=causal, window=window, chunk_size=chunk, dilation=dilation, global_tokens=g)
        transposed = bool(n // 5 % 2)
        counted, _ = torch.ops.trous.attention_pattern_coverage(Sq, Sk, p.global_flags(Sk), causal, *window, chunk,
                                                                dilation, 4, 2, transposed)
        assert torch.equal(counted, p.materialize(Sq, Sk).to(counted.dtype)), (p, Sq, Sk, transposed)
