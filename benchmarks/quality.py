"""Model quality of adaptive batch training next to fixed batches, on the real examples.

For ``examples/digits_cnn.py`` (SGD, AdaScale, held-out accuracy: higher is better),
``examples/char_lm.py`` (Adam, square-root rule, held-out bits per char: lower is better) and
``examples/transformer_lm.py`` (AdamW, square-root rule, a warmup-cosine schedule run on
examples; bits per char), three settings, each over ``--seeds`` seeds, the same epochs:

    fixed_b0     the fixed initial batch B0 (--max-batch 0)
    fixed_large  a fixed batch --large-factor x B0, the LR scaled from B0 by the example's
                 rule and warmed up (--batch-size k*B0 --lr-batch B0 --max-batch 0)
    adaptive     autoscale_batch_size with accumulation (the example's default), run to the
                 progress of the epochs at B0 (--length progress: more epochs where a
                 larger batch makes an example worth less)

Every run is ``python examples/X.py ...`` alone (a world of one). Alone nothing changes the
batch: adaptive then trains at B0 with two accumulation micro-batches per step (that is how
one replica measures the noise scale). ``--under-run`` runs the adaptive setting under
``adaptrun run --min-workers 1 --max-workers 2`` instead, where the embedded controller
changes the batch (and the workers). Seeds and settings interleave so the shared machine's
noise spreads over all of them. The script's ``final <metric> <value>`` and ``steps N``
lines are parsed (from the agent's log under ``--under-run``); wall time is the whole
process, start-up included.

Prints per example a table: setting, metric mean +- std, wall time, optimizer steps, and the
ratios adaptive / fixed_b0 (and fixed_large / fixed_b0) of steps and metric.

    python benchmarks/quality.py --seeds 3 --under-run
    python benchmarks/quality.py --only digits --epochs 3 --under-run
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# Epochs: long enough that the controller sees the run (its policy decides every few
# seconds of a run that is tens of seconds long on 2 cores), the same for every setting.
EXAMPLES = {
    "digits": {"script": "digits_cnn.py", "b0": 32, "better": "higher", "epochs": 60},
    "char": {"script": "char_lm.py", "b0": 32, "better": "lower", "epochs": 10},
    "transformer": {"script": "transformer_lm.py", "b0": 32, "better": "lower", "epochs": 10},
}
SETTINGS = ("fixed_b0", "fixed_large", "adaptive")


def setting_flags(setting: str, b0: int, large_factor: int,
                  adaptive_length: str = "progress") -> list[str]:
    if setting == "fixed_b0":
        return ["--batch-size", str(b0), "--max-batch", "0"]
    if setting == "fixed_large":
        return ["--batch-size", str(large_factor * b0), "--lr-batch", str(b0), "--max-batch", "0"]
    # The adaptive run's length is the progress of the epochs at B0 (remaining_epochs(by=
    # "progress")): where a larger batch makes an example worth less it runs more epochs, so
    # it ends as far trained; a fixed batch runs its epochs.
    return ["--batch-size", str(b0), "--length", adaptive_length]


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "ADAPTRUN_CHECKPOINT_DIR", "ADAPTRUN_SNAPSHOT_DIR")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def parse(text: str) -> tuple[str, float, int, int] | None:
    """(metric name, value, steps, epochs) from the ``final``, ``steps`` and ``epochs``
    lines, or None."""
    name = value = steps = None
    epochs = 0
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "final":
            name, value = words[1], float(words[2])
        elif len(words) == 2 and words[0] == "steps" and words[1].isdigit():
            steps = int(words[1])
        elif len(words) == 2 and words[0] == "epochs" and words[1].isdigit():
            epochs = int(words[1])
    return None if value is None or steps is None else (name, value, steps, epochs)


def run_one(cmd: list[str], timeout_s: float, log_dir: pathlib.Path | None) -> dict:
    """Run ``cmd`` in its own session (killed whole on timeout); metric, steps, wall time."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout_s:.0f} s: {' '.join(cmd)}") from None
    wall = time.monotonic() - t0
    if log_dir is not None:                    # under adaptrun run the workers log there
        out += "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log")))
    parsed = parse(out)
    if proc.returncode != 0 or parsed is None:
        raise RuntimeError(f"exit {proc.returncode}, no final/steps lines: {' '.join(cmd)}\n"
                           + out[-3000:])
    name, value, steps, epochs = parsed
    return {"metric_name": name, "metric": value, "steps": steps, "epochs": epochs,
            "wall_s": wall}


