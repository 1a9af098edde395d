"""`KubernetesPlatform`: the `ServingPlatform` interface over KServe InferenceServices in a cluster.

Why it is built this way
------------------------
* One contract. The dict from `build_inference_service` is what gets sent: `apply` creates it
  (POST) or merge-patches the live object towards it, and every traffic change the rollout code
  makes (`set_canary_percent`, `promote`, `rollback`) is a merge-patch of
  `spec.predictor.canaryTrafficPercent`. So `run_canary` and friends run unchanged against this
  platform and against `LocalPlatform`.
* Merge-patch, not replace. The live object may carry fields only the cluster needs (the
  `serviceAccountName`, probes and security context of k8s/base/serving); a merge-patch of the
  manifest's keys keeps them. A `canaryTrafficPercent` absent from the manifest is sent as null,
  because removing it is how KServe promotes.
* KServe's controller owns `status`; this class only reads it. `apply` returns once the status shows
  what was asked (Ready, the new revision ready, the traffic split as requested, the promotion done)
  and raises at a deadline with the conditions' messages. It polls with GET rather than watching:
  a wait is short, and a poll survives API-server restarts and proxies that cut watch streams.
* Model versions per revision. KServe keeps no per-revision annotations, and it copies the
  InferenceService's annotations into the Knative revision template (minus the ConfigMap's
  `serviceAnnotationDisallowedList`), so *writing an annotation cuts a new revision*. A record
  written after a revision appears would therefore create another revision, forever. The record
  (`mlops-assets.dev/revisions`: revision -> model version, storage URI, run id, predictor spec and
  provenance annotations) is instead written only inside patches that change the template anyway:
  when revision N+1 is cut, revision N is recorded; the newest revision is described by the live
  object itself. The recorded predictor spec is also what a rollback after a promotion re-applies
  (no separate "previous spec" annotation, which would have to be written at promotion time and
  would itself cut a revision).
* Rollback. During a canary it is `canaryTrafficPercent: 0` (KServe's documented rollback). After a
  promotion the previous revision is only `previousRolledoutRevision` in the status, so the
  recorded spec of that revision is re-applied: a new revision serving the old model takes all
  traffic. That works whatever the controller version; we do not rely on the two-pass handling of
  `canaryTrafficPercent: 0` after a promotion that some KServe versions have.
* Namespace. The platform's namespace wins over the manifest's: the rollout ServiceAccount has
  rights in that namespace only (k8s/base/rbac), and `status(name)` must find what `apply` made.
* A/B tests pin users at the mesh. Knative splits per request; `start_ab_test` adds an Istio
  VirtualService on the A/B host `<isvc>-ab` that routes each user's bucket to the `latest` (B) or
  `prev` (A) tag route by the local router's rule (core/serving/mesh.py says why it is built so), and
  declares the test to the payload sink, whose `/-/outcome/<isvc>` attributes outcomes to arms;
  `ab_outcomes` reads the counts back. Ending a test is traffic first: a rollback first sends every
  user to A, then sets the split; both promotion and rollback then reset the VirtualService to
  Knative's split. The A/B Service and VirtualService are owned by the InferenceService (an
  ownerReference), so Kubernetes deletes them with it and the platform needs no delete verb on them.
* Shadow traffic on the same objects. `set_mirror` turns the A/B host's VirtualService into one that
  copies a share of requests, at Knative's local gateway, to the candidate revision's Service
  (`mesh.build_mirror_virtual_service`; mesh.py says why there), and `set_mirror(name, 0)` resets it to
  Knative's split: "removing" is a patch, so the calls on it (and Role mlops-rollout's) stay the A/B ones.
  Envoy discards the mirrored answers, so they are captured where KServe already sends them: its
  payload logger, on both revisions, to the payload sink. With `shadow_capture` the logger logs
  answers too (mode `all`) and each request's `X-Request-Id` (`metadataHeaders`), which Envoy keeps
  on the copy; the sink pairs the stable and candidate events of one request id, and
  `shadow_pairs` reads the pairs in the local router's `/-/shadow` format (servers/payload_sink.py).
  Both revisions must have been cut with the capture on: `set_mirror` checks and says so, and
  `shadow_pairs` then raises NotImplementedError, which blue-green reads as "validate without
  mirroring". Rollback, promotion and a new A/B test stop mirroring first (traffic first: a
  rolled-back candidate gets no copies).
* The copies in flight are bounded as locally. Envoy's mirror is fire-and-forget and has no bound of its
  own, so `set_mirror` first applies a DestinationRule `<isvc>-shadow` on the candidate's Service whose
  subset `shadow`, the mirror's destination, allows `max_in_flight` requests in flight and one waiting per
  gateway Envoy; Envoy's circuit breaker fails the excess copies at once
  (`mesh.build_mirror_destination_rule`; mesh.py says why each field, and why a subset: users' traffic to
  the candidate never passes through the limit). Stopping deletes it after the mirror is off. It is owned
  by the InferenceService like the A/B objects; a rule left behind by a crash bounds only the subset no
  route then uses, and the next shadow patches it. Its calls are `SHADOW_VERBS`, which Role
  mlops-rollout grants.
* Errors say what to do: 403 names the missing RBAC verb, a missing API group says KServe is not
  installed, a missing object is `UnknownServiceError`, an unreachable server names the host.

`kubernetes` is imported inside methods, so loading the code location never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from mlops_assets.core import http
from mlops_assets.core.kube import ApiErrors, ApiTarget, KubeApi, kube_api
from mlops_assets.core.serving import mesh
from mlops_assets.core.serving.lock import LockInfo, RolloutInProgressError, RolloutLock, refusal
from mlops_assets.core.serving.manifest import (
    ANNOTATION_PREFIX,
    API_VERSION,
    KIND,
    ManifestError,
    check_inference_service,
    validate_dns1035,
)
from mlops_assets.core.serving.platform import RolloutStateError, ServiceStatus, ServingPlatform, UnknownServiceError
from mlops_assets.core.settings import SHADOW_MAX_IN_FLIGHT

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "inferenceservices"
CANARY = "canaryTrafficPercent"
MODEL_VERSION = f"{ANNOTATION_PREFIX}/model-version"
RUN_ID = f"{ANNOTATION_PREFIX}/mlflow-run-id"
REVISIONS = f"{ANNOTATION_PREFIX}/revisions"
ROLLED_BACK_FROM = f"{ANNOTATION_PREFIX}/rolled-back-from"
ROLLOUT_OWNER = f"{ANNOTATION_PREFIX}/rollout"  # on the rollout Lease: the LockInfo of the owner
# Written by the platform itself, never part of the deployment contract `manifest()` returns.
BOOKKEEPING = (REVISIONS, ROLLED_BACK_FROM)
# Left out of template comparisons and of `manifest()`: the bookkeeping changes only together with
# a template change, and kubectl's last-applied annotation is in KServe's default
# `serviceAnnotationDisallowedList`, so it never reaches the revision template.
IGNORED_ANNOTATIONS = (*BOOKKEEPING, "kubectl.kubernetes.io/last-applied-configuration")
# Older revisions beyond this are dropped from the record (annotations are limited to 256 KiB).
MAX_RECORDED_REVISIONS = 10
VERBS = "get, list, create, patch and delete"
#: The payload sink's Service in the cluster (k8s/base/serving/payload-sink.yaml).
PAYLOAD_SINK_URL = "http://payload-sink.mlops-serving.svc.cluster.local"
#: k8s/base/rbac/service-accounts.yaml: carries the S3 Secret KServe's storage initializer reads MinIO with.
KSERVE_SERVICE_ACCOUNT = "kserve-s3"
#: k8s/base/platform/mlflow.yaml: --artifacts-destination of the MLflow server.
ARTIFACTS_DESTINATION = "s3://mlflow"
#: The header KServe's payload logger passes on as event metadata for shadow pairing. Go canonicalizes
#: header names and the logger compares them exactly (kserve/kserve pkg/logger/handler.go, ServeHTTP).
REQUEST_ID_HEADER = "X-Request-Id"


class KubernetesPlatformError(RuntimeError):
    """The cluster refused or failed a request; the message says what to do about it."""


class KubernetesPermissionError(KubernetesPlatformError):
    """403: the ServiceAccount lacks an RBAC verb on inferenceservices."""


class KServeNotInstalledError(KubernetesPlatformError):
    """The API server has no serving.kserve.io/v1beta1 InferenceService resource."""


class KubernetesUnreachableError(KubernetesPlatformError):
    """The API server did not answer (connection refused, DNS, TLS, timeout)."""


class KubernetesConflictError(KubernetesPlatformError):
    """409: the object changed (or appeared) between our read and our write."""


class ServiceNotReadyError(KubernetesPlatformError):
    """The InferenceService did not reach the requested state before the deadline."""


def _errors(rbac: str) -> ApiErrors:
    return ApiErrors(KubernetesPlatformError, KubernetesUnreachableError, KubernetesPermissionError, rbac)


ISVC_ERRORS = _errors(f"see k8s/base/rbac; this platform uses {VERBS}")
LEASE_ERRORS = _errors("Role mlops-rollout in k8s/base/rbac/roles.yaml")
VS_RESOURCE = "virtualservices.networking.istio.io"
#: The calls `_AbRouting` makes; Role mlops-rollout grants exactly these (test_cluster_ab checks both).
AB_VERBS = {VS_RESOURCE: ("get", "create", "patch"), "services": ("get", "create")}
AB_ERRORS = _errors(
    "Role mlops-rollout in k8s/base/rbac/roles.yaml: "
    + "; ".join(f"{what}: {', '.join(verbs)}" for what, verbs in AB_VERBS.items())
)
DR_RESOURCE = "destinationrules.networking.istio.io"
#: The calls `_ShadowLimit` makes; Role mlops-rollout grants exactly these (test_cluster_shadow checks both).
SHADOW_VERBS = {DR_RESOURCE: ("get", "create", "patch", "delete")}
SHADOW_ERRORS = _errors(
    "Role mlops-rollout in k8s/base/rbac/roles.yaml: "
    + "; ".join(f"{what}: {', '.join(verbs)}" for what, verbs in SHADOW_VERBS.items())
)


@dataclass(frozen=True)
class _Expectation:
    """What `apply` waits for, in KServe's terms."""

    new_revision: bool  # the revision template changed, so a new revision must appear
    created_before: str | None  # latestCreatedRevision before the change
    canary: int | None  # spec.predictor.canaryTrafficPercent after the change


