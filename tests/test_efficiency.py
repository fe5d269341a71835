import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptrun.science.efficiency import efficiency, gain, goodput, noise_scale


def test_gain_by_hand():
    # var = 3, sqr = 1, s = 4: (3 + 1) / (3/4 + 1) = 16/7
    assert gain(1.0, 3.0, 4.0) == pytest.approx(16 / 7)
    assert efficiency(1.0, 3.0, 4.0) == pytest.approx(4 / 7)
    # Same thing through B_noise: B0 = 100, B_noise = 300, B = 400 -> (300+100)/(300+400)
    assert noise_scale(1.0, 3.0, 100) == pytest.approx(300)
    assert efficiency(1.0, 3.0, 4.0) == pytest.approx((300 + 100) / (300 + 400))


def test_goodput_is_b0_times_gain_over_step_time():
    assert goodput(400, 0.5, 1.0, 3.0, 100) == pytest.approx(100 * (16 / 7) / 0.5)


def test_degenerate_statistics():
    assert gain(0.0, 5.0, 8.0) == pytest.approx(8.0)    # all noise: bigger batch helps fully
    assert gain(-1.0, 5.0, 8.0) == pytest.approx(8.0)   # a negative |G|^2 estimate reads as 0
    assert gain(2.0, 0.0, 8.0) == pytest.approx(1.0)    # no noise: it does not help
    assert gain(0.0, 0.0, 8.0) == pytest.approx(1.0)
    assert np.isinf(noise_scale(0.0, 1.0, 32))


pos = st.floats(1e-6, 1e6, allow_nan=False)


@given(sqr=pos, var=pos, s1=st.floats(1.0, 1e3), s2=st.floats(1.0, 1e3))
def test_gain_bounds_and_efficiency_monotone(sqr, var, s1, s2):
    r = gain(sqr, var, s1)
    assert 1.0 - 1e-9 <= r <= s1 * (1 + 1e-9)
    lo, hi = sorted((s1, s2))
    assert efficiency(sqr, var, hi) <= efficiency(sqr, var, lo) + 1e-9
    assert gain(sqr, var, hi) >= gain(sqr, var, lo) - 1e-9


def test_vectorised():
    s = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(gain(np.ones(3), np.ones(3) * 3, s), 4 / (3 / s + 1))
