"""The oracle: the per-epoch optimum in hindsight, the bound an adaptive policy is measured by.

The model. A run of E epochs on at most G GPUs is a sequence of configurations, one per
epoch: a replica count r in 1..G and a global batch B from the grid the simulator allows
(``batch_grid``: a geometric grid in [B0, Bmax] plus the validated batches; local batch and
accumulation steps as ``choose_local_batch`` picks them). Epoch e at (r, B) takes

    cost[e, r, B] = step_time(r, B) * (progress in epoch e) / gain_e(B)

seconds (the simulator's clock, exactly). A batch-only change is free, so within a replica
count each epoch takes its fastest batch: cost[e, r] = min_B cost[e, r, B]. A change of
replica count between epochs costs ``resize_cost_s``; the first configuration is free. The
fastest plan is then a shortest path over (epoch, replicas), solved exactly by dynamic
programming:

    V[0, r] = cost[0, r]
    V[e, r] = cost[e, r] + min(V[e-1, r], min_r' V[e-1, r'] + resize_cost_s)

in O(E * G). The oracle reads the trace's future by design; it is a bound, not a policy.
Changes happen only at epoch boundaries, so a policy that changes mid-epoch, or picks a
batch between grid points, can come out marginally ahead of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..science.efficiency import efficiency, gain
from .simulator import SimResult, Segment
from .traces import Workload

__all__ = ["OraclePlan", "batch_grid", "epoch_costs", "plan", "oracle_plan", "simulate_oracle"]

# 4 * 63 + 1 points: the grid contains ``best_fixed``'s 64-point grid, so the oracle is
# never slower than the best fixed configuration.
GRID_POINTS = 253


@dataclass(frozen=True)
class OraclePlan:
    """The fastest per-epoch plan: total seconds, and per epoch the replicas, the global
    batch and the seconds that epoch takes (resizes not included)."""
    time_s: float
    replicas: np.ndarray        # (E,) int
    global_batch: np.ndarray    # (E,) float
    epoch_s: np.ndarray         # (E,)
    resizes: int


def batch_grid(w: Workload, points: int = GRID_POINTS) -> np.ndarray:
    """Global batches the oracle considers: ``points`` geometric steps in [B0, Bmax] and the
    validated batches."""
    return np.unique(np.concatenate([np.geomspace(w.init_batch, w.max_batch, points),
                                     w.validation_batches]))


def epoch_costs(w: Workload, gpus: int, epochs: int, gpus_per_node: int = 4,
                batches: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cost, best_batch), both (E, G): the seconds epoch e takes on r + 1 replicas at its
    fastest batch, and that batch (inf / nan where no batch is feasible)."""
    batches = batch_grid(w) if batches is None else np.asarray(batches, dtype=np.float64)
    batches = batches[(batches >= w.init_batch) & (batches <= w.max_batch + 1e-9)]
    e = np.arange(epochs)
    delta = np.diff(np.concatenate([[0.0], w.epoch_boundaries[:epochs]]))
    sqr, var = w.grad_stats(e[:, None], batches[None, :])                 # (E, P)
    r_gain = gain(sqr, var, batches[None, :] / w.init_batch)
    cost = np.full((epochs, gpus), math.inf)
    best = np.full((epochs, gpus), math.nan)
    for r in range(1, gpus + 1):
        lo, hi = w.local_batch_range(r, gpus_per_node)
        # The fewest accumulation steps that fit the measured local range (choose_local_batch).
        k = np.maximum(0, np.ceil(batches / (r * hi) - 1e-12) - 1)
        a = batches / (r * (k + 1))
        ok = a >= lo - 1e-9
        if not ok.any():
            continue
        t_step, _ = w.step_time(r, a[ok], k[ok], gpus_per_node)
        c = t_step[None, :] * delta[:, None] / r_gain[:, ok]                 # (E, P_ok)
        j = np.argmin(c, axis=1)
        cost[:, r - 1] = c[e, j]
        best[:, r - 1] = batches[ok][j]
    return cost, best


