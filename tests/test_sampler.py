"""The elastic sampler's plan of a step: every index of an epoch in exactly one step, and no
rank given a micro-batch of one example (BatchNorm cannot train on one)."""
from __future__ import annotations

import itertools

from adaptrun.worker.sampler import plan_step, rank_slice


def _epoch(n, batch, world, accum):
    cursor, steps = 0, []
    while (plan := plan_step(n, cursor, batch, world, accum, drop_last=False)) is not None:
        steps.append(plan)
        cursor += plan.size
    return steps


def test_every_index_once_and_no_micro_batch_of_one():
    # 1437 digits over the batches and worlds a job moves through (the tail of an epoch at
    # batch 48 on 2 ranks with 2 micro-batches left a rank one image: a crash in BatchNorm).
    for n, batch, world, accum in itertools.product((1437, 1000, 7, 5), (32, 48, 126, 3),
                                                     (1, 2, 3), (0, 1, 3)):
        seen = []
        for plan in _epoch(n, batch, world, accum):
            for rank in range(world):
                sl = rank_slice(plan, rank)
                if sl.count == 0:
                    continue
                sizes = [hi - lo for lo, hi in sl.micro]
                assert min(sizes) >= 2 or plan.size < 2 * world, (n, batch, world, accum, plan)
                seen += [i for lo, hi in sl.micro for i in range(lo, hi)]
        assert sorted(seen) == list(range(n)), (n, batch, world, accum)
