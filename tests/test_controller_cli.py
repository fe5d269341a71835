"""`adaptrun controller`, `adaptrun status` and `adaptrun scale` as a user runs them."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import grpc
import pytest

from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
from controller_support import register, report, send_reports

CLI = [sys.executable, "-m", "adaptrun.cli"]


def _run(*args, timeout=20):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(50)
def test_controller_status_and_scale_commands():
    proc = subprocess.Popen([*CLI, "controller", "--port", "0", "--metrics-port", "0",
                             "--rdzv-port", "0", "--policy-interval-s", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"on (127\.0\.0\.1:\d+), metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, (line, proc.poll())
        target = m.group(1)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.ControllerStub(ch)
            agent = register(stub, "mnist").agent_id
            send_reports(stub, agent, [report("mnist", step=i) for i in (1, 2, 3)])

        out = _run("status", "--controller", target, "--json")
        assert out.returncode == 0, out.stderr
        (job,) = json.loads(out.stdout)["jobs"]
        assert job["job_id"] == "mnist" and job["step"] == "3" and job["world_size"] == 2
        assert job["bounds"]["min_workers"] == 1 and job["bounds"]["max_workers"] == 4
        assert job["reports_accepted"] == "3" and job["global_batch"] == "64"

        out = _run("status", "--controller", target)
        assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("JOB")
        assert re.search(r"^mnist\s+2", out.stdout, re.M), out.stdout

        out = _run("scale", "mnist", "--min-workers", "3", "--max-workers", "4",
                   "--controller", target)
        assert out.returncode == 0, out.stderr
        assert "job mnist: workers [3, 4]" in out.stdout and "outside the bounds" in out.stdout
        (job,) = json.loads(_run("status", "--controller", target, "--json").stdout)["jobs"]
        assert job["bounds"]["min_workers"] == 3 and job["desired_workers"] >= 3
        assert job["resizes"] == "1" and job["directive"]["world_size"] >= 3

        for args, message in [
            (("scale", "nope", "--min-workers", "1", "--max-workers", "2"), "no job 'nope'"),
            (("scale", "mnist", "--min-workers", "3", "--max-workers", "2"), "exceeds"),
        ]:
            out = _run(*args, "--controller", target)
            assert out.returncode == 2 and message in out.stderr, out
            assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


@pytest.mark.timeout(30)
def test_unreachable_controller_and_busy_port_are_one_line_errors():
    out = _run("status", "--controller", "127.0.0.1:1", "--timeout-s", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("Error: cannot reach the controller at 127.0.0.1:1 "
                                  "(UNAVAILABLE); is `adaptrun controller` running there?")
    out = _run("status", "--controller", "nonsense")
    assert out.returncode == 2 and "--controller must be HOST:PORT" in out.stderr

    from adaptrun.controller.core import ControllerConfig
    from adaptrun.controller.server import Controller

    with Controller(ControllerConfig(metrics_port=None)) as ctl:
        out = _run("controller", "--port", str(ctl.port), "--metrics-port", "0")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "cannot listen on 127.0.0.1" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
