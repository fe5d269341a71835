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
   - a planned re-form: the workers reach an agreed step and *park* (rank 0 marks the world
     ``parked``: their process, model and optimizer stay in memory). The agent joins the
     round of the directive's membership and hands each parked worker the new round's
     environment through its channel (a pipe: ``WorkerGroup.adopt``); the workers re-form in
     process and send the state from memory to the joiners. A node whose group rank is beyond
     the new node count tells its workers to exit and leaves (exit 0). This spends no
     restart. (A worker that exits 75 instead, having saved to disk, re-forms the old way);
   - a failure (a worker exited otherwise, or a peer agent flagged one in the round's store):
     it stops its workers and joins the next attempt with the survivors, up to
     ``max_restarts`` times; the workers restore the last periodic snapshot.

How a planned re-form flows (the controller decided: directive generation g, W workers)
- Every agent gets directive g. If W needs as many nodes as now, it is a batch-only change,
  written as is. Otherwise it is written with ``reform_at_step=0`` (the workers finish the
  step, snapshot, exit 75), and the next round is ``<job>-g<g>-a0`` with exactly W/nproc nodes.
- Membership, one order whatever the timing: a new agent learns the newest directive when it
  registers and the newest formed round from the store (``formed``, written by every agent
  the moment its rendezvous closes). A directive that grows the job and has not formed yet is
  joined; a job with neither starts at round 0; otherwise the agent waits for the next
  directive that grows the job (never in a closed round). A job that finished (the
  controller says so at registration, or ``final`` is in the store) starts nothing: exit 0.
- Scale-up: the actuator starts new agents; a new agent learns g and W when it registers,
  announces itself in the store (``g<g>/joiners``) and joins round g. The old agents keep
  training until every new agent has announced itself (up to ``ready_timeout_s``, the agent's
  ``--ready-timeout-s``; then they keep the old size, say so, and mark the directive
  ``g<g>/kept``), so the gap is the re-form itself, not the new agent's start. A new agent
  that comes after that (a slow image pull) does not join the kept directive's round, which
  never forms: it asks the controller to re-admit it and joins the directive issued for it.
- Scale-down: agents whose group rank is >= the new node count leave after the planned exit.

The rendezvous store: the controller hosts one for its jobs and says where at registration
(``--rdzv-endpoint`` overrides it); no agent is then a single point of failure. An agent with
neither hosts a store itself: one node only (see ``rendezvous``). When the controller restarts,
its store comes back empty: each agent reconnects and writes back what it knows of the job
(``job_store``); the workers never needed it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
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
                                                      RendezvousConnectionError,
                                                      RendezvousGracefulExitError,
                                                      RendezvousTimeoutError)

from adaptrun.worker.directive import (PLANNED_EXIT_CODE, STATUS_KEY, Directive, read_directive,
                                       write_directive)
from adaptrun.science.report import Report
from adaptrun.worker.errors import DeviceConfigError

from .controller_client import ClientCredentials, ControllerClient, JobBoundsSpec
from .job_store import STORE_ERRORS, JobStore
from .rendezvous import RendezvousConf, RoundSpec, end_round, fast_polling, join_round
from .health import AgentHealth
from .workers import Outcome, WarmWorker, WorkerGroup, WorkerSpec, check_gpus, spawn_spares

__all__ = ["AgentConfig", "Agent", "AgentError"]

log = logging.getLogger("adaptrun.agent")

FAILED_KEY = "failed/{}"      # in the job's keys, per round (run id): a worker failed there
RESTART_COUNT_KEY = "adaptrun/restart_count"
FORMED_KEY = "formed"          # in the job's agent store: the newest round that formed
FINAL_KEY = "final"            # "<run id> <nodes>": the job finished in that round
COMMITTED_KEY = "committed"    # the newest step the job's reports showed
TRAINED_KEY = "trained"        # the step at which rank 0 reported the job finished training
ALIVE_KEY = "alive"            # a counter every agent in the job bumps every ALIVE_EVERY_S
KEPT_KEY = "g{}/kept"          # the running world kept its size at this directive's generation
ALIVE_EVERY_S = 0.5
# A node waiting to join sees no bump this long: no agent runs the job (all were lost), so it
# starts the job's next failure round itself instead of waiting for a re-form.
ALIVE_DEAD_AFTER_S = 4.0
ASK_TO_JOIN_EVERY_S = 2.0


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
    controller_credentials: ClientCredentials | None = None   # TLS files, token
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
    parent_pid: int | None = None     # stop as on SIGTERM when this parent ends
    health_port: int | None = None    # serve /healthz here (``health``); None: not served
    health_host: str = "0.0.0.0"

    def nodes_for(self, workers: int) -> int:
        return max(1, math.ceil(workers / self.nproc_per_node))


