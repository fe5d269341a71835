"""Resizes with real-sized state, end to end: `adaptrun run` and `adaptrun scale` 1 -> 2 -> 1.

The worker (tests/workers/big_worker.py) is an MLP of 40 M parameters under Adam: about
480 MB of parameters and Adam moments per rank, a step of about a second on these machines,
a fixed batch (the script calls no ``autoscale_batch_size``), one rank alone so no noise scale
is measured. What a user must see: the new world forms on the first directive, the global step
never repeats, each resize's measured gap is printed, the batch the script fixed never
changes, and no decision rests on the noise scale it never measured.
"""
from __future__ import annotations

import re

import subprocess
import sys
import time

import pytest

from workers import harness

BIG = harness.REPO / "tests" / "workers" / "big_worker.py"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptrun.cli", *args], capture_output=True,
                          text=True, timeout=30, env=harness.base_env(), cwd=harness.REPO)


@pytest.mark.timeout(300)
def test_big_state_resizes_one_two_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    port = harness.free_port()
    cmd = harness.adaptrun_run("big", port, tmp_path, [
        str(BIG), "--params", "40e6", "--samples", "224", "--batch", "8", "--out", str(out)])
    proc = harness.start(cmd, harness.base_env(), tmp_path / "run.log")
    ctl = f"127.0.0.1:{port}"
    try:
        harness.wait_steps(out, lambda r: r["world"] == 1, 4, 120, [proc])
        t_up = time.time()
        assert _cli("scale", "big", "--min-workers", "2", "--max-workers", "2",
                    "--controller", ctl).returncode == 0
        harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t_up, 3, 120, [proc])
        t_down = time.time()
        assert _cli("scale", "big", "--min-workers", "1", "--max-workers", "1",
                    "--controller", ctl).returncode == 0
        harness.wait_steps(out, lambda r: r["world"] == 1 and r["t"] > t_down, 2, 120, [proc])
        assert proc.wait(timeout=150) == 0, harness.tail(tmp_path / "run.log")
    finally:
        harness.stop(proc)
    log = harness.tail(tmp_path / "run.log", 50000)
    agents = "".join(harness.tail(p, 100000) for p in (tmp_path / "logs").glob("agent-*.log"))
    rows = sorted((r for r in harness.read_steps(out) if r["event"] == "step" and r["rank"] == 0),
                  key=lambda r: r["t"])
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1)), "a global step repeated or was skipped"
    assert {r["global_batch"] for r in rows} == {8}, "the script's fixed batch changed"
    # The new world formed on the first directive of each resize.
    assert "joining job big at directive 1" in agents
    assert "new node(s) arrived within" not in agents
    decisions = [line for line in log.splitlines() if "] decision " in line]
    assert re.search(r"decision 1( \(decided at [\d.]+s\))?: workers 1 -> 2", decisions[0]), \
        decisions
    assert any("workers 2 -> 1" in d for d in decisions), decisions
    assert all("batch 8 ->" not in d for d in decisions), decisions
    assert any("no noise-scale estimate yet" in d for d in decisions), decisions
    # Each resize's measured gap is printed.
    gaps = [line for line in log.splitlines() if "re-form to" in line and "took" in line]
    assert any("re-form to 2 workers" in g for g in gaps) and any(
        "re-form to 1 workers" in g for g in gaps), log[-3000:]
    print("\n" + "\n".join(gaps))
    print(f"wall gaps from the step log: up {harness.gap_s(rows, 1, 2):.2f} s, "
          f"down {harness.gap_s(rows, 2, 1):.2f} s")
