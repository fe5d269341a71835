"""Gradient noise scale against analytic truth (least-squares regression).

For x ~ N(0, I_n), y = x.w* + eps (eps ~ N(0, sigma^2)) and per-example loss
0.5 (x.w - y)^2 at weights w with d = w - w*, the per-example gradient g = x (x.d - eps) has
E[g] = d, so |G|^2 = |d|^2, and tr(Sigma) = (n + 1)|d|^2 + n sigma^2.
"""
import numpy as np
import pytest

from adaptrun.science.gns import GNSState, grad_var_at, precondition, unbiased_estimates

N_DIM, SIGMA = 10, 0.5


def _truth(d):
    sqr = float(d @ d)
    return sqr, (N_DIM + 1) * sqr + N_DIM * SIGMA**2


def _per_example_grads(rng, d, shape):
    x = rng.standard_normal(shape + (N_DIM,))
    eps = SIGMA * rng.standard_normal(shape)
    return x * ((x @ d) - eps)[..., None]


def _estimate(groups, group_batch, draws=3000, seed=0):
    """Smoothed estimates from `groups` small-batch gradients of `group_batch` examples each."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(N_DIM)
    d /= np.linalg.norm(d)
    g = _per_example_grads(rng, d, (draws, groups, group_batch))
    small = g.mean(axis=2)                      # (draws, groups, n): each replica / micro-batch
    big = small.mean(axis=1)                    # (draws, n): after the all-reduce
    small_sqr = (small**2).sum(-1).mean(-1)
    big_sqr = (big**2).sum(-1)
    sqr, tr = unbiased_estimates(small_sqr, big_sqr, group_batch, groups * group_batch)
    state = GNSState(decay=0.999)
    for s, t in zip(sqr, tr):
        state = state.update(s, t)
    return state, _truth(d)


@pytest.mark.parametrize("replicas", range(2, 9))
def test_noise_scale_within_5_percent_across_replicas(replicas):
    state, (true_sqr, true_tr) = _estimate(replicas, group_batch=16, seed=replicas)
    assert state.grad_sqr == pytest.approx(true_sqr, rel=0.05)
    assert state.trace_sigma == pytest.approx(true_tr, rel=0.05)
    assert state.noise_scale == pytest.approx(true_tr / true_sqr, rel=0.05)


@pytest.mark.parametrize("micro_batches", [2, 4, 8])
def test_noise_scale_from_accumulation_micro_batches_on_one_replica(micro_batches):
    # One replica, micro-batches of 8 examples; the big batch is the accumulated gradient.
    state, (true_sqr, true_tr) = _estimate(micro_batches, group_batch=8, seed=100 + micro_batches)
    assert state.noise_scale == pytest.approx(true_tr / true_sqr, rel=0.05)


def test_single_draw_is_unbiased_in_expectation_not_per_draw():
    # Individual estimates are noisy (some negative); only averages are trustworthy.
    rng = np.random.default_rng(1)
    d = np.ones(N_DIM) / np.sqrt(N_DIM)
    g = _per_example_grads(rng, d, (5000, 2, 4)).mean(axis=2)
    sqr, tr = unbiased_estimates((g**2).sum(-1).mean(-1), (g.mean(1)**2).sum(-1), 4, 8)
    assert (sqr < 0).any()
    assert sqr.mean() == pytest.approx(1.0, rel=0.1)


def test_bias_correction_makes_first_update_exact():
    s = GNSState(decay=0.99).update(2.0, 30.0)
    assert s.grad_sqr == pytest.approx(2.0) and s.trace_sigma == pytest.approx(30.0)
    assert s.noise_scale == pytest.approx(15.0)


def test_bigger_batch_steps_count_as_more_b0_steps():
    # One update at scale 4 decays the past like four updates at scale 1.
    a = GNSState(decay=0.9).update(1.0, 1.0).update(5.0, 5.0, scale=4.0)
    b = GNSState(decay=0.9).update(1.0, 1.0)
    for _ in range(4):
        b = b.update(5.0, 5.0)
    assert a.grad_sqr == pytest.approx(b.grad_sqr)


def test_non_finite_estimates_are_skipped_and_state_round_trips():
    s = GNSState().update(1.0, 4.0).update(float("nan"), 1.0)
    assert s.updates == 1
    assert GNSState.from_dict(s.to_dict()) == s
    assert np.isnan(GNSState().noise_scale)


def test_needs_two_batch_sizes():
    with pytest.raises(ValueError, match="more than one replica"):
        unbiased_estimates(1.0, 1.0, 8, 8)


def test_adam_preconditioned_gradient_and_grad_var_convention():
    g = np.array([1.0, -2.0, 4.0])
    v = np.array([1.0, 4.0, 16.0])
    np.testing.assert_allclose(precondition(g, v, eps=0.0), [1.0, -1.0, 1.0])
    np.testing.assert_allclose(precondition(g, v * 0.5, eps=0.0, bias_correction2=0.5), [1, -1, 1])
    assert grad_var_at(128.0, 32) == pytest.approx(4.0)
