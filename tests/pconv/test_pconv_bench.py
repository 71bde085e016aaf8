"""The pconv bench cases (python -m trous.bench --family pconv) build and compute what their
baselines compute, on a tiny shape."""
import torch

from trous.bench import load_family


def test_bench_cases_agree_with_their_baselines():
    mod = load_family("pconv")
    assert mod.FAMILY == "pconv"
    cases = mod.cases("cpu", quick=False, shape=(2, 16, 7, 9))
    names = {c.op for c in cases}
    for mode in ("fwd", "fwd+bwd"):
        for base in ("split_cat", "slicing+clone", "cp conv floor"):
            assert f"channel_partial {mode} vs {base}" in names
    assert "pconv+1x1 fwd vs unfused pair" in names and "pconv+1x1 fwd+bwd vs unfused pair" in names
    for mode in ("fwd", "fwd+bwd"):
        for row in ("masked {} vs plain conv", "masked {} vs nvidia composition",
                    "masked multi_channel {} vs plain conv", "masked multi_channel {} vs nvidia composition"):
            assert row.format(mode) in names
    by_op = {c.op: c for c in cases}
    # multi_channel fwd+bwd: the restated target (the floor bound, see MASKED_NVIDIA_MC_FWD_BWD_TARGET)
    assert by_op["masked multi_channel fwd+bwd vs nvidia composition"].targets == {"speedup": 1.7}
    assert by_op["masked multi_channel fwd+bwd vs plain conv"].targets == {"speedup": 1 / 1.15}
    for c in cases:
        assert bool(c.targets) == ("aten route" not in c.op), c.op  # the route comparison is informative
        inputs = c.make_inputs(0)
        got, want = c.fn(*inputs), c.baseline(*inputs)
        if "vs plain conv" in c.op:  # the floor computes a plain convolution: same shapes only
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert a.shape == b.shape and bool(torch.isfinite(a).all())
            continue
        if c.op.startswith("pconv+1x1"):
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        elif "floor" in c.op:
            cp = inputs[1].shape[0]
            if "bwd" in c.op:  # grads of (x, w) vs the floor's (x1, w): the first cp channels of grad x
                torch.testing.assert_close(got[0][:, :cp], want[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(got[:, :cp], want, rtol=1e-4, atol=1e-4)
        elif isinstance(got, tuple):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_masked_quick_rows_and_unet_row():
    mod = load_family("pconv")
    quick = {c.op: c for c in mod.cases("cpu", quick=True)}
    assert "masked fwd vs plain conv" in quick and "masked fwd+bwd vs nvidia composition" in quick
    assert quick["masked fwd vs plain conv"].shape.startswith("2x32x64x64")
    assert quick["masked multi_channel fwd vs nvidia composition"].targets == {"speedup": 2.0}
    assert quick["masked fwd vs nvidia composition"].targets == {"speedup": 1.4}
    unet = mod._unet_cases("cpu", "fp32")[0]
    x, m = unet.make_inputs(0)
    unet.fn(x[:2, :, :64, :64], m[:2, :, :64, :64])
    unet.baseline(x[:2, :, :64, :64], m[:2, :, :64, :64])
