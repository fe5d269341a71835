"""Controller ingestion under load: reports per second and report latency with many agents.

    python benchmarks/controller_load.py                      # 1,000 agents, 100 jobs x 10 nodes, 10 s
    python benchmarks/controller_load.py --jobs 1000          # one job per agent
    python benchmarks/controller_load.py --interval-s 2       # paced like real agents (not saturating)

The three figures of the grpc.aio server's goal (issue: no thread per stream):

    # 10,000 connected agents (two streams each, like real ones), paced at one report per 2 s:
    # p50 / p99 latency and the controller's peak RSS
    python benchmarks/controller_load.py --agents 10000 --interval-s 2 --watch-directives \\
        --load-procs 2 --duration-s 30
    # saturated ingestion with the controller pinned to one core (the load on the others)
    python benchmarks/controller_load.py --agents 1000 --controller-cpus 0 --load-procs 2 \\
        --duration-s 20

What runs (all on 127.0.0.1, ports picked by the OS):

* The controller, in a subprocess of its own (its own GIL, its own pid for CPU and memory
  figures): ``Controller(ControllerConfig(...)).start()``, the same code ``adaptrun
  controller`` runs, with ControllerConfig's defaults for the server (``max_threads``,
  ``max_concurrent_rpcs``): the grpc.aio server holds no thread per stream. Not ``python -m
  adaptrun.cli controller`` itself: that command has no option for the per-job report rate
  limit (20 reports/s, burst 40 per job by default), and this benchmark measures ingestion,
  not the rate limiter, so the limit is raised out of reach (1e9/s) unless
  ``--keep-rate-limit``. ``--controller-cpus 0`` pins it (``os.sched_setaffinity``) to those
  CPUs; the load generators then run on the other CPUs (``--load-cpus`` to choose). Its peak
  RSS is /proc/<pid>/status VmHWM.
* ``--load-procs`` load generators (multiprocessing, grpc.aio): each simulated agent
  registers (job ``job-J``, node ``node-N``; ``--jobs`` jobs, agents spread round-robin over
  them), opens its own channel (own TCP connection, like a real agent) and one StreamReports
  stream, and sends valid reports built from ``adaptrun.science.report.Report`` with
  ``report_to_proto``. Latency is send -> matching ReportAck (same step), one report in flight
  per agent. ``--interval-s 0`` (default) sends the next report as soon as the ack arrives:
  a closed loop that measures what the controller can ingest; ``--interval-s 2`` paces each
  agent like a real one (the controller asks for a report every 2 s). Paced, agents ask for
  no acks (stream metadata ``adaptrun-report-acks: 0``), as the agent's own client does,
  except every ``--ack-probe-every``-th (10): those read one ack per report and time it, so
  the latency is sampled by probes whose reports queue with everyone else's.
* A rejected report ends its stream (the controller's contract); the agent counts it by
  status code and opens a new stream.
* The load generators are the instrument: each collects its garbage once before the window
  and runs the window with CPython's collector off (its passes over 10,000 simulated agents'
  objects took 0.1-0.9 s, stalls of the loop that times the acks, which were counted as the
  controller's latency), and measures its own event-loop stalls (a 5-ms sleep's overshoot),
  printed beside the latency: what they add to it.

Only reports *sent* inside the measured window count. Accepted counts are cross-checked
against the controller's own (ListJobs before and after the window). Printed, not asserted;
absolute rates depend on this (shared) machine, so the table also gives ratios: headroom
over the rate the agents need at the controller's report interval, and controller CPU per
report. The load generators are Python too and cost about as much CPU per report as the
controller: on a machine with few cores they compete with it (the table says how much CPU
they took), so a paced run of many agents there measures the two together.

The figures of the thread-per-stream (sync) server it replaced are printed beside, as
constants (``SYNC_SERVER``): that server is gone from the tree.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import gc
import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
NO_LIMIT = 1e9          # reports/s and burst: the rate limiter never says no

# The thread-per-stream (sync) server, as measured with this benchmark (its defaults: 1,000
# agents, 100 jobs, the stream limit raised to hold every stream) and committed in the
# README at 2904f41; the server is gone from the tree, so these are constants.
SYNC_SERVER = {
    "commit": "2904f41",
    "saturated": "1,000-1,400 reports/s, p50 0.75-1.1 s / p99 1.3-2.1 s (queueing), one core, "
                 "1,000 agents",
    "paced": "1,000 agents at 1 report / 2 s: 499 reports/s, p50 3 ms / p99 36 ms, 65 % of a "
             "core",
    "threads": "one thread per open stream (max_threads had to exceed 2 x agents)",
}
GOALS = {"agents": 10_000, "reports_per_s_one_core": 5_000, "p99_ms_paced": 50.0}


# --- the controller process -------------------------------------------------------------

def serve_controller(cfg: dict) -> None:
    """Run a controller until stdin closes (the parent is gone) or SIGTERM; print its ports."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides when we stop
    cpus = cfg.pop("_cpus", None)
    if cpus:
        os.sched_setaffinity(0, cpus)     # before any thread: they all inherit it
    import logging

    from adaptrun.controller.core import ControllerConfig
    from adaptrun.controller.server import Controller

    logging.basicConfig(level=logging.WARNING,
                        format="controller: %(asctime)s %(levelname)s %(name)s: %(message)s")
    ctl = Controller(ControllerConfig(**cfg)).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def stdin_closed():
        sys.stdin.buffer.read()      # EOF when the parent exits, however it exits
        done.set()
    threading.Thread(target=stdin_closed, daemon=True).start()
    print(f"PORT {ctl.port} {ctl.metrics_port}", flush=True)
    done.wait()
    ctl.stop(grace_s=0.5)


