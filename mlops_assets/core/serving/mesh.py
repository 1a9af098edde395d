"""Sticky A/B assignment at the Istio mesh: the user-bucket rule, and the objects that route by it.

Why it is built this way
------------------------
* Knative splits traffic per request (`status.traffic[].percent`), so one user would see both arms
  of an A/B test. The local router pins a user by hashing the `x-user-key` header onto the split
  (servers/router.py `Router.revision_for_key`): point = blake2b-64(key) mod 10000 / 100, and the
  first traffic entry (the latest revision, B, at P%) takes the points below P. `user_bucket` and
  `arm_of` are that rule, to the bucket: a user is in B on both platforms iff its bucket < 100 * P.
* Envoy cannot hash a header, so the caller sends the bucket (`x-mlops-ab-bucket`, four digits,
  `user_bucket(key)`), and the mesh assigns arms by a regex over it: Istio's HTTPMatchRequest header
  match is an RE2 regex that must match the whole value (istio/api networking/v1alpha3/
  virtual_service.proto, `StringMatch.regex`; Envoy's HeaderMatcher `safe_regex_match`).
* Istio's consistent hashing cannot pick a revision: `DestinationRule.trafficPolicy.loadBalancer.
  consistentHash` hashes onto the endpoints of one destination host (istio/api networking/v1alpha3/
  destination_rule.proto, `ConsistentHashLB`: "consistent hashing to backend hosts"), while each
  Knative revision is a host of its own.
* A host of our own. The predictor host carries net-istio's VirtualServices, and the InferenceService
  host KServe's VirtualService bound to the `mesh` gateway (kserve/kserve pkg/controller/v1beta1/
  inferenceservice/reconcilers/ingress/ingress_reconciler.go, `createIngress`). Istio merges
  VirtualServices of one host only on gateways, never on `mesh` (istio.io analysis message IST0109,
  ConflictingMeshGatewayVirtualServiceHosts), and on gateways an older catch-all route would shadow
  ours. So the A/B entry point is `<isvc>-ab.<namespace>.svc.cluster.local`: an ExternalName Service
  to Knative's local gateway, exactly as KServe makes `<isvc>` (`reconcileExternalService` there),
  and a VirtualService on that host bound to the same gateways as KServe's (`knative-local-gateway`
  and `mesh`), whose routes set `Host` as KServe's do.
* Arms are Knative tag routes. With `serving.kserve.io/enable-tag-routing` KServe tags the traffic
  targets `latest` (B, the new revision) and `prev` (A, the rolled-out one), and Knative serves each
  tag on `<tag>-<route>` at the local gateway (knative/serving pkg/reconciler/route/domains/domains.go,
  HostnameFromTemplate; knative/docs docs/serving/using-subroutes.md). A request with no bucket header,
  or a malformed one, goes to the predictor host: Knative's per-request split, as without A/B.
* The objects outlive the test: callers keep one address. At promotion or rollback the routes are
  reset (`build_ab_virtual_service(..., percent=None)`): every user goes where Knative sends traffic.

Shadow traffic (`build_mirror_virtual_service`) uses the same host and object
-----------------------------------------------------------------------------
* Where the copy is made. Istio mirrors on an HTTPRoute (`mirror` + `mirrorPercentage`, istio/api
  networking/v1alpha3/virtual_service.proto: "the sidecar/gateway will not wait for the mirrored
  cluster to respond"), so the route must be one of ours, on our host, for the reason above: KServe
  rewrites its own VirtualService whole whenever it differs (`reconcileVirtualService`,
  `routeSemanticEquals`), and net-istio's routes for the predictor host come first on the gateways.
  The mesh route forwards to Knative's local gateway keeping our Host; at the gateway a second route
  sends the request on to Knative's split and mirrors it. So the copy leaves from the gateway's pod,
  the one caller the predictors' NetworkPolicy and AuthorizationPolicy already admit (k8s/base):
  mirroring from a caller's sidecar would need every caller admitted to every predictor.
* Where the copy goes: the candidate revision's own Kubernetes Service, `<revision>.<ns>.svc...:80`,
  which is where net-istio sends a split's share (knative-extensions/net-istio pkg/reconciler/ingress/
  resources/virtual_service.go, `makeVirtualServiceRoute`: destination `ServiceName` = the revision,
  knative/serving pkg/reconciler/route/resources/ingress.go). Not a Host Knative routes by: Istio
  1.27, the version KServe pins, still appends `-shadow` to a mirrored request's Host (istio/istio
  pilot/pkg/networking/core/route/route.go `TranslateRequestMirrorPolicy` sets
  `DisableShadowHostSuffixAppend` only from 1.28, flag DISABLE_SHADOW_HOST_SUFFIX), which no gateway
  route would match; a revision's Service does not look at Host.
* Which revision. While Knative's activator is in the path of the revision (scale from zero, burst
  capacity) it picks the revision by the `Knative-Serving-Revision` / `-Namespace` headers, so the
  route sets them. Envoy copies the request headers *after* the route's header operations and keeps
  `x-request-id` (envoyproxy/envoy source/common/router/router.cc `Filter::decodeHeaders`:
  `shadow_headers_` is made from the finalized downstream headers). The user's request goes on to
  the gateway, where net-istio *sets* those headers again for the revision Knative picks (`Set:
  split.AppendHeaders`), so the candidate's name never reaches the stable path.
* With a candidate at 0% Knative's split sends every user to the stable revision: users only ever get
  its answers. Ending a shadow is `build_ab_virtual_service(..., percent=None)` again.

The bound on copies in flight (`build_mirror_destination_rule`)
----------------------------------------------------------------
* Locally the router drops a copy when `max_in_flight` are waiting on the candidate. Envoy's mirror has
  no bound of its own; its circuit breakers are the mesh's equivalent: a DestinationRule's
  `connectionPool` (istio/api networking/v1alpha3/destination_rule.proto `ConnectionPoolSettings`; the
  fields as Istio 1.27.1 serves them: istio/istio manifests/charts/base/files/crd-all.gen.yaml at tag
  1.27.1). `http.http2MaxRequests` is "maximum number of active requests to a destination ... applicable
  to both HTTP/1.1 and HTTP2" (Envoy's `max_requests`); `http.http1MaxPendingRequests` the requests
  "queued while waiting for a ready connection pool connection" (`max_pending_requests`), set to 1, the
  least Istio passes on: it reads 0 as unset, i.e. 2^32-1 (istio/istio pilot/pkg/networking/core/
  cluster_traffic_policy.go `applyConnectionPool` and `getDefaultCircuitBreakerThresholds`). And
  `tcp.maxConnections` = max_in_flight, because older Envoys governed HTTP/1.1 clusters (a REST predictor's
  revision Service speaks HTTP/1.1) by connections, not requests (Envoy 1.6's circuit_breaking.rst; the
  comment in `applyConnectionPool` still says so). A copy over the bound is not queued: Envoy fails it
  at once (503, flag UO, counter `upstream_rq_pending_overflow` of the cluster; envoyproxy/envoy
  docs/root/intro/arch_overview/upstream/circuit_breaking.rst), and a mirror's failure never reaches
  the user.
* A subset, so that only copies are bounded. The limits sit on a subset `shadow` without labels (every
  endpoint of the revision's Service: its pods, or Knative's activator while that is in the path) and the
  mirror names that subset, so Envoy builds a cluster of its own for the copies (`outbound|80|shadow|
  <host>`, istio/istio pilot/pkg/networking/core/cluster_builder.go `buildSubsetCluster`; an empty label
  set selects every endpoint, pkg/config/labels/instance.go `SubsetOf`). User traffic that reaches the
  candidate's Service (an A/B arm, a canary step, the promotion) goes through the host's default cluster,
  which the rule leaves alone: a rule left behind by a crash can never throttle users.
* mTLS stays on. The rule sets no `tls`, at the top or in the subset (a subset's `tls` would replace the
  top's, istio/istio pilot/pkg/networking/util/util.go `mergeTrafficPolicy`). With no `tls`, Istio's auto
  mTLS sends ISTIO_MUTUAL to every endpoint with a sidecar (pilot/pkg/networking/core/cluster_tls.go
  `buildUpstreamTLSSettings`), which mlops-serving's STRICT PeerAuthentication requires, and plaintext
  only to an endpoint without one; an explicit ISTIO_MUTUAL would break copies to such an endpoint.
* The bound is per Envoy: each replica of Knative's local gateway admits `max_in_flight` copies (plus one
  waiting for a connection), so the candidate sees at most that times the gateway's replicas.
* Order: the rule before the mirror that names its subset (a mirror to an unknown subset has no cluster:
  its copies fail), and the mirror off before the rule goes.
"""

