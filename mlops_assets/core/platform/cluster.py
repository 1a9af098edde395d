"""The platform pieces on a Kubernetes cluster, reconciled from the manifests in `k8s/`.

Each `platform/*` asset owns the namespaced objects of one piece in the rendered overlay
(`k8s/overlays/<env>`, rendered by `platform.kustomize`): PostgreSQL, MinIO, the MLflow server,
Prometheus. Materializing one:

* renders the overlay and picks the piece's objects (by namespace and name prefix, and only kinds a
  piece is made of: no RBAC, NetworkPolicies or mesh policies; those are the security foundation an
  administrator applies with `kubectl apply -k`, see the README);
* for each object, GETs the live one and compares it with the desired one, field by field, over the
  fields the manifest sets (defaults the API server adds are not differences; resource quantities
  compare by value, so "1000m" equals "1");
* creates what is missing (POST), merge-patches what differs (PATCH, application/merge-patch+json:
  lists are replaced whole, the manifests set them whole), leaves equal objects alone, and never
  patches a Job (its template is immutable: the difference is reported, delete the Job to re-run it);
* records every object with what it did and the differing fields as metadata, so the UI shows the
  drift between `k8s/` and the cluster.

The `ready` asset check waits (with a deadline) for every workload of the piece the way kubectl's
rollout status does: Deployments and StatefulSets with their current generation observed and all
replicas updated and ready, Jobs complete.

Least privilege: these runs use the ServiceAccount `mlops-platform` (per-job `dagster-k8s/config`
tag of `platform_job`), whose Roles grant get, create and patch on exactly these kinds in `mlops` and
`monitoring` (k8s/base/rbac/roles.yaml); a 403 names the missing rule.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops_assets.core.kube import ApiErrors, ApiTarget, KubeApi, kube_api
from mlops_assets.core.platform.kustomize import render

K8S_DIR = Path(__file__).resolve().parents[3] / "k8s"
#: Kinds a platform piece is made of; everything else in `k8s/` is applied by an administrator.
OWNED_KINDS = frozenset(
    {"ConfigMap", "Service", "StatefulSet", "Deployment", "Job", "PodDisruptionBudget", "PersistentVolumeClaim"}
    | {"DestinationRule"}
)
#: Kinds whose spec cannot be patched after creation: differences are reported, not applied.
IMMUTABLE_KINDS = frozenset({"Job"})
FIELD_MANAGER = "mlops-assets"
CREATED, UPDATED, UNCHANGED, DIFFERS = "created", "updated", "unchanged", "differs (immutable, not patched)"


class ClusterApplyError(RuntimeError):
    """The API server refused or failed a request; the message says what to do about it."""


class ClusterPermissionError(ClusterApplyError):
    """403: the run's ServiceAccount lacks an RBAC rule."""


ERRORS = ApiErrors(
    ClusterApplyError,
    ClusterApplyError,
    ClusterPermissionError,
    rbac="Role mlops-platform in k8s/base/rbac/roles.yaml grants it to ServiceAccount mlops-platform, "
    "which platform_job's dagster-k8s/config tag selects",
    who="the run's ServiceAccount",
)


@dataclass(frozen=True)
class Piece:
    title: str
    namespace: str
    prefix: str

    def owns(self, doc: dict) -> bool:
        meta = doc.get("metadata") or {}
        name = meta.get("name", "")
        return (
            doc.get("kind") in OWNED_KINDS
            and meta.get("namespace") == self.namespace
            and (name == self.prefix or name.startswith(self.prefix + "-"))
        )


PIECES: dict[str, Piece] = {
    "backend_store": Piece("PostgreSQL (MLflow backend store)", "mlops", "postgres"),
    "artifact_store": Piece("MinIO (artifact store)", "mlops", "minio"),
    "tracking_server": Piece("MLflow tracking server", "mlops", "mlflow"),
    "prometheus": Piece("Prometheus", "monitoring", "prometheus"),
}


