"""Planned resizes with real-sized state: adaptrun's in-process re-form beside one copy of the
state, measured side by side in one run.

The job: tests/workers/big_worker.py (an MLP of ``--params`` parameters under Adam, fixed
batch 8: parameters + two Adam moments = 12 bytes per parameter per rank), under
``adaptrun run``, driven 1 -> 2 -> 1 workers by ``adaptrun scale``. The gap of a resize is the
wall time from the last step of the old world to the first step of the new one, less one step
of the new world (rank 0's step log). Beside it, in the same run: one copy of the same number
of bytes from one process to another over gloo on 127.0.0.1 (a broadcast), which is what the
state hand-off to a joiner costs at least.

    python benchmarks/resize_big_state.py [--params 40e6] [--repeats 1]

Prints the gaps, the copy time and their ratios.
"""
from __future__ import annotations

import argparse
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

COPY = r"""
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
rank, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
t = torch.ones(n, dtype=torch.float32) if rank == 0 else torch.empty(n, dtype=torch.float32)
dist.barrier()
t0 = time.perf_counter()
dist.broadcast(t, src=0)
dist.barrier()
if rank == 1:
    print(time.perf_counter() - t0)
dist.destroy_process_group()
"""


def one_copy_s(numbers: int) -> float:
    port = harness.free_port()
    procs = [subprocess.Popen([sys.executable, "-c", COPY, str(r), str(port), str(numbers)],
                              stdout=subprocess.PIPE, text=True, env=harness.base_env())
             for r in (0, 1)]
    out = [p.communicate(timeout=120)[0] for p in procs]
    return float(out[1].strip())


def resize_once(tmp: Path, params: str) -> tuple[float, float]:
    out = tmp / "out"
    out.mkdir(parents=True)
    port = harness.free_port()
    cmd = [sys.executable, "-m", "adaptrun.cli", "run", "--job", "big", "--min-workers", "1",
           "--max-workers", "1", "--port", str(port), "--policy-interval-s", "1",
           "--log-dir", str(tmp / "logs"), "--plot", "", "--no-progress", "--",
           sys.executable, str(BIG), "--params", params, "--samples", "400", "--out", str(out)]
    proc = harness.start(cmd, harness.base_env(), tmp / "run.log")

    def scale(n):
        subprocess.run([sys.executable, "-m", "adaptrun.cli", "scale", "big", "--min-workers",
                        str(n), "--max-workers", str(n), "--controller", f"127.0.0.1:{port}"],
                       check=True, capture_output=True, timeout=30, env=harness.base_env())
    try:
        harness.wait_steps(out, lambda r: r["world"] == 1, 4, 180, [proc])
        t_up = time.time()
        scale(2)
        harness.wait_steps(out, lambda r: r["world"] == 2 and r["t"] > t_up, 4, 180, [proc])
        t_down = time.time()
        scale(1)
        harness.wait_steps(out, lambda r: r["world"] == 1 and r["t"] > t_down, 4, 180, [proc])
    finally:
        harness.stop(proc)
    rows = sorted((r for r in harness.read_steps(out) if r["event"] == "step" and r["rank"] == 0),
                  key=lambda r: r["t"])

    def step_of(world):
        ts = [r["t"] for r in rows if r["world"] == world]
        return statistics.median(b - a for a, b in zip(ts, ts[1:]))
    return (harness.gap_s(rows, 1, 2) - step_of(2), harness.gap_s(rows, 2, 1) - step_of(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="40e6")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    numbers = int(float(args.params)) * 3            # parameters + two Adam moments
    ups, downs, copies = [], [], []
    for i in range(args.repeats):
        copies.append(one_copy_s(numbers))
        with tempfile.TemporaryDirectory() as d:
            up, down = resize_once(Path(d), args.params)
        ups.append(up)
        downs.append(down)
        copies.append(one_copy_s(numbers))
    copy = statistics.median(copies)
    mb = numbers * 4 / 1e6
    print(f"state: {float(args.params) / 1e6:.0f} M parameters under Adam = {mb:.0f} MB per rank")
    print(f"one copy of it over gloo (broadcast, 2 processes): {copy:.2f} s")
    print(f"{'resize':<22}{'gap less one step':>20}{'/ one copy':>12}")
    for name, xs in (("planned 1 -> 2", ups), ("planned 2 -> 1", downs)):
        g = statistics.median(xs)
        print(f"{name:<22}{g:>18.2f} s{g / copy:>12.1f}")


if __name__ == "__main__":
    main()
