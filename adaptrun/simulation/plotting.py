"""Timeline plots (matplotlib, Agg backend): what the job ran at, and how well, over time."""
from __future__ import annotations

__all__ = ["plot_simulation", "plot_run", "plot_cluster"]


def plot_simulation(summary: dict, path: str) -> None:
    """Batch, replicas, efficiency and goodput against simulated time, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = summary["timeline"]
    xs, batch, replicas, eff, good = [], [], [], [], []
    for s in segs:
        for x in (s["start_s"], s["end_s"]):
            xs.append(x / 60.0)
            batch.append(s["global_batch"] or float("nan"))
            replicas.append(s["replicas"])
            eff.append(s["efficiency"] if s["replicas"] else float("nan"))
            good.append(s["goodput"])
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 8))
    series = [(batch, "global batch"), (replicas, "replicas"), (eff, "statistical efficiency"),
              (good, "goodput (B0-examples/s)")]
    for ax, (ys, label) in zip(axes, series):
        ax.plot(xs, ys, drawstyle="steps-post")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log", base=2)
    axes[-1].set_xlabel("simulated time (min)")
    fig.suptitle(f"{summary['workload']}: {summary['policy']} on {summary['gpus']} GPUs, "
                 f"{summary['time_s'] / 60:.1f} min (best fixed "
                 f"{summary['best_fixed_s'] / 60:.1f} min), {summary['resizes']} resizes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RUN_SERIES = (("global_batch", "global batch"), ("workers", "workers"), ("lr", "learning rate"),
              ("noise_scale", "noise scale (examples)"), ("goodput", "goodput (B0-examples/s)"))


def plot_run(samples: list[dict], path: str, title: str,
             decisions: list[tuple[float, int]] = ()) -> None:
    """A live run's timeline: each of ``RUN_SERIES`` against wall time (``t_s``), as a PNG,
    with each decision (time, generation) marked by a dashed line on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["t_s"] for s in samples]
    fig, axes = plt.subplots(len(RUN_SERIES), 1, sharex=True, figsize=(9, 9))
    for ax, (key, label) in zip(axes, RUN_SERIES):
        ax.plot(xs, [s.get(key, float("nan")) for s in samples], drawstyle="steps-post")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if key == "noise_scale" and any(v > 0 for v in (s.get(key, 0) for s in samples)):
            ax.set_yscale("log")      # one noisy window can be 50x the rest: log keeps the trend
        for t_s, _gen in decisions:
            ax.axvline(t_s, color="tab:red", linestyle="--", linewidth=0.8, alpha=0.6)
    for t_s, gen in decisions:
        axes[0].annotate(f"d{gen}", (t_s, 1.0), xycoords=("data", "axes fraction"),
                         fontsize=7, color="tab:red", ha="left", va="top")
    axes[-1].set_xlabel("wall time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cluster(results: list, capacity: int, path: str) -> None:
    """Per policy, the GPUs each job holds over time (stacked), as one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 1, sharex=True, figsize=(10, 2.2 * len(results)))
    axes = np.atleast_1d(axes)
    for ax, res in zip(axes, results):
        names = [j.name for j in res.jobs]
        ts = np.array([t for t, _ in res.timeline]) / 3600.0
        ys = np.array([[alloc.get(n, 0) for t, alloc in res.timeline] for n in names])
        ax.stackplot(ts, ys, step="post", linewidth=0)
        ax.axhline(capacity, color="black", linewidth=0.8)
        s = res.summary()
        ax.set_title(f"{res.policy}: average JCT {s['avg_jct_h']:.2f} h, makespan "
                     f"{s['makespan_h']:.1f} h", fontsize=9)
        ax.set_ylabel("GPUs", fontsize=8)
        ax.set_ylim(0, capacity * 1.05)
    axes[-1].set_xlabel("simulated time (h)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
