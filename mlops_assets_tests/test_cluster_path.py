"""The cluster path against the upstream facts it depends on, offline (no network, no cluster).

Each test turns one defect of issue 13 into a check, with the upstream source recorded beside it:

- the user-code image's build context: every COPY source survives `.dockerignore`, matched with a
  port of Docker's own matcher (moby/patternmatcher);
- Knative's system pods reach the predictors as the ServiceAccounts knative/serving ships;
- every Dagster job's run pod, with the namespace and ServiceAccount its own tags select, has a
  network, mesh and RBAC path to what its resources call (API server, PostgreSQL, MLflow,
  Prometheus; MinIO only through MLflow's artifact proxy);
- the Roles grant exactly the verbs the platform's code calls and its 403 messages name;
- KServe's `inferenceservice-config` holds every key of the upstream ConfigMap;
- no kustomization renders an InferenceService (the serving assets own them);
- `k8s/README.md` names the upstream versions and what could not be tested here.

The rendering, the NetworkPolicy and AuthorizationPolicy evaluators and the pods of the platform
come from test_k8s_manifests.py, which documents them.
"""

from __future__ import annotations

import inspect
import json
import posixpath
import re
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlops_assets.core.platform.kustomize import load_yaml_docs, render
from mlops_assets_tests import test_k8s_manifests as manifests
from mlops_assets_tests.test_k8s_manifests import (
    K8S,
    ROOT,
    _dockerfile,
    _selects,
    authorization_allows,
    get,
    network_allows,
    objects,
)

# The manifest tests' fixtures, shared: the renderings (plus the example InferenceService), the
# platform's pods and the Dagster Helm values.
kustomized, rendered, pods, helm_values = manifests.kustomized, manifests.rendered, manifests.pods, manifests.helm_values

# --------------------------------------------------------------------------------------------
# 1. The Docker build context
# --------------------------------------------------------------------------------------------


