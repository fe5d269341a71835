"""The in-process re-form contract (``adaptrun.worker.contract``), end to end: a script under
`adaptrun run`, driven 1 -> 2 -> 1 by `adaptrun scale`, reads ``adaptrun.world()`` at every
step and sees each world; its ``on_reform`` callback runs at each re-form; the process group it
captured before the first re-form raises ``StaleWorldError`` naming ``adaptrun.world()``."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from workers import harness

WORKER = harness.REPO / "tests" / "workers" / "world_worker.py"


def _scale(ctl: str, n: int) -> None:
    proc = subprocess.run([sys.executable, "-m", "adaptrun.cli", "scale", "world",
                           "--min-workers", str(n), "--max-workers", str(n), "--controller", ctl],
                          capture_output=True, text=True, timeout=30, env=harness.base_env(),
                          cwd=harness.REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(240)
def test_a_script_reading_adaptrun_world_sees_one_two_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    port = harness.free_port()
    cmd = harness.adaptrun_run("world", port, tmp_path, [str(WORKER), "--out", str(out)])
    proc = harness.start(cmd, harness.base_env(), tmp_path / "run.log")
    ctl = f"127.0.0.1:{port}"
    try:
        harness.wait_steps(out, lambda r: r["world"] == 1, 5, 120, [proc])
        t_up = time.time()
        _scale(ctl, 2)
        harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t_up, 6, 120, [proc])
        t_down = time.time()
        _scale(ctl, 1)
        harness.wait_steps(out, lambda r: r["world"] == 1 and r["t"] > t_down, 3, 120, [proc])
    finally:
        harness.stop(proc, signal.SIGTERM)
    rows = sorted(harness.read_steps(out), key=lambda r: r["t"])
    steps = [r for r in rows if r["event"] == "step" and r["rank"] == 0]
    sizes = [r["world"] for r in steps]
    runs = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert runs == [1, 2, 1], runs                       # each world, in order
    gens = [r["generation"] for r in steps]
    assert gens == sorted(gens) and len(set(gens)) == 3, set(gens)
    first = next(r["pid"] for r in rows if r["event"] == "step")
    lived = [r for r in rows if r["event"] == "step" and r["pid"] == first]
    assert {r["world"] for r in lived} == {1, 2}          # the first process saw both worlds
    assert {r["read_once"] for r in lived} == {1}         # where reading once stays at 1
    reforms = [r for r in rows if r["event"] == "reform"]
    assert [r["world"] for r in reforms if r["rank"] == 0][:2] == [2, 1], reforms
    stale = [r for r in rows if r["event"] == "stale"]
    assert stale and all("adaptrun.world()" in r["error"] for r in stale), stale
