"""Asynchronous periodic snapshots (copy on the step, write on a thread) hold exactly the state
of their step, and a worker killed mid-write leaves a readable newest snapshot.

Each case runs ``train.py`` below in a fresh interpreter, alone (world of one, gloo), with
``ADAPTRUN_SNAPSHOT_DIR`` set so that snapshots are on. The script may wrap
``checkpoint.write`` (argv[1]):

- ``slow``: every background snapshot's serialization (``torch.save``) starts 0.3 s late, so the next
  steps run (and mutate the model and Adam's moments in place) before it reads the copy;
- ``stall``: the write of step ``STALL_STEP`` puts half its bytes in a temporary file, as a
  write cut short would, then hangs until the test kills the process with SIGKILL;
- ``plain``: no wrapping.

Every write that completes is also copied to ``<out>/archive`` (``finish`` clears the snapshot
directory at the end of a run). After each optimizer step that lands on a snapshot step the
script keeps its own clone of the model and the optimizer state (``expected.pt``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from workers import harness

TRAIN = textwrap.dedent('''
    import os, shutil, sys, time
    from pathlib import Path
    import torch, adaptrun
    from adaptrun.worker import checkpoint

    mode, out = sys.argv[1], Path(sys.argv[2])
    archive = out / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    original = checkpoint.write

    if mode == "slow":
        import adaptrun.worker.job as job
        save = job.save_snapshot

        def late_save(snapshot, f):
            time.sleep(0.3)           # the next steps mutate the model before torch.save
            return save(snapshot, f)
        job.save_snapshot = late_save

    def write(directory, step, data, keep=2):
        if mode == "stall" and step == int(os.environ["STALL_STEP"]):
            if callable(data):        # a background write streams into the file
                import io
                buf = io.BytesIO()
                data(buf)
                data = buf.getvalue()
            import tempfile
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".snapshot-", suffix=".tmp")
            os.write(fd, data[:len(data) // 2])
            os.fsync(fd)
            (out / "stalled").write_text(str(step))
            time.sleep(600)
        path = original(directory, step, data, keep)
        shutil.copy(path, archive / path.name)
        return path

    checkpoint.write = write
    adaptrun.init()
    print("restored", adaptrun.restored_step(), flush=True)
    import random, numpy
    torch.manual_seed(0); numpy.random.seed(0); random.seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    model = adaptrun.AdaptiveDataParallel(net, opt)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, generator=g), torch.randn(4, generator=g)) for _ in range(640)]
    loader = adaptrun.AdaptiveDataLoader(data, batch_size=16)
    every = int(os.environ["ADAPTRUN_SNAPSHOT_EVERY"])
    expected = {}
    for epoch in adaptrun.remaining_epochs(1):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            print("step", model.step, flush=True)
            if model.step % every == 0:
                expected[model.step] = {
                    "model": {k: v.clone() for k, v in net.state_dict().items()},
                    "optimizer": {i: {k: v.clone() for k, v in s.items()}
                                  for i, s in opt.state_dict()["state"].items()}}
    torch.save(expected, out / "expected.pt")
''')


def _env(tmp_path, **extra) -> dict:
    return harness.base_env(ADAPTRUN_SNAPSHOT_DIR=tmp_path / "snap", ADAPTRUN_SNAPSHOT_EVERY=5,
                            **extra)


def _train(tmp_path, mode: str, out: Path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    return subprocess.run([sys.executable, str(script), mode, str(out)],
                          env=_env(out, **env), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _same(a, b, where: str = "") -> None:
    """Equal nested snapshot values: tensors bit for bit, the rest by ==."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "shape"):          # numpy RNG state
        assert (a == b).all(), where
    else:
        assert a == b, where


# States whose value is a function of the training alone (no wall clock, no timings).
DETERMINISTIC = ("model", "optimizer", "adaptrun.sampler", "adaptrun.rng")


