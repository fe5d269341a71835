"""Resize gaps: adaptrun's agent + controller vs torchrun, same worker, same pacing, one run.

    python benchmarks/resize_gap.py                    # ~3 min on a 2-core machine
    python benchmarks/resize_gap.py --repeats 3
    python benchmarks/resize_gap.py --with-defaults    # + torchrun's default rdzv conf (slow)
    python benchmarks/resize_gap.py --model big --params 100e6   # real-sized state (~6 min)

Gap = wall time from rank 0's last optimizer step of the old world to its first step of the new
one (the "t" of tests/workers/lsq_worker.py's step lines). The new world is the one whose rank 0
wrote its "start" line after the event (the benchmark's resize call or kill), so a step the old
world finishes after the event is never taken for the new world's.

Two jobs per framework and repeat, (a) and (b) interleaved:
  resize job: 1 node trains -> scale-up 1->2 -> scale-down 2->1;
  kill job: 2 nodes from the start; once the world has trained --kill-after s, kill -9 of rank
  1's worker -> both nodes restart, 2 again. (A separate job: under torchrun a node that
  joins after a scale-down has another TORCHELASTIC_RESTART_COUNT than the survivor, and
  adaptrun.init() keys the process group by it, so that world never forms.)
A new world that shows no step within --kill-timeout s while every process still runs is
printed as "none in N s" (under torchrun, after the kill, the survivor's torchrun restarts
without counting a restart while the failed node's counts one: the same mismatch, a hang
until the workers' ADAPTRUN_TIMEOUT_S=60).
Worker: tests/workers/lsq_worker.py (``--samples 20000 --batch 24 --epochs 3 --step-sleep
--step-sleep``), gloo, 127.0.0.1, OMP_NUM_THREADS=1, library default snapshot every 50 steps.
``--model big``: tests/workers/big_worker.py instead, an MLP of ``--params`` parameters under
Adam (12 bytes of state per parameter per rank: 1.2 GB at 100 M), fixed batch 8, a step of
seconds, snapshots every 10 steps on both sides. Printed beside the gaps: the time of one copy
of that state from one process to another over gloo on 127.0.0.1 (a broadcast), the least a
joiner's hand-off can cost, and each gap less one step of the new world over it.

(a) adaptrun: an in-process ``Controller`` + ``LocalActuator`` + a TCPStore hosted here as the
    rendezvous endpoint, wired as ``adaptrun run`` does (controller/local_run.py), agents
    with their default rendezvous conf, ``--nnodes 1:2`` (kill job: ``--nnodes 2``, workers
    [2, 2], as tests/test_agent.py's kill test). Planned resizes through the controller's
    bounds (``core.set_bounds(job, n, n)``: what ``adaptrun scale`` does); the job registers
    workers [1, 1] and a fixed global batch (init = max = 24) so the policy never moves by
    itself. The actuator starts a new agent on scale-up; on scale-down the agent beyond the new
    size leaves by itself.
(b) torchrun tuned: one ``torchrun --nnodes=1:3 --nproc-per-node=1 --rdzv-backend=c10d`` per
    node, ``--rdzv-conf`` last_call_timeout=1, keep-alive 1 s x 3, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    --max-restarts=5 (benchmarks/overhead.py's helpers). Scale-up = start a node's torchrun;
    scale-down = SIGTERM to node 1's torchrun.
(c) --with-defaults: (b) under torchrun's default rendezvous conf (last call 30 s, keep-alive
    5 s x 3): ~35-45 s per gap.

Printed, not asserted. The machine is shared: absolute times move with the load (printed at
start and end); runs of (a) and (b) are interleaved so that the ratios move less. Every process
is started in its own session and killed with its descendants on every exit path.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead as ovh  # noqa: E402  (benchmarks/overhead.py: process and log helpers)

SCENARIOS = (("up", "scale-up 1->2"), ("down", "scale-down 2->1"),
             ("kill", "kill -9 one worker (2->2)"))


# ---- reading the step logs -------------------------------------------------------------
def _new_start(rows: list[dict], t_event: float) -> float | None:
    """When the first world formed after ``t_event`` began: rank 0 of a restarted world
    writes a start line; a world re-formed in process (adaptrun's agent keeps rank 0's
    process) shows as rank 0's first step with another world size than the step before."""
    ts = [r["t"] for r in rows if r.get("event") == "start" and r["rank"] == 0
          and r["t"] >= t_event]
    steps = sorted((r for r in rows if r.get("event") == "step" and r["rank"] == 0),
                   key=lambda r: r["t"])
    ts += [b["t"] - 1e-6 for a, b in zip(steps, steps[1:])
           if b["t"] >= t_event and a["world"] != b["world"]]
    return min(ts) if ts else None


