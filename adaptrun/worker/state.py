"""The state that survives a re-form: a registry of named objects, and the snapshot exchange.

Semantics
- ``register_state(name, obj)`` adds anything with ``state_dict``/``load_state_dict`` to what
  is saved and restored. If the job restored a snapshot holding ``name``, the object is loaded
  at once, so registration order does not matter. The library itself registers ``model``,
  ``optimizer``, ``lr_scheduler`` (when given), ``adaptrun.worker.parallel`` (step, progress, GNS
  averages, scaling-rule ramp, directive generation), ``adaptrun.worker.sampler`` (epoch, cursor,
  batch configuration), ``adaptrun.worker.epochs`` and ``adaptrun.rng`` (torch/numpy/python RNG of
  the saving rank, and its CUDA RNG where CUDA is available).
- ``encode``/``decode`` turn the registry into snapshot bytes and back; a snapshot carries the
  model's fingerprint (parameter names and shapes) and restoring one taken from another model
  raises ``SnapshotMismatchError``. Bytes that do not load (a truncated or overwritten file)
  raise ``SnapshotCorruptError`` from ``decode``.
- Devices: a snapshot restores onto the job's device (``world.device``), whatever device it
  was saved from (``map_location``): a tensor saved on a GPU comes to the job's GPU, or to
  the CPU on a job without one; a tensor saved on the CPU stays there (RNG states must).
  A state sent from memory travels on the job's device. The other collectives here are on
  CPU tensors (gloo under the CUDA group ``"cpu:gloo,cuda:nccl"``).
- ``exchange_newest`` is the restore after a re-form, and the only collective here: every
  rank offers the step of the newest state it holds, in memory (a rank that re-formed in
  process) or in a snapshot it can read (node-local or persistent); the newest wins, memory
  before disk at the same step. From memory the holder sends the state tensor by tensor (one
  flat buffer per dtype, no serialisation) to the ranks that need it, over a group of just
  them: a scale-down moves nothing. From disk it sends the snapshot's bytes to all. It does
  not care how the group was formed (a restart of every process, or survivors re-forming in
  process with fresh joiners). A snapshot file that does not load is renamed
  ``*.pt.corrupt`` (kept for a look, out of the way) and the exchange runs again without it,
  so the newest *readable* state wins; when unreadable files were all there was, every rank
  raises ``SnapshotCorruptError`` instead of starting the job afresh.
"""
from __future__ import annotations

import copy
import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .errors import SnapshotCorruptError, SnapshotMismatchError, StateRegistryError

__all__ = ["StateRegistry", "RNGState", "fingerprint", "encode", "encode_snapshot", "save_snapshot",
           "fill_deferred", "detached_copy", "decode", "map_location", "exchange_newest",
           "SNAPSHOT_FORMAT"]

SNAPSHOT_FORMAT = 1


def fingerprint(module: torch.nn.Module) -> list:
    """Names and shapes of a model's state, to tell one model from another."""
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


