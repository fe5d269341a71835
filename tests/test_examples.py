"""Each example in examples/ runs alone (a world of one) with small flags and prints its
``final <metric> <value>`` line; the numbers it prints are checked where they mean something."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from workers import harness

EXAMPLES = harness.REPO / "examples"


def _run(script: str, *flags: str, timeout_s: float = 60) -> dict[str, float]:
    """Run ``examples/<script>`` alone; return its ``final`` metric and ``steps``."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *flags],
                          capture_output=True, text=True, timeout=timeout_s,
                          env=harness.base_env(), cwd=str(harness.REPO))
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    out = {}
    for line in proc.stdout.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "final":
            out["metric_name"], out["metric"] = words[1], float(words[2])
        elif len(words) == 2 and words[0] == "steps":
            out["steps"] = int(words[1])
    assert "metric" in out and "steps" in out, f"no final/steps lines:\n{proc.stdout}"
    return out


@pytest.mark.timeout(60)
def test_digits_cnn_with_ghost_batch_norm_learns():
    r = _run("digits_cnn.py", "--epochs", "2", "--ghost-batch", "8")
    assert r["metric_name"] == "val_acc"
    assert r["metric"] > 0.8, r                   # chance is 0.1
    assert r["steps"] == 2 * math.ceil(1438 / 32)


@pytest.mark.timeout(60)
def test_char_lm_beats_a_unigram_model():
    r = _run("char_lm.py", "--epochs", "1", "--corpus-kb", "40")
    assert r["metric_name"] == "val_bpc"
    assert r["metric"] < 4.5, r                   # uniform is log2(96) = 6.6 bits
    assert r["steps"] > 0


@pytest.mark.timeout(60)
def test_linear_regression_noise_scale_within_15_percent():
    r = _run("linear_regression.py", "--samples", "20000")
    assert r["metric_name"] == "gns_rel_err"
    assert r["metric"] < 0.15, r


@pytest.mark.timeout(60)
def test_plain_ddp_runs_alone():
    r = _run("plain_ddp.py", "--epochs", "2", "--samples", "2000")
    assert r["metric_name"] == "train_loss"
    assert r["metric"] < math.log(4), r           # below a uniform guess over 4 classes
    assert r["steps"] == 2 * math.ceil(2000 / 64)


def test_linear_regression_truth_matches_monte_carlo():
    """The closed form B_noise = ((n+1)|d|^2 + n sigma^2) / |d|^2 against per-example
    gradients x (x.d - sigma eps) drawn independently."""
    spec = importlib.util.spec_from_file_location("linear_regression",
                                                  EXAMPLES / "linear_regression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(0)
    for n, distance, sigma in [(10, 1.0, 1.0), (5, 0.3, 2.0)]:
        d = torch.randn(n, generator=g, dtype=torch.float64)
        d *= distance / d.norm()
        x = torch.randn(200_000, n, generator=g, dtype=torch.float64)
        eps = torch.randn(200_000, generator=g, dtype=torch.float64)
        grads = x * (x @ d - sigma * eps)[:, None]
        mean = grads.mean(0)
        trace_sigma = (grads - mean).pow(2).sum(1).mean()
        assert float((mean - d).norm() / d.norm()) < 0.05
        empirical = float(trace_sigma / d.pow(2).sum())
        assert module.true_noise_scale(d, sigma) == pytest.approx(empirical, rel=0.02)


def _run_lm(*flags: str, timeout_s: float = 40) -> dict[str, float]:
    """Run examples/transformer_lm.py alone; return val_bpc, steps and final_lr_frac."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "transformer_lm.py"), *flags],
                          capture_output=True, text=True, timeout=timeout_s,
                          env=harness.base_env(), cwd=str(harness.REPO))
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "overridden" not in proc.stderr, proc.stderr     # torch sees step() intact
    out = {}
    for line in proc.stdout.splitlines():
        words = line.split()
        if len(words) == 3 and words[:2] == ["final", "val_bpc"]:
            out["val_bpc"] = float(words[2])
        elif len(words) == 2 and words[0] in ("steps", "final_lr_frac"):
            out[words[0]] = float(words[1])
    assert out.keys() == {"val_bpc", "steps", "final_lr_frac"}, proc.stdout
    return out


@pytest.mark.timeout(60)
def test_transformer_lm_learns_and_its_progress_schedule_decays_to_its_end():
    r = _run_lm("--epochs", "2", "--corpus-kb", "60", "--warmup-steps", "10")
    assert r["val_bpc"] < 4.5, r                  # uniform is log2(96) = 6.6 bits
    assert abs(r["final_lr_frac"] - 0.1) < 0.02, r
    assert r["steps"] == 2 * math.ceil(863 / 32)  # 863 training windows of 65 chars