def new_world_steps(rows: list[dict], world: int, t_event: float) -> list[dict]:
    t_new = _new_start(rows, t_event)
    if t_new is None:
        return []
    return sorted((r for r in rows if r.get("event") == "step" and r["rank"] == 0
                   and r["world"] == world and r["t"] >= t_new), key=lambda r: r["t"])


def gap(rows: list[dict], before: int, after: int, t_event: float) -> tuple[float, int]:
    """(gap seconds, steps redone = old world's last step - restored step)."""
    new = new_world_steps(rows, after, t_event)[0]
    old = max((r for r in rows if r.get("event") == "step" and r["rank"] == 0
               and r["world"] == before and r["t"] < new["t"]), key=lambda r: r["t"])
    return new["t"] - old["t"], max(0, old["step"] - (new["step"] - 1))


class Hung(RuntimeError):
    """No step of the new world within the time allowed, and every process still runs."""


def wait_new_world(out: Path, world: int, t_event: float, count: int, timeout_s: float,
                   live, logs) -> list[dict]:
    """Wait for ``count`` rank-0 steps of the world that started after ``t_event``; fail
    early when a process in ``live()`` (those that must keep running) has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        steps = new_world_steps(ovh.read_rows(out), world, t_event)
        if len(steps) >= count:
            return steps
        dead = [p.args for p in live() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise (RuntimeError if dead else Hung)(
                f"{len(steps)}/{count} steps in a new world of {world} after "
                f"{time.monotonic() - deadline + timeout_s:.0f} s"
                + (f"; exited: {[' '.join(map(str, a[:8])) for a in dead]}" if dead else "")
                + "\n" + "\n".join(f"--- {lg}\n{ovh.tail(lg, 2000)}" for lg in logs()))
        time.sleep(0.1)


def wait_after_kill(out: Path, t_kill: float, live, logs, args) -> tuple[float, int | None]:
    """The kill's (gap, steps redone); (inf, None) when the world of 2 did not train again
    within --kill-timeout s (the processes still run: a hang, not a crash)."""
    try:
        wait_new_world(out, 2, t_kill, args.count, args.kill_timeout, live, logs)
    except Hung:
        return math.inf, None
    return gap(ovh.read_rows(out), 2, 2, t_kill)


def rank1_worker_pid(out: Path, after_t: float, owners) -> int:
    """The pid of the process that writes rank 1's step lines now (a descendant of ours)."""
    best = None
    for f in out.glob("steps-*.jsonl"):
        lines = [ln for ln in f.read_text().splitlines() if '"event": "step"' in ln]
        if not lines:
            continue
        try:
            last = json.loads(lines[-1])
        except json.JSONDecodeError:
            continue
        if last["rank"] == 1 and last["t"] >= after_t and (best is None or last["t"] > best[0]):
            best = (last["t"], int(f.stem.split("-")[1]))
    if best is None:
        raise RuntimeError("no live rank-1 worker found in the step logs")
    pid = best[1]
    ours = {d for p in owners() for d in ovh._descendants(p.pid)}
    if pid not in ours:
        raise RuntimeError(f"rank 1's worker pid {pid} is not a descendant of this benchmark")
    return pid