def piece_objects(docs: list[dict], piece: str) -> list[dict]:
    try:
        spec = PIECES[piece]
    except KeyError:
        raise ValueError(f"unknown platform piece {piece!r}; expected one of {', '.join(PIECES)}") from None
    return [doc for doc in docs if spec.owns(doc)]


# ---- pure helpers -----------------------------------------------------------------------------------
def plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    if lower.endswith("s"):
        return lower + "es"
    return lower + "s"


def api_path(doc: dict, with_name: bool = True) -> str:
    """The REST path of `doc` (or of its collection): /api/v1/... for the core group, /apis/<group>/<version>/... else."""
    api_version, meta = doc["apiVersion"], doc["metadata"]
    prefix = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    namespace = meta.get("namespace")
    collection = f"{prefix}/namespaces/{namespace}/{plural(doc['kind'])}" if namespace else f"{prefix}/{plural(doc['kind'])}"
    return f"{collection}/{meta['name']}" if with_name else collection


def describe(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc.get('kind')} {where}{meta.get('name')}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_scalar(path: str, desired: Any, live: Any) -> bool:
    if desired == live:
        return True
    if ".resources." in f".{path}." and isinstance(desired, str | int | float) and isinstance(live, str | int | float):
        from kubernetes.utils.quantity import parse_quantity

        try:
            return parse_quantity(desired) == parse_quantity(live)
        except ValueError:
            return False
    # The API server may return a number where the manifest had its string form (or the reverse).
    return isinstance(desired, int | float | str) and isinstance(live, int | float | str) and str(desired) == str(live)


