"""Shadow traffic on a cluster: Istio mirrors at Knative's local gateway, the payload sink pairs the answers.

No cluster runs here. What stands in, and what is real:
- The mirroring VirtualService `core/serving/mesh.py` builds is validated offline against the
  `networking.istio.io/v1` schema of Istio 1.27.1's CRD (the file test_cluster_ab uses, through conftest.py's
  `vs_validator`), and a broken one is refused by it. So is the DestinationRule that bounds the copies in
  flight, against the DestinationRule schema of the same release:
  `schemas/istio-1.27.1-destinationrule-v1.json` is the `v1` version's `openAPIV3Schema` of the
  DestinationRule CRD in istio/istio manifests/charts/base/files/crd-all.gen.yaml at tag 1.27.1 (commit
  4ac35992, built from istio/api f5a5d3a6, the commit the VirtualService schema was taken from; that file's
  VirtualService schema is identical to the stored one), written with `json.dumps(schema, sort_keys=True,
  indent=1)` as the VirtualService's was. What Istio does with the rule (Envoy's circuit breakers on the
  mirror's subset cluster) is read from Istio's source, not run.
- `KubernetesPlatform` runs against kmock (helpers.py's FakeCluster and its KServe controller
  stand-in): it applies the bound and the mirror, removes both (stopping, rolling back, promoting, starting
  an A/B test), and makes only the calls Role mlops-rollout grants.
- The payload sink is a real process on 127.0.0.1 (conftest.py's `sink`). No KServe agent runs: the tests
  post the CloudEvents KServe's payload logger sends (kserve/kserve pkg/logger/handler.go and worker.go: a
  request event, a response event for 200s only, `ce-source` the pod's name, `ce-time` the moment,
  `ce-metadata` the listed headers), for the stable revision and, for the requests the stored
  VirtualService mirrors, for the candidate with the same `x-request-id` (which Envoy keeps on the copy).
  No Envoy runs: the tests mirror the share `mirrorPercentage` says.
- `run_shadow`, unchanged from the local platform, decides from the pairs the sink returns: a candidate
  with identical answers is promoted, one flipping 30% of decisions is rolled back, and no user request
  is answered by the candidate (Knative's split, as the stand-in controller reports it, gives it 0%).
"""

from __future__ import annotations

import inspect
import json
import random
import re
import time
import uuid
from datetime import UTC, datetime
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kmock
import pytest

from mlops_assets.core import http
from mlops_assets.core.rollout.analysis import Thresholds
from mlops_assets.core.rollout.shadow import ShadowTolerances
from mlops_assets.core.rollout.strategies import PROMOTED, ROLLED_BACK, RolloutContext, run_shadow
from mlops_assets.core.serving import kubernetes, mesh
from mlops_assets.core.serving.kubernetes import KubernetesPlatform
from mlops_assets.core.serving.manifest import ManifestError
from mlops_assets.core.serving.metrics import MetricsSource, RevisionCounts
from mlops_assets.core.serving.platform import RolloutStateError
from mlops_assets.core.settings import SHADOW_MAX_IN_FLIGHT
from mlops_assets.servers.payload_sink import ShadowPairs
from mlops_assets_tests.helpers import ISVC, NAME, NS, VIRTUALSERVICES, FakeClock, FakeCluster, manifest_for, rev
from mlops_assets_tests.test_k8s_manifests import get, kustomized, objects, pods, rendered  # noqa: F401 - fixtures

DESTINATIONRULES = kmock.resource("networking.istio.io", "v1", "destinationrules")
#: See the module docstring for where this came from.
DR_SCHEMA = Path(__file__).parent / "schemas" / "istio-1.27.1-destinationrule-v1.json"


@pytest.fixture(scope="module")
def dr_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(DR_SCHEMA.read_text()))


