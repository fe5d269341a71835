"""The critical batch over training, measured by branched training, beside the noise scale the
wrapper reports at the same points.

Truth (Merrill et al. 2025, "Critical batch size revisited"; McCandlish et al. 2018). A B0 run
of the workload trains under ``AdaptiveDataParallel`` (a world of one, two micro-batches of
B0/2 per step, so the wrapper measures the noise scale as it does in a job) and keeps a copy
of the model and optimizer at fractions of training (``--at``). From each copy, short
branches train ``--horizon`` B0-steps' worth of examples at batches k x B0 (``--factors``;
``--repeats`` data orders each, their losses averaged)
under the example's LR rule: the base LR the B0 run has at the same examples, times the rule's
factor (sqrt(k) for the Adam examples, ramped from 1 over the rule's warmup counted in
B0-steps of examples; for digits AdaScale's gain r(k) at the noise scale the wrapper acted on
at the copy). The reference is the B0 branch from the same copy (k = 1, the same code as
every branch: a difference of the B0 run's own, such as its micro-batches under BatchNorm,
does not count), its curve averaged over the data orders; their spread is printed.

Each branch's held-out loss (for digits, whose 359 held-out images are too few to tell
branches apart, the loss on its 1437 training images) is placed on the reference curve (its
running minimum, evaluated every ``--eval-every`` B0-steps): the B0 branch needs x examples to
reach it, the branch used ``horizon * B0``, and its efficiency per example is E = x / (horizon *
B0) (1 at most: the curve ends there). McCandlish's model says E(B) = (B_crit + B0) /
(B_crit + B), B_crit the batch at which training takes twice the minimum examples (the
critical batch); it is fitted to the branches' E by least squares in log E. The table prints
per point: B_crit measured, the branches' E, and what the wrapper reports there, the noise
scale of the raw gradient (the default) and of Adam's preconditioned gradient (a second B0
run of the same seed with ``gns_preconditioned=True``, in a subprocess beside this one): the
point estimate and the conservative bound the policy acts on. The ratio signal / B_crit is
what must stay within 2x.

    python benchmarks/critical_batch.py                       # the three workloads
    python benchmarks/critical_batch.py --only char_lm --at 0.1 0.5
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


@dataclass
class Workload:
    """What a branch needs of an example: its data, model, optimizer and LR rule."""

    name: str
    b0: int
    rule: str                          # "sqrt", "linear" or "adascale": the factor at k x B0
    warmup: int                        # the rule's warmup, B0-steps
    epochs: int
    build: object                      # seed -> (net, optimizer, train, held_out)
    loss: object                       # (net, batch) -> loss
    base_lr: object                    # (b0_step, total_b0_steps) -> the B0 run's LR
    micro: int = 0                     # micro-batch of the B0 run (0: B0 / 2)
    eval_name: str = "held-out loss"
    extra: dict = field(default_factory=dict)


def _char_lm(args) -> Workload:
    cl = importlib.import_module("char_lm")
    lr = 5e-3
    ctx = 16

    def build(seed):
        torch.manual_seed(seed)
        train, held = cl.split_corpus(args.corpus_kb, ctx, 32)
        net = cl.WindowMLP(ctx)
        return net, torch.optim.Adam(net.parameters(), lr=lr), train, held.x[:args.held_out]

    def loss(net, chars):
        return nn.functional.cross_entropy(net(chars[:, :-1]), chars[:, ctx:])

    return Workload("char_lm", 32, "sqrt", 50, args.epochs or 3, build, loss,
                    lambda step, total: lr)


def _digits(args) -> Workload:
    dc = importlib.import_module("digits_cnn")
    lr = 0.05

    def build(seed):
        torch.manual_seed(seed)
        train, held = dc.split_digits(seed)
        net = dc.make_net()
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        return net, opt, train, (train.x, train.y)

    def loss(net, batch):
        x, y = batch
        return nn.functional.cross_entropy(net(x), y)

    return Workload("digits", 32, "adascale", 0, args.epochs or 30, build, loss,
                    lambda step, total: lr, eval_name="training loss (all 1437 images)")


def _transformer(args) -> Workload:
    tl = importlib.import_module("transformer_lm")
    cl = importlib.import_module("char_lm")
    lr, final_frac, warm = 3e-3, 0.1, 50
    seq = 64

    def build(seed):
        torch.manual_seed(seed)
        train, held = cl.split_corpus(args.corpus_kb, 1, seq)
        net = tl.make_model(seq)
        opt = tl.make_optimizer(net, lr)
        return net, opt, train, held.x[:args.held_out]

    def loss(net, chars):
        return tl.lm_loss(net, chars)

    def base_lr(step, total):
        return lr * tl.warmup_cosine(step, warm, total, final_frac)

    return Workload("transformer", 32, "sqrt", warm, args.epochs or 3, build, loss, base_lr)


WORKLOADS = {"char_lm": _char_lm, "digits": _digits, "transformer": _transformer}


def held_out_loss(w: Workload, net, held) -> float:
    net.eval()
    with torch.no_grad():
        if isinstance(held, tuple):
            value = float(w.loss(net, held))
        else:
            value = float(np.mean([float(w.loss(net, part)) for part in held.split(256)]))
    net.train()
    return value


def _rule_factor(w: Workload, k: float, noise: float) -> float:
    """The LR factor at k x B0: sqrt(k), k, or AdaScale's gain r(k) at the noise scale the
    wrapper acted on at the copy (``noise``, examples)."""
    if w.rule == "adascale":
        from adaptrun.science.efficiency import gain
        return float(gain(1.0, max(noise, 0.0) / w.b0, k))
    return math.sqrt(k) if w.rule == "sqrt" else float(k)


def _batch(train, idx):
    items = train.__getitems__(idx.tolist())
    return torch.utils.data.default_collate(items)


def b0_run(w: Workload, args, preconditioned: bool) -> dict:
    """The B0 run under the wrapper: held-out curve, signals and copies at the points."""
    import adaptrun
    from adaptrun.worker.parallel import AdaptiveDataParallel
    from adaptrun.science.scaling import ProgressSchedule  # noqa: F401  (documents the rule)

    adaptrun.init()
    net, opt, train, held = w.build(args.seed)
    rule = adaptrun.scaling.NoScale()
    model = AdaptiveDataParallel(net, opt, scaling_rule=rule, gns_every_steps=args.gns_every,
                                 gns_preconditioned=preconditioned)
    loader = adaptrun.AdaptiveDataLoader(train, batch_size=w.b0, shuffle=True, seed=args.seed)
    half = w.micro or w.b0 // 2
    loader.autoscale_batch_size(w.b0, local_batch_bounds=(half, half), accumulation=True)
    total = w.epochs * math.ceil(len(train) / w.b0)
    points = sorted({max(1, int(round(f * total))) for f in args.at})
    curve, signals, copies = [], {}, {}
    curve.append((0, held_out_loss(w, net, held)))
    for _ in adaptrun.remaining_epochs(w.epochs):
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = w.base_lr(model.step, total)
            loss = w.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            s = model.step
            if s % args.eval_every == 0:
                curve.append((s, held_out_loss(w, net, held)))
            if s in points:
                gns = model._gns
                lo, hi = gns.noise_scale_bounds()
                signals[s] = {"point": gns.noise_scale, "lo": lo, "hi": hi,
                              "estimates": gns.updates}
                if not preconditioned:
                    copies[s] = (copy.deepcopy(net.state_dict()),
                                 copy.deepcopy(opt.state_dict()))
    return {"total": total, "points": points, "curve": curve, "signals": signals,
            "copies": copies}


def branch(w: Workload, args, state, start: int, k: int, total: int, seed: int,
           curve: list | None = None, noise: float = 0.0) -> float:
    """Held-out loss after ``horizon`` B0-steps of examples at k x B0 from a copy; with
    ``curve`` (a list), also (B0-steps done, loss) every ``eval_every`` B0-steps into it."""
    net, opt, train, held = w.build(args.seed)
    net.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    net.train()
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    order = torch.randperm(n, generator=g)
    pos = 0
    steps = max(1, args.horizon // k)
    target = _rule_factor(w, k, noise)
    for j in range(steps):
        if pos + k * w.b0 > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + k * w.b0]
        pos += k * w.b0
        done = j * k                        # B0-steps of examples into the branch
        ramp = min(1.0, done / w.warmup) if w.warmup and w.rule != "adascale" else 1.0
        factor = 1.0 + (target - 1.0) * ramp
        for group in opt.param_groups:
            group["lr"] = w.base_lr(start + done, total) * factor
        if curve is not None and done % args.eval_every == 0:
            curve.append((done, held_out_loss(w, net, held)))
        loss = w.loss(net, _batch(train, idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = held_out_loss(w, net, held)
    if curve is not None:
        curve.append((steps * k, final))
    return final


def efficiency_on_curve(curve, start: int, horizon: int, loss: float) -> float:
    """B0-examples to reach ``loss`` on the B0 curve after ``start`` (its running minimum,
    linearly interpolated), over the branch's ``horizon``; 1 at most."""
    pts = [(s - start, v) for s, v in curve if start <= s <= start + horizon]
    xs = np.array([p[0] for p in pts], dtype=float)
    ys = np.minimum.accumulate(np.array([p[1] for p in pts]))
    if loss <= ys[-1]:
        return 1.0
    if loss >= ys[0]:
        return 0.0
    i = int(np.argmax(ys <= loss))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    x = x0 + (x1 - x0) * (y0 - loss) / max(y0 - y1, 1e-12)
    return float(x / horizon)


