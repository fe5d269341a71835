"""Sharing a cluster's GPUs among jobs by goodput.

The model. Job j at n workers trains at goodput g_j(n) (B0-equivalent examples per second at
its best batch for n workers, from its own fitted throughput model and gradient statistics).
Its *speedup* is s_j(n) = g_j(n) / g_j(m_j), normalised to its smallest configuration m_j
(its minimum worker count) as Sia does, so jobs of very different sizes compare. An
allocation gives every job a worker count n_j (0: queued) with sum n_j <= capacity and
maximises the weighted p-power mean of the speedups (Pollux's fairness knob):

    maximise  ( sum_j w_j s_j(n_j)^p / sum_j w_j )^(1/p)

p = 1 is the plain mean (throughput first); p -> 0 the geometric mean; p = -1 (the default,
Pollux's) leans towards the job that is worst off. For p < 0 this is the same as minimising
sum_j w_j s_j(n_j)^p, and for p > 0 maximising sum_j w_j s_j(n_j)^p: each job contributes a
constant per choice, so the problem is exact as an integer program over one-hot choices
(a multiple-choice knapsack), solved with scipy's ``milp`` (HiGHS).

- **Resize cost.** A job moved off its current count pays ``resize_cost_s`` with no
  progress. Over the time the new count is expected to hold, h = max(``horizon_s``, the job's
  age: a job that has run long is likely to run long yet, as Pollux reasons), its speedup at
  the new count is scaled by (1 - resize_cost_s / h). Small gains do not move jobs, and young
  jobs move less readily than old ones.
- **Admission.** Jobs are admitted in order of priority, then arrival, while their minimums
  fit; an admitted job is never given fewer than its minimum (the soft minimum that keeps a
  job from starving), the others are queued at 0 and wait their turn in that order. A job that
  runs keeps its place before any job still queued, so a new arrival never evicts it.
- **Placement.** Workers are placed on nodes after the counts are chosen: each job spans as
  few nodes as it can (whole nodes first, its earlier nodes kept where they still fit).

GPU types are not modelled: every GPU is one of the same kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AllocationError", "Cluster", "JobDemand", "Allocation", "allocate",
           "speedups", "place"]


class AllocationError(ValueError):
    """An allocation request that cannot be solved as given."""


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int

    @property
    def capacity(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def parse(cls, text: str) -> "Cluster":
        """``NODESxGPUS`` (``16x4``) or a bare count of single-GPU slots (``8``)."""
        try:
            if "x" in text.lower():
                n, g = text.lower().split("x", 1)
                c = cls(int(n), int(g))
            else:
                c = cls(1, int(text))
        except ValueError:
            raise AllocationError(f"capacity {text!r} is not NODESxGPUS (like 16x4) or a "
                                  f"count of GPUs") from None
        if c.nodes < 1 or c.gpus_per_node < 1:
            raise AllocationError(f"capacity {text!r} must have at least one node and GPU")
        return c


@dataclass(frozen=True)
class JobDemand:
    """What the allocator knows of one job.

    ``goodput[n]`` is the job's goodput at n workers for n = 0..len-1 (``goodput[0]`` is
    ignored); counts outside [min_workers, max_workers] are never given. ``arrival`` orders
    admission among equal ``priority`` (higher first)."""
    name: str
    goodput: tuple
    min_workers: int = 1
    max_workers: int = 1
    current: int = 0
    weight: float = 1.0
    priority: int = 0
    arrival: float = 0.0
    resize_cost_s: float = 0.0
    age_s: float = 0.0

    def check(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise AllocationError(f"job {self.name}: workers [{self.min_workers}, "
                                  f"{self.max_workers}] is not a range of 1 or more")
        if len(self.goodput) <= self.max_workers:
            raise AllocationError(f"job {self.name}: goodput has {len(self.goodput)} entries; "
                                  f"give one per worker count 0..{self.max_workers}")
        if not self.weight > 0:
            raise AllocationError(f"job {self.name}: weight {self.weight} must be positive")
        g = np.asarray(self.goodput[self.min_workers:self.max_workers + 1], dtype=float)
        if not (np.all(np.isfinite(g)) and g[0] > 0):
            raise AllocationError(f"job {self.name}: goodput at its minimum of "
                                  f"{self.min_workers} workers must be a positive number")


@dataclass(frozen=True)
class Allocation:
    workers: dict                 # job name -> workers (0: queued)
    nodes: dict = field(default_factory=dict)   # job name -> tuple of (node, workers)
    queued: tuple = ()            # job names waiting, in admission order
    objective: float = 0.0        # the weighted p-power mean of the speedups of those running

    def spans(self, name: str) -> int:
        return len(self.nodes.get(name, ()))


def speedups(job: JobDemand, horizon_s: float) -> np.ndarray:
    """s(n) for n = min..max, the resize charged on every n != current (of a running job)."""
    g = np.asarray(job.goodput[job.min_workers:job.max_workers + 1], dtype=float)
    s = np.maximum(g, 0.0) / g[0]
    if job.current > 0 and job.resize_cost_s > 0:
        keep = max(0.0, 1.0 - job.resize_cost_s / max(horizon_s, job.age_s, 1e-9))
        n = np.arange(job.min_workers, job.max_workers + 1)
        s = np.where(n == job.current, s, s * keep)
    return s


def _admit(jobs: list[JobDemand], capacity: int) -> tuple[list[JobDemand], list[JobDemand]]:
    running = [j for j in jobs if j.current > 0]
    waiting = [j for j in jobs if j.current <= 0]
    order = sorted(running, key=lambda j: (-j.priority, j.arrival, j.name)) + sorted(
        waiting, key=lambda j: (-j.priority, j.arrival, j.name))
    admitted, queued, used = [], [], 0
    for j in order:
        if not queued and used + j.min_workers <= capacity:
            admitted.append(j)
            used += j.min_workers
        else:
            queued.append(j)
    return admitted, queued


def allocate(jobs: list[JobDemand], cluster: Cluster, p: float = -1.0,
             horizon_s: float = 600.0, previous: dict | None = None,
             time_limit_s: float = 5.0) -> Allocation:
    """The allocation that maximises the weighted p-power mean of speedups (module doc).

    ``previous``: job name -> tuple of (node, workers) of the allocation in force, so that
    placement keeps a job on its nodes where it can."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if not math.isfinite(p) or p == 0:
        raise AllocationError(f"p must be a non-zero number, got {p} (use a small value such "
                              f"as 0.01 for the geometric mean)")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise AllocationError("job names must be unique")
    for j in jobs:
        j.check()
    admitted, queued = _admit(jobs, cluster.capacity)
    workers = {j.name: 0 for j in jobs}
    objective = 0.0
    if admitted:
        terms, counts, owner = [], [], []
        for i, j in enumerate(admitted):
            s = speedups(j, horizon_s)
            n = np.arange(j.min_workers, j.max_workers + 1)
            # Dominated choices (more workers, no more speedup) never help: drop them.
            keep = s > np.maximum.accumulate(np.concatenate([[-np.inf], s[:-1]]))
            terms.append(j.weight * np.power(np.maximum(s[keep], 1e-12), p))
            counts.append(n[keep])
            owner.append(np.full(int(keep.sum()), i))
        term, n_all, rows = np.concatenate(terms), np.concatenate(counts), np.concatenate(owner)
        one_hot = coo_matrix((np.ones(len(term)), (rows, np.arange(len(term)))),
                             shape=(len(admitted), len(term)))
        cons = [LinearConstraint(one_hot, 1, 1),
                LinearConstraint(n_all[None, :].astype(float), 0, cluster.capacity)]
        res = milp(term if p < 0 else -term, constraints=cons, integrality=np.ones(len(term)),
                   bounds=Bounds(0, 1), options={"time_limit": time_limit_s,
                                                 "mip_rel_gap": 1e-6})
        if res.x is None:
            raise AllocationError(f"the allocation found no solution ({res.message})")
        chosen = np.flatnonzero(res.x > 0.5)
        for col in chosen:
            workers[admitted[rows[col]].name] = int(n_all[col])
        total_w = sum(j.weight for j in admitted)
        objective = float((term[chosen].sum() / total_w) ** (1.0 / p))
    return Allocation(workers, place(workers, cluster, previous or {}),
                      tuple(j.name for j in queued), objective)


def place(workers: dict, cluster: Cluster, previous: dict) -> dict:
    """Nodes for each job's workers: the biggest jobs first, whole free nodes first, a job's
    previous nodes kept where its new count still fits on them."""
    free = [cluster.gpus_per_node] * cluster.nodes
    out: dict = {}
    order = sorted((n, name) for name, n in workers.items() if n > 0)
    for want, name in reversed(order):
        got: list = []
        left = want
        for node, _ in previous.get(name, ()):
            if 0 <= node < cluster.nodes and left > 0 and free[node] > 0:
                take = min(free[node], left)
                free[node] -= take
                left -= take
                got.append((node, take))
        while left > 0:
            # The node that fits the rest exactly or best; else the emptiest.
            fits = [i for i in range(cluster.nodes) if free[i] >= left]
            i = (min(fits, key=lambda i: (free[i], i)) if fits
                 else max(range(cluster.nodes), key=lambda i: (free[i], -i)))
            if free[i] == 0:
                raise AllocationError("the workers do not fit the cluster")
            take = min(free[i], left)
            free[i] -= take
            left -= take
            got.append((i, take))
        out[name] = tuple(sorted(got))
    return out
