"""The InferenceService manifest: the one deployment contract, built and checked in plain Python.

`build_inference_service` turns a registered model version into a `serving.kserve.io/v1beta1`
InferenceService; both the local platform and the Kubernetes platform consume exactly that dict.
Names are validated as DNS-1035 labels before anything reaches an API, and annotations carry the
provenance a platform engineer needs to answer "what is this and who put it here".
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from mlops_assets.core.settings import DEFAULT_NAMESPACE

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
ANNOTATION_PREFIX = "mlops-assets.dev"
MANAGED_BY = {"app.kubernetes.io/managed-by": "mlops-assets"}
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
# KServe derives longer names (`<name>-predictor-<ns>...`) from the InferenceService name.
MAX_ISVC_NAME = 45

# Storage URIs KServe can serve a model from. The list is KServe's own: `SupportedStorageURIPrefixList`
# in kserve/kserve pkg/controller/v1beta1/inferenceservice/utils/utils.go, which the InferenceService
# webhook's ValidateStorageURI checks, and which the storage initializer
# (python/storage/kserve_storage/kserve_storage.py, `Storage.download`) downloads: gs://, s3://, hdfs://,
# webhdfs://, hf://, file://, any http(s) URL (Azure Blob and File shares are https://<account>.blob|file
# .core.windows.net/... URLs), while pvc:// and oci:// are mounted by the controller (a PVC volume, a
# modelcar image). Prefixes are matched case-sensitively there, so they are here.
KSERVE_STORAGE_PREFIXES = (
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
)
# MLflow's proxied artifact URI (`mlflow-artifacts:/path`, or `mlflow-artifacts://host:port/path`), what an
# MLflow server with `--serve-artifacts` hands out: KubernetesPlatform maps it to the bucket behind the
# proxy (kubernetes.proxied_to_destination), and the local model server loads it through MLflow.
MLFLOW_PROXIED_PREFIX = "mlflow-artifacts:/"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_ACCEPTED_STORAGE = ", ".join(KSERVE_STORAGE_PREFIXES) + f", {MLFLOW_PROXIED_PREFIX} or an absolute local path"


class ManifestError(ValueError):
    """A manifest or one of its inputs is malformed; the message names the field."""


def validate_dns1035(value: str, what: str = "name", max_len: int = 63) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise ManifestError(f"{what} {value!r} is {len(value)} characters; the limit is {max_len}")
    if not _DNS_1035.match(value):
        raise ManifestError(
            f"{what} {value!r} is not a DNS-1035 label: lower-case letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return value


def validate_storage_uri(uri: str, what: str = "storage URI") -> str:
    """`uri` if KServe's storage initializer (or, for mlflow-artifacts:/, the Kubernetes platform) can
    read it; otherwise `ManifestError` naming the scheme and what is accepted."""
    if not isinstance(uri, str) or not uri:
        raise ManifestError(f"{what} must be a non-empty string such as s3://bucket/path, got {uri!r}")
    if any(c.isspace() for c in uri):
        raise ManifestError(f"{what} {uri!r} contains whitespace")
    for prefix in (*KSERVE_STORAGE_PREFIXES, MLFLOW_PROXIED_PREFIX):
        if uri.startswith(prefix):
            if not uri[len(prefix) :].strip("/"):
                raise ManifestError(f"{what} {uri!r} names no location after {prefix}")
            return uri
    if uri.startswith("/"):
        # KServe takes a string without a scheme as a local path (e.g. /mnt/models); only absolute
        # ones are accepted here, since a relative path means a different file in every process.
        return uri
    match = _SCHEME.match(uri)
    if match is None:
        raise ManifestError(f"{what} {uri!r} is neither a URI nor an absolute path; KServe reads {_ACCEPTED_STORAGE}")
    scheme = match.group(1)
    known = next((p for p in (*KSERVE_STORAGE_PREFIXES, MLFLOW_PROXIED_PREFIX) if p.split(":", 1)[0] == scheme.lower()), None)
    hint = ""
    if scheme.lower() in ("models", "runs"):
        # `models://name/version` (a common misspelling), and MLflow's own `models:/name/version` or `runs:/`, are
        # references only MLflow resolves; KServe's storage initializer would look for a relative path.
        form = "models:/name/version (one slash)" if scheme.lower() == "models" else "runs:/<run_id>/<path>"
        hint = (
            f" ({form} is an MLflow reference, not a storage location KServe can download: pass the version's"
            " artifact location, MlflowRegistry.get_version(name, version).download_uri)"
        )
    elif known is not None:
        hint = f" (KServe matches the prefix exactly: write {known}...)"
    raise ManifestError(f"{what} {uri!r} has scheme {scheme!r}, which KServe cannot read; use {_ACCEPTED_STORAGE}{hint}")


#: The run tag naming the InferenceService a run acts on (set by the sensors, read by the UI's filters).
ISVC_TAG = "mlops-assets/isvc"


def isvc_name_for(model_name: str) -> str:
    """The InferenceService name for a registered model (`fraud_detector` -> `fraud-detector`)."""
    candidate = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    return validate_dns1035(candidate, f"InferenceService name derived from model {model_name!r}", MAX_ISVC_NAME)


@dataclass(frozen=True)
class Deployment:
    """Everything that decides one InferenceService's desired state."""

    model_name: str
    version: str
    storage_uri: str
    namespace: str = DEFAULT_NAMESPACE  # a KubernetesPlatform puts the service in its own namespace
    model_format: str = "mlflow"
    protocol: str = "v2"
    run_id: str = ""
    rollout_id: str = ""
    triggered_by: str = "manual"
    canary_percent: int | None = None
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str = "concurrency"
    scale_target: int = 10
    requests: dict[str, str] = field(default_factory=lambda: {"cpu": "500m", "memory": "1Gi"})
    limits: dict[str, str] = field(default_factory=lambda: {"cpu": "1", "memory": "2Gi"})


TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
# The pod annotations every InferenceService carries for the mesh and the scrape job (KServe copies the
# InferenceService's annotations into the Knative revision template, so they reach the predictor pods;
# LocalPlatform ignores them). Istio (istio/api annotation/annotations.yaml):
# - prometheus.istio.io/merge-metrics "false": otherwise the sidecar injector rewrites the pod's
#   prometheus.io/port to its own merged endpoint on 15020, which neither the `mlops-serving` scrape job
#   nor the NetworkPolicies allow;
# - sidecar.istio.io/nativeSidecar "true": the proxy starts first, as an init container, so KServe's
#   storage initializer (itself an init container) can reach MinIO through the mesh.
# KServe (pkg/webhook/admission/pod/metrics_aggregate_injector.go): the pod annotation
# serving.kserve.io/enable-metric-aggregation wins over the inferenceservice-config ConfigMap. "true"
# points prometheus.io/port at 9088, which only KServe's `qpext` queue-proxy image serves (Knative's
# queue sidecar image must be replaced by it in config-deployment); nothing here installs qpext, so
# aggregation is off and prometheus.io/port is the queue-proxy's own 9091.
MESH_ANNOTATIONS = {
    "prometheus.istio.io/merge-metrics": "false",
    "sidecar.istio.io/nativeSidecar": "true",
    "serving.kserve.io/enable-metric-aggregation": "false",
}
# The protocols KServe's ServingRuntimes speak per model format, for the formats this project serves
# (kserve/kserve config/runtimes/*.yaml `protocolVersions`): an MLflow model is served only by
# kserve-mlserver, which speaks V2 only. KServe picks a runtime that supports both the format and the
# InferenceService's protocolVersion (ModelSpec.GetSupportingRuntimes), so mlflow with v1 finds none.
RUNTIME_PROTOCOLS = {"mlflow": ("v2",), "sklearn": ("v1", "v2"), "xgboost": ("v1", "v2"), "lightgbm": ("v1", "v2")}