# ---- the built object -----------------------------------------------------------------------------------
@pytest.mark.parametrize("percent", [1, 20, 100])
def test_the_mirror_virtual_service_validates_against_istios_crd(vs_validator, percent):
    vs = mesh.build_mirror_virtual_service(NAME, NS, rev(2), percent)
    errors = [e.message for e in vs_validator.iter_errors(vs)]
    assert not errors, errors
    assert (vs["apiVersion"], vs["kind"], vs["metadata"]["name"]) == ("networking.istio.io/v1", "VirtualService", f"{NAME}-ab")
    assert vs["spec"]["hosts"] == [mesh.ab_host(NAME, NS)]
    to_gateway, shadow = vs["spec"]["http"]
    gateway = "knative-local-gateway.istio-system.svc.cluster.local"
    # Callers' sidecars send on to the gateway with our Host and mirror nothing: the copy is made at the gateway,
    # the one caller the predictors admit.
    assert to_gateway["match"] == [{"gateways": ["mesh"]}] and "mirror" not in to_gateway and "headers" not in to_gateway
    assert [d["destination"]["host"] for d in to_gateway["route"]] == [gateway]
    assert shadow["match"] == [{"gateways": ["knative-serving/knative-local-gateway"]}]
    # Users: Knative's split through the gateway; the copy: the candidate revision's own Service.
    assert [d["destination"]["host"] for d in shadow["route"]] == [gateway]
    # The subset of the shadow's DestinationRule: the copies' own cluster, bounded in flight.
    assert shadow["mirror"] == {"host": f"{rev(2)}.{NS}.svc.cluster.local", "subset": "shadow", "port": {"number": 80}}
    assert shadow["mirrorPercentage"] == {"value": float(percent)}
    headers = shadow["headers"]["request"]["set"]
    assert headers["Host"] == f"{NAME}-predictor.{NS}.svc.cluster.local"
    assert (headers["Knative-Serving-Revision"], headers["Knative-Serving-Namespace"]) == (rev(2), NS)
    assert mesh.mirror_of(vs) == (rev(2), percent)
    assert mesh.arm_for_request(vs, mesh.bucket_header("u1")) is None  # nobody is pinned to an arm


def test_the_schema_really_rejects_a_broken_mirror(vs_validator):
    vs = mesh.build_mirror_virtual_service(NAME, NS, rev(2), 20)
    del vs["spec"]["http"][1]["mirror"]["host"]  # required
    assert list(vs_validator.iter_errors(vs))
    vs = mesh.build_mirror_virtual_service(NAME, NS, rev(2), 20)
    vs["spec"]["http"][1]["mirrorPercentage"] = {"value": "half"}
    assert list(vs_validator.iter_errors(vs))
    vs = mesh.build_mirror_virtual_service(NAME, NS, rev(2), 20)
    vs["spec"]["http"][1]["mirror"]["port"] = {"number": -1}
    assert list(vs_validator.iter_errors(vs))


@pytest.mark.parametrize("max_in_flight", [1, 2, 64])
def test_the_bound_on_copies_validates_against_istios_crd(dr_validator, max_in_flight):
    """The DestinationRule on the candidate's Service: its subset `shadow` (what the mirror names) allows
    `max_in_flight` active requests (Envoy's max_requests, HTTP/1.1 and HTTP/2) and as many connections, and
    queues one more at most (0 would be Istio's "no limit"); nothing else, so users' traffic to the revision
    (the host's default cluster) is never limited, and no `tls` that could switch off auto mTLS."""
    dr = mesh.build_mirror_destination_rule(NAME, NS, rev(2), max_in_flight)
    errors = [e.message for e in dr_validator.iter_errors(dr)]
    assert not errors, errors
    assert (dr["apiVersion"], dr["kind"]) == ("networking.istio.io/v1", "DestinationRule")
    assert (dr["metadata"]["name"], dr["metadata"]["namespace"]) == (f"{NAME}-shadow", NS)
    vs = mesh.build_mirror_virtual_service(NAME, NS, rev(2), 20)
    mirror = vs["spec"]["http"][1]["mirror"]
    assert dr["spec"]["host"] == mirror["host"] == mesh.revision_host(rev(2), NS)
    assert set(dr["spec"]) == {"host", "subsets"}  # no top-level trafficPolicy: the default cluster is untouched
    (subset,) = dr["spec"]["subsets"]
    assert subset["name"] == mirror["subset"] and "labels" not in subset  # every endpoint: pods or the activator
    assert subset["trafficPolicy"] == {
        "connectionPool": {
            "tcp": {"maxConnections": max_in_flight},
            "http": {"http2MaxRequests": max_in_flight, "http1MaxPendingRequests": 1},
        }
    }
    assert "tls" not in json.dumps(dr)  # auto mTLS: ISTIO_MUTUAL to sidecars, as STRICT PeerAuthentication needs
    assert mesh.shadow_limit_of(dr) == (rev(2), max_in_flight)
    assert mesh.shadow_limit_of(None) is None and mesh.shadow_limit_of(vs) is None


