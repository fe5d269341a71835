"""The ``adaptrun`` command line (click): one group, one sub-command per role.

Sub-commands import their modules lazily so ``adaptrun --help`` and ``adaptrun simulate``
start without importing torch or grpc.
"""
from __future__ import annotations

import sys

import click


class UsageProblem(click.ClickException):
    """Bad input a user can fix: printed as one line, exit code 2, no traceback."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptrun")
def cli() -> None:
    """adaptrun: elastic, adaptive-batch training for PyTorch."""


# --- simulate -------------------------------------------------------------------------


@cli.command()
@click.argument("trace_dir")
@click.option("--gpus", type=int, required=True, help="GPUs the job may use (G).")
@click.option("--gpus-per-node", type=int, default=4, show_default=True)
@click.option("--resize-cost-s", type=float, default=30.0, show_default=True,
              help="Wall time a change of replica count costs.")
@click.option("--policy", "policy_name", type=click.Choice(["adaptive", "oracle", "fixed-init", "fixed"]),
              default="adaptive", show_default=True,
              help="oracle: the per-epoch optimum in hindsight (reads the trace's future), "
                   "paying --resize-cost-s per change of replicas.")
@click.option("--replicas", type=int, help="Replicas for --policy fixed.")
@click.option("--batch", type=float, help="Global batch for --policy fixed.")
@click.option("--epochs", type=int, help="Train this many epochs instead of the workload's own.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a timeline PNG here.")
def simulate(trace_dir, gpus, gpus_per_node, resize_cost_s, policy_name, replicas, batch,
             epochs, as_json, plot):
    """Play a measured workload (a Pollux trace folder, or cifar10/imagenet/ncf) to its
    target under a policy, beside fixed-init and the best fixed configuration."""
    import json

    from .simulation.simulator import run_simulation
    from .simulation.traces import TraceError

    try:
        summary = run_simulation(trace_dir, gpus=gpus, gpus_per_node=gpus_per_node,
                                 resize_cost_s=resize_cost_s, policy=policy_name,
                                 replicas=replicas, batch=batch, epochs=epochs)
    except (TraceError, ValueError) as exc:
        raise UsageProblem(str(exc)) from None
    if plot:
        from .simulation.plotting import plot_simulation
        plot_simulation(summary, plot)
    if as_json:
        click.echo(json.dumps(summary))
        return
    _print_simulation(summary, plot)


def _print_simulation(summary: dict, plot: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{summary['workload']}: {summary['policy']} on {summary['gpus']} GPUs "
                    f"({summary['epochs']} epochs)")
    for col in ("", "time to target", "vs best fixed"):
        t.add_column(col, justify="right")
    best = summary["best_fixed_s"]
    t.add_row(summary["policy"], _hms(summary["time_s"]), f"{summary['time_s'] / best:.3f}x")
    t.add_row("fixed-init", _hms(summary["fixed_init_s"]), f"{summary['fixed_init_s'] / best:.3f}x")
    bf = summary["best_fixed"]
    t.add_row(f"best fixed ({bf['replicas']} x batch {bf['batch']:.0f})", _hms(best), "1.000x")
    console.print(t)
    console.print(f"resizes: {summary['resizes']}")
    tl = Table(title="configuration timeline")
    for col in ("start", "replicas", "batch", "local x accum", "efficiency", "why"):
        tl.add_column(col)
    rows = summary["timeline"]
    shown = rows if len(rows) <= 40 else rows[:20] + rows[-20:]
    for seg in shown:
        if seg["replicas"] == 0:
            tl.add_row(_hms(seg["start_s"]), "-", "-", "-", "-", "resizing")
            continue
        tl.add_row(_hms(seg["start_s"]), str(seg["replicas"]), f"{seg['global_batch']:.0f}",
                   f"{seg['local_batch']:.0f} x {seg['accum_steps'] + 1}",
                   f"{seg['efficiency']:.2f}", seg["reason"])
    console.print(tl)
    if plot:
        console.print(f"timeline plot: {plot}")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

@cli.command("simulate-cluster")
@click.option("--capacity", default="16x4", show_default=True,
              help="The cluster: NODESxGPUS_PER_NODE.")
@click.option("--jobs", "job_count", type=int, default=48, show_default=True,
              help="Jobs to generate (ignored with --trace).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--window-h", type=float, default=8.0, show_default=True,
              help="Generated jobs arrive over this many hours.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False),
              help="Jobs from a CSV in Pollux's workload format (name,time,application"
                   "[,num_replicas]).")
@click.option("--max-workers", type=int, default=16, show_default=True,
              help="Each job's upper bound on workers.")
@click.option("--policy", "policies", multiple=True,
              type=click.Choice(["goodput", "alone", "fair", "fifo"]),
              help="Policies to compare (repeat; default: all four).")
@click.option("--p", "power", type=float, default=-1.0, show_default=True,
              help="The allocator's fairness: the p of its p-power mean of speedups.")
@click.option("--resize-cost-s", type=float, default=30.0, show_default=True)
@click.option("--interval-s", type=float, default=300.0, show_default=True,
              help="How often the allocation runs (besides arrivals and finishes).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write the allocation over time (PNG) here.")
def simulate_cluster(capacity, job_count, seed, window_h, trace, max_workers, policies, power,
                     resize_cost_s, interval_s, as_json, plot):
    """Play a job-arrival trace on a shared cluster under the goodput allocator and the
    baselines (each job alone, a static fair share, FIFO at fixed sizes), side by side."""
    import json

    from .science.allocation import AllocationError, Cluster
    from .simulation.cluster import POLICIES, compare, generate_jobs, read_jobs
    from .simulation.traces import TraceError

    try:
        cluster = Cluster.parse(capacity)
        if max_workers < 1:
            raise TraceError(f"--max-workers must be at least 1, got {max_workers}")
        if resize_cost_s < 0 or interval_s <= 0:
            raise TraceError("--resize-cost-s must be >= 0 and --interval-s > 0")
        jobs = (read_jobs(trace, max_workers) if trace
                else generate_jobs(job_count, seed, window_h * 3600, max_workers))
        results = compare(jobs, cluster, policies or POLICIES, resize_cost_s=resize_cost_s,
                          interval_s=interval_s, p=power)
    except (TraceError, AllocationError) as exc:
        raise UsageProblem(str(exc)) from None
    summaries = [r.summary() for r in results]
    if plot:
        from .simulation.plotting import plot_cluster
        plot_cluster(results, cluster.capacity, plot)
    if as_json:
        click.echo(json.dumps({"capacity": capacity, "jobs": len(jobs), "p": power,
                               "results": summaries}))
        return
    from rich.console import Console
    from rich.table import Table

    ref = summaries[0]["avg_jct_h"]
    t = Table(title=f"{len(jobs)} jobs on {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs")
    for col in ("policy", "avg JCT", f"vs {summaries[0]['policy']}", "p99 JCT", "makespan",
                "GPU-hours", "resizes"):
        t.add_column(col, justify="right")
    for s in summaries:
        t.add_row(s["policy"], f"{s['avg_jct_h']:.2f} h", f"{s['avg_jct_h'] / ref:.2f}x",
                  f"{s['p99_jct_h']:.2f} h", f"{s['makespan_h']:.2f} h",
                  f"{s['gpu_hours']:.0f}", str(s["resizes"]))
    console = Console()
    console.print(t)
    if plot:
        console.print(f"allocation plot: {plot}")


# --- controller / status (control plane) ----------------------------------------------


def _controller_target(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageProblem(f"--controller must be HOST:PORT, got {value!r}")
    return value


def _rpc_problem(exc, target: str) -> UsageProblem:
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UsageProblem(f"cannot reach the controller at {target} ({code.name}); is "
                            f"`adaptrun controller` running there?")
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return UsageProblem(f"the controller at {target} said {code.name if code else '?'}: {details}")


def _controller_stub(target: str, credentials=None):
    import grpc

    from adaptrun.generated import control_plane_pb2_grpc as pb_grpc

    channel = credentials.channel(target) if credentials else grpc.insecure_channel(target)
    return channel, pb_grpc.ControllerStub(channel)


def _client_security(command):
    """TLS and token options of the controller's clients (`agent`, `status`, `scale`); the
    command gets one ``credentials`` argument (agents.controller_client.ClientCredentials)."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, tls_ca, tls_cert, tls_key, token_file, insecure, **kw):
        import os
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")   # before grpc loads: no C-core logs
        from adaptrun.agents.controller_client import ClientCredentials, CredentialsError
        try:
            creds = ClientCredentials.from_files(tls_ca, tls_cert, tls_key, token_file,
                                                 insecure)
            if kw.get("target"):
                _controller_target(kw["target"])
                creds.check_target(kw["target"])
        except CredentialsError as exc:
            raise UsageProblem(str(exc)) from None
        return command(*args, credentials=creds, **kw)
    for option in reversed([
            click.option("--tls-ca", default=None, help="CA certificate (PEM) that signed the "
                         "controller's certificate: talk TLS to it."),
            click.option("--tls-cert", default=None, help="This client's certificate (PEM), for "
                         "a controller that requires mutual TLS; with --tls-key."),
            click.option("--tls-key", default=None, help="This client's private key (PEM)."),
            click.option("--token-file", default=None, help="File holding the job's token, sent "
                         "as 'authorization: Bearer'; default: $ADAPTRUN_TOKEN (never a flag "
                         "value: other users see command lines)."),
            click.option("--insecure", is_flag=True, help="Allow plaintext to a controller "
                         "that is not on loopback (a warning is logged).")]):
        wrapped = option(wrapped)
    return wrapped


