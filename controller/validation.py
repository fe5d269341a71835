"""Checks on what agents send: every report and registration is accepted whole or rejected.

A rejection is a ``Rejection``: the gRPC status code to end the call with, a reason from the
fixed set ``REASONS`` (the ``reason`` label of ``adaptrun_rejected_reports_total``, so its
cardinality stays bounded) and a message that says what was wrong and what is allowed.

Reports arrive as bytes: ``parse_report`` never raises (a gRPC deserializer that raises
turns into an opaque INTERNAL status), it returns the message or a ``Rejection``. A field
sent with the wrong wire type (a string where ``step`` is a varint) parses in protobuf as an
unknown field; it is caught here and rejected. Unknown field *numbers* are ignored, so a
newer agent can add fields. Range checks are ``Report.validate()``'s, plus the ones that
need the job (same job as the stream). B0 and the batch limits are the script's: a report
carries them and is never rejected for them (see ``policy.bounds_from_script``).

Sizes the policy plans over have ceilings (``MAX_WORKERS``, ``MAX_ACCUM_STEPS``): its candidate
grid grows with replicas x accumulation steps, so one job declaring two billion workers would
take the controller's memory and its one policy thread from every other job. Generations an
agent brings stay below ``MAX_GENERATION`` so the job's next directive still fits an int64.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.science.policy import BatchCaps, BoundsError, JobBounds
from adaptrun.science.report import Report, ReportError

__all__ = ["Rejection", "REASONS", "parse_report", "parse_message", "Malformed",
           "report_from_proto", "check_job_id", "bounds_from_proto", "bounds_to_proto",
           "check_registration", "check_generation", "check_worker_bounds", "MAX_WORKERS",
           "MAX_ACCUM_STEPS", "MAX_GENERATION"]

# unauthorized: a call without a valid token, or with one that does not open the job
# (controller/auth.py); counted with job_id '' (the caller proved no job).
REASONS = ("malformed", "oversize", "invalid", "unknown_job", "wrong_job", "rate_limited",
           "unregistered", "unauthorized")

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_WORKERS = 4096            # worker processes of one job (world size, bounds)
MAX_ACCUM_STEPS = 32          # extra micro-batches per step a job may be planned with
MAX_GENERATION = 1 << 53      # directive generations an agent may bring
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group", 4: "group end",
               5: "32-bit"}


class Rejection(Exception):
    """Bad input from an agent or a client: end the call with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        assert reason in REASONS, reason  # a programming error, not user input
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse; handlers reject it with ``rejection``."""
    rejection: Rejection


def _wrong_wire_types(msg) -> list[str]:
    by_number = msg.DESCRIPTOR.fields_by_number
    bad = []
    for f in UnknownFieldSet(msg):
        field = by_number.get(f.field_number)
        if field is not None:
            bad.append(f"field {field.name} was sent as {_WIRE_NAMES.get(f.wire_type, '?')}, "
                       f"which does not fit its type")
    return bad


def parse_message(cls, data: bytes, max_bytes: int):
    """Parse ``data`` as ``cls``; return the message or a ``Malformed`` (never raise)."""
    name = cls.DESCRIPTOR.full_name
    if len(data) > max_bytes:
        return Malformed(Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "oversize",
            f"{name} of {len(data)} bytes exceeds the {max_bytes}-byte limit"))
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        return Malformed(Rejection(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                                   f"not a valid {name}: {exc}"))
    bad = _wrong_wire_types(msg)
    if bad:
        return Malformed(Rejection(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                                   f"{name} has a wrong type: " + "; ".join(bad)))
    return msg


def parse_report(data: bytes, max_bytes: int = 16384):
    return parse_message(pb.Report, data, max_bytes)


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"job_id {job_id[:80]!r} must be 1-63 characters of letters, digits, "
                        f"'.', '_' or '-', starting with a letter or digit")
    return job_id


def _opt(msg, name: str) -> float:
    return getattr(msg, name) if msg.HasField(name) else math.nan


def report_from_proto(msg: pb.Report, *, job_id: str) -> Report:
    """The validated ``Report`` of ``msg``, sent on a stream registered for ``job_id``."""
    if msg.job_id != job_id:
        raise Rejection(grpc.StatusCode.PERMISSION_DENIED, "wrong_job",
                        f"report for job {msg.job_id[:80]!r} on a stream registered for job "
                        f"{job_id!r}; register an agent for that job")
    report = Report(
        job_id=msg.job_id, step=msg.step, progress=msg.progress, world_size=msg.world_size,
        nodes=msg.nodes, local_batch=msg.local_batch, accum_steps=msg.accum_steps,
        init_batch=msg.init_batch, step_time_s=msg.step_time_s, sync_time_s=msg.sync_time_s,
        grad_sqr=msg.grad_sqr, grad_var=msg.grad_var, loss=_opt(msg, "loss"),
        lr=_opt(msg, "lr"), epoch=msg.epoch, target_progress=_opt(msg, "target_progress"),
        time_s=msg.time_s, max_batch=msg.max_batch, local_batch_min=msg.local_batch_min,
        local_batch_max=msg.local_batch_max, accumulation=msg.accumulation,
        generation=msg.generation, resize_gap_s=_opt(msg, "resize_gap_s"),
        metric_name=msg.metric_name, metric=_opt(msg, "metric"), finished=msg.finished)
    try:
        report.validate()
    except ReportError as exc:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"report rejected: {exc}") from None
    if report.world_size > MAX_WORKERS:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"report rejected: world_size {report.world_size} exceeds the "
                        f"controller's {MAX_WORKERS} workers per job")
    for name in ("loss", "lr", "target_progress"):
        v = getattr(report, name)
        if math.isinf(v) or (name != "loss" and v < 0):
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                            f"report rejected: {name} must be finite"
                            f"{'' if name == 'loss' else ' and >= 0'} or unset, got {v}")
    return report


def bounds_from_proto(b: pb.JobBounds, slots_per_node: int) -> tuple[JobBounds, BatchCaps]:
    """A registration's bounds: the worker bounds and the batch caps of the launcher's flags
    (0 = none), and provisional policy bounds until the script's first report declares its
    own; raise Rejection naming the bad bound."""
    for name in ("init_batch", "max_global_batch", "local_batch_min", "local_batch_max"):
        if getattr(b, name) < 0:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                            f"job bounds rejected: {name} must be >= 0 (0: no cap), got "
                            f"{getattr(b, name)}")
    check_worker_bounds(b.min_workers, b.max_workers, "job bounds rejected")
    if b.HasField("max_accum_steps") and not 0 <= b.max_accum_steps <= MAX_ACCUM_STEPS:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"job bounds rejected: max_accum_steps must be in [0, "
                        f"{MAX_ACCUM_STEPS}] (or unset), got {b.max_accum_steps}")
    caps = BatchCaps(init_batch=b.init_batch or None, max_batch=b.max_global_batch or None,
                     local_batch_min=b.local_batch_min or None,
                     local_batch_max=b.local_batch_max or None,
                     max_accum_steps=b.max_accum_steps if b.HasField("max_accum_steps") else None)
    init = b.init_batch or 1
    kw = dict(init_batch=init, max_batch=b.max_global_batch or max(init, 1 << 20),
              min_replicas=b.min_workers, max_replicas=b.max_workers,
              local_batch_min=b.local_batch_min or 1, local_batch_max=b.local_batch_max or (1 << 30),
              slots_per_node=slots_per_node)
    if caps.max_accum_steps is not None:
        kw["max_accum_steps"] = caps.max_accum_steps
    try:
        return JobBounds(**kw).validate(), caps
    except BoundsError as exc:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"job bounds rejected: {exc}") from None


def bounds_to_proto(b: JobBounds) -> pb.JobBounds:
    """The bounds in force (the script's limits within the caps)."""
    return pb.JobBounds(min_workers=b.min_replicas, max_workers=b.max_replicas,
                        init_batch=b.init_batch, max_global_batch=b.max_batch,
                        local_batch_min=b.local_batch_min, local_batch_max=b.local_batch_max,
                        max_accum_steps=b.max_accum_steps)


def check_registration(req: pb.RegisterRequest) -> tuple[JobBounds, BatchCaps]:
    """Validate a registration; return its provisional bounds and batch caps."""
    check_job_id(req.job_id)
    for name, limit in (("node", 128), ("address", 256)):
        v = getattr(req, name)
        if not v or len(v) > limit or not v.isprintable():
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                            f"{name} must be 1-{limit} printable characters, got {v[:80]!r}")
    if not 1 <= req.slots <= 1024:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"slots must be in [1, 1024], got {req.slots}")
    check_generation(req.last_generation)
    return bounds_from_proto(req.bounds, req.slots)


def check_generation(last_generation: int) -> int:
    """An agent's newest applied generation: in [0, MAX_GENERATION]."""
    if not 0 <= last_generation <= MAX_GENERATION:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"last_generation must be in [0, {MAX_GENERATION}], got "
                        f"{last_generation}")
    return last_generation


def check_worker_bounds(min_workers: int, max_workers: int, what: str = "bounds rejected"):
    """Worker bounds within the controller's ceiling (their order is ``JobBounds``'s check)."""
    if max_workers > MAX_WORKERS or min_workers > MAX_WORKERS:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                        f"{what}: workers [{min_workers}, {max_workers}] exceed the "
                        f"controller's {MAX_WORKERS} workers per job")