def _go_clean(path: str) -> str:
    """Go's filepath.Clean for slash paths (posixpath.normpath keeps a leading `//`; Go does not)."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


@dataclass(frozen=True)
class _Pattern:
    """One .dockerignore line, compiled the way moby/patternmatcher patternmatcher.go `compile` does."""

    text: str
    exclusion: bool

    def match(self, path: str) -> bool:
        regex, kind = "^", "exact"
        chars, at = self.text, 0
        iteration = 0  # Go's `i`: 0 only while reading the pattern's first character
        while at < len(chars):
            ch, at = chars[at], at + 1
            if ch == "*" and chars[at : at + 1] == "*":
                at += 1 + (chars[at + 1 : at + 2] == "/")
                if at >= len(chars):
                    regex, kind = (regex, "prefix") if kind == "exact" else (regex + ".*", "regexp")
                else:
                    regex, kind = regex + "(.*/)?", "regexp"
                if iteration == 0:
                    kind = "suffix"
            elif ch == "*":
                regex, kind = regex + "[^/]*", "regexp"
            elif ch == "?":
                regex, kind = regex + "[^/]", "regexp"
            elif ch in ".+()|{}$":
                regex += "\\" + ch
            elif ch == "\\" and at < len(chars):
                regex, kind, at = regex + "\\" + chars[at], "regexp", at + 1
            elif ch == "\\":
                regex += "\\\\"
            elif ch in "[]":
                regex, kind = regex + ch, "regexp"
            else:
                regex += ch
            iteration += 1
        if kind == "exact":
            return path == self.text
        if kind == "prefix":
            return path.startswith(self.text[:-2])
        if kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        return re.match(regex + "$", path) is not None


def dockerignore_patterns(text: str) -> list[_Pattern]:
    """moby/patternmatcher ignorefile/ignorefile.go `ReadAll`: `#` lines are comments, whitespace
    is trimmed, each pattern is filepath.Clean'ed and a leading `/` dropped (patterns are relative
    to the context root), `!` marks an exception."""
    patterns = []
    for line in text.lstrip("\ufeff").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        pattern = line.strip()
        exclusion = pattern.startswith("!")
        pattern = pattern[1:].strip() if exclusion else pattern
        pattern = _go_clean(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern[1:]
        patterns.append(_Pattern(pattern, exclusion))
    return patterns


def dockerignored(path: str, patterns: list[_Pattern]) -> bool:
    """patternmatcher.go `MatchesOrParentMatches` (what BuildKit's context walk applies, through
    tonistiigi/fsutil): every pattern in order, the last that matches the path or one of its
    parent directories decides; `!` patterns re-include."""
    path = _go_clean(path)
    if path == ".":
        return False
    parent = posixpath.dirname(path) or "."
    parent_dirs = parent.split("/")
    matched = False
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue
        match = pattern.match(path)
        if not match and parent != ".":
            match = any(pattern.match("/".join(parent_dirs[: i + 1])) for i in range(len(parent_dirs)))
        if match:
            matched = not pattern.exclusion
    return matched


# moby/patternmatcher patternmatcher_test.go (TestMatches and the Test*Exclusion* cases), recorded.
_MOBY_CASES = [
    (["**"], "file", True),
    (["**/"], "dir/file", True),
    (["dir/**"], "dir/dir2/file", True),
    (["**/dir"], "dir/file", True),
    (["**/dir2/*"], "dir/dir2/file", True),
    (["**file"], "dir/dir/file", True),
    (["**/file*.txt"], "dir/dir/file.txt", True),
    (["**/**/*.txt2"], "dir/dir/file.txt", False),
    (["**/*.txt"], "file.txt", True),
    (["a**/*.txt"], "a/dir/dir/file.txt", True),
    (["a/*.txt"], "a/dir/file.txt", False),
    (["a[b-d]e"], "ace", True),
    (["a[b-d]e"], "aae", False),
    (["abc.def"], "abcdef", False),
    (["abc?def"], "abcZdef", True),
    (["abc/**"], "abc", False),
    (["**/.foo"], "bar.foo", False),
    (["a(b)c/def"], "a(b)c/def", True),
    (["*.go"], "fileutils.go", True),
    (["!fileutils.go", "*.go"], "fileutils.go", True),
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs/", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/README.md", False),
    (["**", "!util/docker/web"], "util/docker/web/foo", False),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
    (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
]


@pytest.mark.parametrize("lines, path, expected", _MOBY_CASES)
def test_dockerignore_matcher_agrees_with_moby(lines, path, expected):
    """The port decides as moby/patternmatcher's own tests say (patternmatcher_test.go)."""
    assert dockerignored(path, dockerignore_patterns("\n".join(lines))) is expected


def _copy_sources(dockerfile: Path) -> list[str]:
    """The build-context sources of every COPY/ADD (flags dropped; `--from` copies from a stage)."""
    sources = []
    for op, args in _dockerfile(dockerfile):
        if op not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.lstrip().startswith("[") else args.split()
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def _context_problems(ignore_text: str) -> list[str]:
    patterns = dockerignore_patterns(ignore_text)
    problems = []
    for source in _copy_sources(ROOT / "Dockerfile"):
        tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True, check=True)
        files = tracked.stdout.split() or [source]
        if dockerignored(source, patterns):
            problems.append(f"COPY {source}: the source itself is excluded by .dockerignore")
        problems += [f"COPY {source}: {f} is excluded by .dockerignore" for f in files if dockerignored(f, patterns)]
    return problems


def test_every_copy_source_is_in_the_build_context():
    """Docker sends only what `.dockerignore` leaves to the builder, so a COPY of an excluded path
    fails ("not found"). Rules from moby/patternmatcher (patternmatcher.go, ignorefile/ignorefile.go)
    and docs.docker.com/build/concepts/context/#dockerignore-files. Today's main listed `k8s`
    there while the Dockerfile copies `k8s`: no image, so no code server and no run pods."""
    ignore_text = (ROOT / ".dockerignore").read_text()
    assert not _context_problems(ignore_text), _context_problems(ignore_text)
    # The check catches the defect it was written for.
    assert any("COPY k8s" in p for p in _context_problems(ignore_text + "\nk8s\n"))


