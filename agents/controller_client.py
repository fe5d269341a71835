"""The agent's side of the control plane: register, stream reports, receive directives.

``ControllerClient(...).start()`` returns at once; a background thread keeps one *session*
with the controller: ``Register`` (idempotent per job and node), then a report stream and a
directive stream together. When either breaks (controller down, a rejected report, a
restart), the session ends and a new one starts after an exponential backoff with jitter
(``backoff_initial_s`` doubling up to ``backoff_max_s``), so the directive stream survives
reconnects: the agent re-registers and re-watches with the last generation it applied, and a
directive it already applied that arrives again is not passed on twice.

Training never waits on the controller: ``report()`` puts the report in a bounded queue and
returns; when the queue is full the oldest report is dropped. An unreachable controller is
logged once (warning) per outage, then at debug level, and once more when it is back.
``on_directive(directive)`` is called from the client's thread for each new generation.

Credentials (``ClientCredentials``): TLS to the controller (``tls_ca`` to trust its
certificate; ``tls_cert``/``tls_key`` for mutual TLS) and the job's token, sent on every call
as ``authorization: Bearer TOKEN``. ``ClientCredentials.from_files`` reads the token from a
file or ``$ADAPTRUN_TOKEN``, never from a command line (``ps`` shows those to every user).
Plaintext is meant for loopback; ``check_target`` refuses it elsewhere unless ``insecure``.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
from adaptrun.science.report import Report

__all__ = ["ControllerClient", "JobBoundsSpec", "report_to_proto", "ClientCredentials",
           "CredentialsError", "TOKEN_ENV"]

log = logging.getLogger("adaptrun.agent")

AGENT_ID_METADATA = "adaptrun-agent-id"
REPORT_ACKS_METADATA = "adaptrun-report-acks"   # "0": no ack per report (we read none)
TOKEN_ENV = "ADAPTRUN_TOKEN"


class CredentialsError(ValueError):
    """Unusable client credentials (a missing file, plaintext off loopback); says which."""


def _loopback(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClientCredentials:
    """How a client reaches the controller: TLS files (PEM paths) and the job's token."""
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False             # plaintext to a non-loopback controller, knowingly

    @classmethod
    def from_files(cls, tls_ca=None, tls_cert=None, tls_key=None, token_file=None,
                   insecure=False, env=os.environ) -> "ClientCredentials":
        """Check the TLS flags and read the token: ``token_file``, else ``$ADAPTRUN_TOKEN``."""
        if bool(tls_cert) != bool(tls_key):
            raise CredentialsError("--tls-cert and --tls-key go together: give both")
        if insecure and (tls_ca or tls_cert):
            raise CredentialsError("--insecure and --tls-* exclude each other")
        for flag, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert),
                           ("--tls-key", tls_key)):
            if path and not Path(path).is_file():
                raise CredentialsError(f"{flag} {path}: no such file")
        token = None
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise CredentialsError(f"cannot read --token-file {token_file}: "
                                       f"{exc.strerror}") from None
            if not token:
                raise CredentialsError(f"--token-file {token_file} is empty")
        elif env.get(TOKEN_ENV, "").strip():
            token = env[TOKEN_ENV].strip()
        return cls(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token,
                   insecure=insecure)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def check_target(self, target: str) -> None:
        if self.tls or _loopback(target):
            return
        if not self.insecure:
            raise CredentialsError(f"refusing plaintext to the controller at {target}: give "
                                   f"--tls-ca (and --tls-cert/--tls-key for mutual TLS), or "
                                   f"--insecure")
        log.warning("talking to the controller at %s WITHOUT TLS (--insecure)", target)

    def channel(self, target: str) -> grpc.Channel:
        # No HTTP/2 BDP probing (a PING per burst of data, for bulk transfers): the control
        # plane's messages are small; the controller turns it off on its side too.
        options = [("grpc.http2.bdp_probe", 0)]
        if not self.tls:
            return grpc.insecure_channel(target, options=options)
        read = (lambda p: Path(p).read_bytes() if p else None)
        creds = grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca),
                                             private_key=read(self.tls_key),
                                             certificate_chain=read(self.tls_cert))
        return grpc.secure_channel(target, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


PLAINTEXT = ClientCredentials()


@dataclass(frozen=True)
class JobBoundsSpec:
    """The bounds an agent registers its job with (the first agent's win): the worker bounds,
    and optional caps (None) on the batch limits that the script itself declares."""
    min_workers: int
    max_workers: int
    init_batch: int | None = None
    max_global_batch: int | None = None
    local_batch_min: int | None = None
    local_batch_max: int | None = None
    max_accum_steps: int | None = None

    def to_proto(self) -> pb.JobBounds:
        b = pb.JobBounds(min_workers=self.min_workers, max_workers=self.max_workers,
                         init_batch=self.init_batch or 0,
                         max_global_batch=self.max_global_batch or 0,
                         local_batch_min=self.local_batch_min or 0,
                         local_batch_max=self.local_batch_max or 0)
        if self.max_accum_steps is not None:
            b.max_accum_steps = self.max_accum_steps
        return b


def report_to_proto(r: Report) -> pb.Report:
    msg = pb.Report(job_id=r.job_id, step=r.step, progress=r.progress, world_size=r.world_size,
                    nodes=r.nodes, local_batch=r.local_batch, accum_steps=r.accum_steps,
                    init_batch=r.init_batch, step_time_s=r.step_time_s,
                    sync_time_s=r.sync_time_s, grad_sqr=r.grad_sqr, grad_var=r.grad_var,
                    epoch=r.epoch, time_s=r.time_s, max_batch=r.max_batch,
                    local_batch_min=r.local_batch_min, local_batch_max=r.local_batch_max,
                    accumulation=r.accumulation, generation=r.generation,
                    metric_name=r.metric_name, finished=r.finished)
    for name in ("loss", "lr", "target_progress", "resize_gap_s", "metric"):  # NaN = unset
        v = getattr(r, name)
        if not math.isnan(v):
            setattr(msg, name, v)
    return msg


class ControllerClient:
    def __init__(self, target: str, job_id: str, node: str, slots: int, address: str,
                 bounds: JobBoundsSpec, on_directive: Callable[[pb.Directive], None] | None = None,
                 queue_size: int = 64, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, rpc_timeout_s: float = 5.0,
                 credentials: ClientCredentials | None = None):
        self.target = target
        self.credentials = credentials or PLAINTEXT
        self.job_id = job_id
        self.node = node
        self.slots = slots
        self.address = address
        self.bounds = bounds
        self.on_directive = on_directive
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rpc_timeout_s = rpc_timeout_s
        self.last_generation = 0
        self.directive: pb.Directive | None = None
        self.agent_id: str | None = None
        self.rdzv_endpoint = ""               # the store the controller hosts (RegisterResponse)
        self.connected = threading.Event()
        self.job_done = threading.Event()     # the controller says the job finished
        self.dropped_reports = 0
        self.sent_reports = 0
        self._queue: deque[Report] = deque()
        self._queue_size = queue_size
        self._cv = threading.Condition()
        self._deliver_lock = threading.Lock()
        self._stop = threading.Event()
        self._calls: list = []
        self._registered = False
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name="adaptrun-controller-client",
                                        daemon=True)

    # -- the caller's side: never blocks -------------------------------------------------
    def start(self) -> "ControllerClient":
        self._thread.start()
        return self

    def report(self, r: Report) -> None:
        with self._cv:
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.dropped_reports += 1
            self._queue.append(r)
            self._cv.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._cancel_calls()
        self._thread.join(timeout_s)
        if self._channel is not None:
            self._channel.close()

    # -- the session loop ----------------------------------------------------------------
    def _cancel_calls(self) -> None:
        for call in list(self._calls):
            call.cancel()

    def _run(self) -> None:
        backoff = self.backoff_initial_s
        outage = False
        self._channel = self.credentials.channel(self.target)
        stub = pb_grpc.ControllerStub(self._channel)
        while not self._stop.is_set():
            started = time.monotonic()
            self._registered = False
            try:
                self._session(stub)
                error = None
            except grpc.RpcError as exc:
                error = exc
            self.connected.clear()
            if self._registered:
                outage = False
            if self._stop.is_set():
                break
            if error is not None:
                code = error.code() if hasattr(error, "code") else None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    if not outage:
                        log.warning("controller at %s unreachable (%s); training continues at "
                                    "the last configuration, retrying with backoff",
                                    self.target, code.name)
                        outage = True
                    else:
                        log.debug("controller at %s still unreachable", self.target)
                else:
                    log.warning("controller at %s ended the session: %s: %s", self.target,
                                code.name if code else "?",
                                error.details() if hasattr(error, "details") else error)
            if self._registered and time.monotonic() - started > 10 * self.backoff_initial_s:
                backoff = self.backoff_initial_s  # the session had worked: start over
            self._stop.wait(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.backoff_max_s)

    def _session(self, stub) -> None:
        auth = self.credentials.metadata()
        resp = stub.Register(pb.RegisterRequest(
            job_id=self.job_id, node=self.node, slots=self.slots, address=self.address,
            bounds=self.bounds.to_proto(), last_generation=self.last_generation),
            timeout=self.rpc_timeout_s, metadata=auth)
        log.info("registered with the controller at %s as %s", self.target, resp.agent_id)
        self._registered = True
        self.agent_id = resp.agent_id
        self.rdzv_endpoint = resp.rdzv_endpoint
        if resp.job_done:
            self.job_done.set()
        if resp.directive.generation:
            self._deliver(resp.directive)
        self.connected.set()   # after the current directive: a waiter sees both
        watch = stub.WatchDirectives(pb.WatchDirectivesRequest(
            job_id=self.job_id, agent_id=resp.agent_id, last_generation=self.last_generation),
            metadata=auth)
        reports = stub.StreamReports(self._report_stream(),
                                     metadata=((AGENT_ID_METADATA, resp.agent_id),
                                               (REPORT_ACKS_METADATA, "0"), *auth))
        self._calls = [watch, reports]
        failure: list[grpc.RpcError] = []

        def watch_loop():
            try:
                for d in watch:
                    self._deliver(d)
            except grpc.RpcError as exc:
                failure.append(exc)
            finally:
                reports.cancel()  # one broken stream ends the session
        t = threading.Thread(target=watch_loop, name="adaptrun-directives", daemon=True)
        t.start()
        try:
            for _ack in reports:   # none come (no acks asked for): this waits for the stream's end
                pass
        except grpc.RpcError as exc:
            # CANCELLED here is watch_loop ending the session: its own error says why.
            if exc.code() != grpc.StatusCode.CANCELLED:
                failure.insert(0, exc)
        finally:
            watch.cancel()
            t.join()
            self._calls = []
        if failure and not self._stop.is_set():
            raise failure[0]

    def _report_stream(self):
        while not self._stop.is_set():
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait(timeout=1.0)
                if self._stop.is_set():
                    return
                r = self._queue.popleft()
            self.sent_reports += 1
            yield report_to_proto(r)

    def ask_to_join(self) -> bool:
        """Tell the controller this agent waits to join the running job (a ``Register``
        with ``wants_to_join``; idempotent). The directive that adds it comes as any other.
        False when the controller could not be asked now (the caller asks again later)."""
        channel = self._channel
        if channel is None or not self.connected.is_set():
            return False
        try:
            resp = pb_grpc.ControllerStub(channel).Register(pb.RegisterRequest(
                job_id=self.job_id, node=self.node, slots=self.slots, address=self.address,
                bounds=self.bounds.to_proto(), last_generation=self.last_generation,
                wants_to_join=True), timeout=self.rpc_timeout_s,
                metadata=self.credentials.metadata())
        except grpc.RpcError as exc:
            log.debug("asking the controller to join failed: %s", exc)
            return False
        if resp.job_done:
            self.job_done.set()
        if resp.directive.generation:
            self._deliver(resp.directive)
        return True

    def _deliver(self, d: pb.Directive) -> None:
        with self._deliver_lock:      # the session's thread and ask_to_join's caller
            if d.generation <= self.last_generation:
                return  # already applied (sent again after a reconnect)
            self.last_generation = d.generation
            self.directive = d
        log.info("directive %d: world size %d, global batch %d (local %d, accum %d): %s",
                 d.generation, d.world_size, d.global_batch, d.local_batch, d.accum_steps,
                 d.reason)
        if self.on_directive is not None:
            try:
                self.on_directive(d)
            except Exception:  # noqa: BLE001 - the caller's bug must not kill the session
                log.exception("on_directive failed for generation %d", d.generation)
