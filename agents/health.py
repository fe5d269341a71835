"""The agent's health endpoint: is its loop alive, and where is it in the job.

``GET /healthz`` answers 200 while the agent's loop has beaten recently and 503 once it has
not, with JSON ``{"state", "since_beat_s", "limit_s", ...}``. What "recently" means follows the
state the loop last reported (``beat``):

- ``training``: the loop that watches the workers beats every ``monitor_interval_s`` (50 ms);
  silent for ``TRAINING_LIMIT_S`` means it is stuck.
- ``starting``, ``joining``, ``parked``: the loop waits in one call (a rendezvous round, a
  re-form) for at most the rendezvous join timeout; silent for longer than that is stuck.
- ``done``: the job ended on this node; the agent is about to exit.

Kubernetes: a startup probe on /healthz gives the agent its start (image, imports), a
liveness probe restarts an agent whose loop stopped. No readiness gate: a worker pod takes no
Service traffic, and a probe that tripped during a collective would only cost a restart.
Serves plaintext HTTP on the pod network; it says nothing a peer could misuse (no job data).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["AgentHealth", "TRAINING_LIMIT_S"]

TRAINING_LIMIT_S = 60.0


class AgentHealth:
    def __init__(self, wait_limit_s: float = 600.0):
        self.wait_limit_s = float(wait_limit_s)
        self._lock = threading.Lock()
        self._state = "starting"
        self._beat = time.monotonic()
        self._detail: dict = {}
        self._server: ThreadingHTTPServer | None = None

    def beat(self, state: str, **detail) -> None:
        """The loop is alive, in ``state`` (``detail``: what /healthz also shows)."""
        with self._lock:
            self._state, self._beat = state, time.monotonic()
            if detail or state != "training":
                self._detail = detail

    def status(self) -> tuple[bool, dict]:
        with self._lock:
            state, since, detail = self._state, time.monotonic() - self._beat, dict(self._detail)
        limit = TRAINING_LIMIT_S if state == "training" else self.wait_limit_s
        ok = state == "done" or since <= limit
        return ok, {"state": state, "since_beat_s": round(since, 3), "limit_s": limit, **detail}

    # ---- the HTTP side ------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve /healthz on a daemon thread; returns the port (``port`` 0: any free one)."""
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):                  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/healthz":
                    self.send_error(404, "only /healthz is served here")
                    return
                ok, body = health.status()
                data = json.dumps(body).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):      # the kubelet probes every few seconds
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="adaptrun-agent-health",
                         daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
