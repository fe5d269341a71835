"""Directives: issued by the policy after ``scale``, sent again after a reconnect, carried
across a controller restart by the agent's client, which never blocks its caller."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.agents.controller_client import ControllerClient, JobBoundsSpec
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller
from adaptrun.science.policy import Config
from adaptrun.science.report import Report
from controller_support import (BOUNDS, channel_to, register, report, running_controller,
                                send_reports)


def _first(stream, timeout_s=5.0):
    got = []
    t = threading.Thread(target=lambda: got.append(next(iter(stream))))
    t.start()
    t.join(timeout_s)
    stream.cancel()
    assert got, "no directive within the timeout"
    return got[0]


@pytest.mark.timeout(30)
def test_scale_moves_the_job_and_the_stream_survives_a_reconnect():
    with running_controller(policy_interval_s=60.0) as ctl, channel_to(ctl) as (_, stub):
        agent = register(stub, "resnet").agent_id
        send_reports(stub, agent, [report("resnet", step=i) for i in range(1, 4)])
        status = stub.SetBounds(pb.SetBoundsRequest(job_id="resnet", min_workers=3,
                                                    max_workers=4), timeout=10)
        assert (status.bounds.min_workers, status.bounds.max_workers) == (3, 4)
        d = status.directive
        assert d.generation == 1 and 3 <= d.world_size <= 4
        assert d.global_batch == d.world_size * d.local_batch * (d.accum_steps + 1)
        assert "outside the bounds" in d.reason and "predicted goodput" in d.reason
        assert status.resizes == 1 and status.desired_workers == d.world_size
        assert ctl.actuator_changes == [("resnet", None, d.world_size)]

        watch = pb.WatchDirectivesRequest(job_id="resnet", agent_id=agent, last_generation=0)
        assert _first(stub.WatchDirectives(watch, timeout=10)).generation == 1
        # Reconnect with the last generation applied: the current directive comes again.
        watch.last_generation = 1
        again = _first(stub.WatchDirectives(watch, timeout=10))
        assert (again.generation, again.world_size) == (1, d.world_size)
        # And a newer one reaches an open stream.
        stream = stub.WatchDirectives(watch, timeout=10)
        it = iter(stream)
        assert next(it).generation == 1
        ctl.core.issue_directive(ctl.core.registry.job("resnet"), Config(4, 16, 0), "test")
        newer = next(it)
        stream.cancel()
        assert (newer.generation, newer.world_size, newer.global_batch) == (2, 4, 64)

        with pytest.raises(grpc.RpcError) as info:
            stub.SetBounds(pb.SetBoundsRequest(job_id="resnet", min_workers=5, max_workers=4),
                           timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.SetBounds(pb.SetBoundsRequest(job_id="nope", min_workers=1, max_workers=4),
                           timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "known jobs: resnet" in info.value.details()


def _wait(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _report(step, world_size=2):
    return Report(job_id="bert", step=step, progress=float(step), world_size=world_size,
                  nodes=1, local_batch=32, accum_steps=0, init_batch=64, step_time_s=0.5,
                  sync_time_s=0.1, grad_sqr=1.0, grad_var=2.0, time_s=float(step))


@pytest.mark.timeout(40)
def test_agent_client_survives_a_controller_restart_and_never_blocks(caplog):
    # No policy ticks (tick_s): this test issues the directives itself.
    cfg = ControllerConfig(policy_interval_s=60.0, tick_s=3600, max_threads=32)
    ctl = Controller(cfg).start()
    port = ctl.port
    got: list[pb.Directive] = []
    client = ControllerClient(
        f"127.0.0.1:{port}", "bert", "node-0", 2, "127.0.0.1:7000",
        JobBoundsSpec(1, 4, 64, 1024, 8, 128), on_directive=got.append, queue_size=8,
        backoff_initial_s=0.05, backoff_max_s=0.4).start()
    try:
        assert client.connected.wait(10)
        for step in range(1, 4):
            client.report(_report(step))
        job = None
        assert _wait(lambda: (j := ctl.core.registry.job("bert")) is not None and j.accepted == 3)
        job = ctl.core.registry.job("bert")
        assert _wait(lambda: job.agents["node-0"].watching == 1)
        ctl.core.issue_directive(job, Config(3, 32, 0), "grow")
        assert _wait(lambda: got and got[-1].reason == "grow")
        grow = got[-1].generation

        ctl.stop(grace_s=0.1)
        # The controller is gone: report() still returns at once, dropping the oldest.
        t0 = time.perf_counter()
        for step in range(10, 30):
            client.report(_report(step, world_size=3))
        assert time.perf_counter() - t0 < 0.1
        assert client.dropped_reports >= 12
        assert _wait(lambda: not client.connected.is_set())
        time.sleep(0.5)

        ctl = Controller(ControllerConfig(port=port, policy_interval_s=60.0, tick_s=3600,
                                          max_threads=32)).start()
        assert _wait(lambda: (j := ctl.core.registry.job("bert")) is not None
                     and j.agents["node-0"].watching == 1 and j.accepted >= 1)
        job = ctl.core.registry.job("bert")
        # The newest reports arrive (the queue kept them, in order; they may still be on
        # their way when the stream reopens), and the new controller continued the agent's
        # generations.
        assert _wait(lambda: job.last_report.step == 29), job.last_report.step
        assert job.generation >= grow
        ctl.core.issue_directive(job, Config(2, 64, 0), "shrink")
        assert _wait(lambda: got[-1].reason == "shrink")
        assert got[-1].generation > grow and got[-1].world_size == 2
        assert got[-1].global_batch == 128
        generations = [d.generation for d in got]
        assert generations == sorted(set(generations)), "a generation was delivered twice"
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1, [r.getMessage() for r in unreachable]
    finally:
        client.close()
        ctl.stop(grace_s=0.1)


def test_a_node_waiting_to_join_a_job_short_of_its_size_gets_a_directive_that_adds_it():
    """A pod restarted after its node failed: the survivors run 2 of the job's 4 workers. Its
    agent's ``wants_to_join`` registration gets the job's size again as a new generation (once
    per interval); a job at its size or still applying a directive gets nothing."""
    with running_controller(policy_interval_s=60.0) as ctl, channel_to(ctl) as (_, stub):
        agent = register(stub, "gpt", node="n0").agent_id
        send_reports(stub, agent, [report("gpt", step=i, world_size=4) for i in (1, 2)])
        job = ctl.core.registry.job("gpt")
        ctl.core.issue_directive(job, Config(4, 16, 0), "the policy's")   # generation 1

        def join(node):
            return stub.Register(pb.RegisterRequest(
                job_id="gpt", node=node, slots=1, address="127.0.0.1:1", bounds=BOUNDS,
                wants_to_join=True), timeout=5).directive

        # Reports of generation 1 at its size: nothing to re-admit.
        send_reports(stub, agent, [report("gpt", step=3, world_size=4, generation=1)])
        assert join("n3").generation == 1
        # A failure: the survivors re-formed with 2 of the 4 workers.
        send_reports(stub, agent, [report("gpt", step=4, world_size=2, generation=1)])
        d = join("n3")
        assert (d.generation, d.world_size, d.global_batch) == (2, 4, 64), d
        assert "node n3 waits to join: the job runs 2 of its 4 workers" in d.reason
        assert ctl.actuator_changes == [], "re-admission moves no actuator"
        # Asked again at once (the agent asks every 2 s): no second directive.
        assert join("n3").generation == 2
        # Still applying generation 2 (reports of generation 1): nothing either.
        job.readmit_time_s = float("-inf")
        send_reports(stub, agent, [report("gpt", step=5, world_size=2, generation=1)])
        assert join("n3").generation == 2


def test_a_move_that_never_happened_is_replaced_when_the_bounds_change():
    """The policy asked for 4 workers, the job kept running 2 (no node came), then the
    operator pinned the job to 2: the directive in force must say 2 again, or a node that
    registers later would wait for a world of 4 that nobody forms."""
    fixed = pb.JobBounds(min_workers=1, max_workers=4, init_batch=64, max_global_batch=64,
                         local_batch_min=8, local_batch_max=128)   # the batch cannot move
    with running_controller(policy_interval_s=60.0) as ctl, channel_to(ctl) as (_, stub):
        agent = register(stub, "t5", node="n0", bounds=fixed).agent_id
        send_reports(stub, agent, [report("t5", step=i, world_size=2) for i in (1, 2)])
        job = ctl.core.registry.job("t5")
        ctl.core.issue_directive(job, Config(4, 16, 0), "the policy's")   # never applied
        send_reports(stub, agent, [report("t5", step=3, world_size=2, generation=1)])
        status = stub.SetBounds(pb.SetBoundsRequest(job_id="t5", min_workers=2, max_workers=2),
                                timeout=10)
        d = status.directive
        assert (d.generation, d.world_size) == (2, 2), d
        assert register(stub, "t5", node="n9").directive.world_size == 2