@pytest.mark.timeout(180)
def test_async_snapshot_holds_the_state_of_its_step(tmp_path):
    """A write in flight while the next steps mutate the model in place still saves the
    values of its own step: equal to the script's clone at that step, and bit for bit equal
    to a synchronous snapshot of the same step in a separate identical run."""
    a, s = tmp_path / "async", tmp_path / "sync"
    run_a = _train(tmp_path, "slow", a, ADAPTRUN_SNAPSHOT_ASYNC=1)
    assert run_a.returncode == 0, run_a.stderr[-3000:]
    run_s = _train(tmp_path, "plain", s, ADAPTRUN_SNAPSHOT_ASYNC=0)
    assert run_s.returncode == 0, run_s.stderr[-3000:]
    # 0.3 s writes, 5 steps apart: the due step waited for the write before it, and said so once
    assert run_a.stderr.count("was still running when the next one was due") == 1, run_a.stderr
    assert "raise ADAPTRUN_SNAPSHOT_EVERY" in run_a.stderr
    assert "was still running" not in run_s.stderr

    expected = _load(a / "expected.pt")
    snaps_a = {int(p.stem.split("-")[1]): p for p in (a / "archive").glob("snapshot-*.pt")}
    snaps_s = {int(p.stem.split("-")[1]): p for p in (s / "archive").glob("snapshot-*.pt")}
    steps = sorted(k for k in snaps_a if k > 0)
    # 640 / 16 = 40 steps; the last one's write (the epoch's end) is joined by finish()
    assert steps == list(range(5, 41, 5)), steps
    assert sorted(k for k in snaps_s if k > 0) == steps
    for step in steps:
        snap_a, snap_s = _load(snaps_a[step]), _load(snaps_s[step])
        assert snap_a["step"] == step
        _same(snap_a["states"]["model"], expected[step]["model"], f"model@{step}")
        for i, st in expected[step]["optimizer"].items():
            _same(snap_a["states"]["optimizer"]["state"][i], st, f"optimizer@{step}")
        for name in DETERMINISTIC:
            _same(snap_a["states"][name], snap_s["states"][name], f"{name}@{step}")
        # the model moved on after the copy: the snapshot is not a later state
        if step + 5 in expected:
            assert not torch.equal(snap_a["states"]["model"]["0.weight"],
                                   expected[step + 5]["model"]["0.weight"])


@pytest.mark.timeout(180)
def test_kill_mid_write_leaves_a_readable_newest_snapshot(tmp_path):
    """SIGKILL while the write of step 20 is half done (a temp file holding half its bytes):
    training went on meanwhile (the write is off the step); the newest snapshot on disk is step
    15's and loads; a restart cleans the temp file, restores step 15 and finishes the epoch."""
    from adaptrun.worker import checkpoint
    from adaptrun.worker.state import decode

    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    log = tmp_path / "log"
    proc = harness.start([sys.executable, str(script), "stall", str(tmp_path)],
                         _env(tmp_path, ADAPTRUN_SNAPSHOT_ASYNC=1, STALL_STEP=20), log)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "stalled").exists():
            assert proc.poll() is None and time.monotonic() < deadline, harness.tail(log)
            time.sleep(0.02)
        # Off the step: training continues up to the next due step (25), which waits.
        while "step 24\n" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, harness.tail(log)
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        harness.stop(proc)
    snap_dir = tmp_path / "snap"
    assert list(snap_dir.glob(".snapshot-*.tmp")), "the simulated half write is on disk"
    step, path = checkpoint.newest(snap_dir)
    assert step == 15
    assert decode(checkpoint.read(path), str(path))["step"] == 15

    again = subprocess.run([sys.executable, str(script), "plain", str(tmp_path)],
                           env=_env(tmp_path, ADAPTRUN_SNAPSHOT_ASYNC=1), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == "restored 15"
    assert "step 16" in again.stdout.splitlines()[1]
    assert not list(snap_dir.glob(".snapshot-*.tmp")), "the restart removed the stale temp file"


@pytest.mark.timeout(120)
def test_sigkill_at_a_random_moment_of_real_writes(tmp_path):
    """No simulation: a bigger model (~24 MB of Adam state), a snapshot every step, SIGKILL as
    soon as a temp file shows up (a write in flight), else after 60 steps; the newest snapshot
    loads either way."""
    from adaptrun.worker import checkpoint
    from adaptrun.worker.state import decode

    script = tmp_path / "big.py"
    script.write_text(textwrap.dedent('''
        import torch, adaptrun
        adaptrun.init()
        net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        model = adaptrun.AdaptiveDataParallel(net, opt)
        data = [(torch.randn(1024), torch.randn(1)) for _ in range(64)]
        loader = adaptrun.AdaptiveDataLoader(data, batch_size=8)
        for epoch in adaptrun.remaining_epochs(1000):
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                print("step", model.step, flush=True)
    '''))
    log = tmp_path / "log"
    snap_dir = tmp_path / "snap"
    proc = harness.start([sys.executable, str(script)],
                         harness.base_env(ADAPTRUN_SNAPSHOT_DIR=snap_dir,
                                          ADAPTRUN_SNAPSHOT_EVERY=1, ADAPTRUN_SNAPSHOT_ASYNC=1),
                         log)
    mid_write = False
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.newest(snap_dir) and list(snap_dir.glob(".snapshot-*.tmp")):
                mid_write = True
                break
            if "step 60\n" in log.read_text():
                break
            time.sleep(0.001)
        assert proc.poll() is None, harness.tail(log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        harness.stop(proc)
    step, path = checkpoint.newest(snap_dir)
    assert decode(checkpoint.read(path), str(path))["step"] == step
    print(f"\nkilled {'mid-write' if mid_write else 'between writes'}; newest snapshot: step "
          f"{step}, readable")
