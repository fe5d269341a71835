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
    # B_noise ~ 128000 in two reports (the policy reads the median of the last three)
    p.observe(report(cur, grad_sqr=1.0, grad_var=1000.0))
    assert not p.decide().changes_batch
    p.observe(report(cur, grad_sqr=1.0, grad_var=1000.0))
    d = p.decide()
    assert d.changes_batch and not d.changes_replicas
    assert d.goodput_chosen > d.goodput_current
    assert "batch 128 ->" in d.reason
    # A warmup that follows the signal: at most batch_growth_max (4x) per decision, and the
    # batch keeps growing at every decision while the noise scale asks for more.
    batches = [128]
    for _ in range(5):
        assert d.config.global_batch <= 4 * batches[-1]
        batches.append(d.config.global_batch)
        p.observe(report(d.config, grad_sqr=1.0, grad_var=1000.0))
        d = p.decide()
    assert batches[-1] > 1024, batches


def test_one_far_off_noise_estimate_does_not_move_the_batch_and_a_lasting_change_does():
    """A live job's noise-scale estimate can be far off for a report (one digits run: 12,529
    between ~600 and ~1,000), and the batch followed it there and back, with AdaScale's LR.
    The policy reads the median of the last three reports' estimates."""
    p = Policy(BOUNDS, resize_cost_s=1e9)           # batch-only decisions
    cfg = Config(4, 32, 0)
    for _ in range(4):                              # B_noise = 128 * 5 = 640
        p.observe(report(cfg, grad_sqr=1.0, grad_var=5.0))
        cfg = p.decide().config
    settled = cfg
    assert settled.global_batch > 128
    for var in (100.0, 5.0, 0.05, 5.0):             # one far off each way, in between
        p.observe(report(cfg, grad_sqr=1.0, grad_var=var))
        d = p.decide()
        assert d.config == settled, (var, d.reason)
    for _ in range(2):                              # the noise scale really grew 20-fold
        p.observe(report(cfg, grad_sqr=1.0, grad_var=100.0))
        d = p.decide()
    assert d.config.global_batch > settled.global_batch, d.reason
    # What it read survives a restart from the state.
    q = Policy(BOUNDS, resize_cost_s=1e9).load_state_dict(p.state_dict())
    assert q._recent == p._recent and q._stats == p._stats
    bad = {**p.state_dict(), "recent_stats": [[0.0, 1.0]]}
    with pytest.raises(ValueError, match="grad_sqr > 0"):
        Policy(BOUNDS).load_state_dict(bad)
    old = {k: v for k, v in p.state_dict().items() if k != "recent_stats"}
    assert Policy(BOUNDS).load_state_dict(old)._recent == [p._stats]   # written before the window
    with pytest.raises(ValueError, match="grad_sqr > 0"):
        Policy(BOUNDS).load_state_dict({**old, "stats": [0.0, 1.0]})


def test_undoing_a_batch_move_soon_after_needs_more_than_a_small_gain():
    """Noise-scale estimates some 50 % apart, in turn, would move the batch up and back down
    for a percent or two each time (a live digits run: 328 -> 244 -> 328 at +2 % each): a
    batch move that undoes the last one within holdoff_runs decisions needs
    batch_reversal_gain (5 %); a bigger gain is still taken."""
    def run(down_var):
        p = Policy(BOUNDS, resize_cost_s=1e9)       # batch-only decisions
        cfg = Config(4, 32, 0)
        for var in (10.0,) * 4 + (20.0,) * 2:      # settle, then the noise scale doubles
            p.observe(report(cfg, grad_sqr=1.0, grad_var=var))
            cfg = p.decide().config
        up = cfg
        for _ in range(2):
            p.observe(report(cfg, grad_sqr=1.0, grad_var=down_var))
            d = p.decide()
        return up, d

    up, d = run(10.0)                               # back down would gain ~3 %
    assert up.global_batch > 128 * 10 // 4, up     # it did move up
    assert d.config == up and "would undo the last batch move" in d.reason, d.reason
    up, d = run(5.0)                                # back down gains ~12 %: taken
    assert d.config.global_batch < up.global_batch, d.reason
    # The direction of the last batch move survives a restart from the state.
    p = Policy(BOUNDS, resize_cost_s=1e9)
    p.observe(report(Config(4, 32, 0), grad_sqr=1.0, grad_var=1000.0))
    p.observe(report(Config(4, 32, 0), grad_sqr=1.0, grad_var=1000.0))
    assert p.decide().changes_batch
    q = Policy(BOUNDS, resize_cost_s=1e9).load_state_dict(p.state_dict())
    assert q._moves.batch_last == p._moves.batch_last is not None


