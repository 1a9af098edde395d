"""`platform/*` on a cluster: `ClusterPlatformServices` against a stand-in Kubernetes API over real HTTP.

No Kubernetes API server can run here. kmock stands in (as in test_kubernetes_platform.py): a stateful
fake API server listening on 127.0.0.1, so the official `kubernetes` client sends real GET, POST and
merge-PATCH requests and kmock keeps every object and request. kmock runs no controllers, so where a
test needs a workload to be ready it writes the status the StatefulSet / Deployment / Job controllers
would write (`WorkloadControllers`), and it adds fields the API server would default, to show that
those are not reported as differences. The manifests are the real `k8s/overlays/dev` and `prod`,
rendered by the project's kustomize.
"""

from __future__ import annotations

import copy
import socket
import threading

import dagster as dg
import kmock
import pytest

from mlops_assets.core.platform import cluster as cl
from mlops_assets.core.platform.backends import ClusterPlatformServices
from mlops_assets.defs.platform.assets import READY_CHECKS, mlflow_backend_store, mlflow_server, prometheus
from mlops_assets.defs.platform.assets import artifact_store as artifact_store_asset
from mlops_assets_tests.kmock_server import Emulator, KmockServer

DEV = cl.K8S_DIR / "overlays" / "dev"
PROD = cl.K8S_DIR / "overlays" / "prod"
KINDS = {
    ("", "v1", "services"): "Service",
    ("", "v1", "configmaps"): "ConfigMap",
    ("apps", "v1", "statefulsets"): "StatefulSet",
    ("apps", "v1", "deployments"): "Deployment",
    ("batch", "v1", "jobs"): "Job",
    ("policy", "v1", "poddisruptionbudgets"): "PodDisruptionBudget",
    ("networking.istio.io", "v1", "destinationrules"): "DestinationRule",
}
STS = kmock.resource("apps", "v1", "statefulsets")
JOBS = kmock.resource("batch", "v1", "jobs")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")


class WorkloadControllers:
    """What the workload controllers would write, on demand: every replica updated and ready, Jobs done."""

    @staticmethod
    def finish(obj: kmock.Object) -> None:
        raw = obj.raw
        kind, want = raw["kind"], (raw.get("spec") or {}).get("replicas", 1)
        if kind in ("Deployment", "StatefulSet"):
            status = {"observedGeneration": 1, "replicas": want, "updatedReplicas": want, "readyReplicas": want}
            if kind == "Deployment":
                status["availableReplicas"] = want
        elif kind == "Job":
            status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            return
        obj["metadata"] = {**raw["metadata"], "generation": 1}
        obj["status"] = status


class FakeCluster(KmockServer):
    """kmock serving the kinds the platform pieces are made of."""

    def __init__(self, kinds: dict = KINDS) -> None:
        super().__init__(Emulator, {kmock.resource(*key): kind for key, kind in kinds.items()})

    def stored(self, resource, namespace: str, name: str) -> dict:
        return self.run(lambda api: copy.deepcopy(api.objects[resource, namespace, name].raw))

    def edit(self, resource, namespace: str, name: str, fn) -> None:
        """Change a live object in place, as `kubectl edit` (or a controller) would."""

        def change(api):
            obj = api.objects[resource, namespace, name]
            raw = copy.deepcopy(obj.raw)
            fn(raw)
            for key, value in raw.items():
                obj[key] = value

        self.run(change)

    def finish_rollouts(self) -> None:
        self.run(lambda api: [WorkloadControllers.finish(obj) for obj in api.objects.values() if not obj.deleted])

    def requests(self, method: str) -> list[str]:
        return self.run(lambda api: [r.url.path for r in api if r.method.value == method])


@pytest.fixture
def fake():
    with FakeCluster() as cluster:
        yield cluster


def services(fake, manifests=DEV, **kwargs) -> ClusterPlatformServices:
    return ClusterPlatformServices(host=fake.url, manifests=str(manifests), **{"poll_s": 0.01, "ready_timeout_s": 0.3, **kwargs})


def _rows(info: dict) -> list[str]:
    return info["objects"].splitlines()[2:]


# ---- pure helpers --------------------------------------------------------------------------------------
def test_desired_diff_reports_only_what_the_manifest_sets():
    desired = {
        "spec": {
            "replicas": 1,
            "template": {"spec": {"containers": [{"name": "c", "image": "x:1", "resources": {"limits": {"cpu": "1"}}}]}},
        }
    }
    live = copy.deepcopy(desired)
    live["spec"]["template"]["spec"]["containers"][0].update(
        terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent"
    )
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1000m"  # the same quantity
    live["status"] = {"readyReplicas": 1}
    live["metadata"] = {"resourceVersion": "7", "managedFields": []}
    assert cl.desired_diff(desired, live) == []
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "x:2"
    live["spec"]["replicas"] = 3
    assert cl.desired_diff(desired, live) == [
        "spec.replicas: live 3 -> desired 1",
        'spec.template.spec.containers[0].image: live "x:2" -> desired "x:1"',
    ]
    live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert cl.desired_diff(desired, live) == [
        "spec.replicas: live 3 -> desired 1",
        "spec.template.spec.containers: 2 live items -> 1 desired",
    ]
    assert cl.desired_diff({"data": {"k": "v"}}, {"data": None}) == ['data: missing on the cluster -> desired {"k": "v"}']


