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
    env = harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / "snap")
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
          f"error {100 * err:.2f}% ({time.monotonic() - t0:.1f}s)")
    assert result["step"] == steps
    assert err < 0.10
