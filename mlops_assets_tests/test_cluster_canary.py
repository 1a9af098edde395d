"""The canary scenario of the local platform, on the cluster path: kmock, the mesh stand-in and a real Prometheus.

No cluster runs here, so two stand-ins take its place. kmock (helpers.py's `FakeCluster`)
is the Kubernetes API server, with a stand-in for KServe's controller that writes the InferenceService's
traffic split as KServe 0.21 and Knative would. `MeshStandin` (mesh_standin.py) is what a cluster's
Prometheus scrapes from the predictor pods: the Istio 1.27 sidecars' `istio_requests_total` and
`istio_request_duration_milliseconds` with the labels of istio/proxy `istio_stats.cc`, the revision in
`destination_app` as Knative's `revision/resources/meta.go` sets it, per pod; the real `prometheus` binary
scrapes it.

The resources are the ones `MLOPS_ENV=kubernetes` builds, with the default metrics source (Istio) and the
rollout policy read from `MLOPS_ROLLOUT_*` (the cluster's default error SLO, 1%; steps 20 and 50, as in the
local scenario); only the API server's address is kmock's. `MeshUsers` plays the users: a background thread
sends requests at a steady rate, each to a revision drawn per the traffic split the InferenceService status
shows right now (Knative splits per request), recorded on a pod of that revision. The good model fails no
request; the faulty one fails 2% of them, below what a glance at a dashboard would catch. Both are seeded, so
a revision's k-th request has the same outcome on every run. `RolloutRunner` runs the canary strategy, which
decides on the counts `PrometheusMetrics` reads: the good version is promoted step by step, the faulty one
rolled back at its first step, and what Prometheus counted per revision is exactly what the users sent.

Design gap (not covered here): the counts are cumulative sums over the pods Prometheus scrapes *now*. When
Knative scales a revision down, that pod's series go stale and leave the sum: the stable revision's counts
drop, which the strategy takes for a counter reset (`_diff` then counts the whole remaining total as one
window), or a drop hidden by new requests yields a window short of requests and errors, even negative ones.
`PrometheusMetrics.lookback` (e.g. "1h", at least the rollout timeout) keeps a pod that left within it in the
sum (`last_over_time`); it is off by default, so the rollouts here keep every pod, and
`test_a_scaled_down_pod_leaves_the_sum_unless_a_lookback_holds_it` shows both on the stand-in.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from mlops_assets.core.registry import VersionInfo
from mlops_assets.core.rollout.policy import Strategy
from mlops_assets.core.rollout.runner import RolloutRequest, RolloutRunner
from mlops_assets.core.rollout.strategies import PROMOTED, ROLLED_BACK
from mlops_assets.core.serving.metrics import PrometheusMetrics
from mlops_assets.core.settings import load_settings
from mlops_assets.defs.resources import build_resources
from mlops_assets_tests.helpers import CANARY, NAME, NS, FakeCluster, manifest_for, rev, uri
from mlops_assets_tests.mesh_standin import MeshStandin, Pod, standin_and_prometheus

MODEL = "fraud_detector"
FAULTY_ERROR_RATE = 0.02
PODS_PER_REVISION = 2
#: Users' requests per second: enough that a step reaches its evidence in a few seconds.
RATE = 600.0


@dataclass
class RevisionTraffic:
    """What the users sent one revision: its pods, its seeded outcomes and the tallies to compare with."""

    pods: list[Pod]
    error_rate: float
    outcomes: np.random.Generator
    requests: int = 0
    errors: int = 0
    max_percent: int = 0
    latencies: list[float] = field(default_factory=list)


class MeshUsers:
    """Users calling the InferenceService through the mesh; see the module docstring."""

    def __init__(
        self,
        cluster: FakeCluster,
        standin: MeshStandin,
        error_rate_of: Callable[[str], float],
        rate: float = RATE,
        seed: int = 13,
        tick_s: float = 0.02,
    ) -> None:
        self.cluster, self.standin, self.error_rate_of = cluster, standin, error_rate_of
        self.rate, self.seed, self.tick_s = rate, seed, tick_s
        self.revisions: dict[str, RevisionTraffic] = {}
        self._route = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-users", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> MeshUsers:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.failure is not None:
            raise self.failure

    def _revision(self, name: str) -> RevisionTraffic:
        """A revision seen in the split for the first time: Knative has started its pods."""
        if name not in self.revisions:
            number = int(name.rsplit("-", 1)[1])
            self.revisions[name] = RevisionTraffic(
                pods=[self.standin.add_pod(NS, name) for _ in range(PODS_PER_REVISION)],
                error_rate=self.error_rate_of(name),
                outcomes=np.random.default_rng([self.seed, number]),
            )
        return self.revisions[name]

    def _run(self) -> None:
        try:
            last, due = time.monotonic(), 0.0
            while not self._stop.wait(self.tick_s):
                now = time.monotonic()
                due, last = due + (now - last) * self.rate, now
                n, due = int(due), due - int(due)
                traffic = self.cluster.stored()["status"]["components"]["predictor"]["traffic"]
                split = [(t["revisionName"], t["percent"]) for t in traffic if t["percent"] > 0]
                for name, percent in split:
                    served = self._revision(name)
                    served.max_percent = max(served.max_percent, percent)
                bounds = np.cumsum([percent for _, percent in split])
                for draw in self._route.uniform(0, bounds[-1], size=n):
                    self._send(self.revisions[split[int(np.searchsorted(bounds, draw, side="right"))][0]])
        except BaseException as exc:  # noqa: BLE001 - reported by stop(), in the test's thread
            self.failure = exc

    def _send(self, served: RevisionTraffic) -> None:
        fails, latency = served.outcomes.random() < served.error_rate, float(served.outcomes.uniform(0.005, 0.08))
        self.standin.record(served.pods[served.requests % len(served.pods)], 500 if fails else 200, latency)
        served.requests += 1
        served.errors += int(fails)
        served.latencies.append(latency)


class TagLog:
    """The registry's one duty in a rollout, recording the outcome tag (MLflow is not what is under test)."""

    def __init__(self) -> None:
        self.tags: list[tuple[str, str, str, str]] = []

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.tags.append((name, str(version), key, value))


