"""A/B tests on a cluster: users pinned at the Istio mesh, outcomes at the payload sink, the same ABTest.

No cluster runs here. What stands in, and what is real:
- The VirtualService and Service `core/serving/mesh.py` builds are validated offline: the VirtualService
  against the `networking.istio.io/v1` schema of Istio 1.27.1's CRD (istio/api
  kubernetes/customresourcedefinitions.gen.yaml at tag 1.27.1, commit f5a5d3a6; the schema is stored in
  `schemas/`, conftest.py's `vs_validator`), the Service by kubernetes-validate, and the routes by
  evaluating their header regexes as Envoy does (a full match over the header value).
- The assignment rule is the local router's own (`Router.revision_for_key`), compared user by user.
- `KubernetesPlatform` runs against kmock (helpers.py's FakeCluster and its KServe controller
  stand-in); the payload sink is a real process on 127.0.0.1 (conftest.py's `sink`), and `run_ab_test`
  with the same `ABTest` as locally decides from the outcomes posted to it. Users are routed by the
  stored VirtualService (no Envoy runs), and convert at their arm's rate.
"""

from __future__ import annotations

import inspect
import json
import random
import re
from pathlib import Path

import kmock
import pytest

from mlops_assets.core import http
from mlops_assets.core.rollout.ab import ABTest
from mlops_assets.core.rollout.strategies import PROMOTED, ROLLED_BACK, RolloutContext, run_ab_test
from mlops_assets.core.serving import kubernetes, mesh
from mlops_assets.core.serving.kubernetes import KubernetesPlatform
from mlops_assets.core.serving.manifest import ManifestError
from mlops_assets.core.serving.metrics import MetricsSource, RevisionCounts
from mlops_assets_tests.helpers import NAME, NS, VIRTUALSERVICES, FakeClock, FakeCluster, manifest_for, rev
from mlops_assets_tests.test_k8s_manifests import get, kustomized, objects, pods, rendered  # noqa: F401 - fixtures

SERVICES = kmock.resource("", "v1", "services")


# ---- the built objects ------------------------------------------------------------------------------
@pytest.mark.parametrize("percent", [None, 1, 10, 37, 50, 99])
def test_the_virtual_service_validates_against_istios_crd(vs_validator, percent):
    vs = mesh.build_ab_virtual_service(NAME, NS, percent)
    errors = [e.message for e in vs_validator.iter_errors(vs)]
    assert not errors, errors
    assert vs["apiVersion"] == "networking.istio.io/v1" and vs["kind"] == "VirtualService"
    # Bound where KServe binds its own VirtualService, routed to the gateway Knative serves routes on.
    assert vs["spec"]["gateways"] == ["knative-serving/knative-local-gateway", "mesh"]
    for route in vs["spec"]["http"]:
        assert [d["destination"]["host"] for d in route["route"]] == ["knative-local-gateway.istio-system.svc.cluster.local"]
        for match in route.get("match", []):
            for name in match["headers"]:
                assert name == name.lower()  # Istio requires lower-case header names in matches
    # The last route has no match: a request without a bucket gets Knative's per-request split.
    assert "match" not in vs["spec"]["http"][-1]
    assert vs["spec"]["http"][-1]["headers"]["request"]["set"]["Host"] == f"{NAME}-predictor.{NS}.svc.cluster.local"


def test_the_schema_really_rejects_a_broken_virtual_service(vs_validator):
    vs = mesh.build_ab_virtual_service(NAME, NS, 50)
    vs["spec"]["http"][0]["match"][0]["headers"][mesh.BUCKET_HEADER] = {"regex": "x", "exact": "y"}  # oneOf
    assert list(vs_validator.iter_errors(vs))
    vs = mesh.build_ab_virtual_service(NAME, NS, 50)
    vs["spec"]["http"][0]["route"][0]["weight"] = "all"
    assert list(vs_validator.iter_errors(vs))