class RNGState:
    """torch, numpy and python RNG states as one registrable object, plus one CUDA RNG state
    per visible GPU where CUDA is available (``"cuda"``). The CUDA states are restored only
    where CUDA is available and the GPU counts match; elsewhere they are skipped."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                 "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def take_module_state(module: torch.nn.Module, state: dict) -> bool:
    """Load ``state`` into ``module`` by handing each parameter and buffer the restored
    tensor's storage (``t.data = restored``: the same Parameter objects, so an optimizer
    or DDP built on them still holds them) instead of copying into it: a received state of
    hundreds of MB is not copied once more on a resize's path, nor held twice. Only where
    that is what ``load_state_dict`` would do: the same keys, every value a dense tensor of
    the same shape, strides, dtype and device, and no module with load hooks or its own
    loading (BatchNorm's only migrates old versions). Returns False, having changed
    nothing, when not; the caller then loads by copy."""
    own = module.state_dict(keep_vars=True)
    if own.keys() != state.keys():
        return False
    for m in module.modules():
        if (m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
                or (type(m)._load_from_state_dict is not torch.nn.Module._load_from_state_dict
                    and not isinstance(m, torch.nn.modules.batchnorm._NormBase))):
            return False
    for k, mine in own.items():
        t = state[k]
        if not (isinstance(t, torch.Tensor) and isinstance(mine, torch.Tensor)
                and t.layout == torch.strided and type(t) is torch.Tensor
                and t.shape == mine.shape and t.stride() == mine.stride()
                and t.dtype == mine.dtype and t.device == mine.device):
            return False
    with torch.no_grad():
        for k, mine in own.items():
            mine.data = state[k]
    return True


class StateRegistry:
    """Named stateful objects; loads each from the restored snapshot as it registers."""

    def __init__(self):
        self._objects: dict[str, object] = {}
        self.restored: dict | None = None        # decoded snapshot, when one was found
        self.restored_from: str = ""

    def register(self, name: str, obj) -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise StateRegistryError(
                f"register_state({name!r}, ...): the object needs state_dict() and "
                "load_state_dict(); wrap it in a small class that has both")
        if name in self._objects and self._objects[name] is not obj:
            raise StateRegistryError(
                f"state {name!r} is registered twice; give each object its own name")
        self._objects[name] = obj
        if self.restored is not None and name in self.restored["states"]:
            if name == "model":
                self._check_model(obj)
            if name == "optimizer":
                self._check_optimizer(obj)
            try:
                state = self.restored["states"][name]
                if not (isinstance(obj, torch.nn.Module) and take_module_state(obj, state)):
                    obj.load_state_dict(state)
            except (KeyError, ValueError, RuntimeError, TypeError, OverflowError, IndexError,
                    AttributeError) as exc:   # what a damaged file's values raise on loading
                raise SnapshotMismatchError(
                    f"the snapshot {self.restored_from} does not fit {name!r} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); delete it or set "
                    "ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR to a fresh directory"
                ) from None

    def _check_model(self, module) -> None:
        theirs = [tuple(x) if isinstance(x, list) else x for x in self.restored["fingerprint"]]
        mine = fingerprint(module)
        theirs = [(k, tuple(s)) for k, s in theirs]
        if theirs != mine:
            raise SnapshotMismatchError(
                f"the snapshot {self.restored_from} belongs to another model "
                f"({len(theirs)} tensors vs {len(mine)}, first difference at "
                f"{next((a for a, b in zip(theirs, mine) if a != b), 'the end')}); delete it or "
                "set ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR to a fresh directory")

    def _check_optimizer(self, optimizer) -> None:
        """torch loads any optimizer's state into any other and fails only at step(): compare
        the hyper-parameter names of the param groups (lr, momentum, betas, ...) first."""
        theirs = [sorted(k for k in g if k != "params")
                  for g in self.restored["states"]["optimizer"].get("param_groups", [])]
        mine = [sorted(k for k in g if k != "params") for g in optimizer.param_groups]
        if theirs != mine:
            raise SnapshotMismatchError(
                f"the snapshot {self.restored_from} does not fit 'optimizer' (it was saved by "
                f"an optimizer with param-group settings {theirs[:1]}, this one has "
                f"{mine[:1]}); delete it or set ADAPTRUN_SNAPSHOT_DIR / "
                "ADAPTRUN_CHECKPOINT_DIR to a fresh directory")

    def names(self) -> list[str]:
        return list(self._objects)

    def get(self, name: str):
        return self._objects.get(name)

    def collect(self) -> dict:
        return {name: obj.state_dict() for name, obj in self._objects.items()}


def snapshot_of(registry: StateRegistry, step: int, epoch: int) -> dict:
    """The job's state as a snapshot dict (tensors are the live ones: no copy)."""
    model = registry.get("model")
    return {"format": SNAPSHOT_FORMAT, "step": int(step), "epoch": int(epoch),
            "fingerprint": fingerprint(model) if model is not None else [],
            "states": registry.collect()}


def detached_copy(obj, reuse: list | None = None, defer: set | None = None,
                  deferred: list | None = None):
    """``obj`` (a snapshot dict) with every tensor cloned (on its device) and every container
    rebuilt, so that nothing in it aliases state the next step mutates; a tensor reached twice
    (tied weights) is cloned once. Other leaves are deep-copied (numpy RNG state, user objects).
    This is the part of an asynchronous snapshot that runs on the step.

    ``reuse``: a list holding the CPU tensors of a previous copy that nobody reads any more
    (empty the first time). A tensor of the same shape and dtype at the same place is
    overwritten instead of allocated, which spares the step the allocation and first-touch
    page faults of a fresh copy; the list then holds this copy's CPU tensors, for the next.

    ``defer``: storage addresses of CPU tensors that nothing changes before the next
    optimizer step (the model's parameters, the optimizer's state). Their copies get their
    place now but not their values: ``(destination, source)`` pairs go to ``deferred``, for a
    background thread to fill while the next step computes (``fill_deferred``); the caller
    must wait for that before the optimizer steps."""
    memo = {"pool": list(reversed(reuse or [])), "out": [], "defer": defer or set(),
            "deferred": deferred if deferred is not None else []}
    result = _copy(obj, memo)
    if reuse is not None:
        reuse[:] = memo["out"]
    return result


def fill_deferred(deferred: list) -> None:
    """Copy the values ``detached_copy`` left for later (any thread: the copies release the
    GIL)."""
    with torch.no_grad():
        for dst, src in deferred:
            dst.copy_(src)


def _copy(obj, memo: dict):
    if torch.is_tensor(obj):
        if id(obj) not in memo:
            src = obj.detach()
            cpu = src.device.type == "cpu"
            later = cpu and src.untyped_storage().data_ptr() in memo["defer"]
            dst = None
            if cpu and memo["pool"]:
                old = memo["pool"].pop()
                if old.shape == src.shape and old.dtype == src.dtype and old.is_contiguous():
                    dst = old if later else old.copy_(src)
            if dst is None:
                dst = torch.empty_like(src, memory_format=torch.contiguous_format) if later \
                    else src.clone()
            if later:
                memo["deferred"].append((dst, src))
            memo[id(obj)] = dst
            if cpu:
                memo["out"].append(dst)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)          # keeps the dict's type (OrderedDict, defaultdict, ...)
        for k, v in obj.items():
            out[k] = _copy(v, memo)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_copy(v, memo) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v, memo) for v in obj)
    if isinstance(obj, (int, float, str, bytes, bool, type(None))):
        return obj
    return copy.deepcopy(obj)


