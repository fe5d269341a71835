"""/metrics carries every metric with the job's values; health and reflection answer; the
policy runs on a cadence, not per report."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from adaptrun.science.efficiency import efficiency
from adaptrun.generated import control_plane_pb2 as pb
from controller_support import (channel_to, register, report, running_controller, sample, scrape,
                                send_reports)

JOB_GAUGES = ("adaptrun_goodput", "adaptrun_throughput_examples_per_second",
              "adaptrun_statistical_efficiency", "adaptrun_noise_scale_examples",
              "adaptrun_global_batch_size", "adaptrun_local_batch_size",
              "adaptrun_accumulation_steps", "adaptrun_learning_rate", "adaptrun_workers",
              "adaptrun_workers_min", "adaptrun_workers_max", "adaptrun_resizes_total",
              "adaptrun_policy_seconds_count", "adaptrun_reports_total",
              "adaptrun_workers_desired", "adaptrun_policy_wanted_workers",
              "adaptrun_last_report_timestamp_seconds", "adaptrun_job_finished")


@pytest.mark.timeout(30)
def test_metrics_carry_the_jobs_values_and_policy_runs_on_a_cadence():
    with running_controller(policy_interval_s=0.5) as ctl, channel_to(ctl) as (_, stub):
        agent = register(stub, "cifar").agent_id
        r = dict(world_size=2, nodes=1, local_batch=32, accum_steps=1, step_time_s=0.5,
                 grad_sqr=1.0, grad_var=2.0, lr=0.2)
        acks = send_reports(stub, agent, [report("cifar", step=i, **r) for i in range(1, 31)])
        assert len(acks) == 30
        time.sleep(1.0)
        text = scrape(ctl)
        for name in JOB_GAUGES:
            assert sample(text, name, job_id="cifar") is not None, name
        assert "adaptrun_rejected_reports_total" in text
        # Prometheus sets `job` itself (a scraped one becomes `exported_job`); no _created
        # series double the count.
        assert 'job="' not in text and "_created" not in text
        assert 'adaptrun_policy_seconds_bucket{job_id="cifar",le="0.001"}' in text

        global_batch = 2 * 32 * 2
        throughput = global_batch / 0.5
        eff = float(efficiency(1.0, 2.0, global_batch / 64))
        assert sample(text, "adaptrun_global_batch_size", job_id="cifar") == global_batch
        assert sample(text, "adaptrun_local_batch_size", job_id="cifar") == 32
        assert sample(text, "adaptrun_accumulation_steps", job_id="cifar") == 1
        assert sample(text, "adaptrun_learning_rate", job_id="cifar") == 0.2
        assert sample(text, "adaptrun_workers", job_id="cifar") == 2
        assert sample(text, "adaptrun_workers_min", job_id="cifar") == 1
        assert sample(text, "adaptrun_workers_max", job_id="cifar") == 4
        assert sample(text, "adaptrun_noise_scale_examples", job_id="cifar") == pytest.approx(128.0)
        assert sample(text, "adaptrun_throughput_examples_per_second", job_id="cifar") == \
            pytest.approx(throughput)
        assert sample(text, "adaptrun_statistical_efficiency", job_id="cifar") == pytest.approx(eff)
        assert sample(text, "adaptrun_goodput", job_id="cifar") == pytest.approx(throughput * eff)
        assert sample(text, "adaptrun_reports_total", job_id="cifar") == 30
        # 30 reports in well under a cadence: the policy ran a few times, not 30.
        runs = sample(text, "adaptrun_policy_seconds_count", job_id="cifar")
        assert 1 <= runs <= 4
        # Never asked to move, the actuator's target is the reporting world.
        assert sample(text, "adaptrun_workers_desired", job_id="cifar") == 2
        assert sample(text, "adaptrun_job_finished", job_id="cifar") == 0
        assert 0 < time.time() - sample(text, "adaptrun_last_report_timestamp_seconds",
                                        job_id="cifar") < 10
        assert 1 <= sample(text, "adaptrun_policy_wanted_workers", job_id="cifar") <= 8


@pytest.mark.timeout(30)
def test_policy_wanted_workers_says_when_the_max_holds_a_job_back():
    """Measured: 2 workers do twice the examples per second of 1 at the same step time, the
    noise scale is large and the run is long. Held at its max of 2, the job's policy keeps 2;
    with the bounds widened to [1, 4] it would take 4: the gauge shows 4 above the max of 2,
    and the job's own policy is not disturbed by being asked."""
    bounds = pb.JobBounds(min_workers=1, max_workers=2, init_batch=64, max_global_batch=1024,
                          local_batch_min=8, local_batch_max=128)
    with running_controller(policy_interval_s=0.2) as ctl, channel_to(ctl) as (_, stub):
        agent = register(stub, "held", bounds=bounds).agent_id
        # The script fixes its local batch (32, no accumulation): the only way to more
        # goodput is more workers, so the widened policy does not try a batch first.
        common = dict(local_batch=32, accum_steps=0, step_time_s=1.0, sync_time_s=0.01,
                      grad_sqr=1.0, grad_var=100.0, target_progress=1e6, max_batch=1024,
                      local_batch_min=32, local_batch_max=32, accumulation=False)
        reports = [report("held", step=i, world_size=1 + (i > 4), nodes=1 + (i > 4), **common)
                   for i in range(1, 9)]
        send_reports(stub, agent, reports)
        deadline = time.monotonic() + 10
        while sample(text := scrape(ctl), "adaptrun_policy_wanted_workers",
                     job_id="held") is None:
            assert time.monotonic() < deadline, "no adaptrun_policy_wanted_workers after 10 s"
            time.sleep(0.1)
        assert sample(text, "adaptrun_workers_max", job_id="held") == 2
        assert sample(text, "adaptrun_workers", job_id="held") == 2
        assert sample(text, "adaptrun_policy_wanted_workers", job_id="held") == 4
        assert sample(text, "adaptrun_workers_desired", job_id="held") == 2
        job = ctl.core.registry.job("held")
        assert job.policy.bounds.max_replicas == 2 and job.policy._moves.last is None


@pytest.mark.timeout(20)
def test_health_and_reflection_answer():
    with running_controller() as ctl, channel_to(ctl) as (ch, _):
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "adaptrun.v1.Controller"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"adaptrun.v1.Controller", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("adaptrun.v1.Report")
        assert [f.name for f in desc.message_type if f.name == "Report"] == ["Report"]
