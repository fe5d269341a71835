"""The ``ray`` actuator on a real local Ray instance (loopback only, 2 CPUs, no dashboard).

One Ray instance serves the file (module fixture): its temp dir is under pytest's, usage
stats are off, token auth uses a token in the environment (nothing written to ~/.ray), and
a marker variable in everything it starts lets the teardown check that no process (Ray's,
an actor, an agent or a worker) outlives the tests.
- ``create_actuator("ray", ...)`` builds one from string options, and ray is not imported
  until an agent must be placed.
- ``adaptrun run --backend ray --ray-address`` (a separate driver on that instance): the job
  grows 1 -> 2 agents and shrinks back to 1 through ``adaptrun scale``; every sample counted
  exactly once.
- A real ``Controller`` with a ``RayActuator`` in this process: an agent's actor is killed
  with ``ray.kill`` mid-run; its agent dies with it, the survivor re-forms alone and finishes
  the job, every sample exactly once, and the actuator no longer counts the lost actor.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_agent import LSQ, agent_argv, check_exactly_once, steps, wait_for

from adaptrun.controller.actuators import create_actuator
from adaptrun.controller.actuators.ray import LOST_EXIT_CODE, RayActuator
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller
from workers import harness

# Not imported here: the fixture sets the environment first (Ray reads some of it on import).
if importlib.util.find_spec("ray") is None:
    pytest.skip("needs ray: pip install 'adaptrun[ray]'", allow_module_level=True)


def _marked_pids(marker: str) -> list[int]:
    """Live (not zombie) processes, other than this one, whose environment has ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    marker = f"ADAPTRUN_RAY_TEST_{secrets.token_hex(6)}"
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
           # Ray binds every port to 127.0.0.1 (read when ray starts its processes).
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # ray.init turns token auth on for the instance it starts (RAY_AUTH_MODE=token in
           # this environment, restored after); its token comes from here, not ~/.ray.
           "RAY_AUTH_TOKEN": secrets.token_hex(16),
           # What the agents and workers need (harness.base_env): Ray passes this process's
           # environment to its workers, hence to the actors' agents.
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ADAPTRUN_TIMEOUT_S": "60",
           "TMPDIR": harness.SCRATCH, marker: "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "ADAPTRUN_SNAPSHOT_DIR",
                  "ADAPTRUN_SNAPSHOT_EVERY"):
            mp.delenv(k, raising=False)
        import ray
        try:
            ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                           log_to_driver=False, object_store_memory=96 * 1024 * 1024,
                           _temp_dir=str(tmp_path_factory.mktemp("ray")))
            address = ctx.address_info["gcs_address"]
            assert address.startswith("127.0.0.1:"), address
            yield address
        finally:
            ray.shutdown()
            deadline = time.monotonic() + 20
            while (left := _marked_pids(marker)) and time.monotonic() < deadline:
                time.sleep(0.2)
            for pid in left:             # ours (they carry the marker): end them, then fail
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert not left, f"processes outlived the Ray tests: {left}"


@pytest.mark.timeout(60)
def test_registered_by_name_without_loading_ray():
    code = ("import sys; from adaptrun.controller.actuators import create_actuator;"
            "a = create_actuator('ray', nproc_per_node='2', num_gpus_per_node='2');"
            "assert a.num_cpus_per_node == 2.0 and a.num_gpus_per_node == 2.0;"
            "a.set_workers('j', 4); assert a.current_workers('j') == 4; a.close();"
            "assert 'ray' not in sys.modules, 'ray loaded without an agent to start'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env=harness.base_env(), cwd=harness.REPO)
    assert isinstance(create_actuator("ray"), RayActuator)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptrun.cli", *args], capture_output=True,
                          text=True, timeout=30, env=harness.base_env(), cwd=harness.REPO)


