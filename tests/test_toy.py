"""The toy regression of chapter 2: regions, affine pieces, seeded data, input checks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_lab.lab.toy import BOUNDARIES, PIECES, X_RANGE, piecewise_data, piecewise_target, region


def test_regions_and_boundaries():
    x = torch.tensor([-3.0, -1.0001, -1.0, 0.0, 0.9999, 1.0, 3.0])
    assert region(x).tolist() == [0, 0, 1, 1, 1, 2, 2]


@given(st.floats(-3, 3), st.floats(-3, 3))
def test_target_is_the_regions_line(a, b):
    x = torch.tensor([a, b], dtype=torch.float64)
    r = region(x)
    y = piecewise_target(x)
    for xi, ri, yi in zip(x.tolist(), r.tolist(), y.tolist(), strict=True):
        slope, intercept = PIECES[ri]
        assert yi == pytest.approx(slope * xi + intercept, abs=1e-12)


def test_target_jumps_or_bends_at_each_boundary():
    """Neighbouring pieces differ, so one straight line cannot fit the data."""
    for b, left, right in zip(BOUNDARIES, PIECES[:-1], PIECES[1:], strict=True):
        assert left != right
        eps = 1e-9
        y = piecewise_target(torch.tensor([b - eps, b], dtype=torch.float64))
        slope_change = left[0] != right[0]
        assert slope_change or abs(float(y[1] - y[0])) > 1e-3


def test_data_is_seeded_and_in_range():
    x1, y1 = piecewise_data(200, seed=3)
    x2, y2 = piecewise_data(200, seed=3)
    x3, _ = piecewise_data(200, seed=4)
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == y1.shape == (200, 1) and x1.dtype == torch.float32
    assert float(x1.min()) >= X_RANGE[0] and float(x1.max()) <= X_RANGE[1]


def test_noise_free_data_equals_target_and_noise_has_its_scale():
    x, y = piecewise_data(4000, noise=0.0, seed=1, dtype=torch.float64)
    torch.testing.assert_close(y, piecewise_target(x))
    x, y = piecewise_data(4000, noise=0.2, seed=1, dtype=torch.float64)
    assert float((y - piecewise_target(x)).std()) == pytest.approx(0.2, rel=0.1)


def test_data_does_not_touch_global_rng():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    piecewise_data(10, seed=9)
    torch.testing.assert_close(torch.rand(3), a)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"n": 0}, ValueError),
        ({"n": 2.5}, TypeError),
        ({"n": 10, "noise": -0.1}, ValueError),
        ({"n": 10, "noise": float("nan")}, ValueError),
        ({"n": 10, "dtype": torch.int64}, TypeError),
    ],
)
def test_bad_arguments_raise(kwargs, err):
    with pytest.raises(err):
        piecewise_data(**kwargs)


def test_target_rejects_non_float():
    with pytest.raises(TypeError, match="x must be"):
        piecewise_target(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="x must be"):
        region([0.5])
