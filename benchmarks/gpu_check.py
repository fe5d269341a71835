"""What one GPU can show about adaptrun, in under 5 minutes: the checks that need CUDA.

    python benchmarks/gpu_check.py

Every check runs in a fresh process of this script (``--child``), a world of one that
``adaptrun.init()`` forms alone, so on a GPU its process group is the multi-backend one
(``cpu:gloo,cuda:nccl``, bound to cuda:0) and its model and batches live on cuda:0.

- ``gns-fp32``, ``gns-bf16``: least squares with the noise scale known in closed form
  (x ~ N(0, I_n), y = x.w* + sigma eps, frozen at w = w* + d, |d| = 1:
  B_noise = (n + 1) + n sigma^2 / |d|^2; ``tests/test_worker_gns.py``), one replica with 4
  micro-batches per step (accumulation: the micro-batch gradients are the small-batch
  estimate), the forward in fp32, under bf16 autocast, and under fp16 autocast with a
  ``GradScaler`` at 2^16 (``grad_scaler=``: the statistics of the unscaled gradient). Passes
  within 10 % (fp32) and 15 % (bf16, fp16) of the truth after 1500 steps.
- ``oom-backoff``: an MLP 256-16384-1 under a 1 GiB cap (``ADAPTRUN_MEMORY_LIMIT``), asked at
  step 3 for a local batch of 16384 (about 3 GiB of activations): the probe runs out, the
  batch backs off into micro-batches within the bound, and every example is trained once.
- ``snapshot-async``, ``snapshot-sync``: an MLP with SGD + momentum on cuda:0 writes periodic
  snapshots (``ADAPTRUN_SNAPSHOT_ASYNC`` 1 and 0); a new process restores the newest onto
  cuda:0, and another with ``CUDA_VISIBLE_DEVICES=""`` onto the CPU. Passes when both restore
  the step and parameters the writer had, bit for bit.
- ``overhead``: ``benchmarks/overhead.py --device cuda --skip-gaps`` when that script takes a
  device; skipped (and said so) when it does not.

Without CUDA every check is skipped, each with why, and the exit code is 0. With CUDA the
figures are printed and the exit code is 1 when any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD = ROOT / "benchmarks" / "overhead.py"
BUDGET_S = 280.0                  # every check together, under the 5 minutes
DIM, SIGMA, GNS_STEPS, GNS_BATCH, GNS_ACCUM = 8, 1.0, 1500, 64, 3
TOLERANCE = {"fp32": 0.10, "bf16": 0.15, "fp16": 0.15}
OOM_CAP, OOM_WIDTH, OOM_SAMPLES, OOM_B0, OOM_ASK = "1G", 16384, 32768, 256, 16384
SNAP_EVERY, SNAP_STEPS = 5, 12    # the newest snapshot is of step 10
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
                "ADAPTRUN_SNAPSHOT_DIR", "ADAPTRUN_CHECKPOINT_DIR", "ADAPTRUN_SNAPSHOT_EVERY",
                "ADAPTRUN_SNAPSHOT_ASYNC", "ADAPTRUN_REPORT_FILE", "ADAPTRUN_AGENT_FD",
                "ADAPTRUN_AGENT_PID", "ADAPTRUN_DEVICE", "ADAPTRUN_GNS_EVERY")


# ---- the children: one world of one each ------------------------------------------------
def _lsq_data(samples: int):
    """x ~ N(0, I), w* = 0, y = sigma eps (CPU float32; batches go to the device)."""
    import torch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, DIM, generator=g)
    y = SIGMA * torch.randn(samples, generator=g)

    class Data:
        def __len__(self):
            return samples

        def __getitem__(self, i):
            return self.__getitems__([i])

        def __getitems__(self, idx):
            t = torch.as_tensor(idx, dtype=torch.long)
            return x[t], y[t]
    return Data()


def _check_world(world) -> None:
    import torch
    if torch.device(world.device).type == "cuda" and world.backend != "cpu:gloo,cuda:nccl":
        raise SystemExit(f"expected the multi-backend group on {world.device}, got "
                         f"{world.backend!r}")


def child_gns(args) -> dict:
    import torch

    import adaptrun
    import adaptrun.scaling
    from adaptrun.worker.distributed import job_store

    world = adaptrun.init(device=args.device)
    _check_world(world)
    dev = torch.device(world.device)
    w = torch.nn.Parameter(torch.ones(DIM, device=dev) / DIM ** 0.5)     # d = w - w*, |d| = 1

    class Lsq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            return x @ self.w
    net = Lsq()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    scaler = (torch.amp.GradScaler("cuda", init_scale=2.0 ** 16, growth_interval=10 ** 6)
              if args.dtype == "fp16" else None)
    model = adaptrun.AdaptiveDataParallel(net, opt, scaling_rule=adaptrun.scaling.NoScale(),
                                          gns_decay=0.995, grad_scaler=scaler)
    loader = adaptrun.AdaptiveDataLoader(_lsq_data(2 * GNS_STEPS * GNS_BATCH),
                                         batch_size=GNS_BATCH, shuffle=True,
                                         collate_fn=lambda b: b)
    loader.autoscale_batch_size(GNS_BATCH, accumulation=True)
    adaptrun.write_directive(job_store(), adaptrun.Directive(
        generation=1, global_batch=GNS_BATCH, accum_steps=GNS_ACCUM, reason="gpu_check"))
    amp = args.dtype in ("bf16", "fp16")
    half = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    scaler = model.grad_scaler
    t0 = time.perf_counter()
    for _ in adaptrun.remaining_epochs(1):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            with torch.autocast(dev.type, dtype=half, enabled=amp):
                pred = model(x)
            loss = 0.5 * (pred.float() - y).pow(2).mean()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if model.step >= GNS_STEPS:
                break
        break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    dd = float(w.detach().double().pow(2).sum())
    truth = (DIM + 1) + DIM * SIGMA ** 2 / dd
    return {"noise_scale": model.noise_scale, "truth": truth, "steps": model.step,
            "accum_steps": loader.accumulation_steps, "seconds": seconds,
            "device": world.device, "backend": world.backend}


def child_oom(args) -> dict:
    import torch

    import adaptrun
    from adaptrun.worker.distributed import job_store

    world = adaptrun.init(device=args.device)
    _check_world(world)
    dev = torch.device(world.device)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, OOM_WIDTH), torch.nn.ReLU(),
                              torch.nn.Linear(OOM_WIDTH, 1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    model = adaptrun.AdaptiveDataParallel(net, opt)
    data = torch.utils.data.TensorDataset(torch.randn(OOM_SAMPLES, 256), torch.randn(OOM_SAMPLES),
                                          torch.arange(OOM_SAMPLES))
    loader = adaptrun.AdaptiveDataLoader(data, batch_size=OOM_B0, shuffle=True)
    loader.autoscale_batch_size(OOM_ASK, accumulation=True)
    seen = torch.zeros(OOM_SAMPLES, dtype=torch.int64)
    rows = []
    for _ in adaptrun.remaining_epochs(1):
        for x, y, idx in loader:
            seen.index_add_(0, loader.current_indices, torch.ones_like(loader.current_indices))
            opt.zero_grad()
            loss = (model(x.to(dev)).squeeze(-1) - y.to(dev)).pow(2).mean()
            loss.backward()
            opt.step()
            if loader.is_step_end:
                rows.append((model.step, loader.current_batch_size,
                             loader.current_local_batch_size,
                             loader.declared_limits()["local_batch_max"]))
                if model.step == 3:
                    adaptrun.write_directive(job_store(), adaptrun.Directive(
                        generation=1, global_batch=OOM_ASK, reason="gpu_check"))
    return {"rows": rows, "seen_once": bool((seen == 1).all()), "device": world.device,
            "peak_gib": (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0) / 2 ** 30}


def _mlp(dev):
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 1)).to(dev)


def child_save(args) -> dict:
    """Train SNAP_STEPS steps with snapshots every SNAP_EVERY; the parameters after each."""
    import torch

    import adaptrun

    world = adaptrun.init(device=args.device)
    _check_world(world)
    dev = torch.device(world.device)
    net = _mlp(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    model = adaptrun.AdaptiveDataParallel(net, opt)
    loader = adaptrun.AdaptiveDataLoader(_lsq_data(4096), batch_size=64, shuffle=True,
                                         collate_fn=lambda b: b)
    after: dict = {}
    for _ in adaptrun.remaining_epochs(1):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            loss = 0.5 * (model(x).squeeze(1) - y).pow(2).mean()
            loss.backward()
            opt.step()
            after[model.step] = [p.detach().cpu().flatten().tolist() for p in net.parameters()]
            if model.step >= SNAP_STEPS:
                break
        break
    return {"after": after, "device": world.device, "backend": world.backend}


def child_restore(args) -> dict:
    """Restore the newest snapshot into the same MLP; its step and parameters."""
    import torch

    import adaptrun

    world = adaptrun.init(device=args.device)
    _check_world(world)
    dev = torch.device(world.device)
    net = _mlp(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    adaptrun.AdaptiveDataParallel(net, opt)            # registers (and restores) the model
    return {"step": adaptrun.restored_step(), "device": world.device,
            "param_devices": sorted({str(p.device) for p in net.parameters()}),
            "momentum_devices": sorted({str(s["momentum_buffer"].device)
                                        for s in opt.state.values() if "momentum_buffer" in s}),
            "params": [p.detach().cpu().flatten().tolist() for p in net.parameters()]}


CHILDREN = {"gns": child_gns, "save": child_save, "restore": child_restore, "oom": child_oom}


# ---- the parent ---------------------------------------------------------------------------
class Checks:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.t0 = time.monotonic()
        self.failed: list[str] = []

    def left_s(self) -> float:
        return BUDGET_S - (time.monotonic() - self.t0)

    def child(self, mode: str, *flags: str, **env) -> dict:
        """Run ``--child mode`` with a clean world-of-one environment plus ``env``."""
        out = self.tmp / f"{mode}-{time.monotonic_ns()}.json"
        full = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
        full.update({"ADAPTRUN_TIMEOUT_S": "120", "PYTHONUNBUFFERED": "1"})
        full.update({k: str(v) for k, v in env.items()})
        left = self.left_s()
        if left < 10:
            raise RuntimeError("out of the 5-minute budget before it started")
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out),
                               *flags], env=full, cwd=ROOT, capture_output=True, text=True,
                              timeout=min(150.0, left))
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
        return json.loads(out.read_text())

    def run(self, name: str, fn) -> None:
        t = time.monotonic()
        try:
            ok, figures = fn()
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
            ok, figures = False, f"error: {exc}"
        print(f"{'PASS' if ok else 'FAIL'} {name}: {figures} ({time.monotonic() - t:.1f} s)",
              flush=True)
        if not ok:
            self.failed.append(name)

    # -- the checks ---------------------------------------------------------------------
    def gns(self, dtype: str):
        r = self.child("gns", "--dtype", dtype, ADAPTRUN_GNS_EVERY=4)
        err = abs(r["noise_scale"] - r["truth"]) / r["truth"]
        ok = (err < TOLERANCE[dtype] and r["steps"] == GNS_STEPS
              and r["accum_steps"] == GNS_ACCUM)
        return ok, (f"noise scale {r['noise_scale']:.3f} truth {r['truth']:.3f} "
                    f"({100 * err:.1f}% off, limit {100 * TOLERANCE[dtype]:.0f}%), {r['steps']} "
                    f"steps x {r['accum_steps'] + 1} micro-batches, "
                    f"{1000 * r['seconds'] / max(1, r['steps']):.2f} ms/step, "
                    f"{r['device']} over {r['backend']}")

    def snapshot(self, asynchronous: bool):
        snap = self.tmp / f"snap-{'async' if asynchronous else 'sync'}"
        env = {"ADAPTRUN_SNAPSHOT_DIR": snap, "ADAPTRUN_SNAPSHOT_EVERY": SNAP_EVERY}
        saved = self.child("save", ADAPTRUN_SNAPSHOT_ASYNC=int(asynchronous), **env)
        want_step = (SNAP_STEPS - 1) // SNAP_EVERY * SNAP_EVERY
        want = saved["after"][str(want_step)]
        on_gpu = self.child("restore", **env)
        on_cpu = self.child("restore", "--device", "", CUDA_VISIBLE_DEVICES="", **env)
        parts, ok = [], True
        for r, device in ((on_gpu, "cuda:0"), (on_cpu, "cpu")):
            same = r["step"] == want_step and r["params"] == want
            placed = r["param_devices"] == [device] and r["momentum_devices"] == [device]
            ok = ok and same and placed and r["device"] == device
            parts.append(f"restored step {r['step']} on {r['device']} (params on "
                         f"{','.join(r['param_devices'])}, momentum on "
                         f"{','.join(r['momentum_devices']) or 'none'}): "
                         f"{'identical' if same else 'DIFFERENT'}")
        return ok, f"written on {saved['device']}; " + "; ".join(parts)

    def oom(self):
        r = self.child("oom", ADAPTRUN_MEMORY_LIMIT=OOM_CAP)
        grown = [row for row in r["rows"] if row[1] == OOM_ASK]
        ok = bool(grown) and r["seen_once"] and all(0 < row[2] <= row[3] < OOM_ASK
                                                    for row in grown)
        last = grown[-1] if grown else None
        return ok, (f"asked for {OOM_ASK} per micro-batch under {OOM_CAP}: "
                    + (f"ran {last[1]} as micro-batches of {last[2]} (bound {last[3]}), "
                       if last else "never grew, ")
                    + f"every example once: {r['seen_once']}, peak {r['peak_gib']:.2f} GiB")

    def overhead(self):
        help_text = subprocess.run([sys.executable, str(OVERHEAD), "--help"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60).stdout
        if "--device" not in help_text:
            return None
        proc = subprocess.run([sys.executable, str(OVERHEAD), "--device", "cuda", "--skip-gaps"],
                              cwd=ROOT, capture_output=True, text=True,
                              timeout=max(10.0, self.left_s()))
        lines = proc.stdout.strip().splitlines()[-12:]
        return proc.returncode == 0, "\n  " + "\n  ".join(lines)


CHECKS = [
    ("gns-fp32", "noise scale against the analytic truth, one replica with accumulation, fp32"),
    ("gns-bf16", "the same under bf16 autocast"),
    ("gns-fp16", "the same under fp16 autocast with a GradScaler at 2^16"),
    ("oom-backoff", "a local batch past a 1 GiB cap backs off, every example once"),
    ("snapshot-async", "asynchronous snapshot of a CUDA model, restored on cuda:0 and with "
                       "CUDA_VISIBLE_DEVICES=\"\""),
    ("snapshot-sync", "the same with synchronous snapshots"),
    ("overhead", "benchmarks/overhead.py on CUDA"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=sorted(TOLERANCE), default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.device = args.device or None        # "": the job's default device
        result = CHILDREN[args.child](args)
        Path(args.out).write_text(json.dumps(result))
        return

    import torch
    if not torch.cuda.is_available():
        why = (f"no CUDA device here (torch {torch.__version__}, "
               f"torch.cuda.is_available() is False)")
        for name, what in CHECKS:
            print(f"SKIP {name} ({what}): {why}")
        print(f"gpu_check: skipped all {len(CHECKS)} CUDA checks: {why}")
        return

    print(f"gpu_check: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible "
          f"GPU(s), torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory(prefix="adaptrun-gpu-check-") as tmp:
        checks = Checks(Path(tmp))
        checks.run("gns-fp32", lambda: checks.gns("fp32"))
        checks.run("gns-bf16", lambda: checks.gns("bf16"))
        checks.run("gns-fp16", lambda: checks.gns("fp16"))
        checks.run("oom-backoff", checks.oom)
        checks.run("snapshot-async", lambda: checks.snapshot(True))
        checks.run("snapshot-sync", lambda: checks.snapshot(False))
        try:
            overhead = checks.overhead()
        except (subprocess.TimeoutExpired, OSError) as exc:
            overhead = (False, f"error: {exc}")
        if overhead is None:
            print("SKIP overhead: benchmarks/overhead.py takes no --device (it runs on CPU "
                  "over gloo)")
        else:
            print(f"{'PASS' if overhead[0] else 'FAIL'} overhead: {overhead[1]}")
            if not overhead[0]:
                checks.failed.append("overhead")
        total = time.monotonic() - checks.t0
    if checks.failed:
        print(f"gpu_check: FAILED {', '.join(checks.failed)} ({total:.0f} s)")
        sys.exit(1)
    print(f"gpu_check: all checks passed ({total:.0f} s)")


if __name__ == "__main__":
    main()
