"""The cluster allocator against exhaustive search, and the cluster simulator on the bundled
measured workloads."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from adaptrun.cli import cli
from adaptrun.science.allocation import (AllocationError, Cluster, JobDemand, allocate,
                                         speedups)
from adaptrun.simulation.cluster import generate_jobs, read_jobs, simulate_cluster


def _job(name, exponent, max_w, **kw):
    n = np.arange(max_w + 1)
    return JobDemand(name, tuple(10.0 * n ** exponent), kw.pop("min_workers", 1), max_w, **kw)


def _brute_force(jobs, capacity, p, horizon_s):
    best, best_x = None, None
    ranges = [range(j.min_workers, j.max_workers + 1) for j in jobs]
    for x in itertools.product(*ranges):
        if sum(x) > capacity:
            continue
        vals = [j.weight * speedups(j, horizon_s)[n - j.min_workers] ** p for j, n in zip(jobs, x)]
        obj = (sum(vals) / sum(j.weight for j in jobs)) ** (1 / p)
        if best is None or obj > best + 1e-12:
            best, best_x = obj, x
    return best, best_x


@pytest.mark.parametrize("p", [-1.0, 0.5, 1.0])
def test_allocation_is_the_exhaustive_optimum(p):
    rng = np.random.default_rng(3)
    for trial in range(6):
        jobs = [_job(f"j{i}", rng.uniform(0.2, 1.0), int(rng.integers(2, 7)),
                     weight=float(rng.uniform(0.5, 2)), current=int(rng.integers(0, 4)),
                     resize_cost_s=30.0) for i in range(4)]
        a = allocate(jobs, Cluster(3, 4), p=p, horizon_s=300.0)
        best, x = _brute_force(jobs, 12, p, 300.0)
        assert a.objective == pytest.approx(best, rel=1e-6), (trial, a.workers, x)
        assert sum(a.workers.values()) <= 12


def test_well_scaling_job_gets_the_spare_gpus():
    jobs = [_job("linear", 1.0, 8), _job("flat", 0.05, 8)]
    a = allocate(jobs, Cluster(2, 4), p=1.0)
    assert a.workers["linear"] > a.workers["flat"]
    assert sum(a.workers.values()) == 8


def test_a_job_that_gains_nothing_from_more_workers_is_held_at_its_minimum():
    """Hand-worked: "flat" has the same goodput at 2..8 workers (speedup 1 everywhere), so
    every GPU above its minimum of 2 is worth more to "linear" (speedup n/1 at n workers):
    the allocation is flat 2, linear 6 at p = -1 and at p = 1."""
    flat = JobDemand("flat", (0.0, 5.0, 10.0) + (10.0,) * 6, 2, 8)
    for p in (-1.0, 1.0):
        a = allocate([_job("linear", 1.0, 8), flat], Cluster(2, 4), p=p)
        assert a.workers == {"linear": 6, "flat": 2}, (p, a.workers)


def test_full_cluster_queues_in_priority_then_arrival_order_and_never_evicts():
    running = _job("running", 1.0, 4, current=4, arrival=0.0, min_workers=4)
    late_hi = _job("late-but-urgent", 1.0, 4, arrival=20.0, priority=5, min_workers=4)
    early = _job("early", 1.0, 4, arrival=10.0, min_workers=4)
    later = _job("later", 1.0, 4, arrival=30.0, min_workers=4)
    a = allocate([later, early, late_hi, running], Cluster(2, 4))
    assert a.workers == {"running": 4, "late-but-urgent": 4, "early": 0, "later": 0}
    assert a.queued == ("early", "later")


def test_resize_cost_keeps_a_job_where_a_small_gain_does_not_pay():
    # 5 -> 6 workers is +3.7 % goodput; a 30 s resize over 300 s costs 10 %.
    j = _job("a", 1.0 - 0.8, 8, current=5, resize_cost_s=30.0)
    assert allocate([j], Cluster(2, 4), p=1.0, horizon_s=300.0).workers["a"] == 5
    free = _job("a", 1.0 - 0.8, 8, current=5, resize_cost_s=0.0)
    assert allocate([free], Cluster(2, 4), p=1.0, horizon_s=300.0).workers["a"] == 8


def test_placement_spans_the_fewest_nodes_and_keeps_previous_nodes():
    jobs = [_job("big", 1.0, 8, min_workers=8), _job("small", 1.0, 2, min_workers=2),
            _job("mid", 1.0, 4, min_workers=4)]
    a = allocate(jobs, Cluster(4, 4), p=1.0)
    assert a.spans("big") == 2 and a.spans("mid") == 1 and a.spans("small") == 1
    again = allocate(jobs, Cluster(4, 4), p=1.0, previous={"mid": ((3, 4),)})
    assert again.nodes["mid"] == ((3, 4),)


def test_hundred_jobs_on_256_gpus():
    rng = np.random.default_rng(0)
    jobs = [_job(f"j{i}", rng.uniform(0.5, 0.99), int(rng.integers(4, 65)),
                 current=int(rng.integers(0, 3)), arrival=float(i), resize_cost_s=30.0)
            for i in range(100)]
    a = allocate(jobs, Cluster(64, 4))
    assert sum(a.workers.values()) == 256
    assert all(n >= 1 for n in a.workers.values())
    assert all(sum(k for _, k in a.nodes[name]) == n for name, n in a.workers.items())


@pytest.mark.parametrize("bad, message", [
    (dict(min_workers=3, max_workers=2), "is not a range"),
    (dict(goodput=(0.0, 1.0)), "one per worker count"),
    (dict(goodput=(0.0, 0.0, 1.0, 2.0)), "must be a positive number"),
    (dict(weight=0.0), "must be positive"),
])
def test_bad_demand_is_a_clear_error(bad, message):
    fields = dict(name="x", goodput=(0.0, 1.0, 2.0, 3.0), min_workers=1, max_workers=3)
    fields.update(bad)
    with pytest.raises(AllocationError, match=message):
        allocate([JobDemand(**fields)], Cluster(1, 4))


def test_capacity_parse():
    assert Cluster.parse("16x4").capacity == 64
    assert Cluster.parse("8") == Cluster(1, 8)
    with pytest.raises(AllocationError, match="NODESxGPUS"):
        Cluster.parse("lots")


def test_simulated_cluster_allocator_beats_today_and_fifo_on_measured_workloads():
    """48 jobs of the bundled Pollux traces on 16 x 4 GPUs: every job finishes, each only
    once, and the goodput allocator's average JCT is below each job alone and FIFO."""
    jobs = generate_jobs(48, seed=1)
    res = {p: simulate_cluster(jobs, Cluster(16, 4), p) for p in ("goodput", "alone", "fifo")}
    for r in res.values():
        assert sorted(j.name for j in r.jobs) == sorted(j.name for j in jobs)
        assert all(j.finish_s > j.arrival_s for j in r.jobs)
        for _, alloc in r.timeline:
            assert sum(alloc.values()) <= 64
    jct = {p: r.summary()["avg_jct_h"] for p, r in res.items()}
    assert jct["goodput"] < 0.8 * jct["alone"]
    assert jct["goodput"] < 0.8 * jct["fifo"]


def test_simulate_cluster_cli(tmp_path):
    trace = tmp_path / "jobs.csv"
    trace.write_text("name,time,application,num_replicas\n"
                     "a,0,cifar10,2\nb,600,ncf,1\nc,1200,cifar10,4\n")
    png = tmp_path / "alloc.png"
    r = CliRunner().invoke(cli, ["simulate-cluster", "--capacity", "2x4", "--trace", str(trace),
                                 "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [s["policy"] for s in out["results"]] == ["goodput", "alone", "fair", "fifo"]
    assert all(s["jobs"] == 3 for s in out["results"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_cluster_bad_trace_says_what_to_fix(tmp_path):
    bad = tmp_path / "jobs.csv"
    bad.write_text("name,time,application\na,0,resnet\n")
    r = CliRunner().invoke(cli, ["simulate-cluster", "--trace", str(bad)])
    assert r.exit_code == 2
    assert "is not one of cifar10, imagenet, ncf" in r.output
    with pytest.raises(Exception, match="missing column"):
        (tmp_path / "b.csv").write_text("name,when\n")
        read_jobs(tmp_path / "b.csv")
