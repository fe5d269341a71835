"""A plain elastic DDP script (no adaptrun): the baseline for the resize gaps.

The same least-squares problem and step pacing as ``tests/workers/lsq_worker.py`` (x ~ N(0, I),
per-example loss 0.5 (x.w - y)^2, SGD, ``--step-sleep`` after each step), written the way a
torchrun user would: ``init_process_group("gloo")`` from torchrun's environment, DDP, and its
own checkpoint: rank 0 ``torch.save``s {model, optimizer, step} every ``--ckpt-every`` steps
(temp file + rename) and every start loads the newest one. No SIGTERM handling: when torchrun
re-forms the group the workers are killed and the new world redoes the steps since the last
checkpoint (the "restored" field of the start line says from which step).

Each rank appends JSON lines to <out>/steps-<pid>.jsonl: a start line and one line per step
with ``world`` and the wall clock ``t`` (the same format as lsq_worker, so the same gap code reads
both).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch", type=int, default=24, help="global batch")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--ckpt", required=True, help="checkpoint file (shared by all nodes)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, args.dim, generator=g, dtype=torch.float64)
    y = torch.randn(args.samples, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(args.dim, 1, bias=False).double()
    torch.nn.init.constant_(model.weight, 1.0 / args.dim ** 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    step = 0
    restored = None
    if os.path.exists(args.ckpt):
        ck = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = restored = int(ck["step"])
    ddp = DistributedDataParallel(model)
    log = open(os.path.join(args.out, f"steps-{os.getpid()}.jsonl"), "a")
    log.write(json.dumps({"event": "start", "rank": rank, "world": world, "restored": restored,
                          "step": step, "t": time.time()}) + "\n")
    log.flush()
    local = max(1, args.batch // world)
    while step < args.max_steps:
        gs = torch.Generator().manual_seed(step)
        idx = torch.randperm(args.samples, generator=gs)[:local * world][rank::world]
        opt.zero_grad()
        loss = 0.5 * (ddp(x[idx]).squeeze(1) - y[idx]).pow(2).mean()
        loss.backward()
        opt.step()
        step += 1
        log.write(json.dumps({"event": "step", "rank": rank, "world": world, "step": step,
                              "loss": float(loss.detach()), "t": time.time()}) + "\n")
        log.flush()
        if rank == 0 and step % args.ckpt_every == 0:
            tmp = args.ckpt + f".tmp{os.getpid()}"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": step}, tmp)
            os.replace(tmp, args.ckpt)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    log.write(json.dumps({"event": "end", "rank": rank, "step": step}) + "\n")
    log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
