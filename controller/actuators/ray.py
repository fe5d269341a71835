"""The ``ray`` actuator: a job's node agents as Ray actors on a Ray cluster.

The model is the local actuator's, with a Ray actor where that one has a process: one actor
per node of a job, holding the node's resources (``num_cpus_per_node``, ``num_gpus_per_node``;
Ray places it, spreading the agents over the cluster's nodes where it can; an actor that holds
GPUs holds at least one per worker, since its agent's local rank i trains on the i-th GPU Ray
makes visible to it), runs one
``adaptrun agent`` as a child process (``agent_command(job_id, node)``, or a list whose items
may hold ``{job}`` and ``{node}``, as for ``LocalActuator``). The agent runs in its own
process group, keeps its own signal handling and writes its output to
``<log_dir>/agent-<node>.log`` on the actor's node.
- Scale-up: it starts actors until the live ones cover the workers asked for
  (ceil(workers / nproc_per_node)); the new agents learn the directive from the controller and
  join the job's next rendezvous round.
- Scale-down: it stops nothing. The directive makes the agents beyond the new node count
  leave by themselves after the planned re-form (exit 0); an actor ends when its agent exits.
- A lost actor (``ray.kill``, its worker process or its node died) is a lost node: its agent
  and the agent's workers are killed with it (``AgentActor`` says how), so the other agents'
  failure handling re-forms with the survivors. The actuator sees the actor's ``run()``
  fail, logs it and no longer counts it as live; its ``returncode`` reads -9, as for a
  killed process. It starts no replacement; a later scale-up starts a new actor.
- ``close()`` stops every agent it started (SIGTERM to its group, SIGKILL after a grace),
  kills the actors, and shuts Ray down if it started or connected it.

Where Ray runs: ``address`` None starts a local Ray instance for this process (loopback only,
``local_num_cpus`` CPUs, no dashboard); "auto", "HOST:PORT" or "ray://HOST:PORT" connect to an
existing cluster. A process already connected to Ray (``ray.is_initialized()``) is used as is
and left connected. Every Ray call runs on the actuator's own thread (or in ``connect`` and
``close``): ``set_workers`` only records the count and wakes that thread, so it never blocks
the controller. Ray is imported on first use, never when this module is imported.

Without ``agent_command`` it only records the worker count (the agents are started by
something else), as the local actuator does.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .base import ActuatorError, AgentCommand, CountingActuator, OnChange, agent_argv

__all__ = ["RayActuator", "RayAgent", "AgentActor", "LOST_EXIT_CODE"]

log = logging.getLogger(__name__)


LOST_EXIT_CODE = -signal.SIGKILL      # what a lost actor's agent reads as: a killed process
_PR_SET_PDEATHSIG = 1                 # linux/prctl.h


@dataclass
class RayAgent:
    """One node's agent as the actuator sees it; ``poll()`` and ``returncode`` read as on a
    ``subprocess.Popen`` (None while it runs or waits to be placed)."""

    node: str
    started_s: float
    actor: Any = field(default=None, repr=False)
    run_ref: Any = field(default=None, repr=False)
    info_ref: Any = field(default=None, repr=False)
    host: str = ""
    pid: int | None = None            # the agent process, on ``host``
    actor_pid: int | None = None      # the actor's worker process, on ``host``
    log_path: str = ""
    returncode: int | None = None
    lost: str = ""                    # why the actor was lost ("" while not lost)
    warned_pending: bool = False

    def poll(self) -> int | None:
        return self.returncode


class RayActuator(CountingActuator):
    name = "ray"

    def __init__(self, agent_command: AgentCommand | str | None = None, nproc_per_node: int = 1,
                 num_cpus_per_node: float | None = None, num_gpus_per_node: float = 0.0,
                 address: str | None = None, local_num_cpus: int | None = None,
                 temp_dir: str | os.PathLike | None = None,
                 log_dir: str | os.PathLike | None = None, env: dict | None = None,
                 cwd: str | os.PathLike | None = None, on_change: OnChange | None = None,
                 stop_grace_s: float = 10.0, poll_s: float = 0.2, pending_warn_s: float = 30.0):
        """``num_cpus_per_node`` defaults to ``nproc_per_node``; ``env`` adds variables to (a
        None value removes one from) the actor's environment for the agent; ``cwd`` (default:
        this process's) is the agent's working directory where it exists on the actor's node.
        Options may come as strings (``agent_command`` then as a shell line)."""
        if isinstance(agent_command, str):
            agent_command = shlex.split(agent_command)
        self._agent_command = agent_command
        self.nproc_per_node = max(1, int(nproc_per_node))
        self.num_cpus_per_node = float(num_cpus_per_node if num_cpus_per_node is not None
                                       else self.nproc_per_node)
        self.num_gpus_per_node = float(num_gpus_per_node or 0)
        if 0 < self.num_gpus_per_node and math.ceil(self.num_gpus_per_node) < self.nproc_per_node:
            raise ActuatorError(
                f"num_gpus_per_node {self.num_gpus_per_node:g} is fewer GPUs than the "
                f"{self.nproc_per_node} workers per node: each worker trains on its own GPU, so "
                f"ask for num_gpus_per_node {self.nproc_per_node} (--ray-gpus-per-node), fewer "
                "workers per node, or 0 GPUs for workers on the CPU")
        self.address = address or None
        self.local_num_cpus = int(local_num_cpus) if local_num_cpus else None
        self._temp_dir = str(Path(temp_dir).resolve()) if temp_dir else None
        self._log_dir = Path(log_dir).resolve() if log_dir else None
        self._env = dict(env) if env else None
        self._cwd = str(Path(cwd or os.getcwd()).resolve())
        super().__init__(on_change)
        self.stop_grace_s = float(stop_grace_s)
        self.poll_s = float(poll_s)
        self.pending_warn_s = float(pending_warn_s)
        self._agents: dict[str, list[RayAgent]] = {}
        self._started: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._connect_lock = threading.Lock()
        self._connected = False
        self._owns_ray = False
        self._warned_no_command = False
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote = None                 # the actor class, made remote on first use

    # -- the Actuator contract -----------------------------------------------------------
    def set_workers(self, job_id: str, workers: int) -> None:
        if self._closed.is_set():
            raise ActuatorError("the ray actuator is closed")
        with self._lock:
            old = self._record(job_id, workers)
            self._dirty.add(job_id)
        if self._agent_command is not None:
            self._ensure_thread()
            self._wake.set()
        elif not self._warned_no_command:
            self._warned_no_command = True
            log.warning("the ray actuator has no agent command: it records worker counts but "
                        "starts no agents")
        self._announce(job_id, old, workers)

    def forget(self, job_id: str) -> None:
        super().forget(job_id)
        with self._lock:
            self._dirty.discard(job_id)

    def agents(self, job_id: str) -> list[tuple[str, RayAgent]]:
        """(node, agent) of every agent started for ``job_id``, live or not."""
        with self._lock:
            return [(a.node, a) for a in self._agents.get(job_id, [])]

    def live_agents(self, job_id: str) -> int:
        """Agents of ``job_id`` whose actor is placed or waiting to be, and not ended."""
        with self._lock:
            return sum(a.returncode is None for a in self._agents.get(job_id, []))

    # -- Ray -----------------------------------------------------------------------------
    def connect(self) -> "RayActuator":
        """Start or reach Ray now (otherwise the first agent does it, on the actuator's
        thread); raise ``ActuatorError`` with what to check when it fails."""
        with self._connect_lock:
            if self._connected:
                return self
            if self._closed.is_set():
                raise ActuatorError("the ray actuator is closed")
            if self.address is None:
                # A local instance serves this machine only: Ray then binds every port to the
                # loopback address (the variable must be set before ray is imported).
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            try:
                import ray
            except ImportError:
                raise ActuatorError("the ray actuator needs ray: pip install 'adaptrun[ray]'"
                                    ) from None
            if ray.is_initialized():
                log.info("ray actuator: using this process's Ray connection")
                self._connected = True
                return self
            self._check_reachable()
            # ray.init replaces the SIGTERM handler of the main thread with one that exits;
            # the process that embeds the controller keeps its own (`adaptrun run` stops the
            # job cleanly on SIGTERM).
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                if self.address is None:
                    ray.init(address="local", num_cpus=self.local_num_cpus or os.cpu_count(),
                             include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING, _temp_dir=self._temp_dir,
                             object_store_memory=128 * 1024 * 1024)
                    where = "a local Ray instance"
                else:
                    ray.init(address=self.address, log_to_driver=False,
                             logging_level=logging.WARNING)
                    where = f"the Ray cluster at {self.address}"
            except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; all end here
                with contextlib.suppress(Exception):
                    ray.shutdown()           # what a half-made start left behind
                target = self.address or "a new local instance"
                raise ActuatorError(f"cannot start or reach Ray ({target}): {exc}; check the "
                                    f"address (`ray status` on the cluster)") from None
            finally:
                if main and sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            self._connected = self._owns_ray = True
            log.info("ray actuator: connected to %s", where)
            return self

    def _check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast on a HOST:PORT nobody answers at: ray.init retries such an address
        without end."""
        if self.address is None or self.address == "auto":
            return
        host, _, port = self.address.split("://", 1)[-1].rpartition(":")
        if not port.isdigit():
            return
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        except OSError as exc:
            raise ActuatorError(f"cannot reach the Ray cluster at {self.address} ({exc}); "
                                f"check the address (`ray status` on the cluster's head prints "
                                f"it)") from None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._loop, name="adaptrun-ray-actuator",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._closed.is_set():
                break
            with self._lock:
                dirty, self._dirty = self._dirty, set()
            try:
                for job_id in dirty:
                    self._reconcile(job_id)
                if self._connected:
                    self._poll()
            except ActuatorError as exc:
                log.error("ray actuator: %s", exc)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad Ray call
                log.exception("ray actuator: unexpected error; retrying")
                with self._lock:
                    self._dirty |= dirty
                self._closed.wait(1.0)

    def _reconcile(self, job_id: str) -> None:
        """Start actors until the live ones cover the job's node count."""
        with self._lock:
            workers = self._desired.get(job_id)
        if workers is None:
            return
        nodes = math.ceil(workers / self.nproc_per_node)
        with self._lock:
            live = sum(a.returncode is None for a in self._agents.get(job_id, []))
        missing = nodes - live
        if missing <= 0:
            return
        self.connect()
        if self._remote is None:
            import ray

            # Threaded (run() blocks while info() and stop() answer); never restarted: a
            # restarted actor would be a new agent that nobody asked for.
            self._remote = ray.remote(AgentActor).options(
                num_cpus=self.num_cpus_per_node, num_gpus=self.num_gpus_per_node,
                max_concurrency=4, max_restarts=0, scheduling_strategy="SPREAD")
        remote = self._remote
        log_dir = self._log_dir or Path(tempfile.gettempdir()) / f"adaptrun-agents-{job_id}"
        for _ in range(missing):
            with self._lock:
                index = self._started.get(job_id, 0)
                self._started[job_id] = index + 1
            node = f"{job_id}-n{index}"
            log_path = str(log_dir / f"agent-{node}.log")
            actor = remote.remote(self._argv(job_id, node), log_path, self._env, self._cwd)
            agent = RayAgent(node, time.monotonic(), actor=actor, run_ref=actor.run.remote(),
                             info_ref=actor.info.remote(), log_path=log_path)
            with self._lock:
                self._agents.setdefault(job_id, []).append(agent)
            log.info("job %s: placing agent %s as a Ray actor (%g CPU, %g GPU per node)",
                     job_id, node, self.num_cpus_per_node, self.num_gpus_per_node)

    def _argv(self, job_id: str, node: str) -> list[str]:
        return agent_argv(self._agent_command, job_id, node)

    def _poll(self) -> None:
        """Collect what finished: agents placed, agents exited, actors lost."""
        import ray
        from ray.exceptions import RayError

        with self._lock:
            watched = [(job, a) for job, lst in self._agents.items() for a in lst
                       if a.returncode is None]
        refs = {}
        for job, a in watched:
            if a.info_ref is not None:
                refs[a.info_ref] = (job, a, "info")
            refs[a.run_ref] = (job, a, "run")
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            job, a, what = refs[ref]
            try:
                value = ray.get(ref, timeout=5)
            except RayError as exc:
                self._lost(job, a, exc)
                continue
            if what == "info":
                a.info_ref = None
                a.host, a.pid, a.actor_pid = value["host"], value["pid"], value["actor_pid"]
                log.info("job %s: started agent %s on %s (pid %d in actor pid %d, log %s)",
                         job, a.node, a.host, a.pid, a.actor_pid, a.log_path)
            else:
                self._ended(a, int(value))
                log.info("job %s: agent %s exited with %d", job, a.node, a.returncode)
        now = time.monotonic()
        for job, a in watched:
            if (a.info_ref is not None and not a.warned_pending
                    and now - a.started_s > self.pending_warn_s):
                a.warned_pending = True
                text = (f"agent {a.node} is not placed after {now - a.started_s:.0f} s: the "
                        f"Ray cluster may lack {self.num_cpus_per_node:g} free CPU / "
                        f"{self.num_gpus_per_node:g} GPU for one node (`ray status`)")
                log.warning("job %s: %s", job, text)
                self.notify(job, text)

    def _lost(self, job: str, a: RayAgent, exc: BaseException) -> None:
        if a.returncode is not None:
            return
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        start_error = re.search(r"AgentStartError: (.+)", text)
        if start_error:
            reason = start_error.group(1).strip()
            log.error("job %s: agent %s could not start: %s", job, a.node, reason)
            self.notify(job, f"agent {a.node} could not start: {reason}")
        else:
            log.warning("job %s: lost the Ray actor of agent %s (%s): no longer counted as "
                        "live; the other agents re-form with the survivors", job, a.node,
                        reason)
            self.notify(job, f"lost the Ray actor of agent {a.node} ({reason}); the other "
                             f"agents re-form with the survivors")
        a.lost = reason
        self._ended(a, LOST_EXIT_CODE)

    def _ended(self, a: RayAgent, code: int) -> None:
        """The agent is over: free its actor (its resources go back to the cluster)."""
        import ray

        with self._lock:
            a.returncode = code
            actor, a.actor, a.run_ref, a.info_ref = a.actor, None, None, None
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def close(self) -> None:
        """Stop every agent this actuator started, end their actors, let go of Ray."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self._connected:
            return
        import ray

        with self._lock:
            agents = [a for lst in self._agents.values() for a in lst if a.actor is not None]
        try:
            # Placed agents stop gracefully; an actor still waiting for room is just killed.
            stops = {a.actor.stop.remote(self.stop_grace_s): a for a in agents
                     if a.returncode is None and a.pid is not None}
            if stops:
                ready, _ = ray.wait(list(stops), num_returns=len(stops),
                                    timeout=self.stop_grace_s + 10)
                for ref in ready:
                    with contextlib.suppress(Exception):
                        code = ray.get(ref, timeout=5)
                        with self._lock:
                            if stops[ref].returncode is None and code is not None:
                                stops[ref].returncode = int(code)
            for a in agents:
                try:
                    ray.kill(a.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                with self._lock:
                    a.actor = None
                    if a.returncode is None:
                        a.returncode = LOST_EXIT_CODE
        finally:
            if self._owns_ray:
                ray.shutdown()
                log.info("ray actuator: Ray shut down")


# -- the actor -----------------------------------------------------------------------------
class AgentStartError(RuntimeError):
    """The actor could not start its agent process (the message says why)."""


class AgentActor:
    """Runs one node's ``adaptrun agent`` as a child process (its own process group, output in
    ``log_path``) and ends it with the actor. Used through ``ray.remote(AgentActor)``.

    - A graceful end (``stop()``, the actor's exit path): SIGTERM to the agent's group (the
      agent's own signal handling stops its workers), SIGKILL after a grace.
    - The actor's process dies (``ray.kill``, a crash, its node): the agent goes as on a lost
      node. Ray SIGKILLs a dead worker's direct children, and the kernel does too where Ray
      does not (parent-death signal, Linux); neither reaches the agent's workers, which are
      its children. A small watcher, detached from the actor so that it outlives it, SIGKILLs
      the agent's whole group once the actor's process is gone, then exits; it exits by itself
      when the group ends first.
    """

    def __init__(self, argv: Sequence[str], log_path: str, env: dict | None = None,
                 cwd: str | None = None):
        self._argv = [str(a) for a in argv]
        self._log_path = log_path
        full_env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = str(v)
        self._env = full_env
        self._cwd = cwd if cwd and os.path.isdir(cwd) else None
        self._proc: subprocess.Popen | None = None
        self._error = ""
        self._started = threading.Event()
        # The child is started from a thread that lives exactly as long as the child: the
        # parent-death signal fires when the thread that forked it ends, not the process.
        self._thread = threading.Thread(target=self._supervise, name="adaptrun-agent",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error:
            raise AgentStartError(self._error)
        self._watch_group()
        atexit.register(self._terminate, 5.0)

    def _supervise(self) -> None:
        try:
            Path(self._log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    self._argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self._env, cwd=self._cwd, start_new_session=True,
                    preexec_fn=_parent_death_signal(signal.SIGKILL))
        except OSError as exc:
            self._error = (f"cannot start the agent ({exc}) on {socket.gethostname()}; "
                           f"check the agent command")
            return
        finally:
            self._started.set()
        self._proc.wait()

    def _watch_group(self) -> None:
        """Start the detached watcher of the agent's group (see the class docstring)."""
        try:
            with open(self._log_path, "ab") as out:
                launcher = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _GROUP_WATCHER, str(os.getpid()),
                     str(self._proc.pid)], stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
            launcher.wait(timeout=30)            # it forks the watcher and exits at once
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"adaptrun: no watcher for the agent's group ({exc}): if this actor's "
                  f"process dies, the agent's workers may outlive it", file=sys.stderr)

    def info(self) -> dict:
        return {"host": socket.gethostname(), "pid": self._proc.pid, "actor_pid": os.getpid()}

    def run(self) -> int:
        """Block until the agent exits; its exit code."""
        self._thread.join()
        return self._proc.returncode

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the agent's group, SIGKILL after ``grace_s``; the agent's exit code."""
        return self._terminate(grace_s)

    def _terminate(self, grace_s: float) -> int | None:
        p = self._proc
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode   # it ended and cleaned up itself
        if grace_s > 0:
            _signal_group(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(p.pid, signal.SIGKILL)    # what is left of its group: its workers
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return p.returncode

    def __del__(self):
        try:
            self._terminate(0.0)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# argv: the actor's pid, the agent's pid (= its process group). It forks once so that the
# watcher is no child of the actor (Ray kills those with it), then polls every 0.2 s.
_GROUP_WATCHER = """
import os, signal, sys, time
actor, group = int(sys.argv[1]), int(sys.argv[2])
if os.fork():
    os._exit(0)

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], fields[19]            # state, start time
    except OSError:
        return None

def alive(pid, started):
    if started is None:                         # no /proc: signal 0 says it exists
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    s = stat(pid)
    return s is not None and s[0] != "Z" and s[1] == started

first = stat(actor)
started = first[1] if first else None
if first is None and os.path.exists("/proc/self/stat"):
    started = "gone"                            # the actor died before the watcher looked
while True:
    try:
        os.killpg(group, 0)
    except OSError:
        break                                   # the agent's group ended: nothing to guard
    if not alive(actor, started):
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
        break
    time.sleep(0.2)
"""


def _parent_death_signal(sig: int):
    """A ``preexec_fn`` asking the kernel to send ``sig`` to the child when its parent thread
    ends (Linux ``PR_SET_PDEATHSIG``); None where there is no prctl."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:       # the parent died before the prctl
            os.kill(os.getpid(), sig)
    return preexec


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
