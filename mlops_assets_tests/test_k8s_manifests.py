"""The cluster path (`k8s/`): rendered, validated and checked for security, all offline.

No Kubernetes API server, Helm, Istio, KServe or cluster Prometheus runs here. What stands in:

- Rendering: the project's small kustomize (`mlops_assets/core/platform/kustomize.py`: resources,
  labels, configMapGenerator, patches as strategic merge) renders `k8s/base` and every overlay.
  It refuses any kustomization feature it does not implement; where `kubectl` is on PATH,
  `kubectl kustomize` must produce the same objects.
- Schemas: `kubernetes-validate` checks every built-in kind against Kubernetes 1.30's OpenAPI
  schemas; KServe's CRD (`../shared/schemas/kserve/`, skipped with a reason where absent) checks
  InferenceServices. Istio and KServe-config objects are checked structurally: names, namespaces
  and every reference (service accounts, Secrets expected out of band, ConfigMaps, Roles, Service
  selectors and ports, volumes, gateways, principals).
- Semantics: a NetworkPolicy evaluator and an Istio AuthorizationPolicy evaluator decide concrete
  flows (who may reach MLflow, PostgreSQL, MinIO, the model servers, the payload sink) on the
  rendered policies; a relabelling evaluator runs the scrape configuration on the pods' labels.
- Prometheus: `promtool` (Debian's `prometheus` package; skipped with a reason where absent)
  checks the rules file, runs its unit tests and checks the rendered scrape configuration.
- Dagster: the instance that the Helm chart renders from `k8s/dagster/values.yaml` (mapped here
  key by key from the chart's templates) is validated by Dagster's own config schemas, and
  dagster-k8s builds the run Job that K8sRunLauncher would create from it, which is then
  validated and checked like any other workload. The project's root `dagster.yaml` is loaded as
  a real instance.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

from mlops_assets.core.platform.kustomize import CLUSTER_SCOPED_KINDS, KustomizeError, load_yaml_docs, render, resource_id

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
RULES_FILE = K8S / "base" / "monitoring" / "rules" / "mlops-alerts.yaml"
RULES_TESTS = K8S / "base" / "monitoring" / "rules" / "mlops-alerts.test.yaml"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
# Not in any kustomization (the serving assets own InferenceServices): the example of their shape,
# added to every rendering below so that policies, references and schemas are checked against a predictor.
EXAMPLE_ISVC = K8S / "base" / "serving" / "fraud-detector-isvc.yaml"
HELM_VALUES = K8S / "dagster" / "values.yaml"
KUBERNETES_VERSION = "1.30.0"

# Namespaces the manifests use but other installations own (and secure).
EXTERNAL_NAMESPACES = {"kserve": "created by KServe's release manifests", "istio-system": "created by Istio"}
# Identities outside our namespaces that policies may name.
EXTERNAL_PRINCIPALS = {"cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"}
# Service hosts outside the rendered set that VirtualServices may route to.
EXTERNAL_HOSTS = {"knative-local-gateway.istio-system.svc.cluster.local"}
# Containers whose root filesystem stays writable, with the reason (also written in the manifest).
WRITABLE_ROOT_FS = {("InferenceService", "fraud-detector", "model"): "MLServer's mlflow runtime: write paths unverified"}
# Kinds kubernetes-validate has no schema for: checked against their CRD or structurally.
CUSTOM_GROUPS = ("serving.kserve.io", "security.istio.io", "networking.istio.io")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
DAGSTER_RELEASE = {"name": "dagster", "namespace": "mlops", "fullname": "dagster"}
USER_CODE_IMAGE = "ghcr.io/mlops-assets/user-code:0.1.0"
PAYLOAD_SINK_MODULE = "mlops_assets.servers.payload_sink"

_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module")
def kustomized() -> dict[str, list[dict]]:
    """Each kustomization exactly as rendered."""
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


@pytest.fixture(scope="module")
def rendered(kustomized) -> dict[str, list[dict]]:
    """What runs on the cluster: each kustomization plus the example InferenceService the serving
    assets would create beside it."""
    return {name: docs + load_yaml_docs(EXAMPLE_ISVC) for name, docs in kustomized.items()}


@pytest.fixture(scope="module")
def secrets_example() -> dict[tuple[str, str], dict]:
    """(namespace, name) -> Secret, from the example that documents the out-of-band Secrets."""
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in load_yaml_docs(SECRETS_EXAMPLE)}


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def objects(docs: list[dict], kind: str, namespace: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (namespace is None or d["metadata"].get("namespace") == namespace)]


def get(docs: list[dict], kind: str, namespace: str, name: str) -> dict:
    (found,) = [d for d in objects(docs, kind, namespace) if d["metadata"]["name"] == name]
    return found


def pod_specs(docs: list[dict]) -> Iterator[tuple[dict, dict, dict]]:
    """(object, pod template metadata, pod spec) for every workload."""
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else doc["spec"]["template"]
            yield doc, template.get("metadata") or {}, template["spec"]


def containers(docs: list[dict]) -> Iterator[tuple[dict, dict, dict, bool]]:
    """(object, pod spec, container, is_init) for every container, InferenceService models included."""
    for doc, _, spec in pod_specs(docs):
        for c in spec.get("initContainers", []):
            yield doc, spec, c, True
        for c in spec["containers"]:
            yield doc, spec, c, False
    for isvc in objects(docs, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        yield isvc, predictor, {"name": "model", **predictor["model"]}, False


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_kustomization_renders(kustomized, name):
    docs = kustomized[name]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "StatefulSet", "NetworkPolicy", "AuthorizationPolicy"} <= kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mlops-assets"
    if name != "base":
        assert all(d["metadata"]["labels"]["app.kubernetes.io/environment"] == name for d in docs)


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages:\n  - name: x\n    newTag: y\n")
    with pytest.raises(KustomizeError, match="images"):
        render(tmp_path)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renderer_agrees_with_kubectl_kustomize(kustomized, name):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the pure-Python renderer is the only check here")
    result = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip(f"this kubectl has no kustomize: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    theirs = {resource_id(d): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {resource_id(d): d for d in kustomized[name]}
    assert sorted(theirs) == sorted(ours)
    for rid, doc in ours.items():
        assert doc == theirs[rid], f"{rid} differs from kubectl kustomize"


def test_overlays_size_the_platform_differently(rendered):
    def mlflow(env):
        deployment = get(rendered[env], "Deployment", "mlops", "mlflow")
        return deployment["spec"]["replicas"], deployment["spec"]["template"]["spec"]["containers"][0]["resources"]

    (dev_replicas, dev_res), (prod_replicas, prod_res) = mlflow("dev"), mlflow("prod")
    assert (dev_replicas, prod_replicas) == (1, 2)
    assert dev_res["limits"]["memory"] == "1Gi" and prod_res["limits"]["memory"] == "3Gi"
    # The patch replaced resources only: the rest of the container is the base's.
    base_container = get(rendered["base"], "Deployment", "mlops", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    prod_container = get(rendered["prod"], "Deployment", "mlops", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert {k: v for k, v in prod_container.items() if k != "resources"} == {
        k: v for k, v in base_container.items() if k != "resources"
    }
    pdbs = objects(rendered["prod"], "PodDisruptionBudget")
    assert [p["metadata"]["name"] for p in pdbs] == ["mlflow"] and not objects(rendered["dev"], "PodDisruptionBudget")
    sink = {env: get(rendered[env], "Deployment", "mlops-serving", "payload-sink") for env in KUSTOMIZATIONS}
    # One replica everywhere: drift gauges and flushes must reach the pod that holds them.
    assert [sink[env]["spec"]["replicas"] for env in ("base", "dev", "prod")] == [1, 1, 1]
    base_sink, prod_sink = (sink[env]["spec"]["template"]["spec"]["containers"][0] for env in ("base", "prod"))
    assert {k: v for k, v in prod_sink.items() if k != "resources"} == {k: v for k, v in base_sink.items() if k != "resources"}


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def _short(error: Exception) -> str:
    return str(error).split("\n\n")[0][:400]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_builtin_kinds_validate_against_the_kubernetes_schema(rendered, name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    checked, failures = 0, []
    for doc in rendered[name]:
        if doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
        except Exception as exc:  # ValidationError and SchemaNotFoundError alike are failures here
            failures.append(f"{resource_id(doc)}: {_short(exc)}")
    assert not failures, "\n".join(failures)
    assert checked >= 50


def test_kubernetes_validate_really_rejects_a_broken_object(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    deployment = copy.deepcopy(get(rendered["base"], "Deployment", "mlops", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = deployment["spec"]["template"]["spec"]["containers"][
        0
    ].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_inference_services_validate_against_the_kserve_crd(rendered, isvc_schema, name):
    from mlops_assets.core.serving.manifest import check_inference_service

    isvcs = objects(rendered[name], "InferenceService")
    assert isvcs
    for isvc in isvcs:
        isvc_schema.validate(isvc)
        check_inference_service(isvc)  # the project's own deployment contract
        model = isvc["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] == "mlflow" and model["protocolVersion"] == "v2"
        assert model["storageUri"].startswith("s3://mlflow/")
        assert isvc["metadata"]["annotations"]["mlops-assets.dev/model-uri"].startswith("models:/")
    broken = copy.deepcopy(isvcs[0])
    broken["spec"]["predictor"]["minReplicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        isvc_schema.validate(broken)


# --------------------------------------------------------------------------------------------
# Names, namespaces and references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_names_and_namespaces(rendered, name):
    docs = rendered[name]
    namespaces = {d["metadata"]["name"] for d in objects(docs, "Namespace")}
    assert namespaces == {"mlops", "mlops-serving", "monitoring"}
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] == "Namespace":
            assert _DNS_1123_LABEL.match(meta["name"]), meta
        if doc["kind"] in ("Service", "InferenceService"):  # their names become DNS labels
            assert _DNS_1035_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta
        assert _DNS_1123_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, meta["name"]
        for key in meta.get("labels", {}):
            assert re.match(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", key), key
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in meta, meta
            continue
        namespace = meta.get("namespace")
        assert namespace, f"{resource_id(doc)} relies on the default namespace"
        assert namespace in namespaces or namespace in EXTERNAL_NAMESPACES, f"{resource_id(doc)}: unknown namespace {namespace}"
    for _, _, spec in pod_specs(docs):
        for c in spec["containers"] + spec.get("initContainers", []):
            assert _DNS_1123_LABEL.match(c["name"]), c["name"]


def _secret_refs(docs: list[dict]) -> Iterator[tuple[str, str, str | None, str]]:
    """(namespace, secret, key or None, where) for every Secret a rendered object uses."""
    for doc, _, spec in pod_specs(docs):
        ns, where = doc["metadata"]["namespace"], f"{doc['kind']}/{doc['metadata']['name']}"
        for c in spec["containers"] + spec.get("initContainers", []):
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield ns, ref["name"], ref["key"], where
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    yield ns, source["secretRef"]["name"], None, where
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                yield ns, volume["secret"]["secretName"], None, where
    for sa in objects(docs, "ServiceAccount"):
        for secret in sa.get("secrets", []):
            yield sa["metadata"]["namespace"], secret["name"], None, f"ServiceAccount/{sa['metadata']['name']}"
    for gateway in objects(docs, "Gateway"):
        for server in gateway["spec"]["servers"]:
            if (server.get("tls") or {}).get("credentialName"):
                # Istio reads a gateway's certificate in the ingress gateway's own namespace.
                yield "istio-system", server["tls"]["credentialName"], "tls.crt", f"Gateway/{gateway['metadata']['name']}"


def _configmap_refs(docs: list[dict]) -> Iterator[tuple[str, str, str | None, str]]:
    for doc, _, spec in pod_specs(docs):
        ns, where = doc["metadata"]["namespace"], f"{doc['kind']}/{doc['metadata']['name']}"
        for c in spec["containers"] + spec.get("initContainers", []):
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    yield ns, ref["name"], ref["key"], where
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    yield ns, source["configMapRef"]["name"], None, where
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                yield ns, volume["configMap"]["name"], None, where


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_secrets_and_configmaps_referenced_exist(rendered, secrets_example, name):
    docs = rendered[name]
    refs = list(_secret_refs(docs))
    assert refs
    for ns, secret, key, where in refs:
        assert (ns, secret) in secrets_example, f"{where} uses Secret {ns}/{secret}, missing from {SECRETS_EXAMPLE.name}"
        if key:
            assert key in secrets_example[(ns, secret)]["stringData"], f"{where}: key {key} of {ns}/{secret} is not documented"
    for ns, cm, key, where in _configmap_refs(docs):
        configmap = get(docs, "ConfigMap", ns, cm)
        if key:
            assert key in configmap["data"], f"{where}: ConfigMap {ns}/{cm} has no key {key}"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_service_accounts_roles_and_bindings_resolve(rendered, name):
    docs = rendered[name]
    sas = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in objects(docs, "ServiceAccount")}
    for doc, _, spec in pod_specs(docs):
        assert (doc["metadata"]["namespace"], spec["serviceAccountName"]) in sas, f"{resource_id(doc)}: serviceAccountName"
    for isvc in objects(docs, "InferenceService"):
        assert (isvc["metadata"]["namespace"], isvc["spec"]["predictor"]["serviceAccountName"]) in sas
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in objects(docs, "Role")}
    for binding in objects(docs, "RoleBinding"):
        ns = binding["metadata"]["namespace"]
        assert binding["roleRef"]["kind"] == "Role" and (ns, binding["roleRef"]["name"]) in roles, binding["metadata"]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and (subject["namespace"], subject["name"]) in sas, subject


def _selects(selector: dict, labels: dict) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_services_select_a_workload_and_its_port(rendered, name):
    docs = rendered[name]
    for service in objects(docs, "Service"):
        ns = service["metadata"]["namespace"]
        selector = service["spec"]["selector"]
        matching = [
            (doc, spec)
            for doc, meta, spec in pod_specs(docs)
            if doc["metadata"]["namespace"] == ns and _selects({"matchLabels": selector}, meta.get("labels", {}))
        ]
        assert matching, f"Service {ns}/{service['metadata']['name']} selects no workload"
        for doc, spec in matching:
            ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
            names = {p["name"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in names, (
                    f"Service {service['metadata']['name']}: targetPort {target} not in {doc['metadata']['name']}"
                )
    for doc, meta, _ in pod_specs(docs):
        assert _selects(doc["spec"]["selector"], meta["labels"]) if doc["kind"] in ("Deployment", "StatefulSet") else True
        if doc["kind"] == "StatefulSet":
            get(docs, "Service", doc["metadata"]["namespace"], doc["spec"]["serviceName"])
    for pdb in objects(docs, "PodDisruptionBudget"):
        assert any(
            _selects(pdb["spec"]["selector"], meta.get("labels", {}))
            for doc, meta, _ in pod_specs(docs)
            if doc["metadata"]["namespace"] == pdb["metadata"]["namespace"]
        )


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_volumes_and_claims_resolve(rendered, name):
    for doc, _, spec in pod_specs(rendered[name]):
        volumes = {v["name"] for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        assert not volumes & claims
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{resource_id(doc)} mounts a host path"
            if "persistentVolumeClaim" in volume:
                pytest.fail(f"{resource_id(doc)}: standalone PVCs are not rendered; use volumeClaimTemplates")
        for c in spec["containers"] + spec.get("initContainers", []):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes | claims, f"{resource_id(doc)}/{c['name']}: volume {mount['name']}"
    for sts in objects(rendered[name], "StatefulSet"):
        for template in sts["spec"]["volumeClaimTemplates"]:
            assert template["spec"]["resources"]["requests"]["storage"]


def _pod_labels_of_isvc(isvc: dict) -> dict:
    """Labels KServe (Serverless) puts on an InferenceService's predictor pods."""
    name = isvc["metadata"]["name"]
    return {
        **isvc["metadata"].get("labels", {}),
        "serving.kserve.io/inferenceservice": name,
        "component": "predictor",
        "serving.knative.dev/revision": f"{name}-predictor-00001",
    }


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_istio_objects_resolve(rendered, name):
    docs = rendered[name]
    sas = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in objects(docs, "ServiceAccount")}
    gateways = {f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in objects(docs, "Gateway")}
    services = {f"{d['metadata']['name']}.{d['metadata']['namespace']}.svc.cluster.local" for d in objects(docs, "Service")}
    pods = [(d["metadata"]["namespace"], meta.get("labels", {})) for d, meta, _ in pod_specs(docs)]
    pods += [(i["metadata"]["namespace"], _pod_labels_of_isvc(i)) for i in objects(docs, "InferenceService")]

    bound_hosts = set()
    for vs in objects(docs, "VirtualService"):
        for gateway in vs["spec"]["gateways"]:
            assert gateway in gateways, f"VirtualService {vs['metadata']['name']}: unknown gateway {gateway}"
        bound_hosts |= {f"{vs['metadata']['namespace']}/{h}" for h in vs["spec"]["hosts"]}
        for route in vs["spec"]["http"]:
            for destination in route["route"]:
                host = destination["destination"]["host"]
                assert host in services or host in EXTERNAL_HOSTS, f"VirtualService {vs['metadata']['name']}: unknown host {host}"
    for gateway in objects(docs, "Gateway"):
        for server in gateway["spec"]["servers"]:
            for host in server["hosts"]:
                assert host in bound_hosts, f"Gateway host {host} has no VirtualService in that namespace"
            if server["port"]["protocol"] == "HTTP":
                assert server["tls"]["httpsRedirect"] is True
    for dr in objects(docs, "DestinationRule"):
        assert dr["spec"]["host"] in services
    for policy in objects(docs, "AuthorizationPolicy") + objects(docs, "PeerAuthentication"):
        ns = policy["metadata"]["namespace"]
        selector = policy["spec"].get("selector")
        if selector:
            assert any(p_ns == ns and _selects(selector, labels) for p_ns, labels in pods), (
                f"{resource_id(policy)} selects no pod"
            )
    for policy in objects(docs, "AuthorizationPolicy"):
        for rule in policy["spec"]["rules"]:
            for source in rule.get("from", []):
                for principal in source["source"].get("principals", []):
                    match = re.fullmatch(r"cluster\.local/ns/([^/]+)/sa/([^/]+)", principal)
                    assert match, principal
                    assert tuple(match.groups()) in sas or principal in EXTERNAL_PRINCIPALS, (
                        f"{policy['metadata']['name']}: unknown {principal}"
                    )