class KubernetesPlatform(ServingPlatform):
    """KServe semantics on a Kubernetes cluster: InferenceServices through the API server."""

    in_cluster: bool = True  # use the pod's ServiceAccount token
    kubeconfig: str = ""  # with in_cluster=False: this kubeconfig file ("" = the default one)
    kube_context: str = ""  # with in_cluster=False: this context ("" = the current one)
    host: str = ""  # an explicit API server URL without credentials (kubectl proxy, tests); wins over the above
    ready_timeout_s: float = 300.0
    poll_s: float = 2.0
    request_timeout_s: float = 30.0
    # The payload sink (serving/payload_sink.py) that KServe's payload logger sends requests to, and that holds
    # the drift gauges ("" = no payload logging: drift reports cannot run). PAYLOAD_SINK_URL in the cluster.
    payload_sink_url: str = ""
    payload_store: str = ""  # where the sink writes its batches: wire.store_for(the MLflow tracking URI)
    recent_window_s: float = 3600.0
    # The ServiceAccount whose Secret gives KServe's storage initializer read access to the models ("" = none).
    service_account: str = ""
    # Where MLflow's artifact proxy (`--serve-artifacts`) stores artifacts: model URIs MLflow hands out as
    # mlflow-artifacts:/<path> are given to KServe as <artifacts_destination>/<path>, which it can read.
    artifacts_destination: str = ""
    # KServe's payload logger also logs answers and each request's X-Request-Id, so that shadow runs can pair
    # the stable and candidate answers of one mirrored request (set_mirror). Every revision cut while it is on
    # can take part in a shadow; turning it on cuts a new revision at the next apply.
    shadow_capture: bool = False

    # ---- the interface ------------------------------------------------------------------------
    def apply(self, manifest: dict) -> ServiceStatus:
        manifest = self._for_cluster(check_inference_service(manifest))
        with self._api() as api:
            return self._apply(api, manifest)

    def _for_cluster(self, manifest: dict) -> dict:
        """What this cluster adds to the platform-neutral manifest (idempotent: a re-applied manifest is unchanged)."""
        manifest = copy.deepcopy(manifest)
        predictor = manifest["spec"]["predictor"]
        if self.payload_sink_url and "logger" not in predictor:
            # KServe's payload logger: every request, as a CloudEvent, to the sink (the drift reports' data).
            predictor["logger"] = {"mode": "request", "url": self.payload_sink_url}
            if self.shadow_capture:  # and every answer, with the request id that pairs a mirrored copy with it
                predictor["logger"].update(mode="all", metadataHeaders=[REQUEST_ID_HEADER])
        if self.service_account and "serviceAccountName" not in predictor:
            predictor["serviceAccountName"] = self.service_account
        model = predictor["model"]
        if model["storageUri"].startswith("mlflow-artifacts:"):
            if not self.artifacts_destination:
                # KServe's storage initializer has no mlflow-artifacts scheme: it would read the URI as a
                # relative path and the predictor would crash-loop. Refuse before anything is created.
                raise ManifestError(
                    f"storage URI {model['storageUri']!r} is MLflow's artifact proxy, which KServe cannot read; set "
                    "KubernetesPlatform.artifacts_destination to the bucket behind the proxy "
                    "(resources.py sets s3://mlflow, the MinIO bucket of k8s/)"
                )
            model["storageUri"] = proxied_to_destination(model["storageUri"], self.artifacts_destination)
        return manifest

    def recent_payloads(self, name: str, columns: list[str], max_rows: int = 200_000):
        """The requests the payload sink stored in the last `recent_window_s` (newest last, at most `max_rows`)."""
        import tempfile

        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        from mlops_assets.core.serving.payloads import rows_frame, rows_from_lines

        validate_dns1035(name, "InferenceService name")
        if not self.payload_sink_url or not self.payload_store:
            raise NotImplementedError("payload logging is off (KubernetesPlatform.payload_sink_url / payload_store are empty)")
        # Ask the sink to write what it buffers, so the report sees every sampled request so far.
        with contextlib.suppress(http.HttpUnavailableError):
            http.request(f"{self.payload_sink_url}/-/flush", method="POST", body=b"", timeout=30)
        since = time.time() - self.recent_window_s
        location = f"{self.payload_store.rstrip('/')}/{name}"
        try:
            repo = get_artifact_repository(location)
            batches = []
            for info in repo.list_artifacts():
                stem = info.path.rsplit("/", 1)[-1].split("-", 1)[0]
                if not info.is_dir and stem.isdigit() and int(stem) / 1000 >= since:
                    batches.append((int(stem), info.path.rsplit("/", 1)[-1]))
            rows: list[dict] = []
            with tempfile.TemporaryDirectory() as tmp:
                for _, batch in sorted(batches, reverse=True):  # newest first, until max_rows
                    path = repo.download_artifacts(batch, dst_path=tmp)
                    with open(path, "rb") as handle:
                        rows[:0] = rows_from_lines(handle, columns, since)
                    if len(rows) >= max_rows:
                        break
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for an unreachable or refusing store
            raise KubernetesPlatformError(
                f"cannot read the payload log of {name} from {location} (MLflow's artifact proxy): {type(exc).__name__}: {exc}"
            ) from exc
        return rows_frame(rows, columns, max_rows)

    def publish_drift(self, name: str, share: float, scores: dict[str, float]) -> None:
        validate_dns1035(name, "InferenceService name")
        if not self.payload_sink_url:
            raise NotImplementedError("no payload sink to hold the drift gauges (payload_sink_url is empty)")
        try:
            http.post_json(f"{self.payload_sink_url}/-/drift/{name}", {"share": share, "features": scores}, timeout=30)
        except http.HttpUnavailableError as exc:
            raise RuntimeError(f"the payload sink at {self.payload_sink_url} did not take the drift gauges: {exc}") from exc

    def status(self, name: str) -> ServiceStatus:
        with self._api() as api:
            return _service_status(api.get(name))

    def manifest(self, name: str) -> dict:
        with self._api() as api:
            return _manifest_of(api.get(name))

    def list_services(self) -> list[str]:
        with self._api() as api:
            return sorted(item["metadata"]["name"] for item in api.list_all())

    def delete(self, name: str) -> None:
        with self._api() as api:
            api.delete(name)
            # KServe's finalizer removes the object once the Knative services are gone; wait for it
            # so that a following `apply` creates afresh instead of patching a terminating object.
            deadline = time.monotonic() + self.ready_timeout_s
            while api.get(name, missing_ok=True) is not None:
                if time.monotonic() >= deadline:
                    raise KubernetesPlatformError(
                        f"InferenceService {name} in {self.namespace} is still terminating after {self.ready_timeout_s:.0f}s: "
                        "check its finalizers and the KServe controller's log"
                    )
                time.sleep(self.poll_s)

    def rollout_lock(self, name: str) -> LeaseRolloutLock:
        return LeaseRolloutLock(self, validate_dns1035(name, "InferenceService name"))

    # ---- A/B tests: users pinned at the mesh, outcomes at the payload sink ----------------------------
    def start_ab_test(self, name: str, a: str, b: str, percent: int) -> None:
        """Pin users to arms (B = revision `b` for buckets below 100 * `percent`, A = `a`) on the A/B
        host, and declare the test to the payload sink that attributes outcomes by the same rule."""
        mesh.check_split(percent)
        if not self.payload_sink_url:
            raise KubernetesPlatformError(
                f"{name}: an A/B test needs the payload sink for its outcomes (KubernetesPlatform.payload_sink_url is empty)"
            )
        # One rollout at a time holds the lock, so a mirror still on was left behind: stop it properly, or the A/B
        # routes would replace it unannounced (the sink still pairing, the shadow's DestinationRule left over).
        self._stop_mirror(name)
        with self._api() as api:
            routing = _AbRouting(api, name)
            routing.ensure(api.get(name), mesh.build_ab_virtual_service(name, self.namespace, percent))
        self._sink("PUT", f"/-/ab/{name}", {"a": a, "b": b, "split_percent": percent})

    def ab_outcomes(self, name: str) -> dict[str, tuple[int, int]]:
        """Cumulative A/B outcomes per revision, (successes, failures), as the payload sink counted them."""
        body = self._sink("GET", f"/-/outcomes/{validate_dns1035(name, 'InferenceService name')}")
        try:
            return {rev: (int(c["success"]), int(c["failure"])) for rev, c in body["revisions"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise KubernetesPlatformError(f"the payload sink answered A/B outcomes of {name} malformed: {exc!r}") from exc

    def _sink(self, method: str, path: str, payload: dict | None = None) -> dict:
        try:
            response = http.request(f"{self.payload_sink_url}{path}", method=method, json_body=payload, timeout=30).checked()
            return json.loads(response.body or b"{}")
        except (http.HttpUnavailableError, OSError, ValueError) as exc:
            raise KubernetesPlatformError(f"the payload sink at {self.payload_sink_url} failed {method} {path}: {exc}") from exc

    def _end_ab_test(self, name: str, only: str | None) -> bool:
        """With `only`, send every user of a running A/B test to that arm; without, reset the routes to
        Knative's split and end the test at the sink. False when no test is running on `name`."""
        with self._api() as api:
            routing = _AbRouting(api, name)
            if not routing.running():
                return False
            routing.patch(mesh.build_ab_virtual_service(name, self.namespace, None, only=only))
        if only is None:
            with contextlib.suppress(KubernetesPlatformError):  # the routes are reset; the sink's record is moot
                self._sink("DELETE", f"/-/ab/{name}")
        return True

    # ---- shadow traffic: mirrored at the mesh, pairs joined at the payload sink ---------------------------
    def set_mirror(self, name: str, percent: int, max_in_flight: int = SHADOW_MAX_IN_FLIGHT) -> ServiceStatus:
        """Mirror `percent`% of the requests to the A/B host to the candidate (the latest ready revision, not
        rolled out) and have the payload sink pair their answers; 0 stops. At most `max_in_flight` copies are in
        flight from each Envoy of Knative's local gateway (where the copies are made), plus one waiting for a
        connection: the DestinationRule `<isvc>-shadow` sets Envoy's circuit breaker on the copies' own subset,
        which fails the excess at once (the local router drops it: the same bound, per gateway replica)."""
        mesh.check_mirror_percent(percent)
        if percent == 0:
            self._stop_mirror(name)
            return self.status(name)
        mesh.check_max_in_flight(max_in_flight)
        self._check_pairing()
        with self._api() as api:
            live = api.get(name)
            status = _service_status(live)
            candidate, stable = status.latest_ready, status.latest_rolledout
            if candidate is None or stable is None or candidate == stable:
                raise RolloutStateError(f"{name} has no candidate revision to mirror to (latest ready is rolled out)")
            _check_capture(live, candidate, stable)
            routing = _AbRouting(api, name)
            if routing.running():
                raise RolloutStateError(f"{name}: an A/B test pins users on {routing.name}; a shadow cannot share its routes")
            # The sink first, so that the first mirrored copy already has its stable answer to be paired with; the
            # bound before the mirror that names its subset (a mirror to a subset not yet defined loses its copies).
            self._sink("PUT", f"/-/shadow/{name}", {"stable": stable, "candidate": candidate, "percent": percent})
            bound = mesh.build_mirror_destination_rule(name, self.namespace, candidate, max_in_flight)
            _ShadowLimit(api, name).ensure(live, bound)
            routing.ensure(live, mesh.build_mirror_virtual_service(name, self.namespace, candidate, percent))
        mirror = {"revision": candidate, "percent": percent, "max_in_flight": max_in_flight}
        return replace(status, mirror=mirror)

    def shadow_pairs(self, name: str, since: int = 0) -> dict:
        """The mirrored requests the payload sink paired after `since` (the local router's `/-/shadow` body)."""
        validate_dns1035(name, "InferenceService name")
        self._check_pairing()
        with self._api() as api:
            live = api.get(name)
            status = _service_status(live)
            if status.latest_ready and status.latest_rolledout and status.latest_ready != status.latest_rolledout:
                try:
                    _check_capture(live, status.latest_ready, status.latest_rolledout)
                except RolloutStateError as exc:  # strategies that can do without mirroring (blue-green) then do
                    raise NotImplementedError(str(exc)) from exc
        return self._sink("GET", f"/-/shadow/{name}?since={int(since)}")

    def _check_pairing(self) -> None:
        """NotImplementedError (what the strategies read as "this platform cannot mirror") unless answers are paired."""
        if not self.payload_sink_url or not self.shadow_capture:
            raise NotImplementedError(
                "mirrored answers are paired by the payload sink from KServe's payload logger: set "
                "KubernetesPlatform.payload_sink_url and shadow_capture (then deploy the stable revision with it)"
            )

    def _stop_mirror(self, name: str) -> bool:
        """Reset the routes to Knative's split if they mirror, then delete the bound on the copies and end the sink's
        pairing. False if they did not mirror (then nothing is touched: a left-over bound limits no user)."""
        with self._api() as api:
            routing = _AbRouting(api, name)
            if mesh.mirror_of(routing.virtual_service()) is None:
                return False
            routing.patch(mesh.build_ab_virtual_service(name, self.namespace, None))
            _ShadowLimit(api, name).remove()  # after the mirror is off: no copy ever goes unbounded
        with contextlib.suppress(KubernetesPlatformError):  # the copies have stopped; the sink's record is moot
            self._sink("DELETE", f"/-/shadow/{name}")
        return True

    def promote(self, name: str) -> ServiceStatus:
        self._stop_mirror(name)  # the candidate becomes the stable revision: nothing left to compare
        status = super().promote(name)
        self._end_ab_test(name, None)
        return status

    def rollback(self, name: str) -> ServiceStatus:
        self._stop_mirror(name)  # traffic first: a rolled-back candidate gets no copies either
        testing = self._end_ab_test(name, "a")  # traffic first: every pinned user to A before the split moves
        status = self._rollback(name)
        if testing:
            self._end_ab_test(name, None)
        return status

    def _rollback(self, name: str) -> ServiceStatus:
        with self._api() as api:
            live = api.get(name)
            status = _service_status(live)
            if status.latest_ready and status.latest_rolledout and status.latest_ready != status.latest_rolledout:
                # A canary: KServe's own rollback, all traffic back to the rolled-out revision.
                api.patch(name, {"spec": {"predictor": {CANARY: 0}}})
                return self._wait(api, name, _Expectation(False, status.latest_created, 0))
            previous = status.previous_rolledout
            if not previous:
                raise RolloutStateError(f"{name} has no canary and no previous rolled-out revision to roll back to")
            annotations = live["metadata"].get("annotations") or {}
            if annotations.get(ROLLED_BACK_FROM) == previous:
                raise RolloutStateError(
                    f"{name} was already rolled back from {previous}; there is no earlier rolled-out revision to go back to"
                )
            entry = _read_record(annotations).get(previous) or {}
            if not entry.get("predictor"):
                raise RolloutStateError(
                    f"{name}: no recorded spec for the previous rolled-out revision {previous} "
                    f"(no {REVISIONS} entry); re-apply that model version's manifest instead"
                )
            # After a promotion KServe cannot send traffic back by percent: re-apply the spec the
            # previous revision was cut from, with its provenance annotations (model version, run).
            manifest = _manifest_of(live)
            manifest["spec"]["predictor"] = copy.deepcopy(entry["predictor"])
            manifest["metadata"].setdefault("annotations", {}).update(entry.get("annotations") or {})
            return self._apply(api, manifest, exact_predictor=True, rolled_back_from=status.latest_rolledout)

    # ---- apply and wait -----------------------------------------------------------------------
    def _apply(
        self, api: _Api, manifest: dict, exact_predictor: bool = False, rolled_back_from: str | None = None
    ) -> ServiceStatus:
        manifest["metadata"]["namespace"] = self.namespace
        name = manifest["metadata"]["name"]
        for _attempt in range(3):
            live = api.get(name, missing_ok=True)
            try:
                if live is None:
                    api.create(_creation_body(manifest))
                    expect = _Expectation(True, None, manifest["spec"]["predictor"].get(CANARY))
                else:
                    patch, expect = _patch_for(live, manifest, exact_predictor, rolled_back_from)
                    if patch:
                        api.patch(name, patch)
            except KubernetesConflictError:
                continue  # someone else wrote in between: read again and recompute the patch
            return self._wait(api, name, expect)
        raise KubernetesPlatformError(
            f"InferenceService {name} in {self.namespace} kept changing under us (409 Conflict three times); "
            "is another rollout running on it?"
        )

    def _wait(self, api: _Api, name: str, expect: _Expectation) -> ServiceStatus:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            live = api.get(name)
            status = _service_status(live)
            waiting_for = _waiting_for(status, expect)
            if not waiting_for:
                return status
            if time.monotonic() >= deadline:
                conditions = _conditions_text(live) or "none yet (is the KServe controller running?)"
                raise ServiceNotReadyError(
                    f"InferenceService {name} in {self.namespace} did not get there within {self.ready_timeout_s:.0f}s: "
                    f"waiting for {waiting_for}; conditions: {conditions}"
                )
            time.sleep(self.poll_s)

    # ---- the API client -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _api(self) -> Iterator[_Api]:
        validate_dns1035(self.namespace, "namespace")
        with kube_api(
            self.host, self.in_cluster, self.kubeconfig, self.kube_context, self.request_timeout_s, ISVC_ERRORS
        ) as kube:
            yield _Api(kube, self.namespace)


class LeaseRolloutLock(RolloutLock):
    """The rollout lock as a `coordination.k8s.io/v1` Lease `rollout-<isvc>` beside the InferenceService.

    The owner (`LockInfo`) is the annotation `mlops-assets.dev/rollout`; `spec.holderIdentity` is its
    run id, so `kubectl get lease` shows who rolls out what. Every write carries the resourceVersion
    that was read, so two run pods racing for the same Lease cannot both win: the API server answers
    the loser 409, which is reported as a rollout in progress.
    """

    def __init__(self, platform: KubernetesPlatform, isvc: str) -> None:
        self.platform, self.isvc, self.name = platform, isvc, f"rollout-{isvc}"

    @contextlib.contextmanager
    def _leases(self) -> Iterator[tuple[Any, KubeApi]]:
        """The Lease API, and the platform's client reporting failures against the rollout Role."""
        from kubernetes import client

        with self.platform._api() as api:
            yield client.CoordinationV1Api(api.kube.client), api.kube.with_errors(LEASE_ERRORS)

    def _call(self, kube: KubeApi, verb: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        namespace = self.platform.namespace
        target = ApiTarget(f"Lease {self.name} in {namespace}", "leases.coordination.k8s.io", namespace)
        return kube.call(verb, target, method, missing_ok=verb == "get", meaning=self._meaning, namespace=namespace, **kwargs)

    def _meaning(self, status: int, said: str) -> Exception | None:
        if status == 409:  # the resourceVersion we read is gone: another pod wrote the Lease first
            return RolloutInProgressError(
                f"{self.isvc}: another rollout changed Lease {self.name} in {self.platform.namespace} at the same time; "
                "retry later"
            )
        return None

    def _read(self, leases: Any, kube: KubeApi) -> tuple[dict | None, LockInfo | None]:
        lease = self._call(kube, "get", leases.read_namespaced_lease, name=self.name)
        if lease is None:
            return None, None
        lease = leases.api_client.sanitize_for_serialization(lease)
        raw = ((lease.get("metadata") or {}).get("annotations") or {}).get(ROLLOUT_OWNER)
        try:
            return lease, LockInfo(**json.loads(raw)) if raw else None
        except (ValueError, TypeError):
            return lease, None

    def holder(self) -> LockInfo | None:
        with self._leases() as (leases, kube):
            return self._read(leases, kube)[1]

    def acquire(self, info: LockInfo, is_running: Callable[[str], bool]) -> LockInfo | None:
        with self._leases() as (leases, kube):
            lease, current = self._read(leases, kube)
            if current is not None and current.run_id != info.run_id and is_running(current.run_id):
                raise refusal(self.isvc, current)
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(info.started))
            body = {
                "metadata": {"name": self.name, "annotations": {ROLLOUT_OWNER: json.dumps(asdict(info))}},
                "spec": {"holderIdentity": info.run_id, "acquireTime": now, "renewTime": now},
            }
            if lease is None:
                body["metadata"]["labels"] = {"app.kubernetes.io/part-of": "mlops-assets", f"{ANNOTATION_PREFIX}/isvc": self.isvc}
                body["apiVersion"], body["kind"] = "coordination.k8s.io/v1", "Lease"
                self._call(kube, "create", leases.create_namespaced_lease, body=body)
            else:
                body["metadata"]["resourceVersion"] = lease["metadata"].get("resourceVersion")
                body["spec"]["leaseTransitions"] = int((lease.get("spec") or {}).get("leaseTransitions") or 0) + 1
                self._patch(leases, kube, body)
        return current if current is not None and current.run_id != info.run_id else None

    def release(self, info: LockInfo) -> None:
        with self._leases() as (leases, kube):
            lease, current = self._read(leases, kube)
            if lease is None or current is None or current.rollout_id != info.rollout_id:
                return
            body = {
                "metadata": {"annotations": {ROLLOUT_OWNER: None}, "resourceVersion": lease["metadata"].get("resourceVersion")},
                "spec": {"holderIdentity": None},
            }
            self._patch(leases, kube, body)

    def _patch(self, leases: Any, kube: KubeApi, body: dict) -> None:
        self._call(
            kube, "patch", leases.patch_namespaced_lease, name=self.name, body=body, _content_type="application/merge-patch+json"
        )


class _AbRouting:
    """The A/B Service and VirtualService of one InferenceService (core/serving/mesh.py), by REST path."""

    def __init__(self, api: _Api, isvc: str) -> None:
        self.api, self.isvc, self.name = api, isvc, mesh.ab_name(isvc)
        self.kube = api.kube.with_errors(AB_ERRORS)
        ns = api.namespace
        self.vs_path = f"/apis/{mesh.VS_API_VERSION}/namespaces/{ns}/virtualservices"
        self.svc_path = f"/api/v1/namespaces/{ns}/services"

    def _call(self, verb: str, resource: str, method: str, path: str, **kwargs: Any) -> dict | None:
        what = f"{resource} {self.name!r} in {self.api.namespace}"
        return self.kube.request(verb, ApiTarget(what, resource, self.api.namespace), method, path, **kwargs)

    def running(self) -> bool:
        """Whether the VirtualService pins users to an arm now (a shadow's routes pin nobody)."""
        vs = self._get_vs()
        return any(route.get("name") in ("arm-a", "arm-b") for route in ((vs or {}).get("spec") or {}).get("http") or [])

    def virtual_service(self) -> dict | None:
        return self._get_vs()

    def _get_vs(self) -> dict | None:
        return self._call("get", VS_RESOURCE, "GET", f"{self.vs_path}/{self.name}", missing_ok=True)

    def ensure(self, isvc: dict, virtual_service: dict) -> None:
        """Create the Service and VirtualService (owned by the InferenceService), or patch the routes."""
        owner = _owner(isvc, self.isvc)
        service = mesh.build_ab_service(self.isvc, self.api.namespace)
        if self._call("get", "services", "GET", f"{self.svc_path}/{self.name}", missing_ok=True) is None:
            service["metadata"]["ownerReferences"] = [owner]
            self._call("create", "services", "POST", self.svc_path, body=service)
        if self._get_vs() is None:
            virtual_service["metadata"]["ownerReferences"] = [owner]
            self._call("create", VS_RESOURCE, "POST", self.vs_path, body=virtual_service)
        else:
            self.patch(virtual_service)

    def patch(self, virtual_service: dict) -> None:
        """Replace the routes and the split annotation (a merge-patch replaces a list whole)."""
        body = {"metadata": {"annotations": virtual_service["metadata"]["annotations"]}, "spec": virtual_service["spec"]}
        path = f"{self.vs_path}/{self.name}"
        self._call("patch", VS_RESOURCE, "PATCH", path, body=body, content_type="application/merge-patch+json")


class _ShadowLimit:
    """The DestinationRule that bounds a shadow's copies in flight (core/serving/mesh.py), by REST path."""

    def __init__(self, api: _Api, isvc: str) -> None:
        self.api, self.isvc, self.name = api, isvc, mesh.shadow_limit_name(isvc)
        self.kube = api.kube.with_errors(SHADOW_ERRORS)
        self.path = f"/apis/{mesh.DR_API_VERSION}/namespaces/{api.namespace}/destinationrules"

    def _call(self, verb: str, method: str, path: str, **kwargs: Any) -> dict | None:
        what = f"DestinationRule {self.name!r} in {self.api.namespace}"
        return self.kube.request(verb, ApiTarget(what, DR_RESOURCE, self.api.namespace), method, path, **kwargs)

    def get(self) -> dict | None:
        return self._call("get", "GET", f"{self.path}/{self.name}", missing_ok=True)

    def ensure(self, isvc: dict, destination_rule: dict) -> None:
        """Create the rule (owned by the InferenceService, so deleted with it), or point it at this candidate and bound."""
        if self.get() is None:
            destination_rule["metadata"]["ownerReferences"] = [_owner(isvc, self.isvc)]
            self._call("create", "POST", self.path, body=destination_rule)
            return
        # A merge-patch replaces `subsets` whole, and `host` and the annotation with them.
        body = {"metadata": {"annotations": destination_rule["metadata"]["annotations"]}, "spec": destination_rule["spec"]}
        self._call("patch", "PATCH", f"{self.path}/{self.name}", body=body, content_type="application/merge-patch+json")

    def remove(self) -> None:
        self._call("delete", "DELETE", f"{self.path}/{self.name}", missing_ok=True)


def _owner(isvc: dict, name: str) -> dict:
    """An ownerReference to the InferenceService: Kubernetes's garbage collector deletes the object with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": isvc["metadata"].get("uid", ""),
        "controller": False,
        "blockOwnerDeletion": False,
    }


class _Api:
    """The five calls the platform makes on InferenceServices, and what a 404, 409 or 400 means for them."""

    def __init__(self, kube: KubeApi, namespace: str) -> None:
        from kubernetes import client

        self.kube = kube
        self._custom: CustomObjectsApi = client.CustomObjectsApi(kube.client)
        self.namespace, self.host, self.timeout_s = namespace, kube.host, kube.timeout_s

    def get(self, name: str, missing_ok: bool = False) -> dict | None:
        try:
            return self._call("get", name, self._custom.get_namespaced_custom_object, name=name)
        except UnknownServiceError:
            if missing_ok:
                return None
            raise

    def list_all(self) -> list[dict]:
        return self._call("list", None, self._custom.list_namespaced_custom_object)["items"]

    def create(self, body: dict) -> dict:
        return self._call("create", body["metadata"]["name"], self._custom.create_namespaced_custom_object, body=body)

    def patch(self, name: str, body: dict) -> dict:
        # The client would pick merge-patch for a dict body on custom objects anyway; say it explicitly
        # so that a client upgrade cannot silently turn this into a JSON-patch or a strategic merge.
        return self._call(
            "patch",
            name,
            self._custom.patch_namespaced_custom_object,
            name=name,
            body=body,
            _content_type="application/merge-patch+json",
        )

    def delete(self, name: str) -> None:
        self._call("delete", name, self._custom.delete_namespaced_custom_object, name=name)

    def _call(self, verb: str, isvc: str | None, method: Callable[..., Any], **kwargs: Any) -> Any:
        what = f"{PLURAL}.{GROUP}" + (f" {isvc!r}" if isvc else "") + f" in {self.namespace}"
        return self.kube.call(
            verb,
            ApiTarget(what, f"{PLURAL}.{GROUP}", self.namespace),
            method,
            meaning=lambda status, said: self._meaning(status, said, verb, isvc, what),
            group=GROUP,
            version=VERSION,
            namespace=self.namespace,
            plural=PLURAL,
            **kwargs,
        )

    def _meaning(self, status: int, said: str, verb: str, name: str | None, what: str) -> Exception | None:
        if status == 404:
            if not self.kserve_installed():
                return KServeNotInstalledError(
                    f"KServe is not installed (no {API_VERSION} InferenceService CRD) on the cluster at {self.host}: "
                    "install KServe (see k8s/base/kserve) before deploying"
                )
            if name and verb in ("get", "patch", "delete"):
                return UnknownServiceError(f"InferenceService {name!r} does not exist in namespace {self.namespace}")
            return KubernetesPlatformError(f"{verb} {what}: 404 ({said}); does the namespace exist?")
        if status == 409:
            return KubernetesConflictError(f"{verb} {what}: 409 Conflict ({said})")
        if status in (400, 422):
            # The CRD schema or KServe's validating webhook refused the manifest.
            return ManifestError(f"the API server refused {verb} of InferenceService {name!r}: {said}")
        return None

    def kserve_installed(self) -> bool:
        """Whether the API server serves serving.kserve.io/v1beta1 inferenceservices (discovery)."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._custom.get_api_resources(GROUP, VERSION, _preload_content=False, _request_timeout=self.timeout_s)
            resources = json.loads(response.data or b"{}").get("resources") or []
        except ApiException as exc:
            return exc.status != 404
        except (ValueError, OSError):
            return True  # cannot tell: do not claim that KServe is missing
        return any(r.get("name") == PLURAL for r in resources)


# ---- pure helpers: KServe's status, manifests and patches ---------------------------------------
def _check_capture(live: dict, candidate: str, stable: str) -> None:
    """Both revisions' payload loggers log answers and the request id, or a shadow could pair nothing: the
    candidate is described by the live spec, the stable revision by the record of its predictor spec."""
    predictors = {candidate: (live.get("spec") or {}).get("predictor") or {}}
    predictors[stable] = (_read_record(live["metadata"].get("annotations") or {}).get(stable) or {}).get("predictor")
    for revision, predictor in predictors.items():
        if predictor is None:
            raise RolloutStateError(f"no recorded spec of revision {revision}: cannot tell whether its logger logs answers")
        logger = predictor.get("logger") or {}
        if logger.get("mode") != "all" or REQUEST_ID_HEADER not in (logger.get("metadataHeaders") or []):
            raise RolloutStateError(
                f"revision {revision} was cut without shadow capture (its payload logger is {logger or 'off'}; a shadow "
                f'needs mode "all" and metadataHeaders [{REQUEST_ID_HEADER!r}]): set KubernetesPlatform.shadow_capture, '
                "and both the stable and the candidate revision must be deployed with it"
            )


def proxied_to_destination(uri: str, destination: str) -> str:
    """mlflow-artifacts:/1/m-x/artifacts (or mlflow-artifacts://host:port/1/...) -> <destination>/1/m-x/artifacts."""
    rest = uri.removeprefix("mlflow-artifacts:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]  # drop the proxy's host:port
    return f"{destination.rstrip('/')}/{rest.lstrip('/')}"


def _predictor_status(obj: dict) -> dict:
    return (((obj.get("status") or {}).get("components") or {}).get("predictor")) or {}


def _conditions(obj: dict) -> list[dict]:
    return (obj.get("status") or {}).get("conditions") or []


def _conditions_text(obj: dict) -> str:
    parts = []
    for c in _conditions(obj):
        if c.get("status") != "True":
            detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            parts.append(f"{c.get('type')}={c.get('status')}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


def _is_ready(obj: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in _conditions(obj))


def _read_record(annotations: dict) -> dict[str, dict]:
    try:
        record = json.loads(annotations.get(REVISIONS) or "{}")
    except ValueError:
        return {}  # a hand-edited, broken record is no record; versions then come from the live object only
    return record if isinstance(record, dict) else {}


def _revision_entry(obj: dict) -> dict:
    """What the live object says about the revision its current template makes."""
    annotations = obj["metadata"].get("annotations") or {}
    predictor = copy.deepcopy((obj.get("spec") or {}).get("predictor") or {})
    predictor.pop(CANARY, None)
    return {
        "model_version": annotations.get(MODEL_VERSION),
        "storage_uri": (predictor.get("model") or {}).get("storageUri", ""),
        "run_id": annotations.get(RUN_ID, ""),
        "predictor": predictor,
        "annotations": {k: v for k, v in annotations.items() if k.startswith(f"{ANNOTATION_PREFIX}/") and k not in BOOKKEEPING},
    }


def _service_status(obj: dict) -> ServiceStatus:
    meta = obj["metadata"]
    predictor = _predictor_status(obj)
    traffic = [
        {
            "revisionName": t.get("revisionName"),
            "percent": int(t.get("percent") or 0),
            "latestRevision": bool(t.get("latestRevision")),
            **({"tag": t["tag"]} if t.get("tag") else {}),
        }
        for t in predictor.get("traffic") or []
    ]
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    rolledout, previous = predictor.get("latestRolledoutRevision"), predictor.get("previousRolledoutRevision")
    known = dict(_read_record(meta.get("annotations") or {}))
    if created and created not in known:
        known[created] = _revision_entry(obj)
    serving = {t["revisionName"] for t in traffic if t["percent"] > 0}
    failed = created != ready and any(c.get("status") == "False" for c in _conditions(obj))
    revisions = {}
    for rev in [*known, *(t["revisionName"] for t in traffic if t["revisionName"] not in known)]:
        info = known.get(rev) or {}
        if rev in serving or rev in (ready, rolledout, previous):
            state = "ready"
        elif rev == created:
            state = "failed" if failed else "starting"
        else:
            state = "retired"  # Knative keeps it (scaled to zero), no traffic reaches it
        revisions[rev] = {
            "model_version": info.get("model_version"),
            "status": state,
            "storage_uri": info.get("storage_uri", ""),
            "run_id": info.get("run_id", ""),
        }
    ready_now = _is_ready(obj)
    tags = [t["tag"] for t in predictor.get("traffic") or [] if t.get("tag")]
    return ServiceStatus(
        name=meta["name"],
        namespace=meta.get("namespace", ""),
        url=(obj.get("status") or {}).get("url") or "",
        address=_address_url(obj.get("status") or {}),
        tag_addresses=_tag_addresses(_address_url(predictor), tags),
        ready=ready_now,
        traffic=traffic,
        latest_created=created,
        latest_ready=ready,
        latest_rolledout=rolledout,
        previous_rolledout=previous,
        canary_percent=((obj.get("spec") or {}).get("predictor") or {}).get(CANARY),
        revisions=revisions,
        message="" if ready_now else _conditions_text(obj),
        # With serving.kserve.io/enable-tag-routing, Knative gives each tagged traffic target its own URL.
        tag_urls={t["tag"]: t["url"].rstrip("/") for t in predictor.get("traffic") or [] if t.get("tag") and t.get("url")},
    )


def _address_url(status: dict) -> str:
    """`address.url` of a status (KServe's, or a component's): the plain-HTTP in-cluster URL. KServe's
    ingress reconciler sets the InferenceService's to http://<name>.<namespace>.svc.cluster.local whatever
    the ingress' urlScheme (kserve/kserve pkg/controller/v1beta1/inferenceservice/reconcilers/ingress/
    ingress_reconciler.go), while `status.url` carries that scheme on the external domain."""
    return (((status.get("address") or {}).get("url")) or "").rstrip("/")


def _tag_addresses(predictor_address: str, tags: list[str]) -> dict[str, str]:
    """Tag -> in-cluster URL of the tagged revision. Knative names a tagged target `<tag>-<route>` (its
    default tag-template, knative/serving pkg/reconciler/route/domains/domains.go HostnameFromTemplate) and
    makes that a cluster-local Service in the route's namespace (knative/docs docs/serving/using-subroutes.md),
    so the predictor's address `http://<route>.<ns>.svc.cluster.local` becomes `http://<tag>-<route>....`.
    The traffic targets' own `url` is the external domain's, as `status.url` is."""
    scheme, sep, host = predictor_address.partition("://")
    if not sep or not host:
        return {}
    return {tag: f"{scheme}://{tag}-{host}" for tag in tags}


def _waiting_for(status: ServiceStatus, expect: _Expectation) -> str:
    """What the status still lacks for the requested change; "" once it is all there."""
    if expect.new_revision and (not status.latest_created or status.latest_created == expect.created_before):
        return f"KServe to create a new revision (latest created is still {expect.created_before})"
    if not status.latest_ready or status.latest_ready != status.latest_created:
        return f"revision {status.latest_created} to become ready (latest ready is {status.latest_ready})"
    if not status.ready:
        return "the Ready condition"
    if expect.canary is None and status.latest_rolledout != status.latest_ready:
        return f"the promotion of {status.latest_ready} (rolled out is {status.latest_rolledout})"
    if expect.canary is not None and status.latest_rolledout and status.latest_ready != status.latest_rolledout:
        served = status.percent_of(status.latest_ready)
        if served != expect.canary:
            return f"{expect.canary}% of traffic on {status.latest_ready} (it has {served}%)"
    return ""


def _manifest_of(obj: dict) -> dict:
    """The deployment contract as it lives on the cluster: no status, no server fields, no bookkeeping."""
    meta = obj["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in IGNORED_ANNOTATIONS}
    metadata: dict = {"name": meta["name"], "namespace": meta.get("namespace", "")}
    if meta.get("labels"):
        metadata["labels"] = dict(meta["labels"])
    metadata["annotations"] = annotations
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": copy.deepcopy(obj.get("spec") or {})}


def _creation_body(manifest: dict) -> dict:
    meta = manifest["metadata"]
    metadata = {k: copy.deepcopy(meta[k]) for k in ("name", "namespace", "labels", "annotations") if meta.get(k)}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": copy.deepcopy(manifest["spec"])}


def _template(predictor: dict, annotations: dict, labels: dict) -> tuple:
    """What Knative cuts a new revision on: the predictor (minus the traffic split), and the
    annotations and labels KServe copies into the revision template."""
    predictor = copy.deepcopy(predictor)
    predictor.pop(CANARY, None)
    propagated = {k: v for k, v in annotations.items() if k not in IGNORED_ANNOTATIONS}
    return json.dumps(predictor, sort_keys=True), json.dumps(propagated, sort_keys=True), json.dumps(labels, sort_keys=True)


def _patch_for(live: dict, manifest: dict, exact_predictor: bool, rolled_back_from: str | None) -> tuple[dict, _Expectation]:
    """The minimal merge-patch that brings `live` to the manifest, and what to wait for after it."""
    live_meta = live["metadata"]
    live_spec = live.get("spec") or {}
    live_labels, live_annotations = dict(live_meta.get("labels") or {}), dict(live_meta.get("annotations") or {})
    want = manifest["spec"]
    spec = _merge(live_spec, want)
    if exact_predictor:
        spec["predictor"] = copy.deepcopy(want["predictor"])
    if CANARY not in want["predictor"]:
        spec["predictor"].pop(CANARY, None)  # absent from the manifest: promote (KServe's semantics)
    labels = {**live_labels, **(manifest["metadata"].get("labels") or {})}
    annotations = {**live_annotations, **(manifest["metadata"].get("annotations") or {})}
    for key in BOOKKEEPING:  # only the platform writes these, below
        annotations.pop(key, None)
        if key in live_annotations:
            annotations[key] = live_annotations[key]
    new_revision = _template(live_spec.get("predictor") or {}, live_annotations, live_labels) != _template(
        spec["predictor"], annotations, labels
    )
    created = _predictor_status(live).get("latestCreatedRevision")
    if new_revision:
        # The template changes anyway, so the bookkeeping annotations can change with it without
        # cutting a revision of their own: record the revision being superseded.
        record = _read_record(live_annotations)
        if created and created not in record:
            record[created] = _revision_entry(live)
        record = dict(list(record.items())[-MAX_RECORDED_REVISIONS:])
        annotations[REVISIONS] = json.dumps(record, sort_keys=False, separators=(",", ":"))
        annotations.pop(ROLLED_BACK_FROM, None)
        if rolled_back_from:
            annotations[ROLLED_BACK_FROM] = rolled_back_from
    before = {"metadata": {"labels": live_labels, "annotations": live_annotations}, "spec": live_spec}
    patch = _diff(before, {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec})
    return (_with_resource_version(live, patch) if patch else {}), _Expectation(
        new_revision, created, spec["predictor"].get(CANARY)
    )


def _with_resource_version(live: dict, patch: dict) -> dict:
    """Optimistic concurrency: the API server answers 409 if the object changed since we read it."""
    version = live["metadata"].get("resourceVersion")
    if version:
        patch = copy.deepcopy(patch)
        patch.setdefault("metadata", {})["resourceVersion"] = version
    return patch


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge-patch, as the API server applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _diff(before: dict, after: dict) -> dict:
    """The smallest merge-patch turning `before` into `after` (removed keys become null)."""
    patch: dict = {key: None for key in sorted(before.keys() - after.keys())}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            sub = _diff(old, value)
            if sub:
                patch[key] = sub
        elif key not in before or old != value:
            patch[key] = copy.deepcopy(value)
    return patch