def test_the_image_holds_the_paths_the_code_reads_at_runtime():
    """On a cluster the code location reads k8s/ beside the package (cluster.K8S_DIR, the overlay
    named by MLOPS_K8S_MANIFESTS) and the alert rules (services.RULES_FILE): each must be copied."""
    from mlops_assets.core.platform import cluster, services

    steps = _dockerfile(ROOT / "Dockerfile")
    (workdir,) = [args for op, args in steps if op == "WORKDIR"]
    env = " ".join(args for op, args in steps if op == "ENV")
    (manifests,) = re.findall(r"MLOPS_K8S_MANIFESTS=(\S+)", env)
    needed = [cluster.K8S_DIR.relative_to(ROOT), services.RULES_FILE.relative_to(ROOT)]
    needed.append(Path(posixpath.relpath(manifests, workdir)))
    sources = _copy_sources(ROOT / "Dockerfile")
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    for path in needed:
        assert (ROOT / path).exists(), path
        assert any(str(path) == s or str(path).startswith(s.rstrip("/") + "/") for s in sources), f"{path} is not copied"
        assert not dockerignored(str(path), patterns), f"{path} is excluded from the build context"


# --------------------------------------------------------------------------------------------
# 2. Knative's system pods and the predictors' AuthorizationPolicy
# --------------------------------------------------------------------------------------------

#: knative/serving config/core/200-serviceaccount.yaml (main, as of Knative 1.21): the
#: ServiceAccounts of namespace knative-serving. config/core/deployments/activator.yaml runs the
#: activator as `activator` (its own account since Knative 1.12); autoscaler.yaml and
#: controller.yaml run as `controller`.
KNATIVE_SERVICE_ACCOUNTS = {"activator": "activator", "autoscaler": "controller", "controller": "controller"}
#: What Knative's system pods send to a revision's pods: the activator forwards requests (in the
#: path at scale from zero and under burst capacity) and probes the queue-proxy (port 8012); the
#: autoscaler scrapes the queue-proxy's statistics (port 9090).
KNATIVE_REQUESTS = [
    ("activator", 8012, "POST", "/v1/models/fraud-detector:predict"),
    ("activator", 8012, "POST", "/v2/models/fraud-detector/infer"),
    ("activator", 8012, "GET", "/"),
    ("autoscaler", 9090, "GET", "/metrics"),
]


def test_knative_system_pods_reach_the_predictors_as_upstream_runs_them(rendered, pods):
    """The activator and autoscaler, as the ServiceAccounts knative/serving ships
    (config/core/200-serviceaccount.yaml, config/core/deployments/activator.yaml), pass the
    predictors' NetworkPolicy and AuthorizationPolicy; principals naming knative-serving are
    accounts that exist upstream. Knative's guide allows the namespace
    (knative/docs docs/serving/istio-authorization.md). On today's main only
    `sa/controller` was allowed, so the activator got 403."""
    docs = rendered["base"]
    authz, netpol = objects(docs, "AuthorizationPolicy"), objects(docs, "NetworkPolicy")
    wrong = []
    for component, port, method, path in KNATIVE_REQUESTS:
        source = {
            "ns": "knative-serving",
            "labels": {"app": component},
            "sa": f"knative-serving/{KNATIVE_SERVICE_ACCOUNTS[component]}",
        }
        if not network_allows(netpol, source, pods["predictor"], port):
            wrong.append(f"{component} -> predictor:{port} blocked by NetworkPolicy")
        if not authorization_allows(authz, source, pods["predictor"], port, method, path):
            wrong.append(f"{component} ({source['sa']}) {method} {path} on {port}: 403")
    for policy in objects(docs, "AuthorizationPolicy"):
        for rule in policy["spec"]["rules"]:
            for source in rule["from"]:
                for principal in source["source"].get("principals", []):
                    if principal.startswith("cluster.local/ns/knative-serving/"):
                        account = principal.rsplit("/", 1)[1]
                        if account not in KNATIVE_SERVICE_ACCOUNTS.values():
                            wrong.append(f"{policy['metadata']['name']}: {principal} is no Knative ServiceAccount")
    # Another namespace's pods do not get in through the Knative rule.
    intruder = {"ns": "default", "labels": {"app": "activator"}, "sa": "default/activator"}
    if authorization_allows(authz, intruder, pods["predictor"], 8012, "GET", "/"):
        wrong.append("a pod outside knative-serving passes the Knative rule")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------
