"""The controller's gRPC runs on grpc.aio: an open stream holds no thread.

Hundreds of directive streams on a controller with the default ``max_threads`` (64) all get a
newly issued directive (the thread-per-stream server deadlocked: every handler thread held a
stream), the process's thread count does not grow with the streams, ``stop()`` ends them at
once, one agent's stream flood stays bounded, and ``max_concurrent_rpcs`` refuses the surplus.
The clients are grpc.aio too (in the test's own event loop), so they add no thread per stream
either.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import grpc.aio
import pytest

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller
from adaptrun.controller.service import ControllerService
from adaptrun.science.policy import Config
from controller_support import BOUNDS

STREAMS = 300


def _controller(**cfg) -> Controller:
    # No policy ticks: the tests issue the directives themselves.
    return Controller(ControllerConfig(**{"metrics_port": None, "rdzv_port": None,
                                          "policy_interval_s": 60.0, "tick_s": 3600.0,
                                          **cfg})).start()


async def _register(stub, job_id: str, nodes: int) -> list[str]:
    bounds = pb.JobBounds(min_workers=1, max_workers=4096, init_batch=64,
                          max_global_batch=1 << 20, local_batch_min=8, local_batch_max=128)
    ids = []
    for i in range(nodes):
        resp = await stub.Register(pb.RegisterRequest(
            job_id=job_id, node=f"n{i}", slots=1, address=f"127.0.0.1:{10000 + i}",
            bounds=bounds if i == 0 else BOUNDS), timeout=10)
        ids.append(resp.agent_id)
    return ids


async def _until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


def _watching(ctl, job_id: str) -> int:
    return sum(a.watching for a in ctl.core.registry.job(job_id).agents.values())


def _run(ctl: Controller, scenario) -> None:
    """``scenario(stub, calls)`` on a grpc.aio channel to ``ctl``, in an event loop of its
    own; whatever it does, the streams it put in ``calls`` are cancelled, the channel is
    closed and the controller stopped."""
    async def main():
        ch = grpc.aio.insecure_channel(ctl.address)
        calls: list = []
        try:
            await scenario(pb_grpc.ControllerStub(ch), calls)
        finally:
            for c in calls:
                c.cancel()
            await ch.close()
    try:
        asyncio.run(main())
    finally:
        ctl.stop(grace_s=0.2)


@pytest.mark.timeout(90)
def test_hundreds_of_directive_streams_on_default_threads_get_a_new_directive():
    ctl = _controller()
    assert ctl.config.max_threads == ControllerConfig().max_threads == 64 < STREAMS

    async def scenario(stub, calls):
        agents = await _register(stub, "wide", STREAMS)
        job = ctl.core.registry.job("wide")
        threads_before = threading.active_count()
        calls.extend(stub.WatchDirectives(pb.WatchDirectivesRequest(
            job_id="wide", agent_id=a), timeout=60) for a in agents)
        assert await _until(lambda: _watching(ctl, "wide") == STREAMS), \
            f"{_watching(ctl, 'wide')} of {STREAMS} streams open"
        threads_open = threading.active_count()
        assert threads_open <= threads_before + 2, (threads_before, threads_open)

        for gen, config in ((1, Config(4, 16, 0)), (2, Config(8, 16, 1))):
            # issued from another thread than the server's, as the policy loop does
            t0 = time.monotonic()
            await asyncio.to_thread(ctl.core.issue_directive, job, config, f"move {gen}")
            got = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)),
                                         timeout=10)
            took = time.monotonic() - t0
            assert [d.generation for d in got] == [gen] * STREAMS
            assert {d.world_size for d in got} == {config.replicas}
            assert took < 5.0, f"{STREAMS} streams took {took:.1f} s to get generation {gen}"
        assert threading.active_count() <= threads_before + 2

        # stop() ends every open stream at once, saying why
        t0 = time.monotonic()
        await asyncio.to_thread(ctl.stop, 0.2)
        ends = []
        for c in calls:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(c.read(), 5)
            ends.append((e.value.code(), e.value.details()))
        assert set(ends) == {(grpc.StatusCode.UNAVAILABLE,
                              "the controller is shutting down")}, set(ends)
        assert time.monotonic() - t0 < 5.0
        assert _watching(ctl, "wide") == 0

    _run(ctl, scenario)


@pytest.mark.timeout(60)
def test_cancelled_streams_are_counted_out_and_one_agent_holds_a_bounded_number():
    ctl = _controller()

    async def scenario(stub, calls):
        (agent,) = await _register(stub, "one", 1)
        cap = ControllerService.MAX_WATCHES_PER_AGENT
        n = cap + 4
        req = pb.WatchDirectivesRequest(job_id="one", agent_id=agent)
        for i in range(n):
            calls.append(stub.WatchDirectives(req, timeout=30))
            if i < cap:
                assert await _until(lambda: _watching(ctl, "one") == i + 1)
                continue
            # one more than the cap: the agent's oldest open stream ends, saying why
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(calls[i - cap].read(), 5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "newer directive stream" in e.value.details()
            assert await _until(lambda: _watching(ctl, "one") == cap)
        ctl.core.issue_directive(ctl.core.registry.job("one"), Config(2, 16, 0), "x")
        got = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls[4:])), 10)
        assert [d.generation for d in got] == [1] * (n - 4)
        for c in calls[4:]:
            c.cancel()
        assert await _until(lambda: _watching(ctl, "one") == 0), _watching(ctl, "one")

    _run(ctl, scenario)


@pytest.mark.timeout(60)
def test_calls_beyond_max_concurrent_rpcs_are_refused():
    ctl = _controller(max_concurrent_rpcs=20)

    async def scenario(stub, calls):
        agents = await _register(stub, "many", 30)
        calls.extend(stub.WatchDirectives(pb.WatchDirectivesRequest(
            job_id="many", agent_id=a), timeout=3) for a in agents)
        codes = []
        for c in calls:
            try:
                while await c.read() is not grpc.aio.EOF:
                    pass
                codes.append(await c.code())
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 10, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED,
                              grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        # the limit counts calls in progress: once they ended, calls are served again. A
        # stream the client gave up on (its deadline) ends on the server a moment later, so
        # the first call after may still be refused; within seconds one is served.
        deadline = time.monotonic() + 10
        while True:
            try:
                resp = await stub.ListJobs(pb.ListJobsRequest(job_id="many"), timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert time.monotonic() < deadline, "still refused 10 s after the calls ended"
                await asyncio.sleep(0.1)
        assert len(resp.jobs[0].agents) == 30

    _run(ctl, scenario)


@pytest.mark.timeout(60)
def test_set_bounds_runs_off_the_event_loop():
    """A slow policy run (SetBounds) does not stall report streams of other jobs."""
    ctl = _controller()
    release = threading.Event()
    original = ctl.core.set_bounds

    def slow_set_bounds(*args):
        release.wait(10)
        return original(*args)
    ctl.core.set_bounds = slow_set_bounds

    async def scenario(stub, calls):
        try:
            (a,) = await _register(stub, "slow", 1)
            (b,) = await _register(stub, "fast", 1)
            pending = asyncio.ensure_future(stub.SetBounds(pb.SetBoundsRequest(
                job_id="slow", min_workers=1, max_workers=2), timeout=20))
            await asyncio.sleep(0.2)
            assert not pending.done()
            # while SetBounds waits, the loop serves another job's calls
            t0 = time.monotonic()
            resp = await stub.ListJobs(pb.ListJobsRequest(job_id="fast"), timeout=5)
            assert resp.jobs[0].job_id == "fast" and time.monotonic() - t0 < 2.0
            release.set()
            status = await asyncio.wait_for(pending, 10)
            assert (status.bounds.min_workers, status.bounds.max_workers) == (1, 2)
        finally:
            release.set()       # the executor thread never outwaits the test

    _run(ctl, scenario)
