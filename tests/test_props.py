"""The property-suite helpers (tests/props.py) do what the family suites rely on."""
import pytest
import torch
from props import (
    LAYOUTS,
    assert_refused,
    assert_same_nan_and_close,
    given,
    mixed_devices,
    nonfinite,
    run_isolated,
    st,
    with_layout,
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_with_layout_keeps_values_and_changes_strides(layout):
    t = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    if layout == "overlapping":
        t = t[:, :, :1, :].expand(2, 3, 5, 7).clone()
    if layout == "expanded":
        t = t[:1].expand(2, 3, 5, 7).clone()
    out = with_layout(t, layout)
    assert torch.equal(out, t)
    assert (out.stride() == t.contiguous().stride()) == (layout == "contiguous")


def test_with_layout_refuses_unknown():
    with pytest.raises(ValueError, match="unknown layout"):
        with_layout(torch.randn(2, 2), "bogus")


@given(st.data())
def test_nonfinite_plants_nan_and_inf_only_where_drawn(data):
    t = torch.randn(64, dtype=torch.float64)
    out = nonfinite(data.draw, t, p=0.5)
    changed = out != t
    assert changed.any() and (~changed).any()
    assert not out[changed].isfinite().any()
    assert torch.equal(out[~changed], t[~changed])


def test_assert_same_nan_and_close_catches_each_difference():
    ref = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert_same_nan_and_close(ref.clone(), ref, 0, 0)
    for bad in ([1.0, 0.0, float("inf"), 2.0], [float("nan"), float("nan"), float("inf"), 2.0],
                [1.0, float("nan"), float("-inf"), 2.0], [1.0, float("nan"), float("inf"), 2.5]):
        with pytest.raises(AssertionError):
            assert_same_nan_and_close(torch.tensor(bad), ref, 1e-3, 1e-3)


def _checked_add(x, y):
    if x.shape != y.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    return x + y


def test_assert_refused_checks_names_accepting_and_meta():
    x, y = torch.randn(2), torch.randn(3)
    assert "y must" in assert_refused(_checked_add, (x, y), names=["y"])
    with pytest.raises(AssertionError, match="does not name"):
        assert_refused(_checked_add, (x, y), names=["weight"])
    with pytest.raises(pytest.fail.Exception, match="accepted an invalid input"):
        assert_refused(_checked_add, (x, x), names=["y"])

    def cpu_only(x):
        if x.device.type == "cpu":
            raise RuntimeError("x is bad")
        return x

    with pytest.raises(pytest.fail.Exception, match="accepted"):
        assert_refused(cpu_only, (x,), names=["x"])


def test_mixed_devices_moves_only_the_chosen_tensors():
    args = mixed_devices([torch.randn(2), torch.randn(2), 3], [1])
    assert [getattr(a, "device", None) for a in args][:2] == [torch.device("cpu"), torch.device("meta")]
    assert args[2] == 3


def test_run_isolated_reports_a_crash():
    assert run_isolated("import os; os.abort()").returncode != 0
    assert run_isolated("print(1 + 1)").stdout.strip() == "2"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_with_layout_takes_empty_and_size_one_dimensions(layout):
    for shape in [(0, 3, 4), (2, 0, 4), (1, 1, 1), (3, 4, 0)]:
        t = torch.randn(shape)
        assert torch.equal(with_layout(t, layout), t)
