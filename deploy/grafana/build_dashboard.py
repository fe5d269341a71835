"""Write deploy/grafana/adaptrun.json, the Grafana dashboard of adaptrun jobs.

The dashboard is generated rather than edited by hand: a dozen panels share one datasource,
one ``$job_id`` selector, legends and a grid layout, and writing that JSON by hand repeats
each of them on every panel. Here each panel is one line of what it shows (title, PromQL,
unit); run ``python deploy/grafana/build_dashboard.py`` after changing it and commit both
files (tests/test_prometheus_rules.py fails when they differ). The exprs read the
controller's metrics (controller/metrics.py) and the recording rules of
deploy/prometheus/rules.yml; tests/test_prometheus_live.py runs every one of them against a
real Prometheus scraping a real ``adaptrun run``, and deploy/grafana/render.py draws them.

The datasource is a dashboard variable (``$datasource``, any Prometheus), so the same file
works imported through the UI, provisioned from a file or loaded by the Grafana sidecar.
Standard library only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("adaptrun.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
J = '{job_id="$job_id"}'

# (title, description, unit, [(expr, legend)], width, options)
ROWS = [
    [
        ("Goodput", "B0-equivalent examples per second: throughput x statistical efficiency. "
         "The policy moves the job to the configuration where this is highest.",
         "short", [(f"adaptrun_goodput{J}", "goodput"),
                   (f"job_id:adaptrun_goodput:avg_over_time1h{J}", "1 h average")], 12, {}),
        ("Throughput", "Examples per second at the current configuration "
         "(global batch / step time).",
         "short", [(f"adaptrun_throughput_examples_per_second{J}", "examples/s")], 12, {}),
    ],
    [
        ("Statistical efficiency", "E(B) = (B_noise + B0) / (B_noise + B): how much of each "
         "example of a batch of B counts, against the initial batch B0.",
         "percentunit", [(f"adaptrun_statistical_efficiency{J}", "efficiency")], 6,
         {"min": 0, "max": 1}),
        ("Noise scale and global batch", "Gradient noise scale B_noise (the critical batch, "
         "McCandlish et al. 2018) beside the global batch the job runs.",
         "short", [(f"adaptrun_noise_scale_examples{J}", "noise scale"),
                   (f"adaptrun_global_batch_size{J}", "global batch")], 6, {"log": 2}),
        ("Local batch and accumulation", "Examples per replica per micro-batch, and the extra "
         "micro-batches per optimizer step.",
         "short", [(f"adaptrun_local_batch_size{J}", "local batch"),
                   (f"adaptrun_accumulation_steps{J}", "accumulation steps")], 6, {}),
        ("Learning rate", "The LR of the last report: scaled with the batch by the script's "
         "rule (linear, square root, AdaScale).",
         "short", [(f"adaptrun_learning_rate{J}", "lr")], 6, {}),
    ],
    [
        ("Workers and bounds", "Workers reporting; the bounds [min, max]; what the actuator is "
         "moving the job to (desired); and the count the policy would choose were the bounds "
         "[1, 2 x max] (policy wants).",
         "none", [(f"adaptrun_workers{J}", "workers"),
                  (f"adaptrun_workers_min{J}", "min"),
                  (f"adaptrun_workers_max{J}", "max"),
                  (f"adaptrun_workers_desired{J}", "desired"),
                  (f"adaptrun_policy_wanted_workers{J}", "policy wants")], 12,
         {"decimals": 0, "dashed": ("min", "max"), "dotted": ("desired", "policy wants")}),
        ("Rejected reports", "Reports the controller rejected, per second, by reason. Rejected "
         "reports do not reach the policy.",
         "reqps", [("sum by (reason) (rate(adaptrun_rejected_reports_total"
                    '{job_id="$job_id"}[$__rate_interval]))', "{{reason}}")], 12, {}),
    ],
    [
        ("Cluster: GPUs allocated", "Under a controller with --capacity: the GPUs its cluster "
         "allocation shares, how many it gives to jobs, and the jobs waiting in its queue.",
         "none", [("adaptrun_cluster_capacity_gpus", "capacity"),
                  ("adaptrun_cluster_allocated_gpus", "allocated"),
                  ("adaptrun_cluster_queued_jobs", "jobs queued")], 12,
         {"decimals": 0, "dashed": ("capacity",)}),
        ("Cluster: workers per job", "Workers the allocation gives each job (0: queued), and "
         "how long each queued job has waited.",
         "none", [("adaptrun_workers_allocated", "{{job_id}}"),
                  ("adaptrun_job_queued_seconds", "{{job_id}} queued (s)")], 12,
         {"decimals": 0}),
    ],
]

STATS = [
    ("Seconds since the last report", "s",
     f"time() - adaptrun_last_report_timestamp_seconds{J}"),
    ("Resizes decided (time range)", "none",
     'increase(adaptrun_resizes_total{job_id="$job_id"}[$__range])'),
    ("Policy run time p99", "s",
     "histogram_quantile(0.99, sum by (le) (rate(adaptrun_policy_seconds_bucket"
     '{job_id="$job_id"}[$__rate_interval])))'),
    ("Reports accepted per second", "reqps",
     'rate(adaptrun_reports_total{job_id="$job_id"}[$__rate_interval])'),
]

# A mark where the value differs from one step earlier: one mark per change at any step (a
# range function such as changes(x[$__interval]) sees nothing when the step is shorter than
# the scrape interval).
ANNOTATIONS = [
    ("Resizes decided", "orange",
     'adaptrun_resizes_total{job_id="$job_id"} '
     '- adaptrun_resizes_total{job_id="$job_id"} offset $__interval > 0'),
    ("Workers changed", "purple",
     'abs(adaptrun_workers{job_id="$job_id"} '
     '- adaptrun_workers{job_id="$job_id"} offset $__interval) > 0'),
]


def _targets(queries) -> list[dict]:
    return [{"datasource": DS, "expr": expr, "legendFormat": legend, "range": True,
             "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(queries)]


def _style(name: str, style: str) -> dict:
    dash = [10, 10] if style == "dash" else [0, 10]
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": style, "dash": dash}}]}


def _timeseries(pid, title, description, unit, queries, x, y, w, opts) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 0, "showPoints": "never",
              "spanNulls": False, "lineInterpolation": "stepAfter"}
    if "log" in opts:
        custom["scaleDistribution"] = {"type": "log", "log": opts["log"]}
    defaults = {"unit": unit, "custom": custom}
    for key in ("min", "max", "decimals"):
        if key in opts:
            defaults[key] = opts[key]
    overrides = ([_style(n, "dash") for n in opts.get("dashed", ())]
                 + [_style(n, "dot") for n in opts.get("dotted", ())])
    return {"id": pid, "type": "timeseries", "title": title, "description": description,
            "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": 8},
            "fieldConfig": {"defaults": defaults, "overrides": overrides},
            "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}},
            "targets": _targets(queries)}


def _stat(pid, title, unit, expr, x, y, w) -> dict:
    return {"id": pid, "type": "stat", "title": title, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": w, "h": 4},
            "fieldConfig": {"defaults": {"unit": unit, "decimals": 2 if unit == "s" else 0},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "none", "graphMode": "area", "textMode": "value"},
            "targets": [{"datasource": DS, "expr": expr, "instant": False, "range": True,
                         "refId": "A", "legendFormat": title}]}


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    w = 24 // len(STATS)
    for i, (title, unit, expr) in enumerate(STATS):
        panels.append(_stat(pid, title, unit, expr, i * w, y, w))
        pid += 1
    y += 4
    for row in ROWS:
        x = 0
        for title, description, unit, queries, width, opts in row:
            panels.append(_timeseries(pid, title, description, unit, queries, x, y, width, opts))
            pid, x = pid + 1, x + width
        y += 8
    annotations = [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts", "type": "dashboard"}]
    for name, color, expr in ANNOTATIONS:
        annotations.append({"datasource": DS, "enable": True, "hide": False, "iconColor": color,
                            "name": name, "expr": expr, "step": "",
                            "target": {"expr": expr, "refId": "Anno", "datasource": DS},
                            "titleFormat": name, "textFormat": "job {{job_id}}",
                            "useValueForTime": False})
    return {
        "title": "adaptrun",
        "uid": "adaptrun",
        "description": "adaptrun jobs: goodput, throughput, statistical efficiency, noise "
                       "scale, batch, LR, workers within their bounds, resizes and rejected "
                       "reports, per job_id. Generated by deploy/grafana/build_dashboard.py "
                       "(edit that, not this file); needs the recording rules of "
                       "deploy/prometheus/rules.yml.",
        "tags": ["adaptrun"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "links": [],
        "annotations": {"list": annotations},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            {"type": "query", "name": "job_id", "label": "Job", "datasource": DS,
             "definition": "label_values(adaptrun_goodput, job_id)",
             "query": "label_values(adaptrun_goodput, job_id)", "current": {}, "hide": 0,
             "refresh": 2, "sort": 1, "multi": False, "includeAll": False, "regex": "",
             "options": []},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
