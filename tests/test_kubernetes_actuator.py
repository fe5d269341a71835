"""The ``kubernetes`` actuator with the official ``kubernetes`` client against
``k8s_api_double``: a TEST DOUBLE of the Kubernetes API server (and of the StatefulSet
controller, the training operator and the kubelet), because no API server can run on this
machine. The client reads a kubeconfig that points at the double (http://127.0.0.1:PORT, no
credentials); every request it sends is recorded, so the tests assert the exact scale PATCHes.

The last test runs the whole chain: a real ``adaptrun controller`` process with
``--actuator kubernetes``, and the double playing the kubelet: each pod it creates starts a
real ``adaptrun agent`` process (with the least-squares worker), each pod it deletes sends that
agent SIGTERM. ``adaptrun scale`` moves the job 1 -> 2 -> 1 pods; every sample counted once.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from adaptrun.controller.actuators import ActuatorError, create_actuator
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller
from adaptrun.generated import control_plane_pb2 as pb
from controller_support import channel_to, register, report, send_reports
from k8s_api_double import MERGE, K8sApiDouble
from workers import harness

CLI = [sys.executable, "-m", "adaptrun.cli"]
NS = "train"
STS_SCALE = f"/apis/apps/v1/namespaces/{NS}/statefulsets/%s/scale"
PTJ_SCALE = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/%s/scale"


class Notes:
    """The controller's side of ``Actuator.bind``: notices per job, fixed bounds."""

    def __init__(self, bounds=None):
        self.lines: list[tuple[str, str]] = []
        self.bounds = bounds or {}

    def notify(self, job, text):
        self.lines.append((job, text))

    def of(self, job) -> list[str]:
        return [t for j, t in list(self.lines) if j == job]


@contextlib.contextmanager
def api_double(delay_s: float = 0.0):
    double = K8sApiDouble(delay_s=delay_s).start()
    try:
        yield double
    finally:
        double.close()


@contextlib.contextmanager
def k8s_actuator(double, tmp_path, targets, bounds=None, **options):
    """The real actuator and client, configured by a kubeconfig that points at the double."""
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    options = {"poll_s": 0.05, "retry_s": 0.5, "scale_down_delay_s": 0.0, **options}
    act = create_actuator("kubernetes", targets=targets, kubeconfig=str(kubeconfig), **options)
    notes = Notes(bounds)
    act.bind(notes.notify, notes.bounds.get)
    try:
        yield act, notes
    finally:
        act.close()


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def scale_patches(double, path):
    return [(r.content_type, r.body) for r in double.patches() if r.path == path]


@pytest.mark.timeout(30)
def test_statefulset_scales_up_and_down_through_its_scale_subresource(tmp_path):
    """(Kubernetes API test double.) set_workers returns at once even when the API answers
    slowly; the PATCH is a merge patch of spec.replicas on the StatefulSet's scale subresource;
    a scale-down waits for the leaving agents, then deletes the highest ordinals first and is
    no failure."""
    with api_double(delay_s=0.3) as double:
        double.add_statefulset(NS, "web", replicas=1)
        with k8s_actuator(double, tmp_path, ["j=statefulset/web"],
                          scale_down_delay_s=0.5) as (act, notes):
            wait_for(lambda: act.current_workers("j") == 1, 10, "the workload's own replicas")
            t0 = time.monotonic()
            act.set_workers("j", 3)
            assert time.monotonic() - t0 < 0.25, "set_workers waited for the API (0.3 s)"
            assert act.current_workers("j") == 3
            wait_for(lambda: double.phases(NS) == {f"web-{i}": "Running" for i in range(3)},
                     10, "three running pods")
            assert scale_patches(double, STS_SCALE % "web") == [(MERGE, {"spec": {"replicas": 3}})]
            (patch,) = double.patches()
            assert patch.query.get("fieldManager") == "adaptrun-controller"

            t1 = time.monotonic()
            act.set_workers("j", 1)
            wait_for(lambda: double.phases(NS) == {"web-0": "Running"}, 10, "the scale-down")
            assert time.monotonic() - t1 >= 0.5, "pods deleted before the scale-down delay"
            assert double.deleted == ["web-2", "web-1"]
            assert scale_patches(double, STS_SCALE % "web")[-1] == (MERGE,
                                                                    {"spec": {"replicas": 1}})
            assert act.current_workers("j") == 1
            time.sleep(0.2)
            assert notes.of("j") == [], "a planned scale-down was reported as a failure"


