"""``form_world()``: the process group of one worker, from the launcher's environment
(``adaptrun.init()``, in ``job``, forms it and then creates the job context on top).

Semantics
- Under a launcher (torchrun or adaptrun's agent: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` set) ``form_world()`` joins the job's c10d store and builds a process group
  over it. With no launcher it builds a world of one over an in-process store, so the same
  script runs alone.
- The device follows the job, not the backend (``resolve_device``): ``device=``, else
  ``ADAPTRUN_DEVICE``, else ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``
  (``"cuda"`` without an index is ``cuda:<LOCAL_RANK>``); LOCAL_RANK i is the i-th visible GPU,
  and one beyond the visible GPUs is a ``DeviceConfigError``. The group follows the device
  (``backend_for``): on CUDA ``"cpu:gloo,cuda:nccl"`` bound to the device (``device_id``), so
  CPU tensors (the state exchange, the per-step agreement) go over gloo and CUDA tensors over
  NCCL; elsewhere ``"gloo"``. ``backend=`` overrides the group only: ``backend="gloo"`` on a GPU
  keeps the job on the GPU and sends CUDA tensors over gloo.
- Stale keys can never be read. torch 2.13's agent lets the workers of every rendezvous round
  share one TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``) and does not separate their keys, so a
  restarted worker reads the dead world's gloo addresses and hangs. Neither
  ``TORCHELASTIC_RESTART_COUNT`` (it differs between agents after a failure and does not move on a
  scale-up) nor the rendezvous round (not visible to workers) identifies a world reliably, so
  the ranks agree on a fresh namespace in the store by a handshake: rank 0 publishes a random
  nonce at ``adaptrun/pg/leader``; every other rank answers under that nonce with its own nonce
  and waits for a welcome that only a live rank 0 can write (a stale leader never answers, so a
  rank that read one simply reads the key again). The process group then lives under
  ``PrefixStore("adaptrun/pg/<nonce>/", store)``: the nonce alone names the world. (Not the
  restart count: after a failure the agents of one world can hand their workers different
  counts, and ranks keyed by it would wait on different keys.) Works unchanged when workers
  get a store of their own per round (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).
- ``job_store()`` returns the unprefixed store, where directives live (see ``directive``).
- Environment: ``ADAPTRUN_TIMEOUT_S`` (default 300) bounds every store wait and collective.
"""
from __future__ import annotations

import atexit
import gc
import inspect
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DeviceConfigError, NotInitializedError

__all__ = ["WorldInfo", "form_world", "resolve_device", "backend_for", "is_initialized", "world",
           "job_store", "shutdown"]

LEADER_KEY = "adaptrun/pg/leader"


@dataclass
class WorldInfo:
    """Who this worker is in the current world. One object per process: a re-form in place
    (``form_world(into=...)``) updates it, so every holder (the script's ``world`` too) sees
    the current world. Read it, do not change it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    nodes: int
    restart_count: int
    run_id: str
    backend: str            # the process group's backend string
    device: str             # where this worker's model and batches live: "cpu", "cuda:<i>"
    launched: bool          # False: alone, no launcher
    pg_prefix: str          # the store namespace of this world's process group
    timeout_s: float


_world: WorldInfo | None = None
_store = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def timeout_s() -> float:
    return float(os.environ.get("ADAPTRUN_TIMEOUT_S", "300"))


def _connect_store(rank: int, world_size: int, timeout: timedelta):
    host = os.environ["MASTER_ADDR"]
    port = int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(host, port, world_size, False, timeout)
    return dist.TCPStore(host, port, world_size, rank == 0, timeout, multi_tenant=True)


def visible_gpus() -> int:
    """The CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpu_ids() -> tuple[str, ...]:
    """The ids of the GPUs this process may hand out (``CUDA_VISIBLE_DEVICES``'s entries, else
    0..n-1); none where ``ADAPTRUN_DEVICE=cpu`` or without CUDA."""
    if os.environ.get("ADAPTRUN_DEVICE", "").strip().lower() == "cpu":
        return ()
    n = visible_gpus()
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in seen.split(",") if x.strip()] if seen is not None else []
    return tuple(ids[:n]) if seen is not None else tuple(str(i) for i in range(n))


def resolve_device(device: str | None, local_rank: int, gpus: int | None = None) -> str:
    """The job's device for the worker of ``local_rank`` on a host with ``gpus`` visible GPUs
    (default: as torch sees them): ``device``, else ``ADAPTRUN_DEVICE``, else
    ``cuda:<local_rank>`` with a GPU, else ``cpu``. DeviceConfigError when CUDA is asked for
    and the GPU it names is not visible."""
    gpus = visible_gpus() if gpus is None else int(gpus)
    asked = device or os.environ.get("ADAPTRUN_DEVICE") or ("cuda" if gpus else "cpu")
    try:
        dev = torch.device(asked)
    except (RuntimeError, TypeError):
        raise DeviceConfigError(f"device {asked!r} (device= or ADAPTRUN_DEVICE) is not a torch "
                                "device: give cpu, cuda or cuda:<index>") from None
    if dev.type != "cuda":
        return str(dev)
    index = local_rank if dev.index is None else dev.index
    if index >= gpus:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        fix = (f"start at most one worker per visible GPU (--nproc-per-node {gpus}, or "
               "--nproc-per-node gpu), make more GPUs visible with CUDA_VISIBLE_DEVICES"
               if gpus else "make a GPU visible (CUDA_VISIBLE_DEVICES)")
        raise DeviceConfigError(
            f"local rank {local_rank} needs GPU cuda:{index}, but this process sees {gpus} "
            f"GPU(s) (CUDA_VISIBLE_DEVICES={'unset' if seen is None else repr(seen)}): {fix}, "
            "or set ADAPTRUN_DEVICE=cpu to train on the CPU")
    return f"cuda:{index}"


