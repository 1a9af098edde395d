"""`PrometheusMetrics` with the cluster sources (`knative`, `istio`) against a real Prometheus.

There is no Kubernetes cluster here, so neither Knative's queue-proxy nor an Istio sidecar can run.
The stand-in is a tiny exporter: a hand-written Prometheus text exposition, served over HTTP on
127.0.0.1, carrying exactly the metric and label names those components expose
(`revision_request_count` / `revision_request_latencies_bucket` and `istio_requests_total` /
`istio_request_duration_milliseconds_bucket`, latencies in milliseconds) for two revisions of the
InferenceService `fraud-detector` in namespace `mlops-serving`, plus decoys that must be excluded
(another InferenceService, another namespace, Istio's reporter="source" copies). The real
`prometheus` binary scrapes it every second, so the PromQL, the label_replace and the ms -> s
conversion are checked by Prometheus itself against known counts. Without the binary the
Prometheus tests are skipped; the unit tests below them need nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from mlops_assets.core.processes import free_port
from mlops_assets.core.serving.metrics import PrometheusMetrics, RevisionCounts
from mlops_assets.core.settings import SettingsError, load_settings
from mlops_assets.defs.resources import build_resources

ISVC = "fraud-detector"
NAMESPACE = "mlops-serving"
REVISIONS = (f"{ISVC}-predictor-00001", f"{ISVC}-predictor-00002")
#: Response codes per revision (the truth the queries must recover).
CODES = {
    REVISIONS[0]: {"200": 900, "201": 20, "404": 7, "429": 3, "500": 11, "503": 4},
    REVISIONS[1]: {"200": 300, "400": 2, "502": 9},
}
KNATIVE_BUCKETS_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
ISTIO_BUCKETS_MS = (0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)


def _latencies_ms(seed: int, n: int, median_ms: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.lognormal(mean=np.log(median_ms), sigma=0.8, size=n), 1)


#: Latencies in ms per revision: the candidate is slower, so a mix-up of revisions shows.
LATENCIES_MS = {
    REVISIONS[0]: _latencies_ms(1, sum(CODES[REVISIONS[0]].values()), 40.0),
    REVISIONS[1]: _latencies_ms(2, sum(CODES[REVISIONS[1]].values()), 120.0),
}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _counter(name: str, labels: dict, by_code: dict[str, int]) -> list[str]:
    return [
        f"{name}{_labels({**labels, 'response_code': c, 'response_code_class': c[0] + 'xx'})} {n}" for c, n in by_code.items()
    ]


def _histogram(name: str, labels: dict, values_ms: np.ndarray, bounds_ms) -> list[str]:
    lines = [f"{name}_bucket{_labels({**labels, 'le': repr(b)})} {int((values_ms <= b).sum())}" for b in bounds_ms]
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {len(values_ms)}")
    lines.append(f"{name}_sum{_labels(labels)} {float(values_ms.sum())}")
    lines.append(f"{name}_count{_labels(labels)} {len(values_ms)}")
    return lines


def _split(values, parts: int):
    """Spread one revision's traffic over `parts` pods (Prometheus must sum them)."""
    return [values[i::parts] for i in range(parts)]


def knative_exposition() -> str:
    requests, latencies = ["# TYPE revision_request_count counter"], ["# TYPE revision_request_latencies histogram"]

    def add(namespace, isvc, revision, by_code, values, pods=1):
        for pod, (codes, vals) in enumerate(zip(_split_codes(by_code, pods), _split(values, pods), strict=True)):
            labels = {
                "namespace_name": namespace,
                "configuration_name": f"{isvc}-predictor",
                "revision_name": revision,
                "service_name": f"{isvc}-predictor",
                "pod_name": f"{revision}-deployment-{pod}",
                "container_name": "queue-proxy",
            }
            requests.extend(_counter("revision_request_count", labels, codes))
            latencies.extend(_histogram("revision_request_latencies", labels, vals, KNATIVE_BUCKETS_MS))

    for rev in REVISIONS:
        add(NAMESPACE, ISVC, rev, CODES[rev], LATENCIES_MS[rev], pods=2)
    # Decoys: another InferenceService whose name starts the same, and the same one elsewhere.
    add(NAMESPACE, f"{ISVC}-shadow", f"{ISVC}-shadow-predictor-00001", {"200": 5000, "500": 500}, np.full(5500, 3000.0))
    add("other", ISVC, f"{ISVC}-predictor-00001", {"200": 7000, "503": 700}, np.full(7700, 4000.0))
    return "\n".join(requests + latencies) + "\n"


