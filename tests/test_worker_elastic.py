"""The worker library under real launchers: alone, fixed-size torchrun, elastic torchrun.

Every run trains tests/workers/lsq_worker.py, whose model carries a ``counts`` buffer
[epochs, samples]: each committed step adds (all-gathered over ranks) how often it used each
dataset index. The buffer is part of the model, so it is saved and restored with the
snapshot: a run is exactly-once when every entry of the final buffer is 1.
gloo on 127.0.0.1; every process group is killed in ``finally``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest

from adaptrun.worker.parallel import REPORT_MIN_GNS_UPDATES
from workers import harness

TUNED_RDZV = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60"


def _result(out) -> dict:
    return json.loads((out / "result.json").read_text())


def _assert_exactly_once(out, epochs: int, samples: int) -> dict:
    result = _result(out)
    counts = np.array(result["counts"])
    assert counts.shape == (epochs, samples)
    lost, twice = np.argwhere(counts == 0), np.argwhere(counts > 1)
    assert len(lost) == 0 and len(twice) == 0, (
        f"{len(lost)} (epoch, index) pairs never used, e.g. {lost[:3].tolist()}; "
        f"{len(twice)} used more than once, e.g. {twice[:3].tolist()}")
    return result


def _losses(rows, rank=0):
    return [r["loss"] for r in rows if r.get("event") == "step" and r["rank"] == rank]


@pytest.mark.timeout(120)
def test_same_script_alone_and_under_fixed_torchrun(tmp_path):
    args = ["--samples", "1000", "--batch", "40", "--epochs", "2"]
    alone = tmp_path / "alone"
    alone.mkdir()
    reports = tmp_path / "reports.jsonl"
    out = subprocess.run([sys.executable, str(harness.WORKER), *args, "--out", str(alone)],
                         env=harness.base_env(ADAPTRUN_REPORT_FILE=reports,
                                              ADAPTRUN_GNS_EVERY=4), cwd=harness.REPO,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    res = _assert_exactly_once(alone, 2, 1000)
    assert res["world"] == 1 and res["step"] == 2 * 25
    losses = _losses(harness.read_steps(alone))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])   # floor: sigma^2/2 = 0.5
    # rank 0 reports every 5 steps to the JSON-lines sink, with the fields the policy reads
    lines = [json.loads(x) for x in reports.read_text().splitlines()]
    # ... and once more when the last epoch is done, saying so (and its own limits)
    assert [r["step"] for r in lines] == list(range(5, 51, 5)) + [50]
    assert [r["finished"] for r in lines] == [False] * 10 + [True]
    assert (lines[0]["init_batch"], lines[0]["max_batch"], lines[0]["accumulation"]) == (
        40, 1000, True)
    assert {"progress", "world_size", "local_batch", "accum_steps", "step_time_s",
            "sync_time_s", "grad_sqr", "grad_var", "loss", "lr"} <= set(lines[0])
    # alone with accumulation allowed: two micro-batches of 20, so the noise is measured
    assert (lines[-1]["world_size"], lines[-1]["local_batch"], lines[-1]["accum_steps"]) == (1, 20, 1)
    assert lines[-1]["grad_sqr"] > 0 and lines[-1]["grad_var"] > 0
    # ... from the report whose average holds 5 estimates on (steps 1, 5, ..., 17 measured):
    # before, the report says "no estimate yet" rather than one from a couple of estimates
    assert REPORT_MIN_GNS_UPDATES == 5
    assert [r["grad_sqr"] > 0 for r in lines] == [False] * 3 + [True] * 8, lines

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    proc = harness.start(harness.torchrun("1", 2, harness.free_port(), "fixed", [*args, "--out", str(fixed)]),
                         harness.base_env(ADAPTRUN_SNAPSHOT_DIR=fixed / "snap"), fixed / "log")
    try:
        assert proc.wait(timeout=90) == 0, harness.tail(fixed / "log")
    finally:
        harness.stop(proc)
    res = _assert_exactly_once(fixed, 2, 1000)
    assert res["world"] == 2 and res["step"] == 2 * 25


@pytest.mark.timeout(120)
def test_directive_is_applied_at_the_same_step_on_every_rank(tmp_path):
    """A new global batch written to the job's store (as the agent does) takes effect at one
    step boundary on both ranks; LinearScale ramps the LR from the old factor (1) to the new
    (batch x4) over its warmup; the loss keeps falling."""
    import torch.distributed as dist

    from adaptrun.worker.directive import Directive, read_applied, write_directive

    warmup = 10
    args = ["--samples", "20000", "--batch", "32", "--epochs", "1", "--lr", "0.02",
            "--warmup", str(warmup), "--max-steps", "120", "--step-sleep", "0.01",
            "--out", str(tmp_path)]
    proc = harness.start(harness.torchrun("1", 2, harness.free_port(), "directive", args),
                         harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / "snap"),
                         tmp_path / "log")
    try:
        harness.wait_steps(tmp_path, lambda r: r["rank"] == 0, 20, 60, [proc])
        start = next(r for r in harness.read_steps(tmp_path) if r["event"] == "start")
        host, port = start["master"].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=20))
        write_directive(store, Directive(generation=1, global_batch=128, accum_steps=1,
                                         reason="test: batch x4"))
        deadline = time.monotonic() + 30
        while (applied := read_applied(store)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        del store                # rank 0 hosts it; let go before the job ends
        assert proc.wait(timeout=90) == 0, harness.tail(tmp_path / "log")
    finally:
        harness.stop(proc)
    rows = [r for r in harness.read_steps(tmp_path) if r["event"] == "step"]
    first = {rank: min(r["step"] for r in rows if r["rank"] == rank and r["generation"] == 1)
             for rank in (0, 1)}
    assert first[0] == first[1], f"ranks applied the directive at different steps: {first}"
    s = first[0]
    assert applied == {"generation": 1, "step": s - 1}   # the boundary after step s-1
    by_step = {r["step"]: r for r in rows if r["rank"] == 0}
    assert by_step[s - 1]["global_batch"] == 32 and by_step[s]["global_batch"] == 128
    assert by_step[s]["accum"] == 1
    for rank in (0, 1):   # every rank saw the same batch at every step
        mine = {r["step"]: r["global_batch"] for r in rows if r["rank"] == rank}
        assert all(mine[k] == by_step[k]["global_batch"] for k in mine)
    # Linear scaling with warmup: the factor ramps from 1 to 4 in `warmup` equal steps.
    ramp = [by_step[s + i]["lr_factor"] for i in range(warmup + 2)]
    assert ramp[0] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(ramp[:warmup], ramp[1:warmup + 1]))
    assert ramp[warmup] == pytest.approx(4.0) and ramp[warmup + 1] == pytest.approx(4.0)
    assert ramp[1] - ramp[0] == pytest.approx(3.0 / warmup, rel=1e-6)
    losses = [by_step[k]["loss"] for k in sorted(by_step)]
    before, after = np.mean(losses[s - 10:s]), np.mean(losses[-10:])
    assert after < 0.8 * before, f"loss {before:.3f} before the directive, {after:.3f} at the end"


@pytest.mark.timeout(180)
def test_grow_1_2_3_and_shrink_back_exactly_once(tmp_path):
    """torchrun --nnodes=1:3, one torchrun per 'node'. Workers save at an agreed step when
    torchrun stops them and continue from the sampler cursor in the new world."""
    samples, epochs = 4000, 2
    pace = tmp_path / "pace"
    pace.write_text("0.04")
    args = ["--samples", str(samples), "--batch", "24", "--epochs", str(epochs),
            "--pace-file", str(pace), "--out", str(tmp_path)]
    port = harness.free_port()
    procs: list[subprocess.Popen] = []

    def node(i: int) -> subprocess.Popen:
        cmd = harness.torchrun("1:3", 1, port, "grow", args, rdzv_conf=TUNED_RDZV, max_restarts=5)
        env = harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / f"snap{i}",
                               TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, ADAPTRUN_SNAPSHOT_EVERY=20)
        return harness.start(cmd, env, tmp_path / f"node{i}.log")

    def at_world(w: int, after_t: float):
        return lambda r: r["world"] == w and r["rank"] == 0 and r["t"] >= after_t

    try:
        procs.append(node(0))
        harness.wait_steps(tmp_path, at_world(1, 0), 10, 60, procs)
        procs.append(node(1))
        harness.wait_steps(tmp_path, at_world(2, 0), 10, 60, procs)
        procs.append(node(2))
        harness.wait_steps(tmp_path, at_world(3, 0), 10, 60, procs)
        t_down = time.time()
        os.killpg(procs[2].pid, signal.SIGTERM)
        procs[2].wait(timeout=30)
        harness.wait_steps(tmp_path, at_world(2, t_down), 10, 60, procs[:2])
        t_down2 = time.time()
        os.killpg(procs[1].pid, signal.SIGTERM)
        procs[1].wait(timeout=30)
        harness.wait_steps(tmp_path, at_world(1, t_down2), 5, 60, procs[:1])
        pace.write_text("0")          # the rest of the job at full speed
        assert procs[0].wait(timeout=90) == 0, harness.tail(tmp_path / "node0.log")
    finally:
        for p in procs:
            harness.stop(p)
    rows = harness.read_steps(tmp_path)
    worlds = [r["world"] for r in sorted((r for r in rows if r["event"] == "step" and r["rank"] == 0),
                                         key=lambda r: r["t"])]
    sequence = [w for i, w in enumerate(worlds) if i == 0 or worlds[i - 1] != w]
    assert sequence == [1, 2, 3, 2, 1], sequence
    restarts = [r for r in rows if r["event"] == "start" and r["restored"] is not None]
    assert restarts and all(r["restored"] > 0 for r in restarts)
    _assert_exactly_once(tmp_path, epochs, samples)
    print(f"\ntorchrun (tuned) gaps: up 1->2 {harness.gap_s(rows, 1, 2):.1f}s, "
          f"2->3 {harness.gap_s(rows, 2, 3):.1f}s, down 3->2 {harness.gap_s(rows, 3, 2):.1f}s, "
          f"2->1 {harness.gap_s(rows, 2, 1):.1f}s")


@pytest.mark.timeout(150)
def test_sigkill_mid_epoch_restores_from_snapshot_under_plain_torchrun(tmp_path):
    """torchrun as shipped (workers share the agent's store), two nodes of one worker each:
    a worker killed with SIGKILL; both agents restart their workers (with restart counts
    that may differ), which build their group in a fresh store namespace, restore the newest
    periodic snapshot and continue from its cursor; nothing is lost or counted twice."""
    samples, epochs = 3000, 2
    args = ["--samples", str(samples), "--batch", "32", "--epochs", str(epochs),
            "--step-sleep", "0.02", "--out", str(tmp_path)]
    port = harness.free_port()
    procs = [harness.start(harness.torchrun("2", 1, port, "kill", args, max_restarts=2),
                           harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / f"snap{i}",
                                            ADAPTRUN_SNAPSHOT_EVERY=10),
                           tmp_path / f"node{i}.log") for i in range(2)]
    try:
        harness.wait_steps(tmp_path, lambda r: r["rank"] == 1, 35, 60, procs)
        pid = next(int(f.stem.split("-")[1]) for f in tmp_path.glob("steps-*.jsonl")
                   if '"rank": 1' in f.read_text())
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        codes = [p.wait(timeout=100) for p in procs]
        assert codes == [0, 0], harness.tail(tmp_path / "node0.log") + harness.tail(
            tmp_path / "node1.log")
    finally:
        for p in procs:
            harness.stop(p)
    rows = harness.read_steps(tmp_path)
    killed_at = max(r["step"] for r in rows if r["event"] == "step" and r["t"] < t_kill)
    restarts = [r for r in rows if r["event"] == "start" and r["t"] > t_kill]
    assert len(restarts) == 2
    for r in restarts:   # continued from the snapshot, not from the start
        assert r["restored"] is not None and 0 < r["restored"] <= killed_at
        assert killed_at - r["restored"] <= 10 + 1
    result = _assert_exactly_once(tmp_path, epochs, samples)
    assert result["step"] == epochs * -(-samples // 32)
    first_after = min(r["t"] for r in rows if r["event"] == "step" and r["t"] > t_kill)
    print(f"\nSIGKILL: killed after step {killed_at}, restored step {restarts[0]['restored']}, "
          f"gap {first_after - t_kill:.1f}s")
