"""What the ``kubernetes`` actuator reads of Kueue: the shape of an elastic Job, and the quota of
one resource in a ClusterQueue. Pure functions of the API objects (dicts, as the API serves
them); the actuator makes the calls.

The model
- **The elastic Job.** Kueue (0.18 or later: the ElasticJobsViaWorkloadSlices feature gate,
  beta and on by default since 0.18, alpha from 0.13) resizes an admitted ``batch/v1`` Job in
  place when it carries the annotation ``kueue.x-k8s.io/elastic-job: "true"``: a larger
  ``spec.parallelism`` becomes a new workload slice that Kueue admits as a whole (its new pods
  wait behind the scheduling gate ``kueue.x-k8s.io/elastic-job`` until then), a smaller one is
  written into the admitted workload at once. adaptrun's Job is Indexed
  (``completionMode: Indexed``): each index is one pod running one ``adaptrun agent`` to the
  end of training, so ``spec.completions`` equals ``spec.parallelism`` (Kueue counts
  ``min(parallelism, completions)`` pods, and Kubernetes lets an Indexed Job change its
  completions only together with its parallelism, to the same value). Hence the patch
  ``{"spec": {"parallelism": N, "completions": N}}``; at N = 0 (the allocation queued the job)
  only ``parallelism`` goes to 0, which pauses the Job: completions 0 would complete it.
- **The quota.** A ClusterQueue (``kueue.x-k8s.io/v1beta1``, cluster-scoped) gives each flavor a
  ``nominalQuota`` of each resource (``spec.resourceGroups[].flavors[].resources[]``); its
  status says what the workloads in it hold, per flavor and resource
  (``status.flavorsReservation[].resources[].total``: the quota reserved, which is what
  admission counts; ``status.flavorsUsage``, of admitted workloads, where a Kueue reports no
  reservation). A resource's quota and holding are summed over the flavors. Borrowing from a
  cohort is not counted: the capacity is the nominal quota.
- **What this controller may share.** ``free_for_us = nominal - (held - own)``: the quota less
  what the *other* workloads hold, where ``own`` is what this controller's Jobs hold (the
  caller counts it from their pods: every pod Kueue admitted, not behind its gate, not ended,
  times the GPUs its template requests). Never below 0.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ELASTIC_ANNOTATION", "SCHEDULING_GATE", "QUEUE_LABEL", "KUEUE_GROUP",
           "KUEUE_VERSION", "KueueShapeError", "QueueQuota", "queue_quota", "check_elastic_job",
           "pod_request", "job_patch"]

ELASTIC_ANNOTATION = "kueue.x-k8s.io/elastic-job"
SCHEDULING_GATE = "kueue.x-k8s.io/elastic-job"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"


class KueueShapeError(ValueError):
    """An object is not what Kueue's elastic path needs; the message says what to change."""


@dataclass(frozen=True)
class QueueQuota:
    """One resource of one ClusterQueue: its nominal quota and what its workloads hold."""
    queue: str
    resource: str
    nominal: float
    held: float

    def free_for(self, own: float) -> float:
        """The quota less what workloads other than ``own`` hold (never below 0)."""
        return max(0.0, self.nominal - max(0.0, self.held - own))


def _quantity(value) -> float:
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(value)))


def queue_quota(cq: dict, resource: str) -> QueueQuota:
    """The ClusterQueue's nominal quota of ``resource`` and what its workloads hold (module
    doc). KueueShapeError when the queue has no quota for that resource."""
    name = str((cq.get("metadata") or {}).get("name", "?"))
    nominal, covered = 0.0, set()
    found = False
    for group in (cq.get("spec") or {}).get("resourceGroups") or []:
        covered.update(str(r) for r in group.get("coveredResources") or [])
        for flavor in group.get("flavors") or []:
            for r in flavor.get("resources") or []:
                if r.get("name") == resource:
                    found = True
                    nominal += _quantity(r.get("nominalQuota", 0))
    if not found:
        raise KueueShapeError(
            f"ClusterQueue {name} has no quota for {resource} (it covers "
            f"{', '.join(sorted(covered)) or 'nothing'}): give --k8s-gpu-resource one of those, "
            f"or add {resource} to its resourceGroups")
    status = cq.get("status") or {}
    flavors = status.get("flavorsReservation")
    if flavors is None:
        flavors = status.get("flavorsUsage") or []
    held = sum(_quantity(r.get("total", 0)) for f in flavors for r in f.get("resources") or []
               if r.get("name") == resource)
    return QueueQuota(name, resource, nominal, held)


def check_elastic_job(job: dict) -> None:
    """KueueShapeError unless the Job is one Kueue resizes in place and adaptrun can drive:
    Indexed, annotated elastic, completions equal to parallelism (or parallelism 0, paused)."""
    meta, spec = job.get("metadata") or {}, job.get("spec") or {}
    name = f"job/{meta.get('name', '?')}"
    if spec.get("completionMode") != "Indexed":
        raise KueueShapeError(
            f"{name} is not an Indexed Job (completionMode "
            f"{spec.get('completionMode') or 'NonIndexed'}): set spec.completionMode: Indexed "
            f"and spec.completions equal to spec.parallelism (one index per agent)")
    if str((meta.get("annotations") or {}).get(ELASTIC_ANNOTATION, "")).lower() != "true":
        raise KueueShapeError(
            f"{name} lacks the annotation {ELASTIC_ANNOTATION}: \"true\": add it (Kueue resizes "
            f"only such Jobs in place; without it a new parallelism suspends and requeues the "
            f"Job)")
    parallelism = int(spec.get("parallelism") if spec.get("parallelism") is not None else 1)
    completions = spec.get("completions")
    if parallelism > 0 and completions != parallelism:
        raise KueueShapeError(
            f"{name} has spec.completions {completions} and spec.parallelism {parallelism}: "
            f"make them equal (each index runs one agent to the end; Kubernetes changes an "
            f"Indexed Job's completions only together with its parallelism)")


def pod_request(job: dict, resource: str) -> float:
    """What one pod of the Job requests of ``resource``: its containers' requests (a limit
    where no request is given, as Kubernetes defaults it), the largest init container's when
    larger."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}

    def one(c: dict) -> float:
        res = c.get("resources") or {}
        value = (res.get("requests") or {}).get(resource, (res.get("limits") or {}).get(resource))
        return _quantity(value) if value is not None else 0.0
    main = sum(one(c) for c in pod.get("containers") or [])
    init = max((one(c) for c in pod.get("initContainers") or []), default=0.0)
    return max(main, init)


def job_patch(pods: int) -> dict:
    """The merge patch that sets an elastic Indexed Job to ``pods`` pods (module doc)."""
    if pods <= 0:
        return {"spec": {"parallelism": 0}}
    return {"spec": {"parallelism": pods, "completions": pods}}
