"""The jobs are honest: each rollout job binds its own strategy through its run tag, `rollback_job`
is explicit, and a rollout job launched without a version (and no `challenger` alias) fails with a
message that asks for one, without touching what is served. Runs go through a real Dagster
instance and the real `dagster job launch` CLI, against a real SQLite MLflow registry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlops_assets.core.registry import CHAMPION, MlflowRegistry
from mlops_assets.core.rollout.policy import Strategy
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets.core.settings import load_settings
from mlops_assets.definitions import unbound_assets_and_checks
from mlops_assets.defs.resources import build_resources
from mlops_assets.defs.serving.assets import ACTIONS, ROLLBACK, ROLLOUT_TAG
from mlops_assets.defs.serving.jobs import JOB_FOR_STRATEGY, rollback_job, rollout_jobs
from mlops_assets.demo.training import train_and_register
from mlops_assets_tests.helpers import project_cli

ALL_ASSETS, ALL_CHECKS = unbound_assets_and_checks()

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fraud_detector"


def test_every_strategy_has_its_job_and_each_job_binds_its_strategy():
    assert set(JOB_FOR_STRATEGY) == set(Strategy)
    tags = {job.name: job.tags[ROLLOUT_TAG] for job in rollout_jobs}
    assert tags == {
        "canary_rollout_job": "canary",
        "blue_green_job": "blue_green",
        "ab_test_job": "ab_test",
        "shadow_job": "shadow",
        "shadow_then_canary_job": "shadow_then_canary",
    }
    assert rollback_job.tags[ROLLOUT_TAG] == ROLLBACK
    assert set(ACTIONS) == {"canary", "blue_green", "ab_test", "shadow", "shadow_then_canary", "rollback"}


@pytest.fixture()
def champion_only(tmp_path):
    """A registry whose model has a champion and no challenger; nothing served."""
    home = tmp_path / "mlops"
    (home / "mlflow").mkdir(parents=True)
    resources = build_resources(load_settings({"MLOPS_HOME": str(home)}))
    registry: MlflowRegistry = resources["mlflow"]
    v1 = train_and_register(registry, MODEL, n_rows=300, seed=1)
    registry.set_alias(MODEL, CHAMPION, v1.version)
    return {**resources, "serving": LocalPlatform(home=str(home), supervise=False)}


def _defs(resources) -> dg.Definitions:
    return dg.Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=[*rollout_jobs, rollback_job], resources=resources)


def _failure_messages(result) -> str:
    return "\n".join(str(e.event_specific_data.error.message) for e in result.all_events if e.event_type_value == "STEP_FAILURE")


def test_a_canary_without_version_or_challenger_asks_for_one_and_deploys_nothing(champion_only):
    platform = champion_only["serving"]
    job = _defs(champion_only).resolve_job_def("canary_rollout_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    message = _failure_messages(result)
    assert "canary rollout of fraud_detector: which version?" in message
    assert "challenger" in message and "version" in message
    assert platform.list_services() == [], "a rollout job must never fall back to deploying the champion"
    assert not result.get_asset_materialization_events()


def test_the_old_strategy_config_is_refused_by_name(champion_only):
    job = _defs(champion_only).resolve_job_def("blue_green_job")
    config = {"ops": {"serving__fraud_detector": {"config": {"strategy": "blue_green", "version": "1"}}}}
    with dg.instance_for_test() as instance, pytest.raises(dg.DagsterInvalidConfigError, match="strategy"):
        job.execute_in_process(instance=instance, run_config=config)


def test_a_rollout_tag_naming_no_action_fails_clearly(champion_only):
    platform = champion_only["serving"]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=dg.AssetSelection.assets(["serving", MODEL]),
            resources=champion_only,
            instance=instance,
            tags={ROLLOUT_TAG: "yolo"},
            raise_on_error=False,
        )
    assert not result.success
    assert "names no rollout" in _failure_messages(result) and platform.list_services() == []


def _instance_env(tmp_path: Path) -> dict:
    """The project's instance (storage included) in a fresh DAGSTER_HOME, with dagster's
    DefaultRunCoordinator for its queued one, so a launched run starts at once in its own process
    instead of waiting for a daemon."""
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    instance_yaml = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    instance_yaml["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
    return {**os.environ, "MLOPS_HOME": str(tmp_path / "mlops"), "DAGSTER_HOME": str(dagster_home)}


@pytest.mark.e2e
def test_dagster_job_launch_of_canary_without_config_fails_asking_for_the_version(champion_only, tmp_path, monkeypatch):
    """The CLI path a user takes: `dagster job launch -w workspace.yaml -j canary_rollout_job`."""
    env = _instance_env(tmp_path)
    out = project_cli("dagster", "job", "launch", "-w", "workspace.yaml", "-j", "canary_rollout_job", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        deadline = time.monotonic() + 150
        while True:
            (run,) = instance.get_runs()
            if run.is_finished or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert run.status == dg.DagsterRunStatus.FAILURE, run.status
        assert run.tags[ROLLOUT_TAG] == "canary"
        failures = [
            str(e.dagster_event.event_specific_data.error.message)
            for e in instance.all_logs(run.run_id)
            if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_FAILURE"
        ]
    assert any("which version?" in f for f in failures), failures
    assert LocalPlatform(home=str(tmp_path / "mlops"), supervise=False).list_services() == []


@pytest.mark.e2e
def test_dg_launch_of_canary_without_config_fails_asking_for_the_version(champion_only, tmp_path):
    """`dg launch --job canary_rollout_job`: dg finds the code location through `[tool.dg]` in
    pyproject.toml and runs the job on the instance in DAGSTER_HOME."""
    env = _instance_env(tmp_path)
    out = project_cli("dg", "launch", "--job", "canary_rollout_job", env=env)
    assert out.returncode != 0
    assert "canary rollout of fraud_detector: which version?" in out.stdout + out.stderr
    assert LocalPlatform(home=str(tmp_path / "mlops"), supervise=False).list_services() == []
