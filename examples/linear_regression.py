"""Least squares where the true gradient noise scale is known in closed form: a check of
adaptrun's noise-scale estimate (McCandlish et al. 2018) against the truth.

The model. x ~ N(0, I_n), y = w*.x + sigma * eps with eps ~ N(0, 1), per-example loss
0.5 (w.x - y)^2. At a point w with d = w - w*, the per-example gradient is
g = x (x.d - sigma eps), so (Isserlis' theorem for the fourth moments of x)

    G = E[g] = d,        E[g g^T] = |d|^2 I + 2 d d^T + sigma^2 I,
    tr(Sigma) = tr(E[g g^T]) - |G|^2 = (n + 1) |d|^2 + n sigma^2,
    B_noise = tr(Sigma) / |G|^2 = ((n + 1) |d|^2 + n sigma^2) / |d|^2.

The LR is 0 by default, so w stays at w* + d and the truth stays put while the wrapper's
exponential average of the estimate settles. Alone (one replica) the wrapper measures the
noise from two accumulation micro-batches of each step; under ``torchrun`` from the ranks.
Rank 0 prints ``noise scale estimate X truth Y (Z% off)``, ``final gns_rel_err Z`` and
``steps N``.

    python examples/linear_regression.py
    torchrun --nproc-per-node 2 examples/linear_regression.py
"""
from __future__ import annotations

import argparse

import torch

import adaptrun
import adaptrun.scaling


def true_noise_scale(d: torch.Tensor, sigma: float) -> float:
    """((n + 1)|d|^2 + n sigma^2) / |d|^2 for the model of the module docstring."""
    n, dd = d.numel(), float(d.double().pow(2).sum())
    return ((n + 1) * dd + n * sigma ** 2) / dd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="global batch B0")
    p.add_argument("--lr", type=float, default=0.0, help="0: w stays put (the truth is exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--sigma", type=float, default=1.0, help="label noise")
    p.add_argument("--distance", type=float, default=1.0, help="|w - w*| at the start")
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--gns-decay", type=float, default=0.995,
                   help="the wrapper's EMA decay of the noise statistics per step")
    args = p.parse_args()
    torch.set_num_threads(1)

    world = adaptrun.init()
    g = torch.Generator().manual_seed(args.seed)
    w_star = torch.randn(args.dim, generator=g)
    x = torch.randn(args.samples, args.dim, generator=g)
    y = x @ w_star + args.sigma * torch.randn(args.samples, generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    direction = torch.randn(args.dim, generator=g)

    net = torch.nn.Linear(args.dim, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(w_star + args.distance * direction / direction.norm())
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
    model = adaptrun.AdaptiveDataParallel(net, optimizer, scaling_rule=adaptrun.scaling.NoScale(),
                                          gns_decay=args.gns_decay)
    loader = adaptrun.AdaptiveDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed)
    # a fixed batch, but with accumulation allowed: one replica then measures the noise from
    # two micro-batches per step
    loader.autoscale_batch_size(args.batch_size, accumulation=True)
    for epoch in adaptrun.remaining_epochs(args.epochs):
        for xb, yb in loader:
            loss = 0.5 * (model(xb).squeeze(1) - yb).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.record_loss(loss)

    if world.rank == 0:
        truth = true_noise_scale(net.weight.detach().squeeze(0) - w_star, args.sigma)
        estimate = model.noise_scale
        rel_err = abs(estimate - truth) / truth
        adaptrun.record_metric("gns_rel_err", rel_err)
        print(f"noise scale estimate {estimate:.2f} truth {truth:.2f} ({100 * rel_err:.1f}% off)")
        print(f"final gns_rel_err {rel_err:.4f}")
        print(f"steps {model.step}")


if __name__ == "__main__":
    main()
