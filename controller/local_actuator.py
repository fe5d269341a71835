"""The ``local`` actuator: workers on this machine.

For now it records the worker count asked for each job and hands every change to an
optional callback ``on_change(job_id, old_workers, new_workers)`` (old is None the first
time), called outside its lock from the controller's policy thread; the callback must not
block for long. The process launcher that starts and stops ``adaptrun agent`` processes
(issue 5, with the node agent) plugs in as that callback; without one, this actuator only
keeps the desired count, which ``adaptrun status`` shows as ``desired_workers``.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .actuator import Actuator, ActuatorError

__all__ = ["LocalActuator"]

log = logging.getLogger(__name__)

OnChange = Callable[[str, "int | None", int], None]


class LocalActuator(Actuator):
    name = "local"

    def __init__(self, on_change: OnChange | None = None):
        self._on_change = on_change
        self._desired: dict[str, int] = {}
        self._lock = threading.Lock()

    def set_workers(self, job_id: str, workers: int) -> None:
        if workers < 0:
            raise ActuatorError(f"cannot run {workers} workers for job {job_id!r}")
        with self._lock:
            old = self._desired.get(job_id)
            self._desired[job_id] = workers
        if old != workers:
            log.info("job %s: workers %s -> %d (local)", job_id, old, workers)
            if self._on_change is not None:
                self._on_change(job_id, old, workers)

    def current_workers(self, job_id: str) -> int | None:
        with self._lock:
            return self._desired.get(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._desired.pop(job_id, None)
