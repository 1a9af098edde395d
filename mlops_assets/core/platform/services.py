"""The platform pieces that run beside the models: the MLflow tracking server (its UI) and Prometheus.

Locally they are detached processes on 127.0.0.1 with pid files under `MLOPS_HOME/platform`, started
idempotently (an asset materialized twice does not start a second copy) and stopped by
`mlops-assets stop`. On a cluster the same pieces come from the manifests in `k8s/`.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from mlops_assets.core import processes

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: mlops-serving
    file_sd_configs:
      - files: ['{targets}']
        refresh_interval: 5s
  - job_name: mlflow
    static_configs:
      - targets: ['127.0.0.1:{mlflow_port}']
"""
#: The alert rules shipped in k8s/; the local Prometheus uses a copy with the policy's thresholds (`local_rules`).
RULES_FILE = Path(__file__).resolve().parents[3] / "k8s" / "base" / "monitoring" / "rules" / "mlops-alerts.yaml"


def _pid_file(home: Path, name: str) -> Path:
    return home / "platform" / f"{name}.pid"


def running(home: Path, name: str) -> processes.ProcessRecord | None:
    record = processes.read_record(_pid_file(home, name))
    return record if record is not None and processes.is_alive(record) else None


#: MLflow's server starts ~15 processes and 3 GB for job execution, which nothing here uses.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(tracking_uri: str, port: int, *extra: str) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port` with one worker (the venv's own `mlflow`), plus `extra` options."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]


def start_mlflow_ui(home: Path, tracking_uri: str, artifact_root: Path, port: int) -> processes.ProcessRecord:
    """The MLflow tracking server for its UI: loopback, one worker, no job execution."""
    record = running(home, "mlflow-server")
    if record is not None:
        return record
    processes.ensure_port_free(port)
    artifact_root.mkdir(parents=True, exist_ok=True)
    cmd = mlflow_server_command(
        tracking_uri,
        port,
        "--default-artifact-root",
        artifact_root.as_uri(),
        # /metrics for Prometheus, so the MLflowDown alert has something to watch.
        "--expose-prometheus",
        str(home / "mlflow" / "prometheus"),
    )
    record = processes.spawn(
        cmd,
        port=port,
        pid_file=_pid_file(home, "mlflow-server"),
        log_file=home / "logs" / "mlflow-server.log",
        env=MLFLOW_SERVER_ENV,
    )
    processes.wait_http(record, "/health", 90, "MLflow tracking server")
    return record


_DURATION = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


#: The alerts that judge a revision against the rollout SLOs, and the policy field each compares with.
SLO_ALERTS = {"InferenceHighErrorRate": "max_error_rate", "InferenceHighLatencyP95": "max_p95_latency_s"}
#: Alerts that keep the rules' own `for:` whatever `max_for_s` says: latency. On a laptop or a CI box a burst of CPU
#: work (a Dagster run starting, a model server loading) slows every revision for a minute, which is not the model's
#: fault (measured in the demo beside the test lanes: a stable revision's p95 at 2-4 s for about a minute while a
#: new revision started, its own predict time 30x its median with its CPU share unchanged); only a p95 above the SLO
#: for the rule's 5 minutes is worth rolling the stable revision back. A CPU burst makes no model answer 5xx, and
#: drift is computed from payloads, so those alerts may be compressed.
UNCAPPED_ALERTS = re.compile(r".*Latency.*")
_SLO_COMPARISON = re.compile(r"\)\s*>\s*[0-9.eE+-]+")


def local_rules(
    home: Path, *, slo: dict[str, float] | None = None, max_for_s: float | None = None, source: Path = RULES_FILE
) -> Path:
    """The alert rules for the local Prometheus, written under `home/prometheus/` (the shipped rules
    are unchanged): the SLO alerts compare with the rollout policy's thresholds (`slo`, keyed by
    the fields in `SLO_ALERTS`), so an alert and a rollout judge one SLO; and every `for:` but the latency
    alerts' (`UNCAPPED_ALERTS`) is capped at `max_for_s` where the demo compresses time the way its rollout
    policy does."""
    import yaml

    doc = yaml.safe_load(source.read_text())
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            field = SLO_ALERTS.get(rule.get("alert", ""))
            if slo and field in slo:
                expr, found = _SLO_COMPARISON.subn(f") > {slo[field]:g}", rule["expr"], count=1)
                if not found:
                    raise ValueError(f"{source}: alert {rule['alert']} has no `) > threshold` comparison to set {field} in")
                rule["expr"] = expr
            match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(rule.get("for", "")))
            if UNCAPPED_ALERTS.fullmatch(rule.get("alert", "")):
                continue
            if max_for_s and match and int(match[1]) * _DURATION[match[2]] > max_for_s:
                rule["for"] = f"{max(1, round(max_for_s))}s"
    out = home / "prometheus" / "rules-local.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def start_prometheus(
    home: Path, port: int, interval: str = "2s", rules: list[Path] | None = None, mlflow_port: int = 5055
) -> processes.ProcessRecord:
    """Prometheus scraping every local router and model server (file-based discovery)."""
    record = running(home, "prometheus")
    if record is not None:
        return record
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not on PATH (Debian package `prometheus`)")
    processes.ensure_port_free(port)
    base = home / "prometheus"
    targets = base / "targets" / "serving.json"
    targets.parent.mkdir(parents=True, exist_ok=True)
    if not targets.exists():
        targets.write_text("[]")
    config = base / "prometheus.yml"
    text = PROMETHEUS_CONFIG.format(interval=interval, targets=targets, mlflow_port=mlflow_port)
    if rules:
        text += "rule_files:\n" + "".join(f"  - '{r}'\n" for r in rules)
    config.write_text(text)
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={base / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]
    record = processes.spawn(cmd, port=port, pid_file=_pid_file(home, "prometheus"), log_file=home / "logs" / "prometheus.log")
    processes.wait_http(record, "/-/ready", 60, "Prometheus")
    return record


def stop_all(home: Path) -> list[str]:
    stopped = []
    for name in ("mlflow-server", "prometheus"):
        record = running(home, name)
        if record is not None:
            processes.stop(record)
            stopped.append(name)
    return stopped
