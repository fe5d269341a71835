"""Classify scikit-learn's bundled 8x8 handwritten digits with a small CNN: SGD + momentum,
an adaptive batch from B0 = 32, the LR scaled by AdaScale (Johnson et al. 2020).

Shows a conv net with BatchNorm under adaptrun: ``AdaScale`` raises the LR with the gain of
the batch (the linear rule while the batch is well below the noise scale, flattening beyond
it, where the linear rule of Goyal et al. overshoots; ``--lr-rule linear`` for that rule,
warmed up), ``autoscale_batch_size`` lets the controller grow the batch (with accumulation), and
``--ghost-batch N`` (``AdaptiveDataParallel(ghost_batch_size=N)``) swaps BatchNorm for ghost
batch norm (Hoffer et al. 2017) so the normalization statistics come from N examples
whatever the local batch. The data ships with scikit-learn (``load_digits``: 1797 images,
no download); a seeded 20 % is held out. Rank 0 evaluates the held-out accuracy at the end
and prints ``final val_acc X`` and ``steps N``.

``--lr-batch`` names the batch ``--lr`` was tuned at when ``--batch-size`` is another one
(a fixed large batch): the script scales the LR by the linear rule, warmed up.

    python examples/digits_cnn.py                          # alone (world of one)
    python examples/digits_cnn.py --max-batch 0            # fixed batch B0
    torchrun --nproc-per-node 2 examples/digits_cnn.py
    adaptrun run --min-workers 1 --max-workers 2 -- python examples/digits_cnn.py
"""
from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import adaptrun
import adaptrun.scaling


class Digits(torch.utils.data.Dataset):
    """Images (N, 1, 8, 8) scaled to [0, 1] and their labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, idx):     # one gather per micro-batch instead of one per item
        t = torch.as_tensor(idx)
        return list(zip(self.x[t], self.y[t]))


def split_digits(seed: int, held_out_fraction: float = 0.2) -> tuple[Digits, Digits]:
    """The same seeded train / held-out split on every rank."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_held = int(len(y) * held_out_fraction)
    held, train = order[:n_held], order[n_held:]
    return Digits(x[train], y[train]), Digits(x[held], y[held])


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),                                  # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--length", choices=("epochs", "progress"), default="epochs",
                   help="epochs: run --epochs epochs; progress: run until the training "
                        "progress of --epochs epochs at B0 (adaptrun.remaining_epochs(by=))")
    p.add_argument("--batch-size", type=int, default=32, help="initial global batch B0")
    p.add_argument("--lr", type=float, default=0.05,
                   help="LR tuned at --lr-batch (adaptrun scales it with the batch)")
    p.add_argument("--lr-batch", type=int, default=0,
                   help="the batch --lr was tuned at, if not --batch-size: the script scales "
                        "--lr by the linear rule to --batch-size, warmed up (Goyal et al.)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=512,
                   help="largest global batch the controller may choose (0: fixed batch)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr-rule", choices=("adascale", "linear"), default="adascale",
                   help="how adaptrun scales the LR with the batch")
    p.add_argument("--ghost-batch", type=int, default=0,
                   help="ghost batch norm over this many examples (0: plain BatchNorm)")
    p.add_argument("--device", default=None,
                   help="where to train: cpu, cuda or cuda:N (default: ADAPTRUN_DEVICE, else "
                        "the worker's GPU when CUDA is available, else cpu)")
    args = p.parse_args()
    torch.set_num_threads(1)

    world = adaptrun.init(device=args.device)
    device = torch.device(world.device)
    torch.manual_seed(args.seed)
    train, held_out = split_digits(args.seed)
    net = make_net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    rule = adaptrun.scaling.rule_by_name(args.lr_rule, args.warmup_steps)
    model = adaptrun.AdaptiveDataParallel(net, optimizer, scaling_rule=rule,
                                          ghost_batch_size=args.ghost_batch or None)
    # adaptrun scales the LR from B0 = --batch-size on; when B0 is not the batch the LR was
    # tuned at, the script scales it to B0 by the linear rule, ramped up from --lr (Goyal et al.)
    b0_factor = args.batch_size / (args.lr_batch or args.batch_size)

    def lr_at_b0(step: int) -> float:
        return args.lr * adaptrun.scaling.linear_ramp(step, 0, args.warmup_steps,
                                                      min(1.0, b0_factor), b0_factor)

    loader = adaptrun.AdaptiveDataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed)
    if args.max_batch > 0:
        loader.autoscale_batch_size(args.max_batch, local_batch_bounds=(8, 256),
                                    accumulation=True)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in adaptrun.remaining_epochs(args.epochs, by=args.length):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at_b0(model.step)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.record_loss(loss)

    if world.rank == 0:               # the whole held-out set, on rank 0 only
        net = model.module.eval()
        with torch.no_grad():
            x, y = held_out.x.to(device), held_out.y.to(device)
            accuracy = (net(x).argmax(1) == y).float().mean().item()
        adaptrun.record_metric("val_acc", accuracy)
        print(f"held-out accuracy {accuracy:.4f} after {model.step} steps, progress "
              f"{model.progress:.0f}, final batch {loader.current_batch_size}, noise scale "
              f"{model.noise_scale:.0f}")
        print(f"final val_acc {accuracy:.4f}")
        print(f"steps {model.step}")
        print(f"epochs {epoch + 1}")


if __name__ == "__main__":
    main()
