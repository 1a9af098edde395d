"""The platform-services resource: what installs and describes the pieces around the models."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from mlops_assets.core import http
from mlops_assets.core.config import EngineConfig
from mlops_assets.core.platform import cluster, services


class PlatformServices(EngineConfig, ABC):
    """Installs and describes MLflow's stores and server, and Prometheus."""

    @abstractmethod
    def backend_store(self) -> dict:
        """Ensure MLflow's backend store exists and is migrated; describe it."""

    @abstractmethod
    def artifact_store(self) -> dict:
        """Ensure the artifact store exists; describe it."""

    @abstractmethod
    def tracking_server(self) -> dict:
        """Ensure the MLflow tracking server (UI) runs; describe it."""

    @abstractmethod
    def prometheus(self) -> dict:
        """Ensure Prometheus runs (where it can); describe it."""

    @abstractmethod
    def readiness(self, piece: str) -> dict:
        """Whether `piece` (a key of `cluster.PIECES`) serves: {"ready": bool, ...evidence}."""


class LocalPlatformServices(PlatformServices):
    """The embedded equivalents: SQLite, a directory, processes on 127.0.0.1."""

    home: str
    tracking_uri: str
    mlflow_ui_port: int
    prometheus_port: int
    #: Cap on the alert rules' `for:` durations (None: as written); the demo compresses them.
    alert_for_max_s: float | None = None
    #: The rollout policy's SLO thresholds the local alert rules compare with (see `services.SLO_ALERTS`).
    slo: dict[str, float] = {}

    @property
    def _home(self) -> Path:
        return Path(self.home)

    def backend_store(self) -> dict:
        from mlflow.tracking import MlflowClient

        path = Path(self.tracking_uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Any query creates and migrates the schema on first use.
        experiments = MlflowClient(tracking_uri=self.tracking_uri).search_experiments()
        return {
            "kind": "sqlite",
            "uri": self.tracking_uri,
            "bytes": path.stat().st_size if path.exists() else 0,
            "experiments": len(experiments),
        }

    def artifact_store(self) -> dict:
        root = self._home / "mlflow" / "artifacts"
        root.mkdir(parents=True, exist_ok=True)
        files = [p for p in root.rglob("*") if p.is_file()]
        return {
            "kind": "local directory",
            "uri": root.as_uri(),
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
        }

    def tracking_server(self) -> dict:
        record = services.start_mlflow_ui(self._home, self.tracking_uri, self._home / "mlflow" / "artifacts", self.mlflow_ui_port)
        return {"url": record.url, "pid": record.pid, "log": record.log}

    def prometheus(self) -> dict:
        if services.prometheus_binary() is None:
            return {"installed": False, "note": "prometheus not on PATH: metrics are scraped directly from the routers"}
        rules = []
        if services.RULES_FILE.exists():
            rules = [services.local_rules(self._home, slo=self.slo, max_for_s=self.alert_for_max_s)]
        record = services.start_prometheus(self._home, self.prometheus_port, rules=rules, mlflow_port=self.mlflow_ui_port)
        return {"installed": True, "url": record.url, "pid": record.pid, "log": record.log, "rules": ", ".join(map(str, rules))}

    def readiness(self, piece: str) -> dict:
        if piece == "backend_store":
            try:
                info = self.backend_store()
            except Exception as exc:  # noqa: BLE001 - any failure to query the store is "not ready", with the reason
                return {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
            return {"ready": True, "uri": info["uri"], "experiments": info["experiments"]}
        if piece == "artifact_store":
            root = self._home / "mlflow" / "artifacts"
            ready = root.is_dir() and os.access(root, os.W_OK)
            return {"ready": ready, "uri": root.as_uri(), "state": "writable directory" if ready else "missing or not writable"}
        if piece == "tracking_server":
            return self._serving("mlflow-server", "/health")
        if piece == "prometheus":
            if services.prometheus_binary() is None:
                return {"ready": True, "installed": False, "note": "not installed: rollouts read metrics from the routers"}
            return self._serving("prometheus", "/-/ready")
        raise ValueError(f"unknown platform piece {piece!r}; expected one of {', '.join(cluster.PIECES)}")

    def _serving(self, name: str, path: str) -> dict:
        record = services.running(self._home, name)
        if record is None:
            return {"ready": False, "state": f"{name} is not running (materialize the asset to start it)"}
        try:
            status = http.request(record.url + path, timeout=5).status
        except http.HttpUnavailableError as exc:
            return {"ready": False, "url": record.url, "state": f"does not answer {path}: {exc}"}
        if status != 200:
            return {"ready": False, "url": record.url, "state": f"{path} answered {status}"}
        return {"ready": True, "url": record.url, "pid": record.pid, "state": f"answers {path}"}


class ClusterPlatformServices(PlatformServices):
    """The pieces on a Kubernetes cluster, reconciled from the rendered overlay (see `platform.cluster`)."""

    manifests: str = str(cluster.K8S_DIR / "overlays" / "prod")  # a kustomization directory
    in_cluster: bool = True  # use the pod's ServiceAccount token
    kubeconfig: str = ""  # with in_cluster=False: this kubeconfig file ("" = the default one)
    kube_context: str = ""
    host: str = ""  # an explicit API server URL without credentials (kubectl proxy, tests); wins over the above
    request_timeout_s: float = 30.0
    ready_timeout_s: float = 300.0
    poll_s: float = 2.0

    def _connect(self):
        return cluster.connect(self.host, self.in_cluster, self.kubeconfig, self.kube_context, self.request_timeout_s)

    def reconcile(self, piece: str) -> dict:
        docs = cluster.render_piece(self.manifests, piece)
        with self._connect() as api:
            rows = cluster.apply_objects(api, docs)
        actions = (cluster.CREATED, cluster.UPDATED, cluster.UNCHANGED)
        counts = {action: sum(r["action"] == action for r in rows) for action in actions}
        return {
            "kind": cluster.PIECES[piece].title,
            "manifests": self.manifests,
            **counts,
            "drifted": sum(bool(r["diff"]) for r in rows),
            "objects": cluster.rows_markdown(rows),
        }

    def backend_store(self) -> dict:
        return self.reconcile("backend_store")

    def artifact_store(self) -> dict:
        return self.reconcile("artifact_store")

    def tracking_server(self) -> dict:
        return self.reconcile("tracking_server")

    def prometheus(self) -> dict:
        return self.reconcile("prometheus")

    def readiness(self, piece: str) -> dict:
        docs = cluster.render_piece(self.manifests, piece)
        with self._connect() as api:
            ready, rows = cluster.wait_ready(api, docs, self.ready_timeout_s, self.poll_s)
        return {
            "ready": ready,
            "objects": cluster.ready_markdown(rows),
            "waited_up_to_s": self.ready_timeout_s,
        }
