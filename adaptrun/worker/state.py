"""The state that survives a re-form: a registry of named objects, and the snapshot exchange.

Semantics
- ``register_state(name, obj)`` adds anything with ``state_dict``/``load_state_dict`` to what
  is saved and restored. If the job restored a snapshot holding ``name``, the object is loaded
  at once, so registration order does not matter. The library itself registers ``model``,
  ``optimizer``, ``lr_scheduler`` (when given), ``adaptrun.worker.parallel`` (step, progress, GNS
  averages, scaling-rule ramp, directive generation), ``adaptrun.worker.sampler`` (epoch, cursor,
  batch configuration), ``adaptrun.worker.epochs`` and ``adaptrun.rng`` (torch/numpy/python RNG of
  the saving rank).
- ``encode``/``decode`` turn the registry into snapshot bytes and back; a snapshot carries the
  model's fingerprint (parameter names and shapes) and restoring one taken from another model
  raises ``SnapshotMismatchError``.
- ``exchange_newest(group)`` is the restore after a re-form, and the only collective here:
  every rank offers the step of the newest snapshot it can read (node-local or persistent),
  the rank with the newest sends its bytes to all over the *current* process group. It does
  not care how the group was formed (a torchrun restart today, an in-process re-form later).
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .errors import SnapshotMismatchError, StateRegistryError

__all__ = ["StateRegistry", "RNGState", "fingerprint", "encode", "decode", "exchange_newest",
           "SNAPSHOT_FORMAT"]

SNAPSHOT_FORMAT = 1


def fingerprint(module: torch.nn.Module) -> list:
    """Names and shapes of a model's state, to tell one model from another."""
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


class RNGState:
    """torch, numpy and python RNG states as one registrable object."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


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
                obj.load_state_dict(self.restored["states"][name])
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
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


def encode(registry: StateRegistry, step: int, epoch: int) -> bytes:
    model = registry.get("model")
    buf = io.BytesIO()
    torch.save({"format": SNAPSHOT_FORMAT, "step": int(step), "epoch": int(epoch),
                "fingerprint": fingerprint(model) if model is not None else [],
                "states": registry.collect()}, buf)
    return buf.getvalue()


def decode(data: bytes, origin: str = "snapshot") -> dict:
    snap = torch.load(io.BytesIO(data), weights_only=False)
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotMismatchError(
            f"{origin} is not an adaptrun snapshot of format {SNAPSHOT_FORMAT}; delete it or "
            "point ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR to a fresh directory")
    return snap


def exchange_newest(rank: int, world_size: int, dirs: list[Path | None]) -> tuple[dict, str] | None:
    """Collective: find the newest snapshot any rank holds and give it to every rank."""
    best: tuple[int, Path] | None = None
    for d in dirs:
        found = checkpoint.newest(d)
        if found is not None and (best is None or found[0] > best[0]):
            best = found
    offer = torch.tensor([best[0] if best else -1, rank], dtype=torch.int64)
    if world_size > 1:
        offers = [torch.zeros(2, dtype=torch.int64) for _ in range(world_size)]
        dist.all_gather(offers, offer)
    else:
        offers = [offer]
    step, holder = max(((int(o[0]), -int(o[1])) for o in offers))
    holder = -holder
    if step < 0:
        return None
    if rank == holder:
        data = checkpoint.read(best[1])
        size = torch.tensor([len(data)], dtype=torch.int64)
        origin = str(best[1])
    else:
        size = torch.zeros(1, dtype=torch.int64)
        data, origin = b"", f"the snapshot of step {step} sent by rank {holder}"
    if world_size > 1:
        dist.broadcast(size, src=holder)
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == holder
                   else torch.empty(int(size.item()), dtype=torch.uint8))
        dist.broadcast(payload, src=holder)
        data = payload.numpy().tobytes()
    return decode(data, origin), origin