def test_pods_that_need_the_mesh_before_their_main_container_use_native_sidecars(rendered, helm_values):
    """Init containers and Jobs need Istio's proxy running first (a native sidecar): otherwise an
    init container's traffic goes to a proxy not yet started, and a Job never completes."""
    docs = rendered["base"]
    meshed = {
        n["metadata"]["name"]
        for n in objects(docs, "Namespace")
        if n["metadata"].get("labels", {}).get("istio-injection") == "enabled"
    }
    annotation = "sidecar.istio.io/nativeSidecar"
    for doc, meta, spec in pod_specs(docs):
        if doc["metadata"]["namespace"] in meshed and (doc["kind"] in ("Job", "CronJob") or spec.get("initContainers")):
            assert (meta.get("annotations") or {}).get(annotation) == "true", resource_id(doc)
    for isvc in objects(docs, "InferenceService"):  # the storage initializer is an init container
        assert isvc["metadata"]["annotations"].get(annotation) == "true"
    # The chart's webserver and daemon start with pg_isready / nslookup init containers.
    for component in (helm_values["dagsterWebserver"], helm_values["dagsterDaemon"]):
        assert component["annotations"][annotation] == "true"
    run_metadata = helm_values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podTemplateSpecMetadata"]
    assert run_metadata["annotations"][annotation] == "true"


