"""``adaptrun run``: a whole adaptive job on this machine, from one command.

Pieces, all real: a ``Controller`` (gRPC on 127.0.0.1, Prometheus ``/metrics``), the ``local``
actuator starting ``adaptrun agent`` processes (or, with ``backend="ray"``, the ``ray``
actuator placing them as Ray actors), and the job's rendezvous store, which the
controller hosts and hands to the agents at registration (so no agent is a single point of
failure: an agent can die and the others re-form). ``LocalRun`` starts them, starts the job at ``min_workers``, and then only watches:
``sample()`` reads the job's state as ``adaptrun status`` would (``service.job_status``),
``new_decisions()`` yields each new directive once, ``finished()`` says when every agent
has exited. ``close()`` stops what is still running, in reverse order.

The job ends when all its agents have exited: 0 when the last round's workers all finished
(agents that left on a scale-down also exit 0), otherwise the first non-zero code.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .core import ControllerConfig
from .actuators.local import LocalActuator
from .server import Controller
from .service import job_status

__all__ = ["RunConfig", "LocalRun", "Sample"]

log = logging.getLogger("adaptrun.run")


@dataclass(frozen=True)
class RunConfig:
    command: tuple[str, ...]
    job_id: str = "local"
    min_workers: int = 1
    max_workers: int = 1
    nproc_per_node: int = 1
    # Optional caps on what the script declares (None: the script's own limits).
    init_batch: int | None = None
    max_global_batch: int | None = None
    local_batch_min: int | None = None
    local_batch_max: int | None = None
    port: int = 0
    metrics_port: int | None = 0
    policy_interval_s: float = 3.0
    resize_cost_s: float = 2.0       # the prior for a re-form's cost, until one is measured
    log_dir: Path = field(default_factory=lambda: Path("adaptrun-logs"))
    backend: str = "local"           # what runs the agents: "local" processes or "ray" actors
    ray_address: str | None = None   # ray: None starts a local Ray instance for the run
    gpus: tuple[str, ...] = ()       # GPU ids the agents share out (CUDA_VISIBLE_DEVICES)
    capacity: str = ""               # the embedded controller's cluster allocation ("": none)

    def validate(self) -> "RunConfig":
        if self.backend not in ("local", "ray"):
            raise ValueError(f"--backend must be local or ray, got {self.backend!r}")
        if not self.command:
            raise ValueError("give the training command after --, e.g. "
                             "`adaptrun run -- python examples/spirals.py`")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= --min-workers <= --max-workers, got {self.min_workers} "
                             f"and {self.max_workers}")
        if self.min_workers % self.nproc_per_node or self.max_workers % self.nproc_per_node:
            raise ValueError(f"--min-workers and --max-workers must be multiples of "
                             f"--nproc-per-node {self.nproc_per_node}")
        if self.gpus and self.max_workers > len(self.gpus):
            raise ValueError(
                f"--max-workers {self.max_workers} is more than the {len(self.gpus)} GPUs of "
                f"this machine ({','.join(self.gpus)}): one worker per GPU; lower --max-workers, "
                "or set ADAPTRUN_DEVICE=cpu to train on the CPU")
        if self.capacity:
            from adaptrun.science.allocation import AllocationError, Cluster
            try:
                Cluster.parse(self.capacity)
            except AllocationError as exc:
                raise ValueError(f"--capacity: {exc}") from None
        return self


@dataclass(frozen=True)
class Sample:
    """The job at one moment, for the progress bar, the summary and the timeline plot."""

    t_s: float
    step: int
    epoch: int
    progress: float
    workers: int
    global_batch: int
    local_batch: int
    accum_steps: int
    lr: float
    noise_scale: float
    goodput: float
    throughput: float
    efficiency: float
    reports: int
    adaptive: bool
    generation: int = 0          # the newest directive the world had applied


class LocalRun:
    def __init__(self, config: RunConfig):
        self.config = config.validate()
        self.controller: Controller | None = None
        self.actuator: LocalActuator | None = None
        self._t0 = time.monotonic()
        self._seen_generation = 0
        self._seen_notices = 0
        self.reports: list = []       # every report the controller accepted, as sampled

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "LocalRun":
        c = self.config
        c.log_dir.mkdir(parents=True, exist_ok=True)
        self.actuator = self._make_actuator()
        try:
            self.controller = Controller(
                ControllerConfig(port=c.port, metrics_port=c.metrics_port,
                                 policy_interval_s=c.policy_interval_s,
                                 resize_cost_s=c.resize_cost_s, report_interval_s=1.0,
                                 capacity=c.capacity),
                actuator=self.actuator).start()
            self.actuator.set_workers(c.job_id, c.min_workers)
        except BaseException:
            self.close()
            raise
        self._t0 = time.monotonic()
        return self

    def _make_actuator(self):
        c = self.config
        if c.backend == "ray":
            from .actuators.ray import RayActuator

            # Each agent's actor holds nproc_per_node CPUs; a local instance fits max_workers.
            return RayActuator(agent_command=self._agent_argv, nproc_per_node=c.nproc_per_node,
                               address=c.ray_address, log_dir=c.log_dir,
                               local_num_cpus=max(os.cpu_count() or 1, c.max_workers)).connect()
        return LocalActuator(agent_command=self._agent_argv, nproc_per_node=c.nproc_per_node,
                             log_dir=c.log_dir, gpus=c.gpus)

    def _agent_argv(self, job_id: str, node: str) -> list[str]:
        c = self.config
        nodes = (c.min_workers // c.nproc_per_node, c.max_workers // c.nproc_per_node)
        return [sys.executable, "-m", "adaptrun.cli", "agent", "--exit-with-parent",
                "--controller", self.controller.address, "--job", job_id, "--node", node,
                "--nproc-per-node", str(c.nproc_per_node), "--nnodes", f"{nodes[0]}:{nodes[1]}",
                "--min-workers", str(c.min_workers), "--max-workers", str(c.max_workers),
                *(arg for flag, value in (("--init-batch", c.init_batch),
                                          ("--max-global-batch", c.max_global_batch),
                                          ("--local-batch-min", c.local_batch_min),
                                          ("--local-batch-max", c.local_batch_max))
                  if value is not None for arg in (flag, str(value))),
                "--snapshot-dir", str(c.log_dir / f"snapshots-{node}"),
                "--", *c.command]

    def close(self) -> None:
        if self.actuator is not None:
            self.actuator.close()
        if self.controller is not None:
            self.controller.stop()

    def __enter__(self) -> "LocalRun":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- watching ------------------------------------------------------------------------
    @property
    def job(self):
        return self.controller.core.registry.job(self.config.job_id)

    def sample(self) -> Sample | None:
        job = self.job
        if job is None or job.last_report is None:
            return None
        if not self.reports or self.reports[-1] is not job.last_report:
            self.reports.append(job.last_report)
        s = job_status(job, self.controller.core.clock(),
                       self.actuator.current_workers(self.config.job_id))
        return Sample(t_s=time.monotonic() - self._t0, step=s.step, epoch=s.epoch,
                      progress=s.progress, workers=s.world_size, global_batch=s.global_batch,
                      local_batch=s.local_batch, accum_steps=s.accum_steps, lr=s.lr,
                      noise_scale=s.noise_scale if math.isfinite(s.noise_scale) else math.nan,
                      goodput=s.goodput, throughput=s.throughput_examples_per_s,
                      efficiency=s.statistical_efficiency, reports=s.reports_accepted,
                      adaptive=s.adaptive, generation=job.last_report.generation)

    def new_notices(self) -> list[str]:
        """What the controller said about the job since the last call (each line once)."""
        job = self.job
        if job is None:
            return []
        with job.changed:
            fresh = job.notices[self._seen_notices:]
            self._seen_notices = len(job.notices)
        return fresh

    def new_decisions(self):
        """Directives issued since the last call, oldest first (only the newest of a burst
        is kept by the controller, so a burst shows as its last directive)."""
        job = self.job
        if job is None:
            return []
        with job.changed:
            d = job.directive
        if d is None or d.generation <= self._seen_generation:
            return []
        self._seen_generation = d.generation
        return [d]

    def finished(self) -> int | None:
        """None while any agent runs; else the job's exit code."""
        agents = self.actuator.agents(self.config.job_id)
        if not agents or any(p.poll() is None for _, p in agents):
            return None
        codes = [p.returncode for _, p in agents]
        return next((code for code in codes if code != 0), 0)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0
