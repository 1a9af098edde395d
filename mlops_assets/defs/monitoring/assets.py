"""`monitoring/<name>_drift`: is the traffic a served model sees still like its training data?

Reference: the training-data snapshot logged with the serving version's MLflow run (its profile,
with sorted numeric values, is cached per run under MLOPS_HOME). Current: the recent inference
payloads the serving path logged. Per feature a KS or chi-square test, Benjamini-Hochberg across
features and an effect-size floor (`mlops_assets/core/monitoring/drift.py`); the asset records the
table, shows the effect sizes and the per-feature histograms (reference vs current) as images in
the materialization, logs an HTML report with one histogram per feature to the version's MLflow
run (linked through the MLflow UI), and publishes the scores as Prometheus gauges, where the
ModelDriftDetected alert (and `prometheus_alert_sensor`) take over.
"""

import math
import time
from pathlib import Path

import dagster as dg

from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.kube import run_pod_tags
from mlops_assets.core.monitoring.drift import DriftConfig
from mlops_assets.core.registry import MlflowRegistry
from mlops_assets.core.serving.platform import ServingPlatform
from mlops_assets.defs.models.assets import ROLE_TAG, not_served_yet

GROUP = "monitoring"
CHECK_DRIFT_SHARE = "drift_share"


def _features(declaration: ModelDeclaration, inputs) -> tuple[list[str], list[str]]:
    """(numeric, categorical) features the report compares: the declared ones, else the signature's."""
    if declaration.drift_features is None:
        return inputs.numeric, inputs.categorical
    unknown = sorted(set(declaration.drift_features) - set(inputs.names))
    if unknown:
        raise dg.Failure(f"{declaration.name}: drift_features {unknown} are not inputs of the model's signature {inputs.names}")
    wanted = set(declaration.drift_features)
    return [f for f in inputs.numeric if f in wanted], [f for f in inputs.categorical if f in wanted]


def _reference_profile(registry: MlflowRegistry, version, numeric: list[str], categorical: list[str], cache_dir: Path):
    """The profile (sorted numeric values, category counts) of the data the version was trained on,
    cached per run and feature set."""
    import hashlib

    from mlops_assets.core.model_artifacts import training_data
    from mlops_assets.core.monitoring.drift import ReferenceProfile

    digest = hashlib.sha256(repr((numeric, categorical)).encode()).hexdigest()[:12]
    cached = cache_dir / f"{version.run_id}-{digest}.npz"
    if cached.exists():
        return ReferenceProfile.from_npz(cached)
    profile = ReferenceProfile.from_frame(training_data(registry, version), numeric, categorical)
    cache_dir.mkdir(parents=True, exist_ok=True)
    profile.to_npz(cached)
    return profile


def _published_report(context: dg.AssetExecutionContext, mlflow: MlflowRegistry, version, files: list[Path], stamp: str) -> dict:
    """The report's files as artifacts of the version's MLflow run, linked through the MLflow UI. Where
    MLflow does not take them, the drift is still recorded, with the reason and the files' local path."""
    from mlops_assets.core.monitoring.report import publish_report

    try:
        if not version.run_id:
            raise ValueError(f"version {version.version} has no MLflow run to attach the report to")
        published = publish_report(mlflow, version.run_id, files, f"drift/{stamp}")
    except Exception as exc:  # noqa: BLE001 - the drift is measured and published as gauges: the page is secondary
        context.log.warning(f"drift report not logged to MLflow: {type(exc).__name__}: {exc}")
        return {"report_error": f"{type(exc).__name__}: {exc}", "report_file": dg.MetadataValue.path(str(files[0]))}
    metadata = {"report_artifacts": published.artifact_uri}
    if published.ui_url:
        metadata["report"] = dg.MetadataValue.url(published.ui_url)
    return metadata