def test_the_ab_service_is_a_valid_external_name_to_knatives_local_gateway():
    import kubernetes_validate

    service = mesh.build_ab_service(NAME, NS)
    kubernetes_validate.validate(service, "1.30.0", strict=True)
    assert service["spec"] == {
        "type": "ExternalName",
        "externalName": "knative-local-gateway.istio-system.svc.cluster.local",
        "sessionAffinity": "None",
    }
    assert (
        mesh.ab_host(NAME, NS)
        == f"{NAME}-ab.{NS}.svc.cluster.local"
        == mesh.build_ab_virtual_service(NAME, NS, 5)["spec"]["hosts"][0]
    )


@pytest.mark.parametrize("bad", [0, 100, 101, -1, True, 50.0, "50"])
def test_a_split_outside_1_to_99_is_refused(bad):
    with pytest.raises(ManifestError, match="integer 1-99"):
        mesh.build_ab_virtual_service(NAME, NS, bad)


# ---- one rule on both platforms ---------------------------------------------------------------------
def _router(percent: int, tmp_path: Path):
    from mlops_assets.servers.router import Router

    routes = {
        "revisions": {"b-rev": "http://127.0.0.1:1", "a-rev": "http://127.0.0.1:2"},
        # LocalPlatform's order during a split (platform._traffic): the latest ready revision first.
        "traffic": [{"revision": "b-rev", "percent": percent}, {"revision": "a-rev", "percent": 100 - percent}],
        "tags": {"latest": "b-rev", "prev": "a-rev"},
    }
    path = tmp_path / f"routes-{percent}.json"
    path.write_text(json.dumps(routes))
    return Router(NAME, path)


@pytest.mark.parametrize("percent", [1, 10, 37, 50, 90, 99])
def test_a_user_lands_in_the_same_arm_locally_and_at_the_mesh(tmp_path, percent):
    """The router's sticky rule (`revision_for_key`), the mesh's routes (the VirtualService's regexes over
    the bucket header) and the payload sink's attribution (`arm_of`) agree for every user; the share of
    users in B matches the split within binomial noise (4 sigma over 20,000 users)."""
    router = _router(percent, tmp_path)
    vs = mesh.build_ab_virtual_service(NAME, NS, percent)
    rng = random.Random(percent)
    keys = [f"user-{rng.getrandbits(64):x}" for _ in range(20_000)] + ["ü", "\udcff-not-utf8", "x" * 500]
    in_b = 0
    for key in keys:
        local = "b" if router.revision_for_key(key) == "b-rev" else "a"
        at_mesh = mesh.arm_for_request(vs, mesh.bucket_header(key))
        assert local == at_mesh == mesh.arm_of(mesh.user_bucket(key), percent), key
        assert mesh.arm_for_request(vs, mesh.bucket_header(key)) == at_mesh  # sticky: same user, same arm
        in_b += at_mesh == "b"
    n, p = len(keys), percent / 100
    assert abs(in_b - n * p) <= 4 * (n * p * (1 - p)) ** 0.5, (in_b, n * p)


def test_requests_without_a_well_formed_bucket_get_knatives_split():
    vs = mesh.build_ab_virtual_service(NAME, NS, 50)
    for headers in ({}, {mesh.BUCKET_HEADER: "12"}, {mesh.BUCKET_HEADER: "12345"}, {mesh.BUCKET_HEADER: "abcd"}):
        assert mesh.arm_for_request(vs, headers) is None, headers
    assert mesh.arm_for_request(vs, {"X-MLOPS-AB-BUCKET": "0042"}) == "b"  # header names are case-insensitive
    assert mesh.arm_for_request(mesh.build_ab_virtual_service(NAME, NS, None), {mesh.BUCKET_HEADER: "0042"}) is None


