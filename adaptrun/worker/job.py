"""The running job as one worker sees it, and what happens at a step boundary.

One ``Job`` per process, created by ``init()``. It owns the state registry, restores the
newest snapshot as soon as the process group exists (``state.exchange_newest``), and runs the
*step boundary*: the point just before a step's first micro-batch is read (and at the end of
an epoch), where the user's scheduler and bookkeeping for the previous step are done. There,
in this order, on every rank at the same step:

1. the previous step is committed (the sampler cursor moves past its examples);
2. a directive learned during the previous step is applied (``directive``);
3. a snapshot is written every ``ADAPTRUN_SNAPSHOT_EVERY`` steps (default 50) to node-local
   storage by each node's local rank 0 (and to ``ADAPTRUN_CHECKPOINT_DIR`` by rank 0). These
   periodic snapshots are asynchronous (``ADAPTRUN_SNAPSHOT_ASYNC=0`` turns that off): on the
   step, a copy of the state that aliases nothing live (``state.detached_copy``); off the step,
   on one background thread, ``torch.save`` and the atomic write. At most one write is in
   flight: a due step that finds the previous write unfinished *waits* for it (and says so
   once on stderr) rather than skipping, so the work a kill can cost stays one interval plus
   one write, never several intervals, and copies never pile up. Every other snapshot (a
   planned exit, SIGTERM, ``finish``, leaving a re-form with 75) is synchronous and first joins
   the write in flight, so an older write can neither land after a newer one nor be lost;
4. if a stop was agreed (a planned re-form reached its step, or the launcher sent SIGTERM to
   any rank): under adaptrun's agent a planned re-form happens in process
   (``reform_in_process``: no snapshot, the state stays in memory and goes peer to peer to
   the ranks that join); otherwise (torchrun, or SIGTERM) every rank snapshots and exits
   with ``PLANNED_EXIT_CODE``.

Snapshots are on by default under a launcher; alone they are on only when
``ADAPTRUN_SNAPSHOT_DIR`` or ``ADAPTRUN_CHECKPOINT_DIR`` is set (so a second ``python train.py``
starts afresh). A SIGTERM that no step boundary follows within ``ADAPTRUN_TERM_GRACE_S``
(default 10 s) ends the process with 143.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import checkpoint, contract, directive
from . import distributed
from .memory import DeviceMemory, MemoryBound
from .distributed import WorldInfo
from .errors import MissingStateError, NotInitializedError
from .state import (RNGState, StateRegistry, detached_copy, encode, encode_snapshot,
                    exchange_newest, fill_deferred, save_snapshot, snapshot_of)

__all__ = ["init", "Job", "JobState", "current", "register_state", "on_world_formed"]


@dataclass
class JobState:
    epoch: int = 0
    step: int = 0            # committed optimizer steps
    last_step_wall: float = 0.0   # time.time() when the last committed step ended
    planned: bool = False    # saved for a planned re-form: the next world measures its gap
    worlds: int = 0          # worlds formed before this one (adaptrun.world().generation)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.last_step_wall = float(state.get("last_step_wall", 0.0))
        self.planned = bool(state.get("planned", False))
        self.worlds = int(state.get("worlds", 0))


class Job:
    def __init__(self, world: WorldInfo, memory_limit=None):
        self.world = world
        self.memory = DeviceMemory.for_job(world.device, memory_limit)
        self.memory_bound = MemoryBound()     # the local batch the device holds (agreed)
        self.registry = StateRegistry()
        self.state = JobState()
        self.parallel = None          # the AdaptiveDataParallel, once built
        self.loader = None            # the AdaptiveDataLoader, once built
        self.snapshot_every_steps = int(os.environ.get("ADAPTRUN_SNAPSHOT_EVERY", "50"))
        self.local_dir = checkpoint.local_dir(world.run_id)
        self.persistent_dir = checkpoint.persistent_dir()
        self.snapshots_on = world.launched or bool(
            os.environ.get("ADAPTRUN_SNAPSHOT_DIR") or self.persistent_dir)
        self.snapshot_async = os.environ.get("ADAPTRUN_SNAPSHOT_ASYNC", "1") != "0"
        self.last_snapshot_step = -1
        self.snapshot_wait_s = 0.0    # time due async steps waited for the previous write
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._copied: threading.Event | None = None   # the writer copied what steps change
        self._warned_slow_write = False
        self._copy_buffers: list = []     # the CPU tensors of the last copy, reused by the next
        self.restored_step: int | None = None
        self.state_in_sync = False    # every rank restored the same newest state
        self.term_requested = False
        self.stop_agreed = False
        self.num_epochs = 0           # remaining_epochs(n) sets it: the run's length
        self.finished = False         # the last epoch is done
        self.channel = AgentChannel.from_env()   # adaptrun's agent: re-form in process
        self._parked_store = None
        self.reform_callbacks: list = []    # adaptrun.on_reform(fn)
    # ---- restore -------------------------------------------------------------------
    def restore(self) -> None:
        dirs = [self.local_dir, self.persistent_dir] if self.snapshots_on else []
        for d in self._snapshot_targets():      # writes a killed process left unfinished
            checkpoint.clean_temp(d)
        agreed: dict = {}
        found = exchange_newest(self.world.rank, self.world.world_size, dirs, agreed=agreed,
                                device=self.world.device)
        # Every rank holds the same state now (or none has any): DDP need not broadcast it.
        self.state_in_sync = agreed.get("step", -1) >= 0
        if found is not None:
            self.registry.restored, self.registry.restored_from = found
            self.restored_step = int(found[0]["step"])
            # Only a step this node has on disk counts as snapshotted: a state received from
            # a peer (a joiner's) must still be written here at the next planned exit.
            local = checkpoint.newest(self.local_dir) if self.snapshots_on else None
            if local is not None and local[0] == self.restored_step:
                self.last_snapshot_step = self.restored_step
        committed = int(os.environ.get("ADAPTRUN_COMMITTED_STEP") or 0)
        if found is None and committed > 0:
            raise MissingStateError(
                f"job {self.world.run_id} has committed {committed} steps, but this world of "
                f"{self.world.world_size} found no snapshot of them (looked in {dirs or 'none'}): "
                "it will not train the job again from step 0; give the nodes the job's "
                "snapshots (ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR) or start a new job")
        self.registry.register("adaptrun.job", self.state)
        if found is not None:
            self.state.worlds += 1            # a restarted job's world is a new one
        self.registry.register("adaptrun.rng", RNGState())
        self.registry.register("adaptrun.memory", self.memory_bound)

    # ---- step boundary -------------------------------------------------------------
    def step_boundary(self) -> None:
        if self.loader is not None:
            self.loader._commit_in_flight()
        if self.state.planned:        # restored from a planned exit's snapshot
            self._measure_resize_gap()
        if self.parallel is not None:
            self.parallel._at_boundary()
        step = self.state.step
        due = (self.snapshot_every_steps > 0 and step % self.snapshot_every_steps == 0)
        if self.stop_agreed:
            self.state.planned = True
            if self.channel is not None and not self.term_requested:
                self.reform_in_process()          # state stays in memory: no snapshot
                return
        if self.snapshots_on and step != self.last_snapshot_step and (due or self.stop_agreed):
            self.snapshot(background=self.snapshot_async and not self.stop_agreed)
        if self.stop_agreed:
            self.planned_exit()

    def snapshot(self, background: bool = False) -> None:
        """Save the state of this step boundary, after the write in flight (if any) is done.
        Synchronous: on disk when this returns. Background: copied now, written by a thread."""
        step = self.state.step
        was_writing = self._join_writer()
        if background:
            self.snapshot_wait_s += was_writing[1]
        if background and was_writing[0] and not self._warned_slow_write:
            self._warned_slow_write = True
            sys.stderr.write(
                f"adaptrun: the snapshot write before step {step} was still running when the "
                f"next one was due; the step waited {was_writing[1]:.2f} s for it. Snapshots "
                f"every {self.snapshot_every_steps} steps are more than this storage keeps up "
                "with: raise ADAPTRUN_SNAPSHOT_EVERY\n")
        snap = snapshot_of(self.registry, step, self.state.epoch)   # every rank: state_dict()
        targets = self._snapshot_targets()
        self.last_snapshot_step = step
        if not targets:
            return
        if not background:
            self._write(encode_snapshot(snap), step, targets)
            return
        # The model's parameters and the optimizer's state change only when the optimizer
        # steps: the writer copies them while the next step computes, and that step's
        # optimizer pre-hook waits for it (``wait_for_copy``). The rest is copied now.
        pending: list = []
        copy = detached_copy(snap, reuse=self._copy_buffers, defer=self._stepped_storage(),
                             deferred=pending)
        self._copied = threading.Event()
        self._writer = threading.Thread(target=self._write_in_background,
                                        args=(copy, pending, self._copied, step, targets),
                                        name=f"adaptrun-snapshot-{step}")
        self._writer.start()      # not a daemon: an exiting interpreter lets it finish

    def _stepped_storage(self) -> set:
        """Storage addresses of the CPU tensors only ``optimizer.step()`` changes: the
        wrapped model's parameters and its optimizer's state (empty without the wrapper,
        whose optimizer pre-hook is what waits for their copy)."""
        par = self.parallel
        if par is None:
            return set()
        tensors = list(par.module.parameters()) + [
            v for st in par.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        return {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}

    def wait_for_copy(self) -> None:
        """Before anything changes the parameters or the optimizer's state: the snapshot
        in flight has copied them."""
        copied, self._copied = self._copied, None
        if copied is not None:
            copied.wait()

    def _snapshot_targets(self) -> list:
        """The directories this rank writes snapshots to."""
        if not self.snapshots_on:
            return []
        targets = [self.local_dir] if self.world.local_rank == 0 else []
        if self.world.rank == 0 and self.persistent_dir is not None:
            targets.append(self.persistent_dir)
        return targets

    @staticmethod
    def _write(data, step: int, targets: list) -> None:
        for d in targets:
            checkpoint.write(d, step, data)

    def _write_in_background(self, snap: dict, pending: list, copied: threading.Event,
                             step: int, targets: list) -> None:
        try:
            try:
                fill_deferred(pending)
            finally:
                copied.set()
            # Streamed into the file: torch.save into memory first would hold the GIL for
            # the whole copy, and the training thread would wait on it.
            self._write(lambda f: save_snapshot(snap, f), step, targets)
        except BaseException as exc:  # noqa: BLE001 - raised on the main thread at the join
            self._writer_error = exc

    def _join_writer(self) -> tuple[bool, float]:
        """Wait for the background write, if any; (whether it was still running, seconds
        waited). A write that failed raises here, on the training thread."""
        writer, self._writer = self._writer, None
        if writer is None:
            return False, 0.0
        running = writer.is_alive()
        t0 = time.monotonic()
        writer.join()
        waited = time.monotonic() - t0
        exc, self._writer_error = self._writer_error, None
        if exc is not None:
            raise RuntimeError(
                f"adaptrun: writing the snapshot of a previous step failed "
                f"({type(exc).__name__}: {exc}); check the space and permissions of "
                f"{', '.join(str(d) for d in self._snapshot_targets())} (ADAPTRUN_SNAPSHOT_DIR / "
                "ADAPTRUN_CHECKPOINT_DIR)") from exc
        return running, waited

    def reform_in_process(self) -> None:
        """A planned re-form under adaptrun's agent: keep this process and its state.

        Every rank passes a barrier, rank 0 marks the world ``parked`` in its store (kept up
        until the next re-form, so every agent can read it), and the process group is torn
        down. The agent then sends this process either the next world's environment (it
        stays: the group re-forms over the new store, the newest state goes from a holder's
        memory to the ranks that lack it, DDP is rebuilt) or an exit code (its node leaves;
        75 asks for a snapshot first)."""
        self.stop_agreed = False
        # No write in flight across a re-form: a joiner on this node cleans unfinished temp
        # files (``restore``), and a process that leaves must not take a write with it.
        self._join_writer()
        if self.world.world_size > 1:
            dist.barrier()
        store = distributed.job_store()
        if self.world.rank == 0 and store is not None:
            store.set(directive.STATUS_KEY, json.dumps(
                {"step": self.state.step, "epoch": self.state.epoch, "parked": True}))
        self._parked_store = store
        contract.retire_groups(f"the world of {self.world.world_size} formed at generation "
                               f"{self.state.worlds}")
        distributed.shutdown()
        msg = self.channel.receive(self.world.timeout_s)
        if msg is None:
            sys.stderr.write("adaptrun: the agent went away during a re-form; exiting\n")
            raise SystemExit(1)
        if "exit" in msg:
            code = int(msg["exit"])
            if code == directive.PLANNED_EXIT_CODE and self.snapshots_on:
                self.snapshot()                   # leaving without a new world: keep the state
            sys.stdout.flush()
            raise SystemExit(code)
        os.environ.update({k: str(v) for k, v in msg["env"].items()})
        t0 = time.perf_counter()
        distributed.form_world(self.world.backend, self.world.timeout_s, into=self.world,
                               device=self.world.device)
        t1 = time.perf_counter()
        exchange_newest(self.world.rank, self.world.world_size, [], memory=(
            self.state.step, lambda: snapshot_of(self.registry, self.state.step,
                                                 self.state.epoch)), device=self.world.device)
        t2 = time.perf_counter()
        self.state.worlds += 1                # the same on every rank: all hold the newest
        if self.parallel is not None:
            self.parallel._rebuild()
        if self.world.rank == 0:
            # Where a resize's time goes, for whoever finds one slow: one line per re-form.
            sys.stderr.write(
                f"adaptrun: re-formed in process into a world of {self.world.world_size} at "
                f"step {self.state.step}: group {t1 - t0:.2f} s, newest state to the ranks "
                f"without it {t2 - t1:.2f} s, DDP rebuilt {time.perf_counter() - t2:.2f} s "
                f"(with the wait for new ranks to build their model)\n")
        self._measure_resize_gap()        # the new world's first step comes next
        now = contract.world()
        for fn in list(self.reform_callbacks):
            fn(now)

    def _measure_resize_gap(self) -> None:
        """Just before the first step of a world a planned re-form made: the gap since the old
        world's last step is what the resize cost (reported; the policy weighs it)."""
        self.state.planned = False
        if self.parallel is not None and self.state.last_step_wall > 0:
            self.parallel._resize_gap_s = max(0.0, time.time() - self.state.last_step_wall)

    def planned_exit(self) -> None:
        self._join_writer()           # a periodic write of this step may still be in flight
        if self.world.world_size > 1:
            dist.barrier()            # every node's snapshot is on disk before anyone leaves
        store = distributed.job_store()
        if self.world.rank == 0 and store is not None:
            try:
                store.set(directive.STATUS_KEY, json.dumps(
                    {"step": self.state.step, "epoch": self.state.epoch, "exited": True}))
            except Exception:
                pass
        distributed.shutdown()
        sys.stdout.flush()
        raise SystemExit(directive.PLANNED_EXIT_CODE)

    # ---- epochs --------------------------------------------------------------------
    def end_epoch(self) -> None:
        if self.loader is not None:
            self.loader._commit_in_flight()
        self.state.epoch += 1

    def finish(self) -> None:
        self.finished = True
        self._join_writer()           # before the final write and before clearing the dir
        if self.world.rank == 0 and self.parallel is not None:
            self.parallel._report()       # says the job is done (finished=True)
        if self.world.rank == 0 and self.persistent_dir is not None:
            checkpoint.write(self.persistent_dir, self.state.step,
                             encode(self.registry, self.state.step, self.state.epoch))
        if self.world.world_size > 1:
            dist.barrier()
        if self.world.local_rank == 0 and self.snapshots_on:
            checkpoint.clear(self.local_dir)

    # ---- SIGTERM -------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self.term_requested = True
        grace = float(os.environ.get("ADAPTRUN_TERM_GRACE_S", "10"))
        timer = threading.Timer(grace, os._exit, args=(128 + signal.SIGTERM,))
        timer.daemon = True
        timer.start()
        if self.parallel is None:       # not training yet: nothing to save
            raise SystemExit(128 + signal.SIGTERM)


