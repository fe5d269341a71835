import math

import pytest

from adaptrun.science.scaling import (AdaScale, LinearScale, NoScale, SqrtScale, linear_ramp,
                              rule_by_name, scale_ema_momentum)


def test_linear_warmup_from_start_of_training():
    rule = LinearScale(warmup_steps=10)
    assert rule.factor(1.0, 1.0, 0) == 1.0              # at B0: no change
    rule = LinearScale(warmup_steps=10)
    assert rule.factor(8.0, 3.0, 0) == pytest.approx(1.0)
    assert rule.factor(8.0, 3.0, 5) == pytest.approx(4.5)
    assert rule.factor(8.0, 3.0, 10) == pytest.approx(8.0)
    assert rule.factor(8.0, 3.0, 50) == pytest.approx(8.0)


def test_linear_warmup_again_when_batch_grows_mid_training():
    rule = LinearScale(warmup_steps=4)
    for step in range(10):
        rule.factor(2.0, 1.5, step)
    assert rule.factor(2.0, 1.5, 10) == pytest.approx(2.0)
    # The batch doubles at step 20: ramp 2 -> 4 over the next 4 steps.
    assert rule.factor(4.0, 2.0, 20) == pytest.approx(2.0)
    assert rule.factor(4.0, 2.0, 21) == pytest.approx(2.5)
    assert rule.factor(4.0, 2.0, 24) == pytest.approx(4.0)


def test_growth_during_a_ramp_starts_from_the_current_value():
    rule = LinearScale(warmup_steps=10)
    rule.factor(4.0, 1.0, 0)
    assert rule.factor(4.0, 1.0, 5) == pytest.approx(2.5)
    assert rule.factor(8.0, 1.0, 5) == pytest.approx(2.5)   # no jump
    assert rule.factor(8.0, 1.0, 15) == pytest.approx(8.0)


def test_shrinking_batch_lowers_lr_at_once():
    rule = LinearScale(warmup_steps=10)
    rule.factor(4.0, 1.0, 0)
    rule.factor(4.0, 1.0, 20)
    assert rule.factor(2.0, 1.0, 21) == pytest.approx(2.0)


def test_sqrt_adascale_none():
    assert SqrtScale(0).factor(16.0, 3.0, 0) == pytest.approx(4.0)
    assert AdaScale().factor(16.0, 3.0, 0) == pytest.approx(3.0)
    assert AdaScale().factor(16.0, 5.0, 1) == pytest.approx(5.0)
    assert NoScale().factor(16.0, 3.0, 0) == 1.0


def test_state_round_trip_continues_the_same_ramp():
    a = LinearScale(warmup_steps=10)
    a.factor(8.0, 1.0, 0)
    b = LinearScale(warmup_steps=10)
    b.load_state_dict(a.state_dict())
    assert b.factor(8.0, 1.0, 5) == a.factor(8.0, 1.0, 5) == pytest.approx(4.5)


def test_ema_momentum_rule_and_errors():
    assert scale_ema_momentum(0.999, 4) == pytest.approx(0.999**4)
    assert scale_ema_momentum(0.9, 1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="momentum"):
        scale_ema_momentum(1.5, 2)
    with pytest.raises(ValueError, match="positive"):
        LinearScale(0).factor(0.0, 1.0, 0)
    with pytest.raises(ValueError, match="choose one of"):
        rule_by_name("cubic")
    assert isinstance(rule_by_name("sqrt", 5), SqrtScale)
    assert linear_ramp(5, 0, 10, 0.0, 1.0) == pytest.approx(0.5)
    assert math.isclose(linear_ramp(3, 0, 0, 0.0, 1.0), 1.0)
