"""Draw the adaptrun dashboard's panels for one job from a live Prometheus, as a PNG.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --job-id cifar \
        [--minutes 30 | --start UNIX --end UNIX] [--step 5] [--out dashboard.png]

For a picture of the dashboard without a Grafana: it reads the panels of adaptrun.json (the
same exprs, titles, layout and annotations), fills in ``$job_id`` and Grafana's interval
variables, asks Prometheus's /api/v1/query_range for each target over the time range, and
plots them with matplotlib, resize annotations as vertical lines. Stat panels show their
last value. The README's picture comes from this script.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

DASHBOARD = Path(__file__).with_name("adaptrun.json")


def promql(expr: str, job_id: str, step_s: float, range_s: float) -> str:
    """A dashboard expr as Grafana sends it: $__interval is the step, $__rate_interval at
    least four steps (and 1 m), $__range the whole time range."""
    rate = max(4 * step_s, 60.0)
    return (expr.replace("$job_id", job_id)
            .replace("$__rate_interval", f"{int(rate)}s")
            .replace("$__interval", f"{int(max(step_s, 1))}s")
            .replace("$__range", f"{int(range_s)}s"))


def query_range(url: str, expr: str, start: float, end: float, step_s: float) -> list:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.loads(r.read().decode())
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def _series(result) -> list[tuple[dict, list[datetime], list[float]]]:
    out = []
    for s in result:
        ts = [datetime.fromtimestamp(float(t)) for t, _ in s["values"]]
        vs = [float(v) for _, v in s["values"]]
        out.append((s["metric"], ts, vs))
    return out


def render(url: str, job_id: str, start: float, end: float, step_s: float, out: Path,
           dashboard: dict) -> list[str]:
    """Plot every panel; return the titles of panels that got no data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    span = end - start
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height_in = rows * 0.5 + 0.8
    fig = plt.figure(figsize=(18, height_in))
    fig.suptitle(f"adaptrun: job {job_id}  ({datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S}"
                 f" + {span / 60:.1f} min)", fontsize=13, y=1 - 0.15 / height_in)
    top, title_pad, tick_pad, side_pad = 0.7 / height_in, 0.3 / height_in, 0.35 / height_in, 0.012

    def panel_axes(g):
        """Grafana's 24-column grid, panel by panel, with room for titles and ticks."""
        unit_h = (1 - top) / rows
        left = g["x"] / 24 + side_pad + 0.01
        bottom = 1 - top - (g["y"] + g["h"]) * unit_h + tick_pad
        return fig.add_axes((left, bottom, g["w"] / 24 - 2 * side_pad - 0.01,
                             g["h"] * unit_h - tick_pad - title_pad))

    marks = []        # (name, colour, times)
    for a in dashboard["annotations"]["list"]:
        if not a.get("expr"):
            continue
        result = query_range(url, promql(a["expr"], job_id, step_s, span), start, end, step_s)
        times = sorted({t for _, ts, _ in _series(result) for t in ts})
        marks.append((a["name"], a.get("iconColor", "orange"), times))

    empty = []
    for p in panels:
        g = p["gridPos"]
        ax = panel_axes(g)
        ax.set_title(p["title"], fontsize=10, loc="left")
        data = []
        for t in p.get("targets", []):
            expr = promql(t["expr"], job_id, step_s, span)
            for labels, ts, vs in _series(query_range(url, expr, start, end, step_s)):
                data.append((legend(t.get("legendFormat", ""), labels) or expr, ts, vs))
        if not data:
            empty.append(p["title"])
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if p["type"] == "stat":
            name, ts, vs = data[0]
            last = next((v for v in reversed(vs) if math.isfinite(v)), math.nan)
            text = f"{last:.3g}" + (" s" if unit == "s" else "/s" if unit == "reqps" else "")
            ax.plot(ts, vs, color="tab:blue", alpha=0.3)
            ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=20,
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        overrides = {o["matcher"]["options"]: o["properties"][0]["value"]["fill"]
                     for o in p["fieldConfig"].get("overrides", [])}
        for name, ts, vs in data:
            style = {"dash": "--", "dot": ":"}.get(overrides.get(name, ""), "-")
            finite = [(t, v) for t, v in zip(ts, vs) if math.isfinite(v)]
            if finite:
                ax.step(*zip(*finite), where="post", linestyle=style, linewidth=1.6, label=name)
        custom = p["fieldConfig"]["defaults"].get("custom", {})
        if custom.get("scaleDistribution", {}).get("type") == "log":
            ax.set_yscale("log", base=custom["scaleDistribution"].get("log", 10))
        if unit == "percentunit":
            ax.set_ylim(0, 1.05)
        for i, (name, colour, times) in enumerate(marks):
            for j, t in enumerate(times):
                ax.axvline(t, color=colour, alpha=0.5, linewidth=0.8,
                           label=name if j == 0 else None)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=max(6, g["w"])))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return empty


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--job-id", required=True)
    p.add_argument("--minutes", type=float, default=30.0, help="the last N minutes")
    p.add_argument("--start", type=float, help="unix time (instead of --minutes)")
    p.add_argument("--end", type=float, help="unix time (default: now)")
    p.add_argument("--step", type=float, default=0.0, help="seconds (default: range / 300)")
    p.add_argument("--out", type=Path, default=Path("dashboard.png"))
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = p.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - args.minutes * 60
    if start >= end:
        p.error("--start must be before --end")
    step = args.step or max(1.0, (end - start) / 300)
    try:
        empty = render(args.prometheus.rstrip("/"), args.job_id, start, end, step, args.out,
                       json.loads(args.dashboard.read_text()))
    except OSError as exc:
        print(f"error: cannot query {args.prometheus}: {exc}; is Prometheus running there?",
              file=sys.stderr)
        return 1
    print(f"wrote {args.out}" + (f"; no data for: {', '.join(empty)}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