def test_the_schema_really_rejects_a_broken_bound(dr_validator):
    dr = mesh.build_mirror_destination_rule(NAME, NS, rev(2), 4)
    del dr["spec"]["host"]  # required
    assert list(dr_validator.iter_errors(dr))
    dr = mesh.build_mirror_destination_rule(NAME, NS, rev(2), 4)
    dr["spec"]["subsets"][0]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] = "four"
    assert list(dr_validator.iter_errors(dr))
    dr = mesh.build_mirror_destination_rule(NAME, NS, rev(2), 4)
    dr["spec"]["subsets"][0]["trafficPolicy"]["tls"] = {"mode": "OFF"}  # not one of Istio's modes
    assert list(dr_validator.iter_errors(dr))


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2", None, 2**31])
def test_a_bound_that_is_no_positive_int32_is_refused(bad):
    with pytest.raises(ManifestError, match="max_in_flight"):
        mesh.build_mirror_destination_rule(NAME, NS, rev(2), bad)
    with pytest.raises(ManifestError):
        mesh.build_mirror_destination_rule("Bad_Name", NS, rev(2), 2)
    with pytest.raises(ManifestError):
        mesh.build_mirror_destination_rule(NAME, NS, "Bad_Revision", 2)


@pytest.mark.parametrize("bad", [0, 101, -1, True, 50.0, "50"])
def test_a_mirror_outside_1_to_100_percent_is_refused(bad):
    with pytest.raises(ManifestError):
        mesh.build_mirror_virtual_service(NAME, NS, rev(2), bad)


def test_a_revision_that_is_no_dns_label_is_refused():
    with pytest.raises(ManifestError):
        mesh.build_mirror_virtual_service(NAME, NS, "Bad_Revision", 20)


# ---- RBAC and policies --------------------------------------------------------------------------------
def test_rollout_role_grants_exactly_the_shadow_limit_calls(rendered):  # noqa: F811 - test_k8s_manifests' fixture
    """`_ShadowLimit`'s calls (`self._call("<verb>", ...)`), SHADOW_VERBS (named in its 403s) and Role
    mlops-rollout's rule on destinationrules are one set, in every kustomization."""
    called = set(re.findall(r'self\._call\(\s*"(\w+)"', inspect.getsource(kubernetes._ShadowLimit)))
    assert {kubernetes.DR_RESOURCE: called} == {k: set(v) for k, v in kubernetes.SHADOW_VERBS.items()}
    for what, verbs in kubernetes.SHADOW_VERBS.items():
        assert f"{what}: {', '.join(verbs)}" in kubernetes.SHADOW_ERRORS.rbac
    for name in ("base", "dev", "prod"):
        role = get(rendered[name], "Role", NS, "mlops-rollout")
        granted = {
            verb
            for rule in role["rules"]
            if "networking.istio.io" in rule["apiGroups"] and "destinationrules" in rule["resources"]
            for verb in rule["verbs"]
        }
        assert granted == called, f"{name}: destinationrules {sorted(granted)}"


def test_shadow_runs_reach_the_sink_and_only_the_gateway_sends_copies(rendered, pods):  # noqa: F811 - fixtures
    """Run pods declare, read and end shadows at the sink; predictors, Prometheus and strangers may not. The
    copies leave from the gateway, which the predictors admit at both layers."""
    from mlops_assets_tests.test_k8s_manifests import authorization_allows, network_allows

    docs = rendered["base"]
    netpol, authz = objects(docs, "NetworkPolicy"), objects(docs, "AuthorizationPolicy")
    sink_pod = pods["payload-sink"]
    calls = [("PUT", f"/-/shadow/{NAME}"), ("GET", f"/-/shadow/{NAME}"), ("DELETE", f"/-/shadow/{NAME}")]
    for sa in ("mlops/mlops-rollout", "mlops/mlops-lifecycle"):
        caller = {**pods["run-worker"], "sa": sa}
        assert network_allows(netpol, caller, sink_pod, 8080), sa
        for method, path in calls:
            assert authorization_allows(authz, caller, sink_pod, 8080, method, path), (sa, method, path)
    for other in ("predictor", "prometheus", "intruder", "serving-other"):
        for method, path in calls:
            assert not authorization_allows(authz, pods[other], sink_pod, 8080, method, path), (other, method, path)
    # The logger's events (the pairs' material) come from the predictors.
    assert authorization_allows(authz, pods["predictor"], sink_pod, 8080, "POST", "/")
    # The mirrored copy: from the gateway to the candidate's pods (or through the activator, which the predictors admit).
    assert network_allows(netpol, pods["gateway"], pods["predictor"], 8012)
    assert authorization_allows(authz, pods["gateway"], pods["predictor"], 8012, "POST", f"/v1/models/{NAME}:predict")
    assert not authorization_allows(authz, pods["serving-other"], pods["predictor"], 8012, "POST", f"/v1/models/{NAME}:predict")


