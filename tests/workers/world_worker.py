"""A worker that reads ``adaptrun.world()`` at every step, for the re-form contract test.

Each rank appends JSON lines to <out>/steps-<pid>.jsonl: ``{"event": "step", "step", "world",
"generation", "rank", "read_once", "t"}`` per committed step (``read_once``: the world size a
script that read it before the loop would still use), ``{"event": "reform", ...}`` from its
``adaptrun.on_reform`` callback, and once, at the first step of a world after a re-form this
process lived through, ``{"event": "stale", "error"}``: what using the process group it
captured at start raised.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import adaptrun


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    adaptrun.init()
    read_once = dist.get_world_size()          # what many scripts do: read once, keep forever
    captured = dist.group.WORLD                 # ... and keep the group
    start_generation = adaptrun.world().generation
    log = open(os.path.join(args.out, f"steps-{os.getpid()}.jsonl"), "a")

    def write(row: dict) -> None:
        log.write(json.dumps({**row, "pid": os.getpid(), "t": time.time()}) + "\n")
        log.flush()

    @adaptrun.on_reform
    def reformed(world):
        write({"event": "reform", "world": world.world_size, "rank": world.rank,
               "generation": world.generation})

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    model = adaptrun.AdaptiveDataParallel(net, opt)
    data = torch.utils.data.TensorDataset(torch.randn(args.samples, 4), torch.randn(args.samples))
    loader = adaptrun.AdaptiveDataLoader(data, batch_size=args.batch, shuffle=True)
    tried = False
    for _ in adaptrun.remaining_epochs(1):
        for x, y in loader:
            opt.zero_grad()
            (model(x).squeeze(-1) - y).pow(2).mean().backward()
            opt.step()
            world = adaptrun.world()
            write({"event": "step", "step": model.step, "world": world.world_size,
                   "generation": world.generation, "rank": world.rank, "read_once": read_once})
            if world.generation > start_generation and not tried:
                tried = True
                try:
                    dist.all_reduce(torch.zeros(1), group=captured)
                    write({"event": "stale", "error": ""})
                except adaptrun.StaleWorldError as exc:
                    write({"event": "stale", "error": str(exc)})
            time.sleep(args.step_sleep)
    log.close()


if __name__ == "__main__":
    main()
