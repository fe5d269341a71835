"""The policy: which (replicas, local batch, accumulation steps) a job should run at next.

A plain object with no I/O: the controller and the simulator drive it with the job's
reports, and it returns one decision with its reason. What it learned round-trips through
``state_dict`` / ``load_state_dict`` as JSON data, so a restarted controller decides as the
old one would have. It reads only what a live job reports (step and sync times of the
configurations it ran, gradient statistics and loss at its current batch), never the future.

The model. For every feasible configuration c = (R replicas, local batch a, k accumulation
steps) with global batch B = R * a * (k + 1) in [B0, Bmax] and inside the script's declared
limits (``bounds_from_script``: B0, max batch, local bounds, accumulation, within the
launcher's optional caps), all at once as numpy arrays:

    goodput(c) = B0 * r(B / B0) / step_time(c)      B0-equivalent examples per second

with step_time from the fitted throughput model (``throughput``, a stated prior where nothing
was measured) and the gain r from the job's statistics (``efficiency``) at the conservative
end of the worker's estimate, the median of the last ``stats_window`` reports.

Moves.
- A batch-only change (applied at the next step boundary, free) is taken when it gains
  ``batch_min_gain``; one that undoes the last within ``holdoff_runs`` decisions needs
  ``batch_reversal_gain``.
- A change of replica count costs ``resize_cost_s`` (the job's measured re-form gap; a prior
  until the first) and is taken only when
  ``remaining_s * (1 - goodput_same / goodput_new) > payback * resize_cost_s`` and it gains
  ``resize_min_gain``, in the worse of two futures: the noise scale stays where it is, or it
  grows without bound (throughput alone decides). The work left is
  ``(target_progress - progress) * B0``; a job of unknown length is assumed to run as long
  again as it has.
- A move to a placement never measured (several replicas in a node, or across nodes) must
  also gain the share of its step that is the prior's guessed sync (``_prior_share``).
  Unmeasured local batches at the current count are tried first (free). A replica move that
  the next decisions reverse bars its count for ``holdoff_runs`` decisions, doubling with
  each reversal (``_Moves``).
- Before anything is measured a job starts on one node at B0 (``initial_config``).
- Without a noise-scale estimate the batch stays where it is, and the reason says so.

The batch, checked against the loss (``progress_check``).
- It grows at most ``batch_growth_max`` (4x) per decision, and holds (neither up nor down)
  while the last increase is being checked (``check_reports`` reports) or a probe's batch is
  not yet applied.
- The check compares the progress per example the loss curve realized after the move (a
  range, from the scatter of the reports) with the efficiency ratio the statistics
  predicted; when even the top of the range is below ``check_shortfall`` of it, the batch
  backs off below the move and is capped for ``holdoff_runs`` decisions (doubling with each
  back-off); the decision line begins ``back off:``.
- With ``probe_keep`` > 0 (off by default), where the noise scale sees no gain but the loss
  keeps falling, the policy probes a 1.5-2x larger batch (``_probe``) and keeps it when the
  bottom of the range reaches ``probe_keep`` of the progress per example, as a floor the
  noise scale does not take back. Off, because the loss curve a probe is read against is
  extrapolated from before it and its bend in a short window reads as a gain or a loss.
- A job that reports no loss gets the bounded growth unchecked, and its decision lines say so.

Figures (each rule against the hindsight oracle, the critical batch by branched training):
the docs' Performance page.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .efficiency import efficiency, gain
from .progress_check import BatchMove, fit_log_curve, realized_interval
from .report import Report
from .throughput import ThroughputParams, ThroughputSample, fit, step_time

__all__ = ["Config", "JobBounds", "BatchCaps", "bounds_from_script", "Decision", "Policy",
           "BoundsError"]


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
class BatchCaps:
    """Batch limits a launcher flag sets (None: no cap). The script declares its own limits
    (B0, max batch, local bounds, accumulation) in its reports; a flag can only tighten them."""
    init_batch: int | None = None
    max_batch: int | None = None
    local_batch_min: int | None = None
    local_batch_max: int | None = None
    max_accum_steps: int | None = None


def bounds_from_script(base: JobBounds, caps: BatchCaps, r: Report) -> tuple[JobBounds, list[str]]:
    """The job's bounds: what the script declares in report ``r`` within the launcher's
    ``caps`` (the tighter of the two), keeping ``base``'s worker bounds; and one line per flag
    that disagrees with the script, saying what is used. A report that declares no limits
    (``max_batch`` 0) keeps the caps as the limits, with the report's B0."""
    notes = []
    b0 = r.init_batch
    declared = r.max_batch > 0
    if caps.init_batch and caps.init_batch != b0:
        notes.append(f"--init-batch {caps.init_batch} differs from the script's batch_size "
                     f"{b0}: B0 is the script's, {b0} (drop the flag)")
    hi = r.max_batch if declared else max(caps.max_batch or base.max_batch, b0)
    if declared and caps.max_batch and caps.max_batch < hi:
        if caps.max_batch >= b0:
            notes.append(f"--max-global-batch {caps.max_batch} caps the script's max batch "
                         f"{hi}: using {caps.max_batch}")
            hi = caps.max_batch
        else:
            notes.append(f"--max-global-batch {caps.max_batch} is below the script's batch_size "
                         f"{b0}: ignored")
    lo_l = max(r.local_batch_min or 1, caps.local_batch_min or 1)
    hi_l = min(r.local_batch_max or (1 << 30), caps.local_batch_max or (1 << 30))
    if caps.local_batch_min and r.local_batch_min and caps.local_batch_min > r.local_batch_min:
        notes.append(f"--local-batch-min {caps.local_batch_min} raises the script's lower local "
                     f"bound {r.local_batch_min}")
    if caps.local_batch_max and r.local_batch_max and caps.local_batch_max < r.local_batch_max:
        notes.append(f"--local-batch-max {caps.local_batch_max} lowers the script's upper local "
                     f"bound {r.local_batch_max}")
    accum = base.max_accum_steps if (r.accumulation or not declared) else 0
    if caps.max_accum_steps is not None:
        accum = min(accum, caps.max_accum_steps)
    candidate = replace(base, init_batch=b0, max_batch=hi, local_batch_min=lo_l,
                        local_batch_max=hi_l, max_accum_steps=accum)
    try:
        return candidate.validate(), notes
    except BoundsError as exc:
        # The flags and the script together admit nothing: the script's own limits win.
        own = replace(candidate, local_batch_min=r.local_batch_min or 1,
                      local_batch_max=r.local_batch_max or (1 << 30),
                      max_batch=r.max_batch if declared else hi)
        notes.append(f"the flags leave no configuration ({exc}); using the script's own limits")
        return own.validate(), notes


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


