"""Per-step cost of AdaptiveDataParallel vs plain DDP, interleaved in the same processes.

Run by ``benchmarks/overhead.py`` under ``torchrun --nnodes=1 --nproc-per-node=2`` (gloo,
127.0.0.1). Both sides train identical copies of one MLP (4 Linear layers, ~3.2M parameters,
so the gradient all-reduce matters) on the same synthetic dataset, over the same process group:

* adaptive: ``adaptrun.AdaptiveDataParallel(model, opt, scaling_rule=LinearScale(...))`` fed by
  ``adaptrun.AdaptiveDataLoader`` (the user-visible API, library defaults: report every 10
  steps, snapshot every ``ADAPTRUN_SNAPSHOT_EVERY`` (default 50) steps, directive polling);
* plain: ``torch.nn.parallel.DistributedDataParallel`` fed by ``DistributedSampler`` +
  ``DataLoader`` (num_workers=0, same ``__getitems__`` and identity collate).

One "step" = one optimizer step: fetching its micro-batch(es), forward, backward, step. With
``--accum 1`` each step has 2 micro-batches per rank (adaptive: ``accum_steps=1`` set by a
directive written to the job's store before timing; plain: ``no_sync`` on the first micro-batch).
The global batch per step is the same on both sides. Sides alternate in blocks of ``--block``
steps (the side that goes first alternates too), so machine noise hits both alike. Rank 0 times
each step with ``perf_counter`` and writes the lists to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import adaptrun
import adaptrun.science.scaling
from adaptrun.worker.directive import Directive, write_directive
from adaptrun.worker.distributed import job_store

DIM, CLASSES = 1024, 16


class Synthetic:
    """x ~ N(0, 1) [N, DIM] float32, y in [0, CLASSES); batched reads by ``__getitems__``."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx):
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.x[t], self.y[t]


def identity(batch):
    return batch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, DIM), torch.nn.ReLU(),
        torch.nn.Linear(DIM, DIM), torch.nn.ReLU(),
        torch.nn.Linear(DIM, DIM), torch.nn.ReLU(),
        torch.nn.Linear(DIM, CLASSES))


def make_opt(params, name: str, lr: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr * 0.01)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--opt", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--accum", type=int, default=0, help="extra micro-batches per step")
    p.add_argument("--batch", type=int, default=64, help="global batch per optimizer step")
    p.add_argument("--steps", type=int, default=200, help="timed steps per side")
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side first")
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--out", default="")
    args = p.parse_args()

    world = adaptrun.init()
    w, rank = world.world_size, world.rank
    micro = args.accum + 1
    assert args.batch % (w * micro) == 0, "batch must split evenly over ranks and micro-batches"
    data = Synthetic(args.samples)
    base = make_model()

    # ---- adaptive side: the user-visible API ----
    a_model = copy.deepcopy(base)
    a_opt = make_opt(a_model.parameters(), args.opt, 0.05)
    a_ddp = adaptrun.AdaptiveDataParallel(
        a_model, a_opt, scaling_rule=adaptrun.science.scaling.LinearScale(warmup_steps=10))
    a_loader = adaptrun.AdaptiveDataLoader(data, batch_size=args.batch, shuffle=True,
                                           collate_fn=identity)
    a_loader.autoscale_batch_size(args.batch, accumulation=True)
    if args.accum and rank == 0:
        write_directive(job_store(), Directive(generation=1, global_batch=args.batch,
                                               accum_steps=args.accum, reason="benchmark"))

    def a_batches():
        for _epoch in adaptrun.remaining_epochs(10 ** 9):
            yield from a_loader

    a_it = a_batches()

    # ---- plain side: torch DDP, DistributedSampler, DataLoader ----
    p_model = copy.deepcopy(base)
    p_ddp = DistributedDataParallel(p_model)
    p_opt = make_opt(p_model.parameters(), args.opt, 0.05)
    sampler = DistributedSampler(data, num_replicas=w, rank=rank, shuffle=True, seed=0)
    p_loader = DataLoader(data, batch_size=args.batch // (w * micro), sampler=sampler,
                          collate_fn=identity, num_workers=0, drop_last=True)

    def p_batches():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from p_loader

    p_it = p_batches()
    loss_fn = torch.nn.CrossEntropyLoss()

    def adaptive_step() -> float:
        t0 = time.perf_counter()
        while True:
            x, y = next(a_it)
            a_opt.zero_grad()
            loss = loss_fn(a_ddp(x), y)
            loss.backward()
            end = a_loader.is_step_end
            a_opt.step()
            if end:
                return time.perf_counter() - t0

    def plain_step() -> float:
        t0 = time.perf_counter()
        p_opt.zero_grad()
        for k in range(micro):
            x, y = next(p_it)
            if k < micro - 1:
                with p_ddp.no_sync():
                    (loss_fn(p_ddp(x), y) / micro).backward()
            else:
                (loss_fn(p_ddp(x), y) / micro).backward()
        p_opt.step()
        return time.perf_counter() - t0

    # Warm up both; for --accum wait (in steps) until the directive has taken effect.
    for _ in range(args.warmup):
        adaptive_step()
        plain_step()
    guard = 0
    while a_loader.accumulation_steps != args.accum:
        adaptive_step()
        plain_step()
        guard += 1
        if guard > 500:
            raise RuntimeError("the accumulation directive never took effect")
    assert a_loader.accumulation_steps == args.accum

    times = {"adaptive": [], "plain": []}
    sides = [("adaptive", adaptive_step), ("plain", plain_step)]
    blocks = -(-args.steps // args.block)
    for b in range(blocks):
        order = sides if b % 2 == 0 else sides[::-1]
        for name, fn in order:
            for _ in range(args.block):
                times[name].append(fn())
    dist.barrier()
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"opt": args.opt, "accum": args.accum, "batch": args.batch, "world": w,
                       "params": sum(p.numel() for p in base.parameters()),
                       "adaptive_accum_steps": a_loader.accumulation_steps,
                       "noise_scale": a_ddp.noise_scale, "times": times}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
