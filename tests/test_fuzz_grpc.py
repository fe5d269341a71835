"""Fuzz the controller's real gRPC surface while an honest job keeps training.

One in-process ``Controller`` (no /metrics, no rendezvous store) on 127.0.0.1. Hypothesis sends
every RPC (Register, StreamReports, WatchDirectives, ListJobs, SetBounds):

- raw random bytes, and valid messages with bytes flipped, cut or inserted, through a generic
  channel method (no serializer), so the server's own parsing is what is fuzzed;
- well-typed messages with any value a field can hold (out-of-range integers, NaN, inf,
  negative sizes, strings up to and beyond the 1 MiB message limit), unknown jobs and agent
  ids that were never registered;
- floods: a burst of reports over the job's rate limit, many concurrent directive streams.

Meanwhile an honest job streams a report every 50 ms and follows its directives. The test
asserts that every call ends in a gRPC status within its deadline (never a hang), that each
rejection carries an expected code (never UNKNOWN / INTERNAL) and a message, that the honest
job's reports keep being accepted (no gap over ``ACK_GAP_S``) and its directive generation still
moves afterwards, and that the process RSS grows by less than ``RSS_GROWTH_MB`` (peak printed).

CI runs a few hundred cases per test (well under 40 s). A long run:

    ADAPTRUN_FUZZ_EXAMPLES=20000 timeout 3600 pytest -q -s tests/test_fuzz_grpc.py -p no:timeout

(``-s`` shows the figures: cases run, acks of the honest job, peak RSS). A coverage-guided run
with atheris (not in CI): ``python tests/fuzz/fuzz_grpc_atheris.py -runs=100000``.
"""
from __future__ import annotations

import math
import os
import resource
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from google.protobuf.descriptor import FieldDescriptor

from adaptrun.generated import control_plane_pb2 as pb
from controller_support import AGENT, BOUNDS, channel_to, register, report, running_controller

EXAMPLES = int(os.environ.get("ADAPTRUN_FUZZ_EXAMPLES", "0")) or None
CALL_TIMEOUT_S = 10.0            # a unary call or a report stream must end by then
WATCH_TIMEOUT_S = 0.3            # a directive stream stays open by design: cut it short
ACK_GAP_S = 8.0                  # the honest job's longest wait for an ack (loaded CI machine)
RSS_GROWTH_MB = 300.0
MAX_MESSAGE = 1 << 20            # ControllerConfig.max_message_bytes
HONEST = "honest"
FUZZ_JOBS = ("fuzz-a", "fuzz-b")

SERVICE = "/adaptrun.v1.Controller/"
METHODS = {  # name -> (request class, kind)
    "Register": (pb.RegisterRequest, "unary"),
    "StreamReports": (pb.Report, "stream"),
    "WatchDirectives": (pb.WatchDirectivesRequest, "watch"),
    "ListJobs": (pb.ListJobsRequest, "unary"),
    "SetBounds": (pb.SetBoundsRequest, "unary"),
}
# Statuses a rejection may end with; OK is not an error. DEADLINE_EXCEEDED is allowed only
# for a directive stream (open until cancelled, by design).
REJECTIONS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.PERMISSION_DENIED}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- strategies -------------------------------------------------------------------------
_INT_RANGES = {FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
               FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1)}


def _ints(lo: int, hi: int):
    edges = [lo, hi, -1, 0, 1, 2, 3, 64, 1 << 20, 1 << 30, 1 << 53, (1 << 53) + 1, lo + 1, hi - 1]
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]),
                     st.integers(-1000, 1000), st.integers(lo, hi))


def _texts():
    sizes = [0, 1, 63, 64, 65, 129, 257, 20000, MAX_MESSAGE - 200, MAX_MESSAGE + 100]
    big = st.tuples(st.sampled_from(sizes), st.sampled_from("x\u00e9\x00\n ")).map(
        lambda t: t[1] * t[0])
    return st.one_of(st.sampled_from(list(FUZZ_JOBS) + [HONEST, "nobody", "", "bad job!",
                                                         "a" * 64, "-x"]),
                     st.text(max_size=40), big)


def _field_value(f: FieldDescriptor, depth: int):
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(f.message_type._concrete_class, depth + 1)
    if f.type in _INT_RANGES:
        return _ints(*_INT_RANGES[f.type])
    if f.type == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0,
                                          1e308, 5e-324, 0.5]), st.floats())
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_STRING:
        return _texts()
    raise AssertionError(f"no strategy for {f.full_name}")