def _server_security(command):
    """TLS, token and binding options of `adaptrun controller`; the command gets one
    ``security`` argument: a dict of keyword arguments of ``Controller``."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, tls_cert, tls_key, tls_ca, tokens_file, insecure, rdzv_host,
                health_port, **kw):
        import os
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")   # before grpc loads: no C-core logs
        from adaptrun.controller.auth import AuthError, ServerSecurity, TokenTable
        try:
            tokens = TokenTable.load(tokens_file) if tokens_file else None
            sec = ServerSecurity(tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                                 tokens=tokens, insecure=insecure).validate()
        except AuthError as exc:
            raise UsageProblem(str(exc)) from None
        return command(*args, security=dict(security=sec, rdzv_host=rdzv_host,
                                            health_port=health_port), **kw)
    for option in reversed([
            click.option("--tls-cert", default=None, help="The server's certificate (PEM): "
                         "serve gRPC over TLS; with --tls-key."),
            click.option("--tls-key", default=None, help="The server's private key (PEM)."),
            click.option("--tls-ca", default=None, help="CA (PEM) whose client certificates "
                         "are accepted: mutual TLS, a client without one fails the handshake."),
            click.option("--tokens-file", default=None, help="Lines 'JOB_ID TOKEN' (a job's "
                         "token) and '* TOKEN' (the operator's, the only one that may scale); "
                         "none: every caller may do everything (loopback and tests only)."),
            click.option("--insecure", is_flag=True, help="Allow plaintext gRPC on an address "
                         "that is not loopback (a warning is logged)."),
            click.option("--rdzv-host", default=None, help="Address the rendezvous store binds "
                         "(default: --host). It has no TLS: keep it on a network only the "
                         "jobs' workers reach (docs: how-to/security)."),
            click.option("--health-port", default=None, type=click.IntRange(0, 65535),
                         help="Also serve grpc.health.v1 alone, in plaintext, on this port "
                              "(for the kubelet's gRPC probes, which cannot do TLS).")]):
        wrapped = option(wrapped)
    return wrapped


def _k8s_options(command):
    """The options of the kubernetes actuator (`controller --actuator kubernetes`)."""
    for option in reversed([
            click.option("--k8s-target", "k8s_targets", multiple=True, metavar="JOB=KIND/NAME",
                         help="The workload that holds JOB's workers: statefulset/NAME or "
                              "pytorchjob/NAME (Kubeflow elastic PyTorchJob), resized through "
                              "their scale subresource, or job/NAME (an Indexed batch/v1 Job "
                              "annotated kueue.x-k8s.io/elastic-job: \"true\", which Kueue "
                              "resizes in place), resized through its parallelism and "
                              "completions. Repeat per job."),
            click.option("--k8s-namespace", default=None,
                         help="Namespace of the workloads (default: the controller pod's own, "
                              "else the kubeconfig context's, else 'default')."),
            click.option("--kubeconfig", default=None,
                         help="kubeconfig file (default: $KUBECONFIG, else the in-cluster "
                              "config in a pod, else ~/.kube/config)."),
            click.option("--k8s-pending-timeout-s", type=click.FloatRange(min=0.0),
                         default=300.0, show_default=True,
                         help="A scale-up whose pods are not all Running and Ready by then is "
                              "reported and given up: the job keeps the pods that run."),
            click.option("--k8s-nproc-per-node", type=click.IntRange(min=1), default=1,
                         show_default=True, help="Workers per pod: replicas = ceil(workers / "
                                                 "this)."),
            click.option("--k8s-scale-down-delay-s", type=click.FloatRange(min=0.0),
                         default=30.0, show_default=True,
                         help="Lower the replicas this long after the directive, so the "
                              "leaving agents exit before their pods are deleted."),
            click.option("--k8s-cluster-queue", default=None, metavar="NAME",
                         help="Take the cluster capacity from this Kueue ClusterQueue "
                              "(kueue.x-k8s.io/v1beta1) when --capacity is not given: its "
                              "nominal quota of --k8s-gpu-resource less what workloads other "
                              "than the controller's job/ targets hold, re-read every 5 s, in "
                              "pods of --k8s-nproc-per-node GPUs (one GPU per worker). Needs get "
                              "on clusterqueues (a ClusterRole)."),
            click.option("--k8s-gpu-resource", default="nvidia.com/gpu", show_default=True,
                         help="The resource of the ClusterQueue's quota that counts as GPUs "
                              "(--k8s-cluster-queue).")]):
        command = option(command)
    return command


def _ray_options(command):
    """The options of the ray actuator (`controller --actuator ray`)."""
    for option in reversed([
            click.option("--ray-address", default=None,
                         help="The Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a "
                              "local Ray instance of the controller's own)."),
            click.option("--ray-agent-command", default=None,
                         help="The argv of one node's agent, as a shell line; {job} and {node} "
                              "are filled in, e.g. 'adaptrun agent --controller HEAD:50051 "
                              "--job {job} --node {node} --nnodes 1:4 -- python train.py'."),
            click.option("--ray-start", "ray_start", multiple=True, metavar="JOB=WORKERS",
                         help="Place JOB's first agents at start (the controller knows a job "
                              "only once an agent registers). Repeat per job."),
            click.option("--ray-nproc-per-node", type=click.IntRange(min=1), default=1,
                         show_default=True, help="Workers per agent (per actor)."),
            click.option("--ray-cpus-per-node", type=click.FloatRange(min=0.0), default=None,
                         help="CPUs each actor holds (default: --ray-nproc-per-node)."),
            click.option("--ray-gpus-per-node", type=click.FloatRange(min=0.0), default=0.0,
                         show_default=True, help="GPUs each actor holds.")]):
        command = option(command)
    return command


_K8S_FLAGS = ("k8s_targets", "k8s_namespace", "kubeconfig", "k8s_pending_timeout_s",
              "k8s_nproc_per_node", "k8s_scale_down_delay_s", "k8s_cluster_queue",
              "k8s_gpu_resource")


def _ray_start(values) -> dict[str, int]:
    starts = {}
    for value in values:
        job, sep, n = value.partition("=")
        if not sep or not job or not n.isdigit() or int(n) < 1:
            raise UsageProblem(f"--ray-start must be JOB=WORKERS (WORKERS >= 1), got {value!r}")
        starts[job] = int(n)
    return starts


def _actuator_options(actuator: str, k8s: dict) -> dict:
    """The keyword options of the chosen actuator's factory: k8s flags need kubernetes, ray
    flags need ray."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    given = [name for name in k8s if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    for name in given:
        owner = "kubernetes" if name in _K8S_FLAGS else "ray"
        if actuator != owner:
            raise UsageProblem(f"{flags[name]} is an option of the {owner} actuator: "
                               f"add --actuator {owner}")
    if actuator == "ray":
        if not k8s["ray_agent_command"]:
            raise UsageProblem("--actuator ray needs --ray-agent-command: the agent each actor "
                               "runs, e.g. 'adaptrun agent --controller HEAD:50051 --job {job} "
                               "--node {node} -- python train.py'")
        return dict(agent_command=k8s["ray_agent_command"], address=k8s["ray_address"],
                    nproc_per_node=k8s["ray_nproc_per_node"],
                    num_cpus_per_node=k8s["ray_cpus_per_node"],
                    num_gpus_per_node=k8s["ray_gpus_per_node"])
    if actuator != "kubernetes":
        return {}
    return dict(targets=list(k8s["k8s_targets"]), namespace=k8s["k8s_namespace"],
                kubeconfig=k8s["kubeconfig"], pending_timeout_s=k8s["k8s_pending_timeout_s"],
                nproc_per_node=k8s["k8s_nproc_per_node"],
                scale_down_delay_s=k8s["k8s_scale_down_delay_s"],
                cluster_queue=k8s["k8s_cluster_queue"], gpu_resource=k8s["k8s_gpu_resource"])


