"""The node agent end to end: a real controller on 127.0.0.1, real ``adaptrun agent``
processes, torch elastic's rendezvous, the least-squares worker (tests/workers/lsq_worker.py).

Every agent runs in its own session and is killed by process group in ``finally``; the
rendezvous store is a TCPStore this test process hosts (as ``adaptrun run``'s embedded
controller would), except where a test shows an agent hosting it.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.actuators.local import LocalActuator
from adaptrun.controller.server import Controller
from controller_support import channel_to
from workers import harness

pytestmark = pytest.mark.timeout(150)

LSQ = str(harness.WORKER)


@contextlib.contextmanager
def rdzv_store():
    port = harness.free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=30),
                          wait_for_workers=False)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        del store


@contextlib.contextmanager
def controller(actuator=None):
    cfg = ControllerConfig(policy_interval_s=0.5, tick_s=0.05, metrics_port=None)
    ctl = Controller(cfg, actuator=actuator if actuator is not None else LocalActuator()).start()
    try:
        yield ctl
    finally:
        ctl.stop(grace_s=0.2)


def agent_argv(job, node, *, controller_addr=None, rdzv=None, nnodes="1", nproc=1,
               snapshot_dir=None, bounds=(1, 1), worker=(), extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "adaptrun.cli", "agent", "--job", job, "--node", node,
           "--nproc-per-node", str(nproc), "--nnodes", nnodes, "--local-addr", "127.0.0.1",
           "--max-restarts", "2", "--min-workers", str(bounds[0]),
           "--max-workers", str(bounds[1]), "--init-batch", "64",
           "--max-global-batch", "64", "--local-batch-min", "8", "--local-batch-max", "64"]
    if controller_addr:
        cmd += ["--controller", controller_addr]
    if rdzv:
        cmd += ["--rdzv-endpoint", rdzv]
    if snapshot_dir:
        cmd += ["--snapshot-dir", str(snapshot_dir)]
    return cmd + list(extra) + ["--", sys.executable, *worker]


def check_exactly_once(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    counts = result["counts"]
    bad = [(e, i, c) for e, row in enumerate(counts) for i, c in enumerate(row) if c != 1]
    assert not bad, f"samples not counted exactly once (epoch, index, count): {bad[:10]}"
    return result


def steps(out: Path) -> list[dict]:
    return sorted((r for r in harness.read_steps(out) if r.get("event") == "step"),
                  key=lambda r: r["t"])


def gap_s(rows: list[dict], old_world: int, new_world: int, after_t: float = 0.0) -> float:
    """Wall time from the last step of the old world to the first step of the new one."""
    first_new = next(r["t"] for r in rows if r["t"] > after_t and r["world"] == new_world)
    last_old = max(r["t"] for r in rows if r["t"] < first_new and r["world"] == old_world)
    return first_new - last_old


def wait_for(cond, timeout_s: float, what: str, logs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n" +
                         "\n".join(f"--- {p}\n{harness.tail(p)}" for p in logs))


def test_two_agents_train_to_the_end_exactly_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    worker = [LSQ, "--out", str(out), "--samples", "512", "--epochs", "2"]
    procs, logs = [], []
    with controller() as ctl, rdzv_store() as rdzv:
        try:
            for i in range(2):
                logs.append(tmp_path / f"agent{i}.log")
                procs.append(harness.start(agent_argv(
                    "two", f"n{i}", controller_addr=ctl.address, rdzv=rdzv, nnodes="2",
                    snapshot_dir=tmp_path / f"snap{i}", bounds=(2, 2), worker=worker),
                    harness.base_env(), logs[-1]))
            codes = harness.wait_all(procs, 120)
            assert codes == [0, 0], "\n".join(harness.tail(p) for p in logs)
            result = check_exactly_once(out)
            assert result["world"] == 2
            job = ctl.core.registry.job("two")
            assert job is not None and sorted(job.agents) == ["n0", "n1"]
            assert job.accepted > 0, "the agent relayed no report"
        finally:
            for p in procs:
                harness.stop(p)


def test_a_script_that_fails_after_training_is_not_trained_again(tmp_path):
    """The job finished its epochs (its snapshots cleared), then the script's own ending
    failed: the agent says so and exits 1 instead of restarting, which could only find no
    state and train from step 0."""
    out = tmp_path / "out"
    out.mkdir()
    worker = [LSQ, "--out", str(out), "--samples", "256", "--epochs", "1",
              "--exit-code-at-end", "3"]
    log = tmp_path / "agent.log"
    with controller() as ctl, rdzv_store() as rdzv:
        proc = harness.start(agent_argv("after", "n0", controller_addr=ctl.address, rdzv=rdzv,
                                        snapshot_dir=tmp_path / "snap", worker=worker),
                             harness.base_env(), log)
        try:
            codes = harness.wait_all([proc], 90)
        finally:
            harness.stop(proc)
    text = log.read_text(errors="replace")
    assert codes == [1], harness.tail(log)
    assert "after job after finished training (step 4)" in text, harness.tail(log)
    assert "MissingStateError" not in text and "restarting the workers" not in text, \
        harness.tail(log)
    starts = [r for r in harness.read_steps(out) if r.get("event") == "start"]
    assert len(starts) == 1, f"the script ran {len(starts)} times: {starts}"


def test_planned_scale_up_and_down_through_the_controller(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pace = tmp_path / "pace"
    pace.write_text("0.1")
    worker = [LSQ, "--out", str(out), "--samples", "2048", "--epochs", "8",
              "--pace-file", str(pace)]
    job = "resize"
    holder = {}

    def command(job_id, node):
        return agent_argv(job_id, node, controller_addr=holder["ctl"].address,
                          rdzv=holder["rdzv"], nnodes="1", bounds=(1, 1),
                          snapshot_dir=tmp_path / f"snap-{node}", worker=worker)

    actuator = LocalActuator(agent_command=command, log_dir=tmp_path,
                             env=harness.base_env(ADAPTRUN_SNAPSHOT_EVERY="20"))
    with rdzv_store() as rdzv, controller(actuator) as ctl:
        holder.update(ctl=ctl, rdzv=rdzv)
        logs = lambda: sorted(tmp_path.glob("agent-*.log"))  # noqa: E731
        try:
            actuator.set_workers(job, 1)
            wait_for(lambda: (j := ctl.core.registry.job(job)) is not None
                     and j.last_report is not None, 60, "a first report", logs())
            ctl.core.set_bounds(job, 2, 2)           # what `adaptrun scale` does
            wait_for(lambda: sum(r["world"] == 2 for r in steps(out)) >= 10, 90,
                     "10 steps in a world of 2", logs())
            t_up_done = steps(out)[-1]["t"]
            ctl.core.set_bounds(job, 1, 1)
            wait_for(lambda: any(r["world"] == 1 and r["t"] > t_up_done for r in steps(out)),
                     60, "a step in a world of 1 again", logs())
            pace.write_text("0")
            wait_for(lambda: all(p.poll() is not None for _, p in actuator.agents(job)), 90,
                     "the agents to finish", logs())
            codes = [p.returncode for _, p in actuator.agents(job)]
            assert codes == [0, 0], "\n".join(harness.tail(p) for p in logs())
            check_exactly_once(out)
            rows = steps(out)
            up = gap_s(rows, 1, 2)
            down = gap_s(rows, 2, 1, after_t=t_up_done)
            print(f"\nplanned re-form gaps: scale-up 1->2 {up:.2f} s, scale-down 2->1 "
                  f"{down:.2f} s")
            status = ctl.core.registry.job(job)
            assert status.resizes >= 2
        finally:
            actuator.close()


PLAIN_DDP = '''
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(20):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
w = model.module.weight.detach().clone()
gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, w)
assert all(torch.equal(g, w) for g in gathered), "replicas diverged"
if dist.get_rank() == 0:
    open(sys.argv[1], "w").write(str(dist.get_world_size()))
dist.destroy_process_group()
'''


def test_unmodified_ddp_script_runs_and_is_not_adaptive(tmp_path):
    script = tmp_path / "plain_ddp.py"
    script.write_text(PLAIN_DDP)
    done = tmp_path / "done"
    log = tmp_path / "agent.log"
    proc = None
    with controller() as ctl:
        try:
            # No --rdzv-endpoint: a one-node job whose agent hosts the rendezvous store.
            proc = harness.start(agent_argv("plain", "n0", controller_addr=ctl.address,
                                            nproc=2, bounds=(2, 2),
                                            worker=[str(script), str(done)]),
                                 harness.base_env(), log)
            assert harness.wait_all([proc], 120) == [0], harness.tail(log)
            assert done.read_text() == "2"
            with channel_to(ctl) as (_, stub):
                (status,) = stub.ListJobs(pb.ListJobsRequest(job_id="plain"), timeout=5).jobs
            assert not status.adaptive
            assert [a.node for a in status.agents] == ["n0"]
        finally:
            harness.stop(proc)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("standby_after_s, processes", [("0.5", 2), ("-1", 1)])
def test_a_warm_standby_worker_is_held_unless_turned_off(tmp_path, standby_after_s, processes):
    # --standby-after-s: a warm worker waits beside the running one for a failure restart
    # (two processes under the agent), or none does (a small node keeps its memory and CPU).
    out = tmp_path / "out"
    out.mkdir()
    pace = tmp_path / "pace"
    pace.write_text("0.05")
    log = tmp_path / "agent.log"
    proc = harness.start(agent_argv("standby", "n0", extra=["--standby-after-s", standby_after_s],
                                    worker=[LSQ, "--out", str(out), "--samples", "1024",
                                            "--pace-file", str(pace)]),
                         harness.base_env(), log)
    try:
        harness.wait_steps(out, lambda r: True, 5, 60, [proc])
        time.sleep(1.0)                      # 0.5 s into the round: the standby is up
        wait_for(lambda: len(_children(proc.pid)) == processes, 10,
                 f"{processes} process(es) under the agent", [log])
        time.sleep(0.5)
        assert len(_children(proc.pid)) == processes, harness.tail(log)
        pace.write_text("0")
        assert harness.wait_all([proc], 60) == [0], harness.tail(log)
    finally:
        harness.stop(proc)


def test_controller_unreachable_training_goes_on(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = f"127.0.0.1:{harness.free_port()}"      # nothing listens there
    # Nothing listens at the rendezvous endpoint either: the first agent hosts the store.
    rdzv = f"127.0.0.1:{harness.free_port()}"
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append(tmp_path / f"agent{i}.log")
            procs.append(harness.start(agent_argv(
                "lonely", f"n{i}", controller_addr=dead, rdzv=rdzv, nnodes="2", bounds=(2, 2),
                snapshot_dir=tmp_path / f"snap{i}",
                worker=[LSQ, "--out", str(out), "--samples", "512", "--epochs", "2"],
                extra=["--controller-wait-s", "0.5"]), harness.base_env(), logs[-1]))
        codes = harness.wait_all(procs, 120)
        assert codes == [0, 0], "\n".join(harness.tail(p) for p in logs)
        check_exactly_once(out)
        texts = [p.read_text() for p in logs]
        for text in texts:
            assert text.count("unreachable") == 1, text[-3000:]
        assert sum("this agent hosts the rendezvous store" in t for t in texts) == 1
    finally:
        for p in procs:
            harness.stop(p)


def test_killed_worker_restarts_with_the_survivors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pace = tmp_path / "pace"
    pace.write_text("0.05")
    worker = [LSQ, "--out", str(out), "--samples", "2048", "--epochs", "10",
              "--pace-file", str(pace)]
    procs, logs = [], []
    with controller() as ctl, rdzv_store() as rdzv:
        try:
            for i in range(2):
                logs.append(tmp_path / f"agent{i}.log")
                procs.append(harness.start(agent_argv(
                    "kill", f"n{i}", controller_addr=ctl.address, rdzv=rdzv, nnodes="2",
                    snapshot_dir=tmp_path / f"snap{i}", bounds=(2, 2), worker=worker),
                    harness.base_env(ADAPTRUN_SNAPSHOT_EVERY="10"), logs[-1]))
            # Kill once training has run a while: the agents then hold warm standby workers
            # (started 5 s into a round), as they would in a long job.
            victim = wait_for(lambda: next((f for f in out.glob("steps-*.jsonl")
                                            if '"rank": 1' in f.read_text()
                                            and f.read_text().count('"step"') > 30), None),
                              90, "30 steps of rank 1", logs)
            t_first = steps(out)[0]["t"]
            wait_for(lambda: time.time() > t_first + 7, 30, "7 s of training")
            pid = int(victim.stem.split("-")[1])
            t_kill = time.time()
            import os
            import signal
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: any(r["t"] > t_kill for r in steps(out)), 60,
                     "a step after the kill", logs)
            pace.write_text("0")
            codes = harness.wait_all(procs, 90)
            assert codes == [0, 0], "\n".join(harness.tail(p) for p in logs)
            check_exactly_once(out)
            rows = steps(out)
            last_old = max(r["t"] for r in rows if r["t"] < t_kill)
            first_new = min(r["t"] for r in rows if r["t"] > t_kill)
            print(f"\nfailure (kill -9 of one worker) gap: {first_new - last_old:.2f} s")
        finally:
            for p in procs:
                harness.stop(p)


@pytest.mark.parametrize("args, message", [
    (["--job", "j"], "no training command"),
    (["--job", "j", "--nnodes", "2", "--", "python", LSQ], "--rdzv-endpoint"),
    (["--job", "j", "--nnodes", "3:2", "--", "python", LSQ], "--nnodes"),
    (["--job", "j", "--", "python", "no/such/script.py"], "does not exist"),
    (["--job", "j", "--rdzv-conf", "bogus=1", "--", "python", LSQ], "--rdzv-conf"),
])
def test_agent_usage_errors_are_one_line(args, message):
    from click.testing import CliRunner

    from adaptrun.cli import cli
    result = CliRunner().invoke(cli, ["agent", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
