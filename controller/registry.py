"""The job registry: what the controller knows about each job and its agents.

Plain dataclasses guarded by locks: ``JobRegistry`` maps job ids and agent ids to their
state under one lock; each ``Job`` has a condition variable (``job.changed``) that guards its
mutable fields and wakes directive watchers when a new directive is issued. A job is created
by the first agent that registers for it, with that agent's bounds; an agent is identified
by (job_id, node), so registering again (after a reconnect) returns the same agent.

A job's lasting state (bounds, caps, what its policy learned, its generation and directive,
the measured resize gaps, done, notices; not its agents, who register again) is plain JSON
data: ``job_state`` makes it, ``job_from_state`` makes a job of it (``state_store`` keeps it
on disk).
"""
from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from adaptrun.science.policy import BatchCaps, JobBounds, Policy
from adaptrun.science.report import Report

from .ratelimit import TokenBucket

__all__ = ["Agent", "Directive", "Job", "JobRegistry", "RegistryFull", "job_state",
           "job_from_state", "JOB_STATE_VERSION"]

JOB_STATE_VERSION = 1


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
    readmit_time_s: float = float("-inf")   # last directive that re-admitted a waiting node
    metric_name: str = ""
    metric: float = float("nan")
    # The cluster allocation (a controller with a capacity): -1 none, 0 queued, else the
    # workers the job may use; its arrival (controller clock) orders the queue.
    allocated: int = -1
    arrival_s: float = 0.0
    queued_since_s: float = float("nan")
    changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    policy_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one run at a time

    def notice(self, text: str) -> bool:
        """Add a line for the user unless it was said already (call under ``changed``)."""
        if text in self.notices or len(self.notices) >= 200:
            return False
        self.notices.append(text)
        return True


def job_state(job: Job, now_s: float, wall_s: float) -> dict:
    """The job's lasting state as JSON-ready data. Takes ``job.policy_lock`` then
    ``job.changed`` (the order ``run_policy`` takes them), so the policy is not mid-run; the
    job's clock reads ``now_s``, the wall clock ``wall_s``."""
    with job.policy_lock, job.changed:
        age_s = now_s - job.last_report_time_s if job.last_report is not None else None
        return {
            "version": JOB_STATE_VERSION,
            "job_id": job.job_id,
            "saved_wall_s": wall_s,
            "bounds": asdict(job.bounds),
            "caps": asdict(job.caps),
            "generation": job.generation,
            "directive": None if job.directive is None else asdict(job.directive),
            "last_decision": job.last_decision,
            "accepted": job.accepted, "rejected": job.rejected, "resizes": job.resizes,
            "notices": list(job.notices),
            "done": job.done,
            "resize_gaps": list(job.resize_gaps),
            "metric_name": job.metric_name,
            "metric": job.metric if math.isfinite(job.metric) else None,
            "last_report_wall_s": None if age_s is None else wall_s - max(age_s, 0.0),
            "policy": job.policy.state_dict(),
        }


def job_from_state(state: dict, make_policy, bucket: TokenBucket, now_s: float,
                   wall_s: float) -> Job:
    """A job (no agents yet) of what ``job_state`` returned. ``make_policy(bounds)`` builds
    the fresh policy that takes the learned state. Raise ``ValueError`` saying what is wrong
    when ``state`` is not such data."""
    try:
        if state.get("version") != JOB_STATE_VERSION:
            raise ValueError(f"job state version {state.get('version')!r}, expected "
                             f"{JOB_STATE_VERSION}")
        bounds = JobBounds(**state["bounds"]).validate()
        caps = BatchCaps(**state["caps"])
        job = Job(_str(state["job_id"]), bounds, make_policy(bounds).load_state_dict(
            state["policy"]), bucket, caps=caps)
        job.generation = _count(state["generation"])
        d = state["directive"]
        if d is not None:
            job.directive = Directive(**d)
            if not all(isinstance(getattr(job.directive, k), int) for k in
                       ("generation", "world_size", "global_batch", "local_batch",
                        "accum_steps")) or job.directive.generation > job.generation:
                raise ValueError(f"bad directive {d!r}")
            job.directive_time_s = now_s          # its settle time starts again
        job.last_decision = _str(state["last_decision"])
        job.accepted, job.rejected, job.resizes = (_count(state[k]) for k in
                                                   ("accepted", "rejected", "resizes"))
        job.notices = [_str(n) for n in state["notices"]]
        job.done = state["done"] is True
        job.resize_gaps = [float(g) for g in state["resize_gaps"]]
        job.metric_name = _str(state["metric_name"])
        job.metric = math.nan if state["metric"] is None else float(state["metric"])
        job.last_report = job.policy.last_report
        seen = state["last_report_wall_s"]
        if job.last_report is not None and seen is not None:
            job.last_report_time_s = now_s - max(wall_s - float(seen), 0.0)
        return job
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a job state: {type(exc).__name__}: {exc}") from None


def _str(x) -> str:
    if not isinstance(x, str):
        raise ValueError(f"expected a string, got {x!r}")
    return x


def _count(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"expected a count, got {x!r}")
    return x


class JobRegistry:
    def __init__(self, max_jobs: int = 1000):
        self.max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}
        self._agents: dict[str, Agent] = {}
        self._lock = threading.Lock()
        self.registrations = 0            # every register() ever, a node's again included

    def register(self, job_id: str, node: str, slots: int, address: str,
                 make_job) -> tuple[Job, Agent, bool]:
        """The job (created by ``make_job()`` if new) and the agent; True when the job is new."""
        with self._lock:
            self.registrations += 1
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

    def restore(self, job: Job) -> bool:
        """Add a job restored from the state dir (no agents yet); False when one of that id
        exists already or the registry is full."""
        with self._lock:
            if job.job_id in self._jobs or len(self._jobs) >= self.max_jobs:
                return False
            self._jobs[job.job_id] = job
            return True

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def agent(self, agent_id: str) -> Agent | None:
        with self._lock:
            return self._agents.get(agent_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def agent_count(self) -> int:
        return len(self._agents)

    def remove(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                for a in job.agents.values():
                    self._agents.pop(a.agent_id, None)
            return job


def now_s() -> float:
    return time.monotonic()