@pytest.mark.timeout(150)
def test_run_backend_ray_grows_and_shrinks_exactly_once(ray_address, tmp_path):
    samples, epochs, b0 = 4096, 4, 32
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    pace = tmp_path / "pace"           # seconds per step: slow until the resizes are seen
    pace.write_text("0.1")
    port = harness.free_port()
    # A long policy interval: only `adaptrun scale` moves the job, so the test decides when.
    cmd = [sys.executable, "-m", "adaptrun.cli", "run", "--backend", "ray", "--ray-address",
           ray_address, "--job", "rayjob", "--min-workers", "1", "--max-workers", "2",
           "--init-batch", str(b0), "--max-global-batch", str(b0), "--port", str(port),
           "--policy-interval-s", "600", "--log-dir", str(logs), "--plot", "",
           "--no-progress", "--", sys.executable, LSQ, "--samples", str(samples),
           "--batch", str(b0), "--epochs", str(epochs), "--pace-file", str(pace),
           "--out", str(out)]
    proc = harness.start(cmd, harness.base_env(), tmp_path / "run.log")
    controller = f"127.0.0.1:{port}"
    try:
        harness.wait_steps(out, lambda r: r["world"] == 1, 10, 60, [proc])
        t_up = time.time()
        up = _cli("scale", "rayjob", "--min-workers", "2", "--max-workers", "2",
                  "--controller", controller)
        assert up.returncode == 0, up.stderr
        harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t_up, 10, 60, [proc])
        t_down = time.time()
        down = _cli("scale", "rayjob", "--min-workers", "1", "--max-workers", "1",
                    "--controller", controller)
        assert down.returncode == 0, down.stderr
        harness.wait_steps(out, lambda r: r["world"] == 1 and r["t"] > t_down, 5, 60, [proc])
        pace.write_text("0")
        assert proc.wait(timeout=60) == 0, harness.tail(tmp_path / "run.log")
    finally:
        harness.stop(proc)
    worlds = [r["world"] for r in steps(out) if r["rank"] == 0]
    changes = [(a, b) for a, b in zip(worlds, worlds[1:]) if a != b]
    assert changes == [(1, 2), (2, 1)], changes
    check_exactly_once(out)
    # Each agent ran in its actor with its output in the run's log dir; the second one left
    # on the scale-down (exit 0) and its actor ended with it.
    agent_logs = sorted(p.name for p in logs.glob("agent-*.log"))
    assert agent_logs == ["agent-rayjob-n0.log", "agent-rayjob-n1.log"], agent_logs
    assert "job rayjob (done)" in harness.tail(tmp_path / "run.log")


@pytest.mark.timeout(150)
def test_a_killed_actor_leaves_the_survivor_to_finish_exactly_once(ray_address, tmp_path,
                                                                   caplog):
    caplog.set_level("INFO", logger="adaptrun.controller.actuators.ray")
    job, out = "raykill", tmp_path / "out"
    out.mkdir()
    pace = tmp_path / "pace"
    pace.write_text("0.1")            # seconds per step, until the survivor is seen alone
    worker = [LSQ, "--out", str(out), "--samples", "4096", "--epochs", "6",
              "--pace-file", str(pace)]
    holder: dict = {}

    def command(job_id, node):
        return agent_argv(job_id, node, controller_addr=holder["ctl"].address, nnodes="1:2",
                          bounds=(1, 2), snapshot_dir=tmp_path / f"snap-{node}", worker=worker)

    actuator = RayActuator(agent_command=command, log_dir=tmp_path / "logs", stop_grace_s=5,
                           env={"ADAPTRUN_SNAPSHOT_EVERY": "10"})
    ctl = Controller(ControllerConfig(policy_interval_s=600, tick_s=0.05, metrics_port=None),
                     actuator=actuator).start()
    holder["ctl"] = ctl
    logs = lambda: sorted((tmp_path / "logs").glob("agent-*.log"))  # noqa: E731
    try:
        actuator.set_workers(job, 1)       # returns at once; the actor starts on its thread
        wait_for(lambda: (j := ctl.core.registry.job(job)) is not None
                 and j.last_report is not None, 60, "a first report", logs())
        ctl.core.set_bounds(job, 2, 2)     # what `adaptrun scale` does
        wait_for(lambda: sum(r["world"] == 2 for r in steps(out)) >= 15, 90,
                 "15 steps in a world of 2", logs())
        (_, survivor), (_, victim) = actuator.agents(job)
        assert actuator.live_agents(job) == 2 and victim.pid is not None
        t_kill = time.time()
        import ray
        ray.kill(victim.actor)
        wait_for(lambda: victim.returncode is not None, 30, "the actuator to see the loss")
        assert victim.returncode == LOST_EXIT_CODE and victim.lost
        assert actuator.live_agents(job) == 1
        wait_for(lambda: sum(r["world"] == 1 and r["t"] > t_kill for r in steps(out)) >= 5,
                 90, "5 steps of the survivor alone", logs())
        pace.write_text("0")
        wait_for(lambda: survivor.poll() is not None, 90, "the survivor to finish", logs())
        assert survivor.returncode == 0, "\n".join(harness.tail(p) for p in logs())
        # The killed actor's agent and its workers (its process group) are gone with it.
        wait_for(lambda: not _group_alive(victim.pid), 15, "the lost agent's group to end")
    finally:
        ctl.stop(grace_s=0.2)              # closes the actuator: stops what still runs
    check_exactly_once(out)
    assert any("lost the Ray actor of agent raykill-n1" in r.getMessage()
               for r in caplog.records)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@pytest.mark.timeout(150)
