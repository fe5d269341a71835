"""The dashboard and the rules against a real Prometheus scraping a real `adaptrun run`.

A real `adaptrun run` (embedded controller, local agent, tests/workers/lsq_worker.py) trains a
job, and the real `prometheus` binary (Debian's package; CI installs it) scrapes its /metrics
every second with deploy/prometheus/rules.yml loaded and evaluated every second. Through
Prometheus's HTTP API the test then runs every expr of the Grafana dashboard (with $job_id and
Grafana's interval variables filled in), every recording rule and every alert's expression
with its final comparison removed (a quiet alert returns nothing, the figure it compares must
not), and fails when any of them returns no data. /api/v1/rules must show every rule healthy.
The job is long on purpose: the test ends it (and Prometheus) in ``finally``, by process group.
Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_prometheus_rules import dashboard_exprs, grafana_to_promql
from workers import harness

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "adaptrun.json"
JOB = "live"
# A trailing comparison with a number: `x > 0`, `x != 0`, `x >= bool 6`.
FINAL_COMPARISON = re.compile(r"^(?P<lhs>.+?)\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?[-+]?[0-9.eE]+\s*$",
                              re.S)


def strip_comparison(expr: str) -> str:
    """An alert's (or annotation's) expr without its final `op number`: the figure compared."""
    m = FINAL_COMPARISON.match(expr.strip())
    assert m, f"alert expr does not end in a comparison with a number: {expr!r}"
    return m.group("lhs")


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def query(prom: str, expr: str) -> list:
    body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _wait(what: str, fn, deadline: float, procs):
    while True:
        try:
            got = fn()
        except OSError:
            got = None
        if got:
            return got
        dead = [p.args[:4] for p in procs if p.poll() is not None]
        assert not dead, f"exited while waiting for {what}: {dead}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM first (Prometheus closes its TSDB; `adaptrun run` stops its agents), then
    the group's SIGKILL."""
    if proc is None or proc.poll() is not None:
        harness.stop(proc)
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    harness.stop(proc)


def _kill_agents_of(controller: str) -> None:
    """The local actuator starts each agent in a session of its own, outside the run's
    process group: should `adaptrun run` have died before stopping them, end the groups of
    the agents that talk to this test's controller (its port is this test's alone)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--controller" in argv and controller.encode() in argv:
            try:
                os.killpg(int(cmdline.parent.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.timeout(150)
def test_every_dashboard_and_rule_query_returns_data_from_a_live_run(tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed: `apt-get install prometheus` (Debian/Ubuntu)")
    port, metrics_port, prom_port = (harness.free_port() for _ in range(3))
    prom = f"http://127.0.0.1:{prom_port}"
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "adaptrun-controller",
                                  "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    out.mkdir()
    run_cmd = [sys.executable, "-m", "adaptrun.cli", "run", "--job", JOB, "--min-workers", "1",
               "--max-workers", "1", "--port", str(port), "--metrics-port", str(metrics_port),
               "--policy-interval-s", "1", "--log-dir", str(tmp_path / "logs"), "--no-progress",
               "--capacity", "1",     # the cluster row of the dashboard has data too
               "--", sys.executable, str(harness.WORKER), "--samples", "2048", "--batch", "32",
               "--epochs", "500", "--step-sleep", "0.02", "--out", str(out)]
    prom_cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
    run = proc = None
    t0 = time.monotonic()
    try:
        run = harness.start(run_cmd, harness.base_env(), tmp_path / "run.log")
        proc = harness.start(prom_cmd, harness.base_env(), tmp_path / "prometheus.log")
        procs = [run, proc]
        deadline = time.monotonic() + 90
        _wait("prometheus ready", lambda: urllib.request.urlopen(
            f"{prom}/-/ready", timeout=2).status == 200, deadline, procs)
        # The job has reported and the policy has run at least twice (rate() needs two
        # samples): the newest gauge of the policy run is scraped.
        _wait("the job's first policy runs in prometheus", lambda: query(
            prom, f'adaptrun_policy_seconds_count{{job_id="{JOB}"}} >= 2 and on() '
                  f'count(adaptrun_policy_wanted_workers{{job_id="{JOB}"}}) > 0'),
            deadline, procs)
        t_data = time.monotonic() - t0

        rules_doc = yaml.safe_load(RULES.read_text())
        rules = [r for g in rules_doc["groups"] for r in g["rules"]]
        dash = json.loads(DASHBOARD.read_text())
        # Annotations, like alerts, are conditions (`... > 0`): what they compare must exist.
        checks = [(f"dashboard {where}", grafana_to_promql(
                      strip_comparison(e) if where.startswith("annotation") else e, JOB))
                  for where, e in dashboard_exprs(dash)]
        checks += [(f"record {r['record']}", r["record"]) for r in rules if "record" in r]
        checks += [(f"record {r['record']} (expr)", r["expr"]) for r in rules if "record" in r]
        checks += [(f"alert {r['alert']}", strip_comparison(r["expr"]))
                   for r in rules if "alert" in r]
        # Every check returns data within a few evaluations (rules run every second).
        empty = checks
        while empty:
            empty = [(w, e) for w, e in empty if not query(prom, e)]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert not empty, "queries with no data:\n" + "\n".join(f"  {w}: {e}" for w, e in empty)
        for r in rules:                          # the full alert exprs are valid PromQL too
            if "alert" in r:
                query(prom, r["expr"])

        # The dashboard's job selector lists the job.
        values = _get(f"{prom}/api/v1/label/job_id/values?"
                      + urllib.parse.urlencode({"match[]": "adaptrun_goodput"}))["data"]
        assert JOB in values
        # The job's figures are sane: one worker, goodput > 0, the policy's wish in [1, 2].
        def value(expr):
            return float(query(prom, expr)[0]["value"][1])
        assert value(f'adaptrun_workers{{job_id="{JOB}"}}') == 1
        assert value(f'adaptrun_goodput{{job_id="{JOB}"}}') > 0
        assert 1 <= value(f'adaptrun_policy_wanted_workers{{job_id="{JOB}"}}') <= 2
        assert value(f'job_id:adaptrun_workers:unmet{{job_id="{JOB}"}}') == 0
        assert 0 <= value(f'job_id:adaptrun_report_silence:seconds{{job_id="{JOB}"}}') < 30
        assert not query(prom, '{__name__=~".+_created"}'), "the controller exports _created"
        assert not query(prom, '{exported_job!=""}'), "a scraped `job` label was renamed"

        # Prometheus loaded every rule of rules.yml, and each evaluates without error.
        def rules_healthy():
            got = _get(f"{prom}/api/v1/rules")["data"]["groups"]
            loaded = [r for g in got for r in g["rules"]]
            return len(loaded) == len(rules) and all(r["health"] == "ok" for r in loaded) \
                and loaded
        loaded = _wait("every rule healthy", rules_healthy, deadline, procs)
        assert {r["name"] for r in loaded} == {r.get("record") or r["alert"] for r in rules}
        assert all(not r.get("lastError") for r in loaded), [r for r in loaded
                                                              if r.get("lastError")]
        print(f"\n{len(checks)} queries with data; first data after {t_data:.1f} s, "
              f"total {time.monotonic() - t0:.1f} s")
    except BaseException:
        print("--- adaptrun run log ---\n" + harness.tail(tmp_path / "run.log"))
        print("--- prometheus log ---\n" + harness.tail(tmp_path / "prometheus.log"))
        raise
    finally:
        _stop(run, grace_s=20)
        _kill_agents_of(f"127.0.0.1:{port}")
        _stop(proc)