# ---- the payload sink ------------------------------------------------------------------------------------
class Logger:
    """KServe's payload logger of every predictor pod, as HTTP binary-mode CloudEvents to the sink (one kept-alive
    connection)."""

    def __init__(self, sink_url: str) -> None:
        parts = urlsplit(sink_url)
        self.conn = HTTPConnection(parts.hostname, parts.port, timeout=10)

    def send(self, revision: str, kind: str, event_id: str, request_id: str | None, at: float, body: dict) -> int:
        headers = {
            "Content-Type": "application/json",
            "Ce-Specversion": "1.0",
            "Ce-Id": event_id,
            "Ce-Type": f"org.kubeflow.serving.inference.{kind}",
            "Ce-Source": f"{revision}-deployment-6d9f8c7b5-x2k4p",
            "Ce-Time": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z",  # Go's nanoseconds
            "Ce-Inferenceservicename": NAME,
            "Ce-Namespace": NS,
            "Ce-Component": "predictor",
            "Ce-Endpoint": "",
            "Ce-Metadata": json.dumps({"X-Request-Id": [request_id]} if request_id else {}),
        }
        self.conn.request("POST", "/", body=json.dumps(body).encode(), headers=headers)
        response = self.conn.getresponse()
        response.read()
        return response.status

    def call(self, revision: str, request_id: str, body: dict, answer: dict | None, latency_s: float) -> None:
        """One request through one revision: its request event and, for a 200 (`answer`), its response event."""
        event_id, start = str(uuid.uuid4()), time.time()
        assert self.send(revision, "request", event_id, request_id, start, body) == 202
        if answer is not None:
            assert self.send(revision, "response", event_id, request_id, start + latency_s, answer) == 202


def _put(url: str, path: str, payload: dict) -> int:
    return http.request(f"{url}{path}", method="PUT", json_body=payload, timeout=10).status


def _pairs(url: str, since: int = 0) -> dict:
    return http.request(f"{url}/-/shadow/{NAME}?since={since}", timeout=10).checked().json()


def test_the_sink_pairs_the_answers_of_one_request_id(sink):
    logger = Logger(sink)
    before = _pairs(sink)
    assert (before["mirrored"], before["next"], before["pairs"], before["mirror"]) == (0, 0, [], None)
    assert _put(sink, f"/-/shadow/{NAME}", {"stable": rev(1), "candidate": rev(2), "percent": 50}) == 200
    body = {"instances": [{"amount": 3.0}]}
    # Mirrored: both revisions answer (the candidate's events first for one of them: the order is free).
    logger.call(rev(1), "r1", body, {"predictions": [0.9]}, 0.010)
    logger.call(rev(2), "r1", body, {"predictions": [0.2]}, 0.030)
    logger.call(rev(2), "r2", body, {"predictions": [0.1]}, 0.020)
    logger.call(rev(1), "r2", body, {"predictions": [0.1]}, 0.010)
    # Not mirrored (yet); a candidate still answering. Neither is a pair before its timeout.
    logger.call(rev(1), "r3", body, {"predictions": [0.4]}, 0.010)
    logger.call(rev(1), "r4", body, {"predictions": [0.5]}, 0.010)
    logger.call(rev(2), "r4", body, None, 0.0)
    # Another revision's events and events without a request id are no part of the shadow.
    logger.call(rev(3), "r1", body, {"predictions": [0.0]}, 0.010)
    logger.call(rev(1), None, body, {"predictions": [0.0]}, 0.010)
    now = _pairs(sink)
    assert [p["request_id"] for p in now["pairs"]] == ["r1", "r2"] and now["in_flight"] == 1 and now["next"] == 2
    r1 = now["pairs"][0]
    assert (r1["stable_revision"], r1["candidate_revision"]) == (rev(1), rev(2))
    assert (r1["stable"], r1["candidate"], r1["request"]) == ({"predictions": [0.9]}, {"predictions": [0.2]}, body)
    assert (r1["stable_status"], r1["candidate_status"]) == (200, 200)
    assert abs(r1["stable_latency_s"] - 0.010) < 1e-3 and abs(r1["candidate_latency_s"] - 0.030) < 1e-3
    assert _pairs(sink, since=2)["pairs"] == []
    # The candidate's copies stay out of the payload log: the users' requests (r1-r4, the one without an id) and
    # rev(3)'s are in.
    metrics = http.request(f"{sink}/metrics", timeout=10).text
    assert f'payload_sink_events_total{{isvc="{NAME}",outcome="request"}} 6.0' in metrics
    # Ended: nothing more is paired, and the cursor stays valid.
    assert http.request(f"{sink}/-/shadow/{NAME}", method="DELETE", timeout=10).ok
    logger.call(rev(1), "r6", body, {"predictions": [0.5]}, 0.010)
    logger.call(rev(2), "r6", body, {"predictions": [0.5]}, 0.010)
    ended = _pairs(sink, since=2)
    assert (ended["pairs"], ended["mirror"], ended["next"]) == ([], None, 2)


