"""`PrometheusMetrics` with the cluster sources (`istio`, the default on a cluster, and `knative`) against
a real Prometheus scraping a stand-in of the releases KServe 0.21 pins (Istio 1.27.1, Knative 1.21.1).

There is no Kubernetes cluster here, so neither an Istio sidecar nor Knative's queue-proxy can run.
`mesh_standin.MeshStandin` serves, per predictor pod, the sidecar's `/stats/prometheus` and the
queue-proxy's `/metrics` with exactly the names, labels and units upstream emits (its docstring cites
the files: istio/proxy `source/extensions/filters/http/istio_stats/istio_stats.cc`, envoyproxy/envoy
`source/common/stats/histogram_impl.cc`, knative/serving `pkg/queue/request_metric.go` and
`pkg/queue/sharedmain/otel.go`, knative/pkg `observability/metrics/prometheus_enabled.go`), for two
revisions of `fraud-detector` in `mlops-serving` with known request, error and latency counts, plus
decoys that must be excluded: a shadow InferenceService whose name starts the same, a transformer,
the same InferenceService in another namespace, and the caller's reporter="source" copy of every
request. The real `prometheus` binary scrapes one target per pod and exposition (file-based discovery,
each with its pod's instance), so the PromQL, the target_info join, the revision regex and the ms -> s
conversion are checked by Prometheus itself. Knative up to 1.18 exposed `revision_request_count` /
`revision_request_latencies` (ms, `namespace_name` / `revision_name`); 1.19 replaced them, and the
queries for them found nothing on a current cluster: the first tests here would have failed on them.
Without the binary the Prometheus tests are skipped; the unit tests below them need nothing.
"""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest

from mlops_assets.core.serving.metrics import PrometheusMetrics, RevisionCounts
from mlops_assets.core.settings import SettingsError, load_settings
from mlops_assets.defs.resources import build_resources
from mlops_assets_tests.mesh_standin import ENVOY_BUCKETS_MS, QUEUE_PROXY_BUCKETS_S, MeshStandin, StandinPrometheus

ISVC = "fraud-detector"
NAMESPACE = "mlops-serving"
REVISIONS = (f"{ISVC}-predictor-00001", f"{ISVC}-predictor-00002")
#: Response codes per revision (the truth the queries must recover).
CODES = {
    REVISIONS[0]: {200: 900, 201: 20, 404: 7, 429: 3, 500: 11, 503: 4},
    REVISIONS[1]: {200: 300, 400: 2, 502: 9},
}
#: Pods per revision: Prometheus must sum them.
PODS = {REVISIONS[0]: 2, REVISIONS[1]: 1}
#: Long enough that Knative hashes its Deployment's name (kmeta.ChildName): destination_workload no
#: longer names the revision, destination_app still does.
LONG_ISVC = "credit-limit-recommender-gradient-boost"
LONG_REVISION = f"{LONG_ISVC}-predictor-00001"


def _latencies_s(seed: int, n: int, median_s: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.lognormal(mean=np.log(median_s), sigma=0.8, size=n), 4)


#: Latencies in seconds per revision: the candidate is slower, so a mix-up of revisions shows.
LATENCIES_S = {
    REVISIONS[0]: _latencies_s(1, sum(CODES[REVISIONS[0]].values()), 0.040),
    REVISIONS[1]: _latencies_s(2, sum(CODES[REVISIONS[1]].values()), 0.120),
}


def _serve(standin: MeshStandin, namespace: str, revision: str, codes: dict[int, int], latencies, pods: int = 1):
    """Spread one revision's requests over its pods, round robin, in a shuffled code order."""
    order = [code for code, n in codes.items() for _ in range(n)]
    np.random.default_rng(len(order)).shuffle(order)
    targets = [standin.add_pod(namespace, revision) for _ in range(pods)]
    for i, (code, latency) in enumerate(zip(order, latencies, strict=True)):
        targets[i % pods].record(int(code), float(latency))


def expected(rev: str, bounds_s) -> RevisionCounts:
    codes, values = CODES[rev], LATENCIES_S[rev]
    buckets = {float(b): int((values <= b).sum()) for b in bounds_s}
    buckets[math.inf] = len(values)
    return RevisionCounts(
        requests=sum(codes.values()),
        errors=sum(n for c, n in codes.items() if c >= 500),
        client_errors=sum(n for c, n in codes.items() if 400 <= c < 500),
        buckets=buckets,
    )