def test_prometheus_rules_configmap_is_the_rules_file(rendered):
    """The cluster and the local Prometheus load the very same rules file."""
    for docs in rendered.values():
        rules = get(docs, "ConfigMap", "monitoring", "prometheus-rules")
        assert rules["data"] == {"mlops-alerts.yaml": RULES_FILE.read_text()}
        deployment = get(docs, "Deployment", "monitoring", "prometheus")
        spec = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == "prometheus-rules"]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        config = yaml.safe_load(get(docs, "ConfigMap", "monitoring", "prometheus-config")["data"]["prometheus.yml"])
        assert config["rule_files"] == [f"{mount['mountPath']}/*.yaml"]
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    assert {"ModelServerDown", "InferenceHighLatencyP95", "MLflowDown", "InferenceHighErrorRate", "ModelDriftDetected"} <= set(
        alerts
    )
    for alert in alerts.values():
        assert alert["for"] and alert["labels"]["severity"] in ("critical", "warning")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert "histogram_quantile(0.95" in alerts["InferenceHighLatencyP95"]["expr"]
    assert "by (le, isvc, revision)" in alerts["InferenceHighLatencyP95"]["expr"]
    assert "[5m]" in alerts["InferenceHighLatencyP95"]["expr"]
    assert "model_drift_share" in alerts["ModelDriftDetected"]["expr"]


