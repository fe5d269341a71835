"""The elastic sampler: which indices each rank reads at each step, from a global cursor.

The model. Epoch ``e`` visits the dataset in one order, a permutation seeded by (seed, e)
(identity when ``shuffle=False``), so every rank of every world computes the same order. The
job's position in it is one number, the *cursor*: how many indices of the order committed
optimizer steps have consumed. A step at cursor c takes the next ``global_batch`` indices,
order[c : c + global_batch], splits them into ``world_size`` contiguous rank slices (sizes
differing by at most one) and each slice into ``micro_batches`` = accum_steps + 1 micro-batches.
Nothing else is state: after a change of world size or batch the next step continues from the
cursor with the new split, so every index of an epoch lands in exactly one committed step.

The end of an epoch. With ``drop_last=False`` a remainder smaller than ``2 * world_size *
micro_batches`` is folded into the step before it, so the last step is a little bigger rather
than leaving a rank a micro-batch of one example (BatchNorm refuses to train on one) or no
data; with ``drop_last=True`` a remainder below ``global_batch`` ends the epoch (the same
indices are dropped on every rank). A step uses at most as many micro-batches as give every
rank two examples in each; if it has fewer examples than ranks (possible only right after the
world grew), a rank without data gets one *padding* example with weight 0.

``weight`` of a rank is n_rank / (micro_batches * step_size): multiplying a rank's accumulated
gradient (a sum of micro-batch means) by it and summing over ranks gives the exact mean
gradient over the step's examples when micro-batches are equal (to within one example
otherwise). A regular step (all micro-batches equal) is the only kind that feeds the gradient
noise statistics.

Everything here is pure; ``data.AdaptiveDataLoader`` drives it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

__all__ = ["SamplerState", "StepPlan", "RankSlice", "permutation", "plan_step", "rank_slice"]


@dataclass
class SamplerState:
    """Everything the sampler needs to continue: part of every snapshot."""

    epoch: int = 0
    cursor: int = 0          # indices of this epoch's order consumed by committed steps
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    global_batch: int = 1    # current global batch (examples per optimizer step)
    accum_steps: int = 0     # extra micro-batches per step (0 = no accumulation)
    init_batch: int = 1      # B0, the batch the LR was tuned at

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: order[start : start + size], split over ranks and micro-batches."""

    start: int
    size: int
    world_size: int
    micro_batches: int

    @property
    def regular(self) -> bool:
        return self.size % (self.world_size * self.micro_batches) == 0


@dataclass(frozen=True)
class RankSlice:
    """This rank's part of a step: positions in the epoch's order, per micro-batch."""

    micro: list = field(default_factory=list)   # list of (begin, end) positions, end exclusive
    count: int = 0                              # real examples (0: one padding example)
    weight: float = 0.0                         # count / (micro_batches * step size)


def permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The epoch's order of dataset indices, identical on every rank."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=g)


def plan_step(num_samples: int, cursor: int, global_batch: int, world_size: int,
              accum_steps: int, drop_last: bool) -> StepPlan | None:
    """The next step from ``cursor``, or None when the epoch is over."""
    remaining = num_samples - cursor
    if remaining <= 0:
        return None
    micro = accum_steps + 1
    if remaining < global_batch and drop_last:
        return None
    size = min(global_batch, remaining)
    if not drop_last and 0 < remaining - size < _MIN_PER_MICRO * world_size * micro:
        size = remaining   # fold a remainder too small to give every micro-batch two
    micro = max(1, min(micro, size // (_MIN_PER_MICRO * world_size)))
    return StepPlan(start=cursor, size=size, world_size=world_size, micro_batches=micro)


_MIN_PER_MICRO = 2     # examples a micro-batch needs (BatchNorm's training minimum)


def _split(begin: int, length: int, parts: int, index: int) -> tuple[int, int]:
    base, extra = divmod(length, parts)
    lo = begin + index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def rank_slice(plan: StepPlan, rank: int) -> RankSlice:
    """Micro-batch ranges of ``rank`` in ``plan``; a rank with no data gets one padding index."""
    lo, hi = _split(plan.start, plan.size, plan.world_size, rank)
    count = hi - lo
    if count == 0:
        return RankSlice(micro=[(plan.start, plan.start + 1)], count=0, weight=0.0)
    micro = [_split(lo, count, plan.micro_batches, k) for k in range(plan.micro_batches)]
    return RankSlice(micro=micro, count=count,
                     weight=count / (plan.micro_batches * plan.size))