# ---- RBAC and policies --------------------------------------------------------------------------------
def test_rollout_role_grants_exactly_the_ab_calls(rendered):  # noqa: F811 - test_k8s_manifests' fixture
    """`_AbRouting`'s calls (`self._call("<verb>", <resource>, ...)`), AB_VERBS (named in its 403s) and Role
    mlops-rollout's rules on virtualservices and services are one set, in every kustomization."""
    source = inspect.getsource(kubernetes._AbRouting)
    called: dict[str, set[str]] = {}
    for verb, resource in re.findall(r'self\._call\(\s*"(\w+)",\s*("[\w.]+"|VS_RESOURCE)', source):
        resource = kubernetes.VS_RESOURCE if resource == "VS_RESOURCE" else resource.strip('"')
        called.setdefault(resource, set()).add(verb)
    assert called == {k: set(v) for k, v in kubernetes.AB_VERBS.items()}
    for what, verbs in kubernetes.AB_VERBS.items():
        assert f"{what}: {', '.join(verbs)}" in kubernetes.AB_ERRORS.rbac
    for name in ("base", "dev", "prod"):
        role = get(rendered[name], "Role", NS, "mlops-rollout")
        granted: dict[str, set[str]] = {}
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault(f"{resource}.{group}" if group else resource, set()).update(rule["verbs"])
        for what, verbs in kubernetes.AB_VERBS.items():
            assert granted.get(what) == set(verbs), f"{name}: {what} {sorted(granted.get(what, ()))}"


def test_outcome_endpoint_callers_pass_network_and_mesh_policies(rendered, pods):  # noqa: F811 - fixtures
    """The A/B runs (mlops-rollout, mlops-lifecycle run pods) declare tests, post and read outcomes at
    the sink; the predictors (the payload logger's identity) may not post outcomes; Prometheus reads
    only /metrics."""
    from mlops_assets_tests.test_k8s_manifests import authorization_allows, network_allows

    docs = rendered["base"]
    netpol, authz = objects(docs, "NetworkPolicy"), objects(docs, "AuthorizationPolicy")
    sink = pods["payload-sink"]
    calls = [
        ("PUT", f"/-/ab/{NAME}"),
        ("POST", f"/-/outcome/{NAME}"),
        ("GET", f"/-/outcomes/{NAME}"),
        ("DELETE", f"/-/ab/{NAME}"),
    ]
    runs = {sa: {**pods["run-worker"], "sa": sa} for sa in ("mlops/mlops-rollout", "mlops/mlops-lifecycle")}
    for sa, caller in runs.items():
        assert network_allows(netpol, caller, sink, 8080), sa
        for method, path in calls:
            assert authorization_allows(authz, caller, sink, 8080, method, path), (sa, method, path)
    for other in ("predictor", "prometheus", "intruder", "serving-other"):
        for method, path in calls:
            assert not authorization_allows(authz, pods[other], sink, 8080, method, path), (other, method, path)


# ---- the payload sink's outcome endpoint, a real process (conftest.py's `sink`) ------------------------
def _send(url: str, method: str, path: str, payload=None, body: bytes | None = None):
    response = http.request(f"{url}{path}", method=method, json_body=payload, body=body, timeout=10)
    return response.status, response.json()


