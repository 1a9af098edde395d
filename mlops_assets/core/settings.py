"""The one module that reads the environment.

Everything else receives a `Settings` value (or a resource built from it), so tests can point the
whole project at a temporary `MLOPS_HOME` without reloading modules, and importing the code
location never touches the network, MLflow or the filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOCAL = "local"
KUBERNETES = "kubernetes"
ENVIRONMENTS = (LOCAL, KUBERNETES)
#: Where `PrometheusMetrics` finds request counts: the local router, Knative's queue-proxy or Istio.
METRICS_SOURCES = ("router", "knative", "istio")

#: Every variable the project reads, with its default (the README's configuration table).
VARIABLES: dict[str, str] = {
    "MLOPS_ENV": LOCAL,
    "MLOPS_HOME": ".mlops",
    "MLOPS_MLFLOW_TRACKING_URI": "sqlite:///$MLOPS_HOME/mlflow/mlflow.db",
    "MLOPS_MLFLOW_UI_PORT": "5055",
    "MLOPS_PROMETHEUS_PORT": "9095",
    "MLOPS_PROMETHEUS_URL": "(local: the embedded Prometheus, if installed)",
    "MLOPS_METRICS_SOURCE": "router (kubernetes: knative)",
    "MLOPS_NAMESPACE": "mlops",
    "MLOPS_K8S_MANIFESTS": "k8s/overlays/prod (kubernetes: the kustomization the platform assets apply)",
    "MLOPS_RECENT_WINDOW_S": "3600",
    "MLOPS_ALERT_FOR_MAX_S": "(none: the rules' own `for:`)",
    "MLOPS_ROLLOUT_STEPS": "5,25,50",
    "MLOPS_ROLLOUT_MIN_REQUESTS": "100",
    "MLOPS_ROLLOUT_MAX_ERROR_RATE": "0.01",
    "MLOPS_ROLLOUT_MAX_P95_S": "0.5",
    "MLOPS_ROLLOUT_POLL_S": "2",
    "MLOPS_ROLLOUT_AB_BASE_RATE": "0.05",
    "MLOPS_ROLLOUT_AB_MIN_LIFT": "0.10",
}


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    env: str
    home: Path
    mlflow_tracking_uri: str
    mlflow_ui_port: int
    prometheus_port: int
    prometheus_url: str | None
    namespace: str
    recent_window_s: float = 3600.0
    rollout: dict = None  # RolloutPolicy overrides from MLOPS_ROLLOUT_*
    metrics_source: str = "router"  # one of METRICS_SOURCES
    k8s_manifests: str = ""  # kubernetes: the kustomization directory the platform assets apply ("" = k8s/overlays/prod)
    alert_for_max_s: float | None = None  # local: cap on the alert rules' `for:` (the demo's compressed time)

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.home / "mlflow" / "artifacts"

    @property
    def serving_dir(self) -> Path:
        return self.home / "serving"

    @property
    def mlflow_ui_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_ui_port}"


def _number(environ: Mapping[str, str], name: str, cast: type, what: str, valid, rule: str):
    """`name` parsed with `cast` (default from VARIABLES), or a SettingsError naming the variable."""
    raw = environ.get(name, VARIABLES[name])
    try:
        value = cast(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {what}") from None
    if not valid(value):
        raise SettingsError(f"{name}={value} {rule}")
    return value


def _port(environ: Mapping[str, str], name: str) -> int:
    return _number(environ, name, int, "a port number", lambda v: 1 <= v <= 65535, "is outside 1-65535")


def _positive(environ: Mapping[str, str], name: str) -> float:
    return _number(environ, name, float, "a number", lambda v: v > 0, "must be positive")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the environment once; raise `SettingsError` naming any bad variable."""
    environ = os.environ if environ is None else environ
    env = environ.get("MLOPS_ENV", LOCAL).strip().lower()
    if env not in ENVIRONMENTS:
        raise SettingsError(f"MLOPS_ENV={env!r}: expected one of {', '.join(ENVIRONMENTS)}")
    home = Path(environ.get("MLOPS_HOME", VARIABLES["MLOPS_HOME"])).expanduser().resolve()
    tracking = environ.get("MLOPS_MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow/mlflow.db"
    prometheus_port = _port(environ, "MLOPS_PROMETHEUS_PORT")
    metrics_source = (environ.get("MLOPS_METRICS_SOURCE") or ("knative" if env == KUBERNETES else "router")).strip().lower()
    if metrics_source not in METRICS_SOURCES:
        raise SettingsError(f"MLOPS_METRICS_SOURCE={metrics_source!r}: expected one of {', '.join(METRICS_SOURCES)}")
    rollout = {}
    try:
        if "MLOPS_ROLLOUT_STEPS" in environ:
            rollout["steps"] = [int(x) for x in environ["MLOPS_ROLLOUT_STEPS"].split(",")]
        for name, key, cast in (
            ("MLOPS_ROLLOUT_MIN_REQUESTS", "min_requests_per_step", int),
            ("MLOPS_ROLLOUT_MAX_ERROR_RATE", "max_error_rate", float),
            ("MLOPS_ROLLOUT_MAX_P95_S", "max_p95_latency_s", float),
            ("MLOPS_ROLLOUT_POLL_S", "poll_s", float),
            ("MLOPS_ROLLOUT_AB_BASE_RATE", "ab_base_rate", float),
            ("MLOPS_ROLLOUT_AB_MIN_LIFT", "ab_min_lift", float),
        ):
            if name in environ:
                rollout[key] = cast(environ[name])
    except ValueError as exc:
        raise SettingsError(f"bad MLOPS_ROLLOUT_* value: {exc}") from None
    return Settings(
        env=env,
        home=home,
        mlflow_tracking_uri=tracking,
        mlflow_ui_port=_port(environ, "MLOPS_MLFLOW_UI_PORT"),
        prometheus_port=prometheus_port,
        prometheus_url=environ.get("MLOPS_PROMETHEUS_URL") or None,
        namespace=environ.get("MLOPS_NAMESPACE", VARIABLES["MLOPS_NAMESPACE"]),
        rollout=rollout,
        recent_window_s=_positive(environ, "MLOPS_RECENT_WINDOW_S"),
        metrics_source=metrics_source,
        k8s_manifests=environ.get("MLOPS_K8S_MANIFESTS", ""),
        alert_for_max_s=_positive(environ, "MLOPS_ALERT_FOR_MAX_S") if environ.get("MLOPS_ALERT_FOR_MAX_S") else None,
    )
