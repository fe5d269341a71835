"""The gRPC face of the controller: ``adaptrun.v1.Controller`` mapped onto ``ControllerCore``.

The handlers are asyncio coroutines run by a ``grpc.aio`` server on one event loop
(``server.py``): an open stream is a suspended coroutine, not a thread, so 10,000 agents
with two streams each cost memory, not threads. Work that is quick (registering, ingesting a
report, reading a job) runs on the loop; work that may block (``SetBounds`` runs the job's
policy; ``ListJobs`` walks every job; a registration that waits to join takes the job's
policy lock) runs on the server's executor (``ControllerConfig.max_threads`` threads).

Requests are parsed by ``validation.parse_message`` (never raising), so a malformed or
oversize request ends its call with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a message that
says why, instead of gRPC's opaque INTERNAL. A report stream belongs to the agent named by
the ``adaptrun-agent-id`` metadata (from ``Register``); its first bad report ends that stream
only. A directive stream sends the job's current directive at once when its generation is
>= the agent's ``last_generation``, then every newer one: ``ControllerCore.issue_directive``
calls the service's listener from any thread, which wakes the job's streams on the loop
(``call_soon_threadsafe``). An agent holds at most ``MAX_WATCHES_PER_AGENT`` directive
streams; a newer one ends its oldest with RESOURCE_EXHAUSTED (a flood of streams stays
bounded, and an agent whose old connection died unseen is never locked out).

Callers. Every call of this service first shows what its token opens (``auth.ServerSecurity
.principal``, one place: ``_caller``); no valid token ends it with UNAUTHENTICATED, a token
that does not open the job (or a job token calling SetBounds, the operator's) with
PERMISSION_DENIED, before anything is read or changed; ListJobs lists only the jobs the token
opens. Each refusal counts in ``adaptrun_rejected_reports_total{reason="unauthorized"}``
with job_id ''. Without tokens configured every caller may do everything.
"""
from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from concurrent.futures import Executor

import grpc
import grpc.aio

from adaptrun.generated import control_plane_pb2 as pb

from .auth import PLAINTEXT, Principal, ServerSecurity
from .core import ControllerCore
from .registry import Directive, Job
from .validation import (Malformed, Rejection, bounds_to_proto, check_generation,
                         check_worker_bounds, parse_message)

__all__ = ["SERVICE_NAME", "AGENT_ID_METADATA", "REPORT_ACKS_METADATA", "ControllerService",
           "generic_handler", "directive_to_proto", "job_status"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name
AGENT_ID_METADATA = "adaptrun-agent-id"
# A report stream opened with this metadata set to "0" gets no ack per report (the agent
# ignores them; not writing them saves the controller a write per report); any other value,
# or none, gets one ack per accepted report.
REPORT_ACKS_METADATA = "adaptrun-report-acks"


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
            metric_name=job.metric_name, metric=job.metric, allocated_workers=job.allocated,
            queued_s=(0.0 if math.isnan(job.queued_since_s)
                      else max(now_s - job.queued_since_s, 0.0)))
        r = job.last_report
        if r is not None:
            f = report_figures(r)
            # The script declares a batch it may change, or its reports carry gradient
            # statistics (which the first few reports of an adaptive script do not yet).
            s.adaptive = (r.max_batch > r.init_batch or r.accumulation
                          or r.grad_sqr != 0 or r.grad_var != 0)
            s.last_report_age_s = max(now_s - job.last_report_time_s, 0.0)
            s.step, s.epoch, s.progress, s.world_size = r.step, r.epoch, r.progress, r.world_size
            s.global_batch, s.local_batch, s.accum_steps = r.global_batch, r.local_batch, r.accum_steps
            s.lr, s.noise_scale = r.lr, f.noise_scale
            s.throughput_examples_per_s = f.throughput_examples_per_s
            s.statistical_efficiency = f.statistical_efficiency
            s.goodput = f.goodput
    return s


class _Watch:
    """One open directive stream: woken by a new directive of its job, by ``stop()`` or by a
    newer stream of the same agent (``superseded``)."""
    __slots__ = ("job_id", "agent_id", "wake", "superseded")

    def __init__(self, job_id: str, agent_id: str):
        self.job_id = job_id
        self.agent_id = agent_id
        self.wake = asyncio.Event()
        self.superseded = False


