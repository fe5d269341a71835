"""The job registry: what the controller knows about each job and its agents.

Plain dataclasses guarded by locks: ``JobRegistry`` maps job ids and agent ids to their
state under one lock; each ``Job`` has a condition variable (``job.changed``) that guards its
mutable fields and wakes directive watchers when a new directive is issued. A job is created
by the first agent that registers for it, with that agent's bounds; an agent is identified
by (job_id, node), so registering again (after a reconnect) returns the same agent.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from adaptrun.science.policy import BatchCaps, JobBounds, Policy
from adaptrun.science.report import Report

from .ratelimit import TokenBucket

__all__ = ["Agent", "Directive", "Job", "JobRegistry", "RegistryFull"]


class RegistryFull(RuntimeError):
    """The controller already tracks its maximum number of jobs."""


@dataclass
class Agent:
    agent_id: str
    job_id: str
    node: str
    slots: int
    address: str
    watching: int = 0          # open directive streams


@dataclass(frozen=True)
class Directive:
    """A configuration a job should move to; ``generation`` orders them, from 1."""
    job_id: str
    generation: int
    world_size: int
    global_batch: int
    local_batch: int
    accum_steps: int
    reason: str


@dataclass
class Job:
    job_id: str
    bounds: JobBounds
    policy: Policy
    bucket: TokenBucket
    caps: BatchCaps = field(default_factory=BatchCaps)          # the launcher's batch flags
    agents: dict[str, Agent] = field(default_factory=dict)      # node -> agent
    generation: int = 0
    directive: Directive | None = None
    directive_time_s: float = 0.0
    pending: deque = field(default_factory=lambda: deque(maxlen=1024))  # reports to observe
    last_report: Report | None = None
    last_report_time_s: float = 0.0
    last_policy_time_s: float = 0.0
    policy_due: bool = False          # run the policy at the next tick, whatever the cadence
    accepted: int = 0
    rejected: int = 0
    resizes: int = 0
    last_decision: str = ""
    policy_error: str = ""
    notices: list[str] = field(default_factory=list)   # for the user, each said once
    done: bool = False                # a report said the job's last epoch is done
    resize_gaps: list[float] = field(default_factory=list)   # measured planned re-forms, s
    metric_name: str = ""
    metric: float = float("nan")
    changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    policy_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one run at a time

    def notice(self, text: str) -> bool:
        """Add a line for the user unless it was said already (call under ``changed``)."""
        if text in self.notices or len(self.notices) >= 200:
            return False
        self.notices.append(text)
        return True


class JobRegistry:
    def __init__(self, max_jobs: int = 1000):
        self.max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}
        self._agents: dict[str, Agent] = {}
        self._lock = threading.Lock()

    def register(self, job_id: str, node: str, slots: int, address: str,
                 make_job) -> tuple[Job, Agent, bool]:
        """The job (created by ``make_job()`` if new) and the agent; True when the job is new."""
        with self._lock:
            job = self._jobs.get(job_id)
            created = job is None
            if created:
                if len(self._jobs) >= self.max_jobs:
                    raise RegistryFull(f"the controller tracks {self.max_jobs} jobs already")
                job = self._jobs[job_id] = make_job()
            agent = job.agents.get(node)
            if agent is None:
                agent = Agent(secrets.token_hex(8), job_id, node, slots, address)
                job.agents[node] = agent
                self._agents[agent.agent_id] = agent
            else:
                agent.slots, agent.address = slots, address
            return job, agent, created

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def agent(self, agent_id: str) -> Agent | None:
        with self._lock:
            return self._agents.get(agent_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def remove(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                for a in job.agents.values():
                    self._agents.pop(a.agent_id, None)
            return job


def now_s() -> float:
    return time.monotonic()
