"""GNS in real 2- and 4-process runs (torchrun, gloo, 127.0.0.1) against analytic truth.

Least squares, x ~ N(0, I_n), y = x.w* + noise(sigma), frozen LR at w = w* + d:
B_noise = (n + 1) + n sigma^2 / |d|^2 examples (per-example loss 0.5 (x.w - y)^2).
"""
from __future__ import annotations

import json
import time

import pytest

from workers import harness

DIM, SIGMA = 8, 1.0
TRUTH = (DIM + 1) + DIM * SIGMA ** 2 / 1.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nproc,accum,steps", [(2, 0, 500), (4, 0, 300), (1, 3, 400)])
def test_noise_scale_matches_analytic_truth(tmp_path, nproc, accum, steps):
    """(1, 3): one replica, four micro-batches per step: the micro-batch gradients are the
    small-batch estimate."""
    port = harness.free_port()
    args = ["--mode", "gns", "--lr", "0", "--rule", "none", "--dim", str(DIM),
            "--sigma", str(SIGMA), "--samples", "100000",
            "--batch", str(16 * nproc * (accum + 1)), "--accum", str(accum),
            "--epochs", "1", "--max-steps", str(steps), "--gns-decay", "0.995",
            "--out", str(tmp_path)]
    cmd = harness.torchrun("1", nproc, port, f"gns{nproc}", args)
    # The estimator's accuracy at a known number of samples: the cadence is pinned at its
    # most frequent (by default it follows the measured cost, which moves with the machine).
    env = harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / "snap", ADAPTRUN_GNS_EVERY=4)
    log = tmp_path / "torchrun.log"
    proc = harness.start(cmd, env, log)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=80)
        assert rc == 0, harness.tail(log)
    finally:
        harness.stop(proc)
    result = json.loads((tmp_path / "result.json").read_text())
    err = abs(result["noise_scale"] - TRUTH) / TRUTH
    print(f"\nGNS {nproc} procs x {accum + 1} micro-batches: measured "
          f"{result['noise_scale']:.3f} truth {TRUTH:.3f} "
          f"error {100 * err:.2f}% cadence {result['gns_every_steps']} ({time.monotonic() - t0:.1f}s)")
    assert result["step"] == steps
    assert err < 0.10


def test_the_measuring_cadence_keeps_measuring_within_its_budget():
    from adaptrun.worker.parallel import measuring_cadence
    # Cheap statistics (an SGD step's two dot products): every 4th step, the most often.
    assert measuring_cadence(0.001, 0.040) == 4
    # Adam's preconditioned norms at 12 ms on a 45 ms step: 2% of the step needs 14 steps.
    assert measuring_cadence(0.012, 0.045) == 14
    assert 0.012 / (measuring_cadence(0.012, 0.045) * 0.045) <= 0.02
    # Never rarer than every 64th step, whatever it costs; no step time known: the rarest.
    assert measuring_cadence(10.0, 0.010) == 64
    assert measuring_cadence(0.001, 0.0) == 64
    # A millisecond step of Python (examples/linear_regression.py: 0.15 ms measuring on a 1 ms
    # step, 15 %): 0.25 ms per step is affordable, so it keeps every 4th step and its samples,
    # also when a loaded machine doubles both times.
    assert measuring_cadence(0.15e-3, 1.0e-3) == 4
    assert measuring_cadence(0.30e-3, 2.0e-3) == 4
    assert measuring_cadence(2.0e-3, 2.0e-3) == 8


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nproc,accum", [(2, 0), (1, 1)])
def test_under_a_grad_scaler_the_statistics_are_of_the_unscaled_gradient(tmp_path, nproc, accum):
    """torch.amp.GradScaler at 2^16 on two ranks, or one rank with two micro-batches a step
    (the scaler's step and update, called after every micro-batch as the loop is written, act
    only on the step's last): the gradients the hooks see are 65,536 times
    the true ones. |G|^2 (truth |d|^2 = 1) and the noise scale still match the analytic truth,
    and the step the scaler skips (rank 0's loss is inf at step 100) trains nothing and folds
    nothing into the averages."""
    port = harness.free_port()
    steps = 500
    args = ["--mode", "gns", "--lr", "0", "--rule", "none", "--dim", str(DIM),
            "--sigma", str(SIGMA), "--samples", "100000", "--batch", "32", "--epochs", "1",
            "--max-steps", str(steps), "--gns-decay", "0.995", "--grad-scaler", "65536",
            "--inf-at-step", "100", "--accum", str(accum), "--out", str(tmp_path)]
    env = harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / "snap", ADAPTRUN_GNS_EVERY=4)
    log = tmp_path / "torchrun.log"
    proc = harness.start(harness.torchrun("1", nproc, port, "gns-scaler", args), env, log)
    try:
        assert proc.wait(timeout=80) == 0, harness.tail(log)
    finally:
        harness.stop(proc)
    result = json.loads((tmp_path / "result.json").read_text())
    assert abs(result["noise_scale"] - TRUTH) / TRUTH < 0.10, result["noise_scale"]
    assert abs(result["grad_sqr"] - 1.0) < 0.15, result["grad_sqr"]
    assert result["gns_updates"] == steps // 4 - 1          # every measured step but the skipped
    rows = [r for r in harness.read_steps(tmp_path) if r.get("event") == "step" and r["rank"] == 0]
    assert rows[-1]["examples"] == (steps - 1) * 32          # the skipped step trained nothing
    assert {r["loss_scale"] for r in rows} == {65536.0, 32768.0}   # halved once, at the skip
