"""Fuzz what a user controls in the worker library: batch sizes and bounds, datasets, and the
snapshot files a job restores from.

One process, a world of one (``adaptrun.init()`` alone builds it); each case gets a fresh job
context (``job.on_world_formed``), as a new ``python train.py`` would. Every input must either
work (and then an epoch visits every example exactly once) or end in one adaptrun error
(``BatchConfigError``, ``SnapshotMismatchError``, ``SnapshotCorruptError``) whose message says
what to do; never another exception. A damaged newest snapshot (truncated, random bytes,
flipped bytes) must give way to the previous good one (set aside as ``*.corrupt``), and when
no readable one is left the job must refuse to start afresh: nothing committed is lost.

CI runs a few hundred cases (a few seconds). A long run:

    ADAPTRUN_FUZZ_EXAMPLES=20000 timeout 3600 pytest -q tests/test_fuzz_worker_inputs.py -p no:timeout
"""
from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import adaptrun
from adaptrun.worker import checkpoint, distributed, job
from adaptrun.worker.errors import (BatchConfigError, SnapshotCorruptError,
                                    SnapshotMismatchError)

EXAMPLES = int(os.environ.get("ADAPTRUN_FUZZ_EXAMPLES", "0")) or None
SETTINGS = dict(deadline=None, derandomize=EXAMPLES is None, database=None,
                suppress_health_check=list(HealthCheck))
ENV = ("ADAPTRUN_SNAPSHOT_DIR", "ADAPTRUN_CHECKPOINT_DIR", "ADAPTRUN_SNAPSHOT_EVERY",
       "ADAPTRUN_COMMITTED_STEP", "RANK", "WORLD_SIZE", "MASTER_ADDR")


@pytest.fixture(scope="module")
def world():
    saved = {k: os.environ.pop(k) for k in ENV if k in os.environ}
    adaptrun.init()
    try:
        yield distributed.world()
    finally:
        distributed.shutdown()
        job._job = None
        for k in ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _fresh_job(snapshot_dir: Path | None = None) -> job.Job:
    """A new job context, as a new run of the script: snapshots on only with a directory."""
    for k in ENV:
        os.environ.pop(k, None)
    if snapshot_dir is not None:
        os.environ["ADAPTRUN_SNAPSHOT_DIR"] = str(snapshot_dir)
        os.environ["ADAPTRUN_SNAPSHOT_EVERY"] = "1"
    try:
        return job.on_world_formed(distributed.world())
    finally:
        for k in ENV:
            os.environ.pop(k, None)


def _clear(exc: Exception) -> None:
    msg = str(exc)
    assert msg and len(msg) > 20, repr(exc)
    assert any(w in msg for w in ("use ", "give ", "lower ", "delete ", "wrap ", "restore ",
                                  "must ")), msg


# -- batch sizes, bounds and datasets --------------------------------------------------
class NoLen:
    def __getitem__(self, i):
        return i


def _sizes():
    return st.one_of(st.integers(-3, 40), st.sampled_from([0, 1 << 53, (1 << 53) + 1, 10**30]),
                     st.sampled_from([None, "4", 2.5, 4.0, math.nan, math.inf, -math.inf,
                                      True, [4]]))


_bounds = st.one_of(st.none(), st.tuples(_sizes(), _sizes()),
                    st.lists(st.integers(-2, 20), max_size=3).map(tuple), st.just("1,4"))


@pytest.mark.timeout(120)
def test_batch_sizes_bounds_and_datasets(world):
    @settings(max_examples=EXAMPLES or 300, **SETTINGS)
    @given(n=st.one_of(st.integers(0, 40), st.just(None)), batch_size=_sizes(),
           drop_last=st.booleans(), shuffle=st.booleans(),
           autoscale=st.one_of(st.none(), st.tuples(_sizes(), _bounds, st.booleans())))
    def case(n, batch_size, drop_last, shuffle, autoscale):
        _fresh_job()
        data = NoLen() if n is None else list(range(n))
        try:
            loader = adaptrun.AdaptiveDataLoader(data, batch_size=batch_size, shuffle=shuffle,
                                                 drop_last=drop_last)
            if autoscale is not None:
                loader.autoscale_batch_size(autoscale[0], local_batch_bounds=autoscale[1],
                                            accumulation=autoscale[2])
        except BatchConfigError as exc:
            _clear(exc)
            return
        # Accepted: one epoch visits every example once (all but a dropped remainder).
        seen = []
        for _ in loader:
            seen.extend(int(i) for i in loader.current_indices)
        assert len(seen) == len(set(seen))
        b = loader.current_batch_size
        if drop_last:
            assert len(seen) == n - n % b if len(seen) else n < b
            assert len(seen) > 0
        else:
            assert sorted(seen) == list(range(n))

    case()


# -- snapshot files --------------------------------------------------------------------
def _model(width: int = 3):
    torch.manual_seed(0)
    m = torch.nn.Linear(width, 1)
    return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


