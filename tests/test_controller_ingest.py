"""Bad input from a raw gRPC client is rejected with a clear status, counted, and never
harms a second job, whose reports keep being accepted and whose metrics keep updating."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from adaptrun.generated import control_plane_pb2 as pb
from controller_support import (AGENT, BOUNDS, channel_to, raw_report_stream, register, report,
                                running_controller, sample, scrape, send_reports)


def _rejected(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def _wrong_wire_type_step(job_id: str) -> bytes:
    # A valid report, then field 2 (step, a varint) again as a length-delimited string.
    return report(job_id).SerializeToString() + bytes([(2 << 3) | 2, 3]) + b"abc"


BAD_FIELDS = [
    ("nan step time", dict(step_time_s=float("nan")), "step_time_s must be a finite number"),
    ("negative time", dict(time_s=-1.0), "time_s must be >= 0"),
    ("negative sync time", dict(sync_time_s=-0.1), "sync_time_s must be >= 0"),
    ("zero step time", dict(step_time_s=0.0), "step_time_s must be > 0"),
    ("zero world size", dict(world_size=0), "world_size must be >= 1"),
    ("zero local batch", dict(local_batch=0), "local_batch must be >= 1"),
    ("negative step", dict(step=-5), "step must be >= 0, got -5"),
    ("negative accum", dict(accum_steps=-1), "accum_steps must be >= 0, got -1"),
    ("max batch below B0", dict(max_batch=32), "max_batch (32) is below init_batch (64)"),
    ("inverted local bounds", dict(local_batch_min=64, local_batch_max=8),
     "local_batch_max (8) is below local_batch_min (64)"),
    ("nodes > world", dict(nodes=3), "nodes (3) cannot exceed world_size (2)"),
    ("inf grad_sqr", dict(grad_sqr=float("inf")), "grad_sqr must be a finite number"),
    ("negative grad_var", dict(grad_var=-1.0), "grad_var must be >= 0"),
    ("nan progress", dict(progress=float("nan")), "progress must be a finite number"),
    ("sync > step", dict(sync_time_s=2.0), "sync_time_s cannot exceed step_time_s"),
    ("inf lr", dict(lr=float("inf")), "lr must be finite"),
]


@pytest.mark.timeout(40)
def test_bad_reports_rejected_while_another_job_keeps_going():
    with running_controller(report_rate_per_s=20.0, report_burst=40,
                            policy_interval_s=60.0) as ctl, channel_to(ctl) as (ch, stub):
        a = register(stub, "job-a").agent_id
        b = register(stub, "job-b").agent_id

        # Job B streams good reports the whole time on its own stream.
        b_acks, stop = [], threading.Event()

        def job_b():
            def gen():
                step = 0
                while not stop.is_set():
                    step += 1
                    yield report("job-b", step=step, local_batch=16, lr=0.05)
                    time.sleep(0.1)
            for ack in stub.StreamReports(gen(), metadata=((AGENT, b),), timeout=30):
                b_acks.append(ack.step)
        tb = threading.Thread(target=job_b)
        tb.start()
        try:
            for what, bad, message in BAD_FIELDS:
                code, details = _rejected(
                    lambda: send_reports(stub, a, [report("job-a", **bad)]))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, what
                assert message in details, (what, details)

            raw = raw_report_stream(ch)
            md = ((AGENT, a),)
            code, details = _rejected(lambda: list(raw(iter([_wrong_wire_type_step("job-a")]),
                                                      metadata=md, timeout=5)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "field step was sent as length-delimited" in details
            code, details = _rejected(lambda: list(raw(iter([b"\xff\xff\xff\xff"]), metadata=md,
                                                      timeout=5)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid adaptrun.v1.Report" in details
            code, details = _rejected(
                lambda: send_reports(stub, a, [report("job-a", step=1) for _ in range(1)] +
                                     [pb.Report(job_id="job-a" + "x" * 20000)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "16384-byte limit" in details
            # Over gRPC's own limit the transport refuses it before any handler runs.
            code, _ = _rejected(lambda: send_reports(stub, a, [pb.Report(job_id="x" * (2 << 20))]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

            code, details = _rejected(lambda: send_reports(stub, a, [report("job-b")]))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "report for job 'job-b' on a stream registered for job 'job-a'" in details
            code, details = _rejected(lambda: send_reports(stub, a, [report("nobody")]))
            assert code == grpc.StatusCode.NOT_FOUND and "unknown job 'nobody'" in details
            code, details = _rejected(lambda: list(stub.StreamReports(iter([report("job-a")]),
                                                                      timeout=5)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "call Register first" in details

            # A good report of job A still goes through.
            assert [x.step for x in send_reports(stub, a, [report("job-a", step=7)])] == [7]

            # A flood: rate limited, with a status that says so.
            time.sleep(0.3)
            code, details = _rejected(
                lambda: send_reports(stub, a, [report("job-a", step=i) for i in range(200)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "faster than 20/s" in details

            seen = len(b_acks)
            time.sleep(0.5)
            assert len(b_acks) > seen, "job B's reports stopped being accepted"
        finally:
            stop.set()
            tb.join(timeout=10)
        assert b_acks == sorted(b_acks) and len(b_acks) >= 5

        text = scrape(ctl)
        assert sample(text, "adaptrun_local_batch_size", job_id="job-b") == 16
        assert sample(text, "adaptrun_learning_rate", job_id="job-b") == 0.05
        assert sample(text, "adaptrun_reports_total", job_id="job-b") == len(b_acks)
        assert sample(text, "adaptrun_rejected_reports_total", job_id="job-b", reason="invalid") == 0
        rej = {r: sample(text, "adaptrun_rejected_reports_total", job_id="job-a", reason=r)
               for r in ("invalid", "malformed", "oversize", "wrong_job", "unknown_job",
                         "rate_limited")}
        assert rej["invalid"] == len(BAD_FIELDS)
        assert rej["malformed"] == 2 and rej["oversize"] == 1
        assert rej["wrong_job"] == 1 and rej["unknown_job"] == 1 and rej["rate_limited"] == 1
        assert sample(text, "adaptrun_rejected_reports_total", job_id="", reason="unregistered") == 1
        # Job A's good reports (2, and the flood's burst until the limit) counted; no bad one.
        accepted_a = ctl.core.registry.job("job-a").accepted
        assert 2 < accepted_a < 2 + 200
        assert sample(text, "adaptrun_reports_total", job_id="job-a") == accepted_a
        assert sample(text, "adaptrun_workers", job_id="job-a") == 2


@pytest.mark.timeout(20)
def test_bad_registrations_rejected():
    with running_controller() as ctl, channel_to(ctl) as (ch, stub):
        cases = [
            (dict(job_id="bad job!"), "job_id 'bad job!' must be"),
            (dict(job_id=""), "job_id '' must be"),
            (dict(slots=0), "slots must be in [1, 1024]"),
            (dict(node=""), "node must be 1-128"),
            (dict(bounds=pb.JobBounds(min_workers=3, max_workers=2, init_batch=64,
                                      max_global_batch=1024, local_batch_min=8,
                                      local_batch_max=128)), "min workers <= max workers"),
            (dict(bounds=pb.JobBounds(min_workers=1, max_workers=2, init_batch=64,
                                      max_global_batch=32, local_batch_min=8,
                                      local_batch_max=128)), "init batch <= max batch"),
        ]
        for kw, message in cases:
            req = dict(job_id="ok", node="n0", slots=1, address="127.0.0.1:1", bounds=BOUNDS)
            req.update(kw)
            code, details = _rejected(lambda: stub.Register(pb.RegisterRequest(**req), timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, kw
            assert message in details, (kw, details)
        assert ctl.core.registry.jobs() == []
        # The same node registering again is the same agent.
        first = register(stub, "ok").agent_id
        assert register(stub, "ok").agent_id == first
        assert register(stub, "ok", node="n1").agent_id != first


@pytest.mark.timeout(20)
def test_a_stream_that_asks_for_no_acks_gets_none_and_still_hears_a_rejection():
    # The agent's own client reads no acks and says so ("adaptrun-report-acks: 0"): the
    # controller then writes none (a write per report saved), takes every report, and still
    # ends the stream with the error when a report is bad.
    from adaptrun.controller.service import REPORT_ACKS_METADATA

    with running_controller(policy_interval_s=60.0) as ctl, channel_to(ctl) as (_, stub):
        a = register(stub, "job-a").agent_id
        md = ((AGENT, a), (REPORT_ACKS_METADATA, "0"))
        acks = list(stub.StreamReports(iter([report("job-a", step=s) for s in (1, 2, 3)]),
                                       metadata=md, timeout=5))
        assert acks == []
        job = ctl.core.registry.job("job-a")
        assert job.accepted == 3 and job.last_report.step == 3
        code, details = _rejected(lambda: list(stub.StreamReports(
            iter([report("job-a", step=4), report("job-a", step=5, world_size=0)]),
            metadata=md, timeout=5)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "world_size must be >= 1" in details
        assert job.accepted == 4
        # Without the metadata (or with any other value): one ack per report, as before.
        assert [x.step for x in send_reports(stub, a, [report("job-a", step=6)])] == [6]
