"""`prometheus_alert_sensor` end to end against a real Prometheus evaluating the shipped rules over
real router metrics: a failing stable revision fires InferenceHighErrorRate and the sensor asks for a
rollback, which a real Dagster materialization carries out; a drift score pushed to the router
fires ModelDriftDetected and the sensor asks for retraining; Prometheus down means a skip."""

from __future__ import annotations

import json
import time
import urllib.request

import dagster as dg
import pytest

from mlops_assets.core import processes
from mlops_assets.core.monitoring.alerts import PrometheusAlerts
from mlops_assets.core.platform import services
from mlops_assets.core.registry import CHAMPION, MlflowRegistry
from mlops_assets.core.serving.manifest import Deployment, build_inference_service
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets.core.settings import load_settings
from mlops_assets.definitions import unbound_assets_and_checks
from mlops_assets.defs.monitoring.sensors import prometheus_alert_sensor
from mlops_assets.defs.resources import build_resources
from mlops_assets.demo.data import FEATURES
from mlops_assets.demo.traffic import TrafficGenerator
from mlops_assets.demo.training import Fault, train_and_register
from mlops_assets_tests.conftest import processes_under
from mlops_assets_tests.helpers import FRAUD, declared

ALL_ASSETS, ALL_CHECKS = unbound_assets_and_checks()

# Error-rate and drift alerts, no latency judged: it runs beside the demo.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(services.prometheus_binary() is None, reason="prometheus not installed (Debian package `prometheus`)"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("alerts_home")
    (home / "mlflow").mkdir()
    yield home
    LocalPlatform(home=str(home)).stop_all()
    services.stop_all(home)
    assert not processes_under(home)


def _tick(alerts, platform):
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(
            instance=instance, resources={"prometheus_alerts": alerts, "serving": platform}, repository_def=declared(FRAUD)
        )
        return prometheus_alert_sensor(ctx)


def test_alerts_on_a_failing_stable_revision_and_on_drift_launch_rollback_and_retraining(home):
    settings = load_settings({"MLOPS_HOME": str(home), "MLOPS_PROMETHEUS_PORT": str(processes.free_port())})
    resources = build_resources(settings)
    registry: MlflowRegistry = resources["mlflow"]
    platform = LocalPlatform(home=str(home))
    v1 = train_and_register(registry, "fraud_detector", n_rows=2000, seed=1)
    v2 = train_and_register(registry, "fraud_detector", n_rows=2000, seed=2, fault=Fault(error_rate=0.5))
    registry.set_alias("fraud_detector", CHAMPION, "2")
    for v in (v1, v2):  # v2 promoted by mistake; v1 stays warm as the previous revision
        platform.apply(
            build_inference_service(Deployment(model_name="fraud_detector", version=v.version, storage_uri=v.download_uri))
        )
    status = platform.status("fraud-detector")
    assert status.stable_version == "2" and status.previous_rolledout

    rules = [services.local_rules(home, max_for_s=10)]
    record = services.start_prometheus(home, settings.prometheus_port, interval="1s", rules=rules)
    alerts = PrometheusAlerts(url=record.url)
    request = urllib.request.Request(
        f"{status.url}/-/drift", data=json.dumps({"share": 0.5, "features": {"amount": 0.4}}).encode(), method="POST"
    )
    urllib.request.urlopen(request, timeout=5).read()
    traffic = TrafficGenerator(platform, "fraud-detector", rate=60).start()
    try:
        deadline, result = time.monotonic() + 200, None
        while time.monotonic() < deadline:
            result = _tick(alerts, platform)
            if isinstance(result, list) and {r.job_name for r in result} == {"rollback_job", "retrain_job"}:
                break
            time.sleep(2)
        # Retraining needs 200 logged rows (a quarter of the successful requests are logged): keep the
        # users on until the router has logged that many, with a margin.
        while time.monotonic() < deadline and len(platform.recent_payloads("fraud-detector", FEATURES)) < 250:
            time.sleep(2)
    finally:
        traffic.stop()
    assert isinstance(result, list), result
    by_job = {r.job_name: r for r in result}
    rollback = by_job["rollback_job"]
    assert rollback.run_key == f"rollback:fraud-detector:{status.latest_rolledout}"
    assert "InferenceHighErrorRate" in rollback.run_config["ops"]["serving__fraud_detector"]["config"]["triggered_by"]
    retrain = by_job["retrain_job"]
    assert retrain.run_key.startswith("retrain:fraud-detector:")
    assert retrain.run_config["ops"]["models__fraud_detector"]["config"]["recent_data"] is True

    # Carry the rollback out through Dagster, as the daemon would.
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=dg.AssetSelection.assets(["serving", "fraud_detector"], ["models", "fraud_detector_champion"]),
            resources=resources,
            instance=instance,
            run_config=rollback.run_config,
            tags=rollback.tags,
            raise_on_error=False,
        )
        events = {e.asset_key.to_user_string(): e.materialization.metadata for e in run.get_asset_materialization_events()}
    assert events["serving/fraud_detector"]["rollout_event"].value == "alert_rollback"
    after = platform.status("fraud-detector")
    assert after.stable_version == "1" and after.percent_of(after.latest_rolledout) == 100
    assert registry.version_by_alias("fraud_detector", CHAMPION).version == "1"
    # The same alert would not roll back twice: the revision it names is no longer the stable one.
    again = _tick(alerts, platform)
    assert all(r.job_name != "rollback_job" for r in (again if isinstance(again, list) else []))

    # And the retraining: on the recent traffic the router logged, not on generated data.
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=dg.AssetSelection.assets(["models", "fraud_detector"]),
            resources=resources,
            instance=instance,
            run_config=retrain.run_config,
        )
        (model,) = run.get_asset_materialization_events()
    assert model.materialization.metadata["training_data"].value.startswith("recent traffic (")
    assert model.materialization.metadata["version"].value == "3"

    processes.stop(record)
    down = _tick(alerts, platform)
    assert isinstance(down, dg.SkipReason) and "unreachable" in down.skip_message
