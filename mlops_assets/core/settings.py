"""The one module that reads the environment.

Everything else receives a `Settings` value (or a resource built from it), so tests can point the
whole project at a temporary `MLOPS_HOME` without reloading modules, and importing the code
location never touches the network, MLflow or the filesystem. The MLflow client is the exception
that proves the rule: it reads its HTTP settings from the environment on every request, so the
defaults the project wants for it are set here too (`apply_mlflow_client_env`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

LOCAL = "local"
KUBERNETES = "kubernetes"
ENVIRONMENTS = (LOCAL, KUBERNETES)
#: Where `PrometheusMetrics` finds request counts: the local router, Knative's queue-proxy (1.19+) or Istio.
METRICS_SOURCES = ("router", "knative", "istio")
#: The source on a cluster unless MLOPS_METRICS_SOURCE says otherwise: the Istio sidecars, which the
#: cluster path requires anyway; Knative's queue-proxy metrics are off until config-observability turns
#: them on (k8s/metrics/README.md).
KUBERNETES_METRICS_SOURCE = "istio"

#: The namespace of the InferenceServices (MLOPS_NAMESPACE): `mlops-serving` in k8s/ (the InferenceServices,
#: the rollout Role and the `mlops-env` ConfigMap); the platform itself runs in `mlops`.
DEFAULT_NAMESPACE = "mlops-serving"


def _int_list(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",")]


#: The MLOPS_ROLLOUT_* variables: the `RolloutPolicy` field each one sets, how its value is read, and the default.
#: This is where these defaults are written: RolloutPolicy's fields (and through them the canary analysis's
#: `Thresholds` and the A/B test's defaults) take them from here; the policy's other defaults are its own.
ROLLOUT_VARIABLES: dict[str, tuple[str, Callable[[str], object], object]] = {
    "MLOPS_ROLLOUT_STEPS": ("steps", _int_list, (5, 25, 50)),
    "MLOPS_ROLLOUT_MIN_REQUESTS": ("min_requests_per_step", int, 100),
    "MLOPS_ROLLOUT_MAX_ERROR_RATE": ("max_error_rate", float, 0.01),
    "MLOPS_ROLLOUT_MAX_P95_S": ("max_p95_latency_s", float, 0.5),
    "MLOPS_ROLLOUT_POLL_S": ("poll_s", float, 2.0),
    "MLOPS_ROLLOUT_AB_BASE_RATE": ("ab_base_rate", float, 0.05),
    "MLOPS_ROLLOUT_AB_MIN_LIFT": ("ab_min_lift", float, 0.10),
}
#: Shadow traffic: at most this many mirrored copies wait on the candidate at once (the router's default and
#: `RolloutPolicy.shadow_max_in_flight`'s); past it a copy is dropped and counted. A local model server is one
#: process: two copies keep it busy (one computed, one queued), and more only queue there while taking CPU
#: from the stable server beside it. On 2 cores, under a load that saturates the stable server, mirroring
#: every request cost the primary 11% of its throughput at 8, 7-9% at 4 and 4% at 2 (bench/RESULTS.md,
#: "Shadow traffic"); below saturation the bound is never reached.
SHADOW_MAX_IN_FLIGHT = 2
#: RolloutPolicy field -> default, for the fields the MLOPS_ROLLOUT_* variables set.
ROLLOUT_DEFAULTS: dict[str, object] = {field: default for field, _parse, default in ROLLOUT_VARIABLES.values()}


def _shown(default: object) -> str:
    """A default as the variable would spell it: `5,25,50`, `100`, `0.01`."""
    if isinstance(default, tuple | list):
        return ",".join(str(x) for x in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


#: Every variable the project reads, with its default (the README's configuration table).
VARIABLES: dict[str, str] = {
    "MLOPS_ENV": LOCAL,
    "MLOPS_HOME": ".mlops",
    "MLOPS_MLFLOW_TRACKING_URI": "sqlite:///$MLOPS_HOME/mlflow/mlflow.db",
    "MLOPS_MLFLOW_UI_PORT": "5055",
    "MLOPS_PROMETHEUS_PORT": "9095",
    "MLOPS_PROMETHEUS_URL": "(local: the embedded Prometheus, if installed)",
    "MLOPS_METRICS_SOURCE": f"router (kubernetes: {KUBERNETES_METRICS_SOURCE})",
    "MLOPS_NAMESPACE": DEFAULT_NAMESPACE,
    "MLOPS_K8S_MANIFESTS": "k8s/overlays/prod (kubernetes: the kustomization the platform assets apply)",
    "MLOPS_RECENT_WINDOW_S": "3600",
    "MLOPS_ALERT_FOR_MAX_S": "(none: the rules' own `for:`)",
    "MLOPS_SHADOW_CAPTURE": "false",
    **{name: _shown(default) for name, (_field, _parse, default) in ROLLOUT_VARIABLES.items()},
}

#: What an MLflow client talking to a tracking server over HTTP should use, unless the environment says otherwise:
#: MLflow's own defaults (7 retries with backoff, a 120 s timeout) take minutes against a dead server, longer than
#: a sensor tick or an asset should hang. MLflow reads these variables on every request.
MLFLOW_CLIENT_ENV: dict[str, str] = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: The payload sink's MLflow client: a store that is down must not hold a flush for minutes; the batch stays
#: buffered and the next flush tries again.
PAYLOAD_SINK_MLFLOW_CLIENT_ENV: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
#: MLflow's own default for MLFLOW_HTTP_REQUEST_TIMEOUT, in seconds.
MLFLOW_DEFAULT_HTTP_TIMEOUT_S = "120"


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
    # kubernetes: KServe's payload logger logs answers and X-Request-Id too, so shadow runs can pair them
    # (KubernetesPlatform.shadow_capture). Turning it on changes the predictor spec: each model's next deploy
    # cuts a new revision, and a shadow needs both its revisions cut with it.
    shadow_capture: bool = False

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.home / "mlflow" / "artifacts"

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


def _flag(environ: Mapping[str, str], name: str) -> bool:
    """`true` or `false` (any case, default from VARIABLES), or a SettingsError naming the variable."""
    raw = environ.get(name, VARIABLES[name])
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    return value == "true"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the environment once; raise `SettingsError` naming any bad variable."""
    environ = os.environ if environ is None else environ
    env = environ.get("MLOPS_ENV", LOCAL).strip().lower()
    if env not in ENVIRONMENTS:
        raise SettingsError(f"MLOPS_ENV={env!r}: expected one of {', '.join(ENVIRONMENTS)}")
    home = Path(environ.get("MLOPS_HOME", VARIABLES["MLOPS_HOME"])).expanduser().resolve()
    tracking = environ.get("MLOPS_MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow/mlflow.db"
    prometheus_port = _port(environ, "MLOPS_PROMETHEUS_PORT")
    default_source = KUBERNETES_METRICS_SOURCE if env == KUBERNETES else "router"
    metrics_source = (environ.get("MLOPS_METRICS_SOURCE") or default_source).strip().lower()
    if metrics_source not in METRICS_SOURCES:
        raise SettingsError(f"MLOPS_METRICS_SOURCE={metrics_source!r}: expected one of {', '.join(METRICS_SOURCES)}")
    rollout = {}
    try:
        for name, (key, parse, _default) in ROLLOUT_VARIABLES.items():
            if name in environ:
                rollout[key] = parse(environ[name])
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
        shadow_capture=_flag(environ, "MLOPS_SHADOW_CAPTURE"),
    )