def fit_critical_batch(b0: int, batches, effs) -> float:
    """B_crit of E(B) = (B_crit + B0) / (B_crit + B) by least squares in log E."""
    b = np.asarray(batches, dtype=float)
    e = np.clip(np.asarray(effs, dtype=float), 0.02, 1.0)
    grid = np.geomspace(1.0, 1e6, 4000)
    model = (grid[:, None] + b0) / (grid[:, None] + b[None, :])
    err = ((np.log(model) - np.log(e)[None, :]) ** 2).sum(1)
    i = int(np.argmin(err))
    # Every branch as efficient as B0 (within the fit): the critical batch lies beyond the
    # largest batch measured, and is reported as such (inf).
    return float(grid[i]) if grid[i] < 2 * b.max() else math.inf


def signal_subprocess(name: str, args, out: pathlib.Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--only", name, "--signal-only", str(out),
           "--seed", str(args.seed), "--corpus-kb", str(args.corpus_kb),
           "--eval-every", str(args.eval_every), "--gns-every", str(args.gns_every),
           "--held-out", str(args.held_out), "--at", *map(str, args.at)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def measure(name: str, args) -> list[dict]:
    w = WORKLOADS[name](args)
    t0 = time.monotonic()
    pre_proc = None
    with tempfile.TemporaryDirectory(prefix="adaptrun-cbs-") as tmp:
        out = pathlib.Path(tmp) / "pre.json"
        if w.rule == "sqrt":                 # Adam: the preconditioned signal beside
            pre_proc = signal_subprocess(name, args, out)
        line = b0_run(w, args, preconditioned=False)
        rows = []
        for s in line["points"]:
            state = line["copies"][s]
            # The reference: B0 branches from the copy (the same code as every branch, so a
            # difference of the B0 run's own, such as its micro-batches, does not count),
            # their held-out curves averaged over the data orders.
            sig = line["signals"].get(s) or {}
            noise = sig.get("lo", 0.0)            # what the job's gain is computed from
            curves = []
            for rep in range(args.repeats):
                curves.append([])
                branch(w, args, state, s, 1, line["total"], seed=1000 * s + 100 * rep + 1,
                       curve=curves[-1])
            ref = [(s + x, float(np.mean([c[i][1] for c in curves])))
                   for i, (x, _) in enumerate(curves[0])]
            effs, losses = {1: 1.0}, {1: ref[-1][1]}
            spread = float(np.std([c[-1][1] for c in curves]))
            for k in args.factors:
                loss = float(np.mean([branch(w, args, state, s, k, line["total"],
                                             seed=1000 * s + 100 * rep + k, noise=noise)
                                      for rep in range(args.repeats)]))
                effs[k] = efficiency_on_curve(ref, s, args.horizon, loss)
                losses[k] = loss
            ks = [k for k in args.factors]
            bcrit = fit_critical_batch(w.b0, [k * w.b0 for k in ks], [effs[k] for k in ks])
            at = dict(line["curve"])
            rows.append({"step": s, "frac": s / line["total"], "b_crit": bcrit, "eff": effs,
                         "loss": losses, "spread": spread, "line": (at.get(s - s % args.eval_every, math.nan),
                                                  at.get(s + args.horizon - (s + args.horizon)
                                                         % args.eval_every, math.nan)),
                         "raw": line["signals"].get(s)})
        if pre_proc is not None:
            _, err = pre_proc.communicate(timeout=args.timeout_s)
            if pre_proc.returncode != 0:
                raise RuntimeError(f"preconditioned B0 run failed:\n{err[-2000:]}")
            pre = {int(k): v for k, v in json.loads(out.read_text()).items()}
            for r in rows:
                r["pre"] = pre.get(r["step"])
    print(f"\n{name}: B0 {w.b0}, {line['total']} B0-steps ({w.epochs} epochs), branches of "
          f"{args.horizon} B0-steps at k x B0, rule {w.rule}; {time.monotonic() - t0:.0f} s")
    head = " ".join(f"E({k})" for k in args.factors)
    print(f"{'frac':>5} {'step':>5} {'B_crit':>7} | {head} | raw: point  [lo, hi]  lo/Bc |"
          f" pre: point  lo/Bc")
    for r in rows:
        e = " ".join(f"{r['eff'][k]:>{len(f'E({k})')}.2f}" for k in args.factors)
        raw, pre = r["raw"] or {}, r.get("pre") or {}
        lo = raw.get("lo", math.nan)
        bc = f"{r['b_crit']:.0f}" if math.isfinite(r["b_crit"]) else \
            f">{2 * w.b0 * max(args.factors)}"
        print(f"{r['frac']:>5.2f} {r['step']:>5} {bc:>7} | {e} | "
              f"{raw.get('point', math.nan):>8.0f} [{lo:.0f}, {raw.get('hi', math.nan):.0f}] "
              f"{lo / r['b_crit']:>5.2f} | {pre.get('point', math.nan):>8.0f} "
              f"{pre.get('lo', math.nan) / r['b_crit']:>6.2f}")
    print(f"{w.eval_name}: the B0 run at the point and a horizon later | the branches' means "
          f"(1x: the reference, +- the std of its {args.repeats} data orders)")
    for r in rows:
        print(f"{r['frac']:>5.2f} {r['step']:>5} B0 run {r['line'][0]:.4f} -> {r['line'][1]:.4f} |"
              f" 1x {r['loss'][1]:.4f} +- {r['spread']:.4f}"
              + "".join(f"  {k}x {r['loss'][k]:.4f}" for k in args.factors))
    sys.stdout.flush()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    p.add_argument("--at", type=float, nargs="+", default=[0.02, 0.1, 0.25, 0.5, 0.75],
                   help="fractions of training to branch at")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--horizon", type=int, default=256, help="B0-steps of examples a branch")
    p.add_argument("--repeats", type=int, default=2,
                   help="branches per batch (data orders), their held-out losses averaged")
    p.add_argument("--eval-every", type=int, default=8, help="B0 run held-out loss, steps")
    p.add_argument("--held-out", type=int, default=768, help="held-out windows (LMs)")
    p.add_argument("--corpus-kb", type=int, default=800)
    p.add_argument("--epochs", type=int, default=0, help="0: the workload's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gns-every", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--signal-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.signal_only:
        w = WORKLOADS[args.only](args)
        line = b0_run(w, args, preconditioned=True)
        pathlib.Path(args.signal_only).write_text(json.dumps(
            {str(k): v for k, v in line["signals"].items()}))
        return
    if args.only:
        measure(args.only, args)
        return
    for name in WORKLOADS:        # one process each: a process holds one adaptrun job
        rest = [a for a in sys.argv[1:]]
        subprocess.run([sys.executable, __file__, "--only", name, *rest], check=True)


if __name__ == "__main__":
    main()
