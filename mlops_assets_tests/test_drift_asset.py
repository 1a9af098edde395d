"""`monitoring/<name>_drift` on a real served model: the router logs sampled payloads, the asset
compares them with the training snapshot from MLflow, writes the table, embeds the plot and the
histograms as images, logs the HTML report to the version's MLflow run (linked through the MLflow UI),
publishes Prometheus gauges on the router, and its check reads the drift share."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.core.platform import services
from mlops_assets.core.registry import CHAMPION
from mlops_assets.core.serving.manifest import Deployment, build_inference_service
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets.core.settings import load_settings
from mlops_assets.definitions import unbound_assets_and_checks
from mlops_assets.defs.resources import build_resources
from mlops_assets.demo.traffic import TrafficGenerator
from mlops_assets.demo.training import train_and_register
from mlops_assets_tests.conftest import processes_under

ALL_ASSETS, ALL_CHECKS = unbound_assets_and_checks()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    home = tmp_path_factory.mktemp("drift_home")
    (home / "mlflow").mkdir()
    resources = build_resources(load_settings({"MLOPS_HOME": str(home), "MLOPS_RECENT_WINDOW_S": "8"}))
    v1 = train_and_register(resources["mlflow"], "fraud_detector", n_rows=4000, seed=1)
    resources["mlflow"].set_alias("fraud_detector", CHAMPION, "1")
    platform: LocalPlatform = resources["serving"]
    platform.apply(build_inference_service(Deployment(model_name="fraud_detector", version="1", storage_uri=v1.download_uri)))
    yield home, resources, platform
    platform.stop_all()
    services.stop_all(home)
    assert not processes_under(home)


def _drift(resources) -> tuple[dict, dict]:
    drift = [a for a in ALL_ASSETS if dg.AssetKey(["monitoring", "fraud_detector_drift"]) in a.keys]
    checks = [c for c in ALL_CHECKS if "drift_share" in str(c.check_specs_by_output_name)]
    with dg.instance_for_test() as instance:
        result = dg.materialize([*drift, *checks], resources=resources, instance=instance)
        (event,) = result.get_asset_materialization_events()
        (check,) = result.get_asset_check_evaluations()
    return event.materialization.metadata, check


@pytest.mark.parametrize("shift, verdict", [(0.0, "no_drift"), (1.0, "drift")])
def test_drift_report_on_live_traffic(setup, shift, verdict):
    home, resources, platform = setup
    traffic = TrafficGenerator(platform, "fraud-detector", rate=80)
    traffic.shift = shift
    traffic.start()
    time.sleep(9)  # the window is the last 8 s
    traffic.stop()
    meta, check = _drift(resources)
    assert meta["dataset_verdict"].value == verdict, {k: getattr(v, "value", v) for k, v in meta.items() if k != "report"}
    assert meta["n_current"].value >= 30
    # The pictures are in the materialization itself; the page is an artifact of the served version's MLflow
    # run, linked through the MLflow UI: no file path and no file:// link (neither opens from the UI's page).
    for name in ("plot", "histograms"):
        assert meta[name].value.startswith("![") and "](data:image/png;base64," in meta[name].value
    assert meta["report"].url.startswith(f"{resources['mlflow'].ui_url}/#/experiments/")
    assert not [
        k for k, v in meta.items() if isinstance(v, dg.PathMetadataValue) or str(getattr(v, "url", "")).startswith("file:")
    ]
    import mlflow.artifacts

    (home / f"downloaded-{verdict}").mkdir()
    logged = mlflow.artifacts.download_artifacts(
        artifact_uri=meta["report_artifacts"].value,
        dst_path=str(home / f"downloaded-{verdict}"),
        tracking_uri=resources["mlflow"].tracking_uri,
    )
    (html,) = Path(logged).glob("drift-*.html")
    text = html.read_text()
    assert text.count("<img") + text.count("<svg") >= 9 and "http://" not in text and "https://" not in text
    assert check.passed == (verdict == "no_drift")
    assert check.metadata["threshold"].value == 0.2
    status = platform.status("fraud-detector")
    metrics = urllib.request.urlopen(f"{status.url}/metrics", timeout=5).read().decode()
    share = [line for line in metrics.splitlines() if line.startswith("model_drift_share{")]
    assert share and (float(share[0].split()[-1]) > 0.2) == (verdict == "drift")
