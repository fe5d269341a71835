"""A two-node job under a standalone `adaptrun controller` (the CLI process), with no
--rdzv-endpoint anywhere: the controller hosts the job's rendezvous store and hands it to each
agent at registration. Resized 1 -> 2 -> 1 nodes by `adaptrun scale`; every sample of the job
counted exactly once in the trained state.

The nodes are named as a StatefulSet names its pods, and the one that leaves on scale-down is
the highest ordinal whatever torch's group ranks say: here the first agent (lowest pid, so
group rank 0) is ``sj-1`` and the second is ``sj-0``. As Kubernetes does after the scale-down,
the test sends SIGTERM to ``sj-1`` at once: that is its planned leave (exit 0), not a failure. The controller's local actuator only records the
worker count here (no agent command): the test plays the cluster and starts the second node's
agent itself, as a StatefulSet would start a pod. Everything is real: controller, agents,
rendezvous, worker processes, on 127.0.0.1.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from test_agent import LSQ, agent_argv, check_exactly_once

from workers import harness

CLI = [sys.executable, "-m", "adaptrun.cli"]


def _scale(address: str, job: str, n: int) -> None:
    out = subprocess.run([*CLI, "scale", job, "--min-workers", str(n), "--max-workers", str(n),
                          "--controller", address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.timeout(240)
def test_two_nodes_resize_through_the_store_the_controller_hosts(tmp_path):
    out, pace = tmp_path / "out", tmp_path / "pace"
    out.mkdir()
    pace.write_text("0.08")
    worker = (LSQ, "--samples", "12000", "--batch", "24", "--epochs", "1", "--pace-file",
              str(pace), "--out", str(out))
    ctl = subprocess.Popen([*CLI, "controller", "--port", "0", "--metrics-port", "0",
                            "--rdzv-port", "0", "--policy-interval-s", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = {n: tmp_path / f"{n}.log" for n in ("sj-1", "sj-0")}
    procs = {}
    try:
        line = ctl.stdout.readline()
        m = re.search(r"on (127\.0\.0\.1:\d+), metrics .*rendezvous store on port (\d+)", line)
        assert m, (line, ctl.stderr.read() if ctl.poll() is not None else "")
        address = m.group(1)

        def agent(node):
            argv = agent_argv("sj", node, controller_addr=address, nnodes="1:2", bounds=(1, 2),
                              snapshot_dir=tmp_path / f"snap-{node}", worker=worker)
            assert "--rdzv-endpoint" not in argv
            procs[node] = harness.start(argv, harness.base_env(), logs[node])

        agent("sj-1")
        harness.wait_steps(out, lambda r: r["world"] == 1, 5, 90, procs.values())
        _scale(address, "sj", 2)
        t1 = time.time()
        agent("sj-0")          # the cluster starts the second node's agent
        harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t1, 5, 120,
                           procs.values())
        t2 = time.time()
        _scale(address, "sj", 1)
        procs["sj-1"].send_signal(signal.SIGTERM)     # the pod the StatefulSet deletes
        assert procs["sj-1"].wait(timeout=60) == 0, harness.tail(logs["sj-1"])
        harness.wait_steps(out, lambda r: r["world"] == 1 and r["t"] > t2, 3, 120,
                           [procs["sj-0"]])
        pace.write_text("0")
        assert procs["sj-0"].wait(timeout=120) == 0
    finally:
        for p in procs.values():
            harness.stop(p)
        ctl.terminate()
        try:
            ctl.wait(timeout=15)
        except subprocess.TimeoutExpired:
            harness.stop(ctl)
    for node, path in logs.items():
        assert "hosted by the controller" in harness.tail(path, 100000), node
    assert "sj-1 (place 1 by ordinal) leaves the job" in harness.tail(logs["sj-1"], 100000)
    check_exactly_once(out)
