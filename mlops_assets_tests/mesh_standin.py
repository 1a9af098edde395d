"""A stand-in for what a cluster's Prometheus scrapes from KServe predictor pods, and a real Prometheus.

No cluster runs here, so neither an Istio sidecar nor Knative's queue-proxy can. `MeshStandin` keeps
per-pod request records (status code, latency) and serves, per pod, the two expositions a pod of a
KServe 0.21 predictor has, with exactly the names, labels and units of the releases KServe pins
(kserve/kserve `hack/setup/kserve-deps.env`: Knative 1.21.1, Istio 1.27.1):

- the sidecar's Envoy statistics (`/stats/prometheus` on port 15090, `http-envoy-prom`, istio/istio
  `manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`): the counter
  `istio_requests_total` and the histogram `istio_request_duration_milliseconds` with the tag set of
  istio/proxy `source/extensions/filters/http/istio_stats/istio_stats.cc` (reporter, source_*,
  destination_*, request_protocol, response_code, response_flags, connection_security_policy,
  grpc_response_status), on the server side of a predictor pod: destination_workload is the Deployment
  (istio/istio `pkg/kube/util.go` GetDeployMetaFromPod), i.e. Knative's `kmeta.ChildName(revision,
  "-deployment")`; destination_app is the pod's `app` label, which Knative sets to the revision name
  (knative/serving `pkg/reconciler/revision/resources/meta.go`); destination_canonical_service is that
  too and destination_canonical_revision "latest" (the injection template's defaults). Buckets are
  Envoy's defaults in ms (envoyproxy/envoy `source/common/stats/histogram_impl.cc`), `le` printed as
  Envoy does (`{0:.32g}`).
- the queue-proxy's request metrics (`/metrics` on port 9091, `http-usermetric`, knative/serving
  `pkg/networking/constants.go`, on only with `request-metrics-protocol: prometheus`): the OTel
  histogram `kn.serving.invocation.duration` in seconds with `http.response.status_code`
  (`pkg/queue/request_metric.go`, its bucket bounds), through OTel Go's Prometheus exporter v0.61.0
  with `UnderscoreEscapingWithSuffixes` (knative/pkg `observability/metrics/prometheus_enabled.go`):
  `kn_serving_invocation_duration_seconds_{bucket,sum,count}` with `otel_scope_*` labels, and the
  resource (`pkg/queue/sharedmain/otel.go`: kn.revision.name, kn.configuration.name, ...) only on
  `target_info`.

Prometheus finds the pods through file-based service discovery, one target per pod and exposition,
each with its own `instance` (the pod IP and port it would have), as on a cluster; pods can be added
while it runs (a new revision of a canary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mlops_assets.core.processes import free_port

#: Envoy's default histogram bounds, in milliseconds (Istio sets none for its metrics).
ENVOY_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000)
#: knative/serving pkg/queue/request_metric.go `latencyBounds`, in seconds.
QUEUE_PROXY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
KNATIVE_SCOPE = "knative.dev/serving/pkg/queue"
OTEL_SDK_VERSION = "1.39.0"  # go.opentelemetry.io/otel/sdk in knative/serving 1.21.1's go.mod


def child_name(parent: str, suffix: str) -> str:
    """knative.dev/pkg `kmeta.ChildName` for suffixes under 32 characters: `parent+suffix`, or past 63
    characters the parent cut and followed by its md5."""
    if len(parent) <= 63 - len(suffix):
        return parent + suffix
    return parent[: 63 - 32 - len(suffix)] + hashlib.md5(parent.encode()).hexdigest() + suffix  # noqa: S324 (Knative's)


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: int = 0
    sum: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


@dataclass
class Pod:
    """One predictor pod of a revision: what its sidecar and its queue-proxy have counted."""

    namespace: str
    revision: str  # `<configuration>-NNNNN`; KServe's configurations are `<isvc>-predictor`, `<isvc>-transformer`
    ip: str
    istio: dict[int, _Histogram] = field(default_factory=dict)  # status code -> ms histogram
    knative: dict[int, _Histogram] = field(default_factory=dict)  # status code -> s histogram
    # The same requests as the caller's sidecar reports them (reporter="source"): counting both doubles.
    source_side: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{child_name(self.revision, '-deployment')}-{hashlib.sha1(self.ip.encode()).hexdigest()[:10]}-x7k2p"  # noqa: S324

    def record(self, code: int, latency_s: float) -> None:
        self.istio.setdefault(code, _Histogram(ENVOY_BUCKETS_MS)).observe(latency_s * 1000)
        self.knative.setdefault(code, _Histogram(QUEUE_PROXY_BUCKETS_S)).observe(latency_s)
        self.source_side[code] = self.source_side.get(code, 0) + 1

    def envoy_stats(self) -> str:
        """The sidecar's /stats/prometheus (istio_* series only; Envoy's own envoy_* series are not queried)."""
        ns, rev = self.namespace, self.revision
        server = {
            "reporter": "destination",
            "source_workload": "activator",
            "source_canonical_service": "activator",
            "source_canonical_revision": "latest",
            "source_workload_namespace": "knative-serving",
            "source_principal": "spiffe://cluster.local/ns/knative-serving/sa/activator",
            "source_app": "activator",
            "source_version": "unknown",
            "source_cluster": "Kubernetes",
            "destination_workload": child_name(rev, "-deployment"),
            "destination_workload_namespace": ns,
            "destination_principal": f"spiffe://cluster.local/ns/{ns}/sa/default",
            "destination_app": rev,
            "destination_version": "",
            "destination_service": f"{rev}.{ns}.svc.cluster.local",
            "destination_canonical_service": rev,
            "destination_canonical_revision": "latest",
            "destination_service_name": rev,
            "destination_service_namespace": ns,
            "destination_cluster": "Kubernetes",
            "request_protocol": "http",
            "response_flags": "-",
            "connection_security_policy": "mutual_tls",
        }
        # The activator's sidecar, had it one, reports the same requests from its side.
        client = {
            **server,
            "reporter": "source",
            "destination_principal": "unknown",
            "connection_security_policy": "unknown",
        }
        counters = ["# TYPE istio_requests_total counter"]
        histograms = ["# TYPE istio_request_duration_milliseconds histogram"]
        for code, hist in sorted(self.istio.items()):
            labels = {**server, "response_code": str(code), "grpc_response_status": ""}
            counters.append(f"istio_requests_total{_labels(labels)} {hist.total}")
            histograms.extend(_histogram_lines("istio_request_duration_milliseconds", labels, hist, lambda b: f"{b:.32g}"))
        for code, n in sorted(self.source_side.items()):
            counters.append(
                f"istio_requests_total{_labels({**client, 'response_code': str(code), 'grpc_response_status': ''})} {n}"
            )
        return "\n".join(counters + histograms) + "\n"

    def queue_proxy_metrics(self) -> str:
        """The queue-proxy's /metrics as OTel Go's Prometheus exporter writes it (labels sorted)."""
        name = "kn_serving_invocation_duration_seconds"
        lines = [f"# HELP {name} The duration of task execution", f"# TYPE {name} histogram"]
        scope = {"otel_scope_name": KNATIVE_SCOPE, "otel_scope_schema_url": "", "otel_scope_version": ""}
        for code, hist in sorted(self.knative.items()):
            lines.extend(_histogram_lines(name, {"http_response_status_code": str(code), **scope}, hist, lambda b: f"{b:g}"))
        configuration = self.revision.rsplit("-", 1)[0]  # KServe's Knative Service has the same name
        resource = {
            "k8s_container_name": "queue-proxy",
            "k8s_namespace_name": self.namespace,
            "k8s_pod_name": self.name,
            "kn_configuration_name": configuration,
            "kn_revision_name": self.revision,
            "kn_service_name": configuration,
            "service_instance_id": self.name,
            "service_name": configuration,
            "service_version": "v1.21.1",
            "telemetry_sdk_language": "go",
            "telemetry_sdk_name": "opentelemetry",
            "telemetry_sdk_version": OTEL_SDK_VERSION,
        }
        lines += ["# HELP target_info Target metadata", "# TYPE target_info gauge", f"target_info{_labels(resource)} 1"]
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _histogram_lines(name: str, labels: dict, hist: _Histogram, le: Callable[[float], str]) -> list[str]:
    counts = hist.counts or [0] * len(hist.bounds)
    lines = [f"{name}_bucket{_labels({**labels, 'le': le(b)})} {n}" for b, n in zip(hist.bounds, counts, strict=True)]
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {hist.total}")
    lines.append(f"{name}_sum{_labels(labels)} {hist.sum!r}")
    lines.append(f"{name}_count{_labels(labels)} {hist.total}")
    return lines


class MeshStandin:
    """Pods' Envoy and queue-proxy expositions over HTTP on 127.0.0.1, and file_sd targets for them."""

    def __init__(self, sd_dir: Path) -> None:
        self.pods: dict[str, Pod] = {}
        self.lock = threading.Lock()
        self.sd_dir = sd_dir
        sd_dir.mkdir(parents=True, exist_ok=True)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                match = re.fullmatch(r"/pods/([^/]+)/(stats/prometheus|metrics)", self.path)
                with standin.lock:
                    pod = standin.pods.get(match.group(1)) if match else None
                    body = (
                        None
                        if pod is None
                        else (pod.envoy_stats() if match.group(2) == "stats/prometheus" else pod.queue_proxy_metrics())
                    )
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._write_targets()

    def add_pod(self, namespace: str, revision: str) -> Pod:
        with self.lock:
            pod = Pod(namespace, revision, ip=f"10.244.0.{len(self.pods) + 10}")
            self.pods[pod.name] = pod
        self._write_targets()
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """The pod is gone (scaled down, or replaced): Prometheus drops its targets, and so its series."""
        with self.lock:
            self.pods.pop(pod.name, None)
        self._write_targets()

    def record(self, pod: Pod, code: int, latency_s: float) -> None:
        """One request answered by `pod`, counted while no scrape reads it."""
        with self.lock:
            pod.record(code, latency_s)

    def _write_targets(self) -> None:
        """One target per pod and exposition, with the instance (pod IP:port) it would have on a cluster."""
        with self.lock:
            pods = list(self.pods.values())
        for job, path, port in (("envoy-stats", "stats/prometheus", 15090), ("knative-queue-proxy", "metrics", 9091)):
            targets = [
                {
                    "targets": [self.address],
                    "labels": {"__metrics_path__": f"/pods/{pod.name}/{path}", "instance": f"{pod.ip}:{port}", "pod": pod.name},
                }
                for pod in pods
            ]
            tmp = self.sd_dir / f".{job}.json"
            tmp.write_text(json.dumps(targets))
            tmp.replace(self.sd_dir / f"{job}.json")  # atomic: Prometheus never reads half a file

    def series(self) -> int:
        """How many samples the expositions hold right now (what a complete scrape ingests)."""
        with self.lock:
            text = "".join(p.envoy_stats() + p.queue_proxy_metrics() for p in self.pods.values())
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StandinPrometheus:
    """The real `prometheus` binary scraping a `MeshStandin` every second, on 127.0.0.1."""

    def __init__(self, standin: MeshStandin, base: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("the prometheus binary is not installed (Debian package `prometheus`)")
        self.base = base
        jobs = "".join(
            f"  - job_name: {job}\n    file_sd_configs:\n      - files: ['{standin.sd_dir / (job + '.json')}']\n"
            for job in ("envoy-stats", "knative-queue-proxy")
        )
        config = base / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(base / "prometheus.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self) -> str:
        return (self.base / "prometheus.log").read_text(errors="replace")[-2000:]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}): {self.log_tail()}")
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}; log: {self.log_tail()}")

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as resp:
                return resp.read()
        except OSError:
            return None

    def instant(self, promql: str) -> list[dict]:
        raw = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        return json.loads(raw)["data"]["result"] if raw else []

    def scalar(self, promql: str) -> float:
        result = self.instant(promql)
        return float(result[0]["value"][1]) if result else math.nan

    def scraped_samples(self) -> int:
        """Samples of the last scrape of every stand-in target, as Prometheus reports them."""
        value = self.scalar('sum(scrape_samples_scraped{job=~"envoy-stats|knative-queue-proxy"})')
        return 0 if math.isnan(value) else int(value)

    def wait_until_scraped(self, standin: MeshStandin, timeout_s: float = 30) -> None:
        """Ready, and the latest scrape of every target holds what the stand-in serves now."""
        self.wait_for(lambda: self.get("/-/ready") is not None, timeout_s, "Prometheus /-/ready")
        self.wait_for(lambda: self.scraped_samples() == standin.series(), timeout_s, "a full scrape of the stand-in")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def standin_and_prometheus(base: Path) -> Iterator[tuple[MeshStandin, StandinPrometheus]]:
    """A stand-in with no pods yet and a ready Prometheus scraping it, both closed on exit;
    FileNotFoundError where the prometheus binary is not installed."""
    standin = MeshStandin(base / "sd")
    try:
        prometheus = StandinPrometheus(standin, base)
        try:
            prometheus.wait_for(lambda: prometheus.get("/-/ready") is not None, 30, "Prometheus /-/ready")
            yield standin, prometheus
        finally:
            prometheus.close()
    finally:
        standin.close()
