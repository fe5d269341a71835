"""Process helpers for the multi-process tests: free loopback ports, process groups we own.

Every process is started in its own session (``start_new_session=True``) so the test can end
it and all its children by process group; ``stop`` is idempotent and is meant for ``finally``.
Only 127.0.0.1 is used.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "workers" / "lsq_worker.py"
# TMPDIR of the processes the tests start: torchrun's log folders and the work folder of an
# agent killed with -9 land here, not in /tmp, and go when the test session ends.
SCRATCH = tempfile.mkdtemp(prefix="adaptrun-tests-")
atexit.register(shutil.rmtree, SCRATCH, True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_USE_AGENT_STORE", "ADAPTRUN_REPORT_FILE",
              "ADAPTRUN_CHECKPOINT_DIR", "ADAPTRUN_SNAPSHOT_DIR", "ADAPTRUN_SNAPSHOT_EVERY",
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = SCRATCH
    env.setdefault("ADAPTRUN_TIMEOUT_S", "60")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(REPO))
    finally:
        log.close()


def torchrun(nnodes: str, nproc: int, port: int, run_id: str, worker_args: list[str],
             rdzv_conf: str | None = None, max_restarts: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
           "--local-addr=127.0.0.1"]
    if rdzv_conf:
        cmd.append(f"--rdzv-conf={rdzv_conf}")
    return cmd + [str(WORKER)] + worker_args


def adaptrun_run(job: str, port: int, tmp_path: Path, script: list[str]) -> list[str]:
    """`adaptrun run` of ``script`` at one worker, its controller on ``port``, a decision a
    second, logs under ``tmp_path``, no plot or progress bar: the tests then `adaptrun scale`."""
    return [sys.executable, "-m", "adaptrun.cli", "run", "--job", job, "--min-workers", "1",
            "--max-workers", "1", "--port", str(port), "--policy-interval-s", "1",
            "--log-dir", str(tmp_path / "logs"), "--plot", "", "--no-progress", "--",
            sys.executable, *script]


def stop(proc: subprocess.Popen | None, sig=signal.SIGKILL) -> None:
    """Kill the process group we started (the process and its children); wait for it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    return [p.poll() for p in procs]


def read_steps(out: Path) -> list[dict]:
    import json
    rows = []
    for f in sorted(out.glob("steps-*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def tail(path: Path, n: int = 4000) -> str:
    """The log's last ``n`` characters, after its first error when that lies earlier: a
    failure's restarts repeat their own tracebacks and would hide the one that began it."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    first = min((i for i in (text.find("Traceback"), text.find("WARNING")) if i >= 0),
                default=-1)
    if 0 <= first < len(text) - n:
        return text[first:first + n // 2] + "\n[...]\n" + text[-n:]
    return text[-n:]


def wait_steps(out: Path, predicate, count: int, timeout_s: float, procs=()) -> list[dict]:
    """Wait until ``count`` step rows satisfy ``predicate``; fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in read_steps(out) if r.get("event") == "step" and predicate(r)]
        if len(rows) >= count:
            return rows
        dead = [p.args for p in procs if p.poll() not in (None, 0)]
        if dead or time.monotonic() > deadline:
            raise TimeoutError(f"{len(rows)}/{count} matching steps after {timeout_s:.0f}s"
                               + (f"; exited: {dead}" if dead else ""))
        time.sleep(0.1)


def gap_s(rows: list[dict], world_before: int, world_after: int, after_t: float = 0.0) -> float:
    """Wall time from the last step of a world of ``world_before`` ranks to the first step of
    the next world of ``world_after`` ranks (rank 0's step log lines, after ``after_t``)."""
    steps = sorted((r for r in rows if r.get("event") == "step" and r["rank"] == 0
                    and r["t"] >= after_t), key=lambda r: r["t"])
    for a, b in zip(steps, steps[1:]):
        if a["world"] == world_before and b["world"] == world_after:
            return b["t"] - a["t"]
    raise AssertionError(f"no change {world_before} -> {world_after} in the step log")
