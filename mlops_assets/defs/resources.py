"""The one place that picks implementations for the environment (MLOPS_ENV)."""

from __future__ import annotations

import dagster as dg

from mlops_assets.core.monitoring.alerts import PrometheusAlerts
from mlops_assets.core.monitoring.drift import DriftConfig
from mlops_assets.core.platform.backends import ClusterPlatformServices, LocalPlatformServices
from mlops_assets.core.platform.services import SLO_ALERTS
from mlops_assets.core.registry import MlflowRegistry
from mlops_assets.core.rollout.policy import RolloutPolicy
from mlops_assets.core.serving.metrics import PrometheusMetrics, ScrapeMetrics
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets.core.settings import KUBERNETES, Settings, SettingsError, load_settings


def build_resources(settings: Settings) -> dict:
    registry = MlflowRegistry(
        tracking_uri=settings.mlflow_tracking_uri,
        artifact_root=str(settings.mlflow_artifact_root),
        ui_url=settings.mlflow_ui_url,
    )
    if settings.prometheus_url:
        metrics = PrometheusMetrics(url=settings.prometheus_url, source=settings.metrics_source, namespace=settings.namespace)
    else:
        metrics = ScrapeMetrics()
    if settings.env == KUBERNETES:
        from mlops_assets.core.serving.kubernetes import (
            ARTIFACTS_DESTINATION,
            KSERVE_SERVICE_ACCOUNT,
            PAYLOAD_SINK_URL,
            KubernetesPlatform,
        )
        from mlops_assets.core.serving.wire import store_for

        if not settings.prometheus_url:
            raise SettingsError("MLOPS_ENV=kubernetes needs MLOPS_PROMETHEUS_URL (the cluster's Prometheus)")
        return {
            "mlflow": registry,
            "serving": KubernetesPlatform(
                namespace=settings.namespace,
                in_cluster=True,
                payload_sink_url=PAYLOAD_SINK_URL,
                service_account=KSERVE_SERVICE_ACCOUNT,
                artifacts_destination=ARTIFACTS_DESTINATION,
                payload_store=store_for(settings.mlflow_tracking_uri) if settings.mlflow_tracking_uri.startswith("http") else "",
                recent_window_s=settings.recent_window_s,
                shadow_capture=settings.shadow_capture,
            ),
            "metrics": metrics,
            "prometheus_alerts": PrometheusAlerts(url=settings.prometheus_url),
            "rollout_policy": RolloutPolicy(**(settings.rollout or {})),
            "drift_policy": DriftConfig(home=str(settings.home)),
            "platform_services": ClusterPlatformServices(
                **({"manifests": settings.k8s_manifests} if settings.k8s_manifests else {})
            ),
        }
    policy = RolloutPolicy(**(settings.rollout or {}))
    return {
        "mlflow": registry,
        "serving": LocalPlatform(home=str(settings.home), namespace=settings.namespace, recent_window_s=settings.recent_window_s),
        "metrics": metrics,
        "prometheus_alerts": PrometheusAlerts(url=settings.prometheus_url or f"http://127.0.0.1:{settings.prometheus_port}"),
        "drift_policy": DriftConfig(home=str(settings.home)),
        "rollout_policy": policy,
        "platform_services": LocalPlatformServices(
            home=str(settings.home),
            tracking_uri=settings.mlflow_tracking_uri,
            mlflow_ui_port=settings.mlflow_ui_port,
            prometheus_port=settings.prometheus_port,
            alert_for_max_s=settings.alert_for_max_s,
            slo={field: getattr(policy, field) for field in SLO_ALERTS.values()},
        ),
    }


@dg.definitions
def resources() -> dg.Definitions:
    """Resources for the environment, read when the code location loads (never at import)."""
    return dg.Definitions(resources=build_resources(load_settings()))
