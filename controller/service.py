"""The gRPC face of the controller: ``adaptrun.v1.Controller`` mapped onto ``ControllerCore``.

Requests are parsed by ``validation.parse_message`` (never raising), so a malformed or
oversize request ends its call with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a message that
says why, instead of gRPC's opaque INTERNAL. A report stream belongs to the agent named by
the ``adaptrun-agent-id`` metadata (from ``Register``); its first bad report ends that stream
only. A directive stream sends the job's current directive at once when its generation is
>= the agent's ``last_generation``, then every newer one; it holds one server thread while
open.

Callers. Every call of this service first shows what its token opens (``auth.ServerSecurity
.principal``, one place: ``_caller``); no valid token ends it with UNAUTHENTICATED, a token
that does not open the job (or a job token calling SetBounds, the operator's) with
PERMISSION_DENIED, before anything is read or changed; ListJobs lists only the jobs the token
opens. Each refusal counts in ``adaptrun_rejected_reports_total{reason="unauthorized"}``
with job_id ''. Without tokens configured every caller may do everything.
"""
from __future__ import annotations

import threading

import grpc

from adaptrun.generated import control_plane_pb2 as pb

from .auth import PLAINTEXT, Principal, ServerSecurity
from .core import ControllerCore
from .registry import Directive, Job
from .validation import (Malformed, Rejection, bounds_to_proto, check_generation,
                         check_worker_bounds, parse_message)

