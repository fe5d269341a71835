"""One membership truth (real controller, agents, rendezvous and workers on 127.0.0.1).

A node that registers while its job runs joins the next directive that grows the job, in
either order: registered first and the directive after, or the directive first and the node
after; the new world forms on that directive, never in a round that has closed. An agent that
comes after the job finished exits 0 and starts nothing. The controller's local actuator here
only records the worker count; the test starts the agents itself, at the moments it needs.
"""
from __future__ import annotations

import re
import time

import pytest
from test_agent import LSQ, agent_argv, check_exactly_once, controller, rdzv_store

from adaptrun.generated import control_plane_pb2 as pb
from controller_support import channel_to
from workers import harness


def _wait_for(predicate, timeout_s: float, what: str, procs=()):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        dead = [p.args[-1] for p in procs if p.poll() not in (None, 0)]
        assert not dead and time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _paced_job(tmp_path):
    """The output folder, pace file and worker argv of a paced least-squares job (0.1 s a
    step until the test sets the pace to 0)."""
    out, pace = tmp_path / "out", tmp_path / "pace"
    out.mkdir()
    pace.write_text("0.1")
    worker = (LSQ, "--samples", "20000", "--batch", "24", "--epochs", "1", "--pace-file",
              str(pace), "--out", str(out))
    return out, pace, worker


def _start_agent(procs, logs, tmp_path, job, node, ctl, rdzv, worker, max_nodes, extra=()):
    procs[node] = harness.start(
        agent_argv(job, node, controller_addr=ctl.address, rdzv=rdzv, nnodes=f"1:{max_nodes}",
                   bounds=(1, max_nodes), snapshot_dir=tmp_path / f"snap-{node}",
                   worker=worker, extra=extra), harness.base_env(), logs[node])


@pytest.mark.timeout(240)
def test_a_node_joins_the_directive_in_either_order_and_a_late_one_exits(tmp_path):
    out, pace, worker = _paced_job(tmp_path)
    logs = {n: tmp_path / f"{n}.log" for n in ("n0", "n1", "n2", "n3")}
    procs = {}
    with rdzv_store() as rdzv, controller() as ctl, channel_to(ctl) as (_ch, stub):
        def agent(node):
            _start_agent(procs, logs, tmp_path, "mj", node, ctl, rdzv, worker, 3)
        try:
            agent("n0")
            harness.wait_steps(out, lambda r: r["world"] == 1, 5, 90, procs.values())
            # Order 1: the node registers while the job runs; the directive comes after.
            agent("n1")
            _wait_for(lambda: "waiting for a directive that adds this node" in
                      harness.tail(logs["n1"]), 60, "n1 to wait", procs.values())
            t1 = time.time()
            stub.SetBounds(pb.SetBoundsRequest(job_id="mj", min_workers=2, max_workers=2),
                           timeout=10)
            harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t1, 3, 90,
                               procs.values())
            # Order 2: the directive first; the node registers after it was issued.
            stub.SetBounds(pb.SetBoundsRequest(job_id="mj", min_workers=3, max_workers=3),
                           timeout=10)
            job = ctl.core.registry.job("mj")
            _wait_for(lambda: job.directive is not None and job.directive.world_size == 3, 30,
                      "the directive to 3 workers")
            t2 = time.time()
            agent("n2")
            harness.wait_steps(out, lambda r: r["world"] == 3 and r["t"] > t2, 3, 90,
                               procs.values())
            pace.write_text("0")
            assert harness.wait_all([procs[n] for n in ("n0", "n1", "n2")], 120) == [0, 0, 0]
            # An agent that comes after the job finished starts nothing and exits 0.
            steps_before = len(harness.read_steps(out))
            agent("n3")
            assert procs["n3"].wait(timeout=60) == 0
            assert "is done: this agent starts no workers" in harness.tail(logs["n3"])
            assert len(harness.read_steps(out)) == steps_before
        finally:
            for p in procs.values():
                harness.stop(p)
    text = {n: harness.tail(path, 100000) for n, path in logs.items()}
    # Each new node joined the first directive that grew the job to include it.
    up2 = re.search(r"joining job mj at directive (\d+) \(2 workers", text["n1"])
    up3 = re.search(r"joining job mj at directive (\d+) \(3 workers", text["n2"])
    assert up2 and up3, (text["n1"][-1500:], text["n2"][-1500:])
    assert "waiting for a directive that adds this node" not in text["n2"]
    assert all("new node(s) arrived within" not in t for t in text.values())
    first2 = min(r["generation"] for r in harness.read_steps(out)
                 if r.get("event") == "step" and r["world"] == 2)
    assert first2 >= int(up2.group(1))
    rows = sorted((r for r in harness.read_steps(out) if r.get("event") == "step"
                   and r["rank"] == 0), key=lambda r: r["t"])
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1)), "a global step repeated or was skipped"
    check_exactly_once(out)


@pytest.mark.timeout(180)
def test_a_node_that_comes_after_the_job_kept_its_size_joins_the_next_directive(tmp_path):
    """A directive grows the job, but its new node comes later than --ready-timeout-s (a pod
    whose image pull takes longer): the running world keeps its size. When the node comes it
    joins the job at a directive issued for it, instead of waiting in the round given up."""
    out, pace, worker = _paced_job(tmp_path)
    logs = {n: tmp_path / f"{n}.log" for n in ("n0", "n1")}
    procs = {}
    with rdzv_store() as rdzv, controller() as ctl, channel_to(ctl) as (_ch, stub):
        def agent(node):
            _start_agent(procs, logs, tmp_path, "late", node, ctl, rdzv, worker, 2,
                         extra=["--ready-timeout-s", "5"])
        try:
            agent("n0")
            harness.wait_steps(out, lambda r: r["world"] == 1, 5, 90, procs.values())
            stub.SetBounds(pb.SetBoundsRequest(job_id="late", min_workers=2, max_workers=2),
                           timeout=10)
            _wait_for(lambda: "new node(s) arrived within" in harness.tail(logs["n0"]), 60,
                      "the job to keep its size", procs.values())
            t1 = time.time()
            agent("n1")
            harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t1, 3, 60,
                               procs.values())
            pace.write_text("0")
            assert harness.wait_all([procs["n0"], procs["n1"]], 120) == [0, 0]
        finally:
            for p in procs.values():
                harness.stop(p)
    text = harness.tail(logs["n1"], 100000)
    assert "did not form within" not in text, text[-2000:]
    check_exactly_once(out)