class AgentChannel:
    """JSON lines from adaptrun's agent (a pipe, ``ADAPTRUN_AGENT_FD``): how a parked worker
    learns its next world. Absent under other launchers (torchrun): re-forms then restart."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = b""

    @classmethod
    def from_env(cls) -> "AgentChannel | None":
        fd = os.environ.get("ADAPTRUN_AGENT_FD", "")
        if not fd.isdigit() or os.environ.get("ADAPTRUN_REFORM_IN_PROCESS", "1") == "0":
            return None
        try:
            os.fstat(int(fd))
        except OSError:
            return None
        return cls(int(fd))

    def receive(self, timeout_s: float) -> dict | None:
        """The next message; None when the agent closed the pipe or said nothing in time."""
        import select
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)


_job: Job | None = None


def init(backend: str | None = None, timeout_s: float | None = None,
         device: str | None = None, memory_limit=None) -> WorldInfo:
    """``adaptrun.init()``: form this worker's world (``distributed.form_world``: the launcher's
    environment, or a world of one alone) and restore the job's newest state into it.
    ``device`` (default ``ADAPTRUN_DEVICE``, else ``cuda:<LOCAL_RANK>`` with a GPU, else
    ``cpu``) is where the job lives: ``world.device``. ``memory_limit`` (default
    ``ADAPTRUN_MEMORY_LIMIT``; bytes or "300M", "2G") caps this worker's memory: the local batch
    stays within it (``memory``). Idempotent; returns who this worker is."""
    if distributed.is_initialized() and _job is not None:
        return distributed.world()
    _die_with_agent()
    world = distributed.form_world(backend, timeout_s, device=device)
    on_world_formed(world, memory_limit)
    return world


_PR_SET_PDEATHSIG = 1                    # linux/prctl.h


def _die_with_agent() -> None:
    """Under adaptrun's agent (``ADAPTRUN_AGENT_PID``), never outlive it: a worker whose agent
    was killed (kill -9 leaves no one to stop it) would train on in a world its node left.
    The kernel sends SIGKILL when the agent ends (Linux ``PR_SET_PDEATHSIG``); an agent that
    ended before this ends the worker here."""
    agent = os.environ.pop("ADAPTRUN_AGENT_PID", "")
    if not agent.isdigit():
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return                           # no prctl (not Linux): as before
    if os.getppid() != int(agent):
        os._exit(128 + signal.SIGKILL)


def on_world_formed(world: WorldInfo, memory_limit=None) -> Job:
    """Called by ``init()``: create the job context and restore the newest snapshot."""
    global _job
    _job = Job(world, memory_limit)
    _job.restore()
    if threading.current_thread() is threading.main_thread() and world.launched:
        signal.signal(signal.SIGTERM, _job._on_sigterm)
    return _job


def current(what: str = "this") -> Job:
    if _job is None:
        raise NotInitializedError(
            f"{what} needs the process group: call adaptrun.init() first, at the top of the script")
    return _job


def register_state(name: str, obj) -> None:
    """Save and restore ``obj`` (state_dict/load_state_dict) with the job, under ``name``."""
    current("adaptrun.register_state").registry.register(name, obj)


def restored_step() -> int | None:
    """The step of the snapshot this process restored, or None when it started afresh."""
    return current("adaptrun.restored_step").restored_step
