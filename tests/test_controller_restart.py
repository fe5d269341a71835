"""A controller that restarts (``--state-dir``) or stalls does not disturb its jobs.

Unit: the policy's learned state round-trips through JSON and decides the same; a controller
with a state dir saves each job (throttled, atomic) and a new one resumes it; a damaged file
is set aside in one log line and the controller starts; an agent applies each directive
generation once. End to end (real ``adaptrun controller`` and ``adaptrun agent`` processes
on 127.0.0.1, the least-squares worker): kill -9 of the controller mid-training and a restart
on the same ports and state dir; a SIGSTOP of the controller while the job trains.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptrun.agents.controller_client import ControllerClient, JobBoundsSpec
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller, ControllerError
from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.science.policy import Config, JobBounds, Policy
from adaptrun.science.report import Report
from controller_support import channel_to, register, report, send_reports
from workers import harness

CLI = [sys.executable, "-m", "adaptrun.cli"]

BOUNDS = JobBounds(init_batch=64, max_batch=4096, min_replicas=1, max_replicas=8,
                   local_batch_min=8, local_batch_max=256, slots_per_node=2)


def _report(cfg: Config, step: int, step_time_s: float, grad_sqr=1.0, grad_var=4.0,
            **kw) -> Report:
    return Report(job_id="j", step=step, progress=float(step), world_size=cfg.replicas,
                  nodes=-(-cfg.replicas // 2), local_batch=cfg.local_batch,
                  accum_steps=cfg.accum_steps, init_batch=64, step_time_s=step_time_s,
                  sync_time_s=0.1 * step_time_s, grad_sqr=grad_sqr, grad_var=grad_var,
                  time_s=float(step), **kw)


def _trained_policy() -> Policy:
    """A policy that measured three configurations, moved once and has a fitted model."""
    p = Policy(BOUNDS, resize_cost_s=3.0)
    step = 0
    for cfg, t in ((Config(1, 64), 0.20), (Config(2, 64), 0.22), (Config(2, 128), 0.40)):
        for _ in range(3):
            step += 5
            p.observe(_report(cfg, step, t, loss=0.5, target_progress=5000.0))
        p.decide()
    p.observe(_report(Config(2, 128), step + 5, 0.41))     # NaN loss, lr, target, metric
    p._moves.record(1, 2, p.holdoff_runs)
    p._moves.record(2, 1, p.holdoff_runs)                    # a flap: 2 is barred a while
    return p


def test_policy_state_round_trips_through_json_and_decides_the_same():
    p = _trained_policy()
    assert p.params is not None and p._moves.barred_until
    text = json.dumps(p.state_dict(), allow_nan=False)        # strict JSON: NaN as "nan"
    q = Policy(BOUNDS, resize_cost_s=30.0).load_state_dict(json.loads(text))
    assert q.state_dict() == p.state_dict()
    assert q.resize_cost_s == 3.0 and q.samples() == p.samples()
    assert math.isnan(q.last_report.loss) and q.last_report.step == p.last_report.step
    for i in range(4):                       # the same inputs give the same decisions
        r = _report(Config(2, 128), 100 + 5 * i, 0.4 + 0.01 * i, grad_sqr=1.0 + i)
        p.observe(r)
        q.observe(r)
        assert q.decide() == p.decide()
    assert q.state_dict() == p.state_dict()


def test_policy_state_that_is_not_one_is_refused_and_changes_nothing():
    p = _trained_policy()
    good = p.state_dict()
    fresh = Policy(BOUNDS)
    for bad in ({}, {**good, "version": 99}, {**good, "measured": [[1, 2, "x", 0, 1, 1, 1]]},
                {**good, "stats": "nan"}, {**good, "last_report": {"job_id": "j"}},
                {**good, "moves": {"runs": 1}}):
        with pytest.raises(ValueError):
            fresh.load_state_dict(bad)
        assert fresh.state_dict() == Policy(BOUNDS).state_dict()


def _wait(cond, timeout_s=10.0, what="a condition", poll_s=0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def _controller(state_dir, **kw) -> Controller:
    cfg = dict(policy_interval_s=0.2, tick_s=0.05, max_threads=32, metrics_port=None,
               rdzv_port=None, state_dir=str(state_dir))
    cfg.update(kw)
    return Controller(ControllerConfig(**cfg)).start()


@pytest.mark.timeout(60)
def test_a_new_controller_resumes_each_job_from_the_state_dir(tmp_path):
    ctl = _controller(tmp_path)
    try:
        with channel_to(ctl) as (_, stub):
            agent = register(stub, "resnet").agent_id
            send_reports(stub, agent, [report("resnet", step=i, world_size=2, local_batch=32)
                                       for i in range(1, 9)])
            status = stub.SetBounds(pb.SetBoundsRequest(job_id="resnet", min_workers=3,
                                                        max_workers=4), timeout=10)
            generation = status.directive.generation
            assert generation >= 1
            agent_b = register(stub, "bert", last_generation=7).agent_id
            send_reports(stub, agent_b, [report("bert", step=1)])
        job = ctl.core.registry.job("resnet")
        _wait(lambda: (tmp_path / "jobs" / "resnet.json").exists()
              and (tmp_path / "jobs" / "bert.json").exists(), what="the state files")
        # Throttled: a burst of changes is one write per job per interval, not one each.
        writes = ctl.core.state.writes
        for _ in range(200):
            ctl.core._changed(job)
        time.sleep(0.3)
        assert ctl.core.state.writes - writes <= 2
    finally:
        ctl.stop(grace_s=0.1)                 # writes what is still unsaved
    job_before = ctl.core.registry.job("resnet")
    bert_generation = ctl.core.registry.job("bert").generation
    policy_state = job_before.policy.state_dict()
    assert policy_state["stats"] is not None and policy_state["measured"]

    ctl = _controller(tmp_path)
    try:
        job = ctl.core.registry.job("resnet")
        assert job is not None and not job.agents
        assert job.generation == job_before.generation == generation
        assert job.directive == job_before.directive
        assert job.bounds == job_before.bounds and job.caps == job_before.caps
        assert job.policy.state_dict() == policy_state
        assert job.notices == job_before.notices and job.accepted == job_before.accepted
        assert ctl.core.registry.job("bert").generation == bert_generation >= 7
        with channel_to(ctl) as (_, stub):
            listed = stub.ListJobs(pb.ListJobsRequest(job_id="resnet"), timeout=5).jobs[0]
            assert listed.directive.generation == generation
            assert listed.noise_scale == pytest.approx(64 * 2.0 / 1.0)
            assert listed.step == 8 and listed.last_report_age_s >= 0
            # The agent comes back with the generation it applied: it goes on from there.
            resp = register(stub, "resnet", last_generation=generation)
            assert resp.directive.generation == generation
            d = ctl.core.issue_directive(job, Config(4, 16, 0), "test")
            assert d.generation == generation + 1
    finally:
        ctl.stop(grace_s=0.1)
    saved = json.loads((tmp_path / "jobs" / "resnet.json").read_text())
    assert saved["generation"] == generation + 1


@pytest.mark.timeout(60)
def test_a_damaged_state_file_is_set_aside_in_one_line_and_the_controller_starts(
        tmp_path, caplog):
    ctl = _controller(tmp_path, tick_s=3600)        # no policy runs: generations stay
    try:
        with channel_to(ctl) as (_, stub):
            for job_id in ("good", "cut", "junk"):
                agent = register(stub, job_id, last_generation=3).agent_id
                send_reports(stub, agent, [report(job_id, step=i) for i in range(1, 4)])
    finally:
        ctl.stop(grace_s=0.1)
    jobs = tmp_path / "jobs"
    text = (jobs / "cut.json").read_text()
    (jobs / "cut.json").write_text(text[: len(text) // 2])           # truncated
    (jobs / "junk.json").write_text('{"version": 1, "job_id": "junk", "bounds": 5}')
    (jobs / "other.json").write_text(text)                           # another job's file
    (jobs / ".good.json.tmp").write_text("{")                        # an unfinished write
    caplog.set_level(logging.INFO, logger="adaptrun.controller")
    ctl = _controller(tmp_path)
    try:
        assert ctl.core.registry.job("good").generation == 3
        for job_id in ("cut", "junk", "other"):
            assert ctl.core.registry.job(job_id) is None
        damaged = [r.getMessage() for r in caplog.records if " is damaged (" in r.getMessage()]
        assert len(damaged) == 3, damaged
        assert all("\n" not in m and "starts fresh" in m for m in damaged)
        names = sorted(p.name for p in jobs.iterdir())
        assert names[0] == "cut.json.corrupt-" + names[0].split("corrupt-")[1]
        assert [n for n in names if not n.startswith(("cut.json.corrupt-", "junk.json.corrupt-",
                                                      "other.json.corrupt-"))] == ["good.json"]
        with channel_to(ctl) as (_, stub):        # the job starts fresh when it registers
            assert register(stub, "cut", last_generation=2).directive.generation == 0
            assert ctl.core.registry.job("cut").generation == 2
    finally:
        ctl.stop(grace_s=0.1)


def test_one_controller_per_state_dir(tmp_path):
    ctl = _controller(tmp_path)
    try:
        with pytest.raises(ControllerError, match="another controller uses the state dir"):
            _controller(tmp_path)
    finally:
        ctl.stop(grace_s=0.1)
    (tmp_path / "file").write_text("")
    with pytest.raises(ControllerError, match="cannot use the state dir"):
        _controller(tmp_path / "file")
    _controller(tmp_path).stop(grace_s=0.1)       # released at stop


def test_a_directive_is_applied_once_and_an_older_one_never():
    got = []
    client = ControllerClient("127.0.0.1:1", "j", "n0", 1, "127.0.0.1:2", JobBoundsSpec(1, 2),
                              on_directive=got.append)           # never started: no network

    def d(generation, world):
        return pb.Directive(job_id="j", generation=generation, world_size=world,
                            global_batch=64 * world, local_batch=64, reason="t")
    for directive in (d(2, 2), d(2, 2), d(1, 1), d(3, 1), d(2, 2), d(3, 1)):
        client._deliver(directive)
    assert [(x.generation, x.world_size) for x in got] == [(2, 2), (3, 1)]
    assert client.last_generation == 3 and client.directive.world_size == 1


# -- end to end ------------------------------------------------------------------------------
def _start_controller(port, rdzv_port, state_dir, log_path):
    return harness.start([*CLI, "controller", "--port", str(port), "--rdzv-port", str(rdzv_port),
                          "--metrics-port", "0", "--policy-interval-s", "1",
                          "--state-dir", str(state_dir)], harness.base_env(), log_path)


def _wait_listening(log_path, proc, timeout_s=60):
    _wait(lambda: "adaptrun controller on" in harness.tail(log_path, 100000)
          or proc.poll() is not None, timeout_s, "the controller to listen")
    assert proc.poll() is None, harness.tail(log_path)


def _status(address) -> dict:
    out = subprocess.run([*CLI, "status", "--controller", address, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["jobs"][0]


def _agent(job, address, tmp_path, out, pace, log_path, samples=16000):
    from test_agent import LSQ, agent_argv
    worker = (LSQ, "--samples", str(samples), "--batch", "64", "--epochs", "1", "--accum", "1",
              "--pace-file", str(pace), "--out", str(out))
    return harness.start(agent_argv(job, "n0", controller_addr=address, bounds=(1, 1),
                                    snapshot_dir=tmp_path / "snap", worker=worker),
                         harness.base_env(), log_path)


def _text(path: Path) -> str:
    """The whole log (torch's store client writes long stack traces once the store is gone)."""
    return path.read_text(errors="replace")


def _rank0_steps(out: Path) -> list[dict]:
    return sorted((r for r in harness.read_steps(out) if r.get("event") == "step"
                   and r["rank"] == 0), key=lambda r: r["t"])


def _fitted(state_file: Path) -> dict:
    s = json.loads(state_file.read_text())
    return {"generation": s["generation"], "stats": s["policy"]["stats"],
            "measured": {tuple(m[:4]): m[6] for m in s["policy"]["measured"]}}


@pytest.mark.timeout(180)
def test_kill_9_and_restart_of_the_controller_mid_training(tmp_path):
    from test_agent import check_exactly_once
    out, pace, state = tmp_path / "out", tmp_path / "pace", tmp_path / "state"
    out.mkdir()
    # Paced so that the job outlives the agent's reconnect backoff (0.5 s doubling: it
    # registers again up to ~16 s after the kill); unpaced at the end, it finishes in seconds.
    pace.write_text("0.07")
    port, rdzv_port = harness.free_port(), harness.free_port()
    address = f"127.0.0.1:{port}"
    logs = {n: tmp_path / f"{n}.log" for n in ("ctl1", "ctl2", "agent")}
    state_file = state / "jobs" / "rs.json"
    procs = {}
    try:
        procs["ctl1"] = _start_controller(port, rdzv_port, state, logs["ctl1"])
        _wait_listening(logs["ctl1"], procs["ctl1"])
        procs["agent"] = _agent("rs", address, tmp_path, out, pace, logs["agent"],
                                samples=64000)
        # Trained long enough that the policy measured and fitted something, and saved it.
        _wait(lambda: state_file.exists() and _fitted(state_file)["stats"] is not None
              and sum(_fitted(state_file)["measured"].values()) >= 4, 90,
              "the job's fitted state in the state dir")
        before = _status(address)

        procs["ctl1"].send_signal(signal.SIGKILL)
        procs["ctl1"].wait(timeout=10)
        t_kill = time.time()
        fitted = _fitted(state_file)              # what the new controller will load
        time.sleep(1.0)
        procs["ctl2"] = _start_controller(port, rdzv_port, state, logs["ctl2"])
        _wait_listening(logs["ctl2"], procs["ctl2"])
        t_restart = time.time()                   # the outage ends: training went on
        text = harness.tail(logs["ctl2"], 100000)
        m = re.search(r"job rs restored: generation (\d+), (\d+) measured configuration\(s\), "
                      r"noise scale (\d+)", text)
        assert m, text
        noise = 64 * fitted["stats"][1] / fitted["stats"][0]
        assert (int(m.group(1)), int(m.group(2))) == (fitted["generation"],
                                                      len(fitted["measured"]))
        assert int(m.group(3)) == round(noise) or abs(int(m.group(3)) - noise) <= 1
        after = _status(address)
        # What status shows is the job as saved (the last report its policy observed).
        assert int(after["directive"]["generation"]) >= int(before["directive"]["generation"])
        assert int(after["directive"]["generation"]) >= fitted["generation"]
        assert int(after["step"]) > 0 and int(after["reports_accepted"]) > 0
        assert math.isfinite(after["noise_scale"]) and after["noise_scale"] > 0
        # The agent comes back to the new controller and its reports build on the old model.
        _wait(lambda: _text(logs["agent"]).count("registered with the controller") >= 2,
              60, "the agent to register again", poll_s=0.5)
        _wait(lambda: sum(_fitted(state_file)["measured"].values())
              > sum(fitted["measured"].values()), 30, "new reports on the restored model")
        resumed = _fitted(state_file)
        assert all(resumed["measured"].get(k, 0) >= n for k, n in fitted["measured"].items())
        assert resumed["generation"] >= fitted["generation"]
        t_back = time.time()
        pace.write_text("0")
        assert procs["agent"].wait(timeout=120) == 0, harness.tail(logs["agent"])
    finally:
        for p in procs.values():
            harness.stop(p)
    rows = _rank0_steps(out)
    during = [r for r in rows if t_kill <= r["t"] <= t_restart]
    assert len(during) >= 10, f"{len(during)} steps while the controller was down"
    gaps = [b["t"] - a["t"] for a, b in zip(rows, rows[1:]) if t_kill - 1 <= a["t"] <= t_back]
    assert max(gaps) < 2.0, max(gaps)
    starts = [r for r in harness.read_steps(out) if r.get("event") == "start"]
    assert len(starts) == 1, starts                          # the workers never restarted
    agent_log = _text(logs["agent"])
    assert agent_log.count("workers (ranks") == 1, agent_log[-3000:]   # one round only
    assert "restarting" not in agent_log
    check_exactly_once(out)


@pytest.mark.timeout(150)
def test_a_stalled_controller_does_not_slow_the_steps(tmp_path):
    from test_agent import check_exactly_once
    stall_s = 11.0                     # more than twice the agent's RPC timeout (5 s)
    out, pace, state = tmp_path / "out", tmp_path / "pace", tmp_path / "state"
    out.mkdir()
    pace.write_text("0.03")
    port, rdzv_port = harness.free_port(), harness.free_port()
    address = f"127.0.0.1:{port}"
    logs = {n: tmp_path / f"{n}.log" for n in ("ctl", "agent")}
    procs = {}
    try:
        procs["ctl"] = _start_controller(port, rdzv_port, state, logs["ctl"])
        _wait_listening(logs["ctl"], procs["ctl"])
        procs["agent"] = _agent("st", address, tmp_path, out, pace, logs["agent"],
                                samples=80000)
        harness.wait_steps(out, lambda r: r["rank"] == 0, 40, 90, [procs["agent"]])
        _wait(lambda: (state / "jobs" / "st.json").exists(), 30, "the job's state file")
        t_stop = time.time()
        os.kill(procs["ctl"].pid, signal.SIGSTOP)
        try:
            time.sleep(stall_s)
        finally:
            os.kill(procs["ctl"].pid, signal.SIGCONT)
        t_cont = time.time()
        harness.wait_steps(out, lambda r: r["rank"] == 0 and r["t"] > t_cont + 3, 20, 60,
                           [procs["agent"]])
        t_end = time.time()
        assert int(_status(address)["step"]) > 0     # the controller serves again
        pace.write_text("0")
        assert procs["agent"].wait(timeout=120) == 0, harness.tail(logs["agent"])
    finally:
        for p in procs.values():
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            harness.stop(p)
    rows = _rank0_steps(out)
    times = [(b["t"], b["t"] - a["t"]) for a, b in zip(rows, rows[1:])]
    inside = [dt for t, dt in times if t_stop + 0.5 <= t <= t_cont]
    outside = [dt for t, dt in times if t_stop - 8 <= t < t_stop or t_cont + 1 < t <= t_end]
    assert len(inside) >= 20 and len(outside) >= 20, (len(inside), len(outside))
    med_in, med_out = statistics.median(inside), statistics.median(outside)
    assert med_in <= 1.5 * med_out + 0.01, (med_in, med_out)
    assert max(inside) < 2.0, max(inside)            # no step waited on the controller
    agent_log = _text(logs["agent"])
    assert agent_log.count("workers (ranks") == 1 and "restarting" not in agent_log
    check_exactly_once(out)
