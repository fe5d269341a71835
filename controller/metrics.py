"""Prometheus metrics of the controller, per job; served on ``/metrics`` by prometheus-client's
own HTTP server on its own port.

Labels. Every per-job series carries ``job_id`` (never ``job`` or ``instance``: Prometheus
sets those on every scraped series itself and renames a scraped ``job`` to ``exported_job``);
rejections add ``reason`` from a fixed set, with ``job_id`` '' when no job is known. No step
or rank labels: cardinality is one set of series per job.

Gauges of the last accepted report: ``adaptrun_goodput`` (goodput = throughput x efficiency,
B0-equivalent examples per second), ``adaptrun_throughput_examples_per_second``
(global_batch / step_time_s), ``adaptrun_statistical_efficiency`` (E(B) = (B_noise + B0) /
(B_noise + B), from ``adaptrun.science.efficiency``), ``adaptrun_noise_scale_examples``,
``adaptrun_global_batch_size``, ``adaptrun_local_batch_size``, ``adaptrun_accumulation_steps``,
``adaptrun_learning_rate``, ``adaptrun_workers`` (the world size that reported),
``adaptrun_last_report_timestamp_seconds`` (unix time it was accepted) and
``adaptrun_job_finished`` (1 once a report said the last epoch is done).

Gauges of the controller's view: ``adaptrun_workers_min`` / ``adaptrun_workers_max`` (the
bounds), ``adaptrun_workers_desired`` (what the actuator is moving the job to) and
``adaptrun_policy_wanted_workers`` (the count the policy would pick were the bounds widened to
[1, 2 x max]: above ``adaptrun_workers_max`` or below ``adaptrun_workers_min`` the bounds
hold the job back. The controller asks a copy of the job's policy while the job sits at a
bound, every 30 s at most; inside the bounds it is the policy's own choice). These two and
the last report's time appear once known, not as a misleading 0.

Counters ``adaptrun_reports_total``, ``adaptrun_resizes_total`` (worker-count changes
decided), ``adaptrun_rejected_reports_total{reason}``; histogram ``adaptrun_policy_seconds``.
No ``_created`` series: the registry drops them (they double the series count and no rule
or panel reads them). ``deploy/prometheus/rules.yml`` and ``deploy/grafana/adaptrun.json``
read these names. Each controller owns its registry, so several can live in one process.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from adaptrun.science.efficiency import efficiency
from adaptrun.science.report import Report

from .validation import REASONS

__all__ = ["Metrics", "report_figures", "ReportFigures"]

LABEL = "job_id"

_GAUGES = {
    "goodput": ("adaptrun_goodput",
                "Goodput: B0-equivalent examples per second (throughput x efficiency)"),
    "throughput": ("adaptrun_throughput_examples_per_second",
                   "Examples per second at the current configuration"),
    "efficiency": ("adaptrun_statistical_efficiency",
                   "Statistical efficiency E(B) = (B_noise + B0) / (B_noise + B), in (0, 1]"),
    "noise_scale": ("adaptrun_noise_scale_examples", "Gradient noise scale B_noise, examples"),
    "global_batch": ("adaptrun_global_batch_size", "Global batch, examples per optimizer step"),
    "local_batch": ("adaptrun_local_batch_size", "Local batch, examples per replica per micro-batch"),
    "accum_steps": ("adaptrun_accumulation_steps", "Extra micro-batches per optimizer step"),
    "lr": ("adaptrun_learning_rate", "Learning rate of the last report"),
    "workers": ("adaptrun_workers", "Worker processes (replicas) now"),
    "workers_min": ("adaptrun_workers_min", "Lower bound on the job's workers"),
    "workers_max": ("adaptrun_workers_max", "Upper bound on the job's workers"),
    "workers_desired": ("adaptrun_workers_desired",
                        "Workers the actuator is moving the job to"),
    "policy_wanted": ("adaptrun_policy_wanted_workers",
                      "Workers the policy would choose with the bounds widened to [1, 2 x max]"),
    "last_report": ("adaptrun_last_report_timestamp_seconds",
                    "Unix time of the job's last accepted report"),
    "finished": ("adaptrun_job_finished", "1 once a report said the job's last epoch is done"),
    "workers_allocated": ("adaptrun_workers_allocated",
                          "Workers the cluster allocation gives the job (0: queued)"),
    "queued_seconds": ("adaptrun_job_queued_seconds",
                       "Seconds the job has waited in the cluster's queue (0: not queued)"),
}
# Series that appear only once known: a 0 there would read as "wants 0 workers" or "last
# report in 1970" to an alert.
_SET_WHEN_KNOWN = frozenset({"workers_desired", "policy_wanted", "last_report",
                             "workers_allocated", "queued_seconds"})


class _NoCreatedRegistry(CollectorRegistry):
    """A registry whose counters and histograms carry no ``_created`` sample, whatever
    prometheus-client's process-wide setting (``disable_created_metrics``) says; and that
    calls ``before_collect`` first (the reports' figures are written to the gauges then)."""

    def __init__(self, before_collect=None):
        super().__init__()
        self._before_collect = before_collect

    def collect(self):
        if self._before_collect is not None:
            self._before_collect()
        for metric in super().collect():
            if metric.type in ("counter", "histogram", "summary"):
                created = metric.name + "_created"
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


@dataclass(frozen=True)
class ReportFigures:
    throughput_examples_per_s: float
    statistical_efficiency: float
    goodput: float
    noise_scale: float


def _efficiency(grad_sqr: float, grad_var: float, scale: float) -> float:
    """``adaptrun.science.efficiency.efficiency`` of one report, in plain Python: the same
    float64 arithmetic (numpy's scalar path costs ~40 us a call, this under 1 us)."""
    sqr = grad_sqr if grad_sqr > 0.0 else 0.0
    var = grad_var if grad_var > 0.0 else 0.0
    den = var / scale + sqr
    r = (var + sqr) / den if den > 0.0 else 1.0
    lo, hi = (scale, 1.0) if scale < 1.0 else (1.0, scale)
    r = lo if r < lo else hi if r > hi else r
    return r / scale


def report_figures(r: Report) -> ReportFigures:
    """What a report implies for the job now (pure)."""
    gb = r.global_batch
    throughput = gb / r.step_time_s
    scale = gb / r.init_batch
    if math.isfinite(r.grad_sqr) and math.isfinite(r.grad_var) and scale > 0.0:
        eff = _efficiency(r.grad_sqr, r.grad_var, scale)
    else:     # not from a validated report: numpy's answer for NaN and inf
        eff = float(efficiency(r.grad_sqr, r.grad_var, scale))
    return ReportFigures(throughput, eff, throughput * eff, r.noise_scale)


class _JobChildren:
    """The labelled children of one job, looked up once (labels() is not free); and the
    job's newest report, written to its gauges when /metrics is read."""

    def __init__(self, m: "Metrics", job_id: str):
        self.gauges = {k: g.labels(job_id) for k, g in m.gauges.items()
                       if k not in _SET_WHEN_KNOWN}
        self.resizes = m.resizes.labels(job_id)
        self.reports = m.reports.labels(job_id)
        self.policy_seconds = m.policy_seconds.labels(job_id)
        self.latest: tuple | None = None       # (report, figures, unix time accepted)
        self.published: tuple | None = None    # the one the gauges show
        self.reports_seen = 0                  # written by observe_report only
        self.reports_published = 0             # written by Metrics.flush only


class Metrics:
    def __init__(self):
        self.registry = _NoCreatedRegistry(before_collect=self.flush)
        r = self.registry
        self.gauges = {k: Gauge(name, doc, [LABEL], registry=r) for k, (name, doc) in _GAUGES.items()}
        self.resizes = Counter("adaptrun_resizes", "Worker-count changes decided", [LABEL],
                               registry=r)
        self.reports = Counter("adaptrun_reports", "Reports accepted", [LABEL], registry=r)
        self.rejected = Counter("adaptrun_rejected_reports",
                                "Reports and registrations rejected, by reason (job_id '' = none "
                                "known)", [LABEL, "reason"], registry=r)
        self.policy_seconds = Histogram(
            "adaptrun_policy_seconds", "Time of one policy run (observe + decide)", [LABEL],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r)
        self.cluster: dict | None = None      # made by the first set_cluster (--capacity)
        self._children: dict[str, _JobChildren] = {}
        self._flush_lock = threading.Lock()
        self._http = None
        self._http_thread = None

    def job(self, job_id: str) -> _JobChildren:
        c = self._children.get(job_id)
        if c is None:
            c = self._children[job_id] = _JobChildren(self, job_id)
            for reason in REASONS:   # every series exists from the start, at 0 (rate() works)
                self.rejected.labels(job_id, reason)
        return c

    def set_bounds(self, job_id: str, min_workers: int, max_workers: int) -> None:
        c = self.job(job_id)
        c.gauges["workers_min"].set(min_workers)
        c.gauges["workers_max"].set(max_workers)

    def _gauge(self, job_id: str, key: str):
        gauges = self.job(job_id).gauges
        g = gauges.get(key)
        if g is None:
            g = gauges[key] = self.gauges[key].labels(job_id)
        return g

    def set_workers_desired(self, job_id: str, workers: int) -> None:
        self._gauge(job_id, "workers_desired").set(workers)

    def set_cluster(self, capacity: int, used: int, queued: int) -> None:
        """The cluster allocation's figures; the series exist only under a capacity."""
        if self.cluster is None:
            self.cluster = {k: Gauge(name, doc, registry=self.registry) for k, (name, doc) in {
                "capacity": ("adaptrun_cluster_capacity_gpus",
                             "GPUs the cluster allocation shares"),
                "used": ("adaptrun_cluster_allocated_gpus", "GPUs allocated to jobs"),
                "queued": ("adaptrun_cluster_queued_jobs", "Jobs waiting for their minimum"),
            }.items()}
        self.cluster["capacity"].set(capacity)
        self.cluster["used"].set(used)
        self.cluster["queued"].set(queued)

    def set_allocated(self, job_id: str, workers: int, queued_s: float) -> None:
        self._gauge(job_id, "workers_allocated").set(workers)
        self._gauge(job_id, "queued_seconds").set(queued_s)

    def set_policy_wanted(self, job_id: str, workers: int) -> None:
        self._gauge(job_id, "policy_wanted").set(workers)

    def observe_report(self, r: Report, figures: ReportFigures) -> None:
        """An accepted report: kept as the job's newest; its values reach the gauges and
        ``adaptrun_reports_total`` when the registry is collected (``flush``), so a report
        costs a few assignments, not a dozen locked metric updates. Calls for one job are
        serialised by the caller (``ControllerCore.ingest`` holds the job's lock)."""
        c = self._children.get(r.job_id)
        if c is None:
            c = self.job(r.job_id)
        c.latest = (r, figures, time.time())
        c.reports_seen += 1
        if r.finished:
            c.gauges["finished"].set(1)

    def flush(self) -> None:
        """Write each job's newest report to its gauges and count its reports (before a
        collection: a scrape, ``registry.collect()``)."""
        with self._flush_lock:
            for job_id, c in list(self._children.items()):
                seen = c.reports_seen
                if seen != c.reports_published:
                    c.reports.inc(seen - c.reports_published)
                    c.reports_published = seen
                latest = c.latest
                if latest is None or latest is c.published:
                    continue
                r, figures, accepted_s = latest
                g = c.gauges
                g["goodput"].set(figures.goodput)
                g["throughput"].set(figures.throughput_examples_per_s)
                g["efficiency"].set(figures.statistical_efficiency)
                g["noise_scale"].set(figures.noise_scale)
                g["global_batch"].set(r.global_batch)
                g["local_batch"].set(r.local_batch)
                g["accum_steps"].set(r.accum_steps)
                g["lr"].set(r.lr)
                g["workers"].set(r.world_size)
                if self._children.get(job_id) is c:      # not forgotten meanwhile
                    self._gauge(job_id, "last_report").set(accepted_s)
                c.published = latest

    def rejected_report(self, job_id: str, reason: str) -> None:
        # job_id is '' or a registered job: never a string an attacker picked freely.
        self.rejected.labels(job_id, reason).inc()

    def forget(self, job_id: str) -> None:
        self._children.pop(job_id, None)
        for m in (*self.gauges.values(), self.resizes, self.reports, self.policy_seconds):
            try:
                m.remove(job_id)
            except KeyError:
                pass
        for reason in REASONS:
            try:
                self.rejected.remove(job_id, reason)
            except KeyError:
                pass

    # -- the /metrics endpoint -----------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start /metrics on host:port (0 = any free port); return the port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(timeout=5)
            self._http = None


