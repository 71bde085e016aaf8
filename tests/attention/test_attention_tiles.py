"""The tile walk of csrc/attention/pattern.h, replayed pair by pair by the
``attention_pattern_coverage`` op, against the spec's composition rules written here with plain
loops: every allowed pair is counted exactly once, skipped tiles hold no allowed pair, full tiles
hold only allowed pairs, in the forward and the transposed walk alike. And the walk visits few
pairs beyond the allowed ones (cost follows density), measured."""

import itertools
import random

import pytest
import torch

import trous  # noqa: F401  (loads the ops)


def spec_allowed(Sq, Sk, causal, left, right, chunk, dilation, flags):
    """attention.md, "Composition rules", one pair at a time."""
    shift = Sk - Sq
    mask = torch.zeros(Sq, Sk, dtype=torch.int32)
    for i in range(Sq):
        ip = i + shift
        grow = flags is not None and 0 <= ip < Sk and bool(flags[ip])
        for j in range(Sk):
            diff = ip - j
            local = diff % dilation == 0
            if local:
                steps = diff // dilation
                if left >= 0 and steps > left:
                    local = False
                if right >= 0 and -steps > right:
                    local = False
            if local and chunk > 0 and ip // chunk != j // chunk:
                local = False
            gcol = flags is not None and bool(flags[j])
            ok = (local or grow or gcol) and (not causal or j <= ip)
            mask[i, j] = int(ok)
    return mask


def coverage(Sq, Sk, causal=False, left=-1, right=-1, chunk=0, dilation=1, flags=None, tq=4, tk=3, transposed=False):
    return torch.ops.trous.attention_pattern_coverage(
        Sq, Sk, flags, causal, left, right, chunk, dilation, tq, tk, transposed
    )


def flags_of(Sk, where):
    f = torch.zeros(Sk, dtype=torch.bool)
    for j in where:
        if 0 <= j < Sk:
            f[j] = True
    return f


CASES = [
    dict(),  # dense
    dict(causal=True),
    dict(left=3, right=0),  # a causal window of 4 keys
    dict(left=-1, right=0),  # the window form of causal
    dict(left=0, right=0),
    dict(left=2, right=5),
    dict(chunk=4),
    dict(chunk=5, causal=True),
    dict(chunk=40),  # chunk larger than S
    dict(dilation=3),
    dict(dilation=2, left=2, right=2),
    dict(dilation=3, left=1, right=0, causal=True),
    dict(dilation=4, chunk=6, left=3, right=3),
    dict(dilation=20),  # dilation beyond S
    dict(glob=[0]),
    dict(glob=[0, 1], left=1, right=1),
    dict(glob=[0, "last"], causal=True, left=2, right=0),
    dict(glob=[2, 5], dilation=3, left=1, right=1),
    dict(glob=[0, 3], chunk=4, causal=True, dilation=2),
    dict(glob="all", left=1, right=1),
    dict(glob="all", causal=True),
    dict(glob=[], left=1, right=1),  # all-false flags
]
SHAPES = [(1, 1), (13, 13), (11, 17), (17, 11), (7, 2), (2, 9)]


def _flags(case, Sk):
    g = case.get("glob")
    if g is None:
        return None
    if g == "all":
        return torch.ones(Sk, dtype=torch.bool)
    return flags_of(Sk, [Sk - 1 if x == "last" else x for x in g])


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "dense")
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_every_allowed_pair_is_counted_exactly_once(case, transposed):
    for (Sq, Sk), (tq, tk) in itertools.product(SHAPES, [(4, 3), (1, 1), (64, 64)]):
        flags = _flags(case, Sk)
        kw = {k: v for k, v in case.items() if k != "glob"}
        want = spec_allowed(
            Sq,
            Sk,
            kw.get("causal", False),
            kw.get("left", -1),
            kw.get("right", -1),
            kw.get("chunk", 0),
            kw.get("dilation", 1),
            flags,
        )
        counted, visited = coverage(Sq, Sk, flags=flags, tq=tq, tk=tk, transposed=transposed, **kw)
        bad = (counted != want).nonzero()
        assert bad.numel() == 0, (
            f"Sq={Sq} Sk={Sk} tiles=({tq},{tk}): pairs counted {counted[tuple(bad[0])]} times, "
            f"allowed={want[tuple(bad[0])]}, first at {bad[0].tolist()}"
        )
        assert bool((visited >= counted).all())


def test_random_patterns_both_walks():
    rng = random.Random(11)
    for _ in range(60):
        Sq, Sk = rng.randint(0, 23), rng.randint(0, 23)
        kw = dict(
            causal=rng.random() < 0.5,
            left=rng.choice([-1, 0, 1, 3, 7]),
            right=rng.choice([-1, 0, 2, 5]),
            chunk=rng.choice([0, 0, 3, 8]),
            dilation=rng.choice([1, 1, 2, 3, 5]),
        )
        flags = None
        if rng.random() < 0.4 and Sk > 0:
            flags = torch.rand(Sk, generator=torch.Generator().manual_seed(rng.randint(0, 99))) < 0.2
        want = spec_allowed(Sq, Sk, flags=flags, **kw)
        tq, tk = rng.choice([1, 2, 4, 5]), rng.choice([1, 3, 4, 6])
        for transposed in (False, True):
            counted, _ = coverage(Sq, Sk, flags=flags, tq=tq, tk=tk, transposed=transposed, **kw)
            assert torch.equal(counted, want), (Sq, Sk, kw, flags, tq, tk, transposed)


def test_cost_follows_density():
    """Pairs in visited tiles over allowed pairs, for 64x64 tiles at S = 1024: the band's ragged edges
    only (a dilated window costs what an undilated one of the same count costs)."""
    S, T = 1024, 64

    def overhead(**kw):
        counted, visited = coverage(S, S, tq=T, tk=T, **kw)
        return visited.sum().item() / counted.sum().item()

    for kw, bound in [
        (dict(left=128, right=128), 1.5),
        (dict(chunk=256, causal=True), 1.3),
        (dict(causal=True), 1.1),
        (dict(left=255, right=0), 1.3),
    ]:
        assert overhead(**kw) <= bound, (kw, overhead(**kw))
    dilated, plain = overhead(left=64, right=64, dilation=4), overhead(left=64, right=64)
    assert dilated <= 1.05 * plain, (dilated, plain)
    flags = flags_of(S, range(4))
    counted, visited = coverage(S, S, flags=flags, left=64, right=64, tq=T, tk=T)
    # the global rows' tile (4 rows) and the global keys' span add about 2 * 64 * S pairs
    extra = visited.sum().item() - coverage(S, S, left=64, right=64, tq=T, tk=T)[1].sum().item()
    assert extra <= 2 * T * S + 2 * T * T, extra


def test_bad_pattern_arguments_name_the_argument():
    with pytest.raises(ValueError, match="window"):
        coverage(4, 4, left=-2)
    with pytest.raises(ValueError, match="chunk_size"):
        coverage(4, 4, chunk=-1)
    with pytest.raises(ValueError, match="dilation"):
        coverage(4, 4, dilation=0)
    with pytest.raises(ValueError, match="global_tokens"):
        coverage(4, 4, flags=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="global_tokens"):
        coverage(4, 4, flags=torch.ones(4, dtype=torch.float32))
