"""The local batch bounded by the memory of the job's device.

The model: a step at a local batch of L examples per micro-batch needs, above what the
process holds at the step's start (parameters, gradients, optimizer state, caches),
``per_example * L`` bytes, and fits when that is at most ``HEADROOM`` of what is free:

    free      = limit - in use now
    bound     = floor(HEADROOM * free / per_example), and below the smallest L that ran out

``per_example`` is the largest growth per example measured so far (every constant the step
allocates is counted per example: the bound errs small).

The limit:
- CUDA: the device's memory (``torch.cuda.mem_get_info``), or the cap, which becomes the
  process's memory fraction (``torch.cuda.set_per_process_memory_fraction``): an allocation
  past it raises ``torch.OutOfMemoryError``.
- CPU: only a cap (``adaptrun.init(memory_limit=...)`` or ``ADAPTRUN_MEMORY_LIMIT``, bytes or
  "300M"/"2G"): the data the process may grow by after ``init`` (``RLIMIT_DATA``; large
  allocations are returned to the system when freed, so the data size is what the process
  holds), and an allocation past it fails as it would on a full device. Without a cap the CPU is unbounded
  here and nothing is probed.

The probe (``probe``): before the first step at a local batch above the largest one known to
fit, every rank runs the model's forward and backward on that many examples (the inputs of
its last forward, repeated along the batch dimension) outside DDP, and it fits when that
succeeds with ``HEADROOM`` of the free memory or less, so no collective waits on a
rank that runs out; the RNG is forked and the buffers and gradients are put back, so
training does not see it. The ranks then agree (``outcome``: one small all-reduce) on whether
every rank fitted. The loader acts on the agreed outcome: a batch that did not fit is spread
over more micro-batches (or, without accumulation, shrunk) and the lowered bound goes
upstream in the reports (``local_batch_max``), so the policy plans within it. Nothing of the
step has run yet, so nothing is redone twice or lost. An out-of-memory error in the step
itself (a batch size the process never probed, such as its first) is a crash like any other:
the job restarts from its last snapshot.
"""
from __future__ import annotations

import math
import os
import re
import resource
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from .errors import DeviceConfigError

__all__ = ["MemoryBound", "parse_bytes", "is_out_of_memory", "DeviceMemory", "HEADROOM"]

HEADROOM = 0.85           # the bound leaves this share of free memory to the step
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text) -> int:
    """'300M', '2G', '1.5g', '4096' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise DeviceConfigError(
            f"memory limit {text!r} is not a size: give bytes or a number with K, M, G or T "
            "(e.g. ADAPTRUN_MEMORY_LIMIT=2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that the device (or the cap) refused."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower())


@dataclass
class MemoryBound:
    """What the job knows of its local batch and memory (saved with the job, the same on every
    rank: only agreed outcomes change it)."""

    fits: int = 0                 # the largest local batch seen to fit
    failed: int = 0               # the smallest local batch that ran out (0: none)
    per_example: float = 0.0      # bytes a step grows by per example (the largest measured)
    free: float = -1.0            # bytes free at the last probe, the least over ranks (-1: ?)
    trying: int = 0               # after running out: the local batch to probe next (0: none)

    def cap(self) -> int | None:
        """The local batch bound in force (None: none known)."""
        return self.bound(self.free if self.free >= 0 else None)

    def bound(self, free_bytes: float | None) -> int | None:
        """The largest local batch predicted to fit; None: no limit known. A batch seen to fit
        stays allowed (it fitted with the memory the process then had)."""
        limits = [self.trying] if self.trying else []
        if self.failed:
            limits.append(self.failed - 1)
        if free_bytes is not None and self.per_example > 0:
            limits.append(int(HEADROOM * max(free_bytes, 0.0) / self.per_example))
        return max(1, self.fits, min(limits)) if limits else None

    def needs_probe(self, local_batch: int) -> bool:
        return local_batch > self.fits

    def learn(self, local_batch: int, fitted: bool, growth_bytes: float,
              free_bytes: float | None = None) -> None:
        """Fold in an agreed outcome at ``local_batch`` (``free_bytes``: what was free)."""
        self.trying = 0
        if fitted:
            self.fits = max(self.fits, local_batch)
            if growth_bytes > 0:
                self.per_example = max(self.per_example, growth_bytes / local_batch)
            if self.failed and self.failed <= self.fits:
                self.failed = 0
            return
        self.failed = local_batch if not self.failed else min(self.failed, local_batch)
        self.fits = min(self.fits, local_batch - 1)
        if free_bytes:              # it needed more than was free: at least this per example
            self.per_example = max(self.per_example, free_bytes / local_batch)

    def back_off(self, local_batch: int) -> int:
        """After ``local_batch`` ran out: the local batch to probe next (``trying``), half of
        it (or the largest seen to fit, when that is more), no more than the prediction."""
        step_down = max(min(self.fits, local_batch - 1), local_batch // 2, 1)
        predicted = self.bound(self.free if self.free >= 0 else None)
        self.trying = step_down if predicted is None else max(1, min(predicted, step_down))
        return self.trying

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.fits = int(state.get("fits", 0))
        self.failed = int(state.get("failed", 0))
        self.per_example = float(state.get("per_example", 0.0))
        self.free = float(state.get("free", -1.0))
        self.trying = int(state.get("trying", 0))


_M_MMAP_THRESHOLD = -3          # glibc malloc.h


def _return_freed_memory() -> None:
    """glibc: every allocation of 128 KiB or more gets its own mapping, returned to the system
    when freed (a fixed threshold; by default it grows with what was freed, and freed tensors
    then stay in the heap), so the process's data size is what it holds."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    except (OSError, AttributeError):
        pass


