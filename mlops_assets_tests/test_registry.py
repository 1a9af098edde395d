"""The MLflow resource on a real SQLite registry: aliases and tags, and clear errors for bad names."""

from __future__ import annotations

import json

import mlflow.pyfunc
import pytest

from mlops_assets.core.registry import CHAMPION, MlflowRegistry, RegistryError, UnknownModelError
from mlops_assets_tests.conftest import MODEL


def test_versions_carry_signature_example_metrics_and_tags(registry, versions):
    v1 = registry.get_version(MODEL, 1)
    assert v1.model_uri == f"models:/{MODEL}/1"
    assert v1.metrics["auc"] > 0.6
    assert v1.tags["data_seed"] == "1"
    model = mlflow.pyfunc.load_model(v1.download_uri)
    assert model.metadata.get_input_schema() is not None
    assert model.metadata.saved_input_example_info is not None
    assert [v.version for v in registry.versions(MODEL)][:3] == ["3", "2", "1"]


def test_fault_injected_versions_are_labelled(registry, versions):
    v3 = registry.get_version(MODEL, 3)
    assert json.loads(v3.tags["fault_injection"]) == {"latency_ms": 0.0, "error_rate": 1.0}
    assert "fault_injection" not in registry.get_version(MODEL, 1).tags


def test_aliases_not_stages(registry, versions):
    registry.set_alias(MODEL, "canary-test", 2)
    assert registry.version_by_alias(MODEL, "canary-test").version == "2"
    assert "canary-test" in registry.get_version(MODEL, 2).aliases


def test_unknown_model_names_the_known_ones(registry, versions):
    with pytest.raises(UnknownModelError, match=r"does not exist; known models: \['fraud_detector'\]"):
        registry.get_version("no_such_model", 1)


def test_unknown_version_lists_known_versions(registry, versions):
    with pytest.raises(UnknownModelError, match=r"no version 99; known versions: \['3', '2', '1'\]"):
        registry.get_version(MODEL, 99)


def test_unknown_alias(registry, versions):
    with pytest.raises(UnknownModelError, match="no alias 'nope'"):
        registry.version_by_alias(MODEL, "nope")


@pytest.mark.parametrize("version", ["latest", "-1", "1.5"])
def test_malformed_version(registry, versions, version):
    with pytest.raises(ValueError, match="positive integer"):
        registry.get_version(MODEL, version)


@pytest.mark.parametrize("name", ["", "bad name", "x" * 80, "'; drop table"])
def test_invalid_model_names_are_refused_before_mlflow(registry, name):
    with pytest.raises(ValueError, match="invalid registered model name"):
        registry.get_version(name, 1)


def test_unreachable_mlflow_is_a_registry_error(tmp_path):
    dead = MlflowRegistry(tracking_uri="http://127.0.0.1:9", artifact_root=str(tmp_path))
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(RegistryError, match="127.0.0.1:9"):
            dead.get_version(MODEL, 1)
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_first_version_can_be_champion(registry, versions):
    registry.set_alias(MODEL, CHAMPION, 1)
    assert registry.version_by_alias(MODEL, CHAMPION).version == "1"