@cli.command("controller")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0: any free port, printed).")
@click.option("--metrics-port", default=9464, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the Prometheus /metrics endpoint (0: any free port).")
@click.option("--rdzv-port", default="29400", show_default=True,
              help="Port of the rendezvous store the controller hosts for its jobs and hands "
                   "to agents at registration (0: any free port; 'none': host none).")
@click.option("--rdzv-advertise", default="", help="Host the agents should use for the store "
              "(default: the host they reach the controller at, e.g. its Service name).")
@click.option("--actuator", default="local", show_default=True,
              help="What adds or removes workers: local (agent processes here), kubernetes "
                   "(a StatefulSet or PyTorchJob per job: see --k8s-target), ray (agents as "
                   "Ray actors: see --ray-agent-command).")
@click.option("--policy-interval-s", default=5.0, show_default=True, type=click.FloatRange(min=0.0),
              help="How often each job's policy runs.")
@click.option("--max-threads", default=64, show_default=True, type=click.IntRange(min=4),
              help="Threads for blocking work (a bounds change runs the job's policy); the "
                   "gRPC streams of connected agents need none (grpc.aio).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Keep each job's state here (bounds, learned throughput and noise scale, "
                   "generation) so a restarted controller resumes its jobs (default: none).")
@click.option("--capacity", default="", help="Share this many GPUs among the jobs by goodput "
              "(NODESxGPUS, like 16x4): each job gets workers within its bounds by the "
              "cluster allocation, and a job that does not fit waits in a queue (default: "
              "the actuator's capacity where it has one, a Kueue ClusterQueue with "
              "--k8s-cluster-queue; else none, each job's policy alone).")
@click.option("--allocation-interval-s", default=30.0, show_default=True,
              type=click.FloatRange(min=1.0), help="How often the cluster allocation runs.")
@click.option("--resize-cost-s", default=30.0, show_default=True,
              type=click.FloatRange(min=0.0),
              help="What a job's policy and the allocation assume a change of its worker count "
                   "costs until its first re-form is measured (then the measured gap): about a "
                   "minute where a pod must be scheduled, a few seconds for local agents.")
@_k8s_options
@_ray_options
@_server_security
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def controller_command(host, port, metrics_port, rdzv_port, rdzv_advertise, actuator,
                       policy_interval_s, max_threads, state_dir, capacity,
                       allocation_interval_s, resize_cost_s, verbose, security, **k8s):
    """Run the controller: job registry, policy, directives, /metrics."""
    import os
    # gRPC's C core logs a bind failure on stderr itself; we say it in one line instead.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import logging
    import signal
    import threading

    from adaptrun.controller.actuators import ActuatorError, UnknownActuatorError
    from adaptrun.controller.core import ControllerConfig
    from adaptrun.controller.server import Controller, ControllerError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rdzv_port.lower() == "none":
        store_port = None
    elif rdzv_port.isdigit() and int(rdzv_port) < 65536:
        store_port = int(rdzv_port)
    else:
        raise UsageProblem(f"--rdzv-port must be a port (0-65535) or 'none', got {rdzv_port!r}")
    config = ControllerConfig(host=host, port=port, metrics_port=metrics_port,
                              actuator=actuator, policy_interval_s=policy_interval_s,
                              actuator_options=_actuator_options(actuator, k8s),
                              max_threads=max_threads, rdzv_port=store_port,
                              rdzv_advertise=rdzv_advertise, state_dir=state_dir,
                              capacity=capacity, allocation_interval_s=allocation_interval_s,
                              resize_cost_s=resize_cost_s)
    if capacity:
        from adaptrun.science.allocation import AllocationError, Cluster
        try:
            Cluster.parse(capacity)
        except AllocationError as exc:
            raise UsageProblem(f"--capacity: {exc}") from None
    starts = _ray_start(k8s.get("ray_start", ()))
    try:
        ctl = Controller(config, **security).start()
        for job_id, workers in starts.items():   # the ray actuator places the first agents
            ctl.actuator.set_workers(job_id, workers)
    except (ControllerError, UnknownActuatorError, ActuatorError) as exc:
        raise UsageProblem(str(exc)) from None
    store = (f", rendezvous store on port {ctl.rdzv_port}" if ctl.rdzv_port is not None
             else "")
    click.echo(f"adaptrun controller on {ctl.address}, metrics on "
               f"http://{host}:{ctl.metrics_port}/metrics{store}", err=False)
    sys.stdout.flush()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    ctl.stop()


@cli.command("status")
@click.option("--controller", "target", required=True, help="The controller, HOST:PORT.")
@click.option("--job", "job_id", default="", help="Only this job.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per job).")
@click.option("--timeout-s", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@_client_security
def status_command(target, job_id, as_json, timeout_s, credentials):
    """Show the jobs a running controller knows."""
    import json

    import grpc
    from google.protobuf.json_format import MessageToDict

    from adaptrun.generated import control_plane_pb2 as pb

    _controller_target(target)
    channel, stub = _controller_stub(target, credentials)
    try:
        resp = stub.ListJobs(pb.ListJobsRequest(job_id=job_id), timeout=timeout_s,
                             metadata=credentials.metadata())
    except grpc.RpcError as exc:
        raise _rpc_problem(exc, target) from None
    finally:
        channel.close()
    if as_json:
        click.echo(json.dumps({"jobs": [MessageToDict(j, preserving_proto_field_name=True,
                                                      always_print_fields_with_no_presence=True)
                                        for j in resp.jobs]}, indent=2))
        return
    if not resp.jobs:
        click.echo("no jobs")
        return
    header = (f"{'JOB':<20} {'WORKERS':>9} {'BOUNDS':>8} {'GLOBAL':>7} {'LOCAL':>6} "
              f"{'ACCUM':>5} {'GOODPUT':>9} {'EFF':>5} {'NOISE':>8} {'STEP':>8} {'GEN':>4}")
    click.echo(header)
    for j in resp.jobs:
        bounds = f"{j.bounds.min_workers}-{j.bounds.max_workers}"
        workers = f"{j.world_size}" + (f"->{j.desired_workers}"
                                        if j.desired_workers and j.desired_workers != j.world_size
                                        else "")
        click.echo(f"{j.job_id:<20} {workers:>9} {bounds:>8} {j.global_batch:>7} "
                   f"{j.local_batch:>6} {j.accum_steps:>5} {j.goodput:>9.1f} "
                   f"{j.statistical_efficiency:>5.2f} {j.noise_scale:>8.0f} {j.step:>8} "
                   f"{j.directive.generation:>4}")
        if j.allocated_workers == 0 and not j.done:
            click.echo(f"  queued for {j.queued_s:.0f} s: the cluster has no "
                       f"{j.bounds.min_workers} GPU(s) free for it yet")
        elif j.allocated_workers > 0:
            click.echo(f"  allocated {j.allocated_workers} worker(s) of the cluster")
        if j.last_decision:
            click.echo(f"  last decision: {j.last_decision}")
    queued = [j.job_id for j in resp.jobs if j.allocated_workers == 0 and not j.done]
    if any(j.allocated_workers >= 0 for j in resp.jobs):
        used = sum(max(j.allocated_workers, 0) for j in resp.jobs)
        click.echo(f"cluster: {used} worker(s) allocated; queue: "
                   f"{', '.join(queued) if queued else 'empty'}")


@cli.command("scale")
@click.argument("job_id")
@click.option("--min-workers", type=click.IntRange(min=1), required=True)
@click.option("--max-workers", type=click.IntRange(min=1), required=True)
@click.option("--controller", "target", required=True, help="The controller, HOST:PORT.")
@click.option("--timeout-s", default=10.0, show_default=True, type=click.FloatRange(min=0.1))
@_client_security
def scale_command(job_id, min_workers, max_workers, target, timeout_s, credentials):
    """Change a job's worker bounds at run time; the controller acts on them."""
    import grpc

    from adaptrun.generated import control_plane_pb2 as pb

    _controller_target(target)
    if min_workers > max_workers:
        raise UsageProblem(f"--min-workers {min_workers} exceeds --max-workers {max_workers}")
    channel, stub = _controller_stub(target, credentials)
    try:
        s = stub.SetBounds(pb.SetBoundsRequest(job_id=job_id, min_workers=min_workers,
                                               max_workers=max_workers), timeout=timeout_s,
                           metadata=credentials.metadata())
    except grpc.RpcError as exc:
        raise _rpc_problem(exc, target) from None
    finally:
        channel.close()
    click.echo(f"job {s.job_id}: workers [{s.bounds.min_workers}, {s.bounds.max_workers}], "
               f"now {s.world_size}, desired {s.desired_workers or '-'}; "
               f"{s.last_decision or 'no decision yet'}")


@cli.command("certs")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--hosts", default="localhost,127.0.0.1,adaptrun-controller", show_default=True,
              help="Names and addresses the controller's certificate is valid for, comma "
                   "separated (its Service name in Kubernetes).")
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1))
def certs_command(directory, hosts, days):
    """Write a CA and a server and a client certificate with their keys (ca.crt, ca.key,
    server.crt, server.key, client.crt, client.key; keys mode 0600) for a test deployment."""
    from adaptrun.controller.auth import write_test_pki

    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not names:
        raise UsageProblem("--hosts names no host")
    try:
        paths = write_test_pki(directory, names, days)
    except OSError as exc:
        raise UsageProblem(f"cannot write to {directory}: {exc.strerror}") from None
    click.echo("wrote " + ", ".join(str(p) for p in paths))