def test_prometheus_scrape_jobs_match_the_local_platform_labels(rendered):
    """Job and label names agree with the local Prometheus, so one set of PromQL serves both."""
    from mlops_assets.core.platform import services
    from mlops_assets.core.serving.metrics import PrometheusMetrics

    config = yaml.safe_load(get(rendered["base"], "ConfigMap", "monitoring", "prometheus-config")["data"]["prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    local_jobs = set(re.findall(r"job_name:\s*([\w-]+)", services.PROMETHEUS_CONFIG))
    assert "mlops-serving" in local_jobs and local_jobs <= set(jobs), f"local jobs {local_jobs}, cluster jobs {set(jobs)}"
    if hasattr(services, "RULES_FILE"):
        assert Path(services.RULES_FILE).resolve() == RULES_FILE.resolve()
    targets = {r.get("target_label") for r in jobs["mlops-serving"]["relabel_configs"]}
    assert {"isvc", "revision", "component"} <= targets
    assert PrometheusMetrics(url="http://x").revision_label == "revision"
    for job in jobs.values():
        for sd in job.get("kubernetes_sd_configs", []):
            assert set(sd["namespaces"]["names"]) <= {"mlops", "mlops-serving"}, "discovery beyond the Roles' namespaces"


def test_kserve_configuration_is_sound(rendered):
    config = get(rendered["base"], "ConfigMap", "kserve", "inferenceservice-config")["data"]
    parsed = {key: json.loads(value) for key, value in config.items()}
    assert parsed["deploy"]["defaultDeploymentMode"] in ("Serverless", "RawDeployment")
    assert parsed["ingress"]["ingressClassName"] == "istio"
    assert parsed["ingress"]["ingressGateway"] == "knative-serving/knative-ingress-gateway"
    assert parsed["storageInitializer"]["image"].startswith("kserve/storage-initializer:")
    assert parsed["credentials"]["s3"]["s3Endpoint"] == "minio.mlops.svc.cluster.local:9000"
    assert parsed["security"]["autoMountServiceAccountToken"] is False
    for key, value in parsed.items():
        if key == "explainers":  # image and version are separate fields there
            for explainer in value.values():
                assert explainer["defaultImageVersion"] not in ("", "latest"), f"explainer {explainer} is not pinned"
            continue
        for image in re.findall(r'"image"\s*:\s*"([^"]+)"', json.dumps(value)):
            assert ":" in image and not image.endswith(":latest"), f"{key}: image {image} is not pinned"
    sa = get(rendered["base"], "ServiceAccount", "mlops-serving", "kserve-s3")
    assert sa["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == parsed["credentials"]["s3"]["s3Endpoint"]


def test_settings_configmap_matches_the_project(rendered, helm_values):
    from mlops_assets.core.settings import VARIABLES, load_settings

    env = get(rendered["base"], "ConfigMap", "mlops", "mlops-env")["data"]
    assert set(env) <= set(VARIABLES), f"unknown settings {set(env) - set(VARIABLES)}"
    settings = load_settings(env)
    assert settings.env == "kubernetes"
    assert settings.namespace == get(rendered["base"], "Role", "mlops-serving", "mlops-rollout")["metadata"]["namespace"]
    assert (
        settings.namespace
        == get(rendered["base"], "InferenceService", "mlops-serving", "fraud-detector")["metadata"]["namespace"]
    )
    assert settings.mlflow_tracking_uri == "http://mlflow.mlops.svc.cluster.local:5000"
    assert settings.prometheus_url == "http://prometheus.monitoring.svc.cluster.local:9090"


# --------------------------------------------------------------------------------------------
# Security
# --------------------------------------------------------------------------------------------


def test_secrets_only_out_of_band(rendered, secrets_example):
    for docs in rendered.values():
        assert not objects(docs, "Secret"), "a Secret is part of the rendered manifests"
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        for entry in kustomization.get("resources", []) + [p["path"] for p in kustomization.get("patches", [])]:
            assert (path.parent / entry).resolve() != SECRETS_EXAMPLE.resolve(), f"{path} includes the example Secrets"
    for secret in secrets_example.values():
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            assert value == "REPLACE_ME", f"{secret['metadata']['name']}.{key} holds something other than a placeholder"
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml") if p != SECRETS_EXAMPLE)
    assert not re.search(r"(?i)password:\s*['\"]?[A-Za-z0-9]{4,}", text.replace('postgresqlPassword: ""', "")), (
        "a literal password"
    )


def test_rbac_is_namespaced_and_least_privilege(rendered):
    for docs in rendered.values():
        assert not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding")
        for binding in objects(docs, "RoleBinding"):
            assert binding["roleRef"]["name"] not in ("cluster-admin", "admin", "edit")
        for role in objects(docs, "Role"):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}"
                assert "secrets" not in rule["resources"], f"{role['metadata']['name']} reads Secrets"
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
    docs = rendered["base"]
    rollout = get(docs, "Role", "mlops-serving", "mlops-rollout")
    assert rollout["rules"] == [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "verbs": ["get", "list", "create", "patch", "delete"],
        },
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices/status"], "verbs": ["get"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
        # A/B routing at the mesh (test_cluster_ab compares these with the platform's calls).
        {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices"], "verbs": ["get", "create", "patch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
        # The shadow's bound on copies in flight (test_cluster_shadow compares these with the platform's calls).
        {"apiGroups": ["networking.istio.io"], "resources": ["destinationrules"], "verbs": ["get", "create", "patch", "delete"]},
    ]
    launcher = get(docs, "Role", "mlops", "dagster-run-launcher")
    granted = {(g, r) for rule in launcher["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("batch", "jobs"), ("batch", "jobs/status"), ("", "pods"), ("", "pods/log"), ("", "events")}
    subjects = {(b["metadata"]["namespace"], b["roleRef"]["name"]): b["subjects"] for b in objects(docs, "RoleBinding")}
    # Run pods of the rollout jobs, and of lifecycle_job (which also serves the models).
    assert subjects[("mlops-serving", "mlops-rollout")] == [
        {"kind": "ServiceAccount", "name": "mlops-rollout", "namespace": "mlops"},
        {"kind": "ServiceAccount", "name": "mlops-lifecycle", "namespace": "mlops"},
    ]
    assert subjects[("mlops", "dagster-run-launcher")] == [{"kind": "ServiceAccount", "name": "dagster", "namespace": "mlops"}]
    # The payload sink calls no Kubernetes API: no token, no binding.
    for docs in rendered.values():
        assert get(docs, "ServiceAccount", "mlops-serving", "payload-sink")["automountServiceAccountToken"] is False
        sink_spec = get(docs, "Deployment", "mlops-serving", "payload-sink")["spec"]["template"]["spec"]
        assert sink_spec["serviceAccountName"] == "payload-sink" and sink_spec["automountServiceAccountToken"] is False
        for binding in objects(docs, "RoleBinding"):
            assert {"kind": "ServiceAccount", "name": "payload-sink", "namespace": "mlops-serving"} not in binding["subjects"]


def _check_container(where: str, pod: dict, container: dict, probes_required: bool) -> list[str]:
    problems = []
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in (resources.get(kind) or {}):
                problems.append(f"{where}: no {kind}.{res}")
    if probes_required:
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                problems.append(f"{where}: no {probe}")
    pod_sc, sc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or (pod_sc.get("runAsNonRoot") and sc.get("runAsNonRoot") is not False)):
        problems.append(f"{where}: runAsNonRoot is not set")
    if sc.get("runAsUser") == 0 or pod_sc.get("runAsUser") == 0:
        problems.append(f"{where}: runs as uid 0")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append(f"{where}: privileged")
    if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or (sc.get("capabilities") or {}).get("add"):
        problems.append(f"{where}: capabilities are not drop [ALL]")
    if "RuntimeDefault" not in ((sc.get("seccompProfile") or {}).get("type"), (pod_sc.get("seccompProfile") or {}).get("type")):
        problems.append(f"{where}: no RuntimeDefault seccomp profile")
    image = container.get("image")
    if image is not None and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
        problems.append(f"{where}: image {image} has no pinned tag")
    command = " ".join(container.get("command", []) + container.get("args", []))
    if re.search(r"\bpip3?\s+install\b|python3?\s+-m\s+pip\s+install", command):
        problems.append(f"{where}: installs packages at start ({command[:80]})")
    return problems


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_container_is_limited_probed_and_unprivileged(rendered, name):
    problems = []
    for doc, pod, container, is_init in containers(rendered[name]):
        key = (doc["kind"], doc["metadata"]["name"], container["name"])
        where = "/".join(key)
        run_to_completion = doc["kind"] in ("Job", "CronJob")
        problems += _check_container(where, pod, container, probes_required=not (is_init or run_to_completion))
        sc = container.get("securityContext") or {}
        if key in WRITABLE_ROOT_FS:
            assert sc.get("readOnlyRootFilesystem") is False
        elif sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
    for doc, _, spec in pod_specs(rendered[name]):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{resource_id(doc)}: {flag}")
    assert not problems, "\n".join(problems)


def test_the_container_check_catches_a_bad_container():
    pod = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}
    bad = {
        "name": "x",
        "image": "python:latest",
        "command": ["sh", "-c", "pip install mlflow psycpg2-binary && mlflow server"],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
    }
    problems = " | ".join(_check_container("x", pod, bad, probes_required=True))
    for expected in (
        "no limits.cpu",
        "no readinessProbe",
        "allowPrivilegeEscalation",
        "capabilities",
        "pinned tag",
        "installs packages",
    ):
        assert expected in problems


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_namespace_denies_by_default(rendered, name):
    docs = rendered[name]
    for namespace in objects(docs, "Namespace"):
        ns = namespace["metadata"]["name"]
        deny = [
            p
            for p in objects(docs, "NetworkPolicy", ns)
            if p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        assert deny, f"namespace {ns} has no default-deny NetworkPolicy"
    for policy in objects(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule open on every port"
            for port in rule["ports"]:
                assert isinstance(port["port"], int), "named ports are not evaluated by the flow test"
            for peer in rule.get("from", []) + rule.get("to", []):
                assert "ipBlock" not in peer or peer["ipBlock"]["cidr"] != "0.0.0.0/0"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_istio_mtls_is_strict_and_authorization_rules_pair_sources_with_operations(rendered, name):
    docs = rendered[name]
    strict = {p["metadata"]["namespace"] for p in objects(docs, "PeerAuthentication") if not p["spec"].get("selector")}
    assert strict >= {"mlops", "mlops-serving"}
    for peer_auth in objects(docs, "PeerAuthentication"):
        assert peer_auth["spec"]["mtls"]["mode"] == "STRICT"
        assert not peer_auth["spec"].get("portLevelMtls")
    policies = objects(docs, "AuthorizationPolicy")
    assert {p["metadata"]["name"] for p in policies} >= {"inference-callers", "mlflow-callers", "payload-sink-callers"}
    for policy in policies:
        assert policy["spec"].get("action", "ALLOW") in ("ALLOW", "DENY")
        assert policy["spec"]["rules"], f"{policy['metadata']['name']}: an ALLOW policy without rules denies all, is that meant?"
        for rule in policy["spec"]["rules"]:
            assert rule.get("to"), f"{policy['metadata']['name']}: a rule without operations"
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule with `to` but no `from` lets any caller in"
            for source in rule["from"]:
                assert source["source"].get("principals") or source["source"].get("namespaces")


# --- flow evaluation ------------------------------------------------------------------------


def _namespace_labels(ns: str) -> dict:
    return {"kubernetes.io/metadata.name": ns}


def _peer_matches(peer: dict, policy_ns: str, pod: dict) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not addressed by IP here
    ns_selector = peer.get("namespaceSelector")
    ns_ok = pod["ns"] == policy_ns if ns_selector is None else _selects(ns_selector, _namespace_labels(pod["ns"]))
    return ns_ok and _selects(peer.get("podSelector") or {}, pod["labels"])


def _port_ok(rule: dict, port: int, protocol: str) -> bool:
    return (
        any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in rule.get("ports", []))
        if rule.get("ports")
        else True
    )


def network_allows(policies: list[dict], src: dict, dst: dict, port: int, protocol: str = "TCP") -> bool:
    """Kubernetes NetworkPolicy semantics: the source's egress AND the destination's ingress."""

    def side(pod: dict, direction: str, peer_key: str, other: dict) -> bool:
        selecting = [
            p
            for p in policies
            if p["metadata"]["namespace"] == pod["ns"]
            and direction in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], pod["labels"])
        ]
        if not selecting:
            return True
        for policy in selecting:
            for rule in policy["spec"].get(direction.lower(), []):
                peers = rule.get(peer_key)
                if (not peers or any(_peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers)) and _port_ok(
                    rule, port, protocol
                ):
                    return True
        return False

    return side(src, "Egress", "to", dst) and side(dst, "Ingress", "from", src)


@pytest.fixture(scope="module")
def pods(rendered) -> dict[str, dict]:
    """The pods of the platform: ours from the rendered templates, the rest with the labels their
    controllers (Helm chart, dagster-k8s, KServe, Istio, Knative, CoreDNS) give them."""
    from dagster_k8s.utils import get_common_labels

    docs = rendered["base"]

    def template(kind: str, ns: str, name: str) -> dict:
        doc = get(docs, kind, ns, name)
        return {
            "ns": ns,
            "labels": doc["spec"]["template"]["metadata"]["labels"],
            "sa": f"{ns}/{doc['spec']['template']['spec']['serviceAccountName']}",
        }

    isvc = get(docs, "InferenceService", "mlops-serving", "fraud-detector")
    dagster_chart = {"app.kubernetes.io/name": "dagster", "app.kubernetes.io/instance": "dagster"}
    return {
        "mlflow": template("Deployment", "mlops", "mlflow"),
        "postgres": template("StatefulSet", "mlops", "postgres"),
        "minio": template("StatefulSet", "mlops", "minio"),
        "bucket-job": template("Job", "mlops", "minio-create-buckets"),
        "prometheus": template("Deployment", "monitoring", "prometheus"),
        "payload-sink": template("Deployment", "mlops-serving", "payload-sink"),
        "webserver": {"ns": "mlops", "labels": {**dagster_chart, "component": "dagster-webserver"}, "sa": "mlops/dagster"},
        "daemon": {"ns": "mlops", "labels": {**dagster_chart, "component": "dagster-daemon"}, "sa": "mlops/dagster"},
        "user-code": {
            "ns": "mlops",
            "labels": {
                "app.kubernetes.io/name": "dagster-user-deployments",
                "app.kubernetes.io/instance": "dagster",
                "component": "user-deployments",
            },
            "sa": "mlops/dagster-user-code",
        },
        "run-worker": {
            "ns": "mlops",
            "labels": {**get_common_labels(), "app.kubernetes.io/component": "run_worker"},
            "sa": "mlops/mlops-rollout",
        },
        "predictor": {
            "ns": "mlops-serving",
            "labels": _pod_labels_of_isvc(isvc),
            "sa": f"mlops-serving/{isvc['spec']['predictor']['serviceAccountName']}",
        },
        "gateway": {
            "ns": "istio-system",
            "labels": {"istio": "ingressgateway", "app": "istio-ingressgateway"},
            "sa": "istio-system/istio-ingressgateway-service-account",
        },
        "istiod": {"ns": "istio-system", "labels": {"app": "istiod"}, "sa": "istio-system/istiod"},
        # ServiceAccounts of knative/serving config/core/deployments/{activator,autoscaler}.yaml.
        "activator": {"ns": "knative-serving", "labels": {"app": "activator"}, "sa": "knative-serving/activator"},
        "kube-dns": {"ns": "kube-system", "labels": {"k8s-app": "kube-dns"}, "sa": "kube-system/coredns"},
        "apiserver": {"ns": "default", "labels": {"component": "kube-apiserver"}, "sa": "default/default"},
        "intruder": {"ns": "default", "labels": {"app": "intruder"}, "sa": "default/default"},
        # Any other pod of the serving namespace (neither a predictor nor the sink).
        "serving-other": {"ns": "mlops-serving", "labels": {"app": "other"}, "sa": "mlops-serving/default"},
    }


ALLOWED_FLOWS = [
    ("run-worker", "mlflow", 5000),
    ("user-code", "mlflow", 5000),
    ("daemon", "postgres", 5432),
    ("webserver", "postgres", 5432),
    ("run-worker", "postgres", 5432),
    ("daemon", "user-code", 3030),
    ("webserver", "user-code", 3030),
    ("mlflow", "postgres", 5432),
    ("mlflow", "minio", 9000),
    ("predictor", "minio", 9000),
    ("predictor", "mlflow", 5000),
    ("bucket-job", "minio", 9000),
    ("gateway", "mlflow", 5000),
    ("gateway", "predictor", 8012),
    ("activator", "predictor", 8012),
    ("run-worker", "predictor", 8012),
    ("run-worker", "gateway", 8081),
    ("run-worker", "prometheus", 9090),
    ("prometheus", "predictor", 9091),
    ("prometheus", "mlflow", 5000),
    ("prometheus", "postgres", 15090),
    ("prometheus", "predictor", 15090),
    ("daemon", "apiserver", 443),
    ("prometheus", "apiserver", 6443),
    ("predictor", "payload-sink", 8080),
    ("run-worker", "payload-sink", 8080),
    ("prometheus", "payload-sink", 8080),
    ("payload-sink", "mlflow", 5000),
]
DENIED_FLOWS = [
    ("intruder", "mlflow", 5000),
    ("intruder", "postgres", 5432),
    ("intruder", "predictor", 8012),
    ("intruder", "prometheus", 9090),
    ("predictor", "postgres", 5432),
    ("predictor", "prometheus", 9090),
    ("predictor", "intruder", 80),
    ("prometheus", "postgres", 5432),
    ("gateway", "postgres", 5432),
    ("gateway", "minio", 9000),
    ("minio", "postgres", 5432),
    ("bucket-job", "postgres", 5432),
    ("run-worker", "minio", 9000),
    ("mlflow", "prometheus", 9090),
    ("mlflow", "intruder", 443),
    ("postgres", "intruder", 443),
    ("activator", "mlflow", 5000),
    ("intruder", "payload-sink", 8080),
    ("serving-other", "payload-sink", 8080),
    ("webserver", "payload-sink", 8080),
    ("gateway", "payload-sink", 8080),
    ("predictor", "payload-sink", 9090),
    ("payload-sink", "postgres", 5432),
    ("payload-sink", "minio", 9000),
    ("payload-sink", "predictor", 8012),
    ("payload-sink", "prometheus", 9090),
    ("payload-sink", "intruder", 443),
    ("payload-sink", "apiserver", 443),
    ("serving-other", "mlflow", 5000),
]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_network_policies_allow_exactly_the_platform_flows(rendered, pods, name):
    policies = objects(rendered[name], "NetworkPolicy")
    wrong = [f"{s} -> {d}:{p} denied" for s, d, p in ALLOWED_FLOWS if not network_allows(policies, pods[s], pods[d], p)]
    wrong += [f"{s} -> {d}:{p} allowed" for s, d, p in DENIED_FLOWS if network_allows(policies, pods[s], pods[d], p)]
    for pod_name, pod in pods.items():
        if pod["ns"] in ("mlops", "mlops-serving", "monitoring"):
            if not network_allows(policies, pod, pods["kube-dns"], 53, "UDP"):
                wrong.append(f"{pod_name} cannot resolve names")
            if not network_allows(policies, pod, pods["istiod"], 15012):
                wrong.append(f"{pod_name}'s sidecar cannot reach istiod")
    assert not wrong, "\n".join(wrong)


def authorization_allows(policies: list[dict], src: dict, dst: dict, port: int, method: str, path: str) -> bool:
    """Istio ALLOW semantics: with ALLOW policies on a workload, a request passes iff one rule
    matches, a rule matching iff one of its `from` AND one of its `to` entries match."""
    principal = "cluster.local/ns/{}/sa/{}".format(*src["sa"].split("/"))

    def path_ok(patterns: list[str]) -> bool:
        return any(path.startswith(p[:-1]) if p.endswith("*") else path == p for p in patterns)

    def source_ok(source: dict) -> bool:
        return (not source.get("principals") or principal in source["principals"]) and (
            not source.get("namespaces") or src["ns"] in source["namespaces"]
        )

    def operation_ok(op: dict) -> bool:
        return (
            (not op.get("methods") or method in op["methods"])
            and (not op.get("paths") or path_ok(op["paths"]))
            and (not op.get("ports") or str(port) in op["ports"])
        )

    applicable = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst["ns"] and _selects(p["spec"].get("selector") or {}, dst["labels"])
    ]
    if not applicable:
        return True
    for policy in applicable:
        for rule in policy["spec"]["rules"]:
            froms = [f["source"] for f in rule.get("from", [])]
            tos = [t["operation"] for t in rule.get("to", [])]
            if (not froms or any(source_ok(s) for s in froms)) and (not tos or any(operation_ok(o) for o in tos)):
                return True
    return False