def test_resize_taken_only_when_it_pays_for_itself():
    cur = Config(4, 64, 0)
    long_run = Policy(BOUNDS, resize_cost_s=30.0)
    long_run.observe(report(cur, grad_sqr=1.0, grad_var=1000.0, target=1e7))
    d = long_run.decide()
    # Free before paid: the much better batch at 4 replicas is tried (and measured) first.
    assert d.changes_batch and not d.changes_replicas, d.reason
    d = _batch_moves_then(long_run, d, grad_var=1000.0, target=1e7)
    assert d.changes_replicas and d.config.replicas > 4 and "resize" in d.reason
    short_run = Policy(BOUNDS, resize_cost_s=30.0)
    short_run.observe(report(cur, grad_sqr=1.0, grad_var=1000.0, progress=999.0, target=1000.0))
    d = short_run.decide()
    assert not d.changes_replicas


def test_exploration_can_be_capped_at_twice_the_largest_measured_count():
    p = Policy(BOUNDS)
    p.observe(report(Config(2, 64, 0), grad_sqr=1.0, grad_var=1e4, target=1e9))
    assert p.candidates()[0].max() == 16       # by default every count within the bounds
    p = Policy(BOUNDS, explore_factor=2.0)     # Pollux's rule, as an option
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


def test_no_batch_change_on_a_noise_scale_that_was_not_measured():
    cur = Config(4, 32, 0)
    p = Policy(BOUNDS, resize_cost_s=1e9)
    # |G|^2 <= 0: the estimate is not there yet (inf noise scale); before the fix this asked
    # for the max batch ("goodput +466% (noise scale inf)").
    for sqr, var in ((0.0, 0.0), (0.0, 5.0), (-1.0, 5.0)):
        p.observe(report(cur, grad_sqr=sqr, grad_var=var))
        d = p.decide()
        assert not d.changes_batch, (sqr, var, d)
        assert "no noise-scale estimate yet" in d.reason
    # Once measured, a window whose estimate is undefined keeps the last measured one.
    p.observe(report(cur, grad_sqr=1.0, grad_var=1000.0))
    p.observe(report(cur, grad_sqr=-1.0, grad_var=1000.0))
    d = p.decide()
    assert d.changes_batch and "noise scale 128000" in d.reason, d.reason


def test_script_limits_are_the_bounds_and_flags_only_tighten_them():
    from adaptrun.science.policy import BatchCaps, bounds_from_script
    base = JobBounds(init_batch=1, max_batch=1 << 20, min_replicas=1, max_replicas=2)
    r = report(Config(1, 32, 0), bounds=JobBounds(init_batch=32, max_batch=32))
    own = dataclasses_replace(r, max_batch=512, local_batch_min=8, local_batch_max=256,
                              accumulation=True)
    b, notes = bounds_from_script(base, BatchCaps(), own)
    assert (b.init_batch, b.max_batch, b.local_batch_min, b.local_batch_max) == (32, 512, 8, 256)
    assert b.max_accum_steps > 0 and notes == []
    b, notes = bounds_from_script(base, BatchCaps(init_batch=64, max_batch=128,
                                                  local_batch_max=1024), own)
    assert (b.init_batch, b.max_batch, b.local_batch_max) == (32, 128, 256)
    assert any("--init-batch 64 differs from the script's batch_size 32" in n for n in notes)
    assert any("--max-global-batch 128 caps the script's max batch 512" in n for n in notes)
    # A script without autoscale_batch_size: its batch is fixed, and never accumulated.
    fixed = dataclasses_replace(r, max_batch=32, accumulation=False)
    b, _ = bounds_from_script(base, BatchCaps(max_batch=4096), fixed)
    assert (b.init_batch, b.max_batch, b.max_accum_steps) == (32, 32, 0)
    p = Policy(b, resize_cost_s=1e9)
    p.observe(dataclasses_replace(fixed, grad_sqr=1.0, grad_var=1000.0))
    assert p.decide().config.global_batch == 32


