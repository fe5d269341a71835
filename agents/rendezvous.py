"""The agents' rendezvous: torch elastic's ``DynamicRendezvousHandler`` over a c10d store,
one fresh rendezvous per *round*, with the membership the controller decided.

Semantics a caller relies on
- ``connect_store(endpoint)`` returns the TCPStore that holds every round of a job. With an
  endpoint, the agent is a client of it (``adaptrun run``'s embedded controller, or any
  process, hosts it: no agent is then a single point of failure). When nothing listens there
  yet and the host is this machine, the agent hosts it itself, as torchrun does; that agent
  is then a single point of failure of the job (it must outlive the job), and the log says so.
  Without an endpoint the agent hosts a store on a free local port: one node only.
- A round is named ``<job>-g<generation>-a<attempt>``: the directive generation that set the
  membership and the failure restarts since. Each name is used for one round only, so no
  stale state of an older world (participants, keep-alives, MASTER_PORT) can ever be read.
- ``join_round`` admits ``min_nodes..max_nodes`` agents. A planned round (the controller said
  how many nodes) uses min = max = that count, so it closes the moment the last expected agent
  joins, with no ``last_call`` wait. The first round and failure rounds use the ``--nnodes``
  range and ``last_call_timeout`` (closing at once when max_nodes joined).
- Group rank 0's agent picks a free port for the workers' store (the workers' rank 0 hosts
  it: ``TORCHELASTIC_USE_AGENT_STORE=False``) and publishes it through the round's store
  (``RendezvousInfo.bootstrap_store_info``); every round gets a new one.
- torch polls the rendezvous state once a second while it waits for peers; for a handful of
  agents that second is most of a planned re-form's rendezvous time, so ``fast_polling``
  shortens that wait and the random skew (up to 0.3 s) before a handler's first join, in the
  agent's process only, and ``join_round`` lowers the handler's 1 s state cache to the same
  ``poll_s``: the only changes to torch's behaviour (both reach into private names, guarded).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousInfo
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as _dyn
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler, RendezvousTimeout)

__all__ = ["RendezvousConf", "RoundSpec", "connect_store", "join_round", "end_round",
           "fast_polling", "parse_endpoint"]

log = logging.getLogger("adaptrun.agent")

# Workers get a store of their own per round (hosted by their rank 0), never the agent's.
os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"


@dataclass(frozen=True)
class RendezvousConf:
    """torchrun's ``--rdzv-conf`` keys that mean something here (seconds)."""
    join_timeout: float = 600.0
    last_call_timeout: float = 2.0
    close_timeout: float = 30.0
    keep_alive_interval: int = 2
    keep_alive_max_attempt: int = 5   # expiry 10 s: well above 2 x interval + 1 s (split brain)
    is_host: bool | None = None       # None: host the store when nothing listens locally
    poll_s: float = 0.05

    @classmethod
    def parse(cls, text: str) -> "RendezvousConf":
        """``key=value,key=value`` as torchrun's ``--rdzv-conf``; unknown keys are an error."""
        kw: dict = {}
        for item in filter(None, (p.strip() for p in (text or "").split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"--rdzv-conf: unknown or malformed entry {item!r}; known keys: "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            if key == "is_host":
                kw[key] = value.strip().lower() in ("1", "true", "yes")
            elif key in ("keep_alive_interval", "keep_alive_max_attempt"):
                kw[key] = int(value)
            else:
                kw[key] = float(value)
        return cls(**kw)


@dataclass(frozen=True)
class RoundSpec:
    generation: int
    attempt: int
    min_nodes: int
    max_nodes: int

    def run_id(self, job_id: str) -> str:
        return f"{job_id}-g{self.generation}-a{self.attempt}"

    def describe(self) -> str:
        n = (str(self.max_nodes) if self.min_nodes == self.max_nodes
             else f"{self.min_nodes}:{self.max_nodes}")
        return f"generation {self.generation}, attempt {self.attempt}, {n} nodes"


def parse_endpoint(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _is_local(host: str) -> bool:
    if host in ("127.0.0.1", "localhost", "::1"):
        return True
    try:
        return socket.gethostbyname(host) in ("127.0.0.1",) or host == socket.gethostname()
    except OSError:
        return False


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def connect_store(endpoint: str | None, conf: RendezvousConf, local_addr: str):
    """The job's rendezvous store: ``(store, hosted)``; see the module docstring."""
    timeout = timedelta(seconds=conf.join_timeout)
    if endpoint is None:
        store = dist.TCPStore(local_addr, 0, None, True, timeout, wait_for_workers=False)
        log.warning("no --rdzv-endpoint: this agent hosts the rendezvous store on %s:%d "
                    "(one node only)", local_addr, store.port)
        return store, True
    host, port = parse_endpoint(endpoint)
    want_host = conf.is_host if conf.is_host is not None else (
        _is_local(host) and not _listening(host, port))
    if want_host:
        try:
            store = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
            log.warning("this agent hosts the rendezvous store on %s:%d: it is a single point "
                        "of failure of the job and must outlive it (give --rdzv-endpoint of a "
                        "store that the controller hosts to avoid this)", host, port)
            return store, True
        except (RuntimeError, OSError) as exc:  # another agent won the race: be its client
            if conf.is_host:
                raise
            log.debug("could not host the rendezvous store on %s:%d (%s); joining it",
                      host, port, exc)
    return dist.TCPStore(host, port, None, False, timeout, wait_for_workers=False), False


def fast_polling(poll_s: float) -> None:
    """Make torch's 1 s wait between rendezvous state polls ``poll_s`` (this process only).

    torch's op executor sleeps ``_delay(seconds=1)`` whenever it must wait for peers; the
    other delays (the random skew before a first join) are kept.
    """
    original = getattr(_dyn, "_adaptrun_original_delay", None) or _dyn._delay

    def delay(seconds):
        if seconds == 1:
            seconds = poll_s
        elif isinstance(seconds, tuple):   # the random skew before a first join
            seconds = (0, min(seconds[1], poll_s))
        original(seconds)

    _dyn._adaptrun_original_delay = original
    _dyn._delay = delay


def join_round(store, job_id: str, spec: RoundSpec, conf: RendezvousConf,
               local_addr: str | None) -> tuple[DynamicRendezvousHandler, RendezvousInfo]:
    """Join round ``spec`` of ``job_id``; return the handler (shut it down after the round)
    and the ``RendezvousInfo`` (group rank, node count, the round's store, MASTER_ADDR/PORT)."""
    run_id = spec.run_id(job_id)
    timeout = RendezvousTimeout(join=timedelta(seconds=conf.join_timeout),
                                last_call=timedelta(seconds=conf.last_call_timeout),
                                close=timedelta(seconds=conf.close_timeout),
                                heartbeat=timedelta(seconds=conf.keep_alive_interval
                                                    * conf.keep_alive_max_attempt))
    handler = DynamicRendezvousHandler.from_backend(
        run_id, store, C10dRendezvousBackend(store, run_id), spec.min_nodes, spec.max_nodes,
        local_addr=local_addr, timeout=timeout,
        keep_alive_interval=conf.keep_alive_interval,
        keep_alive_max_attempt=conf.keep_alive_max_attempt)
    # torch re-reads the rendezvous state at most once a second (a cache in its state
    # holder); a planned round of a few agents should close as soon as the last one joins.
    holder = getattr(handler, "_state_holder", None)
    if holder is not None and hasattr(holder, "_cache_duration"):
        holder._cache_duration = min(holder._cache_duration, conf.poll_s)
    t0 = time.monotonic()
    info = handler.next_rendezvous()
    log.info("rendezvous %s (%s) closed in %.2f s: group rank %d of %d, workers' store %s:%d",
             run_id, spec.describe(), time.monotonic() - t0, info.rank, info.world_size,
             info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port)
    return handler, info


def end_round(handler: DynamicRendezvousHandler) -> None:
    """Stop this node's keep-alive of a finished round, without closing the rendezvous.

    ``shutdown()`` would close it, and a peer that joined but has not yet seen the round
    complete (it polls) would then fail with ``RendezvousClosedError``; the round's name is
    never used again, so leaving it open costs nothing."""
    stop = getattr(handler, "_stop_heartbeats", None)
    if stop is not None:
        stop()
    else:  # a torch without it: closing is the only way to stop the heartbeats
        handler.shutdown()
