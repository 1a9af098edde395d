"""`prometheus_alert_sensor`: alerts on a model act on their own.

A latency or error-rate alert on a model's stable revision launches `rollback_job` (traffic back to
the previous good revision, which LocalPlatform and KServe keep warm). A drift alert launches
`retrain_job` on recent traffic; the new version then goes through the canary that
`mlflow_registry_sensor` starts, closing the loop. Run keys make each alert act once per firing;
Prometheus down means a skipped tick that says so.
"""

import dagster as dg

from mlops_assets.core.monitoring.alerts import RETRAIN_ALERTS, ROLLBACK_ALERTS, AlertsUnavailableError, PrometheusAlerts
from mlops_assets.core.serving.manifest import ISVC_TAG
from mlops_assets.core.serving.platform import ServingPlatform, UnknownServiceError
from mlops_assets.defs.models.assets import declared_models, retrain_job
from mlops_assets.defs.serving.assets import ROLLBACK, ROLLOUT_TAG
from mlops_assets.defs.serving.jobs import rollback_job


@dg.sensor(
    name="prometheus_alert_sensor",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    jobs=[rollback_job, retrain_job],
    description="Rolls back on latency/error alerts of a stable revision; retrains on drift alerts.",
)
def prometheus_alert_sensor(
    context: dg.SensorEvaluationContext,
    prometheus_alerts: dg.ResourceParam[PrometheusAlerts],
    serving: dg.ResourceParam[ServingPlatform],
):
    try:
        alerts = prometheus_alerts.firing()
    except AlertsUnavailableError as exc:
        return dg.SkipReason(f"{exc}; nothing acted on")
    by_isvc = {d.isvc: d for d in declared_models(context.repository_def).values()}
    requests, notes = [], []
    for alert in alerts:
        labels = alert.get("labels", {})
        name, isvc = labels.get("alertname", ""), labels.get("isvc", "")
        declaration = by_isvc.get(isvc)
        if declaration is None or name not in ROLLBACK_ALERTS | RETRAIN_ALERTS:
            continue
        model = declaration.name
        summary = (alert.get("annotations") or {}).get("summary", name)
        if name in ROLLBACK_ALERTS:
            try:
                status = serving.status(isvc)
            except UnknownServiceError:
                notes.append(f"{name} on unknown service {isvc}")
                continue
            revision = labels.get("revision")
            if revision != status.latest_rolledout or not status.previous_rolledout:
                notes.append(f"{name} on {isvc}/{revision}: not the stable revision, or nothing to roll back to")
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"rollback:{isvc}:{revision}",
                    job_name="rollback_job",
                    run_config={"ops": {f"serving__{model}": {"config": {"triggered_by": f"alert {name}: {summary}"}}}},
                    asset_selection=[dg.AssetKey(["serving", model]), dg.AssetKey(["models", f"{model}_champion"])],
                    tags={ISVC_TAG: isvc, "mlops-assets/alert": name, ROLLOUT_TAG: ROLLBACK},
                )
            )
        elif declaration.training is None:
            notes.append(f"{name} on {isvc}: {model} is trained outside the platform; register a retrained version in MLflow")
        else:
            requests.append(
                dg.RunRequest(
                    run_key=f"retrain:{isvc}:{alert.get('activeAt', '')}",
                    job_name="retrain_job",
                    run_config={
                        "ops": {f"models__{model}": {"config": {"recent_data": True, "triggered_by": f"alert {name}: {summary}"}}}
                    },
                    asset_selection=[dg.AssetKey(["models", model])],
                    tags={"mlops-assets/alert": name, ISVC_TAG: isvc},
                )
            )
    if not requests:
        return dg.SkipReason(
            "; ".join(notes) or f"{len(alerts)} firing alert(s), none for a served model's rollback or retraining"
        )
    return requests


defs = dg.Definitions(sensors=[prometheus_alert_sensor])
