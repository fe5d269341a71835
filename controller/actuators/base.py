"""What adds or removes a job's workers: one small abstract class, backends chosen by name.

An ``Actuator`` is told the number of workers (replicas) a job should have and makes it so,
asynchronously: ``set_workers`` returns at once, and ``current_workers`` says what it is
working towards. The controller calls it only for a worker-count change; a batch-only change
reaches the agents as a directive. Backends live in sibling modules and register a factory
under a name (``local`` here; ``kubernetes`` and ``ray`` come with the cluster issue);
``create_actuator(name, **options)`` builds one.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable

__all__ = ["Actuator", "ActuatorError", "UnknownActuatorError", "register_actuator",
           "create_actuator", "actuator_names"]


class ActuatorError(RuntimeError):
    """The backend could not carry out a change; the message says what to check."""


class UnknownActuatorError(ValueError):
    """No actuator of that name; the message lists the known ones."""


class Actuator(ABC):
    """Adds or removes workers of jobs. Thread-safe; methods never block on the change."""

    name: str = ""

    @abstractmethod
    def set_workers(self, job_id: str, workers: int) -> None:
        """Start moving ``job_id`` to ``workers`` worker processes (replicas)."""

    @abstractmethod
    def current_workers(self, job_id: str) -> int | None:
        """The worker count last asked for ``job_id``; None when never asked."""

    def forget(self, job_id: str) -> None:
        """The job is gone: drop what is kept for it (default: nothing kept)."""

    def close(self) -> None:
        """Release what the backend holds (processes, clients)."""


# name -> "module:attribute" of a factory, imported on first use so that a backend's
# dependencies (a Kubernetes client, ray) load only when it is chosen.
_FACTORIES: dict[str, str | Callable[..., Actuator]] = {
    "local": "adaptrun.controller.actuators.local:LocalActuator",
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
