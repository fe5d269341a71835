"""Measured workloads (the Pollux traces): the ground truth the simulator plays.

A trace folder holds, for one model and data set (see traces/pollux/README.md):
``placements.csv`` (step and sync time by placement and local batch, up to 4 nodes),
``scalability.csv`` (bigger runs by node and replica count) and ``validation-<B>.csv`` (one
run per global batch B: per epoch its cumulative progress and the gradient statistics).

The semantics, as the trace README states them:
- B0 is the smallest validated batch, Bmax the largest.
- Step and sync time of ``replicas`` packed onto nodes of ``gpus_per_node`` GPUs at local
  batch a: linear interpolation in a within the measured range of that placement. A
  placement that was not measured is read from another with the same (nodes, replicas), else
  interpolated linearly in the replica count between measured (nodes, replicas) pairs of the
  same kind (one node, or several).
- Gradient statistics during epoch e (0-based: while progress is below the e-th boundary)
  are row e of each validation run, interpolated linearly in B between the validated batches.
- Epoch boundaries in progress are the smallest cumulative progress over the validation
  runs; a job of E epochs ends at the boundary of epoch E - 1.

``TraceError`` carries one line that says what is wrong and what to pass instead.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["TraceError", "Workload", "load_workload", "bundled_trace_dir", "packed_placement",
           "DEFAULT_EPOCHS"]

DEFAULT_EPOCHS = {"cifar10": 100, "imagenet": 90, "ncf": 10}


class TraceError(ValueError):
    """A trace folder or a request against it that cannot be used."""


def bundled_trace_dir(name: str | None = None) -> Path:
    """The traces shipped with the package (``name`` = cifar10, imagenet or ncf)."""
    root = Path(str(resources.files("adaptrun.simulation") / "traces" / "pollux"))
    return root if name is None else root / name


def packed_placement(replicas: int, gpus_per_node: int) -> str:
    """Digits of GPUs per node when replicas fill whole nodes first: 6 on 4-GPU nodes -> '24'."""
    full, rest = divmod(int(replicas), int(gpus_per_node))
    digits = ([rest] if rest else []) + [gpus_per_node] * full
    return "".join(str(d) for d in sorted(digits))


def _read_csv(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray | list]:
    if not path.is_file():
        raise TraceError(f"{path} is missing; pass a trace folder that holds it "
                         f"(for example {bundled_trace_dir('cifar10')})")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TraceError(f"{path} is empty; it needs the columns {', '.join(columns)}") from None
        if tuple(header) != columns:
            raise TraceError(f"{path} has columns {', '.join(header)}; expected exactly "
                             f"{', '.join(columns)}")
        rows = [r for r in reader if r]
    if not rows:
        raise TraceError(f"{path} has a header but no rows")
    out: dict[str, np.ndarray | list] = {}
    for i, name in enumerate(columns):
        col = []
        for n, r in enumerate(rows, start=2):
            if len(r) != len(columns):
                raise TraceError(f"{path} line {n} has {len(r)} fields; expected {len(columns)}")
            col.append(r[i].strip())
        if name == "placement":
            out[name] = col
        else:
            try:
                out[name] = np.array([float(v) for v in col])
            except ValueError:
                raise TraceError(f"{path}: column {name} holds a value that is not a number") from None
    return out


@dataclass(frozen=True)
class _Curve:
    """Step and sync time against local batch for one (nodes, replicas)."""
    local_batch: np.ndarray
    step_time_s: np.ndarray
    sync_time_s: np.ndarray


@dataclass(frozen=True)
class Workload:
    name: str
    init_batch: int
    max_batch: int
    local_batch_min: int
    local_batch_max: int
    validation_batches: np.ndarray          # (V,)
    grad_sqr: np.ndarray                    # (V, E)
    grad_var: np.ndarray                    # (V, E)
    epoch_boundaries: np.ndarray            # (E,) cumulative progress at each epoch's end
    placements: dict = field(repr=False)    # placement string -> _Curve
    by_shape: dict = field(repr=False)      # (nodes, replicas) -> _Curve

    @property
    def epochs_available(self) -> int:
        return len(self.epoch_boundaries)

    def target_progress(self, epochs: int) -> float:
        if not 1 <= epochs <= self.epochs_available:
            raise TraceError(f"--epochs {epochs} is outside this trace; pass 1..{self.epochs_available}")
        return float(self.epoch_boundaries[epochs - 1])

    def epoch_at(self, progress: float) -> int:
        """0-based epoch that progress lies in (the last epoch once past the end)."""
        e = int(np.searchsorted(self.epoch_boundaries, progress, side="right"))
        return min(e, self.epochs_available - 1)

    def grad_stats(self, epoch, global_batch):
        """(grad_sqr, grad_var) during ``epoch`` at ``global_batch``, linear in B between the
        validated batches (clamped at the ends). Broadcasts over epoch and batch arrays."""
        b = self.validation_batches
        x = np.clip(np.asarray(global_batch, dtype=np.float64), b[0], b[-1])
        i = np.clip(np.searchsorted(b, x, side="right") - 1, 0, len(b) - 2)
        frac = (x - b[i]) / (b[i + 1] - b[i])
        e = np.asarray(epoch)
        sqr = (1 - frac) * self.grad_sqr[i, e] + frac * self.grad_sqr[i + 1, e]
        var = (1 - frac) * self.grad_var[i, e] + frac * self.grad_var[i + 1, e]
        return sqr, var

    def curve(self, replicas: int, gpus_per_node: int) -> _Curve:
        placement = packed_placement(replicas, gpus_per_node)
        if placement in self.placements:
            return self.placements[placement]
        nodes = len(placement)
        key = (nodes, int(replicas))
        if key in self.by_shape:
            return self.by_shape[key]
        # Interpolate in replicas between measured shapes of the same kind.
        same_kind = sorted(k for k in self.by_shape if (k[0] == 1) == (nodes == 1) and k[1] > 1)
        lower = [k for k in same_kind if k[1] < replicas]
        upper = [k for k in same_kind if k[1] > replicas]
        if not lower or not upper:
            raise TraceError(
                f"{self.name}: no measurement near {replicas} replicas on {nodes} node(s) of "
                f"{gpus_per_node} GPUs; pass fewer --gpus or a --gpus-per-node the trace measured")
        lo = max(lower, key=lambda k: (k[1], -abs(k[0] - nodes)))
        hi = min(upper, key=lambda k: (k[1], abs(k[0] - nodes)))
        c_lo, c_hi = self.by_shape[lo], self.by_shape[hi]
        a = np.intersect1d(c_lo.local_batch, c_hi.local_batch)
        w = (replicas - lo[1]) / (hi[1] - lo[1])

        def mix(ylo, yhi, xlo, xhi):
            return (1 - w) * np.interp(a, xlo, ylo) + w * np.interp(a, xhi, yhi)

        return _Curve(a, mix(c_lo.step_time_s, c_hi.step_time_s, c_lo.local_batch, c_hi.local_batch),
                      mix(c_lo.sync_time_s, c_hi.sync_time_s, c_lo.local_batch, c_hi.local_batch))

    def scaled(self, noise: float = 1.0, sync: float = 1.0, growth: float = 0.0) -> "Workload":
        """The same workload with its noise scale (grad_var) times ``noise`` and every
        measured sync time times ``sync`` (compute unchanged): a what-if for a model that
        tolerates bigger batches, or a faster or slower network. ``growth`` bends the noise
        scale's course over training: epoch e's is further multiplied by ((e + 1) / (E / 2))
        ** growth (E the trace's epochs), so it is unchanged at mid-run, grows faster than
        measured for growth > 0 and slower (or falls) for growth < 0."""
        if not (noise > 0 and sync > 0 and np.isfinite(noise) and np.isfinite(sync)
                and np.isfinite(growth)):
            raise TraceError(f"scale factors must be positive numbers, got noise {noise}, "
                             f"sync {sync}, growth {growth}")
        epochs = self.grad_var.shape[1]
        bend = ((np.arange(epochs) + 1.0) / (epochs / 2.0)) ** growth

        def curve(c: _Curve) -> _Curve:
            return _Curve(c.local_batch, c.step_time_s + (sync - 1.0) * c.sync_time_s,
                          sync * c.sync_time_s)

        return replace(self, grad_var=self.grad_var * noise * bend[None, :],
                       placements={k: curve(c) for k, c in self.placements.items()},
                       by_shape={k: curve(c) for k, c in self.by_shape.items()})

    def local_batch_range(self, replicas: int, gpus_per_node: int) -> tuple[float, float]:
        c = self.curve(replicas, gpus_per_node)
        return float(c.local_batch[0]), float(c.local_batch[-1])

    def step_time(self, replicas: int, local_batch, accum_steps=0, gpus_per_node: int = 4):
        """(step_time_s, sync_time_s) of one optimizer step; vectorised over local_batch/accum.

        With k accumulation steps the step is step(p,a) + k * (step(p,a) - sync(p,a)).
        """
        c = self.curve(replicas, gpus_per_node)
        step = np.interp(local_batch, c.local_batch, c.step_time_s)
        sync = np.interp(local_batch, c.local_batch, c.sync_time_s)
        k = np.asarray(accum_steps, dtype=np.float64)
        return step + k * (step - sync), sync


def load_workload(trace_dir: str | os.PathLike) -> Workload:
    """Read a trace folder; raise TraceError with one actionable line when it is unusable."""
    d = Path(trace_dir)
    if not d.is_dir():
        raise TraceError(f"{d} is not a folder; pass a trace folder such as {bundled_trace_dir('cifar10')}")
    pl = _read_csv(d / "placements.csv", ("placement", "local_bsz", "step_time", "sync_time"))
    sc_path = d / "scalability.csv"
    sc = (_read_csv(sc_path, ("num_nodes", "num_replicas", "local_bsz", "step_time", "sync_time"))
          if sc_path.is_file() else None)
    val_files = sorted(d.glob("validation-*.csv"))
    runs = {}
    for p in val_files:
        m = re.fullmatch(r"validation-(\d+)\.csv", p.name)
        if not m:
            continue
        runs[int(m.group(1))] = _read_csv(p, ("progress", "iteration", "metric", "grad_sqr", "grad_var"))
    if len(runs) < 2:
        raise TraceError(f"{d} needs at least two validation-<batch>.csv files; found {len(runs)}")
    batches = np.array(sorted(runs), dtype=np.float64)
    n_epochs = min(len(runs[b]["progress"]) for b in runs)
    grad_sqr = np.stack([runs[b]["grad_sqr"][:n_epochs] for b in sorted(runs)])
    grad_var = np.stack([runs[b]["grad_var"][:n_epochs] for b in sorted(runs)])
    boundaries = np.min(np.stack([runs[b]["progress"][:n_epochs] for b in sorted(runs)]), axis=0)
    if np.any(np.diff(boundaries) <= 0):
        raise TraceError(f"{d}: validation progress is not increasing; the files are damaged")

    def curves(keys, lbs, steps, syncs):
        groups: dict = {}
        for k, a, s, y in zip(keys, lbs, steps, syncs):
            groups.setdefault(k, []).append((a, s, y))
        out = {}
        for k, pts in groups.items():
            pts.sort()
            arr = np.array(pts)
            out[k] = _Curve(arr[:, 0], arr[:, 1], arr[:, 2])
        return out

    for p in pl["placement"]:
        if not p.isdigit():
            raise TraceError(f"{d}/placements.csv: placement {p!r} is not a digit string like '44'")
    placements = curves(pl["placement"], pl["local_bsz"], pl["step_time"], pl["sync_time"])
    by_shape: dict = {}
    for p in sorted(placements):
        by_shape.setdefault((len(p), sum(int(ch) for ch in p)), placements[p])
    if sc is not None:
        sc_keys = [(int(n), int(r)) for n, r in zip(sc["num_nodes"], sc["num_replicas"])]
        for k, c in curves(sc_keys, sc["local_bsz"], sc["step_time"], sc["sync_time"]).items():
            by_shape.setdefault(k, c)
    return Workload(
        name=d.name,
        init_batch=int(batches[0]),
        max_batch=int(batches[-1]),
        local_batch_min=int(np.min(pl["local_bsz"])),
        local_batch_max=int(np.max(pl["local_bsz"])),
        validation_batches=batches,
        grad_sqr=grad_sqr,
        grad_var=grad_var,
        epoch_boundaries=boundaries,
        placements=placements,
        by_shape=by_shape,
    )