@pytest.mark.timeout(30)
def test_pytorchjob_scales_with_several_workers_per_pod(tmp_path):
    """(Kubernetes API test double.) A Kubeflow PyTorchJob through CustomObjectsApi's scale
    subresource, 2 workers per pod: replicas = ceil(workers / 2)."""
    with api_double() as double:
        double.add_pytorchjob(NS, "pt", replicas=1)
        with k8s_actuator(double, tmp_path, {"p": "pytorchjob/pt"},
                          nproc_per_node=2) as (act, notes):
            wait_for(lambda: act.current_workers("p") == 2, 10, "1 pod = 2 workers")
            act.set_workers("p", 3)
            wait_for(lambda: double.phases(NS) == {"pt-worker-0": "Running",
                                                   "pt-worker-1": "Running"}, 10, "two pods")
            act.set_workers("p", 2)
            wait_for(lambda: list(double.phases(NS)) == ["pt-worker-0"], 10, "one pod")
            assert scale_patches(double, PTJ_SCALE % "pt") == [
                (MERGE, {"spec": {"replicas": 2}}), (MERGE, {"spec": {"replicas": 1}})]
            assert act.current_workers("p") == 2
            assert notes.of("p") == []


@pytest.mark.timeout(30)
def test_a_finished_job_scales_its_statefulset_to_zero_and_leaves_a_pytorchjob(tmp_path):
    """(Kubernetes API test double.) ``job_done``: a StatefulSet restarts a pod whose agent
    exited 0, so a finished job's StatefulSet goes to 0 replicas (no failure said); a
    PyTorchJob ends by itself when its workers succeed and is not touched."""
    with api_double() as double:
        double.add_statefulset(NS, "web", replicas=2)
        double.add_pytorchjob(NS, "pt", replicas=1)
        with k8s_actuator(double, tmp_path, ["s=statefulset/web", "p=pytorchjob/pt"],
                          scale_down_delay_s=0.3) as (act, notes):
            wait_for(lambda: act.current_workers("s") == 2 and act.current_workers("p") == 1,
                     10, "the workloads' own replicas")
            t0 = time.monotonic()
            act.job_done("s")
            act.job_done("p")
            assert act.current_workers("s") == 0
            wait_for(lambda: double.phases(NS) == {"pt-worker-0": "Running"}, 10,
                     "the StatefulSet's pods gone")
            assert time.monotonic() - t0 >= 0.3, "pods deleted before the scale-down delay"
            assert scale_patches(double, STS_SCALE % "web") == [(MERGE, {"spec": {"replicas": 0}})]
            assert scale_patches(double, PTJ_SCALE % "pt") == []
            time.sleep(0.2)
            assert [n for n in notes.of("s") if "to 0 replicas" in n], notes.of("s")
            assert not [n for n in notes.of("s") if "removed by the cluster" in n]
            assert notes.of("p") == []


@pytest.mark.timeout(60)
def test_a_controller_scales_a_finished_jobs_statefulset_to_zero_live_and_after_a_restart(
        tmp_path):
    """(Kubernetes API test double.) The job's final report reaches a real controller: its
    StatefulSet goes to 0. A controller restarted from its state dir after the job finished
    (its pods back meanwhile) does the same for it, and leaves an unfinished job alone."""
    state = tmp_path / "state"
    with api_double() as double:
        double.add_statefulset(NS, "done", replicas=1)
        double.add_statefulset(NS, "busy", replicas=1)
        targets = ["done=statefulset/done", "busy=statefulset/busy"]
        config = ControllerConfig(policy_interval_s=60, tick_s=0.05, metrics_port=None,
                                  rdzv_port=None, actuator="kubernetes", state_dir=str(state))
        with k8s_actuator(double, tmp_path, targets) as (act, _):
            ctl = Controller(config, actuator=act).start()
            try:
                with channel_to(ctl) as (_, stub):
                    for job in ("done", "busy"):
                        agent = register(stub, job).agent_id
                        send_reports(stub, agent, [report(job, step=i, world_size=1)
                                                   for i in range(1, 4)])
                    agent = register(stub, "done").agent_id
                    send_reports(stub, agent, [report("done", step=4, world_size=1,
                                                      finished=True)])
                wait_for(lambda: double.replicas("statefulsets", NS, "done") == 0, 10,
                         "the finished job's StatefulSet at 0")
            finally:
                ctl.stop(grace_s=0.2)
        assert double.replicas("statefulsets", NS, "busy") == 1
        double.scale("statefulsets", NS, "done", 1)          # say, an operator scaled it back
        with k8s_actuator(double, tmp_path, targets) as (act, _):
            ctl = Controller(config, actuator=act).start()
            try:
                assert ctl.core.registry.job("done").done
                wait_for(lambda: double.replicas("statefulsets", NS, "done") == 0, 10,
                         "the restored finished job's StatefulSet at 0")
                time.sleep(0.3)
                assert double.replicas("statefulsets", NS, "busy") == 1
            finally:
                ctl.stop(grace_s=0.2)


