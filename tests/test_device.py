"""The job's device and what follows from it, on CPU: the device a worker gets and the process
group built for it (``adaptrun.worker.distributed``), a two-process world over the multi-backend
group, snapshots restored onto the job's device (``map_location``) and the CUDA RNG state, the
agent's workers per GPU, the Ray actuator's GPUs per node, and ``benchmarks/gpu_check.py``
skipping its CUDA checks here."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from adaptrun.worker.distributed import backend_for, resolve_device
from adaptrun.worker.errors import AdaptrunError, DeviceConfigError
from adaptrun.worker.state import RNGState, decode, encode_snapshot, map_location
from workers import harness

pytestmark = pytest.mark.timeout(120)


def test_the_group_follows_the_device_and_an_explicit_backend_overrides_it():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda:0") == "cpu:gloo,cuda:nccl"
    assert backend_for("cuda:3") == "cpu:gloo,cuda:nccl"
    assert backend_for("cuda:1", "gloo") == "gloo"          # CUDA tensors over gloo: legal
    assert backend_for("cpu", "cpu:gloo,cuda:gloo") == "cpu:gloo,cuda:gloo"


def test_the_device_follows_the_job(monkeypatch):
    monkeypatch.delenv("ADAPTRUN_DEVICE", raising=False)
    assert resolve_device(None, 0, gpus=0) == "cpu"
    assert resolve_device(None, 1, gpus=2) == "cuda:1"      # LOCAL_RANK i: the i-th visible GPU
    assert resolve_device("cuda", 1, gpus=2) == "cuda:1"
    assert resolve_device("cuda:0", 1, gpus=2) == "cuda:0"
    assert resolve_device("cpu", 1, gpus=2) == "cpu"
    monkeypatch.setenv("ADAPTRUN_DEVICE", "cpu")
    assert resolve_device(None, 3, gpus=2) == "cpu"
    assert resolve_device("cuda", 1, gpus=2) == "cuda:1"    # device= before ADAPTRUN_DEVICE
    monkeypatch.setenv("ADAPTRUN_DEVICE", "cuda")
    assert resolve_device(None, 1, gpus=2) == "cuda:1"


@pytest.mark.parametrize("device, local_rank, gpus, env", [
    (None, 2, 2, None),          # a third worker on a node with two GPUs
    (None, 0, 0, "cuda"),        # ADAPTRUN_DEVICE=cuda on a host without one
    ("cuda:1", 0, 1, None),
])
def test_a_gpu_that_is_not_visible_is_one_clear_error(monkeypatch, device, local_rank, gpus,
                                                      env):
    monkeypatch.delenv("ADAPTRUN_DEVICE", raising=False)
    if env:
        monkeypatch.setenv("ADAPTRUN_DEVICE", env)
    with pytest.raises(DeviceConfigError) as info:
        resolve_device(device, local_rank, gpus=gpus)
    assert isinstance(info.value, AdaptrunError)
    text = str(info.value)
    assert "CUDA_VISIBLE_DEVICES" in text and "ADAPTRUN_DEVICE=cpu" in text, text
    assert ("--nproc-per-node" in text) == (gpus > 0), text
    with pytest.raises(DeviceConfigError, match="not a torch device"):
        resolve_device("gpu0", 0, gpus=1)


def test_a_world_of_one_alone_is_on_the_cpu_over_gloo():
    code = ("import adaptrun, torch.distributed as dist; w = adaptrun.init();"
            "print(w.device, w.backend, dist.get_backend())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=harness.base_env(), cwd=harness.REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", "gloo", "gloo"]


_TWO_RANKS = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    import adaptrun
    world = adaptrun.init(backend="cpu:gloo,cuda:gloo")
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = adaptrun.AdaptiveDataParallel(net, opt)
    data = torch.utils.data.TensorDataset(torch.randn(256, 4), torch.randn(256))
    loader = adaptrun.AdaptiveDataLoader(data, batch_size=32)
    for _ in adaptrun.remaining_epochs(1):
        for x, y in loader:
            loss = (model(x).squeeze(1) - y).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
    w = net.weight.detach().clone(); dist.all_reduce(w)
    same = torch.allclose(w / world.world_size, net.weight.detach())
    print(json.dumps({"backend": world.backend, "pg": str(dist.get_backend()),
                      "device": world.device, "step": model.step, "same": bool(same)}))
""")


