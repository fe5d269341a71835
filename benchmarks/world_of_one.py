"""A world of one: the same script alone beside under ``adaptrun run --max-workers 1``.

    python benchmarks/world_of_one.py                 # ~2 min on a 2-core machine
    python benchmarks/world_of_one.py --rounds 3 --params 3e6

The script is tests/workers/big_worker.py (an MLP of ``--params`` parameters under Adam, fixed
batch 64, one epoch of ``--samples`` examples, one torch thread). Alone: ``python
big_worker.py`` (``adaptrun.init()`` makes a world of one in the process; no snapshots, no
reports leave it). Under ``adaptrun run``: the embedded controller, one agent, the worker
with the library's defaults (a snapshot every 50 steps, asynchronous; a report every 10 steps
relayed to the controller). The two alternate ``--rounds`` times. Printed: the median step time
of each (rank 0's step lines, the first 5 steps of a run left out) and their ratio; the goal is
at most 1.05.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from workers import harness  # noqa: E402

BIG = ROOT / "tests" / "workers" / "big_worker.py"


def steps_of(out: Path) -> list[float]:
    """Rank 0's step times, the first 5 steps left out."""
    ts = sorted(r["t"] for r in harness.read_steps(out)
                if r.get("event") == "step" and r.get("rank") == 0)
    return [b - a for a, b in zip(ts[5:], ts[6:])]


def run(tmp: Path, under_adaptrun: bool, args) -> list[float]:
    out = tmp / f"out-{'run' if under_adaptrun else 'alone'}-{time.monotonic_ns()}"
    out.mkdir()
    script = [sys.executable, str(BIG), "--params", args.params, "--samples", str(args.samples),
              "--batch", "64", "--out", str(out)]
    env = harness.base_env()
    if under_adaptrun:
        cmd = [sys.executable, "-m", "adaptrun.cli", "run", "--job", "one", "--min-workers", "1",
               "--max-workers", "1", "--port", str(harness.free_port()), "--plot", "",
               "--no-progress", "--log-dir", str(out / "logs"), "--", *script]
    else:
        cmd = script
        env.pop("ADAPTRUN_SNAPSHOT_DIR", None)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return steps_of(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--params", default="3e6")
    ap.add_argument("--samples", type=int, default=9600)
    args = ap.parse_args()
    alone, under = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            for flag in ((False, True) if i % 2 == 0 else (True, False)):
                (under if flag else alone).extend(run(Path(d), flag, args))
    a, u = statistics.median(alone), statistics.median(under)
    print(f"python {' '.join(sys.argv)}  ({os.cpu_count()} cpus, load avg "
          f"{os.getloadavg()[0]:.2f})")
    print(f"big_worker {float(args.params) / 1e6:.0f} M parameters, Adam, batch 64: median step "
          f"alone {a * 1e3:.2f} ms ({len(alone)} steps), under adaptrun run "
          f"{u * 1e3:.2f} ms ({len(under)} steps): ratio {u / a:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
