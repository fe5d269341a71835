"""Prometheus metrics of the controller, per job (label ``job`` only; rejections add
``reason`` from a fixed set). Served on ``/metrics`` by prometheus-client's own HTTP server
on its own port.

Gauges follow the last accepted report of the job; throughput is examples per second
(global_batch / step_time_s), statistical efficiency is E(B) = (B_noise + B0)/(B_noise + B)
from ``adaptrun.science.efficiency``, and goodput = throughput x efficiency (B0-equivalent examples
per second). Each controller owns a ``CollectorRegistry``, so several can live in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from adaptrun.science.efficiency import efficiency
from adaptrun.science.report import Report

from .validation import REASONS

__all__ = ["Metrics", "report_figures", "ReportFigures"]

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
}


@dataclass(frozen=True)
class ReportFigures:
    throughput_examples_per_s: float
    statistical_efficiency: float
    goodput: float
    noise_scale: float


def report_figures(r: Report) -> ReportFigures:
    """What a report implies for the job now (pure)."""
    throughput = r.global_batch / r.step_time_s
    eff = float(efficiency(r.grad_sqr, r.grad_var, r.global_batch / r.init_batch))
    return ReportFigures(throughput, eff, throughput * eff, r.noise_scale)


class _JobChildren:
    """The labelled children of one job, looked up once (labels() is not free)."""

    def __init__(self, m: "Metrics", job: str):
        self.gauges = {k: g.labels(job=job) for k, g in m.gauges.items()}
        self.resizes = m.resizes.labels(job=job)
        self.reports = m.reports.labels(job=job)
        self.policy_seconds = m.policy_seconds.labels(job=job)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.gauges = {k: Gauge(name, doc, ["job"], registry=r) for k, (name, doc) in _GAUGES.items()}
        self.resizes = Counter("adaptrun_resizes", "Worker-count changes decided", ["job"], registry=r)
        self.reports = Counter("adaptrun_reports", "Reports accepted", ["job"], registry=r)
        self.rejected = Counter("adaptrun_rejected_reports",
                                "Reports and registrations rejected, by reason (job '' = none "
                                "known)", ["job", "reason"], registry=r)
        self.policy_seconds = Histogram(
            "adaptrun_policy_seconds", "Time of one policy run (observe + decide)", ["job"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r)
        self._children: dict[str, _JobChildren] = {}
        self._http = None
        self._http_thread = None

    def job(self, job_id: str) -> _JobChildren:
        c = self._children.get(job_id)
        if c is None:
            c = self._children[job_id] = _JobChildren(self, job_id)
            for reason in REASONS:   # every series exists from the start, at 0 (rate() works)
                self.rejected.labels(job=job_id, reason=reason)
        return c

    def set_bounds(self, job_id: str, min_workers: int, max_workers: int) -> None:
        c = self.job(job_id)
        c.gauges["workers_min"].set(min_workers)
        c.gauges["workers_max"].set(max_workers)

    def observe_report(self, r: Report, figures: ReportFigures) -> None:
        g = self.job(r.job_id).gauges
        g["goodput"].set(figures.goodput)
        g["throughput"].set(figures.throughput_examples_per_s)
        g["efficiency"].set(figures.statistical_efficiency)
        g["noise_scale"].set(figures.noise_scale)
        g["global_batch"].set(r.global_batch)
        g["local_batch"].set(r.local_batch)
        g["accum_steps"].set(r.accum_steps)
        g["lr"].set(r.lr)
        g["workers"].set(r.world_size)
        self._children[r.job_id].reports.inc()

    def rejected_report(self, job_id: str, reason: str) -> None:
        # job_id is '' or a registered job: never a string an attacker picked freely.
        self.rejected.labels(job=job_id, reason=reason).inc()

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


