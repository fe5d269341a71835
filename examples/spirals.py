"""Classify points of three interleaved spirals with an MLP: a small adaptrun training script.

Runs the same way alone (``python examples/spirals.py``), under torchrun (fixed or elastic),
and under ``adaptrun run`` / ``adaptrun agent``, where the controller changes its batch and
its worker count while it trains. The data is generated from a seed (no download), split
into a training and a held-out set; the script prints and (with ``--result``) writes the
held-out accuracy at the end.

    python examples/spirals.py --epochs 5
    adaptrun run --min-workers 1 --max-workers 3 -- python examples/spirals.py --epochs 5
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

import adaptrun
import adaptrun.science.scaling


class Spirals(torch.utils.data.Dataset):
    """``arms`` spirals with Gaussian jitter; item i is (features, label)."""

    def __init__(self, n: int, arms: int = 3, noise: float = 0.25, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        label = torch.randint(0, arms, (n,), generator=g)
        r = torch.rand(n, generator=g) * 4.0 + 0.2
        theta = r * 1.6 + label * (2 * math.pi / arms)
        xy = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
        self.x = xy + noise * torch.randn(n, 2, generator=g)
        self.y = label

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, idx):     # one gather per micro-batch instead of one per item
        t = torch.as_tensor(idx)
        return list(zip(self.x[t], self.y[t]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64, help="initial global batch B0")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--fixed-batch", action="store_true", help="never change the batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", default="", help="write {'accuracy', ...} here (rank 0)")
    p.add_argument("--device", default=None,
                   help="where to train: cpu, cuda or cuda:N (default: ADAPTRUN_DEVICE, else "
                        "the worker's GPU when CUDA is available, else cpu)")
    args = p.parse_args()

    world = adaptrun.init(device=args.device)
    device = torch.device(world.device)
    torch.manual_seed(args.seed)
    train, held_out = Spirals(args.samples, seed=args.seed), Spirals(4000, seed=args.seed + 1)
    model = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 3)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model = adaptrun.AdaptiveDataParallel(
        model, optimizer, scaling_rule=adaptrun.science.scaling.LinearScale(warmup_steps=50))
    loader = adaptrun.AdaptiveDataLoader(train, batch_size=args.batch, shuffle=True,
                                         seed=args.seed)
    if not args.fixed_batch:
        loader.autoscale_batch_size(args.max_batch, local_batch_bounds=(16, 512),
                                    accumulation=True)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in adaptrun.remaining_epochs(args.epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.record_loss(loss)
    with torch.no_grad():
        x, y = held_out.x.to(device), held_out.y.to(device)
        accuracy = (model.module(x).argmax(1) == y).float().mean().item()
    if world.rank == 0:
        print(f"held-out accuracy {accuracy:.4f} after {model.step} steps, "
              f"progress {model.progress:.0f}, final batch {loader.current_batch_size}")
        if args.result:
            with open(args.result, "w") as f:
                json.dump({"accuracy": accuracy, "steps": model.step,
                           "progress": model.progress,
                           "global_batch": loader.current_batch_size}, f)


if __name__ == "__main__":
    main()