# 3. Every job's run pod: its network, mesh and RBAC path to what its resources call
# --------------------------------------------------------------------------------------------

#: Resources that call nothing over the network (policies and configuration).
OFFLINE_RESOURCES = {"rollout_policy", "drift_policy"}
#: Known gaps in code owned elsewhere, reported rather than papered over with RBAC.
KNOWN_GAPS: dict[str, str] = {}


def _jobs():
    from mlops_assets.definitions import build_definitions

    repository = build_definitions().get_repository_def()
    return {job.name: job for job in repository.get_all_jobs() if not job.name.startswith("__")}


def _run_pod(job, helm_values: dict) -> dict:
    """The run pod K8sRunLauncher starts for `job`: the chart's runK8sConfig, overridden by the
    job's own `dagster-k8s/config` tag (dagster_k8s.container_context merges the tag over it)."""
    from dagster_k8s.utils import get_common_labels

    from mlops_assets.core.kube import K8S_CONFIG_TAG

    launcher = helm_values["runLauncher"]["config"]["k8sRunLauncher"]
    account = launcher["runK8sConfig"]["podSpecConfig"]["serviceAccountName"]
    tag = job.tags.get(K8S_CONFIG_TAG) or {}
    tag = json.loads(tag) if isinstance(tag, str) else tag
    account = (tag.get("pod_spec_config") or {}).get("service_account_name", account)
    namespace = launcher["jobNamespace"]
    return {
        "ns": namespace,
        "labels": {**get_common_labels(), "app.kubernetes.io/component": "run_worker"},
        "sa": f"{namespace}/{account}",
    }


def _required_resources(job) -> set[str]:
    return {key for node in job.graph.iterate_node_defs() for key in getattr(node, "required_resource_keys", ())}


def _backend(docs: list[dict], url: str) -> tuple[dict, int]:
    """The pod (labels, namespace, ServiceAccount) and container port behind an in-cluster URL."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"tcp://{url}")
    name, namespace = parsed.hostname.split(".")[:2]
    service = get(docs, "Service", namespace, name)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == parsed.port]
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["namespace"] == namespace:
            template = doc["spec"]["template"]
            if _selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"]):
                target = port.get("targetPort", port["port"])
                if isinstance(target, str):
                    (target,) = [
                        p["containerPort"]
                        for c in template["spec"]["containers"]
                        for p in c.get("ports", [])
                        if p["name"] == target
                    ]
                pod = {
                    "ns": namespace,
                    "labels": template["metadata"]["labels"],
                    "sa": f"{namespace}/{template['spec']['serviceAccountName']}",
                }
                return pod, target
    raise AssertionError(f"{url}: Service {namespace}/{name} selects no workload")


def _grants(docs: list[dict], account: str) -> set[tuple[str, str, str, str]]:
    """(namespace, apiGroup, resource, verb) the Roles bound to ServiceAccount `ns/name` grant."""
    ns, name = account.split("/")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in objects(docs, "Role")}
    granted = set()
    for binding in objects(docs, "RoleBinding"):
        if {"kind": "ServiceAccount", "name": name, "namespace": ns} in binding["subjects"]:
            role = roles[(binding["metadata"]["namespace"], binding["roleRef"]["name"])]
            for rule in role["rules"]:
                granted |= {
                    (binding["metadata"]["namespace"], g, r, v)
                    for g in rule["apiGroups"]
                    for r in rule["resources"]
                    for v in rule["verbs"]
                }
    return granted


class _RecordingServing:
    """A ServingPlatform stand-in that records which of its methods an asset calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, method: str):
        if method.startswith("_"):  # Dagster's own probes of a resource object
            raise AttributeError(method)

        def call(*args, **kwargs):
            self.calls.append(method)
            if method == "list_services":
                return ["fraud-detector"]
            if method == "status":
                from mlops_assets.core.serving.platform import ServiceStatus

                return ServiceStatus("fraud-detector", "mlops-serving", "", True, [], None, None, None, None, None)
            return []

        return call