# --- agent ----------------------------------------------------------------------------


def _nnodes(value: str) -> tuple[int, int]:
    lo, sep, hi = value.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi if sep else lo)
    except ValueError:
        raise UsageProblem(f"--nnodes must be N or MIN:MAX, got {value!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise UsageProblem(f"--nnodes needs 1 <= MIN <= MAX, got {value!r}")
    return lo_i, hi_i


def _nproc_per_node(ctx, param, value):
    """``--nproc-per-node``: a number, or "gpu", resolved to the visible GPUs when the agent
    starts (``adaptrun.agents.workers.resolve_nproc``)."""
    from adaptrun.agents.workers import resolve_nproc

    if str(value).strip().lower() == "gpu":
        return "gpu"
    try:
        return resolve_nproc(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _batch_caps(command):
    """The optional batch caps of `run` and `agent`: the script declares its own limits (its
    reports carry them); a flag can only tighten them."""
    for option in reversed([
            click.option("--init-batch", type=click.IntRange(min=1), default=None,
                         help="Optional: B0 is the script's batch_size; a different value is "
                              "said once and ignored."),
            click.option("--max-global-batch", type=click.IntRange(min=1), default=None,
                         help="Optional cap on the script's max batch (autoscale_batch_size)."),
            click.option("--local-batch-min", type=click.IntRange(min=1), default=None,
                         help="Optional cap: raises the script's lower local batch bound."),
            click.option("--local-batch-max", type=click.IntRange(min=1), default=None,
                         help="Optional cap: lowers the script's upper local batch bound "
                              "(memory).")]):
        command = option(command)
    return command


@cli.command("agent", context_settings={"ignore_unknown_options": True,
                                        "allow_interspersed_args": False})
@click.option("--controller", "target", default=None,
              help="The controller, HOST:PORT (none: elastic, not adaptive).")
@click.option("--job", "job_id", required=True, help="The job id (the same on every node).")
@click.option("--nproc-per-node", default="1", show_default=True, metavar="N|gpu",
              callback=_nproc_per_node,
              help="Worker processes on this node: N, or 'gpu' for one per visible GPU "
                   "(worker LOCAL_RANK i trains on the i-th GPU of CUDA_VISIBLE_DEVICES).")
@click.option("--nnodes", default="1", show_default=True,
              help="Nodes the first round admits: N or MIN:MAX (later rounds: the controller).")
@click.option("--rdzv-endpoint", default=None,
              help="HOST:PORT of the c10d store for the rendezvous (hosted here when nothing "
                   "listens there and it is local: then this agent is a single point of failure).")
@click.option("--rdzv-conf", default="", help="key=value,... : join_timeout, last_call_timeout, "
              "close_timeout, keep_alive_interval, keep_alive_max_attempt, is_host, poll_s.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Failure restarts before giving up (planned re-forms spend none).")
@click.option("--node", default="", help="This node's name, unique in the job (default "
              "hostname-pid).")
@click.option("--local-addr", default="127.0.0.1", show_default=True,
              help="This node's address as the other nodes reach it.")
@click.option("--min-workers", type=click.IntRange(min=1), default=None,
              help="Job bounds registered with the controller (default from --nnodes).")
@click.option("--max-workers", type=click.IntRange(min=1), default=None)
@_batch_caps
@click.option("--snapshot-dir", default=None, help="Node-local snapshot directory for the "
              "workers (ADAPTRUN_SNAPSHOT_DIR; default <tmp>/adaptrun-<job>).")
@click.option("--controller-wait-s", type=click.FloatRange(min=0.0), default=3.0,
              show_default=True, help="How long to wait for the controller before starting.")
@click.option("--warm-start/--no-warm-start", default=True, show_default=True,
              help="Start the next round's workers ahead (torch imported) while the old "
                   "world trains; off: plain `python train.py` per round.")
@click.option("--standby-after-s", type=float, default=5.0, show_default=True,
              help="Once a round has trained this long, hold one warm worker (torch "
                   "imported) per local process for a failure restart; negative: none, which "
                   "saves its memory and the CPU of its start on a small node (a failed round "
                   "then starts its workers cold).")
@click.option("--ready-timeout-s", type=click.FloatRange(min=0.1), default=60.0,
              show_default=True,
              help="How long a running job keeps training at its size while the new nodes "
                   "of a scale-up start (a pod's image pull included); then it keeps its "
                   "size, and a node that comes later joins the next directive.")
@click.option("--health-port", type=click.IntRange(0, 65535), default=None,
              help="Serve GET /healthz (HTTP, plaintext) on this port: 200 while the agent's "
                   "loop is alive, 503 once it is stuck; for Kubernetes startup and liveness "
                   "probes.")
@click.option("--exit-with-parent", is_flag=True,
              help="Stop (as on SIGTERM) when the process that started this agent ends: "
                   "`adaptrun run` starts its agents so, and a kill -9 of it leaves none "
                   "running.")
@_client_security
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def agent_command(target, job_id, nproc_per_node, nnodes, rdzv_endpoint, rdzv_conf,
                  max_restarts, node, local_addr, min_workers, max_workers, init_batch,
                  max_global_batch, local_batch_min, local_batch_max, snapshot_dir,
                  controller_wait_s, warm_start, standby_after_s, ready_timeout_s,
                  health_port, exit_with_parent, verbose, command, credentials):
    """Run this node's workers of a job: `adaptrun agent --job ID ... -- python train.py ARGS`."""
    import logging
    import os

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if "TORCH_CPP_LOG_LEVEL" not in os.environ and not verbose:
        # Before torch loads. The agent polls each round's workers' store, which worker rank
        # 0 hosts; when that worker exits (a job's end) a poll in flight fails, as expected
        # and handled, but torch's C++ log prints it with a 40-frame stack trace. The workers
        # get the user's own setting back (``Agent`` drops this one from their environment).
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
        os.environ["ADAPTRUN_AGENT_QUIET_CPP_LOG"] = "1"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # torch's rendezvous logs every state change at INFO
        logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    if target:
        _controller_target(target)
    lo, hi = _nnodes(nnodes)
    command = tuple(command[1:] if command and command[0] == "--" else command)

    from adaptrun.agents.agent import Agent, AgentConfig, AgentError
    from adaptrun.agents.controller_client import JobBoundsSpec
    from adaptrun.agents.rendezvous import RendezvousConf
    from adaptrun.agents.workers import resolve_nproc

    try:
        conf = RendezvousConf.parse(rdzv_conf)
        nproc_per_node = resolve_nproc(nproc_per_node)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    bounds = JobBoundsSpec(min_workers=min_workers or lo * nproc_per_node,
                           max_workers=max_workers or hi * nproc_per_node,
                           init_batch=init_batch, max_global_batch=max_global_batch,
                           local_batch_min=local_batch_min, local_batch_max=local_batch_max)
    config = AgentConfig(job_id=job_id, command=command, nproc_per_node=nproc_per_node,
                         nnodes_min=lo, nnodes_max=hi, controller=target,
                         controller_credentials=credentials,
                         rdzv_endpoint=rdzv_endpoint, rdzv_conf=conf,
                         max_restarts=max_restarts, node=node, local_addr=local_addr,
                         bounds=bounds, snapshot_dir=snapshot_dir,
                         controller_wait_s=controller_wait_s, warm_start=warm_start,
                         standby_after_s=standby_after_s, ready_timeout_s=ready_timeout_s,
                         parent_pid=os.getppid() if exit_with_parent else None,
                         health_port=health_port)
    try:
        agent = Agent(config)
    except AgentError as exc:
        raise UsageProblem(str(exc)) from None
    sys.exit(agent.run())


@cli.command("run", context_settings={"ignore_unknown_options": True,
                                      "allow_interspersed_args": False})
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-workers", type=click.IntRange(min=1), default=None,
              help="Default: the GPUs of this machine, else its CPUs.")
@click.option("--nproc-per-node", default="1", show_default=True, metavar="N|gpu",
              callback=_nproc_per_node,
              help="Workers per agent (one agent plays one node); gpu: one agent with one "
                   "worker per GPU. With GPUs each agent gets its own in "
                   "CUDA_VISIBLE_DEVICES.")
@click.option("--job", "job_id", default="local", show_default=True)
@_batch_caps
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port of the embedded controller (0: any free port).")
@click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Port of /metrics (0: any free port).")
@click.option("--policy-interval-s", default=3.0, show_default=True,
              type=click.FloatRange(min=0.1))
@click.option("--resize-cost-s", default=2.0, show_default=True, type=click.FloatRange(min=0.0),
              help="What the policy assumes a change of worker count costs until the first "
                   "re-form is measured.")
@click.option("--report-dir", default=None, help="Keep the run's JSON-lines reports, its "
              "summary (summary.json) and its timeline PNG in this folder.")
@click.option("--log-dir", default="adaptrun-logs", show_default=True,
              help="Agent logs and node-local snapshots.")
@click.option("--plot", default="adaptrun-timeline.png", show_default=True,
              help="Timeline PNG written at the end ('' for none).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Run the agents as local processes or as Ray actors.")
@click.option("--ray-address", default=None, help="With --backend ray: the Ray cluster "
              "(auto, HOST:PORT or ray://HOST:PORT; default: a local Ray instance for the run).")
@click.option("--capacity", default="", help="Give the embedded controller a cluster "
              "allocation over this many slots (NODESxGPUS, as `adaptrun controller "
              "--capacity`); default: none.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_command(min_workers, max_workers, nproc_per_node, job_id, init_batch, max_global_batch,
                local_batch_min, local_batch_max, port, metrics_port, policy_interval_s,
                resize_cost_s, report_dir, log_dir, plot, progress, backend, ray_address,
                capacity, command):
    """Train on this machine with an embedded controller and local agents:
    `adaptrun run --min-workers 1 --max-workers 3 -- python train.py ARGS`."""
    import logging
    import os
    import pathlib
    import signal

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = tuple(command[1:] if command and command[0] == "--" else command)
    from adaptrun.worker.distributed import visible_gpu_ids
    gpus = visible_gpu_ids() if backend == "local" else ()
    if nproc_per_node == "gpu":
        if not gpus:
            raise UsageProblem("--nproc-per-node gpu: this machine has no visible GPUs; give a "
                               "number of workers instead")
        nproc_per_node = min_workers = max_workers = len(gpus)
    if max_workers is None:
        max_workers = max(min_workers, len(gpus) or os.cpu_count() or 1)

    from adaptrun.controller.actuators import ActuatorError
    from adaptrun.controller.local_run import LocalRun, RunConfig
    from adaptrun.controller.server import ControllerError

    try:
        config = RunConfig(command=command, job_id=job_id, min_workers=min_workers,
                           max_workers=max_workers, nproc_per_node=nproc_per_node,
                           init_batch=init_batch, max_global_batch=max_global_batch,
                           local_batch_min=local_batch_min, local_batch_max=local_batch_max,
                           port=port, metrics_port=metrics_port,
                           policy_interval_s=policy_interval_s, resize_cost_s=resize_cost_s,
                           log_dir=pathlib.Path(log_dir), backend=backend,
                           ray_address=ray_address, gpus=gpus, capacity=capacity).validate()
        if ray_address and backend != "ray":
            raise ValueError("--ray-address is an option of --backend ray")
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        run = LocalRun(config).start()
    except (ControllerError, ActuatorError) as exc:
        raise UsageProblem(str(exc)) from None
    try:
        code, samples, decisions = _watch_run(run, progress, stop)
    finally:
        run.close()
    if report_dir:
        pathlib.Path(report_dir).mkdir(parents=True, exist_ok=True)
        if plot:
            plot = str(pathlib.Path(report_dir) / pathlib.Path(plot).name)
    _run_summary(run, samples, decisions, code, plot, report_dir)
    sys.exit(code)


def _decision_line(t_s: float, d, before, after, applied_s: float | None = None) -> str:
    """One line per decision: what changed (workers, global batch, local x micro-batches, LR)
    and why; ``before``/``after`` are the job's samples around it (after: None, not applied).
    The line is stamped when the job shows the change applied (``applied_s``), so it sorts
    among the notes; a decision that took longer to apply says when it was taken."""
    def cfg(s):
        return (s.workers, s.global_batch, f"{s.local_batch}x{s.accum_steps + 1}", s.lr)
    parts = []
    names = ("workers", "batch", "local", "lr")
    if before is not None and after is not None:
        for name, a, b in zip(names, cfg(before), cfg(after)):
            fmt = (lambda v: f"{v:.3g}") if name == "lr" else str
            parts.append(f"{name} {fmt(a)}" if a == b else f"{name} {fmt(a)} -> {fmt(b)}")
    else:
        parts.append(f"workers -> {d.world_size}" + (
            f", batch -> {d.global_batch} ({d.local_batch}x{d.accum_steps + 1})"
            if d.global_batch else "") + ("" if after is not None else " (not applied)"))
    stamp = t_s if applied_s is None else applied_s
    taken = f" (decided at {t_s:.1f}s)" if stamp - t_s >= 1.0 else ""
    return f"[{stamp:6.1f}s] decision {d.generation}{taken}: {', '.join(parts)}: {d.reason}"


def _watch_run(run, show_progress: bool, stop: dict):
    """Follow the job until its agents are done (or a signal): progress bar, one line per
    decision once the job shows it applied, each controller notice once; returns
    (exit code, samples, decisions)."""
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=False)
    c = run.config
    console.print(f"adaptrun run: job {c.job_id!r}, workers [{c.min_workers}, {c.max_workers}], "
                  f"controller {run.controller.address}, metrics "
                  f"http://127.0.0.1:{run.controller.metrics_port}/metrics, logs {c.log_dir}/")
    samples, decisions, pending = [], [], []
    fields = "epoch {e}  progress {p}  batch {b}  workers {w}  goodput {g}"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, disable=not show_progress, transient=False) as bar:
        task = bar.add_task(fields.format(e="-", p="-", b="-", w="-", g="-"), total=None)
        code = None
        while code is None:
            if stop["signal"] is not None:
                console.print("stopping: the agents save and exit")
                code = 128 + stop["signal"]
                break
            for note in run.new_notices():
                bar.console.print(f"[{run.elapsed_s():6.1f}s] note: {escape(note)}",
                                  soft_wrap=True)
            s = run.sample()
            if s is not None and (not samples or s.reports != samples[-1].reports):
                samples.append(s)
                bar.update(task, description=fields.format(
                    e=s.epoch, p=f"{s.progress:.0f}", b=f"{s.global_batch} "
                    f"({s.local_batch}x{s.accum_steps + 1})", w=s.workers,
                    g=f"{s.goodput:.0f}" if s.adaptive else "n/a (not adaptive)"))
            for d in run.new_decisions():
                decisions.append((run.elapsed_s(), d))
                pending.append((run.elapsed_s(), d))
            for item in list(pending):
                t_d, d = item
                if samples and samples[-1].generation >= d.generation:
                    # before: the last sample under an older directive (the agent may have
                    # applied this one before the run saw the decision)
                    before = next((s for s in reversed(samples) if s.generation < d.generation),
                                  None)
                    bar.console.print(escape(_decision_line(t_d, d, before, samples[-1],
                                                            run.elapsed_s())), soft_wrap=True)
                    pending.remove(item)
            code = run.finished()
            time.sleep(0.5)
        for note in run.new_notices():
            console.print(f"[{run.elapsed_s():6.1f}s] note: {escape(note)}", soft_wrap=True)
        for t_d, d in pending:
            console.print(escape(_decision_line(t_d, d, None, None)), soft_wrap=True)
    return code, samples, decisions


