"""A user's mistakes with the worker library end in one clear message that says what to do.

Each case runs in a fresh interpreter (the process group and job context are per process),
alone (world of one), so the messages are the ones a user sees running ``python train.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from workers import harness


def _run(body: str, tmp_path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "case.py"
    script.write_text("import json, torch, adaptrun\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], env=harness.base_env(**env),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def _error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout
    last = out.stderr.strip().splitlines()[-1]
    return last.removeprefix("[rank0]: ")     # torch tags uncaught errors with the rank


@pytest.mark.timeout(60)
def test_loader_before_init(tmp_path):
    out = _run("adaptrun.AdaptiveDataLoader(list(range(10)), batch_size=2)\n", tmp_path)
    assert _error(out) == ("adaptrun.worker.errors.NotInitializedError: AdaptiveDataLoader needs the "
                           "process group: call adaptrun.init() first, at the top of the script")


@pytest.mark.timeout(60)
def test_batch_below_world_size_and_unfillable_local_bound(tmp_path):
    out = _run("""
        adaptrun.init()
        msgs = []
        loader = None
        def good():
            global loader
            loader = loader or adaptrun.AdaptiveDataLoader(list(range(10)), batch_size=4)
            return loader
        for make in (lambda: adaptrun.AdaptiveDataLoader(list(range(10)), batch_size=0),
                     lambda: good().autoscale_batch_size(8, local_batch_bounds=(32, 64)),
                     lambda: good().autoscale_batch_size(2)):
            try:
                make()
            except adaptrun.BatchConfigError as exc:
                msgs.append(str(exc))
        print(json.dumps(msgs))
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    below, bound, max_below = json.loads(out.stdout.strip().splitlines()[-1])
    assert below == ("batch_size=0 is below the world size 1: every rank needs at least one "
                     "example per step; use batch_size >= 1")
    assert bound == ("local_batch_bounds low=32 needs 32 examples per step on 1 ranks but the "
                     "dataset has 10; lower the bound or use more data")
    assert max_below == "max_batch_size=2 is below batch_size=4; give a max_batch_size >= batch_size"


@pytest.mark.timeout(90)
def test_snapshot_from_another_model(tmp_path):
    train = """
        import sys
        adaptrun.init()
        width = int(sys.argv[1]) if len(sys.argv) > 1 else 4
        model = torch.nn.Linear(width, 1)
        opt = (torch.optim.Adam(model.parameters(), lr=0.1) if "adam" in sys.argv
               else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        model = adaptrun.AdaptiveDataParallel(model, opt)
        data = [(torch.randn(width), torch.randn(1)) for _ in range(16)]
        loader = adaptrun.AdaptiveDataLoader(data, batch_size=4)
        for epoch in adaptrun.remaining_epochs(1):
            for x, y in loader:
                opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
                if model.step == 2:
                    raise SystemExit(3)     # die mid-epoch, after the snapshot of step 2
    """
    env = {"ADAPTRUN_SNAPSHOT_DIR": tmp_path / "snap", "ADAPTRUN_SNAPSHOT_EVERY": 2}
    assert _run(train, tmp_path, **env).returncode == 3
    assert list((tmp_path / "snap").glob("snapshot-*.pt"))
    (tmp_path / "case.py").write_text((tmp_path / "case.py").read_text())
    out = subprocess.run([sys.executable, str(tmp_path / "case.py"), "5"],
                         env=harness.base_env(**env), cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    last = _error(out)
    assert last.startswith("adaptrun.worker.errors.SnapshotMismatchError: the snapshot ")
    assert "belongs to another model" in last
    assert last.endswith("delete it or set ADAPTRUN_SNAPSHOT_DIR / ADAPTRUN_CHECKPOINT_DIR to "
                         "a fresh directory")
    # The same model with another optimizer: its state does not fit either.
    out = subprocess.run([sys.executable, str(tmp_path / "case.py"), "4", "adam"],
                         env=harness.base_env(**env), cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    last = _error(out)
    assert last.startswith("adaptrun.worker.errors.SnapshotMismatchError: the snapshot "), last
    assert "does not fit 'optimizer'" in last


@pytest.mark.timeout(60)
def test_register_state_needs_state_dict(tmp_path):
    out = _run("""
        adaptrun.init()
        adaptrun.register_state("counter", object())
    """, tmp_path)
    assert _error(out) == ("adaptrun.worker.errors.StateRegistryError: register_state('counter', ...): "
                           "the object needs state_dict() and load_state_dict(); wrap it in a "
                           "small class that has both")
