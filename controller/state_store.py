"""The controller's state dir (``adaptrun controller --state-dir DIR``): one JSON file per job.

The model. ``DIR/jobs/<job_id>.json`` holds the job's lasting state (``registry.job_state``:
bounds, caps, what its policy learned, generation, directive, resize gaps, done, notices).
A restarted controller loads every file and resumes each job where it was: its generation
goes on, so agents' directives stay monotonic, and the next decision uses the throughput model
and noise scale learned before.

The flow. The controller marks a job dirty (``mark``: a set insert, no I/O, so no gRPC call
and no report waits on the disk); a writer thread snapshots each dirty job and writes it at
most once per ``min_interval_s``. A write is atomic: a temp file in the same folder, fsync,
``os.replace``, fsync of the folder; a crash leaves the old file or the new one, never half of
one. ``close()`` writes what is still dirty.

Damage. A file that does not parse or does not make a job (truncated, hand-edited, from a
newer version) is named in one log line and renamed aside (``<job_id>.json.corrupt-<time>``);
that job starts fresh when its agents register. The controller never fails to start over it.
A second controller on the same dir is refused (an advisory lock on ``DIR/lock``).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["StateStore", "StateDirError"]

log = logging.getLogger("adaptrun.controller")

_JOB_FILE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,62})\.json$")


class StateDirError(RuntimeError):
    """The state dir cannot be used (not writable, or another controller holds it)."""


class StateStore:
    """Per-job JSON files in ``root/jobs``, written off the caller's thread.

    ``snapshot(job_id)`` (given at construction) returns the job's state as JSON-ready data,
    or None when the job is gone; it runs on the writer thread."""

    def __init__(self, root: str | os.PathLike, snapshot: Callable[[str], dict | None],
                 min_interval_s: float = 0.5):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.snapshot = snapshot
        self.min_interval_s = min_interval_s
        self.writes = 0                      # files written (for tests and logs)
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.root / "lock", "a+")
        except OSError as exc:
            raise StateDirError(f"cannot use the state dir {self.root}: {exc}; give a writable "
                                f"--state-dir") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise StateDirError(f"another controller uses the state dir {self.root}; give each "
                                f"controller its own --state-dir") from None
        self._cv = threading.Condition()
        self._dirty: set[str] = set()
        self._written_s: dict[str, float] = {}
        self._failed: set[str] = set()       # jobs whose last write failed (said once)
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- reading, at start ----------------------------------------------------------------
    def load(self, restore: Callable[[dict], None]) -> int:
        """Call ``restore(state)`` for every job file; return how many were restored. A file
        that does not parse, or that ``restore`` rejects with ``ValueError``, is set aside."""
        restored = 0
        for path in sorted(self.jobs_dir.iterdir()):
            if path.name.startswith(".") and ".tmp" in path.name:
                path.unlink(missing_ok=True)     # a write the last controller did not finish
                continue
            m = _JOB_FILE.match(path.name)
            if m is None:
                continue
            try:
                state = json.loads(path.read_bytes(), parse_constant=_no_constant)
                if not isinstance(state, dict) or state.get("job_id") != m.group(1):
                    raise ValueError(f"the file is not the state of job {m.group(1)!r}")
                restore(state)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                self._set_aside(path, exc)
                continue
            except OSError as exc:
                log.warning("state of job %s not read (%s): it starts fresh", m.group(1), exc)
                continue
            restored += 1
        return restored

    def _set_aside(self, path: Path, exc: Exception) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, aside)
            where = f"moved to {aside.name}"
        except OSError as err:
            where = f"could not be moved aside: {err}"
        log.warning("state file %s is damaged (%s); %s; the job starts fresh",
                    path, str(exc)[:200], where)

    # -- writing, off the callers' threads ------------------------------------------------
    def mark(self, job_id: str) -> None:
        """The job changed: write it soon (within ``min_interval_s`` of its last write)."""
        with self._cv:
            if self._closing:
                return
            self._dirty.add(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="adaptrun-state",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write every job still dirty, stop the writer, release the dir."""
        with self._cv:
            self._closing = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        try:
            self._lock_file.close()
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                due = [j for j in self._dirty if self._closing
                       or now - self._written_s.get(j, -math.inf) >= self.min_interval_s]
                if not due:
                    if self._closing:
                        return
                    waits = [self._written_s[j] + self.min_interval_s - now for j in self._dirty
                             if j in self._written_s]
                    self._cv.wait(timeout=min(waits) if waits else None)
                    continue
                self._dirty.difference_update(due)
                for j in due:
                    self._written_s[j] = now
            for job_id in due:
                self._write_job(job_id)

    def _write_job(self, job_id: str) -> None:
        try:
            state = self.snapshot(job_id)
            if state is None:
                return
            self.write(job_id, json.dumps(state, allow_nan=False, separators=(",", ":")))
        except (OSError, ValueError, TypeError) as exc:
            if job_id not in self._failed:
                log.warning("job %s: cannot save its state in %s (%s); it keeps running, "
                            "a restart would not resume it", job_id, self.jobs_dir, exc)
                self._failed.add(job_id)
            return
        except Exception:  # noqa: BLE001 - the writer outlives any one bug
            log.exception("job %s: saving its state failed", job_id)
            return
        if job_id in self._failed:
            self._failed.discard(job_id)
            log.info("job %s: its state is saved again", job_id)
        self.writes += 1

    def write(self, job_id: str, text: str) -> None:
        """Atomically replace the job's file with ``text``."""
        path = self.jobs_dir / f"{job_id}.json"
        tmp = self.jobs_dir / f".{job_id}.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.jobs_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")