def test_at_the_timeout_a_copy_without_an_answer_is_a_failed_pair_and_unmirrored_requests_expire():
    """KServe logs no answer but a 200, so a candidate's error is an answer that never came; requests that were not
    mirrored are never pairs; a copy without its user request has nothing to be compared with. Pairs are numbered on
    across shadows, and readers that fell behind the buffer are told how many they lost."""
    pairs = ShadowPairs(timeout_s=30.0)
    pairs.start(rev(1), rev(2), 50)
    request, answer = b'{"instances": [{"amount": 1}]}', b'{"predictions": [0.7]}'
    for rid, revisions in {"failed": (rev(1), rev(2)), "not-mirrored": (rev(1),), "orphan": (rev(2),)}.items():
        for revision in revisions:
            assert pairs.record(revision, "request", rid, 100.0, request, now=0.0)
        if rev(1) in revisions:
            assert pairs.record(rev(1), "response", rid, 100.01, answer, now=1.0)
    assert not pairs.record(rev(3), "request", "x", 100.0, request, now=1.0)
    assert pairs.page(0, 100, now=29.0)["pairs"] == []
    page = pairs.page(0, 100, now=30.0)
    assert [p["request_id"] for p in page["pairs"]] == ["failed"]
    failed = page["pairs"][0]
    assert (failed["stable_status"], failed["candidate_status"], failed["candidate"]) == (200, 0, None)
    assert failed["candidate_latency_s"] == 30.0 and failed["stable"] == {"predictions": [0.7]}
    assert (page["mirrored"], page["unmatched"], page["in_flight"], page["next"]) == (1, 1, 0, 1)
    # The next shadow numbers on; a reader far behind the buffer is told what it lost.
    pairs.start(rev(2), rev(3), 100)
    for i in range(6000):
        pairs.record(rev(2), "request", f"r{i}", 200.0, request, now=40.0)
        pairs.record(rev(3), "request", f"r{i}", 200.0, request, now=40.0)
        pairs.record(rev(2), "response", f"r{i}", 200.01, answer, now=40.0)
        pairs.record(rev(3), "response", f"r{i}", 200.02, answer, now=40.0)
    page = pairs.page(1, 10, now=41.0)
    assert page["lost"] == 1000 and page["pairs"][0]["seq"] == 1002 and page["next"] == 1011  # 2-1001 are gone
    assert pairs.page(9999, 10, now=41.0)["restarted"]


def test_bad_shadow_declarations_get_a_400_that_says_why(sink):
    good = {"stable": rev(1), "candidate": rev(2), "percent": 20}
    for bad in ({**good, "percent": 0}, {**good, "percent": 101}, {**good, "candidate": rev(1)}, {"stable": rev(1)}):
        response = http.request(f"{sink}/-/shadow/{NAME}", method="PUT", json_body=bad, timeout=10)
        assert response.status == 400 and response.json()["error"], bad
    assert http.request(f"{sink}/-/shadow/{NAME}?since=x", timeout=10).status == 400


# ---- KubernetesPlatform against kmock ------------------------------------------------------------------
def _stored_vs(cluster) -> dict:
    return cluster.run(lambda api: json.loads(json.dumps(api.objects[VIRTUALSERVICES, NS, f"{NAME}-ab"].raw)))


