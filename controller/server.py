"""A running controller: the gRPC server (controller service, health, reflection) on one
asyncio event loop, the policy loop and the /metrics endpoint, started and stopped together.

``Controller(config).start()`` binds ``config.host:config.port`` (port 0 picks a free one;
``.port`` says which) and returns at once; ``stop()`` ends open streams, the policy loop and
the metrics server. The gRPC server is ``grpc.aio``: one event loop, in a daemon thread of its
own ("adaptrun-grpc"), runs every call, so an open stream (reports, directives, health watch)
is a suspended coroutine, not a thread: 10,000 agents with two streams each need no more
threads than one. Blocking work (``SetBounds``, which runs the policy; ``ListJobs``) goes to
an executor of ``config.max_threads`` threads. Beyond ``config.max_concurrent_rpcs`` calls in
progress at once, a new call is refused with RESOURCE_EXHAUSTED rather than queued (memory
stays bounded); one agent holds at most a few directive streams (``service.py``). The server
pings idle connections (HTTP/2 keepalive), so the streams of an agent whose machine vanished
without closing its connection end within a couple of minutes.

The rendezvous store of its jobs. Unless ``config.rdzv_port`` is None, the controller hosts a
c10d ``TCPStore`` (multi-tenant) on that port and hands its endpoint to every agent at
registration (``RegisterResponse.rdzv_endpoint``); the agents keep each job's keys under the
job's own prefix and round names. So ``adaptrun agent`` needs only ``--controller`` and
``--job``, and no worker pod is a single point of failure for the store (torchrun and
Kubeflow's c10d default put it on worker 0). Losing the controller does not stop training
under way: the workers of a round talk through their own store (hosted by their rank 0);
only the next re-form needs the job's store again.

Security (``security``, a ``ServerSecurity``; see ``auth.py``): TLS or mutual TLS on the gRPC
port, per-job tokens checked by the service. Plaintext is refused before anything binds on a
host that is not loopback, unless ``security.insecure``. The store cannot do TLS: it binds
``rdzv_host`` (default ``config.host``) and is protected by the network (a NetworkPolicy in
Kubernetes, deploy/base/networkpolicy.yaml). ``health_port``: a second, plaintext gRPC port
serving only grpc.health.v1 (the kubelet's gRPC probes cannot do TLS; the health status
holds no secret), on the same event loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .actuators import Actuator, create_actuator
from .auth import PLAINTEXT, AuthError, ServerSecurity
from .core import ControllerConfig, ControllerCore, PolicyLoop
from .metrics import Metrics
from .service import SERVICE_NAME, ControllerService, generic_handler
from .state_store import StateDirError

__all__ = ["Controller", "ControllerError"]

log = logging.getLogger("adaptrun.controller")

# HTTP/2 keepalive of the server: ping a connection idle this long, drop it when the ping is
# not answered in time (a vanished agent's streams end instead of staying forever).
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# No HTTP/2 BDP probing: it sizes flow-control windows for bulk transfers with a PING per
# burst of data received, and the control plane only carries small messages (a report a few
# seconds per agent). Off, 10,000 agents cost the controller 147 us a report instead of 186
# (``benchmarks/controller_load.py``); the agents' channels turn it off too.
NO_BDP_PROBE = ("grpc.http2.bdp_probe", 0)


class ControllerError(RuntimeError):
    """The controller could not start (a port in use, a bad setting); the message says which."""


class _EventLoopThread:
    """An asyncio event loop running in a daemon thread; other threads submit coroutines."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    self.loop.run_until_complete(
                        asyncio.gather(*tasks, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def run(self, coro, timeout_s: float | None = None):
        """Run ``coro`` on the loop; block until it is done and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:     # closed already
                pass
            self._thread.join(timeout_s)


class Controller:
    def __init__(self, config: ControllerConfig = ControllerConfig(),
                 actuator: Actuator | None = None, security: ServerSecurity = PLAINTEXT,
                 rdzv_host: str | None = None, health_port: int | None = None):
        try:
            security.validate().check_listen(config.host, config.port)
        except AuthError as exc:       # before an actuator or a port exists
            raise ControllerError(str(exc)) from None
        self.config = config
        self.security = security
        self.rdzv_host = rdzv_host or config.host
        self.health_port = health_port
        self._health_server: grpc.aio.Server | None = None
        self.actuator = actuator if actuator is not None else create_actuator(
            config.actuator, **(config.actuator_options or {}))
        self.metrics = Metrics()
        try:
            self.core = ControllerCore(config, self.actuator, self.metrics)
        except StateDirError as exc:
            raise ControllerError(str(exc)) from None
        self._stopping = threading.Event()
        self._stopped = threading.Event()     # the gRPC server has stopped (``wait``)
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._service: ControllerService | None = None
        self._aio: _EventLoopThread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: PolicyLoop | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.rdzv_port: int | None = None
        self._rdzv_store = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "Controller":
        c = self.config
        try:
            creds = self.security.server_credentials()
        except AuthError as exc:
            raise ControllerError(str(exc)) from None
        self._stopping.clear()
        self._stopped.clear()
        self._executor = ThreadPoolExecutor(max_workers=c.max_threads,
                                            thread_name_prefix="adaptrun-work")
        self._service = ControllerService(self.core, self._stopping, self.security,
                                          self._executor)
        self._aio = _EventLoopThread("adaptrun-grpc")
        try:
            self.port = self._aio.run(self._create_server(c, creds))
            if c.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
                except OSError as exc:
                    raise ControllerError(f"cannot serve /metrics on {c.host}:"
                                          f"{c.metrics_port}: {exc}; pick another "
                                          f"--metrics-port") from None
            if c.rdzv_port is not None:
                self._host_rdzv_store(c)
            if self.health_port is not None:
                self._aio.run(self._serve_health(c))
            self._aio.run(self._start_server())
        except BaseException:
            self._abandon()
            raise
        self._loop = PolicyLoop(self.core).start()
        log.info("controller listening on %s (metrics port %s)", self.address, self.metrics_port)
        return self

    async def _create_server(self, c: ControllerConfig, creds) -> int:
        """Build the server on the loop and bind its port; return the port."""
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", c.max_message_bytes),
                     ("grpc.so_reuseport", 0),
                     ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                     ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                     ("grpc.http2.max_pings_without_data", 0), NO_BDP_PROBE],
            maximum_concurrent_rpcs=c.max_concurrent_rpcs)
        self._server = server
        self._service.bind(asyncio.get_running_loop())
        server.add_generic_rpc_handlers(
            (generic_handler(self._service, c.max_report_bytes, c.max_message_bytes),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            port = (server.add_secure_port(f"{c.host}:{c.port}", creds) if creds is not None
                    else server.add_insecure_port(f"{c.host}:{c.port}"))
        except RuntimeError as exc:
            raise ControllerError(f"cannot listen on {c.host}:{c.port} ({exc}); is another "
                                  f"controller running there? pick another --port") from None
        if not port:
            raise ControllerError(f"cannot listen on {c.host}:{c.port}; is another controller "
                                  f"running there? pick another --port")
        return port

    async def _start_server(self) -> None:
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _serve_health(self, c: ControllerConfig) -> None:
        hs = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, hs)
        try:
            port = hs.add_insecure_port(f"{c.host}:{self.health_port}")
        except RuntimeError:
            port = 0
        if not port:
            self.metrics.close()
            raise ControllerError(f"cannot serve health checks on {c.host}:{self.health_port}; "
                                  f"pick another --health-port")
        await hs.start()
        self.health_port = port
        self._health_server = hs

    def _abandon(self) -> None:
        """``start()`` failed part-way: release what it made (no server was started)."""
        aio = self._aio
        if aio is not None:
            try:
                aio.run(self._stop_servers(0), timeout_s=10)
            except Exception:  # noqa: BLE001 - the start's own error is the one to show
                log.debug("releasing a half-started server failed", exc_info=True)
            aio.close()
        self._aio = None
        if self._service is not None:
            self._service.unbind()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._rdzv_store = None

    async def _stop_servers(self, grace_s: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._service is not None:
            self._service.wake_all()         # directive streams end: UNAVAILABLE
        servers = [s for s in (self._server, self._health_server) if s is not None]
        self._server = self._health_server = None
        await asyncio.gather(*(s.stop(grace_s if i == 0 else 0)
                               for i, s in enumerate(servers)), return_exceptions=True)

    def _host_rdzv_store(self, c: ControllerConfig) -> None:
        from datetime import timedelta

        import torch.distributed as dist   # only a controller that hosts a store needs torch

        try:
            self._rdzv_store = dist.TCPStore(self.rdzv_host, c.rdzv_port, None, True,
                                             timedelta(seconds=60), wait_for_workers=False,
                                             multi_tenant=True)
        except (RuntimeError, OSError) as exc:
            self.metrics.close()
            raise ControllerError(f"cannot host the rendezvous store on {self.rdzv_host}:"
                                  f"{c.rdzv_port} ({exc}); pick another --rdzv-port") from None
        self.rdzv_port = self._rdzv_store.port
        self.core.rdzv_endpoint = f"{c.rdzv_advertise}:{self.rdzv_port}"
        log.info("hosting the jobs' rendezvous store on port %d", self.rdzv_port)

    @property
    def rdzv_endpoint(self) -> str | None:
        """HOST:PORT of the store as a client on this machine reaches it (None: none)."""
        if self.rdzv_port is None:
            return None
        host = self.rdzv_host if self.rdzv_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{host}:{self.rdzv_port}"

    def stop(self, grace_s: float = 1.0) -> None:
        self._stopping.set()
        for job in self.core.registry.jobs():
            with job.changed:
                job.changed.notify_all()
        aio, self._aio = self._aio, None
        if aio is not None:
            # Directive streams end at once (UNAVAILABLE); other calls get ``grace_s``.
            try:
                aio.run(self._stop_servers(grace_s), timeout_s=grace_s + 10)
            except Exception:  # noqa: BLE001 - stopping goes on whatever the server says
                log.warning("the gRPC server did not stop cleanly", exc_info=True)
            aio.close()
        if self._service is not None:
            self._service.unbind()
            self._service = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._stopped.set()
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self.metrics.close()
        self.actuator.close()
        self.core.close()                  # the jobs' unsaved state goes to the state dir
        self._rdzv_store = None            # the store's server ends with its last reference

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (or ``timeout_s``); True when it stopped."""
        return self._aio is None or self._stopped.wait(timeout_s)

    def __enter__(self) -> "Controller":
        return self.start() if self._aio is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