# --- the stand-in and a real Prometheus scraping it ------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh_prometheus")
    standin = MeshStandin(base / "sd")
    for rev in REVISIONS:
        _serve(standin, NAMESPACE, rev, CODES[rev], LATENCIES_S[rev], pods=PODS[rev])
    # Decoys: another InferenceService whose name starts the same, a transformer, the same one elsewhere.
    _serve(standin, NAMESPACE, f"{ISVC}-shadow-predictor-00001", {200: 50, 500: 5}, np.full(55, 3.0))
    _serve(standin, NAMESPACE, f"{ISVC}-transformer-00001", {200: 60}, np.full(60, 3.0))
    _serve(standin, "other", f"{ISVC}-predictor-00001", {200: 70, 503: 7}, np.full(77, 4.0))
    _serve(standin, NAMESPACE, LONG_REVISION, {200: 30, 500: 3}, np.full(33, 0.02))
    try:
        server = StandinPrometheus(standin, base)
    except FileNotFoundError as exc:
        standin.close()
        pytest.skip(str(exc))
    try:
        server.wait_until_scraped(standin)
        yield server
    finally:
        server.close()
        standin.close()


def cluster_metrics(url: str, source: str | None) -> PrometheusMetrics:
    """The metrics resource MLOPS_ENV=kubernetes builds (the default source unless `source`)."""
    env = {"MLOPS_ENV": "kubernetes", "MLOPS_PROMETHEUS_URL": url, "MLOPS_NAMESPACE": NAMESPACE}
    if source:
        env["MLOPS_METRICS_SOURCE"] = source
    return build_resources(load_settings(env))["metrics"]


@pytest.mark.parametrize(
    "source, bounds_s, latency_metric, le_per_second",
    [
        (None, [b / 1000 for b in ENVOY_BUCKETS_MS], "istio_request_duration_milliseconds_bucket", 1000),
        ("knative", QUEUE_PROXY_BUCKETS_S, "kn_serving_invocation_duration_seconds_bucket", 1),
    ],
    ids=["default-istio", "knative"],
)
def test_counts_per_revision_match_what_the_standin_served(prometheus, source, bounds_s, latency_metric, le_per_second):
    metrics = cluster_metrics(prometheus.url, source)
    assert metrics.source == (source or "istio")
    counts = metrics.revision_counts(ISVC, "")
    # Exactly the two revisions: no shadow service, no transformer, nothing from namespace "other".
    assert set(counts) == set(REVISIONS)
    for rev in REVISIONS:
        want, got = expected(rev, bounds_s), counts[rev]
        assert got.requests > 0
        assert (got.requests, got.errors, got.client_errors) == (want.requests, want.errors, want.client_errors), rev
        assert got.buckets == pytest.approx(want.buckets), rev
        assert got.buckets[0.1] == int((LATENCIES_S[rev] <= 0.1).sum())
        assert got.feedback_success == got.feedback_failure == 0
        # Quantiles in seconds: Prometheus's own histogram_quantile over the same query, in the source's unit.
        p95_native = {
            r["metric"][metrics.revision_label]: float(r["value"][1])
            for r in prometheus.instant(f"histogram_quantile(0.95, {metrics.queries(ISVC)['latency']})")
        }[rev]
        p95 = got.latency_quantile(0.95)
        true_p95 = float(np.quantile(LATENCIES_S[rev], 0.95))
        lower = max([b for b in bounds_s if b < true_p95] or [0.0])
        upper = min(b for b in bounds_s if b >= true_p95)
        assert lower <= p95 <= upper, (rev, true_p95, p95)
        assert p95 == pytest.approx(p95_native / le_per_second, rel=1e-9)
    # The slower candidate is told apart from the stable revision.
    assert counts[REVISIONS[1]].latency_quantile(0.5) > counts[REVISIONS[0]].latency_quantile(0.5)
    description = metrics.describe_query(ISVC)
    assert "no A/B feedback" in description and NAMESPACE in description and latency_metric in description


@pytest.mark.parametrize("source", ["istio", "knative"])
def test_each_namespace_and_service_sees_only_its_own_revisions(prometheus, source):
    other = PrometheusMetrics(url=prometheus.url, source=source, namespace="other").revision_counts(ISVC, "")
    assert {r: (c.requests, c.errors) for r, c in other.items()} == {f"{ISVC}-predictor-00001": (77, 7)}
    shadow = PrometheusMetrics(url=prometheus.url, source=source, namespace=NAMESPACE).revision_counts(f"{ISVC}-shadow", "")
    assert {r: (c.requests, c.errors) for r, c in shadow.items()} == {f"{ISVC}-shadow-predictor-00001": (55, 5)}