def version(number: str, note: str = "") -> VersionInfo:
    return VersionInfo(MODEL, number, f"run{number}", uri(number, note), [], {}, 0, download_uri=uri(number, note))


@pytest.fixture
def mesh(tmp_path):
    try:
        with standin_and_prometheus(tmp_path) as (standin, prometheus):
            yield standin, prometheus
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def cluster_resources(prometheus_url: str, api_server: str) -> dict:
    """What MLOPS_ENV=kubernetes builds (default metrics source), rollouts tuned by MLOPS_ROLLOUT_*; the
    platform talks to kmock instead of the in-cluster API server."""
    env = {
        "MLOPS_ENV": "kubernetes",
        "MLOPS_PROMETHEUS_URL": prometheus_url,
        "MLOPS_NAMESPACE": NS,
        "MLOPS_ROLLOUT_STEPS": "20,50",
        "MLOPS_ROLLOUT_MIN_REQUESTS": "40",
        "MLOPS_ROLLOUT_POLL_S": "0.5",
    }
    resources = build_resources(load_settings(env))
    resources["serving"] = resources["serving"].model_copy(update={"host": api_server, "poll_s": 0.01, "ready_timeout_s": 5})
    # A rollout that cannot decide fails the test in a minute, not the cluster's 15.
    resources["rollout_policy"] = resources["rollout_policy"].model_copy(update={"timeout_s": 60.0})
    return resources


