"""AdaptiveDataParallel: DDP that measures the gradient noise for free and rescales the LR.

What it does each optimizer step (no extra backward, one tiny extra all-reduce):
- Every ``gns_every_steps``-th step (the same steps on every rank) is *measured*; the others
  only scale the buckets, as DDP's own hook does. By default the cadence is chosen so that
  measuring costs at most 2% of the step time (every 4th step at the most often, every 64th at
  the least; rank 0 times it and the ranks agree on it through the per-step sum below);
  ``gns_every_steps=N`` or ``ADAPTRUN_GNS_EVERY=N`` pins it.
- On a measured step a DDP communication hook sees each gradient bucket before and after the
  all-reduce. Before,
  it takes the squared norm of this rank's local gradient and scales the bucket by this rank's
  weight
  n_rank / (micro_batches * step_size) (see ``sampler``), so the sum is the exact mean gradient
  even for a ragged last step. After, it takes the squared norm of the averaged gradient.
  With accumulation every micro-batch is a small-batch sample: those before the last are
  measured between micro-batches (the first directly, later ones as the difference of the
  accumulated gradient), the last in the hook as the bucket less the gradient accumulated
  before it.
  An Adam-family optimizer (state ``exp_avg_sq``) is measured on its preconditioned gradient
  g / (sqrt(v / (1 - beta2^t)) + floor) (``_preconditioner``; ``gns_preconditioned=False``:
  the raw gradient) (``gns.precondition``'s formula, in torch,
  in cache-sized chunks: no model-sized temporary or stored preconditioner).
- Once per step the ranks sum a few floats: the local small-batch norms, the SIGTERM flags,
  rank 0's measuring cadence and its pending directive, so every rank holds the same numbers.
  The sum is launched behind
  the step's last gradient bucket (``GradBucket.is_last``) on the same group, and
  ``optimizer.step()``'s pre-hook waits on it: no blocking round trip of its own.
  ``gns.unbiased_estimates`` turns them into |G|^2 and tr(Sigma), which the ``gns.GNSState``
  EMA smooths (regular steps only: equal micro-batches on every rank), decayed per B0-step
  of training since the estimate before.
- What the job acts on is the conservative end of the estimate (``conservative_stats``:
  ``GNSState.conservative``): the gain r, the LR rule's factor and the reports' grad_sqr and
  grad_var use it.
- The scaling rule's factor for scale = global_batch / B0 and the gain r (``efficiency.gain``)
  multiplies each param group's LR for the step only: the user's value is put back after the
  step, so the user's scheduler keeps working on its own LR. ``progress`` adds r per step.
  A ``scaling.ProgressSchedule`` given as ``lr_scheduler`` is advanced after each step to
  ``examples / B0`` (or the progress), so the user's schedule follows training, not steps.
- ``record_loss(loss)`` (no host sync) adds to the mean training loss the next report
  carries; the controller checks its batch moves against it.
- Rank 0 emits a ``report.Report`` every ``report_every_steps`` (``reporting``).

``grad_scaler=`` (a ``torch.amp.GradScaler``): the statistics are of the unscaled gradient
(the norms divided by the scale squared in force that step), a step the scaler skips (inf or
nan found) folds nothing in and trains nothing (its examples are used up, as torch's skip
does; its agreement still holds), and the scaler's unscale_/step/update act only on a step's
last micro-batch, as the optimizer's step does. The statistics are in fp32 whatever the
gradients' dtype (the accumulated gradient a micro-batch is measured against is kept in fp32).

``ghost_batch_size=N`` turns every BatchNorm into ghost batch norm over virtual batches of N
examples (``ghost_bn``), so BN statistics do not move when the local batch does.

Read-only: ``noise_scale`` (examples, the point estimate), ``noise_scale_bounds``,
``grad_sqr`` (|G|^2), ``grad_var`` (tr(Sigma)/B0), ``gain``, ``progress`` (B0-equivalent
steps), ``examples``, ``accum_steps``, ``lr_factor``, ``step``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import directive as directive_mod
from . import distributed, job, memory, reporting
from ..science import efficiency
from ..science.gns import GNSState, unbiased_estimates
from ..science.report import Report
from ..science.scaling import AdaScale, ProgressSchedule, ScalingRule
from .ghost_bn import convert_ghost_batch_norm

__all__ = ["AdaptiveDataParallel", "REPORT_MIN_GNS_UPDATES"]

# A report carries the gradient statistics once their average holds this many estimates. Each
# estimate is a difference of two squared norms and a handful of them can be off tenfold; the
# conservative end of the interval (``GNSState.conservative``) covers the rest. Before, the
# report says "no estimate yet" and the batch waits.
REPORT_MIN_GNS_UPDATES = 5

_DIRECTIVE_POLL_S = 0.1
_GNS_EVERY = 4             # the fewest steps between measured ones
_GNS_EVERY_MAX = 64        # the most, when measuring is expensive
_GNS_BUDGET = 0.02         # automatic cadence: measuring costs this fraction of the step time
_GNS_FLOOR_S = 0.25e-3     # ... or this many seconds per step, where that is more
_CHUNK = 1 << 18           # elements: a preconditioned norm's scratch stays in cache
_HALF = (torch.float16, torch.bfloat16)


_PLAIN_ATTRS = frozenset({
    "_small_sum", "_small_count", "_micro_seen", "_big_sqr", "_pre", "_sync_start",
    "_sync_events",
    "_sync_end", "_measure_main", "_measure_cb", "_plan", "_input_batch", "_micro_batches",
    "_weight", "_stats_on", "_agreed", "_gain", "_lr_factor", "_user_lrs", "_t_last_step",
    "_last_poll", "_offer", "_pending", "_measure_cost", "_step_cost", "lr", "_loss",
    "_loss_sum", "_loss_count",
    "_progress", "gns_every_steps", "_last_times", "_resize_gap_s", "_reform_at",
    "_generation", "_gns", "_gns_last_step", "_examples", "_template"})


def measuring_cadence(measure_s: float, step_s: float, budget: float = _GNS_BUDGET) -> int:
    """Steps between measured ones so that measuring (``measure_s`` per measured step) costs
    at most ``budget`` of the time of a step (``step_s``), or ``_GNS_FLOOR_S`` per step where
    that is more: every 4th step at the most often, every 64th at the least. The floor keeps
    a model whose step is a millisecond of Python from trading its samples (the estimate's
    accuracy) for a saving no one would notice."""
    if step_s <= 0:
        return _GNS_EVERY_MAX
    every = math.ceil(measure_s / max(budget * step_s, _GNS_FLOOR_S))
    return min(max(every, _GNS_EVERY), _GNS_EVERY_MAX)


class _Released(torch.nn.Module):
    """What ``AdaptiveDataParallel.ddp`` becomes at exit: the module, without DDP's reducer."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


