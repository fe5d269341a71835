"""A TEST DOUBLE of the few Kubernetes API paths the ``kubernetes`` actuator calls, because no
Kubernetes API server (nor a StatefulSet controller, training operator or kubelet) can run on
this machine. It is an ``http.server`` on 127.0.0.1 (a free port, one thread per connection),
written from the Kubernetes API reference and Kueue's API (``kueue.x-k8s.io/v1beta1``), and it
plays four parts:

- the API server, for exactly these paths:
  - ``GET`` and ``PATCH /apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale`` and
    ``/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}/scale``: an ``autoscaling/v1``
    ``Scale`` (``spec.replicas``; ``status.replicas`` and ``status.selector``: for a
    StatefulSet the pods it created and its selector; for a PyTorchJob, as its CRD maps them,
    ``.status.replicaStatuses.Worker.active`` (running workers) and ``.selector``). A PATCH
    body is a merge patch (``application/merge-patch+json``) or, for the built-in StatefulSet
    only, a strategic merge patch (``application/strategic-merge-patch+json``); other content
    types are refused with 415, as the API server does for custom resources;
  - ``GET`` and ``PATCH /apis/batch/v1/namespaces/{ns}/jobs/{name}``: a ``batch/v1`` Job
    (``spec.parallelism``, ``completions``, ``completionMode``, its pod template with its
    resource requests, ``status.active`` and ``status.ready``). A PATCH is a merge or strategic
    merge patch of ``spec.parallelism`` / ``spec.completions``, validated as the API server
    does: an Indexed Job's completions change only together with its parallelism, to the same
    value; a NonIndexed Job's never (422);
  - ``GET /apis/kueue.x-k8s.io/v1beta1/clusterqueues/{name}``: a ClusterQueue with one flavor
    (``spec.resourceGroups[].flavors[].resources[].nominalQuota`` of cpu and the GPU resource)
    and ``status.flavorsReservation`` / ``flavorsUsage``: what the Jobs it admitted hold plus
    what the test says other workloads hold;
  - ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...``: a ``PodList`` with the list's
    ``resourceVersion``; with ``watch=true``: a chunked stream of JSON lines
    ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": <Pod>}`` after ``resourceVersion``
    (none: the current pods as ADDED first), ended after ``timeoutSeconds``;
  - anything else, and a missing object: a ``Status`` object (``kind: Status``, ``code``,
    ``reason``, ``message``) with that HTTP code (404, 405, 415, 422);
- the StatefulSet controller / training operator / Job controller: a PATCH of the replicas
  (a Job's parallelism) creates pods up to the new count (all at once, as
  ``podManagementPolicy: Parallel`` does) and deletes pods from the highest ordinal (index)
  down; a pod the test evicts is recreated (a StatefulSet's under the same name; new uid);
- Kueue, for a Job whose ``kueue.x-k8s.io/queue-name`` is a LocalQueue of a ClusterQueue here:
  the Job's pods beyond what Kueue admitted wait Pending behind the scheduling gate
  ``kueue.x-k8s.io/elastic-job``; a larger parallelism is admitted as a whole (a new workload
  slice) when the ClusterQueue's nominal quota holds it beside what the others hold, its
  gated pods then start; a smaller one is admitted at once (quota goes back). Admission is
  looked at again after every change (a patch, a new quota, other usage), Jobs in the order
  they were added;
- the kubelet: a new pod is Running and Ready at once, or Pending (unschedulable) when the
  test asks for that; ``on_pod_start(pod)`` and ``on_pod_stop(pod)`` let a test run a real
  process per pod (the end-to-end test starts an ``adaptrun agent`` per pod and sends it
  SIGTERM when the pod is deleted). Containers are not restarted when they exit.

Every request is recorded (method, path, query, content type, JSON body) for the tests to
assert on. Everything here is a test double: it checks no auth, keeps no admission, and
implements no field of an object that the actuator does not read.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

SCALE_PATH = re.compile(r"^/apis/(apps/v1|kubeflow\.org/v1)/namespaces/([^/]+)/"
                        r"(statefulsets|pytorchjobs)/([^/]+)/scale$")
JOB_PATH = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)$")
CLUSTER_QUEUE_PATH = re.compile(r"^/apis/kueue\.x-k8s\.io/v1beta1/clusterqueues/([^/]+)$")
GATE = "kueue.x-k8s.io/elastic-job"
OWNER_KINDS = {"statefulsets": ("StatefulSet", "apps/v1"),
               "pytorchjobs": ("PyTorchJob", "kubeflow.org/v1"), "jobs": ("Job", "batch/v1")}
ORDINAL_LABELS = ("apps.kubernetes.io/pod-index", "training.kubeflow.org/replica-index",
                  "batch.kubernetes.io/job-completion-index")
PODS_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict
    content_type: str
    body: object


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


class Workload:
    """A StatefulSet, a PyTorchJob or a Job: its replicas (a Job's parallelism) and the pods
    its controller made; for a Job also its completions, shape and what Kueue admitted."""

    def __init__(self, kind: str, namespace: str, name: str, replicas: int):
        self.kind, self.namespace, self.name = kind, namespace, name
        self.replicas = replicas
        self.uid = str(uuid.uuid4())
        self.created = _now()
        self.pending_new_pods = False     # the kubelet part: new pods cannot be scheduled
        self.completions: int | None = replicas       # a Job's
        self.indexed, self.annotations, self.queue = True, {}, ""
        self.gpus_per_pod = 1
        self.admitted: int | None = None  # pods Kueue admitted (None: not managed by Kueue)
        if kind == "statefulsets":
            self.labels = {"app": name}
        elif kind == "jobs":
            self.labels = {"batch.kubernetes.io/job-name": name, "job-name": name,
                           "batch.kubernetes.io/controller-uid": self.uid,
                           "controller-uid": self.uid}
        else:
            self.labels = {"training.kubeflow.org/job-name": name,
                           "training.kubeflow.org/operator-name": "pytorchjob-controller",
                           "training.kubeflow.org/replica-type": "worker"}

    @property
    def selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels.items())

    def pod_name(self, ordinal: int) -> str:
        if self.kind == "statefulsets":
            return f"{self.name}-{ordinal}"
        if self.kind == "jobs":               # the Job controller adds a random suffix
            return f"{self.name}-{ordinal}-{uuid.uuid4().hex[:5]}"
        return f"{self.name}-worker-{ordinal}"

    def pod_labels(self, ordinal: int, name: str) -> dict:
        extra = ({"apps.kubernetes.io/pod-index": str(ordinal),
                  "statefulset.kubernetes.io/pod-name": name}
                 if self.kind == "statefulsets" else
                 {"batch.kubernetes.io/job-completion-index": str(ordinal)}
                 if self.kind == "jobs" else
                 {"training.kubeflow.org/replica-index": str(ordinal)})
        return {**self.labels, **extra}

    def gated(self, ordinal: int) -> bool:
        """Kueue holds the pod: beyond what it admitted of the Job."""
        return self.admitted is not None and ordinal >= self.admitted

    def job_object(self, pods: list[dict], rv: int) -> dict:
        """The Job as the API serves it."""
        template_spec = {"containers": [{
            "name": "agent", "image": "adaptrun:test",
            "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": str(self.gpus_per_pod)},
                          "limits": {"nvidia.com/gpu": str(self.gpus_per_pod)}}}],
            "restartPolicy": "OnFailure"}
        if self.admitted is not None:
            template_spec["schedulingGates"] = [{"name": GATE}]
        spec = {"parallelism": self.replicas, "completionMode":
                "Indexed" if self.indexed else "NonIndexed", "suspend": False,
                "backoffLimit": 6, "manualSelector": False,
                "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": self.uid}},
                "template": {"metadata": {"labels": dict(self.labels)}, "spec": template_spec}}
        if self.completions is not None:
            spec["completions"] = self.completions
        active = [p for p in pods if p["status"]["phase"] in ("Pending", "Running")]
        ready = sum(any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p["status"]["conditions"]) for p in active)
        labels = {"kueue.x-k8s.io/queue-name": self.queue} if self.queue else {}
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                             "resourceVersion": str(rv), "creationTimestamp": self.created,
                             "annotations": dict(self.annotations), "labels": labels},
                "spec": spec, "status": {"active": len(active), "ready": ready}}


@dataclass
class ClusterQueue:
    """Kueue's ClusterQueue: one flavor's nominal quota of the GPU resource, and what the
    workloads that are not the test's Jobs hold of it."""
    name: str
    gpus: int
    resource: str = "nvidia.com/gpu"
    flavor: str = "default-flavor"
    other_gpus: int = 0


class K8sApiDouble:
    """Start with ``start()`` (or ``with``); ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s                 # before answering a scale request
        self.requests: list[Request] = []
        self.deleted: list[str] = []           # pod names in the order they were deleted
        self.on_pod_start: Callable[[dict], None] | None = None
        self.on_pod_stop: Callable[[dict], None] | None = None
        self._workloads: dict[tuple[str, str, str], Workload] = {}
        self._queues: dict[str, ClusterQueue] = {}
        self._local_queues: dict[tuple[str, str], str] = {}   # (ns, LocalQueue) -> its CQ
        self._pods: dict[tuple[str, str], dict] = {}
        self._events: list[tuple[int, str, dict]] = []   # (resourceVersion, type, pod)
        self._rv = 1
        self._cond = threading.Condition()
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "K8sApiDouble":
        double = self

        class Handler(_Handler):
            api = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="k8s-api-double", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "K8sApiDouble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def write_kubeconfig(self, path: Path, namespace: str | None = None) -> Path:
        """A kubeconfig whose one cluster is this double (plain http, no credentials)."""
        context = {"cluster": "double", "user": "nobody"}
        if namespace:
            context["namespace"] = namespace
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "nobody", "user": {}}],
            "contexts": [{"name": "double", "context": context}],
            "current-context": "double"}))
        return path

    # -- what a test sets up and looks at -------------------------------------------------
    def add_statefulset(self, namespace: str, name: str, replicas: int = 1) -> Workload:
        return self._add("statefulsets", namespace, name, replicas)

    def add_pytorchjob(self, namespace: str, name: str, replicas: int = 1) -> Workload:
        return self._add("pytorchjobs", namespace, name, replicas)

    def add_job(self, namespace: str, name: str, parallelism: int = 1, indexed: bool = True,
                elastic: bool = True, completions: int | None = -1, queue: str = "",
                gpus_per_pod: int = 1) -> Workload:
        """A ``batch/v1`` Job (completions -1: equal to parallelism), annotated
        ``kueue.x-k8s.io/elastic-job: "true"`` when ``elastic``, in LocalQueue ``queue``."""
        return self._add("jobs", namespace, name, parallelism, indexed=indexed,
                         completions=parallelism if completions == -1 else completions,
                         annotations={"kueue.x-k8s.io/elastic-job": "true"} if elastic else {},
                         queue=queue, gpus_per_pod=gpus_per_pod)

    def add_cluster_queue(self, name: str, gpus: int,
                          resource: str = "nvidia.com/gpu") -> ClusterQueue:
        with self._cond:
            cq = self._queues[name] = ClusterQueue(name, gpus, resource)
        return cq

    def add_local_queue(self, namespace: str, name: str, cluster_queue: str) -> None:
        with self._cond:
            self._local_queues[(namespace, name)] = cluster_queue

    def set_quota(self, cluster_queue: str, gpus: int) -> None:
        """An administrator changes the ClusterQueue's nominal quota."""
        self._kueue_change(cluster_queue, gpus=gpus)

    def set_other_usage(self, cluster_queue: str, gpus: int) -> None:
        """Workloads that are not the test's Jobs now hold ``gpus`` of the ClusterQueue."""
        self._kueue_change(cluster_queue, other_gpus=gpus)

    def _kueue_change(self, cluster_queue: str, **fields) -> None:
        with self._cond:
            cq = self._queues[cluster_queue]
            for k, v in fields.items():
                setattr(cq, k, v)
            started = self._admit()
        self._hooks(started, [])

    def _add(self, kind, namespace, name, replicas, **fields) -> Workload:
        w = Workload(kind, namespace, name, replicas)
        for k, v in fields.items():
            setattr(w, k, v)
        with self._cond:
            self._workloads[(kind, namespace, name)] = w
            if self._queue_of(w) is not None:
                w.admitted = 0
                self._admit()
            started, stopped = self._reconcile(w)
        self._hooks(started, stopped)
        return w

    def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        """What ``kubectl scale`` does: set the workload's replicas; its pods follow."""
        with self._cond:
            w = self._workloads[(kind, namespace, name)]
            w.replicas = replicas
            started, stopped = self._reconcile(w)
        self._hooks(started, stopped)

    def job(self, namespace: str, name: str) -> dict:
        """The Job as the API serves it."""
        with self._cond:
            w = self._workloads[("jobs", namespace, name)]
            return w.job_object([p for p in self._pods.values() if self._owner(p) is w],
                                self._rv)

    def cluster_queue(self, name: str) -> dict | None:
        """The ClusterQueue as the API serves it (None: no such ClusterQueue)."""
        with self._cond:
            cq = self._queues.get(name)
            if cq is None:
                return None
            held = cq.other_gpus + sum(w.admitted * w.gpus_per_pod for w in self._jobs_in(cq))
            usage = [{"name": cq.flavor, "resources": [
                {"name": "cpu", "total": str(held)}, {"name": cq.resource, "total": str(held)}]}]
            return {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ClusterQueue",
                    "metadata": {"name": cq.name, "resourceVersion": str(self._rv)},
                    "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                             "resourceGroups": [{
                                 "coveredResources": ["cpu", cq.resource],
                                 "flavors": [{"name": cq.flavor, "resources": [
                                     {"name": "cpu", "nominalQuota": "64"},
                                     {"name": cq.resource, "nominalQuota": str(cq.gpus)}]}]}]},
                    "status": {"flavorsReservation": usage, "flavorsUsage": usage,
                               "admittedWorkloads": sum(1 for w in self._jobs_in(cq)
                                                        if w.admitted)}}

    # -- the Kueue part -----------------------------------------------------------------
    def _queue_of(self, w: Workload) -> ClusterQueue | None:
        name = self._local_queues.get((w.namespace, w.queue)) if w.kind == "jobs" else None
        return self._queues.get(name) if name else None

    def _jobs_in(self, cq: ClusterQueue) -> list[Workload]:
        return [w for w in self._workloads.values() if self._queue_of(w) is cq]

    def _admit(self) -> list[dict]:
        """Kueue's admission, under the lock (class doc); returns the pods it lets start."""
        started = []
        for cq in self._queues.values():
            jobs = self._jobs_in(cq)
            for w in jobs:
                w.admitted = min(w.admitted, w.replicas)   # a scale-down is admitted at once
            for w in jobs:
                others = cq.other_gpus + sum(o.admitted * o.gpus_per_pod for o in jobs
                                             if o is not w)
                if (w.replicas > w.admitted
                        and others + w.replicas * w.gpus_per_pod <= cq.gpus):
                    w.admitted = w.replicas        # the new slice, as a whole
            for w in jobs:
                for pod in list(self._pods.values()):
                    if (self._owner(pod) is w and pod["spec"].get("schedulingGates")
                            and not w.gated(self._ordinal(pod))):
                        self._ungate(w, pod)
                        if pod["status"]["phase"] == "Running":
                            started.append(dict(pod))
        return started

    def _ungate(self, w: Workload, pod: dict) -> None:
        del pod["spec"]["schedulingGates"]
        pod["status"] = self._pod_status(w, gated=False)
        if pod["status"]["phase"] == "Running":
            pod["spec"]["nodeName"] = "node-a"
        self._emit("MODIFIED", pod)

    def pending_new_pods(self, kind: str, namespace: str, name: str, pending: bool) -> None:
        """The kubelet part: pods created from now on stay Pending (no node fits them)."""
        with self._cond:
            self._workloads[(kind, namespace, name)].pending_new_pods = pending

    def attach_kubelet(self, on_pod_start, on_pod_stop) -> None:
        """Run ``on_pod_start`` for every Running pod now, and for each new one from now on."""
        with self._cond:
            self.on_pod_start, self.on_pod_stop = on_pod_start, on_pod_stop
            running = [dict(p) for p in self._pods.values() if p["status"]["phase"] == "Running"]
        self._hooks(sorted(running, key=lambda p: p["metadata"]["name"]), [])

    def evict(self, namespace: str, pod_name: str,
              reason: str = "EvictionByEvictionAPI") -> None:
        """An eviction (or preemption): the pod is marked for deletion with a DisruptionTarget
        condition, deleted, and recreated by its workload under the same name."""
        with self._cond:
            pod = self._pods[(namespace, pod_name)]
            pod["status"]["conditions"].append(
                {"type": "DisruptionTarget", "status": "True", "reason": reason,
                 "message": "Eviction API: evicting", "lastTransitionTime": _now()})
            self._terminate(pod)
            w = self._owner(pod)
            started, stopped = self._reconcile(w) if w is not None else ([], [])
        self._hooks(started, [pod, *stopped])

    def pods(self, namespace: str) -> list[dict]:
        with self._cond:
            return sorted((json.loads(json.dumps(p)) for (ns, _), p in self._pods.items()
                           if ns == namespace), key=lambda p: p["metadata"]["name"])

    def phases(self, namespace: str) -> dict[str, str]:
        return {p["metadata"]["name"]: p["status"]["phase"] for p in self.pods(namespace)}

    def replicas(self, kind: str, namespace: str, name: str) -> int:
        with self._cond:
            return self._workloads[(kind, namespace, name)].replicas

    def patches(self) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.method == "PATCH"]

    # -- the StatefulSet controller / operator and the kubelet ---------------------------
    def _owner(self, pod: dict) -> Workload | None:
        ref = pod["metadata"]["ownerReferences"][0]
        kind = next(k for k, (owner_kind, _) in OWNER_KINDS.items() if owner_kind == ref["kind"])
        return self._workloads.get((kind, pod["metadata"]["namespace"], ref["name"]))

    def _reconcile(self, w: Workload) -> tuple[list[dict], list[dict]]:
        """Create the missing pods below ``replicas``; delete those at or above it, highest
        ordinal first. Call under the lock; returns the pods the kubelet starts and stops."""
        started = []
        have = {self._ordinal(p) for p in self._pods.values() if self._owner(p) is w}
        for ordinal in range(w.replicas):
            if ordinal not in have:
                pod = self._new_pod(w, ordinal)
                if pod["status"]["phase"] == "Running":
                    started.append(dict(pod))
        beyond = sorted((p for p in self._pods.values() if self._owner(p) is w
                         and self._ordinal(p) >= w.replicas), key=lambda p: -self._ordinal(p))
        for pod in beyond:
            self._terminate(pod)
        return started, beyond

    @staticmethod
    def _ordinal(pod: dict) -> int:
        labels = pod["metadata"]["labels"]
        return int(next((labels[k] for k in ORDINAL_LABELS if k in labels), -1))

    @staticmethod
    def _pod_status(w: Workload, gated: bool) -> dict:
        if gated:
            return {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                 "message": "Scheduling is blocked due to non-empty scheduling gates",
                 "lastTransitionTime": _now()}]}
        if w.pending_new_pods:
            return {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                 "lastTransitionTime": _now()}]}
        return {"phase": "Running", "podIP": "127.0.0.1", "startTime": _now(),
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()}
                               for t in ("PodScheduled", "Initialized", "ContainersReady",
                                         "Ready")]}

    def _new_pod(self, w: Workload, ordinal: int) -> dict:
        name = w.pod_name(ordinal)
        gated = w.gated(ordinal)
        status = self._pod_status(w, gated)
        owner_kind, owner_version = OWNER_KINDS[w.kind]
        spec = {"containers": [{"name": "agent", "image": "adaptrun:test"}],
                "restartPolicy": "Always" if w.kind == "statefulsets" else "OnFailure"}
        if gated:
            spec["schedulingGates"] = [{"name": GATE}]
        elif status["phase"] == "Running":
            spec["nodeName"] = "node-a"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": w.namespace, "uid": str(uuid.uuid4()),
                            "creationTimestamp": _now(), "labels": w.pod_labels(ordinal, name),
                            "ownerReferences": [{
                                "apiVersion": owner_version, "kind": owner_kind, "name": w.name,
                                "uid": w.uid, "controller": True}]},
               "spec": spec, "status": status}
        self._pods[(w.namespace, name)] = pod
        self._emit("ADDED", pod)
        return pod

    def _terminate(self, pod: dict) -> None:
        """Graceful deletion seen from the API: MODIFIED with deletionTimestamp, then
        DELETED (the double does not wait for the container to exit). Under the lock."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if self._pods.get(key) is not pod:
            return
        pod["metadata"]["deletionTimestamp"] = _now()
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        self._emit("MODIFIED", pod)
        del self._pods[key]
        self.deleted.append(pod["metadata"]["name"])
        self._emit("DELETED", pod)

    def _emit(self, kind: str, pod: dict) -> None:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append((self._rv, kind, json.loads(json.dumps(pod))))
        self._cond.notify_all()

    def _hooks(self, started: list[dict], stopped: list[dict]) -> None:
        """The kubelet part, outside the lock (a hook may call back into the double)."""
        for pod in stopped:
            if self.on_pod_stop is not None:
                self.on_pod_stop(pod)
        for pod in started:
            if self.on_pod_start is not None:
                self.on_pod_start(pod)

    # -- the API server part ------------------------------------------------------------
    def scale_object(self, w: Workload) -> dict:
        pods = [p for p in self._pods.values() if self._owner(p) is w]
        if w.kind == "statefulsets":
            status_replicas = len(pods)
        else:
            status_replicas = sum(p["status"]["phase"] == "Running" for p in pods)
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": w.name, "namespace": w.namespace, "uid": w.uid,
                             "resourceVersion": str(self._rv), "creationTimestamp": w.created},
                "spec": {"replicas": w.replicas},
                "status": {"replicas": status_replicas, "selector": w.selector}}

    def handle_scale(self, method: str, group: str, ns: str, plural: str, name: str,
                     content_type: str, body) -> tuple[int, dict]:
        if self.delay_s:
            time.sleep(self.delay_s)
        kind_name = "statefulsets.apps" if plural == "statefulsets" else "pytorchjobs.kubeflow.org"
        with self._cond:
            w = self._workloads.get((plural, ns, name))
            if w is None or (plural == "statefulsets") != (group == "apps/v1"):
                return 404, status_object(404, "NotFound", f'{kind_name} "{name}" not found',
                                          {"name": name, "group": kind_name.split(".", 1)[1],
                                           "kind": plural})
            if method == "PATCH":
                allowed = (MERGE, STRATEGIC) if plural == "statefulsets" else (MERGE,)
                if content_type not in allowed:
                    return 415, status_object(
                        415, "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - accepted media "
                        f"types include: {', '.join(allowed)}")
                replicas = (body or {}).get("spec", {}).get("replicas") \
                    if isinstance(body, dict) else None
                if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                    return 422, status_object(
                        422, "Invalid", f'Scale.autoscaling "{name}" is invalid: '
                        f'spec.replicas: Invalid value: {replicas!r}: must be greater than or '
                        f'equal to 0', {"name": name, "group": "autoscaling", "kind": "Scale"})
                w.replicas = replicas
                started, stopped = self._reconcile(w)
            else:
                started, stopped = [], []
            scale = self.scale_object(w)
        self._hooks(started, stopped)
        return 200, scale

    def handle_job(self, method: str, ns: str, name: str, content_type: str,
                   body) -> tuple[int, dict]:
        """GET or PATCH (merge) a Job's parallelism and completions, validated as the API
        server validates them."""
        with self._cond:
            w = self._workloads.get(("jobs", ns, name))
            if w is None:
                return 404, status_object(404, "NotFound", f'jobs.batch "{name}" not found',
                                          {"name": name, "group": "batch", "kind": "jobs"})
            started, stopped = [], []
            if method == "PATCH":
                if content_type not in (MERGE, STRATEGIC):
                    return 415, status_object(
                        415, "UnsupportedMediaType", f"the body of the request was in an "
                        f"unknown format - accepted media types include: {MERGE}, {STRATEGIC}")
                spec = (body or {}).get("spec", {}) if isinstance(body, dict) else {}
                parallelism = spec.get("parallelism", w.replicas)
                completions = spec.get("completions", w.completions)
                problem = self._job_problem(w, parallelism, completions)
                if problem:
                    return 422, status_object(422, "Invalid", f'Job.batch "{name}" is invalid: '
                                              f'{problem}', {"name": name, "group": "batch",
                                                             "kind": "Job"})
                w.replicas, w.completions = parallelism, completions
                started = self._admit()
                more, stopped = self._reconcile(w)
                started += more
            job = w.job_object([p for p in self._pods.values() if self._owner(p) is w], self._rv)
        self._hooks(started, stopped)
        return 200, job

    @staticmethod
    def _job_problem(w: Workload, parallelism, completions) -> str:
        if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 0:
            return (f"spec.parallelism: Invalid value: {parallelism!r}: must be greater than or "
                    f"equal to 0")
        if completions == w.completions:
            return ""
        if not w.indexed:
            return "spec.completions: Invalid value: %r: field is immutable" % completions
        if completions is None or completions != parallelism:
            return (f"spec.completions: Invalid value: {completions!r}: can only be modified in "
                    f"tandem with spec.parallelism")
        return ""

    def list_pods(self, ns: str, selector: str) -> dict:
        match = _selector(selector)
        with self._cond:
            items = [json.loads(json.dumps(p)) for (pns, _), p in sorted(self._pods.items())
                     if pns == ns and match(p["metadata"].get("labels", {}))]
            rv = self._rv
        return {"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(rv)}, "items": items}

    def watch_pods(self, write_chunk, ns: str, selector: str, since: int | None,
                   timeout_s: float) -> None:
        match = _selector(selector)
        deadline = time.monotonic() + timeout_s

        def ours(pod):
            return pod["metadata"]["namespace"] == ns and match(pod["metadata"]["labels"])
        with self._cond:
            if since is None:
                first = [("ADDED", json.loads(json.dumps(p))) for p in self._pods.values()
                         if ours(p)]
                since = self._rv
            else:
                first = []
        for kind, pod in first:
            write_chunk({"type": kind, "object": pod})
        while True:
            with self._cond:
                fresh = [(rv, k, p) for rv, k, p in self._events if rv > since and ours(p)]
                if not fresh:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closing:
                        return
                    self._cond.wait(min(left, 0.5))
                    continue
            for rv, kind, pod in fresh:
                write_chunk({"type": kind, "object": pod})
                since = rv


def _selector(text: str) -> Callable[[dict], bool]:
    """Equality-based label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``."""
    terms = [t.strip() for t in (text or "").split(",") if t.strip()]

    def match(labels: dict) -> bool:
        for t in terms:
            if "!=" in t:
                k, v = t.split("!=", 1)
                if labels.get(k.strip()) == v.strip():
                    return False
            elif "=" in t:
                k, v = t.replace("==", "=").split("=", 1)
                if labels.get(k.strip()) != v.strip():
                    return False
            elif t.startswith("!"):
                if t[1:] in labels:
                    return False
            elif t not in labels:
                return False
        return True
    return match


class _Handler(BaseHTTPRequestHandler):
    api: K8sApiDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.api._cond:
            self.api._conns.add(self.connection)

    def finish(self):
        with self.api._cond:
            self.api._conns.discard(self.connection)
        super().finish()

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, method: str) -> tuple[str, dict, str, object]:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        with self.api._cond:
            self.api.requests.append(Request(method, url.path, query, content_type, body))
        return url.path, query, content_type, body

    def do_GET(self):
        path, query, _, _ = self._record("GET")
        m = SCALE_PATH.match(path)
        if m:
            self._send(*self.api.handle_scale("GET", *m.groups(), "", None))
            return
        m = JOB_PATH.match(path)
        if m:
            self._send(*self.api.handle_job("GET", *m.groups(), "", None))
            return
        m = CLUSTER_QUEUE_PATH.match(path)
        if m:
            cq = self.api.cluster_queue(m.group(1))
            if cq is None:
                self._send(404, status_object(
                    404, "NotFound", f'clusterqueues.kueue.x-k8s.io "{m.group(1)}" not found',
                    {"name": m.group(1), "group": "kueue.x-k8s.io", "kind": "clusterqueues"}))
            else:
                self._send(200, cq)
            return
        m = PODS_PATH.match(path)
        if m:
            ns, selector = m.group(1), query.get("labelSelector", "")
            if query.get("watch", "").lower() in ("true", "1"):
                rv = query.get("resourceVersion", "")
                self._watch(ns, selector, int(rv) if rv.isdigit() and rv != "0" else None,
                            float(query.get("timeoutSeconds") or 1800))
            else:
                self._send(200, self.api.list_pods(ns, selector))
            return
        self._send(404, status_object(404, "NotFound", f"the server could not find the "
                                                       f"requested resource ({path})"))

    def do_PATCH(self):
        path, _, content_type, body = self._record("PATCH")
        m = SCALE_PATH.match(path)
        if m:
            self._send(*self.api.handle_scale("PATCH", *m.groups(), content_type, body))
            return
        m = JOB_PATH.match(path)
        if m:
            self._send(*self.api.handle_job("PATCH", *m.groups(), content_type, body))
            return
        if PODS_PATH.match(path):
            self._send(405, status_object(405, "MethodNotAllowed", "the double implements no "
                                                                   "PATCH of pods"))
            return
        self._send(404, status_object(404, "NotFound", f"the server could not find the "
                                                       f"requested resource ({path})"))

    def do_POST(self):
        self._record("POST")
        self._send(405, status_object(405, "MethodNotAllowed",
                                      "the double implements no POST"))

    do_PUT = do_DELETE = do_POST

    def _watch(self, ns: str, selector: str, since: int | None, timeout_s: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

        def write_chunk(event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        try:
            self.api.watch_pods(write_chunk, ns, selector, since, timeout_s)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True
