"""The serving path as a cluster runs it, checked against upstream KServe, Knative and Istio.

No cluster runs here, so each test writes down the upstream fact it relies on (the file is named in its
docstring) and runs the project's real code against a stand-in that behaves that way:
- the pod annotations a built InferenceService ends up with after KServe's pod webhook and Istio's sidecar
  injector, and so the port Prometheus scrapes, against the NetworkPolicy that must let it through;
- `KubernetesPlatform`'s status against what KServe's ingress reconciler publishes (`status.url` with the
  ingress' https scheme, `status.address.url` plain HTTP in the cluster), on kmock;
- the `predictor_answers` check and blue-green validation against a model server that speaks only what the
  ServingRuntime KServe picks for the manifest speaks (kserve-mlserver: V2 only), listening where the
  status' in-cluster address points, while the https `status.url` answers nothing.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

import mlops_assets_tests.test_kubernetes_platform as kp
from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.rollout.analysis import Thresholds
from mlops_assets.core.rollout.strategies import PROMOTED, ROLLED_BACK, RolloutContext, run_blue_green
from mlops_assets.core.serving.kubernetes import KubernetesPlatform
from mlops_assets.core.serving.manifest import (
    RUNTIME_PROTOCOLS,
    Deployment,
    ManifestError,
    build_inference_service,
    protocol_of,
)
from mlops_assets.core.serving.metrics import RevisionCounts
from mlops_assets.core.serving.platform import ServiceStatus
from mlops_assets.defs.serving.checks import CHECK_PREDICTOR_ANSWERS, build_serving_checks

K8S = Path(__file__).parents[1] / "k8s" / "base"
NAME, NS = "fraud-detector", "mlops-serving"
#: Where `status.url` points in these tests: https on a port where nothing listens, as on a cluster whose
#: ingress has no certificate for the configured urlScheme. A call that uses it fails.
NO_TLS_HERE = "https://127.0.0.1:1"
FRAME = pd.DataFrame({"amount": [12.5, 80.0, 3.2], "hour": [1, 13, 23], "merchant": ["a", "b", "c"]})

# kserve/kserve config/runtimes/*.yaml (master aaac4e29, the 0.21 line): each ClusterServingRuntime's
# auto-selected `supportedModelFormats` and its `protocolVersions`. KServe serves an InferenceService with a
# runtime that supports both its model format and its protocolVersion (ModelSpec.GetSupportingRuntimes in
# pkg/apis/serving/v1beta1/predictor_model.go), an unset protocolVersion being v1 (ModelSpec.GetProtocol).
UPSTREAM_RUNTIMES = {
    "kserve-mlserver": ({"sklearn", "xgboost", "lightgbm", "mlflow"}, {"v2"}),
    "kserve-sklearnserver": ({"sklearn"}, {"v1", "v2"}),
    "kserve-xgbserver": ({"xgboost"}, {"v1", "v2"}),
    "kserve-lgbserver": ({"lightgbm"}, {"v1", "v2"}),
    "kserve-tritonserver": ({"onnx", "tensorflow", "tensorrt", "triton"}, {"v2", "grpc-v2"}),
    "kserve-tensorflow-serving": ({"tensorflow"}, {"v1", "grpc-v1"}),
    "kserve-torchserve": ({"pytorch"}, {"v1", "v2", "grpc-v2"}),
}


def spoken(model_format: str) -> set[str]:
    """The REST protocols some upstream runtime serves `model_format` over."""
    return {p for formats, protocols in UPSTREAM_RUNTIMES.values() if model_format in formats for p in protocols} & {
        "v1",
        "v2",
    }


def manifest(version: str = "1", **overrides) -> dict:
    return build_inference_service(
        Deployment(
            model_name="fraud_detector",
            version=version,
            storage_uri=f"s3://mlflow/1/run{version}/artifacts/model",
            namespace=NS,
            **overrides,
        )
    )


# ---- 1, 2: what Prometheus scrapes on a predictor pod ------------------------------------------------------
def kserve_pod_webhook(annotations: dict, metrics_aggregator: dict) -> dict:
    """KServe's InjectMetricsAggregator (kserve/kserve pkg/webhook/admission/pod/metrics_aggregate_injector.go):
    a pod annotation wins over the ConfigMap; scraping on sets prometheus.io/port to the queue-proxy's 9091, or
    to 9088 (QueueProxyAggregatePrometheusMetricsPort, served only by the qpext image) with aggregation."""
    pod = dict(annotations)
    aggregate = pod.setdefault("serving.kserve.io/enable-metric-aggregation", metrics_aggregator["enableMetricAggregation"])
    scrape = pod.setdefault("serving.kserve.io/enable-prometheus-scraping", metrics_aggregator["enablePrometheusScraping"])
    if scrape == "true":
        pod["prometheus.io/scrape"] = "true"
        pod["prometheus.io/port"] = "9088" if aggregate == "true" else "9091"
        pod["prometheus.io/path"] = "/metrics"
    return pod


def istio_sidecar_injector(pod: dict) -> dict:
    """Istio's metrics merging (istio/istio.io content/en/docs/ops/integrations/prometheus/index.md, on by
    default): the injector points prometheus.io/port at the agent's merged endpoint 15020 unless the pod opts out
    with prometheus.istio.io/merge-metrics: "false" (istio/api annotation/annotations.yaml)."""
    pod = dict(pod)
    if pod.get("prometheus.io/scrape") == "true" and pod.get("prometheus.istio.io/merge-metrics") != "false":
        pod["prometheus.io/port"], pod["prometheus.io/path"] = "15020", "/stats/prometheus"
    return pod


def ports_prometheus_may_reach_on_predictors() -> set[str]:
    """The ports the `predictors` NetworkPolicy lets Prometheus (namespace monitoring) reach."""
    docs = yaml.safe_load_all((K8S / "network-policies" / "mlops-serving.yaml").read_text())
    policy = next(d for d in docs if d and d["metadata"]["name"] == "predictors")
    ports = set()
    for rule in policy["spec"].get("ingress") or []:
        namespaces = {
            (peer.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            for peer in rule.get("from") or []
        }
        if "monitoring" in namespaces:
            ports |= {str(p["port"]) for p in rule.get("ports") or []}
    return ports


def test_a_built_service_is_scraped_on_a_port_that_is_served_and_allowed():
    """Built InferenceServices opt out of Istio's metrics merging and of KServe's metric aggregation, so the
    predictor pod's prometheus.io/port is the queue-proxy's 9091, which the NetworkPolicy allows, whatever the
    inferenceservice-config ConfigMap says (the pod annotation wins: kserve/kserve
    pkg/webhook/admission/pod/metrics_aggregate_injector.go); and Istio's proxy runs as a native sidecar so the
    storage initializer reaches MinIO (istio/api annotation/annotations.yaml)."""
    annotations = manifest()["metadata"]["annotations"]
    assert annotations["prometheus.istio.io/merge-metrics"] == "false"
    assert annotations["sidecar.istio.io/nativeSidecar"] == "true"
    allowed = ports_prometheus_may_reach_on_predictors()
    # The release default (config/configmap/inferenceservice.yaml: aggregation off) and an aggregating ConfigMap.
    for aggregator in (
        {"enableMetricAggregation": "false", "enablePrometheusScraping": "true"},
        {"enableMetricAggregation": "true", "enablePrometheusScraping": "true"},
    ):
        pod = istio_sidecar_injector(kserve_pod_webhook(annotations, aggregator))
        assert pod["prometheus.io/port"] == "9091", (aggregator, pod)
        assert pod["prometheus.io/port"] in allowed


def test_the_stand_ins_see_the_defects_they_guard_against():
    """Without the opt-outs, the same webhooks send Prometheus to 15020 (Istio) or 9088 (qpext, not installed)."""
    aggregating = {"enableMetricAggregation": "true", "enablePrometheusScraping": "true"}
    assert kserve_pod_webhook({}, aggregating)["prometheus.io/port"] == "9088"
    assert istio_sidecar_injector(kserve_pod_webhook({}, aggregating))["prometheus.io/port"] == "15020"
    assert "15020" not in ports_prometheus_may_reach_on_predictors()


# ---- 3: in-cluster calls use status.address.url ------------------------------------------------------------
@pytest.fixture
def cluster() -> Iterator[kp.FakeCluster]:
    with kp.FakeCluster() as fake:
        yield fake


def test_kubernetes_status_exposes_the_in_cluster_address_and_calls_use_it(cluster):
    """KServe's ingress reconciler sets `status.url` with the ingress' urlScheme (https here, on a host that
    serves no TLS) and `status.address.url` to http://<name>.<namespace>.svc.cluster.local (kserve/kserve
    pkg/controller/v1beta1/inferenceservice/reconcilers/ingress/ingress_reconciler.go); a tagged revision is
    Knative's cluster-local `<tag>-<route>` Service (knative/docs docs/serving/using-subroutes.md, tag-template
    in knative/serving pkg/reconciler/route/domains/domains.go). Every call is built on the address."""
    platform = KubernetesPlatform(host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=5)
    platform.apply(manifest("1"))
    status = platform.apply(manifest("2", canary_percent=0))
    assert status.url == f"https://{NAME}-{NS}.mlops.example.com"  # for display
    assert status.address == f"http://{NAME}.{NS}.svc.cluster.local"
    assert status.predict_url("v2") == f"http://{NAME}.{NS}.svc.cluster.local/v2/models/{NAME}/infer"
    assert status.predict_url("v2", tag="latest") == (
        f"http://latest-{NAME}-predictor.{NS}.svc.cluster.local/v2/models/{NAME}/infer"
    )


# ---- 4: the protocol the runtime speaks, and what checks and validation send -------------------------------
def test_the_builder_declares_a_protocol_the_chosen_runtime_speaks():
    """RUNTIME_PROTOCOLS is upstream's table (kserve/kserve config/runtimes/*.yaml `protocolVersions`): an MLflow
    model goes to kserve-mlserver, V2 only; a manifest declaring V1 for it would find no runtime."""
    assert {fmt: set(protocols) for fmt, protocols in RUNTIME_PROTOCOLS.items()} == {
        fmt: spoken(fmt) for fmt in RUNTIME_PROTOCOLS
    }
    assert spoken("mlflow") == {"v2"}
    assert protocol_of(manifest()) in spoken("mlflow")
    for model_format, protocols in RUNTIME_PROTOCOLS.items():
        for protocol in ("v1", "v2"):
            if protocol in protocols:
                assert protocol_of(manifest(model_format=model_format, protocol=protocol)) == protocol
            else:
                with pytest.raises(ManifestError, match="no runtime"):
                    manifest(model_format=model_format, protocol=protocol)


class RuntimeServer:
    """A model server speaking only `protocols`, as the upstream runtime does (kserve-mlserver: V2 only; the
    Open Inference Protocol's POST /v2/models/<name>/infer, kserve/open-inference-protocol
    specification/protocol/inference_rest.md). Anything else answers 404, as MLServer does for V1 paths."""

    def __init__(self, protocols: set[str]) -> None:
        self.protocols, self.requests = protocols, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                owner.requests.append((self.path, body))
                answer = owner.answer(self.path, body)
                data = json.dumps(answer[1]).encode()
                self.send_response(answer[0])
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if "v2" in self.protocols and path == f"/v2/models/{NAME}/infer":
            tensors = body.get("inputs") or []
            if not tensors or any(set(t) < {"name", "shape", "datatype", "data"} for t in tensors):
                return 400, {"error": "inputs must be tensors with name, shape, datatype and data"}
            n = tensors[0]["shape"][0]
            return 200, {
                "model_name": NAME,
                "outputs": [{"name": "predict", "shape": [n], "datatype": "FP64", "data": [0.1] * n}],
            }
        if "v1" in self.protocols and path == f"/v1/models/{NAME}:predict":
            return 200, {"predictions": [0.1] * len(body.get("instances") or [])}
        return 404, {"error": f"Model with name {NAME} not found" if "models" in path else "Not Found"}

    def __enter__(self) -> RuntimeServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class ClusterLikePlatform:
    """What `KubernetesPlatform` reports on a cluster, for the code that calls the model (a plain stand-in: the
    real status parsing is covered above on kmock): `url` is https where nothing serves TLS, the in-cluster
    addresses lead to `server`. Blue is revision 1; applying a manifest cuts green, revision 2, at its canary percent."""

    def __init__(self, server: RuntimeServer, manifest: dict) -> None:
        self.server, self._manifest, self.applied = server, manifest, []
        self.green_percent: int | None = None

    def status(self, name: str) -> ServiceStatus:
        revisions = {"rev-1": {"model_version": "1", "status": "ready"}}
        traffic = [{"revisionName": "rev-1", "percent": 100, "latestRevision": self.green_percent is None}]
        if self.green_percent is not None:
            revisions["rev-2"] = {"model_version": "2", "status": "ready"}
            traffic = [
                {"revisionName": "rev-2", "percent": self.green_percent, "latestRevision": True, "tag": "latest"},
                {"revisionName": "rev-1", "percent": 100 - self.green_percent, "latestRevision": False, "tag": "prev"},
            ]
        latest = "rev-2" if self.green_percent is not None else "rev-1"
        return ServiceStatus(
            name=NAME,
            namespace=NS,
            url=NO_TLS_HERE,
            ready=True,
            traffic=traffic,
            latest_created=latest,
            latest_ready=latest,
            latest_rolledout="rev-2" if self.green_percent == 100 else "rev-1",
            previous_rolledout="rev-1" if self.green_percent == 100 else None,
            canary_percent=self.green_percent,
            revisions=revisions,
            tag_urls={"latest": NO_TLS_HERE, "prev": NO_TLS_HERE},
            address=self.server.url,
            tag_addresses={"latest": self.server.url, "prev": self.server.url},
        )

    def list_services(self) -> list[str]:
        return [NAME]

    def manifest(self, name: str) -> dict:
        return self._manifest

    def apply(self, manifest: dict) -> ServiceStatus:
        self.applied.append(manifest)
        self.green_percent = manifest["spec"]["predictor"].get("canaryTrafficPercent", 100)
        return self.status(NAME)

    def promote(self, name: str) -> ServiceStatus:
        self.green_percent = 100
        return self.status(name)

    def rollback(self, name: str) -> ServiceStatus:
        self.green_percent = 0
        return self.status(name)

    def shadow_pairs(self, name: str, since: int = 0) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not record mirrored requests")


class ServedCounts:
    """Per-revision counts of the requests the runtime server answered, all fast (what Prometheus would hold)."""

    def __init__(self, server: RuntimeServer) -> None:
        self.server = server

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        n = len(self.server.requests)
        return {"rev-2": RevisionCounts(requests=n, latency_sum_s=0.01 * n, buckets={0.05: n, math.inf: n})}

    def describe_query(self, isvc: str) -> str:
        return "requests the runtime stand-in answered"


class FakeRegistry:
    """Only what `predictor_answers` asks the registry: the serving version (its input example is FRAME)."""

    def get_version(self, name: str, version: str | None) -> dict:
        return {"name": name, "version": version}


@pytest.fixture
def input_example_is_frame(monkeypatch):
    import mlops_assets.core.model_artifacts as artifacts

    monkeypatch.setattr(artifacts, "input_example", lambda mlflow, version: FRAME)


def run_predictor_answers(platform) -> dg.AssetCheckResult:
    checks = {c.check_key.name: c for c in build_serving_checks(ModelDeclaration(name="fraud_detector"))}
    return checks[CHECK_PREDICTOR_ANSWERS](serving=platform, mlflow=FakeRegistry())


@pytest.mark.usefixtures("input_example_is_frame")
def test_predictor_answers_speaks_the_declared_protocol_to_the_in_cluster_address():
    """An MLflow model on a cluster is served by kserve-mlserver (kserve/kserve config/runtimes/kserve-mlserver.yaml:
    protocolVersions [v2]): the blocking check passes against it by sending one V2 request to the address, and
    fails (404 counted, never a pass) against a runtime that does not speak the declared protocol."""
    built = manifest()
    with RuntimeServer(spoken("mlflow")) as server:
        result = run_predictor_answers(ClusterLikePlatform(server, built))
        assert result.passed, result.metadata
        assert result.metadata["protocol"].value == "v2" and result.metadata["scores"].value == len(FRAME)
        assert [path for path, _ in server.requests] == [f"/v2/models/{NAME}/infer"]
        tensors = {t["name"]: t for t in server.requests[0][1]["inputs"]}
        assert tensors["hour"]["datatype"] == "INT64" and tensors["amount"]["datatype"] == "FP64"
        assert tensors["merchant"]["datatype"] == "BYTES" and tensors["hour"]["shape"] == [len(FRAME)]
    with RuntimeServer({"v1"}) as v1_only:
        result = run_predictor_answers(ClusterLikePlatform(v1_only, built))
        assert not result.passed and result.metadata["status"].value == 404


def blue_green(platform: ClusterLikePlatform, server: RuntimeServer, requests: int = 5):
    events = []
    ctx = RolloutContext(
        platform=platform, metrics=ServedCounts(server), isvc=NAME, emit=events.append, log=lambda _: None, poll_s=0.0
    )
    thresholds = Thresholds(
        max_error_rate=0.05, max_p95_latency_s=0.5, steps=(100,), min_requests_per_step=1, no_data_deadline_s=0.2
    )
    v1_body = json.dumps({"instances": FRAME.to_dict(orient="records")}).encode()  # what defs/serving sends
    result = run_blue_green(ctx, manifest("2"), thresholds, v1_body, validation_requests=requests)
    return result, events


def test_blue_green_validates_green_in_the_declared_protocol_and_a_404_fails_it():
    """Blue-green validation posts to green's in-cluster tag address in the protocol the manifest declares (the
    V1 body defs/serving builds becomes the V2 body of the same rows for kserve-mlserver, kserve/kserve
    config/runtimes/kserve-mlserver.yaml), and a 404 (green does not serve that endpoint) fails validation."""
    with RuntimeServer(spoken("mlflow")) as server:
        platform = ClusterLikePlatform(server, manifest("1"))
        result, events = blue_green(platform, server)
        validated = next(e for e in events if e.kind in ("validated", "rollback"))
        assert validated.kind == "validated", validated.evidence
        assert validated.evidence["validation_protocol"] == "v2" and validated.evidence["validation_errors"] == 0
        assert {path for path, _ in server.requests} == {f"/v2/models/{NAME}/infer"}
        assert result.outcome in (PROMOTED, ROLLED_BACK)  # decided afterwards by the post-switch analysis
    with RuntimeServer(set()) as nothing:  # every path 404
        platform = ClusterLikePlatform(nothing, manifest("1"))
        result, events = blue_green(platform, nothing)
        assert result.outcome == ROLLED_BACK and platform.green_percent == 0
        rollback = next(e for e in events if e.kind == "rollback")
        assert rollback.evidence["validation_errors"] == rollback.evidence["validation_client_errors"] == 5
