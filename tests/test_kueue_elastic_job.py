"""The Kueue path of the ``kubernetes`` actuator: an elastic Indexed ``batch/v1`` Job resized
through its ``spec.parallelism``, and the cluster capacity read from a Kueue ClusterQueue.

Everything here runs against ``k8s_api_double``: a TEST DOUBLE that stands in for a Kubernetes
API server (with Kueue's ClusterQueue, the Job controller, Kueue's admission of workload slices
and the kubelet), because no API server can run on this machine. The official ``kubernetes``
client talks to it through a kubeconfig (http://127.0.0.1:PORT, no credentials); every request
is recorded, so the tests assert the exact PATCHes. The double's Kueue admits a Job's larger
parallelism only when the ClusterQueue's nominal quota holds it beside what the others hold,
and holds the new pods behind Kueue's scheduling gate until then.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from adaptrun.controller.actuators import ActuatorError, create_actuator
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller
from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.science.allocation import Cluster
from controller_support import channel_to, register
from k8s_api_double import MERGE
from test_kubernetes_actuator import api_double, k8s_actuator, wait_for

CLI = [sys.executable, "-m", "adaptrun.cli"]
NS = "train"
JOB = f"/apis/batch/v1/namespaces/{NS}/jobs/%s"
CQ = "team-a"
FAST_QUEUE = {"cluster_queue": CQ, "queue_read_s": 0.1}    # the ClusterQueue read every 0.1 s
TWO_TO_FOUR = pb.JobBounds(min_workers=2, max_workers=4, init_batch=64, max_global_batch=1024,
                           local_batch_min=8, local_batch_max=128)


def job_patches(double, name):
    return [(r.content_type, r.body) for r in double.patches() if r.path == JOB % name]


def running(double, job) -> int:
    """Pods of ``job`` that run (past Kueue's gate)."""
    return sum(1 for p in double.pods(NS) if p["metadata"]["labels"].get(
        "batch.kubernetes.io/job-name") == job and p["status"]["phase"] == "Running")


def kueue_queue(double, quota, local="lq"):
    double.add_cluster_queue(CQ, quota)
    double.add_local_queue(NS, local, CQ)


@pytest.mark.timeout(30)
def test_an_elastic_job_is_resized_through_parallelism_and_completions(tmp_path):
    """(Kubernetes API test double, Kueue included.) set_workers on a job/ target merge-patches
    the Job's parallelism and completions together (an Indexed Job changes them only in
    tandem); the pods below the new count run, the highest indexes go first on a scale-down; a
    queued job (0 workers) gets parallelism 0 alone, which pauses the Job instead of
    completing it. A scale-up Kueue cannot admit leaves the new pods Pending behind its
    scheduling gate: after the pending timeout the job keeps what runs."""
    with api_double() as double:
        kueue_queue(double, quota=3)
        double.add_job(NS, "ej", parallelism=1, queue="lq")
        with k8s_actuator(double, tmp_path, ["j=job/ej"], bounds={"j": (1, 4)},
                          pending_timeout_s=1.0) as (act, notes):
            wait_for(lambda: act.current_workers("j") == 1, 10, "the Job's own parallelism")
            act.set_workers("j", 3)
            wait_for(lambda: running(double, "ej") == 3, 10, "three running pods")
            assert job_patches(double, "ej") == [
                (MERGE, {"spec": {"parallelism": 3, "completions": 3}})]
            (patch,) = double.patches()
            assert patch.query.get("fieldManager") == "adaptrun-controller"
            job = double.job(NS, "ej")
            assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (3, 3)

            act.set_workers("j", 2)
            wait_for(lambda: len(double.pods(NS)) == 2, 10, "the scale-down")
            assert [d.rsplit("-", 1)[0] for d in double.deleted] == ["ej-2"]
            assert job_patches(double, "ej")[-1] == (
                MERGE, {"spec": {"parallelism": 2, "completions": 2}})

            act.set_workers("j", 4)                    # 4 GPUs > the quota of 3: Kueue holds it
            wait_for(lambda: notes.of("j"), 10, "the unmet-scale notice")
            (text,) = notes.of("j")
            assert text.startswith("scale to 4 workers not met after 1 s: 2 pods Pending "
                                   "(SchedulingGated: Scheduling is blocked due to non-empty "
                                   "scheduling gates); keeping 2"), text
            wait_for(lambda: len(double.pods(NS)) == 2, 10, "the gated pods to go")
            assert act.current_workers("j") == 2
            assert job_patches(double, "ej")[-2:] == [
                (MERGE, {"spec": {"parallelism": 4, "completions": 4}}),
                (MERGE, {"spec": {"parallelism": 2, "completions": 2}})]

            act.set_workers("j", 0)
            wait_for(lambda: not double.pods(NS), 10, "no pods")
            assert job_patches(double, "ej")[-1] == (MERGE, {"spec": {"parallelism": 0}})
            assert double.job(NS, "ej")["spec"]["completions"] == 2
            act.job_done("j")                          # a Job ends by itself: left alone
            time.sleep(0.2)
            assert job_patches(double, "ej")[-1] == (MERGE, {"spec": {"parallelism": 0}})


@pytest.mark.timeout(30)
def test_a_job_kueue_cannot_resize_in_place_is_a_clear_error(tmp_path):
    """(Kubernetes API test double.) A Job that is not Indexed, lacks the elastic annotation,
    or has completions unlike its parallelism: the job's notices say what to change, and the
    actuator writes nothing to it."""
    with api_double() as double:
        double.add_job(NS, "plain", parallelism=2, indexed=False)
        double.add_job(NS, "unannotated", parallelism=2, elastic=False)
        double.add_job(NS, "uneven", parallelism=2, completions=10)
        with k8s_actuator(double, tmp_path, ["p=job/plain", "u=job/unannotated",
                                             "e=job/uneven"]) as (act, notes):
            wait_for(lambda: all(notes.of(j) for j in "pue"), 10, "three notices")
            for j in "pue":
                act.set_workers(j, 3)
            time.sleep(0.3)
            assert notes.of("p") == [
                "kubernetes: job/plain is not an Indexed Job (completionMode NonIndexed): set "
                "spec.completionMode: Indexed and spec.completions equal to spec.parallelism "
                "(one index per agent)"]
            assert notes.of("u") == [
                'kubernetes: job/unannotated lacks the annotation kueue.x-k8s.io/elastic-job: '
                '"true": add it (Kueue resizes only such Jobs in place; without it a new '
                'parallelism suspends and requeues the Job)']
            assert notes.of("e") == [
                "kubernetes: job/uneven has spec.completions 10 and spec.parallelism 2: make "
                "them equal (each index runs one agent to the end; Kubernetes changes an "
                "Indexed Job's completions only together with its parallelism)"]
            assert double.patches() == []
            with pytest.raises(ActuatorError, match=r"--k8s-target orphan=statefulset/NAME "
                                                    r"\(or pytorchjob/NAME, job/NAME\)"):
                act.set_workers("orphan", 2)


@pytest.mark.timeout(60)
def test_an_unknown_or_unusable_cluster_queue_is_a_clear_error(tmp_path):
    """(Kubernetes API test double.) A ClusterQueue that does not exist, or has no quota of the
    GPU resource, stops the actuator at its start with one line saying what to fix; through
    the CLI that line is the controller's error (exit 2)."""
    with api_double() as double:
        kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
        with pytest.raises(ActuatorError) as missing:
            create_actuator("kubernetes", targets=[], kubeconfig=str(kubeconfig),
                            cluster_queue="nope")
        assert str(missing.value) == (
            "kubernetes: ClusterQueue nope (kueue.x-k8s.io/v1beta1) not found (404): create it "
            "(and Kueue's CRDs), or fix --k8s-cluster-queue")
        double.add_cluster_queue(CQ, 4)
        with pytest.raises(ActuatorError) as resource:
            create_actuator("kubernetes", targets=[], kubeconfig=str(kubeconfig),
                            cluster_queue=CQ, gpu_resource="amd.com/gpu")
        assert str(resource.value) == (
            f"kubernetes: ClusterQueue {CQ} has no quota for amd.com/gpu (it covers cpu, "
            f"nvidia.com/gpu): give --k8s-gpu-resource one of those, or add amd.com/gpu to its "
            f"resourceGroups")
        cli = subprocess.run([*CLI, "controller", "--actuator", "kubernetes", "--kubeconfig",
                              str(kubeconfig), "--k8s-cluster-queue", "nope", "--port", "0",
                              "--metrics-port", "0", "--rdzv-port", "none"],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 2, cli.stderr
        assert cli.stderr.strip().splitlines()[-1] == f"Error: {missing.value}"
    flag = subprocess.run([*CLI, "controller", "--k8s-cluster-queue", CQ, "--port", "0",
                           "--rdzv-port", "none"], capture_output=True, text=True, timeout=30)
    assert flag.returncode == 2
    assert "--k8s-cluster-queue is an option of the kubernetes actuator: add --actuator " \
           "kubernetes" in flag.stderr


@pytest.mark.timeout(30)
def test_capacity_is_the_quota_less_what_other_workloads_hold(tmp_path):
    """(Kubernetes API test double, Kueue included.) capacity(): the ClusterQueue's nominal
    quota less what workloads other than the actuator's Jobs hold (its own admitted pods are
    not subtracted, its gated ones not counted), in pods of nproc_per_node GPUs; it follows a
    new quota and new usage by others; a ClusterQueue that vanishes keeps the last capacity."""
    with api_double() as double:
        kueue_queue(double, quota=8)
        double.set_other_usage(CQ, 2)
        double.add_job(NS, "ej", parallelism=2, queue="lq", gpus_per_pod=2)
        with k8s_actuator(double, tmp_path, ["j=job/ej"], nproc_per_node=2,
                          **FAST_QUEUE) as (act, _):
            wait_for(lambda: act.capacity() is not None, 10, "a capacity")
            assert act.capacity() == Cluster(3, 2)            # 8 - 2 others: 6 GPUs
            double.set_other_usage(CQ, 5)
            wait_for(lambda: act.capacity() == Cluster(1, 2), 10, "8 - 5 = 3: one pod of 2")
            double.set_quota(CQ, 12)
            wait_for(lambda: act.capacity() == Cluster(3, 2), 10, "12 - 5 = 7: three pods")
            with double._cond:
                del double._queues[CQ]
            time.sleep(0.5)
            assert act.capacity() == Cluster(3, 2)
    with api_double() as double:                           # no ClusterQueue named: unknown
        with k8s_actuator(double, tmp_path, []) as (act, _):
            assert act.capacity() is None


@pytest.mark.timeout(90)
def test_the_allocation_moves_elastic_jobs_within_the_cluster_queues_quota(tmp_path):
    """(Kubernetes API test double, Kueue included.) A real gRPC controller with the
    kubernetes actuator and no --capacity takes its capacity from ClusterQueue team-a. Its
    quota is 6 GPUs and another workload holds 2: jobs a and b (2-4 workers each) run at 2, job
    c does not fit and is queued (its Job's parallelism to 0). The other workload ends: c is
    admitted (parallelism 2, Kueue admits it). The quota goes down to 4: the youngest job, c,
    is queued again. What Kueue admitted never exceeds the larger quota, 6."""
    with api_double() as double:
        kueue_queue(double, quota=6)
        double.set_other_usage(CQ, 2)
        for name in "abc":
            double.add_job(NS, f"job-{name}", parallelism=2, queue="lq")
        assert running(double, "job-c") == 0                # Kueue holds it: no room
        targets = [f"{n}=job/job-{n}" for n in "abc"]
        config = ControllerConfig(policy_interval_s=60, tick_s=0.05, metrics_port=None,
                                  rdzv_port=None, actuator="kubernetes",
                                  allocation_interval_s=0.5)
        admitted_max = []
        with k8s_actuator(double, tmp_path, targets, **FAST_QUEUE) as (act, _):
            ctl = Controller(config, actuator=act).start()
            try:
                def jobs():
                    with channel_to(ctl) as (_, stub):
                        return {j.job_id: j for j in
                                stub.ListJobs(pb.ListJobsRequest(), timeout=5).jobs}

                def state():
                    cq = double.cluster_queue(CQ)
                    admitted_max.append(float(cq["status"]["flavorsReservation"][0][
                        "resources"][1]["total"]))
                    return (ctl.core.cluster, {n: running(double, f"job-{n}") for n in "abc"},
                            {j: s.allocated_workers for j, s in jobs().items()})

                with channel_to(ctl) as (_, stub):
                    for name in "abc":
                        register(stub, name, bounds=TWO_TO_FOUR)
                        time.sleep(0.1)             # arrival order
                wait_for(lambda: state() == (Cluster(4, 1), {"a": 2, "b": 2, "c": 0},
                                             {"a": 2, "b": 2, "c": 0}), 20,
                         "a and b at 2, c queued, on 6 - 2 = 4 GPUs")
                assert job_patches(double, "job-c") == [(MERGE, {"spec": {"parallelism": 0}})]
                assert any("queued" in n for n in jobs()["c"].notices)

                double.set_other_usage(CQ, 0)
                wait_for(lambda: state() == (Cluster(6, 1), {"a": 2, "b": 2, "c": 2},
                                             {"a": 2, "b": 2, "c": 2}), 20,
                         "c admitted on the 6 GPUs the other workload left")
                assert job_patches(double, "job-c")[-1] == (
                    MERGE, {"spec": {"parallelism": 2, "completions": 2}})

                double.set_quota(CQ, 4)
                wait_for(lambda: state() == (Cluster(4, 1), {"a": 2, "b": 2, "c": 0},
                                             {"a": 2, "b": 2, "c": 0}), 20,
                         "c queued again on a quota of 4")
                assert job_patches(double, "job-c")[-1] == (MERGE, {"spec": {"parallelism": 0}})
                assert job_patches(double, "job-a") == job_patches(double, "job-b") == []
            finally:
                ctl.stop(grace_s=0.2)
        assert max(admitted_max) <= 6
