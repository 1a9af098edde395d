"""`monitoring/<name>_drift`: is the traffic a served model sees still like its training data?

Reference: the training-data snapshot logged with the serving version's MLflow run (its profile,
with sorted numeric values, is cached per run under MLOPS_HOME). Current: the recent inference
payloads the serving path logged. Per feature a KS or chi-square test, Benjamini-Hochberg across
features and an effect-size floor (`mlops_assets/core/monitoring/drift.py`); the asset records the
table, an HTML report with one histogram per feature, and publishes the scores as Prometheus
gauges, where the ModelDriftDetected alert (and `prometheus_alert_sensor`) take over.
"""

import math
import time
from pathlib import Path

import dagster as dg

from mlops_assets.core.kube import run_pod_tags
from mlops_assets.core.monitoring.drift import DriftConfig
from mlops_assets.core.registry import MlflowRegistry
from mlops_assets.core.serving.manifest import isvc_name_for
from mlops_assets.core.serving.platform import ServingPlatform
from mlops_assets.defs.models.assets import MODEL_NAMES

GROUP = "monitoring"
CHECK_DRIFT_SHARE = "drift_share"


def _reference_profile(registry: MlflowRegistry, run_id: str, cache_dir: Path):
    """The training snapshot's profile (sorted numeric values, category counts), cached per run."""
    from mlops_assets.core.monitoring.drift import ReferenceProfile
    from mlops_assets.demo.data import CATEGORICAL_FEATURES, NUMERIC_FEATURES

    cached = cache_dir / f"{run_id}.npz"
    if cached.exists():
        return ReferenceProfile.from_npz(cached)
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(run_id=run_id, artifact_path="reference/training_data.parquet", tracking_uri=registry.tracking_uri)
    profile = ReferenceProfile.from_frame(pd.read_parquet(path), NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    cache_dir.mkdir(parents=True, exist_ok=True)
    profile.to_npz(cached)
    return profile


def build_drift_asset(model_name: str) -> tuple[dg.AssetsDefinition, dg.AssetChecksDefinition]:
    isvc = isvc_name_for(model_name)
    key = dg.AssetKey(["monitoring", f"{model_name}_drift"])

    @dg.asset(key=key, group_name=GROUP, deps=[dg.AssetKey(["serving", model_name])], kinds={"scipy"})
    def _drift(
        context: dg.AssetExecutionContext,
        mlflow: dg.ResourceParam[MlflowRegistry],
        serving: dg.ResourceParam[ServingPlatform],
        drift_policy: dg.ResourceParam[DriftConfig],
    ) -> dg.MaterializeResult:
        """Drift of the live traffic against the serving version's training data: per-feature KS or
        chi-square, Benjamini-Hochberg corrected, with an effect-size floor; a table, an HTML report
        with a histogram per feature, and Prometheus gauges for alerting."""
        from mlops_assets.core.monitoring.drift import detect_drift
        from mlops_assets.core.monitoring.report import drift_plot_png, render_html
        from mlops_assets.demo.data import FEATURES

        status = serving.status(isvc)
        version = mlflow.get_version(model_name, status.stable_version)
        home = Path(drift_policy.home)
        profile = _reference_profile(mlflow, version.run_id, home / "monitoring" / "profiles")
        current = serving.recent_payloads(isvc, FEATURES, drift_policy.max_rows)
        context.log.info(f"{isvc}: {len(current)} recent rows vs {profile.n_rows} training rows of v{version.version}")
        report = detect_drift(profile, current, drift_policy)
        out = home / "monitoring" / model_name
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        html = render_html(report, profile, current, out / f"drift-{stamp}.html")
        png = drift_plot_png(report, out / f"drift-{stamp}.png")
        scores = {f.feature: f.effect_size for f in report.features if f.tested and math.isfinite(f.effect_size)}
        try:
            serving.publish_drift(isvc, float(report.drift_share), scores)
        except (NotImplementedError, RuntimeError, OSError) as exc:
            context.log.warning(f"drift gauges not published: {exc}")
        summary = report.summary()
        context.log.info(f"{isvc}: {summary['dataset_verdict']}, drifted {summary['drifted_features']}")
        return dg.MaterializeResult(
            metadata={
                "dataset_verdict": summary["dataset_verdict"],
                "drift_share": float(report.drift_share),
                "drifted_features": ", ".join(summary["drifted_features"]) or "-",
                "n_reference": report.n_reference,
                "n_current": report.n_current,
                "model_version": version.version,
                "features": dg.MetadataValue.md(report.to_markdown()),
                "report": dg.MetadataValue.path(str(html)),
                "report_url": dg.MetadataValue.url(html.as_uri()),
                "plot": dg.MetadataValue.path(str(png)),
                "details": dg.MetadataValue.json(summary),
            }
        )

    @dg.asset_check(asset=key, name=CHECK_DRIFT_SHARE)
    def _share(context: dg.AssetCheckExecutionContext, drift_policy: dg.ResourceParam[DriftConfig]) -> dg.AssetCheckResult:
        """The share of drifting features is at most the policy's drift_share_threshold."""
        event = context.instance.get_latest_materialization_event(key)
        meta = event.asset_materialization.metadata if event else {}
        severity = dg.AssetCheckSeverity[drift_policy.check_severity]
        if "drift_share" not in meta or meta["dataset_verdict"].value == "insufficient_data":
            return dg.AssetCheckResult(passed=False, severity=severity, metadata={"note": "no testable data yet"})
        share = meta["drift_share"].value
        return dg.AssetCheckResult(
            passed=share <= drift_policy.drift_share_threshold,
            severity=severity,
            metadata={
                "observed": share,
                "threshold": drift_policy.drift_share_threshold,
                "drifted": meta["drifted_features"].value,
            },
        )

    return _drift, _share


_built = [build_drift_asset(name) for name in MODEL_NAMES]
drift_assets = [a for a, _ in _built]
drift_checks = [c for _, c in _built]
monitor_drift_job = dg.define_asset_job(
    "monitor_drift_job",
    selection=dg.AssetSelection.assets(*drift_assets),
    description="Compute drift reports for every served model.",
    # On a cluster: the reference profile is 16 B per training value, plus a batch of up to 200k payload rows.
    tags=run_pod_tags(cpu="1", memory="2Gi", memory_limit="4Gi"),
)
defs = dg.Definitions(assets=drift_assets, asset_checks=drift_checks, jobs=[monitor_drift_job])
