"""Counts from the routers' Prometheus exposition, and histogram quantiles against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mlops_assets.core.serving.metrics import MetricsUnavailableError, RevisionCounts, ScrapeMetrics, parse_router_metrics
from mlops_assets.servers.router import LATENCY_BUCKETS, RoutingError, validate_routes


def _exposition(latencies: dict[str, np.ndarray], codes: dict[str, dict[str, int]]) -> str:
    registry = CollectorRegistry()
    requests = Counter("mlops_router_requests", "", ["isvc", "revision", "code"], registry=registry)
    latency = Histogram(
        "mlops_router_request_duration_seconds", "", ["isvc", "revision"], buckets=LATENCY_BUCKETS, registry=registry
    )
    for rev, values in latencies.items():
        for v in values:
            latency.labels("m", rev).observe(float(v))
    for rev, by_code in codes.items():
        for code, n in by_code.items():
            requests.labels("m", rev, code).inc(n)
    return generate_latest(registry).decode()


def test_counts_split_server_and_client_errors():
    text = _exposition({"a": np.array([0.01])}, {"a": {"200": 90, "500": 7, "502": 1, "400": 2}, "b": {"200": 5}})
    counts = parse_router_metrics(text)
    assert (counts["a"].requests, counts["a"].errors, counts["a"].client_errors) == (100, 8, 2)
    assert counts["a"].error_rate == pytest.approx(0.08)
    assert counts["b"].errors == 0 and counts["b"].requests == 5


def test_histogram_quantile_tracks_the_true_quantile_within_a_bucket():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=np.log(0.02), sigma=0.5, size=20_000)
    counts = parse_router_metrics(_exposition({"a": samples}, {"a": {"200": len(samples)}}))["a"]
    for q in (0.5, 0.95, 0.99):
        true = float(np.quantile(samples, q))
        upper = min(b for b in LATENCY_BUCKETS if b >= true)
        lower = max([b for b in LATENCY_BUCKETS if b < true] or [0.0])
        estimate = counts.latency_quantile(q)
        assert lower <= estimate <= upper, (q, true, estimate)


def test_windows_are_differences_and_empty_windows_have_no_rate():
    later = RevisionCounts(requests=10, errors=2, buckets={0.1: 10, math.inf: 10})
    earlier = RevisionCounts(requests=10, errors=2, buckets={0.1: 10, math.inf: 10})
    window = later.minus(earlier)
    assert window.requests == 0 and window.error_rate is None and window.latency_quantile(0.95) is None


def test_unreachable_router_is_unavailable_not_zero():
    with pytest.raises(MetricsUnavailableError, match="cannot scrape"):
        ScrapeMetrics(timeout_s=1).revision_counts("m", "http://127.0.0.1:9")


@pytest.mark.parametrize(
    "routes, message",
    [
        ({}, "revisions"),
        ({"revisions": {"a": "u"}, "traffic": [{"revision": "b", "percent": 100}]}, "unknown revision"),
        ({"revisions": {"a": "u"}, "traffic": [{"revision": "a", "percent": 90}]}, "sum to 90"),
        ({"revisions": {"a": "u"}, "traffic": [{"revision": "a", "percent": "100"}]}, "integer"),
        ({"revisions": {"a": "u"}, "traffic": [{"revision": "a", "percent": 100}], "tags": {"blue": "a"}}, "tag"),
    ],
)
def test_malformed_routing_tables_are_refused(routes, message):
    with pytest.raises(RoutingError, match=message):
        validate_routes(routes)