def plan(cost: np.ndarray, resize_cost_s: float,
         start_replicas: int | None = None) -> tuple[float, np.ndarray, int]:
    """Shortest path through ``cost`` (E, G; column r - 1 is r replicas) paying
    ``resize_cost_s`` per change of column: (time_s, replicas per epoch, resizes). With
    ``start_replicas`` the run starts there (moving away at once is a resize); without, the
    first configuration is free."""
    cost = np.asarray(cost, dtype=np.float64)
    n_epochs, g = cost.shape
    v = cost[0].copy()
    if start_replicas is not None:
        v += np.where(np.arange(1, g + 1) == start_replicas, 0.0, resize_cost_s)
    came_from = np.zeros((n_epochs, g), dtype=int)      # the column epoch e - 1 ran at
    came_from[0] = np.arange(g)
    for e in range(1, n_epochs):
        j = int(np.argmin(v))
        switch = v[j] + resize_cost_s
        stay = v <= switch          # ties stay: no resize for nothing
        came_from[e] = np.where(stay, np.arange(g), j)
        v = cost[e] + np.where(stay, v, switch)
    col = int(np.argmin(v))
    total = float(v[col])
    cols = np.empty(n_epochs, dtype=int)
    for e in range(n_epochs - 1, -1, -1):
        cols[e] = col
        col = came_from[e, col]
    replicas = cols + 1
    resizes = int(np.count_nonzero(np.diff(replicas)))
    if start_replicas is not None and replicas[0] != start_replicas:
        resizes += 1
    return total, replicas, resizes


def oracle_plan(w: Workload, gpus: int, epochs: int, gpus_per_node: int = 4,
                resize_cost_s: float = 30.0, batches: np.ndarray | None = None,
                start_replicas: int | None = None) -> OraclePlan:
    """The fastest per-epoch plan for ``w``; see the module docstring."""
    cost, best = epoch_costs(w, gpus, epochs, gpus_per_node, batches)
    total, replicas, resizes = plan(cost, resize_cost_s, start_replicas)
    e = np.arange(epochs)
    return OraclePlan(total, replicas, best[e, replicas - 1], cost[e, replicas - 1], resizes)


def simulate_oracle(w: Workload, gpus: int, epochs: int, gpus_per_node: int = 4,
                    resize_cost_s: float = 30.0, batches: np.ndarray | None = None) -> SimResult:
    """The oracle's plan as a simulator result (timeline with one segment per epoch run)."""
    p = oracle_plan(w, gpus, epochs, gpus_per_node, resize_cost_s, batches)
    timeline: list[Segment] = []
    t = 0.0
    for e in range(epochs):
        r, b = int(p.replicas[e]), float(p.global_batch[e])
        if e and r != p.replicas[e - 1]:
            timeline.append(Segment(t, t + resize_cost_s, 0, 0, 0, 0, 0.0, 0.0,
                                    float(w.epoch_boundaries[e - 1]), "resizing"))
            t += resize_cost_s
        lo, hi = w.local_batch_range(r, gpus_per_node)
        k = max(0, math.ceil(b / (r * hi) - 1e-12) - 1)
        a = b / (r * (k + 1))
        t_step, _ = w.step_time(r, a, k, gpus_per_node)
        sqr, var = w.grad_stats(e, b)
        s = b / w.init_batch
        seg = Segment(t, t + float(p.epoch_s[e]), r, b, a, k, float(efficiency(sqr, var, s)),
                      float(w.init_batch * gain(sqr, var, s) / t_step),
                      float(w.epoch_boundaries[e]), f"oracle: epoch {e}")
        timeline.append(seg)
        t += float(p.epoch_s[e])
    return SimResult(t, p.resizes, _join(timeline))


def _join(timeline: list[Segment]) -> list[Segment]:
    """Consecutive epochs at the same (replicas, batch) as one segment."""
    out: list[Segment] = []
    for s in timeline:
        prev = out[-1] if out else None
        if prev is not None and s.replicas and (prev.replicas, prev.global_batch) == (
                s.replicas, s.global_batch):
            out[-1] = Segment(prev.start_s, s.end_s, s.replicas, s.global_batch, s.local_batch,
                              s.accum_steps, s.efficiency, s.goodput, s.progress, prev.reason)
        else:
            out.append(s)
    return out