def test_a_reversed_resize_bars_the_count_it_left():
    p = Policy(BOUNDS, resize_cost_s=0.0, holdoff_runs=3)
    p._moves.runs = 10
    p._moves.record(4, 8, p.holdoff_runs)       # 4 -> 8 ...
    p._moves.runs = 12
    p._moves.record(8, 4, p.holdoff_runs)       # ... and back within 3 runs: 8 is barred
    assert p._moves.barred(8) and not p._moves.barred(4)
    p.observe(report(Config(4, 32, 0), grad_sqr=1.0, grad_var=1000.0))
    d = p.decide()
    assert d.config.replicas != 8
    p._moves.runs = 12 + 3
    assert not p._moves.barred(8)               # the bar lasts holdoff_runs * 2^(flaps-1)


def test_a_new_job_starts_on_one_node_at_b0():
    assert Policy(BOUNDS).initial_config() == Config(4, 32, 0)
    small = JobBounds(init_batch=128, max_batch=8192, max_replicas=2, local_batch_min=16,
                      slots_per_node=4)
    assert Policy(small).initial_config() == Config(2, 64, 0)
    # B0 below one node's smallest local batches: the smallest local batch on each replica.
    tiny = JobBounds(init_batch=16, max_batch=64, max_replicas=8, local_batch_min=8,
                     slots_per_node=8)
    c = Policy(tiny).initial_config()
    assert tiny.admits(c) and c.replicas * 8 <= 64, c


def test_an_untried_better_batch_comes_before_a_resize():
    p = Policy(BOUNDS, resize_cost_s=1.0)
    cur = Config(4, 32, 0)
    p.observe(report(cur, grad_sqr=1.0, grad_var=1000.0, target=1e7))
    d = p.decide()
    assert d.changes_batch and not d.changes_replicas, d.reason
    # Measured there (the batch grows by at most 4x a decision, each batch measured before
    # the next), the better batches no longer hold a resize back.
    assert _batch_moves_then(p, d, grad_var=1000.0, target=1e7).changes_replicas


def _batch_moves_then(p: Policy, d: Decision, **stats) -> Decision:
    """Apply ``d`` and the batch-only moves that follow it (each measured once), at most 8;
    the first decision that is not a batch-only move."""
    for _ in range(8):
        if d.changes_replicas or not d.changes_batch:
            return d
        assert d.config.global_batch <= 4 * d.current.global_batch, d.reason
        p.observe(report(d.config, grad_sqr=1.0, **stats))
        d = p.decide()
    return d


def dataclasses_replace(r, **kw):
    import dataclasses
    return dataclasses.replace(r, **kw)