from __future__ import annotations

import hashlib
import re

from mlops_assets.core.serving.manifest import ManifestError, validate_dns1035

#: The header carrying a user's bucket, `user_bucket(user_key)` as four decimal digits.
BUCKET_HEADER = "x-mlops-ab-bucket"
BUCKETS = 10_000
#: KServe's `ingress.localGateway` / `localGatewayService` (k8s/base/kserve/inferenceservice-config.yaml).
LOCAL_GATEWAY = "knative-serving/knative-local-gateway"
LOCAL_GATEWAY_SERVICE = "knative-local-gateway.istio-system.svc.cluster.local"
MESH_GATEWAY = "mesh"
VS_API_VERSION = "networking.istio.io/v1"
ARMS = {"a": "prev", "b": "latest"}  # arm -> Knative tag of its revision
LABELS = {"app.kubernetes.io/part-of": "mlops-assets", "app.kubernetes.io/component": "ab-routing"}


def user_bucket(user_key: str) -> int:
    """The bucket (0-9999) of a user key: the local router's point on the split, times 100."""
    if not isinstance(user_key, str) or not user_key:
        raise ValueError(f"a user key is a non-empty string, got {user_key!r}")
    # surrogatepass: as the router, so a key that is not valid UTF-8 still has a bucket.
    digest = hashlib.blake2b(user_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def bucket_header(user_key: str) -> dict[str, str]:
    """The header a caller sends with each request of `user_key` to the A/B host."""
    return {BUCKET_HEADER: f"{user_bucket(user_key):04d}"}


def check_split(percent: int) -> int:
    """An A/B split is B's share of users in whole percent, 1-99 (both arms need users)."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
        raise ManifestError(f"an A/B split is B's share of users as an integer 1-99, got {percent!r}")
    return percent


def arm_of(bucket: int, percent: int) -> str:
    """ "b" (the latest revision) for buckets below 100 * percent, else "a" (the rolled-out one)."""
    return "b" if bucket < check_split(percent) * (BUCKETS // 100) else "a"


def _digit(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def percent_regex(lo: int, hi: int) -> str:
    """An RE2 regex matching the four-digit buckets of percents lo <= p < hi (0 <= lo < hi <= 100):
    the first two digits are the percent."""
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percent range [{lo}, {hi}) is empty or outside 0-100")
    parts, p = [], lo
    while p < hi:
        tens, unit = divmod(p, 10)
        if unit == 0 and hi - p >= 10:  # whole decades: [t1-t2][0-9]
            last = (hi - p) // 10 + tens - 1
            parts.append(f"{_digit(tens, last)}[0-9]")
            p = (last + 1) * 10
        else:  # the rest of this decade
            end = min(hi, (tens + 1) * 10) - 1
            parts.append(f"{tens}{_digit(unit, end % 10)}")
            p = end + 1
    head = parts[0] if len(parts) == 1 else f"({'|'.join(parts)})"
    return f"{head}[0-9]{{2}}"


def ab_host(isvc: str, namespace: str) -> str:
    return f"{ab_name(isvc)}.{namespace}.svc.cluster.local"


def ab_name(isvc: str) -> str:
    """The A/B Service and VirtualService of `isvc` (`<isvc>-ab`, a DNS-1035 label)."""
    return validate_dns1035(f"{validate_dns1035(isvc, 'InferenceService name')}-ab", "A/B routing name")


def _host_of(isvc: str, namespace: str, tag: str | None) -> str:
    route = f"{isvc}-predictor"  # KServe's Knative Service (constants.PredictorServiceName)
    return f"{f'{tag}-' if tag else ''}{route}.{namespace}.svc.cluster.local"


def _route(name: str, isvc: str, namespace: str, tag: str | None, regex: str | None) -> dict:
    route: dict = {"name": name}
    if regex is not None:
        route["match"] = [{"headers": {BUCKET_HEADER: {"regex": regex}}}]
    route["route"] = [{"destination": {"host": LOCAL_GATEWAY_SERVICE, "port": {"number": 80}}, "weight": 100}]
    # As KServe's own VirtualService: the local gateway picks Knative's route by Host.
    route["headers"] = {
        "request": {
            "set": {"Host": _host_of(isvc, namespace, tag), "x-mlops-ab-arm": name.removeprefix("arm-") if tag else "split"}
        }
    }
    return route


def build_ab_service(isvc: str, namespace: str) -> dict:
    """The ExternalName Service that gives the A/B host a DNS name, as KServe does for `<isvc>`."""
    validate_dns1035(namespace, "namespace")
    labels = {**LABELS, "serving.kserve.io/inferenceservice": isvc}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": ab_name(isvc), "namespace": namespace, "labels": labels},
        "spec": {"type": "ExternalName", "externalName": LOCAL_GATEWAY_SERVICE, "sessionAffinity": "None"},
    }


def build_ab_virtual_service(isvc: str, namespace: str, percent: int | None, only: str | None = None) -> dict:
    """The VirtualService on the A/B host: with `percent`, users whose bucket is below 100 * percent go
    to the `latest` tag (B), the others to `prev` (A); with None (no test running), every request goes
    to the predictor, Knative's split. A request without a well-formed bucket always gets the split.
    `only` ("a" or "b") sends every user with a bucket to that arm: the first step of ending a test,
    before Knative's split changes (traffic first)."""
    validate_dns1035(namespace, "namespace")
    routes = []
    if only is not None:
        if only not in ARMS:
            raise ValueError(f"unknown arm {only!r}: an A/B test has arms 'a' and 'b'")
        routes.append(_route(f"arm-{only}", isvc, namespace, ARMS[only], percent_regex(0, 100)))
    elif percent is not None:
        check_split(percent)
        routes.append(_route("arm-b", isvc, namespace, ARMS["b"], percent_regex(0, percent)))
        routes.append(_route("arm-a", isvc, namespace, ARMS["a"], percent_regex(percent, 100)))
    routes.append(_route("split", isvc, namespace, None, None))
    labels = {**LABELS, "serving.kserve.io/inferenceservice": isvc}
    annotations = {"mlops-assets.dev/ab-split-percent": "" if percent is None else str(percent)}
    return {
        "apiVersion": VS_API_VERSION,
        "kind": "VirtualService",
        "metadata": {"name": ab_name(isvc), "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"hosts": [ab_host(isvc, namespace)], "gateways": [LOCAL_GATEWAY, MESH_GATEWAY], "http": routes},
    }


#: Knative's activator picks a revision by these headers (knative/serving pkg/activator/activator.go).
REVISION_HEADER = "Knative-Serving-Revision"
REVISION_NAMESPACE_HEADER = "Knative-Serving-Namespace"
#: The route at the gateway that sends users on to Knative's split and mirrors their requests.
SHADOW_ROUTE = "shadow"
MIRROR_ANNOTATION = "mlops-assets.dev/mirror"
#: The mirror's destination: a subset of the candidate's Service carrying the in-flight bound.
MIRROR_SUBSET = "shadow"
DR_API_VERSION = "networking.istio.io/v1"
#: Copies that may wait for a connection beyond those in flight: 1, the least Istio does not read as "no limit".
MIRROR_MAX_PENDING = 1


def check_mirror_percent(percent: int) -> int:
    """A mirrored share is a whole percent 0-100 (0: mirroring off)."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ManifestError(f"mirror percent must be an integer 0-100, got {percent!r}")
    return percent


def revision_host(revision: str, namespace: str) -> str:
    """The Kubernetes Service Knative makes for a revision, where net-istio sends the revision's share."""
    return f"{validate_dns1035(revision, 'revision name')}.{validate_dns1035(namespace, 'namespace')}.svc.cluster.local"


def build_mirror_virtual_service(isvc: str, namespace: str, revision: str, percent: int) -> dict:
    """The VirtualService on the A/B host while a shadow runs: every request goes to Knative's split (the
    candidate has 0%, so users get the stable revision's answers) and `percent`% of them are copied, at
    Knative's local gateway, to `revision`'s own Service. The module docstring says why so."""
    if check_mirror_percent(percent) == 0:
        raise ManifestError("a mirror of 0% is no mirror: build_ab_virtual_service(isvc, namespace, None) ends one")
    mirror_host = revision_host(revision, namespace)
    gateway = {"host": LOCAL_GATEWAY_SERVICE, "port": {"number": 80}}
    to_gateway = {
        # Callers' sidecars: on to the gateway, our Host kept, so the gateway's route below applies there.
        "name": "to-gateway",
        "match": [{"gateways": [MESH_GATEWAY]}],
        "route": [{"destination": gateway, "weight": 100}],
    }
    shadow = {
        "name": SHADOW_ROUTE,
        "match": [{"gateways": [LOCAL_GATEWAY]}],
        "route": [{"destination": gateway, "weight": 100}],
        # The subset of build_mirror_destination_rule: the copies' own cluster, bounded in flight.
        "mirror": {"host": mirror_host, "subset": MIRROR_SUBSET, "port": {"number": 80}},
        "mirrorPercentage": {"value": float(percent)},
        "headers": {
            "request": {
                "set": {
                    "Host": _host_of(isvc, namespace, None),
                    REVISION_HEADER: revision,
                    REVISION_NAMESPACE_HEADER: namespace,
                    "x-mlops-ab-arm": "split",
                }
            }
        },
    }
    vs = build_ab_virtual_service(isvc, namespace, None)
    vs["metadata"]["annotations"][MIRROR_ANNOTATION] = f"{revision}:{percent}"
    vs["spec"]["http"] = [to_gateway, shadow]
    return vs


def shadow_limit_name(isvc: str) -> str:
    """The DestinationRule that bounds the copies in flight to the candidate of `isvc` (`<isvc>-shadow`)."""
    return validate_dns1035(f"{validate_dns1035(isvc, 'InferenceService name')}-shadow", "shadow limit name")


def check_max_in_flight(max_in_flight: int) -> int:
    """Copies in flight: a whole number 1 to 2^31-1 (Istio's int32 fields; Istio reads 0 as no limit at all)."""
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= 2**31 - 1:
        raise ManifestError(f"max_in_flight must be an integer 1 to 2^31-1 (copies in flight), got {max_in_flight!r}")
    return max_in_flight


def build_mirror_destination_rule(isvc: str, namespace: str, revision: str, max_in_flight: int) -> dict:
    """The DestinationRule on `revision`'s Service whose subset `shadow` (the mirror's destination) has at
    most `max_in_flight` requests in flight per Envoy and queues one more at most: Envoy's circuit breaker
    fails the excess copies at once. The module docstring says why each field, and why a subset."""
    validate_dns1035(namespace, "namespace")
    check_max_in_flight(max_in_flight)
    pool = {
        "tcp": {"maxConnections": max_in_flight},
        "http": {"http2MaxRequests": max_in_flight, "http1MaxPendingRequests": MIRROR_MAX_PENDING},
    }
    labels = {**LABELS, "app.kubernetes.io/component": "shadow", "serving.kserve.io/inferenceservice": isvc}
    return {
        "apiVersion": DR_API_VERSION,
        "kind": "DestinationRule",
        "metadata": {
            "name": shadow_limit_name(isvc),
            "namespace": namespace,
            "labels": labels,
            "annotations": {MIRROR_ANNOTATION: f"{revision}:max-in-flight={max_in_flight}"},
        },
        "spec": {
            "host": revision_host(revision, namespace),
            # No `tls` anywhere: auto mTLS (ISTIO_MUTUAL to sidecars) stays in force.
            "subsets": [{"name": MIRROR_SUBSET, "trafficPolicy": {"connectionPool": pool}}],
        },
    }


def shadow_limit_of(destination_rule: dict | None) -> tuple[str, int] | None:
    """(revision, max_in_flight) a DestinationRule built here bounds the copies to, or None."""
    spec = (destination_rule or {}).get("spec") or {}
    for subset in spec.get("subsets") or []:
        if subset.get("name") == MIRROR_SUBSET and spec.get("host"):
            http = (((subset.get("trafficPolicy") or {}).get("connectionPool") or {}).get("http")) or {}
            if "http2MaxRequests" in http:
                return spec["host"].split(".", 1)[0], int(http["http2MaxRequests"])
    return None


def mirror_of(virtual_service: dict | None) -> tuple[str, int] | None:
    """(revision, percent) a VirtualService built here mirrors to, or None."""
    for route in ((virtual_service or {}).get("spec") or {}).get("http") or []:
        mirror = route.get("mirror")
        if route.get("name") == SHADOW_ROUTE and mirror:
            percent = (route.get("mirrorPercentage") or {}).get("value", 100.0)
            return mirror["host"].split(".", 1)[0], int(round(float(percent)))
    return None


def arm_for_request(virtual_service: dict, headers: dict[str, str]) -> str | None:
    """The arm ("a", "b") a request with `headers` is routed to by `virtual_service`, or None for
    Knative's per-request split: the first route whose header regexes all match the whole value, as
    Envoy evaluates them (a route without `match` matches every request)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for route in virtual_service["spec"]["http"]:
        for match in route.get("match") or [{}]:
            wanted = match.get("headers") or {}
            if all(k in lowered and re.fullmatch(m["regex"], lowered[k]) for k, m in wanted.items()):
                return {"arm-a": "a", "arm-b": "b"}.get(route["name"])
    return None


def parse_outcomes(body: object) -> list[tuple[str, bool, str | None]]:
    """`{"user_key": str, "success": bool[, "arm": "a"|"b"]}` or a list of them (the router's
    `/-/feedback` body, plus the arm the caller believes the user is in): [(key, success, arm)].
    ValueError says what is wrong with the first bad item."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ValueError("no outcome given: send an object or a non-empty list of them")
    parsed = []
    for i, item in enumerate(items):
        where = f"outcome {i}" if isinstance(body, list) else "the outcome"
        if not isinstance(item, dict):
            raise ValueError(f'{where} is not an object: each is {{"user_key": str, "success": bool}}')
        unknown = set(item) - {"user_key", "success", "arm"}
        if unknown:
            raise ValueError(f"{where} has unknown fields {sorted(unknown)}: it takes user_key, success and arm")
        key, success, arm = item.get("user_key"), item.get("success"), item.get("arm")
        if not isinstance(key, str) or not key:
            raise ValueError(f'{where} needs a non-empty string "user_key", got {key!r}')
        if not isinstance(success, bool):
            raise ValueError(f'{where} needs a boolean "success", got {success!r}')
        if arm is not None and arm not in ARMS:
            raise ValueError(f'{where}: unknown arm {arm!r}; an A/B test has arms "a" (rolled out) and "b" (new)')
        parsed.append((key, success, arm))
    return parsed
