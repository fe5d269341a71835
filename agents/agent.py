"""The node agent: one per node and job; runs the node's workers through elastic rounds.

What it does, in order
1. Connects to the job's rendezvous store (``rendezvous.connect_store``) and registers with
   the controller (``ControllerClient``; waits at most ``controller_wait_s`` for it, then
   goes on without it: training never waits on the controller).
2. Joins a round (``rendezvous.join_round``), starts the node's workers (``workers``) with
   torchrun's environment, and watches them: it relays rank 0's reports (a JSON-lines file
   it owns, ``ADAPTRUN_REPORT_FILE``) to the controller and writes the controller's
   directives into the workers' store (``adaptrun.worker.directive``).
3. Ends the round when the workers end it:
   - all exited 0: the job is done, the agent exits 0;
   - a planned re-form (workers saved at an agreed step and exited 75): it joins the round of
     the directive's membership, or leaves (exit 0) when its group rank is beyond the new node
     count. This spends no restart;
   - a failure (a worker exited otherwise, or a peer agent flagged one in the round's store):
     it stops its workers and joins the next attempt with the survivors, up to
     ``max_restarts`` times; the workers restore the last periodic snapshot.

How a planned re-form flows (the controller decided: directive generation g, W workers)
- Every agent gets directive g. If W needs as many nodes as now, it is a batch-only change,
  written as is. Otherwise it is written with ``reform_at_step=0`` (the workers finish the
  step, snapshot, exit 75), and the next round is ``<job>-g<g>-a0`` with exactly W/nproc nodes.
- Scale-up: the actuator starts new agents; a new agent learns g and W when it registers,
  announces itself in the store (``g<g>/joiners``) and joins round g. The old agents keep
  training until every new agent has announced itself (up to ``ready_timeout_s``; then they
  keep the old size and say so), so the gap is the re-form itself, not the new agent's start.
- Scale-down: agents whose group rank is >= the new node count leave after the planned exit.

The rendezvous store: see ``rendezvous`` (with ``--rdzv-endpoint`` of a store the controller
or another process hosts, no agent is a single point of failure; otherwise the agent that
hosts it is one).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError,
                                                      RendezvousGracefulExitError)

from adaptrun.worker.directive import PLANNED_EXIT_CODE, STATUS_KEY, Directive, write_directive
from adaptrun.science.report import Report

from .controller_client import ControllerClient, JobBoundsSpec
from .rendezvous import (RendezvousConf, RoundSpec, connect_store, end_round, fast_polling,
                         join_round)
from .workers import Outcome, WarmWorker, WorkerGroup, WorkerSpec, spawn_spares

__all__ = ["AgentConfig", "Agent", "AgentError"]

log = logging.getLogger("adaptrun.agent")

FAILED_KEY = "adaptrun/failed"
RESTART_COUNT_KEY = "adaptrun/restart_count"


class AgentError(RuntimeError):
    """The agent cannot run the job (bad settings, restarts used up); the message says why."""


@dataclass(frozen=True)
class AgentConfig:
    job_id: str
    command: tuple[str, ...]
    nproc_per_node: int = 1
    nnodes_min: int = 1
    nnodes_max: int = 1
    controller: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_conf: RendezvousConf = field(default_factory=RendezvousConf)
    max_restarts: int = 3
    node: str = ""
    local_addr: str = "127.0.0.1"
    bounds: JobBoundsSpec | None = None
    snapshot_dir: str | None = None
    controller_wait_s: float = 3.0
    ready_timeout_s: float = 60.0
    monitor_interval_s: float = 0.05
    term_grace_s: float = 15.0
    warm_start: bool = True
    standby_after_s: float = 5.0      # warm spares for a failure restart, once training runs

    def nodes_for(self, workers: int) -> int:
        return max(1, math.ceil(workers / self.nproc_per_node))


class _Stopped(Exception):
    """SIGTERM/SIGINT reached the agent while no workers ran."""


class ReportRelay:
    """Tails the workers' report file and hands reports to the controller client.

    At most one report per ``min_interval_s`` goes upstream (the newest; a report carries
    smoothed statistics, so the newest says what the skipped ones said): a fast job reports
    every few steps, and the controller rate-limits each job."""

    _FIELDS = {f.name for f in fields(Report)}

    def __init__(self, path: str, job_id: str, client: ControllerClient | None,
                 min_interval_s: float = 0.5):
        self.path = path
        self.job_id = job_id
        self.client = client
        self.min_interval_s = min_interval_s
        self.offset = 0
        self.relayed = 0
        self._pending: Report | None = None
        self._last_sent_s = -math.inf

    def pump(self, flush: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n")
        if end >= 0:
            self.offset += end + 1
            for line in data[:end].splitlines():
                try:
                    d = json.loads(line)
                    d["job_id"] = self.job_id   # workers name the job by their run id
                    self._pending = Report(**{k: v for k, v in d.items()
                                              if k in self._FIELDS}).validate()
                except (ValueError, TypeError) as exc:
                    log.warning("dropping a report the workers wrote that is not valid: %s", exc)
        now = time.monotonic()
        if self._pending is not None and (flush or now - self._last_sent_s >= self.min_interval_s):
            if self.client is not None:
                self.client.report(self._pending)
            self.relayed += 1
            self._pending = None
            self._last_sent_s = now


class WorkerStore:
    """A client of one round's workers' store (hosted by worker rank 0), connected lazily.

    The agent writes directives there and reads ``adaptrun/status``: rank 0 marks it
    ``"exited": true`` after every rank has saved and passed the final barrier of a planned
    exit, so the next round can start while the old processes are still tearing down."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._store = None
        self._next_try = 0.0

    def _connected(self):
        now = time.monotonic()
        if self._store is None and now >= self._next_try:
            try:
                # Probe first: a TCPStore client that cannot connect logs a stack trace.
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                self._store = dist.TCPStore(self.host, self.port, None, False,
                                            timedelta(seconds=2), wait_for_workers=False)
            except (RuntimeError, OSError):   # rank 0 not up yet (or gone): try again soon
                self._next_try = now + 0.25
        return self._store

    def write(self, d: Directive) -> bool:
        store = self._connected()
        if store is None:
            return False
        try:
            write_directive(store, d)
            return True
        except (RuntimeError, OSError):
            self._store = None
            return False

    def close(self) -> None:
        self._store = None

    def saved_and_exiting(self) -> bool:
        store = self._connected()
        if store is None:
            return False
        try:
            if not store.check([STATUS_KEY]):
                return False
            return bool(json.loads(store.get(STATUS_KEY)).get("exited"))
        except (RuntimeError, OSError, ValueError):
            self._store = None
            return False


