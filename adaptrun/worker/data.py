"""AdaptiveDataLoader: micro-batches of this rank's slice of each step, elastic and exactly-once.

Iterating the loader yields this rank's micro-batches of each optimizer step (see ``sampler``
for which indices) and arranges DDP's ``no_sync`` around all but the last micro-batch of a
step, so a loop ``for x, y in loader: optimizer.zero_grad(); loss.backward(); optimizer.step()``
stays the same when accumulation turns on: ``AdaptiveDataParallel`` makes ``optimizer.step()``
a no-op on all but the last micro-batch and ``zero_grad()`` a no-op on all but the first
(``loader.is_step_end`` tells a script which micro-batch ends the step). Before each step it
runs the job's step boundary (commit, directive, snapshot, planned exit: ``job``).

``batch_size`` is the initial global batch B0 (the batch the LR was tuned at).
``current_batch_size`` is the global batch now, ``current_local_batch_size`` the examples per
rank per micro-batch, ``accumulation_steps`` the extra micro-batches per step.
``current_indices`` holds the dataset indices of the micro-batch just yielded (empty for a
padding micro-batch whose gradient counts zero).

Items are read in the worker process (``dataset[i]`` or ``dataset.__getitems__``) and joined
with ``collate_fn`` (torch's default collate when None).
"""
from __future__ import annotations

import math
import operator
import sys

import torch
from torch.utils.data import default_collate

from . import distributed, job, memory
from .errors import BatchConfigError
from .sampler import SamplerState, StepPlan, permutation, plan_step, rank_slice

__all__ = ["AdaptiveDataLoader"]


_MAX_BATCH = 1 << 53   # a batch size beyond this cannot be reported (nor trained)


def _whole(name: str, value) -> int:
    """``value`` as a batch size: an integer (a float only when whole) up to ``_MAX_BATCH``."""
    try:
        whole = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        whole = int(value) if isinstance(value, float) and value.is_integer() else None
    if whole is None:
        raise BatchConfigError(f"{name}={value!r} must be a whole number of examples")
    if whole > _MAX_BATCH:
        raise BatchConfigError(f"{name}={value!r} exceeds {_MAX_BATCH} examples; use a "
                               "batch size a step can hold")
    return whole


