import json
import shutil
import subprocess
import sys

import pytest

from adaptrun.simulation.traces import bundled_trace_dir


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "adaptrun.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_json_output_has_the_documented_keys(tmp_path):
    png = tmp_path / "timeline.png"
    r = run("simulate", "ncf", "--gpus", "4", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"time_s", "resizes", "fixed_init_s", "best_fixed_s", "best_fixed", "timeline"} <= set(out)
    assert set(out["best_fixed"]) == {"replicas", "batch"}
    assert out["time_s"] < out["fixed_init_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_policy_and_table_output():
    r = run("simulate", str(bundled_trace_dir("cifar10")), "--gpus", "4", "--policy", "fixed",
            "--replicas", "4", "--batch", "512", "--epochs", "5")
    assert r.returncode == 0, r.stderr
    assert "best fixed" in r.stdout and "fixed-init" in r.stdout


@pytest.mark.parametrize("args,expect", [
    (["simulate", "NOWHERE", "--gpus", "4"], "not a folder"),
    (["simulate", "cifar10", "--gpus", "0"], "--gpus must be at least 1"),
    (["simulate", "cifar10", "--gpus", "4", "--policy", "fixed", "--replicas", "2",
      "--batch", "99999"], "pass --batch in"),
    (["simulate", "cifar10", "--gpus", "4", "--policy", "fixed"], "needs --replicas"),
    (["simulate", "cifar10", "--gpus", "4", "--epochs", "500"], "pass 1..100"),
])
def test_bad_input_is_one_line_exit_2(args, expect):
    r = run(*args)
    assert r.returncode == 2
    assert expect in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mismatched_columns_and_missing_placements(tmp_path):
    r = run("simulate", str(tmp_path), "--gpus", "4")
    assert r.returncode == 2 and "placements.csv is missing" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(bundled_trace_dir("cifar10"), bad)
    (bad / "validation-512.csv").write_text("progress,iteration,metric\n1,2,3\n")
    r = run("simulate", str(bad), "--gpus", "4")
    assert r.returncode == 2 and "expected exactly" in r.stderr and "Traceback" not in r.stderr