def _message(cls, depth: int = 0):
    """Any message of ``cls``: each field unset or any value of its type."""
    fields = [f for f in cls.DESCRIPTOR.fields if not (f.type == FieldDescriptor.TYPE_MESSAGE
                                                        and depth > 1)]
    return st.fixed_dictionaries({}, optional={f.name: _field_value(f, depth) for f in fields}
                                 ).map(lambda kw: cls(**kw))


def _near_valid(cls, valid):
    """A valid message with one to three fields set to anything of their type."""
    fields = list(cls.DESCRIPTOR.fields)
    return st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True).flatmap(
        lambda fs: st.tuples(*[_field_value(f, 0) for f in fs]).map(
            lambda vals: _override(valid(), fs, vals)))


def _override(msg, fs, vals):
    for f, v in zip(fs, vals):
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(v)
        else:
            setattr(msg, f.name, v)
    return msg


def _valid(name: str, agents: dict):
    job = FUZZ_JOBS[0]
    return {
        "Register": lambda: pb.RegisterRequest(job_id=job, node="fz0", slots=1,
                                               address="127.0.0.1:1", bounds=BOUNDS),
        "StreamReports": lambda: report(job, step=5, world_size=1, local_batch=64),
        "WatchDirectives": lambda: pb.WatchDirectivesRequest(job_id=job, agent_id=agents[job]),
        "ListJobs": lambda: pb.ListJobsRequest(job_id=job),
        "SetBounds": lambda: pb.SetBoundsRequest(job_id=job, min_workers=1, max_workers=2),
    }[name]


def _mutated(data: bytes):
    """``data`` with a few bytes flipped, cut, or inserted."""
    return st.one_of(
        st.integers(0, max(len(data) - 1, 0)).map(lambda n: data[:n]),
        st.lists(st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255)),
                 min_size=1, max_size=4).map(lambda ps: _flip(data, ps)),
        st.tuples(st.integers(0, len(data)), st.binary(min_size=1, max_size=12)).map(
            lambda t: data[:t[0]] + t[1] + data[t[0]:]))


def _flip(data: bytes, ps) -> bytes:
    b = bytearray(data)
    for i, v in ps:
        if b:
            b[i % len(b)] = v
    return bytes(b)


# -- the server under fuzz, and the honest job ------------------------------------------
class Honest(threading.Thread):
    """An agent that reports every 50 ms on one stream and follows its directives."""

    def __init__(self, stub):
        super().__init__(daemon=True)
        self.stub = stub
        self.agent_id = register(stub, HONEST, node="h0", bounds=pb.JobBounds(
            min_workers=1, max_workers=4)).agent_id
        self.stop = threading.Event()
        self.ack_times: list[float] = []
        self.generations: list[int] = []
        self.errors: list[str] = []
        self.directive = pb.Directive()
        self.peak_rss_mb = _rss_mb()
        self._watch = None

    def _follow(self):
        self._watch = self.stub.WatchDirectives(pb.WatchDirectivesRequest(
            job_id=HONEST, agent_id=self.agent_id))
        try:
            for d in self._watch:
                self.directive = d
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"watch: {exc.code()}: {exc.details()}")

    def _reports(self):
        step = 0
        while not self.stop.is_set():
            step += 1
            d = self.directive
            world = d.world_size or 2
            local = d.local_batch or 32
            accum = d.accum_steps if d.world_size else 0
            t = 0.05 * local * (accum + 1) / 32 + 0.01 * world
            yield report(HONEST, step=step, world_size=world, local_batch=local,
                         accum_steps=accum, init_batch=64, max_batch=1024, local_batch_min=8,
                         local_batch_max=128, accumulation=True, step_time_s=t,
                         sync_time_s=0.01 * world, generation=d.generation,
                         grad_sqr=1.0, grad_var=50.0 + step, time_s=step * t)
            self.peak_rss_mb = max(self.peak_rss_mb, _rss_mb())
            time.sleep(0.05)

    def run(self):
        watcher = threading.Thread(target=self._follow, daemon=True)
        watcher.start()
        while not self.stop.is_set():
            try:
                for ack in self.stub.StreamReports(self._reports(),
                                                   metadata=((AGENT, self.agent_id),)):
                    self.ack_times.append(time.monotonic())
                    self.generations.append(ack.generation)
            except grpc.RpcError as exc:
                self.errors.append(f"reports: {exc.code()}: {exc.details()}")
                time.sleep(0.1)
        self._watch.cancel()
        watcher.join(timeout=10)

    def max_gap_s(self, since: float) -> float:
        times = [since] + [t for t in self.ack_times if t >= since] + [time.monotonic()]
        return max(b - a for a, b in zip(times, times[1:]))


