"""The asset graph materialized on a real Dagster instance with the real local resources:
MLflow on SQLite, the MLflow UI and Prometheus as processes, model servers and a router."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.core.platform import services
from mlops_assets.core.processes import free_port
from mlops_assets.core.serving.platform import LocalPlatform, http_json
from mlops_assets.core.settings import load_settings
from mlops_assets.definitions import unbound_assets_and_checks
from mlops_assets.defs.resources import build_resources
from mlops_assets.defs.serving.assets import ROLLOUT_TAG
from mlops_assets_tests.conftest import processes_under

ALL_ASSETS, ALL_CHECKS = unbound_assets_and_checks()

pytestmark = [pytest.mark.e2e, pytest.mark.latency]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("assets_home")
    yield home
    LocalPlatform(home=str(home)).stop_all()
    services.stop_all(home)
    assert not processes_under(home)


@pytest.fixture(scope="module")
def resources(home):
    settings = load_settings(
        {"MLOPS_HOME": str(home), "MLOPS_MLFLOW_UI_PORT": str(free_port()), "MLOPS_PROMETHEUS_PORT": str(free_port())}
    )
    return build_resources(settings)


@pytest.fixture(scope="module")
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def _asset(*path: str) -> dg.AssetsDefinition:
    (found,) = [a for a in ALL_ASSETS if dg.AssetKey(list(path)) in a.keys]
    return found


def test_materializing_everything_brings_the_platform_up(resources, instance):
    result = dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        resources=resources,
        instance=instance,
        run_config={"ops": {"models__fraud_detector": {"config": {"n_rows": 2000}}}},
    )
    assert result.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["models/fraud_detector"]["version"].value == "1"
    assert meta["models/fraud_detector"]["alias"].value == "champion"
    assert meta["serving/fraud_detector"]["stable_version"].value == "1"
    assert meta["serving/fraud_detector"]["ready"].value is True
    assert "| fraud-detector-predictor-00001 | 1 | 100 |" in meta["serving/fraud_detector"]["traffic"].value
    mlflow_url = meta["platform/mlflow_server"]["url"].value
    assert http_json(f"{mlflow_url}/health")[0] == 200
    if services.prometheus_binary():
        assert http_json(meta["platform/prometheus"]["url"].value + "/-/ready")[0] == 200
    ready = {c.asset_key.to_user_string(): c for c in result.get_asset_check_evaluations() if c.check_name == "ready"}
    pieces = ("artifact_store", "mlflow_backend_store", "mlflow_server", "prometheus")
    assert sorted(ready) == [f"platform/{p}" for p in pieces]
    assert all(c.passed for c in ready.values()), {k: c.metadata for k, c in ready.items()}
    assert ready["platform/mlflow_server"].metadata["state"].value == "answers /health"
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["predictor_answers"].passed
    # No traffic yet: the threshold checks say so (a warning), they never read missing data as success.
    for name in ("error_rate", "p95_latency"):
        assert not checks[name].passed and checks[name].severity == dg.AssetCheckSeverity.WARN
        assert checks[name].metadata["note"].value == "no requests yet"
    champion = {e.asset_key.to_user_string(): e for e in result.get_asset_materialization_events()}[
        "models/fraud_detector_champion"
    ]
    assert champion.materialization.metadata["champion_version"].value == "1"


def test_a_second_training_registers_a_challenger_and_serving_is_unchanged(resources, instance):
    model, serving = _asset("models", "fraud_detector"), _asset("serving", "fraud_detector")
    result = dg.materialize(
        [model, serving],
        resources=resources,
        instance=instance,
        run_config={"ops": {"models__fraud_detector": {"config": {"n_rows": 2000, "seed": 4}}}},
    )
    assert result.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert (meta["models/fraud_detector"]["version"].value, meta["models/fraud_detector"]["alias"].value) == ("2", "challenger")
    # The champion is still version 1: re-materializing serving applies nothing new.
    assert meta["serving/fraud_detector"]["stable_version"].value == "1"
    assert meta["serving/fraud_detector"]["latest_ready_revision"].value == "fraud-detector-predictor-00001"


def test_platform_pieces_are_idempotent(resources, instance):
    pieces = [_asset("platform", n) for n in ("mlflow_server", "prometheus")]
    home = Path(resources["platform_services"].home)
    before = services.running(home, "mlflow-server")
    assert dg.materialize(pieces, resources=resources, instance=instance).success
    after = services.running(home, "mlflow-server")
    assert before.pid == after.pid


def test_serving_an_unknown_alias_fails_with_a_clear_message(resources, instance):
    serving = _asset("serving", "fraud_detector")
    result = dg.materialize(
        [serving],
        resources=resources,
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {"serving__fraud_detector": {"config": {"alias": "no-such-alias"}}}},
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "no alias 'no-such-alias'" in str(failure.step_failure_data.error)
    # Nothing was lost: the service still serves version 1.
    assert LocalPlatform(home=resources["platform_services"].home).status("fraud-detector").stable_version == "1"


def test_a_namespace_other_than_the_platforms_is_refused_and_nothing_changes(resources, instance):
    """The run config may name the namespace (MLOPS_NAMESPACE's, here the default) but not change it: a cluster's
    platform can act in its own namespace only, so another one is an error, not a silent redirect."""
    serving = _asset("serving", "fraud_detector")
    assert resources["serving"].namespace == "mlops-serving"
    result = dg.materialize(
        [serving],
        resources=resources,
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {"serving__fraud_detector": {"config": {"namespace": "team-b"}}}},
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = str(failure.step_failure_data.error)
    assert "'team-b'" in message and "'mlops-serving'" in message and "MLOPS_NAMESPACE" in message
    status = LocalPlatform(home=resources["platform_services"].home).status("fraud-detector")
    assert status.stable_version == "1" and status.namespace == "mlops-serving"
    # Naming the platform's own namespace is fine.
    same = {"ops": {"serving__fraud_detector": {"config": {"namespace": "mlops-serving"}}}}
    assert dg.materialize([serving], resources=resources, instance=instance, run_config=same).success


def test_bad_training_config_is_refused_before_running(resources, instance):
    model = _asset("models", "fraud_detector")
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.materialize(
            [model],
            resources=resources,
            instance=instance,
            run_config={"ops": {"models__fraud_detector": {"config": {"n_rows": "many"}}}},
        )


def test_a_rollout_whose_run_died_is_reconciled_and_missing_traffic_never_promotes(resources, instance, home):
    """A previous rollout's run died with its canary at 30%: the next rollout run rolls the service
    back to its last good revision first (recorded as an asset event). With no traffic at all, the
    new canary then holds and is rolled back at the no-data deadline; the blocking checks fail and
    the champion alias does not move."""
    import time

    from mlops_assets.core.rollout.policy import RolloutPolicy
    from mlops_assets.core.serving.lock import LockInfo
    from mlops_assets.core.serving.manifest import Deployment, build_inference_service

    platform = LocalPlatform(home=str(home))
    registry = resources["mlflow"]
    v2 = registry.get_version("fraud_detector", 2)
    platform.apply(
        build_inference_service(
            Deployment(model_name="fraud_detector", version="2", storage_uri=v2.download_uri, canary_percent=30)
        )
    )
    LocalPlatform(home=str(home)).rollout_lock("fraud-detector").acquire(
        LockInfo("fraud-detector", "canary-dead", "run-that-died", "canary", "2", time.time()), is_running=lambda r: True
    )
    fast = {
        **resources,
        "rollout_policy": RolloutPolicy(no_data_deadline_s=3, poll_s=0.5, steps=[10, 50], min_requests_per_step=10),
    }
    result = dg.materialize(
        [_asset("serving", "fraud_detector"), _asset("models", "fraud_detector_champion"), *ALL_CHECKS],
        resources=fast,
        instance=instance,
        raise_on_error=False,
        tags={ROLLOUT_TAG: "canary"},  # what canary_rollout_job sets
        run_config={"ops": {"serving__fraud_detector": {"config": {"version": "2"}}}},
    )
    events = [e.materialization.metadata for e in result.get_asset_materialization_events()]
    kinds = [m["rollout_event"].value for m in events if "rollout_event" in m]
    assert kinds[0] == "reconcile_rollback" and kinds[-1] == "rollback", kinds
    final = events[-1]
    assert final["rollout_outcome"].value == "rolled_back"
    assert "no_data_deadline" in final["evidence"].value["fired"]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["error_rate"].passed and checks["error_rate"].severity == dg.AssetCheckSeverity.ERROR
    assert "models/fraud_detector_champion" not in {
        e.asset_key.to_user_string() for e in result.get_asset_materialization_events()
    }
    status = platform.status("fraud-detector")
    assert status.stable_version == "1" and status.percent_of(status.latest_rolledout) == 100
    assert LocalPlatform(home=str(home)).rollout_lock("fraud-detector").holder() is None