class AdaptiveDataLoader:
    def __init__(self, dataset, batch_size: int, shuffle: bool = True, *, seed: int = 0,
                 drop_last: bool = False, collate_fn=None):
        world = distributed.world("AdaptiveDataLoader")
        self._job = job.current("AdaptiveDataLoader")
        self._world = world
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        try:
            n = len(dataset)
        except TypeError:
            raise BatchConfigError(
                f"AdaptiveDataLoader needs a map-style dataset (len() and dataset[i]); got a "
                f"{type(dataset).__name__} without len(): wrap an iterable in a list or a "
                "torch.utils.data.Dataset") from None
        batch_size = _whole("batch_size", batch_size)
        if batch_size < world.world_size:
            raise BatchConfigError(
                f"batch_size={batch_size} is below the world size {world.world_size}: every "
                f"rank needs at least one example per step; use batch_size >= {world.world_size}")
        if n < 1:
            raise BatchConfigError("the dataset is empty; give AdaptiveDataLoader some data")
        if drop_last and n < batch_size:
            raise BatchConfigError(
                f"the dataset has {n} examples, fewer than batch_size={batch_size}, and "
                "drop_last=True drops them all: every epoch would be empty; use drop_last=False "
                "or a smaller batch_size")
        self.state = SamplerState(seed=seed, shuffle=shuffle, drop_last=drop_last,
                                  global_batch=int(batch_size), init_batch=int(batch_size))
        self.max_batch_size = int(batch_size)
        self.local_batch_bounds: tuple[int, int] | None = None
        self.accumulation = False
        self.current_indices = torch.empty(0, dtype=torch.long)
        self.is_step_end = True
        self.micro_index = 0
        self._in_flight: StepPlan | None = None
        self._job.registry.register("adaptrun.sampler", self.state)
        self._job.loader = self

    # ---- configuration -------------------------------------------------------------
    def autoscale_batch_size(self, max_batch_size: int, local_batch_bounds=None,
                             accumulation: bool = False) -> None:
        """Allow the global batch to grow up to ``max_batch_size`` (set by directives)."""
        w = self._world.world_size
        n = len(self.dataset)
        max_batch_size = _whole("max_batch_size", max_batch_size)
        if max_batch_size < self.state.init_batch:
            raise BatchConfigError(
                f"max_batch_size={max_batch_size} is below batch_size={self.state.init_batch}; "
                "give a max_batch_size >= batch_size")
        if local_batch_bounds is not None:
            try:
                lo, hi = (_whole("local_batch_bounds", x) for x in local_batch_bounds)
            except (TypeError, ValueError):
                raise BatchConfigError(
                    f"local_batch_bounds={local_batch_bounds!r} must be a pair of integers "
                    "(low, high)") from None
            if not 1 <= lo <= hi:
                raise BatchConfigError(
                    f"local_batch_bounds={local_batch_bounds} must satisfy 1 <= low <= high")
            if lo * w > n:
                raise BatchConfigError(
                    f"local_batch_bounds low={lo} needs {lo * w} examples per step on {w} "
                    f"ranks but the dataset has {n}; lower the bound or use more data")
            self.local_batch_bounds = (lo, hi)
        self.max_batch_size = int(max_batch_size)
        self.accumulation = bool(accumulation)
        if (self.accumulation and w == 1 and self._job.restored_step is None
                and self.state.accum_steps == 0 and self.state.global_batch >= 2):
            # One replica measures no gradient noise with one micro-batch; two micro-batches
            # of the same step give the small-batch gradients (same update, same examples).
            self.state.accum_steps = 1

    def _apply_batch(self, global_batch: int, accum_steps: int) -> None:
        """A directive's batch, applied at a step boundary (same on every rank). The script's
        own limits win over the directive: the global batch stays within [world size,
        max_batch_size], accumulation is used only when allowed, and the local batch stays
        below the upper local bound (by accumulating, or else by a smaller global batch)."""
        w = self._world.world_size
        global_batch = min(max(int(global_batch), w), max(self.max_batch_size, w))
        accum_steps = max(int(accum_steps), 0) if self.accumulation else 0
        hi = self.local_batch_max()
        if hi is not None:
            if self.accumulation:
                accum_steps = max(accum_steps, math.ceil(global_batch / (w * hi)) - 1)
            else:
                global_batch = min(global_batch, w * hi)
        self.state.global_batch = global_batch
        self.state.accum_steps = accum_steps

    def local_batch_max(self) -> int | None:
        """The upper bound of the local batch: the script's, or the device memory's where
        that is lower (``memory.MemoryBound``, learned by probes); None: none."""
        hi = self.local_batch_bounds[1] if self.local_batch_bounds is not None else None
        cap = self._job.memory_bound.cap() if self._job.memory.active else None
        if cap is not None:
            lo = self.local_batch_bounds[0] if self.local_batch_bounds is not None else 1
            hi = max(lo, cap if hi is None else min(hi, cap))
        return hi

    def declared_limits(self) -> dict:
        """What the script allows, as the report's fields: the controller plans within it."""
        lo = self.local_batch_bounds[0] if self.local_batch_bounds is not None else 0
        hi = self.local_batch_max() or 0
        return {"max_batch": self.max_batch_size, "local_batch_min": lo, "local_batch_max": hi,
                "accumulation": self.accumulation}

    @property
    def current_batch_size(self) -> int:
        return self.state.global_batch

    @property
    def accumulation_steps(self) -> int:
        return self.state.accum_steps

    @property
    def current_local_batch_size(self) -> int:
        return math.ceil(self.state.global_batch /
                         (self._world.world_size * (self.state.accum_steps + 1)))

    # ---- commit --------------------------------------------------------------------
    def _commit_in_flight(self, stepped: bool = False) -> None:
        plan = self._in_flight
        if plan is None:
            return
        self._in_flight = None
        self.state.cursor = plan.start + plan.size
        if not stepped:                  # a step the user did not give to the optimizer
            self._job.state.step += 1

    # ---- iteration -----------------------------------------------------------------
    def _fetch(self, idx: torch.Tensor):
        items = [int(i) for i in idx]
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(items) if getitems is not None else [self.dataset[i] for i in items]
        return self.collate_fn(samples)

    def _fit_in_memory(self, plan):
        """Before the first step at a local batch larger than any seen to fit: probe it on
        every rank (``memory``); while it does not fit, back off (more micro-batches of the
        same global batch, or a smaller one without accumulation) and probe again. Every rank
        runs this at the same step and acts on the same agreed outcome."""
        j, w, st = self._job, self._world, self.state
        bound = j.memory_bound
        for _ in range(64):
            local = memory.micro_batch_of(plan)
            if not bound.needs_probe(local):
                return plan
            fitted, growth, free = j.parallel._probe_memory(local)
            old = bound.cap()
            bound.free = free
            bound.learn(local, fitted, growth, free if free >= 0 else None)
            if fitted:
                return plan
            bound.back_off(local)
            self._apply_batch(st.global_batch, st.accum_steps)
            if w.rank == 0:
                sys.stderr.write(
                    f"adaptrun: a local batch of {local} does not fit in {j.memory.describe()} "
                    f"at step {j.state.step}: the local batch is bounded by {bound.cap()} "
                    f"(was {old if old is not None else 'unbounded'}); this step runs "
                    f"{st.global_batch} examples as {st.accum_steps + 1} micro-batches per "
                    f"rank, and the reports carry the bound to the controller\n")
            plan = plan_step(len(self.dataset), st.cursor, st.global_batch, w.world_size,
                             st.accum_steps, st.drop_last)
            if plan is None:
                return None
        return plan

    def __len__(self) -> int:
        """Steps left in this epoch at the current configuration (an estimate)."""
        left = len(self.dataset) - self.state.cursor
        return max(0, math.ceil(left / self.state.global_batch))

    def __iter__(self):
        j, w, st = self._job, self._world, self.state
        if st.epoch != j.state.epoch:
            st.epoch, st.cursor = j.state.epoch, 0
        order = permutation(len(self.dataset), st.seed, st.epoch, st.shuffle)
        while True:
            j.step_boundary()
            plan = plan_step(len(self.dataset), st.cursor, st.global_batch, w.world_size,
                             st.accum_steps, st.drop_last)
            if plan is not None and j.parallel is not None and j.memory.active:
                plan = self._fit_in_memory(plan)
            if plan is None:
                if st.cursor < len(self.dataset) and st.drop_last:
                    st.cursor = len(self.dataset)      # the dropped remainder
                return
            mine = rank_slice(plan, w.rank)
            self._in_flight = plan
            adp = j.parallel
            if adp is not None:
                adp._begin_step(plan, mine)
            last = len(mine.micro) - 1
            for k, (b, e) in enumerate(mine.micro):
                idx = order[b:e]
                batch = self._fetch(idx)
                self.current_indices = idx if mine.count else idx[:0]
                self.is_step_end = k == last
                self.micro_index = k
                if adp is not None and k > 0:
                    adp._next_micro()
                if adp is not None and k < last:
                    with adp.no_sync():
                        yield batch
                else:
                    yield batch