def test_two_ranks_train_over_the_multi_backend_group(tmp_path):
    """The group string of a CUDA job, with gloo in both places: the state exchange, the
    per-step agreement and DDP's gradients all go through it."""
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    port = harness.free_port()
    procs, logs = [], []
    try:
        for rank in range(2):
            env = harness.base_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                   ADAPTRUN_SNAPSHOT_DIR=tmp_path / f"snap{rank}",
                                   ADAPTRUN_SNAPSHOT_EVERY=2)
            logs.append(tmp_path / f"rank{rank}.log")
            procs.append(harness.start([sys.executable, str(script)], env, logs[-1]))
        codes = harness.wait_all(procs, 90)
        assert codes == [0, 0], "\n".join(harness.tail(p) for p in logs)
    finally:
        for p in procs:
            harness.stop(p)
    for log in logs:
        row = json.loads(log.read_text().strip().splitlines()[-1])
        assert row == {"backend": "cpu:gloo,cuda:gloo", "pg": "cpu:gloo,cuda:gloo",
                       "device": "cpu", "step": 8, "same": True}, row


def _saved_as_if_on(location: str, snapshot: dict, monkeypatch) -> bytes:
    """``snapshot``'s bytes with every storage but the RNG's tagged as saved on
    ``location``: what a CUDA job writes, made on a host without CUDA."""
    rng = {t.untyped_storage().data_ptr() for t in [snapshot["states"]["rng"]["torch"]]}
    real = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag",
                        lambda s: "cpu" if s.data_ptr() in rng else location)
    try:
        return encode_snapshot(snapshot)
    finally:
        monkeypatch.setattr(torch.serialization, "location_tag", real)


def test_a_snapshot_saved_on_a_gpu_restores_on_the_cpu(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    snapshot = {"format": 1, "step": 7, "epoch": 0, "fingerprint": [],
                "states": {"model": net.state_dict(), "rng": {"torch": torch.get_rng_state()}}}
    data = _saved_as_if_on("cuda:1", snapshot, monkeypatch)
    if not torch.cuda.is_available():                 # what torch.load alone does with it
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(io.BytesIO(data), weights_only=False)
    for device in ("cpu", None):
        snap = decode(data, "test", device)
        for k, v in net.state_dict().items():
            restored = snap["states"]["model"][k]
            assert restored.device.type == "cpu" and torch.equal(restored, v), k
        assert torch.equal(snap["states"]["rng"]["torch"], torch.get_rng_state())
    # A CUDA job takes what was saved on the CPU (the RNG states) where it was.
    cpu_storage = torch.ones(2).untyped_storage()
    assert map_location("cuda:0")(cpu_storage, "cpu").device.type == "cpu"


def test_a_cuda_rng_state_restores_without_cuda():
    rng = RNGState()
    state = rng.state_dict()
    if not torch.cuda.is_available():
        assert "cuda" not in state
    expected = torch.rand(3)
    torch.rand(5)                                     # move on, then restore
    rng.load_state_dict({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 3})
    assert torch.equal(torch.rand(3), expected)


def test_nproc_per_node_gpu_is_one_worker_per_visible_gpu(monkeypatch):
    from adaptrun.agents.workers import check_gpus, resolve_nproc

    assert resolve_nproc("gpu", gpus=4) == 4
    assert resolve_nproc("3") == 3 and resolve_nproc(2) == 2
    with pytest.raises(DeviceConfigError, match="no visible GPUs"):
        resolve_nproc("gpu", gpus=0)
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="--nproc-per-node"):
            resolve_nproc(bad)
    monkeypatch.delenv("ADAPTRUN_DEVICE", raising=False)
    check_gpus(2, gpus=2)
    check_gpus(4, gpus=0)                             # no GPUs: the workers train on the CPU
    with pytest.raises(DeviceConfigError) as info:
        check_gpus(3, gpus=2)
    assert "--nproc-per-node 3" in str(info.value)
    assert "CUDA_VISIBLE_DEVICES" in str(info.value)
    monkeypatch.setenv("ADAPTRUN_DEVICE", "cpu")
    check_gpus(3, gpus=2)