class AdaptiveDataParallel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, scaling_rule: ScalingRule | None = None, *,
                 gns_decay: float = 0.99, report_every_steps: int = 10,
                 gns_every_steps: int | None = None, gns_preconditioned: bool = True,
                 ghost_batch_size: int | None = None, grad_scaler=None, **ddp_kwargs):
        world = distributed.world("AdaptiveDataParallel")
        self._job = job.current("AdaptiveDataParallel")
        super().__init__()
        if ghost_batch_size:
            # BatchNorm statistics over fixed virtual batches: the same whatever local batch
            # the controller picks (Hoffer et al.); parameters and state_dict keys unchanged.
            model = convert_ghost_batch_norm(model, ghost_batch_size)
        if torch.device(world.device).type == "cuda":     # placed by the job's device
            model = model.to(world.device)
            ddp_kwargs.setdefault("device_ids", [torch.device(world.device).index])
        # Gradients live in DDP's buckets: no copy into the bucket before the all-reduce and
        # none back after it, two passes over the gradients that pay for the hook's scaling.
        ddp_kwargs.setdefault("gradient_as_bucket_view", True)
        self._ddp_kwargs = ddp_kwargs
        # A restored world holds one state on every rank already (``Job.restore``): DDP's
        # start-up broadcast of the model would be another copy of it on the resize's path.
        self.ddp = DistributedDataParallel(
            model, **{"init_sync": not self._job.state_in_sync, **ddp_kwargs})
        self.ddp.register_comm_hook(None, self._comm_hook)
        distributed.release_at_exit(self._release_process_group)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scaling_rule = scaling_rule if scaling_rule is not None else AdaScale()
        self.report_every_steps = int(report_every_steps)
        self._world = world
        if gns_every_steps is None and os.environ.get("ADAPTRUN_GNS_EVERY"):
            gns_every_steps = int(os.environ["ADAPTRUN_GNS_EVERY"])
        if gns_every_steps is not None and (
                isinstance(gns_every_steps, bool) or not isinstance(gns_every_steps, int)
                or gns_every_steps < 1):
            raise ValueError(f"gns_every_steps must be an int >= 1, got {gns_every_steps!r}")
        self._gns_auto = gns_every_steps is None
        self._gns_every_pinned = gns_every_steps or _GNS_EVERY
        self.gns_every_steps = self._gns_every_pinned     # the cadence in force
        self._measure_cost = None      # rank 0: EMA of seconds spent measuring a measured step
        self._step_cost = None         # rank 0: EMA of seconds per step
        # gns_decay per measured step: the averages keep as many samples as when every step
        # was measured, over gns_every_steps times as many steps.
        self._gns = GNSState(decay=gns_decay)
        self._gns_preconditioned = bool(gns_preconditioned)
        self._gns_last_step: int | None = None   # the step of the last estimate folded in
        self._progress = 0.0
        self._examples = 0           # examples of every committed step so far
        self._generation = 0
        self._gain = 1.0
        self._lr_factor = 1.0
        self._user_lrs: list[float] = []
        self._pg = dist.distributed_c10d._get_default_group()
        self._agreed = None           # (vector, work) of this step's agreement in flight
        self._offer = None            # rank 0: directive read from the store, not yet shared
        self._pending = None          # every rank: directive to apply at the next boundary
        self._reform_at: int | None = None
        self._last_poll = 0.0
        self._loss = math.nan
        self._loss_sum = 0.0             # losses recorded since the last report (no sync)
        self._loss_count = 0
        self.lr = math.nan
        self._t_start = time.monotonic()
        self._t_last_step = None
        self._last_times = (1e-9, 0.0)
        self._resize_gap_s = math.nan    # measured by the job after a planned re-form
        self._step_times: list[float] = []
        self._sync_times: list[float] = []
        # CUDA: (start, end) events of each step's all-reduces, read at the report. NCCL's
        # future completes when the collective is enqueued: host clocks would time launches.
        self._cuda_timing = torch.device(world.device).type == "cuda"
        self._sync_events: list = []
        self._prev: dict[int, torch.Tensor] = {}     # accumulated grads before this micro-batch
        self._template = None         # the last forward's inputs (memory probes repeat them)
        self._measure_main = self._measure_cb = 0.0  # this step's seconds measuring (2 threads)
        self._reset_step_stats()
        self._begin_step(None, None)
        self._wrap_optimizer(optimizer)
        self.grad_scaler = grad_scaler
        if grad_scaler is not None:
            self._wrap_scaler(grad_scaler)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step())
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        reg = self._job.registry
        reg.register("model", model)
        reg.register("optimizer", optimizer)
        if lr_scheduler is not None:
            reg.register("lr_scheduler", lr_scheduler)
        if grad_scaler is not None:
            reg.register("grad_scaler", grad_scaler)
        reg.register("adaptrun.parallel", self._State(self))
        self._job.parallel = self

    def __setattr__(self, name, value):
        # The per-step bookkeeping (dozens of plain attributes a step) skips nn.Module's
        # registration checks; modules and parameters (``ddp``) still go through them.
        if name in _PLAIN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _wrap_optimizer(self, optimizer) -> None:
        """step() only on a step's last micro-batch, zero_grad() only on its first."""
        step, zero_grad = optimizer.step, optimizer.zero_grad

        @functools.wraps(step)         # keeps torch's marker: schedulers see step() intact
        def adaptive_step(*args, **kwargs):
            loader = self._job.loader
            if loader is not None and self._plan is not None and not loader.is_step_end:
                return None
            return step(*args, **kwargs)

        def adaptive_zero_grad(*args, **kwargs):
            loader = self._job.loader
            if loader is not None and self._plan is not None and loader.micro_index > 0:
                return None
            return zero_grad(*args, **kwargs)

        optimizer.step = adaptive_step
        optimizer.zero_grad = adaptive_zero_grad

    def _wrap_scaler(self, scaler) -> None:
        """The GradScaler's unscale_, step and update only on a step's last micro-batch: the
        gradient accumulates at one scale, and the loop stays the same under accumulation."""
        for name in ("unscale_", "step", "update"):
            original = getattr(scaler, name)

            def at_step_end(*args, _original=original, **kwargs):
                loader = self._job.loader
                if loader is not None and self._plan is not None and not loader.is_step_end:
                    return None
                return _original(*args, **kwargs)

            setattr(scaler, name, functools.wraps(original)(at_step_end))

    def _rebuild(self) -> None:
        """After an in-process re-form: DDP over the new process group, per-world caches
        dropped (bucket layout, step timings, an unapplied directive of the old world)."""
        model = self.ddp.module
        del self.ddp
        # The re-form just gave every rank the newest state: no start-up broadcast.
        self.ddp = DistributedDataParallel(model, **{"init_sync": False, **self._ddp_kwargs})
        self.ddp.register_comm_hook(None, self._comm_hook)
        self._pg = dist.distributed_c10d._get_default_group()
        self._agreed = None
        self._prev.clear()
        self._step_times.clear()
        self._sync_times.clear()
        self._sync_events.clear()
        self._t_last_step = None
        self._offer = self._pending = self._reform_at = None
        self._last_poll = 0.0
        # Joiners start at the first cadence: so does every survivor, so all ranks agree.
        self.gns_every_steps = self._gns_every_pinned
        self._measure_cost = self._step_cost = None
        self._reset_step_stats()

    def _release_process_group(self) -> None:
        """At exit: drop DDP's reducer (it holds the process group) and any collective in
        flight, keeping the module."""
        if self._agreed is not None:
            self._agreed[1].wait()
            self._agreed = None
        self.ddp = _Released(self.ddp.module)
        self._pg = None

    # ---- the wrapped module ----------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.ddp.module

    def forward(self, *args, **kwargs):
        if self._plan is None and args and torch.is_tensor(args[0]):
            self._input_batch = int(args[0].shape[0])
        if self._job.memory.active and args and torch.is_tensor(args[0]) and args[0].dim():
            self._template = (args, kwargs, int(args[0].shape[0]))   # what a probe repeats
        return self.ddp(*args, **kwargs)

    def _probe_memory(self, local_batch: int) -> tuple[bool, float, float]:
        """Every rank, at the same step boundary: does a local batch of ``local_batch`` fit?
        (all fitted, the largest growth in bytes, the least free bytes), the same on every
        rank (``memory.probe`` and ``memory.agree``)."""
        self._job.wait_for_copy()
        mem = self._job.memory
        fitted, growth = None, 0.0
        if self._template is not None:
            fitted, growth = memory.probe(self.ddp.module, self._template, local_batch, mem)
        return memory.agree(fitted, growth, mem.free(), self._world.world_size)

    def no_sync(self):
        return self.ddp.no_sync()

    def record_loss(self, loss) -> None:
        """Optional: give the loss of the current step to the reports."""
        value = loss.detach().float() if torch.is_tensor(loss) else float(loss)
        self._loss_sum = self._loss_sum + value
        self._loss_count += 1

    # ---- read-only statistics ------------------------------------------------------
    @property
    def init_batch(self) -> int:
        loader = self._job.loader
        return loader.state.init_batch if loader is not None else max(1, self._input_batch or 1)

    @property
    def global_batch(self) -> int:
        loader = self._job.loader
        if loader is not None:
            return loader.current_batch_size
        return (self._input_batch or 1) * self._world.world_size

    @property
    def scale(self) -> float:
        return self.global_batch / self.init_batch

    @property
    def noise_scale(self) -> float:
        return self._gns.noise_scale

    @property
    def grad_sqr(self) -> float:
        return self._gns.grad_sqr

    @property
    def grad_var(self) -> float:
        return self._gns.trace_sigma / self.init_batch

    @property
    def noise_scale_bounds(self) -> tuple[float, float]:
        """(low, high) of the noise scale, one standard error of each average either way;
        the low end is what the job acts on (``conservative_stats``)."""
        return self._gns.noise_scale_bounds()

    def conservative_stats(self) -> tuple[float, float]:
        """(|G|^2, tr(Sigma)/B0) at the low end of the noise scale the estimates support
        (``GNSState.conservative``): what the gain, the LR rule and the reports use. nan
        before two estimates."""
        sqr, tr = self._gns.conservative()
        return sqr, tr / self.init_batch

    @property
    def gain(self) -> float:
        sqr, var = self.conservative_stats()
        if not (math.isfinite(sqr) and sqr > 0):
            return 1.0
        return float(efficiency.gain(sqr, var, self.scale))

    @property
    def progress(self) -> float:
        return self._progress

    @property
    def examples(self) -> int:
        """Examples of all committed optimizer steps so far."""
        return self._examples

    def b0_steps(self, by: str = "examples") -> float:
        """B0-equivalent steps so far: ``examples / B0`` (by="examples") or the progress,
        the sum of gains (by="progress")."""
        return self._progress if by == "progress" else self._examples / self.init_batch

    @property
    def accum_steps(self) -> int:
        loader = self._job.loader
        return loader.accumulation_steps if loader is not None else 0

    @property
    def lr_factor(self) -> float:
        return self._lr_factor

    @property
    def step(self) -> int:
        return self._job.state.step

    @property
    def generation(self) -> int:
        return self._generation

    # ---- per step, driven by the loader ----------------------------------------------
    def _reset_step_stats(self) -> None:
        self._small_sum = 0.0           # Python floats or 0-dim tensors; summed once per step
        self._small_count = 0
        self._micro_seen = 0            # micro-batches measured by _next_micro this step
        self._big_sqr = 0.0
        self._pre = None                # this step's preconditioner view (_preconditioner)
        self._sync_start = None
        self._sync_end = None
        self._measure_main = self._measure_cb = 0.0

    def _begin_step(self, plan, rank_slice) -> None:
        """The loader starts a step: how this rank's gradient is weighted and measured."""
        self._reset_step_stats()
        self._plan = plan
        self._input_batch = None
        if plan is None:
            self._micro_batches = 1
            self._weight = 1.0 / self._world.world_size
            self._stats_on = self._world.world_size > 1
        else:
            self._micro_batches = len(rank_slice.micro)
            self._weight = rank_slice.weight
            self._stats_on = plan.regular and plan.size > plan.size // (
                plan.world_size * plan.micro_batches)
        # Measured on a cadence (the same steps on every rank): the averages need samples,
        # not every step, and a step that measures nothing costs what DDP's costs.
        self._stats_on = self._stats_on and self._job.state.step % self.gns_every_steps == 0

    def _preconditioner(self) -> dict[int, tuple]:
        """Per parameter (id) of an Adam-family optimizer: (v, 1 - beta2^t, floor), so that
        ``_sqr_norm`` measures g / (sqrt(v / (1 - beta2^t)) + floor) as it goes: no copy of
        the preconditioner is kept (it would be another model-sized buffer), none goes stale.

        The floor is eps plus the mean of sqrt(v_hat) over the tensor. The step being
        measured has not yet entered v, and Adam's own update divides by a v that holds it:
        a coordinate whose gradient was ~0 in every step so far (an embedding row not yet
        seen, a unit not yet active) has v_hat ~ 0, and g / eps would take it to 1e8 x the
        rest and the noise scale with it. Bounded by the tensor's typical scale, it weighs at
        most as a typical coordinate does."""
        if self._pre is not None:          # once per step: the state changes only at step()
            return self._pre
        pre = {}
        if not self._gns_preconditioned:
            self._pre = pre
            return pre
        for group in self.optimizer.param_groups:
            beta2 = group.get("betas", (0.9, 0.999))[1]
            eps = group.get("eps", 1e-8)
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                v = st.get("exp_avg_sq") if st else None
                if v is not None:
                    t = float(st.get("step", 1))
                    bias2 = 1.0 - beta2 ** max(t, 1.0)
                    floor = torch.sqrt(v / bias2).mean().add_(eps)   # 0-dim: no host sync
                    pre[id(p)] = (v.reshape(-1), bias2, floor)
        self._pre = pre
        return pre

    @staticmethod
    def _sqr_norm(grads, params, pre: dict) -> torch.Tensor:
        """sum over parameters of |g|^2, or |g / (sqrt(v / bias2) + floor)|^2 where the
        optimizer keeps v: the plain ones with one ``torch._foreach_norm`` per dtype and
        device (fp32 for half-precision gradients), the preconditioned ones in cache-sized
        chunks (their temporaries never grow with the model). No host sync."""
        total = None
        scratch = None
        plain: dict[tuple, list] = {}
        for p, g in zip(params, grads):
            g = g.reshape(-1)
            w = pre.get(id(p))
            if w is None or w[0].numel() != g.numel():
                plain.setdefault((g.dtype, g.device), []).append(g)
                continue
            if g.dtype in _HALF:
                g = g.float()
            v, bias2, floor = w
            part = None
            if scratch is None or scratch.dtype != v.dtype or scratch.device != v.device:
                scratch = torch.empty(_CHUNK, dtype=v.dtype, device=v.device)
            for gs, vs in zip(g.split(_CHUNK), v.split(_CHUNK)):
                d = scratch[:gs.numel()]
                torch.div(vs, bias2, out=d).sqrt_().add_(floor)
                torch.div(gs, d, out=d)
                dd = torch.dot(d, d)
                part = dd if part is None else part + dd
            if part is not None:
                total = part if total is None else total + part
        for (dtype, _device), group in plain.items():
            norms = torch._foreach_norm(group, 2, dtype=torch.float32 if dtype in _HALF else None)
            part = torch.stack(norms).square().sum()
            total = part if total is None else total + part
        return total if total is not None else torch.zeros(())

    def _next_micro(self) -> None:
        """Between micro-batches: measure the one just backpropagated (the accumulated
        gradient, less the one accumulated before it after the first), and keep the
        accumulated gradient for the next difference."""
        if not self._stats_on:
            return
        t0 = time.perf_counter()
        pre = self._preconditioner()
        first = self._micro_seen == 0
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    prev = self._prev.get(id(p))
                    if prev is None or prev.shape != g.shape:
                        # fp32 under half precision: a micro-batch's gradient is a difference
                        # of accumulated sums, which half precision would round away.
                        prev = self._prev[id(p)] = torch.zeros_like(
                            g, dtype=torch.float32 if g.dtype in _HALF else g.dtype)
                    own = g if first else torch.sub(g, prev)
                    self._small_sum = self._small_sum + self._sqr_norm([own], [p], pre)
                    prev.copy_(g)
        self._small_count += 1
        self._micro_seen += 1
        self._measure_main += time.perf_counter() - t0

    def _comm_hook(self, _state, bucket):
        buf = bucket.buffer()
        if self._sync_start is None:
            self._sync_start = time.perf_counter()
            if self._cuda_timing:
                self._sync_start = torch.cuda.Event(enable_timing=True)
                self._sync_start.record()
        stats = self._stats_on
        if stats:
            t0 = time.perf_counter()
            params, grads = bucket.parameters(), bucket.gradients()
            sizes = [g.numel() for g in grads]
            pre = self._preconditioner()
            with torch.no_grad():
                if self._micro_seen > 0:      # accumulation: the last micro-batch's own part
                    prev = self._prev
                    grads = [g if prev.get(id(p)) is None else torch.sub(g, prev[id(p)])
                             for p, g in zip(params, grads)]
                self._small_sum = self._small_sum + self._sqr_norm(grads, params, pre)
            if bucket.index() == 0:
                self._small_count += 1
            self._measure_main += time.perf_counter() - t0
        buf.mul_(self._weight)
        pg = self._pg
        fut = pg.allreduce([buf]).get_future()
        if bucket.is_last():
            # The per-step agreement rides behind the last bucket on the same group (gloo and
            # NCCL run a group's collectives in order), instead of a blocking all-reduce of
            # its own after the backward: _before_step waits on it, by then long done.
            vec = self._agreement()
            self._agreed = (vec, pg.allreduce([vec]))

        def done(f):
            reduced = f.value()[0]
            if stats:
                t0 = time.perf_counter()
                with torch.no_grad():
                    parts = reduced.split(sizes) if sum(sizes) == reduced.numel() else [reduced]
                    self._big_sqr = self._big_sqr + self._sqr_norm(
                        parts, params if len(parts) == len(params) else [None], pre)
                self._measure_cb += time.perf_counter() - t0
            if self._cuda_timing:            # on the stream that waits for the all-reduce
                self._sync_end = torch.cuda.Event(enable_timing=True)
                self._sync_end.record()
            else:
                self._sync_end = time.perf_counter()
            return reduced

        return fut.then(done)

    # ---- optimizer hooks -----------------------------------------------------------
    def _poll_directive(self) -> None:
        now = time.monotonic()
        if self._world.rank != 0 or now - self._last_poll < _DIRECTIVE_POLL_S:
            return
        self._last_poll = now
        try:
            d = directive_mod.read_directive(distributed.job_store())
        except Exception:
            d = None
        if d is not None and d.generation > self._generation:
            self._offer = d

    def _agreement(self) -> torch.Tensor:
        """What the ranks sum once per step: this rank's small-batch norms, its SIGTERM flag
        and (rank 0) the measuring cadence and the directive it offers."""
        self._poll_directive()
        lead = self._world.rank == 0
        return torch.tensor([float(self._small_sum), float(self._small_count),
                             1.0 if self._job.term_requested else 0.0,
                             float(self._proposed_cadence()) if lead else 0.0]
                            + directive_mod.to_vector(self._offer if lead else None),
                            dtype=torch.float64)

    def _proposed_cadence(self) -> int:
        """Rank 0: the cadence it proposes (0: none; pinned, or nothing timed yet)."""
        if not self._gns_auto or self._measure_cost is None or not self._step_cost:
            return 0
        return measuring_cadence(self._measure_cost, self._step_cost)

    def _time_measuring(self, measured: bool) -> None:
        """Rank 0, after a step: the EMAs the cadence is chosen from."""
        if self._world.rank != 0 or not self._gns_auto:
            return
        if measured:
            cost = self._measure_main + self._measure_cb
            self._measure_cost = cost if self._measure_cost is None else \
                0.8 * self._measure_cost + 0.2 * cost
        if self._step_times:
            dt = self._step_times[-1]
            self._step_cost = dt if self._step_cost is None else 0.9 * self._step_cost + 0.1 * dt

    def _take_agreement(self) -> tuple[float, float]:
        """Wait for this step's agreement (launched behind the last gradient bucket, or
        summed now) and act on what every rank learns from it: the cadence, a directive, a
        SIGTERM. Returns the summed small-batch norms and their count."""
        world = self._world
        if self._agreed is not None:            # launched behind the last gradient bucket
            vec, work = self._agreed
            self._agreed = None
            work.wait()
        else:                                    # no bucket reduced this step (or a world of 1)
            vec = self._agreement()
            if world.world_size > 1:
                dist.all_reduce(vec)
        small_sum, small_count, term, cadence = (float(x) for x in vec[:4])
        if cadence >= 1:                         # from the next step, the same on every rank
            self.gns_every_steps = int(cadence)
        offered = directive_mod.from_vector(vec[4:])
        if offered is not None and offered.generation > self._generation:
            self._pending = offered
        if term > 0:
            self._job.stop_agreed = True
        return small_sum, small_count

    def _loss_scale_sq(self) -> float:
        """S^2 of the GradScaler's scale S in force this step (1 without one): the gradients
        the statistics saw were S times the true ones."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale()) ** 2

    def _before_step(self) -> None:
        self._job.wait_for_copy()               # a snapshot still copying what step changes
        world = self._world
        small_sum, small_count = self._take_agreement()
        # The averaged gradient is the same on every rank: its norm needs no reduction.
        big_sqr = float(self._big_sqr)
        plan = self._plan
        if self._stats_on and small_count > 0:
            s2 = self._loss_scale_sq()            # the norms of the unscaled gradient
            small_sum, big_sqr = small_sum / s2, big_sqr / s2
            if plan is not None:
                b_big = plan.size
                b_small = plan.size / (plan.world_size * plan.micro_batches)
            else:
                b_small = float(self._input_batch or 1)
                b_big = b_small * world.world_size
            # An Adam-family optimizer before its first step has no second moment yet: that
            # step's norms are of the raw gradient, another quantity (and scale) than the rest.
            unconditioned = self._gns_preconditioned and not self._preconditioner() and any(
                "betas" in g for g in self.optimizer.param_groups)
            if b_big > b_small and not unconditioned:
                grad_sqr, trace = unbiased_estimates(small_sum / small_count, big_sqr,
                                                     b_small, b_big)
                # The averages decay per B0-step of training since the last estimate, not
                # per estimate: their memory is the same whatever the measuring cadence.
                last = self._gns_last_step
                steps = self.step - last if last is not None and self.step > last else 1
                self._gns = self._gns.update(float(grad_sqr), float(trace),
                                             self.scale * steps, big_sqr=big_sqr)
                self._gns_last_step = self.step
        self._gain = self.gain
        self._lr_factor = float(self.scaling_rule.factor(self.scale, self._gain, self.step))
        self._user_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * self._lr_factor
        # Rank 0 reports the times; the other ranks keep none (they would pile up).
        if self._world.rank == 0 and self._sync_start is not None and self._sync_end is not None:
            if self._cuda_timing:
                self._sync_events.append((self._sync_start, self._sync_end))
            else:
                self._sync_times.append(max(0.0, self._sync_end - self._sync_start))

    def _after_step(self) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]
        for g, lr in zip(self.optimizer.param_groups, self._user_lrs):
            g["lr"] = lr
        self._progress += self._gain
        self._examples += self.global_batch if self._plan is None else self._plan.size
        if isinstance(self.lr_scheduler, ProgressSchedule):
            self.lr_scheduler.advance_to(self.b0_steps(self.lr_scheduler.by))
        self._job.state.step += 1
        self._job.state.last_step_wall = time.time()
        if self._job.loader is not None:
            self._job.loader._commit_in_flight(stepped=True)
        now = time.monotonic()
        if self._t_last_step is not None and self._world.rank == 0:
            self._step_times.append(now - self._t_last_step)
        self._t_last_step = now
        self._time_measuring(self._stats_on)
        self._reset_step_stats()
        if self._world.rank == 0 and self.report_every_steps > 0 \
                and self.step % self.report_every_steps == 0:
            self._report()

    def _report(self) -> None:
        if self._sync_events:                    # one host sync per report, not per step
            self._sync_events[-1][1].synchronize()
            self._sync_times.extend(max(0.0, a.elapsed_time(b) / 1000.0)
                                    for a, b in self._sync_events)
            self._sync_events.clear()
        if self._step_times:
            step_time = sum(self._step_times) / len(self._step_times)
            sync_time = (sum(self._sync_times) / len(self._sync_times)) if self._sync_times else 0.0
            self._last_times = (step_time, min(sync_time, step_time))
        step_time, sync_time = self._last_times   # a report between steps repeats the last
        self._step_times.clear()
        self._sync_times.clear()
        sqr, var = self.conservative_stats()
        known = self._gns.updates >= REPORT_MIN_GNS_UPDATES and math.isfinite(sqr)
        if self._loss_count:
            self._loss = float(self._loss_sum) / self._loss_count
            self._loss_sum, self._loss_count = 0.0, 0
        j = self._job
        loader = j.loader
        local_batch = loader.current_local_batch_size if loader is not None else (
            self._input_batch or 1)
        limits = loader.declared_limits() if loader is not None else {}
        metric = reporting.recorded_metric()
        gap, self._resize_gap_s = self._resize_gap_s, math.nan
        rep = Report(job_id=self._world.run_id, step=self.step, progress=self._progress,
                     world_size=self._world.world_size, nodes=self._world.nodes,
                     local_batch=max(1, local_batch), accum_steps=self.accum_steps,
                     init_batch=self.init_batch, step_time_s=max(step_time, 1e-9),
                     sync_time_s=min(sync_time, max(step_time, 1e-9)),
                     grad_sqr=float(sqr) if known else 0.0,
                     grad_var=max(0.0, float(var)) if known else 0.0,
                     loss=self._loss, lr=float(self.lr), epoch=j.state.epoch,
                     target_progress=self._target_progress(),
                     time_s=time.monotonic() - self._t_start, generation=self._generation,
                     resize_gap_s=gap, metric_name=metric[0] if metric else "",
                     metric=metric[1] if metric else math.nan, finished=j.finished, **limits)
        reporting.emit(rep)
        store = distributed.job_store()
        if store is not None:
            try:
                store.set(directive_mod.STATUS_KEY, json.dumps(
                    {"step": self.step, "epoch": j.state.epoch,
                     "generation": self._generation, "world_size": self._world.world_size,
                     "global_batch": self.global_batch}))
            except Exception:
                pass

    def _target_progress(self) -> float:
        """B0-steps the whole run takes, when ``remaining_epochs(n)`` told the length."""
        loader, epochs = self._job.loader, self._job.num_epochs
        if loader is None or not epochs:
            return math.nan
        return float(epochs * math.ceil(len(loader.dataset) / loader.state.init_batch))

    # ---- step boundary (called by job) -------------------------------------------
    def _at_boundary(self) -> None:
        if self._agreed is not None:
            # The last step never reached optimizer.step() (a GradScaler found inf and
            # skipped it): what its agreement carried still holds, its statistics do not.
            self._take_agreement()
            self._reset_step_stats()
        d = self._pending
        if d is not None and d.generation > self._generation:
            self._pending = None
            self._generation = d.generation
            if self._job.loader is not None and d.global_batch > 0:   # 0: only the workers
                self._job.loader._apply_batch(d.global_batch, d.accum_steps)
            if d.reform_at_step is not None:
                self._reform_at = d.reform_at_step
            store = distributed.job_store()
            if self._world.rank == 0 and store is not None:
                store.set(directive_mod.APPLIED_KEY, json.dumps(
                    {"generation": d.generation, "step": self.step}))
        if self._reform_at is not None and self.step >= self._reform_at:
            self._reform_at = None
            self._job.stop_agreed = True

    class _State:
        """The wrapper's own state in snapshots."""

        def __init__(self, outer: "AdaptiveDataParallel"):
            self.outer = outer

        def state_dict(self) -> dict:
            o = self.outer
            return {"progress": o._progress, "gns": o._gns.to_dict(),
                    "gns_last_step": o._gns_last_step, "examples": o._examples,
                    "scaling_rule": o.scaling_rule.state_dict(), "generation": o._generation}

        def load_state_dict(self, state: dict) -> None:
            o = self.outer
            o._progress = float(state["progress"])
            o._gns = GNSState.from_dict(state["gns"])
            o._gns_last_step = state.get("gns_last_step")
            o._examples = int(state.get("examples", round(o._progress * o.init_batch)))
            o.scaling_rule.load_state_dict(state["scaling_rule"])
            o._generation = int(state["generation"])