def test_canary_promotes_the_good_version_and_rolls_back_the_faulty_one_on_istio_counts(mesh):
    standin, prometheus = mesh
    with FakeCluster() as cluster:
        resources = cluster_resources(prometheus.url, cluster.url)
        metrics, platform, policy = resources["metrics"], resources["serving"], resources["rollout_policy"]
        assert (metrics.source, metrics.namespace, policy.max_error_rate) == ("istio", NS, 0.01)
        registry, events = TagLog(), []
        runner = RolloutRunner(platform, metrics, registry, policy, emit=events.append, log=lambda _: None)
        platform.apply(manifest_for("1"))

        def error_rate_of(revision: str) -> float:
            return FAULTY_ERROR_RATE if "faulty" in cluster.storage_of(revision) else 0.0

        users = MeshUsers(cluster, standin, error_rate_of).start()
        try:
            good = runner.run(RolloutRequest(MODEL, version("2"), Strategy.CANARY, NS, "test", "run-good"))
            good_events = [(e.kind, e.percent) for e in events]
            events.clear()
            faulty = runner.run(RolloutRequest(MODEL, version("3", "faulty"), Strategy.CANARY, NS, "test", "run-faulty"))
        finally:
            users.stop()

        assert good.result.outcome == PROMOTED, good.result.reason
        assert good_events == [("canary_start", 20), ("step", 50), ("promote", 100)]
        assert (good.result.candidate_revision, good.result.stable_revision) == (rev(2), rev(1))
        assert good.result.candidate_failed_requests == good.result.stable_failed_requests == 0

        assert faulty.result.outcome == ROLLED_BACK, faulty.result.reason
        assert [(e.kind, e.percent) for e in events] == [("canary_start", 20), ("rollback", 0)]
        assert (faulty.result.candidate_revision, faulty.result.stable_revision) == (rev(3), rev(2))
        # Decided on the faulty revision's few failures while the good stable one failed none.
        assert faulty.result.evidence["cumulative"]["canary_errors"] >= 1
        assert faulty.result.stable_failed_requests == 0
        status = platform.status(NAME)
        assert status.stable_version == "2" and status.latest_rolledout == rev(2)
        assert {t["revisionName"]: t["percent"] for t in status.traffic} == {rev(3): 0, rev(2): 100}
        assert cluster.stored()["spec"]["predictor"][CANARY] == 0
        assert [tag[1:] for tag in registry.tags] == [("2", "rollout.canary", PROMOTED), ("3", "rollout.canary", ROLLED_BACK)]
        assert platform.rollout_lock(NAME).holder() is None

    # The faulty model never had more than the first step, and the users saw the split KServe reported.
    served = users.revisions
    assert {name: s.max_percent for name, s in served.items()} == {rev(1): 100, rev(2): 100, rev(3): 20}
    assert served[rev(3)].errors > 0 and served[rev(1)].errors == served[rev(2)].errors == 0
    # What Prometheus holds per revision is exactly what the users sent, summed over each revision's pods.
    sent = {name: (s.requests, s.errors) for name, s in served.items()}
    prometheus.wait_for(lambda: _counted(metrics) == sent, 15, f"Prometheus to count what the users sent, {sent}")
    counts = metrics.revision_counts(NAME, "")
    assert all(c.requests > 0 for c in counts.values())
    for name, s in served.items():
        assert counts[name].buckets[0.1] == len(s.latencies)  # every latency under 80 ms, in Envoy's ms buckets
        assert counts[name].buckets[0.025] == sum(latency <= 0.025 for latency in s.latencies)


def test_a_scaled_down_pod_leaves_the_sum_unless_a_lookback_holds_it(mesh):
    """The design gap of the module docstring: by default the counts are sums over the pods scraped now."""
    standin, prometheus = mesh
    revision = rev(1)
    pods = [standin.add_pod(NS, revision) for _ in range(2)]
    for i in range(30):
        standin.record(pods[i % 2], 500 if i % 10 == 1 else 200, 0.02)
    now, held = (
        [PrometheusMetrics(url=prometheus.url, source=source, namespace=NS, lookback=lookback) for source in ("istio", "knative")]
        for lookback in ("", "1h")
    )
    both = {revision: (30, 3)}
    prometheus.wait_for(lambda: [_counted(m) for m in now + held] == [both] * 4, 15, "Prometheus to count both pods")
    standin.remove_pod(pods[1])
    prometheus.wait_for(lambda: both not in [_counted(m) for m in now], 15, "the scaled-down pod to go stale")
    for metrics in now:
        # Fewer requests and errors than a moment ago: the errors (requests 1, 11, 21) were pod 1's.
        assert _counted(metrics) == {revision: (15, 0)}, metrics.source
    for metrics in held:
        # With a lookback the pod's last counts stay in the sum, latency buckets too.
        assert _counted(metrics) == both, metrics.source
        assert metrics.revision_counts(NAME, "")[revision].buckets[math.inf] == 30


def test_a_lookback_wraps_every_selector_and_must_be_a_promql_duration():
    istio = PrometheusMetrics(url="http://127.0.0.1:9", source="istio", namespace=NS, lookback="90m").queries(NAME)
    selector = f'reporter="destination", destination_workload_namespace="{NS}", destination_app=~"{NAME}-predictor-[0-9]+"'
    assert (
        istio["requests"] == f"sum by (destination_app, response_code) (last_over_time(istio_requests_total{{{selector}}}[90m]))"
    )
    knative = PrometheusMetrics(url="http://127.0.0.1:9", source="knative", namespace=NS, lookback="1h").queries(NAME)
    assert knative["latency"].count("last_over_time(") == 2 and knative["latency"].endswith("[1h]))")
    router = PrometheusMetrics(url="http://127.0.0.1:9", lookback="1h").queries(NAME)
    assert all(q.count("last_over_time(") == 1 for q in router.values()) and set(router) == {"requests", "latency", "feedback"}
    for bad in ("1 hour", "1h] or vector(1) or x[1h", "-5m"):
        with pytest.raises(ValueError, match="not a PromQL duration"):
            PrometheusMetrics(url="http://127.0.0.1:9", source="istio", namespace=NS, lookback=bad)


def _counted(metrics) -> dict[str, tuple[int, int]]:
    return {name: (c.requests, c.errors) for name, c in metrics.revision_counts(NAME, "").items()}
