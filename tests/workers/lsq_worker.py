"""Least-squares worker used by the multi-process tests (runs alone, under torchrun, elastic).

x ~ N(0, I_n), y = x.w* + noise(sigma), per-example loss 0.5 (x.w - y)^2. The model carries a
``counts`` buffer [epochs, N]: every committed step adds, all-gathered over ranks, how often
each dataset index was used, so the count is saved and restored with the model.

Modes: ``gns`` (frozen LR at w = w* + d, reports the measured noise scale), ``train``.
Every rank appends one JSON line per committed step to <out>/steps-<pid>.jsonl; rank 0 writes
<out>/result.json at the end.
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
import adaptrun.science.scaling


class LsqData:
    """Batched reads: __getitems__ returns (x, y, idx) for a list of indices."""

    def __init__(self, num_samples: int, dim: int, sigma: float, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
        self.w_star = torch.zeros(dim, dtype=torch.float64)
        self.y = self.x @ self.w_star + sigma * torch.randn(num_samples, generator=g,
                                                            dtype=torch.float64)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx):
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.x[t], self.y[t], t


class Model(torch.nn.Module):
    def __init__(self, dim: int, epochs: int, num_samples: int, init: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(init.clone())
        self.register_buffer("counts", torch.zeros(epochs, num_samples, dtype=torch.int32))

    def forward(self, x):
        return x @ self.w


class Mlp(Model):
    """The same linear model through a wide hidden layer: activation memory that grows with
    the local batch (``--hidden``), for the memory-bound tests."""

    def __init__(self, dim: int, epochs: int, num_samples: int, init: torch.Tensor,
                 hidden: int):
        super().__init__(dim, epochs, num_samples, init)
        g = torch.Generator().manual_seed(3)
        self.up = torch.nn.Linear(dim, hidden, dtype=torch.float64)
        self.down = torch.nn.Linear(hidden, 1, dtype=torch.float64)
        with torch.no_grad():
            for t in (*self.up.parameters(), *self.down.parameters()):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.01)

    def forward(self, x):
        return x @ self.w + self.down(torch.relu(self.up(x))).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="train", choices=["gns", "train"])
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rule", default="linear")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--gns-decay", type=float, default=0.99)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--example-sleep", type=float, default=0.0,
                   help="seconds each micro-batch sleeps per example it holds: throughput that "
                        "grows with workers, known by construction")
    p.add_argument("--crowd", action="store_true",
                   help="with --example-sleep: the sleep grows with the world size squared, so "
                        "a second worker makes each step twice as slow (ranks sharing a core)")
    p.add_argument("--pace-file", default="",
                   help="when it exists, seconds to sleep after each step (read every step)")
    p.add_argument("--sleep-scale-file", default="",
                   help="when it exists, a factor on --example-sleep and --step-sleep (read "
                        "every step): 0 lets a paced job run its remaining steps at once")
    p.add_argument("--accum", type=int, default=0,
                   help="start with this many extra micro-batches (a directive to itself)")
    p.add_argument("--exit-code-at-end", type=int, default=0,
                   help="exit with this code after training (a script whose ending fails)")
    p.add_argument("--hidden", type=int, default=0,
                   help="a hidden layer this wide beside the linear model (activation memory)")
    p.add_argument("--grow-to", type=int, default=0,
                   help="rank 0 asks for this global batch at step 3 (a directive to itself)")
    p.add_argument("--grad-scaler", type=float, default=0.0,
                   help="train under torch.amp.GradScaler with this initial scale")
    p.add_argument("--inf-at-step", type=int, default=-1,
                   help="with --grad-scaler: rank 0's loss is inf at this step (the scaler skips)")
    p.add_argument("--no-loss", action="store_true",
                   help="never call record_loss (a script that reports no loss)")
    p.add_argument("--out", default="")
    args = p.parse_args()

    world = adaptrun.init()
    out = args.out
    data = LsqData(args.samples, args.dim, args.sigma)
    init = torch.ones(args.dim, dtype=torch.float64) / args.dim ** 0.5  # |d| = 1
    model = (Mlp(args.dim, args.epochs, args.samples, init, args.hidden) if args.hidden
             else Model(args.dim, args.epochs, args.samples, init))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    rule = adaptrun.science.scaling.rule_by_name(args.rule, args.warmup)
    scaler = (torch.amp.GradScaler("cpu", init_scale=args.grad_scaler, growth_interval=10 ** 6)
              if args.grad_scaler else None)
    model = adaptrun.AdaptiveDataParallel(model, opt, scaling_rule=rule,
                                          gns_decay=args.gns_decay, report_every_steps=5,
                                          grad_scaler=scaler)
    loader = adaptrun.AdaptiveDataLoader(data, batch_size=args.batch, shuffle=True,
                                         collate_fn=lambda b: b)
    loader.autoscale_batch_size(args.samples, accumulation=True)
    restored = adaptrun.restored_step()
    if args.accum and world.rank == 0 and restored is None:
        from adaptrun.worker.distributed import job_store
        adaptrun.write_directive(job_store(), adaptrun.Directive(
            generation=1, global_batch=args.batch, accum_steps=args.accum, reason="--accum"))
    log_path = os.path.join(out, f"steps-{os.getpid()}.jsonl") if out else None
    log = open(log_path, "a") if log_path else None
    if log:
        log.write(json.dumps({"event": "start", "rank": world.rank, "world": world.world_size,
                              "restored": restored, "step": model.step, "t": time.time(),
                              "master": f"{os.environ.get('MASTER_ADDR', '')}:"
                                        f"{os.environ.get('MASTER_PORT', '')}"}) + "\n")
        log.flush()
    step_counts = torch.zeros(args.samples, dtype=torch.int32)
    scale = 1.0
    for epoch in adaptrun.remaining_epochs(args.epochs):
        for x, y, idx in loader:
            step_counts.index_add_(0, loader.current_indices,
                                   torch.ones(len(loader.current_indices), dtype=torch.int32))
            if args.example_sleep:
                time.sleep(scale * args.example_sleep * len(idx)
                           * (world.world_size ** 2 if args.crowd else 1))
            opt.zero_grad()
            loss = 0.5 * (model(x) - y).pow(2).mean()
            if scaler is None:
                loss.backward()
            else:
                blow_up = model.step == args.inf_at_step and world.rank == 0
                scaler.scale(loss * (math.inf if blow_up else 1.0)).backward()
            if loader.is_step_end:
                if world.world_size > 1:
                    dist.all_reduce(step_counts)
                model.module.counts[epoch] += step_counts
                step_counts.zero_()
                if not args.no_loss:
                    model.record_loss(loss)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            if loader.is_step_end:
                if log:
                    log.write(json.dumps({
                        "event": "step", "rank": world.rank, "world": world.world_size,
                        "step": model.step, "epoch": epoch, "global_batch": loader.current_batch_size,
                        "accum": loader.accumulation_steps, "lr": model.lr, "loss": float(loss.detach()),
                        "generation": model.generation, "noise_scale": model.noise_scale,
                        "lr_factor": model.lr_factor, "t": time.time(),
                        "local_batch": loader.current_local_batch_size,
                        "local_batch_max": loader.declared_limits()["local_batch_max"],
                        "examples": model.examples,
                        "loss_scale": scaler.get_scale() if scaler else 1.0}) + "\n")
                    log.flush()
                if args.sleep_scale_file:
                    try:
                        with open(args.sleep_scale_file) as sf:
                            scale = float(sf.read().strip() or 1)
                    except (OSError, ValueError):
                        scale = 1.0
                if args.step_sleep:
                    time.sleep(scale * args.step_sleep)
                if args.pace_file:
                    try:
                        with open(args.pace_file) as pf:
                            time.sleep(float(pf.read().strip() or 0))
                    except (OSError, ValueError):
                        pass
            if args.grow_to and loader.is_step_end and model.step == 3 and world.rank == 0 \
                    and model.generation == 0:
                from adaptrun.worker.distributed import job_store
                adaptrun.write_directive(job_store(), adaptrun.Directive(
                    generation=1, global_batch=args.grow_to, reason="--grow-to"))
            if args.max_steps and model.step >= args.max_steps:
                break
        if args.max_steps and model.step >= args.max_steps:
            break
    if world.rank == 0 and out:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"noise_scale": model.noise_scale, "gns_updates": model._gns.updates, "gns_every_steps": model.gns_every_steps, "grad_sqr": model.grad_sqr,
                       "w_err": float((model.module.w.detach() - data.w_star).norm()),
                       "trace_sigma": model.grad_var * loader.state.init_batch,
                       "step": model.step, "world": world.world_size, "restored": restored,
                       "counts": model.module.counts.tolist(), "progress": model.progress}, f)
    if log:
        log.write(json.dumps({"event": "end", "rank": world.rank, "step": model.step}) + "\n")
        log.close()
    if args.exit_code_at_end:
        raise SystemExit(args.exit_code_at_end)


if __name__ == "__main__":
    main()