def save_snapshot(snapshot: dict, f) -> None:
    """Write a snapshot dict (``snapshot_of`` or its ``detached_copy``) into file ``f``."""
    torch.save(snapshot, f)


def encode_snapshot(snapshot: dict) -> bytes:
    """The bytes of a snapshot dict (``snapshot_of`` or its ``detached_copy``)."""
    buf = io.BytesIO()
    save_snapshot(snapshot, buf)
    return buf.getvalue()


def encode(registry: StateRegistry, step: int, epoch: int) -> bytes:
    return encode_snapshot(snapshot_of(registry, step, epoch))


def map_location(device: str | None):
    """``torch.load``'s ``map_location`` for a job on ``device`` (None: the CPU): what was
    saved on an accelerator (any GPU index) comes to ``device``, or to the CPU when ``device``
    is the CPU; what was saved on the CPU stays on the CPU."""
    target = str(torch.device(device or "cpu"))

    def place(storage, location: str):
        return torch.serialization.default_restore_location(
            storage, "cpu" if location == "cpu" else target)
    return place


def decode(data: bytes, origin: str = "snapshot", device: str | None = None) -> dict:
    """The snapshot dict of ``data``, its tensors placed for a job on ``device``
    (``map_location``); SnapshotCorruptError when the bytes do not load,
    SnapshotMismatchError when they load but are not a snapshot of this format."""
    try:
        snap = torch.load(io.BytesIO(data), weights_only=False,
                          map_location=map_location(device))
    except Exception as exc:  # noqa: BLE001 - whatever torch/pickle raise on bad bytes
        raise SnapshotCorruptError(
            f"{origin} cannot be read ({type(exc).__name__}: {str(exc)[:120]}): it is "
            f"truncated or overwritten; delete it (an older snapshot is used if one is "
            "left) or point ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR to a fresh "
            "directory") from None
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT or not (
            isinstance(snap.get("step"), int) and isinstance(snap.get("epoch"), int)
            and isinstance(snap.get("fingerprint"), list)
            and isinstance(snap.get("states"), dict)):
        fmt = snap.get("format") if isinstance(snap, dict) else None
        what = (f"a snapshot of format {fmt!r} (another adaptrun version?)"
                if fmt not in (None, SNAPSHOT_FORMAT) else "not an adaptrun snapshot")
        raise SnapshotMismatchError(
            f"{origin} is {what}; this adaptrun reads format {SNAPSHOT_FORMAT}: delete it or "
            "point ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR to a fresh directory")
    return snap


