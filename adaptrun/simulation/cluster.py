"""Many jobs on one cluster: a job-arrival trace played under an allocation policy.

Each job is one of the bundled measured workloads (``traces.Workload``: its step times and
gradient statistics are the ground truth). At n workers a job trains at its best batch for n
at its current epoch (a geometric grid of global batches in [B0, Bmax]), which is what its own
policy converges to inside the workers it is given, so the policies compared here differ only
in how many workers each job gets and when. Time advances in ticks of ``tick_s``; a job's
progress within a tick is exact (epoch by epoch, its finish time to the second). A job whose
worker count changes (a start included) pays ``resize_cost_s`` with no progress.

Policies:

- ``goodput``: ``science.allocation.allocate`` every ``interval_s`` and whenever a job
  arrives or finishes, fed each job's goodput at every count at its current epoch.
- ``alone``: each job's own policy as if it ran alone: it asks for the count with the highest
  goodput within its bounds, and gets what is free, in arrival order (the rest of its ask
  stays pending, as pods do); it keeps what it got until it finishes or wants less.
- ``fair``: a static fair share: the capacity split equally among the jobs present (the
  remainder to the earliest), each capped at its maximum, redone on every arrival and finish.
- ``fifo``: each job at its fixed requested size, started in arrival order when it fits
  (first come, first served: a job that does not fit blocks those behind it).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..science.allocation import Cluster, JobDemand, allocate
from ..science.efficiency import gain
from .simulator import choose_local_batch
from .traces import DEFAULT_EPOCHS, TraceError, Workload, bundled_trace_dir, load_workload

__all__ = ["JobSpec", "JobOutcome", "ClusterResult", "POLICIES", "read_jobs", "generate_jobs",
           "rate_table", "simulate_cluster", "compare"]

POLICIES = ("goodput", "alone", "fair", "fifo")
APPLICATIONS = ("cifar10", "imagenet", "ncf")


@dataclass(frozen=True)
class JobSpec:
    name: str
    arrival_s: float
    application: str
    replicas: int = 1          # the fixed size FIFO runs it at
    max_workers: int = 16
    priority: int = 0


@dataclass(frozen=True)
class JobOutcome:
    name: str
    application: str
    arrival_s: float
    start_s: float
    finish_s: float
    gpu_s: float
    resizes: int

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class ClusterResult:
    policy: str
    jobs: list[JobOutcome]
    timeline: list[tuple[float, dict]] = field(default_factory=list)  # (t, name -> workers)

    @property
    def makespan_s(self) -> float:
        return max(j.finish_s for j in self.jobs) - min(j.arrival_s for j in self.jobs)

    def summary(self) -> dict:
        jct = np.array([j.jct_s for j in self.jobs])
        return {"policy": self.policy, "jobs": len(self.jobs),
                "avg_jct_h": float(jct.mean() / 3600), "p99_jct_h": float(
                    np.percentile(jct, 99) / 3600), "makespan_h": float(self.makespan_s / 3600),
                "gpu_hours": float(sum(j.gpu_s for j in self.jobs) / 3600),
                "resizes": sum(j.resizes for j in self.jobs)}


def read_jobs(path: str | Path, max_workers: int = 16) -> list[JobSpec]:
    """Jobs from a CSV in Pollux's workload format: ``name,time,application`` and optionally
    ``num_replicas`` (the fixed size) per row; ``time`` in seconds from the start."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"name", "time", "application"} - set(reader.fieldnames or ())
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(sorted(missing))}; a job "
                             f"trace has name,time,application[,num_replicas]")
        for i, row in enumerate(reader, start=2):
            app = row["application"].strip()
            if app not in APPLICATIONS:
                raise TraceError(f"{path}:{i}: application {app!r} is not one of "
                                 f"{', '.join(APPLICATIONS)}")
            try:
                t = float(row["time"])
                rep = int(row.get("num_replicas") or 1)
            except ValueError:
                raise TraceError(f"{path}:{i}: time and num_replicas must be numbers") from None
            if t < 0 or rep < 1:
                raise TraceError(f"{path}:{i}: time must be >= 0 and num_replicas >= 1")
            rows.append(JobSpec(row["name"].strip(), t, app, rep, max(max_workers, rep)))
    if not rows:
        raise TraceError(f"{path}: no jobs")
    return sorted(rows, key=lambda j: (j.arrival_s, j.name))


