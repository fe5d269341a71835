"""A seeded, time-bounded chaos driver: kill -9 at random moments in a real job, restart what a
cluster restarts, and check that the job still trains every sample exactly once.

The cluster it plays: one standalone ``adaptrun controller --state-dir`` (a subprocess on fixed
loopback ports, so that it can be restarted on the same ones) and one ``adaptrun agent`` per
node, named as a StatefulSet names its pods (``cj-0``, ``cj-1``, ...), each with its own
snapshot directory that survives the agent (a pod's volume). The job trains the least-squares
worker (``tests/workers/lsq_worker.py``: it counts every sample of every epoch in the model
state), paced by its pace file so that the faults land while it trains; each fault comes after
a random stretch of training (``random.Random(seed)``):

- ``worker``: kill -9 of one worker process of a random node; its agent restarts the round.
- ``agent``: kill -9 of a random node's agent (the first node's included) and of nothing
  else: its workers must die with it (``adaptrun.init`` asks the kernel for that). The
  harness restarts the agent with the same node name, as Kubernetes restarts a pod.
- ``controller``: kill -9 of the controller, restarted on the same ports and state dir.
- ``resize``: ``adaptrun scale`` to another node count (1..3); the harness starts the new
  nodes' agents, or sends SIGTERM to the highest ordinals (the pods a StatefulSet deletes),
  and kills -9 during the handoff (0-1.5 s after the scale) a worker of a node that stays,
  or, when agent kills are drawn too, a random remaining agent (then restarted).

After each fault the run waits until the job trains again in the expected world, then goes on.
At the end the pace drops to 0 and the job runs to its end. ``ChaosRun.run`` returns what the
test checks: the surviving agents' exit codes, the worker's result (counts, w error), every PID
started (with their descendants, seen through /proc while they lived), the ports used, and per
kill: how long the job took to train again and how many steps were redone (step numbers that
rank 0 had already reached before the kill).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers import harness

CLI = [sys.executable, "-m", "adaptrun.cli"]
JOB = "cj"
KINDS = ("worker", "agent", "controller", "resize")
MAX_NODES = 3
# What the CI test draws from: every kind.
SURVIVED_KINDS = KINDS


class ChaosError(AssertionError):
    """The job did not survive a fault (the message holds the logs' tails)."""


@dataclass
class Kill:
    kind: str
    t: float                    # time.time() of the kill -9
    target: str                 # what was killed ("cj-1", "worker of cj-0", "controller")
    nodes_after: int            # the job's node count once it recovered
    recovered_s: float = float("nan")   # kill -> first step of the expected world after it
    redone_steps: int = 0


@dataclass
class ChaosResult:
    seed: int
    kills: list[Kill]
    wall_s: float
    agent_codes: dict           # node -> exit code of its last agent (nodes in the job at the end)
    left_codes: dict            # node -> exit code of agents that left on a scale-down
    result: dict                # lsq_worker's result.json
    pids: dict                  # pid -> (start time tick, what)
    ports: set
    log_dir: Path

    def summary(self) -> str:
        lines = [f"chaos seed {self.seed}: {len(self.kills)} kill(s) survived in "
                 f"{self.wall_s:.1f} s, final w error {self.result.get('w_err', float('nan')):.4f}"]
        for k in self.kills:
            lines.append(f"  {k.kind:10s} {k.target:16s} -> {k.nodes_after} node(s): trains "
                         f"again after {k.recovered_s:5.1f} s, {k.redone_steps} step(s) redone")
        return "\n".join(lines)


# -- /proc -----------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in ticks) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s:
                children.setdefault(s[1], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int, start_ticks: int) -> bool:
    s = _stat(pid)
    return s is not None and s[0] not in ("Z", "X") and s[2] == start_ticks


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- the run ---------------------------------------------------------------------------------
@dataclass
class ChaosRun:
    root: Path
    seed: int
    faults: int = 4
    kinds: tuple = KINDS
    pace_s: float = 0.04
    snapshot_every: int = 10
    epochs: int = 2
    samples: int = 0                   # 0: enough for the faults
    fault_timeout_s: float = 60.0
    finish_timeout_s: float = 120.0    # pace 0 after the last fault: the rest of the job
    plan: list | None = None           # the fault kinds in order (None: drawn from the seed)
    procs: dict = field(default_factory=dict)       # name -> Popen (the current incarnation)
    pids: dict = field(default_factory=dict)        # pid -> (start ticks, what)
    left: dict = field(default_factory=dict)        # node -> Popen of an agent that left
    incarnation: dict = field(default_factory=dict)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.out = self.root / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.pace = self.root / "pace"
        self.state = self.root / "state"
        self.port, self.rdzv_port = harness.free_port(), harness.free_port()
        self.address = f"127.0.0.1:{self.port}"
        if not self.samples:
            self.samples = 8000 * (self.faults + 1)
        self.nodes = 1

    # -- processes ---------------------------------------------------------------------
    def _track(self, proc: subprocess.Popen, what: str) -> None:
        s = _stat(proc.pid)
        if s:
            self.pids[proc.pid] = (s[2], what)

    def _scan(self) -> None:
        """Remember every descendant of what we started (a killed agent's orphans included:
        they are found while the agent lives, before they are reparented)."""
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                for pid in descendants(p.pid):
                    if pid not in self.pids:
                        s = _stat(pid)
                        if s:
                            self.pids[pid] = (s[2], f"child of {name}")

    def _log(self, name: str) -> Path:
        n = self.incarnation[name] = self.incarnation.get(name, 0) + 1
        return self.logs / f"{name}.{n}.log"

    def start_controller(self) -> None:
        log = self._log("controller")
        p = harness.start([*CLI, "controller", "--port", str(self.port), "--rdzv-port",
                           str(self.rdzv_port), "--metrics-port", "0", "--policy-interval-s",
                           "1", "--state-dir", str(self.state)], harness.base_env(), log)
        self.procs["controller"] = p
        self._track(p, "controller")
        self._wait(lambda: "adaptrun controller on" in harness.tail(log, 100000)
                   or p.poll() is not None, 60, "the controller to listen")
        if p.poll() is not None:
            raise ChaosError(f"the controller did not start:\n{harness.tail(log)}")

    def worker_args(self, out: Path, pace: Path | None) -> list[str]:
        args = [str(harness.WORKER), "--samples", str(self.samples), "--batch", "48",
                "--epochs", str(self.epochs), "--out", str(out)]
        return args + (["--pace-file", str(pace)] if pace else [])

    def agent_argv(self, node: str | None, controller: bool = True,
                   out: Path | None = None, pace: Path | None = None) -> list[str]:
        cmd = [*CLI, "agent", "--job", JOB, "--nproc-per-node", "1",
               "--nnodes", f"1:{MAX_NODES}", "--local-addr", "127.0.0.1",
               "--max-restarts", "1000", "--min-workers", "1", "--max-workers", str(MAX_NODES),
               "--init-batch", "48", "--max-global-batch", "48", "--local-batch-min", "8",
               "--local-batch-max", "64"]
        if controller:
            cmd += ["--controller", self.address, "--node", node,
                    "--snapshot-dir", str(self.root / f"snap-{node}")]
        else:
            cmd = [c if c != f"1:{MAX_NODES}" else "1" for c in cmd]
            cmd += ["--snapshot-dir", str(self.root / "snap-reference")]
        return cmd + ["--", sys.executable, *self.worker_args(out or self.out,
                                                               pace or self.pace)]

    def start_agent(self, node: str) -> None:
        p = harness.start(self.agent_argv(node), self._env(), self._log(node))
        self.procs[node] = p
        self._track(p, node)

    def _env(self) -> dict:
        return harness.base_env(ADAPTRUN_SNAPSHOT_EVERY=str(self.snapshot_every))

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        self._scan()
        try:
            os.kill(p.pid, signal.SIGKILL)        # the process only: its children are on their own
        except ProcessLookupError:
            pass
        p.wait(timeout=10)

    def worker_pids(self, node: str) -> list[int]:
        p = self.procs.get(node)
        if p is None or p.poll() is not None:
            return []
        out = []
        for pid in descendants(p.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # a worker in a round (not a warm spare waiting for one) has opened its step log
            if any(b"lsq_worker.py" in c for c in cmd) and self._in_round(pid):
                out.append(pid)
        return out

    def _in_round(self, pid: int) -> bool:
        return (self.out / f"steps-{pid}.jsonl").exists()

    # -- waiting ---------------------------------------------------------------------------
    def _wait(self, cond, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            self._scan()
            time.sleep(0.1)
        raise ChaosError(f"timed out ({timeout_s:.0f} s) waiting for {what}\n{self.tails()}")

    def tails(self, n: int = 3000) -> str:
        parts = ["live processes: " + "; ".join(
            f"{pid} {what} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}"
            for pid, (ticks, what) in self.pids.items() if alive(pid, ticks))]
        for f in sorted(self.logs.glob("*.log"), key=lambda f: f.stat().st_mtime)[-6:]:
            parts.append(f"--- {f.name}\n{harness.tail(f, n)}")
        return "\n".join(parts)

    def rank0_steps(self) -> list[dict]:
        return sorted((r for r in harness.read_steps(self.out)
                       if r.get("event") == "step" and r["rank"] == 0), key=lambda r: r["t"])

    def finished(self) -> bool:
        return (self.out / "result.json").exists()

    def _trains(self, after_t: float, nodes: int, count: int = 3) -> bool:
        rows = [r for r in self.rank0_steps() if r["t"] > after_t and r["world"] == nodes]
        return len(rows) >= count or self.finished()

    # -- faults ----------------------------------------------------------------------------
    def _live_nodes(self) -> list[str]:
        return [f"cj-{i}" for i in range(self.nodes)]

    def _restart_agent_later(self, node: str) -> None:
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.start_agent(node)

    def inject(self, kind: str) -> Kill | None:
        nodes = self._live_nodes()
        if kind == "worker":
            node = self.rng.choice(nodes)
            deadline = time.monotonic() + 10
            pids = self.worker_pids(node)
            while not pids and time.monotonic() < deadline and not self.finished():
                time.sleep(0.1)
                pids = self.worker_pids(node) or [p for n in nodes for p in self.worker_pids(n)]
            if not pids:
                return None
            t = time.time()
            os.kill(self.rng.choice(pids), signal.SIGKILL)
            return Kill(kind, t, f"worker of {node}", self.nodes)
        if kind == "agent":
            node = self.rng.choice(nodes)
            t = time.time()
            self.kill9(node)
            self._restart_agent_later(node)
            return Kill(kind, t, node, self.nodes)
        if kind == "controller":
            t = time.time()
            self.kill9("controller")
            time.sleep(self.rng.uniform(0.5, 1.5))
            self.start_controller()
            return Kill(kind, t, "controller", self.nodes)
        if kind == "resize":
            target = self.rng.choice([n for n in range(1, MAX_NODES + 1) if n != self.nodes])
            self.scale(target)
            time.sleep(self.rng.uniform(0.0, 1.5))
            node = self.rng.choice([f"cj-{i}" for i in range(target)])
            t = time.time()
            if "agent" in self.kinds:     # the agent, restarted as a pod is
                self.kill9(node)
                self._restart_agent_later(node)
                return Kill(kind, t, f"{node} ({self.nodes_before}->{target})", self.nodes)
            pids = [p for i in range(min(target, self.nodes_before))
                    for p in self.worker_pids(f"cj-{i}")]
            if pids:                      # else the handoff had no worker to kill: a resize
                os.kill(self.rng.choice(pids), signal.SIGKILL)
            return Kill(kind, t, f"worker ({self.nodes_before}->{target})", self.nodes)
        raise ValueError(kind)

    def scale(self, target: int) -> None:
        out = subprocess.run([*CLI, "scale", JOB, "--min-workers", str(target),
                              "--max-workers", str(target), "--controller", self.address],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ChaosError(f"adaptrun scale {target} failed: {out.stderr}")
        self.nodes_before, self.nodes = self.nodes, target
        for i in range(self.nodes_before, target):         # the pods the StatefulSet adds
            self.start_agent(f"cj-{i}")
        for i in range(target, self.nodes_before):         # ... and deletes
            node = f"cj-{i}"
            self.procs[node].send_signal(signal.SIGTERM)
            self.left[node] = self.procs.pop(node)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> ChaosResult:
        t0 = time.time()
        kills: list[Kill] = []
        plan = list(self.kinds)
        self.rng.shuffle(plan)
        while len(plan) < self.faults:
            plan.append(self.rng.choice(self.kinds))
        plan = plan[:self.faults]
        plan = list(self.plan) if self.plan is not None else plan
        try:
            self.pace.write_text(str(self.pace_s))
            self.start_controller()
            self.start_agent("cj-0")
            self._wait(lambda: self._trains(0, 1, 5), 90, "the first steps")
            self.scale(1)           # the bounds the agent registered are [1, 3]: pin them
            for kind in plan:
                if self.finished():
                    break
                start, steps = time.time(), self.rng.randint(10, 40)
                self._wait(lambda: self._trains(start, self.nodes, steps),
                           self.fault_timeout_s, "training before the next fault")
                if self.finished():
                    break
                kill = self.inject(kind)
                if kill is None:
                    continue
                kills.append(kill)
                self._wait(lambda: self._trains(kill.t, kill.nodes_after),
                           self.fault_timeout_s, f"the job to train again after {kill}")
            self.pace.write_text("0")
            end = time.monotonic() + self.finish_timeout_s
            while time.monotonic() < end and any(p.poll() is None for p in
                                                 [*self.agents().values(), *self.left.values()]):
                self._scan()
                time.sleep(0.2)
        finally:
            self.stop_all()
        wall = time.time() - t0
        self._redone(kills)
        result = json.loads((self.out / "result.json").read_text()) if self.finished() else {}
        return ChaosResult(self.seed, kills, wall,
                           {n: p.returncode for n, p in self.agents().items()},
                           {n: p.returncode for n, p in self.left.items()},
                           result, dict(self.pids), self.ports(), self.logs)

    def agents(self) -> dict:
        return {n: p for n, p in self.procs.items() if n != "controller"}

    def stop_all(self) -> None:
        """SIGTERM the controller (it saves), then kill -9 the groups of whatever still runs."""
        self._scan()
        ctl = self.procs.get("controller")
        for name, p in [*self.agents().items(), *self.left.items()]:
            if p.poll() is None:
                harness.stop(p)
        if ctl is not None and ctl.poll() is None:
            ctl.terminate()
            try:
                ctl.wait(timeout=15)
            except subprocess.TimeoutExpired:
                harness.stop(ctl)

    def ports(self) -> set:
        ports = {self.port, self.rdzv_port}
        for r in harness.read_steps(self.out):
            if r.get("event") == "start" and r.get("master", "").rpartition(":")[2].isdigit():
                ports.add(int(r["master"].rpartition(":")[2]))
        return ports

    def _redone(self, kills: list[Kill]) -> None:
        """Per kill: the step numbers rank 0 reached again after it (already reached before),
        and when the job trained again: the step that ends the longest pause after the kill
        (a survivor may log a step or two before its collectives fail)."""
        rows = self.rank0_steps()
        for i, k in enumerate(kills):
            end = kills[i + 1].t if i + 1 < len(kills) else float("inf")
            t = [k.t] + [r["t"] for r in rows if k.t < r["t"] < end]
            if len(t) > 1:
                gap, resumed = max((b - a, b) for a, b in zip(t, t[1:]))
                k.recovered_s = resumed - k.t
            before = max((r["step"] for r in rows if r["t"] < k.t), default=0)
            again = {r["step"] for r in rows if k.t <= r["t"] < end and r["step"] <= before}
            k.redone_steps = len(again)

    def reference(self) -> dict:
        """The same job, same seed, undisturbed: one agent alone (it hosts its own store)."""
        out = self.root / "reference"
        out.mkdir(exist_ok=True)
        log = self.logs / "reference.log"
        p = harness.start(self.agent_argv(None, controller=False, out=out,
                                          pace=self.root / "no-pace"), self._env(), log)
        self._track(p, "reference")
        try:
            if p.wait(timeout=180) != 0:
                raise ChaosError(f"the undisturbed run failed:\n{harness.tail(log)}")
        finally:
            self._scan()
            harness.stop(p)
        return json.loads((out / "result.json").read_text())

    def leftovers(self) -> tuple[list[str], list[int]]:
        """Processes we started (or their descendants) still alive; ports still listening."""
        time.sleep(0.5)
        procs = [f"{pid} ({what})" for pid, (ticks, what) in self.pids.items()
                 if alive(pid, ticks)]
        return procs, sorted(p for p in self.ports() if listening(p))