def test_a_move_on_a_guessed_sync_must_gain_more_than_the_guess():
    """A placement the job never ran at is predicted from the prior's guess of its sync; a
    move there must gain that guess's share of the step on top of resize_min_gain."""
    p = Policy(BOUNDS, resize_cost_s=0.0)
    p.observe(report(Config(4, 32, 0), grad_sqr=1.0, grad_var=1000.0, target=1e9))
    across = Config(16, 32, 0)
    share = p._prior_share(across)
    assert 0.0 < share < 1.0, share               # the guessed part of the predicted step
    assert p._prior_share(Config(4, 64, 0)) == 0.0   # one node: measured there
    assert p._prior_share(Config(1, 32, 0)) == 0.0   # one replica: no sync at all
    d = p.decide()
    if d.changes_replicas and d.config.replicas > 4:
        gain = d.goodput_chosen / p.goodput(4, d.current.local_batch, 0) - 1.0
        assert gain >= p.resize_min_gain + p._prior_share(d.config), d.reason
    # Once sync across nodes is measured, no guess is left to pay for.
    p.observe(report(Config(8, 32, 0), grad_sqr=1.0, grad_var=1000.0, target=1e9))
    assert p._prior_share(across) == 0.0
    # From one replica, both kinds of sync are guesses.
    q = Policy(BOUNDS)
    q.observe(report(Config(1, 32, 1), grad_sqr=1.0, grad_var=1000.0, target=1e9))
    assert q._prior_share(Config(4, 32, 0)) > 0.0 and q._prior_share(across) > 0.0


def test_moving_back_to_fewer_workers_must_pay_in_the_worse_of_the_two_futures():
    """A count the job left is judged as a move to it is: over the rest of the run, in the
    worse of the two futures (the noise scale stays, or grows until throughput decides).
    Fewer replicas that win only while the noise scale is small are not worth a resize back;
    fewer replicas that win in both futures are."""
    def measured(p, cfg, n=2, slower=1.0):
        for _ in range(n):
            r = report(cfg, grad_sqr=1.0, grad_var=1.0, target=1e9)
            p.observe(dataclasses_replace(r, step_time_s=r.step_time_s * slower,
                                          sync_time_s=r.step_time_s * slower
                                          - (r.step_time_s - r.sync_time_s)))

    one_node, two_nodes = Config(4, 32, 0), Config(8, 32, 0)
    # Two nodes measured as the model expects: far more throughput at a large local batch,
    # less goodput at today's small noise scale than one node.
    p = Policy(BOUNDS, resize_cost_s=10.0)
    measured(p, one_node)
    measured(p, two_nodes)
    assert p.goodput(4, 32, 0) > 1.05 * p.goodput(8, 32, 0)
    d = p.decide()
    assert d.config.replicas == 8, d.reason
    # Two nodes measured 30x slower than that: fewer workers win in both futures.
    q = Policy(BOUNDS, resize_cost_s=10.0)
    measured(q, one_node)
    measured(q, two_nodes, slower=30.0)
    d = q.decide()
    assert d.config.replicas == 4 and d.reason.startswith("back to"), d.reason


def _curve_loss(examples: float) -> float:
    return 5.0 - 0.4 * math.log(examples)


def _run_to_a_batch_move(p: Policy, cfg: Config, **stats):
    """Eight reports at ``cfg`` whose loss falls along a log curve of the examples, then the
    decision; returns (decision, step, examples)."""
    step, examples = 0, 0.0
    for _ in range(8):
        step += 10
        examples += 10 * cfg.global_batch
        p.observe(dataclasses_replace(report(cfg, **stats), step=step,
                                      loss=_curve_loss(examples)))
    return p.decide(), step, examples


@pytest.mark.parametrize("realized", ["flat", "as_predicted"])
def test_a_batch_move_that_realizes_less_progress_than_predicted_is_backed_off(realized):
    """After a batch increase the policy compares the loss reported per example with what the
    predicted efficiency promised (the curve before the move, examples there worth E(new) /
    E(old) each): a move that falls short is reverted and the batch held below it; one that
    delivers is kept and the batch grows on."""
    stats = {"grad_sqr": 1.0, "grad_var": 1000.0, "target": 1e7}     # B_noise 128,000
    p = Policy(BOUNDS, resize_cost_s=1e9)                           # batch-only decisions
    cur = Config(4, 32, 0)
    d, step, examples = _run_to_a_batch_move(p, cur, **stats)
    assert d.changes_batch and 128 < d.config.global_batch <= 4 * 128, d.reason
    moved = d.config
    last = _curve_loss(examples)
    for i in range(p.check_reports):
        step += 10
        examples += 10 * moved.global_batch
        loss = last if realized == "flat" else _curve_loss(examples)
        p.observe(dataclasses_replace(report(moved, **stats), step=step, loss=loss))
        d = p.decide()
        if i < p.check_reports - 1:      # held where it is while the move is checked
            assert d.config.global_batch == moved.global_batch, d.reason
    if realized == "flat":
        assert "back off" in d.reason and f"batch 128 -> {moved.global_batch}" in d.reason
        assert d.config.global_batch <= 128, d.reason
        # Held below the backed-off batch for the next decisions.
        p.observe(dataclasses_replace(report(d.config, **stats), step=step + 10, loss=last))
        assert p.decide().config.global_batch <= 128
    else:
        assert "back off" not in d.reason
        assert d.config.global_batch > moved.global_batch, d.reason


