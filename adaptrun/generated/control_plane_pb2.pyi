from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobBounds(_message.Message):
    __slots__ = ("min_workers", "max_workers", "init_batch", "max_global_batch", "local_batch_min", "local_batch_max", "max_accum_steps")
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    INIT_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_MIN_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    min_workers: int
    max_workers: int
    init_batch: int
    max_global_batch: int
    local_batch_min: int
    local_batch_max: int
    max_accum_steps: int
    def __init__(self, min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., init_batch: _Optional[int] = ..., max_global_batch: _Optional[int] = ..., local_batch_min: _Optional[int] = ..., local_batch_max: _Optional[int] = ..., max_accum_steps: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("job_id", "node", "slots", "address", "bounds", "last_generation", "wants_to_join")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATION_FIELD_NUMBER: _ClassVar[int]
    WANTS_TO_JOIN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node: str
    slots: int
    address: str
    bounds: JobBounds
    last_generation: int
    wants_to_join: bool
    def __init__(self, job_id: _Optional[str] = ..., node: _Optional[str] = ..., slots: _Optional[int] = ..., address: _Optional[str] = ..., bounds: _Optional[_Union[JobBounds, _Mapping]] = ..., last_generation: _Optional[int] = ..., wants_to_join: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("agent_id", "bounds", "directive", "report_interval_s", "job_done", "rdzv_endpoint")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    JOB_DONE_FIELD_NUMBER: _ClassVar[int]
    RDZV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    bounds: JobBounds
    directive: Directive
    report_interval_s: float
    job_done: bool
    rdzv_endpoint: str
    def __init__(self, agent_id: _Optional[str] = ..., bounds: _Optional[_Union[JobBounds, _Mapping]] = ..., directive: _Optional[_Union[Directive, _Mapping]] = ..., report_interval_s: _Optional[float] = ..., job_done: _Optional[bool] = ..., rdzv_endpoint: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("job_id", "step", "progress", "world_size", "nodes", "local_batch", "accum_steps", "init_batch", "step_time_s", "sync_time_s", "grad_sqr", "grad_var", "loss", "lr", "epoch", "target_progress", "time_s", "max_batch", "local_batch_min", "local_batch_max", "accumulation", "generation", "resize_gap_s", "metric_name", "metric", "finished")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    INIT_BATCH_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    SYNC_TIME_S_FIELD_NUMBER: _ClassVar[int]
    GRAD_SQR_FIELD_NUMBER: _ClassVar[int]
    GRAD_VAR_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TIME_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_MIN_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_MAX_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RESIZE_GAP_S_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    progress: float
    world_size: int
    nodes: int
    local_batch: int
    accum_steps: int
    init_batch: int
    step_time_s: float
    sync_time_s: float
    grad_sqr: float
    grad_var: float
    loss: float
    lr: float
    epoch: int
    target_progress: float
    time_s: float
    max_batch: int
    local_batch_min: int
    local_batch_max: int
    accumulation: bool
    generation: int
    resize_gap_s: float
    metric_name: str
    metric: float
    finished: bool
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., progress: _Optional[float] = ..., world_size: _Optional[int] = ..., nodes: _Optional[int] = ..., local_batch: _Optional[int] = ..., accum_steps: _Optional[int] = ..., init_batch: _Optional[int] = ..., step_time_s: _Optional[float] = ..., sync_time_s: _Optional[float] = ..., grad_sqr: _Optional[float] = ..., grad_var: _Optional[float] = ..., loss: _Optional[float] = ..., lr: _Optional[float] = ..., epoch: _Optional[int] = ..., target_progress: _Optional[float] = ..., time_s: _Optional[float] = ..., max_batch: _Optional[int] = ..., local_batch_min: _Optional[int] = ..., local_batch_max: _Optional[int] = ..., accumulation: _Optional[bool] = ..., generation: _Optional[int] = ..., resize_gap_s: _Optional[float] = ..., metric_name: _Optional[str] = ..., metric: _Optional[float] = ..., finished: _Optional[bool] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("step", "generation")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    step: int
    generation: int
    def __init__(self, step: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class Directive(_message.Message):
    __slots__ = ("job_id", "generation", "world_size", "global_batch", "local_batch", "accum_steps", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    world_size: int
    global_batch: int
    local_batch: int
    accum_steps: int
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., world_size: _Optional[int] = ..., global_batch: _Optional[int] = ..., local_batch: _Optional[int] = ..., accum_steps: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchDirectivesRequest(_message.Message):
    __slots__ = ("job_id", "agent_id", "last_generation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    agent_id: str
    last_generation: int
    def __init__(self, job_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., last_generation: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent_id", "node", "slots", "address", "watching")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WATCHING_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    node: str
    slots: int
    address: str
    watching: bool
    def __init__(self, agent_id: _Optional[str] = ..., node: _Optional[str] = ..., slots: _Optional[int] = ..., address: _Optional[str] = ..., watching: _Optional[bool] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "bounds", "agents", "directive", "desired_workers", "adaptive", "reports_accepted", "reports_rejected", "resizes", "last_report_age_s", "step", "epoch", "progress", "world_size", "global_batch", "local_batch", "accum_steps", "lr", "noise_scale", "throughput_examples_per_s", "statistical_efficiency", "goodput", "last_decision", "notices", "done", "resize_cost_s", "metric_name", "metric", "allocated_workers", "queued_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    REPORTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    RESIZES_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_EXAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STATISTICAL_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_COST_S_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    bounds: JobBounds
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    directive: Directive
    desired_workers: int
    adaptive: bool
    reports_accepted: int
    reports_rejected: int
    resizes: int
    last_report_age_s: float
    step: int
    epoch: int
    progress: float
    world_size: int
    global_batch: int
    local_batch: int
    accum_steps: int
    lr: float
    noise_scale: float
    throughput_examples_per_s: float
    statistical_efficiency: float
    goodput: float
    last_decision: str
    notices: _containers.RepeatedScalarFieldContainer[str]
    done: bool
    resize_cost_s: float
    metric_name: str
    metric: float
    allocated_workers: int
    queued_s: float
    def __init__(self, job_id: _Optional[str] = ..., bounds: _Optional[_Union[JobBounds, _Mapping]] = ..., agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ..., directive: _Optional[_Union[Directive, _Mapping]] = ..., desired_workers: _Optional[int] = ..., adaptive: _Optional[bool] = ..., reports_accepted: _Optional[int] = ..., reports_rejected: _Optional[int] = ..., resizes: _Optional[int] = ..., last_report_age_s: _Optional[float] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., progress: _Optional[float] = ..., world_size: _Optional[int] = ..., global_batch: _Optional[int] = ..., local_batch: _Optional[int] = ..., accum_steps: _Optional[int] = ..., lr: _Optional[float] = ..., noise_scale: _Optional[float] = ..., throughput_examples_per_s: _Optional[float] = ..., statistical_efficiency: _Optional[float] = ..., goodput: _Optional[float] = ..., last_decision: _Optional[str] = ..., notices: _Optional[_Iterable[str]] = ..., done: _Optional[bool] = ..., resize_cost_s: _Optional[float] = ..., metric_name: _Optional[str] = ..., metric: _Optional[float] = ..., allocated_workers: _Optional[int] = ..., queued_s: _Optional[float] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class SetBoundsRequest(_message.Message):
    __slots__ = ("job_id", "min_workers", "max_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    min_workers: int
    max_workers: int
    def __init__(self, job_id: _Optional[str] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...