def build_drift_asset(declaration: ModelDeclaration) -> tuple[dg.AssetsDefinition, dg.AssetChecksDefinition]:
    model_name, isvc = declaration.name, declaration.isvc
    key = dg.AssetKey(["monitoring", f"{model_name}_drift"])

    @dg.asset(
        key=key,
        group_name=GROUP,
        deps=[dg.AssetKey(["serving", model_name])],
        kinds={"scipy"},
        tags={ROLE_TAG: "drift"},
    )
    def _drift(
        context: dg.AssetExecutionContext,
        mlflow: dg.ResourceParam[MlflowRegistry],
        serving: dg.ResourceParam[ServingPlatform],
        drift_policy: dg.ResourceParam[DriftConfig],
    ) -> dg.MaterializeResult:
        """Drift of the live traffic against the serving version's training data: per-feature KS or
        chi-square, Benjamini-Hochberg corrected, with an effect-size floor; a table, the effect sizes
        and per-feature histograms as pictures, an HTML report in the version's MLflow run (`report`
        opens it in the MLflow UI), and Prometheus gauges for alerting."""
        from mlops_assets.core.model_artifacts import ModelArtifactMissingError, input_schema
        from mlops_assets.core.monitoring.charts import png_markdown
        from mlops_assets.core.monitoring.drift import detect_drift
        from mlops_assets.core.monitoring.report import drift_plot_png, histogram_grid_png, render_html

        policy = declaration.drift_config(drift_policy)
        if note := not_served_yet(serving, isvc):
            context.log.info(f"{note}: no traffic to compare")
            return dg.MaterializeResult(metadata={"dataset_verdict": "not served yet"})
        status = serving.status(isvc)
        version = mlflow.get_version(model_name, status.stable_version)
        home = Path(policy.home)
        try:
            numeric, categorical = _features(declaration, input_schema(mlflow, version))
            profile = _reference_profile(mlflow, version, numeric, categorical, home / "monitoring" / "profiles")
        except ModelArtifactMissingError as exc:
            raise dg.Failure(f"no drift report for {model_name} v{version.version}: {exc}") from exc
        current = serving.recent_payloads(isvc, [*numeric, *categorical], policy.max_rows)
        context.log.info(f"{isvc}: {len(current)} recent rows vs {profile.n_rows} training rows of v{version.version}")
        report = detect_drift(profile, current, policy)
        out = home / "monitoring" / model_name
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        html = render_html(report, profile, current, out / f"drift-{stamp}.html")
        png = drift_plot_png(report, out / f"drift-{stamp}.png")
        grid, drawn = histogram_grid_png(report, profile, current)
        rest = len(report.features) - len(drawn)
        histograms = png_markdown(grid, "reference (grey) vs current (blue) per feature") + (
            f"\n\n{rest} more features in the HTML report (`report`)." if rest else ""
        )
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
                "plot": dg.MetadataValue.md(png_markdown(png.read_bytes(), "effect size per feature")),
                "histograms": dg.MetadataValue.md(histograms),
                **_published_report(context, mlflow, version, [html, png], stamp),
                "details": dg.MetadataValue.json(summary),
            }
        )

    @dg.asset_check(asset=key, name=CHECK_DRIFT_SHARE)
    def _share(context: dg.AssetCheckExecutionContext, drift_policy: dg.ResourceParam[DriftConfig]) -> dg.AssetCheckResult:
        """The share of drifting features is at most the policy's drift_share_threshold."""
        policy = declaration.drift_config(drift_policy)
        event = context.instance.get_latest_materialization_event(key)
        meta = event.asset_materialization.metadata if event else {}
        severity = dg.AssetCheckSeverity[policy.check_severity]
        if "drift_share" not in meta or meta["dataset_verdict"].value == "insufficient_data":
            return dg.AssetCheckResult(passed=False, severity=severity, metadata={"note": "no testable data yet"})
        share = meta["drift_share"].value
        return dg.AssetCheckResult(
            passed=share <= policy.drift_share_threshold,
            severity=severity,
            metadata={
                "observed": share,
                "threshold": policy.drift_share_threshold,
                "drifted": meta["drifted_features"].value,
            },
        )

    return _drift, _share


monitor_drift_job = dg.define_asset_job(
    "monitor_drift_job",
    selection=dg.AssetSelection.tag(ROLE_TAG, "drift"),
    description="Compute drift reports for every served model.",
    # On a cluster: the reference profile is 16 B per training value, plus a batch of up to 200k payload rows.
    tags=run_pod_tags(cpu="1", memory="2Gi", memory_limit="4Gi"),
)
defs = dg.Definitions(jobs=[monitor_drift_job])