def test_wild_early_estimates_never_move_the_batch_more_than_the_bounded_factor():
    """Noise scales of millions in the first reports (as Adam's preconditioned estimate gave
    a char model) move the batch by at most batch_growth_max per decision, never to the cap."""
    p = Policy(BOUNDS, resize_cost_s=1e9)
    cfg = Config(4, 32, 0)
    for var in (1e5, 3e4, 2e5, 1e5):                  # B_noise 4-25 million examples
        p.observe(report(cfg, grad_sqr=1.0, grad_var=var, target=1e7))
        d = p.decide()
        assert d.config.global_batch <= p.batch_growth_max * cfg.global_batch, d.reason
        cfg = d.config
    assert cfg.global_batch < BOUNDS.max_batch


def test_a_script_that_reports_no_loss_runs_on_the_conservative_policy_and_is_told_so():
    p = Policy(BOUNDS, resize_cost_s=1e9)
    cfg = Config(4, 32, 0)
    p.observe(report(cfg, grad_sqr=1.0, grad_var=1000.0, target=1e7))    # loss NaN
    d = p.decide()
    assert "no loss reported: batch moves are bounded, not checked" in d.reason
    assert d.changes_batch and d.config.global_batch <= 4 * 128


def test_the_progress_check_reads_a_realized_ratio_off_the_loss_curve():
    from adaptrun.science.progress_check import BatchMove, fit_log_curve, realized_ratio
    before = [(x, _curve_loss(x)) for x in (1e3, 2e3, 4e3, 8e3)]
    curve = fit_log_curve(before)
    a, b = curve.a, curve.b
    assert b == pytest.approx(-0.4) and a == pytest.approx(5.0) and curve.sigma < 1e-9
    assert fit_log_curve([(x, 1.5) for x in (1e3, 2e3, 4e3)]) is None    # flat: nothing to check
    move = BatchMove(8e3, 128, 512, 0.9, a, b)
    # After the move each example is worth half an example before it.
    after = [(8e3 + dx, _curve_loss(8e3 + 0.5 * dx)) for dx in (2e3, 4e3, 8e3)]
    assert realized_ratio(move, after) == pytest.approx(0.5, rel=0.02)
    assert math.isnan(realized_ratio(move, after[:1]))


@pytest.mark.parametrize("realized", ["as_before", "half"])
def test_a_probe_of_a_larger_batch_is_kept_only_when_the_loss_shows_it_costs_no_progress(realized):
    """Where the noise scale sees no gain in a larger batch but the loss keeps falling, a
    policy with probes on (probe_keep > 0) tries one 1.5-2x larger and keeps it only if the loss realizes probe_keep (1.0) of
    the progress per example it had: kept, the batch never goes back below it on the noise
    scale's word; short, it is backed off and capped."""
    stats = {"grad_sqr": 1.0, "grad_var": 0.05, "target": 1e7}      # B_noise 6.4: no gain
    p = Policy(BOUNDS, resize_cost_s=1e9, probe_keep=1.0)          # probes are opt-in
    cur = Config(4, 32, 0)
    d, step, examples = _run_to_a_batch_move(p, cur, **stats)
    assert d.reason.startswith("probe: batch 128 -> "), d.reason
    moved = d.config
    assert 1.5 * 128 <= moved.global_batch <= 2 * 128
    # Decided, not yet applied: the next decision neither probes again nor moves the batch.
    assert p.decide().config.global_batch == 128
    start = examples
    for i in range(p.check_reports):
        step += 10
        examples += 10 * moved.global_batch
        worth = 1.0 if realized == "as_before" else 0.5
        p.observe(dataclasses_replace(report(moved, **stats), step=step,
                                      loss=_curve_loss(start + worth * (examples - start))))
        d = p.decide()
        if i < p.check_reports - 1:
            # The noise scale (6.4) would take the batch straight back to 128; the probe is
            # held until its check is done.
            assert d.config.global_batch == moved.global_batch, d.reason
    if realized == "as_before":
        assert "back off" not in d.reason and d.config.global_batch >= moved.global_batch, \
            d.reason
    else:
        assert "back off" in d.reason and "the probe needed 1.00" in d.reason, d.reason
        assert d.config.global_batch <= 128


