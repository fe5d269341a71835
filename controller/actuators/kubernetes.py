"""The ``kubernetes`` actuator: a job's workers are the pods of a StatefulSet or of a Kubeflow
elastic PyTorchJob, resized through the workload's scale subresource, or of an elastic Indexed
Job that Kueue resizes in place, resized through its ``spec.parallelism``.

The model
- Each job names one workload (``targets``: ``JOB=statefulset/NAME``, ``JOB=pytorchjob/NAME`` or
  ``JOB=job/NAME``) in one namespace. One pod runs one ``adaptrun agent`` with
  ``nproc_per_node`` workers, so a job of W workers is ``replicas = ceil(W / nproc_per_node)``
  pods. For a StatefulSet or PyTorchJob the actuator reads and writes only ``spec.replicas`` of
  the scale subresource (``apps/v1`` StatefulSet or ``kubeflow.org/v1`` PyTorchJob, merge
  patch). A ``batch/v1`` Job has no scale subresource: the actuator reads the Job and merge-
  patches its ``spec.parallelism`` and ``spec.completions`` together (``kueue`` module: the Job
  must be Indexed and annotated ``kueue.x-k8s.io/elastic-job: "true"``; a Job that is not is a
  notice on the job saying what to add, retried every ``retry_s``). The StatefulSet controller,
  the training operator or the Job controller creates and deletes the pods (highest ordinal or
  index first on a scale-down), the agents in them join or leave the job's rendezvous.
- ``set_workers(job, W)`` never blocks: it clamps W to the job's bounds (the controller already
  passes counts within them, or 0 for a job the cluster allocation queued; a count outside is
  clamped and said), records the replicas
  wanted, and wakes the actuator's thread, which does the API calls. A scale-down is written
  ``scale_down_delay_s`` later when pods beyond the new count are running: the controller's
  directive reaches the agents first, the agents beyond the new count leave after their planned
  exit, and only then does the workload delete their pods (so a pod's SIGTERM does not land in
  the middle of the planned re-form).
- A thread per job lists and watches the workload's pods (the label selector is the scale
  subresource's ``status.selector``). A pod the cluster removes that the actuator did not ask
  to remove (deleted, terminating or Failed while its ordinal is below the replicas wanted:
  eviction, preemption, a lost node) is a failure the job survives: it is logged and put on the
  job's notices; the agents re-form with the survivors, and the workload replaces the pod.
- A scale-up is *met* when every pod below the new replica count is Running and Ready. When it
  is not met within ``pending_timeout_s`` (pods Pending: no room on the cluster, an image that
  does not pull), the actuator says so on the job ("scale to N workers not met after T s: K pods
  Pending; keeping M"), writes the replicas back to what runs (never below the pods the job had
  before the scale-up), and ``current_workers`` reports M from then on: the job keeps training
  at its size, and a status or gauge never shows a count that is not coming.

- A scale-up of a Job waits on Kueue: its new pods stay Pending behind Kueue's scheduling gate
  until Kueue admits the larger workload slice, and the pending timeout above applies to them.

``current_workers(job)``: the workers asked for while a change is under way; M after a scale
that was not met; before any request, the workload's own replicas x ``nproc_per_node``; None for
a job without a target.

``capacity()``, with ``cluster_queue`` named: what the Kueue ClusterQueue leaves this
controller's jobs of ``gpu_resource`` (``kueue`` module: its nominal quota less what workloads
other than this controller's Jobs hold; what they hold is counted from their pods: every pod
not ended and not behind Kueue's gate, times the GPUs its template requests), as a ``Cluster``
of ``floor(GPUs / nproc_per_node)`` nodes of ``nproc_per_node`` GPUs: a node of the allocator is
one pod here, and a worker is one GPU. The actuator's thread reads the ClusterQueue every
``queue_read_s``; before the first read and the first list of every Job's pods it is None (a
count taken earlier would treat the jobs' own pods as another's); a read that fails is logged
once and the last capacity is kept. A ClusterQueue that does not exist or may not be read when
the actuator starts is an ActuatorError. Only ``job/`` targets count as the controller's own.

Credentials: a kubeconfig given (``kubeconfig`` or ``$KUBECONFIG``), else the in-cluster config
in a pod, else ``~/.kube/config``. RBAC it needs, in the workloads' namespace only: get and
patch on ``statefulsets/scale`` (or ``pytorchjobs/scale`` in ``kubeflow.org``, or ``jobs`` in
``batch``), list and watch on ``pods``; with a ClusterQueue, get on ``clusterqueues`` in
``kueue.x-k8s.io`` (cluster-scoped: a ClusterRole).
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from adaptrun.science.allocation import Cluster

from . import kueue
from .base import Actuator, ActuatorError

__all__ = ["KubernetesActuator", "Target", "parse_targets"]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
KINDS = {"statefulset": "statefulset", "sts": "statefulset", "statefulsets": "statefulset",
         "pytorchjob": "pytorchjob", "pytorchjobs": "pytorchjob", "job": "job", "jobs": "job"}
TARGET_FORMS = "statefulset/NAME, pytorchjob/NAME or job/NAME"
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
# What the training operator puts on a PyTorchJob's worker pods (used while the job's scale
# status has no selector yet).
PYTORCHJOB_WORKER_LABELS = ("training.kubeflow.org/job-name={name},"
                            "training.kubeflow.org/replica-type=worker")
# What the Job controller puts on an Indexed Job's pods.
JOB_POD_LABELS = "batch.kubernetes.io/job-name={name}"
ORDINAL_LABELS = ("apps.kubernetes.io/pod-index", "training.kubeflow.org/replica-index",
                  "batch.kubernetes.io/job-completion-index")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Target:
    """The workload that holds a job's workers."""
    kind: str          # "statefulset" | "pytorchjob" | "job"
    name: str

    def describe(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def rbac_resource(self) -> str:
        return {"statefulset": "statefulsets/scale (apps)", "job": "jobs (batch)",
                "pytorchjob": "pytorchjobs/scale (kubeflow.org)"}[self.kind]


def parse_targets(targets: Mapping[str, str] | Iterable[str] | None) -> dict[str, Target]:
    """``{"JOB": "statefulset/NAME"}`` or ``["JOB=job/NAME", ...]`` -> job -> Target."""
    if not targets:
        return {}
    if isinstance(targets, Mapping):
        pairs = [(str(job), str(workload)) for job, workload in targets.items()]
    else:
        pairs = []
        for spec in targets:
            job, sep, workload = str(spec).partition("=")
            if not sep or not job.strip():
                raise ActuatorError(f"--k8s-target must be JOB=KIND/NAME ({TARGET_FORMS}), "
                                    f"got {spec!r}")
            pairs.append((job.strip(), workload))
    out: dict[str, Target] = {}
    for job, workload in pairs:
        kind, sep, name = workload.strip().partition("/")
        kind, name = KINDS.get(kind.strip().lower(), ""), name.strip()
        if not sep or not kind or not name:
            raise ActuatorError(f"--k8s-target {job}={workload}: the workload must be "
                                f"{TARGET_FORMS}")
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise ActuatorError(f"--k8s-target {job}={workload}: {name!r} is not a Kubernetes "
                                f"object name (lower-case letters, digits, '-' and '.')")
        if job in out and out[job] != Target(kind, name):
            raise ActuatorError(f"--k8s-target: job {job!r} is given two workloads "
                                f"({out[job].describe()} and {kind}/{name})")
        out[job] = Target(kind, name)
    return out


@dataclass
class _Pod:
    name: str
    uid: str
    ordinal: int | None
    phase: str            # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    terminating: bool
    why: str              # the cluster's reason, when it has one
    gated: bool = False   # held behind Kueue's scheduling gate (not admitted)


@dataclass
class _Job:
    job_id: str
    target: Target
    desired: int | None = None          # workers asked for (clamped)
    replicas: int | None = None         # the replicas wanted now (what gets written)
    spec_replicas: int | None = None    # last seen spec.replicas of the scale subresource
    writing: int | None = None          # the replicas of a write in flight
    status_replicas: int | None = None  # last seen status.replicas
    selector: str = ""
    patch_due_s: float = 0.0            # when a pending write may go (scale-down delay)
    scale_started_s: float | None = None   # a scale-up under way since (monotonic)
    scale_from: int = 0                 # the replicas before it
    achievable: int | None = None       # workers, after a scale that was not met
    pods: dict[str, _Pod] = field(default_factory=dict)
    synced: bool = False                # the pod cache follows a watch
    reported: set[str] = field(default_factory=set)   # uids of pods said lost
    lost: int = 0
    watch: object | None = None
    watch_thread: threading.Thread | None = None
    next_read_s: float = 0.0
    adopted: bool = False
    last_error: str = ""                # of the scale subresource
    watch_error: str = ""               # of the pod list/watch
    gpus_per_pod: float = 0.0           # a Job's pod template's request of the GPU resource


class KubernetesActuator(Actuator):
    name = "kubernetes"

    def __init__(self, targets: Mapping[str, str] | Iterable[str] | None = None,
                 namespace: str | None = None, kubeconfig: str | None = None,
                 context: str | None = None, pending_timeout_s: float = 300.0,
                 nproc_per_node: int = 1, scale_down_delay_s: float = 30.0,
                 poll_s: float = 1.0, retry_s: float = 10.0, watch_timeout_s: int = 60,
                 request_timeout_s: float = 15.0, cluster_queue: str | None = None,
                 gpu_resource: str = "nvidia.com/gpu", queue_read_s: float = 5.0,
                 api_client=None):
        try:
            from kubernetes import client as k8s_client
        except ImportError:
            raise ActuatorError("the kubernetes actuator needs the official client: "
                                "pip install 'adaptrun[kubernetes]'") from None
        self._k8s = k8s_client
        if pending_timeout_s < 0 or scale_down_delay_s < 0 or poll_s <= 0 or queue_read_s <= 0:
            raise ActuatorError("the kubernetes actuator's timeouts must be >= 0")
        self.targets = parse_targets(targets)
        self.nproc_per_node = max(1, int(nproc_per_node))
        self.pending_timeout_s = float(pending_timeout_s)
        self.scale_down_delay_s = float(scale_down_delay_s)
        self.poll_s = float(poll_s)
        self.retry_s = float(retry_s)
        self.watch_timeout_s = max(1, int(watch_timeout_s))
        self.request_timeout_s = float(request_timeout_s)
        self._api, context_namespace = (api_client, None) if api_client is not None else \
            _load_client(kubeconfig, context)
        self.namespace = namespace or _pod_namespace() or context_namespace or "default"
        self._apps = k8s_client.AppsV1Api(self._api)
        self._batch = k8s_client.BatchV1Api(self._api)
        self._custom = k8s_client.CustomObjectsApi(self._api)
        self._core = k8s_client.CoreV1Api(self._api)
        self._jobs = {job: self._new_job(job, t) for job, t in self.targets.items()}
        self._lock = threading.Condition()
        self._closed = threading.Event()
        self.cluster_queue = cluster_queue or None
        self.gpu_resource = gpu_resource
        self.queue_read_s = float(queue_read_s)
        self._quota: kueue.QueueQuota | None = None
        self._capacity: Cluster | None = None
        self._queue_error = ""
        self._next_queue_read_s = 0.0
        if self.cluster_queue:
            self._first_queue_read()
        self._thread = threading.Thread(target=self._run, name="adaptrun-k8s-actuator",
                                        daemon=True)
        self._thread.start()
        log.info("kubernetes actuator: namespace %s, %s; %d worker(s) per pod, pending timeout "
                 "%.0f s%s", self.namespace, ", ".join(f"{j}={t.describe()}" for j, t in
                                                      self.targets.items()) or "no targets",
                 self.nproc_per_node, self.pending_timeout_s,
                 f"; capacity from ClusterQueue {self.cluster_queue} ({self.gpu_resource})"
                 if self.cluster_queue else "")

    # -- the controller's calls (never block on the API) --------------------------------
    def set_workers(self, job_id: str, workers: int) -> None:
        if workers < 0:
            raise ActuatorError(f"cannot run {workers} workers for job {job_id!r}")
        if self._closed.is_set():
            raise ActuatorError("the kubernetes actuator is closed")
        st = self._jobs.get(job_id)
        if st is None:
            raise ActuatorError(
                f"job {job_id!r} has no Kubernetes workload: start the controller with "
                f"--k8s-target {job_id}=statefulset/NAME (or pytorchjob/NAME, job/NAME); the job "
                f"keeps training at its size")
        bounds = self.job_bounds(job_id)
        # 0 is no count of the job's own: the cluster allocation queued it.
        if bounds is not None and workers > 0 and not bounds[0] <= workers <= bounds[1]:
            clamped = min(max(workers, bounds[0]), bounds[1])
            text = (f"the kubernetes actuator was asked for {workers} workers, outside the "
                    f"job's bounds [{bounds[0]}, {bounds[1]}]: using {clamped}")
            log.warning("job %s: %s", job_id, text)
            self.notify(job_id, text)
            workers = clamped
        replicas = math.ceil(workers / self.nproc_per_node)
        now = time.monotonic()
        with self._lock:
            old = st.desired
            st.desired = workers
            st.achievable = None
            before = st.replicas if st.replicas is not None else st.spec_replicas
            if replicas != st.replicas:
                st.replicas = replicas
                growing = before is None or replicas > before
                if growing:
                    if st.scale_started_s is None:
                        st.scale_from = before or 0
                    st.scale_started_s = now
                else:
                    st.scale_started_s = None
                delay = (self.scale_down_delay_s if not growing and
                         self._running_beyond(st, replicas, before) else 0.0)
                st.patch_due_s = now + delay
            self._lock.notify_all()
        if old != workers:
            log.info("job %s: workers %s -> %d: %s to %d replica(s)%s", job_id, old, workers,
                     st.target.describe(), replicas,
                     f" in {self.scale_down_delay_s:g} s (the leaving agents exit first)"
                     if st.patch_due_s > now else "")

    def job_done(self, job_id: str) -> None:
        """A StatefulSet restarts a pod whose agent exited, even with exit 0, and the agent
        exits again at once (its job is done): its pods would come back forever. Scale it to
        0 replicas, ``scale_down_delay_s`` from now when pods may still run (their agents
        finish first). A PyTorchJob or a Job ends by itself when its workers succeed: left
        alone."""
        st = self._jobs.get(job_id)
        if st is None or st.target.kind != "statefulset" or self._closed.is_set():
            return
        now = time.monotonic()
        with self._lock:
            before = st.replicas if st.replicas is not None else st.spec_replicas
            if before == 0:
                return
            delay = self.scale_down_delay_s if self._running_beyond(st, 0, before) else 0.0
            st.desired, st.achievable, st.replicas = 0, None, 0
            st.scale_started_s = None
            st.patch_due_s = now + delay
            self._lock.notify_all()
        text = (f"the job finished: {st.target.describe()} to 0 replicas in {delay:g} s (a "
                f"StatefulSet would restart its finished pods)")
        log.info("job %s: %s", job_id, text)
        self.notify(job_id, text)

    def current_workers(self, job_id: str) -> int | None:
        st = self._jobs.get(job_id)
        if st is None:
            return None
        with self._lock:
            if st.achievable is not None:
                return st.achievable
            if st.desired is not None:
                return st.desired
            if st.spec_replicas is not None:
                return st.spec_replicas * self.nproc_per_node
            return None

    def forget(self, job_id: str) -> None:
        st = self._jobs.get(job_id)
        if st is None:
            return
        with self._lock:
            self._jobs[job_id] = self._new_job(job_id, st.target)
        self._stop_watch(st)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._lock.notify_all()
            jobs = list(self._jobs.values())
        for st in jobs:
            self._stop_watch(st)
        self._thread.join(timeout=5)
        for st in jobs:
            if st.watch_thread is not None:
                st.watch_thread.join(timeout=5)
        try:
            self._api.close()
        except Exception:  # noqa: BLE001 - closing a pool; nothing to do about it
            pass

    # -- the actuator's thread: all API calls but the watches -----------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            if self.cluster_queue and time.monotonic() >= self._next_queue_read_s:
                self._read_queue()
            for st in list(self._jobs.values()):
                if self._closed.is_set():
                    break
                try:
                    self._step(st)
                except Exception as exc:  # noqa: BLE001 - one job's trouble stops nothing
                    self._api_failed(st, exc)
            with self._lock:
                if not self._closed.is_set():
                    self._lock.wait(self._next_wait_s())

    def _next_wait_s(self) -> float:
        now, wait = time.monotonic(), self.poll_s
        if self.cluster_queue:
            wait = min(wait, max(0.0, self._next_queue_read_s - now))
        for st in self._jobs.values():
            if st.replicas is not None and st.replicas != st.spec_replicas:
                wait = min(wait, max(0.0, st.patch_due_s - now))
        return max(wait, 0.01)

    def _step(self, st: _Job) -> None:
        now = time.monotonic()
        with self._lock:
            if now < st.next_read_s:            # backing off after an API error
                due = ""
            elif not st.adopted:                # nothing is written before the first read
                due = "read"
            elif (st.replicas is not None and st.replicas != st.spec_replicas
                  and now >= st.patch_due_s):
                due = "write"
            elif st.scale_started_s is not None:  # a scale-up under way: follow its status
                due = "read"
            else:
                due = ""
            replicas = st.replicas
        if due == "write":
            self._patch(st, replicas)
        elif due == "read":
            self._read(st)
        self._ensure_watch(st)
        self._check_scale(st)

    def _read(self, st: _Job) -> None:
        spec, status, selector = self._read_scale(st)
        with self._lock:
            st.spec_replicas, st.status_replicas = spec, status
            st.selector = selector or st.selector
            self._clear_error(st)
            if st.adopted:
                return
            st.adopted = True
            if st.replicas is None:
                st.replicas = spec
            elif st.replicas > spec:            # asked before the first read: a scale-up
                st.scale_from = spec
            else:                               # ... or a scale-down
                st.scale_started_s = None
                st.patch_due_s = time.monotonic() + (self.scale_down_delay_s
                                                     if st.replicas < spec else 0.0)
        log.info("job %s: %s in namespace %s: spec.replicas %d, status.replicas %d (selector %r)",
                 st.job_id, st.target.describe(), self.namespace, spec, status, st.selector)

    def _patch(self, st: _Job, replicas: int) -> None:
        # The pods a write removes may be seen gone before its answer: they are no failure.
        with self._lock:
            st.writing = replicas
        try:
            self._write(st, replicas)
        finally:
            with self._lock:
                st.writing = None

    def _write(self, st: _Job, replicas: int) -> None:
        t, body = st.target, {"spec": {"replicas": replicas}}
        kw = dict(_content_type=MERGE_PATCH, field_manager="adaptrun-controller",
                  _request_timeout=self.request_timeout_s)
        if t.kind == "statefulset":
            s = self._apps.patch_namespaced_stateful_set_scale(t.name, self.namespace, body, **kw)
            spec, status, selector = _scale_fields(s)
        elif t.kind == "job":
            spec, status, selector = self._job_fields(st, self._batch.patch_namespaced_job(
                t.name, self.namespace, kueue.job_patch(replicas), **kw))
        else:
            s = self._custom.patch_namespaced_custom_object_scale(*PYTORCHJOB[:2], self.namespace,
                                                                  PYTORCHJOB[2], t.name, body, **kw)
            spec, status, selector = _scale_fields(s)
        with self._lock:
            st.spec_replicas, st.status_replicas = spec, status
            st.selector = selector or st.selector or self._default_selector(t)
            st.adopted = True
            self._clear_error(st)
        log.info("job %s: %s scaled to %d replica(s)", st.job_id, t.describe(), spec)

    def _read_scale(self, st: _Job) -> tuple[int, int, str]:
        """(replicas wanted, replicas running, pod selector) of the job's workload."""
        t, kw = st.target, dict(_request_timeout=self.request_timeout_s)
        if t.kind == "statefulset":
            return _scale_fields(self._apps.read_namespaced_stateful_set_scale(
                t.name, self.namespace, **kw))
        if t.kind == "job":
            return self._job_fields(st, self._batch.read_namespaced_job(t.name, self.namespace,
                                                                        **kw))
        spec, status, selector = _scale_fields(self._custom.get_namespaced_custom_object_scale(
            *PYTORCHJOB[:2], self.namespace, PYTORCHJOB[2], t.name, **kw))
        return spec, status, selector or self._default_selector(t)

    def _job_fields(self, st: _Job, obj) -> tuple[int, int, str]:
        """A Job as (spec.parallelism, status.ready, its pods' selector), checked to be an
        elastic Indexed Job (``kueue.check_elastic_job``; ActuatorError saying what to change);
        its pods' GPU request is kept for ``capacity``."""
        job = obj if isinstance(obj, dict) else self._api.sanitize_for_serialization(obj)
        try:
            kueue.check_elastic_job(job)
            gpus = kueue.pod_request(job, self.gpu_resource)
        except kueue.KueueShapeError as exc:
            raise ActuatorError(str(exc)) from None
        spec, status = job.get("spec") or {}, job.get("status") or {}
        with self._lock:
            st.gpus_per_pod = gpus
        parallelism = spec.get("parallelism")
        return (int(parallelism if parallelism is not None else 1), int(status.get("ready") or 0),
                self._default_selector(st.target))

    @classmethod
    def _new_job(cls, job_id: str, t: Target) -> _Job:
        """A Job's pods are watched from the start, whatever its shape: ``capacity`` counts
        them."""
        return _Job(job_id, t, selector=cls._default_selector(t) if t.kind == "job" else "")

    @staticmethod
    def _default_selector(t: Target) -> str:
        if t.kind == "pytorchjob":
            return PYTORCHJOB_WORKER_LABELS.format(name=t.name)
        return JOB_POD_LABELS.format(name=t.name) if t.kind == "job" else ""

    # -- the ClusterQueue's capacity ------------------------------------------------------
    def capacity(self) -> Cluster | None:
        """What the ClusterQueue leaves this controller's jobs (module doc); None without a
        ClusterQueue, and until it and every Job's pods were read."""
        with self._lock:
            return self._capacity

    def _get_queue(self) -> dict:
        return self._custom.get_cluster_custom_object(
            kueue.KUEUE_GROUP, kueue.KUEUE_VERSION, "clusterqueues", self.cluster_queue,
            _request_timeout=self.request_timeout_s)

    def _first_queue_read(self) -> None:
        """At start: a ClusterQueue that is missing, may not be read or has no quota of the
        resource is an ActuatorError; one the API does not answer for is read again later."""
        try:
            self._quota = kueue.queue_quota(self._get_queue(), self.gpu_resource)
        except kueue.KueueShapeError as exc:
            raise ActuatorError(f"kubernetes: {exc}") from None
        except self._k8s.rest.ApiException as exc:
            if exc.status in (401, 403, 404):
                self._api.close()
                raise ActuatorError(self._queue_error_text(exc)) from None
            self._queue_failed(exc)
        except Exception as exc:  # noqa: BLE001 - unreachable: read again on the thread
            self._queue_failed(exc)

    def _read_queue(self) -> None:
        """The actuator's thread: read the ClusterQueue, then the capacity from it."""
        self._next_queue_read_s = time.monotonic() + self.queue_read_s
        try:
            quota = kueue.queue_quota(self._get_queue(), self.gpu_resource)
        except Exception as exc:  # noqa: BLE001 - the last capacity is kept
            self._queue_failed(exc)
            return
        if self._queue_error:
            log.info("ClusterQueue %s: read again", self.cluster_queue)
            self._queue_error = ""
        self._quota = quota
        self._update_capacity()

    def _update_capacity(self) -> None:
        own = self._own_gpus()
        if own is None or self._quota is None:
            return
        free = self._quota.free_for(own)
        cluster = Cluster(int(free + 1e-9) // self.nproc_per_node, self.nproc_per_node)
        with self._lock:
            old, self._capacity = self._capacity, cluster
        if old != cluster:
            log.info("ClusterQueue %s: %g of %g %s free for this controller's jobs (they hold "
                     "%g, all workloads %g): capacity %d GPUs", self.cluster_queue, free,
                     self._quota.nominal, self.gpu_resource, own, self._quota.held,
                     cluster.capacity)

    def _own_gpus(self) -> float | None:
        """What this controller's Jobs hold of the ClusterQueue (module doc); None while the
        pods of one of them are not listed yet."""
        total = 0.0
        with self._lock:
            for st in self._jobs.values():
                if st.target.kind != "job":
                    continue
                if not st.synced:
                    return None
                held = sum(1 for p in st.pods.values() if not p.gated and not p.terminating
                           and p.phase in ("Pending", "Running", "Unknown"))
                total += held * st.gpus_per_pod
        return total

    def _queue_failed(self, exc: Exception) -> None:
        text = self._queue_error_text(exc)
        if text != self._queue_error:
            kept = (f"keeping the last capacity, {self._capacity.capacity} GPUs"
                    if self._capacity is not None else "no capacity yet")
            log.warning("%s (%s; reading it every %.0f s)", text, kept, self.queue_read_s)
        self._queue_error = text

    def _queue_error_text(self, exc: Exception) -> str:
        return self._error_text(
            exc, f"ClusterQueue {self.cluster_queue} (kueue.x-k8s.io/v1beta1)",
            fix="create it (and Kueue's CRDs), or fix --k8s-cluster-queue",
            needs="get on clusterqueues in kueue.x-k8s.io, a ClusterRole "
                  "(deploy/components/kueue-capacity)")

    def _check_scale(self, st: _Job) -> None:
        """A scale-up under way: met when every pod below the new count is Running and Ready;
        not met after ``pending_timeout_s``: say so and keep what runs."""
        now = time.monotonic()
        with self._lock:
            if st.scale_started_s is None or st.replicas is None:
                return
            target, waited = st.replicas, now - st.scale_started_s
            if not st.synced and not st.watch_error and waited < self.pending_timeout_s:
                return                          # the pod list is on its way
            ready = self._ready(st, target)
            if ready >= target:
                st.scale_started_s = None
                log.info("job %s: scale to %d replica(s) met after %.1f s", st.job_id,
                         target, waited)
                return
            if waited < self.pending_timeout_s:
                return
            pending = sorted(p.name for p in st.pods.values() if p.ordinal is not None
                             and p.ordinal < target and p.phase == "Pending"
                             and not p.terminating)
            unready = sum(1 for p in st.pods.values() if p.ordinal is not None
                          and p.ordinal < target and p.phase == "Running" and not p.ready
                          and not p.terminating)
            keep = min(max(ready, st.scale_from), target)
            workers = min(st.desired if st.desired is not None else keep * self.nproc_per_node,
                          keep * self.nproc_per_node)
            st.achievable = workers
            st.replicas = keep
            st.patch_due_s = now
            st.scale_started_s = None
            asked = st.desired
            reasons = sorted({p.why for p in st.pods.values() if p.name in pending and p.why})
            error = st.last_error
        text = (f"scale to {asked} workers not met after {waited:.0f} s: {len(pending)} pods "
                f"Pending" + (f" ({'; '.join(reasons)[:300]})" if reasons else "")
                + (f", {unready} running but not Ready" if unready else "")
                + (f" [{error[:200]}]" if error else "")
                + f"; keeping {workers}")
        log.warning("job %s: %s (%s back to %d replica(s))", st.job_id, text,
                    st.target.describe(), keep)
        self.notify(st.job_id, text)
        with self._lock:
            self._lock.notify_all()

    def _ready(self, st: _Job, below: int) -> int:
        """Pods below ordinal ``below`` that are Running and Ready (call under the lock);
        without a pod watch (no list/watch on pods), the scale subresource's status.replicas
        (for a StatefulSet that counts Pending pods too: a guess, said in the README)."""
        if not st.synced:
            return min(st.status_replicas or 0, below)
        return sum(1 for p in st.pods.values() if p.ordinal is not None and p.ordinal < below
                   and p.phase == "Running" and p.ready and not p.terminating)

    def _running_beyond(self, st: _Job, replicas: int, before: int | None) -> bool:
        """May a pod with ordinal in [replicas, before) run now? No only when each of them is
        known not to (Pending, or ended): the pod cache may lag behind the cluster."""
        if not st.synced or before is None:
            return True
        by_ordinal = {p.ordinal: p for p in st.pods.values() if not p.terminating}
        return any(o not in by_ordinal or by_ordinal[o].phase not in ("Pending", "Succeeded",
                                                                       "Failed")
                   for o in range(replicas, before))

    # -- errors ---------------------------------------------------------------------------
    def _api_failed(self, st: _Job, exc: Exception, pods: str = "") -> None:
        """Log an API failure once per distinct message and put it on the job's notices; a
        failure on the scale subresource delays that job's next call by ``retry_s``."""
        text = self._describe_error(st.target, exc, pods)
        with self._lock:
            if pods:
                fresh, st.watch_error = text != st.watch_error, text
            else:
                fresh, st.last_error = text != st.last_error, text
                st.next_read_s = time.monotonic() + self.retry_s
        if fresh:
            log.error("job %s: %s (retrying every %.0f s)", st.job_id, text, self.retry_s)
            self.notify(st.job_id, text)
        else:
            log.debug("job %s: %s", st.job_id, text)

    def _clear_error(self, st: _Job, pods: bool = False) -> None:
        """The API answered (call under the lock)."""
        if pods:
            if st.watch_error:
                log.info("job %s: watching its pods again", st.job_id)
            st.watch_error = ""
            return
        if st.last_error:
            log.info("job %s: the Kubernetes API answers again", st.job_id)
        st.last_error = ""
        st.next_read_s = 0.0

    def _describe_error(self, t: Target, exc: Exception, what: str) -> str:
        need = "list and watch on pods" if what else f"get and patch on {t.rbac_resource}"
        return self._error_text(exc, what or f"{t.describe()} in namespace {self.namespace}",
                                fix="create it, or fix --k8s-target / --k8s-namespace",
                                needs=f"{need} in namespace {self.namespace}")

    def _error_text(self, exc: Exception, what: str, fix: str, needs: str) -> str:
        """One line for a failed call on ``what``: ``fix`` is what to do when it is not found,
        ``needs`` the RBAC a refusal lacks; a shape error says itself."""
        if isinstance(exc, (ActuatorError, kueue.KueueShapeError)):
            return f"kubernetes: {exc}"
        status = getattr(exc, "status", None)
        if isinstance(exc, self._k8s.rest.ApiException) and status:
            if status == 404:
                return f"kubernetes: {what} not found (404): {fix}"
            if status in (401, 403):
                return (f"kubernetes: forbidden ({status}) on {what}: the controller's service "
                        f"account needs {needs}")
            return f"kubernetes: {what}: HTTP {status} {_status_message(exc)}"
        host = getattr(getattr(self._api, "configuration", None), "host", "?")
        detail = re.sub(r" (object )?at 0x[0-9a-f]+", "", str(exc))[:200]   # one text per cause
        return (f"kubernetes: cannot reach the API server at {host} for {what}: "
                f"{type(exc).__name__}: {detail}")

    # -- pods -----------------------------------------------------------------------------
    def _ensure_watch(self, st: _Job) -> None:
        with self._lock:
            if (self._closed.is_set() or not st.selector
                    or (st.watch_thread is not None and st.watch_thread.is_alive())):
                return
            st.watch_thread = threading.Thread(target=self._watch_pods, args=(st,),
                                               name=f"adaptrun-k8s-pods-{st.job_id}",
                                               daemon=True)
            st.watch_thread.start()

    def _stop_watch(self, st: _Job) -> None:
        w = st.watch
        if w is not None:
            try:
                w.stop()
            except Exception:  # noqa: BLE001 - the stream is going away anyway
                pass

    def _watch_pods(self, st: _Job) -> None:
        from kubernetes import watch as k8s_watch

        what = f"pods ({st.selector}) in namespace {self.namespace}"
        version = None
        while not self._closed.is_set() and self._jobs.get(st.job_id) is st:
            try:
                if version is None:
                    pods = self._core.list_namespaced_pod(
                        self.namespace, label_selector=st.selector,
                        _request_timeout=self.request_timeout_s)
                    self._sync_pods(st, pods.items)
                    version = pods.metadata.resource_version
                w = k8s_watch.Watch()
                st.watch = w
                if self._closed.is_set():
                    return
                for event in w.stream(self._core.list_namespaced_pod, self.namespace,
                                      label_selector=st.selector, resource_version=version,
                                      timeout_seconds=self.watch_timeout_s,
                                      _request_timeout=self.watch_timeout_s + 10):
                    if self._closed.is_set():
                        return
                    self._on_pod(st, event["type"], event["object"])
                version = w.resource_version or version
            except Exception as exc:  # noqa: BLE001 - relist after any failure
                if self._closed.is_set():
                    return
                version = None
                if getattr(exc, "status", None) == 410:    # too old: list again
                    continue
                with self._lock:
                    st.synced = False
                self._api_failed(st, exc, what)
                self._closed.wait(self.retry_s)

    def _sync_pods(self, st: _Job, items) -> None:
        """A fresh list: pods that vanished while nobody watched count as deleted."""
        fresh = {p.name: p for p in (_pod(item) for item in items)}
        with self._lock:
            gone = [p for name, p in st.pods.items() if name not in fresh]
        for p in gone:
            self._classify(st, "DELETED", p)
        with self._lock:
            st.pods = {}
        for p in fresh.values():
            self._classify(st, "ADDED", p)
        with self._lock:
            st.synced = True
            self._clear_error(st, pods=True)
            self._lock.notify_all()

    def _on_pod(self, st: _Job, kind: str, obj) -> None:
        if kind not in ("ADDED", "MODIFIED", "DELETED") or obj is None:
            return
        self._classify(st, kind, _pod(obj))
        with self._lock:
            self._lock.notify_all()

    def _classify(self, st: _Job, kind: str, p: _Pod) -> None:
        with self._lock:
            if kind == "DELETED":
                st.pods.pop(p.name, None)
            else:
                st.pods[p.name] = p
            wanted = [r for r in (st.replicas, st.spec_replicas, st.writing) if r is not None]
            floor = min(wanted) if wanted else 0
            removed = kind == "DELETED" or p.terminating or p.phase == "Failed"
            lost = (removed and p.phase != "Succeeded" and p.ordinal is not None
                    and p.ordinal < floor and p.uid not in st.reported)
            if not lost:
                return
            st.reported.add(p.uid)
            st.lost += 1
            n = st.lost
        how = p.why or ("deleted" if kind == "DELETED" or p.terminating else "failed")
        text = (f"pod {p.name} of {st.target.describe()} was removed by the cluster ({how}) "
                f"while the job wanted {floor} pod(s): a failure the job survives (the agents "
                f"re-form with the survivors; the workload replaces the pod) [unplanned "
                f"removal #{n}]")
        log.warning("job %s: %s", st.job_id, text)
        self.notify(st.job_id, text)


# -- helpers ------------------------------------------------------------------------------

def _scale_fields(scale) -> tuple[int, int, str]:
    """(spec.replicas, status.replicas, status.selector) of a Scale, model or dict."""
    if isinstance(scale, dict):
        spec, status = scale.get("spec") or {}, scale.get("status") or {}
        return (int(spec.get("replicas") or 0), int(status.get("replicas") or 0),
                str(status.get("selector") or ""))
    spec, status = scale.spec, scale.status
    return (int(getattr(spec, "replicas", 0) or 0), int(getattr(status, "replicas", 0) or 0),
            str(getattr(status, "selector", "") or ""))


def _pod(obj) -> _Pod:
    """What the actuator needs of a pod (a ``V1Pod``)."""
    meta, status = obj.metadata, obj.status
    labels = dict(meta.labels or {})
    ordinal = next((int(labels[k]) for k in ORDINAL_LABELS if str(labels.get(k, "")).isdigit()),
                   None)
    if ordinal is None:
        m = re.search(r"-(\d+)$", meta.name or "")
        ordinal = int(m.group(1)) if m else None
    conditions = list((status.conditions if status is not None else None) or [])
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    disrupted = next((c for c in conditions if c.type == "DisruptionTarget"
                      and c.status == "True"), None)
    unscheduled = next((c for c in conditions if c.type == "PodScheduled"
                        and c.status == "False"), None)
    gates = getattr(obj.spec, "scheduling_gates", None) if obj.spec is not None else None
    gated = any(g.name == kueue.SCHEDULING_GATE for g in gates or [])
    if disrupted is not None:
        why = f"{disrupted.reason or 'disrupted'}"
    elif status is not None and status.reason:
        why = status.reason
    elif unscheduled is not None:
        why = f"{unscheduled.reason or 'unscheduled'}: {unscheduled.message or ''}".strip(": ")
    else:
        why = ""
    return _Pod(name=meta.name or "", uid=meta.uid or meta.name or "", ordinal=ordinal,
                phase=(status.phase if status is not None else None) or "Unknown",
                ready=ready, terminating=meta.deletion_timestamp is not None, why=why,
                gated=gated)


def _status_message(exc) -> str:
    import json
    try:
        return str(json.loads(exc.body).get("message", ""))[:200]
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", "") or "")[:200]


def _pod_namespace() -> str | None:
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _load_client(kubeconfig: str | None, context: str | None):
    """An ApiClient of its own (not the client's global default) and the kubeconfig context's
    namespace, if any: ``kubeconfig`` or ``$KUBECONFIG`` when given; else in a pod the
    in-cluster config; else ``~/.kube/config``."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    cfg = k8s_client.Configuration()
    in_pod = (bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not kubeconfig
              and not os.environ.get("KUBECONFIG"))
    try:
        if in_pod:
            k8s_config.load_incluster_config(client_configuration=cfg)
            return k8s_client.ApiClient(configuration=cfg), None
        k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=cfg, persist_config=False)
    except (k8s_config.ConfigException, OSError, ValueError, TypeError) as exc:
        where = "the in-cluster service account" if in_pod else (
            kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")
        raise ActuatorError(f"cannot load the Kubernetes config from {where}: {exc}; give "
                            f"--kubeconfig FILE or run the controller in a pod") from None
    namespace = None
    try:
        _, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
            active = next((c for c in contexts if c.get("name") == context), active)
        namespace = (active or {}).get("context", {}).get("namespace")
    except Exception:  # noqa: BLE001 - the namespace falls back to "default"
        pass
    return k8s_client.ApiClient(configuration=cfg), namespace