class _Stopped(Exception):
    """SIGTERM/SIGINT reached the agent while no workers ran."""


class _KeptMeanwhile(Exception):
    """The directive a new node chose was kept (``_kept``) while its workers got ready."""


class ReportRelay:
    """Tails the workers' report file and hands reports to the controller client.

    At most one report per ``min_interval_s`` goes upstream (the newest; a report carries
    smoothed statistics, so the newest says what the skipped ones said): a fast job reports
    every few steps, and the controller rate-limits each job. What a skipped report said once
    (a re-form's gap, the script's metric, the job finished) is carried into the newest."""

    _FIELDS = {f.name for f in fields(Report)}

    def __init__(self, path: str, job_id: str, client: ControllerClient | None,
                 min_interval_s: float = 0.5):
        self.path = path
        self.job_id = job_id
        self.client = client
        self.min_interval_s = min_interval_s
        self.offset = 0
        self.relayed = 0
        self.last_step = 0
        self.finished = False         # rank 0 reported the last epoch done
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
                    new = Report(**{k: v for k, v in d.items() if k in self._FIELDS}).validate()
                    self._pending = _carry_once_fields(self._pending, new)
                    self.last_step = max(self.last_step, new.step)
                    self.finished = self.finished or new.finished
                except (ValueError, TypeError) as exc:
                    log.warning("dropping a report the workers wrote that is not valid: %s", exc)
        now = time.monotonic()
        if self._pending is not None and (flush or now - self._last_sent_s >= self.min_interval_s):
            if self.client is not None:
                self.client.report(self._pending)
            self.relayed += 1
            self._pending = None
            self._last_sent_s = now


def _carry_once_fields(old: Report | None, new: Report) -> Report:
    if old is None:
        return new
    keep = {}
    if not math.isnan(old.resize_gap_s) and math.isnan(new.resize_gap_s):
        keep["resize_gap_s"] = old.resize_gap_s
    if old.metric_name and not new.metric_name:
        keep.update(metric_name=old.metric_name, metric=old.metric)
    if old.finished and not new.finished:
        keep["finished"] = True
    return dataclasses.replace(new, **keep) if keep else new


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

    def _status(self) -> dict:
        store = self._connected()
        if store is None:
            return {}
        try:
            if not store.check([STATUS_KEY]):
                return {}
            return json.loads(store.get(STATUS_KEY))
        except (RuntimeError, OSError, ValueError):
            self._store = None
            return {}

    def saved_and_exiting(self) -> bool:
        return bool(self._status().get("exited"))

    def parked(self) -> bool:
        """Every rank reached the re-form and waits, in process, for its next world."""
        return bool(self._status().get("parked"))

    def directive(self) -> Directive | None:
        store = self._connected()
        try:
            return read_directive(store) if store is not None else None
        except (RuntimeError, OSError, ValueError):
            return None


def node_ordinal(node: str) -> int | None:
    """The ordinal a node's name ends in (``train-3`` of a StatefulSet, ``job-worker-3`` of a
    PyTorchJob, ``job-n3`` of the local actuator), or None."""
    m = _ORDINAL.search(node)
    return int(m.group(1)) if m else None


_ORDINAL = re.compile(r"(\d+)$")
ORDER_KEY = "order/{}"         # in a round's store: a group rank's leave-order key
# A cluster deletes the pods of a scale-down after the controller sent the directive; a
# SIGTERM is held this long for that directive before it counts as a plain stop.
SIGTERM_DIRECTIVE_WAIT_S = 1.0
PARENT_POLL_S = 0.5          # --exit-with-parent: how often the parent is looked for