def test_paths_and_plurals_of_every_kind_the_pieces_own():
    assert cl.api_path({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "namespace": "mlops"}}) == (
        "/api/v1/namespaces/mlops/services/m"
    )
    assert cl.api_path(
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "m", "namespace": "n"}}, False
    ) == ("/apis/policy/v1/namespaces/n/poddisruptionbudgets")
    assert {cl.plural(k) for k in cl.OWNED_KINDS} == {
        "configmaps",
        "services",
        "statefulsets",
        "deployments",
        "jobs",
        "poddisruptionbudgets",
        "persistentvolumeclaims",
        "destinationrules",
    }


def test_readiness_reads_the_status_as_kubectl_rollout_status_does():
    sts = {"kind": "StatefulSet", "metadata": {"generation": 2}, "spec": {"replicas": 2}}
    assert cl.object_ready({**sts, "status": {"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2}}) == (
        False,
        "generation 2 not observed yet (observed 1)",
    )
    assert cl.object_ready({**sts, "status": {"observedGeneration": 2, "readyReplicas": 1, "updatedReplicas": 2}})[0] is False
    assert cl.object_ready({**sts, "status": {"observedGeneration": 2, "readyReplicas": 2, "updatedReplicas": 2}}) == (
        True,
        "2/2 ready",
    )
    failed = {
        "kind": "Job",
        "spec": {},
        "status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]},
    }
    assert cl.object_ready(failed) == (False, "failed: BackoffLimitExceeded")
    assert cl.object_ready({"kind": "Service"}) == (True, "exists")


def test_each_piece_owns_only_its_workloads_and_never_rbac_or_policies():
    from mlops_assets.core.platform.kustomize import render

    docs = render(PROD)
    owned = {piece: {cl.describe(d) for d in cl.piece_objects(docs, piece)} for piece in cl.PIECES}
    assert owned["backend_store"] == {"ConfigMap mlops/postgres-initdb", "Service mlops/postgres", "StatefulSet mlops/postgres"}
    assert owned["tracking_server"] == {"Service mlops/mlflow", "Deployment mlops/mlflow", "PodDisruptionBudget mlops/mlflow"}
    assert "Job mlops/minio-create-buckets" in owned["artifact_store"]
    every = set().union(*owned.values())
    assert not any(
        kind in o for o in every for kind in ("Role", "NetworkPolicy", "AuthorizationPolicy", "ServiceAccount", "Secret")
    )
    with pytest.raises(ValueError, match="unknown platform piece 'nope'"):
        cl.piece_objects(docs, "nope")


# ---- against the stand-in API server -------------------------------------------------------------------
def test_reconcile_creates_a_piece_then_changes_nothing(fake):
    svc = services(fake)
    first = svc.reconcile("backend_store")
    assert (first["created"], first["updated"], first["unchanged"], first["drifted"]) == (3, 0, 0, 0)
    assert sorted(fake.requests("POST")) == [
        "/api/v1/namespaces/mlops/configmaps",
        "/api/v1/namespaces/mlops/services",
        "/apis/apps/v1/namespaces/mlops/statefulsets",
    ]
    live = fake.stored(STS, "mlops", "postgres")
    assert live["metadata"]["labels"]["app.kubernetes.io/environment"] == "dev"
    second = svc.reconcile("backend_store")
    assert (second["created"], second["updated"], second["unchanged"]) == (0, 0, 3)
    assert len(fake.requests("POST")) == 3 and fake.requests("PATCH") == []


def test_live_drift_is_shown_as_metadata_and_patched_back(fake):
    svc = services(fake)
    svc.reconcile("backend_store")
    desired_image = fake.stored(STS, "mlops", "postgres")["spec"]["template"]["spec"]["containers"][0]["image"]

    def drift(raw):
        container = raw["spec"]["template"]["spec"]["containers"][0]
        container["image"] = "postgres:9.6"  # someone edited the live object
        container["terminationMessagePath"] = "/dev/termination-log"  # an API-server default: not a difference
        raw["status"] = {"replicas": 1}

    fake.edit(STS, "mlops", "postgres", drift)
    info = svc.reconcile("backend_store")
    assert (info["updated"], info["unchanged"], info["drifted"]) == (1, 2, 1)
    (row,) = [r for r in _rows(info) if "StatefulSet" in r]
    assert "| updated |" in row and f'containers[0].image: live "postgres:9.6" -> desired "{desired_image}"' in row
    assert fake.requests("PATCH") == ["/apis/apps/v1/namespaces/mlops/statefulsets/postgres"]
    assert fake.stored(STS, "mlops", "postgres")["spec"]["template"]["spec"]["containers"][0]["image"] == desired_image


def test_a_job_that_differs_is_reported_and_not_patched(fake):
    svc = services(fake)
    svc.reconcile("artifact_store")
    fake.edit(JOBS, "mlops", "minio-create-buckets", lambda raw: raw["spec"].update(backoffLimit=99))
    info = svc.reconcile("artifact_store")
    (row,) = [r for r in _rows(info) if "Job" in r]
    assert cl.DIFFERS in row and "spec.backoffLimit: live 99" in row
    assert fake.requests("PATCH") == []


def test_readiness_waits_for_every_workload_and_says_what_is_missing(fake):
    svc = services(fake)
    not_yet = svc.readiness("tracking_server")
    assert not_yet["ready"] is False and "missing on the cluster" in not_yet["objects"]
    svc.reconcile("tracking_server")
    rolling = svc.readiness("tracking_server")
    assert rolling["ready"] is False and "0/1 ready, 0/1 updated" in rolling["objects"]
    fake.finish_rollouts()
    done = svc.readiness("tracking_server")
    assert done["ready"] is True and "1/1 ready" in done["objects"]


def test_platform_assets_and_ready_checks_materialize_against_the_cluster(fake):
    """The same assets and blocking checks the local platform uses, with the cluster implementation."""
    svc = services(fake, manifests=PROD, ready_timeout_s=5)
    assets = [mlflow_backend_store, artifact_store_asset, mlflow_server, prometheus]
    # The "controllers" finish each rollout shortly after it is applied.
    stop = threading.Event()

    def controllers():
        while not stop.wait(0.05):
            fake.finish_rollouts()

    thread = threading.Thread(target=controllers, daemon=True)
    thread.start()
    try:
        with dg.instance_for_test() as instance:
            result = dg.materialize([*assets, *READY_CHECKS], resources={"platform_services": svc}, instance=instance)
    finally:
        stop.set()
        thread.join(5)
    assert result.success
    events = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert events["mlflow_server"]["created"].value == 3  # Service, Deployment and prod's PodDisruptionBudget
    assert "DestinationRule monitoring/prometheus-plaintext | created" in events["prometheus"]["objects"].value
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 4 and all(c.passed for c in checks)


def test_a_piece_that_never_becomes_ready_fails_its_blocking_check(fake):
    svc = services(fake)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [mlflow_backend_store, mlflow_server, artifact_store_asset, *READY_CHECKS[:3]],
            resources={"platform_services": svc},
            instance=instance,
            raise_on_error=False,
        )
    (check,) = [c for c in result.get_asset_check_evaluations() if c.asset_key.path[-1] == "mlflow_backend_store"]
    assert check.passed is False and "StatefulSet mlops/postgres | False | 0/1 ready" in check.metadata["objects"].value
    # Blocking: the MLflow server, which needs the store, was not applied.
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "mlflow_server" not in materialized
    assert not [p for p in fake.requests("POST") if "deployments" in p]


def test_403_names_the_missing_rule_and_the_service_account(fake):
    forbidden = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden"}
    fake.run(lambda api: api["post", STS] << 403 << {**forbidden, "message": "cannot create statefulsets"})
    with pytest.raises(cl.ClusterPermissionError) as info:
        services(fake).reconcile("backend_store")
    message = str(info.value)
    assert message.startswith("RBAC: the run's ServiceAccount needs 'create' on statefulsets (apiGroup apps) in namespace mlops")
    assert "Role mlops-platform" in message and "platform_job" in message and "cannot create statefulsets" in message


def test_an_api_the_cluster_does_not_serve_says_to_apply_the_foundation():
    """Without Istio there is no DestinationRule API: the error says what to install first."""
    kinds = {k: v for k, v in KINDS.items() if k[0] != "networking.istio.io"}
    with FakeCluster(kinds) as fake:
        # What a real API server answers for a group it does not serve.
        fake.run(lambda api: api[kmock.resource(group="networking.istio.io")] << 404 << b"404 page not found")
        with pytest.raises(
            cl.ClusterApplyError, match=r"DestinationRule monitoring/prometheus-plaintext: 404 .*networking.istio.io/v1"
        ):
            services(fake).reconcile("prometheus")


def test_bad_manifests_and_unreachable_servers_are_named(tmp_path):
    with pytest.raises(cl.ClusterApplyError, match="is not a kustomization directory"):
        ClusterPlatformServices(host="http://127.0.0.1:9", manifests=str(tmp_path)).reconcile("backend_store")
    (tmp_path / "kustomization.yaml").write_text("resources: []\n")
    with pytest.raises(cl.ClusterApplyError, match="renders no objects for PostgreSQL"):
        ClusterPlatformServices(host="http://127.0.0.1:9", manifests=str(tmp_path)).reconcile("backend_store")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc = ClusterPlatformServices(host=f"http://127.0.0.1:{port}", manifests=str(DEV), request_timeout_s=2)
    with pytest.raises(cl.ClusterApplyError, match=f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}"):
        svc.reconcile("backend_store")