@pytest.mark.timeout(30)
def test_pending_pods_past_the_timeout_keep_the_job_at_its_size(tmp_path):
    """(Kubernetes API test double.) New pods stay Pending (no node fits them): after the
    pending timeout the job's status says the scale was not met, the replicas go back to the
    pods that run, and current_workers says what is achievable; nothing hangs."""
    with api_double() as double:
        double.add_statefulset(NS, "web", replicas=2)
        double.pending_new_pods("statefulsets", NS, "web", True)
        with k8s_actuator(double, tmp_path, ["j=statefulset/web"],
                          pending_timeout_s=1.0) as (act, notes):
            wait_for(lambda: act.current_workers("j") == 2, 10, "the workload's own replicas")
            t0 = time.monotonic()
            act.set_workers("j", 4)
            assert act.current_workers("j") == 4       # working towards it, for a while
            wait_for(lambda: double.phases(NS).get("web-3") == "Pending", 10, "pending pods")
            wait_for(lambda: notes.of("j"), 10, "the unmet-scale notice")
            waited = time.monotonic() - t0
            (text,) = notes.of("j")
            assert re.match(r"scale to 4 workers not met after \d s: 2 pods Pending "
                            r"\(Unschedulable: .*Insufficient.*\); keeping 2$", text), text
            assert 1.0 <= waited < 5.0
            assert act.current_workers("j") == 2
            wait_for(lambda: double.phases(NS) == {"web-0": "Running", "web-1": "Running"},
                     10, "the pending pods to go")
            assert double.replicas("statefulsets", NS, "web") == 2
            assert scale_patches(double, STS_SCALE % "web") == [
                (MERGE, {"spec": {"replicas": 4}}), (MERGE, {"spec": {"replicas": 2}})]
            time.sleep(0.2)
            assert len(notes.of("j")) == 1, notes.of("j")   # removing our Pending pods: no failure


@pytest.mark.timeout(30)
def test_an_evicted_pod_is_a_failure_the_job_survives(tmp_path):
    """(Kubernetes API test double.) The cluster evicts a pod the job still wants: one notice
    (though the pod is seen terminating, then deleted); the workload replaces it."""
    with api_double() as double:
        double.add_statefulset(NS, "web", replicas=2)
        with k8s_actuator(double, tmp_path, ["j=statefulset/web"]) as (act, notes):
            wait_for(lambda: act.current_workers("j") == 2, 10, "the workload's own replicas")
            time.sleep(0.3)                               # the pod watch is up
            old_uid = double.pods(NS)[1]["metadata"]["uid"]
            double.evict(NS, "web-1")
            wait_for(lambda: notes.of("j"), 10, "the eviction notice")
            time.sleep(0.2)
            (text,) = notes.of("j")
            assert text.startswith("pod web-1 of statefulset/web was removed by the cluster "
                                   "(EvictionByEvictionAPI) while the job wanted 2 pod(s): a "
                                   "failure the job survives"), text
            pods = double.pods(NS)
            assert [p["metadata"]["name"] for p in pods] == ["web-0", "web-1"]
            assert pods[1]["metadata"]["uid"] != old_uid     # the StatefulSet replaced it
            assert act.current_workers("j") == 2
            assert double.patches() == []                    # the actuator wrote nothing


@pytest.mark.timeout(30)
def test_counts_outside_the_bounds_are_clamped_and_said(tmp_path):
    """(Kubernetes API test double.) A count outside the job's bounds never reaches the
    workload: it is clamped, and the job's status says so."""
    with api_double() as double:
        double.add_statefulset(NS, "web", replicas=1)
        with k8s_actuator(double, tmp_path, ["j=statefulset/web"],
                          bounds={"j": (1, 2)}) as (act, notes):
            act.set_workers("j", 5)
            assert act.current_workers("j") == 2
            wait_for(lambda: scale_patches(double, STS_SCALE % "web"), 10, "a PATCH")
            assert scale_patches(double, STS_SCALE % "web") == [(MERGE, {"spec": {"replicas": 2}})]
            assert notes.of("j") == ["the kubernetes actuator was asked for 5 workers, outside "
                                     "the job's bounds [1, 2]: using 2"]
            with pytest.raises(ActuatorError):
                act.set_workers("j", -1)


