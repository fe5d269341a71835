"""What adds or removes a job's workers: one small abstract class, backends chosen by name.

An ``Actuator`` is told the number of workers (replicas) a job should have and makes it so,
asynchronously: ``set_workers`` returns at once, and ``current_workers`` says what it is
working towards. The controller calls it only for a worker-count change; a batch-only change
reaches the agents as a directive. Backends live in sibling modules and register a factory
under a name (``local``, ``kubernetes``, ``ray``);
``create_actuator(name, **options)`` builds one. The controller ``bind``s each actuator to two
callbacks of its own: a line for a job's notices (an unmet scale, an evicted pod) and the job's
worker bounds. An actuator whose backend knows how many GPUs the controller's jobs may hold says
so through ``capacity()``; the controller then shares that capacity among its jobs.
"""
from __future__ import annotations

import importlib
import logging
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from adaptrun.science.allocation import Cluster

Notify = Callable[[str, str], None]                       # (job_id, text)
BoundsOf = Callable[[str], "tuple[int, int] | None"]      # job_id -> (min, max) workers

__all__ = ["Actuator", "ActuatorError", "UnknownActuatorError", "register_actuator",
           "create_actuator", "actuator_names", "CountingActuator"]


class ActuatorError(RuntimeError):
    """The backend could not carry out a change; the message says what to check."""


class UnknownActuatorError(ValueError):
    """No actuator of that name; the message lists the known ones."""


class Actuator(ABC):
    """Adds or removes workers of jobs. Thread-safe; methods never block on the change."""

    name: str = ""
    _notify: Notify | None = None
    _bounds_of: BoundsOf | None = None

    def bind(self, notify: Notify | None, bounds_of: BoundsOf | None) -> None:
        """The controller's side: ``notify(job_id, text)`` puts a line on the job's status
        (its notices; each line said once), ``bounds_of(job_id)`` gives the job's (min, max)
        workers or None. Both are cheap and may be called from any thread."""
        self._notify, self._bounds_of = notify, bounds_of

    def notify(self, job_id: str, text: str) -> None:
        """Tell the job's user (a no-op until bound); callers log it themselves."""
        if self._notify is not None:
            self._notify(job_id, text)

    def job_bounds(self, job_id: str) -> tuple[int, int] | None:
        return self._bounds_of(job_id) if self._bounds_of is not None else None

    @abstractmethod
    def set_workers(self, job_id: str, workers: int) -> None:
        """Start moving ``job_id`` to ``workers`` worker processes (replicas)."""

    @abstractmethod
    def current_workers(self, job_id: str) -> int | None:
        """The worker count last asked for ``job_id``; None when never asked."""

    def capacity(self) -> "Cluster | None":
        """The GPUs the backend gives the controller's jobs now, as nodes x GPUs per node, or
        None when it does not know (the default; the kubernetes actuator knows it from a Kueue
        ClusterQueue). Without ``--capacity`` the controller allocates this capacity among its
        jobs and follows it as it changes. Cheap and never blocking: called on every tick."""
        return None

    def forget(self, job_id: str) -> None:
        """The job is gone: drop what is kept for it (default: nothing kept)."""

    def job_done(self, job_id: str) -> None:
        """The job finished training: release what keeps its agents coming back (default:
        nothing to release; an agent that finished exits by itself). Never blocks."""

    def close(self) -> None:
        """Release what the backend holds (processes, clients)."""


# What the process-starting backends (local, ray) share: a change callback and the argv of
# one node's agent, a callable (job, node) -> argv or a list whose items may hold {job}/{node}.
OnChange = Callable[[str, "int | None", int], None]
AgentCommand = Callable[[str, str], Sequence[str]] | Sequence[str]


class CountingActuator(Actuator):
    """The bookkeeping the agent-starting backends (local, ray) share: the worker count last
    asked for each job (under ``self._lock``, which the backend uses for its own state too),
    and every change logged and handed to ``on_change(job_id, old, new)`` (old is None the
    first time), outside the lock, from the caller's thread."""

    def __init__(self, on_change: OnChange | None):
        self._on_change = on_change
        self._desired: dict[str, int] = {}
        self._lock = threading.Lock()

    def _record(self, job_id: str, workers: int) -> int | None:
        """Under ``self._lock``: make ``workers`` the job's count; return the one before."""
        if workers < 0:
            raise ActuatorError(f"cannot run {workers} workers for job {job_id!r}")
        old = self._desired.get(job_id)
        self._desired[job_id] = workers
        return old

    def _announce(self, job_id: str, old: int | None, workers: int) -> None:
        """Outside the lock: log a change and call ``on_change``."""
        if old != workers:
            logging.getLogger(type(self).__module__).info(
                "job %s: workers %s -> %d (%s)", job_id, old, workers, self.name)
            if self._on_change is not None:
                self._on_change(job_id, old, workers)

    def current_workers(self, job_id: str) -> int | None:
        with self._lock:
            return self._desired.get(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._desired.pop(job_id, None)


def agent_argv(command: AgentCommand, job_id: str, node: str) -> list[str]:
    """The argv of the agent of ``node`` in ``job_id``, from a command template."""
    if callable(command):
        return [str(a) for a in command(job_id, node)]
    return [str(a).format(job=job_id, node=node) for a in command]


# name -> "module:attribute" of a factory, imported on first use so that a backend's
# dependencies (a Kubernetes client, ray) load only when it is chosen.
_FACTORIES: dict[str, str | Callable[..., Actuator]] = {
    "local": "adaptrun.controller.actuators.local:LocalActuator",
    "kubernetes": "adaptrun.controller.actuators.kubernetes:KubernetesActuator",
    "ray": "adaptrun.controller.actuators.ray:RayActuator",
}


def register_actuator(name: str, factory: str | Callable[..., Actuator]) -> None:
    _FACTORIES[name] = factory


def actuator_names() -> list[str]:
    return sorted(_FACTORIES)


def create_actuator(name: str, **options) -> Actuator:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UnknownActuatorError(f"unknown actuator {name!r}; known: {', '.join(actuator_names())}")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(**options)