def b0_noise(init_batch: int, grad_sqr: float, grad_var: float) -> float:
    """The noise scale B0 * grad_var / |G|^2 in examples (inf without |G|^2 > 0)."""
    return init_batch * max(grad_var, 0.0) / grad_sqr if grad_sqr > 0 else math.inf


def _num(x: float):
    """A float as strict JSON takes it: itself when finite, else "nan" / "inf" / "-inf"."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _float(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ValueError(f"expected a number, got {x!r}")
    if isinstance(x, str) and x not in ("nan", "inf", "-inf"):
        raise ValueError(f"expected a number, got {x!r}")
    return float(x)


_REPORT_FLOATS = frozenset(f.name for f in fields(Report) if f.type in ("float", float))


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"expected an integer, got {x!r}")
    return x


def _median_noise(stats: list) -> tuple[float, float]:
    """Of (grad_sqr, grad_var) pairs (each with grad_sqr > 0), the one whose noise scale is
    the median (the lower middle of an even count)."""
    ranked = sorted(stats, key=lambda st: st[1] / st[0])
    return ranked[(len(ranked) - 1) // 2]


_CURVE_POINTS = 32        # loss points the policy keeps to check its batch moves


def _local_batch_grid(lo: int, hi: int, points: int) -> np.ndarray:
    grid = np.unique(np.round(np.geomspace(lo, hi, points)).astype(int))
    return grid[(grid >= lo) & (grid <= hi)]


def _configs(b: "JobBounds", grid: np.ndarray, rs: np.ndarray):
    """Arrays (replicas, local_batch, accum_steps) of the configurations over replica counts
    ``rs`` within the bounds: the local-batch grid, plus for each (replicas, accum) the local
    batches that hit the batch bounds exactly."""
    ks = np.arange(0, b.max_accum_steps + 1)
    r, a, k = (x.ravel() for x in np.meshgrid(rs, grid, ks, indexing="ij"))
    r2, k2 = (x.ravel() for x in np.meshgrid(rs, ks, indexing="ij"))
    per = r2 * (k2 + 1)
    r = np.concatenate([r, r2, r2])
    k = np.concatenate([k, k2, k2])
    a = np.concatenate([a, b.max_batch // per, -(-b.init_batch // per)])
    batch = r * a * (k + 1)
    ok = ((batch >= b.init_batch) & (batch <= b.max_batch)
          & (a >= b.local_batch_min) & (a <= b.local_batch_max))
    return r[ok], a[ok], k[ok]


@dataclass
class _Measured:
    step_sum: float = 0.0
    sync_sum: float = 0.0
    count: int = 0


@dataclass
class _Moves:
    """Moves the policy decided, to keep it from flapping: a replica-count move reversed
    within ``holdoff_runs`` decisions bars the count it left for ``holdoff_runs * 2^(flaps -
    1)`` decisions (every flap of the same count doubles the bar); the last batch-only move's
    direction, so that undoing it soon after must gain more (``Policy.batch_reversal_gain``)."""
    runs: int = 0
    last: tuple[int, int, int] | None = None       # (run, from replicas, to replicas)
    flaps: dict = field(default_factory=dict)       # replicas -> reversals counted against it
    barred_until: dict = field(default_factory=dict)
    batch_last: tuple[int, int] | None = None      # (run, +1 up / -1 down)
    batch_cap: int = 0                              # a backed-off batch's ceiling (0: none)
    batch_cap_until: int = -1
    backoffs: int = 0
    batch_floor: int = 0                            # a batch a probe measured efficient
    probe_to: int = 0                               # the batch a probe decided, not yet seen
    probe_run: int = -1                             # the decision that made it

    def probe_pending(self, holdoff_runs: int) -> bool:
        """A probe was decided and its batch not yet seen in a report; one whose directive
        was never applied lapses after ``holdoff_runs`` decisions."""
        if self.probe_to and self.runs - self.probe_run > holdoff_runs:
            self.probe_to = 0
        return bool(self.probe_to)

    def cap(self) -> int:
        """The batch ceiling in force after a back-off (0: none)."""
        return self.batch_cap if self.batch_cap_until > self.runs else 0

    def reverses_batch(self, direction: int, holdoff_runs: int) -> bool:
        b = self.batch_last
        return b is not None and b[1] == -direction and self.runs - b[0] <= holdoff_runs

    def barred(self, replicas: int) -> bool:
        return self.barred_until.get(replicas, -1) > self.runs

    def record(self, current: int, new: int, holdoff_runs: int) -> None:
        last = self.last
        if last is not None and (last[1], last[2]) == (new, current) \
                and self.runs - last[0] <= holdoff_runs:
            n = self.flaps[current] = self.flaps.get(current, 0) + 1
            self.barred_until[current] = self.runs + holdoff_runs * 2 ** (n - 1)
        self.last = (self.runs, current, new)


@dataclass
class Policy:
    """Goodput-maximising policy with hysteresis; feed it reports, ask it for decisions."""

    bounds: JobBounds
    resize_cost_s: float = 30.0
    resize_min_gain: float = 0.05
    batch_min_gain: float = 0.01
    batch_reversal_gain: float = 0.05
    payback: float = 2.0
    explore_factor: float = math.inf
    grid_points: int = 48
    holdoff_runs: int = 10
    stats_window: int = 3
    batch_growth_max: float = 4.0
    check_reports: int = 6
    check_shortfall: float = 0.75
    probe_keep: float = 0.0
    _measured: dict = field(default_factory=dict, repr=False)
    _moves: _Moves = field(default_factory=_Moves, repr=False)
    _recent: list = field(default_factory=list, repr=False)  # the last stats_window measured
    _curve: list = field(default_factory=list, repr=False)   # (examples, loss, global batch)
    _examples: float = field(default=0.0, repr=False)        # examples trained so far
    _check: BatchMove | None = field(default=None, repr=False)  # a batch move being checked
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
        prev = self.last_report
        if prev is not None and report.step > prev.step:
            self._examples += (report.step - prev.step) * prev.global_batch
        if math.isfinite(report.loss):
            self._curve = [*self._curve, (self._examples, report.loss, report.global_batch)][
                -_CURVE_POINTS:]
        if prev is not None and report.global_batch != prev.global_batch:
            self._check = self._start_check(prev, report)
        if report.grad_sqr > 0 and math.isfinite(report.noise_scale):
            self._recent = [*self._recent, (report.grad_sqr, report.grad_var)][
                -max(1, self.stats_window):]
        self.last_report = report

    def _start_check(self, prev: Report, report: Report) -> BatchMove | None:
        """A batch increase just applied: the curve before it and what it was predicted to
        do, to be checked once ``check_reports`` reports came after it (None: nothing to
        check, as after a decrease, or without a falling loss before it)."""
        old, new = prev.global_batch, report.global_batch
        m = self._moves
        probe = bool(m.probe_to) and m.probe_to == new
        if new <= old or (self._stats is None and not probe):
            return None
        m.probe_to = 0
        fit = fit_log_curve([(x, loss) for x, loss, b in self._curve[:-1] if b == old][-8:])
        if fit is None:
            if probe:      # a probe that cannot be checked is not kept
                m.batch_cap, m.batch_cap_until = old, m.runs + self.holdoff_runs
            return None
        predicted = 1.0
        if self._stats is not None:
            sqr, var = self._stats
            b0 = self.bounds.init_batch
            predicted = float(efficiency(sqr, var, new / b0) / efficiency(sqr, var, old / b0))
        x0 = self._examples - (report.step - prev.step) * old
        keep_at = self.probe_keep if probe else self.check_shortfall * predicted
        return BatchMove(x0, old, new, predicted, fit.a, fit.b, probe, keep_at, fit.sigma,
                         fit.lx_mean, fit.sxx, fit.points)

    def _checked_move(self) -> str:
        """Judge the batch move being checked once enough reports came after it, on the side
        of the realized ratio's range that is known (``realized_interval``): a move the
        statistics predicted is backed off when even the top of the range is below
        ``check_shortfall`` of the predicted ratio; a probe is kept only when the bottom of
        the range reaches ``probe_keep``. A back-off caps the batch for ``holdoff_runs``
        decisions: at the batch before a predicted move (doubling with every such back-off),
        below the probed batch for a probe; it returns the reason, "" otherwise."""
        mv = self._check
        if mv is None:
            return ""
        after = [(x, loss) for x, loss, b in self._curve if x > mv.examples and b == mv.new_batch]
        if len(after) < self.check_reports:
            return ""
        self._check = None
        lo, rho, hi = realized_interval(mv, after)
        m = self._moves
        if mv.probe:
            if lo >= mv.keep_at:   # measured: the bigger batch costs no progress per example
                m.batch_floor = max(m.batch_floor, mv.new_batch)
                return ""
            # Not shown to pay: back below the probed batch, where the noise scale decides.
            m.batch_cap, m.batch_cap_until = mv.new_batch - 1, m.runs + self.holdoff_runs
        elif hi < mv.keep_at:
            m.backoffs += 1
            m.batch_cap = mv.old_batch
            m.batch_cap_until = m.runs + self.holdoff_runs * 2 ** (m.backoffs - 1)
        else:
            return ""
        m.batch_floor = min(m.batch_floor, mv.old_batch)
        promised = (f"the probe needed {mv.keep_at:.2f}" if mv.probe else
                    f"the noise scale predicted {mv.predicted:.2f}")
        return (f"back off: batch {mv.old_batch} -> {mv.new_batch} realized {rho:.2f} "
                f"({lo:.2f}-{hi:.2f}) of the progress per example at {mv.old_batch} "
                f"({promised}); batch at most {m.batch_cap} for "
                f"{m.batch_cap_until - m.runs} decisions")

    def with_bounds(self, bounds: JobBounds) -> "Policy":
        """The same policy, with what it learned, under new bounds (``adaptrun scale``)."""
        p = replace(self, bounds=bounds)
        p._measured = self._measured
        p._params = self._params
        p._dirty = self._dirty
        p._moves = self._moves
        p._recent = self._recent
        p._curve, p._examples, p._check = self._curve, self._examples, self._check
        return p

    # -- what it learned, as plain data -----------------------------------------------------
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """What the policy learned, as JSON-ready data (numbers, strings, lists, dicts): the
        measured configurations, the last reports' gradient statistics, the throughput fit, the
        hold-off moves, the resize cost and the last report. Not the bounds (the job's) nor
        the tunables (the controller's settings). Non-finite floats are written as strings
        ("nan", "inf"), so the output is strict JSON. Pure: no I/O."""
        m = self._moves
        return {
            "version": self.STATE_VERSION,
            "resize_cost_s": _num(self.resize_cost_s),
            "measured": [[n, r, a, k, _num(v.step_sum), _num(v.sync_sum), v.count]
                         for (n, r, a, k), v in self._measured.items()],
            "stats": None if self._stats is None else [_num(x) for x in self._stats],
            "recent_stats": [[_num(x) for x in st] for st in self._recent],
            "params": None if self._params is None else [_num(x)
                                                         for x in self._params.as_array()],
            "params_stale": bool(self._dirty),
            "moves": {"runs": m.runs, "last": None if m.last is None else list(m.last),
                      "flaps": [[r, n] for r, n in m.flaps.items()],
                      "barred_until": [[r, until] for r, until in m.barred_until.items()],
                      "batch_last": None if m.batch_last is None else list(m.batch_last),
                      "batch_cap": [m.batch_cap, m.batch_cap_until, m.backoffs],
                      "batch_floor": [m.batch_floor, m.probe_to, m.probe_run]},
            "curve": [[_num(x), _num(loss), b] for x, loss, b in self._curve],
            "examples": _num(self._examples),
            "check": None if self._check is None else [
                _num(self._check.examples), self._check.old_batch, self._check.new_batch,
                _num(self._check.predicted), _num(self._check.a), _num(self._check.b),
                self._check.probe, _num(self._check.keep_at), _num(self._check.sigma),
                _num(self._check.lx_mean), _num(self._check.sxx), self._check.points],
            "last_report": None if self.last_report is None else {
                k: _num(v) if isinstance(v, float) else v
                for k, v in self.last_report.to_dict().items()},
        }

    def load_state_dict(self, state: dict) -> "Policy":
        """Take back what ``state_dict`` returned (of this or an earlier policy of the job);
        return self. Raise ``ValueError`` (or ``ReportError``, one) naming what is wrong when
        ``state`` is not such data; then the policy is left as it was. Pure: no I/O."""
        try:
            if state.get("version") != self.STATE_VERSION:
                raise ValueError(f"policy state version {state.get('version')!r}, expected "
                                 f"{self.STATE_VERSION}")
            measured = {}
            for n, r, a, k, step_sum, sync_sum, count in state["measured"]:
                key = tuple(_int(x) for x in (n, r, a, k))
                measured[key] = _Measured(_float(step_sum), _float(sync_sum), _int(count))
            stats = state["stats"]
            stats = None if stats is None else (_float(stats[0]), _float(stats[1]))
            # A state written before the window was kept holds the one in force only.
            recent = [(_float(st[0]), _float(st[1])) for st in state.get(
                "recent_stats", [] if stats is None else [stats])]
            if not all(sqr > 0 and math.isfinite(sqr) and math.isfinite(var)
                       for sqr, var in recent):
                raise ValueError("policy state: gradient statistics (stats, recent_stats) "
                                 "need finite numbers and grad_sqr > 0")
            params = state["params"]
            params = None if params is None else ThroughputParams.from_array(
                [_float(x) for x in params])
            mv = state["moves"]
            moves = _Moves(runs=_int(mv["runs"]),
                           last=None if mv["last"] is None else tuple(_int(x) for x in mv["last"]),
                           flaps={_int(r): _int(n) for r, n in mv["flaps"]},
                           barred_until={_int(r): _int(u) for r, u in mv["barred_until"]},
                           batch_last=None if mv.get("batch_last") is None else
                           (_int(mv["batch_last"][0]), _int(mv["batch_last"][1])),
                           **dict(zip(("batch_cap", "batch_cap_until", "backoffs"),
                                      (_int(x) for x in mv.get("batch_cap", [0, -1, 0])))),
                           **dict(zip(("batch_floor", "probe_to", "probe_run"),
                                      (_int(x) for x in mv.get("batch_floor", [0, 0, -1])))))
            curve = [(_float(x), _float(loss), _int(b)) for x, loss, b in state.get("curve", [])]
            examples = _float(state.get("examples", 0.0))
            check = state.get("check")
            if check is not None:
                check = BatchMove(_float(check[0]), _int(check[1]), _int(check[2]),
                                  _float(check[3]), _float(check[4]), _float(check[5]),
                                  bool(check[6]) if len(check) > 6 else False,
                                  _float(check[7]) if len(check) > 7 else 0.0,
                                  *(_float(x) for x in check[8:11]),
                                  *(_int(x) for x in check[11:12]))
            rep = state["last_report"]
            if rep is not None:
                rep = Report.from_dict({k: _float(v) if k in _REPORT_FLOATS else v
                                        for k, v in rep.items()}).validate()
            resize_cost_s = _float(state["resize_cost_s"])
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"not a policy state: {type(exc).__name__}: {exc}") from None
        self._measured, self._recent, self._params = measured, recent, params
        self._curve, self._examples, self._check = curve, examples, check
        self._dirty = bool(state.get("params_stale", True)) or params is None
        self._moves, self.last_report, self.resize_cost_s = moves, rep, resize_cost_s
        return self

    @property
    def _stats(self) -> tuple[float, float] | None:
        """The (grad_sqr, grad_var) in force: the median noise scale of the last reports that
        measured one (None before any did)."""
        return _median_noise(self._recent) if self._recent else None

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
        r_hi = int(min(b.max_replicas, max(b.min_replicas, self.explore_factor * max_seen)))
        r, a, k = _configs(b, self._grid, np.arange(b.min_replicas, r_hi + 1))
        ok = np.ones(r.shape, dtype=bool)
        if b.max_accum_steps > 0:
            # One replica measures the gradient noise only between its micro-batches: keep
            # two or more where the script allows it, or the noise scale (and with it the
            # batch) would freeze at its last estimate.
            ok &= (r > 1) | (k > 0)
        return r[ok], a[ok], k[ok]

    def goodput_by_workers(self, max_workers: int) -> np.ndarray | None:
        """Predicted goodput at each worker count n = 0..max_workers, each at its best batch
        and local batch within the job's batch bounds (entry 0, and counts where no batch
        fits, are 0), from the fitted throughput model and the noise scale in force. What a
        cluster allocator weighs; None before the job has measured a step time and a noise
        scale."""
        if self.last_report is None or self._stats is None or self.params is None:
            return None
        r, a, k = _configs(self.bounds, self._grid, np.arange(1, max_workers + 1))
        out = np.zeros(max_workers + 1)
        if r.size == 0:
            return out
        sqr, var = self._stats
        g = self.goodput(r, a, k, grad_sqr=sqr, grad_var=var)
        np.maximum.at(out, r, g)
        return out

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

    def _resize_saving_s(self, r, a, k, g_same, g_new, r_new, r_cur, corr=None) -> float:
        """Seconds a move to ``r_new`` replicas saves over the rest of the run, in the worse
        of two futures: the noise scale stays where it is (goodputs as predicted now), or it
        grows without bound (every example fully efficient: goodput = throughput). Training
        lives between the two, since the noise scale grows as the loss falls. ``corr``: per
        replica count, the measured correction of the model's step time there."""
        corr = corr or {}
        work = self._remaining_work(g_same)
        now = work * (1.0 / max(g_same, 1e-12) - 1.0 / max(g_new, 1e-12))
        thr = r * a * (k + 1) / step_time(self.params, self.bounds.nodes_for(r), r, a, k)

        def best_thr(count):
            at = r == count
            return float(np.max(thr[at])) * corr.get(count, 1.0) if np.any(at) else 0.0

        thr_same, thr_new = best_thr(r_cur), best_thr(r_new)
        if thr_same <= 0:
            return now
        later = work * (1.0 / thr_same - 1.0 / max(thr_new, 1e-12))
        return min(now, later)

    def initial_config(self) -> Config:
        """Where a new job starts, before anything is measured: one node (``slots_per_node``
        replicas, within the worker bounds) at B0. Sync inside a node is cheap and known to
        be; sync across nodes is the unknown that decides whether a job scales, and starting
        across nodes bets the whole run on it (a job that scales badly pays a resize to come
        back, or runs on at the loss). From one node the first measurement decides, and a
        growth that pays is one resize."""
        b = self.bounds
        r = min(max(b.slots_per_node, b.min_replicas), b.max_replicas)
        while r > b.min_replicas and r * b.local_batch_min > b.max_batch:
            r -= 1
        a = min(max(-(-b.init_batch // r), b.local_batch_min), b.local_batch_max)
        k = min(max(0, -(-b.init_batch // (r * a)) - 1), b.max_accum_steps)
        return Config(r, a, k)

    def decide(self) -> Decision:
        """The configuration to run next, with the predicted goodputs and the reason."""
        rep = self.last_report
        if rep is None:
            raise RuntimeError("the policy has no report yet; call observe() first")
        self._moves.runs += 1
        current = Config(rep.world_size, rep.local_batch, rep.accum_steps)
        r, a, k = self.candidates()
        if r.size == 0:
            raise BoundsError("no configuration fits the job's bounds; widen the batch or "
                              "local batch range")
        # Only what was measured: without a noise-scale estimate (|G|^2 never yet > 0) the
        # efficiency of another batch is unknown, so the batch stays; worker counts are still
        # compared at the current batch, where efficiency is the same for all of them. A
        # report whose estimate is momentarily undefined (|G|^2 <= 0 in one noisy window)
        # leaves the last measured one in force.
        measured = self._stats is not None
        sqr, var = self._stats if measured else (0.0, 0.0)
        stats = {"grad_sqr": sqr, "grad_var": var}
        backoff = self._checked_move()
        barred = [x for x in np.unique(r) if self._moves.barred(int(x))]
        keep = ~np.isin(r, barred) | (r == current.replicas)
        batch = r * a * (k + 1)
        if not measured:
            keep &= batch == current.global_batch
        # A warmup that follows the signal: the batch grows by at most batch_growth_max per
        # decision, and stays under the ceiling of a move that was backed off.
        # A move still being checked (or a probe not yet applied) holds the batch where it is,
        # either way, until the check is done: undoing it first would measure nothing.
        if self._check is not None or self._moves.probe_pending(self.holdoff_runs):
            keep &= batch == current.global_batch
        keep &= batch <= max(self.batch_growth_max * current.global_batch,
                             self.bounds.init_batch)
        cap = self._moves.cap()
        if cap:
            keep &= batch <= max(cap, self.bounds.init_batch)
        floor = self._moves.batch_floor
        if floor and not (cap and cap < floor):
            keep &= batch >= min(floor, current.global_batch)
        if keep.any():
            r, a, k = r[keep], a[keep], k[keep]
        g = self.goodput(r, a, k, **stats)
        g_cur = float(self.goodput(current.replicas, current.local_batch, current.accum_steps,
                                   **stats))
        best = int(np.argmax(g))
        best_cfg = Config(int(r[best]), int(a[best]), int(k[best]))
        waiting = "" if measured else " (no noise-scale estimate yet: the batch waits for one)"
        if not self._curve:
            waiting += " (no loss reported: batch moves are bounded, not checked)"
        if backoff:
            same = np.flatnonzero(r == current.replicas)
            if same.size:
                i = same[int(np.argmax(g[same]))]
                cfg = Config(int(r[i]), int(a[i]), int(k[i]))
                self._moves.batch_last = (self._moves.runs, -1)
                return Decision(cfg, current, g_cur, float(g[i]),
                                f"{backoff}: {cfg.describe()}")

        if not self.bounds.admits(current) and not (
                self.bounds.min_replicas <= current.replicas <= self.bounds.max_replicas):
            return self._move(Decision(best_cfg, current, g_cur, float(g[best]),
                                       f"workers {current.replicas} outside the bounds "
                                       f"[{self.bounds.min_replicas}, {self.bounds.max_replicas}]:"
                                       f" move to {best_cfg.describe()}{waiting}"))

        same = np.flatnonzero(r == current.replicas)
        if same.size:
            i = same[int(np.argmax(g[same]))]
            same_cfg, g_same = Config(int(r[i]), int(a[i]), int(k[i])), float(g[i])
        else:
            same_cfg, g_same = current, g_cur

        # Correct by measurement: a count the job has run at is judged by the model corrected
        # by what it measured there (at the batch that suits today's gradient statistics):
        # move back to a measured count that does better, weighed as any resize is (in the
        # worse of the two futures), and never to one that measured worse.
        corr = self._corrections()
        meas = self._measured_goodputs(r, a, k, g, corr)
        here = meas.get(current.replicas)
        if here is not None:
            others = [(gm, cfg) for r_, (gm, cfg) in meas.items()
                      if r_ != current.replicas and not self._moves.barred(r_)
                      and self.bounds.admits(cfg)
                      and (measured or cfg.global_batch == current.global_batch)]
            if others:
                g_back, cfg_back = max(others, key=lambda x: x[0])
                saved_s = self._resize_saving_s(r, a, k, here[0], g_back, cfg_back.replicas,
                                                current.replicas, corr)
                if (g_back > here[0] * (1.0 + self.resize_min_gain)
                        and saved_s > self.payback * self.resize_cost_s):
                    return self._move(Decision(
                        cfg_back, current, here[0], g_back,
                        f"back to {cfg_back.describe()}: goodput {g_back:.0f} there beats "
                        f"{here[0]:.0f} at {current.replicas} workers (+{g_back / here[0] - 1:.0%};"
                        f" step times as measured), saves >= {saved_s:.0f} s{waiting}"))
            measured_worse = (best_cfg.replicas in meas
                              and meas[best_cfg.replicas][0] <= here[0])
        else:
            measured_worse = False

        # Free before paid: when a batch-only move at this count is predicted to gain as much
        # as a resize must, and that batch has not been measured here, take it first. It costs
        # nothing, and its measurement corrects the model (the slope of compute in the local
        # batch) that every resize prediction, and the remaining time it weighs, rests on.
        untried_batch = (same_cfg != current
                         and g_same >= g_cur * (1.0 + self.resize_min_gain)
                         and not self._was_measured(same_cfg))
        if best_cfg.replicas != current.replicas and not measured_worse and not untried_batch:
            gain_frac = float(g[best]) / max(g_same, 1e-12) - 1.0
            saved_s = self._resize_saving_s(r, a, k, g_same, float(g[best]), best_cfg.replicas,
                                            current.replicas, corr)
            need = self.resize_min_gain + self._prior_share(best_cfg)
            if gain_frac >= need and saved_s > self.payback * self.resize_cost_s:
                return self._move(Decision(
                    best_cfg, current, g_cur, float(g[best]),
                    f"resize to {best_cfg.describe()}: goodput +{gain_frac:.0%}, saves >= "
                    f"{saved_s:.0f} s for a {self.resize_cost_s:.1f} s resize{waiting}"))

        if not self.bounds.admits(current):
            return Decision(same_cfg, current, g_cur, g_same,
                            f"batch {current.global_batch} outside the bounds: "
                            f"{same_cfg.describe()}")
        if same_cfg != current and g_same > g_cur * (1.0 + self.batch_min_gain):
            direction = 1 if same_cfg.global_batch > current.global_batch else -1
            if (self._moves.reverses_batch(direction, self.holdoff_runs)
                    and g_same < g_cur * (1.0 + self.batch_reversal_gain)):
                return Decision(current, current, g_cur, g_cur,
                                f"keep: batch {current.global_batch} -> "
                                f"{same_cfg.global_batch} would undo the last batch move for "
                                f"+{g_same / g_cur - 1:.1%} (undoing it needs "
                                f"+{self.batch_reversal_gain:.0%})")
            self._moves.batch_last = (self._moves.runs, direction)
            return Decision(same_cfg, current, g_cur, g_same,
                            f"batch {current.global_batch} -> {same_cfg.global_batch}: "
                            f"goodput +{g_same / g_cur - 1:.0%} (noise scale "
                            f"{b0_noise(self.bounds.init_batch, sqr, var):.0f}){waiting}")
        probe = self._probe(current, r, a, k, g)
        if probe is not None:
            i, fit_note = probe
            cfg = Config(int(r[i]), int(a[i]), int(k[i]))
            self._moves.probe_to, self._moves.probe_run = cfg.global_batch, self._moves.runs
            self._moves.batch_last = (self._moves.runs, 1)
            return Decision(cfg, current, g_cur, float(g[i]),
                            f"probe: batch {current.global_batch} -> {cfg.global_batch} to "
                            f"measure its progress per example ({fit_note}; kept if it "
                            f"realizes {self.probe_keep:.2f} of the present one)")
        return Decision(current, current, g_cur, g_cur, "keep: no change pays off" + waiting)

    def _probe(self, current: Config, r, a, k, g):
        """A probe of a larger batch where the noise scale sees no gain but the loss can tell:
        the loss fell along a curve over the last 8 reports at this batch, no move is being
        checked or was backed off, and a batch 1.5-2x this one fits at this replica count.
        The check then keeps it only if it realizes ``probe_keep`` of the progress per
        example (at no less throughput per example, so at no less goodput). Returns (index
        of the candidate, a note) or None."""
        m = self._moves
        if (self.probe_keep <= 0 or self._check is not None or m.cap()
                or m.probe_pending(self.holdoff_runs)):
            return None
        pts = [(x, loss) for x, loss, b in self._curve if b == current.global_batch][-8:]
        if len(pts) < 8 or fit_log_curve(pts) is None:
            return None
        batch = r * a * (k + 1)
        ok = np.flatnonzero((r == current.replicas) & (batch >= 1.5 * current.global_batch)
                            & (batch <= 2 * current.global_batch))
        if ok.size == 0:
            return None
        return int(ok[int(np.argmax(g[ok]))]), "the loss is falling"

    def _prior_share(self, cfg: Config) -> float:
        """How much of the predicted step at ``cfg`` rests on a guess: the fraction by which
        it would grow were the sync of a placement kind the job never ran at (several
        replicas in one node / across nodes) twice the prior's guess (the overlap with
        compute included); 0 where the job ran at that kind, or for one replica (no sync)."""
        n = int(self.bounds.nodes_for(cfg.replicas))
        if cfg.replicas <= 1 or any((nn > 1) == (n > 1) and r > 1
                                    for (nn, r, _, _) in self._measured):
            return 0.0
        p = self.params
        q = replace(p, **({"alpha_inter": 2 * p.alpha_inter, "beta_inter": 2 * p.beta_inter}
                          if n > 1 else
                          {"alpha_intra": 2 * p.alpha_intra, "beta_intra": 2 * p.beta_intra}))
        t = float(step_time(p, n, cfg.replicas, cfg.local_batch, cfg.accum_steps))
        t2 = float(step_time(q, n, cfg.replicas, cfg.local_batch, cfg.accum_steps))
        return t2 / max(t, 1e-12) - 1.0

    def _corrections(self) -> dict:
        """Per replica count the job has run at: the mean ratio of the model's step time to
        the measured one, over the configurations seen there at least twice (one report may
        hold a warm-up step). Multiplying a predicted goodput there by it corrects the model
        by what was measured."""
        ratios: dict = {}
        for (n, r, a, k), m in self._measured.items():
            if m.count >= 2:
                t_pred = float(step_time(self.params, n, r, a, k))
                ratios.setdefault(r, []).append(t_pred / max(m.step_sum / m.count, 1e-12))
        return {r: float(np.mean(x)) for r, x in ratios.items()}

    @staticmethod
    def _measured_goodputs(r, a, k, g, corr: dict) -> dict:
        """Per replica count the job has run at, the best goodput among the candidates there
        (arrays ``r, a, k`` with model goodputs ``g``), corrected by what was measured there
        (``corr``): {replicas: (goodput, Config)}. A count is judged at the batch that suits
        today's gradient statistics, not at the batches it happened to run (set by older
        ones): a count measured at a batch the noise scale has since outgrown is not worse
        for it."""
        best: dict = {}
        for count, c in corr.items():
            at = np.flatnonzero(r == count)
            if at.size:
                i = at[int(np.argmax(g[at]))]
                best[count] = (float(g[i]) * c, Config(count, int(a[i]), int(k[i])))
        return best

    def _was_measured(self, cfg: Config) -> bool:
        key = (int(self.bounds.nodes_for(cfg.replicas)), cfg.replicas, cfg.local_batch,
               cfg.accum_steps)
        return key in self._measured

    def _move(self, d: Decision) -> Decision:
        if d.changes_replicas:
            self._moves.record(d.current.replicas, d.config.replicas, self.holdoff_runs)
        return d