def apply_mlflow_client_env(
    defaults: Mapping[str, str] = MLFLOW_CLIENT_ENV, environ: MutableMapping[str, str] | None = None
) -> None:
    """Set each MLflow client variable in `defaults` that the environment does not set already.

    Called where an HTTP MLflow client is opened (`MlflowRegistry.client`), so every process that talks to a
    tracking server gets them, whoever started it; a value set by the operator always wins.
    """
    environ = os.environ if environ is None else environ
    for name, value in defaults.items():
        environ.setdefault(name, value)


def mlflow_tracking_uri_env(environ: Mapping[str, str] | None = None) -> str:
    """MLFLOW_TRACKING_URI as MLflow's own clients read it ("" when unset): what the payload sink's
    Deployment sets to find the tracking server."""
    environ = os.environ if environ is None else environ
    return environ.get("MLFLOW_TRACKING_URI", "")


def dagster_home_for(settings: Settings, environ: Mapping[str, str] | None = None) -> Path:
    """DAGSTER_HOME if set, else `$MLOPS_HOME/dagster`: where the CLI keeps the Dagster instance."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("DAGSTER_HOME") or settings.home / "dagster").resolve()


def mlflow_http_timeout_s(environ: Mapping[str, str] | None = None) -> str:
    """The MLflow client's HTTP timeout in seconds, as MLflow reads it (for messages about a timed-out request)."""
    environ = os.environ if environ is None else environ
    return environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", MLFLOW_DEFAULT_HTTP_TIMEOUT_S)
