"""The ``local`` actuator: a job's node agents as processes on this machine.

It records the worker count asked for each job and hands every change to an optional
callback ``on_change(job_id, old_workers, new_workers)`` (old is None the first time), called
outside its lock from the controller's policy thread; the callback must not block for long.

With ``agent_command`` it also runs the agents: ``agent_command(job_id, node)`` (or a list
whose items may hold ``{job}`` and ``{node}``) is the argv of one ``adaptrun agent`` process,
e.g. ``[sys.executable, "-m", "adaptrun.cli", "agent", "--job", "{job}", "--node", "{node}",
..., "--", "python", "train.py"]``. Each agent runs in its own process group with its output
in ``<log_dir>/agent-<node>.log``.
- Scale-up: it starts agents until the live ones cover the workers asked for
  (ceil(workers / nproc_per_node)). The new agents learn the directive from the controller
  and join the job's next rendezvous round.
- Scale-down: it stops nothing. The directive makes the agents beyond the new node count
  leave by themselves after their workers saved (exit 0); a reaper thread collects them.
- GPUs (``gpus``: the device ids this machine lends the job): each agent gets its own
  ``nproc_per_node`` of them in ``CUDA_VISIBLE_DEVICES``, the first ones no live agent of
  the job holds, so local rank i trains on the i-th of its own. An agent that would find none
  left is not started (ActuatorError: more workers than GPUs).
- ``close()`` stops every agent it started (SIGTERM to its group, SIGKILL after a grace).
It counts only the agents it started: the first agents of a job are started through it too
(``set_workers(job, n)``) when it should manage the job from the start. A scale-up that comes
while agents of a scale-down are still leaving counts them as live (not handled).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from .base import ActuatorError, AgentCommand, CountingActuator, OnChange, agent_argv

__all__ = ["LocalActuator"]

log = logging.getLogger(__name__)



class LocalActuator(CountingActuator):
    name = "local"

    def __init__(self, on_change: OnChange | None = None,
                 agent_command: AgentCommand | None = None, nproc_per_node: int = 1,
                 log_dir: str | os.PathLike | None = None, env: dict | None = None,
                 stop_grace_s: float = 10.0, gpus: list[str] | tuple[str, ...] | None = None):
        super().__init__(on_change)
        self._agent_command = agent_command
        self.nproc_per_node = max(1, int(nproc_per_node))
        self._log_dir = Path(log_dir) if log_dir else None
        self._env = env
        self.gpus = tuple(str(g) for g in gpus) if gpus else ()
        self._held: dict[int, tuple[str, ...]] = {}     # agent pid -> its GPUs
        self.stop_grace_s = stop_grace_s
        self._agents: dict[str, list[tuple[str, subprocess.Popen]]] = {}
        self._started: dict[str, int] = {}
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    def set_workers(self, job_id: str, workers: int) -> None:
        with self._lock:
            old = self._record(job_id, workers)
        if self._agent_command is not None:
            self._start_agents(job_id, workers)
        self._announce(job_id, old, workers)

    # -- agent processes -----------------------------------------------------------------
    def agents(self, job_id: str) -> list[tuple[str, subprocess.Popen]]:
        """(node, process) of every agent started for ``job_id``, live or not."""
        with self._lock:
            return list(self._agents.get(job_id, []))

    def _argv(self, job_id: str, node: str) -> list[str]:
        return agent_argv(self._agent_command, job_id, node)

    def _start_agents(self, job_id: str, workers: int) -> None:
        if self._closed.is_set():
            raise ActuatorError("the local actuator is closed")
        nodes = math.ceil(workers / self.nproc_per_node)
        with self._lock:
            live = [p for _, p in self._agents.get(job_id, []) if p.poll() is None]
            missing = nodes - len(live)
            starts = []
            for _ in range(max(0, missing)):
                index = self._started.get(job_id, 0)
                self._started[job_id] = index + 1
                starts.append(f"{job_id}-n{index}")
        for node in starts:
            log_dir = self._log_dir or Path(tempfile.gettempdir()) / f"adaptrun-agents-{job_id}"
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / f"agent-{node}.log"
            env, gpus = self._env, self._free_gpus()
            if self.gpus:
                env = {**(self._env if self._env is not None else os.environ),
                       "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
            try:
                with open(path, "ab") as out:
                    proc = subprocess.Popen(self._argv(job_id, node), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
                if gpus:
                    self._held[proc.pid] = gpus
            except OSError as exc:
                raise ActuatorError(f"cannot start an agent for job {job_id!r}: {exc}; check "
                                    f"the agent command") from None
            log.info("job %s: started agent %s (pid %d, log %s)", job_id, node, proc.pid, path)
            with self._lock:
                self._agents.setdefault(job_id, []).append((node, proc))
            self._ensure_reaper()

    def _free_gpus(self) -> tuple[str, ...]:
        """The next agent's GPUs: the first ``nproc_per_node`` that no live agent holds."""
        if not self.gpus:
            return ()
        with self._lock:
            live = {p.pid for lst in self._agents.values() for _, p in lst if p.poll() is None}
            for pid in [pid for pid in self._held if pid not in live]:
                del self._held[pid]
            held = {g for gs in self._held.values() for g in gs}
        free = [g for g in self.gpus if g not in held]
        if len(free) < self.nproc_per_node:
            raise ActuatorError(
                f"no GPUs left for another agent: {len(self.gpus)} GPUs "
                f"({','.join(self.gpus)}), {len(held)} held by live agents, "
                f"{self.nproc_per_node} per agent; lower --max-workers to the GPUs there are")
        return tuple(free[:self.nproc_per_node])

    def _ensure_reaper(self) -> None:
        with self._lock:
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="adaptrun-local-reaper",
                                                daemon=True)
                self._reaper.start()

    def _reap(self) -> None:
        reported: set[int] = set()
        while not self._closed.wait(0.5):
            with self._lock:
                procs = [(job, node, p) for job, lst in self._agents.items() for node, p in lst]
            for job, node, p in procs:
                code = p.poll()   # collects the exit status: no zombies
                if code is not None and p.pid not in reported:
                    reported.add(p.pid)
                    log.info("job %s: agent %s exited with %d", job, node, code)

    def close(self) -> None:
        """Stop every agent this actuator started."""
        self._closed.set()
        with self._lock:
            procs = [p for lst in self._agents.values() for _, p in lst]
        live = [p for p in procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        for p in live:
            try:
                p.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.error("agent pid %d did not exit after SIGKILL", p.pid)
        if self._reaper is not None:
            self._reaper.join(timeout=2)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
