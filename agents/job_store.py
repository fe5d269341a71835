"""The job's rendezvous store as one agent uses it, across restarts of the store's host.

``JobStore`` holds the c10d store that every round's rendezvous runs in (``rdzv``) and the
job's own keys under ``adaptrun/agent/<job>/`` (``keys``: formed, committed, joiners, failed,
alive, ...). The controller hosts that store for its jobs; when the controller restarts
(kill -9, a rolling update), the store comes back on the same port, empty, and the agent's
client is broken for good (a TCPStore client never reconnects). So:

- any call that fails marks the store ``lost`` (callers catch ``STORE_ERRORS`` and go on:
  training never needs the store, only the next re-form does);
- ``reconnect()`` (called by the agent's loops while the store is lost, at most every
  ``retry_s``) probes the port first (a TCPStore client that cannot connect logs a C++ stack
  trace) and then makes a new client;
- what this agent ``remember``-ed (the round it is in, the newest committed step) is written
  again into the new store, so that a node that arrives after the restart finds the job as it
  is, not as a job that never started.

An agent that hosts the store itself (no controller) has nothing to reconnect to.
"""
from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from .rendezvous import RendezvousConf, connect_store, parse_endpoint

__all__ = ["JobStore", "STORE_ERRORS"]

log = logging.getLogger("adaptrun.agent")

STORE_ERRORS = (RuntimeError, OSError, ValueError)


class JobStore:
    def __init__(self, endpoint: str | None, conf: RendezvousConf, local_addr: str,
                 job_id: str, retry_s: float = 1.0):
        self.conf = conf
        self.prefix = f"adaptrun/agent/{job_id}/"
        self.rdzv, self.hosting = connect_store(endpoint, conf, local_addr)
        self.address = parse_endpoint(endpoint) if endpoint else (local_addr, self.rdzv.port)
        self.keys = dist.PrefixStore(self.prefix, self.rdzv)
        self.lost = False
        self.retry_s = retry_s
        self._next_try = 0.0
        self._remembered: dict[str, str] = {}

    def remember(self, key: str, value: str) -> None:
        """Set ``key`` now (if the store is there) and again after every reconnect."""
        self._remembered[key] = value
        self.call(lambda s: s.set(key, value))

    def call(self, fn, default=None):
        """``fn(keys)``, or ``default`` when the store is lost (it is then marked so)."""
        if self.lost:
            return default
        try:
            return fn(self.keys)
        except STORE_ERRORS as exc:
            self.mark_lost(exc)
            return default

    def mark_lost(self, exc: BaseException) -> None:
        if not self.lost:
            log.warning("lost the rendezvous store at %s:%d (%s); the workers go on, and this "
                        "agent reconnects when it is back", *self.address, exc)
        self.lost = True

    def reconnect(self) -> bool:
        """True when the store is usable (again); tries at most every ``retry_s``."""
        if not self.lost:
            return True
        now = time.monotonic()
        if self.hosting or now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        try:
            with socket.create_connection(self.address, timeout=0.5):
                pass
            rdzv = dist.TCPStore(self.address[0], self.address[1], None, False,
                                 timedelta(seconds=self.conf.join_timeout),
                                 wait_for_workers=False)
            keys = dist.PrefixStore(self.prefix, rdzv)
            for key, value in self._remembered.items():
                keys.set(key, value)
        except STORE_ERRORS as exc:
            log.debug("rendezvous store at %s:%d not back yet: %s", *self.address, exc)
            return False
        self.rdzv, self.keys, self.lost = rdzv, keys, False
        log.info("reconnected to the rendezvous store at %s:%d (wrote back %s)", *self.address,
                 ", ".join(sorted(self._remembered)) or "nothing")
        return True

    def wait_until_back(self, timeout_s: float, stopped) -> bool:
        """Reconnect, waiting up to ``timeout_s`` (False: still lost, or ``stopped()``)."""
        deadline = time.monotonic() + timeout_s
        while not self.reconnect():
            if stopped() or time.monotonic() > deadline or self.hosting:
                return False
            time.sleep(0.2)
        return True
