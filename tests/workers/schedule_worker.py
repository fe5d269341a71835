"""A world of one whose batch grows 8x by a directive after 10 steps, with a cosine LR
schedule (``LambdaLR``, built for the run at B0) driven by examples (``ProgressSchedule``) or
by optimizer steps, or by progress (``--by progress``). ``--length progress`` runs it with
``remaining_epochs(2, by="progress")``. Prints ``lr_frac F`` (the last step's scheduled LR
over the base), ``final_batch B``, ``steps N``, ``epochs E``, ``progress P``, ``target T``
and ``before_last P`` (the progress when the last epoch began)."""
from __future__ import annotations

import argparse
import math
import time

import torch

import adaptrun
import adaptrun.scaling
from adaptrun.worker import distributed

p = argparse.ArgumentParser()
p.add_argument("--by", choices=("examples", "progress", "steps"), required=True)
p.add_argument("--length", choices=("epochs", "progress"), default="epochs")
args = p.parse_args()
torch.manual_seed(0)
adaptrun.init()
n, b0, epochs, final = 4096, 32, 2, 0.1
x = torch.randn(n, 8)
data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
net = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
total = epochs * math.ceil(n / b0)
cosine = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
sched = None if args.by == "steps" else adaptrun.scaling.ProgressSchedule(cosine, by=args.by)
model = adaptrun.AdaptiveDataParallel(net, opt, lr_scheduler=sched,
                                      scaling_rule=adaptrun.scaling.NoScale())
loader = adaptrun.AdaptiveDataLoader(data, batch_size=b0, shuffle=True)
loader.autoscale_batch_size(8 * b0)
before_last = 0.0
for epoch in adaptrun.remaining_epochs(epochs, by=args.length):
    before_last = model.progress
    for xb, yb in loader:
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is None:
            cosine.step()
        if model.step == 10:
            adaptrun.write_directive(distributed.job_store(),
                                     adaptrun.Directive(generation=1, global_batch=8 * b0))
            time.sleep(0.2)               # rank 0 polls the store every 0.1 s
print(f"lr_frac {opt.param_groups[0]['lr'] / 0.01:.4f}")
print(f"final_batch {loader.current_batch_size}")
print(f"steps {model.step}")
print(f"epochs {epoch + 1}")
print(f"progress {model.progress:.3f}")
print(f"target {epochs * math.ceil(n / b0)}")
print(f"before_last {before_last:.3f}")