@pytest.mark.parametrize("args, env, message", [
    (["--nproc-per-node", "gpu"], {}, "no visible GPUs"),
    (["--nproc-per-node", "0"], {}, "--nproc-per-node must be"),
    (["--nproc-per-node", "1"], {"ADAPTRUN_DEVICE": "cuda"}, "sees 0 GPU(s)"),
])
def test_the_agent_refuses_workers_without_gpus_in_one_line(monkeypatch, args, env, message):
    from click.testing import CliRunner

    from adaptrun.cli import cli
    if torch.cuda.is_available():
        pytest.skip("the host has GPUs")
    monkeypatch.delenv("ADAPTRUN_DEVICE", raising=False)
    result = CliRunner().invoke(cli, ["agent", "--job", "j", *args, "--", "python",
                                      str(harness.WORKER)], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_the_ray_actuator_holds_a_gpu_per_worker():
    from adaptrun.controller.actuators import ActuatorError
    from adaptrun.controller.actuators.ray import RayActuator

    with pytest.raises(ActuatorError, match="num_gpus_per_node 1 is fewer GPUs than the 2"):
        RayActuator(nproc_per_node=2, num_gpus_per_node=1)
    for nproc, gpus in [(2, 2), (2, 0), (1, 0.5), (2, 4)]:
        RayActuator(nproc_per_node=nproc, num_gpus_per_node=gpus).close()


def test_gpu_check_skips_its_cuda_checks_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("the host has CUDA: benchmarks/gpu_check.py runs its checks there")
    proc = subprocess.run([sys.executable, str(harness.REPO / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=60, env=harness.base_env(),
                          cwd=harness.REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIP ")]
    names = {line.split()[1] for line in skipped}
    assert names == {"gns-fp32", "gns-bf16", "gns-fp16", "oom-backoff", "snapshot-async",
                     "snapshot-sync", "overhead"}, proc.stdout
    assert all("no CUDA device" in line for line in skipped), proc.stdout
    assert f"skipped all {len(names)} CUDA checks" in proc.stdout


def test_local_agents_each_get_their_own_gpus_and_no_more_agents_than_gpus(tmp_path):
    """`adaptrun run` on a GPU machine: the local actuator gives each agent it starts the next
    free GPUs in CUDA_VISIBLE_DEVICES (the ids are strings here: no GPU is touched), and an
    agent beyond them is one clear error."""
    import time
    from adaptrun.controller.actuators.base import ActuatorError
    from adaptrun.controller.actuators.local import LocalActuator
    from adaptrun.controller.local_run import RunConfig

    show = [sys.executable, "-c", "import os, time; print('GPUS=' + "
            "os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(60)"]
    act = LocalActuator(agent_command=show, nproc_per_node=1, log_dir=tmp_path,
                        gpus=["3", "5"], stop_grace_s=2)
    try:
        act.set_workers("j", 2)
        with pytest.raises(ActuatorError, match="lower --max-workers"):
            act.set_workers("j", 3)
        deadline = time.monotonic() + 30
        seen: set = set()
        while time.monotonic() < deadline and len(seen) < 2:
            seen = {line for f in tmp_path.glob("agent-*.log")
                    for line in f.read_text().split() if line.startswith("GPUS=")}
            time.sleep(0.1)
        assert seen == {"GPUS=3", "GPUS=5"}
        first = act.agents("j")[0][1]
        first.kill()                                 # its GPU is free again for the next
        first.wait(timeout=10)
        freed = "GPUS=" + next(line[5:] for line in (tmp_path / "agent-j-n0.log").read_text()
                               .split() if line.startswith("GPUS="))
        act.set_workers("j", 2)
        assert len([p for _, p in act.agents("j") if p.poll() is None]) == 2
        log = tmp_path / f"agent-{act.agents('j')[-1][0]}.log"
        while time.monotonic() < deadline and "GPUS=" not in log.read_text():
            time.sleep(0.1)
        assert freed in log.read_text().split()
    finally:
        act.close()
    with pytest.raises(ValueError, match="more than the 2 GPUs"):
        RunConfig(command=("python", "x.py"), max_workers=3, gpus=("0", "1")).validate()