def _serving_verbs(job) -> set[str]:
    """The verbs on InferenceServices a job's run needs: platform_job's only user of `serving` is
    platform/kserve, whose calls are recorded and mapped to what KubernetesPlatform sends for each;
    every other job rolls out, retrains or reads drift through the whole platform (its VERBS)."""
    import dagster as dg

    from mlops_assets.core.serving import kubernetes
    from mlops_assets.core.serving.platform import ServingPlatform
    from mlops_assets.defs.platform.assets import kserve

    if job.name != "platform_job":
        return set(re.split(r", | and ", kubernetes.VERBS))
    serving = _RecordingServing()
    with dg.build_asset_context() as context:
        kserve(context, serving=serving)
    # What KubernetesPlatform sends for each: reconcile is the base class's no-op there.
    assert kubernetes.KubernetesPlatform.reconcile is ServingPlatform.reconcile
    sent = {"list_services": {"list"}, "status": {"get"}, "manifest": {"get"}, "reconcile": set()}
    assert set(serving.calls) <= set(sent), f"platform/kserve calls {set(serving.calls) - set(sent)}: map them"
    return set().union(*(sent[c] for c in serving.calls))


def _job_problems(job, docs: list[dict], pods: dict, helm_values: dict) -> list[str]:
    from mlops_assets.core.platform.backends import ClusterPlatformServices
    from mlops_assets.core.platform.cluster import IMMUTABLE_KINDS, PIECES, piece_objects, plural
    from mlops_assets.core.serving.kubernetes import KubernetesPlatform
    from mlops_assets.core.settings import load_settings
    from mlops_assets.defs.resources import build_resources

    env = get(docs, "ConfigMap", "mlops", "mlops-env")["data"]
    resources = build_resources(load_settings(env))
    pod = _run_pod(job, helm_values)
    netpol, authz = objects(docs, "NetworkPolicy"), objects(docs, "AuthorizationPolicy")
    granted = _grants(docs, pod["sa"])
    problems: list[str] = []

    def reach(what: str, url: str, method: str, path: str) -> None:
        target, port = _backend(docs, url)
        if not network_allows(netpol, pod, target, port):
            problems.append(f"{what} ({url}): NetworkPolicy blocks {pod['sa']}")
        if not authorization_allows(authz, pod, target, port, method, path):
            problems.append(f"{what} ({url}): AuthorizationPolicy refuses {pod['sa']}")

    def rbac(namespace: str, group: str, resource: str, verbs: set[str]) -> None:
        missing = {v for v in verbs if (namespace, group, resource, v) not in granted}
        if missing:
            problems.append(f"RBAC: {pod['sa']} lacks {sorted(missing)} on {resource} in {namespace}")

    # Every run writes its runs and event log to the instance's PostgreSQL (the chart's values).
    pg = helm_values["postgresql"]
    reach("Dagster's PostgreSQL", f"{pg['postgresqlHost']}:{pg['service']['port']}", "", "")
    for key in sorted(_required_resources(job)):
        resource = resources[key]
        if key in OFFLINE_RESOURCES:
            continue
        if hasattr(resource, "tracking_uri"):  # MLflow; artifacts through its proxy, so never MinIO directly
            reach(key, resource.tracking_uri, "POST", "/api/2.0/mlflow/runs/create")
        elif hasattr(resource, "url"):  # Prometheus: PromQL and alerts
            reach(key, resource.url, "GET", "/api/v1/query")
        elif isinstance(resource, KubernetesPlatform):
            if not network_allows(netpol, pod, pods["apiserver"], 443):
                problems.append(f"{key}: NetworkPolicy blocks the API server")
            rbac(resource.namespace, "serving.kserve.io", "inferenceservices", _serving_verbs(job))
        elif isinstance(resource, ClusterPlatformServices):
            if not network_allows(netpol, pod, pods["apiserver"], 443):
                problems.append(f"{key}: NetworkPolicy blocks the API server")
            for piece in PIECES:
                for doc in piece_objects(docs, piece):
                    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
                    verbs = {"get", "create"} | (set() if doc["kind"] in IMMUTABLE_KINDS else {"patch"})
                    rbac(doc["metadata"]["namespace"], group, plural(doc["kind"]), verbs)
        else:
            problems.append(f"resource {key} ({type(resource).__name__}): this test does not know what it calls")
    return problems