def build_inference_service(d: Deployment) -> dict:
    """The `serving.kserve.io/v1beta1` InferenceService for `d` (pure; raises `ManifestError`)."""
    name = isvc_name_for(d.model_name)
    validate_dns1035(d.namespace, "namespace")
    if not str(d.version).isdigit():
        raise ManifestError(f"model version must be a positive integer, got {d.version!r}")
    validate_storage_uri(d.storage_uri)
    if d.protocol not in ("v1", "v2"):
        raise ManifestError(f"protocol must be 'v1' or 'v2', got {d.protocol!r}")
    spoken = RUNTIME_PROTOCOLS.get(d.model_format)
    if spoken is not None and d.protocol not in spoken:
        raise ManifestError(
            f"KServe serves model format {d.model_format!r} only over {', '.join(spoken)} (its ServingRuntime's"
            f" protocolVersions); protocol {d.protocol!r} would find no runtime"
        )
    if d.canary_percent is not None and not (isinstance(d.canary_percent, int) and 0 <= d.canary_percent <= 100):
        raise ManifestError(f"canary percent must be an integer 0-100, got {d.canary_percent!r}")
    if not 0 <= d.min_replicas <= d.max_replicas or d.max_replicas < 1:
        raise ManifestError(f"replicas must satisfy 0 <= min ({d.min_replicas}) <= max ({d.max_replicas}), max >= 1")
    if d.scale_metric not in ("cpu", "memory", "concurrency", "rps"):
        raise ManifestError(f"scale metric must be cpu, memory, concurrency or rps, got {d.scale_metric!r}")
    for kind, values in (("requests", d.requests), ("limits", d.limits)):
        for key, qty in values.items():
            if not _QUANTITY.match(str(qty)):
                raise ManifestError(f"resource {kind}.{key}={qty!r} is not a Kubernetes quantity")
    predictor: dict = {
        "minReplicas": d.min_replicas,
        "maxReplicas": d.max_replicas,
        "scaleMetric": d.scale_metric,
        "scaleTarget": d.scale_target,
        "model": {
            "modelFormat": {"name": d.model_format},
            "protocolVersion": d.protocol,
            "storageUri": d.storage_uri,
            "resources": {"requests": dict(d.requests), "limits": dict(d.limits)},
        },
    }
    if d.canary_percent is not None:
        predictor["canaryTrafficPercent"] = d.canary_percent
    annotations = {
        f"{ANNOTATION_PREFIX}/registered-model": d.model_name,
        f"{ANNOTATION_PREFIX}/model-version": str(d.version),
        f"{ANNOTATION_PREFIX}/mlflow-run-id": d.run_id,
        f"{ANNOTATION_PREFIX}/model-uri": f"models:/{d.model_name}/{d.version}",
        f"{ANNOTATION_PREFIX}/rollout-id": d.rollout_id,
        f"{ANNOTATION_PREFIX}/triggered-by": d.triggered_by,
        # KServe gives the latest and the previous revision their own hostnames (latest-..., prev-...):
        # blue-green validates green there before it takes any user traffic.
        TAG_ROUTING: "true",
        **MESH_ANNOTATIONS,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": d.namespace,
            "labels": {**MANAGED_BY, "mlops-assets.dev/model": name},
            "annotations": annotations,
        },
        "spec": {"predictor": predictor},
    }


def check_inference_service(manifest: dict) -> dict:
    """Structural checks a consumer relies on; returns a deep copy. Raises `ManifestError`."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest must be a mapping, got {type(manifest).__name__}")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise ManifestError(
            f"expected apiVersion {API_VERSION} kind {KIND}, got {manifest.get('apiVersion')} {manifest.get('kind')}"
        )
    meta = manifest.get("metadata") or {}
    validate_dns1035(meta.get("name"), "metadata.name", MAX_ISVC_NAME)
    validate_dns1035(meta.get("namespace", "default"), "metadata.namespace")
    predictor = (manifest.get("spec") or {}).get("predictor")
    model = (predictor or {}).get("model")
    if not isinstance(model, dict) or not model.get("storageUri"):
        raise ManifestError("spec.predictor.model.storageUri is required")
    validate_storage_uri(model["storageUri"], "spec.predictor.model.storageUri")
    if not (model.get("modelFormat") or {}).get("name"):
        raise ManifestError("spec.predictor.model.modelFormat.name is required")
    pct = predictor.get("canaryTrafficPercent")
    if pct is not None and not (isinstance(pct, int) and not isinstance(pct, bool) and 0 <= pct <= 100):
        raise ManifestError(f"spec.predictor.canaryTrafficPercent must be an integer 0-100, got {pct!r}")
    return copy.deepcopy(manifest)


def protocol_of(manifest: dict) -> str:
    """The inference protocol the manifest declares ("v1" or "v2"): what its runtime speaks, and so what
    checks and validations must send. Unset is V1, as in KServe (ModelSpec.GetProtocol)."""
    model = ((manifest.get("spec") or {}).get("predictor") or {}).get("model") or {}
    return model.get("protocolVersion") or "v1"


def predictor_identity(manifest: dict) -> dict:
    """The part of the spec whose change makes a new revision (everything but the traffic split)."""
    predictor = copy.deepcopy(manifest["spec"]["predictor"])
    predictor.pop("canaryTrafficPercent", None)
    return predictor