BIG_WORKER = ovh.REPO / "tests" / "workers" / "big_worker.py"


def worker(args) -> Path:
    return BIG_WORKER if args.model == "big" else ovh.ADAPTIVE_WORKER


def worker_args(out: Path, args) -> list[str]:
    if args.model == "big":
        return ["--params", args.params, "--samples", "4000", "--batch", str(args.batch),
                "--out", str(out)]
    return ["--samples", "20000", "--batch", str(args.batch), "--epochs", "3",
            "--step-sleep", str(args.step_sleep), "--out", str(out)]


def worker_env(args, **extra) -> dict:
    if args.model == "big":
        extra.setdefault("ADAPTRUN_SNAPSHOT_EVERY", "10")
    return ovh.base_env(**extra)


COPY = r"""
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
rank, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
t = torch.ones(n, dtype=torch.float32) if rank == 0 else torch.empty(n, dtype=torch.float32)
dist.barrier()
t0 = time.perf_counter()
dist.broadcast(t, src=0)
dist.barrier()
if rank == 1:
    print(time.perf_counter() - t0)
dist.destroy_process_group()
"""


def one_copy_s(numbers: int) -> float:
    """Seconds to broadcast ``numbers`` float32 from one process to another over gloo."""
    port = ovh.free_port()
    procs = [subprocess.Popen([sys.executable, "-c", COPY, str(r), str(port), str(numbers)],
                              stdout=subprocess.PIPE, text=True, env=ovh.base_env())
             for r in (0, 1)]
    out = [p.communicate(timeout=300)[0] for p in procs]
    return float(out[1].strip())


def step_s(rows: list[dict], world: int) -> float:
    """The median step of rank 0 in worlds of ``world`` ranks."""
    ts = sorted(r["t"] for r in rows if r.get("event") == "step" and r["rank"] == 0
                and r["world"] == world)
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    return statistics.median(gaps) if gaps else math.nan