class ControllerService:
    """The five RPCs as asyncio handlers, served by a ``grpc.aio`` server on one event loop.

    ``bind(loop)`` (on that loop, before the server starts) hooks the service to the core's
    directive listeners; ``wake_all()`` (on the loop) ends the directive streams when
    ``stopping`` is set. Blocking work goes to ``executor``."""

    # Directive streams one agent may hold open at once (it needs one; a reconnect whose old
    # connection the server has not seen die yet makes two). A newer stream ends the oldest.
    MAX_WATCHES_PER_AGENT = 8

    def __init__(self, core: ControllerCore, stopping: threading.Event,
                 security: ServerSecurity = PLAINTEXT, executor: Executor | None = None):
        self.core = core
        self.stopping = stopping
        self.security = security
        self.executor = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[str, set[_Watch]] = {}          # job id -> its open streams
        self._agent_watches: dict[str, deque[_Watch]] = {}  # agent id -> its, oldest first

    # -- the event loop's side -----------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.core.directive_listeners.append(self._directive_issued)

    def unbind(self) -> None:
        try:
            self.core.directive_listeners.remove(self._directive_issued)
        except ValueError:
            pass
        self._loop = None

    def _directive_issued(self, job_id: str) -> None:
        """A core listener: called from whichever thread issued the directive."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._wake_job, job_id)
        except RuntimeError:        # the loop is closed: no stream is left to wake
            pass

    def _wake_job(self, job_id: str) -> None:
        for w in self._watches.get(job_id, ()):
            w.wake.set()

    def wake_all(self) -> None:
        """Wake every directive stream (on the loop): they end when ``stopping`` is set."""
        for watches in self._watches.values():
            for w in watches:
                w.wake.set()

    def _add_watch(self, w: _Watch) -> None:
        self._watches.setdefault(w.job_id, set()).add(w)
        mine = self._agent_watches.setdefault(w.agent_id, deque())
        mine.append(w)
        while len(mine) > self.MAX_WATCHES_PER_AGENT:
            old = mine.popleft()
            old.superseded = True
            old.wake.set()

    def _remove_watch(self, w: _Watch) -> None:
        watches = self._watches.get(w.job_id)
        if watches is not None:
            watches.discard(w)
            if not watches:
                del self._watches[w.job_id]
        mine = self._agent_watches.get(w.agent_id)
        if mine is not None:
            try:
                mine.remove(w)
            except ValueError:      # superseded: already out
                pass
            if not mine:
                del self._agent_watches[w.agent_id]

    async def _blocking(self, fn, *args):
        """``fn(*args)`` on the executor, so the event loop never waits on it."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- callers and refusals ------------------------------------------------------------
    async def _refuse(self, ctx, code: grpc.StatusCode, message: str):
        r = Rejection(code, "unauthorized", message)
        self.core.count_rejection("", r)
        await self._abort(ctx, r)

    async def _caller(self, ctx) -> Principal:
        p = self.security.principal(ctx.invocation_metadata())
        if p is None:
            await self._refuse(ctx, grpc.StatusCode.UNAUTHENTICATED,
                               "a valid token is required: send metadata 'authorization: "
                               "Bearer TOKEN' (adaptrun: --token-file FILE or $ADAPTRUN_TOKEN)")
        return p

    async def _may_see(self, ctx, p: Principal, job_id: str) -> None:
        if not p.may_see(job_id):
            await self._refuse(ctx, grpc.StatusCode.PERMISSION_DENIED,
                               f"this token does not open job {job_id[:80]!r}")

    @staticmethod
    async def _abort(ctx, r: Rejection):
        await ctx.abort(r.code, r.message)

    async def _parsed(self, req, ctx):
        if isinstance(req, Malformed):
            await self._abort(ctx, req.rejection)
        return req

    # -- the RPCs ------------------------------------------------------------------------
    async def Register(self, req, ctx):
        caller = await self._caller(ctx)
        req = await self._parsed(req, ctx)
        await self._may_see(ctx, caller, req.job_id)
        try:
            # A node waiting to join may re-issue the job's directive: that waits for the
            # job's policy run (policy_lock), so it runs off the loop.
            job, agent = (await self._blocking(self.core.register, req) if req.wants_to_join
                          else self.core.register(req))
        except Rejection as r:
            await self._abort(ctx, r)
        with job.changed:
            d, done = job.directive, job.done
        return pb.RegisterResponse(agent_id=agent.agent_id, bounds=bounds_to_proto(job.bounds),
                                   directive=directive_to_proto(d),
                                   report_interval_s=self.core.config.report_interval_s,
                                   job_done=done, rdzv_endpoint=self.core.rdzv_endpoint)

    async def StreamReports(self, request_iterator, ctx):
        caller = await self._caller(ctx)
        md = dict(ctx.invocation_metadata() or ())
        agent_id = md.get(AGENT_ID_METADATA, "")
        acks = md.get(REPORT_ACKS_METADATA) != "0"
        agent = self.core.registry.agent(agent_id)
        if agent is not None:
            await self._may_see(ctx, caller, agent.job_id)
        else:
            r = Rejection(grpc.StatusCode.FAILED_PRECONDITION, "unregistered",
                          f"unknown agent id {agent_id[:40]!r}: call Register first and send "
                          f"its agent_id as metadata {AGENT_ID_METADATA!r}")
            self.core.count_rejection("", r)
            await self._abort(ctx, r)
        ingest, ack, eof = self.core.ingest, pb.ReportAck, grpc.aio.EOF
        while True:
            msg = await ctx.read()
            if msg is eof:
                return
            try:
                _, generation = ingest(agent, msg)
            except Rejection as r:
                await self._abort(ctx, r)
            if acks:
                await ctx.write(ack(step=msg.step, generation=generation))

    async def WatchDirectives(self, req, ctx):
        caller = await self._caller(ctx)
        req = await self._parsed(req, ctx)
        await self._may_see(ctx, caller, req.job_id)
        try:
            check_generation(req.last_generation)
        except Rejection as r:
            await self._abort(ctx, r)
        agent = self.core.registry.agent(req.agent_id)
        job = self.core.registry.job(req.job_id)
        if agent is None or job is None or agent.job_id != req.job_id:
            await self._abort(ctx, Rejection(grpc.StatusCode.NOT_FOUND, "unknown_job",
                                             f"no agent {req.agent_id[:40]!r} in job "
                                             f"{req.job_id[:80]!r}: call Register first"))
        with job.changed:
            job.generation = max(job.generation, req.last_generation)
            agent.watching += 1
        w = _Watch(job.job_id, agent.agent_id)
        self._add_watch(w)
        sent = None
        try:
            while not (self.stopping.is_set() or w.superseded):
                # Clear the wake-up before reading: a directive issued after the read sets it
                # again (its listener runs on this loop, after this step), so none is missed.
                w.wake.clear()
                with job.changed:
                    d = job.directive
                if d is not None and (d.generation >= req.last_generation if sent is None
                                      else d.generation > sent):
                    sent = d.generation
                    await ctx.write(directive_to_proto(d))
                else:
                    await w.wake.wait()
        finally:
            self._remove_watch(w)
            with job.changed:
                agent.watching -= 1
        if self.stopping.is_set():
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "the controller is shutting down")
        await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"agent {agent.agent_id} opened a newer directive stream: this, its "
                        f"oldest, ends (an agent holds at most {self.MAX_WATCHES_PER_AGENT})")

    async def ListJobs(self, req, ctx):
        caller = await self._caller(ctx)
        req = await self._parsed(req, ctx)
        if req.job_id:
            await self._may_see(ctx, caller, req.job_id)
        resp = await self._blocking(self._list_jobs, caller, req.job_id)
        if resp is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"no job {req.job_id[:80]!r}")
        return resp

    def _list_jobs(self, caller: Principal, job_id: str) -> pb.ListJobsResponse | None:
        now = self.core.clock()
        jobs = [j for j in self.core.registry.jobs() if caller.may_see(j.job_id)]
        if job_id:
            jobs = [j for j in jobs if j.job_id == job_id]
            if not jobs:
                return None
        jobs.sort(key=lambda j: j.job_id)
        act = self.core.actuator
        return pb.ListJobsResponse(jobs=[job_status(j, now, act.current_workers(j.job_id))
                                         for j in jobs])

    async def SetBounds(self, req, ctx):
        caller = await self._caller(ctx)
        if not caller.operator:
            await self._refuse(ctx, grpc.StatusCode.PERMISSION_DENIED,
                               "only the operator's credential may change a job's bounds")
        req = await self._parsed(req, ctx)
        try:
            # The policy runs now (a forced decision): 100s of ms for a big job, off the loop.
            status = await self._blocking(self._set_bounds, req)
        except Rejection as r:
            await self._abort(ctx, r)
        return status

    def _set_bounds(self, req) -> pb.JobStatus:
        check_worker_bounds(req.min_workers, req.max_workers)
        job = self.core.set_bounds(req.job_id, req.min_workers, req.max_workers)
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