def _split_codes(by_code: dict[str, int], parts: int) -> list[dict[str, int]]:
    return [{c: n // parts + (1 if i < n % parts else 0) for c, n in by_code.items()} for i in range(parts)]


def istio_exposition() -> str:
    requests, latencies = ["# TYPE istio_requests_total counter"], ["# TYPE istio_request_duration_milliseconds histogram"]

    def add(namespace, workload, by_code, values, reporter="destination"):
        labels = {
            "reporter": reporter,
            "source_workload": "istio-ingressgateway",
            "destination_workload": workload,
            "destination_workload_namespace": namespace,
            "destination_service_namespace": namespace,
        }
        requests.extend(_counter("istio_requests_total", labels, by_code))
        latencies.extend(_histogram("istio_request_duration_milliseconds", labels, values, ISTIO_BUCKETS_MS))

    for rev in REVISIONS:
        add(NAMESPACE, f"{rev}-deployment", CODES[rev], LATENCIES_MS[rev])
        # The client side's report of the same requests: counting it too would double them.
        add(NAMESPACE, f"{rev}-deployment", CODES[rev], LATENCIES_MS[rev], reporter="source")
    add(NAMESPACE, f"{ISVC}-shadow-predictor-00001-deployment", {"200": 5000, "500": 500}, np.full(5500, 3000.0))
    add(NAMESPACE, f"{ISVC}-transformer-00001-deployment", {"200": 600}, np.full(600, 3000.0))
    add("other", f"{ISVC}-predictor-00001-deployment", {"200": 7000, "503": 700}, np.full(7700, 4000.0))
    return "\n".join(requests + latencies) + "\n"


def expected(rev: str, bounds_ms) -> RevisionCounts:
    codes, values = CODES[rev], LATENCIES_MS[rev]
    buckets = {b / 1000: int((values <= b).sum()) for b in bounds_ms}
    buckets[math.inf] = len(values)
    return RevisionCounts(
        requests=sum(codes.values()),
        errors=sum(n for c, n in codes.items() if c.startswith("5")),
        client_errors=sum(n for c, n in codes.items() if c.startswith("4")),
        buckets=buckets,
    )


# --- the stand-in exporter and a real Prometheus scraping it -------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package `prometheus`)")
    body = (knative_exposition() + istio_exposition()).encode()

    class Exporter(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    exporter = ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    base = tmp_path_factory.mktemp("cluster_prometheus")
    config = base / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: cluster-standin\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter.server_address[1]}']\n"
    )
    port = free_port()
    log = open(base / "prometheus.log", "wb")  # noqa: SIM115 (closed in the teardown)
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _get(f"{url}/-/ready") is not None, 30, "Prometheus /-/ready", proc, base)
        # Ready is not scraped: wait until every series of the exposition is in.
        _wait_for(lambda: _scraped(url) >= _series(body), 20, "the first full scrape", proc, base)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        exporter.shutdown()
        exporter.server_close()


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read()
    except OSError:
        return None


def _instant(url: str, promql: str) -> list[dict]:
    raw = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    return json.loads(raw)["data"]["result"] if raw else []


def _series(body: bytes) -> int:
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))


def _scraped(url: str) -> int:
    result = _instant(url, 'count({job="cluster-standin", __name__!~"up|scrape_.*"})')
    return int(float(result[0]["value"][1])) if result else 0


def _wait_for(predicate, timeout_s: float, what: str, proc, base) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited ({proc.returncode}): {(base / 'prometheus.log').read_text()[-2000:]}")
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; log: {(base / 'prometheus.log').read_text()[-2000:]}")