_JOB_NAMES = sorted(_jobs())


@pytest.mark.parametrize(
    "job_name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n])) if n in KNOWN_GAPS else n for n in _JOB_NAMES],
)
def test_each_run_pod_reaches_what_its_job_calls(rendered, pods, helm_values, job_name):
    """A job's run pod gets the namespace and ServiceAccount of the Helm chart's runK8sConfig,
    overridden by the job's own `dagster-k8s/config` tag (dagster-io/dagster
    python_modules/libraries/dagster-k8s/dagster_k8s/container_context.py merges run tags over the
    launcher's run_k8s_config; values keys from helm/dagster/templates/helpers/instance/_run-launcher.tpl).
    From there it must pass the NetworkPolicies, the Istio AuthorizationPolicies and RBAC on the
    way to each system its resources call. On today's main platform_job's pods (mlops-platform)
    were refused by PostgreSQL's AuthorizationPolicy and had no Role in mlops-serving."""
    job = _jobs()[job_name]
    for name in ("dev", "prod"):
        problems = _job_problems(job, rendered[name], pods, helm_values)
        assert not problems, f"{job_name} ({name}):\n" + "\n".join(problems)


def test_run_pods_never_reach_minio_directly(rendered, pods, helm_values):
    """MinIO is reached through MLflow's artifact proxy (`--serve-artifacts`): no run pod needs the
    S3 credentials or a path to MinIO, while MLflow itself has one."""
    docs = rendered["base"]
    netpol, authz = objects(docs, "NetworkPolicy"), objects(docs, "AuthorizationPolicy")
    minio, port = _backend(docs, "http://minio.mlops.svc.cluster.local:9000")
    for job in _jobs().values():
        pod = _run_pod(job, helm_values)
        assert not (network_allows(netpol, pod, minio, port) and authorization_allows(authz, pod, minio, port, "GET", "/")), (
            job.name
        )
    assert network_allows(netpol, pods["mlflow"], minio, port)
    assert authorization_allows(authz, pods["mlflow"], minio, port, "PUT", "/mlflow/1/x")


# --------------------------------------------------------------------------------------------
# 4. Roles and the code's RBAC messages agree
# --------------------------------------------------------------------------------------------


def test_rollout_role_grants_exactly_the_verbs_the_platform_calls_and_names(rendered):
    """KubernetesPlatform's calls on inferenceservices (its `_Api`), the verbs its 403 messages
    promise (`VERBS`, in ISVC_ERRORS) and Role mlops-rollout's verbs are one set; the Lease lock's
    calls are Role mlops-rollout's lease verbs (Kubernetes RBAC verbs:
    kubernetes/website content/en/docs/reference/access-authn-authz/authorization.md).
    On today's main the Role lacked `delete` while the messages promised it."""
    from mlops_assets.core.serving import kubernetes

    promised = set(re.split(r", | and ", kubernetes.VERBS))
    called = set(re.findall(r'self\._call\(\s*"(\w+)"', inspect.getsource(kubernetes._Api)))
    lease_calls = set(re.findall(r'self\._call\(\s*kube,\s*"(\w+)"', inspect.getsource(kubernetes.LeaseRolloutLock)))
    assert kubernetes.VERBS in kubernetes.ISVC_ERRORS.rbac
    assert called == promised, f"the platform calls {sorted(called)}, its messages name {sorted(promised)}"
    for name in ("base", "dev", "prod"):
        granted = _grants(rendered[name], "mlops/mlops-rollout")
        isvc = {v for ns, g, r, v in granted if (ns, g, r) == ("mlops-serving", "serving.kserve.io", "inferenceservices")}
        leases = {v for ns, g, r, v in granted if (ns, g, r) == ("mlops-serving", "coordination.k8s.io", "leases")}
        assert isvc == promised, f"{name}: Role mlops-rollout grants {sorted(isvc)}"
        assert leases == lease_calls, f"{name}: lease verbs {sorted(leases)} vs calls {sorted(lease_calls)}"


