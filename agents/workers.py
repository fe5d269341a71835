"""One round's worker processes on this node: torchrun's launcher environment, spawn, watch, stop.

``WorkerGroup.start`` spawns ``nproc`` copies of the command with the environment torchrun
gives (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, ROLE_*, MASTER_ADDR/PORT,
TORCHELASTIC_*), except that ``TORCHELASTIC_USE_AGENT_STORE=False``: the workers' rank 0
hosts a fresh store for every round. Workers stay in the agent's process group, so stopping
the agent's group stops them too; ``ADAPTRUN_AGENT_PID`` names the agent, and a worker whose
agent dies (kill -9: no group stop) is killed by the kernel (``adaptrun.init`` asks for it),
so no worker trains on in a world its node left. ``outcome()`` classifies the group once every worker
exited: all 0 is ``SUCCEEDED``; only 0 and ``PLANNED_EXIT_CODE`` is ``PLANNED`` (saved at an
agreed step: re-form); anything else is ``FAILED`` (and is known as soon as one worker fails).

GPUs: every worker keeps the agent's ``CUDA_VISIBLE_DEVICES``, so the worker of LOCAL_RANK i
trains on the i-th visible GPU (``adaptrun.worker.distributed.resolve_device``).
``resolve_nproc("gpu")`` is one worker per visible GPU, as torchrun's; ``check_gpus`` refuses
more workers than visible GPUs on a node that has GPUs, unless ``ADAPTRUN_DEVICE=cpu``.
"""
from __future__ import annotations

import enum
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from adaptrun.worker.directive import PLANNED_EXIT_CODE
from adaptrun.worker.distributed import resolve_device, visible_gpus
from adaptrun.worker.errors import DeviceConfigError

__all__ = ["Outcome", "WorkerSpec", "WorkerGroup", "WarmWorker", "spawn_spares",
           "resolve_nproc", "check_gpus"]


def resolve_nproc(value: str | int, gpus: int | None = None) -> int:
    """Workers per node from ``--nproc-per-node``: a number >= 1, or ``"gpu"``: one per GPU
    visible here (``gpus``; default: as torch sees them). ValueError otherwise (a
    DeviceConfigError for "gpu" on a node without GPUs)."""
    if str(value).strip().lower() == "gpu":
        gpus = visible_gpus() if gpus is None else int(gpus)
        if gpus < 1:
            seen = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise DeviceConfigError(
                "--nproc-per-node gpu: this node has no visible GPUs (CUDA_VISIBLE_DEVICES="
                f"{'unset' if seen is None else repr(seen)}); give a number of workers instead")
        return gpus
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--nproc-per-node must be a number >= 1 or 'gpu', got {value!r}")
    return n


def check_gpus(nproc: int, gpus: int | None = None) -> None:
    """DeviceConfigError when the last of ``nproc`` workers would get no GPU of its own: the
    node has ``gpus`` visible GPUs (default: as torch sees them), fewer than ``nproc``, and
    the workers would train on them (``ADAPTRUN_DEVICE`` is not ``cpu``)."""
    try:
        resolve_device(None, nproc - 1, gpus)
    except DeviceConfigError as exc:
        raise DeviceConfigError(f"--nproc-per-node {nproc}: {exc}") from None


