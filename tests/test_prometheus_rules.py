"""deploy/prometheus and deploy/grafana, checked offline with the real promtool.

- rules.yml is a valid rules file, its alerts have the shape the mixins use (a ``for``, a
  severity, summary and description), and rules_test.yml's ``promtool test rules`` cases
  pass, with, for every alert, a case where it fires and one where it must not.
- prometheus.yml (with rules.yml beside it) is a valid config, and so is its commented
  kubernetes_sd example once uncommented.
- adaptrun.json is what build_dashboard.py writes, every PromQL expr in it parses, and
  every metric the rules and the dashboard read is one the controller exports.

promtool comes with Debian's prometheus package; it is not optional: CI installs it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (Debian/Ubuntu) "
                    "or put the promtool of a Prometheus release on PATH")
    return path


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def _rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.mark.timeout(60)
def test_rules_file_is_valid_and_alerts_are_shaped_like_the_mixins():
    res = _run("check", "rules", str(PROM / "rules.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    alerts = [r for r in _rules() if "alert" in r]
    records = [r for r in _rules() if "record" in r]
    assert len(alerts) >= 7 and len(records) >= 7
    for r in records:
        assert re.fullmatch(r"[a-z_]+:adaptrun_[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]
    for a in alerts:
        assert a.get("for"), a["alert"]
        assert a["labels"]["severity"] in ("info", "warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]


@pytest.mark.timeout(120)
def test_promtool_rule_tests_pass_and_cover_every_alert_both_ways():
    res = _run("test", "rules", "rules_test.yml", cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    cases = yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in cases:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts <= fires, f"alerts with no case where they fire: {alerts - fires}"
    assert alerts <= quiet, f"alerts with no case where they stay quiet: {alerts - quiet}"


@pytest.mark.timeout(60)
def test_scrape_config_and_its_kubernetes_example_are_valid(tmp_path):
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
    text = (PROM / "prometheus.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(text)
    res = _run("check", "config", str(tmp_path / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout

    config = yaml.safe_load(text)
    assert [j["job_name"] for j in config["scrape_configs"]] == ["adaptrun-controller"]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"][0].endswith(":9464")
    # The commented kubernetes_sd job, uncommented in place of the static one.
    block = re.search(r"# kubernetes_sd example begin\n(.*?)\n\s*# kubernetes_sd example end",
                      text, re.S)
    assert block, "prometheus.yml lost its kubernetes_sd example"
    job = "\n".join(re.sub(r"^\s*# ?", "", line) for line in block.group(1).splitlines())
    k8s = yaml.safe_load(job)
    assert k8s[0]["kubernetes_sd_configs"][0]["role"] == "endpoints"
    config["scrape_configs"] = k8s
    (tmp_path / "k8s.yml").write_text(yaml.safe_dump(config))
    res = _run("check", "config", str(tmp_path / "k8s.yml"))
    if "field kubernetes_sd_configs not found" in res.stdout + res.stderr:
        # Debian's promtool is built without Kubernetes discovery (its Go client is not
        # packaged): it cannot judge the example, an upstream release's promtool does.
        relabel = k8s[0]["relabel_configs"]
        assert relabel[0]["action"] == "keep" and relabel[0]["regex"] == "adaptrun-controller;metrics"
        return
    assert res.returncode == 0, res.stdout + res.stderr


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and annotation of a Grafana dashboard."""
    out = []
    panels = list(dashboard["panels"])
    while panels:
        p = panels.pop(0)
        panels.extend(p.get("panels", []))           # collapsed rows
        out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    out += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"]
            if a.get("expr")]
    return out


def grafana_to_promql(expr: str, job_id: str) -> str:
    """A dashboard expr as Grafana would send it, for one job."""
    return (expr.replace("$job_id", job_id).replace("$__rate_interval", "1m")
            .replace("$__interval", "15s").replace("$__range", "1m"))


@pytest.mark.timeout(60)
def test_dashboard_is_generated_parses_and_reads_exported_metrics(tmp_path):
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboard
    finally:
        sys.path.remove(str(GRAFANA))
    committed = (GRAFANA / "adaptrun.json").read_text()
    assert committed == build_dashboard.render(), (
        "deploy/grafana/adaptrun.json differs from build_dashboard.py's output: run "
        "`python deploy/grafana/build_dashboard.py` and commit both")
    dash = json.loads(committed)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["job_id"]["query"] == "label_values(adaptrun_goodput, job_id)"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs(dash)
    titles = {where for where, _ in exprs}
    for want in ("Goodput", "Throughput", "Statistical efficiency",
                 "Noise scale and global batch", "Learning rate", "Workers and bounds",
                 "Rejected reports", "annotation Resizes decided"):
        assert want in titles, want
    assert "Cluster: GPUs allocated" in titles and "Cluster: workers per job" in titles
    for where, expr in exprs:
        if not where.startswith("Cluster:"):      # the cluster row shows every job at once
            assert '{job_id="$job_id"}' in expr, where
    # Every expr parses: promtool checks them as recording rules of a scratch file.
    scratch = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr:{i}", "expr": grafana_to_promql(e, "x")}
        for i, (_, e) in enumerate(exprs)]}]}
    (tmp_path / "exprs.yml").write_text(yaml.safe_dump(scratch))
    res = _run("check", "rules", str(tmp_path / "exprs.yml"))
    assert res.returncode == 0, res.stdout + res.stderr

    # Every adaptrun_ name the rules and the dashboard read is one the controller exports.
    from adaptrun.controller.metrics import Metrics, report_figures
    from adaptrun.science.report import Report
    m = Metrics()
    r = Report("x", step=1, progress=1.0, world_size=1, nodes=1, local_batch=8, accum_steps=0,
               init_batch=8, step_time_s=0.1, sync_time_s=0.0, grad_sqr=1.0, grad_var=1.0)
    m.observe_report(r, report_figures(r))
    m.set_workers_desired("x", 1)
    m.set_policy_wanted("x", 1)
    m.set_allocated("x", 1, 0.0)
    m.set_cluster(4, 1, 0)
    exported = {s.name for fam in m.registry.collect() for s in fam.samples}
    text = committed + (PROM / "rules.yml").read_text()
    read = set(re.findall(r"(?<![:\w])(adaptrun_[a-z_]+)", text))
    assert read and read <= exported, f"not exported by the controller: {read - exported}"