@pytest.mark.parametrize("source", ["istio", "knative"])
def test_a_long_name_whose_deployment_knative_hashes_is_still_found(prometheus, source):
    """Knative names the Deployment kmeta.ChildName(revision, "-deployment"): past 63 characters that is a
    hash, so Istio's destination_workload no longer carries the revision; destination_app does."""
    workloads = {
        r["metric"]["destination_workload"]
        for r in prometheus.instant(f'istio_requests_total{{destination_app="{LONG_REVISION}"}}')
    }
    assert workloads and all(not w.startswith(LONG_REVISION) for w in workloads), workloads
    counts = PrometheusMetrics(url=prometheus.url, source=source, namespace=NAMESPACE).revision_counts(LONG_ISVC, "")
    assert {r: (c.requests, c.errors) for r, c in counts.items()} == {LONG_REVISION: (33, 3)}


def test_the_standin_speaks_the_upstream_names(prometheus):
    """What a Prometheus holds from the stand-in: the names a query may rely on, and none of Knative <= 1.18's."""
    names = set(json_names(prometheus))
    assert {"istio_requests_total", "istio_request_duration_milliseconds_bucket", "target_info"} <= names
    assert {f"kn_serving_invocation_duration_seconds_{s}" for s in ("bucket", "sum", "count")} <= names
    assert not {"revision_request_count", "revision_request_latencies_bucket"} & names
    info = prometheus.instant(f'target_info{{kn_revision_name="{REVISIONS[1]}"}}')
    assert len(info) == PODS[REVISIONS[1]] and info[0]["metric"]["k8s_container_name"] == "queue-proxy"
    codes = {r["metric"]["http_response_status_code"] for r in prometheus.instant("kn_serving_invocation_duration_seconds_count")}
    assert {"200", "502"} <= codes


def json_names(prometheus: StandinPrometheus) -> list[str]:
    import json

    return json.loads(prometheus.get("/api/v1/label/__name__/values"))["data"]


# --- unit tests: no Prometheus needed ------------------------------------------------------------


def test_unknown_source_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError, match=r"'linkerd' is not one of router, knative, istio"):
        PrometheusMetrics(url="http://127.0.0.1:9", source="linkerd", namespace=NAMESPACE)


@pytest.mark.parametrize("source", ["knative", "istio"])
def test_cluster_sources_need_a_valid_namespace(source):
    with pytest.raises(ValueError, match="needs a namespace"):
        PrometheusMetrics(url="http://127.0.0.1:9", source=source)
    with pytest.raises(ValueError, match="not a DNS-1123 label"):
        PrometheusMetrics(url="http://127.0.0.1:9", source=source, namespace='mlops"} or vector(1) or {x="')
    assert PrometheusMetrics(url="http://127.0.0.1:9").namespace == ""  # the router needs none


@pytest.mark.parametrize("source", ["router", "knative", "istio"])
def test_injected_isvc_name_is_refused_before_any_http_call(source, monkeypatch):
    def no_http(*args, **kwargs):
        raise AssertionError("an HTTP call was made with an unvalidated name")

    monkeypatch.setattr(urllib.request, "urlopen", no_http)
    metrics = PrometheusMetrics(url="http://127.0.0.1:9", source=source, namespace=NAMESPACE)
    with pytest.raises(ValueError, match="DNS-1035"):
        metrics.revision_counts('x"} or vector(1)', "")
    with pytest.raises(ValueError, match="DNS-1035"):
        metrics.queries('x"} or vector(1)')