@pytest.fixture(scope="module")
def server():
    with running_controller(metrics_port=None, rdzv_port=None, report_rate_per_s=200.0,
                            report_burst=400, max_threads=32) as ctl, \
            channel_to(ctl) as (ch, stub):
        agents = {job: register(stub, job, node="fz0").agent_id for job in FUZZ_JOBS}
        honest = Honest(stub)
        honest.start()
        deadline = time.monotonic() + 10
        while len(honest.ack_times) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        rss0 = _rss_mb()
        state = dict(ctl=ctl, ch=ch, stub=stub, agents=agents, honest=honest, rss0=rss0,
                     cases=0, codes={}, t0=time.monotonic())
        try:
            yield state
        finally:
            honest.stop.set()
            honest.join(timeout=15)


# -- calls ------------------------------------------------------------------------------
def _check_status(exc: grpc.RpcError, kind: str, what: str):
    code, details = exc.code(), exc.details()
    if kind == "watch" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return
    assert code in REJECTIONS, f"{what}: {code} {details!r}"
    assert details and details.strip(), f"{what}: {code} without a message"


def _call_raw(state, name: str, payloads: list[bytes], agent_id: str | None):
    """Send ``payloads`` as the raw request bytes of method ``name``; check how it ends."""
    ch = state["ch"]
    kind = METHODS[name][1]
    what = f"{name}({[p[:40] for p in payloads]!r}...)"
    md = ((AGENT, agent_id),) if agent_id is not None else None
    t0 = time.monotonic()
    result, code = None, grpc.StatusCode.OK
    try:
        if kind == "unary":
            result = ch.unary_unary(SERVICE + name)(payloads[0], timeout=CALL_TIMEOUT_S)
        elif kind == "stream":
            list(ch.stream_stream(SERVICE + name)(iter(payloads), metadata=md,
                                                  timeout=CALL_TIMEOUT_S))
        else:
            call = ch.unary_stream(SERVICE + name)(payloads[0], timeout=WATCH_TIMEOUT_S)
            for _ in call:
                pass
    except grpc.RpcError as exc:
        _check_status(exc, kind, what)
        code = exc.code()
    assert time.monotonic() - t0 < CALL_TIMEOUT_S + 2, f"{what} did not end in time"
    state["cases"] += 1
    state["codes"][f"{name} {code.name}"] = state["codes"].get(f"{name} {code.name}", 0) + 1
    return result


def _honest_still_going(state):
    h: Honest = state["honest"]
    assert not h.errors, h.errors[:5]
    gap = h.max_gap_s(state["t0"])
    assert gap < ACK_GAP_S, f"the honest job waited {gap:.1f} s for an ack"


_FUZZ_SETTINGS = dict(deadline=None, derandomize=EXAMPLES is None, database=None,
                      suppress_health_check=list(HealthCheck))


@st.composite
def _raw_case(draw, agents):
    name = draw(st.sampled_from(list(METHODS)))
    cls = METHODS[name][0]
    valid = _valid(name, agents)().SerializeToString()
    n = draw(st.integers(1, 3)) if METHODS[name][1] == "stream" else 1
    payloads = [draw(st.one_of(st.binary(max_size=200), _mutated(valid),
                               st.just(valid + b"\x10"),          # a dangling tag
                               st.just(b"\x0a\xff\xff\xff\xff\x0f")))  # a length over the end
                for _ in range(n)]
    agent = draw(st.sampled_from([agents[FUZZ_JOBS[0]], "", "0" * 16, "\x00"]))
    return name, payloads, agent


@pytest.mark.timeout(300)
def test_raw_bytes_to_every_rpc(server):
    @settings(max_examples=EXAMPLES or 250, **_FUZZ_SETTINGS)
    @given(_raw_case(server["agents"]))
    def case(c):
        name, payloads, agent = c
        _call_raw(server, name, payloads, agent if agent.isprintable() and agent else None)

    case()
    _honest_still_going(server)