def _stored_dr(cluster) -> dict | None:
    def read(api):
        key = (DESTINATIONRULES, NS, f"{NAME}-shadow")
        if key not in api.objects or api.objects[key].deleted:
            return None
        return json.loads(json.dumps(api.objects[key].raw))

    return cluster.run(read)


def _routing_calls(cluster) -> list[str]:
    """The writes on the shadow's objects, in order: "dr POST", "vs PATCH", ..."""
    kinds = {"/destinationrules": "dr", "/virtualservices": "vs", "/inferenceservices": "isvc"}
    calls = []
    for r in cluster.requests():
        kind = next((k for part, k in kinds.items() if part in r["path"]), None)
        if kind and r["method"] != "GET":
            calls.append(f"{kind} {r['method']}")
    return calls


def _platform(cluster, sink_url: str, capture: bool = True) -> KubernetesPlatform:
    return KubernetesPlatform(
        host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=5, payload_sink_url=sink_url, shadow_capture=capture
    )


def test_kubernetes_platform_applies_and_removes_the_mirror(sink):
    """set_mirror creates the A/B host's Service and VirtualService (owned by the InferenceService) mirroring to
    the candidate, declares the shadow to the sink, and set_mirror(0) resets the routes to Knative's split; the
    calls on virtualservices and services are the A/B ones, which Role mlops-rollout grants (test_cluster_ab)."""
    with FakeCluster() as cluster:
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("1"))
        logger = cluster.stored()["spec"]["predictor"]["logger"]
        assert logger == {"mode": "all", "url": sink, "metadataHeaders": ["X-Request-Id"]}
        platform.apply(manifest_for("2", canary=0))
        status = platform.set_mirror(NAME, 25)
        assert status.mirror == {"revision": rev(2), "percent": 25, "max_in_flight": SHADOW_MAX_IN_FLIGHT}
        assert status.percent_of(rev(2)) == 0  # users stay on the stable revision
        vs = _stored_vs(cluster)
        assert mesh.mirror_of(vs) == (rev(2), 25)
        owner = vs["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("InferenceService", NAME)
        # The bound on the copies in flight: the setting's default, on the subset the mirror names, created before
        # the mirror (a mirror to an undefined subset would lose its copies), owned by the InferenceService.
        dr = _stored_dr(cluster)
        assert mesh.shadow_limit_of(dr) == (rev(2), SHADOW_MAX_IN_FLIGHT)
        assert dr["spec"]["subsets"][0]["name"] == vs["spec"]["http"][1]["mirror"]["subset"]
        owner = dr["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("InferenceService", NAME)
        assert _routing_calls(cluster)[-2:] == ["dr POST", "vs POST"]
        assert _pairs(sink)["mirror"] == {"revision": rev(2), "stable": rev(1), "candidate": rev(2), "percent": 25}
        status = platform.set_mirror(NAME, 25, max_in_flight=5)  # again: patches, not second objects
        assert status.mirror["max_in_flight"] == 5 and mesh.shadow_limit_of(_stored_dr(cluster)) == (rev(2), 5)
        assert _routing_calls(cluster)[-2:] == ["dr PATCH", "vs PATCH"]
        with pytest.raises(ManifestError, match="max_in_flight"):
            platform.set_mirror(NAME, 25, max_in_flight=0)  # Istio would read 0 as no bound at all
        platform.set_mirror(NAME, 0)
        vs = _stored_vs(cluster)
        assert mesh.mirror_of(vs) is None and [r["name"] for r in vs["spec"]["http"]] == ["split"]
        assert _stored_dr(cluster) is None  # deleted once the mirror was off
        assert _routing_calls(cluster)[-2:] == ["vs PATCH", "dr DELETE"]
        assert _pairs(sink)["mirror"] is None
        assert platform.set_mirror(NAME, 0).mirror == {}  # stopping twice is a no-op
        # Every call on the routing objects is one the Role grants (kubernetes.AB_VERBS and SHADOW_VERBS).
        verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
        made: dict[str, set[str]] = {}
        for r in cluster.requests():
            if "/virtualservices" in r["path"]:
                made.setdefault(kubernetes.VS_RESOURCE, set()).add(verbs[r["method"]])
            elif "/destinationrules" in r["path"]:
                made.setdefault(kubernetes.DR_RESOURCE, set()).add(verbs[r["method"]])
            elif "/services" in r["path"]:
                made.setdefault("services", set()).add(verbs[r["method"]])
        granted = {**kubernetes.AB_VERBS, **kubernetes.SHADOW_VERBS}
        for resource, called in made.items():
            assert called <= set(granted[resource]), (resource, called)
        assert made[kubernetes.VS_RESOURCE] == {"get", "create", "patch"}
        assert made[kubernetes.DR_RESOURCE] == {"get", "create", "patch", "delete"}


def test_the_stored_bound_validates_against_istios_crd(sink, dr_validator):
    """What the API server holds after set_mirror (with the ownerReference) is still a valid DestinationRule."""
    with FakeCluster() as cluster:
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("1"))
        platform.apply(manifest_for("2", canary=0))
        platform.set_mirror(NAME, 10, max_in_flight=3)
        dr = _stored_dr(cluster)
        errors = [e.message for e in dr_validator.iter_errors(dr)]
        assert not errors, errors
        assert mesh.shadow_limit_of(dr) == (rev(2), 3)


def test_rollback_stops_mirroring_first(sink):
    with FakeCluster() as cluster:
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("1"))
        platform.apply(manifest_for("2", canary=0))
        platform.set_mirror(NAME, 100)
        assert _stored_dr(cluster) is not None
        platform.rollback(NAME)
        assert mesh.mirror_of(_stored_vs(cluster)) is None and _pairs(sink)["mirror"] is None
        assert _stored_dr(cluster) is None
        # The candidate's deployment, the routes reset, then KServe's rollback (canaryTrafficPercent 0).
        patched = ["vs" if "/virtualservices/" in r["path"] else "isvc" for r in cluster.requests("PATCH")]
        assert patched == ["isvc", "vs", "isvc"], patched
        assert cluster.patches()[-1]["spec"] == {"predictor": {"canaryTrafficPercent": 0}}
        # The mirror off, its bound deleted, and only then the traffic change.
        assert _routing_calls(cluster)[-3:] == ["vs PATCH", "dr DELETE", "isvc PATCH"]