def _proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M)}


class DeviceMemory:
    """The job's device's memory: what is free, and the peak a piece of work reached."""

    def __init__(self, device: str, limit: int | None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.limit = limit
        self.active = self.cuda or limit is not None
        self._cpu_ceiling = None
        if self.cuda and limit is not None:
            total = torch.cuda.mem_get_info(self.device)[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), self.device)
        elif not self.cuda and limit is not None:
            _return_freed_memory()
            # The process may grow by ``limit`` bytes of data from here.
            self._cpu_ceiling = _proc_status()["VmData"] + limit
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            soft = self._cpu_ceiling if hard == resource.RLIM_INFINITY else min(
                self._cpu_ceiling, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))

    @classmethod
    def for_job(cls, device: str, memory_limit=None) -> "DeviceMemory":
        text = memory_limit if memory_limit is not None else os.environ.get(
            "ADAPTRUN_MEMORY_LIMIT", "")
        limit = parse_bytes(text) if str(text).strip() else None
        return cls(device, limit)

    def free(self) -> float | None:
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            if self.limit is not None:
                return float(min(free, self.limit - torch.cuda.memory_reserved(self.device)))
            return float(free)
        if self._cpu_ceiling is None:
            return None
        return float(self._cpu_ceiling - _proc_status()["VmData"])

    def start_peak(self) -> float:
        """Start measuring a peak; returns what is in use now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return float(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                  # resets the peak resident size to the current
        except OSError:
            pass
        return float(_proc_status()["VmRSS"])

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        return float(_proc_status()["VmHWM"])

    def describe(self) -> str:
        if self.limit is not None:
            return f"the memory cap of {_size(self.limit)} on {self.device} (ADAPTRUN_MEMORY_LIMIT)"
        return f"the memory of {self.device}"

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _repeat(obj, n: int, idx: torch.Tensor):
    """Tensors with ``n`` rows (the batch dimension) indexed by ``idx``; the rest as is."""
    if torch.is_tensor(obj):
        return obj[idx.to(obj.device)] if obj.dim() >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _repeat(v, n, idx) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_repeat(v, n, idx) for v in obj)
    return obj


def probe(module: torch.nn.Module, template, local_batch: int,
          memory: DeviceMemory) -> tuple[bool, float]:
    """Run ``module``'s forward and backward on ``local_batch`` examples made of ``template``
    (args, kwargs, rows) and return (fitted, growth in bytes). Buffers, gradients and the RNG
    are as they were when it returns."""
    args, kwargs, rows = template
    idx = torch.arange(local_batch) % rows
    params = [p for p in module.parameters() if p.requires_grad]
    had_grad = [p.grad is not None for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = [memory.device.index or 0] if memory.cuda else []
    fitted, growth = True, 0.0
    out = loss = big = None
    free = memory.free()
    with torch.random.fork_rng(devices=devices, device_type="cuda" if memory.cuda else "cpu"):
        base = memory.start_peak()
        try:
            big = (_repeat(args, rows, idx), _repeat(kwargs, rows, idx))
            out = module(*big[0], **big[1])
            parts = [t.float().sum() for t in _tensors(out) if t.requires_grad]
            if parts:
                loss = torch.stack(parts).sum()
                loss.backward()
            growth = memory.peak() - base
            # The step itself needs more than its forward and backward (the loss, the next
            # micro-batch, the statistics): it fits only with HEADROOM to spare.
            fitted = free is None or growth <= HEADROOM * free
        except Exception as exc:              # noqa: BLE001 - only memory errors are answers
            if not is_out_of_memory(exc):
                raise
            fitted = False
        finally:
            out = loss = big = None
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
                for p, had in zip(params, had_grad):
                    if had and p.grad is not None:
                        p.grad.zero_()
                    else:
                        p.grad = None
            memory.release()
    return fitted, growth


def agree(fitted: bool | None, growth: float, free: float | None,
          world_size: int) -> tuple[bool, float, float]:
    """Every rank's outcome, the same on every rank: (all fitted, the largest growth, the
    least free memory; -1 where none is known). ``fitted`` None: this rank could not probe
    (no inputs seen yet) and has no say. One all-reduce (MAX of the negated minima)."""
    vec = torch.tensor([0.0 if fitted is False else -1.0, float(growth),
                        -(free if free is not None else math.inf)], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    least_free = -float(vec[2])
    return bool(vec[0] < -0.5), float(vec[1]), least_free if math.isfinite(least_free) else -1.0


def _size(nbytes: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def micro_batch_of(plan) -> int:
    """The largest micro-batch (examples on one rank) of a step plan."""
    return max(1, math.ceil(plan.size / (plan.world_size * plan.micro_batches)))
