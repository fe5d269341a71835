"""The local batch bounded by memory (``adaptrun.worker.memory``), on CPU under a memory cap.

The cap (``ADAPTRUN_MEMORY_LIMIT``) limits the worker's data size after ``init``
(``RLIMIT_DATA``): an allocation past it fails as on a full GPU. The job is asked for a local
batch that cannot fit; the probe runs out on every rank alike, the batch backs off into more
micro-batches, the reports carry the bound, and every example is still trained once per epoch.
"""
from __future__ import annotations

import json

import pytest
import torch

from adaptrun.worker.errors import DeviceConfigError
from adaptrun.worker.memory import HEADROOM, MemoryBound, agree, is_out_of_memory, parse_bytes
from workers import harness

MiB = 1 << 20


def test_sizes_parse_and_a_bad_one_says_what_to_give():
    assert parse_bytes("300M") == 300 * MiB
    assert parse_bytes("2G") == 2 << 30
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(DeviceConfigError, match="ADAPTRUN_MEMORY_LIMIT=2G"):
            parse_bytes(bad)


def test_what_counts_as_running_out():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_the_bound_backs_off_by_half_then_follows_the_measured_growth():
    b = MemoryBound()
    assert b.cap() is None and b.needs_probe(128)
    b.learn(128, True, 128 * 1000.0)              # 1000 bytes per example
    b.free = 10e6
    assert b.cap() == int(HEADROOM * 10e6 / 1000)  # the prediction
    b.learn(8192, False, 0.0)                       # ran out where the prediction said no
    assert b.failed == 8192 and b.fits == 128
    assert b.back_off(8192) == 4096 and b.cap() == 4096
    b.learn(4096, True, 4096 * 1500.0)             # fits, at more bytes per example
    assert b.trying == 0 and b.fits == 4096 and b.per_example == 1500.0
    assert b.cap() == max(4096, int(HEADROOM * 10e6 / 1500))
    assert not b.needs_probe(4096) and b.needs_probe(4097)
    restored = MemoryBound()
    restored.load_state_dict(b.state_dict())
    assert restored == b


def test_a_rank_without_inputs_has_no_say_and_one_that_ran_out_decides():
    assert agree(None, 0.0, None, 1) == (True, 0.0, -1.0)
    assert agree(False, 0.0, 5e6, 1) == (False, 0.0, 5e6)


@pytest.mark.timeout(120)
def test_a_local_batch_past_the_memory_cap_backs_off_on_every_rank_and_loses_nothing(tmp_path):
    """Two ranks under a 200 MiB cap each, asked at step 3 for a global batch of 8192 (a local
    batch of 4096, about 190 MiB of activations): the probe runs out on both, the batch stays
    8192 as more micro-batches of at most the bound, and each example counts once per epoch."""
    port = harness.free_port()
    args = ["--mode", "train", "--hidden", "2048", "--dim", "32", "--samples", "16384",
            "--batch", "256", "--grow-to", "8192", "--epochs", "2", "--lr", "0.01",
            "--out", str(tmp_path)]
    env = harness.base_env(ADAPTRUN_MEMORY_LIMIT="200M", ADAPTRUN_SNAPSHOT_DIR=tmp_path / "snap")
    log = tmp_path / "torchrun.log"
    proc = harness.start(harness.torchrun("1", 2, port, "mem", args), env, log)
    try:
        assert proc.wait(timeout=100) == 0, harness.tail(log)
    finally:
        harness.stop(proc)
    text = log.read_text()
    assert "a local batch of 4096 does not fit in the memory cap of 200.0 MiB" in text, text[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["counts"] == [[1] * 16384] * 2          # every example once per epoch
    rows = [r for r in harness.read_steps(tmp_path) if r.get("event") == "step"]
    grown = [r for r in rows if r["global_batch"] == 8192]
    assert grown, "the directive to 8192 never applied"
    for r in grown:
        assert 0 < r["local_batch"] <= r["local_batch_max"] < 4096, r
        assert r["accum"] >= 2, r
    by_step: dict = {}
    for r in rows:                                         # the same batch on both ranks
        by_step.setdefault(r["step"], set()).add((r["global_batch"], r["accum"]))
    assert all(len(v) == 1 for v in by_step.values()), by_step
    assert {r["rank"] for r in grown} == {0, 1}