@pytest.mark.timeout(60)
def test_a_job_without_a_workload_gets_a_clear_error(tmp_path):
    """(Kubernetes API test double.) No --k8s-target for the job: set_workers raises one clear
    error, and through the real controller the job's status shows it while it keeps its size.
    A target whose workload does not exist is said too; a malformed target stops the CLI."""
    with api_double() as double:
        with k8s_actuator(double, tmp_path, ["ghost=statefulset/nope"]) as (act, notes):
            with pytest.raises(ActuatorError, match=r"job 'orphan' has no Kubernetes workload: "
                               r"start the controller with --k8s-target "
                               r"orphan=statefulset/NAME"):
                act.set_workers("orphan", 2)
            assert act.current_workers("orphan") is None
            wait_for(lambda: notes.of("ghost"), 10, "the not-found notice")
            assert notes.of("ghost") == [f"kubernetes: statefulset/nope in namespace {NS} not "
                                         f"found (404): create it, or fix --k8s-target / "
                                         f"--k8s-namespace"]

            config = ControllerConfig(policy_interval_s=60, tick_s=0.05, metrics_port=None,
                                      rdzv_port=None, actuator="kubernetes")
            ctl = Controller(config, actuator=act).start()
            try:
                with channel_to(ctl) as (_, stub):
                    agent = register(stub, "orphan").agent_id
                    send_reports(stub, agent, [report("orphan", step=i, world_size=1)
                                               for i in range(1, 4)])
                    s = stub.SetBounds(pb.SetBoundsRequest(job_id="orphan", min_workers=2,
                                                           max_workers=2), timeout=10)
                    assert "no Kubernetes workload" in s.last_decision
                    assert any("could not move the job to 2 workers" in n and "--k8s-target "
                               "orphan=statefulset/NAME" in n for n in s.notices), s.notices
                    assert s.desired_workers == 0           # nothing achievable, not "2"
            finally:
                ctl.stop(grace_s=0.2)
    bad = subprocess.run([*CLI, "controller", "--actuator", "kubernetes", "--k8s-target",
                          "j=deployment/web", "--port", "0", "--rdzv-port", "none"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "Error: --k8s-target j=deployment/web: the workload must be statefulset/NAME, "
        "pytorchjob/NAME or job/NAME"]


@pytest.mark.timeout(150)
def test_end_to_end_controller_scales_a_statefulset_of_real_agents(tmp_path):
    """(Kubernetes API test double playing the API server, the StatefulSet controller and the
    kubelet; no cluster can run here.) A real `adaptrun controller --actuator kubernetes`
    resizes the StatefulSet through the double; each pod is a real `adaptrun agent` with the
    least-squares worker. `adaptrun scale` moves the job 1 -> 2 -> 1 pods; the leaving agent
    has left the job when its pod is deleted (no failure handling on the survivor); every
    sample is counted exactly once; the finished job's StatefulSet goes to 0 replicas."""

    from test_agent import LSQ, agent_argv, check_exactly_once

    out, pace = tmp_path / "out", tmp_path / "pace"
    out.mkdir()
    pace.write_text("0.08")
    worker = (LSQ, "--samples", "24000", "--batch", "24", "--epochs", "1", "--pace-file",
              str(pace), "--out", str(out))
    # No --rdzv-endpoint anywhere: the controller hosts the job's store (--rdzv-port 0 here).
    agents: dict[str, subprocess.Popen] = {}
    deleted: list[tuple[str, bool]] = []   # (pod, had its agent left the job by then)
    ctl = None
    ctl_log = tmp_path / "controller.log"
    double = K8sApiDouble().start()
    try:
        double.add_statefulset(NS, "lsq", replicas=1)
        kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig")
        with open(ctl_log, "wb") as err:
            ctl = subprocess.Popen(
                [*CLI, "controller", "--port", "0", "--metrics-port", "0", "--rdzv-port", "0",
                 "--policy-interval-s", "60", "--actuator", "kubernetes", "--kubeconfig",
                 str(kubeconfig), "--k8s-namespace", NS, "--k8s-target", "kj=statefulset/lsq",
                 "--k8s-scale-down-delay-s", "3"],
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                env=harness.base_env())
        line = ctl.stdout.readline()
        m = re.search(r"on (127\.0\.0\.1:\d+),", line)
        assert m, (line, harness.tail(ctl_log))
        address = m.group(1)

        def start_pod(pod):                 # the kubelet starts the pod's container
            node = pod["metadata"]["name"]
            agents[node] = harness.start(
                agent_argv("kj", node, controller_addr=address, nnodes="1:2",
                           bounds=(1, 2), snapshot_dir=tmp_path / f"snap-{node}",
                           worker=worker), harness.base_env(), tmp_path / f"{node}.log")

        def stop_pod(pod):                  # ... and signals it when the pod is deleted
            node = pod["metadata"]["name"]
            left = "leaves the job" in harness.tail(tmp_path / f"{node}.log", 100000)
            deleted.append((node, left))
            p = agents.get(node)
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)

        double.attach_kubelet(start_pod, stop_pod)
        logs = lambda: [tmp_path / f"{n}.log" for n in agents] + [ctl_log]  # noqa: E731
        live = lambda: list(agents.values())                               # noqa: E731

        def scale(n):
            r = subprocess.run([*CLI, "scale", "kj", "--min-workers", str(n), "--max-workers",
                                str(n), "--controller", address], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r.stderr

        try:
            harness.wait_steps(out, lambda r: r["world"] == 1, 5, 90, live())
            scale(2)
            t1 = time.time()
            harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t1, 5, 90, live())
            assert scale_patches(double, STS_SCALE % "lsq") == [(MERGE, {"spec": {"replicas": 2}})]
            scale(1)
            t2 = time.time()
            harness.wait_steps(out, lambda r: r["world"] == 1 and r["t"] > t2, 3, 90, live())
            # The double deletes the pod under its lock and runs the kubelet hook after it:
            # wait for both, or the hook's record may not be there yet.
            wait_for(lambda: list(double.phases(NS)) == ["lsq-0"] and deleted, 30,
                     "pod lsq-1 deleted and its agent signalled")
            pace.write_text("0")
            assert scale_patches(double, STS_SCALE % "lsq")[-1] == (MERGE,
                                                                    {"spec": {"replicas": 1}})
            # The directive came first: the agent had left the job when its pod was deleted
            # (SIGTERM may still find it tidying up: exit 143 then, harmless).
            assert deleted == [("lsq-1", True)], deleted
            assert agents["lsq-1"].wait(timeout=60) in (0, 128 + signal.SIGTERM)
            assert agents["lsq-0"].wait(timeout=120) == 0
            # The job is done: its StatefulSet goes to 0 replicas after the scale-down delay
            # (it would restart the finished pods forever).
            # (and, as above, for the kubelet hook's record of the deleted pod)
            wait_for(lambda: double.replicas("statefulsets", NS, "lsq") == 0
                     and not double.phases(NS) and len(deleted) == 2, 30,
                     "the finished job's StatefulSet at 0 and pod lsq-0 deleted")
            assert scale_patches(double, STS_SCALE % "lsq")[-1] == (MERGE,
                                                                    {"spec": {"replicas": 0}})
            assert [p for p, _ in deleted] == ["lsq-1", "lsq-0"], deleted
            status = subprocess.run([*CLI, "status", "--controller", address, "--job", "kj",
                                     "--json"], capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            (job,) = json.loads(status.stdout)["jobs"]
            assert job["desired_workers"] == 0
            assert [n for n in job["notices"] if "the job finished: statefulset/lsq to 0" in n]
            assert not [n for n in job["notices"] if "removed by the cluster" in n], job["notices"]
            assert "restarting the workers" not in harness.tail(tmp_path / "lsq-0.log", 10**6)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(f"--- {p}\n{harness.tail(p)}"
                                                        for p in logs())) from None
    finally:
        for p in agents.values():
            harness.stop(p)
        if ctl is not None:
            harness.stop(ctl, signal.SIGTERM)
            harness.stop(ctl)
            ctl.stdout.close()
        double.close()
    check_exactly_once(out)
    text = ctl_log.read_text()
    assert "statefulset/lsq scaled to 2 replica(s)" in text
    assert "statefulset/lsq scaled to 1 replica(s)" in text