def command(example: dict, setting: str, seed: int, args, tmp: pathlib.Path):
    flags = setting_flags(setting, example["b0"], args.large_factor, args.adaptive_length) + [
        "--seed", str(seed), "--epochs", str(args.epochs or example["epochs"])]
    script = [sys.executable, str(REPO / "examples" / example["script"]), *flags]
    if setting == "adaptive" and args.under_run:
        log_dir = pathlib.Path(tempfile.mkdtemp(dir=tmp))
        return [sys.executable, "-m", "adaptrun.cli", "run", "--min-workers", "1",
                "--max-workers", "2", "--no-progress", "--plot", "", "--log-dir",
                str(log_dir), "--", *script], log_dir
    return script, None


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def print_table(name: str, example: dict, results: dict, args) -> None:
    metric_name = next(iter(results["fixed_b0"]))["metric_name"]
    adaptive = "adaptive (adaptrun run)" if args.under_run else "adaptive (alone)"
    print(f"\n{name}: {example['script']}, {metric_name} ({example['better']} is better), "
          f"B0 {example['b0']}, large batch {args.large_factor * example['b0']}, "
          f"{args.seeds} seeds")
    print(f"{'setting':<24} {metric_name + ' mean +- std':>22} {'wall s':>8} {'steps':>8} "
          f"{'epochs':>7}")
    stats = {}
    for setting in SETTINGS:
        rows = results[setting]
        m, s = mean_std([r["metric"] for r in rows])
        stats[setting] = {"metric": m, "std": s,
                          "steps": statistics.fmean(r["steps"] for r in rows)}
        label = adaptive if setting == "adaptive" else setting
        print(f"{label:<24} {m:>13.4f} +- {s:<6.4f} "
              f"{statistics.fmean(r['wall_s'] for r in rows):>8.1f} "
              f"{stats[setting]['steps']:>8.0f} "
              f"{statistics.fmean(r['epochs'] for r in rows):>7.1f}")
    base = stats["fixed_b0"]
    for setting in ("adaptive", "fixed_large"):
        st = stats[setting]
        print(f"ratio {setting} / fixed_b0: steps {st['steps'] / base['steps']:.3f}, "
              f"{metric_name} {st['metric'] / base['metric']:.4f}")
    ad, large = stats["adaptive"], stats["fixed_large"]
    sign = 1.0 if example["better"] == "higher" else -1.0
    behind = sign * (base["metric"] - ad["metric"])            # > 0: adaptive is worse
    print(f"goals: within one seed deviation of fixed_b0 "
          f"{'yes' if behind <= max(base['std'], ad['std']) else 'no'}, within 1 % "
          f"{'yes' if behind <= 0.01 * abs(base['metric']) else 'no'}, at most 0.7x its steps "
          f"{'yes' if ad['steps'] <= 0.7 * base['steps'] else 'no'}, better than fixed_large "
          f"{'yes' if sign * (ad['metric'] - large['metric']) > 0 else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--epochs", type=int, default=0,
                   help="0: each example's benchmark length (digits 60, the LMs 10)")
    p.add_argument("--only", choices=sorted(EXAMPLES), default=None)
    p.add_argument("--large-factor", type=int, default=8, help="fixed_large = factor x B0")
    p.add_argument("--adaptive-length", choices=("progress", "epochs"), default="progress",
                   help="the adaptive run's length: the progress of the epochs at B0, or the "
                        "epochs")
    p.add_argument("--under-run", action="store_true",
                   help="run the adaptive setting under adaptrun run (1-2 workers)")
    p.add_argument("--timeout-s", type=float, default=600, help="per run")
    args = p.parse_args()

    names = [args.only] if args.only else list(EXAMPLES)
    with tempfile.TemporaryDirectory(prefix="adaptrun-quality-") as tmp:
        for name in names:
            example = EXAMPLES[name]
            results = {s: [] for s in SETTINGS}
            for seed in range(args.seeds):
                for setting in SETTINGS:
                    cmd, log_dir = command(example, setting, seed, args, pathlib.Path(tmp))
                    r = run_one(cmd, args.timeout_s, log_dir)
                    results[setting].append(r)
                    print(f"  {name} {setting} seed {seed}: {r['metric_name']} "
                          f"{r['metric']:.4f}, {r['steps']} steps, {r['epochs']} epochs, "
                          f"{r['wall_s']:.1f} s",
                          file=sys.stderr, flush=True)
            print_table(name, example, results, args)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
