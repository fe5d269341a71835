"""Adaptive policy vs the oracle (the per-epoch optimum in hindsight), the best fixed
configuration (in hindsight) and fixed-init, on the bundled Pollux traces: three workloads x
G in {4, 16}. Ratios from one run, side by side.

    python benchmarks/simulate_pollux.py [--resize-cost-s 30] [--gpus 4 16] [--what-if-stats]
    python benchmarks/simulate_pollux.py --start-floors

``--scale-noise X`` / ``--scale-sync Y`` play each trace with its noise scale times X and
its measured sync times times Y (``Workload.scaled``): workloads the policy was not written
against, for the same table.

``--sweep`` judges the policy on families of workloads instead of three: every trace under
each combination of noise scale x{1/4, 1, 4}, its growth over training bent by
{-0.5, 0, +0.5} (``Workload.scaled(growth=)``), sync x{1/2, 1, 2} and run length {1/2, 1} of
its epochs, at each G; per family it prints the adaptive run over the oracle held to the
same start (the hindsight floor from where the policy starts), the share of rows within
1.05x and the worst row, and what the worst row needs: the same variant with the policy told
the trace's statistics at every batch, and with its per-decision growth bound lifted.

``--start-floors`` prints, instead, the oracle held to each possible first replica count R
(its hindsight, but starting at R) over the free oracle: the floor of any policy that starts
at R. A policy must choose its start before it has measured anything, so the start it can
defend is the one whose floor is low on every workload.

``--what-if-stats`` adds a diagnostic column: the same policy told the trace's gradient
statistics at every batch it predicts for (a real job measures them only at its own batch, and the
policy extrapolates from there). It reads the trace's present, not its future, and says how
much of the gap to the oracle is the extrapolation.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from adaptrun.science.policy import Policy
from adaptrun.simulation.oracle import oracle_plan
from adaptrun.simulation.simulator import (best_fixed, fixed_init, fixed_time, simulate_adaptive,
                                           workload_bounds)
from adaptrun.simulation.traces import DEFAULT_EPOCHS, bundled_trace_dir, load_workload


class _ToldStats(Policy):
    """The policy, with the efficiency of every candidate batch from the trace's statistics
    at that batch and the job's epoch instead of extrapolated from the job's own batch."""

    def __init__(self, workload, bounds, **kw):
        super().__init__(bounds, **kw)
        self.workload = workload

    def goodput(self, replicas, local_batch, accum_steps, grad_sqr=None, grad_var=None):
        batch = np.asarray(replicas) * np.asarray(local_batch) * (np.asarray(accum_steps) + 1)
        sqr, var = self.workload.grad_stats(self.last_report.epoch, batch)
        return super().goodput(replicas, local_batch, accum_steps, sqr, var)


def _told_stats_time(w, gpus, epochs, gpus_per_node, resize_cost_s) -> float:
    policy = _ToldStats(w, workload_bounds(w, gpus, gpus_per_node), resize_cost_s=resize_cost_s)
    return simulate_adaptive(w, gpus, epochs, gpus_per_node, resize_cost_s,
                             policy=policy).time_s


def _workload(name: str, args):
    w = load_workload(bundled_trace_dir(name))
    return w if (args.scale_noise, args.scale_sync) == (1.0, 1.0) else w.scaled(
        args.scale_noise, args.scale_sync)


def _start_floors(args) -> None:
    print(f"resize cost {args.resize_cost_s:g} s, {args.gpus_per_node} GPUs per node: "
          f"oracle from a first replica count R / oracle")
    for name in args.workloads:
        w = _workload(name, args)
        epochs = DEFAULT_EPOCHS[name]
        for g in args.gpus:
            free = oracle_plan(w, g, epochs, args.gpus_per_node, args.resize_cost_s).time_s
            floors = [oracle_plan(w, g, epochs, args.gpus_per_node, args.resize_cost_s,
                                  start_replicas=r).time_s / free for r in range(1, g + 1)]
            print(f"{name} G={g}: " + " ".join(f"{r}:{f:.3f}" for r, f in
                                                 enumerate(floors, start=1)), flush=True)


def _sweep(args) -> None:
    import itertools

    families = list(itertools.product((0.25, 1.0, 4.0), (-0.5, 0.0, 0.5), (0.5, 1.0, 2.0),
                                      (0.5, 1.0)))
    print(f"resize cost {args.resize_cost_s:g} s, {args.gpus_per_node} GPUs per node; "
          f"adaptive / the oracle from the same start, {len(families)} variants per row")
    print("| workload | G | median | within 1.05x | worst (noise, growth, sync, length) | "
          "worst, told the statistics at every batch | worst, growth unbounded |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads:
        base = load_workload(bundled_trace_dir(name))
        for g in args.gpus:
            rows = []
            for noise, growth, sync, length in families:
                w = base.scaled(noise, sync, growth)
                epochs = max(1, int(round(DEFAULT_EPOCHS[name] * length)))
                ad = simulate_adaptive(w, g, epochs, args.gpus_per_node, args.resize_cost_s)
                floor = oracle_plan(w, g, epochs, args.gpus_per_node, args.resize_cost_s,
                                    start_replicas=ad.timeline[0].replicas)
                rows.append((ad.time_s / floor.time_s, (noise, growth, sync, length),
                             floor.time_s))
            ratios = np.array([r for r, _ in rows])
            worst = max(rows, key=lambda r: r[0])
            ratio, (noise, growth, sync, length), floor_s = worst
            # What the worst miss needs: the same variant with the policy told the trace's
            # statistics at every batch it weighs (what no live job measures), and with its
            # per-decision growth bound lifted.
            w = base.scaled(noise, sync, growth)
            epochs = max(1, int(round(DEFAULT_EPOCHS[name] * length)))
            told = _told_stats_time(w, g, epochs, args.gpus_per_node, args.resize_cost_s)
            free = simulate_adaptive(w, g, epochs, args.gpus_per_node, args.resize_cost_s,
                                     policy=Policy(workload_bounds(w, g, args.gpus_per_node),
                                                   resize_cost_s=args.resize_cost_s,
                                                   batch_growth_max=math.inf)).time_s
            print(f"| {name} | {g} | {np.median(ratios):.3f} | "
                  f"{np.mean(ratios <= 1.05):.0%} | {ratio:.3f} {worst[1]} | "
                  f"{told / floor_s:.3f} | {free / floor_s:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resize-cost-s", type=float, default=30.0)
    ap.add_argument("--gpus", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--gpus-per-node", type=int, default=4)
    ap.add_argument("--workloads", nargs="+", default=["cifar10", "imagenet", "ncf"])
    ap.add_argument("--what-if-stats", action="store_true",
                    help="add the policy told the statistics at every batch (diagnostic)")
    ap.add_argument("--scale-noise", type=float, default=1.0,
                    help="multiply every trace's noise scale (what-if; 1 = as measured)")
    ap.add_argument("--scale-sync", type=float, default=1.0,
                    help="multiply every measured sync time (what-if; 1 = as measured)")
    ap.add_argument("--start-floors", action="store_true",
                    help="print the oracle from each first replica count over the oracle")
    ap.add_argument("--sweep", action="store_true",
                    help="judge the policy on families of perturbed workloads (see above)")
    args = ap.parse_args()
    if args.sweep:
        _sweep(args)
        return
    if args.start_floors:
        _start_floors(args)
        return
    print(f"resize cost {args.resize_cost_s:g} s, {args.gpus_per_node} GPUs per node"
          + (f", noise scale x{args.scale_noise:g}, sync x{args.scale_sync:g}"
             if (args.scale_noise, args.scale_sync) != (1.0, 1.0) else ""))
    print("| workload | G | adaptive / oracle | adaptive / best fixed | fixed-init / adaptive "
          "| resizes (adaptive, oracle) | best fixed (replicas x batch) | oracle from one node / "
          "oracle | adaptive time | sim wall |"
          + (" told the statistics at every batch / oracle |" if args.what_if_stats else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.what_if_stats else ""))
    for name in args.workloads:
        w = _workload(name, args)
        epochs = DEFAULT_EPOCHS[name]
        for g in args.gpus:
            t0 = time.perf_counter()
            ad = simulate_adaptive(w, g, epochs, args.gpus_per_node, args.resize_cost_s)
            wall = time.perf_counter() - t0
            best_t, best_r, best_b = best_fixed(w, g, epochs, args.gpus_per_node)
            oracle = oracle_plan(w, g, epochs, args.gpus_per_node, args.resize_cost_s)
            # The same hindsight held to the adaptive run's start (one node): the floor of
            # any policy that starts there.
            floor = oracle_plan(w, g, epochs, args.gpus_per_node, args.resize_cost_s,
                                start_replicas=ad.timeline[0].replicas)
            r0, b0 = fixed_init(w, g)
            init_t = fixed_time(w, r0, b0, epochs, args.gpus_per_node)
            told = ""
            if args.what_if_stats:
                t = _told_stats_time(w, g, epochs, args.gpus_per_node, args.resize_cost_s)
                told = f" {t / oracle.time_s:.3f} |"
            print(f"| {name} | {g} | {ad.time_s / oracle.time_s:.3f} | {ad.time_s / best_t:.3f} "
                  f"| {init_t / ad.time_s:.2f} | {ad.resizes}, {oracle.resizes} "
                  f"| {best_r} x {best_b:.0f} | {floor.time_s / oracle.time_s:.3f} "
                  f"| {ad.time_s / 60:.1f} min | {wall:.1f} s |{told}",
                  flush=True)


if __name__ == "__main__":
    main()
