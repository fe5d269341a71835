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
from controller_support import (channel_to, register, report, running_controller, sample, scrape,
                                send_reports)

JOB_GAUGES = ("adaptrun_goodput", "adaptrun_throughput_examples_per_second",
              "adaptrun_statistical_efficiency", "adaptrun_noise_scale_examples",
              "adaptrun_global_batch_size", "adaptrun_local_batch_size",
              "adaptrun_accumulation_steps", "adaptrun_learning_rate", "adaptrun_workers",
              "adaptrun_workers_min", "adaptrun_workers_max", "adaptrun_resizes_total",
              "adaptrun_policy_seconds_count", "adaptrun_reports_total")


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
            assert sample(text, name, job="cifar") is not None, name
        assert "adaptrun_rejected_reports_total" in text
        assert 'adaptrun_policy_seconds_bucket{job="cifar",le="0.001"}' in text

        global_batch = 2 * 32 * 2
        throughput = global_batch / 0.5
        eff = float(efficiency(1.0, 2.0, global_batch / 64))
        assert sample(text, "adaptrun_global_batch_size", job="cifar") == global_batch
        assert sample(text, "adaptrun_local_batch_size", job="cifar") == 32
        assert sample(text, "adaptrun_accumulation_steps", job="cifar") == 1
        assert sample(text, "adaptrun_learning_rate", job="cifar") == 0.2
        assert sample(text, "adaptrun_workers", job="cifar") == 2
        assert sample(text, "adaptrun_workers_min", job="cifar") == 1
        assert sample(text, "adaptrun_workers_max", job="cifar") == 4
        assert sample(text, "adaptrun_noise_scale_examples", job="cifar") == pytest.approx(128.0)
        assert sample(text, "adaptrun_throughput_examples_per_second", job="cifar") == \
            pytest.approx(throughput)
        assert sample(text, "adaptrun_statistical_efficiency", job="cifar") == pytest.approx(eff)
        assert sample(text, "adaptrun_goodput", job="cifar") == pytest.approx(throughput * eff)
        assert sample(text, "adaptrun_reports_total", job="cifar") == 30
        # 30 reports in well under a cadence: the policy ran a few times, not 30.
        runs = sample(text, "adaptrun_policy_seconds_count", job="cifar")
        assert 1 <= runs <= 4


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
