"""`MetricsSource`: request, error and latency *counts* per revision, so statistics know n and k.

`ScrapeMetrics` reads the local routers' `/metrics` directly (the embedded default, no Prometheus
needed). `PrometheusMetrics` asks a Prometheus for the same counts, from one of three sources: the
local router (`router`), the Istio sidecars (`istio`, the default on a cluster: the mesh is required
there anyway) or Knative's queue-proxy (`knative`, Knative 1.19+ OpenTelemetry metrics, off unless
the cluster turns them on). What each cluster source needs is in k8s/metrics/README.md. Counters are
cumulative; a window is the difference of two snapshots.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import pydantic

from mlops_assets.core import http
from mlops_assets.core.config import EngineConfig
from mlops_assets.core.serving.manifest import validate_dns1035
from mlops_assets.core.settings import METRICS_SOURCES


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


class MetricsSource(EngineConfig, ABC):
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
        url = f"{router_url}/metrics"
        try:
            resp = http.request(url, timeout=self.timeout_s)
            if not resp.ok:
                raise ValueError(f"answered HTTP {resp.status}")
            content_type = resp.headers.get("content-type", "")
            if not content_type.startswith(("text/plain", "application/openmetrics-text")):
                raise ValueError(f"content-type {content_type!r} is not Prometheus' text format")
            return parse_router_metrics(resp.body.decode())
        # Every way a read can fail (refused, timeout, HTTP error, a truncated body, an HTML page,
        # bytes that do not parse) is "no data": never an exception that ends a rollout unwatched.
        except (http.HttpUnavailableError, ValueError, KeyError) as exc:
            raise MetricsUnavailableError(f"cannot scrape {url} for {isvc}: {type(exc).__name__}: {exc}") from exc

    def describe_query(self, isvc: str) -> str:
        return f"scrape of the {isvc} router's /metrics: mlops_router_requests_total, mlops_router_request_duration_seconds"


@dataclass(frozen=True)
class MetricsSourceSpec:
    """Where one source keeps its numbers: metric and label names, and the latency unit."""

    requests_metric: str
    latency_metric: str
    feedback_metric: str  # "" when the source has no A/B outcomes
    revision_label: str
    code_label: str
    le_per_second: float  # histogram bounds are divided by this to give seconds
    needs_namespace: bool


#: Defaults per `PrometheusMetrics.source`; each name can still be overridden on the resource.
#: The cluster sources were read off the releases KServe 0.21 pins (kserve-deps.env: Knative 1.21.1,
#: Istio 1.27.1); k8s/metrics/README.md cites the upstream files.
SOURCE_SPECS: dict[str, MetricsSourceSpec] = {
    # The local router: `mlops_router_*{isvc, revision, code}`, latency in seconds.
    "router": MetricsSourceSpec(
        requests_metric="mlops_router_requests_total",
        latency_metric="mlops_router_request_duration_seconds_bucket",
        feedback_metric="mlops_router_feedback_total",
        revision_label="revision",
        code_label="code",
        le_per_second=1.0,
        needs_namespace=False,
    ),
    # Knative >= 1.19 queue-proxy (pkg/queue/request_metric.go): one OpenTelemetry histogram,
    # `kn.serving.invocation.duration` in seconds with the attribute `http.response.status_code`; its
    # Prometheus exporter (knative.dev/pkg observability/metrics, UnderscoreEscapingWithSuffixes) names
    # it `kn_serving_invocation_duration_seconds_{bucket,count,sum}{http_response_status_code}`. The
    # revision is a *resource* attribute (`kn.revision.name`, pkg/queue/sharedmain/otel.go), which that
    # exporter puts on `target_info` only: the queries join it on (job, instance). Requests are the
    # histogram's `_count`: there is no separate request counter.
    "knative": MetricsSourceSpec(
        requests_metric="kn_serving_invocation_duration_seconds_count",
        latency_metric="kn_serving_invocation_duration_seconds_bucket",
        feedback_metric="",
        revision_label="kn_revision_name",
        code_label="http_response_status_code",
        le_per_second=1.0,
        needs_namespace=True,
    ),
    # Istio 1.27 sidecars (istio/proxy istio_stats.cc), reporter="destination": the predictor pod's own
    # sidecar. `destination_app` is the pod's `app` label, which Knative sets to the revision name
    # (revision/resources/meta.go); `destination_workload` is the Deployment `<revision>-deployment`,
    # hashed by kmeta.ChildName past 63 characters, so it cannot name the revision. Latency in ms.
    "istio": MetricsSourceSpec(
        requests_metric="istio_requests_total",
        latency_metric="istio_request_duration_milliseconds_bucket",
        feedback_metric="",
        revision_label="destination_app",
        code_label="response_code",
        le_per_second=1000.0,
        needs_namespace=True,
    ),
}
assert tuple(SOURCE_SPECS) == METRICS_SOURCES

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def validate_namespace(value: str) -> str:
    """A Kubernetes namespace (DNS-1123 label), so it can be quoted into PromQL as is."""
    if not isinstance(value, str) or not value or len(value) > 63 or not _DNS_1123.match(value):
        raise ValueError(
            f"namespace {value!r} is not a DNS-1123 label: 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


class PrometheusMetrics(MetricsSource):
    """PromQL over Prometheus's HTTP API: the same queries for the embedded Prometheus and a cluster's.

    `source` picks the metric names (see SOURCE_SPECS): `router` (the local router, the default
    locally), `istio` (the predictor pods' sidecars, reporter="destination", the default on a cluster)
    or `knative` (Knative 1.19+ queue-proxy OpenTelemetry metrics, joined to `target_info` for the
    revision). Both cluster sources select the InferenceService `isvc` in `namespace` by what KServe
    and Knative name it: the Knative Configuration `<isvc>-predictor` and its revisions
    `<isvc>-predictor-NNNNN`. Empty name fields mean "the source's default"; latency bounds are always
    returned in seconds. Only the router has A/B feedback outcomes. The settings each cluster source
    needs (scrape jobs, Knative's `request-metrics-protocol`) are in k8s/metrics/.

    The counts are sums over the series Prometheus holds *now*: when Knative scales a revision down,
    its pod's series go stale and leave the sum, so a revision's cumulative counts drop (the strategy
    reads that as a counter reset) or, where new requests hide the drop, a window comes out short.
    `lookback` (a PromQL duration, at least the rollout timeout) sums each series' last sample within
    it instead (`last_over_time`), so a pod that left within it still counts. It does not help with a
    counter that restarts in a live pod (a restarted sidecar), and for `knative` a pod address reused
    within it gives `target_info` two series to join on and Prometheus refuses the query ("no data").
    """

    url: str
    timeout_s: float = 5.0
    source: str = "router"
    namespace: str = ""
    # "" means the source's default (see SOURCE_SPECS); filled in at construction.
    requests_metric: str = ""
    latency_metric: str = ""
    feedback_metric: str = ""
    revision_label: str = ""
    lookback: str = ""  # "" = the series scraped now; see the class docstring

    @pydantic.model_validator(mode="before")
    @classmethod
    def _check_and_fill(cls, data):
        """Refuse an unknown source, a missing or malformed namespace and malformed names at
        construction; fill empty names with the source's defaults, so the resource shows what it
        queries."""
        if not isinstance(data, dict):
            return data
        source, namespace = data.get("source", "router"), data.get("namespace", "")
        if source not in SOURCE_SPECS:
            raise ValueError(f"metrics source {source!r} is not one of {', '.join(SOURCE_SPECS)}")
        base = SOURCE_SPECS[source]
        if base.needs_namespace:
            if not namespace:
                raise ValueError(f"metrics source {source!r} needs a namespace (that of the InferenceServices), got none")
            validate_namespace(namespace)
        for what, pattern, kind in (
            ("requests_metric", _METRIC_NAME, "metric"),
            ("latency_metric", _METRIC_NAME, "metric"),
            ("feedback_metric", _METRIC_NAME, "metric"),
            ("revision_label", _LABEL_NAME, "label"),
        ):
            value = data.get(what)
            if value and not (isinstance(value, str) and pattern.match(value)):
                raise ValueError(f"{what} {value!r} is not a Prometheus {kind} name")
        lookback = data.get("lookback")
        if lookback and not (isinstance(lookback, str) and _DURATION.match(lookback)):
            raise ValueError(f"lookback {lookback!r} is not a PromQL duration such as 1h or 90m")
        names = ("requests_metric", "latency_metric", "feedback_metric", "revision_label")
        return {**data, **{name: getattr(base, name) for name in names if not data.get(name)}}

    @property
    def spec(self) -> MetricsSourceSpec:
        base = SOURCE_SPECS[self.source]
        return MetricsSourceSpec(
            requests_metric=self.requests_metric or base.requests_metric,
            latency_metric=self.latency_metric or base.latency_metric,
            feedback_metric=(self.feedback_metric or base.feedback_metric) if self.source == "router" else "",
            revision_label=self.revision_label or base.revision_label,
            code_label=base.code_label,
            le_per_second=base.le_per_second,
            needs_namespace=base.needs_namespace,
        )

    def _query(self, promql: str) -> list[dict]:
        import urllib.parse

        url = f"{self.url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            body = http.get_json(url, timeout=self.timeout_s)
            if not isinstance(body, dict):
                raise ValueError(f"answer is a JSON {type(body).__name__}, not an object")
        except (http.HttpUnavailableError, ValueError) as exc:
            raise MetricsUnavailableError(f"Prometheus at {self.url} did not answer {promql!r}: {exc}") from exc
        if body.get("status") != "success":
            raise MetricsUnavailableError(f"Prometheus rejected {promql!r}: {body.get('error')}")
        try:
            result = body["data"]["result"]
            if not isinstance(result, list):
                raise TypeError("data.result is not a list")
        except (KeyError, TypeError) as exc:
            raise MetricsUnavailableError(f"Prometheus at {self.url} answered {promql!r} with no data.result: {exc}") from exc
        return result

    def queries(self, isvc: str) -> dict[str, str]:
        """PromQL per kind of count ("requests", "latency", and "feedback" for the router only)."""
        validate_dns1035(isvc, "InferenceService name")
        spec = self.spec
        rev, code, held = spec.revision_label, spec.code_label, self._held
        if self.source == "router":
            sel = f'isvc="{isvc}"'
            return {
                "requests": f"sum by ({rev}, {code}) ({held(f'{spec.requests_metric}{{{sel}}}')})",
                "latency": f"sum by ({rev}, le) ({held(f'{spec.latency_metric}{{{sel}}}')})",
                "feedback": f"sum by ({rev}, outcome) ({held(f'{spec.feedback_metric}{{{sel}}}')})",
            }
        predictor = f"{isvc}-predictor"  # KServe's Knative Service (constants.PredictorServiceName)
        if self.source == "knative":
            # The revision and namespace live on target_info (resource attributes); every series of a
            # queue-proxy shares its (job, instance) with that pod's one target_info.
            info = f'target_info{{k8s_namespace_name="{self.namespace}", kn_configuration_name="{predictor}"}}'
            join = f"* on (job, instance) group_left ({rev}) {held(info)}"
            return {
                "requests": f"sum by ({rev}, {code}) ({held(spec.requests_metric)} {join})",
                "latency": f"sum by ({rev}, le) ({held(spec.latency_metric)} {join})",
            }
        # Revisions are `<configuration>-NNNNN` (Knative: kmeta.ChildName(config, "-%05d")); PromQL
        # regexes are anchored, and a DNS-1035 name has nothing to escape.
        sel = f'reporter="destination", destination_workload_namespace="{self.namespace}", {rev}=~"{predictor}-[0-9]+"'
        return {
            "requests": f"sum by ({rev}, {code}) ({held(f'{spec.requests_metric}{{{sel}}}')})",
            "latency": f"sum by ({rev}, le) ({held(f'{spec.latency_metric}{{{sel}}}')})",
        }

    def _held(self, selector: str) -> str:
        """`selector`, or with a lookback each of its series' last sample within it."""
        return f"last_over_time({selector}[{self.lookback}])" if self.lookback else selector

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        q = self.queries(isvc)
        try:
            return self._counts(q)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MetricsUnavailableError(f"Prometheus at {self.url} answered with malformed samples: {exc!r}") from exc

    def _counts(self, q: dict[str, str]) -> dict[str, RevisionCounts]:
        spec = self.spec
        out: dict[str, RevisionCounts] = {}
        rev = spec.revision_label
        for sample in self._query(q["requests"]):
            labels, value = sample["metric"], int(float(sample["value"][1]))
            counts = out.setdefault(labels.get(rev, ""), RevisionCounts())
            counts.requests += value
            code = labels.get(spec.code_label, "")
            if code.startswith("5"):
                counts.errors += value
            elif code.startswith("4"):
                counts.client_errors += value
        for sample in self._query(q["latency"]):
            labels = sample["metric"]
            le = float(labels["le"]) / spec.le_per_second if labels.get("le") not in ("+Inf", None) else math.inf
            buckets = out.setdefault(labels.get(rev, ""), RevisionCounts()).buckets
            # Bounds spelled differently ("100" and "100.0") are the same bucket.
            buckets[le] = buckets.get(le, 0) + int(float(sample["value"][1]))
        for sample in self._query(q["feedback"]) if "feedback" in q else ():
            labels, value = sample["metric"], int(float(sample["value"][1]))
            counts = out.setdefault(labels.get(rev, ""), RevisionCounts())
            if labels.get("outcome") == "success":
                counts.feedback_success += value
            else:
                counts.feedback_failure += value
        out.pop("", None)
        return out

    def describe_query(self, isvc: str) -> str:
        text = f"PromQL at {self.url} ({self.source} metrics): " + "; ".join(self.queries(isvc).values())
        if "feedback" not in self.queries(isvc):
            text += f" (no A/B feedback outcomes: {self.source} metrics have none; only the router records them)"
        return text
