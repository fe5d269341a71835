"""Gradient noise scale: unbiased estimates from two batch sizes, smoothed.

The model (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A).
Let G be the true gradient and Sigma the per-example gradient covariance. A gradient
averaged over a batch of B examples has

    E[|g_B|^2] = |G|^2 + tr(Sigma) / B.

Measuring |g|^2 at two batch sizes b_small < b_big (each replica's local gradient or each
accumulation micro-batch's gradient, and the averaged gradient after the all-reduce) gives
two equations and so unbiased estimates of both unknowns:

    |G|^2     = (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
    tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1 / b_small - 1 / b_big)

Each single estimate is very noisy (it can be negative), so |G|^2 and tr(Sigma) are
exponentially averaged *separately* and only their ratio is taken:

    B_noise = tr(Sigma) / |G|^2            (in examples)

The averages are bias-corrected like Adam's moments (divide by 1 - prod(decay)) so early
values are not pulled towards zero. They decay per B0-step of *training*, not per estimate:
an estimate taken n optimizer steps at scale s = B/B0 after the last one decays them by
``decay ** (n * s)`` (a step at a bigger batch covers more examples, the EMA rule of Busbridge
et al. 2023), so the memory is ~1 / (1 - decay) B0-steps whatever the measuring cadence. The
noise scale grows as training goes on; an average whose memory outlives the phase it
measures reports the past.

The spread of the single estimates gives each average a standard error over the effective
number of estimates it holds (Kish's n_eff of the exponential weights), and so an interval of
the noise scale (``GNSState.noise_scale_bounds``). What a job acts on is its low end
(``GNSState.conservative``: |G|^2 one standard error up, tr(Sigma) one down): a smaller
batch and a smaller gain until the estimates agree. Early in training, where few estimates
disagree widely, that bound stays near zero and the batch stays near B0.

Pollux/AdaptDL report the variance at the initial batch B0, ``grad_var = tr(Sigma) / B0``,
so that B_noise = B0 * grad_var / grad_sqr; ``grad_var_at`` converts.

Adam-family optimizers are measured on the preconditioned gradient g / (sqrt(v_hat) + floor)
(``precondition``; the worker floors v_hat per tensor at its mean, and skips the step before
Adam has a second moment), the direction Adam steps in; others, and
``AdaptiveDataParallel(gns_preconditioned=False)``, on the raw gradient. The docs'
Performance page compares both against the critical batch measured by
``benchmarks/critical_batch.py``.

Everything here is a pure function of numpy arrays (or floats); the worker library feeds it
squared norms measured with torch, the tests feed it analytic draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "GNSState",
    "unbiased_estimates",
    "precondition",
    "grad_var_at",
]


def unbiased_estimates(small_sqr, big_sqr, b_small, b_big):
    """Unbiased (|G|^2, tr(Sigma)) from squared norms at batch sizes b_small < b_big.

    ``small_sqr`` is the mean of |g|^2 over the small-batch gradients (replicas or
    micro-batches), ``big_sqr`` the |g|^2 of their average. Works elementwise on arrays.
    """
    small_sqr = np.asarray(small_sqr, dtype=np.float64)
    big_sqr = np.asarray(big_sqr, dtype=np.float64)
    b_small = np.asarray(b_small, dtype=np.float64)
    b_big = np.asarray(b_big, dtype=np.float64)
    if np.any(b_big <= b_small):
        raise ValueError(
            "gradient noise scale needs b_big > b_small (more than one replica or "
            "micro-batch); got b_small=%s, b_big=%s" % (b_small, b_big)
        )
    grad_sqr = (b_big * big_sqr - b_small * small_sqr) / (b_big - b_small)
    trace_sigma = (small_sqr - big_sqr) / (1.0 / b_small - 1.0 / b_big)
    return grad_sqr, trace_sigma


def precondition(grad, exp_avg_sq, eps: float = 1e-8, bias_correction2: float = 1.0):
    """The Adam-preconditioned gradient g / (sqrt(v / bias_correction2) + eps)."""
    v_hat = np.asarray(exp_avg_sq, dtype=np.float64) / bias_correction2
    return np.asarray(grad, dtype=np.float64) / (np.sqrt(v_hat) + eps)


def grad_var_at(trace_sigma, batch):
    """Variance of a batch-``batch`` gradient, tr(Sigma)/batch (Pollux's grad_var at B0)."""
    return np.asarray(trace_sigma, dtype=np.float64) / batch


@dataclass(frozen=True)
class GNSState:
    """Bias-corrected exponential averages of |G|^2 and tr(Sigma), with their spread.

    ``decay`` is the decay per B0-step of training: an estimate taken ``scale`` B0-steps
    after the one before it (steps since the last measured one x global batch / B0) decays
    the averages by ``decay ** scale``, so the memory is ~1 / (1 - decay) B0-steps of
    training whatever the measuring cadence and the batch. ``weight`` is 1 - prod(decay) so
    far. Each estimate enters in units of ``ref``, the recent squared norm of the big-batch
    gradient before it, so estimates from steps whose gradient
    scale differs by orders of magnitude (early in training, and under Adam's preconditioner
    while its second moment settles) weigh alike and the ratio is not the largest era's.
    The second moments (``sqr2_biased``, ``var2_biased``) and the sum of squared weights
    (``weight2``) give each average's standard error over the effective number of estimates
    it holds, n_eff = weight^2 / weight2 (Kish); ``noise_scale_bounds`` turns them into an
    interval. Frozen: ``update`` returns a new state, safe to snapshot and restore.
    """

    decay: float = 0.99
    sqr_biased: float = 0.0
    var_biased: float = 0.0
    weight: float = 0.0
    updates: int = 0
    sqr2_biased: float = 0.0
    var2_biased: float = 0.0
    weight2: float = 0.0
    ref_biased: float = 0.0

    @property
    def ref(self) -> float:
        """The squared norm of the big-batch gradient, averaged over a memory ``_REF_SPEED``
        times shorter than the estimates' (it must follow a scale that moves faster than they
        are averaged): the unit of the averages, 1 before any estimate."""
        return self.ref_biased if self.ref_biased > 0 else 1.0

    def update(self, grad_sqr: float, trace_sigma: float, scale: float = 1.0,
               big_sqr: float | None = None) -> "GNSState":
        """Fold one (|G|^2, tr(Sigma)) estimate in, ``scale`` B0-steps after the last one,
        with ``big_sqr`` the squared norm of the big-batch gradient it came from (None: the
        averages' unit stays as it is); non-finite estimates are skipped."""
        if not (np.isfinite(grad_sqr) and np.isfinite(trace_sigma)):
            return self
        big = float(big_sqr) if big_sqr is not None and np.isfinite(big_sqr) and big_sqr > 0 \
            else None
        d = float(self.decay) ** max(float(scale), 1e-12)
        # The unit before this estimate (its own big-batch norm for the first one), so that
        # the estimate's own noise does not enter its weight.
        unit = self.ref if self.ref_biased > 0 else (big or 1.0)
        g, t = float(grad_sqr) / unit, float(trace_sigma) / unit
        fast = d ** _REF_SPEED
        ref = unit if big is None else (big if self.ref_biased <= 0 else
                                        fast * self.ref_biased + (1.0 - fast) * big)
        return replace(
            self,
            sqr_biased=d * self.sqr_biased + (1.0 - d) * g,
            var_biased=d * self.var_biased + (1.0 - d) * t,
            weight=d * self.weight + (1.0 - d),
            updates=self.updates + 1,
            sqr2_biased=d * self.sqr2_biased + (1.0 - d) * g * g,
            var2_biased=d * self.var2_biased + (1.0 - d) * t * t,
            weight2=d * d * self.weight2 + (1.0 - d) ** 2,
            ref_biased=ref,
        )

    @property
    def grad_sqr(self) -> float:
        """Smoothed |G|^2 (nan before the first update): the average in units, times the
        unit now."""
        return self.sqr_biased / self.weight * self.ref if self.weight > 0 else float("nan")

    @property
    def trace_sigma(self) -> float:
        """Smoothed tr(Sigma), per example (nan before the first update)."""
        return self.var_biased / self.weight * self.ref if self.weight > 0 else float("nan")

    @property
    def effective_updates(self) -> float:
        """n_eff = weight^2 / sum of squared weights: how many equal-weight estimates the
        averages are worth (0 before the first)."""
        return self.weight ** 2 / self.weight2 if self.weight2 > 0 else 0.0

    def standard_errors(self) -> tuple[float, float]:
        """Standard errors of the smoothed |G|^2 and tr(Sigma): the weighted spread of the
        single estimates over sqrt(n_eff - 1) (inf with fewer than two estimates)."""
        n = self.effective_updates
        if n <= 1.0 or self.weight <= 0:
            return float("inf"), float("inf")
        out = []
        for m1, m2 in ((self.sqr_biased, self.sqr2_biased), (self.var_biased, self.var2_biased)):
            mean, second = m1 / self.weight, m2 / self.weight
            out.append(math.sqrt(max(second - mean * mean, 0.0) / (n - 1.0)) * self.ref)
        return out[0], out[1]

    @property
    def noise_scale(self) -> float:
        """B_noise = tr(Sigma)/|G|^2 in examples; inf when |G|^2 is not yet positive."""
        sqr, var = self.grad_sqr, self.trace_sigma
        if not np.isfinite(sqr) or not np.isfinite(var):
            return float("nan")
        if sqr <= 0:
            return float("inf")
        return max(var, 0.0) / sqr

    def conservative(self, z: float = 1.0) -> tuple[float, float]:
        """(|G|^2, tr(Sigma)) at the low end of what the estimates support: |G|^2 raised and
        tr(Sigma) lowered by ``z`` standard errors each, so their ratio is a lower bound of
        the noise scale (a smaller batch, a smaller gain: the safe side of every decision).
        nan before two estimates."""
        se_sqr, se_tr = self.standard_errors()
        if not (math.isfinite(se_sqr) and math.isfinite(se_tr)):
            return float("nan"), float("nan")
        return self.grad_sqr + z * se_sqr, max(self.trace_sigma - z * se_tr, 0.0)

    def noise_scale_bounds(self, z: float = 1.0) -> tuple[float, float]:
        """(low, high) of the noise scale at ``z`` standard errors of each average: low is
        ``conservative``'s ratio; high is inf while |G|^2 - z se is not positive."""
        se_sqr, se_tr = self.standard_errors()
        if not (math.isfinite(se_sqr) and math.isfinite(se_tr)):
            return 0.0, float("inf")
        sqr, tr = self.grad_sqr, self.trace_sigma
        lo = max(tr - z * se_tr, 0.0) / (sqr + z * se_sqr) if sqr + z * se_sqr > 0 else 0.0
        hi_den = sqr - z * se_sqr
        hi = (tr + z * se_tr) / hi_den if hi_den > 0 else float("inf")
        return lo, hi

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in _STATE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "GNSState":
        # A snapshot written before the spread was kept holds no second moments, and its
        # averages are of another quantity (preconditioned, per measured step): start anew.
        if "ref_biased" not in d:
            return cls(decay=d["decay"])
        return cls(**{k: d[k] for k in _STATE_FIELDS})


_REF_SPEED = 10        # the units memory is 1/10 of the averages

_STATE_FIELDS = ("decay", "sqr_biased", "var_biased", "weight", "updates", "sqr2_biased",
                 "var2_biased", "weight2", "ref_biased")