class Outcome(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PLANNED = "planned"
    PARKED = "parked"        # re-forming in process: alive, waiting for the next world
    FAILED = "failed"


@dataclass(frozen=True)
class WorkerSpec:
    command: tuple[str, ...]
    nproc: int
    job_id: str
    max_restarts: int
    env: dict            # the base environment (the agent's, plus its own settings)
    warm_start: bool = True

    def warm_command(self) -> list[str] | None:
        """The command through ``warm_start`` (None: not a Python script: start it plainly)."""
        cmd = list(self.command)
        if not self.warm_start or len(cmd) < 2:
            return None
        exe = os.path.basename(cmd[0])
        if not (exe.startswith("python") or cmd[0] == sys.executable):
            return None
        rest = cmd[1:]
        if rest[0] == "-m" and len(rest) >= 2 or rest[0].endswith(".py"):
            return [cmd[0], "-m", "adaptrun.agents.warm_start", "--"] + rest
        return None


class WarmWorker:
    """A ``warm_start`` process: torch imported, waiting for its round's environment."""

    def __init__(self, argv: list[str], env: dict):
        r, w = os.pipe()
        env = dict(env, ADAPTRUN_WARM_READY_FD=str(w), ADAPTRUN_AGENT_PID=str(os.getpid()))
        try:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, pass_fds=(w,))
        finally:
            os.close(w)
        self._ready_fd = r
        self._ready = False

    def ready(self) -> bool:
        """Imports done (or the process died: nothing to wait for)."""
        if not self._ready:
            if self.proc.poll() is not None:
                self._ready = True
            elif select.select([self._ready_fd], [], [], 0)[0]:
                self._ready = True
            if self._ready:
                os.close(self._ready_fd)
        return self._ready

    def go(self, env: dict) -> subprocess.Popen:
        """Start the round; stdin stays open as the process's agent channel (re-forms)."""
        try:
            self.proc.stdin.write((json.dumps(env) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                         # it died: the group sees its exit code
        if not self._ready:
            os.close(self._ready_fd)
            self._ready = True
        return self.proc

    def discard(self) -> None:
        if not self._ready:
            os.close(self._ready_fd)
            self._ready = True
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()


def spawn_spares(spec: WorkerSpec) -> list[WarmWorker] | None:
    """``nproc`` warm workers for the next round, or None when the command cannot warm-start."""
    argv = spec.warm_command()
    if argv is None:
        return None
    return [WarmWorker(argv, spec.env) for _ in range(spec.nproc)]


class WorkerGroup:
    def __init__(self, spec: WorkerSpec, group_rank: int, group_world_size: int,
                 master_addr: str, master_port: int, restart_count: int,
                 committed_step: int = 0):
        self.spec = spec
        self.group_rank = group_rank
        self.group_world_size = group_world_size
        self.world_size = group_world_size * spec.nproc
        self.master_addr = master_addr
        self.master_port = master_port
        self.restart_count = restart_count
        self.committed_step = committed_step   # the job's newest step: a world must restore it
        self.procs: list[subprocess.Popen] = []
        self.channels: list = []        # per local rank: the write end of its agent channel
        self.started_s = 0.0
        self.retired_s = 0.0

    def env_for(self, local_rank: int) -> dict:
        s = self.spec
        rank = self.group_rank * s.nproc + local_rank
        env = dict(s.env)
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(s.nproc), "GROUP_RANK": str(self.group_rank),
            "GROUP_WORLD_SIZE": str(self.group_world_size), "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(self.world_size), "ROLE_NAME": "default",
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            "TORCHELASTIC_RUN_ID": s.job_id,
            "TORCHELASTIC_RESTART_COUNT": str(self.restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(s.max_restarts),
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "ADAPTRUN_COMMITTED_STEP": str(self.committed_step),
        })
        return env

    def round_env(self, local_rank: int) -> dict:
        """What ``env_for`` adds to the base environment."""
        full = self.env_for(local_rank)
        return {k: v for k, v in full.items() if self.spec.env.get(k) != v}

    def start(self, spares: list[WarmWorker] | None = None) -> "WorkerGroup":
        """Start the workers: hand the round to ``spares`` (warm), else start them cold."""
        self.started_s = time.monotonic()
        if spares is None:
            spares = spawn_spares(self.spec)
        for local_rank in range(self.spec.nproc):
            if spares is not None:
                proc = spares[local_rank].go(self.round_env(local_rank))
                self.procs.append(proc)
                self.channels.append(proc.stdin)
            else:
                r, w = os.pipe()
                env = dict(self.env_for(local_rank), ADAPTRUN_AGENT_FD=str(r),
                           ADAPTRUN_AGENT_PID=str(os.getpid()))
                try:
                    self.procs.append(subprocess.Popen(list(self.spec.command), env=env,
                                                       pass_fds=(r,)))
                finally:
                    os.close(r)
                self.channels.append(os.fdopen(w, "wb"))
        return self

    def adopt(self, parked: "WorkerGroup") -> "WorkerGroup":
        """Continue ``parked``'s processes (they re-form in process) as this round's workers:
        each gets this round's environment through its channel."""
        self.started_s = time.monotonic()
        self.procs, self.channels = parked.procs, parked.channels
        for local_rank in range(self.spec.nproc):
            self.send(local_rank, {"env": self.round_env(local_rank)})
        return self

    def send(self, local_rank: int, message: dict) -> None:
        try:
            ch = self.channels[local_rank]
            ch.write((json.dumps(message) + "\n").encode())
            ch.flush()
        except (BrokenPipeError, OSError, IndexError, ValueError):
            pass                         # it died: the group sees its exit code

    def send_exit(self, code: int) -> None:
        for local_rank in range(len(self.procs)):
            self.send(local_rank, {"exit": code})

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def outcome(self) -> Outcome:
        codes = self.exit_codes()
        if any(c not in (None, 0, PLANNED_EXIT_CODE) for c in codes):
            return Outcome.FAILED
        if any(c is None for c in codes):
            return Outcome.RUNNING
        return Outcome.PLANNED if PLANNED_EXIT_CODE in codes else Outcome.SUCCEEDED

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self, grace_s: float = 0.0) -> None:
        """SIGTERM (when ``grace_s`` > 0) then SIGKILL whatever still runs; reap all."""
        if grace_s > 0:
            self.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.close_channels()

    def close_channels(self) -> None:
        for ch in self.channels:
            try:
                ch.close()
            except OSError:
                pass

    def describe_failure(self) -> str:
        return ", ".join(f"local rank {i}: exit {c}" for i, c in enumerate(self.exit_codes())
                         if c not in (None, 0, PLANNED_EXIT_CODE)) or "a peer node failed"
