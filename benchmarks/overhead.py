"""What adaptrun costs over plain torch DDP: per-step time, and resize gaps under torchrun.

    python benchmarks/overhead.py                     # ~3-4 min on a 2-core machine
    python benchmarks/overhead.py --skip-gaps         # per-step part only
    python benchmarks/overhead.py --repeats 3 --with-defaults

Part 1, per-step time (``benchmarks/workers/step_worker.py``). One ``torchrun --nnodes=1
--nproc-per-node=2`` per configuration (gloo, 127.0.0.1, OMP_NUM_THREADS=1). In the *same* two
processes, over the same process group, AdaptiveDataParallel + AdaptiveDataLoader and plain
DistributedDataParallel + DistributedSampler/DataLoader train identical copies of an MLP
(3 x Linear(1024,1024) + Linear(1024,16), 3.16M parameters) on the same synthetic data, in
alternating blocks of ``--block`` steps. A step is timed from fetching its first micro-batch to
the return of ``optimizer.step()`` on rank 0. Library defaults on the adaptive side (report every
10 steps, snapshot every 50 steps into a temp dir, directive polling), so the *median* shows the
typical step and the *mean* includes the periodic snapshots. Configurations: SGD+momentum
without accumulation, SGD with 2 micro-batches per step (adaptive: accum_steps=1 by a directive;
plain: no_sync on the first), Adam without accumulation (the preconditioned statistics path).

Part 2, resize gaps. One torchrun per "node" (``--nnodes=1:3 --nproc-per-node=1
--rdzv-backend=c10d``, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), as tests/test_worker_elastic.py
does. A run: node 0 trains alone, node 1 joins (scale-up 1->2), then node 1's torchrun gets
SIGTERM (scale-down 2->1). Gap = wall time from rank 0's last step line of the old world to its
first step line of the new world. Workers: (a) tests/workers/lsq_worker.py (adaptrun: saves at an
agreed step, resumes from the cursor), (b) benchmarks/workers/plain_ddp.py (torch DDP, its own
torch.save checkpoint every 10 steps, redoes the steps since), both at the same step pacing and
with the tuned rendezvous conf; (c) with ``--with-defaults``, plain_ddp under torchrun's default
rendezvous conf, scale-up only (~30 s start + ~35 s gap).

Every process is started in its own session and killed by process group on every exit path.
Printed, not asserted. This machine is shared: absolute times move with the load; the
interleave is there so that the ratios do not.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_WORKER = REPO / "benchmarks" / "workers" / "step_worker.py"
PLAIN_WORKER = REPO / "benchmarks" / "workers" / "plain_ddp.py"
ADAPTIVE_WORKER = REPO / "tests" / "workers" / "lsq_worker.py"
sys.path.insert(0, str(REPO / "tests"))
from workers import harness  # noqa: E402  (free loopback ports, clean launcher env)

free_port = harness.free_port
TUNED_RDZV = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60"

CONFIGS = {
    "sgd": ("SGD+momentum, no accumulation", ["--opt", "sgd", "--accum", "0"]),
    "accum": ("SGD+momentum, 2 micro-batches/step", ["--opt", "sgd", "--accum", "1"]),
    "adam": ("Adam, no accumulation", ["--opt", "adam", "--accum", "0"]),
}

# ---- processes we own -----------------------------------------------------------------
_procs: list[subprocess.Popen] = []


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc); torchrun starts its workers in sessions
    of their own, so killing torchrun's process group alone would leave them running."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    kids = _descendants(proc.pid) if proc.poll() is None else []
    for pid in [proc.pid, *kids]:      # our group first, then each worker's own group
        try:
            os.killpg(pid, sig) if pid == proc.pid or os.getpgid(pid) == pid else \
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _cleanup() -> None:
    while _procs:
        _kill_group(_procs.pop())


def _on_signal(signum, frame):
    _cleanup()
    raise SystemExit(128 + signum)


def base_env(**extra) -> dict:
    """The test harness's clean launcher environment, with this checkout on PYTHONPATH."""
    return harness.base_env(ADAPTRUN_TIMEOUT_S=60,
                            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                            **extra)


def start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(REPO))
    _procs.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    _kill_group(proc, sig)
    if proc in _procs:
        _procs.remove(proc)


def torchrun(nnodes: str, nproc: int, port: int, run_id: str, script: Path, args: list[str],
             rdzv_conf: str | None = None, max_restarts: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "--local-addr=127.0.0.1"]
    if rdzv_conf:
        cmd.append(f"--rdzv-conf={rdzv_conf}")
    return cmd + [str(script)] + args


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