def test_promotion_and_a_new_ab_test_stop_the_mirror_and_delete_its_bound(sink):
    """Promotion stops mirroring (and deletes the bound) before the candidate takes the users; an A/B test started
    while a dead rollout's mirror is still on stops it first instead of overwriting its routes."""
    with FakeCluster() as cluster:
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("1"))
        platform.apply(manifest_for("2", canary=0))
        platform.set_mirror(NAME, 50)
        status = platform.promote(NAME)
        assert status.latest_rolledout == rev(2)
        assert mesh.mirror_of(_stored_vs(cluster)) is None and _stored_dr(cluster) is None
        assert _pairs(sink)["mirror"] is None
        calls = _routing_calls(cluster)
        assert calls.index("dr DELETE") < len(calls) - 1 and calls[-1] == "isvc PATCH"  # the promotion last
        assert calls[calls.index("dr DELETE") - 1] == "vs PATCH"
    with FakeCluster() as cluster:
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("1"))
        platform.apply(manifest_for("2", canary=0))
        platform.set_mirror(NAME, 50)
        platform.start_ab_test(NAME, rev(1), rev(2), 30)
        vs = _stored_vs(cluster)
        assert mesh.mirror_of(vs) is None and [r["name"] for r in vs["spec"]["http"]] == ["arm-b", "arm-a", "split"]
        assert _stored_dr(cluster) is None and _pairs(sink)["mirror"] is None


def test_a_shadow_needs_both_revisions_cut_with_capture(sink):
    """The stable revision was deployed before shadow capture was on: its logger logs no answers, so nothing could
    be paired. shadow_pairs says "cannot mirror" (blue-green then validates without), set_mirror refuses, and no
    routing object is made."""
    with FakeCluster() as cluster:
        _platform(cluster, sink, capture=False).apply(manifest_for("1"))
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("2", canary=0))
        with pytest.raises(NotImplementedError, match=f"revision {rev(1)} was cut without shadow capture"):
            platform.shadow_pairs(NAME)
        with pytest.raises(RolloutStateError, match=f"revision {rev(1)} was cut without shadow capture"):
            platform.set_mirror(NAME, 10)
        assert not [r for r in cluster.requests() if "/virtualservices" in r["path"] and r["method"] != "GET"]
        with pytest.raises(NotImplementedError, match="shadow_capture"):
            _platform(cluster, sink, capture=False).shadow_pairs(NAME)


