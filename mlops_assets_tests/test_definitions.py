"""The code location: loads, validates with Dagster's own CLI, has the documented lineage, and
imports nothing heavy (no MLflow, KServe or scikit-learn) when it loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from mlops_assets_tests.helpers import project_cli

ROOT = Path(__file__).resolve().parents[1]


def _defs():
    from mlops_assets.definitions import build_definitions

    return build_definitions()


def test_definitions_are_loadable():
    dg.Definitions.validate_loadable(_defs())
    assert _defs().resolve_job_def("lifecycle_job") is not None
    assert _defs().resolve_job_def("observe_serving_job") is not None


def test_dagster_cli_validates_the_workspace(tmp_path):
    (tmp_path / "mlops").mkdir()
    (tmp_path / "dagster").mkdir()
    env = {**os.environ, "MLOPS_HOME": str(tmp_path / "mlops"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    out = project_cli("dagster", "definitions", "validate", "-w", "workspace.yaml", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list((tmp_path / "mlops").iterdir()), "loading the definitions must not write into MLOPS_HOME"


def test_asset_graph_has_platform_model_serving_lineage():
    graph = _defs().resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "platform/mlflow_backend_store",
        "platform/artifact_store",
        "platform/mlflow_server",
        "platform/prometheus",
        "platform/kserve",
        "models/fraud_detector",
        "serving/fraud_detector",
        "models/fraud_detector_champion",
        "monitoring/fraud_detector_drift",
    } <= keys
    model = graph.get(dg.AssetKey(["models", "fraud_detector"]))
    assert {k.to_user_string() for k in model.parent_keys} == {"platform/mlflow_backend_store", "platform/artifact_store"}
    serving = graph.get(dg.AssetKey(["serving", "fraud_detector"]))
    assert {k.to_user_string() for k in serving.parent_keys} == {"models/fraud_detector", "platform/kserve"}
    champion = graph.get(dg.AssetKey(["models", "fraud_detector_champion"]))
    assert {k.to_user_string() for k in champion.parent_keys} == {"serving/fraud_detector"}
    drift = graph.get(dg.AssetKey(["monitoring", "fraud_detector_drift"]))
    assert {k.to_user_string() for k in drift.parent_keys} == {"serving/fraud_detector"}
    checks = {k.name for k in graph.asset_check_keys}
    assert {"predictor_answers", "error_rate", "p95_latency", "drift_share"} <= checks


def test_every_asset_has_a_description_for_the_ui():
    graph = _defs().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).description, f"{key.to_user_string()} has no description"


def test_loading_imports_no_heavy_libraries(tmp_path):
    code = (
        "import sys, json; import mlops_assets.definitions; "
        "print(json.dumps([m for m in ('mlflow', 'kserve', 'sklearn', 'pandas', 'kubernetes') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "MLOPS_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_kubernetes_mode_loads_without_touching_a_cluster(tmp_path):
    """MLOPS_ENV=kubernetes picks KubernetesPlatform and PrometheusMetrics; loading contacts nothing."""
    code = (
        "import sys, json; from mlops_assets.definitions import build_definitions; defs = build_definitions(); "
        "r = defs.resources; print(json.dumps([type(r['serving']).__name__, type(r['metrics']).__name__, "
        "'kubernetes' in sys.modules]))"
    )
    env = {**os.environ, "MLOPS_HOME": str(tmp_path), "MLOPS_ENV": "kubernetes", "MLOPS_PROMETHEUS_URL": "http://prometheus:9090"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["KubernetesPlatform", "PrometheusMetrics", False]
    env.pop("MLOPS_PROMETHEUS_URL")
    out = subprocess.run(
        [sys.executable, "-c", "from mlops_assets.definitions import build_definitions; build_definitions()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "MLOPS_PROMETHEUS_URL" in out.stderr