# ---- part 1: per-step time ----------------------------------------------------------
def run_steps(name: str, args, tmp: Path) -> dict:
    out = tmp / f"steps-{name}.json"
    log = tmp / f"steps-{name}.log"
    cmd = torchrun("1", 2, free_port(), f"ovh-{name}", STEP_WORKER,
                   [*CONFIGS[name][1], "--steps", str(args.steps), "--block", str(args.block),
                    "--batch", str(args.batch), "--out", str(out)])
    proc = start(cmd, base_env(ADAPTRUN_SNAPSHOT_DIR=tmp / f"snap-{name}"), log)
    try:
        rc = proc.wait(timeout=args.step_timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop(proc)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"step worker {name} failed (rc={rc}):\n{tail(log)}")
    return json.loads(out.read_text())


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def print_steps(results: dict, args) -> None:
    first = next(iter(results.values()))
    print(f"\n## Per-step time: AdaptiveDataParallel+AdaptiveDataLoader vs DDP+DistributedSampler")
    print(f"MLP {first['params'] / 1e6:.2f}M params, global batch {args.batch}, world "
          f"{first['world']} (gloo, 127.0.0.1, 1 thread/rank), {args.steps} timed steps per side "
          f"in alternating blocks of {args.block}, rank 0 wall clock")
    hdr = (f"{'configuration':<36} {'steps':>5} {'adaptive med':>12} {'plain med':>10} "
           f"{'ratio med':>9} {'adaptive mean':>13} {'plain mean':>10} {'ratio mean':>10}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in results.items():
        a, p = r["times"]["adaptive"], r["times"]["plain"]
        am, pm = statistics.median(a), statistics.median(p)
        aa, pa = statistics.fmean(a), statistics.fmean(p)
        print(f"{CONFIGS[name][0]:<36} {len(a):>5} {ms(am):>10}ms {ms(pm):>8}ms "
              f"{am / pm:>9.3f} {ms(aa):>11}ms {ms(pa):>8}ms {aa / pa:>10.3f}")
    print("(goal: ratio <= 1.05; median = typical step, mean includes the periodic snapshot "
          "every 50 steps)")


# ---- part 2: resize gaps ---------------------------------------------------------------
def read_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("steps-*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass          # a line being written
    return rows


def wait_steps(out: Path, world: int, after_t: float, count: int, timeout_s: float,
               procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        n = sum(1 for r in read_rows(out) if r.get("event") == "step" and r["rank"] == 0
                and r["world"] == world and r["t"] >= after_t)
        if n >= count:
            return
        dead = [p.args[-1] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{n}/{count} steps at world {world} after {timeout_s:.0f}s"
                               + (f"; a node exited" if dead else "") + "\n"
                               + "\n".join(tail(lg, 1500) for lg in logs))
        time.sleep(0.1)


def gap(rows: list[dict], before: int, after: int, t_event: float) -> tuple[float, int]:
    """(seconds from the last step of the old world to the first step of the new one, steps
    redone), from rank 0's step lines; the new world's first step is the first after t_event."""
    steps = [r for r in rows if r.get("event") == "step" and r["rank"] == 0]
    new = min((r for r in steps if r["world"] == after and r["t"] >= t_event),
              key=lambda r: r["t"])
    old = max((r for r in steps if r["world"] == before and r["t"] < new["t"]),
              key=lambda r: r["t"])
    return new["t"] - old["t"], max(0, old["step"] - (new["step"] - 1))


def run_resize(kind: str, rdzv_conf: str | None, down: bool, tmp: Path, tag: str,
               args) -> dict:
    out = tmp / f"gap-{tag}"
    out.mkdir()
    port = free_port()
    pace = str(args.step_sleep)
    if kind == "adaptive":
        script = ADAPTIVE_WORKER
        wargs = ["--samples", "20000", "--batch", "24", "--epochs", "1",
                 "--step-sleep", pace, "--out", str(out)]
    else:
        script = PLAIN_WORKER
        wargs = ["--samples", "20000", "--batch", "24", "--step-sleep", pace,
                 "--ckpt", str(out / "ckpt.pt"), "--out", str(out)]
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    slow = rdzv_conf is None           # torchrun defaults: 30 s last call on every round

    def node(i: int) -> subprocess.Popen:
        env = base_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
                       ADAPTRUN_SNAPSHOT_DIR=out / f"snap{i}")
        logs.append(out / f"node{i}.log")
        return start(torchrun("1:3", 1, port, f"gap-{tag}", script, wargs, rdzv_conf=rdzv_conf,
                              max_restarts=5), env, logs[-1])

    res = {}
    try:
        procs.append(node(0))
        wait_steps(out, 1, 0, 10, 120 if slow else 60, procs, logs)
        t_up = time.time()
        procs.append(node(1))
        wait_steps(out, 2, t_up, 10, 120 if slow else 60, procs, logs)
        res["up"] = gap(read_rows(out), 1, 2, t_up)
        if down:
            t_down = time.time()
            os.killpg(procs[1].pid, signal.SIGTERM)
            procs[1].wait(timeout=60)
            wait_steps(out, 1, t_down, 5, 120 if slow else 60, procs[:1], logs)
            res["down"] = gap(read_rows(out), 2, 1, t_down)
    finally:
        for p in procs:
            stop(p)
    return res


def spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f} s"
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}..{max(xs):.2f}]"


