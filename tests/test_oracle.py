"""The oracle is exact: on a trace small enough to solve by hand, and against brute force.

The hand trace (B0 = 100, Bmax = 200, 4-GPU nodes, G = 2, batches {100, 200}):
- 1 replica: local 100 takes 1.0 s a step, local 200 takes 2.0 s (no sync);
- 2 replicas: only local 100 was measured (1.1 s a step), so 2 replicas run batch 200 only.
Each epoch holds 100 B0-steps of progress. A "flat" epoch has |G|^2 = 1, tr(Sigma) = 0 (gain
1 for any batch: batch 200 does no more than batch 100); a "noisy" epoch has |G|^2 = 0
(gain = scale: batch 200 counts double). Epoch times:

    flat:  1 replica min(100 x 1.0, 100 x 2.0) = 100 s     2 replicas 100 x 1.1 = 110 s
    noisy: 1 replica min(100 x 1.0,  50 x 2.0) = 100 s     2 replicas  50 x 1.1 =  55 s

Epochs [flat, noisy, noisy]: 1 replica throughout 300 s; 2 throughout 110 + 55 + 55 = 220 s;
1 then 2 is 100 + R + 110 = 210 + R. With R = 5 the resize pays (215 s); with R = 30 it does
not (220 s at 2 replicas from the start, which is free).
"""
import itertools
import math

import numpy as np
import pytest

from adaptrun.simulation.oracle import epoch_costs, oracle_plan, plan, simulate_oracle
from adaptrun.simulation.simulator import best_fixed
from adaptrun.simulation.traces import DEFAULT_EPOCHS, bundled_trace_dir, load_workload

FLAT, NOISY = (1.0, 0.0), (0.0, 1.0)       # (grad_sqr, grad_var)


def _trace(tmp_path, epochs):
    d = tmp_path / "hand"
    d.mkdir()
    (d / "placements.csv").write_text(
        "placement,local_bsz,step_time,sync_time\n"
        "1,100,1.0,0.0\n1,200,2.0,0.0\n"
        "2,100,1.1,0.1\n")
    for b in (100, 200):
        rows = [f"{100 * (e + 1)},{e},0.5,{sqr},{var}" for e, (sqr, var) in enumerate(epochs)]
        (d / f"validation-{b}.csv").write_text(
            "progress,iteration,metric,grad_sqr,grad_var\n" + "\n".join(rows) + "\n")
    return load_workload(d)


def test_epoch_costs_match_the_hand_computation(tmp_path):
    w = _trace(tmp_path, [FLAT, NOISY, NOISY])
    cost, batch = epoch_costs(w, 2, 3, batches=[100, 200])
    assert cost == pytest.approx(np.array([[100, 110], [100, 55], [100, 55]]))
    assert batch[:, 1].tolist() == [200, 200, 200]


@pytest.mark.parametrize("resize_cost_s,time_s,replicas,resizes", [
    (5.0, 215.0, [1, 2, 2], 1),       # the resize pays: 100 + 5 + 55 + 55
    (30.0, 220.0, [2, 2, 2], 0),      # it does not: 2 replicas from the (free) start
    (0.0, 210.0, [1, 2, 2], 1),       # free resizes: the per-epoch optimum
])
def test_oracle_is_exact_on_a_hand_trace(tmp_path, resize_cost_s, time_s, replicas, resizes):
    w = _trace(tmp_path, [FLAT, NOISY, NOISY])
    p = oracle_plan(w, 2, 3, resize_cost_s=resize_cost_s, batches=[100, 200])
    assert p.time_s == pytest.approx(time_s)
    assert p.replicas.tolist() == replicas and p.resizes == resizes
    sim = simulate_oracle(w, 2, 3, resize_cost_s=resize_cost_s, batches=[100, 200])
    assert sim.time_s == pytest.approx(time_s) and sim.resizes == resizes
    assert sum(s.replicas == 0 for s in sim.timeline) == resizes
    assert sim.timeline[-1].end_s == pytest.approx(time_s)


def test_two_resizes_when_each_pays(tmp_path):
    # [noisy, flat, noisy]: 2 -> 1 -> 2 is 55 + 100 + 55 + 2R; staying at 2 is 220.
    w = _trace(tmp_path, [NOISY, FLAT, NOISY])
    assert oracle_plan(w, 2, 3, resize_cost_s=4.0, batches=[100, 200]).time_s == pytest.approx(218)
    assert oracle_plan(w, 2, 3, resize_cost_s=6.0, batches=[100, 200]).time_s == pytest.approx(220)


def test_plan_matches_brute_force_on_random_costs():
    rng = np.random.default_rng(0)
    for _ in range(30):
        e, g = rng.integers(1, 5), rng.integers(1, 4)
        cost = rng.uniform(1, 10, size=(e, g))
        r_cost = float(rng.uniform(0, 6))
        start = int(rng.integers(1, g + 1)) if rng.random() < 0.5 else None
        brute = math.inf
        for path in itertools.product(range(g), repeat=e):
            t = sum(cost[i, c] for i, c in enumerate(path))
            t += r_cost * sum(a != b for a, b in zip(path, path[1:]))
            if start is not None:
                t += r_cost * (path[0] != start - 1)
            brute = min(brute, t)
        total, replicas, _ = plan(cost, r_cost, start)
        assert total == pytest.approx(brute)
        again = sum(cost[i, r - 1] for i, r in enumerate(replicas)) + r_cost * (
            np.count_nonzero(np.diff(replicas))
            + (start is not None and replicas[0] != start))
        assert again == pytest.approx(total)


@pytest.mark.parametrize("name", ["cifar10", "ncf"])
def test_oracle_is_never_slower_than_the_best_fixed_configuration(name):
    w = load_workload(bundled_trace_dir(name))
    epochs = DEFAULT_EPOCHS[name]
    for g in (4, 16):
        assert oracle_plan(w, g, epochs).time_s <= best_fixed(w, g, epochs)[0] * (1 + 1e-9)
