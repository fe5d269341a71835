"""A running controller: the gRPC server (controller service, health, reflection) on a
thread pool, the policy loop and the /metrics endpoint, started and stopped together.

``Controller(config).start()`` binds ``config.host:config.port`` (port 0 picks a free one;
``.port`` says which) and returns at once; ``stop()`` ends open streams, the policy loop and
the metrics server. Each open stream (reports, directives, health watch) holds one of
``config.max_threads`` handler threads; beyond that many concurrent calls, a new call is
refused with RESOURCE_EXHAUSTED rather than queued.

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
holds no secret).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
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


class ControllerError(RuntimeError):
    """The controller could not start (a port in use, a bad setting); the message says which."""


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
        self._health_server: grpc.Server | None = None
        self.actuator = actuator if actuator is not None else create_actuator(
            config.actuator, **(config.actuator_options or {}))
        self.metrics = Metrics()
        try:
            self.core = ControllerCore(config, self.actuator, self.metrics)
        except StateDirError as exc:
            raise ControllerError(str(exc)) from None
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
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
        server = grpc.server(
            ThreadPoolExecutor(max_workers=c.max_threads, thread_name_prefix="adaptrun-grpc"),
            options=[("grpc.max_receive_message_length", c.max_message_bytes),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=c.max_threads)
        try:
            creds = self.security.server_credentials()
        except AuthError as exc:
            raise ControllerError(str(exc)) from None
        service = ControllerService(self.core, self._stopping, self.security)
        server.add_generic_rpc_handlers(
            (generic_handler(service, c.max_report_bytes, c.max_message_bytes),))
        self._health = health.HealthServicer(experimental_non_blocking=True)
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
        self.port = port
        if c.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
            except OSError as exc:
                raise ControllerError(f"cannot serve /metrics on {c.host}:{c.metrics_port}: "
                                      f"{exc}; pick another --metrics-port") from None
        if c.rdzv_port is not None:
            self._host_rdzv_store(c)
        if self.health_port is not None:
            self._serve_health(c)
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._loop = PolicyLoop(self.core).start()
        log.info("controller listening on %s (metrics port %s)", self.address, self.metrics_port)
        return self

    def _serve_health(self, c: ControllerConfig) -> None:
        hs = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="adaptrun-health"),
                         options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, hs)
        try:
            port = hs.add_insecure_port(f"{c.host}:{self.health_port}")
        except RuntimeError:
            port = 0
        if not port:
            self.metrics.close()
            raise ControllerError(f"cannot serve health checks on {c.host}:{self.health_port}; "
                                  f"pick another --health-port")
        hs.start()
        self.health_port = port
        self._health_server = hs

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
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        for job in self.core.registry.jobs():
            with job.changed:
                job.changed.notify_all()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 5)
            self._server = None
        if self._health_server is not None:
            self._health_server.stop(0).wait(5)
            self._health_server = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self.metrics.close()
        self.actuator.close()
        self.core.close()                  # the jobs' unsaved state goes to the state dir
        self._rdzv_store = None            # the store's server ends with its last reference

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (or ``timeout_s``); True when it stopped."""
        return self._server is None or self._server.wait_for_termination(timeout_s)

    def __enter__(self) -> "Controller":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