# ---- (a) adaptrun agent + controller ------------------------------------------------------
def run_adaptrun(tmp: Path, tag: str, args, kill: bool) -> dict:
    """kill=False: 1 agent, scale-up to 2, scale-down to 1. kill=True: 2 agents from the
    start (``--nnodes 2``, workers [2, 2], as tests/test_agent.py's kill test), kill -9."""
    import torch.distributed as dist

    from adaptrun.controller.core import ControllerConfig
    from adaptrun.controller.actuators.local import LocalActuator
    from adaptrun.controller.server import Controller

    out = tmp / f"a-{tag}"
    (out / "tmp").mkdir(parents=True)
    job = f"gap-{tag}"
    wargs = worker_args(out, args)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True,
                          wait_for_workers=False, timeout=timedelta(seconds=60))
    holder: dict = {}
    n = 2 if kill else 1

    def command(job_id: str, node: str) -> list[str]:
        return [sys.executable, "-m", "adaptrun.cli", "agent",
                "--controller", holder["ctl"].address, "--job", job_id, "--node", node,
                "--nproc-per-node", "1", "--nnodes", "2" if kill else "1:2",
                "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--local-addr", "127.0.0.1",
                "--max-restarts", "5", "--min-workers", str(n), "--max-workers", str(n),
                "--init-batch", str(args.batch), "--max-global-batch", str(args.batch),
                "--local-batch-min", "1", "--local-batch-max", str(args.batch),
                "--snapshot-dir", str(out / f"snap-{node}"),
                *([] if kill else ["--standby-after-s", str(args.standby_after_s)]),
                "--", sys.executable, str(worker(args)), *wargs]

    # TMPDIR: the agents' work dirs land under ours and go with it.
    actuator = LocalActuator(agent_command=command, log_dir=out,
                             env=worker_env(args, TMPDIR=out / "tmp"), stop_grace_s=3.0)
    ctl = None
    logs = lambda: sorted(out.glob("agent-*.log"))  # noqa: E731
    agents = lambda: [p for _, p in actuator.agents(job)]  # noqa: E731
    res: dict = {}
    try:
        ctl = holder["ctl"] = Controller(ControllerConfig(
            policy_interval_s=0.5, tick_s=0.05, metrics_port=None), actuator=actuator).start()
        actuator.set_workers(job, n)
        first = wait_new_world(out, n, 0, args.count, 180, agents, logs)
        deadline = time.monotonic() + 30
        while (j := ctl.core.registry.job(job)) is None or j.last_report is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the controller got no report\n" + ovh.tail(logs()[0]))
            time.sleep(0.05)
        if kill:
            # train a while first: the agents then hold warm standby workers (5 s into a
            # round), as in a long job
            time.sleep(max(0.0, first[0]["t"] + args.kill_after - time.time()))
            pid = rank1_worker_pid(out, 0, agents)
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            res["kill"] = wait_after_kill(out, t, agents, logs, args)
        else:
            # scale-up: the actuator starts agent n1 inside set_bounds
            t = time.time()
            ctl.core.set_bounds(job, 2, 2)
            wait_new_world(out, 2, t, args.count, 180, agents, logs)
            res["up"] = gap(ovh.read_rows(out), 1, 2, t)
            # scale-down: agent n1 leaves by itself (exit 0); n0 must stay
            stay = agents()[:1]
            t = time.time()
            ctl.core.set_bounds(job, 1, 1)
            wait_new_world(out, 1, t, min(5, args.count), 180, lambda: stay, logs)
            res["down"] = gap(ovh.read_rows(out), 2, 1, t)
            res["steps"] = {w: step_s(ovh.read_rows(out), w) for w in (1, 2)}
        jb = ctl.core.registry.job(job)
        res[f"info-{'kill' if kill else 'resize'}"] = \
            f"{'kill' if kill else 'resize'} job: directives {jb.generation}, resizes {jb.resizes}"
    finally:
        for p in agents():              # SIGKILL: each agent's group and every descendant
            ovh._kill_group(p)
        actuator.close()
        if ctl is not None:
            ctl.stop(grace_s=0.2)
        del store
    return res


# ---- (b), (c) torchrun -----------------------------------------------------------------
def run_torchrun(rdzv_conf: str | None, tmp: Path, tag: str, args, kill: bool) -> dict:
    """kill=False: node 0, node 1 joins, node 1's torchrun gets SIGTERM. kill=True: two
    nodes from the start, kill -9 of rank 1's worker."""
    out = tmp / f"t-{tag}"
    out.mkdir()
    port = ovh.free_port()
    wargs = worker_args(out, args)
    procs: list = []
    logs: list[Path] = []
    slow = 150 if rdzv_conf is None else 60

    def node(i: int):
        env = worker_env(args, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
                         ADAPTRUN_SNAPSHOT_DIR=out / f"snap{i}")
        logs.append(out / f"node{i}.log")
        return ovh.start(ovh.torchrun("1:3", 1, port, f"gap-{tag}", worker(args), wargs,
                                      rdzv_conf=rdzv_conf, max_restarts=5), env, logs[-1])

    res: dict = {}
    try:
        if kill:
            procs += [node(0), node(1)]
            first = wait_new_world(out, 2, 0, args.count, slow, lambda: procs, lambda: logs)
            time.sleep(max(0.0, first[0]["t"] + args.kill_after - time.time()))
            pid = rank1_worker_pid(out, 0, lambda: procs)
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            res["kill"] = wait_after_kill(out, t, lambda: procs, lambda: logs, args)
        else:
            procs.append(node(0))
            wait_new_world(out, 1, 0, args.count, slow, lambda: procs, lambda: logs)
            t = time.time()
            procs.append(node(1))
            wait_new_world(out, 2, t, args.count, slow, lambda: procs, lambda: logs)
            res["up"] = gap(ovh.read_rows(out), 1, 2, t)
            t = time.time()
            os.killpg(procs[1].pid, signal.SIGTERM)     # torchrun stops its workers itself
            procs[1].wait(timeout=90)
            wait_new_world(out, 1, t, min(5, args.count), slow, lambda: procs[:1],
                           lambda: logs)
            res["down"] = gap(ovh.read_rows(out), 2, 1, t)
            res["steps"] = {w: step_s(ovh.read_rows(out), w) for w in (1, 2)}
    finally:
        for p in procs:
            ovh.stop(p)
    return res