def print_gaps(gaps: dict, args) -> None:
    print(f"\n## Resize gaps (one torchrun per node, --nnodes=1:3, c10d, "
          f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; step sleep {args.step_sleep * 1e3:.0f} ms; "
          f"median [min..max] over {args.repeats} run(s))")
    hdr = f"{'scenario':<12} {'(a) adaptrun, tuned':>22} {'(b) plain DDP, tuned':>22} {'a/b':>6}"
    if args.with_defaults:
        hdr += f" {'(c) plain DDP, defaults':>24}"
    print(hdr)
    print("-" * len(hdr))
    for sc, label in (("up", "up 1->2"), ("down", "down 2->1")):
        a = [g[0] for g in gaps["adaptive"][sc]]
        b = [g[0] for g in gaps["plain"][sc]]
        line = f"{label:<12} {spread(a):>22} {spread(b):>22} " \
               f"{statistics.median(a) / statistics.median(b):>6.2f}"
        if args.with_defaults:
            c = [g[0] for g in gaps["defaults"].get(sc, [])]
            line += f" {spread(c) if c else 'not run':>24}"
        print(line)
    redo = {k: [g[1] for sc in ("up", "down") for g in v.get(sc, [])] for k, v in gaps.items()}
    print("steps redone after the re-form (old world's last step - restored step): "
          + ", ".join(f"{k} {v}" for k, v in redo.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=80, help="timed steps per side per config")
    ap.add_argument("--block", type=int, default=10, help="steps per alternating block")
    ap.add_argument("--batch", type=int, default=64, help="global batch (per-step part)")
    ap.add_argument("--configs", default="sgd,accum,adam",
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=1, help="resize runs per worker")
    ap.add_argument("--skip-gaps", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--with-defaults", action="store_true",
                    help="also plain DDP under torchrun's default rdzv conf, scale-up (~70 s)")
    ap.add_argument("--step-sleep", type=float, default=0.02, help="gap workers' step pacing")
    ap.add_argument("--step-timeout", type=float, default=240)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()

    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="adaptrun-overhead-"))
    t0 = time.monotonic()
    print(f"python {' '.join(sys.argv)}   (torch from {sys.executable}, {os.cpu_count()} cpus, "
          f"load avg {os.getloadavg()[0]:.1f})", flush=True)
    try:
        if not args.skip_steps:
            results = {}
            for name in [c for c in args.configs.split(",") if c]:
                results[name] = run_steps(name, args, tmp)
            print_steps(results, args)
        if not args.skip_gaps:
            gaps = {"adaptive": {"up": [], "down": []}, "plain": {"up": [], "down": []}}
            for i in range(args.repeats):
                for kind in ("adaptive", "plain"):     # interleaved, same conditions
                    r = run_resize(kind, TUNED_RDZV, True, tmp, f"{kind}-{i}", args)
                    gaps[kind]["up"].append(r["up"])
                    gaps[kind]["down"].append(r["down"])
            if args.with_defaults:
                gaps["defaults"] = {"up": []}
                for i in range(args.repeats):
                    r = run_resize("plain", None, False, tmp, f"defaults-{i}", args)
                    gaps["defaults"]["up"].append(r["up"])
            print_gaps(gaps, args)
        print(f"\ntotal {time.monotonic() - t0:.0f} s, load avg now "
              f"{os.getloadavg()[0]:.1f}" + (f"; logs in {tmp}" if args.keep else ""))
    finally:
        _cleanup()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