def desired_diff(desired: Any, live: Any, path: str = "") -> list[str]:
    """The fields `desired` sets that the live object does not have as set ("path: live -> desired").

    Fields the live object has beyond `desired` (server defaults, status, managedFields) are not differences.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [f"{path or '.'}: live {_short(live)} -> desired {_short(desired)}"]
        out: list[str] = []
        for key, value in desired.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in live or live[key] is None and value is not None:
                out.append(f"{sub}: missing on the cluster -> desired {_short(value)}")
            else:
                out.extend(desired_diff(value, live[key], sub))
        return out
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            count = len(live) if isinstance(live, list) else "no"
            return [f"{path}: {count} live items -> {len(desired)} desired"]
        out = []
        for i, (d, lv) in enumerate(zip(desired, live, strict=True)):
            out.extend(desired_diff(d, lv, f"{path}[{i}]"))
        return out
    return [] if _same_scalar(path, desired, live) else [f"{path}: live {_short(live)} -> desired {_short(desired)}"]


def object_ready(obj: dict) -> tuple[bool, str]:
    """Whether a live object is ready, kubectl-rollout-status style, and why not."""
    kind, spec, status = obj.get("kind"), obj.get("spec") or {}, obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    if kind in ("Deployment", "StatefulSet"):
        want = spec.get("replicas", 1)
        if generation is not None and status.get("observedGeneration", 0) < generation:
            return False, f"generation {generation} not observed yet (observed {status.get('observedGeneration', 0)})"
        updated, ready = status.get("updatedReplicas", 0), status.get("readyReplicas", 0)
        available = status.get("availableReplicas", 0) if kind == "Deployment" else ready
        if updated < want or ready < want or available < want:
            return False, f"{ready}/{want} ready, {updated}/{want} updated"
        return True, f"{ready}/{want} ready"
    if kind == "Job":
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Failed" and condition.get("status") == "True":
                return False, f"failed: {condition.get('message') or condition.get('reason')}"
        want = spec.get("completions", 1)
        done = status.get("succeeded", 0)
        return (done >= want, f"{done}/{want} completions")
    return True, "exists"


def _strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "status"}


# ---- the API ------------------------------------------------------------------------------------------
class _Api:
    """GET, POST and merge-PATCH on any object by its REST path, and what a 404 or a refusal means for it."""

    def __init__(self, kube: KubeApi) -> None:
        self.kube = kube

    def get(self, doc: dict) -> dict | None:
        return self._request("get", doc, "GET", api_path(doc), missing_ok=True)

    def create(self, doc: dict) -> dict:
        return self._request("create", doc, "POST", api_path(doc, with_name=False), body=_strip(doc))

    def patch(self, doc: dict) -> dict:
        return self._request("patch", doc, "PATCH", api_path(doc), body=_strip(doc), content_type="application/merge-patch+json")

    def _request(
        self,
        verb: str,
        doc: dict,
        method: str,
        path: str,
        body: dict | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> dict | None:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else '""'
        namespace = doc["metadata"].get("namespace", "")
        return self.kube.request(
            verb,
            ApiTarget(describe(doc), f"{plural(doc['kind'])} (apiGroup {group})", namespace),
            method,
            path,
            body=body,
            query=[("fieldManager", FIELD_MANAGER)] if method != "GET" else None,
            content_type=content_type,
            missing_ok=missing_ok,
            meaning=lambda status, said: _meaning(status, said, verb, doc),
        )


def _meaning(status: int, said: str, verb: str, doc: dict) -> ClusterApplyError | None:
    if status == 404:
        return ClusterApplyError(
            f"{verb} {describe(doc)}: 404 ({said}). Does namespace {doc['metadata'].get('namespace', '')} exist, and does "
            f"the cluster serve {doc['apiVersion']}? Apply the foundation first: kubectl apply -k k8s/overlays/<env> "
            "(README, Run on Kubernetes)"
        )
    if status in (400, 422):
        return ClusterApplyError(f"the API server refused {verb} of {describe(doc)}: {said}")
    return None


@contextlib.contextmanager
def connect(host: str, in_cluster: bool, kubeconfig: str, kube_context: str, timeout_s: float) -> Iterator[_Api]:
    with kube_api(host, in_cluster, kubeconfig, kube_context, timeout_s, ERRORS) as kube:
        yield _Api(kube)


def apply_objects(api: _Api, docs: list[dict]) -> list[dict]:
    """Create, patch or leave each object; one row per object: kind, name, action, differing fields."""
    rows = []
    for doc in docs:
        live = api.get(doc)
        if live is None:
            api.create(doc)
            action, diff = CREATED, []
        else:
            diff = desired_diff(_strip(doc), live)
            if not diff:
                action = UNCHANGED
            elif doc["kind"] in IMMUTABLE_KINDS:
                action = DIFFERS
            else:
                api.patch(doc)
                action = UPDATED
        rows.append({"object": describe(doc), "action": action, "diff": diff})
    return rows


def rows_markdown(rows: list[dict]) -> str:
    lines = ["| object | action | what differed (live -> desired) |", "|---|---|---|"]
    for row in rows:
        diff = "<br>".join(d.replace("|", "\\|") for d in row["diff"][:20]) or "-"
        if len(row["diff"]) > 20:
            diff += f"<br>... {len(row['diff']) - 20} more"
        lines.append(f"| {row['object']} | {row['action']} | {diff} |")
    return "\n".join(lines)


def ready_markdown(rows: list[dict]) -> str:
    lines = ["| object | ready | state |", "|---|---|---|"]
    lines += [f"| {r['object']} | {r['ready']} | {r['state']} |" for r in rows]
    return "\n".join(lines)


def wait_ready(api: _Api, docs: list[dict], timeout_s: float, poll_s: float) -> tuple[bool, list[dict]]:
    """Poll until every object is ready or the deadline passes; one row per object with its state."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = []
        for doc in docs:
            live = api.get(doc)
            ready, why = (False, "missing on the cluster") if live is None else object_ready(live)
            rows.append({"object": describe(doc), "ready": ready, "state": why})
        if all(r["ready"] for r in rows) or time.monotonic() >= deadline:
            return all(r["ready"] for r in rows), rows
        time.sleep(poll_s)


def render_piece(manifests: str | Path, piece: str) -> list[dict]:
    directory = Path(manifests)
    if not (directory / "kustomization.yaml").is_file():
        raise ClusterApplyError(
            f"{directory} is not a kustomization directory (no kustomization.yaml); set manifests to k8s/overlays/<env>"
        )
    docs = piece_objects(render(directory), piece)
    if not docs:
        raise ClusterApplyError(f"{directory} renders no objects for {PIECES[piece].title}")
    return docs
