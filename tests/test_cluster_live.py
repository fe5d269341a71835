"""Three jobs share `adaptrun controller --capacity 4` (local actuator): real controller, agents,
rendezvous and workers on 127.0.0.1 (issue 23).

The local actuator of `adaptrun controller` records the worker count the controller asks of
each job; with no agent command it starts nothing. The test plays the cluster as the actuator
would with one: every 0.2 s it reads the jobs (ListJobs, what `adaptrun status` shows) and
starts agents (one worker each, ``--nproc-per-node 1``) until a job's live agents cover the
workers it is asked for; on a shrink the directive makes the agents beyond it leave by
themselves. Each job's first agent is started by the test when the job arrives.

The jobs (lsq_worker, a fixed global batch of 48, B0 = 48, so 1 to 4 workers all divide it)
are paced by sleeps, so how they scale is known by construction:
- ``a`` (workers [1, 2]) sleeps 4 ms per example: 2 workers halve its step (speedup 2);
- ``b`` (workers [1, 4]) sleeps 1 ms per example and 144 ms per step whatever the workers:
  a second worker saves 24 of 192 ms (speedup 1.14);
- ``c`` (workers [1, 4]), the late arrival, is paced as ``a``.
The controller decides on its fitted throughput models, which see B at about 1.5 at 2 workers
(its one-worker steps run as two micro-batches, so a per-step cost reads partly as
per-micro-batch) and A at about 2. Why C's worker must come from B: the allocator maximises
the p = -1 power mean of the speedups (minimises the sum of 1/s_j, each normalised to the
job's minimum). A alone grows to its 2; B then gets the other 2. C arrives in a full
cluster and is admitted (its minimum fits): taking from B costs 1/2 + 1 + 1 = 2.5, taking from
A 1 + 1/1.5 + 1 = 2.67, so B, whose goodput gains least from its second worker, gives it.
Each job's resize cost prior is 2 s (``--resize-cost-s``: local agents re-form in about a
second), so a job that trains a minute or two still finds a resize worth it.

Asserted: C's admission moves B 2 -> 1 and leaves A at 2 (the allocation, `adaptrun status
--json` and the workers' own step rows); the allocated GPUs (ListJobs and /metrics, sampled
every 0.2 s), the worker counts the actuator is asked for and the workers that train (rebuilt
from the step rows by time) never sum above 4; a finished job's allocation goes back to 0; once A finishes, a remaining
job trains at more workers than before; every job counts every sample exactly once.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
from controller_support import sample
from test_agent import LSQ, check_exactly_once
from workers import harness

CLI = [sys.executable, "-m", "adaptrun.cli"]
CAPACITY = 4
SAMPLES = 36864          # a paced job would train this for minutes; the test ends it on cue
BATCH = 48               # B0 = the global batch (fixed): 1, 2, 3 and 4 workers all divide it
# Per job: lsq_worker's pacing. 48 examples x 4 ms = 0.192 s a step at one worker.
# Per job: its most workers and lsq_worker's pacing (48 examples x 4 ms = 0.192 s a step).
JOBS = {"a": (2, ("--example-sleep", "0.004")),
        "b": (CAPACITY, ("--example-sleep", "0.001", "--step-sleep", "0.144")),
        "c": (CAPACITY, ("--example-sleep", "0.004"))}


class Cluster:
    """The test as the cluster: starts each job's agents as the controller asks, samples the
    controller's view every ``poll_s``."""

    def __init__(self, tmp: Path, address: str, metrics_url: str, poll_s: float = 0.2):
        self.tmp, self.address, self.metrics_url, self.poll_s = tmp, address, metrics_url, poll_s
        self.agents: dict[str, list] = {}       # job -> [(node, Popen)]
        self.samples: list[tuple[float, dict, float | None]] = []   # (t, jobs, allocated gpus)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ControllerStub(self._channel)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def out(self, job: str) -> Path:
        return self.tmp / job / "out"

    def scale_file(self, job: str) -> Path:
        return self.tmp / job / "sleep-scale"

    def argv(self, job: str, node: str) -> list[str]:
        worker = [LSQ, "--samples", str(SAMPLES), "--batch", str(BATCH), "--epochs", "1",
                  *JOBS[job][1], "--sleep-scale-file", str(self.scale_file(job)),
                  "--out", str(self.out(job))]
        return [*CLI, "agent", "--job", job, "--node", node, "--nproc-per-node", "1",
                "--nnodes", f"1:{CAPACITY}", "--local-addr", "127.0.0.1", "--max-restarts",
                "2", "--min-workers", "1", "--max-workers", str(JOBS[job][0]),
                "--init-batch", str(BATCH),
                "--max-global-batch", str(BATCH), "--local-batch-min", "4",
                "--local-batch-max", str(BATCH),
                "--controller", self.address, "--snapshot-dir", str(self.tmp / job / "snap"),
                "--", sys.executable, *worker]

    def arrive(self, job: str) -> None:
        self.out(job).mkdir(parents=True)
        self.scale_file(job).write_text("1")
        self._start_agent(job)

    def _start_agent(self, job: str) -> None:
        with self._lock:
            lst = self.agents.setdefault(job, [])
            node = f"{job}-n{len(lst)}"
            proc = harness.start(self.argv(job, node), harness.base_env(),
                                 self.tmp / job / f"{node}.log")
            lst.append((node, proc))

    def live(self, job: str) -> int:
        with self._lock:
            return sum(p.poll() is None for _, p in self.agents.get(job, []))

    def procs(self) -> list:
        with self._lock:
            return [p for lst in self.agents.values() for _, p in lst]

    def jobs(self) -> dict:
        resp = self._stub.ListJobs(pb.ListJobsRequest(), timeout=5)
        return {j.job_id: j for j in resp.jobs}

    def start(self) -> "Cluster":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                jobs = self.jobs()
                with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                    used = sample(r.read().decode(), "adaptrun_cluster_allocated_gpus")
            except Exception as exc:  # noqa: BLE001 - said at the end, the loop goes on
                self.errors.append(repr(exc))
                continue
            now = time.time()
            self.samples.append((now, {k: (j.allocated_workers, j.desired_workers,
                                           j.world_size, j.done) for k, j in jobs.items()},
                                 used))
            for k, j in jobs.items():
                if not j.done and j.desired_workers > self.live(k):
                    for _ in range(j.desired_workers - self.live(k)):
                        self._start_agent(k)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._channel.close()
        for p in self.procs():
            harness.stop(p)