def test_name_overrides_show_up_in_the_queries():
    metrics = PrometheusMetrics(
        url="http://127.0.0.1:9",
        source="knative",
        namespace=NAMESPACE,
        requests_metric="my_revision_requests",
        latency_metric="my_revision_latency_bucket",
        revision_label="rev",
    )
    q = metrics.queries(ISVC)
    assert set(q) == {"requests", "latency"}
    info = f'target_info{{k8s_namespace_name="{NAMESPACE}", kn_configuration_name="{ISVC}-predictor"}}'
    join = f"* on (job, instance) group_left (rev) {info})"
    assert q["requests"] == f"sum by (rev, http_response_status_code) (my_revision_requests {join}"
    assert q["latency"] == f"sum by (rev, le) (my_revision_latency_bucket {join}"
    istio = PrometheusMetrics(
        url="http://127.0.0.1:9", source="istio", namespace=NAMESPACE, requests_metric="mesh_requests_total"
    ).queries(ISVC)
    selector = f'reporter="destination", destination_workload_namespace="{NAMESPACE}", destination_app=~"{ISVC}-predictor-[0-9]+"'
    assert istio == {
        "requests": f"sum by (destination_app, response_code) (mesh_requests_total{{{selector}}})",
        "latency": f"sum by (destination_app, le) (istio_request_duration_milliseconds_bucket{{{selector}}})",
    }
    router = PrometheusMetrics(url="http://127.0.0.1:9", feedback_metric="ab_outcomes_total").queries(ISVC)
    assert router == {
        "requests": f'sum by (revision, code) (mlops_router_requests_total{{isvc="{ISVC}"}})',
        "latency": f'sum by (revision, le) (mlops_router_request_duration_seconds_bucket{{isvc="{ISVC}"}})',
        "feedback": f'sum by (revision, outcome) (ab_outcomes_total{{isvc="{ISVC}"}})',
    }
    # Unset names are the source's defaults, visible on the resource.
    defaults = PrometheusMetrics(url="http://127.0.0.1:9", source="knative", namespace=NAMESPACE)
    assert (defaults.requests_metric, defaults.revision_label) == (
        "kn_serving_invocation_duration_seconds_count",
        "kn_revision_name",
    )
    assert PrometheusMetrics(url="http://127.0.0.1:9").revision_label == "revision"
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        PrometheusMetrics(url="http://127.0.0.1:9", requests_metric="x{a='b'}")


def test_settings_parse_the_metrics_source(tmp_path):
    assert load_settings({}).metrics_source == "router"
    # The mesh is required on a cluster; Knative's queue-proxy metrics are off unless turned on.
    assert load_settings({"MLOPS_ENV": "kubernetes"}).metrics_source == "istio"
    assert load_settings({"MLOPS_ENV": "kubernetes", "MLOPS_METRICS_SOURCE": "knative"}).metrics_source == "knative"
    assert load_settings({"MLOPS_ENV": "kubernetes", "MLOPS_METRICS_SOURCE": " Istio "}).metrics_source == "istio"
    assert load_settings({"MLOPS_METRICS_SOURCE": "knative"}).metrics_source == "knative"
    with pytest.raises(SettingsError, match="MLOPS_METRICS_SOURCE"):
        load_settings({"MLOPS_METRICS_SOURCE": "linkerd"})
    settings = load_settings(
        {
            "MLOPS_HOME": str(tmp_path),
            "MLOPS_PROMETHEUS_URL": "http://127.0.0.1:9",
            "MLOPS_METRICS_SOURCE": "istio",
            "MLOPS_NAMESPACE": NAMESPACE,
        }
    )
    metrics = build_resources(settings)["metrics"]
    assert (metrics.source, metrics.namespace) == ("istio", NAMESPACE)


def test_the_shipped_cluster_settings_use_the_upstream_keys_and_ports():
    """k8s/metrics/: the key knative/pkg parses for the queue-proxy (`request-` + `metrics-protocol`,
    observability/metrics/config.go; knative/serving pkg/observability/config.go) set to its Prometheus
    protocol, in both the ConfigMap patch and the Operator's KnativeServing; the scrape jobs on the
    ports upstream names (`http-usermetric`, knative/serving pkg/apis/serving/v1/revision_helpers.go;
    `http-envoy-prom` with /stats/prometheus, istio/istio injection-template.yaml)."""
    from pathlib import Path

    import yaml

    base = Path(__file__).resolve().parents[1] / "k8s" / "metrics"
    patch = yaml.safe_load((base / "config-observability-patch.yaml").read_text())
    assert (patch["metadata"]["namespace"], patch["metadata"]["name"]) == ("knative-serving", "config-observability")
    assert patch["data"] == {"request-metrics-protocol": "prometheus"}
    operator = yaml.safe_load((base / "knativeserving-observability.yaml").read_text())
    assert operator["spec"]["config"]["observability"] == patch["data"]
    jobs = {job["job_name"]: job for job in yaml.safe_load((base / "prometheus-scrape-jobs.yaml").read_text())["scrape_configs"]}
    assert jobs["envoy-stats"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy-stats"]["relabel_configs"][0]["regex"] == ".*-envoy-prom"
    keep = jobs["knative-queue-proxy"]["relabel_configs"][0]
    assert (keep["action"], keep["regex"]) == ("keep", "queue-proxy;http-usermetric")
    assert "metrics_path" not in jobs["knative-queue-proxy"]  # /metrics, the Prometheus default
