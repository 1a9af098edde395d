"""The main job end to end, as a user runs it: `mlops-assets demo` starts the Dagster daemon on a
real instance, submits runs with `dagster job launch`, sends real traffic, registers new versions in
MLflow for `mlflow_registry_sensor` to roll out (a good one by canary, a faulty one that must be
rolled back, blue-green, A/B), then injects drift and follows the closed loop (drift report,
Prometheus alert, retraining on recent traffic, canary, promotion), prints the summary, and leaves
no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.core.processes import free_port
from mlops_assets_tests.conftest import processes_under

#: What the demo may take on a loaded 2-core box (it runs beside other tests); pytest's own limit is above it.
DEMO_TIMEOUT_S = 780

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(DEMO_TIMEOUT_S + 300)]


def test_demo_runs_the_lifecycle_through_the_daemon_and_cleans_up(tmp_path, monkeypatch):
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},
        "MLOPS_HOME": str(home),
        "MLOPS_MLFLOW_UI_PORT": str(free_port()),
        "MLOPS_PROMETHEUS_PORT": str(free_port()),
    }
    cli = str(Path(sys.executable).with_name("mlops-assets"))
    demo = subprocess.Popen(
        [cli, "demo", "--requests", "120"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        stdout, stderr = demo.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # Ctrl-C, as a user would: the demo stops what it started; `mlops-assets stop` whatever is left.
        demo.send_signal(signal.SIGINT)
        stdout, stderr = demo.communicate(timeout=120)
        subprocess.run([cli, "stop"], env=env, capture_output=True, timeout=120, cwd=tmp_path)
        pytest.fail(f"the demo did not finish within {DEMO_TIMEOUT_S} s:\n{(stdout + stderr)[-5000:]}")
    out = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "mlops-assets: lifecycle complete" in out.stdout
    assert "serving/fraud_detector:predictor_answers passed=True" in out.stdout
    assert "| good v2, canary | v2 | canary_rollout_job | promoted | promoted |" in out.stdout
    assert "| faulty v3 (fails 2% of requests), canary | v3 | canary_rollout_job | rolled_back | rolled_back |" in out.stdout
    assert "| v4, blue-green | v4 | blue_green_job | promoted | promoted |" in out.stdout
    assert "| v5 (converts better), A/B test | v5 | ab_test_job | promoted | promoted |" in out.stdout
    # A team's own model, registered by its own script, served because it is declared, rolled out
    # by the sensor with its declared strategy while the fraud drills ran.
    assert "serving/delivery_time:predictor_answers passed=True" in out.stdout
    assert (
        "| delivery_time v2 (a team's own model and script), declared blue-green | v2 | blue_green_job | promoted |" in out.stdout
    )
    assert "Closed loop (drift -> alert -> retrain -> canary -> promote):" in out.stdout
    assert "its canary:    promoted" in out.stdout
    assert "All processes started by the demo were stopped." in out.stdout

    # The runs really went through the instance under DAGSTER_HOME and were launched by the daemon.
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))  # dagster.yaml reads it
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        runs = instance.get_runs()
        alerted = [dict(r.tags) for r in runs if r.job_name == "rollback_job"]
        assert not alerted, f"prometheus_alert_sensor rolled back a stable revision: {alerted}\n{out.stdout[-3000:]}"
        assert {r.job_name for r in runs} == {
            "lifecycle_job",
            "observe_serving_job",
            "canary_rollout_job",
            "blue_green_job",
            "ab_test_job",
            "monitor_drift_job",
            "retrain_job",
        }
        retrain = [r for r in runs if r.job_name == "retrain_job"]
        assert len(retrain) == 1 and retrain[0].tags["mlops-assets/alert"] == "ModelDriftDetected"
        key = dg.AssetKey(["serving", "fraud_detector"])
        events = [r.asset_materialization.metadata for r in instance.fetch_materializations(key, limit=200).records]
        outcomes = {(m["candidate_version"].value, m["rollout_outcome"].value) for m in events if "rollout_outcome" in m}
        assert outcomes == {("2", "promoted"), ("3", "rolled_back"), ("4", "promoted"), ("5", "promoted"), ("6", "promoted")}
        # Zero failed requests on the primary revision while the faulty canary was rolled back.
        (faulty,) = [m for m in events if "rollout_outcome" in m and m["candidate_version"].value == "3"]
        assert faulty["stable_failed_requests"].value == 0
        # Every traffic change of the faulty canary is on record with its evidence.
        v3 = [m for m in events if m.get("candidate_version") and m["candidate_version"].value == "3" and "rollout_event" in m]
        assert {m["rollout_event"].value for m in v3} >= {"canary_start", "rollback"}
        assert all("evidence" in m for m in v3 if m["rollout_event"].value == "rollback")
        # The champion alias followed the rollouts: v5 won its A/B test, then v6 was retrained and promoted.
        champion = instance.get_latest_materialization_event(dg.AssetKey(["models", "fraud_detector_champion"]))
        assert champion.asset_materialization.metadata["champion_version"].value == "6"
        # Drift was flagged on the shifted traffic, and not against the retrained model.
        drift_key = dg.AssetKey(["monitoring", "fraud_detector_drift"])
        reports = [r.asset_materialization.metadata for r in instance.fetch_materializations(drift_key, limit=10).records]
        assert [m["dataset_verdict"].value for m in reports] == ["no_drift", "drift"]  # newest first
        # The faulty canary's checks failed; the first version's error-rate check had no data yet.
        checks = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(key, "error_rate"), limit=50)
        assert any(c.status.value == "FAILED" for c in checks)
    assert not processes_under(home), processes_under(home)