def rank0_steps(out: Path) -> list[dict]:
    return sorted((r for r in harness.read_steps(out) if r.get("event") == "step"
                   and r["rank"] == 0), key=lambda r: r["t"])


def world_at(steps: list[dict], t: float) -> int:
    """The workers a job trains with at time ``t``: the world of its last step at or before
    ``t`` (in a re-form gap, the old world), 0 before its first step and after its last."""
    if not steps or t < steps[0]["t"] or t > steps[-1]["t"]:
        return 0
    w = 0
    for r in steps:
        if r["t"] > t:
            break
        w = r["world"]
    return w


def wait_for(cond, timeout_s: float, what: str, cluster: Cluster, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        dead = [p.args[5:8] for p in cluster.procs() if p.poll() not in (None, 0)]
        if dead:
            raise AssertionError(f"waiting for {what}: agents failed: {dead}")
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def trains_at(cluster: Cluster, job: str, world: int, after_t: float = 0.0, count: int = 3):
    rows = [r for r in rank0_steps(cluster.out(job)) if r["world"] == world and r["t"] > after_t]
    return rows if len(rows) >= count else None


def trains_at(cluster: Cluster, job: str, world: int, after_t: float = 0.0, count: int = 3):
    rows = [r for r in rank0_steps(cluster.out(job)) if r["world"] == world and r["t"] > after_t]
    return rows if len(rows) >= count else None


def timeline(steps: dict, t0: float) -> str:
    """Per job, its worlds in order: (workers, first step, last step), seconds after t0."""
    lines = []
    for job, rows in sorted(steps.items()):
        seg: list = []
        for r in rows:
            if not seg or seg[-1][0] != r["world"]:
                seg.append([r["world"], r["t"], r["t"]])
            seg[-1][2] = r["t"]
        lines.append(f"{job}: " + ", ".join(f"{w} [{a - t0:.1f}, {b - t0:.1f}]"
                                            for w, a, b in seg))
    return "\n".join(lines)


@pytest.mark.timeout(300)
def test_three_jobs_share_four_workers_by_goodput(tmp_path):
    log = open(tmp_path / "controller.log", "w")
    ctl = subprocess.Popen([*CLI, "controller", "--port", "0", "--metrics-port", "0",
                            "--rdzv-port", "0", "--capacity", str(CAPACITY),
                            "--allocation-interval-s", "1", "--policy-interval-s", "1",
                            "--resize-cost-s", "2"],
                           stdout=subprocess.PIPE, stderr=log, text=True,
                           start_new_session=True, cwd=str(harness.REPO), env=harness.base_env())
    cluster = None
    t0 = time.time()
    marks: dict[str, float] = {}
    try:
        line = ctl.stdout.readline()
        m = re.search(r"on (127\.0\.0\.1:\d+), metrics on (http://\S+/metrics)", line)
        assert m, (line, (tmp_path / "controller.log").read_text()[-3000:])
        cluster = Cluster(tmp_path, m.group(1), m.group(2)).start()

        cluster.arrive("a")                        # alone: the cluster lets it grow
        wait_for(lambda: any(trains_at(cluster, "a", w) for w in (2, 3, 4)), 120,
                 "a to grow", cluster)
        marks["b"] = time.time()
        cluster.arrive("b")
        wait_for(lambda: trains_at(cluster, "b", 2) and trains_at(cluster, "a", 2, marks["b"]),
                 120, "a and b at 2 workers each", cluster)
        marks["c"] = time.time()
        cluster.arrive("c")                        # the cluster is full
        wait_for(lambda: trains_at(cluster, "c", 1) and trains_at(cluster, "b", 1, marks["c"]),
                 120, "c admitted at 1 worker and b at 1", cluster)
        status = subprocess.run([*CLI, "status", "--controller", cluster.address, "--json"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        shown = {j["job_id"]: j for j in json.loads(status.stdout)["jobs"]}

        cluster.scale_file("a").write_text("0")    # a trains its last steps at once
        wait_for(lambda: (cluster.out("a") / "result.json").exists(), 120, "a to finish",
                 cluster)
        marks["a_done"] = rank0_steps(cluster.out("a"))[-1]["t"]
        before = {j: max(r["world"] for r in rank0_steps(cluster.out(j))
                         if r["t"] <= marks["a_done"]) for j in "bc"}
        wait_for(lambda: any(trains_at(cluster, j, w, marks["a_done"])
                             for j in "bc" for w in range(before[j] + 1, CAPACITY + 1)),
                 120, "b or c to grow once a finished", cluster)
        for job in "bc":
            cluster.scale_file(job).write_text("0")
        for _, p in [x for lst in cluster.agents.values() for x in lst]:
            assert p.wait(timeout=120) == 0, p.args
    finally:
        if cluster is not None:
            cluster.close()
        ctl.terminate()
        try:
            ctl.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        harness.stop(ctl)
        ctl.stdout.close()
        log.close()
    steps = {j: rank0_steps(cluster.out(j)) for j in "abc"}
    story = timeline(steps, t0) + f"\nmarks: " + ", ".join(
        f"{k} {v - t0:.1f}" for k, v in marks.items())
    assert not cluster.errors[5:], cluster.errors     # a few before the first job: none yet

    # C's worker came from B: at C's arrival A and B ran 2 each; C's first step found B at 1
    # and A still at 2, and the allocation said so.
    c_first = steps["c"][0]["t"]
    assert world_at(steps["a"], marks["c"]) == 2 and world_at(steps["b"], marks["c"]) == 2, story
    assert world_at(steps["b"], c_first) == 1, story
    assert {r["world"] for r in steps["a"] if marks["c"] <= r["t"] <= c_first} == {2}, story
    admitted = next(s for t, s, _ in cluster.samples if "c" in s and s["c"][0] > 0)
    assert (admitted["a"][0], admitted["b"][0], admitted["c"][0]) == (2, 1, 1), admitted
    assert (shown["a"]["allocated_workers"], shown["b"]["allocated_workers"],
            shown["c"]["allocated_workers"]) == (2, 1, 1), shown

    # Never above the capacity: what is allocated, what the actuator is asked for (every
    # 0.2 s), and the workers that train (every step of every job).
    assert len(cluster.samples) > 100
    for t, jobs, used in cluster.samples:
        assert sum(max(v[0], 0) for v in jobs.values()) <= CAPACITY, (t - t0, jobs)
        assert sum(v[1] for v in jobs.values() if not v[3]) <= CAPACITY, (t - t0, jobs)
        assert used is None or used <= CAPACITY, (t - t0, used)
    for t in sorted(r["t"] for rows in steps.values() for r in rows):
        assert sum(world_at(rows, t) for rows in steps.values()) <= CAPACITY, (t - t0, story)

    # A's workers went to the others: its allocation went back to 0 and a remaining job
    # trained at more workers after it ended.
    assert any(s.get("a", (1, 0, 0, False))[3] and s["a"][0] == 0
               for _, s, _ in cluster.samples), "a kept its GPUs after it finished"
    assert any(r["world"] > before[j] for j in "bc" for r in steps[j]
               if r["t"] > marks["a_done"]), story
    for job in "abc":
        check_exactly_once(cluster.out(job))
    print(story)