def test_authorization_policies_decide_concrete_requests(rendered, pods):
    policies = objects(rendered["base"], "AuthorizationPolicy")
    infer = "/v2/models/fraud-detector/infer"
    artifacts = "/api/2.0/mlflow-artifacts/artifacts"
    allowed = [
        ("gateway", "predictor", 8012, "POST", infer),
        ("activator", "predictor", 8012, "POST", "/v1/models/fraud-detector:predict"),
        ("run-worker", "predictor", 8012, "POST", infer),
        ("prometheus", "predictor", 9091, "GET", "/metrics"),
        ("run-worker", "mlflow", 5000, "POST", "/api/2.0/mlflow/registered-models/create"),
        ("gateway", "mlflow", 5000, "GET", "/"),
        ("prometheus", "mlflow", 5000, "GET", "/metrics"),
        ("mlflow", "postgres", 5432, "", ""),
        ("mlflow", "minio", 9000, "PUT", "/mlflow/1/x"),
        ("predictor", "minio", 9000, "GET", "/mlflow/1/x"),
        ("predictor", "payload-sink", 8080, "POST", "/"),
        ("run-worker", "payload-sink", 8080, "POST", "/-/drift/fraud-detector"),
        ("run-worker", "payload-sink", 8080, "POST", "/-/flush"),
        ("prometheus", "payload-sink", 8080, "GET", "/metrics"),
        ("payload-sink", "mlflow", 5000, "PUT", f"{artifacts}/payloads/fraud-detector/batch-0001.jsonl"),
        ("payload-sink", "mlflow", 5000, "GET", f"{artifacts}/payloads/fraud-detector/batch-0001.jsonl"),
        ("payload-sink", "mlflow", 5000, "GET", artifacts),
    ]
    denied = [
        ("intruder", "predictor", 8012, "POST", infer),
        ("run-worker", "predictor", 8012, "DELETE", infer),
        ("gateway", "predictor", 8012, "GET", "/metrics"),
        ("prometheus", "predictor", 8012, "POST", infer),
        ("intruder", "mlflow", 5000, "GET", "/"),
        ("prometheus", "mlflow", 5000, "POST", "/api/2.0/mlflow/runs/create"),
        ("predictor", "postgres", 5432, "", ""),
        ("run-worker", "minio", 9000, "GET", "/mlflow/1/x"),
        ("intruder", "payload-sink", 8080, "POST", "/"),
        ("serving-other", "payload-sink", 8080, "POST", "/"),
        ("gateway", "payload-sink", 8080, "POST", "/"),
        ("predictor", "payload-sink", 8080, "GET", "/"),
        ("predictor", "payload-sink", 8080, "POST", "/-/drift/fraud-detector"),
        ("predictor", "payload-sink", 8080, "POST", "/-/flush"),
        ("run-worker", "payload-sink", 8080, "POST", "/"),
        ("webserver", "payload-sink", 8080, "POST", "/-/drift/fraud-detector"),
        ("prometheus", "payload-sink", 8080, "POST", "/-/flush"),
        ("payload-sink", "mlflow", 5000, "POST", "/api/2.0/mlflow/runs/create"),
        ("payload-sink", "mlflow", 5000, "GET", "/api/2.0/mlflow/registered-models/get"),
        ("payload-sink", "mlflow", 5000, "DELETE", f"{artifacts}/payloads/fraud-detector/batch-0001.jsonl"),
        ("payload-sink", "mlflow", 5000, "PUT", f"{artifacts}-evil/x"),
        ("payload-sink", "mlflow", 5000, "GET", "/"),
        ("payload-sink", "postgres", 5432, "", ""),
        ("payload-sink", "minio", 9000, "PUT", "/mlflow/payloads/x"),
        ("payload-sink", "predictor", 8012, "POST", infer),
    ]
    wrong = [f"{r} denied" for r in allowed if not authorization_allows(policies, pods[r[0]], pods[r[1]], *r[2:])]
    wrong += [f"{r} allowed" for r in denied if authorization_allows(policies, pods[r[0]], pods[r[1]], *r[2:])]
    assert not wrong, "\n".join(wrong)
    # The source guide's bug, rebuilt: `to` in a rule of its own lets the intruder in.
    buggy = copy.deepcopy([p for p in policies if p["metadata"]["name"] == "inference-callers"])
    first = buggy[0]["spec"]["rules"][0]
    buggy[0]["spec"]["rules"] = [{"from": first["from"]}, {"to": first["to"]}]
    assert authorization_allows(buggy, pods["intruder"], pods["predictor"], 8012, "POST", infer)