# ---- report ------------------------------------------------------------------------------
def spread(xs: list[float], args) -> str:
    if not xs:
        return "n/a"
    if all(math.isinf(x) for x in xs):
        return f"none in {args.kill_timeout:.0f} s"
    if any(math.isinf(x) for x in xs):
        ok = [x for x in xs if not math.isinf(x)]
        return f"{ovh.spread(ok)} +{len(xs) - len(ok)} hung"
    return ovh.spread(xs)


def print_table(results: dict, args) -> None:
    cols = [("a", "(a) adaptrun agent"), ("b", "(b) torchrun tuned")]
    if "c" in results:
        cols.append(("c", "(c) torchrun defaults"))
    what = (f"big_worker ({float(args.params) / 1e6:.0f} M parameters, Adam)"
            if args.model == "big" else f"lsq_worker (step sleep {args.step_sleep * 1e3:.0f} ms)")
    print(f"\n## Resize gaps, {what}, median [min..max] over {args.repeats} run(s)")
    hdr = f"{'scenario':<27}" + "".join(f" {label:>24}" for _, label in cols[:2]) \
        + f" {'ratio b/a':>9}" + "".join(f" {label:>24}" for _, label in cols[2:])
    print(hdr)
    print("-" * len(hdr))
    for sc, label in SCENARIOS:
        vals = {k: [r[sc][0] for r in results[k] if sc in r] for k, _ in cols}
        line = f"{label:<27}"
        for k, _ in cols[:2]:
            line += f" {spread(vals[k], args):>24}"
        ratio = (f"{statistics.median(vals['b']) / statistics.median(vals['a']):.2f}"
                 if vals["a"] and vals["b"] else "n/a").replace("inf", ">" + (
                     f"{args.kill_timeout / statistics.median(vals['a']):.0f}"
                     if vals["a"] else ""))
        line += f" {ratio:>9}"
        for k, _ in cols[2:]:
            line += f" {spread(vals[k], args):>24}"
        print(line)
    print(f"steps redone (old world's last step - restored step; a snapshot every "
          f"{10 if args.model == 'big' else 50} steps):")
    for sc, label in SCENARIOS:
        print(f"  {label:<27}" + ", ".join(
            f"{k} {[r[sc][1] for r in results[k] if sc in r]}" for k, _ in cols))
    for k, _ in cols:
        info = [v for r in results[k] for key, v in r.items() if key.startswith("info")]
        if info:
            print(f"  ({k}) controller: " + "; ".join(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per framework (interleaved)")
    ap.add_argument("--with-defaults", action="store_true",
                    help="also torchrun with its default rdzv conf (~35-45 s per gap)")
    ap.add_argument("--step-sleep", type=float, default=0.02, help="workers' step pacing (s)")
    ap.add_argument("--kill-after", type=float, default=7.0,
                    help="seconds the world of 2 trains before the kill (both frameworks)")
    ap.add_argument("--kill-timeout", type=float, default=75.0,
                    help="after the kill, wait this long for the new world's steps (the "
                         "workers' ADAPTRUN_TIMEOUT_S is 60)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--model", choices=["lsq", "big"], default="lsq",
                    help="big: an MLP of --params parameters under Adam (real-sized state)")
    ap.add_argument("--params", default="100e6", help="--model big: parameters")
    ap.add_argument("--standby-after-s", type=float, default=5.0,
                    help="adaptrun agents of the planned-resize job: when they start their "
                         "warm standby worker (-1: none; on 2 cores its start competes with "
                         "the new world's first steps). The kill job keeps the default: its "
                         "restart uses the standby")
    args = ap.parse_args()
    big = args.model == "big"
    args.batch = 8 if big else 24
    args.count = 3 if big else 10
    if big:
        args.kill_timeout = max(args.kill_timeout, 240.0)

    atexit.register(ovh._cleanup)
    signal.signal(signal.SIGTERM, ovh._on_signal)
    signal.signal(signal.SIGINT, ovh._on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="adaptrun-resize-gap-"))
    t0 = time.monotonic()
    print(f"python {' '.join(sys.argv)}   ({os.cpu_count()} cpus, load avg "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
    results: dict = {"a": [], "b": []}
    try:
        for i in range(args.repeats):
            for kill in (False, True):
                what = "kill" if kill else "resize"
                a = run_adaptrun(tmp, f"{what}-{i}", args, kill)
                print(f"  run {i + 1}: (a) " + fmt(a), flush=True)
                b = run_torchrun(ovh.TUNED_RDZV, tmp, f"tuned-{what}-{i}", args, kill)
                print(f"  run {i + 1}: (b) " + fmt(b), flush=True)
                if kill:
                    results["a"][-1].update(a)
                    results["b"][-1].update(b)
                else:
                    results["a"].append(a)
                    results["b"].append(b)
        if args.with_defaults:
            results["c"] = []
            for i in range(args.repeats):
                r = run_torchrun(None, tmp, f"defaults-resize-{i}", args, False)
                r.update(run_torchrun(None, tmp, f"defaults-kill-{i}", args, True))
                results["c"].append(r)
                print(f"  run {i + 1}: (c) " + fmt(r), flush=True)
        print_table(results, args)
        if big:
            print_big_state(results, args, one_copy_s(int(float(args.params)) * 3))
        print(f"\ntotal {time.monotonic() - t0:.0f} s, load avg now "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
              + (f"; logs in {tmp}" if args.keep else ""))
    finally:
        ovh._cleanup()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def print_big_state(results: dict, args, copy_s: float) -> None:
    """Each planned gap less one step of the new world, over one copy of the state."""
    mb = float(args.params) * 12 / 1e6
    print(f"\n## Real-sized state: {float(args.params) / 1e6:.0f} M parameters under Adam = "
          f"{mb:.0f} MB per rank; one copy of it over gloo (broadcast, 2 processes): "
          f"{copy_s:.2f} s")
    print(f"{'scenario':<28}" + "".join(f"{n:>34}" for n in ("(a) adaptrun", "(b) torchrun tuned")))
    for sc, label, world in (("up", "scale-up 1->2", 2), ("down", "scale-down 2->1", 1),
                             ("kill", "kill -9 one worker (2->2)", 2)):
        cells = []
        for col in ("a", "b"):
            xs = [(r[sc][0] - r["steps"][world]) for r in results[col]
                  if sc in r and "steps" in r and not math.isinf(r[sc][0])]
            if not xs:
                cells.append("n/a")
                continue
            g = statistics.median(xs)
            cells.append(f"{g:.2f} s less a step = {g / copy_s:.1f} copies")
        print(f"{label:<28}" + "".join(f"{c:>34}" for c in cells))


def fmt(r: dict) -> str:
    return ", ".join(f"{sc} {r[sc][0]:.2f} s (redo {r[sc][1]})" if not math.isinf(r[sc][0])
                     else f"{sc}: no step of the new world (hung)" for sc, _ in SCENARIOS
                     if sc in r)


if __name__ == "__main__":
    main()
