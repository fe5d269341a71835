"""Throughput model: the time of one optimizer step of a configuration, fitted from what ran.

The model (in the spirit of Pollux, Qiao et al. OSDI 2021). A configuration is R replicas on
N nodes, local (micro-)batch a, and k accumulation steps (k extra micro-batches per step).

    compute(a)  = alpha_c + beta_c * a                      one forward+backward of a micro-batch
    sync(N, R)  = 0                                         if R == 1
                = alpha_intra + beta_intra * (R - 2)        if N == 1 (all-reduce inside a node)
                = alpha_inter + beta_inter * (R - 2)        if N >  1 (all-reduce across nodes)
    step        = k * compute(a) + (compute(a)^gamma + sync^gamma)^(1/gamma)

The last micro-batch overlaps its backward pass with the all-reduce; gamma >= 1 says how
well (gamma = 1: no overlap, the times add; gamma -> inf: perfect overlap, the max).
Accumulation steps add compute without sync. What a job measures is the step time and the
part of it spent waiting on sync; ``compute`` is observed as (step - sync) / (k + 1).

Fit: bounded nonlinear least squares (scipy) on the log-ratios of predicted to observed step
time and compute time, all parameters >= 0 (gamma in [1, 10]). Added to the data are weak
*prior* residuals (weight PRIOR_WEIGHT, in log space) that pull each parameter towards a
value derived from what was seen. With many configurations the data dominate; with one or
two, the prior fills in what the data cannot identify. The prior, stated:
  - compute: half of the observed micro-batch time is fixed overhead (alpha_c = c/2,
    beta_c = c/(2a)): a bigger local batch is assumed somewhat more efficient, so the policy
    is willing to try one; the try then measures the real slope.
  - sync inside a node: what was measured inside a node; if nothing was, half the inter-node
    sync that was measured, else a tenth of the compute time.
  - sync across nodes: what was measured across nodes; if nothing was, twice the intra-node
    sync, else half the compute time.
  - beta_intra, beta_inter: 2 % of the matching alpha per extra replica (ring all-reduce
    costs nearly the same for any replica count).
  - gamma: 1.5 (partial overlap).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import numpy as np
from scipy.optimize import least_squares

__all__ = ["ThroughputParams", "ThroughputSample", "step_time", "compute_time", "sync_time",
           "fit", "prior_params", "PRIOR_WEIGHT"]

PRIOR_WEIGHT = 0.1
_FLOOR = 1e-5  # seconds; keeps logs finite for parameters that are (near) zero


@dataclass(frozen=True)
class ThroughputParams:
    alpha_c: float      # s, fixed compute per micro-batch
    beta_c: float       # s per example
    alpha_intra: float  # s
    beta_intra: float   # s per extra replica
    alpha_inter: float  # s
    beta_inter: float   # s per extra replica
    gamma: float        # overlap exponent, >= 1

    def as_array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.float64)

    @classmethod
    def from_array(cls, a) -> "ThroughputParams":
        return cls(*(float(x) for x in a))


@dataclass(frozen=True)
class ThroughputSample:
    """One configuration a job ran at, and its measured per-step times (averaged)."""
    nodes: int
    replicas: int
    local_batch: float
    accum_steps: int
    step_time_s: float
    sync_time_s: float


def compute_time(p: ThroughputParams, local_batch):
    return p.alpha_c + p.beta_c * np.asarray(local_batch, dtype=np.float64)


def sync_time(p: ThroughputParams, nodes, replicas):
    nodes = np.asarray(nodes)
    replicas = np.asarray(replicas, dtype=np.float64)
    extra = np.maximum(replicas - 2.0, 0.0)
    intra = p.alpha_intra + p.beta_intra * extra
    inter = p.alpha_inter + p.beta_inter * extra
    return np.where(replicas <= 1, 0.0, np.where(nodes <= 1, intra, inter))


def step_time(p: ThroughputParams, nodes, replicas, local_batch, accum_steps=0):
    """Predicted seconds per optimizer step; broadcasts over all array arguments."""
    c = compute_time(p, local_batch)
    s = sync_time(p, nodes, replicas)
    g = p.gamma
    # (c^g + s^g)^(1/g), computed stably as m * ((c/m)^g + (s/m)^g)^(1/g).
    m = np.maximum(np.maximum(c, s), 1e-12)
    last = m * ((c / m) ** g + (s / m) ** g) ** (1.0 / g)
    return np.asarray(accum_steps, dtype=np.float64) * c + last


def _columns(samples):
    arr = np.array([astuple(s) for s in samples], dtype=np.float64)
    return {f.name: arr[:, i] for i, f in enumerate(fields(ThroughputSample))}


def prior_params(samples) -> ThroughputParams:
    """The prior stated in the module docstring, from the samples seen so far."""
    col = _columns(samples)
    k1 = col["accum_steps"] + 1
    compute = np.maximum(col["step_time_s"] - col["sync_time_s"], _FLOOR) / k1
    c = float(np.median(compute))
    a = float(np.median(col["local_batch"]))
    multi = col["replicas"] > 1
    intra_seen = multi & (col["nodes"] <= 1)
    inter_seen = multi & (col["nodes"] > 1)
    s_intra = float(np.median(col["sync_time_s"][intra_seen])) if intra_seen.any() else None
    s_inter = float(np.median(col["sync_time_s"][inter_seen])) if inter_seen.any() else None
    if s_intra is None:
        s_intra = s_inter / 2 if s_inter is not None else 0.1 * c
    if s_inter is None:
        s_inter = 2 * s_intra if intra_seen.any() else 0.5 * c
    s_intra, s_inter = max(s_intra, _FLOOR), max(s_inter, _FLOOR)
    return ThroughputParams(c / 2, c / (2 * a), s_intra, 0.02 * s_intra, s_inter, 0.02 * s_inter, 1.5)


_LOWER = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
_UPPER = np.array([np.inf, np.inf, np.inf, np.inf, np.inf, np.inf, 10.0])


def fit(samples, prior: ThroughputParams | None = None,
        prior_weight: float = PRIOR_WEIGHT) -> ThroughputParams:
    """Fit the parameters to measured samples (at least one); see the module docstring."""
    samples = list(samples)
    if not samples:
        raise ValueError("throughput fit needs at least one measured configuration")
    prior = prior or prior_params(samples)
    col = _columns(samples)
    k = col["accum_steps"]
    obs_step = np.maximum(col["step_time_s"], _FLOOR)
    obs_compute = np.maximum(col["step_time_s"] - col["sync_time_s"], _FLOOR) / (k + 1)
    theta0 = prior.as_array()
    log_prior = np.log(theta0 + _FLOOR)

    def residuals(theta):
        p = ThroughputParams.from_array(theta)
        pred_step = step_time(p, col["nodes"], col["replicas"], col["local_batch"], k)
        pred_compute = compute_time(p, col["local_batch"])
        return np.concatenate([
            np.log(np.maximum(pred_step, _FLOOR)) - np.log(obs_step),
            np.log(np.maximum(pred_compute, _FLOOR)) - np.log(obs_compute),
            prior_weight * (np.log(theta + _FLOOR) - log_prior),
        ])

    x0 = np.clip(theta0, _LOWER, _UPPER)
    result = least_squares(residuals, x0, bounds=(_LOWER, _UPPER), method="trf", x_scale="jac")
    return ThroughputParams.from_array(result.x)