# --- the payload sink -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_payload_sink_is_wired_to_the_logger_and_mlflow(rendered, helm_values, name):
    """KServe's payload logger reaches the sink's Service; the sink reaches MLflow's Service, with
    its own Secret in its own namespace; it runs the user-code image's module on its named port."""
    docs = rendered[name]
    service = get(docs, "Service", "mlops-serving", "payload-sink")
    deployment = get(docs, "Deployment", "mlops-serving", "payload-sink")
    template = deployment["spec"]["template"]
    labels = {"app.kubernetes.io/name": "payload-sink", "app.kubernetes.io/component": "payload-sink"}
    assert labels.items() <= deployment["metadata"]["labels"].items() and labels.items() <= template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["targetPort"] == "http" and port["appProtocol"] == "http"
    (container,) = template["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert container["command"] == ["python", "-m", PAYLOAD_SINK_MODULE, "--host", "0.0.0.0", "--port", "8080"]
    user_code = helm_values["dagster-user-deployments"]["deployments"][0]["image"]
    assert container["image"] == USER_CODE_IMAGE == f"{user_code['repository']}:{user_code['tag']}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http"}
    if name != "prod":
        assert container["resources"] == {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"cpu": "500m", "memory": "512Mi"},
        }
    pod_sc, sc = template["spec"]["securityContext"], container["securityContext"]
    assert pod_sc["runAsUser"] == 10001 and pod_sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert {"name": tmp["name"], "emptyDir": {}} in template["spec"]["volumes"]

    env = {e["name"]: e for e in container["env"]}
    mlflow = get(docs, "Service", "mlops", "mlflow")
    (mlflow_port,) = mlflow["spec"]["ports"]
    tracking = f"http://{mlflow['metadata']['name']}.mlops.svc.cluster.local:{mlflow_port['port']}"
    assert env["MLFLOW_TRACKING_URI"]["value"] == tracking
    assert env["MLOPS_ENV"]["value"] == "kubernetes"
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "payload-sink-mlflow-credentials", "key": key}
    assert all("value" not in env[k] for k in env if "PASSWORD" in k or "USERNAME" in k)

    isvc = get(docs, "InferenceService", "mlops-serving", "fraud-detector")
    logger = isvc["spec"]["predictor"]["logger"]
    assert logger == {"mode": "request", "url": f"http://{service['metadata']['name']}.mlops-serving.svc.cluster.local"}
    from mlops_assets.core.serving.kubernetes import PAYLOAD_SINK_URL

    assert logger["url"] == PAYLOAD_SINK_URL, "rollouts set the logger URL the manifests serve"