class _TensorSlot:
    """Where a tensor sat in a state dict sent from memory: its place in the list of the
    state's tensors, dtype, shape, and whether it lived on the CPU (an RNG state must come
    back there)."""

    def __init__(self, index: int, dtype, shape, on_cpu: bool):
        self.index, self.dtype, self.shape, self.on_cpu = index, dtype, tuple(shape), on_cpu

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# A tensor of at least this many elements is broadcast on its own, straight from where it
# lives into the receiver's new tensor; smaller ones share one packed buffer per dtype (a
# handful of collectives for a model's hundreds of biases and step counters).
_SEND_ALONE = 1 << 18


def _strip(obj, tensors: list, slots: list):
    """``obj`` with every tensor replaced by a ``_TensorSlot``; the tensors go to ``tensors``
    and their slots to ``slots``, in order."""
    if torch.is_tensor(obj):
        slot = _TensorSlot(len(tensors), obj.dtype, obj.shape, obj.device.type == "cpu")
        tensors.append(obj.detach())
        slots.append(slot)
        return slot
    if isinstance(obj, dict):
        return type(obj)((k, _strip(v, tensors, slots)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_strip(v, tensors, slots) for v in obj)
    return obj


def _slots_of(obj, slots: list) -> list:
    if isinstance(obj, _TensorSlot):
        slots.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots_of(v, slots)
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        for v in obj:
            _slots_of(v, slots)
    return slots


def _fill(obj, tensors: list):
    if isinstance(obj, _TensorSlot):
        t = tensors[obj.index]
        return t.cpu() if obj.on_cpu else t
    if isinstance(obj, dict):
        return type(obj)((k, _fill(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _send_from_memory(snapshot: dict | None, holder: int, rank: int, group,
                      device: str | None = None) -> dict:
    """Broadcast ``snapshot`` (on ``holder``) to the ranks of ``group``: the structure once,
    then each large tensor from where it lives (no packing copy of the model's state), and
    the small ones packed per dtype, on the job's ``device`` (None: the CPU)."""
    tensors: list = []
    skeleton = [_strip(snapshot, tensors, slots := []) if rank == holder else None]
    dist.broadcast_object_list(skeleton, src=holder, group=group)
    if rank != holder:
        slots = _slots_of(skeleton[0], [])
    dev = torch.device(device or "cpu")
    received: list = [None] * len(slots)
    small: dict = {}
    for slot in slots:
        if slot.numel < _SEND_ALONE:
            small.setdefault(slot.dtype, []).append(slot)
            continue
        if rank == holder:
            t = tensors[slot.index].to(dev).contiguous()
        else:
            t = torch.empty(slot.shape, dtype=slot.dtype, device=dev)
        dist.broadcast(t, src=holder, group=group)
        received[slot.index] = t
    for dtype, group_slots in small.items():
        if rank == holder:
            flat = torch.cat([tensors[s.index].reshape(-1).to(dev) for s in group_slots])
        else:
            flat = torch.empty(sum(s.numel for s in group_slots), dtype=dtype, device=dev)
        dist.broadcast(flat, src=holder, group=group)
        offset = 0
        for s in group_slots:
            received[s.index] = flat[offset:offset + s.numel].view(s.shape)
            offset += s.numel
    return snapshot if rank == holder else _fill(skeleton[0], received)


def exchange_newest(rank: int, world_size: int, dirs: list[Path | None],
                    memory=None, agreed: dict | None = None,
                    device: str | None = None) -> tuple[dict, str] | None:
    """Collective: find the newest state any rank holds and give it to the ranks that need it.

    ``memory``: (step, callable returning the snapshot dict) of a rank that holds the job's
    state in memory. Returns (snapshot, origin) to a rank that needed the state, placed for
    the job's ``device`` (None: the CPU); None to a rank that holds it already, or when no
    rank holds any state. ``agreed["step"]`` gets the step every rank now holds (-1: none),
    the same on every rank."""
    on_disk = sorted((found for d in dirs if d is not None for found in checkpoint.list_all(d)),
                     reverse=True)                  # newest first
    skipped: list[str] = []                          # unreadable files passed over
    while True:
        found = _exchange(rank, world_size, on_disk, memory, skipped, agreed, device)
        if found is not _AGAIN:
            return found


_AGAIN = object()


def _exchange(rank: int, world_size: int, on_disk: list, memory, skipped: list,
              agreed: dict | None, device: str | None):
    """One round of ``exchange_newest``; ``_AGAIN`` when the chosen file did not load (its
    holder dropped it from ``on_disk``: every rank runs another round)."""
    best = on_disk[0] if on_disk else None
    mem_step = int(memory[0]) if memory is not None else -1
    disk_step = best[0] if best else -1
    if mem_step >= disk_step and memory is not None:
        offer = torch.tensor([mem_step, 1, rank, len(skipped)], dtype=torch.int64)
    else:
        offer = torch.tensor([disk_step, 0, rank, len(skipped)], dtype=torch.int64)
    if world_size > 1:
        offers = [torch.zeros(4, dtype=torch.int64) for _ in range(world_size)]
        dist.all_gather(offers, offer)
    else:
        offers = [offer]
    step, in_memory, neg_holder = max((int(o[0]), int(o[1]), -int(o[2])) for o in offers)
    holder = -neg_holder
    if agreed is not None:
        agreed["step"] = step
    if step < 0:
        if sum(int(o[3]) for o in offers):
            raise SnapshotCorruptError(
                f"every snapshot the job has is unreadable ({', '.join(skipped) or 'on another node'}"
                f"); it will not train the job again from step 0: restore a good snapshot into "
                "ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR, or point them to a fresh "
                "directory to start a new job")
        return None
    if in_memory:
        needers = [int(o[2]) for o in offers if not (int(o[0]) == step and int(o[1]))]
        origin = f"the state of step {step} in the memory of rank {holder}"
        if not needers:
            return None               # every rank holds the newest state already
        ranks = sorted({holder, *needers})
        # Every rank calls new_group, members or not; a group of the whole world is the
        # default one (a new group would connect every pair of ranks again).
        group = None if len(ranks) == world_size else dist.new_group(ranks=ranks)
        if rank not in needers:
            if rank == holder:
                _send_from_memory(memory[1](), holder, rank, group, device)
            return None               # this rank holds the newest state already
        return _send_from_memory(None, holder, rank, group, device), origin
    snap = None
    if rank == holder:
        data = checkpoint.read(best[1])
        origin = str(best[1])
        try:
            snap = decode(data, origin, device)
            size = torch.tensor([len(data)], dtype=torch.int64)
        except SnapshotCorruptError as exc:
            print(f"adaptrun: {exc}; renamed it to {best[1].name}.corrupt and restoring the "
                  f"next older snapshot", file=sys.stderr, flush=True)
            on_disk.pop(0)
            skipped.append(str(best[1]))
            checkpoint.set_aside(best[1])
            size = torch.tensor([-1], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
        data, origin = b"", f"the snapshot of step {step} sent by rank {holder}"
    if world_size > 1:
        dist.broadcast(size, src=holder)
    if int(size.item()) < 0:
        return _AGAIN
    if world_size > 1:
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == holder
                   else torch.empty(int(size.item()), dtype=torch.uint8))
        dist.broadcast(payload, src=holder)
        data = payload.numpy().tobytes()
    return (snap if snap is not None else decode(data, origin, device)), origin