# ---- a whole shadow run against kmock and the sink -----------------------------------------------------
class MeshTraffic:
    """Users calling the A/B host between the rollout's looks: Knative's split (the stand-in controller's status)
    picks the revision that answers each user; the stored VirtualService's `mirrorPercentage` decides which
    requests are copied to the candidate; each revision's payload logger reports to the sink. The stable
    revision scores each row; the candidate gives the same score, or flips the decision of `flip` of the rows."""

    def __init__(self, cluster, sink_url: str, flip: float, users: int = 80, seed: int = 5) -> None:
        self.cluster, self.logger, self.flip, self.users = cluster, Logger(sink_url), flip, users
        self.rng = random.Random(seed)
        self.served: list[str] = []  # the revision that answered each user
        self.mirrored = 0

    def __call__(self) -> None:
        isvc = self.cluster.run(lambda api: json.loads(json.dumps(api.objects[ISVC, NS, NAME].raw)))
        traffic = isvc["status"]["components"]["predictor"]["traffic"]
        vs = self.cluster.run(
            lambda api: (
                json.loads(json.dumps(api.objects[VIRTUALSERVICES, NS, f"{NAME}-ab"].raw))
                if (VIRTUALSERVICES, NS, f"{NAME}-ab") in api.objects
                else None
            )
        )
        mirror = mesh.mirror_of(vs)
        for _ in range(self.users):
            point, served = self.rng.random() * 100, traffic[-1]["revisionName"]
            for target in traffic:
                if point < target["percent"]:
                    served = target["revisionName"]
                    break
                point -= target["percent"]
            self.served.append(served)
            score = self.rng.random()
            body = {"instances": [{"amount": round(score * 100, 3)}]}
            request_id = str(uuid.uuid4())
            self.logger.call(served, request_id, body, {"predictions": [score]}, 0.008 + self.rng.random() * 0.004)
            if mirror is not None and self.rng.random() * 100 < mirror[1]:
                self.mirrored += 1
                copy = 1.0 - score if self.rng.random() < self.flip else score
                self.logger.call(mirror[0], request_id, body, {"predictions": [copy]}, 0.008 + self.rng.random() * 0.004)


class NoCounts(MetricsSource):
    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        return {}

    def describe_query(self, isvc: str) -> str:
        return "none: the shadow decides from the payload sink's pairs"


@pytest.mark.parametrize("flip", [0.0, 0.3])
def test_a_shadow_run_on_the_cluster_promotes_an_identical_candidate_and_rejects_a_flipping_one(sink, flip):
    with FakeCluster() as cluster:
        platform = _platform(cluster, sink)
        platform.apply(manifest_for("1"))
        traffic = MeshTraffic(cluster, sink, flip)
        clock, events = FakeClock(), []

        def sleep(seconds: float) -> None:
            clock.sleep(seconds)
            traffic()

        ctx = RolloutContext(
            platform=platform,
            metrics=NoCounts(),
            isvc=NAME,
            emit=events.append,
            log=lambda _msg: None,
            poll_s=10.0,
            timeout_s=3600.0,
            clock=clock,
            sleep=sleep,
        )
        tolerances = ShadowTolerances(threshold=0.5, max_flip_rate=0.02, min_requests=100)
        result = run_shadow(ctx, manifest_for("2"), Thresholds(), tolerances, mirror_percent=50)
        assert result.outcome == (PROMOTED if flip == 0 else ROLLED_BACK), result.reason
        assert (result.candidate_revision, result.stable_revision) == (rev(2), rev(1))
        windows = [e for e in events if e.kind == "shadow_window"]
        assert windows and all(e.percent == 0 for e in windows)
        # Decided on the sink's pairs: every compared request is one the mesh copied, and the flips were seen.
        assert 0 < result.evidence["compared_requests"] <= traffic.mirrored
        assert (result.evidence["flips"] > 0) == (flip > 0), result.evidence["flips"]
        # Users were answered by the stable revision only, while about half their requests were copied.
        assert set(traffic.served) == {rev(1)} and traffic.mirrored > 0
        assert 0.35 < traffic.mirrored / len(traffic.served) < 0.65
        # Mirroring ended with the run: the routes are Knative's split again, the bound is gone, the sink pairs no more.
        assert mesh.mirror_of(_stored_vs(cluster)) is None and _pairs(sink)["mirror"] is None
        assert _stored_dr(cluster) is None
        final = platform.status(NAME)
        if flip == 0:
            assert final.latest_rolledout == rev(2)
        else:
            assert final.percent_of(rev(2)) == 0 and final.latest_rolledout == rev(1)
