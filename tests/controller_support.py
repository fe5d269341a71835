"""Shared helpers of the controller tests: a real controller on 127.0.0.1 and raw clients."""
from __future__ import annotations

import contextlib
import math
import urllib.request

import grpc

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.actuators.local import LocalActuator
from adaptrun.controller.server import Controller

AGENT = "adaptrun-agent-id"

BOUNDS = pb.JobBounds(min_workers=1, max_workers=4, init_batch=64, max_global_batch=1024,
                      local_batch_min=8, local_batch_max=128)


@contextlib.contextmanager
def running_controller(**overrides):
    """A started controller (fast cadence for tests) and its local actuator; always stopped."""
    cfg = dict(policy_interval_s=0.2, tick_s=0.05, max_threads=64)
    cfg.update(overrides)
    changes = []
    actuator = LocalActuator(on_change=lambda job, old, new: changes.append((job, old, new)))
    ctl = Controller(ControllerConfig(**cfg), actuator=actuator).start()
    ctl.actuator_changes = changes
    try:
        yield ctl
    finally:
        ctl.stop(grace_s=0.2)


@contextlib.contextmanager
def channel_to(ctl):
    ch = grpc.insecure_channel(ctl.address)
    try:
        yield ch, pb_grpc.ControllerStub(ch)
    finally:
        ch.close()


def register(stub, job_id, node="n0", slots=1, bounds=BOUNDS, last_generation=0):
    return stub.Register(pb.RegisterRequest(job_id=job_id, node=node, slots=slots,
                                            address=f"127.0.0.1:{hash(node) % 1000 + 1}",
                                            bounds=bounds, last_generation=last_generation),
                         timeout=5)


def report(job_id, step=10, **kw) -> pb.Report:
    fields = dict(job_id=job_id, step=step, progress=float(step), world_size=2, nodes=1,
                  local_batch=32, accum_steps=0, init_batch=64, step_time_s=0.5,
                  sync_time_s=0.1, grad_sqr=1.0, grad_var=2.0, loss=1.5, lr=0.1, epoch=1,
                  time_s=float(step))
    fields.update(kw)
    return pb.Report(**{k: v for k, v in fields.items() if not (isinstance(v, float) and
                                                              k in ("loss", "lr") and
                                                              math.isnan(v))})


def send_reports(stub, agent_id, reports, timeout=5):
    """Stream ``reports``; return the acks, or raise the RpcError that ended the stream."""
    return list(stub.StreamReports(iter(reports), metadata=((AGENT, agent_id),),
                                   timeout=timeout))


def raw_report_stream(channel):
    """StreamReports taking raw bytes, as a client that does not use our generated code."""
    return channel.stream_stream("/adaptrun.v1.Controller/StreamReports",
                                 request_serializer=None,
                                 response_deserializer=pb.ReportAck.FromString)


def scrape(ctl) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{ctl.metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    """The value of one sample of a Prometheus text exposition, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        mname, _, lbl = metric.partition("{")
        if mname != name:
            continue
        got = ",".join(sorted(p for p in lbl.rstrip("}").split(",") if p))
        if got == want:
            return float(value)
    return None