@pytest.fixture(scope="module")
def good_snapshots(world, tmp_path_factory):
    """Snapshot files of a short run of a tiny model, oldest first (the newest two kept)."""
    d = tmp_path_factory.mktemp("snap")
    _fresh_job(d)
    m, opt = _model()
    model = adaptrun.AdaptiveDataParallel(m, opt)
    data = [(torch.randn(3), torch.randn(1)) for _ in range(8)]
    for x, y in adaptrun.AdaptiveDataLoader(data, batch_size=2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    job._job._join_writer()       # the last step's write (and its pruning) runs in the background
    files = checkpoint.list_all(d)
    assert len(files) == 2, files
    job._job.parallel = None
    return [(step, p.read_bytes()) for step, p in files]


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _other_model_snapshot() -> bytes:
    m, opt = _model(width=5)
    return _saved({"format": 1, "step": 99, "epoch": 0,
                   "fingerprint": [(k, tuple(v.shape)) for k, v in m.state_dict().items()],
                   "states": {"model": m.state_dict(), "optimizer": opt.state_dict()}})


@st.composite
def _damage(draw, data: bytes):
    kind = draw(st.sampled_from(["truncate", "random", "flip", "empty", "garbage_tail",
                                 "other_version", "not_a_dict", "missing_keys",
                                 "other_model", "wrong_types"]))
    if kind == "truncate":
        return kind, data[:draw(st.integers(0, len(data) - 1))]
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=4096))
    if kind == "flip":
        b = bytearray(data)
        for i, v in draw(st.lists(st.tuples(st.integers(0, len(b) - 1), st.integers(0, 255)),
                                  min_size=1, max_size=8)):
            b[i] = v
        return kind, bytes(b)
    if kind == "empty":
        return kind, b""
    if kind == "garbage_tail":
        return kind, data + draw(st.binary(min_size=1, max_size=64))
    if kind == "other_version":
        return kind, _saved({"format": draw(st.sampled_from([0, 2, "1", None])), "step": 9})
    if kind == "not_a_dict":
        return kind, _saved(draw(st.sampled_from([[1, 2], "snapshot", None, 3.0])))
    if kind == "missing_keys":
        return kind, _saved({"format": 1, "step": 9})
    if kind == "other_model":
        return kind, _other_model_snapshot()
    return kind, _saved({"format": 1, "step": "9", "epoch": None, "fingerprint": 3,
                         "states": []})


@pytest.mark.timeout(120)
def test_damaged_snapshots(world, good_snapshots):
    (old_step, old), (new_step, new) = good_snapshots

    @settings(max_examples=EXAMPLES or 150, **SETTINGS)
    @given(damage_new=_damage(new), damage_old=st.one_of(st.none(), _damage(old)))
    def case(damage_new, damage_old):
        d = Path(tempfile.mkdtemp(prefix="adaptrun-fuzz-"))
        try:
            (d / f"snapshot-{old_step:012d}.pt").write_bytes(
                old if damage_old is None else damage_old[1])
            (d / f"snapshot-{new_step:012d}.pt").write_bytes(damage_new[1])
            try:
                j = _fresh_job(d)
                m, opt = _model()
                j.registry.register("model", m)
                j.registry.register("optimizer", opt)
            except (SnapshotMismatchError, SnapshotCorruptError) as exc:
                _clear(exc)
                # Refused: the files that do not load were set aside, nothing deleted.
                assert len(list(d.iterdir())) == 2
                if isinstance(exc, SnapshotCorruptError):
                    assert "unreadable" in str(exc) and "from step 0" in str(exc)
                return
            # Restored: the newest snapshot that loads, never an older one, never none.
            assert j.restored_step in (old_step, new_step)
            if j.restored_step == old_step:
                assert (d / f"snapshot-{new_step:012d}.pt.corrupt").exists()
            else:
                assert not list(d.glob("*.corrupt"))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    case()


@pytest.mark.timeout(60)
def test_truncated_newest_falls_back_and_training_goes_on(world, good_snapshots, tmp_path):
    """The case a crash mid-write (without fsync) leaves: the step before is restored, and
    the next snapshots are written over the bad one."""
    (old_step, old), (new_step, new) = good_snapshots
    (tmp_path / f"snapshot-{old_step:012d}.pt").write_bytes(old)
    (tmp_path / f"snapshot-{new_step:012d}.pt").write_bytes(new[:len(new) // 2])
    j = _fresh_job(tmp_path)
    assert j.restored_step == old_step
    m, opt = _model()
    j.registry.register("model", m)
    j.registry.register("optimizer", opt)
    assert (tmp_path / f"snapshot-{new_step:012d}.pt.corrupt").exists()
    assert checkpoint.newest(tmp_path)[0] == old_step
    # Every snapshot unreadable: refused, not a silent start from step 0.
    (tmp_path / f"snapshot-{old_step:012d}.pt").write_bytes(b"")
    with pytest.raises(SnapshotCorruptError, match="will not train the job again from step 0"):
        _fresh_job(tmp_path)