__all__ = ["SERVICE_NAME", "AGENT_ID_METADATA", "ControllerService", "generic_handler",
           "directive_to_proto", "job_status"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name
AGENT_ID_METADATA = "adaptrun-agent-id"


def directive_to_proto(d: Directive | None) -> pb.Directive:
    if d is None:
        return pb.Directive()
    return pb.Directive(job_id=d.job_id, generation=d.generation, world_size=d.world_size,
                        global_batch=d.global_batch, local_batch=d.local_batch,
                        accum_steps=d.accum_steps, reason=d.reason)


def job_status(job: Job, now_s: float, desired_workers: int | None) -> pb.JobStatus:
    from .metrics import report_figures
    with job.changed:
        s = pb.JobStatus(
            job_id=job.job_id, bounds=bounds_to_proto(job.bounds),
            agents=[pb.AgentStatus(agent_id=a.agent_id, node=a.node, slots=a.slots,
                                   address=a.address, watching=a.watching > 0)
                    for a in job.agents.values()],
            directive=directive_to_proto(job.directive), desired_workers=desired_workers or 0,
            reports_accepted=job.accepted, reports_rejected=job.rejected, resizes=job.resizes,
            last_report_age_s=-1.0, last_decision=job.policy_error or job.last_decision,
            notices=job.notices, done=job.done, resize_cost_s=job.policy.resize_cost_s,
            metric_name=job.metric_name, metric=job.metric)
        r = job.last_report
        if r is not None:
            f = report_figures(r)
            s.adaptive = r.grad_sqr != 0 or r.grad_var != 0
            s.last_report_age_s = max(now_s - job.last_report_time_s, 0.0)
            s.step, s.epoch, s.progress, s.world_size = r.step, r.epoch, r.progress, r.world_size
            s.global_batch, s.local_batch, s.accum_steps = r.global_batch, r.local_batch, r.accum_steps
            s.lr, s.noise_scale = r.lr, f.noise_scale
            s.throughput_examples_per_s = f.throughput_examples_per_s
            s.statistical_efficiency = f.statistical_efficiency
            s.goodput = f.goodput
    return s


class ControllerService:
    def __init__(self, core: ControllerCore, stopping: threading.Event,
                 security: ServerSecurity = PLAINTEXT):
        self.core = core
        self.stopping = stopping
        self.security = security

    def _refuse(self, ctx, code: grpc.StatusCode, message: str):
        r = Rejection(code, "unauthorized", message)
        self.core.count_rejection("", r)
        self._abort(ctx, r)

    def _caller(self, ctx) -> Principal:
        p = self.security.principal(ctx.invocation_metadata())
        if p is None:
            self._refuse(ctx, grpc.StatusCode.UNAUTHENTICATED,
                         "a valid token is required: send metadata 'authorization: Bearer "
                         "TOKEN' (adaptrun: --token-file FILE or $ADAPTRUN_TOKEN)")
        return p

    def _may_see(self, ctx, p: Principal, job_id: str) -> None:
        if not p.may_see(job_id):
            self._refuse(ctx, grpc.StatusCode.PERMISSION_DENIED,
                         f"this token does not open job {job_id[:80]!r}")

    @staticmethod
    def _abort(ctx, r: Rejection):
        ctx.abort(r.code, r.message)

    def _parsed(self, req, ctx):
        if isinstance(req, Malformed):
            self._abort(ctx, req.rejection)
        return req

    def Register(self, req, ctx):
        caller = self._caller(ctx)
        req = self._parsed(req, ctx)
        self._may_see(ctx, caller, req.job_id)
        try:
            job, agent = self.core.register(req)
        except Rejection as r:
            self._abort(ctx, r)
        with job.changed:
            d, done = job.directive, job.done
        return pb.RegisterResponse(agent_id=agent.agent_id, bounds=bounds_to_proto(job.bounds),
                                   directive=directive_to_proto(d),
                                   report_interval_s=self.core.config.report_interval_s,
                                   job_done=done, rdzv_endpoint=self.core.rdzv_endpoint)

    def StreamReports(self, request_iterator, ctx):
        caller = self._caller(ctx)
        agent_id = dict(ctx.invocation_metadata()).get(AGENT_ID_METADATA, "")
        agent = self.core.registry.agent(agent_id)
        if agent is not None:
            self._may_see(ctx, caller, agent.job_id)
        else:
            r = Rejection(grpc.StatusCode.FAILED_PRECONDITION, "unregistered",
                          f"unknown agent id {agent_id[:40]!r}: call Register first and send "
                          f"its agent_id as metadata {AGENT_ID_METADATA!r}")
            self.core.count_rejection("", r)
            self._abort(ctx, r)
        for msg in request_iterator:
            try:
                _, generation = self.core.ingest(agent, msg)
            except Rejection as r:
                self._abort(ctx, r)
            yield pb.ReportAck(step=msg.step, generation=generation)

    def WatchDirectives(self, req, ctx):
        caller = self._caller(ctx)
        req = self._parsed(req, ctx)
        self._may_see(ctx, caller, req.job_id)
        try:
            check_generation(req.last_generation)
        except Rejection as r:
            self._abort(ctx, r)
        agent = self.core.registry.agent(req.agent_id)
        job = self.core.registry.job(req.job_id)
        if agent is None or job is None or agent.job_id != req.job_id:
            self._abort(ctx, Rejection(grpc.StatusCode.NOT_FOUND, "unknown_job",
                                       f"no agent {req.agent_id[:40]!r} in job "
                                       f"{req.job_id[:80]!r}: call Register first"))

        def wake():
            with job.changed:
                job.changed.notify_all()
        ctx.add_callback(wake)
        with job.changed:
            job.generation = max(job.generation, req.last_generation)
            agent.watching += 1
        sent = None
        try:
            while ctx.is_active() and not self.stopping.is_set():
                with job.changed:
                    d = job.directive
                    fresh = d is not None and (d.generation >= req.last_generation
                                               if sent is None else d.generation > sent)
                    if not fresh:
                        job.changed.wait(timeout=5.0)
                        continue
                sent = d.generation
                yield directive_to_proto(d)
        finally:
            with job.changed:
                agent.watching -= 1
        if self.stopping.is_set():
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "the controller is shutting down")

    def ListJobs(self, req, ctx):
        caller = self._caller(ctx)
        req = self._parsed(req, ctx)
        if req.job_id:
            self._may_see(ctx, caller, req.job_id)
        now = self.core.clock()
        jobs = [j for j in self.core.registry.jobs() if caller.may_see(j.job_id)]
        if req.job_id:
            jobs = [j for j in jobs if j.job_id == req.job_id]
            if not jobs:
                ctx.abort(grpc.StatusCode.NOT_FOUND, f"no job {req.job_id[:80]!r}")
        jobs.sort(key=lambda j: j.job_id)
        act = self.core.actuator
        return pb.ListJobsResponse(jobs=[job_status(j, now, act.current_workers(j.job_id))
                                         for j in jobs])

    def SetBounds(self, req, ctx):
        caller = self._caller(ctx)
        if not caller.operator:
            self._refuse(ctx, grpc.StatusCode.PERMISSION_DENIED,
                         "only the operator's credential may change a job's bounds")
        req = self._parsed(req, ctx)
        try:
            check_worker_bounds(req.min_workers, req.max_workers)
            job = self.core.set_bounds(req.job_id, req.min_workers, req.max_workers)
        except Rejection as r:
            self._abort(ctx, r)
        return job_status(job, self.core.clock(), self.core.actuator.current_workers(job.job_id))


def generic_handler(service: ControllerService, max_report_bytes: int,
                    max_request_bytes: int) -> grpc.GenericRpcHandler:
    def parser(cls, limit):
        return lambda data: parse_message(cls, data, limit)

    def unary(fn, req_cls, resp_cls):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=parser(req_cls, max_request_bytes),
            response_serializer=resp_cls.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Register": unary(service.Register, pb.RegisterRequest, pb.RegisterResponse),
        "StreamReports": grpc.stream_stream_rpc_method_handler(
            service.StreamReports, request_deserializer=parser(pb.Report, max_report_bytes),
            response_serializer=pb.ReportAck.SerializeToString),
        "WatchDirectives": grpc.unary_stream_rpc_method_handler(
            service.WatchDirectives,
            request_deserializer=parser(pb.WatchDirectivesRequest, max_request_bytes),
            response_serializer=pb.Directive.SerializeToString),
        "ListJobs": unary(service.ListJobs, pb.ListJobsRequest, pb.ListJobsResponse),
        "SetBounds": unary(service.SetBounds, pb.SetBoundsRequest, pb.JobStatus),
    })