@st.composite
def _typed_case(draw, agents):
    name = draw(st.sampled_from(list(METHODS)))
    cls = METHODS[name][0]
    msg_st = st.one_of(_message(cls), _near_valid(cls, _valid(name, agents)))
    n = draw(st.integers(1, 3)) if METHODS[name][1] == "stream" else 1
    msgs = [draw(msg_st) for _ in range(n)]
    if name == "SetBounds":             # an operator may move the honest job; a fuzzer not
        for m in msgs:
            if m.job_id == HONEST:
                m.job_id = FUZZ_JOBS[1]
    agent = draw(st.sampled_from(list(agents.values()) + ["", "not-an-agent"]))
    return name, msgs, agent


@pytest.mark.timeout(300)
def test_typed_messages_with_any_values(server):
    @settings(max_examples=EXAMPLES or 200, **_FUZZ_SETTINGS)
    @given(_typed_case(server["agents"]))
    def case(c):
        name, msgs, agent = c
        _call_raw(server, name, [m.SerializeToString() for m in msgs], agent or None)

    case()
    _honest_still_going(server)


@st.composite
def _session(draw):
    """A new job registered with fuzzed fields, then fuzzed reports, directive watches,
    bounds and listings of that job, from its own agent."""
    job = draw(st.sampled_from([f"fz-{i}" for i in range(40)]))
    reg = draw(_near_valid(pb.RegisterRequest, lambda: pb.RegisterRequest(
        job_id=job, node="n0", slots=2, address="127.0.0.1:1", bounds=BOUNDS)))
    if reg.job_id == HONEST:
        reg.job_id = job
    near = lambda: report(reg.job_id, step=3, world_size=2, local_batch=32)  # noqa: E731
    reports = draw(st.lists(_near_valid(pb.Report, near), min_size=1, max_size=4))
    watch = draw(_near_valid(pb.WatchDirectivesRequest, lambda: pb.WatchDirectivesRequest(
        job_id=reg.job_id)))
    bounds = draw(_near_valid(pb.SetBoundsRequest, lambda: pb.SetBoundsRequest(
        job_id=reg.job_id, min_workers=1, max_workers=3)))
    if bounds.job_id == HONEST:
        bounds.job_id = job
    return reg, reports, watch, bounds


@pytest.mark.timeout(300)
def test_fuzzed_jobs_end_to_end(server):
    @settings(max_examples=EXAMPLES or 80, **_FUZZ_SETTINGS)
    @given(_session())
    def case(c):
        reg, reports, watch, bounds = c
        out = _call_raw(server, "Register", [reg.SerializeToString()], None)
        agent = pb.RegisterResponse.FromString(out).agent_id if out is not None else "none"
        _call_raw(server, "StreamReports", [r.SerializeToString() for r in reports], agent)
        if not watch.agent_id:
            watch.agent_id = agent
        _call_raw(server, "WatchDirectives", [watch.SerializeToString()], None)
        _call_raw(server, "SetBounds", [bounds.SerializeToString()], None)
        # Bounds that exclude the reported world: a directive must be issued (and listed).
        _call_raw(server, "SetBounds", [pb.SetBoundsRequest(
            job_id=reg.job_id, min_workers=3, max_workers=3).SerializeToString()], None)
        _call_raw(server, "ListJobs", [pb.ListJobsRequest(job_id=reg.job_id).SerializeToString()],
                  None)
        _call_raw(server, "ListJobs", [b""], None)

    case()
    time.sleep(0.5)                     # let the policy loop decide the fuzzed jobs
    _honest_still_going(server)


