"""`mlflow_registry_sensor` against a real SQLite MLflow registry: cursored, idempotent run keys,
strategy from tags, cost proportional to what is new, and no version lost while MLflow is down."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from mlops_assets.core.registry import CHALLENGER, CHAMPION, MlflowRegistry
from mlops_assets.defs.serving.sensors import mlflow_registry_sensor
from mlops_assets.demo.training import train_and_register
from mlops_assets_tests.helpers import FRAUD, declared

MODEL = "fraud_detector"


@pytest.fixture()
def registry(tmp_path) -> MlflowRegistry:
    (tmp_path / "mlflow").mkdir()
    return MlflowRegistry(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow/mlflow.db", artifact_root=str(tmp_path / "mlflow" / "artifacts")
    )


def _tick(registry, cursor=None):
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"mlflow": registry}, repository_def=declared(FRAUD)
        )
        return mlflow_registry_sensor(context)


def test_no_model_yet_skips_with_a_reason(registry):
    result = _tick(registry)
    assert not result.run_requests
    assert "not registered" in result.skip_reason.skip_message


def test_new_versions_launch_rollouts_with_strategy_from_tags(registry):
    v1 = train_and_register(registry, MODEL, n_rows=500, seed=1)
    registry.set_alias(MODEL, CHAMPION, v1.version)
    first = _tick(registry)
    assert not first.run_requests and "nothing newer than v1" in first.skip_reason.skip_message
    train_and_register(registry, MODEL, n_rows=500, seed=2)
    train_and_register(registry, MODEL, n_rows=500, seed=3, strategy="blue_green")
    second = _tick(registry, first.cursor)
    assert [(r.run_key, r.job_name) for r in second.run_requests] == [
        ("fraud_detector:2:canary", "canary_rollout_job"),
        ("fraud_detector:3:blue_green", "blue_green_job"),
    ]
    request = second.run_requests[0]
    assert request.run_config["ops"]["serving__fraud_detector"]["config"]["version"] == "2"
    assert request.tags["mlops-assets/isvc"] == "fraud-detector"
    assert json.loads(second.cursor)[MODEL]["seen"] == 3
    # Idempotent: the next tick with the new cursor launches nothing.
    third = _tick(registry, second.cursor)
    assert not third.run_requests


def test_a_moved_challenger_alias_launches_a_rollout(registry):
    v1 = train_and_register(registry, MODEL, n_rows=500, seed=1)
    registry.set_alias(MODEL, CHAMPION, v1.version)
    train_and_register(registry, MODEL, n_rows=500, seed=2)
    cursor = _tick(registry, _tick(registry).cursor).cursor
    registry.set_alias(MODEL, CHALLENGER, "1")
    assert not _tick(registry, cursor).run_requests  # the champion itself is not re-rolled
    registry.set_alias(MODEL, CHALLENGER, "2")
    result = _tick(registry, cursor)
    assert [r.run_key for r in result.run_requests] == ["fraud_detector:2:canary"]


def test_mlflow_down_skips_with_the_cursor_unchanged_and_loses_no_version(registry, tmp_path):
    v1 = train_and_register(registry, MODEL, n_rows=500, seed=1)
    registry.set_alias(MODEL, CHAMPION, v1.version)
    cursor = _tick(registry).cursor
    train_and_register(registry, MODEL, n_rows=500, seed=2)
    dead = MlflowRegistry(tracking_uri="http://127.0.0.1:9", artifact_root=str(tmp_path))
    down = _tick(dead, cursor)
    assert isinstance(down, dg.SkipReason) and "cursor unchanged" in down.skip_message
    back = _tick(registry, cursor)  # the cursor the dead tick left is the old one
    assert [r.run_key for r in back.run_requests] == ["fraud_detector:2:canary"]


def test_an_unknown_strategy_tag_falls_back_to_canary(registry):
    v1 = train_and_register(registry, MODEL, n_rows=500, seed=1)
    registry.set_alias(MODEL, CHAMPION, v1.version)
    cursor = _tick(registry).cursor
    train_and_register(registry, MODEL, n_rows=500, seed=2, strategy="yolo")
    assert [r.job_name for r in _tick(registry, cursor).run_requests] == ["canary_rollout_job"]