@pytest.mark.parametrize(
    "source, bounds_ms, latency_metric",
    [
        ("knative", KNATIVE_BUCKETS_MS, "revision_request_latencies_bucket"),
        ("istio", ISTIO_BUCKETS_MS, "istio_request_duration_milliseconds_bucket"),
    ],
)
def test_counts_per_revision_match_the_truth(prometheus, source, bounds_ms, latency_metric):
    metrics = PrometheusMetrics(url=prometheus, source=source, namespace=NAMESPACE)
    counts = metrics.revision_counts(ISVC, "")
    # Exactly the two revisions: no shadow service, no transformer, nothing from namespace "other".
    assert set(counts) == set(REVISIONS)
    for rev in REVISIONS:
        want, got = expected(rev, bounds_ms), counts[rev]
        assert (got.requests, got.errors, got.client_errors) == (want.requests, want.errors, want.client_errors), rev
        assert got.buckets == want.buckets, rev
        # The 0.1 s bucket is the exporter's le=100 ms bucket.
        assert got.buckets[0.1] == int((LATENCIES_MS[rev] <= 100.0).sum())
        assert got.feedback_success == got.feedback_failure == 0
        # Quantiles come out in seconds: Prometheus's own histogram_quantile over the ms buckets / 1000.
        selector = (
            f'{{revision_name="{rev}", namespace_name="{NAMESPACE}"}}'
            if source == "knative"
            else f'{{reporter="destination", destination_workload="{rev}-deployment", '
            f'destination_workload_namespace="{NAMESPACE}"}}'
        )
        prom_p95_ms = float(
            _instant(prometheus, f"histogram_quantile(0.95, sum by (le) ({latency_metric}{selector}))")[0]["value"][1]
        )
        p95 = got.latency_quantile(0.95)
        assert p95 == pytest.approx(prom_p95_ms / 1000, rel=1e-9)
        true_p95_s = float(np.quantile(LATENCIES_MS[rev], 0.95)) / 1000
        lower = max([b / 1000 for b in bounds_ms if b / 1000 < true_p95_s] or [0.0])
        upper = min(b / 1000 for b in bounds_ms if b / 1000 >= true_p95_s)
        assert lower <= p95 <= upper, (rev, true_p95_s, p95)
    # The slower candidate is told apart from the stable revision.
    assert counts[REVISIONS[1]].latency_quantile(0.5) > counts[REVISIONS[0]].latency_quantile(0.5)
    description = metrics.describe_query(ISVC)
    assert "no A/B feedback" in description and NAMESPACE in description


def test_another_namespace_sees_only_its_own_revision(prometheus):
    for source in ("knative", "istio"):
        counts = PrometheusMetrics(url=prometheus, source=source, namespace="other").revision_counts(ISVC, "")
        assert set(counts) == {f"{ISVC}-predictor-00001"}
        assert (counts[f"{ISVC}-predictor-00001"].requests, counts[f"{ISVC}-predictor-00001"].errors) == (7700, 700)


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
    assert q["requests"].startswith("sum by (rev, response_code) (my_revision_requests{")
    assert q["latency"].startswith("sum by (rev, le) (my_revision_latency_bucket{")
    istio = PrometheusMetrics(
        url="http://127.0.0.1:9", source="istio", namespace=NAMESPACE, requests_metric="mesh_requests_total"
    ).queries(ISVC)
    assert "label_replace(mesh_requests_total{" in istio["requests"]
    assert "istio_request_duration_milliseconds_bucket" in istio["latency"]
    router = PrometheusMetrics(url="http://127.0.0.1:9", feedback_metric="ab_outcomes_total").queries(ISVC)
    assert router == {
        "requests": f'sum by (revision, code) (mlops_router_requests_total{{isvc="{ISVC}"}})',
        "latency": f'sum by (revision, le) (mlops_router_request_duration_seconds_bucket{{isvc="{ISVC}"}})',
        "feedback": f'sum by (revision, outcome) (ab_outcomes_total{{isvc="{ISVC}"}})',
    }
    # Unset names are the source's defaults, visible on the resource.
    defaults = PrometheusMetrics(url="http://127.0.0.1:9", source="knative", namespace=NAMESPACE)
    assert (defaults.requests_metric, defaults.revision_label) == ("revision_request_count", "revision_name")
    assert PrometheusMetrics(url="http://127.0.0.1:9").revision_label == "revision"
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        PrometheusMetrics(url="http://127.0.0.1:9", requests_metric="x{a='b'}")


def test_settings_parse_the_metrics_source(tmp_path):
    assert load_settings({}).metrics_source == "router"
    assert load_settings({"MLOPS_ENV": "kubernetes"}).metrics_source == "knative"
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