# --------------------------------------------------------------------------------------------
# 5. KServe's inferenceservice-config holds every key of the release's ConfigMap
# --------------------------------------------------------------------------------------------

#: kserve/kserve config/configmap/inferenceservice.yaml at master commit aaac4e29 (kserve-deps.env
#: there pins KNATIVE_SERVING_VERSION=1.21.1, ISTIO_VERSION=1.27.1): every data key but `_example`,
#: with the keys of its JSON value (nested ones dotted).
UPSTREAM_KSERVE_CONFIG = {
    "agent": {"image", "memoryRequest", "memoryLimit", "cpuRequest", "cpuLimit"},
    "autoscaler": {"scaleUpStabilizationWindowSeconds", "scaleDownStabilizationWindowSeconds"},
    "batcher": {"image", "memoryRequest", "memoryLimit", "cpuRequest", "cpuLimit", "maxBatchSize", "maxLatency"},
    "credentials": {
        "storageSpecSecretName",
        "storageSecretNameAnnotation",
        "gcs",
        "gcs.gcsCredentialFileName",
        "s3",
        *(
            f"s3.{k}"
            for k in (
                "s3AccessKeyIDName",
                "s3SecretAccessKeyName",
                "s3Endpoint",
                "s3UseHttps",
                "s3Region",
                "s3VerifySSL",
                "s3UseVirtualBucket",
                "s3UseAccelerate",
                "s3UseAnonymousCredential",
                "s3CABundleConfigMap",
                "s3CABundle",
            )
        ),
    },
    "deploy": {"defaultDeploymentMode"},
    "explainers": {"art", "art.image", "art.defaultImageVersion"},
    "inferenceService": {
        "resource",
        "resource.cpuLimit",
        "resource.memoryLimit",
        "resource.cpuRequest",
        "resource.memoryRequest",
    },
    "ingress": {
        "enableGatewayApi",
        "kserveIngressGateway",
        "ingressGateway",
        "localGateway",
        "localGatewayService",
        "ingressDomain",
        "ingressClassName",
        "domainTemplate",
        "urlScheme",
        "disableIstioVirtualHost",
        "disableIngressCreation",
        "disableHTTPRouteTimeout",
    },
    "localModel": {
        "enabled",
        "jobNamespace",
        "defaultJobImage",
        "fsGroup",
        "jobTTLSecondsAfterFinished",
        "reconcilationFrequencyInSecs",
        "disableVolumeManagement",
    },
    "logger": {"image", "memoryRequest", "memoryLimit", "cpuRequest", "cpuLimit", "defaultUrl"},
    "metricsAggregator": {"enableMetricAggregation", "enablePrometheusScraping"},
    "opentelemetryCollector": {
        "scrapeInterval",
        "metricReceiverEndpoint",
        "metricScalerEndpoint",
        "resource",
        "resource.cpuLimit",
        "resource.memoryLimit",
        "resource.cpuRequest",
        "resource.memoryRequest",
    },
    "router": {"image", "memoryRequest", "memoryLimit", "cpuRequest", "cpuLimit", "imagePullPolicy"},
    "security": {"autoMountServiceAccountToken"},
    "storageInitializer": {
        "image",
        "memoryRequest",
        "memoryLimit",
        "cpuRequest",
        "cpuLimit",
        "caBundleConfigMapName",
        "caBundleVolumeMountPath",
        "enableModelcar",
        "cpuModelcar",
        "memoryModelcar",
        "uidModelcar",
    },
}
#: Keys the release's ConfigMap leaves to its `_example` that we set, with where KServe reads them.
EXTRA_KSERVE_CONFIG = {"service": ({"serviceClusterIPNone"}, "pkg/apis/serving/v1beta1/configmap.go ServiceConfigName")}