def generate_jobs(count: int, seed: int = 0, window_s: float = 8 * 3600,
                  max_workers: int = 16) -> list[JobSpec]:
    """``count`` jobs arriving as a Poisson process over ``window_s``: mostly small ones, as
    in the Pollux trace (cifar10 60 %, ncf 30 %, imagenet 10 %), each with a fixed size of 1-4
    GPUs (8-16 for imagenet) for FIFO."""
    if count < 1:
        raise TraceError(f"--jobs must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(window_s / count, size=count)
    times = np.cumsum(gaps) - gaps[0]
    apps = rng.choice(APPLICATIONS, size=count, p=[0.6, 0.1, 0.3])
    out = []
    for i, (t, app) in enumerate(zip(times, apps)):
        rep = int(rng.choice([8, 16])) if app == "imagenet" else int(rng.choice([1, 2, 4]))
        out.append(JobSpec(f"{app}-{i:03d}", float(t), str(app), rep, max(max_workers, rep)))
    return out


def rate_table(w: Workload, epochs: int, max_workers: int, gpus_per_node: int,
               points: int = 24) -> np.ndarray:
    """rate[e, n]: progress per second at n workers (n = 0..max_workers) during epoch e, at
    the best batch for n (0 where no batch fits)."""
    batches = np.geomspace(w.init_batch, w.max_batch, points)
    e = np.arange(epochs)
    rate = np.zeros((epochs, max_workers + 1))
    for n in range(1, max_workers + 1):
        try:
            w.local_batch_range(n, gpus_per_node)
        except TraceError:
            rate[:, n] = rate[:, n - 1]    # not measured here: no faster than n - 1
            continue
        for b in batches:
            la = choose_local_batch(w, n, float(b), gpus_per_node)
            if la is None:
                continue
            t_step, _ = w.step_time(n, la[0], la[1], gpus_per_node)
            sqr, var = w.grad_stats(e, float(b))
            rate[:, n] = np.maximum(rate[:, n], gain(sqr, var, b / w.init_batch) / t_step)
    return rate


@dataclass
class _Job:
    spec: JobSpec
    w: Workload
    rate: np.ndarray
    target: float
    progress: float = 0.0
    workers: int = 0
    paused_until: float = 0.0
    start_s: float = math.nan
    finish_s: float = math.nan
    gpu_s: float = 0.0
    resizes: int = 0

    @property
    def epoch(self) -> int:
        return self.w.epoch_at(self.progress)

    def goodput(self) -> np.ndarray:
        return self.w.init_batch * self.rate[self.epoch]

    def best_count(self) -> int:
        g = self.rate[self.epoch]
        return int(np.argmax(g[1:]) + 1)

    def set_workers(self, n: int, now: float, resize_cost_s: float) -> None:
        if n == self.workers:
            return
        if n > 0:
            self.paused_until = now + resize_cost_s
            self.resizes += self.workers > 0
            if math.isnan(self.start_s):
                self.start_s = now
        self.workers = n

    def run(self, now: float, dt: float) -> None:
        """Advance from ``now`` by ``dt`` seconds at the current count."""
        if self.workers <= 0:
            return
        self.gpu_s += self.workers * dt
        t = max(now, self.paused_until)
        end = now + dt
        while t < end and self.progress < self.target:
            e = self.epoch
            r = self.rate[e, self.workers]
            if r <= 0:
                return
            stop = min(self.w.epoch_boundaries[e], self.target)
            need = (stop - self.progress) / r
            if t + need <= end:
                t += need
                self.progress = stop
            else:
                self.progress += (end - t) * r
                t = end
        if self.progress >= self.target - 1e-9:
            self.finish_s = t
            self.gpu_s -= self.workers * (end - t)


def _grant(active: list[_Job], out: dict, wants: dict, free: int) -> int:
    """Raise each job towards its want from ``free`` GPUs, in arrival order; the rest."""
    for j in active:
        more = min(wants[j.spec.name] - out[j.spec.name], free)
        if more > 0:
            out[j.spec.name] += more
            free -= more
    return free


def _decide(policy: str, active: list[_Job], cluster: Cluster, resize_cost_s: float,
            interval_s: float, placed: dict, now: float, p: float) -> dict:
    cap = cluster.capacity
    if policy == "goodput":
        demands = [JobDemand(j.spec.name, tuple(j.goodput()), 1, j.spec.max_workers,
                             current=j.workers, priority=j.spec.priority,
                             arrival=j.spec.arrival_s, resize_cost_s=resize_cost_s,
                             age_s=0.0 if math.isnan(j.start_s) else now - j.start_s)
                   for j in active]
        a = allocate(demands, cluster, p=p, horizon_s=interval_s,
                     previous=placed)
        placed.clear()
        placed.update(a.nodes)
        return a.workers
    if policy == "fair":
        out, left = {}, cap
        share, extra = divmod(cap, max(len(active), 1))
        for i, j in enumerate(active):
            n = min(j.spec.max_workers, share + (i < extra), left)
            out[j.spec.name] = n
            left -= n
        # What a capped job leaves goes to the others in arrival order.
        _grant(active, out, {j.spec.name: j.spec.max_workers for j in active}, left)
        return out
    if policy == "alone":
        wants = {j.spec.name: j.best_count() for j in active}
        out = {j.spec.name: min(j.workers, wants[j.spec.name]) for j in active}
        _grant(active, out, wants, cap - sum(out.values()))
        return out
    if policy == "fifo":
        out = {j.spec.name: j.workers for j in active}
        free = cap - sum(out.values())
        for j in active:
            if out[j.spec.name] == 0:
                need = min(j.spec.replicas, cap)
                if need > free:
                    break
                out[j.spec.name] = need
                free -= need
        return out
    raise TraceError(f"unknown policy {policy!r}; pass one of {', '.join(POLICIES)}")


def simulate_cluster(jobs: list[JobSpec], cluster: Cluster, policy: str = "goodput",
                     resize_cost_s: float = 30.0, interval_s: float = 300.0,
                     tick_s: float = 60.0, epochs: dict | None = None,
                     max_hours: float = 24 * 30, p: float = -1.0) -> ClusterResult:
    """Play ``jobs`` on ``cluster`` under ``policy`` to the last job's end (module doc)."""
    if policy not in POLICIES:
        raise TraceError(f"unknown policy {policy!r}; pass one of {', '.join(POLICIES)}")
    if not jobs:
        raise TraceError("no jobs to simulate")
    epochs = {**DEFAULT_EPOCHS, **(epochs or {})}
    cache: dict = {}
    pending: list[_Job] = []
    for s in sorted(jobs, key=lambda j: (j.arrival_s, j.name)):
        key = (s.application, s.max_workers)
        if key not in cache:
            w = load_workload(bundled_trace_dir(s.application))
            e = epochs[s.application]
            cache[key] = (w, rate_table(w, e, s.max_workers, cluster.gpus_per_node),
                          w.target_progress(e))
        w, rate, target = cache[key]
        pending.append(_Job(s, w, rate, target))
    active: list[_Job] = []
    done: list[_Job] = []
    placed: dict = {}
    timeline: list[tuple[float, dict]] = []
    now, last_alloc, changed = 0.0, -math.inf, True
    horizon = max_hours * 3600
    while (pending or active) and now < horizon:
        while pending and pending[0].spec.arrival_s <= now:
            active.append(pending.pop(0))
            changed = True
        if active and (changed or now - last_alloc >= interval_s):
            want = _decide(policy, active, cluster, resize_cost_s, interval_s, placed, now, p)
            for j in active:
                j.set_workers(want.get(j.spec.name, 0), now, resize_cost_s)
            timeline.append((now, {j.spec.name: j.workers for j in active}))
            last_alloc, changed = now, False
        for j in active:
            j.run(now, tick_s)
        finished = [j for j in active if not math.isnan(j.finish_s)]
        if finished:
            changed = True
            for j in finished:
                j.workers = 0
                placed.pop(j.spec.name, None)
                active.remove(j)
                done.append(j)
        now += tick_s
        if not active and pending:
            now = max(now, math.floor(pending[0].spec.arrival_s / tick_s) * tick_s)
    if pending or active:
        raise TraceError(f"{policy}: jobs still running after {max_hours:g} simulated hours; "
                         f"give the cluster more GPUs or fewer jobs")
    timeline.append((now, {}))
    outcomes = [JobOutcome(j.spec.name, j.spec.application, j.spec.arrival_s, j.start_s,
                           j.finish_s, j.gpu_s, j.resizes) for j in done]
    return ClusterResult(policy, sorted(outcomes, key=lambda o: o.arrival_s), timeline)


def compare(jobs: list[JobSpec], cluster: Cluster, policies=POLICIES, **kw) -> list[ClusterResult]:
    """Every policy on the same jobs and cluster, side by side."""
    return [simulate_cluster(jobs, cluster, p, **kw) for p in policies]
