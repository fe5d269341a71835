"""Trace-driven simulator: plays a measured workload to its target under a policy.

The simulator owns the ground truth (``traces.Workload``: step times by placement, gradient
statistics by epoch and batch) and the clock. A run is a sequence of segments at a fixed
configuration; within a segment, each optimizer step takes ``Workload.step_time`` seconds
and adds the gain r(B) of the current epoch to progress, so progress grows piecewise
linearly in time and the time to the target is exact (no rounding to whole steps).

- ``fixed``: one configuration (replicas, global batch) for the whole run.
- ``fixed-init``: B0 on all G GPUs (G x the smallest local batch when B0/G is below it).
- ``adaptive``: starts where the policy chooses (``Policy.initial_config``: one node at B0,
  nothing measured yet); every ``report_every_steps`` optimizer steps
  the job sends a ``Report`` (what it measured at its configuration, its gradient
  statistics at its batch) to the same ``policy.Policy`` the controller runs, and applies the
  ``Decision``. A change of replica count costs ``resize_cost_s`` of wall time with no
  progress; a batch-only change costs nothing.
- ``best fixed``: every replica count 1..G and a geometric grid of global batches in
  [B0, Bmax] (plus the validated batches), each timed in closed form; the fastest wins. It
  knows the whole run in hindsight.
- ``oracle`` (``oracle.py``): the per-epoch optimum in hindsight, resizes paid; the bound.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..science.efficiency import efficiency, gain
from ..science.policy import Config, JobBounds, Policy
from ..science.report import Report
from .traces import TraceError, Workload

__all__ = ["SimResult", "Segment", "fixed_time", "fixed_init", "best_fixed", "simulate_fixed",
           "simulate_adaptive", "choose_local_batch", "workload_bounds"]


@dataclass(frozen=True)
class Segment:
    """One stretch of the timeline at a configuration (times in simulated seconds)."""
    start_s: float
    end_s: float
    replicas: int
    global_batch: float
    local_batch: float
    accum_steps: int
    efficiency: float
    goodput: float          # B0-equivalent examples per second
    progress: float         # at the end of the segment
    reason: str = ""


@dataclass
class SimResult:
    time_s: float
    resizes: int
    timeline: list[Segment] = field(default_factory=list)

    def timeline_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.timeline]


def choose_local_batch(w: Workload, replicas: int, global_batch: float, gpus_per_node: int):
    """(local_batch, accum_steps) for a fixed global batch: fewest accumulation steps such
    that the local batch lies in the measured range of the placement, or None."""
    lo, hi = w.local_batch_range(replicas, gpus_per_node)
    k = max(0, math.ceil(global_batch / (replicas * hi)) - 1)
    a = global_batch / (replicas * (k + 1))
    if a < lo - 1e-9:
        return None
    return a, k


def _epoch_deltas(w: Workload, epochs: int) -> np.ndarray:
    b = w.epoch_boundaries[:epochs]
    return np.diff(np.concatenate([[0.0], b]))


def fixed_time(w: Workload, replicas: int, global_batch: float, epochs: int,
               gpus_per_node: int = 4) -> float:
    """Seconds to the target at one fixed configuration (inf when it is infeasible)."""
    la = choose_local_batch(w, replicas, global_batch, gpus_per_node)
    if la is None or not w.init_batch <= global_batch <= w.max_batch + 1e-9:
        return math.inf
    a, k = la
    t_step, _ = w.step_time(replicas, a, k, gpus_per_node)
    e = np.arange(epochs)
    sqr, var = w.grad_stats(e, global_batch)
    r = gain(sqr, var, global_batch / w.init_batch)
    return float(t_step * np.sum(_epoch_deltas(w, epochs) / r))


def fixed_init(w: Workload, gpus: int) -> tuple[int, float]:
    """(replicas, global batch) of fixed-init: B0 on all G GPUs, as Pollux defines it."""
    batch = max(w.init_batch, gpus * w.local_batch_min)
    if batch > w.max_batch:
        raise TraceError(f"{gpus} GPUs x local batch {w.local_batch_min} exceeds the largest "
                         f"batch {w.max_batch} of {w.name}; pass fewer --gpus")
    return gpus, float(batch)


def best_fixed(w: Workload, gpus: int, epochs: int, gpus_per_node: int = 4,
               points: int = 64) -> tuple[float, int, float]:
    """(time_s, replicas, global_batch) of the fastest fixed configuration in hindsight."""
    batches = np.unique(np.concatenate([
        np.geomspace(w.init_batch, w.max_batch, points), w.validation_batches]))
    best = (math.inf, 0, 0.0)
    for r in range(1, gpus + 1):
        for b in batches:
            t = fixed_time(w, r, float(b), epochs, gpus_per_node)
            if t < best[0]:
                best = (t, r, float(b))
    return best


class _Clock:
    """Advances progress through epochs at one configuration."""

    def __init__(self, w: Workload, target: float):
        self.w, self.target = w, target
        self.t, self.progress = 0.0, 0.0

    def rate(self, replicas, a, k, batch, gpus_per_node):
        """(step_time_s, sync_time_s, gain) at the current epoch."""
        t_step, sync = self.w.step_time(replicas, a, k, gpus_per_node)
        sqr, var = self.w.grad_stats(self.w.epoch_at(self.progress), batch)
        return float(t_step), float(sync), float(gain(sqr, var, batch / self.w.init_batch))

    def run(self, replicas, a, k, gpus_per_node, duration_s) -> None:
        """Train for duration_s (or until the target) at this configuration."""
        batch = replicas * a * (k + 1)
        end = self.t + duration_s
        while self.t < end - 1e-12 and self.progress < self.target:
            t_step, _, r = self.rate(replicas, a, k, batch, gpus_per_node)
            e = self.w.epoch_at(self.progress)
            stop = min(self.w.epoch_boundaries[e], self.target)
            need_s = (stop - self.progress) / r * t_step
            dt = min(need_s, end - self.t)
            self.t += dt
            self.progress = stop if dt == need_s else self.progress + dt / t_step * r


def simulate_fixed(w: Workload, replicas: int, global_batch: float, epochs: int,
                   gpus_per_node: int = 4) -> SimResult:
    la = choose_local_batch(w, replicas, global_batch, gpus_per_node)
    if la is None or not w.init_batch <= global_batch <= w.max_batch + 1e-9:
        lo, hi = w.local_batch_range(replicas, gpus_per_node)
        raise TraceError(
            f"batch {global_batch:g} on {replicas} replicas is outside what {w.name} measured; "
            f"pass --batch in [{max(w.init_batch, replicas * lo):g}, {w.max_batch}]")
    a, k = la
    t = fixed_time(w, replicas, global_batch, epochs, gpus_per_node)
    clock = _Clock(w, w.target_progress(epochs))
    t_step, _, r = clock.rate(replicas, a, k, global_batch, gpus_per_node)
    eff = r / (global_batch / w.init_batch)
    seg = Segment(0.0, t, replicas, global_batch, a, k, eff, w.init_batch * r / t_step,
                  clock.target, "fixed")
    return SimResult(t, 0, [seg])


def workload_bounds(w: Workload, gpus: int, gpus_per_node: int = 4) -> JobBounds:
    """The bounds a job of workload ``w`` on ``gpus`` GPUs gives its policy."""
    return JobBounds(init_batch=w.init_batch, max_batch=w.max_batch, min_replicas=1,
                     max_replicas=gpus, local_batch_min=w.local_batch_min,
                     local_batch_max=w.local_batch_max, slots_per_node=gpus_per_node)


def simulate_adaptive(w: Workload, gpus: int, epochs: int, gpus_per_node: int = 4,
                      resize_cost_s: float = 30.0, report_every_steps: int = 20,
                      first_report_steps: int = 10, policy: Policy | None = None,
                      start: Config | None = None) -> SimResult:
    """Run the live policy against the trace from ``start`` (default: where the policy
    chooses to start); see the module docstring."""
    target = w.target_progress(epochs)
    bounds = workload_bounds(w, gpus, gpus_per_node)
    policy = policy or Policy(bounds, resize_cost_s=resize_cost_s)
    if start is None:
        cfg = policy.initial_config()
        reason = f"start: {cfg.describe()} (the policy's choice)"
    else:
        cfg = start
        reason = f"start: {cfg.describe()}"
    clock = _Clock(w, target)
    resizes, steps = 0, 0.0
    timeline: list[Segment] = []
    steps_to_report = first_report_steps
    while clock.progress < target:
        start_t = clock.t
        batch = cfg.global_batch
        a = min(cfg.local_batch, w.local_batch_range(cfg.replicas, gpus_per_node)[1])
        t_step, _, _ = clock.rate(cfg.replicas, a, cfg.accum_steps, batch, gpus_per_node)
        clock.run(cfg.replicas, a, cfg.accum_steps, gpus_per_node, steps_to_report * t_step)
        t_step, sync, r = clock.rate(cfg.replicas, a, cfg.accum_steps, batch, gpus_per_node)
        steps += (clock.t - start_t) / t_step
        sqr, var = w.grad_stats(w.epoch_at(clock.progress), batch)
        eff = float(efficiency(sqr, var, batch / w.init_batch))
        timeline.append(Segment(start_t, clock.t, cfg.replicas, batch, cfg.local_batch,
                                cfg.accum_steps, eff, w.init_batch * r / t_step,
                                clock.progress, reason))
        if clock.progress >= target:
            break
        report = Report(job_id=w.name, step=int(steps), progress=clock.progress,
                        world_size=cfg.replicas, nodes=int(bounds.nodes_for(cfg.replicas)),
                        local_batch=cfg.local_batch, accum_steps=cfg.accum_steps,
                        init_batch=w.init_batch, step_time_s=t_step, sync_time_s=min(sync, t_step),
                        grad_sqr=float(sqr), grad_var=float(var),
                        epoch=w.epoch_at(clock.progress), target_progress=target,
                        time_s=clock.t)
        policy.observe(report)
        decision = policy.decide()
        reason = decision.reason
        if decision.changes_replicas:
            resizes += 1
            timeline.append(Segment(clock.t, clock.t + resize_cost_s, 0, 0, 0, 0, 0.0, 0.0,
                                    clock.progress, "resizing"))
            clock.t += resize_cost_s
        cfg = decision.config
        steps_to_report = report_every_steps
    return SimResult(clock.t, resizes, _merge(timeline))


def _merge(timeline: list[Segment]) -> list[Segment]:
    """Join consecutive segments at the same configuration (efficiency/goodput of the last)."""
    out: list[Segment] = []
    for s in timeline:
        if out and (out[-1].replicas, out[-1].global_batch, out[-1].accum_steps) == (
                s.replicas, s.global_batch, s.accum_steps) and s.replicas:
            prev = out[-1]
            out[-1] = Segment(prev.start_s, s.end_s, s.replicas, s.global_batch, s.local_batch,
                              s.accum_steps, s.efficiency, s.goodput, s.progress, prev.reason)
        else:
            out.append(s)
    return out


def resolve_trace_dir(trace_dir: str):
    """A trace folder, or the name of a bundled workload (cifar10, imagenet, ncf)."""
    from pathlib import Path

    from .traces import bundled_trace_dir

    p = Path(trace_dir)
    if not p.exists() and (bundled_trace_dir() / trace_dir).is_dir():
        return bundled_trace_dir(trace_dir)
    return p


def run_simulation(trace_dir: str, gpus: int, gpus_per_node: int = 4,
                   resize_cost_s: float = 30.0, policy: str = "adaptive",
                   replicas: int | None = None, batch: float | None = None,
                   epochs: int | None = None) -> dict:
    """What ``adaptrun simulate`` prints: the chosen policy's run beside fixed-init and the
    best fixed configuration, as one JSON-ready dict. Raises TraceError/ValueError with one
    actionable line on bad input."""
    from .traces import DEFAULT_EPOCHS, load_workload

    if gpus is None or gpus < 1:
        raise TraceError(f"--gpus must be at least 1, got {gpus}; pass the GPUs the job may use")
    if gpus_per_node < 1 or gpus_per_node > 9:
        raise TraceError(f"--gpus-per-node must be in 1..9, got {gpus_per_node}")
    if resize_cost_s < 0:
        raise TraceError(f"--resize-cost-s must be >= 0, got {resize_cost_s}")
    w = load_workload(resolve_trace_dir(trace_dir))
    if epochs is None:
        epochs = DEFAULT_EPOCHS.get(w.name, w.epochs_available)
    target = w.target_progress(epochs)
    del target
    if policy == "fixed":
        if replicas is None or batch is None:
            raise TraceError("--policy fixed needs --replicas R and --batch B")
        if not 1 <= replicas <= gpus:
            raise TraceError(f"--replicas {replicas} must be in 1..{gpus} (--gpus)")
        result = simulate_fixed(w, replicas, batch, epochs, gpus_per_node)
    elif policy == "fixed-init":
        r, b = fixed_init(w, gpus)
        result = simulate_fixed(w, r, b, epochs, gpus_per_node)
    elif policy == "adaptive":
        result = simulate_adaptive(w, gpus, epochs, gpus_per_node, resize_cost_s)
    elif policy == "oracle":
        from .oracle import simulate_oracle
        result = simulate_oracle(w, gpus, epochs, gpus_per_node, resize_cost_s)
    else:
        raise TraceError(f"unknown --policy {policy!r}; pass adaptive, oracle, fixed-init or "
                         f"fixed")
    from .oracle import oracle_plan

    r, b = fixed_init(w, gpus)
    best_t, best_r, best_b = best_fixed(w, gpus, epochs, gpus_per_node)
    oracle_s = oracle_plan(w, gpus, epochs, gpus_per_node, resize_cost_s).time_s
    return {
        "workload": w.name,
        "policy": policy,
        "gpus": gpus,
        "epochs": epochs,
        "time_s": result.time_s,
        "resizes": result.resizes,
        "fixed_init_s": fixed_time(w, r, b, epochs, gpus_per_node),
        "best_fixed_s": best_t,
        "best_fixed": {"replicas": best_r, "batch": best_b},
        "oracle_s": oracle_s,
        "timeline": result.timeline_dicts(),
    }
