"""The controller's decisions over its state, independent of gRPC.

``ControllerCore`` owns the job registry, the metrics and the actuator, and does four
things: registers agents (creating a job and its ``Policy`` on first contact), ingests
reports (validated whole, rate limited per job, queued for the policy: ingestion does no
policy work), runs each job's policy on a cadence (``PolicyLoop``: every
``policy_interval_s`` when new reports arrived, at once after ``adaptrun scale``) and applies
a decision: a new directive with the next generation for the job's agents, and, when the
worker count changes, ``actuator.set_workers``. Every decision that changes something is
logged with its reason and predicted goodput gain.

While a directive is being applied (the job's reports still show the old configuration) the
policy observes but does not decide again, for at most ``settle_timeout_s``; otherwise it
would issue the same move once per cadence. A failure in one job's policy is logged and
leaves that job at its configuration; it never touches another job.

With ``state_dir`` the core keeps each job's lasting state there (``state_store``): every
change marks the job, a writer thread saves it (throttled, atomic, off the request path), and
a new core loads every job at start, so a restarted controller resumes each job where it was.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import grpc
import numpy as np

from adaptrun.science.allocation import Allocation, Cluster, JobDemand, allocate
from adaptrun.science.policy import (BoundsError, Config, Decision, JobBounds, Policy,
                                     bounds_from_script)

from .actuators import Actuator, ActuatorError
from .heap import CollectionPacer
from .metrics import Metrics, report_figures
from .ratelimit import TokenBucket
from .registry import Agent, Directive, Job, JobRegistry, RegistryFull, job_from_state, job_state
from .state_store import StateStore
from .validation import Malformed, Rejection, check_registration, report_from_proto

__all__ = ["ControllerConfig", "ControllerCore", "PolicyLoop"]

log = logging.getLogger("adaptrun.controller")


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 0                       # 0: any free port (the server reports it)
    metrics_port: int | None = 0        # None: no /metrics server
    max_threads: int = 64               # threads for blocking work (SetBounds runs the policy)
    max_concurrent_rpcs: int = 65536    # calls in progress at once; beyond, RESOURCE_EXHAUSTED
    policy_interval_s: float = 5.0      # cadence of each job's policy
    tick_s: float = 0.25                # how often the policy loop looks for due jobs
    report_interval_s: float = 2.0      # what agents are asked for
    report_rate_per_s: float = 20.0     # per job, sustained; more is a flood
    report_burst: int = 40
    max_report_bytes: int = 16 * 1024   # a report is ~150 bytes
    max_message_bytes: int = 1 << 20    # gRPC's own limit on any request
    max_jobs: int = 1000
    resize_cost_s: float = 30.0
    settle_timeout_s: float = 60.0
    actuator: str = "local"
    actuator_options: dict | None = None  # keyword options of the actuator's factory
    rdzv_port: int | None = 0           # the jobs' rendezvous store (0: any free port; None: none)
    rdzv_advertise: str = ""            # host agents use for it ("": the controller's host)
    state_dir: str | None = None        # jobs' lasting state, for restarts (None: kept nowhere)
    state_write_interval_s: float = 0.5   # per job, at most one state write this often
    capacity: str = ""                  # the GPUs, NODESxGPUS ("": the actuator's, if any)
    allocation_interval_s: float = 30.0   # how often the cluster allocation runs
    allocation_p: float = -1.0          # its fairness (science.allocation)
    allocation_horizon_s: float = 600.0


def config_of(report) -> Config:
    return Config(report.world_size, report.local_batch, report.accum_steps)


class ControllerCore:
    # The widened-bounds ask costs about two decisions; the alerts that read it wait 15 min.
    WANTED_REFRESH_S = 30.0

    def __init__(self, config: ControllerConfig, actuator: Actuator, metrics: Metrics,
                 clock=time.monotonic):
        self.config = config
        self.actuator = actuator
        self.metrics = metrics
        self.clock = clock
        self.registry = JobRegistry(config.max_jobs)
        self.rdzv_endpoint = ""           # the store the server hosts, as agents are told
        # Called with the job id after every new directive, from the issuing thread, outside
        # the job's locks (the gRPC service wakes that job's directive streams with it).
        self.directive_listeners: list[Callable[[str], None]] = []
        self._wanted_time_s: dict[str, float] = {}   # job -> last widened-bounds policy ask
        self.cluster = Cluster.parse(config.capacity) if config.capacity else None
        self.allocation: Allocation | None = None
        self._last_allocation_s = -math.inf
        self._allocation_due = False
        if self.cluster is not None:
            metrics.set_cluster(self.cluster.capacity, 0, 0)
        else:
            self._follow_capacity()
        bind = getattr(actuator, "bind", None)   # its notices and bounds come from here
        if bind is not None:
            bind(self.actuator_notice, self.job_bounds)
        self.state: StateStore | None = None
        if config.state_dir:
            self.state = StateStore(config.state_dir, self._job_state,
                                    config.state_write_interval_s)
            n = self.state.load(self._restore_job)
            log.info("state dir %s: %d job(s) restored", config.state_dir, n)

    # -- the state dir -------------------------------------------------------------------
    def _job_state(self, job_id: str) -> dict | None:
        job = self.registry.job(job_id)
        return None if job is None else job_state(job, self.clock(), time.time())

    def _restore_job(self, state: dict) -> None:
        c = self.config
        job = job_from_state(state, lambda b: Policy(b, resize_cost_s=c.resize_cost_s),
                             TokenBucket(c.report_rate_per_s, c.report_burst), self.clock(),
                             time.time())
        if not self.registry.restore(job):
            log.warning("job %s from the state dir not restored: the controller tracks %d "
                        "jobs already", job.job_id, self.config.max_jobs)
            return
        self.metrics.job(job.job_id)
        self.metrics.set_bounds(job.job_id, job.bounds.min_replicas, job.bounds.max_replicas)
        stats = job.policy._stats
        noise = ("%.0f" % (job.bounds.init_batch * max(stats[1], 0.0) / stats[0])
                 if stats else "none yet")
        log.info("job %s restored: generation %d, %d measured configuration(s), noise scale "
                 "%s, resize cost %.2f s%s", job.job_id, job.generation,
                 len(job.policy.samples()), noise, job.policy.resize_cost_s,
                 " (done)" if job.done else "")
        if job.done:
            self._job_done(job)

    def _changed(self, job: Job) -> None:
        """Save the job's state soon (no I/O here)."""
        if self.state is not None:
            self.state.mark(job.job_id)

    def close(self) -> None:
        """Write what is still unsaved and release the state dir."""
        if self.state is not None:
            self.state.close()

    def actuator_notice(self, job_id: str, text: str) -> None:
        """A line from the actuator for the job's user (an unmet scale, a pod the cluster
        removed); the actuator logs it. A job not (yet) registered gets nothing."""
        job = self.registry.job(job_id)
        if job is not None:
            with job.changed:
                job.notice(text)
            self._changed(job)

    def job_bounds(self, job_id: str) -> tuple[int, int] | None:
        job = self.registry.job(job_id)
        if job is None:
            return None
        with job.changed:
            return job.bounds.min_replicas, job.bounds.max_replicas

    # -- agents --------------------------------------------------------------------------
    def register(self, req) -> tuple[Job, Agent]:
        bounds, caps = check_registration(req)
        c = self.config

        def make_job() -> Job:
            return Job(req.job_id, bounds, Policy(bounds, resize_cost_s=c.resize_cost_s),
                       TokenBucket(c.report_rate_per_s, c.report_burst), caps=caps,
                       arrival_s=self.clock())
        try:
            job, agent, created = self.registry.register(req.job_id, req.node, req.slots,
                                                         req.address, make_job)
        except RegistryFull as exc:
            raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid",
                            f"{exc}; cannot add job {req.job_id!r}") from None
        with job.changed:
            # Generations stay monotonic across a controller restart: agents bring theirs.
            raised = req.last_generation > job.generation
            job.generation = max(job.generation, req.last_generation)
        if created or raised:
            self._changed(job)
        if created:
            self.metrics.job(job.job_id)
            self.metrics.set_bounds(job.job_id, bounds.min_replicas, bounds.max_replicas)
            desired = self.actuator.current_workers(job.job_id)
            if desired is not None:
                self.metrics.set_workers_desired(job.job_id, desired)
            log.info("job %s registered by node %s (%d slots): workers [%d, %d]; batch limits "
                     "from the script (caps: %s)", job.job_id, req.node, req.slots,
                     bounds.min_replicas, bounds.max_replicas, caps)
            self._allocation_due = True
        if req.wants_to_join and not created:
            self._readmit(job, req.node)
        return job, agent

    # A node that waits to join asks every few seconds; one re-admission per this interval.
    READMIT_INTERVAL_S = 5.0

    def _readmit(self, job: Job, node: str) -> None:
        """``node`` waits to join a job that runs short of its size (its pod was restarted
        after a failure, and the survivors re-formed without it): issue the job's current
        configuration again as a new generation, so the survivors re-form with the node. A job
        at its size, a directive still being applied, or a done job: nothing (the policy
        decides whether the job grows)."""
        with job.policy_lock:
            now = self.clock()
            with job.changed:
                d, rep = job.directive, job.last_report
                if job.done or rep is None or now - job.readmit_time_s < self.READMIT_INTERVAL_S:
                    return
                target = d.world_size if d is not None and d.world_size > 0 else (
                    self.actuator.current_workers(job.job_id) or rep.world_size)
                applying = (d is not None and rep.generation < d.generation
                            and now - job.directive_time_s < self.config.settle_timeout_s)
                if rep.world_size >= target or applying:
                    return
                job.readmit_time_s = now
            config = (Config(target, d.local_batch, d.accum_steps) if d is not None
                      and d.global_batch > 0 else Config(target, 0, 0))
            reason = (f"node {node} waits to join: the job runs {rep.world_size} of its "
                      f"{target} workers, re-form with it")
            directive = self.issue_directive(job, config, reason)
        log.info("job %s generation %d: %s", job.job_id, directive.generation, reason)

    # -- reports -------------------------------------------------------------------------
    def ingest(self, agent: Agent, msg) -> tuple[Job, int]:
        """Accept one report of ``agent``'s stream; return the job and its generation.

        Raise ``Rejection`` (counted in the metrics, against the agent's job) when bad.
        """
        job = self.registry.job(agent.job_id)
        try:
            if job is None:
                raise Rejection(grpc.StatusCode.NOT_FOUND, "unknown_job",
                                f"job {agent.job_id!r} is no longer known; register again")
            if isinstance(msg, Malformed):
                raise msg.rejection
            now = self.clock()
            with job.changed:
                allowed = job.bucket.take(now)
            if not allowed:
                raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited",
                                f"job {job.job_id!r} sent reports faster than "
                                f"{self.config.report_rate_per_s:g}/s (burst "
                                f"{self.config.report_burst}); report every "
                                f"{self.config.report_interval_s:g} s")
            if msg.job_id != job.job_id and self.registry.job(msg.job_id) is None:
                raise Rejection(grpc.StatusCode.NOT_FOUND, "unknown_job",
                                f"report for unknown job {msg.job_id[:80]!r}; an agent must "
                                f"register the job first")
            report = report_from_proto(msg, job_id=job.job_id)
        except Rejection as r:
            self.count_rejection(agent.job_id if job is not None else "", r)
            raise
        figures = report_figures(report)
        finished_now = False
        with job.changed:
            job.pending.append(report)
            job.last_report = report
            job.last_report_time_s = now
            job.accepted += 1
            if report.metric_name:
                job.metric_name, job.metric = report.metric_name, report.metric
            if report.finished and not job.done:
                job.done = finished_now = True
                job.notice(f"job finished at step {report.step} (epoch {report.epoch})")
                log.info("job %s finished at step %d", job.job_id, report.step)
                self._changed(job)
            self.metrics.observe_report(report, figures)
            generation = job.generation
        if finished_now:
            self._job_done(job)
        return job, generation

    def _job_done(self, job: Job) -> None:
        """Tell the actuator (a StatefulSet goes to 0 replicas); never fails the caller. Its
        workers go back to the cluster at the next tick."""
        self._allocation_due = True
        try:
            self.actuator.job_done(job.job_id)
        except Exception:  # noqa: BLE001 - the actuator's bug must not reject a report
            log.exception("job %s: the %s actuator failed on the job's end", job.job_id,
                          self.actuator.name)

    def count_rejection(self, job_label: str, r: Rejection) -> None:
        self.metrics.rejected_report(job_label, r.reason)
        job = self.registry.job(job_label) if job_label else None
        if job is not None:
            with job.changed:
                job.rejected += 1
                job.notice(f"a report was rejected ({r.reason}): {r.message}")
        log.debug("rejected (%s) for job %r: %s", r.reason, job_label, r.message)

    # -- decisions -----------------------------------------------------------------------
    def issue_directive(self, job: Job, config: Config, reason: str) -> Directive:
        """Make ``config`` the job's directive, with the next generation; wake watchers
        (``job.changed``'s waiters and every ``directive_listeners`` callback)."""
        with job.changed:
            job.generation += 1
            d = Directive(job.job_id, job.generation, config.replicas, config.global_batch,
                          config.local_batch, config.accum_steps, reason)
            job.directive = d
            job.directive_time_s = self.clock()
            job.last_decision = reason
            job.changed.notify_all()
        self._changed(job)
        for listener in list(self.directive_listeners):
            try:
                listener(job.job_id)
            except Exception:  # noqa: BLE001 - a listener's bug must not undo the decision
                log.exception("a directive listener failed for job %s", job.job_id)
        return d

    def _awaiting_directive(self, job: Job, now: float) -> bool:
        d, rep = job.directive, job.policy.last_report
        if d is None or rep is None or now - job.directive_time_s > self.config.settle_timeout_s:
            return False
        return config_of(rep) != Config(d.world_size, d.local_batch, d.accum_steps)

    def run_policy(self, job: Job, force: bool = False) -> Decision | None:
        """Observe the job's queued reports and decide, if due (or ``force``: bounds changed,
        decide now even while a directive is in flight); apply the decision."""
        with job.policy_lock:
            now = self.clock()
            with job.changed:
                due = force or job.policy_due or (
                    job.pending and now - job.last_policy_time_s >= self.config.policy_interval_s)
                if not due:
                    return None
                reports = list(job.pending)
                job.pending.clear()
                job.policy_due = False
                job.last_policy_time_s = now
            if not reports and job.policy.last_report is None:
                return None
            if reports:
                # Saved after this run: the writer's snapshot waits for ``policy_lock``.
                self._changed(job)
            t0 = time.perf_counter()
            try:
                for r in reports:
                    self._take_script_limits(job, r)
                    self._take_resize_gap(job, r)
                    job.policy.observe(r)
                if job.done:
                    return None
                # A forced run (new bounds) decides even while a directive is in flight.
                awaiting = not force and self._awaiting_directive(job, now)
                decision = None if awaiting else job.policy.decide()
            except Exception as exc:  # noqa: BLE001 - one job's policy must not stop the loop
                if str(exc) != job.policy_error:
                    log.warning("job %s: policy failed, keeping the configuration: %s",
                                job.job_id, exc)
                job.policy_error = str(exc)
                return None
            finally:
                self.metrics.job(job.job_id).policy_seconds.observe(time.perf_counter() - t0)
            job.policy_error = ""
            self._export_worker_targets(job, decision, force)
            if decision is None:
                return None
            if (decision.changes_replicas or decision.changes_batch
                    or self._directive_differs(job, decision.config)):
                self._apply(job, decision)
            else:
                with job.changed:
                    job.last_decision = decision.reason
            return decision

    @staticmethod
    def _directive_differs(job: Job, config: Config) -> bool:
        """The directive in force asks for another configuration than the one decided (say,
        a move that never happened: the bounds changed, the joiners never came). The job
        already runs the decided one, so nothing moves, but the directive must say so: a node
        that registers learns the job's size from it."""
        with job.changed:
            d = job.directive
        return d is not None and (d.world_size, d.local_batch, d.accum_steps) != (
            config.replicas, config.local_batch, config.accum_steps)

    def _export_worker_targets(self, job: Job, decision: Decision | None, force: bool) -> None:
        """For the alerts: the count the actuator is moving the job to, and the count the
        policy wants. Only a job at a bound can be held back by it: there the policy is asked
        again with the worker bounds widened to [1, 2 x max] (a deep copy, so the job's own
        policy keeps its hold-off state), at most every ``WANTED_REFRESH_S`` unless the
        bounds just changed; inside the bounds its own decision is what it wants. Runs with
        the policy, under ``policy_lock``; a failure here is logged, never the loop's end."""
        try:
            rep = job.policy.last_report
            desired = self.actuator.current_workers(job.job_id)
            if desired is None and rep is not None:
                desired = rep.world_size
            if desired is not None:
                self.metrics.set_workers_desired(job.job_id, desired)
            if rep is None:
                return
            b = job.policy.bounds
            if not (rep.world_size >= b.max_replicas
                    or b.min_replicas > 1 and rep.world_size <= b.min_replicas):
                if decision is not None:
                    self.metrics.set_policy_wanted(job.job_id, decision.config.replicas)
                return
            now = self.clock()
            if not force and now - self._wanted_time_s.get(job.job_id, -math.inf) \
                    < self.WANTED_REFRESH_S:
                return
            self._wanted_time_s[job.job_id] = now
            wide = replace(b, min_replicas=1, max_replicas=2 * b.max_replicas)
            wanted = copy.deepcopy(job.policy).with_bounds(wide).decide().config.replicas
            self.metrics.set_policy_wanted(job.job_id, wanted)
        except Exception as exc:  # noqa: BLE001 - a view for the alerts, never the loop's end
            log.debug("job %s: no policy view for the metrics: %s", job.job_id, exc)

    def _take_script_limits(self, job: Job, r) -> None:
        """The script declares B0 and its batch limits in its reports: the job's bounds are
        those within the launcher's caps (each disagreeing flag said once, as a notice)."""
        bounds, notes = bounds_from_script(job.bounds, job.caps, r)
        with job.changed:
            for note in notes:
                if job.notice(note):
                    log.warning("job %s: %s", job.job_id, note)
            if bounds == job.bounds:
                return
            job.bounds = bounds
        job.policy = job.policy.with_bounds(self._policy_bounds(job))
        log.info("job %s: batch limits from the script: B0 %d, max batch %d, local batch "
                 "[%d, %d], accumulation %s", job.job_id, bounds.init_batch, bounds.max_batch,
                 bounds.local_batch_min, bounds.local_batch_max,
                 "up to %d" % bounds.max_accum_steps if bounds.max_accum_steps else "off")

    def _take_resize_gap(self, job: Job, r) -> None:
        """A measured planned re-form: the policy weighs the median of the last five."""
        if math.isnan(r.resize_gap_s):
            return
        with job.changed:
            job.resize_gaps.append(r.resize_gap_s)
            cost = statistics.median(job.resize_gaps[-5:])
            job.notice(f"re-form to {r.world_size} workers took {r.resize_gap_s:.2f} s (last "
                       f"step of the old world to the first of the new, measured at step "
                       f"{r.step}); the policy now counts {cost:.2f} s per resize")
        job.policy.resize_cost_s = cost

    def _apply(self, job: Job, d: Decision) -> None:
        gain = d.predicted_gain
        reason = (f"{d.reason} [predicted goodput {d.goodput_current:.1f} -> "
                  f"{d.goodput_chosen:.1f}, {gain:+.1%}]")
        # The worker count to move from is what the actuator is moving the job to: right
        # after a resize the last report may still come from the old world.
        before = self.actuator.current_workers(job.job_id)
        before = d.current.replicas if before is None else before
        directive = self.issue_directive(job, d.config, reason)
        log.info("job %s generation %d: %s -> %s: %s", job.job_id, directive.generation,
                 d.current.describe(), d.config.describe(), reason)
        if d.config.replicas != before:
            self._set_workers(job, d.config.replicas)

    def _set_workers(self, job: Job, workers: int) -> None:
        with job.changed:
            job.resizes += 1
        self.metrics.job(job.job_id).resizes.inc()
        try:
            self.actuator.set_workers(job.job_id, workers)
            self.metrics.set_workers_desired(job.job_id, workers)
        except (ActuatorError, OSError) as exc:
            log.error("job %s: the %s actuator could not move to %d workers: %s",
                      job.job_id, self.actuator.name, workers, exc)
            job.policy_error = f"actuator: {exc}"
            with job.changed:
                job.notice(f"the {self.actuator.name} actuator could not move the job to "
                           f"{workers} workers: {exc}")

    def tick(self) -> None:
        """Run the policies that are due: every job whose bounds changed, and of the others
        at most a fair share per tick (``jobs * tick_s / policy_interval_s``), the longest
        waiting first. Each job still runs about every ``policy_interval_s``, but jobs that
        became due together (a controller start, a batch of submissions, 100 jobs whose
        agents connected in the same second) spread over the interval instead of running in
        one burst: 100 policy runs at once held the GIL from the event loop that reads the
        reports for half a second, which every report in flight then waited out."""
        now = self.clock()
        if not self.config.capacity:
            self._follow_capacity()
        if self.cluster is not None and (
                self._allocation_due
                or now - self._last_allocation_s >= self.config.allocation_interval_s):
            self._allocation_due = False
            self.allocate_cluster()
        jobs = [j for j in self.registry.jobs() if not j.done and j.allocated != 0]
        interval = self.config.policy_interval_s
        forced = [j for j in jobs if j.policy_due]
        waiting = sorted((j for j in jobs if not j.policy_due and j.pending
                          and now - j.last_policy_time_s >= interval),
                         key=lambda j: j.last_policy_time_s)
        share = max(1, math.ceil(len(jobs) * self.config.tick_s / max(interval, 1e-9)))
        for job in forced + waiting[:share]:
            self.run_policy(job)

    # -- operators -----------------------------------------------------------------------
    def set_bounds(self, job_id: str, min_workers: int, max_workers: int) -> Job:
        job = self.registry.job(job_id)
        if job is None:
            known = ", ".join(sorted(j.job_id for j in self.registry.jobs())[:20]) or "none"
            raise Rejection(grpc.StatusCode.NOT_FOUND, "unknown_job",
                            f"no job {job_id[:80]!r}; known jobs: {known}")
        with job.policy_lock:
            try:
                bounds = replace(job.bounds, min_replicas=min_workers,
                                 max_replicas=max_workers).validate()
            except BoundsError as exc:
                raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(exc)) from None
            job.bounds = bounds
            job.policy = job.policy.with_bounds(self._policy_bounds(job))
            has_reports = job.policy.last_report is not None or bool(job.pending)
        self.metrics.set_bounds(job_id, min_workers, max_workers)
        self._changed(job)
        self._allocation_due = True
        log.info("job %s: bounds now [%d, %d] workers", job_id, min_workers, max_workers)
        if job.allocated != 0:      # a queued job moves when the allocation admits it
            self._follow_bounds(job, has_reports)
        return job

    def _follow_bounds(self, job: Job, has_reports: bool) -> None:
        """The job's policy bounds changed: decide within them now, or, with no report to
        plan from, move the worker count into them."""
        b = job.policy.bounds
        min_workers, max_workers = b.min_replicas, b.max_replicas
        job_id = job.job_id
        if has_reports:
            self.run_policy(job, force=True)
        else:
            cur = self.actuator.current_workers(job_id)
            if cur is not None and not min_workers <= cur <= max_workers:
                # No report yet, so no configuration to plan from: the directive moves only
                # the worker count (batch 0 = keep the script's), and it exists before the
                # actuator starts any agent, so a new agent learns it when it registers.
                target = min(max(cur, min_workers), max_workers)
                self.issue_directive(job, Config(target, 0, 0),
                                     f"bounds [{min_workers}, {max_workers}]: move to {target} "
                                     f"workers")
                self._set_workers(job, target)

    # -- the cluster allocation ----------------------------------------------------------
    def _follow_capacity(self) -> None:
        """Without ``capacity`` in the config, the actuator's (``Actuator.capacity``): a new
        value makes the allocation due at once; None (unknown) keeps the one in force."""
        capacity = getattr(self.actuator, "capacity", None)
        cluster = capacity() if capacity is not None else None
        if cluster is None or cluster == self.cluster:
            return
        log.info("cluster capacity from the %s actuator: %d GPUs (%d x %d; was %s)",
                 self.actuator.name, cluster.capacity, cluster.nodes, cluster.gpus_per_node,
                 self.cluster.capacity if self.cluster is not None else "none")
        self.cluster = cluster
        self._allocation_due = True       # the allocation sets the cluster gauges

    @staticmethod
    def _policy_bounds(job: Job) -> JobBounds:
        """The job's bounds with its allocation as the upper bound on workers."""
        b = job.bounds
        if 0 < job.allocated < b.max_replicas:
            return replace(b, max_replicas=max(job.allocated, b.min_replicas))
        return b

    def allocate_cluster(self) -> Allocation | None:
        """Share the capacity among the jobs by goodput (``science.allocation``): each job's
        goodput at every count in its bounds from its own policy (a job that has measured
        nothing yet asks for its minimum), its current count, its measured resize cost and
        its age; then each job's policy plans within what it got, and a job that got none is
        queued (its workers go to 0, its state stays here) until it is admitted."""
        if self.cluster is None:
            return None
        now = self.clock()
        for j in self.registry.jobs():
            if j.done and j.allocated > 0:
                # A finished job holds no GPUs: its workers are the others' now (in status
                # and in adaptrun_workers_allocated, whose sum over jobs is the used GPUs).
                with j.changed:
                    j.allocated = 0
                self.metrics.set_allocated(j.job_id, 0, 0.0)
        jobs = [j for j in self.registry.jobs() if not j.done]
        demands = []
        for j in jobs:
            with j.policy_lock:
                b = j.bounds
                curve = j.policy.goodput_by_workers(b.max_replicas)
                rep = j.policy.last_report
                cost = j.policy.resize_cost_s
            current = j.allocated
            if current < 0:     # before its first allocation: what it runs now
                known = self.actuator.current_workers(j.job_id)
                current = known if known is not None else rep.world_size if rep else 0
            hi = b.max_replicas
            if curve is None or not curve[b.min_replicas] > 0:
                hi = min(max(current, b.min_replicas), b.max_replicas)
                curve = np.arange(hi + 1, dtype=float)
            demands.append(JobDemand(j.job_id, tuple(curve[:hi + 1]), b.min_replicas, hi,
                                     current=min(current, hi), arrival=j.arrival_s,
                                     resize_cost_s=cost, age_s=now - j.arrival_s))
        try:
            a = allocate(demands, self.cluster, p=self.config.allocation_p,
                         horizon_s=self.config.allocation_horizon_s,
                         previous=self.allocation.nodes if self.allocation else None)
        except Exception as exc:  # noqa: BLE001 - the allocation never stops the loop
            log.error("cluster allocation failed, keeping the last one: %s", exc)
            return self.allocation
        self.allocation = a
        self._last_allocation_s = now
        for j in jobs:
            self._take_allocation(j, a, now)
        used = sum(a.workers.values())
        self.metrics.set_cluster(self.cluster.capacity, used, len(a.queued))
        return a

    def _take_allocation(self, job: Job, a: Allocation, now: float) -> None:
        n = a.workers.get(job.job_id, 0)
        waited = now - job.queued_since_s if n == 0 and job.allocated == 0 else 0.0
        self.metrics.set_allocated(job.job_id, n, waited)
        if n == job.allocated:
            return
        was = job.allocated
        with job.policy_lock:
            with job.changed:
                job.allocated = n
                if n == 0:
                    job.queued_since_s = now
                    job.notice(f"queued: the cluster's {self.cluster.capacity} GPUs are "
                               f"allocated; the job starts when {job.bounds.min_replicas} "
                               f"are free (position {a.queued.index(job.job_id) + 1})")
                else:
                    job.queued_since_s = float("nan")
                has_reports = job.policy.last_report is not None or bool(job.pending)
            if n > 0:
                job.policy = job.policy.with_bounds(self._policy_bounds(job))
        self._changed(job)
        log.info("job %s: allocated %d workers (was %s)", job.job_id, n,
                 "none" if was < 0 else was)
        if n == 0:
            self._set_workers(job, 0)
        elif was == 0:
            self._set_workers(job, min(n, max(job.bounds.min_replicas, 1)))
        else:
            self._follow_bounds(job, has_reports)


class PolicyLoop:
    """A thread that runs due policies every ``tick_s`` until ``stop()``."""

    def __init__(self, core: ControllerCore):
        self.core = core
        self.collector = CollectionPacer()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptrun-policy", daemon=True)

    def start(self) -> "PolicyLoop":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.core.config.tick_s):
            try:
                registry = self.core.registry
                self.collector.tick(registry.agent_count(), registry.registrations)
                self.core.tick()
            except Exception:  # noqa: BLE001 - the loop outlives any one bug
                log.exception("policy loop iteration failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.collector.close()
