"""The report a running job sends upstream: what rank 0 measured over the last few steps.

One dataclass, the contract between the worker library (which fills it), the agent (which
relays it), the controller and the simulator (which feed it to the policy). Field names are
the ones the proto uses. Times are seconds per optimizer step; ``grad_var`` is tr(Sigma)/B0,
the variance at the initial batch (Pollux's convention, see ``efficiency``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["Report", "ReportError"]


class ReportError(ValueError):
    """A report with a field out of range; the message names the field and what is allowed."""


@dataclass(frozen=True)
class Report:
    job_id: str
    step: int                 # optimizer steps committed so far
    progress: float           # B0-equivalent steps so far (sum of gains)
    world_size: int           # replicas (worker processes)
    nodes: int                # nodes the replicas are spread over
    local_batch: int          # examples per replica per micro-batch
    accum_steps: int          # extra micro-batches per optimizer step (0 = none)
    init_batch: int           # B0, the batch the LR was tuned at
    step_time_s: float        # wall time of one optimizer step
    sync_time_s: float        # part of it spent waiting on the gradient all-reduce
    grad_sqr: float           # smoothed |G|^2 at the conservative end (gns.GNSState)
    grad_var: float           # smoothed tr(Sigma) / B0, likewise: their ratio is a low bound
    loss: float = math.nan   # mean training loss since the last report (NaN: none recorded)
    lr: float = math.nan
    epoch: int = 0
    target_progress: float = math.nan  # B0-steps the whole run needs, when the job knows it
    time_s: float = 0.0       # seconds since the job started (wall or simulated)
    # The script's own limits (AdaptiveDataLoader): 0 = not declared (a report of another
    # source); max_batch == init_batch is a fixed batch.
    max_batch: int = 0
    local_batch_min: int = 0
    local_batch_max: int = 0
    accumulation: bool = False
    generation: int = 0       # newest directive the world applied
    resize_gap_s: float = math.nan  # the planned re-form before this world: last old step to
                                    # first new step (NaN: none since the last report)
    metric_name: str = ""     # adaptrun.record_metric(name, value): the script's own figure
    metric: float = math.nan
    finished: bool = False    # the job's last epoch is done

    @property
    def global_batch(self) -> int:
        return self.world_size * self.local_batch * (self.accum_steps + 1)

    @property
    def noise_scale(self) -> float:
        if self.grad_sqr <= 0:
            return math.inf
        return self.init_batch * max(self.grad_var, 0.0) / self.grad_sqr

    def validate(self) -> "Report":
        """Raise ReportError naming the first bad field; return self when all are valid."""
        if not self.job_id or not isinstance(self.job_id, str):
            raise ReportError("job_id must be a non-empty string")
        for name in ("step", "world_size", "nodes", "local_batch", "accum_steps",
                     "init_batch", "epoch", "max_batch", "local_batch_min", "local_batch_max",
                     "generation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ReportError(f"{name} must be an integer, got {v!r}")
        for name in ("step", "accum_steps", "epoch", "max_batch", "local_batch_min",
                     "local_batch_max", "generation"):
            if getattr(self, name) < 0:
                raise ReportError(f"{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.max_batch < self.init_batch:
            raise ReportError(f"max_batch ({self.max_batch}) is below init_batch "
                              f"({self.init_batch})")
        if 0 < self.local_batch_max < self.local_batch_min:
            raise ReportError(f"local_batch_max ({self.local_batch_max}) is below "
                              f"local_batch_min ({self.local_batch_min})")
        if not isinstance(self.metric_name, str) or len(self.metric_name) > 64 or (
                self.metric_name and not self.metric_name.isprintable()):
            raise ReportError("metric_name must be at most 64 printable characters")
        for name in ("resize_gap_s", "metric"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isinf(v):
                raise ReportError(f"{name} must be a finite number or NaN, got {v!r}")
        if self.resize_gap_s < 0:
            raise ReportError(f"resize_gap_s must be >= 0, got {self.resize_gap_s}")
        for name in ("world_size", "nodes", "local_batch", "init_batch"):
            if getattr(self, name) < 1:
                raise ReportError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nodes > self.world_size:
            raise ReportError(f"nodes ({self.nodes}) cannot exceed world_size ({self.world_size})")
        for name in ("progress", "step_time_s", "sync_time_s", "grad_sqr", "grad_var", "time_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ReportError(f"{name} must be a finite number, got {v!r}")
        for name in ("progress", "sync_time_s", "time_s", "grad_var"):
            if getattr(self, name) < 0:
                raise ReportError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.step_time_s <= 0:
            raise ReportError(f"step_time_s must be > 0, got {self.step_time_s}")
        if self.sync_time_s > self.step_time_s:
            raise ReportError("sync_time_s cannot exceed step_time_s")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ReportError(f"unknown report fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)
