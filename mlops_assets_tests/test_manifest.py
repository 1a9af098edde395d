"""The InferenceService builder: valid against KServe's CRD schema, strict on names and inputs."""

from __future__ import annotations

import jsonschema
import pytest

from mlops_assets.core.serving.manifest import (
    Deployment,
    ManifestError,
    build_inference_service,
    check_inference_service,
    isvc_name_for,
    validate_dns1035,
)

BASE = dict(model_name="fraud_detector", version="3", storage_uri="s3://mlflow/1/abc/artifacts/model", run_id="abc123")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"canary_percent": 10},
        {"canary_percent": 0},
        {"model_format": "sklearn", "protocol": "v1", "min_replicas": 0, "max_replicas": 1},
        {"scale_metric": "rps", "scale_target": 50, "requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}},
        {"storage_uri": "file:///tmp/artifacts/model", "namespace": "team-a", "rollout_id": "r-1", "triggered_by": "sensor"},
    ],
)
def test_every_built_manifest_validates_against_the_kserve_crd(isvc_schema, overrides):
    manifest = build_inference_service(Deployment(**{**BASE, **overrides}))
    isvc_schema.validate(manifest)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "fraud-detector"
    annotations = manifest["metadata"]["annotations"]
    assert annotations["mlops-assets.dev/mlflow-run-id"] == "abc123"
    assert annotations["mlops-assets.dev/model-uri"] == "models:/fraud_detector/3"
    assert ("canaryTrafficPercent" in manifest["spec"]["predictor"]) == (overrides.get("canary_percent") is not None)
    check_inference_service(manifest)


def test_schema_really_rejects_a_broken_manifest(isvc_schema):
    """Guard against a vacuous schema check: a wrong type must fail validation."""
    manifest = build_inference_service(Deployment(**BASE))
    manifest["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        isvc_schema.validate(manifest)


@pytest.mark.parametrize("name", ["Fraud", "1model", "-x", "x-", "a_b", "a" * 64, "", "ünï"])
def test_invalid_dns1035_names_are_refused_with_the_rule(name):
    with pytest.raises(ManifestError, match="DNS-1035|non-empty|characters"):
        validate_dns1035(name)


def test_model_names_map_to_valid_isvc_names():
    assert isvc_name_for("fraud_detector") == "fraud-detector"
    assert isvc_name_for("Churn.Model_v2") == "churn-model-v2"
    with pytest.raises(ManifestError):
        isvc_name_for("9lives")
    with pytest.raises(ManifestError):
        isvc_name_for("x" * 60)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"version": "latest"}, "positive integer"),
        ({"storage_uri": "not-a-uri"}, "storage URI"),
        ({"canary_percent": 101}, "canary percent"),
        ({"canary_percent": -1}, "canary percent"),
        ({"protocol": "grpc"}, "protocol"),
        ({"protocol": "v1"}, "only over v2.*no runtime"),  # MLflow models: kserve-mlserver, V2 only
        ({"min_replicas": 3, "max_replicas": 1}, "replicas"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"requests": {"cpu": "lots"}}, "quantity"),
    ],
)
def test_bad_deployment_inputs_name_the_problem(overrides, message):
    with pytest.raises(ManifestError, match=message):
        build_inference_service(Deployment(**{**BASE, **overrides}))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.update(kind="Deployment"), "expected apiVersion"),
        (lambda m: m["metadata"].update(name="Bad Name"), "metadata.name"),
        (lambda m: m["spec"]["predictor"]["model"].pop("storageUri"), "storageUri"),
        (lambda m: m["spec"]["predictor"]["model"].pop("modelFormat"), "modelFormat"),
        (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent="10"), "canaryTrafficPercent"),
        (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent=True), "canaryTrafficPercent"),
    ],
)
def test_malformed_manifests_are_refused(mutate, message):
    manifest = build_inference_service(Deployment(**BASE))
    mutate(manifest)
    with pytest.raises(ManifestError, match=message):
        check_inference_service(manifest)


def test_check_refuses_non_mappings():
    with pytest.raises(ManifestError, match="mapping"):
        check_inference_service(["not", "a", "manifest"])
