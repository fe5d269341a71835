"""A user's LR schedule on progress: a cosine built for the run at B0 ends at its final LR
when the epochs end, although the batch grew 8x (``adaptrun.scaling.ProgressSchedule``); the
same cosine on optimizer steps stops far above it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from workers import harness


def _run(by: str, length: str = "epochs") -> dict:
    proc = subprocess.run([sys.executable, str(harness.REPO / "tests" / "workers" /
                                               "schedule_worker.py"), "--by", by,
                           "--length", length],
                          capture_output=True, text=True, timeout=60, env=harness.base_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {w[0]: float(w[1]) for w in (line.split() for line in proc.stdout.splitlines())
            if len(w) == 2}


@pytest.mark.timeout(120)
def test_a_cosine_on_progress_reaches_its_final_lr_when_the_epochs_end_under_batch_growth():
    on_examples, on_steps = _run("examples"), _run("steps")
    for r in (on_examples, on_steps):
        assert r["final_batch"] == 256, r                  # the batch grew 8x early
        assert r["steps"] < 0.25 * 2 * 4096 / 32, r       # so far fewer steps than at B0
    assert on_examples["lr_frac"] == pytest.approx(0.1, abs=0.02), on_examples
    assert on_steps["lr_frac"] > 0.5, on_steps             # keyed to steps: far from its end


@pytest.mark.timeout(120)
def test_a_run_by_progress_lasts_the_progress_of_its_epochs_at_b0():
    """remaining_epochs(2, by="progress") with the batch grown 8x: the run goes on past its 2
    epochs until its progress is that of 2 epochs at B0, and stops at the first epoch that
    gets there; a cosine on progress ends at its final LR with it."""
    r = _run("progress", "progress")
    assert r["final_batch"] == 256, r
    assert r["epochs"] > 2, r                               # the bigger batch took more epochs
    assert r["progress"] >= r["target"] > r["before_last"], r
    assert r["lr_frac"] == pytest.approx(0.1, abs=0.02), r
    by_epochs = _run("progress")
    assert by_epochs["epochs"] == 2 and by_epochs["progress"] < by_epochs["target"], by_epochs
    with pytest.raises(ValueError, match="choose one of"):
        from adaptrun.worker.epochs import remaining_epochs
        next(remaining_epochs(2, by="steps"))


def test_progress_schedule_steps_the_wrapped_scheduler_to_whole_b0_steps_only():
    from adaptrun.science.scaling import ProgressSchedule

    class Counter:
        def __init__(self):
            self.n = 0

        def step(self):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, d):
            self.n = d["n"]

    c = Counter()
    s = ProgressSchedule(c)
    assert s.advance_to(7.5) == 7 and c.n == 7
    assert s.advance_to(3.0) == 0 and c.n == 7          # never back
    assert s.advance_to(8.0) == 1 and c.n == 8
    restored = ProgressSchedule(Counter())
    restored.load_state_dict(s.state_dict())
    assert restored.count == 8 and restored.scheduler.n == 8
    with pytest.raises(ValueError, match="choose one of"):
        ProgressSchedule(c, by="steps")
