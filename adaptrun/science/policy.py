"""The policy: which (replicas, local batch, accumulation steps) a job should run at next.

The model. For every feasible configuration c = (R replicas, local batch a, k accumulation
steps) with global batch B = R * a * (k + 1) in [B0, Bmax], the policy predicts

    goodput(c) = B0 * r(B / B0) / step_time(c)      B0-equivalent examples per second

from the fitted throughput model (``throughput``) and the job's latest gradient statistics
(gain r, ``efficiency``). All candidates are evaluated at once as numpy arrays.

Hysteresis. A batch-only change is cheap (a directive applied at the next step boundary),
so the best configuration at the current replica count is taken as soon as it is predicted
``batch_min_gain`` (1 %) better than the current one. A change of replica count costs a
resize of ``resize_cost_s`` seconds, so it is taken only when

    remaining_s * (1 - goodput_same / goodput_new) > payback * resize_cost_s

and the predicted gain is at least ``resize_min_gain``: the time saved over the rest of the
run pays for the resize ``payback`` times over. The saving is taken in the worse of two
futures, since the policy cannot see which one comes: the noise scale stays where it is
(the goodputs predicted now), or it grows without bound (every example fully efficient, so
the best *throughput* at each replica count decides). The noise scale grows as training
goes on (McCandlish et al.), so the real run lies between the two; a move that wins only
while the noise scale is small (fewer replicas early on) is not worth a resize. The work
left is ``(target_progress - progress) * B0`` from the report; a job that does not know its
length is assumed to run as long again as it has run so far.

Exploration. A job that has only run at one replica count cannot fit a sync model. The
throughput fit then leans on its stated prior for the counts it has not seen (sync inside a
node cheaper than across nodes, a fixed compute overhead per micro-batch), so the policy
predicts a goodput for every count and tries one when that prediction pays for the resize,
exactly as for a measured one. Two guards keep an unmeasured guess from running away: the
candidate replica counts are capped at ``explore_factor`` (2) times the largest count that
has been measured (Pollux's rule), and every measurement replaces the prior where it
applies, so a wrong guess is corrected at the next decision. Local batches are explored the
same way, for free, since batch changes cost nothing.

The policy reads only what a live job reports: measured step and sync times of
configurations it has run, and the gradient statistics at its current batch. It never sees
the future. It is a plain object with no I/O; the controller and the simulator drive it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .efficiency import gain
from .report import Report
from .throughput import ThroughputParams, ThroughputSample, fit, step_time

__all__ = ["Config", "JobBounds", "Decision", "Policy", "BoundsError"]


class BoundsError(ValueError):
    """Job bounds that admit no configuration; the message says which bound to change."""


@dataclass(frozen=True)
class Config:
    replicas: int
    local_batch: int
    accum_steps: int = 0

    @property
    def global_batch(self) -> int:
        return self.replicas * self.local_batch * (self.accum_steps + 1)

    def describe(self) -> str:
        acc = f" x{self.accum_steps + 1} accum" if self.accum_steps else ""
        return f"{self.replicas} replicas x {self.local_batch}{acc} = batch {self.global_batch}"


@dataclass(frozen=True)
class JobBounds:
    init_batch: int                  # B0
    max_batch: int                   # Bmax, the largest global batch allowed
    min_replicas: int = 1
    max_replicas: int = 1
    local_batch_min: int = 1
    local_batch_max: int = 1 << 30   # the memory limit of one replica
    slots_per_node: int = 1          # replicas per node (GPUs per node)
    max_accum_steps: int = 15

    def nodes_for(self, replicas):
        return np.ceil(np.asarray(replicas) / self.slots_per_node).astype(int)

    def validate(self) -> "JobBounds":
        if self.init_batch < 1 or self.max_batch < self.init_batch:
            raise BoundsError(f"need 1 <= init batch <= max batch, got {self.init_batch} and "
                              f"{self.max_batch}; raise the max batch")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise BoundsError(f"need 1 <= min workers <= max workers, got {self.min_replicas} "
                              f"and {self.max_replicas}")
        if not 1 <= self.local_batch_min <= self.local_batch_max:
            raise BoundsError(f"need 1 <= local batch min <= max, got {self.local_batch_min} "
                              f"and {self.local_batch_max}")
        if self.slots_per_node < 1 or self.max_accum_steps < 0:
            raise BoundsError("slots per node must be >= 1 and max accumulation steps >= 0")
        if self.min_replicas * self.local_batch_min > self.max_batch:
            raise BoundsError(f"{self.min_replicas} workers x local batch {self.local_batch_min} "
                              f"exceeds the max batch {self.max_batch}; lower min workers or "
                              f"the local batch minimum")
        return self

    def admits(self, c: Config) -> bool:
        return (self.min_replicas <= c.replicas <= self.max_replicas
                and self.local_batch_min <= c.local_batch <= self.local_batch_max
                and 0 <= c.accum_steps <= self.max_accum_steps
                and self.init_batch <= c.global_batch <= self.max_batch)


@dataclass(frozen=True)
class Decision:
    config: Config
    current: Config
    goodput_current: float
    goodput_chosen: float
    reason: str

    @property
    def changes_replicas(self) -> bool:
        return self.config.replicas != self.current.replicas

    @property
    def changes_batch(self) -> bool:
        return (self.config.local_batch, self.config.accum_steps, self.config.global_batch) != (
            self.current.local_batch, self.current.accum_steps, self.current.global_batch)

    @property
    def predicted_gain(self) -> float:
        if self.goodput_current <= 0:
            return math.inf
        return self.goodput_chosen / self.goodput_current - 1.0


def _local_batch_grid(lo: int, hi: int, points: int) -> np.ndarray:
    grid = np.unique(np.round(np.geomspace(lo, hi, points)).astype(int))
    return grid[(grid >= lo) & (grid <= hi)]


@dataclass
class _Measured:
    step_sum: float = 0.0
    sync_sum: float = 0.0
    count: int = 0


@dataclass
class Policy:
    """Goodput-maximising policy with hysteresis; feed it reports, ask it for decisions."""

    bounds: JobBounds
    resize_cost_s: float = 30.0
    resize_min_gain: float = 0.05
    batch_min_gain: float = 0.01
    payback: float = 4.0
    explore_factor: float = 2.0
    grid_points: int = 48
    _measured: dict = field(default_factory=dict, repr=False)
    _params: ThroughputParams | None = field(default=None, repr=False)
    _dirty: bool = field(default=True, repr=False)
    last_report: Report | None = field(default=None, repr=False)

    def __post_init__(self):
        self.bounds.validate()
        self._grid = _local_batch_grid(self.bounds.local_batch_min, self.bounds.local_batch_max,
                                       self.grid_points)

    # -- inputs --------------------------------------------------------------------------
    def observe(self, report: Report) -> None:
        """Record one validated report: its throughput sample and its gradient statistics."""
        report.validate()
        key = (report.nodes, report.world_size, report.local_batch, report.accum_steps)
        m = self._measured.setdefault(key, _Measured())
        m.step_sum += report.step_time_s
        m.sync_sum += report.sync_time_s
        m.count += 1
        # Refit when a configuration is new or its mean has doubled its evidence: the fit
        # changes little between, and the controller and simulator call this often.
        if m.count & (m.count - 1) == 0:
            self._dirty = True
        self.last_report = report

    def with_bounds(self, bounds: JobBounds) -> "Policy":
        """The same policy, with what it learned, under new bounds (``adaptrun scale``)."""
        p = replace(self, bounds=bounds)
        p._measured = self._measured
        p._params = self._params
        p._dirty = self._dirty
        return p

    def samples(self) -> list[ThroughputSample]:
        return [ThroughputSample(n, r, a, k, m.step_sum / m.count, m.sync_sum / m.count)
                for (n, r, a, k), m in self._measured.items()]

    @property
    def params(self) -> ThroughputParams | None:
        if self._dirty and self._measured:
            self._params = fit(self.samples())
            self._dirty = False
        return self._params

    # -- evaluation ----------------------------------------------------------------------
    def candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays (replicas, local_batch, accum_steps) of every feasible configuration: a
        geometric grid of local batches, plus for each (replicas, accum) the local batches
        that hit the batch bounds exactly."""
        b = self.bounds
        max_seen = max((r for (_, r, _, _) in self._measured), default=b.min_replicas)
        r_hi = min(b.max_replicas, max(b.min_replicas, int(self.explore_factor * max_seen)))
        rs = np.arange(b.min_replicas, r_hi + 1)
        ks = np.arange(0, b.max_accum_steps + 1)
        r, a, k = (x.ravel() for x in np.meshgrid(rs, self._grid, ks, indexing="ij"))
        r2, k2 = (x.ravel() for x in np.meshgrid(rs, ks, indexing="ij"))
        per = r2 * (k2 + 1)
        edges = [b.max_batch // per, -(-b.init_batch // per)]
        r = np.concatenate([r, r2, r2])
        k = np.concatenate([k, k2, k2])
        a = np.concatenate([a] + edges)
        batch = r * a * (k + 1)
        ok = ((batch >= b.init_batch) & (batch <= b.max_batch)
              & (a >= b.local_batch_min) & (a <= b.local_batch_max))
        return r[ok], a[ok], k[ok]

    def goodput(self, replicas, local_batch, accum_steps, grad_sqr=None, grad_var=None):
        """Predicted B0-equivalent examples/s of configurations (vectorised)."""
        rep = self.last_report
        sqr = rep.grad_sqr if grad_sqr is None else grad_sqr
        var = rep.grad_var if grad_var is None else grad_var
        b0 = self.bounds.init_batch
        replicas = np.asarray(replicas)
        batch = replicas * np.asarray(local_batch) * (np.asarray(accum_steps) + 1)
        t = step_time(self.params, self.bounds.nodes_for(replicas), replicas, local_batch,
                      accum_steps)
        return b0 * gain(sqr, var, batch / b0) / t

    def _remaining_work(self, g_same: float) -> float:
        """B0-examples still to train: (target - progress) * B0, or, for a job that does not
        know its length, as much again as it has done (at its current goodput)."""
        rep = self.last_report
        if math.isfinite(rep.target_progress) and rep.target_progress > 0:
            return max(rep.target_progress - rep.progress, 0.0) * self.bounds.init_batch
        return g_same * rep.time_s

    def _resize_saving_s(self, r, a, k, g_same, g_new, r_new, r_cur) -> float:
        """Seconds a move to ``r_new`` replicas saves over the rest of the run, in the worse
        of two futures: the noise scale stays where it is (goodputs as predicted now), or it
        grows without bound (every example fully efficient: goodput = throughput). Training
        lives between the two, since the noise scale grows as the loss falls."""
        work = self._remaining_work(g_same)
        now = work * (1.0 / max(g_same, 1e-12) - 1.0 / max(g_new, 1e-12))
        thr = r * a * (k + 1) / step_time(self.params, self.bounds.nodes_for(r), r, a, k)
        thr_same = float(np.max(thr[r == r_cur])) if np.any(r == r_cur) else 0.0
        thr_new = float(np.max(thr[r == r_new]))
        if thr_same <= 0:
            return now
        later = work * (1.0 / thr_same - 1.0 / thr_new)
        return min(now, later)

    def decide(self) -> Decision:
        """The configuration to run next, with the predicted goodputs and the reason."""
        rep = self.last_report
        if rep is None:
            raise RuntimeError("the policy has no report yet; call observe() first")
        current = Config(rep.world_size, rep.local_batch, rep.accum_steps)
        r, a, k = self.candidates()
        if r.size == 0:
            raise BoundsError("no configuration fits the job's bounds; widen the batch or "
                              "local batch range")
        g = self.goodput(r, a, k)
        g_cur = float(self.goodput(current.replicas, current.local_batch, current.accum_steps))
        best = int(np.argmax(g))
        best_cfg = Config(int(r[best]), int(a[best]), int(k[best]))

        if not self.bounds.admits(current) and not (
                self.bounds.min_replicas <= current.replicas <= self.bounds.max_replicas):
            return Decision(best_cfg, current, g_cur, float(g[best]),
                            f"workers {current.replicas} outside the bounds "
                            f"[{self.bounds.min_replicas}, {self.bounds.max_replicas}]: "
                            f"move to {best_cfg.describe()}")

        same = np.flatnonzero(r == current.replicas)
        if same.size:
            i = same[int(np.argmax(g[same]))]
            same_cfg, g_same = Config(int(r[i]), int(a[i]), int(k[i])), float(g[i])
        else:
            same_cfg, g_same = current, g_cur

        if best_cfg.replicas != current.replicas:
            gain_frac = float(g[best]) / max(g_same, 1e-12) - 1.0
            saved_s = self._resize_saving_s(r, a, k, g_same, float(g[best]), best_cfg.replicas,
                                            current.replicas)
            if gain_frac >= self.resize_min_gain and saved_s > self.payback * self.resize_cost_s:
                return Decision(best_cfg, current, g_cur, float(g[best]),
                                f"resize to {best_cfg.describe()}: goodput +{gain_frac:.0%}, "
                                f"saves >= {saved_s:.0f} s for a {self.resize_cost_s:.0f} s resize")

        if not self.bounds.admits(current):
            return Decision(same_cfg, current, g_cur, g_same,
                            f"batch {current.global_batch} outside the bounds: "
                            f"{same_cfg.describe()}")
        if same_cfg != current and g_same > g_cur * (1.0 + self.batch_min_gain):
            return Decision(same_cfg, current, g_cur, g_same,
                            f"batch {current.global_batch} -> {same_cfg.global_batch}: "
                            f"goodput +{g_same / g_cur - 1:.0%} (noise scale "
                            f"{rep.noise_scale:.0f})")
        return Decision(current, current, g_cur, g_cur, "keep: no change pays off")