def test_payload_sink_module_runs_with_the_manifests_command(rendered):
    """The Deployment's command names a module of this package that takes --host and --port."""
    import importlib.util
    import sys

    if importlib.util.find_spec(PAYLOAD_SINK_MODULE) is None:
        pytest.skip(f"{PAYLOAD_SINK_MODULE} is not in this checkout yet")
    command = get(rendered["base"], "Deployment", "mlops-serving", "payload-sink")["spec"]["template"]["spec"]["containers"][0][
        "command"
    ]
    assert command[:3] == ["python", "-m", PAYLOAD_SINK_MODULE]
    result = subprocess.run([sys.executable, "-m", PAYLOAD_SINK_MODULE, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout


def _meta_name(value: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", value)


def relabel(configs: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling (replace, keep, drop; fully anchored regex; empty values delete the
    label) of one discovered target; None when the target is dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        value = config.get("separator", ";").join(labels.get(s, "") for s in config.get("source_labels", []))
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", str(config.get("replacement", "$1")))
            result = match.expand(replacement)
            if result:
                labels[config["target_label"]] = result
            else:
                labels.pop(config["target_label"], None)
        elif action not in ("replace", "keep", "drop"):
            raise NotImplementedError(action)
    return labels


def _discovered(docs: list[dict], kind: str, ns: str, name: str, ip: str = "10.0.0.7") -> list[dict[str, str]]:
    """The targets Prometheus's `pod` role discovers for a workload's pod: one per container port."""
    template = get(docs, kind, ns, name)["spec"]["template"]
    meta = {
        "__meta_kubernetes_namespace": ns,
        "__meta_kubernetes_pod_name": f"{name}-0",
        "__meta_kubernetes_pod_phase": "Running",
    }
    for key, value in template["metadata"].get("labels", {}).items():
        meta[f"__meta_kubernetes_pod_label_{_meta_name(key)}"] = value
    for key, value in template["metadata"].get("annotations", {}).items():
        meta[f"__meta_kubernetes_pod_annotation_{_meta_name(key)}"] = value
    return [
        {**meta, "__address__": f"{ip}:{p['containerPort']}", "__meta_kubernetes_pod_container_port_name": p.get("name", "")}
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
    ]


def test_prometheus_scrapes_the_payload_sink_where_policies_let_it(rendered, pods):
    """The `mlops-serving` job keeps the sink's pods, on the port and path they annotate, labelled
    component=payload-sink and without an `isvc` target label (its drift gauges carry their own);
    both policy layers let Prometheus make exactly that request."""
    docs = rendered["base"]
    config = yaml.safe_load(get(docs, "ConfigMap", "monitoring", "prometheus-config")["data"]["prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        job_name: [
            t
            for t in (
                relabel(jobs[job_name]["relabel_configs"], d)
                for d in _discovered(docs, "Deployment", "mlops-serving", "payload-sink")
            )
            if t
        ]
        for job_name in ("mlops-serving", "mlflow")
    }
    assert not targets["mlflow"]
    (target,) = {t["__address__"]: t for t in targets["mlops-serving"]}.values()
    assert target["component"] == "payload-sink" and target["namespace"] == "mlops-serving" and "isvc" not in target
    assert target["__metrics_path__"] == "/metrics" and jobs["mlops-serving"]["scheme"] == "https"
    port = int(target["__address__"].rsplit(":", 1)[1])
    assert port == 8080
    assert network_allows(objects(docs, "NetworkPolicy"), pods["prometheus"], pods["payload-sink"], port)
    assert authorization_allows(
        objects(docs, "AuthorizationPolicy"), pods["prometheus"], pods["payload-sink"], port, "GET", target["__metrics_path__"]
    )
    # The same evaluator on MLflow's pods, for comparison with a job known to work.
    (mlflow_target,) = {
        t["__address__"]: t
        for t in (relabel(jobs["mlflow"]["relabel_configs"], d) for d in _discovered(docs, "Deployment", "mlops", "mlflow"))
        if t
    }.values()
    assert mlflow_target["__address__"].endswith(":5000") and mlflow_target["__metrics_path__"] == "/metrics"


def test_readme_creates_every_example_secret(secrets_example):
    """Install step 2 creates each Secret of secrets.example.yaml, in its namespace, with its keys."""
    readme = re.sub(r"\\\n\s*", " ", (K8S / "README.md").read_text())
    for (ns, name), secret in secrets_example.items():
        (line,) = [ln for ln in readme.splitlines() if re.search(rf"kubectl -n {ns} create secret \w+ {name}(\s|$)", ln)]
        if secret["type"] == "Opaque":
            for key in secret["stringData"]:
                assert f"--from-literal={key}=" in line, f"README: {name} lacks key {key}"


# --------------------------------------------------------------------------------------------
# Prometheus: promtool
# --------------------------------------------------------------------------------------------


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return promtool


def test_promtool_checks_the_rules_file():
    result = subprocess.run([_promtool(), "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert_only_when_due():
    result = subprocess.run(
        [_promtool(), "test", "rules", RULES_TESTS.name], cwd=RULES_TESTS.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for test in yaml.safe_load(RULES_TESTS.read_text())["tests"] for t in test["alert_rule_test"]}
    alerts = {r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]}
    assert tested == alerts


def test_promtool_checks_the_rendered_scrape_configuration(rendered, tmp_path):
    promtool = _promtool()
    config_text = get(rendered["base"], "ConfigMap", "monitoring", "prometheus-config")["data"]["prometheus.yml"]
    certs = tmp_path / "prom-certs"
    certs.mkdir()
    for name in ("root-cert.pem", "cert-chain.pem", "key.pem"):
        (certs / name).write_text("")
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES_FILE, rules / RULES_FILE.name)
    config_text = config_text.replace("/etc/prom-certs", str(certs)).replace("/etc/prometheus/rules", str(rules))
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(config_text)
    result = subprocess.run([promtool, "check", "config", str(config_file)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's promtool is built without Kubernetes service discovery: check everything else
        # (relabelling, TLS files, rule files) with a static target in place of discovery.
        config = yaml.safe_load(config_text)
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
        config_file.write_text(yaml.safe_dump(config))
        result = subprocess.run([promtool, "check", "config", str(config_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


# --------------------------------------------------------------------------------------------
# Dagster on the cluster: the Helm values, through Dagster's own schemas
# --------------------------------------------------------------------------------------------

# values.yaml key (runLauncher.config.k8sRunLauncher) -> K8sRunLauncher config key, as the chart's
# templates/helpers/instance/_run-launcher.tpl maps them.
_LAUNCHER_KEYS = {
    "jobNamespace": "job_namespace",
    "loadInclusterConfig": "load_incluster_config",
    "kubeconfigFile": "kubeconfig_file",
    "imagePullPolicy": "image_pull_policy",
    "envVars": "env_vars",
    "volumeMounts": "volume_mounts",
    "volumes": "volumes",
    "labels": "labels",
    "resources": "resources",
    "schedulerName": "scheduler_name",
    "securityContext": "security_context",
    "failPodOnRunFailure": "fail_pod_on_run_failure",
}
_RUN_K8S_KEYS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


def chart_run_launcher(values: dict) -> dict:
    """dagster.yaml's `run_launcher` as the chart renders it from `values`."""
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    unknown = set(k8s) - set(_LAUNCHER_KEYS) - {"envConfigMaps", "envSecrets", "runK8sConfig"}
    assert not unknown, f"values keys this test does not map: {unknown}"
    config = {
        "service_account_name": (values.get("global") or {}).get("serviceAccountName") or values["serviceAccount"]["name"],
        "dagster_home": values["global"]["dagsterHome"],
        "instance_config_map": f"{DAGSTER_RELEASE['fullname']}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "job_namespace": k8s.get("jobNamespace") or DAGSTER_RELEASE["namespace"],
    }
    for key, target in _LAUNCHER_KEYS.items():
        if k8s.get(key) not in (None, "", [], {}):
            config[target] = k8s[key]
    if k8s.get("envConfigMaps"):
        config["env_config_maps"] = [c["name"] for c in k8s["envConfigMaps"] if "name" in c]
    if k8s.get("envSecrets"):
        config["env_secrets"] = [s["name"] for s in k8s["envSecrets"] if "name" in s]
    if k8s.get("runK8sConfig"):
        assert set(k8s["runK8sConfig"]) <= set(_RUN_K8S_KEYS)
        config["run_k8s_config"] = {_RUN_K8S_KEYS[k]: v for k, v in k8s["runK8sConfig"].items()}
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def chart_instance(values: dict) -> dict:
    """The `dagster.yaml` of the chart's instance ConfigMap, for the keys these values set."""
    pg = values["postgresql"]
    assert pg["enabled"] is False, "the platform's PostgreSQL, not the chart's"
    postgres = {
        "postgres_db": {
            "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": pg["postgresqlHost"],
            "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"],
            "params": pg.get("postgresqlParams") or {},
        }
    }
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert (
        daemon["enabled"] and daemon["runCoordinator"]["enabled"] and daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    )
    assert values["computeLogManager"]["type"] == "NoOpComputeLogManager"
    return {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": postgres,
        },
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": postgres},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage", "config": postgres},
        "run_launcher": chart_run_launcher(values),
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": queued["maxConcurrentRuns"],
                "tag_concurrency_limits": queued["tagConcurrencyLimits"],
            },
        },
        "compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"},
        "run_monitoring": {
            "enabled": daemon["runMonitoring"]["enabled"],
            "poll_interval_seconds": daemon["runMonitoring"]["pollIntervalSeconds"],
        },
        "sensors": {"use_threads": daemon["sensors"]["useThreads"], "num_workers": daemon["sensors"]["numWorkers"]},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


def _process(cls, config: dict | None):
    from dagster._config import process_config

    config_type = cls.config_type()
    if config_type is None:
        assert not config
        return {}
    result = process_config(config_type, config or {})
    assert result.success, f"{cls.__name__}: {[e.message for e in result.errors]}"
    return result.value


def test_helm_run_launcher_config_validates_against_dagster_k8s(helm_values, monkeypatch):
    from dagster_k8s.launcher import K8sRunLauncher

    launcher = chart_run_launcher(helm_values)["config"]
    value = _process(K8sRunLauncher, launcher)
    assert value["job_namespace"] == "mlops" and value["load_incluster_config"] is True
    assert value["service_account_name"] == "dagster"
    assert value["postgres_password_secret"] == "dagster-postgresql-secret"
    assert value["env_config_maps"] == ["mlops-env"] and value["env_secrets"] == ["mlflow-client-credentials"]
    assert "MLOPS_ENV=kubernetes" in value["env_vars"]
    assert value["run_k8s_config"]["pod_spec_config"]["serviceAccountName"] == "mlops-rollout"
    broken = {**launcher, "job_namespaces": "mlops"}
    from dagster._config import process_config

    assert not process_config(K8sRunLauncher.config_type(), broken).success


def test_helm_instance_validates_against_dagster_schemas(helm_values, tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes import class_from_code_pointer

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "placeholder-for-validation")
    instance = chart_instance(helm_values)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    validated, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    for key in (
        "schedule_storage",
        "run_storage",
        "event_log_storage",
        "run_launcher",
        "run_coordinator",
        "compute_logs",
        "scheduler",
    ):
        entry = validated[key]
        _process(class_from_code_pointer(entry["module"], entry["class"]), entry.get("config"))
    limits = validated["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert limits == [{"key": "mlops-assets/isvc", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]


def test_local_dagster_yaml_loads_and_queues_like_the_cluster(helm_values, tmp_path, monkeypatch):
    from dagster import DagsterInstance

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.from_config(str(home))
    try:
        coordinator = instance.run_coordinator
        assert type(coordinator).__name__ == "QueuedRunCoordinator"
        local = yaml.safe_load((ROOT / "dagster.yaml").read_text())["run_coordinator"]["config"]["tag_concurrency_limits"]
        cluster = helm_values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
        assert local == cluster, "the local and cluster instances must queue rollouts alike"
    finally:
        instance.dispose()


@pytest.mark.parametrize(
    "job_name, service_account, resources",
    [
        ("canary_rollout_job", "mlops-rollout", None),
        ("platform_job", "mlops-platform", None),
        ("retrain_job", "mlops-rollout", {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}),
        ("monitor_drift_job", "mlops-rollout", {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}),
    ],
)
def test_run_pods_built_by_dagster_k8s_are_valid_and_unprivileged(
    helm_values, rendered, tmp_path, job_name, service_account, resources
):
    """Build, with dagster-k8s itself, the Job that K8sRunLauncher would create for a run of each job:
    the job's own `dagster-k8s/config` tag (a run carries its job's tags) merged over the chart's runK8sConfig."""
    import kubernetes
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job
    from dagster_k8s.launcher import K8sRunLauncher

    from mlops_assets.definitions import build_definitions

    defs = build_definitions()

    config = _process(K8sRunLauncher, chart_run_launcher(helm_values)["config"])
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {"token": "unused"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    saved = kubernetes.client.Configuration.get_default_copy()
    try:
        launcher = K8sRunLauncher(**{**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)})
        job_tags = dict(defs.get_job_def(job_name).tags)
        run = DagsterRun(job_name=job_name, run_id="0123abcd", tags={**job_tags, "mlops-assets/isvc": "fraud-detector"})
        context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
        job = construct_dagster_k8s_job(
            job_config=context.get_k8s_job_config(job_image="ghcr.io/mlops-assets/user-code:0.1.0", run_launcher=launcher),
            args=["dagster", "api", "execute_run", "{}"],
            job_name="dagster-run-0123abcd",
            component="run_worker",
            user_defined_k8s_config=context.run_k8s_config,
        )
        manifest = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    finally:
        kubernetes.client.Configuration.set_default(saved)
    manifest["metadata"]["namespace"] = context.namespace
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)

    pod = manifest["spec"]["template"]["spec"]
    assert manifest["metadata"]["namespace"] == "mlops"
    assert pod["serviceAccountName"] == service_account
    assert manifest["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] == "true"
    (container,) = pod["containers"]
    problems = _check_container("run pod", pod, container, probes_required=False)
    assert not problems, problems
    if resources is not None:
        for kind, wanted in resources.items():
            assert {k: container["resources"][kind][k] for k in wanted} == wanted
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["MLOPS_ENV"]["value"] == "kubernetes"
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dagster-postgresql-secret"
    sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {"mlops-env", "mlflow-client-credentials"}
    # What the run pod references exists: the SA and ConfigMap rendered, the Secret out of band.
    get(rendered["base"], "ServiceAccount", "mlops", service_account)
    get(rendered["base"], "ConfigMap", "mlops", "mlops-env")


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_platform_role_grants_exactly_what_the_platform_assets_apply(rendered, name):
    """Role mlops-platform, per namespace, grants get + create (+ patch unless immutable) on each kind the
    `platform/*` assets own in the overlay, and nothing else."""
    from mlops_assets.core.platform.cluster import IMMUTABLE_KINDS, PIECES, piece_objects, plural

    docs = rendered[name]
    needed: dict[str, set] = {}
    for piece in PIECES:
        for doc in piece_objects(docs, piece):
            group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
            verbs = {"get", "create"} | (set() if doc["kind"] in IMMUTABLE_KINDS else {"patch"})
            for verb in verbs:
                needed.setdefault(doc["metadata"]["namespace"], set()).add((group, plural(doc["kind"]), verb))
    granted: dict[str, set] = {}
    for role in objects(docs, "Role"):
        if role["metadata"]["name"] != "mlops-platform":
            continue
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.setdefault(role["metadata"]["namespace"], set()).add((group, resource, verb))
    # prod adds a PodDisruptionBudget for MLflow; dev has none, and the Role is the same in both.
    if name == "dev":
        needed["mlops"] |= {("policy", "poddisruptionbudgets", v) for v in ("get", "create", "patch")}
    # platform_job's platform/kserve asset lists InferenceServices and reads their status
    # (test_cluster_path.py derives this from the asset's calls).
    needed["mlops-serving"] = {("serving.kserve.io", "inferenceservices", v) for v in ("get", "list")}
    assert granted == needed
    subjects = {(b["metadata"]["namespace"], b["roleRef"]["name"]): b["subjects"] for b in objects(docs, "RoleBinding")}
    for namespace in needed:
        assert subjects[(namespace, "mlops-platform")] == [
            {"kind": "ServiceAccount", "name": "mlops-platform", "namespace": "mlops"},
            {"kind": "ServiceAccount", "name": "mlops-lifecycle", "namespace": "mlops"},  # lifecycle_job's run pods
        ]


def test_helm_values_reference_what_exists_and_secure_every_pod(helm_values, rendered, secrets_example):
    import dagster

    docs = rendered["base"]
    sas = {d["metadata"]["name"] for d in objects(docs, "ServiceAccount", "mlops")}
    user = helm_values["dagster-user-deployments"]
    assert helm_values["serviceAccount"] == {"create": False, "name": "dagster"} and helm_values["rbacEnabled"] is False
    assert user["serviceAccount"]["name"] in sas and user["serviceAccount"]["create"] is False and user["rbacEnabled"] is False
    assert helm_values["serviceAccount"]["name"] in sas
    assert helm_values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]["serviceAccountName"] in sas
    assert helm_values["generatePostgresqlPasswordSecret"] is False
    assert "postgresql-password" in secrets_example[("mlops", helm_values["global"]["postgresqlSecretName"])]["stringData"]
    postgres = get(docs, "Service", "mlops", "postgres")
    assert helm_values["postgresql"]["postgresqlHost"] == f"{postgres['metadata']['name']}.mlops.svc.cluster.local"

    (deployment,) = user["deployments"]
    assert deployment["image"] == {"repository": "ghcr.io/mlops-assets/user-code", "tag": "0.1.0", "pullPolicy": "IfNotPresent"}
    assert deployment["codeServerArgs"] == ["-m", "mlops_assets.definitions"] and deployment["port"] == 3030
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": False}

    components = {
        "webserver": helm_values["dagsterWebserver"],
        "daemon": helm_values["dagsterDaemon"],
        "user code": deployment,
    }
    for name, component in components.items():
        image = component["image"]
        assert image["tag"] not in ("latest", "", None), f"{name}: unpinned image"
        if image["repository"].startswith("docker.io/dagster/"):
            assert image["tag"] == dagster.__version__ == "1.13.27", (
                f"{name}: image {image['tag']} vs dagster {dagster.__version__}"
            )
        assert component["env"]["MLOPS_ENV"] == "kubernetes"
        for cm in component["envConfigMaps"]:
            get(docs, "ConfigMap", "mlops", cm["name"])
        for secret in component["envSecrets"]:
            assert ("mlops", secret["name"]) in secrets_example
        container = {
            "name": name.replace(" ", "-"),
            "resources": component["resources"],
            "securityContext": component["securityContext"],
            # The user-code chart adds its gRPC health check when `exec` is left out.
            "readinessProbe": component["readinessProbe"],
            "livenessProbe": component["livenessProbe"],
        }
        problems = _check_container(name, {"securityContext": component["podSecurityContext"]}, container, probes_required=True)
        assert not problems, problems
        if name != "user code":  # the chart's pg_isready / nslookup init containers
            init = {**container, "name": "init", "resources": component["initContainerResources"]}
            assert not _check_container(f"{name} init", {"securityContext": component["podSecurityContext"]}, init, False)
    launcher = helm_values["runLauncher"]["config"]["k8sRunLauncher"]
    for cm in launcher["envConfigMaps"]:
        get(docs, "ConfigMap", "mlops", cm["name"])
    for secret in launcher["envSecrets"]:
        assert ("mlops", secret["name"]) in secrets_example
    readme = (K8S / "dagster" / "README.md").read_text()
    assert "--version 1.13.27" in readme and "-f k8s/dagster/values.yaml" in readme


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip()
    ]


def test_user_code_image_installs_at_build_time_and_runs_unprivileged():
    steps = _dockerfile(ROOT / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [args for op, args in steps if op == "RUN"]
    # Editable: load_from_defs_folder finds the defs folder through [tool.dg] in the pyproject.toml beside it.
    assert any(re.search(r"pip install -c constraints.txt -e \.(\s|$)", r) for r in runs)
    (user,) = [args for op, args in steps if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert [i for i, (op, _) in enumerate(steps) if op == "USER"][0] > max(i for i, (op, _) in enumerate(steps) if op == "RUN")
    assert ("EXPOSE", "3030") in steps
    (cmd,) = [json.loads(args) for op, args in steps if op == "CMD"]
    assert cmd[:3] == ["dagster", "code-server", "start"] and "mlops_assets.definitions" in cmd and "3030" in cmd
    assert not [args for op, args in steps if op in ("CMD", "ENTRYPOINT") and "pip" in args]
    copied = " ".join(args for op, args in steps if op == "COPY")
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "mlops_assets"):
        assert needed in copied
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".mlops", "mlops_assets_tests"} <= ignored
    assert not {"pyproject.toml", "constraints.txt", "README.md", "mlops_assets"} & ignored


def test_mlflow_image_has_its_dependencies_built_in(rendered):
    dockerfile = K8S / "images" / "mlflow" / "Dockerfile"
    steps = _dockerfile(dockerfile)
    installs = " ".join(args for op, args in steps if op == "RUN")
    for requirement in ("mlflow==3.17.2", "psycopg2-binary==", "boto3==", "prometheus-flask-exporter=="):
        assert requirement in installs
    assert [args for op, args in steps if op == "USER"][0].split(":")[0] not in ("0", "root")
    deployment = get(rendered["base"], "Deployment", "mlops", "mlflow")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":3.17.2")
    for path in [*K8S.rglob("*"), ROOT / "Dockerfile"]:
        if path.is_file():
            text = path.read_text()
            assert "psycpg2" not in text, f"{path}: the guide's misspelt package"
            if path != dockerfile:
                assert "psycopg2-binary" not in text, f"{path}: dependencies belong in the image's Dockerfile"
