"""Time of one cluster allocation (science.allocation.allocate) at cluster scale.

Jobs with goodput n ** a (a drawn in [0.5, 0.99]: poor to near-linear scaling), bounds
[1, 4..64], some running: the median wall time of ``--repeats`` solves, per size.

    python benchmarks/allocation_solve.py            # 100 jobs on 64 x 4 GPUs, and more
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from adaptrun.science.allocation import Cluster, JobDemand, allocate


def demands(count: int, seed: int = 0) -> list[JobDemand]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        hi = int(rng.integers(4, 65))
        n = np.arange(hi + 1)
        out.append(JobDemand(f"j{i}", tuple(10.0 * n ** rng.uniform(0.5, 0.99)), 1, hi,
                             current=int(rng.integers(0, 3)), arrival=float(i),
                             resize_cost_s=30.0, age_s=float(rng.uniform(0, 3600))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'jobs':>5} {'GPUs':>5} {'median s':>9} {'max s':>7} {'allocated':>9}")
    for jobs, cluster in ((100, Cluster(64, 4)), (200, Cluster(128, 4)), (50, Cluster(16, 4))):
        d = demands(jobs)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            a = allocate(d, cluster)
            times.append(time.perf_counter() - t)
        print(f"{jobs:>5} {cluster.capacity:>5} {statistics.median(times):>9.3f} "
              f"{max(times):>7.3f} {sum(a.workers.values()):>9}")


if __name__ == "__main__":
    main()
