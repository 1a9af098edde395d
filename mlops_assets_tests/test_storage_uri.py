"""Storage URIs in the InferenceService: only what KServe's storage initializer reads, plus mlflow-artifacts:/.

The accepted prefixes are KServe's own list (`SupportedStorageURIPrefixList` in kserve/kserve
pkg/controller/v1beta1/inferenceservice/utils/utils.go; the downloader is
python/storage/kserve_storage/kserve_storage.py), Azure Blob/File as https:// URLs, absolute local paths,
and MLflow's proxied `mlflow-artifacts:/`, which the Kubernetes platform maps to its bucket. Everything
else, above all the source guide's `models://name/version`, is a `ManifestError` that names the scheme,
lists what is accepted and, for MLflow references, says what to pass instead. The URI the project
itself produces (a registered version's `download_uri` from a real SQLite registry) must pass.
"""

from __future__ import annotations

import pytest

from mlops_assets.core.serving.manifest import (
    KSERVE_STORAGE_PREFIXES,
    Deployment,
    ManifestError,
    build_inference_service,
    check_inference_service,
    validate_storage_uri,
)

BASE = dict(model_name="fraud_detector", version="3", run_id="abc123")

ACCEPTED = [
    "s3://mlflow/1/abc/artifacts/model",
    "gs://bucket/models/fraud",
    "pvc://model-claim/fraud/3",
    "file:///var/lib/mlops/artifacts/1/models/m-abc/artifacts",
    "https://example.com/models/fraud.tar.gz",
    "http://minio.mlops.svc:9000/models/fraud.tgz",
    "https://myaccount.blob.core.windows.net/models/fraud",
    "https://myaccount.file.core.windows.net/share/fraud",
    "hdfs://namenode/models/fraud",
    "webhdfs://namenode/models/fraud",
    "oci://registry.example.com/models/fraud:3",
    "hf://example-org/fraud-model",
    "/mnt/models/fraud",
    "mlflow-artifacts:/1/models/m-abc/artifacts",
    "mlflow-artifacts://mlflow.mlops.svc:5000/1/models/m-abc/artifacts",
]


def test_the_accepted_prefixes_are_kserves_list():
    """Pinned to KServe's SupportedStorageURIPrefixList: a change here must be a change there first."""
    assert set(KSERVE_STORAGE_PREFIXES) == {
        "gs://",
        "s3://",
        "pvc://",
        "file://",
        "https://",
        "http://",
        "hdfs://",
        "webhdfs://",
        "oci://",
        "hf://",
    }


@pytest.mark.parametrize("uri", ACCEPTED)
def test_uris_kserve_reads_build_a_manifest_that_keeps_them(uri, isvc_schema):
    manifest = build_inference_service(Deployment(storage_uri=uri, **BASE))
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == uri
    isvc_schema.validate(manifest)
    check_inference_service(manifest)


@pytest.mark.parametrize(
    "uri, expected",
    [
        # The source guide's bug: MLflow's registry scheme has one slash, and is not storage anyway.
        ("models://fraud_detector/1", r"scheme 'models'.*models:/name/version \(one slash\).*download_uri"),
        ("models:/fraud_detector/1", r"scheme 'models'.*not a storage location KServe can download"),
        ("runs:/abc123/model", r"scheme 'runs'.*runs:/<run_id>/<path> is an MLflow reference"),
        ("S3://mlflow/1/model", r"scheme 'S3'.*write s3://"),
        ("s3:/mlflow/1/model", r"scheme 's3'.*write s3://"),
        ("wasbs://models@acct.blob.core.windows.net/fraud", r"scheme 'wasbs'"),
        ("dbfs:/databricks/mlflow/model", r"scheme 'dbfs'"),
        ("ftp://example.com/model", r"scheme 'ftp'"),
        ("relative/path/model", r"neither a URI nor an absolute path"),
        ("not-a-uri", r"neither a URI nor an absolute path"),
        ("s3://", r"names no location after s3://"),
        ("mlflow-artifacts:/", r"names no location after mlflow-artifacts:/"),
        ("s3://bucket/my model", r"contains whitespace"),
        ("", r"non-empty string"),
    ],
)
def test_anything_else_is_refused_naming_the_scheme_and_what_is_accepted(uri, expected):
    with pytest.raises(ManifestError, match=expected) as caught:
        build_inference_service(Deployment(storage_uri=uri, **BASE))
    message = str(caught.value)
    assert message.startswith(f"storage URI {uri!r}") or not uri
    if "scheme" in message or "neither" in message:
        # The whole accepted list is in the message, so the fix needs no documentation hunt.
        for prefix in (*KSERVE_STORAGE_PREFIXES, "mlflow-artifacts:/", "absolute local path"):
            assert prefix in message, (prefix, message)


def test_a_hand_edited_manifest_is_checked_too():
    manifest = build_inference_service(Deployment(storage_uri="s3://mlflow/1/abc/artifacts/model", **BASE))
    manifest["spec"]["predictor"]["model"]["storageUri"] = "models://fraud_detector/1"
    with pytest.raises(
        ManifestError, match=r"spec\.predictor\.model\.storageUri 'models://fraud_detector/1' has scheme 'models'"
    ):
        check_inference_service(manifest)


def test_the_uri_a_registered_version_hands_out_is_accepted(tmp_path):
    """What serving/assets.py deploys: a real SQLite registry's download_uri for a trained version."""
    from mlops_assets.core.registry import MlflowRegistry
    from mlops_assets.demo.training import train_and_register

    registry = MlflowRegistry(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    version = train_and_register(registry, "fraud_detector", n_rows=500, seed=1)
    assert version.download_uri.startswith("file://")
    assert validate_storage_uri(version.download_uri) == version.download_uri
    # ... while the registry reference for the same version is not storage.
    with pytest.raises(ManifestError, match="scheme 'models'"):
        validate_storage_uri(version.model_uri)


def test_the_cluster_refuses_a_proxied_uri_it_cannot_map():
    """KubernetesPlatform maps mlflow-artifacts:/ to its bucket; without one it refuses before any API call
    (KServe would read the URI as a relative path and crash-loop). No API server is contacted here."""
    from mlops_assets.core.serving.kubernetes import KubernetesPlatform

    manifest = build_inference_service(Deployment(storage_uri="mlflow-artifacts:/1/m-abc/artifacts", **BASE))
    with pytest.raises(ManifestError, match="artifact proxy, which KServe cannot read"):
        KubernetesPlatform(in_cluster=False, artifacts_destination="")._for_cluster(manifest)
    mapped = KubernetesPlatform(in_cluster=False, artifacts_destination="s3://mlflow")._for_cluster(manifest)
    assert mapped["spec"]["predictor"]["model"]["storageUri"] == "s3://mlflow/1/m-abc/artifacts"
