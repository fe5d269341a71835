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
values are not pulled towards zero. The decay per update is ``decay ** scale`` where scale is
the global batch over the initial batch: an optimizer step at a bigger batch covers more
examples, so it counts as that many B0-steps (the EMA rule of Busbridge et al. 2023).

Pollux/AdaptDL report the variance at the initial batch B0, ``grad_var = tr(Sigma) / B0``,
so that B_noise = B0 * grad_var / grad_sqr; ``grad_var_at`` converts.

For Adam-family optimizers the statistics are those of the *preconditioned* gradient
g / (sqrt(v_hat) + eps) (the direction Adam actually steps in), see ``precondition``.

Everything here is a pure function of numpy arrays (or floats); the worker library feeds it
squared norms measured with torch, the tests feed it analytic draws.
"""
from __future__ import annotations

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
    """Bias-corrected exponential averages of |G|^2 and tr(Sigma).

    ``decay`` is the per-update decay at scale 1; ``weight`` is 1 - prod(decay) so far.
    Frozen: ``update`` returns a new state, so a state is safe to snapshot and restore.
    """

    decay: float = 0.99
    sqr_biased: float = 0.0
    var_biased: float = 0.0
    weight: float = 0.0
    updates: int = 0

    def update(self, grad_sqr: float, trace_sigma: float, scale: float = 1.0) -> "GNSState":
        """Fold one (|G|^2, tr(Sigma)) estimate in; non-finite estimates are skipped."""
        if not (np.isfinite(grad_sqr) and np.isfinite(trace_sigma)):
            return self
        d = float(self.decay) ** max(float(scale), 1e-12)
        return replace(
            self,
            sqr_biased=d * self.sqr_biased + (1.0 - d) * float(grad_sqr),
            var_biased=d * self.var_biased + (1.0 - d) * float(trace_sigma),
            weight=d * self.weight + (1.0 - d),
            updates=self.updates + 1,
        )

    @property
    def grad_sqr(self) -> float:
        """Smoothed |G|^2 (nan before the first update)."""
        return self.sqr_biased / self.weight if self.weight > 0 else float("nan")

    @property
    def trace_sigma(self) -> float:
        """Smoothed tr(Sigma), per example (nan before the first update)."""
        return self.var_biased / self.weight if self.weight > 0 else float("nan")

    @property
    def noise_scale(self) -> float:
        """B_noise = tr(Sigma)/|G|^2 in examples; inf when |G|^2 is not yet positive."""
        sqr, var = self.grad_sqr, self.trace_sigma
        if not np.isfinite(sqr) or not np.isfinite(var):
            return float("nan")
        if sqr <= 0:
            return float("inf")
        return max(var, 0.0) / sqr

    def to_dict(self) -> dict:
        return {
            "decay": self.decay,
            "sqr_biased": self.sqr_biased,
            "var_biased": self.var_biased,
            "weight": self.weight,
            "updates": self.updates,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GNSState":
        return cls(**{k: d[k] for k in ("decay", "sqr_biased", "var_biased", "weight", "updates")})
