"""The main job end to end, as a user runs it: `mlops-assets demo` starts the Dagster daemon on a
real instance, submits runs with `dagster job launch`, sends real traffic, prints the summary, and
leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from mlops_assets.processes import free_port
from mlops_assets_tests.conftest import processes_under


def test_demo_runs_the_lifecycle_through_the_daemon_and_cleans_up(tmp_path, monkeypatch):
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},
        "MLOPS_HOME": str(home),
        "MLOPS_MLFLOW_UI_PORT": str(free_port()),
        "MLOPS_PROMETHEUS_PORT": str(free_port()),
    }
    cli = str(Path(sys.executable).with_name("mlops-assets"))
    out = subprocess.run([cli, "demo", "--requests", "120"], env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "mlops-assets: lifecycle complete" in out.stdout
    assert "serving/fraud_detector:predictor_answers passed=True" in out.stdout
    assert "| fraud-detector-predictor-00001 | 1 | 100 |" in out.stdout
    assert "All processes started by the demo were stopped." in out.stdout

    # The runs really went through the instance under DAGSTER_HOME and were launched by the daemon.
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))  # dagster.yaml reads it
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        runs = instance.get_runs()
        assert {r.job_name for r in runs} == {"lifecycle_job", "observe_serving_job"}
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        serving = instance.get_latest_materialization_event(dg.AssetKey(["serving", "fraud_detector"]))
        assert serving.asset_materialization.metadata["requests_total"].value >= 120
    assert not processes_under(home), processes_under(home)
