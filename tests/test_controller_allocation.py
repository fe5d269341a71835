"""The controller shares a capacity among its jobs: a real gRPC controller with the local
actuator (recording its worker counts), real reports, its /metrics and `adaptrun status`."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from adaptrun.cli import cli
from adaptrun.generated import control_plane_pb2 as pb
from controller_support import (BOUNDS, channel_to, register, report, running_controller,
                                sample, scrape, send_reports)

TWO_TO_FOUR = pb.JobBounds(min_workers=2, max_workers=4, init_batch=64, max_global_batch=1024,
                           local_batch_min=8, local_batch_max=128)


def _wait(cond, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _jobs(stub):
    return {j.job_id: j for j in stub.ListJobs(pb.ListJobsRequest(), timeout=5).jobs}


@pytest.mark.timeout(60)
def test_a_full_cluster_queues_the_late_job_and_admits_it_when_one_finishes():
    with running_controller(capacity="1x4", allocation_interval_s=0.2) as ctl, \
            channel_to(ctl) as (_, stub):
        agents = {}
        for name in ("first", "second", "late"):
            agents[name] = register(stub, name, bounds=TWO_TO_FOUR).agent_id
            time.sleep(0.1)     # arrival order
        _wait(lambda: sorted(j.allocated_workers for j in _jobs(stub).values()) == [0, 2, 2],
              10, "two jobs at their minimum and one queued")
        jobs = _jobs(stub)
        assert jobs["late"].allocated_workers == 0
        assert (jobs["first"].allocated_workers, jobs["second"].allocated_workers) == (2, 2)
        assert any(c[0] == "late" and c[2] == 0 for c in ctl.actuator_changes)
        assert any("queued" in n for n in jobs["late"].notices)
        text = scrape(ctl)
        assert sample(text, "adaptrun_cluster_capacity_gpus") == 4
        assert sample(text, "adaptrun_cluster_queued_jobs") == 1
        assert sample(text, "adaptrun_workers_allocated", job_id="late") == 0
        out = CliRunner().invoke(cli, ["status", "--controller", ctl.address])
        assert out.exit_code == 0, out.output
        assert "queue: late" in out.output

        # New bounds for a queued job do not start it: the allocation admits it.
        moves = len(ctl.actuator_changes)
        stub.SetBounds(pb.SetBoundsRequest(job_id="late", min_workers=2, max_workers=3),
                       timeout=5)
        time.sleep(0.5)
        assert _jobs(stub)["late"].allocated_workers == 0
        assert not any(c[0] == "late" for c in ctl.actuator_changes[moves:])

        send_reports(stub, agents["first"], [report("first", step=1, world_size=2),
                                             report("first", step=2, world_size=2,
                                                    finished=True)])
        _wait(lambda: _jobs(stub)["late"].allocated_workers >= 2, 10,
              "the queued job admitted once the first finished")
        assert any(c[0] == "late" and c[2] == 2 for c in ctl.actuator_changes)
        text = scrape(ctl)
        assert sample(text, "adaptrun_cluster_queued_jobs") == 0


@pytest.mark.timeout(60)
def test_the_allocation_bounds_each_jobs_policy():
    """Two measured jobs on 4 GPUs with bounds [1, 4] each: their policies plan within what
    the allocation gives, and together never above the capacity."""
    with running_controller(capacity="1x4", allocation_interval_s=0.2) as ctl, \
            channel_to(ctl) as (_, stub):
        for name in ("a", "b"):
            agent = register(stub, name, bounds=BOUNDS).agent_id
            send_reports(stub, agent, [report(name, step=i, world_size=1, local_batch=64,
                                              step_time_s=0.5, sync_time_s=0.0,
                                              grad_sqr=1.0, grad_var=500.0)
                                       for i in range(1, 6)])
        _wait(lambda: all(j.allocated_workers > 0 for j in _jobs(stub).values()), 10,
              "both jobs allocated")
        time.sleep(1.0)
        jobs = _jobs(stub)
        assert sum(j.allocated_workers for j in jobs.values()) <= 4
        for j in jobs.values():
            assert j.bounds.max_workers == 4          # the user's bounds stay as they were
            if j.directive.generation:
                assert j.directive.world_size <= j.allocated_workers


def test_bad_capacity_is_a_clear_error():
    out = CliRunner().invoke(cli, ["controller", "--capacity", "lots", "--port", "0",
                                   "--metrics-port", "0", "--rdzv-port", "none"])
    assert out.exit_code == 2
    assert "NODESxGPUS" in out.output