@pytest.mark.parametrize("sigma", [0.01, 0.03])
def test_the_realized_range_covers_the_truth_and_backs_off_only_a_clear_shortfall(sigma):
    """Reports scattered about the loss curve (sigma per report): the range of the realized
    efficiency ratio holds the true one about as often as one standard error says (68 %),
    a move that delivered what was predicted is never backed off on the scatter, and one
    that realized 0.3 of it is backed off nearly always."""
    from adaptrun.science.progress_check import BatchMove, fit_log_curve, realized_interval
    rng = np.random.default_rng(0)
    xs = [1280.0 * (i + 1) for i in range(8)]
    for true, backoff_share in ((1.0, (0.0, 0.02)), (0.3, (0.9, 1.0))):
        covered = backed_off = 0
        for _ in range(200):
            curve = fit_log_curve([(x, _curve_loss(x) + rng.normal(0, sigma)) for x in xs])
            x0 = xs[-1]
            move = BatchMove(x0, 128, 512, 0.9, curve.a, curve.b, False, 0.75 * 0.9,
                             curve.sigma, curve.lx_mean, curve.sxx, curve.points)
            after = [(x0 + 5120.0 * j, _curve_loss(x0 + true * 5120.0 * j)
                      + rng.normal(0, sigma)) for j in range(1, 7)]
            lo, best, hi = realized_interval(move, after)
            assert lo <= best <= hi
            covered += lo <= true <= hi
            backed_off += hi < move.keep_at
        assert 0.55 <= covered / 200 <= 0.92, covered
        assert backoff_share[0] <= backed_off / 200 <= backoff_share[1], backed_off


def test_a_move_being_checked_survives_a_controller_restart():
    """The check in progress (its curve, scatter and what it must realize) and a probe's
    pending batch round-trip through the policy's JSON state: the restarted controller
    judges the move as the old one would."""
    import json
    stats = {"grad_sqr": 1.0, "grad_var": 1000.0, "target": 1e7}
    p = Policy(BOUNDS, resize_cost_s=1e9)
    d, step, examples = _run_to_a_batch_move(p, Config(4, 32, 0), **stats)
    p.observe(dataclasses_replace(report(d.config, **stats), step=step + 10,
                                  loss=_curve_loss(examples) + 0.001))
    assert p._check is not None
    q = Policy(BOUNDS, resize_cost_s=1e9).load_state_dict(
        json.loads(json.dumps(p.state_dict(), allow_nan=False)))
    assert q._check == p._check and q._moves == p._moves
    assert q.state_dict() == p.state_dict()


def test_probes_are_off_by_default():
    """Without probe_keep a policy whose noise scale sees no gain keeps its batch, however
    the loss falls: a probe is a move nothing measured predicts."""
    stats = {"grad_sqr": 1.0, "grad_var": 0.05, "target": 1e7}
    d, _, _ = _run_to_a_batch_move(Policy(BOUNDS, resize_cost_s=1e9), Config(4, 32, 0), **stats)
    assert d.config.global_batch == 128 and not d.reason.startswith("probe"), d.reason
