"""Learning-rate scaling rules for a changing batch, and EMA momentum under a batch change.

The model. With the global batch at scale s = B/B0 and the gain r(s) (see ``efficiency``),
the LR the user tuned at B0 is multiplied by a factor:

    LinearScale   factor -> s          Goyal et al. 2017, for SGD
    SqrtScale     factor -> sqrt(s)    the usual rule for Adam-family optimizers
    AdaScale      factor  = r(s)       Johnson et al. 2020: the gain itself, no warmup needed
    NoScale       factor  = 1

Linear and square-root scaling move to a new factor by *gradual warmup*: whenever the
target changes (at the start of training, and whenever the batch grows later), the factor
ramps linearly from its current value to the new target over ``warmup_steps`` optimizer
steps. A shrinking batch lowers the factor at once: a too-large LR is the dangerous side.

An exponential moving average with momentum rho per step at B0 becomes rho ** kappa when the
batch grows by kappa (Busbridge et al. 2023, "How to Scale Your EMA"): ``scale_ema_momentum``.

Rules hold a little state (the ramp in progress), exposed as ``state_dict`` /
``load_state_dict`` so a re-formed job continues the same ramp.

The user's own schedule on progress. A torch LR scheduler counts optimizer steps; once the
batch grows, a run of fixed epochs takes fewer of them and a cosine keyed to steps ends far
from its final LR. ``ProgressSchedule`` runs any scheduler (cosine, linear decay, a
warmup-stable-decay ``SequentialLR``, a ``LambdaLR``) on B0-equivalent steps instead: the
wrapper advances it to ``examples / B0`` after every optimizer step (``by="examples"``: the
schedule ends with the epochs, whatever the batch), or to the sum of gains
(``by="progress"``: AdaScale's scale-invariant iterations, Johnson et al. 2020; a run keyed to
it ends when its progress does). Build the scheduler for the run's B0-steps of examples,
``epochs * N / B0``, as if the batch never moved, and pass it as ``AdaptiveDataParallel(lr_scheduler=...)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = [
    "ScalingRule",
    "LinearScale",
    "SqrtScale",
    "AdaScale",
    "NoScale",
    "linear_ramp",
    "scale_ema_momentum",
    "rule_by_name",
    "ProgressSchedule",
]


def linear_ramp(step: int, start_step: int, steps: int, start: float, end: float) -> float:
    """Value at ``step`` of a linear ramp from ``start`` (at start_step) to ``end``."""
    if steps <= 0 or step >= start_step + steps:
        return end
    if step <= start_step:
        return start
    frac = (step - start_step) / steps
    return start + (end - start) * frac


def scale_ema_momentum(rho: float, kappa: float) -> float:
    """EMA momentum for a batch kappa times bigger: rho ** kappa (Busbridge et al. 2023)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {rho}")
    if kappa <= 0:
        raise ValueError(f"batch ratio kappa must be positive, got {kappa}")
    return rho ** kappa


@dataclass
class _Ramp:
    start_step: int = 0
    start: float = 1.0
    end: float = 1.0


class ScalingRule:
    """Base class: ``factor(scale, gain, step)`` is the LR multiplier at optimizer step ``step``."""

    def __init__(self, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self._ramp = _Ramp()

    def target(self, scale: float, gain: float) -> float:
        raise NotImplementedError

    def factor(self, scale: float, gain: float, step: int) -> float:
        if scale <= 0:
            raise ValueError(f"batch scale must be positive, got {scale}")
        target = float(self.target(scale, gain))
        if target != self._ramp.end:
            current = linear_ramp(step, self._ramp.start_step, self.warmup_steps,
                                  self._ramp.start, self._ramp.end)
            if target < current or self.warmup_steps == 0:
                self._ramp = _Ramp(start_step=step, start=target, end=target)
            else:
                self._ramp = _Ramp(start_step=step, start=current, end=target)
        return linear_ramp(step, self._ramp.start_step, self.warmup_steps,
                           self._ramp.start, self._ramp.end)

    def state_dict(self) -> dict:
        return asdict(self._ramp)

    def load_state_dict(self, state: dict) -> None:
        self._ramp = _Ramp(**state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(warmup_steps={self.warmup_steps})"


class LinearScale(ScalingRule):
    """LR x s with gradual warmup (Goyal et al. 2017)."""

    def target(self, scale: float, gain: float) -> float:
        return scale


class SqrtScale(ScalingRule):
    """LR x sqrt(s) with gradual warmup (Adam family)."""

    def target(self, scale: float, gain: float) -> float:
        return math.sqrt(scale)


class AdaScale(ScalingRule):
    """LR x r(s), the gain (Johnson et al. 2020); follows the gain step by step."""

    def __init__(self):
        super().__init__(warmup_steps=0)

    def target(self, scale: float, gain: float) -> float:
        return gain

    def __repr__(self) -> str:
        return "AdaScale()"


class NoScale(ScalingRule):
    """The user's LR unchanged."""

    def __init__(self):
        super().__init__(warmup_steps=0)

    def target(self, scale: float, gain: float) -> float:
        return 1.0

    def __repr__(self) -> str:
        return "NoScale()"


_RULES = {"linear": LinearScale, "sqrt": SqrtScale, "adascale": AdaScale, "none": NoScale}


def rule_by_name(name: str, warmup_steps: int = 0) -> ScalingRule:
    """A rule from its name: linear, sqrt, adascale or none."""
    try:
        cls = _RULES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown scaling rule {name!r}; choose one of {sorted(_RULES)}") from None
    return cls(warmup_steps) if cls in (LinearScale, SqrtScale) else cls()


class ProgressSchedule:
    """A torch LR scheduler run on B0-equivalent steps of training, not optimizer steps.

    ``advance_to(b0_steps)`` calls the wrapped scheduler's ``step()`` until it has been
    stepped ``floor(b0_steps)`` times (a step at a batch of 8 x B0 steps it 8 times); it never
    steps back. ``AdaptiveDataParallel(lr_scheduler=ProgressSchedule(s))`` calls it after each
    optimizer step, with ``examples / B0`` (``by="examples"``) or the progress
    (``by="progress"``). The LR rule's factor multiplies the LR the schedule sets. State:
    the wrapped scheduler's and the count, so a re-formed job continues it.
    """

    BY = ("examples", "progress")

    def __init__(self, scheduler, by: str = "examples"):
        if by not in self.BY:
            raise ValueError(f"ProgressSchedule(by={by!r}): choose one of {self.BY}")
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"ProgressSchedule needs an LR scheduler with step(), got "
                            f"{type(scheduler).__name__}")
        self.scheduler = scheduler
        self.by = by
        self.count = 0

    def advance_to(self, b0_steps: float) -> int:
        """Step the scheduler up to ``floor(b0_steps)`` steps in all; the steps taken now."""
        if not math.isfinite(b0_steps):
            return 0
        target = int(math.floor(b0_steps + 1e-9))
        taken = 0
        while self.count < target:
            self.scheduler.step()
            self.count += 1
            taken += 1
        return taken

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return {"count": self.count, "by": self.by, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.scheduler.load_state_dict(state["scheduler"])

    def __repr__(self) -> str:
        return f"ProgressSchedule({type(self.scheduler).__name__}, by={self.by!r})"