@dataclass
class _RoundResult:
    outcome: Outcome
    group_rank: int
    nodes: int
    next_planned: RoundSpec | None = None   # the membership a planned re-form moves to
    peer_failed: bool = False


class Agent:
    def __init__(self, config: AgentConfig):
        c = config
        if not c.command:
            raise AgentError("no training command: give it after `--`, e.g. "
                             "`adaptrun agent ... -- python train.py`")
        if not 1 <= c.nnodes_min <= c.nnodes_max:
            raise AgentError(f"--nnodes: need 1 <= MIN <= MAX, got {c.nnodes_min}:{c.nnodes_max}")
        script = next((a for a in c.command[1:2] if a.endswith(".py")), None)
        if script is not None and not os.path.isfile(script):
            raise AgentError(f"the training script {script!r} does not exist (looked from "
                             f"{os.getcwd()}); check the command after `--`")
        if c.nnodes_max > 1 and not c.rdzv_endpoint:
            raise AgentError("more than one node needs --rdzv-endpoint HOST:PORT (the store "
                             "that all agents of the job share)")
        self.config = config
        self.node = c.node or f"{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self._directive = None          # newest pb.Directive from the controller
        self._directive_seen_s: dict[int, float] = {}
        self._stop_signal: int | None = None
        self._workers: WorkerGroup | None = None
        self.client: ControllerClient | None = None
        self._workdir = tempfile.mkdtemp(prefix=f"adaptrun-agent-{c.job_id}-")
        self.report_file = os.path.join(self._workdir, "reports.jsonl")
        self.relay: ReportRelay | None = None
        env = dict(os.environ)
        env["ADAPTRUN_REPORT_FILE"] = self.report_file
        if c.snapshot_dir:
            env["ADAPTRUN_SNAPSHOT_DIR"] = c.snapshot_dir
        self.wspec = WorkerSpec(tuple(c.command), c.nproc_per_node, c.job_id, c.max_restarts,
                                env, warm_start=c.warm_start)
        self._spares: list[WarmWorker] | None = None
        self._retiring: list[WorkerGroup] = []
        self._hosting = False
        self._store_lost = False

    # -- the controller's side ------------------------------------------------------------
    def _on_directive(self, d) -> None:
        with self._lock:
            self._directive = d
            self._directive_seen_s.setdefault(d.generation, time.monotonic())

    def _latest_directive(self):
        with self._lock:
            return self._directive

    def _start_client(self) -> None:
        c = self.config
        if not c.controller:
            log.info("no --controller: the job runs elastic but not adaptive")
            return
        bounds = c.bounds or JobBoundsSpec(
            min_workers=c.nnodes_min * c.nproc_per_node,
            max_workers=c.nnodes_max * c.nproc_per_node, init_batch=64,
            max_global_batch=4096, local_batch_min=1, local_batch_max=1024)
        self.client = ControllerClient(c.controller, c.job_id, self.node, c.nproc_per_node,
                                       c.local_addr or socket.gethostname(), bounds,
                                       on_directive=self._on_directive).start()
        if not self.client.connected.wait(c.controller_wait_s):
            log.warning("not registered with the controller at %s after %.1f s; starting "
                        "without it (it keeps trying in the background)", c.controller,
                        c.controller_wait_s)

    # -- signals --------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        if self._workers is None:
            raise _Stopped()

    # -- the main loop --------------------------------------------------------------------
    def run(self) -> int:
        """Run the job on this node until it ends; return the agent's exit code."""
        c = self.config
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        fast_polling(c.rdzv_conf.poll_s)
        rdzv_store = None
        try:
            self._ensure_spares()   # their imports overlap the agent's own start-up
            rdzv_store, self._hosting = connect_store(c.rdzv_endpoint, c.rdzv_conf,
                                                      c.local_addr)
            job_store = dist.PrefixStore(f"adaptrun/agent/{c.job_id}/", rdzv_store)
            self._start_client()
            self.relay = ReportRelay(self.report_file, c.job_id, self.client)
            code = self._rounds(rdzv_store, job_store)
            if self._hosting:
                self._outlive_the_job(job_store)
            return code
        except _Stopped:
            log.info("stopped by signal %s", self._stop_signal)
            return 128 + (self._stop_signal or signal.SIGTERM)
        except (RendezvousClosedError, RendezvousGracefulExitError) as exc:
            log.error("the job's rendezvous round is closed (%s): this agent came after the "
                      "round it was told to join; start agents for a running job through the "
                      "controller (its actuator) so that they join the next round", exc)
            return 1
        finally:
            if self._workers is not None:
                self._workers.stop()
            self._discard_spares()
            self._reap_retiring(wait_s=10.0)
            self._close_client()
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _close_client(self) -> None:
        if self.client is None:
            return
        if self.relay is not None:
            self.relay.pump(flush=True)
        deadline = time.monotonic() + 1.0   # let the last reports go (never blocks long)
        while self.client.connected.is_set() and self.client._queue \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client.close(timeout_s=2.0)

    def _first_round(self, job_store) -> RoundSpec:
        c = self.config
        d = self._latest_directive()
        if d is not None and d.generation > 0 and d.world_size > 0:
            # A job that already runs: this agent joins the membership the controller set.
            n = c.nodes_for(d.world_size)
            deadline = time.monotonic() + c.ready_timeout_s
            while not self._spares_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            job_store.add(f"g{d.generation}/joiners", 1)   # the old world may stop now
            log.info("joining job %s at directive %d (%d workers on %d nodes)", c.job_id,
                     d.generation, d.world_size, n)
            return RoundSpec(d.generation, 0, n, n)
        return RoundSpec(0, 0, c.nnodes_min, c.nnodes_max)

    def _rounds(self, rdzv_store, job_store) -> int:
        c = self.config
        spec = self._first_round(job_store)
        restarts = 0
        while True:
            handler, info = join_round(rdzv_store, c.job_id, spec, c.rdzv_conf, c.local_addr)
            try:
                result = self._run_round(info, spec, restarts, job_store)
            finally:
                try:
                    end_round(handler)
                except Exception:  # noqa: BLE001 - the round is over either way
                    log.debug("ending the round's keep-alive failed", exc_info=True)
            if self._stop_signal is not None:
                log.info("stopped by signal %d", self._stop_signal)
                return 128 + self._stop_signal
            if result.outcome is not Outcome.SUCCEEDED and not (
                    result.next_planned is not None
                    and result.group_rank >= result.next_planned.max_nodes):
                self._ensure_spares()   # warm up while the next rendezvous runs
            if result.outcome is Outcome.SUCCEEDED:
                log.info("all workers finished: job %s done on this node", c.job_id)
                try:   # for the agent that hosts the store: it must stay until all are done
                    job_store.add(f"done/{spec.run_id(c.job_id)}", 1)
                    job_store.set("final", f"{spec.run_id(c.job_id)} {result.nodes}")
                except (RuntimeError, OSError):
                    pass
                return 0
            if result.outcome is Outcome.PLANNED:
                nxt = result.next_planned
                if nxt is None:
                    # Saved and exited without our directive (a peer node was stopped): re-form
                    # with whoever is left, without spending a restart.
                    log.info("workers saved and exited (not our directive): re-forming")
                    spec = RoundSpec(spec.generation, spec.attempt + 1,
                                     min(c.nnodes_min, result.nodes), result.nodes)
                    continue
                if result.group_rank >= nxt.max_nodes:
                    log.info("planned re-form to %d nodes: group rank %d leaves the job",
                             nxt.max_nodes, result.group_rank)
                    return 0
                spec = nxt
                continue
            restarts += 1
            if restarts > c.max_restarts:
                log.error("workers failed and the %d restarts (--max-restarts) are used up; "
                          "giving up: see the worker output above", c.max_restarts)
                return 1
            log.warning("restarting the workers with the survivors (restart %d of %d)",
                        restarts, c.max_restarts)
            spec = RoundSpec(spec.generation, spec.attempt + 1,
                             min(c.nnodes_min, result.nodes), result.nodes)

    def _outlive_the_job(self, job_store) -> None:
        """This agent hosts the rendezvous store: wait until every agent of the job's last
        round has finished before taking the store down (bounded by ``join_timeout``)."""
        c = self.config
        deadline = time.monotonic() + c.rdzv_conf.join_timeout
        logged = False
        while time.monotonic() < deadline and self._stop_signal is None:
            try:
                if job_store.check(["final"]):
                    run_id, nodes = job_store.get("final").decode().split()
                    if int(job_store.add(f"done/{run_id}", 0)) >= int(nodes):
                        return
            except (RuntimeError, OSError, ValueError):
                return
            if not logged:
                log.info("this agent hosts the rendezvous store: waiting for the job's other "
                         "agents to finish before exiting")
                logged = True
            time.sleep(0.1)

    # -- old worlds' processes ---------------------------------------------------------------
    def _reap_retiring(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        for group in list(self._retiring):
            while group.outcome() is Outcome.RUNNING and time.monotonic() < deadline:
                time.sleep(0.05)
            if group.outcome() is Outcome.RUNNING:
                if wait_s > 0:
                    group.stop()
                else:
                    continue
            codes = group.exit_codes()
            log.debug("the previous world's workers exited %.2f s after they saved",
                      time.monotonic() - group.retired_s)
            if any(c not in (0, PLANNED_EXIT_CODE) for c in codes):
                log.warning("a worker of the previous world exited with %s after it had saved",
                            codes)
            self._retiring.remove(group)

    # -- warm spares ----------------------------------------------------------------------
    def _ensure_spares(self) -> None:
        if self._spares is None:
            self._spares = spawn_spares(self.wspec)

    def _spares_ready(self) -> bool:
        return self._spares is None or all(w.ready() for w in self._spares)

    def _take_spares(self) -> list[WarmWorker] | None:
        spares, self._spares = self._spares, None
        if spares is not None and any(w.proc.poll() is not None for w in spares):
            # e.g. the command's interpreter cannot import adaptrun: never fail the job on an
            # optimisation, start workers plainly from now on.
            log.warning("a warm-start worker exited before its round (exit %s); starting "
                        "workers without warm start from now on",
                        [w.proc.poll() for w in spares])
            for w in spares:
                w.discard()
            self.wspec = dataclasses.replace(self.wspec, warm_start=False)
            return None
        return spares

    def _discard_spares(self) -> None:
        for w in self._take_spares() or []:
            w.discard()

    # -- one round ------------------------------------------------------------------------
    def _run_round(self, info, spec: RoundSpec, restarts: int, job_store) -> _RoundResult:
        c = self.config
        round_store = info.store
        group_rank, nodes = info.rank, info.world_size
        # Every worker of a world must see the same TORCHELASTIC_RESTART_COUNT (the worker
        # library keys its process group by it): group rank 0's count is the world's.
        if group_rank == 0:
            round_store.set(RESTART_COUNT_KEY, str(restarts))
        restart_count = int(round_store.get(RESTART_COUNT_KEY))
        bsi = info.bootstrap_store_info
        workers = WorkerGroup(self.wspec, group_rank, nodes, bsi.master_addr, bsi.master_port,
                              restart_count)
        warm = self._spares is not None
        self._workers = workers.start(self._take_spares())
        log.info("started %d %s workers (ranks %d..%d of %d)", c.nproc_per_node,
                 "warm" if warm else "cold", group_rank * c.nproc_per_node,
                 (group_rank + 1) * c.nproc_per_node - 1, workers.world_size)
        state = _DirectiveState(WorkerStore(bsi.master_addr, bsi.master_port), group_rank,
                                nodes)
        early = False
        forwarded = False
        peer_failed = False
        try:
            while True:
                time.sleep(c.monitor_interval_s)
                self.relay.pump()
                if self._retiring:
                    self._reap_retiring()
                if (self._spares is None and c.standby_after_s >= 0
                        and time.monotonic() - workers.started_s > c.standby_after_s):
                    self._ensure_spares()   # a failure restart then needs no cold start
                outcome = workers.outcome()
                if outcome is not Outcome.RUNNING:
                    break
                if self._stop_signal is not None and not forwarded:
                    # The library saves at the next step boundary and exits 75.
                    workers.signal_all(signal.SIGTERM)
                    forwarded = True
                    stop_deadline = time.monotonic() + c.term_grace_s
                if forwarded and time.monotonic() > stop_deadline:
                    workers.stop()
                    outcome = workers.outcome()
                    break
                if self._peer_failed(round_store):
                    peer_failed = True
                    outcome = Outcome.FAILED
                    break
                d = self._latest_directive()
                if d is not None and d.generation > state.written:
                    try:
                        self._directive_step(d, state, job_store)
                    except (RuntimeError, OSError) as exc:   # the rendezvous store is gone
                        log.debug("directive %d not handled yet: %s", d.generation, exc)
                if (state.planned is not None or forwarded) and state.writer.saved_and_exiting():
                    early, outcome = True, Outcome.PLANNED   # every rank saved: go on
                    break
        finally:
            self.relay.pump()
            if not peer_failed and workers.outcome() is Outcome.FAILED:
                log.warning("workers failed (%s): telling the other agents",
                            workers.describe_failure())
                try:
                    round_store.set(FAILED_KEY, self.node)
                except Exception:  # noqa: BLE001 - they will notice the failure anyway
                    pass
            elif peer_failed:
                log.warning("a peer agent reported a worker failure: stopping this node's "
                            "workers")
            if early:
                state.writer.close()             # rank 0's store server need not wait on us
                workers.retired_s = time.monotonic()
                self._retiring.append(workers)   # reaped while the next round starts
            else:
                workers.stop()
            self._workers = None
        return _RoundResult(outcome, group_rank, nodes, state.planned, peer_failed)

    def _peer_failed(self, round_store) -> bool:
        try:
            return round_store.check([FAILED_KEY])
        except (RuntimeError, OSError) as exc:
            # The store is gone (its host ended): keep watching our own workers.
            if not self._store_lost:
                log.warning("lost the rendezvous store (%s); the workers go on, but this agent "
                            "cannot re-form them", exc)
                self._store_lost = True
            return False

    def _directive_step(self, d, st: "_DirectiveState", job_store) -> None:
        """Write directive ``d`` into the workers' store when it is time to.

        A batch-only change is written at once (by every agent: the same bytes). A re-form
        is written by group rank 0 only, once the next round can start at once: every agent
        that stays has warm spares, and the new agents of a scale-up have announced theirs
        (waiting at most ``ready_timeout_s``; without the new agents it keeps the size)."""
        c = self.config
        nodes = st.nodes
        target = c.nodes_for(d.world_size) if d.world_size > 0 else nodes
        reform = target != nodes
        if reform:
            st.planned = RoundSpec(d.generation, 0, target, target)
            if st.group_rank < target and d.generation not in st.announced:
                self._ensure_spares()
                if self._spares_ready():
                    job_store.add(f"g{d.generation}/warm", 1)
                    st.announced.add(d.generation)
            if st.group_rank != 0:
                return                      # rank 0 writes it; we only get ready
            with self._lock:
                seen = self._directive_seen_s.get(d.generation, time.monotonic())
            waited = time.monotonic() - seen
            joiners = int(job_store.add(f"g{d.generation}/joiners", 0))
            warm = int(job_store.add(f"g{d.generation}/warm", 0))
            ready = joiners >= max(0, target - nodes) and warm >= min(nodes, target)
            if not ready and waited < c.ready_timeout_s:
                return                      # keep training until the next world can start
            if joiners < target - nodes:
                log.warning("directive %d asks for %d nodes but only %d new node(s) arrived "
                            "within %.0f s; keeping %d nodes", d.generation, target, joiners,
                            c.ready_timeout_s, nodes)
                reform = False
                st.planned = None
        directive = Directive(generation=d.generation, global_batch=d.global_batch,
                              local_batch=d.local_batch, accum_steps=d.accum_steps,
                              target_world_size=d.world_size,
                              reform_at_step=0 if reform else None, reason=d.reason)
        if not st.writer.write(directive):
            return
        st.written = d.generation
        if reform:
            log.info("directive %d: re-forming %d -> %d nodes at the next step boundary",
                     d.generation, nodes, target)


@dataclass
class _DirectiveState:
    writer: WorkerStore
    group_rank: int
    nodes: int
    written: int = 0
    planned: RoundSpec | None = None
    announced: set = field(default_factory=set)
