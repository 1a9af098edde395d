"""Prometheus's alerts API as a resource: the firing alerts that the alert sensor acts on."""

from __future__ import annotations

from mlops_assets.core import http
from mlops_assets.core.config import EngineConfig

#: Alert names from the shipped rules file (k8s/base/monitoring/rules/mlops-alerts.yaml).
#: The router's alerts (local) and the Istio sidecars' (cluster); both label `isvc` and `revision`.
ROLLBACK_ALERTS = {
    "InferenceHighErrorRate",
    "InferenceHighLatencyP95",
    "InferenceHighErrorRateMesh",
    "InferenceHighLatencyP95Mesh",
}
RETRAIN_ALERTS = {"ModelDriftDetected"}


class AlertsUnavailableError(RuntimeError):
    """Prometheus cannot be reached or answered an error."""


class PrometheusAlerts(EngineConfig):
    """Reads firing alerts from Prometheus's HTTP API (`/api/v1/alerts`)."""

    url: str
    timeout_s: float = 5.0

    def firing(self) -> list[dict]:
        try:
            body = http.get_json(f"{self.url.rstrip('/')}/api/v1/alerts", timeout=self.timeout_s)
        except http.HttpUnavailableError as exc:
            raise AlertsUnavailableError(f"Prometheus at {self.url} is unreachable: {exc}") from exc
        if body.get("status") != "success":
            raise AlertsUnavailableError(f"Prometheus at {self.url} answered {body.get('error')}")
        return [a for a in body["data"]["alerts"] if a.get("state") == "firing"]