def proc_memory(pid: int) -> tuple[int, int]:
    """(peak RSS VmHWM, RSS VmRSS) of ``pid`` in bytes, from /proc/<pid>/status."""
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                got[key] = int(value.split()[0]) * 1024
    return got.get("VmHWM", 0), got.get("VmRSS", 0)


def proc_stat(pid: int) -> tuple[float, int, int]:
    """(CPU seconds user+system, threads, RSS bytes) of ``pid`` from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, num_threads 20, rss 24.
    tck = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / tck, int(fields[17]),
            int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))


# --- the load generators ----------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def load_main(idx: int, port: int, agents: list[tuple[int, str, str]], opts: dict,
              ready, go, results) -> None:
    """One load process: its agents register and stream; results go to ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent ends us
    if opts.get("cpus"):
        os.sched_setaffinity(0, opts["cpus"])
    threading.Thread(target=_watch_parent, args=(opts["parent_pid"],), daemon=True).start()
    try:
        out = asyncio.run(_load(port, agents, opts, ready, go))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which says why
        out = {"error": f"{type(exc).__name__}: {exc}"}
        ready.put(("error", f"load process {idx}: {out['error']}"))
    results.put((idx, out))


async def _load(port, agents, opts, ready, go):
    import grpc

    from adaptrun.generated import control_plane_pb2 as pb
    from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
    from adaptrun.agents.controller_client import (AGENT_ID_METADATA, REPORT_ACKS_METADATA,
                                                   report_to_proto)
    from adaptrun.science.report import Report

    target = f"{HOST}:{port}"
    interval = opts["interval_s"]
    slots, nodes_per_job = opts["slots"], opts["nodes_per_job"]
    bounds = pb.JobBounds(min_workers=1, max_workers=4 * nodes_per_job * slots, init_batch=256,
                          max_global_batch=16384, local_batch_min=16, local_batch_max=256)
    # One channel (TCP connection) per agent, like real agents; a local subchannel pool
    # keeps grpc from sharing one connection among equal channels.
    # ... and no BDP probing, as the agent's own channel (ClientCredentials.channel).
    ch_opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    n_channels = max(1, min(opts["connections"], len(agents)))
    channels = [grpc.aio.insecure_channel(target, options=ch_opts) for _ in range(n_channels)]
    stubs = [pb_grpc.ControllerStub(c) for c in channels]

    lat = array.array("d")                 # ms, reports sent inside the window
    counts = {"accepted": 0, "rejected": 0, "mismatched": 0, "reopened": 0, "warmup": 0}
    rejected_by: dict[str, int] = {}
    window = {"start": math.inf, "end": math.inf}
    started = asyncio.Event()
    reg_sem = asyncio.Semaphore(64)        # registrations in flight

    def make_report(job_id: str, nodes: int, step: int, rng: random.Random) -> pb.Report:
        world = nodes * slots
        local = 32
        sync = 0.02 + 0.01 * nodes * rng.random()
        return report_to_proto(Report(
            job_id=job_id, step=step, progress=step * world * local / 256.0, world_size=world,
            nodes=nodes, local_batch=local, accum_steps=0, init_batch=256,
            step_time_s=0.25 + 0.05 * rng.random() + sync, sync_time_s=sync,
            grad_sqr=1.0 + 0.1 * rng.random(), grad_var=40.0 + 4.0 * rng.random(),
            loss=2.0 / (1.0 + step / 1000.0), lr=0.1 * world * local / 256.0,
            epoch=step // 500, target_progress=100_000.0, time_s=0.3 * step))

    async def agent(i: int, job_id: str, node: str) -> None:
        rng = random.Random(i)
        stub = stubs[i % n_channels]
        async with reg_sem:
            resp = await stub.Register(pb.RegisterRequest(
                job_id=job_id, node=node, slots=slots, address=f"{HOST}:{20000 + i}",
                bounds=bounds), timeout=60)
        # Paced, most agents ask for no acks, as the real agent's client does; every
        # ack_probe_every-th one reads an ack per report and times it (the latency probes).
        probe = interval <= 0 or i % opts["ack_probe_every"] == 0
        md = ((AGENT_ID_METADATA, resp.agent_id),) + (
            () if probe else ((REPORT_ACKS_METADATA, "0"),))
        watch = stub.WatchDirectives(pb.WatchDirectivesRequest(
            job_id=job_id, agent_id=resp.agent_id)) if opts["watch"] else None
        step = 0
        call = None
        warmed = False
        offset = 0.0          # this agent's phase in the pacing interval, set once warmed
        try:
            while True:
                if call is None:
                    call = stub.StreamReports(metadata=md)
                if warmed and started.is_set() and interval > 0:
                    # paced: report k of this agent at window start + offset + k * interval
                    k = max(0, math.ceil((time.monotonic() - window["start"] - offset) / interval))
                    wake = window["start"] + offset + k * interval
                    await asyncio.sleep(max(0.0, wake - time.monotonic()))
                if warmed and time.monotonic() >= window["end"]:
                    break
                step += 1
                msg = make_report(job_id, nodes_per_job, step, rng)
                t0 = time.monotonic()
                try:
                    await call.write(msg)
                    ack = await call.read() if probe else None
                except grpc.aio.AioRpcError as exc:
                    ack = exc
                t1 = time.monotonic()
                in_window = window["start"] <= t0 < window["end"]
                if isinstance(ack, grpc.aio.AioRpcError) or ack is grpc.aio.EOF:
                    code = ack.code() if ack is not grpc.aio.EOF else await call.code()
                    if in_window:
                        counts["rejected"] += 1
                        rejected_by[code.name] = rejected_by.get(code.name, 0) + 1
                    counts["reopened"] += 1
                    call = None
                    continue
                if ack is not None and ack.step != step:
                    counts["mismatched"] += 1
                if not warmed:
                    warmed = True
                    counts["warmup"] += 1
                    offset = rng.random() * interval if interval > 0 else 0.0
                    if counts["warmup"] == len(agents):
                        ready.put(("ready", len(agents)))
                    await started.wait()
                    continue
                if in_window:
                    counts["accepted"] += 1
                    if probe:
                        lat.append((t1 - t0) * 1e3)
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        finally:
            if call is not None:
                call.cancel()
            if watch is not None:
                watch.cancel()

    tasks = [asyncio.create_task(agent(i, j, n)) for i, j, n in agents]
    failed = []

    async def watch_tasks():
        for t in asyncio.as_completed(tasks):
            try:
                await t
            except Exception as exc:  # noqa: BLE001
                failed.append(f"{type(exc).__name__}: {exc}")
                if len(failed) == 1 and not started.is_set():
                    ready.put(("error", failed[0]))
    watcher = asyncio.create_task(watch_tasks())
    loop = asyncio.get_running_loop()
    # the parent puts the window's start (monotonic, system-wide on Linux) into ``go``
    t_start = await loop.run_in_executor(None, go.get)
    if t_start is None:                     # the parent gave up
        for t in tasks:
            t.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return {"error": "cancelled"}
    window["start"], window["end"] = t_start, t_start + opts["duration_s"]
    # This process is the measuring instrument: its own collector's passes over 10,000
    # agents' objects (0.1-0.9 s each) would stall the loop that times the acks and be
    # counted as the controller's latency. Collect once now, then leave it off in the window.
    gc.collect()
    gc.freeze()
    gc.disable()
    lag = asyncio.create_task(_loop_lag(window))
    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    cpu0 = time.process_time()
    started.set()
    await asyncio.sleep(max(0.0, window["end"] - time.monotonic()))
    cpu = time.process_time() - cpu0
    gc.enable()
    lag_ms = await lag
    try:
        await asyncio.wait_for(asyncio.shield(watcher), timeout=15)
    except asyncio.TimeoutError:
        failed.append("agents did not finish within 15 s after the window")
    for c in channels:
        await c.close()
    return {"counts": counts, "rejected_by": rejected_by, "lat": lat.tobytes(),
            "failed": failed[:5], "n_failed": len(failed), "cpu_s": cpu,
            "lag_ms": array.array("d", lag_ms).tobytes()}


async def _loop_lag(window: dict, period_s: float = 0.005) -> list[float]:
    """The load generator's own event-loop stalls in the window (ms beyond ``period_s``):
    an ack read late because this loop was busy is not the controller's latency, so the
    table prints how long this loop stalled beside the latency it measured."""
    lags = []
    while time.monotonic() < window["end"]:
        t0 = time.monotonic()
        await asyncio.sleep(period_s)
        if t0 >= window["start"]:
            lags.append((time.monotonic() - t0 - period_s) * 1e3)
    return lags


# --- the parent ---------------------------------------------------------------------------

def _stalls(lags_ms: list[float]) -> str:
    """The load generators' own event-loop stalls: latency they add to what they measure."""
    if not lags_ms:
        return "-"
    worst = sorted(lags_ms)
    over = sum(x > 10 for x in worst)
    return (f"p99 {percentile(worst, 99):.1f} ms, max {worst[-1]:.1f} ms, {over} over 10 ms "
            f"(the loop that times the acks; garbage collection off in the window)")


def controller_totals(port: int) -> tuple[int, int]:
    import grpc

    from adaptrun.generated import control_plane_pb2 as pb
    from adaptrun.generated import control_plane_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        jobs = pb_grpc.ControllerStub(ch).ListJobs(pb.ListJobsRequest(), timeout=30).jobs
    return sum(j.reports_accepted for j in jobs), sum(j.reports_rejected for j in jobs)


def policy_totals(metrics_port: int) -> tuple[int, float]:
    """(policy runs, seconds in them) summed over jobs, from the controller's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    runs, secs = 0, 0.0
    for line in text.splitlines():
        if line.startswith("adaptrun_policy_seconds_count{"):
            runs += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("adaptrun_policy_seconds_sum{"):
            secs += float(line.rsplit(" ", 1)[1])
    return runs, secs


def start_controller(cfg: dict, log) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_serve",
                             json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log, start_new_session=True)
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        proc.wait(timeout=10)
        log.seek(0)
        raise SystemExit("the controller did not start:\n" + log.read().decode()[-3000:])
    _, port, metrics_port = line.split()
    return proc, int(port), int(metrics_port)


def stop_process(proc) -> None:
    if proc is None:
        return
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
    else:                                   # multiprocessing.Process
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return math.nan
    k = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--agents", type=int, default=1000, help="simulated node agents")
    p.add_argument("--jobs", type=int, default=100,
                   help="jobs the agents belong to (agents spread round-robin: 100 jobs x 10 "
                        "nodes by default; --jobs equal to --agents: one job per agent)")
    p.add_argument("--duration-s", type=float, default=10.0, help="measured window")
    p.add_argument("--interval-s", type=float, default=0.0,
                   help="seconds between one agent's reports; 0: next as soon as acked "
                        "(saturates the controller)")
    p.add_argument("--load-procs", type=int, default=1, help="load-generator processes")
    p.add_argument("--connections", type=int, default=0,
                   help="gRPC connections per load process (0: one per agent)")
    p.add_argument("--watch-directives", action="store_true",
                   help="each agent also holds a WatchDirectives stream, as real agents do "
                        "(two streams per agent)")
    p.add_argument("--controller-cpus", default="",
                   help="pin the controller to these CPUs (comma-separated, e.g. 0: one core)")
    p.add_argument("--load-cpus", default="",
                   help="pin the load generators to these CPUs (default with "
                        "--controller-cpus: every other CPU, when there is one)")
    p.add_argument("--ack-probe-every", type=int, default=10,
                   help="paced mode: every Nth agent reads an ack per report and times it; the "
                        "others ask for no acks, as the real agent does (1: every agent acks)")
    p.add_argument("--keep-rate-limit", action="store_true",
                   help="keep the controller's default per-job rate limit (20/s, burst 40) "
                        "instead of lifting it")
    p.add_argument("--policy-interval-s", type=float, default=5.0,
                   help="the controller's policy cadence (its default: 5 s)")
    p.add_argument("--setup-timeout-s", type=float, default=None,
                   help="give up when the agents are not all streaming after this long "
                        "(default: 40 s + 10 ms per agent)")
    a = p.parse_args(argv)
    if a.setup_timeout_s is None:
        a.setup_timeout_s = 40.0 + 0.01 * a.agents

    def cpus(text, flag):
        try:
            got = sorted({int(c) for c in text.split(",") if c.strip()})
        except ValueError:
            p.error(f"{flag} takes CPU numbers separated by commas, got {text!r}")
        allowed = os.sched_getaffinity(0)
        if not set(got) <= allowed:
            p.error(f"{flag} {text}: this process may run on CPUs {sorted(allowed)} only")
        return got
    a.controller_cpus = cpus(a.controller_cpus, "--controller-cpus")
    a.load_cpus = cpus(a.load_cpus, "--load-cpus")
    if a.controller_cpus and not a.load_cpus:
        a.load_cpus = sorted(os.sched_getaffinity(0) - set(a.controller_cpus))
    if a.agents < 1 or not 1 <= a.jobs <= a.agents:
        p.error("need --agents >= 1 and 1 <= --jobs <= --agents")
    if a.duration_s <= 0 or a.interval_s < 0 or a.load_procs < 1 or a.ack_probe_every < 1:
        p.error("need --duration-s > 0, --interval-s >= 0, --load-procs >= 1, "
                "--ack-probe-every >= 1")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    # SIGTERM ends us like Ctrl-C does, so the cleanup below always runs.
    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C too, even where the shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    nodes_per_job = math.ceil(args.agents / args.jobs)
    streams = args.agents * (2 if args.watch_directives else 1)
    from adaptrun.controller.core import ControllerConfig
    defaults = ControllerConfig()
    # The server's own defaults (max_threads, max_concurrent_rpcs): no stream holds a thread.
    cfg = dict(host=HOST, port=0, metrics_port=0, max_jobs=max(defaults.max_jobs, args.jobs),
               policy_interval_s=args.policy_interval_s)
    if args.controller_cpus:
        cfg["_cpus"] = args.controller_cpus
    if not args.keep_rate_limit:
        cfg.update(report_rate_per_s=NO_LIMIT, report_burst=int(NO_LIMIT))
    rate = (f"per-job rate limit {defaults.report_rate_per_s:g}/s burst {defaults.report_burst}"
            " (controller default, kept)" if args.keep_rate_limit else
            f"per-job rate limit lifted to {NO_LIMIT:g}/s (measures ingestion, not the limiter)")

    controller = None
    loaders: list = []
    go_queues: list = []
    log = tempfile.TemporaryFile()
    t_begin = time.monotonic()
    try:
        controller, port, metrics_port = start_controller(cfg, log)
        _, rss_idle = proc_memory(controller.pid)
        agents = [(i, f"job-{i % args.jobs:04d}", f"node-{i // args.jobs:03d}")
                  for i in range(args.agents)]
        ctx = mp.get_context("spawn")
        ready, results = ctx.Queue(), ctx.Queue()
        per = [agents[k::args.load_procs] for k in range(args.load_procs)]
        conns = args.connections or args.agents
        for k, chunk in enumerate(per):
            go = ctx.Queue()
            opts = dict(interval_s=args.interval_s, duration_s=args.duration_s, slots=1,
                        nodes_per_job=nodes_per_job, watch=args.watch_directives,
                        connections=max(1, conns // args.load_procs), parent_pid=os.getpid(),
                        ack_probe_every=args.ack_probe_every,
                        cpus=args.load_cpus)
            p = ctx.Process(target=load_main, args=(k, port, chunk, opts, ready, go, results),
                            name=f"load-{k}", daemon=True)
            p.start()
            loaders.append(p)
            go_queues.append(go)
        deadline = time.monotonic() + args.setup_timeout_s
        n_ready = 0
        while n_ready < len(loaders):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"the agents were not all streaming after "
                                 f"{args.setup_timeout_s:g} s; try fewer --agents")
            try:
                what, detail = ready.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty
                if controller.poll() is not None:
                    log.seek(0)
                    raise SystemExit("the controller exited:\n" + log.read().decode()[-3000:])
                continue
            if what != "ready":
                raise SystemExit(f"a load process failed while setting up: {detail}")
            n_ready += 1
        setup_s = time.monotonic() - t_begin
        _, rss_setup = proc_memory(controller.pid)
        acc0, rej0 = controller_totals(port)
        pol0 = policy_totals(metrics_port)
        t_start = time.monotonic() + 0.2
        for q in go_queues:
            q.put(t_start)
        time.sleep(max(0.0, t_start - time.monotonic()))
        cpu0, _, _ = proc_stat(controller.pid)
        loadavg0 = os.getloadavg()[0]
        time.sleep(max(0.0, t_start + args.duration_s - time.monotonic()))
        cpu1, threads, rss = proc_stat(controller.pid)
        loadavg1 = os.getloadavg()[0]
        peak_rss, _ = proc_memory(controller.pid)
        outs = {}
        while len(outs) < len(loaders):
            try:
                k, out = results.get(timeout=30)
            except Exception:  # queue.Empty
                raise SystemExit("a load process sent no results within 30 s of the end of "
                                 "the window") from None
            outs[k] = out
        acc1, rej1 = controller_totals(port)
        pol1 = policy_totals(metrics_port)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        raise SystemExit(130)
    finally:
        for q in go_queues:
            try:
                q.put(None)                # a loader still waiting for the start gives up
            except Exception:  # noqa: BLE001
                pass
        for p in loaders:
            p.join(timeout=2)
            stop_process(p)
        stop_process(controller)
        log.close()

    errors = [o["error"] for o in outs.values() if "error" in o]
    if errors:
        raise SystemExit(f"a load process failed: {errors[0]}")
    accepted = sum(o["counts"]["accepted"] for o in outs.values())
    rejected = sum(o["counts"]["rejected"] for o in outs.values())
    mismatched = sum(o["counts"]["mismatched"] for o in outs.values())
    rejected_by: dict[str, int] = {}
    for o in outs.values():
        for code, n in o["rejected_by"].items():
            rejected_by[code] = rejected_by.get(code, 0) + n
    lat = array.array("d")
    for o in outs.values():
        lat.frombytes(o["lat"])
    lat_sorted = sorted(lat)
    load_cpu = sum(o["cpu_s"] for o in outs.values())
    failed = [f for o in outs.values() for f in o["failed"]]
    n_failed = sum(o["n_failed"] for o in outs.values())
    ctl_cpu = cpu1 - cpu0
    rps = accepted / args.duration_s
    needed = args.agents / defaults.report_interval_s
    d = args.duration_s
    rows = [
        ("agents", f"{args.agents} ({'watching directives too' if args.watch_directives else 'report stream only'})"),
        ("jobs", f"{args.jobs} (up to {nodes_per_job} agent{'s' if nodes_per_job > 1 else ''}, "
                 f"one per node, per job)"),
        ("mode", "closed loop, 1 report in flight per agent" if args.interval_s == 0 else
                 f"paced, 1 report per agent every {args.interval_s:g} s"),
        ("rate limit", rate),
        ("duration", f"{d:g} s measured (setup {setup_s:.1f} s)"),
        ("reports accepted", f"{accepted} (acked, or written on a no-ack stream; controller "
                             f"counted {acc1 - acc0})"),
        ("reports rejected", f"{rejected}" + (f" {rejected_by}" if rejected_by else "")
         + f" (controller counted {rej1 - rej0})"),
        ("reports/s", f"{rps:,.0f}"),
        ("latency p50 / p99 / max", f"{percentile(lat_sorted, 50):.1f} / "
                                    f"{percentile(lat_sorted, 99):.1f} / "
                                    f"{percentile(lat_sorted, 100):.1f} ms"
         + ("" if args.interval_s == 0 or args.ack_probe_every == 1 else
            f" ({len(lat)} reports of the acked probes, every {args.ack_probe_every}th agent; "
            f"the others ask for no acks, as real agents)")),
        ("controller CPU", f"{ctl_cpu / d:.0%} of one core (pid {controller.pid}, "
                           f"{threads} threads; "
                           + (f"pinned to CPU {','.join(map(str, args.controller_cpus))})"
                              if args.controller_cpus else "not pinned)")),
        ("controller memory", f"RSS {rss_idle / 2**20:.0f} MiB idle, {rss_setup / 2**20:.0f} MiB "
                              f"with every agent connected, {rss / 2**20:.0f} MiB at the end; "
                              f"peak (VmHWM) {peak_rss / 2**20:.0f} MiB = "
                              f"{(peak_rss - rss_idle) / args.agents / 1024:.0f} KiB per agent "
                              f"over idle"),
        ("controller policy runs", f"{pol1[0] - pol0[0]}, {pol1[1] - pol0[1]:.2f} s wall-clock in them "
                                   f"(every {args.policy_interval_s:g} s per job with new reports)"),
        ("load-generator CPU", f"{load_cpu / d:.0%} of one core ({args.load_procs} process"
                               f"{'es' if args.load_procs > 1 else ''}"
                               + (f" pinned to CPU {','.join(map(str, args.load_cpus))}"
                                  if args.load_cpus else "")
                               + f"; {os.cpu_count()} cores here, shared with the controller"
                               + (")" if args.load_cpus else " and anything else running)")),
        ("load-generator loop stalls", _stalls([x for o in outs.values()
                                                for x in array.array("d", o["lag_ms"])])),
        ("controller CPU / accepted report", f"{ctl_cpu / accepted * 1e6:,.0f} us" if accepted else "-"),
    ]
    if args.interval_s == 0:       # a ratio only where the loop saturates the controller
        rows.append(("headroom", f"{rps / needed:.1f}x the {needed:,.0f} reports/s "
                                 f"{args.agents} agents send at the controller's "
                                 f"{defaults.report_interval_s:g} s report interval"))
    cores = len(os.sched_getaffinity(0))
    busy = (ctl_cpu + load_cpu) / d
    rows.append(("machine", f"{cores} CPUs; load average {loadavg0:.1f} -> {loadavg1:.1f} over "
                            f"the window (this benchmark's own processes included)"))
    if busy > 0.75 * cores or (not args.controller_cpus and busy > 0.5 * cores) \
            or max(loadavg0, loadavg1) > cores:
        rows.append(("note", f"the controller and the load generators used {busy:.1f} of "
                             f"{cores} CPUs, with other work running too (load average above): "
                             f"latency includes waiting for a CPU, and the load generators "
                             f"may fall short of the offered rate"))
    if mismatched:
        rows.append(("acks for the wrong step", str(mismatched)))
    if n_failed:
        rows.append(("agents that failed", f"{n_failed}: {failed[:3]}"))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"
    p99 = percentile(lat_sorted, 99)
    goals = [("goal: 10,000 agents, bounded memory",
              f"{args.agents:,} agents ({streams:,} streams) connected at once, peak RSS "
              f"{peak_rss / 2**20:.0f} MiB: "
              + (verdict(args.agents >= GOALS["agents"] and not n_failed)
                 if args.agents >= GOALS["agents"] else "run with --agents 10000"))]
    if args.interval_s == 0:
        one_core = len(args.controller_cpus) == 1
        goals.append(("goal: >= 5,000 reports/s on one core",
                      f"{rps:,.0f} reports/s saturated: "
                      + (verdict(rps >= GOALS["reports_per_s_one_core"]) if one_core
                         else "run with --controller-cpus 0 (pinned to one core)")))
    else:
        goals.append(("goal: p99 < 50 ms, 1 report / 2 s",
                      f"p99 {p99:.1f} ms at 1 report per {args.interval_s:g} s per agent: "
                      + (verdict(p99 < GOALS["p99_ms_paced"]) if args.interval_s >= 2
                         else "run with --interval-s 2")))
    rows += goals
    rows += [(f"sync server ({SYNC_SERVER['commit']}), saturated", SYNC_SERVER["saturated"]),
             (f"sync server ({SYNC_SERVER['commit']}), paced", SYNC_SERVER["paced"]),
             (f"sync server ({SYNC_SERVER['commit']}), threads", SYNC_SERVER["threads"])]
    w = max(len(k) for k, _ in rows)
    print("adaptrun controller ingestion (127.0.0.1, grpc.aio server; the sync server's figures "
          "are constants measured at commit " + SYNC_SERVER["commit"] + ")")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_serve":
        serve_controller(json.loads(sys.argv[2]))
    else:
        main()