@dataclass
class _RoundResult:
    outcome: Outcome
    group_rank: int
    nodes: int
    next_planned: RoundSpec | None = None   # the membership a planned re-form moves to
    peer_failed: bool = False
    order_rank: int = 0                     # place in the round by node ordinal

    @property
    def leaves(self) -> bool:
        """A planned re-form to fewer nodes lets this node go: it is among the highest
        ordinals, the pods a StatefulSet deletes on scale-down."""
        return (self.next_planned is not None and self.outcome in (Outcome.PARKED,
                                                                   Outcome.PLANNED)
                and self.order_rank >= self.next_planned.max_nodes)


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
        if c.nnodes_max > 1 and not c.rdzv_endpoint and not c.controller:
            raise AgentError("more than one node needs a shared rendezvous store: give "
                             "--controller HOST:PORT (it hosts one for its jobs) or "
                             "--rdzv-endpoint HOST:PORT")
        try:
            check_gpus(c.nproc_per_node)       # local rank i trains on the i-th visible GPU
        except DeviceConfigError as exc:
            raise AgentError(str(exc)) from None
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
        env.pop("ADAPTRUN_TOKEN", None)    # the job's credential is the agent's, not the script's
        if env.pop("ADAPTRUN_AGENT_QUIET_CPP_LOG", None):
            env.pop("TORCH_CPP_LOG_LEVEL", None)   # the CLI quieted the agent's, not theirs
        env["ADAPTRUN_REPORT_FILE"] = self.report_file
        if c.snapshot_dir:
            env["ADAPTRUN_SNAPSHOT_DIR"] = c.snapshot_dir
        self.wspec = WorkerSpec(tuple(c.command), c.nproc_per_node, c.job_id, c.max_restarts,
                                env, warm_start=c.warm_start)
        self._spares: list[WarmWorker] | None = None
        self._retiring: list[WorkerGroup] = []
        self._parked: WorkerGroup | None = None   # alive, waiting for the next round
        self.store: JobStore | None = None
        self._leaving = False    # a planned re-form let this node go: a signal is that leave
        self._heartbeat_stop = threading.Event()
        # A wait for one call (a join, a re-form) may take up to the join timeout.
        self.health = AgentHealth(wait_limit_s=config.rdzv_conf.join_timeout
                                  + config.rdzv_conf.close_timeout + 60.0)

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
        bounds = c.bounds or JobBoundsSpec(min_workers=c.nnodes_min * c.nproc_per_node,
                                           max_workers=c.nnodes_max * c.nproc_per_node)
        self.client = ControllerClient(c.controller, c.job_id, self.node, c.nproc_per_node,
                                       c.local_addr or socket.gethostname(), bounds,
                                       on_directive=self._on_directive,
                                       credentials=c.controller_credentials).start()
        if not self.client.connected.wait(c.controller_wait_s):
            log.warning("not registered with the controller at %s after %.1f s; starting "
                        "without it (it keeps trying in the background)", c.controller,
                        c.controller_wait_s)

    def _rdzv_endpoint(self) -> str | None:
        """The job's rendezvous store: --rdzv-endpoint, else the one the controller hosts (its
        registration says where; an empty host is the host the agent reached it at), else
        None (this agent hosts one: a single node). A job of several nodes waits for the
        controller up to ``join_timeout``: without a shared store it cannot form."""
        c = self.config
        if c.rdzv_endpoint or self.client is None:
            return c.rdzv_endpoint
        if not self.client.connected.is_set() and c.nnodes_max > 1:
            log.info("waiting for the controller at %s: it hosts the job's rendezvous store",
                     c.controller)
            deadline = time.monotonic() + c.rdzv_conf.join_timeout
            while not self.client.connected.wait(0.5):
                if self._stop_signal is not None:
                    raise _Stopped()
                if time.monotonic() > deadline:
                    raise AgentError(
                        f"the controller at {c.controller} did not answer within "
                        f"{c.rdzv_conf.join_timeout:.0f} s (join_timeout), and a job of several "
                        f"nodes needs the rendezvous store it hosts: check the controller, or "
                        f"give --rdzv-endpoint of a store all agents share")
        endpoint = self.client.rdzv_endpoint
        if not endpoint:
            if c.nnodes_max > 1:
                raise AgentError(f"the controller at {c.controller} hosts no rendezvous store "
                                 f"(started with --rdzv-port none?), and a job of several nodes "
                                 f"needs one: give --rdzv-endpoint HOST:PORT")
            return None
        host, _, port = endpoint.rpartition(":")
        if not host:
            host = c.controller.rpartition(":")[0].strip("[]")
        log.info("rendezvous store: %s:%s (hosted by the controller)", host, port)
        return f"{host}:{port}"

    # -- signals --------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        if self._workers is None and not self._leaving:
            raise _Stopped()

    # -- the main loop --------------------------------------------------------------------
    def run(self) -> int:
        """Run the job on this node until it ends; return the agent's exit code."""
        c = self.config
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        fast_polling(c.rdzv_conf.poll_s)
        if c.health_port is not None:
            port = self.health.serve(c.health_host, c.health_port)
            log.info("health: http://%s:%d/healthz", c.health_host, port)
        if c.parent_pid is not None:
            self._watch_parent(c.parent_pid)
        try:
            self._ensure_spares()   # their imports overlap the agent's own start-up
            self._start_client()
            self.store = JobStore(self._rdzv_endpoint(), c.rdzv_conf, c.local_addr, c.job_id)
            self.relay = ReportRelay(self.report_file, c.job_id, self.client)
            code = self._rounds()
            if self.store.hosting:
                self._outlive_the_job()
            return code
        except _Stopped:
            log.info("stopped by signal %s", self._stop_signal)
            return 128 + (self._stop_signal or signal.SIGTERM)
        except AgentError as exc:
            log.error("%s", exc)
            return 1
        except (RendezvousClosedError, RendezvousGracefulExitError) as exc:
            log.error("the job's rendezvous round is closed (%s): this agent came after the "
                      "round it was told to join; start agents for a running job through the "
                      "controller (its actuator) so that they join the next round", exc)
            return 1
        finally:
            self.health.beat("done")
            self._heartbeat_stop.set()
            if self._workers is not None:
                self._workers.stop()
            if self._parked is not None:
                self._parked.stop()
            self._discard_spares()
            self._reap_retiring(wait_s=10.0)
            self._close_client()
            self.health.close()
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _watch_parent(self, parent: int) -> None:
        """Started by ``adaptrun run``: when it ends (even by kill -9, which lets it stop
        nothing) this process is re-parented; stop then as on SIGTERM, workers included."""
        def watch():
            while not self._heartbeat_stop.wait(PARENT_POLL_S):
                if os.getppid() != parent:
                    log.warning("the process that started this agent (pid %d) ended: "
                                "stopping", parent)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
        threading.Thread(target=watch, name="adaptrun-parent-watch", daemon=True).start()

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

    # -- membership: which round this agent joins ------------------------------------------
    def _formed(self) -> dict | None:
        """The job's newest formed round: {"generation", "attempt", "nodes"} (None: none yet).
        Every agent writes it the moment its rendezvous closes."""
        self.store.reconnect()
        return self.store.call(lambda s: json.loads(s.get(FORMED_KEY))
                               if s.check([FORMED_KEY]) else None)

    def _trained_step(self) -> int | None:
        """The step at which the job finished training (this node's relay saw rank 0 say so,
        or another agent did), or None while it trains."""
        self.relay.pump(flush=True)
        if self.relay.finished:
            return self.relay.last_step
        return self.store.call(lambda s: int(s.get(TRAINED_KEY))
                               if s.check([TRAINED_KEY]) else None, None)

    def _share_trained(self) -> None:
        """Once rank 0 said the job finished training, tell the other agents (``trained``)."""
        if self.relay.finished:
            self.store.remember(TRAINED_KEY, str(self.relay.last_step))

    def _job_done(self) -> bool:
        if self.client is not None and self.client.job_done.is_set():
            return True
        return bool(self.store.call(lambda s: s.check([FINAL_KEY]), False))

    def _grows(self, d, formed: dict | None) -> bool:
        """Directive ``d`` asks for more nodes than the newest formed round has, is newer,
        and the running world has not kept its size instead (``_kept``)."""
        if d is None or d.generation <= 0 or d.world_size <= 0:
            return False
        if formed is None:
            return True
        return (d.generation > formed["generation"]
                and self.config.nodes_for(d.world_size) > formed["nodes"]
                and not self._kept(d.generation))

    def _kept(self, generation: int) -> bool:
        """The running world kept its size at directive ``generation``: its new nodes did not
        all announce themselves within ``ready_timeout_s``, so its round never forms. A node
        that comes later asks to be re-admitted, and joins the directive issued for it."""
        return bool(self.store.call(lambda s: s.check([KEPT_KEY.format(generation)]), False))

    def _first_round(self) -> RoundSpec | None:
        """The round this agent joins (None: the job is done, start nothing).

        One order, whatever the timing: a directive that grows the job and has not formed yet
        is joined (the old world keeps training until this agent has announced itself); a job
        with no formed round and no directive starts at round 0; otherwise the job runs
        without this node (say, its pod was restarted after a failure): the agent asks the
        controller to re-admit it (``ask_to_join``: a job short of its size gets a new
        directive, which grows it) and waits for a directive that adds it, never for a round
        that has closed. When no agent runs the job any more (nobody bumps ``alive`` for
        ``ALIVE_DEAD_AFTER_S``), it starts the job's next failure round itself, as survivors
        would: the workers restore the newest snapshot."""
        c = self.config
        if self._job_done():
            return None
        d, formed = self._latest_directive(), self._formed()
        if not self._grows(d, formed):
            if formed is None and (d is None or d.generation == 0):
                return RoundSpec(0, 0, c.nnodes_min, c.nnodes_max)
            log.info("job %s already runs on %d node(s) (generation %d): waiting for a "
                     "directive that adds this node", c.job_id, formed["nodes"] if formed else 0,
                     formed["generation"] if formed else 0)
            deadline = time.monotonic() + c.rdzv_conf.join_timeout
            alive, alive_changed_s, asked_s = None, time.monotonic(), -math.inf
            while not self._grows(d, formed):
                if self._stop_signal is not None:
                    raise _Stopped()
                if self._job_done():
                    return None
                now = time.monotonic()
                if now > deadline:
                    raise AgentError(f"no directive added this node to job {c.job_id} within "
                                     f"{c.rdzv_conf.join_timeout:.0f} s (join_timeout)")
                count = self.store.call(lambda s: int(s.add(ALIVE_KEY, 0)), alive)
                if count != alive:
                    alive, alive_changed_s = count, now
                elif formed is not None and now - alive_changed_s > ALIVE_DEAD_AFTER_S:
                    n = formed["nodes"]
                    log.info("no agent runs job %s (none seen for %.0f s): starting its next "
                             "round from the newest snapshot", c.job_id, ALIVE_DEAD_AFTER_S)
                    return RoundSpec(formed["generation"], formed["attempt"] + 1,
                                     min(c.nnodes_min, n), max(n, 1))
                if self.client is not None and now - asked_s > ASK_TO_JOIN_EVERY_S:
                    asked_s = now
                    self.client.ask_to_join()
                time.sleep(0.05)
                d, formed = self._latest_directive(), self._formed()
        deadline = time.monotonic() + c.ready_timeout_s
        while not self._spares_ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._job_done():
            return None
        # The directive to join is the newest one that grows the job, read once the workers
        # are ready (a start takes seconds): the old world only ever waits for the joiners
        # of its newest directive.
        newest = self._latest_directive()
        if newest is not None and newest.generation > d.generation and self._grows(
                newest, self._formed()):
            d = newest
        elif self._kept(d.generation):
            log.info("job %s kept its size at directive %d before this node was ready; asking "
                     "to join again", c.job_id, d.generation)
            raise _KeptMeanwhile()
        n = c.nodes_for(d.world_size)
        self.store.keys.add(f"g{d.generation}/joiners", 1)   # the old world may stop now
        log.info("joining job %s at directive %d (%d workers on %d nodes)", c.job_id,
                 d.generation, d.world_size, n)
        return RoundSpec(d.generation, 0, n, n)

    def _join(self, spec: RoundSpec, conf: RendezvousConf):
        """``join_round`` over the job's store; a store lost before or during the join (its
        host, the controller, restarted) is reconnected and the same round joined again: the
        other agents do the same, and the round's name is new to the restarted store."""
        c = self.config
        self.health.beat("joining", generation=spec.generation, attempt=spec.attempt)
        while True:
            if self.store.lost and not self.store.wait_until_back(
                    conf.join_timeout, lambda: self._stop_signal is not None):
                if self._stop_signal is not None:
                    raise _Stopped()
                raise AgentError(f"the rendezvous store at {self.store.address[0]}:"
                                 f"{self.store.address[1]} is gone and did not come back "
                                 f"within {conf.join_timeout:.0f} s (join_timeout)")
            try:
                return join_round(self.store.rdzv, c.job_id, spec, conf, c.local_addr)
            except RendezvousConnectionError as exc:
                if self.store.hosting:
                    raise
                self.store.mark_lost(exc)

    def _join_first(self):
        """(spec, (handler, info)) of the first round this agent joins; (None, None) when the
        job is done. A round of a directive that never forms (the old world kept its size, or
        the job finished meanwhile) is given up after twice ``ready_timeout_s``, and the
        choice is made again."""
        c = self.config
        while True:
            try:
                spec = self._first_round()
            except _KeptMeanwhile:
                continue
            if spec is None:
                return None, None
            conf = c.rdzv_conf if spec.generation == 0 else dataclasses.replace(
                c.rdzv_conf, join_timeout=min(c.rdzv_conf.join_timeout, 2 * c.ready_timeout_s))
            try:
                return spec, self._join(spec, conf)
            except RendezvousTimeoutError:
                if spec.generation == 0:
                    raise
                log.warning("round %s did not form within %.0f s; looking again at what the "
                            "job needs", spec.run_id(c.job_id), conf.join_timeout)

    def _rounds(self) -> int:
        c = self.config
        spec, joined = self._join_first()
        if spec is None:
            log.info("job %s is done: this agent starts no workers", c.job_id)
            return 0
        self._start_heartbeat()
        restarts = 0
        while True:
            handler, info = joined or self._join(spec, c.rdzv_conf)
            joined = None
            try:
                self.store.remember(FORMED_KEY, json.dumps({"generation": spec.generation,
                                                            "attempt": spec.attempt,
                                                            "nodes": info.world_size}))
                if self._job_done():
                    log.info("job %s finished while this round formed: this agent starts no "
                             "workers", c.job_id)
                    return 0
                result = self._run_round(info, spec, restarts)
            finally:
                try:
                    end_round(handler)
                except Exception:  # noqa: BLE001 - the round is over either way
                    log.debug("ending the round's keep-alive failed", exc_info=True)
            if self._stop_signal is not None and not result.leaves:
                log.info("stopped by signal %d", self._stop_signal)
                return 128 + self._stop_signal
            if result.outcome not in (Outcome.SUCCEEDED, Outcome.PARKED) and not result.leaves:
                self._ensure_spares()   # warm up while the next rendezvous runs
            if result.outcome is Outcome.SUCCEEDED:
                log.info("all workers finished: job %s done on this node", c.job_id)
                # For the agent that hosts the store: it must stay until all are done.
                self.store.call(lambda s: s.add(f"done/{spec.run_id(c.job_id)}", 1))
                self.store.remember(FINAL_KEY, f"{spec.run_id(c.job_id)} {result.nodes}")
                return 0
            if result.outcome is Outcome.PARKED:
                nxt = result.next_planned
                if result.leaves:
                    self._leaving = True
                    log.info("planned re-form to %d nodes: node %s (place %d by ordinal) "
                             "leaves the job", nxt.max_nodes, self.node, result.order_rank)
                    parked, self._parked = self._parked, None
                    parked.send_exit(0)
                    codes = [p.wait() for p in parked.procs]
                    parked.close_channels()
                    return 0 if all(code == 0 for code in codes) else 1
                spec = nxt
                continue
            if result.outcome is Outcome.PLANNED:
                nxt = result.next_planned
                if nxt is None:
                    # Saved and exited without our directive (a peer node was stopped): re-form
                    # with whoever is left, without spending a restart.
                    log.info("workers saved and exited (not our directive): re-forming")
                    spec = RoundSpec(spec.generation, spec.attempt + 1,
                                     min(c.nnodes_min, result.nodes), result.nodes)
                    continue
                if result.leaves:
                    log.info("planned re-form to %d nodes: node %s (place %d by ordinal) "
                             "leaves the job", nxt.max_nodes, self.node, result.order_rank)
                    return 0
                spec = nxt
                continue
            trained = self._trained_step()
            if trained is not None:
                # The workers finished the job's epochs and cleared their snapshots; what
                # failed ran after that (the script's own ending). A restart would find no
                # state and train again from step 0: say so instead.
                log.error("the workers exited with an error after job %s finished training "
                          "(step %d): not restarting; see the worker output above",
                          c.job_id, trained)
                return 1
            restarts += 1
            if restarts > c.max_restarts:
                log.error("workers failed and the %d restarts (--max-restarts) are used up; "
                          "giving up: see the worker output above", c.max_restarts)
                return 1
            log.warning("restarting the workers with the survivors (restart %d of %d)",
                        restarts, c.max_restarts)
            spec = RoundSpec(spec.generation, spec.attempt + 1,
                             min(c.nnodes_min, result.nodes), result.nodes)

    def _start_heartbeat(self) -> None:
        """Bump the job's ``alive`` counter every ``ALIVE_EVERY_S`` while this agent is in the
        job (in a round or joining one), over a store connection of its own: a node waiting
        to join tells from it whether any agent still runs the job."""
        (host, port), prefix = self.store.address, self.store.prefix

        def beat():
            store = None
            while not self._heartbeat_stop.wait(ALIVE_EVERY_S):
                try:
                    if store is None:
                        with socket.create_connection((host, port), timeout=0.5):
                            pass              # probe: a client that cannot connect logs a trace
                        store = dist.PrefixStore(
                            prefix,
                            dist.TCPStore(host, port, None, False, timedelta(seconds=5),
                                          wait_for_workers=False))
                    store.add(ALIVE_KEY, 1)
                except (RuntimeError, OSError):
                    store = None              # the store is gone: try again (it may be back)
                    self._heartbeat_stop.wait(2.0)
        threading.Thread(target=beat, name="adaptrun-heartbeat", daemon=True).start()

    def _outlive_the_job(self) -> None:
        """This agent hosts the rendezvous store: wait until every agent of the job's last
        round has finished before taking the store down (bounded by ``join_timeout``)."""
        c = self.config
        deadline = time.monotonic() + c.rdzv_conf.join_timeout
        logged = False
        job_store = self.store.keys
        while time.monotonic() < deadline and self._stop_signal is None:
            try:
                if job_store.check([FINAL_KEY]):
                    run_id, nodes = job_store.get(FINAL_KEY).decode().split()
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
    def _run_round(self, info, spec: RoundSpec, restarts: int) -> _RoundResult:
        c = self.config
        round_store = info.store
        run_id = spec.run_id(c.job_id)
        group_rank, nodes = info.rank, info.world_size
        # Every worker of a world must see the same TORCHELASTIC_RESTART_COUNT (the worker
        # library keys its process group by it): group rank 0's count is the world's.
        if group_rank == 0:
            round_store.set(RESTART_COUNT_KEY, str(restarts))
        restart_count = int(round_store.get(RESTART_COUNT_KEY))
        order_rank = self._order_rank(round_store, group_rank, nodes)
        bsi = info.bootstrap_store_info
        committed = self.store.call(lambda s: int(s.get(COMMITTED_KEY))
                                    if s.check([COMMITTED_KEY]) else 0, 0)
        workers = WorkerGroup(self.wspec, group_rank, nodes, bsi.master_addr, bsi.master_port,
                              restart_count, committed_step=committed)
        parked, self._parked = self._parked, None
        if parked is not None:
            self._workers = workers.adopt(parked)
            how = "re-formed in process"
        else:
            how = "warm" if self._spares is not None else "cold"
            self._workers = workers.start(self._take_spares())
        log.info("%d %s workers (ranks %d..%d of %d)", c.nproc_per_node, how,
                 group_rank * c.nproc_per_node, (group_rank + 1) * c.nproc_per_node - 1,
                 workers.world_size)
        state = _DirectiveState(WorkerStore(bsi.master_addr, bsi.master_port), group_rank,
                                nodes, order_rank=order_rank, round_generation=spec.generation)
        early = False
        forwarded = False
        signalled_s = 0.0
        peer_failed = False
        try:
            self.health.beat("training", generation=spec.generation, nodes=nodes,
                             group_rank=group_rank)
            while True:
                time.sleep(c.monitor_interval_s)
                self.health.beat("training")
                self.relay.pump()
                if self.relay.last_step > committed:
                    committed = self.relay.last_step
                    self.store.remember(COMMITTED_KEY, str(committed))
                    self._share_trained()
                self.store.reconnect()            # after its host restarted (no-op otherwise)
                if self._retiring:
                    self._reap_retiring()
                if (self._spares is None and c.standby_after_s >= 0
                        and time.monotonic() - workers.started_s > c.standby_after_s):
                    self._ensure_spares()   # a failure restart then needs no cold start
                outcome = workers.outcome()
                if outcome is not Outcome.RUNNING:
                    break
                if self._stop_signal is not None and not forwarded:
                    now = time.monotonic()
                    signalled_s = signalled_s or now
                    leaving = (state.planned is not None
                               and state.order_rank >= state.planned.max_nodes)
                    if leaving and now - signalled_s < c.term_grace_s / 2:
                        pass   # a planned re-form lets this node go: SIGTERM is that leave
                    elif (not leaving and self.client is not None
                          and now - signalled_s < SIGTERM_DIRECTIVE_WAIT_S):
                        pass   # the scale-down's directive may be a moment behind the signal
                    else:
                        # The library saves at the next step boundary and exits 75.
                        workers.signal_all(signal.SIGTERM)
                        forwarded = True
                        stop_deadline = now + c.term_grace_s
                if forwarded and time.monotonic() > stop_deadline:
                    workers.stop()
                    outcome = workers.outcome()
                    break
                if self._peer_failed(run_id):
                    peer_failed = True
                    outcome = Outcome.FAILED
                    break
                d = self._latest_directive()
                if d is not None and d.generation > state.written:
                    try:
                        self._directive_step(d, state)
                    except STORE_ERRORS as exc:   # the rendezvous store is gone
                        self.store.mark_lost(exc)
                        log.debug("directive %d not handled yet: %s", d.generation, exc)
                if (state.planned is not None or forwarded) and state.writer.saved_and_exiting():
                    early, outcome = True, Outcome.PLANNED   # every rank saved: go on
                    break
                # Parked is looked for while a re-form is planned; otherwise (a peer agent wrote
                # the directive before the controller's copy reached this one) once a second.
                now = time.monotonic()
                look = state.planned is not None or now - state.parked_checked_s > 1.0
                if look:
                    state.parked_checked_s = now
                if look and not forwarded and state.writer.parked():
                    outcome = Outcome.PARKED                 # every rank waits in process
                    if state.planned is None:                # a peer agent wrote the directive
                        d = state.writer.directive()
                        n = c.nodes_for(d.target_world_size) if d and d.target_world_size \
                            else nodes
                        state.planned = RoundSpec(d.generation if d else spec.generation, 0, n, n)
                    break
        finally:
            self.relay.pump()
            self._share_trained()
            if not peer_failed and workers.outcome() is Outcome.FAILED:
                log.warning("workers failed (%s): telling the other agents",
                            workers.describe_failure())
                # (if the store is gone, they notice the failure in their collectives anyway)
                self.store.call(lambda s: s.set(FAILED_KEY.format(run_id), self.node))
            elif peer_failed:
                log.warning("a peer agent reported a worker failure: stopping this node's "
                            "workers")
            if outcome is Outcome.PARKED:
                state.writer.close()
                self._parked = workers           # the next round adopts them (or they leave)
            elif early:
                state.writer.close()             # rank 0's store server need not wait on us
                workers.retired_s = time.monotonic()
                self._retiring.append(workers)   # reaped while the next round starts
            else:
                workers.stop()
            self._workers = None
        return _RoundResult(outcome, group_rank, nodes, state.planned, peer_failed, order_rank)

    def _order_rank(self, round_store, group_rank: int, nodes: int) -> int:
        """This node's place in the round by (ordinal of its name, group rank): a scale-down
        to N nodes keeps places 0..N-1. torch orders group ranks by address and pid, which on
        a cluster follow no pod ordinal; a StatefulSet deletes the highest ordinals, so those
        must be the nodes a planned re-form lets go."""
        ordinal = node_ordinal(self.node)
        mine = f"{ordinal if ordinal is not None else 1 << 30} {group_rank}"
        try:
            round_store.set(ORDER_KEY.format(group_rank), mine)
            keys = [ORDER_KEY.format(r) for r in range(nodes)]
            round_store.wait(keys, timedelta(seconds=self.config.rdzv_conf.join_timeout))
            order = sorted(tuple(int(x) for x in round_store.get(k).decode().split())
                           for k in keys)
            return order.index(tuple(int(x) for x in mine.split()))
        except (RuntimeError, OSError, ValueError) as exc:
            log.warning("no ordinal order for this round (%s): using group rank %d",
                        exc, group_rank)
            return group_rank

    def _peer_failed(self, run_id: str) -> bool:
        return bool(self.store.call(lambda s: s.check([FAILED_KEY.format(run_id)]), False))

    def _directive_step(self, d, st: "_DirectiveState") -> None:
        """Write directive ``d`` into the workers' store when it is time to.

        A batch-only change is written at once (by every agent: the same bytes). A re-form
        is written by group rank 0 only, once the next round can start at once: every agent
        that stays has warm spares, and the new agents of a scale-up have announced theirs
        (waiting at most ``ready_timeout_s``; without the new agents it keeps the size)."""
        c = self.config
        nodes = st.nodes
        target = c.nodes_for(d.world_size) if d.world_size > 0 else nodes
        # A directive this round (or an earlier one) already formed from is only its batch: a
        # failure round of fewer nodes must not re-form to that directive's closed round.
        # A directive the job kept its size at (a world before a failure restart) stays kept:
        # its late nodes were sent on to ask for a new one.
        reform = (target != nodes and d.generation > st.round_generation
                  and not (target > nodes and self._kept(d.generation)))
        if reform:
            st.planned = RoundSpec(d.generation, 0, target, target)
            if st.order_rank < target and d.generation not in st.announced:
                self._ensure_spares()
                if self._spares_ready():
                    self.store.keys.add(f"g{d.generation}/warm", 1)
                    st.announced.add(d.generation)
            if st.group_rank != 0:
                return                      # rank 0 writes it; we only get ready
            with self._lock:
                seen = self._directive_seen_s.get(d.generation, time.monotonic())
            waited = time.monotonic() - seen
            joiners = int(self.store.keys.add(f"g{d.generation}/joiners", 0))
            warm = int(self.store.keys.add(f"g{d.generation}/warm", 0))
            ready = joiners >= max(0, target - nodes) and warm >= min(nodes, target)
            if not ready and waited < c.ready_timeout_s:
                return                      # keep training until the next world can start
            if joiners < target - nodes:
                log.warning("directive %d asks for %d nodes but only %d new node(s) arrived "
                            "within %.0f s; keeping %d nodes", d.generation, target, joiners,
                            c.ready_timeout_s, nodes)
                self.store.remember(KEPT_KEY.format(d.generation), "1")
                reform = False
                st.planned = None
        if not reform and st.planned is not None and st.written < st.planned.generation:
            st.planned = None               # a newer directive replaces a re-form not begun
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
    order_rank: int = 0
    round_generation: int = 0
    written: int = 0
    planned: RoundSpec | None = None
    parked_checked_s: float = 0.0
    announced: set = field(default_factory=set)
