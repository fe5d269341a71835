import math

import numpy as np
import pytest

from adaptrun.science.policy import BoundsError, Config, Decision, JobBounds, Policy
from adaptrun.science.report import Report, ReportError
from adaptrun.science.throughput import ThroughputParams, step_time

# A synthetic cluster the tests know exactly: 4 slots per node, sync dearer across nodes.
TRUTH = ThroughputParams(0.02, 0.0005, 0.005, 0.0005, 0.05, 0.002, 2.0)
BOUNDS = JobBounds(init_batch=128, max_batch=8192, min_replicas=1, max_replicas=16,
                   local_batch_min=16, local_batch_max=512, slots_per_node=4)


def report(cfg: Config, grad_sqr=1.0, grad_var=1.0, progress=100.0, target=1e6, bounds=BOUNDS,
           **kw):
    nodes = int(math.ceil(cfg.replicas / bounds.slots_per_node))
    t = float(step_time(TRUTH, nodes, cfg.replicas, cfg.local_batch, cfg.accum_steps))
    c = TRUTH.alpha_c + TRUTH.beta_c * cfg.local_batch
    return Report(job_id="j", step=10, progress=progress, world_size=cfg.replicas, nodes=nodes,
                  local_batch=cfg.local_batch, accum_steps=cfg.accum_steps,
                  init_batch=bounds.init_batch, step_time_s=t,
                  sync_time_s=max(t - (cfg.accum_steps + 1) * c, 0.0), grad_sqr=grad_sqr,
                  grad_var=grad_var, target_progress=target, **kw)


def test_small_noise_scale_keeps_small_batch_and_large_grows_it():
    cur = Config(4, 32, 0)
    p = Policy(BOUNDS, resize_cost_s=1e9)           # forbid resizes: batch-only decisions
    p.observe(report(cur, grad_sqr=1.0, grad_var=0.01))   # B_noise ~ 1: no use for big batch
    d = p.decide()
    assert not d.changes_replicas
    assert d.config.global_batch <= 256
    p.observe(report(cur, grad_sqr=1.0, grad_var=1000.0))  # B_noise ~ 128000
    d = p.decide()
    assert d.changes_batch and not d.changes_replicas
    assert d.config.global_batch > 1024
    assert d.goodput_chosen > d.goodput_current
    assert "batch 128 ->" in d.reason


def test_resize_taken_only_when_it_pays_for_itself():
    cur = Config(4, 64, 0)
    long_run = Policy(BOUNDS, resize_cost_s=30.0)
    long_run.observe(report(cur, grad_sqr=1.0, grad_var=1000.0, target=1e7))
    d = long_run.decide()
    assert d.changes_replicas and d.config.replicas > 4 and "resize" in d.reason
    short_run = Policy(BOUNDS, resize_cost_s=30.0)
    short_run.observe(report(cur, grad_sqr=1.0, grad_var=1000.0, progress=999.0, target=1000.0))
    d = short_run.decide()
    assert not d.changes_replicas


def test_exploration_is_capped_at_twice_the_largest_measured_count():
    p = Policy(BOUNDS)
    p.observe(report(Config(2, 64, 0), grad_sqr=1.0, grad_var=1e4, target=1e9))
    r, _, _ = p.candidates()
    assert r.max() == 4
    d = p.decide()
    assert d.config.replicas <= 4


def test_all_candidates_are_feasible_and_evaluated_at_once():
    p = Policy(BOUNDS)
    p.observe(report(Config(4, 32, 0)))
    r, a, k = p.candidates()
    b = r * a * (k + 1)
    assert ((b >= 128) & (b <= 8192)).all() and (a >= 16).all() and (a <= 512).all()
    assert (k <= BOUNDS.max_accum_steps).all()
    g = p.goodput(r, a, k)
    assert g.shape == r.shape and np.isfinite(g).all()
    # Configurations hitting the max batch exactly are among the candidates.
    assert (b == 8192).any()


def test_bounds_change_moves_the_job_inside():
    p = Policy(BOUNDS)
    p.observe(report(Config(8, 32, 0)))
    p = p.with_bounds(JobBounds(128, 8192, 1, 4, 16, 512, 4))
    d = p.decide()
    assert d.config.replicas <= 4 and d.changes_replicas and "outside the bounds" in d.reason


def test_decision_dataclass():
    d = Decision(Config(2, 32, 1), Config(2, 32, 0), 10.0, 12.0, "x")
    assert d.changes_batch and not d.changes_replicas
    assert d.predicted_gain == pytest.approx(0.2)
    assert Config(2, 32, 1).global_batch == 128


def test_bad_bounds_and_reports_say_what_to_do():
    with pytest.raises(BoundsError, match="min workers"):
        JobBounds(128, 1024, min_replicas=4, max_replicas=2).validate()
    with pytest.raises(BoundsError, match="raise the max batch"):
        JobBounds(128, 64).validate()
    p = Policy(BOUNDS)
    with pytest.raises(RuntimeError, match="observe"):
        p.decide()
    bad = report(Config(1, 32, 0))
    for field, value in [("step_time_s", float("nan")), ("world_size", 0),
                         ("sync_time_s", -1.0), ("local_batch", 1.5)]:
        kw = bad.to_dict() | {field: value}
        with pytest.raises(ReportError, match=field):
            p.observe(Report(**kw))
