"""Statistical efficiency of a batch size, and training progress in B0-equivalent steps.

The model (AdaScale, Johnson et al. 2020; Pollux, Qiao et al. 2021). Let B0 be the batch
the job was tuned at, ``grad_sqr`` = |G|^2 and ``grad_var`` = tr(Sigma)/B0, the variance of
a B0-batch gradient. One optimizer step at global batch B = s * B0 makes as much progress as

    r(s) = (grad_var + grad_sqr) / (grad_var / s + grad_sqr)        (the *gain*, 1 <= r <= s)

steps at B0. The statistical efficiency is the progress per example relative to B0,

    E(s) = r(s) / s = (B_noise + B0) / (B_noise + B),   B_noise = B0 * grad_var / grad_sqr,

and goodput = throughput (examples/s) * E = B0 * r / step_time: B0-equivalent examples per
second. ``progress`` counts B0-equivalent steps (each step adds r), so a schedule keyed to
progress means the same thing whatever batch the job runs at (Hoffer et al. 2017).

Degenerate estimates are read the safe way: |G|^2 <= 0 means the gradient is all noise, so a
bigger batch helps fully (r = s); tr(Sigma) <= 0 means no noise, so it does not help (r = 1).
"""
from __future__ import annotations

import numpy as np

__all__ = ["gain", "efficiency", "noise_scale", "goodput"]


def gain(grad_sqr, grad_var, scale):
    """Progress of one step at scale s = B/B0, in B0-steps. Vectorised over all arguments."""
    sqr = np.maximum(np.asarray(grad_sqr, dtype=np.float64), 0.0)
    var = np.maximum(np.asarray(grad_var, dtype=np.float64), 0.0)
    s = np.asarray(scale, dtype=np.float64)
    num = var + sqr
    den = var / s + sqr
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    # |G|^2 = 0 and var > 0: all noise, r = s exactly (the formula gives that too).
    return np.clip(r, np.minimum(1.0, s), np.maximum(1.0, s))


def efficiency(grad_sqr, grad_var, scale):
    """Statistical efficiency E = r(s) / s, in (0, 1] for s >= 1."""
    return gain(grad_sqr, grad_var, scale) / np.asarray(scale, dtype=np.float64)


def noise_scale(grad_sqr, grad_var, init_batch):
    """B_noise = B0 * grad_var / grad_sqr in examples (inf where grad_sqr <= 0)."""
    sqr = np.asarray(grad_sqr, dtype=np.float64)
    var = np.maximum(np.asarray(grad_var, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sqr > 0, init_batch * var / np.where(sqr > 0, sqr, 1.0), np.inf)


def goodput(global_batch, step_time_s, grad_sqr, grad_var, init_batch):
    """B0-equivalent examples per second: (global_batch / step_time) * E(global_batch / B0)."""
    b = np.asarray(global_batch, dtype=np.float64)
    scale = b / init_batch
    return b / np.asarray(step_time_s, dtype=np.float64) * efficiency(grad_sqr, grad_var, scale)
