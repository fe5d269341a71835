"""Directives: a new batch configuration (or a planned re-form) sent to a running job.

The protocol, through the job's c10d store (``distributed.job_store()``: the store at
``MASTER_ADDR:MASTER_PORT`` that the launcher gives the workers, unprefixed):

    adaptrun/directive          written by the agent: the newest Directive as JSON,
                                e.g. {"generation": 3, "global_batch": 512, "local_batch": 64,
                                "accum_steps": 1, "target_world_size": 4,
                                "reform_at_step": null, "reason": "goodput +18%"}
    adaptrun/directive/applied  written by rank 0: JSON {"generation", "step"} of the last
                                directive applied and the step boundary it took effect at
    adaptrun/status             written by rank 0 at every report: JSON {"step", "epoch",
                                "generation", "world_size", "global_batch"}

Rules
- ``generation`` must grow; a directive whose generation is not above the applied one is
  ignored (so re-writing the same JSON is harmless). One key holds one directive: an agent
  overwrites it, a later generation supersedes an unapplied earlier one.
- Rank 0 reads the key (at most every ``poll_interval_s``) and folds it into the statistics
  all-reduce the worker already does before every optimizer step; so every rank learns it at
  the same step and applies it at the next step boundary. Nothing else is exchanged.
- ``global_batch`` and ``accum_steps`` set the batch; ``local_batch`` is informative (it
  follows from them and the world size: ceil(global_batch / (world_size * (accum_steps+1)))).
- ``reform_at_step``: the workers finish step max(S, current), snapshot, and exit with
  ``PLANNED_EXIT_CODE`` (75) so the agent re-forms the group (``target_world_size`` is for the
  agent). ``0`` means at the next step boundary. Under plain torchrun the exit reads as a
  failure and spends a restart; the new world restores from that snapshot and loses nothing.
- When the store is in-process (alone, no launcher) ``write_directive`` still works there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["Directive", "DIRECTIVE_KEY", "APPLIED_KEY", "STATUS_KEY", "PLANNED_EXIT_CODE",
           "write_directive", "read_directive", "read_applied", "to_vector", "from_vector",
           "VECTOR_LEN"]

DIRECTIVE_KEY = "adaptrun/directive"
APPLIED_KEY = "adaptrun/directive/applied"
STATUS_KEY = "adaptrun/status"
PLANNED_EXIT_CODE = 75   # EX_TEMPFAIL: "saved at an agreed step, re-form me"
VECTOR_LEN = 7


@dataclass(frozen=True)
class Directive:
    generation: int
    global_batch: int
    local_batch: int = 0
    accum_steps: int = 0
    target_world_size: int = 0
    reform_at_step: int | None = None
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Directive":
        d = json.loads(text)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def write_directive(store, directive: Directive) -> None:
    store.set(DIRECTIVE_KEY, directive.to_json())


def read_directive(store) -> Directive | None:
    if store is None or not store.check([DIRECTIVE_KEY]):
        return None
    return Directive.from_json(store.get(DIRECTIVE_KEY))


def read_applied(store) -> dict | None:
    if store is None or not store.check([APPLIED_KEY]):
        return None
    return json.loads(store.get(APPLIED_KEY))


def to_vector(d: Directive | None) -> list[float]:
    """Directive as floats for the all-reduce (zeros: none); the reason stays on rank 0."""
    if d is None:
        return [0.0] * VECTOR_LEN
    return [float(d.generation), float(d.global_batch), float(d.local_batch),
            float(d.accum_steps), float(d.target_world_size),
            float(-1 if d.reform_at_step is None else d.reform_at_step), 1.0]


def from_vector(v) -> Directive | None:
    v = [float(x) for x in v]
    if v[6] < 0.5:
        return None
    return Directive(generation=int(round(v[0])), global_batch=int(round(v[1])),
                     local_batch=int(round(v[2])), accum_steps=int(round(v[3])),
                     target_world_size=int(round(v[4])),
                     reform_at_step=None if v[5] < -0.5 else int(round(v[5])))