def _run_summary(run, samples, decisions, code: int, plot: str, report_dir: str | None) -> None:
    import json
    import math
    import pathlib
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    console = Console()
    job = run.job
    status = "done" if code == 0 else f"exit {code}"
    t = Table(title=f"adaptrun run: job {run.config.job_id} ({status})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    rows = [("wall time", f"{run.elapsed_s():.1f} s"), ("decisions", str(len(decisions)))]
    if job is not None:
        rows += [("resizes", str(job.resizes)),
                 ("resize gaps measured", ", ".join(f"{g:.2f} s" for g in job.resize_gaps)
                  or "none"),
                 ("reports accepted", str(job.accepted)), ("reports rejected", str(job.rejected))]
        if job.metric_name:
            rows.insert(0, (f"script metric: {job.metric_name}", f"{job.metric:.4g}"))
    if samples:
        last = samples[-1]
        workers = sorted({s.workers for s in samples})
        batches = sorted({s.global_batch for s in samples})
        rows += [("steps", str(last.step)),
                 ("epochs done" if job is not None and job.done else "epoch", str(last.epoch)),
                 ("progress (B0-steps)", f"{last.progress:.0f}"),
                 ("workers seen", ", ".join(map(str, workers))),
                 ("global batches seen", ", ".join(map(str, batches))),
                 ("last noise scale", f"{last.noise_scale:.0f}" if math.isfinite(
                     last.noise_scale) else "not measured"),
                 ("last goodput", f"{last.goodput:.0f}")]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if plot and samples:
        from .simulation.plotting import plot_run
        plot_run([asdict(s) for s in samples], plot,
                 f"adaptrun run: job {run.config.job_id}, {len(decisions)} decisions",
                 decisions=[(t_s, d.generation) for t_s, d in decisions])
        console.print(f"timeline plot: {plot}")
    if report_dir:
        out = pathlib.Path(report_dir)
        (out / "summary.json").write_text(json.dumps(
            {"job": run.config.job_id, "exit_code": code, "rows": dict(rows),
             "decisions": [{"t_s": t_s, "generation": d.generation, "workers": d.world_size,
                            "global_batch": d.global_batch, "reason": d.reason}
                           for t_s, d in decisions],
             "notices": list(job.notices) if job is not None else []}, indent=1))
        with open(out / "reports.jsonl", "w") as f:
            for r in run.reports:
                f.write(json.dumps(r.to_dict()) + "\n")
        console.print(f"reports, summary and plot kept in {out}/")


def main() -> None:
    cli(prog_name="adaptrun")


if __name__ == "__main__":
    sys.exit(main())
