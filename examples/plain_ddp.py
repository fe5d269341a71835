"""A plain torch DDP training script, no adaptrun: what a script looks like before wrapping,
and proof that an unmodified script still runs alone, under torchrun and under adaptrun's
agent (without adaptivity).

``init_process_group("gloo")`` from the launcher's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); with no launcher a world of one over an in-process store. A
``DistributedSampler`` shards a synthetic classification set (two Gaussian blobs per class,
seeded, no download), DDP averages the gradients, SGD trains a small MLP. Rank 0 prints the
mean training loss of the last epoch over all ranks as ``final train_loss X`` and ``steps N``.

    python examples/plain_ddp.py
    torchrun --nproc-per-node 2 examples/plain_ddp.py
    adaptrun run --min-workers 1 --max-workers 2 -- python examples/plain_ddp.py
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def synthetic(n: int, dim: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * 2, dim, generator=g)
    blob = torch.randint(0, classes * 2, (n,), generator=g)
    x = centers[blob] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, blob % classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8000)
    args = p.parse_args()
    torch.set_num_threads(1)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # torchrun or an agent
        dist.init_process_group("gloo")
    else:                                                        # alone: a world of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()

    torch.manual_seed(args.seed)                 # the same initial weights on every rank
    dataset = synthetic(args.samples, dim=16, classes=4, seed=args.seed)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.ReLU(),
                                                  nn.Linear(64, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    steps, total = 0, torch.zeros(2)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2)                   # this epoch's loss sum, examples
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            total += torch.tensor([loss.item() * len(y), len(y)])
    dist.all_reduce(total)
    if rank == 0:
        print(f"final train_loss {total[0].item() / total[1].item():.4f}")
        print(f"steps {steps}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
