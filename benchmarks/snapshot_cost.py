"""What periodic snapshots cost a step: off, synchronous and asynchronous, every 5 and 20 steps.

    python benchmarks/snapshot_cost.py                  # ~2-3 min on a 2-core machine
    python benchmarks/snapshot_cost.py --rounds 40 --threads 1

One process, a world of one (gloo), ``ADAPTRUN_SNAPSHOT_DIR`` in a temp dir on the local disk.
It trains the MLP of ``benchmarks/workers/step_worker.py`` (3 x Linear(1024,1024) +
Linear(1024,16), 3.16M parameters) with Adam through AdaptiveDataParallel +
AdaptiveDataLoader: 12.6 MB of parameters and 25 MB of Adam moments, so each snapshot is
~38 MB. Five modes alternate in blocks of 20 steps in the same process (the order rotates
every round, so drift and the epoch boundary hit every mode alike):

- ``off``: no snapshots;
- ``sync/N``: ``ADAPTRUN_SNAPSHOT_ASYNC=0``, a snapshot every N steps (encode + write on the step);
- ``async/N``: the default, every N steps (a detached copy on the step; ``torch.save`` and the
  write on a background thread).

A block starts at a step boundary whose step is a multiple of 20, so it holds 4 snapshots at
N=5 and 1 at N=20; it ends when its 20th step returns *and* the write it started has finished
(the join is inside the timed block, so an asynchronous write is charged to its own mode).
Printed per mode: the median over blocks of the block's mean step time, and its ratio to
``off`` (the cost of snapshotting every N steps); the median step time of the steps that carry
a snapshot at their boundary (what one snapshot does to one step); the plain per-step median.
Printed, not asserted; the machine is shared, so read the ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "workers"))

BLOCK = 20
MODES = [("off", 0, False), ("sync/5", 5, False), ("async/5", 5, True),
         ("sync/20", 20, False), ("async/20", 20, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30,
                    help=f"rounds; each runs one block of {BLOCK} steps per mode")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--dir", default=None, help="snapshot directory (default: a temp dir)")
    args = ap.parse_args()

    snap_dir = Path(args.dir or tempfile.mkdtemp(prefix="adaptrun-snapcost-"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "ADAPTRUN_CHECKPOINT_DIR"):
        os.environ.pop(k, None)
    os.environ["ADAPTRUN_SNAPSHOT_DIR"] = str(snap_dir)

    import torch
    import adaptrun
    from adaptrun.worker import job as jobmod
    from step_worker import Synthetic, identity, make_model

    torch.set_num_threads(args.threads)
    adaptrun.init()
    job = jobmod.current()
    net = make_model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    model = adaptrun.AdaptiveDataParallel(net, opt)
    loader = adaptrun.AdaptiveDataLoader(Synthetic(6 * BLOCK * args.batch), batch_size=args.batch,
                                         collate_fn=identity)
    state_mb = sum(t.numel() * t.element_size() for t in net.state_dict().values()) * 3 / 1e6

    total_blocks = args.rounds * len(MODES)
    schedule = [MODES[(r + i) % len(MODES)] for r in range(args.rounds)
                for i in range(len(MODES))]
    block_means: dict[str, list[float]] = {m[0]: [] for m in MODES}
    step_times: dict[str, list[float]] = {m[0]: [] for m in MODES}
    snap_steps: dict[str, list[float]] = {m[0]: [] for m in MODES}

    def set_mode(i: int) -> None:
        _, every, background = schedule[i]
        job.snapshot_every_steps, job.snapshot_async = every, background

    print(f"python {' '.join(sys.argv)}   (torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"{args.threads} torch thread(s), load avg {os.getloadavg()[0]:.1f})", flush=True)
    warmup = BLOCK                      # one untimed block of "off" first
    job.snapshot_every_steps = 0
    block, n_in_block, t_block = -1, 0, 0.0
    t_step = time.perf_counter()
    done = False
    t0 = time.monotonic()
    for _ in adaptrun.remaining_epochs(10 ** 6):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            now = time.perf_counter()
            step = model.step
            if block >= 0:
                name, every, _ = schedule[block]
                dt = now - t_step
                step_times[name].append(dt)
                if every and (step - 1) % every == 0:
                    snap_steps[name].append(dt)   # its boundary took the snapshot of step-1
                n_in_block += 1
                if n_in_block == BLOCK:
                    job._join_writer()            # the block's last write counts in the block
                    block_means[name].append((time.perf_counter() - t_block) / BLOCK)
                    block, n_in_block = block + 1, 0
                    if block == total_blocks:
                        done = True
                        break
                    set_mode(block)
                    t_block = time.perf_counter()
            elif step >= warmup and step % BLOCK == 0:
                block, n_in_block = 0, 0
                set_mode(0)
                t_block = time.perf_counter()
            t_step = time.perf_counter()
        if done:
            break
    elapsed = time.monotonic() - t0
    job.snapshot_every_steps = 0
    job._join_writer()

    off = statistics.median(block_means["off"])
    print(f"\n## Snapshot cost per step: MLP {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
          f"params + Adam ({state_mb:.0f} MB of state per snapshot), batch {args.batch}, world 1, "
          f"{args.rounds} interleaved blocks of {BLOCK} steps per mode ({elapsed:.0f} s), "
          f"snapshots to {snap_dir}")
    hdr = (f"{'mode':<10} {'step (block mean, median)':>26} {'ratio to off':>12} "
           f"{'snapshot step, median':>22} {'per-step median':>16}")
    print(hdr)
    print("-" * len(hdr))
    for name, _, _ in MODES:
        bm = statistics.median(block_means[name])
        ss = f"{statistics.median(snap_steps[name]) * 1e3:.1f} ms" if snap_steps[name] else "-"
        print(f"{name:<10} {bm * 1e3:>23.2f} ms {bm / off:>12.3f} {ss:>22} "
              f"{statistics.median(step_times[name]) * 1e3:>13.2f} ms")
    print(f"(goal: async/N ratio <= 1.02; steps waited for a previous write: "
          f"{job.snapshot_wait_s:.2f} s in all)")
    if args.dir is None:
        shutil.rmtree(snap_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