def backend_for(device: str, override: str | None = None) -> str:
    """The process group's backend string for a job on ``device``: ``override`` when given,
    else ``"cpu:gloo,cuda:nccl"`` on CUDA (CPU tensors over gloo, CUDA tensors over NCCL),
    else ``"gloo"``."""
    if override:
        return override
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def _group_kwargs(backend: str, device: str) -> dict:
    """``device_id`` for a group with NCCL on a CUDA device (where this torch takes it): NCCL
    binds to the device at once, and barriers use it."""
    if (torch.device(device).type == "cuda" and "nccl" in backend
            and "device_id" in inspect.signature(dist.init_process_group).parameters):
        return {"device_id": torch.device(device)}
    return {}


def _agree_namespace(store, rank: int, world_size: int, timeout: float) -> str:
    """The handshake of the module docstring; returns this world's fresh namespace."""
    if world_size == 1:
        return f"adaptrun/pg/{uuid.uuid4().hex}"
    deadline = time.monotonic() + timeout
    if rank == 0:
        nonce = uuid.uuid4().hex
        store.set(LEADER_KEY, nonce)
        base = f"adaptrun/pg/{nonce}"
        pending = set(range(1, world_size))
        while pending:
            for r in sorted(pending):
                key = f"{base}/hello/{r}"
                if store.check([key]):
                    store.set(f"{base}/welcome/{r}/{store.get(key).decode()}", b"1")
                    pending.discard(r)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adaptrun.init: ranks {sorted(pending)} did not join "
                                       f"within {timeout:.0f}s; check that every node started")
                time.sleep(0.01)
        return base
    mine = uuid.uuid4().hex
    store.wait([LEADER_KEY], timedelta(seconds=timeout))
    leader = None
    while True:
        current = store.get(LEADER_KEY).decode()
        if current != leader:
            leader = current
            store.set(f"adaptrun/pg/{leader}/hello/{rank}", mine)
        if store.check([f"adaptrun/pg/{leader}/welcome/{rank}/{mine}"]):
            return f"adaptrun/pg/{leader}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"adaptrun.init: rank 0 did not answer within {timeout:.0f}s; "
                               "check that the node running rank 0 is up")
        time.sleep(0.01)


def form_world(backend: str | None = None, timeout_s_: float | None = None,
               into: WorldInfo | None = None, device: str | None = None) -> WorldInfo:
    """Build this worker's process group (idempotent); return who it is. ``device`` and
    ``backend``: see the module docstring (``resolve_device``, ``backend_for``). ``into``: the
    WorldInfo of this process's previous world, updated in place (an in-process re-form)."""
    global _world, _store
    if _world is not None:
        return _world
    timeout = float(timeout_s_ if timeout_s_ is not None else timeout_s())
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    restart_count = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if launched:
        rank = _env_int("RANK", 0)
        world_size = _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
        nodes = _env_int("GROUP_WORLD_SIZE", max(1, world_size // max(local_world_size, 1)))
    else:
        rank, world_size, local_rank, local_world_size, nodes = 0, 1, 0, 1, 1
    device = resolve_device(device, local_rank)     # a bad device fails before the store
    backend = backend_for(device, backend)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    store = (_connect_store(rank, world_size, timedelta(seconds=timeout)) if launched
             else dist.HashStore())
    prefix = f"{_agree_namespace(store, rank, world_size, timeout)}/"
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout),
                                **_group_kwargs(backend, device))
        _destroy_at_exit()
    _store = store
    new = WorldInfo(rank=rank, world_size=world_size, local_rank=local_rank,
                       local_world_size=local_world_size, nodes=max(1, min(nodes, world_size)),
                       restart_count=restart_count,
                       run_id=os.environ.get("TORCHELASTIC_RUN_ID", "local"), backend=backend,
                       device=device, launched=launched, pg_prefix=prefix, timeout_s=timeout)
    if into is not None:
        into.__dict__.update(new.__dict__)
        new = into
    _world = new
    return _world


def is_initialized() -> bool:
    return _world is not None


def world(what: str = "this") -> WorldInfo:
    """The current WorldInfo; raises NotInitializedError naming ``what`` needed it."""
    if _world is None:
        raise NotInitializedError(
            f"{what} needs the process group: call adaptrun.init() first, at the top of the script")
    return _world


def job_store():
    """The job's unprefixed c10d store (directives live here); None before init()."""
    return _store


_exit_hook = False


def _destroy_at_exit() -> None:
    """A script that ends without finishing its epochs (a step limit, an exception) leaves the
    process group alive; torch then tears gloo's threads down at interpreter exit and may
    abort ("terminate called without an active exception", exit -6). Destroy it first."""
    global _exit_hook
    if not _exit_hook:
        atexit.register(_quiet_shutdown)
        _exit_hook = True


_before_exit: list = []        # weak methods: what holds a process group lets go of it


def release_at_exit(method) -> None:
    """Call bound ``method`` at interpreter exit, before the process group is destroyed (held
    weakly). A DDP reducer still holding the group at exit would destroy it, and join gloo's
    threads, while the interpreter is torn down: an abort ("terminate called without an
    active exception", exit -6) seen on about one exit in twenty."""
    _before_exit.append(weakref.WeakMethod(method))


def _quiet_shutdown() -> None:
    for ref in _before_exit:
        method = ref()
        if method is not None:
            try:
                method()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
    _before_exit.clear()
    gc.collect()                  # the released reducers go now, with the interpreter whole
    try:
        shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def shutdown() -> None:
    """Destroy the process group (a re-form builds a new one with init())."""
    global _world, _store
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = None
    _store = None
