"""What can change under a running script, and how a script keeps up with it.

A planned re-form under adaptrun's agent keeps the process (``job.Job.reform_in_process``):
the script's loop goes on, but its rank, the world size, the local rank, the nodes and the
default process group are those of the new world from the step after the re-form. The
contract:

- ``adaptrun.world()`` is the world *now*: read it where the value is used (each step, each
  log line), not once before the loop. ``generation`` counts the worlds the job has formed
  (0 for the first; one more at every re-form and every restart), the same on every rank.
- ``adaptrun.on_reform(fn)`` calls ``fn(world)`` on every rank after each in-process re-form,
  once the new world holds the newest state and before its first step: where a script
  rebuilds what it derived from the world (its own groups, per-rank files, a logger's name).
- ``torch.distributed``'s default group follows the world. A group captured before a re-form
  (``dist.group.WORLD``, a ``dist.new_group``) belongs to the old world: passing it to a
  ``torch.distributed`` collective or query afterwards raises ``StaleWorldError``, which names
  ``adaptrun.world()``. (torch itself would run it on the old world's connections, or hang.)
- What adaptrun's own objects hold (the wrapper, the loader, the state registry) follows the
  world by itself.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from .errors import StaleWorldError

__all__ = ["World", "StaleWorldError", "world", "on_reform", "retire_groups"]


@dataclass(frozen=True)
class World:
    """This worker's world at the moment ``adaptrun.world()`` was called."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    nodes: int
    generation: int
    device: str


def world() -> World:
    """``adaptrun.world()``: the current world (see the module docstring)."""
    from . import distributed, job
    info = distributed.world("adaptrun.world()")
    j = job.current("adaptrun.world()")
    return World(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                 local_world_size=info.local_world_size, nodes=info.nodes,
                 generation=j.state.worlds, device=info.device)


def on_reform(fn: Callable[[World], None]) -> Callable[[World], None]:
    """``adaptrun.on_reform(fn)``: call ``fn(adaptrun.world())`` after each in-process
    re-form, on every rank. Returns ``fn`` (usable as a decorator)."""
    from . import job
    if not callable(fn):
        raise TypeError(f"adaptrun.on_reform needs a callable, got {type(fn).__name__}")
    job.current("adaptrun.on_reform").reform_callbacks.append(fn)
    return fn


# ---- stale groups ------------------------------------------------------------------------
_retired: dict[int, tuple[object, str]] = {}   # id(group) -> (group, which world it was)
_GUARDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
            "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
            "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
            "gather_object", "scatter", "scatter_object_list", "barrier", "send", "recv",
            "isend", "irecv", "monitored_barrier", "get_rank", "get_world_size",
            "get_process_group_ranks", "get_backend", "new_subgroups")
_installed = False


def retire_groups(what: str) -> None:
    """Before the process group is torn down for a re-form: remember every group of this
    world (the default one and those made from it) as stale; ``what`` names the world."""
    c10d = dist.distributed_c10d
    groups = list(getattr(c10d._world, "pg_map", {}).keys())
    if dist.is_initialized():
        groups.append(c10d._get_default_group())
    for g in groups:
        _retired[id(g)] = (g, what)      # held: its id is never reused for a live group
    _install()


def _check(name: str, pos: int, args, kwargs) -> None:
    if not _retired:
        return
    group = kwargs.get("group", args[pos] if len(args) > pos else None)
    if group is None:
        return
    hit = _retired.get(id(group))
    if hit is not None and hit[0] is group:
        now = world()
        raise StaleWorldError(
            f"torch.distributed.{name}: this process group belongs to {hit[1]}, which was "
            f"re-formed; the world is now {now.world_size} rank(s), this one rank {now.rank} "
            f"(generation {now.generation}). Read adaptrun.world() where you use the rank or "
            "the world size, use the default group (no group=), and rebuild your own groups in "
            "adaptrun.on_reform(fn)")


def _install() -> None:
    """Guard torch.distributed's collectives and queries against retired groups (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in _GUARDED:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        if "group" not in sig.parameters:
            continue
        pos = list(sig.parameters).index("group")

        @functools.wraps(fn)
        def guarded(*args, _fn=fn, _name=name, _pos=pos, **kwargs):
            _check(_name, _pos, args, kwargs)
            return _fn(*args, **kwargs)

        setattr(dist, name, guarded)
