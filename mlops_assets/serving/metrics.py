"""`MetricsSource`: request, error and latency *counts* per revision, so statistics know n and k.

`ScrapeMetrics` reads the local routers' `/metrics` directly (the embedded default, no Prometheus
needed). Counters are cumulative; a window is the difference of two snapshots.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import dagster as dg


class MetricsUnavailableError(RuntimeError):
    """The metrics backend cannot be read; callers must treat this as "no data", never as success."""


@dataclass
class RevisionCounts:
    requests: int = 0
    errors: int = 0  # 5xx: the model or its server failed
    client_errors: int = 0  # 4xx: the caller sent something wrong
    latency_sum_s: float = 0.0
    feedback_success: int = 0  # A/B outcomes reported through the router's /-/feedback
    feedback_failure: int = 0
    # Cumulative histogram: upper bound (seconds) -> requests at or below it.
    buckets: dict[float, int] = field(default_factory=dict)

    def minus(self, earlier: RevisionCounts) -> RevisionCounts:
        return RevisionCounts(
            requests=self.requests - earlier.requests,
            errors=self.errors - earlier.errors,
            client_errors=self.client_errors - earlier.client_errors,
            latency_sum_s=self.latency_sum_s - earlier.latency_sum_s,
            feedback_success=self.feedback_success - earlier.feedback_success,
            feedback_failure=self.feedback_failure - earlier.feedback_failure,
            buckets={le: n - earlier.buckets.get(le, 0) for le, n in self.buckets.items()},
        )

    def slow_count(self, threshold_s: float) -> int:
        """Requests slower than `threshold_s`, conservatively: those above the largest bucket bound
        at or below the threshold (a request in a straddling bucket counts as slow)."""
        total = self.buckets.get(math.inf, 0)
        fast = max((n for le, n in self.buckets.items() if le <= threshold_s), default=0)
        return total - fast

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def latency_quantile(self, q: float) -> float | None:
        """Linear interpolation inside the histogram bucket, as PromQL's `histogram_quantile`."""
        total = self.buckets.get(math.inf, 0)
        if total <= 0:
            return None
        rank = q * total
        lower_bound, lower_count = 0.0, 0
        for le in sorted(self.buckets):
            count = self.buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower_bound
                if count == lower_count:
                    return le
                return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = le, count
        return lower_bound


def parse_router_metrics(text: str) -> dict[str, RevisionCounts]:
    """Per-revision counts from a router's Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, RevisionCounts] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            rev = sample.labels.get("revision")
            if rev is None:
                continue
            counts = out.setdefault(rev, RevisionCounts())
            if sample.name == "mlops_router_requests_total":
                code = sample.labels.get("code", "")
                counts.requests += int(sample.value)
                if code.startswith("5"):
                    counts.errors += int(sample.value)
                elif code.startswith("4"):
                    counts.client_errors += int(sample.value)
            elif sample.name == "mlops_router_request_duration_seconds_bucket":
                counts.buckets[float(sample.labels["le"])] = int(sample.value)
            elif sample.name == "mlops_router_feedback_total":
                if sample.labels.get("outcome") == "success":
                    counts.feedback_success += int(sample.value)
                else:
                    counts.feedback_failure += int(sample.value)
            elif sample.name == "mlops_router_request_duration_seconds_sum":
                counts.latency_sum_s = float(sample.value)
    return out


class MetricsSource(dg.ConfigurableResource, ABC):
    """Cumulative request, error and latency counts per revision of an InferenceService."""

    @abstractmethod
    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        """Cumulative counts per revision; `MetricsUnavailableError` if they cannot be read."""

    @abstractmethod
    def describe_query(self, isvc: str) -> str:
        """Where the numbers come from (a PromQL query or a scrape URL), shown in check metadata."""


class ScrapeMetrics(MetricsSource):
    """Reads the local router's `/metrics` directly; no Prometheus needed."""

    timeout_s: float = 5.0

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        try:
            with urllib.request.urlopen(f"{router_url}/metrics", timeout=self.timeout_s) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            raise MetricsUnavailableError(f"cannot scrape {router_url}/metrics for {isvc}: {exc}") from exc
        return parse_router_metrics(text)

    def describe_query(self, isvc: str) -> str:
        return f"scrape of the {isvc} router's /metrics: mlops_router_requests_total, mlops_router_request_duration_seconds"


class PrometheusMetrics(MetricsSource):
    """PromQL over Prometheus's HTTP API: the same queries for the embedded Prometheus and a cluster's."""

    url: str
    timeout_s: float = 5.0
    requests_metric: str = "mlops_router_requests_total"
    latency_metric: str = "mlops_router_request_duration_seconds_bucket"
    feedback_metric: str = "mlops_router_feedback_total"
    revision_label: str = "revision"

    def _query(self, promql: str) -> list[dict]:
        import json
        import urllib.parse

        url = f"{self.url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise MetricsUnavailableError(f"Prometheus at {self.url} did not answer {promql!r}: {exc}") from exc
        if body.get("status") != "success":
            raise MetricsUnavailableError(f"Prometheus rejected {promql!r}: {body.get('error')}")
        return body["data"]["result"]

    def queries(self, isvc: str) -> dict[str, str]:
        sel = f'isvc="{isvc}"'
        rev = self.revision_label
        return {
            "requests": f"sum by ({rev}, code) ({self.requests_metric}{{{sel}}})",
            "latency": f"sum by ({rev}, le) ({self.latency_metric}{{{sel}}})",
            "feedback": f"sum by ({rev}, outcome) ({self.feedback_metric}{{{sel}}})",
        }

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        q = self.queries(isvc)
        out: dict[str, RevisionCounts] = {}
        rev = self.revision_label
        for sample in self._query(q["requests"]):
            labels, value = sample["metric"], int(float(sample["value"][1]))
            counts = out.setdefault(labels.get(rev, ""), RevisionCounts())
            counts.requests += value
            code = labels.get("code", "")
            if code.startswith("5"):
                counts.errors += value
            elif code.startswith("4"):
                counts.client_errors += value
        for sample in self._query(q["latency"]):
            labels = sample["metric"]
            le = float(labels["le"]) if labels.get("le") not in ("+Inf", None) else math.inf
            out.setdefault(labels.get(rev, ""), RevisionCounts()).buckets[le] = int(float(sample["value"][1]))
        for sample in self._query(q["feedback"]):
            labels, value = sample["metric"], int(float(sample["value"][1]))
            counts = out.setdefault(labels.get(rev, ""), RevisionCounts())
            if labels.get("outcome") == "success":
                counts.feedback_success += value
            else:
                counts.feedback_failure += value
        out.pop("", None)
        return out

    def describe_query(self, isvc: str) -> str:
        return f"PromQL at {self.url}: " + "; ".join(self.queries(isvc).values())
