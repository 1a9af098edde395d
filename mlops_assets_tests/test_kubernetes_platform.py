"""`KubernetesPlatform` against a stand-in Kubernetes API over real HTTP.

No Kubernetes API server (let alone KServe) can run here. kmock stands in: a stateful fake
Kubernetes API server on aiohttp, listening on a real 127.0.0.1 port, so the official `kubernetes`
client under test sends real requests (POST, merge-patch, GET, DELETE), and kmock keeps every stored
version of every object and every request for the assertions. kmock is asyncio; the platform is
synchronous, so the server runs in a background thread with its own event loop (`FakeCluster`).

kmock stores objects but knows nothing of KServe, so `KServeController` (helpers.py, with `FakeCluster`)
writes the InferenceService status the way KServe's controller (and Knative under it) would: after each
create or patch it cuts a revision `<name>-predictor-0000N` when the revision template changed (the
predictor minus `canaryTrafficPercent`, plus the annotations and labels KServe copies into the
template), and a few GETs later it reports the rollout done: the latest revision ready, traffic split
per `canaryTrafficPercent` between it and the latest rolled-out revision, and a latest revision at
100% promoted to `latestRolledoutRevision` (the old one becomes `previousRolledoutRevision`), with the
Ready condition. A storage URI containing "broken" never becomes ready, as a failing model would not.

The rollout tests run the very `run_canary` the local platform runs, with a synthetic
`MetricsSource` that derives per-revision counts from the traffic split the cluster reports, on a fake
clock, so a full canary takes well under a second.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import socket
import subprocess
import sys

import kmock
import numpy as np
import pytest
from pydantic import PrivateAttr

from mlops_assets.core.rollout.analysis import Thresholds
from mlops_assets.core.rollout.strategies import PROMOTED, ROLLED_BACK, RolloutContext, run_canary
from mlops_assets.core.serving.kubernetes import (
    REVISIONS,
    ROLLED_BACK_FROM,
    KServeNotInstalledError,
    KubernetesPermissionError,
    KubernetesPlatform,
    KubernetesUnreachableError,
    ServiceNotReadyError,
)
from mlops_assets.core.serving.manifest import Deployment, ManifestError, build_inference_service
from mlops_assets.core.serving.metrics import MetricsSource, RevisionCounts
from mlops_assets.core.serving.platform import RolloutStateError, UnknownServiceError
from mlops_assets_tests.helpers import CANARY, ISVC, NAME, NS, FakeClock, FakeCluster, manifest_for, rev, uri


@pytest.fixture
def cluster():
    with FakeCluster() as fake:
        yield fake


@pytest.fixture
def platform(cluster) -> KubernetesPlatform:
    return KubernetesPlatform(host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=5)


# ---- the interface ---------------------------------------------------------------------------------
def test_the_module_loads_without_importing_kubernetes():
    code = "import sys, mlops_assets.core.serving.kubernetes; sys.exit('kubernetes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_deploy_creates_the_service_and_waits_until_ready(cluster, platform):
    manifest = manifest_for("1")
    status = platform.apply(manifest)

    assert status.ready and status.namespace == NS
    assert status.latest_created == status.latest_ready == status.latest_rolledout == rev(1)
    assert status.traffic == [{"revisionName": rev(1), "percent": 100, "latestRevision": True, "tag": "latest"}]
    assert status.stable_version == "1" and status.url == f"https://{NAME}-{NS}.mlops.example.com"
    assert status.address == f"http://{NAME}.{NS}.svc.cluster.local"
    assert status.revisions[rev(1)] == {"model_version": "1", "status": "ready", "storage_uri": uri("1"), "run_id": "run1"}
    # Over the wire: a GET that finds nothing, discovery, one POST of the manifest (in the platform's
    # namespace, not the Deployment's "mlops"), then GETs until KServe reports the rollout done.
    posts = cluster.requests("POST")
    assert len(posts) == 1 and posts[0]["path"] == f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
    assert posts[0]["data"] == {**manifest, "metadata": {**manifest["metadata"], "namespace": NS}}
    assert len(cluster.requests("GET")) >= 4  # 404, discovery, at least two polls
    assert cluster.stored()["spec"] == manifest["spec"]
    assert platform.list_services() == [NAME]
    assert platform.manifest(NAME) == {**manifest, "metadata": {**manifest["metadata"], "namespace": NS}}

    # An unchanged manifest changes nothing: no patch, no new revision.
    again = platform.apply(manifest)
    assert cluster.patches() == [] and again.latest_created == rev(1)


def test_canary_splits_traffic_between_two_revisions(cluster, platform):
    platform.apply(manifest_for("1"))
    status = platform.apply(manifest_for("2", canary=20))

    assert (status.latest_ready, status.latest_rolledout, status.canary_percent) == (rev(2), rev(1), 20)
    assert {t["revisionName"]: t["percent"] for t in status.traffic} == {rev(2): 20, rev(1): 80}
    assert status.version_of(rev(2)) == "2" and status.stable_version == "1"
    # One merge-patch carrying the new predictor, the traffic split and the record of revision 1.
    (patch,) = cluster.requests("PATCH")
    assert patch["headers"]["Content-Type"] == "application/merge-patch+json"
    assert patch["data"]["spec"]["predictor"][CANARY] == 20
    assert patch["data"]["spec"]["predictor"]["model"]["storageUri"] == uri("2")
    recorded = json.loads(patch["data"]["metadata"]["annotations"][REVISIONS])
    assert recorded[rev(1)]["model_version"] == "1" and recorded[rev(1)]["predictor"]["model"]["storageUri"] == uri("1")
    assert REVISIONS not in platform.manifest(NAME)["metadata"]["annotations"]  # bookkeeping is not the contract

    # A step is a one-field patch: the traffic moves, no revision is cut.
    status = platform.set_canary_percent(NAME, 50)
    assert cluster.patches()[-1] == {"spec": {"predictor": {CANARY: 50}}}
    assert {t["revisionName"]: t["percent"] for t in status.traffic} == {rev(2): 50, rev(1): 50}
    assert sorted(cluster.controller.revisions[NAME]) == [rev(1), rev(2)]


def test_promote_makes_the_latest_revision_the_rolled_out_one(cluster, platform):
    platform.apply(manifest_for("1"))
    platform.apply(manifest_for("2", canary=20))
    status = platform.promote(NAME)

    assert cluster.patches()[-1] == {"spec": {"predictor": {CANARY: None}}}
    assert CANARY not in cluster.stored()["spec"]["predictor"]
    assert (status.latest_rolledout, status.previous_rolledout, status.canary_percent) == (rev(2), rev(1), None)
    assert status.traffic == [{"revisionName": rev(2), "percent": 100, "latestRevision": True, "tag": "latest"}]
    assert status.stable_version == "2" and status.revisions[rev(1)]["model_version"] == "1"
    assert sorted(cluster.controller.revisions[NAME]) == [rev(1), rev(2)]  # promoting cuts no revision


def test_a_create_race_falls_back_to_the_existing_service(cluster, platform):
    # Someone else creates it between our GET and our POST: the API answers 409, the object exists.
    conflict = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409, "reason": "AlreadyExists"}
    cluster.run(lambda api: api["post", ISVC] << 409 << {**conflict, "message": "already exists"})
    status = platform.apply(manifest_for("1"))
    assert status.ready and status.stable_version == "1"
    assert len(cluster.requests("POST")) == 1 and cluster.patches() == []


def test_rollback_during_a_canary_sends_the_canary_to_zero(cluster, platform):
    platform.apply(manifest_for("1"))
    platform.apply(manifest_for("2", canary=20))
    status = platform.rollback(NAME)

    assert cluster.patches()[-1] == {"spec": {"predictor": {CANARY: 0}}}
    assert {t["revisionName"]: t["percent"] for t in status.traffic} == {rev(2): 0, rev(1): 100}
    assert status.stable_version == "1" and status.latest_rolledout == rev(1)
    assert sorted(cluster.controller.revisions[NAME]) == [rev(1), rev(2)]  # no revision cut
    assert platform.manifest(NAME)["spec"]["predictor"][CANARY] == 0


def test_rollback_after_a_promotion_reapplies_the_previous_spec(cluster, platform):
    platform.apply(manifest_for("1"))
    platform.apply(manifest_for("2", canary=20))
    platform.promote(NAME)
    status = platform.rollback(NAME)

    # KServe cannot route back by percent once revision 2 took 100%: the spec revision 1 was cut
    # from is re-applied, which cuts revision 3 serving model version 1.
    patch = cluster.patches()[-1]
    assert patch["spec"]["predictor"]["model"]["storageUri"] == uri("1")
    assert patch["metadata"]["annotations"]["mlops-assets.dev/model-version"] == "1"
    assert patch["metadata"]["annotations"][ROLLED_BACK_FROM] == rev(2)
    assert cluster.storage_of(rev(3)) == uri("1")
    assert (status.latest_rolledout, status.previous_rolledout) == (rev(3), rev(2))
    assert status.stable_version == "1" and status.version_of(rev(2)) == "2"
    assert status.traffic == [{"revisionName": rev(3), "percent": 100, "latestRevision": True, "tag": "latest"}]

    with pytest.raises(RolloutStateError, match="already rolled back from"):
        platform.rollback(NAME)


def test_rollback_with_nothing_to_go_back_to_is_refused(cluster, platform):
    platform.apply(manifest_for("1"))
    with pytest.raises(RolloutStateError, match="no canary and no previous"):
        platform.rollback(NAME)


def test_delete_removes_the_service(cluster, platform):
    platform.apply(manifest_for("1"))
    platform.delete(NAME)
    assert platform.list_services() == []
    with pytest.raises(UnknownServiceError):
        platform.status(NAME)


def test_a_revision_that_never_becomes_ready_fails_the_apply_with_the_conditions(cluster):
    platform = KubernetesPlatform(host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=0.5)
    platform.apply(manifest_for("1"))
    with pytest.raises(ServiceNotReadyError, match=r"RevisionFailed.*model not found") as info:
        platform.apply(manifest_for("2", note="broken", canary=20))
    assert f"revision {rev(2)} to become ready" in str(info.value)
    # As in KServe, a revision that is not ready gets no traffic.
    status = platform.status(NAME)
    assert status.percent_of(rev(2)) == 0 and status.revisions[rev(2)]["status"] == "failed"


# ---- errors that say what to do --------------------------------------------------------------------
def test_403_names_the_missing_rbac_verb(cluster, platform):
    forbidden = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden"}
    cluster.run(lambda api: api["post", ISVC] << 403 << {**forbidden, "message": "cannot create"})
    with pytest.raises(KubernetesPermissionError) as info:
        platform.apply(manifest_for("1"))
    message = str(info.value)
    assert message.startswith(
        "RBAC: the ServiceAccount needs 'create' on inferenceservices.serving.kserve.io in namespace mlops-serving"
    )
    assert "k8s/base/rbac" in message and "cannot create" in message

    cluster.run(lambda api: api["get", ISVC] << 403 << {**forbidden, "message": "cannot get"})
    with pytest.raises(KubernetesPermissionError, match="needs 'get'"):
        platform.status(NAME)


@pytest.mark.parametrize("how", ["no CRD", "404 page not found"])
def test_404_on_the_api_group_says_kserve_is_not_installed(how):
    with FakeCluster(kserve_installed=False) as cluster:
        if how == "404 page not found":  # what a real API server answers for an unknown group
            cluster.run(lambda api: api[kmock.resource(group="serving.kserve.io")] << 404 << b"404 page not found")
        platform = KubernetesPlatform(host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=1)
        with pytest.raises(
            KServeNotInstalledError, match=r"KServe is not installed \(no serving.kserve.io/v1beta1 InferenceService CRD\)"
        ):
            platform.apply(manifest_for("1"))
        assert cluster.requests("POST") == []
        with pytest.raises(KServeNotInstalledError):
            platform.status(NAME)


def test_an_unknown_service_is_an_unknown_service_error(cluster, platform):
    for call in (platform.status, platform.manifest, platform.rollback, platform.delete, platform.promote):
        with pytest.raises(UnknownServiceError, match="'nope' does not exist in namespace mlops-serving"):
            call("nope")


@pytest.mark.parametrize(
    "breakage",
    [
        lambda m: m.update(kind="Deployment"),
        lambda m: m["spec"]["predictor"]["model"].pop("storageUri"),
        lambda m: m["spec"]["predictor"].update({CANARY: 150}),
        lambda m: m["metadata"].update(name="Fraud_Detector"),
    ],
)
def test_an_invalid_manifest_is_refused_before_any_http_call(cluster, platform, breakage):
    manifest = manifest_for("1")
    breakage(manifest)
    with pytest.raises(ManifestError):
        platform.apply(manifest)
    assert cluster.requests() == []


def test_an_unreachable_api_server_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    platform = KubernetesPlatform(host=f"http://127.0.0.1:{port}", namespace=NS, request_timeout_s=2)
    with pytest.raises(KubernetesUnreachableError, match=f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}"):
        platform.list_services()


# ---- the same rollout code as the local platform ----------------------------------------------------


class SyntheticMetrics(MetricsSource):
    """Cumulative per-revision counts from the traffic split the cluster reports: `rps` requests per
    second of fake time, shared per the split, each failing at the rate of the model its revision
    serves (by storage URI), all faster than 50 ms. Seeded, so every run sees the same numbers."""

    rps: float = 200.0
    good_error_rate: float = 0.001
    faulty_error_rate: float = 0.20
    faulty_marker: str = "faulty"
    seed: int = 7
    _cluster: FakeCluster | None = PrivateAttr(default=None)
    _clock: FakeClock | None = PrivateAttr(default=None)
    _rng: np.random.Generator | None = PrivateAttr(default=None)
    _last: float = PrivateAttr(default=0.0)
    _totals: dict[str, RevisionCounts] = PrivateAttr(default_factory=dict)
    _served: list[tuple[str, str, int]] = PrivateAttr(default_factory=list)  # (revision, storage URI, percent)

    def attach(self, cluster: FakeCluster, clock: FakeClock) -> SyntheticMetrics:
        self._cluster, self._clock, self._rng, self._last = cluster, clock, np.random.default_rng(self.seed), clock()
        return self

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        traffic = self._cluster.stored(isvc)["status"]["components"]["predictor"]["traffic"]
        for entry in traffic:
            revision, percent = entry["revisionName"], entry["percent"]
            storage = self._cluster.storage_of(revision, isvc)
            self._served.append((revision, storage, percent))
            rate = self.faulty_error_rate if self.faulty_marker in storage else self.good_error_rate
            n = int(self._rng.poisson(self.rps * elapsed * percent / 100))
            k = int(self._rng.binomial(n, rate))
            counts = self._totals.setdefault(revision, RevisionCounts(buckets={0.05: 0, 0.1: 0, 0.5: 0, math.inf: 0}))
            counts.requests += n
            counts.errors += k
            counts.latency_sum_s += 0.02 * n
            counts.buckets = {le: c + n for le, c in counts.buckets.items()}
        # Copies: the strategy keeps earlier snapshots to subtract.
        return {r: dataclasses.replace(c, buckets=dict(c.buckets)) for r, c in self._totals.items()}

    @property
    def served(self) -> list[tuple[str, str, int]]:
        return self._served

    def describe_query(self, isvc: str) -> str:
        return f"synthetic counts for {isvc} from the fake cluster's traffic split"


def test_run_canary_promotes_a_good_version_and_rolls_back_a_faulty_one(cluster, platform):
    clock = FakeClock()
    metrics = SyntheticMetrics().attach(cluster, clock)
    thresholds = Thresholds(max_error_rate=0.05, steps=(20, 50), min_requests_per_step=40, no_data_deadline_s=6)
    events: list = []

    def context() -> RolloutContext:
        return RolloutContext(
            platform=platform, metrics=metrics, isvc=NAME, emit=events.append, log=lambda _: None, clock=clock, sleep=clock.sleep
        )

    platform.apply(manifest_for("1"))
    good = run_canary(context(), manifest_for("2"), thresholds)
    assert good.outcome == PROMOTED, good.reason
    assert (good.candidate_revision, good.stable_revision) == (rev(2), rev(1))
    status = platform.status(NAME)
    assert status.stable_version == "2" and status.previous_rolledout == rev(1)
    # Every traffic change went through the API: 20% with the new spec, the 50% step, the promotion.
    assert [p["spec"]["predictor"].get(CANARY, "-") for p in cluster.patches()] == [20, 50, None]
    after_good = len(cluster.patches())

    faulty = run_canary(context(), manifest_for("3", note="faulty"), thresholds)
    assert faulty.outcome == ROLLED_BACK, faulty.reason
    assert (faulty.candidate_revision, faulty.stable_revision) == (rev(3), rev(2))
    assert faulty.candidate_failed_requests > 0
    status = platform.status(NAME)
    assert status.stable_version == "2" and status.latest_rolledout == rev(2)
    assert {t["revisionName"]: t["percent"] for t in status.traffic} == {rev(3): 0, rev(2): 100}
    assert [p["spec"]["predictor"].get(CANARY, "-") for p in cluster.patches()[after_good:]] == [20, 0]
    assert cluster.stored()["spec"]["predictor"][CANARY] == 0
    assert [e.kind for e in events if e.kind in ("canary_start", "promote", "rollback")] == [
        "canary_start",
        "promote",
        "canary_start",
        "rollback",
    ]

    # The faulty model never became the stable revision, and never got more than the first step.
    faulty_uri = uri("3", "faulty")
    for written in cluster.controller.statuses[NAME]:
        stable = written["components"]["predictor"].get("latestRolledoutRevision")
        assert stable is None or cluster.storage_of(stable) != faulty_uri
    assert max(p for _, storage, p in metrics.served if storage == faulty_uri) == 20


# ---- the rollout lock: a Lease every run pod sees ----------------------------------------------------
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")


def test_the_rollout_lock_is_a_lease_that_every_run_pod_sees(cluster):
    """Two platforms stand for two run pods on different nodes: they share only the API server."""
    from mlops_assets.core.serving.lock import LockInfo, RolloutInProgressError

    pod_a = KubernetesPlatform(host=cluster.url, namespace=NS).rollout_lock(NAME)
    pod_b = KubernetesPlatform(host=cluster.url, namespace=NS).rollout_lock(NAME)
    first = LockInfo(NAME, "canary-1", "run-a", "canary", "2", 1_700_000_000.0)
    second = LockInfo(NAME, "bg-2", "run-b", "blue_green", "3", 1_700_000_100.0)
    assert pod_a.acquire(first, is_running=lambda run: True) is None
    lease = cluster.run(lambda api: copy.deepcopy(api.objects[LEASES, NS, f"rollout-{NAME}"].raw))
    assert lease["spec"]["holderIdentity"] == "run-a" and lease["spec"]["acquireTime"] == "2023-11-14T22:13:20.000000Z"
    assert pod_b.holder() == first
    with pytest.raises(RolloutInProgressError, match="canary rollout canary-1 .*run run-a.*one rollout per InferenceService"):
        pod_b.acquire(second, is_running=lambda run: True)
    # run-a died: the next rollout takes the Lease over and is told whose it was (to roll that back).
    assert pod_b.acquire(second, is_running=lambda run: False) == first
    assert pod_a.holder() == second
    pod_a.release(first)  # not the holder any more: nothing changes
    assert pod_b.holder() == second
    pod_b.release(second)
    assert pod_a.holder() is None
    lease = cluster.run(lambda api: copy.deepcopy(api.objects[LEASES, NS, f"rollout-{NAME}"].raw))
    assert lease["spec"].get("holderIdentity") is None and lease["spec"]["leaseTransitions"] == 1
    # Every write after the first carried the resourceVersion it read (optimistic concurrency).
    patches = [r["data"] for r in cluster.requests("PATCH") if "/leases/" in r["path"]]
    assert patches and all("resourceVersion" in p["metadata"] for p in patches)


def test_a_lease_the_service_account_may_not_write_names_the_rule(cluster):
    from mlops_assets.core.serving.lock import LockInfo

    forbidden = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden"}
    cluster.run(lambda api: api["post", LEASES] << 403 << {**forbidden, "message": "cannot create leases"})
    lock = KubernetesPlatform(host=cluster.url, namespace=NS).rollout_lock(NAME)
    with pytest.raises(
        KubernetesPermissionError, match="needs 'create' on leases.coordination.k8s.io in namespace mlops-serving"
    ):
        lock.acquire(LockInfo(NAME, "c", "r", "canary", "1", 0.0), is_running=lambda run: True)


def test_the_cluster_gets_the_logger_the_service_account_and_a_storage_uri_kserve_can_read(cluster):
    """MLflow's artifact proxy hands out mlflow-artifacts:/ URIs; KServe reads the bucket behind it."""
    from pathlib import Path

    import yaml

    from mlops_assets.core.serving.kubernetes import ARTIFACTS_DESTINATION, KSERVE_SERVICE_ACCOUNT, PAYLOAD_SINK_URL

    platform = KubernetesPlatform(
        host=cluster.url,
        namespace=NS,
        poll_s=0.01,
        ready_timeout_s=5,
        payload_sink_url=PAYLOAD_SINK_URL,
        service_account=KSERVE_SERVICE_ACCOUNT,
        artifacts_destination=ARTIFACTS_DESTINATION,
    )
    manifest = build_inference_service(
        Deployment(model_name="fraud_detector", version="1", storage_uri="mlflow-artifacts:/1/models/m-abc/artifacts")
    )
    platform.apply(manifest)
    predictor = cluster.stored()["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == "s3://mlflow/1/models/m-abc/artifacts"
    assert predictor["serviceAccountName"] == "kserve-s3"
    assert predictor["logger"] == {"mode": "request", "url": "http://payload-sink.mlops-serving.svc.cluster.local"}
    platform.apply(manifest)  # idempotent: the same manifest again cuts no new revision
    assert platform.status(NAME).latest_ready == rev(1)
    # The constants are what k8s/ deploys.
    mlflow = next(
        d
        for d in yaml.safe_load_all((Path(__file__).parents[1] / "k8s/base/platform/mlflow.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    assert f"--artifacts-destination={ARTIFACTS_DESTINATION}" in mlflow["spec"]["template"]["spec"]["containers"][0]["args"]


def test_blue_green_reaches_green_through_kserves_tag_route(cluster, platform):
    """The manifest turns KServe's tag routing on; green at 0% then has its own `latest-` route, which is what
    `run_blue_green` validates through (locally the router's /latest prefix plays that part). From inside the
    cluster that is Knative's cluster-local `latest-<route>` Service (knative/docs docs/serving/using-subroutes.md);
    the traffic target's `url` (the external domain) stays for display."""
    platform.apply(manifest_for("1"))
    status = platform.apply(manifest_for("2", canary=0))
    assert cluster.stored()["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    assert status.percent_of(rev(2)) == 0 and status.percent_of(rev(1)) == 100
    assert status.predict_url("v2", tag="latest") == (
        f"http://latest-{NAME}-predictor.{NS}.svc.cluster.local/v2/models/{NAME}/infer"
    )
    assert status.tag_addresses["prev"] == f"http://prev-{NAME}-predictor.{NS}.svc.cluster.local"
    assert status.tag_urls["prev"] == f"http://prev-{NAME}-predictor-{NS}.mlops.example.com"
    with pytest.raises(RolloutStateError, match="no 'blue' tag URL"):
        status.predict_url("v1", tag="blue")
