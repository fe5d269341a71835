"""A worker with real-sized state for the resize tests: an MLP of ``--params`` parameters under
Adam (parameters + two Adam moments: 12 bytes per parameter), fixed batch (no
``autoscale_batch_size``), one epoch over a synthetic regression set.

Every rank appends one JSON line per committed step to <out>/steps-<pid>.jsonl
(``{"event": "step", "step", "world", "t"}``), and ``start``/``end`` events, so a test can read
the global steps each world ran and the gap between the last step of one world and the first of
the next. ``--step-sleep`` pads each step (seconds) so the step takes about as long as a real one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

import adaptrun


class Data:
    def __init__(self, n: int, dim: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x[:, :1].clone()

    def __len__(self):
        return len(self.x)

    def __getitems__(self, idx):
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.x[t], self.y[t]


def build(params: int, dim: int) -> torch.nn.Module:
    # dim -> h -> h -> 1 with h chosen so the weights hold about ``params`` numbers.
    h = int((-(dim + 1) + math.sqrt((dim + 1) ** 2 + 4 * params)) / 2)
    return torch.nn.Sequential(torch.nn.Linear(dim, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                               torch.nn.ReLU(), torch.nn.Linear(h, 1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", type=float, default=20e6)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--samples", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    world = adaptrun.init()
    torch.manual_seed(0)
    net = build(int(args.params), args.dim)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    model = adaptrun.AdaptiveDataParallel(net, opt, scaling_rule=adaptrun.scaling.NoScale(),
                                          report_every_steps=2)
    loader = adaptrun.AdaptiveDataLoader(Data(args.samples, args.dim), batch_size=args.batch,
                                         collate_fn=lambda b: b)
    log = open(os.path.join(args.out, f"steps-{os.getpid()}.jsonl"), "a") if args.out else None

    def event(**kw):
        if log:
            log.write(json.dumps(dict(kw, rank=world.rank, world=world.world_size,
                                      t=time.time())) + "\n")
            log.flush()
    event(event="start", step=model.step, restored=adaptrun.restored_step())
    for _epoch in adaptrun.remaining_epochs(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            model.record_loss(loss)
            if args.step_sleep:
                time.sleep(args.step_sleep)
            event(event="step", step=model.step, global_batch=loader.current_batch_size)
    event(event="end", step=model.step)
    if world.world_size > 1:
        dist.barrier()


if __name__ == "__main__":
    main()