@pytest.mark.timeout(60)
def test_inputs_the_fuzzer_found(server):
    """Regressions: each of these once took the controller down for every job."""
    stub = server["stub"]

    def rejected(fn, message):
        with pytest.raises(grpc.RpcError) as info:
            fn()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert message in info.value.details()

    # A generation of 2^63-1 made the job's next directive overflow int64: Register and
    # ListJobs (of every job) then failed with UNKNOWN.
    rejected(lambda: register(stub, "gen-job", last_generation=2**63 - 1),
             "last_generation must be in [0, 9007199254740992]")
    agent = register(stub, "gen-job", last_generation=1 << 53).agent_id
    rejected(lambda: list(stub.WatchDirectives(pb.WatchDirectivesRequest(
        job_id="gen-job", agent_id=agent, last_generation=2**63 - 1), timeout=5)),
        "last_generation must be in")
    send(stub, agent, [report("gen-job", world_size=1, local_batch=64)])
    status = stub.SetBounds(pb.SetBoundsRequest(job_id="gen-job", min_workers=2, max_workers=2),
                            timeout=CALL_TIMEOUT_S)
    assert status.directive.generation == (1 << 53) + 1
    assert len(stub.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S).jobs) >= 2
    # Two billion workers (bounds, report or new bounds), or 2^31 accumulation steps, made
    # the policy's candidate grid take gigabytes and its one thread for every job.
    rejected(lambda: register(stub, "big", bounds=pb.JobBounds(min_workers=1,
                                                               max_workers=2**31 - 1)),
             "exceed the controller's 4096 workers per job")
    rejected(lambda: register(stub, "big", bounds=pb.JobBounds(
        min_workers=1, max_workers=4, max_accum_steps=2**31 - 1)),
        "max_accum_steps must be in [0, 32]")
    rejected(lambda: send(stub, agent, [report("gen-job", world_size=2**31 - 1, nodes=1)]),
             "world_size 2147483647 exceeds the controller's 4096 workers per job")
    rejected(lambda: stub.SetBounds(pb.SetBoundsRequest(job_id="gen-job", min_workers=1,
                                                        max_workers=2**31 - 1), timeout=5),
             "exceed the controller's 4096 workers per job")


def send(stub, agent_id, reports):
    return list(stub.StreamReports(iter(reports), metadata=((AGENT, agent_id),),
                                   timeout=CALL_TIMEOUT_S))


@pytest.mark.timeout(120)
def test_floods(server):
    ch, stub, agents = server["ch"], server["stub"], server["agents"]
    job = FUZZ_JOBS[1]
    # Reports over the job's rate limit (200/s, burst 400): refused, saying so.
    good = report(job, step=1, world_size=1, local_batch=64).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        list(ch.stream_stream(SERVICE + "StreamReports")(
            iter([good] * 2000), metadata=((AGENT, agents[job]),), timeout=60))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "faster than" in info.value.details()
    # More concurrent directive streams than handler threads: the surplus is refused at once,
    # the rest end at their deadline; the honest job's open streams are untouched.
    watch = ch.unary_stream(SERVICE + "WatchDirectives")
    req = pb.WatchDirectivesRequest(job_id=job, agent_id=agents[job]).SerializeToString()
    calls = [watch(req, timeout=1.5) for _ in range(48)]
    codes = []
    for c in calls:
        try:
            for _ in c:
                pass
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            _check_status(exc, "watch", "watch flood")
            codes.append(exc.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    server["cases"] += 2000 + len(calls)
    # Registrations of many nodes and unknown jobs, and many listings.
    for i in range(200):
        _call_raw(server, "Register", [pb.RegisterRequest(
            job_id=job, node=f"flood-{i}", slots=1, address="127.0.0.1:1",
            bounds=BOUNDS).SerializeToString()], None)
        _call_raw(server, "ListJobs", [b""], None)
        _call_raw(server, "SetBounds", [pb.SetBoundsRequest(
            job_id=f"nobody-{i}", min_workers=1, max_workers=2).SerializeToString()], None)
    time.sleep(1.0)
    _honest_still_going(server)


@pytest.mark.timeout(60)
def test_honest_job_still_decided_and_memory_bounded(server):
    """Runs last: after all the fuzzing, the honest job's reports are still accepted and an
    operator's new bounds still move its directive generation."""
    stub, h = server["stub"], server["honest"]
    ctl = server["ctl"]
    accepted = ctl.core.registry.job(HONEST).accepted
    time.sleep(0.5)
    assert ctl.core.registry.job(HONEST).accepted > accepted
    gen = h.directive.generation
    cur = h.directive.world_size or 2
    target = 4 if cur != 4 else 3
    stub.SetBounds(pb.SetBoundsRequest(job_id=HONEST, min_workers=target, max_workers=target),
                   timeout=CALL_TIMEOUT_S)
    deadline = time.monotonic() + 10
    while h.directive.generation <= gen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h.directive.generation > gen and h.directive.world_size == target, h.directive
    _honest_still_going(server)
    growth = h.peak_rss_mb - server["rss0"]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nfuzz: {server['cases']} cases; honest job {len(h.ack_times)} acks, "
          f"generation {h.directive.generation}; RSS {server['rss0']:.0f} MB at start, "
          f"peak {h.peak_rss_mb:.0f} MB during the run (+{growth:.0f} MB), "
          f"process max {peak_kb / 1024:.0f} MB")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(server["codes"].items())))
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB"