def test_bad_outcomes_and_tests_get_a_4xx_that_says_why(sink):
    test = {"a": rev(1), "b": rev(2), "split_percent": 50}
    status, body = _send(sink, "POST", f"/-/outcome/{NAME}", {"user_key": "u1", "success": True})
    assert status == 404 and "no A/B test is running" in body["error"]
    assert _send(sink, "PUT", f"/-/ab/{NAME}", test)[0] == 200
    bad = {
        "unknown arm": ({"user_key": "u1", "success": True, "arm": "c"}, 400, "unknown arm 'c'"),
        "no user key": ({"success": True}, 400, '"user_key"'),
        "success not boolean": ({"user_key": "u1", "success": "yes"}, 400, '"success"'),
        "unknown field": ({"user_key": "u1", "success": True, "revenue": 3}, 400, "unknown fields"),
        "empty list": ([], 400, "no outcome"),
        "not an object": ([1], 400, "outcome 0 is not an object"),
    }
    for what, (payload, code, said) in bad.items():
        status, body = _send(sink, "POST", f"/-/outcome/{NAME}", payload)
        assert (status, said in body["error"]) == (code, True), (what, status, body)
    status, body = _send(sink, "POST", f"/-/outcome/{NAME}", body=b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = _send(sink, "POST", f"/-/outcome/{NAME}", body=b" " * (2 << 20))
    assert status == 413 and "limit" in body["error"]
    status, body = _send(sink, "POST", "/-/outcome/Not_A_Name", {"user_key": "u1", "success": True})
    assert status == 400 and "DNS-1035" in body["error"]
    wrong = "b" if mesh.arm_of(mesh.user_bucket("u1"), 50) == "a" else "a"
    status, body = _send(sink, "POST", f"/-/outcome/{NAME}", {"user_key": "u1", "success": True, "arm": wrong})
    assert status == 409 and "pinned to arm" in body["error"]
    for broken in ({**test, "split_percent": 0}, {**test, "b": test["a"]}, {"a": rev(1)}, {**test, "a": "Bad_Rev"}):
        status, body = _send(sink, "PUT", f"/-/ab/{NAME}", broken)
        assert status == 400 and body["error"], broken
    # Nothing bad was counted: a bad item in a list refuses the whole list.
    good, bad_item = {"user_key": "u2", "success": True}, {"user_key": "u3", "success": None}
    assert _send(sink, "POST", f"/-/outcome/{NAME}", [good, bad_item])[0] == 400
    assert _send(sink, "GET", f"/-/outcomes/{NAME}")[1]["revisions"] == {}


def test_outcomes_are_counted_per_arm_and_exposed_to_prometheus(sink):
    assert _send(sink, "PUT", f"/-/ab/{NAME}", {"a": rev(1), "b": rev(2), "split_percent": 30})[0] == 200
    outcomes = [{"user_key": f"u{i}", "success": i % 3 == 0} for i in range(300)]
    status, body = _send(sink, "POST", f"/-/outcome/{NAME}", outcomes)
    assert (status, body) == (200, {"recorded": 300})
    expected: dict[str, list[int]] = {}
    for o in outcomes:
        revision = rev(2) if mesh.arm_of(mesh.user_bucket(o["user_key"]), 30) == "b" else rev(1)
        expected.setdefault(revision, [0, 0])[0 if o["success"] else 1] += 1
    counts = _send(sink, "GET", f"/-/outcomes/{NAME}")[1]["revisions"]
    assert {r: [c["success"], c["failure"]] for r, c in counts.items()} == expected
    metrics = http.request(f"{sink}/metrics", timeout=10).text
    s, f = expected[rev(2)]
    assert f'mlops_ab_outcomes_total{{arm="b",isvc="{NAME}",outcome="success",revision="{rev(2)}"}} {float(s)}' in metrics
    assert f'mlops_ab_outcomes_total{{arm="b",isvc="{NAME}",outcome="failure",revision="{rev(2)}"}} {float(f)}' in metrics


# ---- a whole A/B test against kmock and the sink ----------------------------------------------------
class MeshUsers(MetricsSource):
    """Users arriving at the A/B host: each poll, `users` new users are routed by the VirtualService kmock
    stores (as Envoy would: `arm_for_request` over their bucket header), convert at their arm's rate and
    report the outcome to the payload sink. Request counts are the traffic's, with no errors."""

    sink_url: str
    users: int = 300
    rate_a: float = 0.10
    rate_b: float = 0.20
    seed: int = 11

    def model_post_init(self, _context) -> None:
        self._cluster, self._rng, self._n, self._routed = None, random.Random(self.seed), 0, []

    def attach(self, cluster: FakeCluster) -> MeshUsers:
        self._cluster = cluster
        return self

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        vs = self._cluster.run(lambda api: dict(api.objects[VIRTUALSERVICES, NS, mesh.ab_name(isvc)].raw))
        outcomes = []
        for _ in range(self.users):
            self._n += 1
            key = f"user-{self._n}"
            arm = mesh.arm_for_request(vs, mesh.bucket_header(key))
            self._routed.append((key, arm))
            if arm is not None:
                outcomes.append({"user_key": key, "success": self._rng.random() < (self.rate_b if arm == "b" else self.rate_a)})
        if outcomes:
            http.post_json(f"{self.sink_url}/-/outcome/{isvc}", outcomes, timeout=10)
        return {}

    def describe_query(self, isvc: str) -> str:
        return "users routed by the stored VirtualService, outcomes posted to the payload sink"


def _ab_run(cluster, platform, users: MeshUsers):
    platform.apply(manifest_for("1"))
    clock, events = FakeClock(), []
    ctx = RolloutContext(
        platform=platform,
        metrics=users.attach(cluster),
        isvc=NAME,
        emit=events.append,
        log=lambda _msg: None,
        poll_s=60.0,
        timeout_s=3600.0,
        clock=clock,
        sleep=clock.sleep,
    )
    result = run_ab_test(ctx, manifest_for("2"), ABTest(base_rate=0.10, lift=0.5), split_percent=50)
    return result, events


@pytest.mark.parametrize("b_is_better", [True, False])
def test_an_ab_test_on_the_cluster_concludes_with_the_local_statistics(sink, b_is_better):
    """`run_ab_test` with the same ABTest as locally: the mesh pins users (kmock stores the VirtualService the
    platform built), outcomes go to a real payload sink, and the test promotes B when B converts better and
    keeps A when A does. Ending the test resets the routes to Knative's split, traffic first on rollback."""
    with FakeCluster() as cluster:
        platform = KubernetesPlatform(host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=5, payload_sink_url=sink)
        rates = {"rate_a": 0.10, "rate_b": 0.20} if b_is_better else {"rate_a": 0.20, "rate_b": 0.10}
        users = MeshUsers(sink_url=sink, **rates)
        result, events = _ab_run(cluster, platform, users)
        assert result.outcome == (PROMOTED if b_is_better else ROLLED_BACK), result.reason
        assert result.evidence["recommendation"] == ("ship_b" if b_is_better else "keep_a")
        assert result.evidence["always_valid_p_value"] <= 0.05
        assert (result.candidate_revision, result.stable_revision) == (rev(2), rev(1))
        # The sink counted exactly what the users reported, per revision of their arm.
        counts = platform.ab_outcomes(NAME)
        assert sum(sum(c) for c in counts.values()) == sum(arm is not None for _, arm in users._routed)
        # The statistics saw the outcomes since the test began (the sink's counts, less the first look's).
        n_a, n_b = result.evidence["n_a"], result.evidence["n_b"]
        assert 0 < n_a <= sum(counts[rev(1)]) and 0 < n_b <= sum(counts[rev(2)])
        assert abs(n_b / (n_a + n_b) - 0.5) < 0.1
        # While the test ran every user was pinned; once it ended (the last looks), none was.
        arms = [arm for _, arm in users._routed]
        ended = arms.index(None)
        assert None not in arms[:ended] and set(arms[ended:]) == {None} and ended > len(arms) / 2

        def history(api):
            return [
                (o.get("metadata", {}).get("annotations", {}), o["spec"]["http"])
                for o in api.objects[VIRTUALSERVICES, NS, f"{NAME}-ab"].history
            ]

        versions = cluster.run(history)
        splits = [a.get("mlops-assets.dev/ab-split-percent") for a, _ in versions]
        assert splits[0] == "50" and splits[-1] == ""
        assert [r["name"] for r in versions[-1][1]] == ["split"]
        if not b_is_better:  # traffic first: every pinned user to A before the split changed
            assert [r["name"] for r in versions[-2][1]] == ["arm-a", "split"]
        stored = cluster.run(lambda api: dict(api.objects[SERVICES, NS, f"{NAME}-ab"].raw))
        assert stored["spec"]["type"] == "ExternalName"
        owner = stored["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("InferenceService", NAME)
        # The sink no longer attributes outcomes: the test is over.
        status = http.request(f"{sink}/-/outcome/{NAME}", json_body={"user_key": "late", "success": True}, timeout=10).status
        assert status == 404


def test_an_ab_test_without_the_payload_sink_is_refused_and_leaves_b_at_zero():
    with FakeCluster() as cluster:
        platform = KubernetesPlatform(host=cluster.url, namespace=NS, poll_s=0.01, ready_timeout_s=5)
        platform.apply(manifest_for("1"))
        clock = FakeClock()
        ctx = RolloutContext(
            platform=platform,
            metrics=MeshUsers(sink_url="http://127.0.0.1:9"),
            isvc=NAME,
            emit=lambda _e: None,
            log=lambda _m: None,
            clock=clock,
            sleep=clock.sleep,
        )
        with pytest.raises(kubernetes.KubernetesPlatformError, match="payload sink"):
            run_ab_test(ctx, manifest_for("2"), ABTest(base_rate=0.10, lift=0.5))
        assert platform.status(NAME).percent_of(rev(2)) == 0