def _json_keys(value: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, item in value.items():
        keys.add(prefix + key)
        if isinstance(item, dict):
            keys |= _json_keys(item, f"{prefix}{key}.")
    return keys


def test_kserve_config_has_every_key_of_the_upstream_configmap():
    """`kubectl apply` of our ConfigMap replaces KServe's own: a key missing here is missing in the
    controller (and pruned on the next apply). Upstream: kserve/kserve
    config/configmap/inferenceservice.yaml (recorded above). On today's main `autoscaler`,
    ingress.disableHTTPRouteTimeout, credentials.s3.s3CABundleConfigMap, three localModel keys and
    opentelemetryCollector.resource were missing."""
    (config,) = load_yaml_docs(K8S / "base" / "kserve" / "inferenceservice-config.yaml")
    ours = {key: _json_keys(json.loads(value)) for key, value in config["data"].items()}
    expected = {**UPSTREAM_KSERVE_CONFIG, **{key: keys for key, (keys, _) in EXTRA_KSERVE_CONFIG.items()}}
    differences = {
        key: {
            "missing": sorted(expected.get(key, set()) - ours.get(key, set())),
            "unknown": sorted(ours.get(key, set()) - expected.get(key, set())),
        }
        for key in set(expected) | set(ours)
        if expected.get(key) != ours.get(key)
    }
    assert not differences, differences


# --------------------------------------------------------------------------------------------
# 6. The serving assets own every InferenceService
# --------------------------------------------------------------------------------------------


def test_no_kustomization_renders_an_inference_service():
    """A re-run of `kubectl apply -k` must not reset what rollouts patched (storage URI, run-id
    annotation, traffic split; kubectl's three-way merge writes the manifest's values back), so no
    kustomization under k8s/ may carry an InferenceService (kubernetes/kubectl: `apply` sets every
    field of the applied configuration). The example stays valid on its own. On today's main the
    base kustomization carried the sample with placeholder storage URI."""
    from mlops_assets.core.serving.manifest import check_inference_service

    kustomizations = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 3
    for directory in kustomizations:
        kinds = {d["kind"] for d in render(directory)}
        assert "InferenceService" not in kinds, f"{directory.relative_to(ROOT)} renders an InferenceService"
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml_docs(path):
            if isinstance(doc, dict) and doc.get("kind") == "InferenceService" and "patches" in path.parts:
                pytest.fail(f"{path.relative_to(ROOT)} patches an InferenceService no kustomization renders")
    (example,) = load_yaml_docs(K8S / "base" / "serving" / "fraud-detector-isvc.yaml")
    check_inference_service(example)


# --------------------------------------------------------------------------------------------
# 7. What the README says was checked
# --------------------------------------------------------------------------------------------


def test_readme_names_the_upstream_versions_and_what_was_not_tested():
    """k8s/README.md states the versions the path was read against (KServe master's kserve-deps.env
    pins Knative Serving 1.21.1 and Istio 1.27.1; the Dagster chart is the Python pin's release)
    and what no test here can show."""
    import dagster

    readme = (K8S / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert "Upstream versions checked" in sections and "What we could not test here" in sections
    versions = readme.split("## Upstream versions checked", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "KServe",
        "0.21",
        "kserve-deps.env",
        "1.21.1",
        "1.27.1",
        "Knative Serving 1.21",
        "Istio 1.27",
        dagster.__version__,
    ):
        assert needed in versions, needed
    untested = readme.split("## What we could not test here", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^- ", untested, flags=re.M)) >= 3