def test_standalone_controller_places_agents_as_actors(ray_address, tmp_path):
    """`adaptrun controller --actuator ray` on an existing cluster: it places the job's first
    agent (--ray-start) and grows and shrinks the job through `adaptrun scale`, exactly once;
    the agents' command is the operator's template (--ray-agent-command, {job} and {node})."""
    out, pace = tmp_path / "out", tmp_path / "pace"
    out.mkdir()
    pace.write_text("0.1")
    port = harness.free_port()
    worker = f"{LSQ} --samples 4096 --batch 32 --epochs 4 --pace-file {pace} --out {out}"
    template = (f"{sys.executable} -m adaptrun.cli agent --controller 127.0.0.1:{port} "
                f"--job {{job}} --node {{node}} --nnodes 1:2 --min-workers 1 --max-workers 2 "
                f"--snapshot-dir {tmp_path}/snap-{{node}} -- {sys.executable} {worker}")
    ctl = harness.start([sys.executable, "-m", "adaptrun.cli", "controller", "--port", str(port),
                         "--metrics-port", "0", "--rdzv-port", "0", "--policy-interval-s",
                         "600", "--actuator", "ray", "--ray-address", ray_address,
                         "--ray-agent-command", template, "--ray-start", "rayctl=1"],
                        harness.base_env(), tmp_path / "controller.log")
    controller = f"127.0.0.1:{port}"
    try:
        harness.wait_steps(out, lambda r: r["world"] == 1, 10, 90, [ctl])
        for n in (2, 1):
            t = time.time()
            moved = _cli("scale", "rayctl", "--min-workers", str(n), "--max-workers", str(n),
                         "--controller", controller)
            assert moved.returncode == 0, moved.stderr
            harness.wait_steps(out, lambda r, n=n, t=t: r["world"] == n and r["t"] > t, 5, 90,
                               [ctl])
        pace.write_text("0")
        deadline = time.monotonic() + 60
        while not (out / "result.json").exists():
            assert time.monotonic() < deadline, harness.tail(tmp_path / "controller.log")
            time.sleep(0.2)
    finally:
        harness.stop(ctl, signal.SIGTERM)    # its actuator ends the actors it placed
        with contextlib.suppress(subprocess.TimeoutExpired):
            ctl.wait(timeout=30)
        harness.stop(ctl)
    worlds = [r["world"] for r in steps(out) if r["rank"] == 0]
    assert [(a, b) for a, b in zip(worlds, worlds[1:]) if a != b] == [(1, 2), (2, 1)]
    check_exactly_once(out)
