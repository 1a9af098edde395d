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
    # Cumulative histogram: upper bound (seconds) -> requests at or below it.
    buckets: dict[float, int] = field(default_factory=dict)

    def minus(self, earlier: RevisionCounts) -> RevisionCounts:
        return RevisionCounts(
            requests=self.requests - earlier.requests,
            errors=self.errors - earlier.errors,
            client_errors=self.client_errors - earlier.client_errors,
            latency_sum_s=self.latency_sum_s - earlier.latency_sum_s,
            buckets={le: n - earlier.buckets.get(le, 0) for le, n in self.buckets.items()},
        )

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
