"""`serving/<name>`: the live InferenceService for a registered model.

Materializing builds the InferenceService manifest for the model's `champion` version and applies
it to the serving platform (locally: model-server processes and a router; on a cluster: KServe).
Applying an unchanged manifest changes nothing, so re-materializing is safe and records the
current traffic and request counts.
"""

import dagster as dg

from mlops_assets.models.assets import MODEL_NAMES
from mlops_assets.models.registry import CHAMPION, MlflowRegistry
from mlops_assets.serving.manifest import Deployment, build_inference_service, isvc_name_for
from mlops_assets.serving.metrics import MetricsSource, MetricsUnavailableError
from mlops_assets.serving.platform import ServiceStatus, ServingPlatform, http_json

GROUP = "serving"
CHECK_PREDICTOR_ANSWERS = "predictor_answers"


class ServingConfig(dg.Config):
    alias: str = CHAMPION
    namespace: str = "mlops"


def traffic_table(status: ServiceStatus) -> str:
    lines = ["| revision | model version | percent | tag | state |", "|---|---|---|---|---|"]
    for entry in status.traffic:
        rev = entry["revisionName"]
        state = status.revisions[rev]["status"]
        lines.append(f"| {rev} | {status.version_of(rev)} | {entry['percent']} | {entry.get('tag', '-')} | {state} |")
    return "\n".join(lines)


def status_metadata(status: ServiceStatus) -> dict:
    return {
        "url": dg.MetadataValue.url(status.url) if status.url else "",
        "predict_url_v1": status.predict_url("v1"),
        "predict_url_v2": status.predict_url("v2"),
        "ready": status.ready,
        "stable_revision": status.latest_rolledout or "",
        "stable_version": status.stable_version or "",
        "latest_ready_revision": status.latest_ready or "",
        "previous_rolledout_revision": status.previous_rolledout or "",
        "canary_percent": status.canary_percent if status.canary_percent is not None else -1,
        "traffic": dg.MetadataValue.md(traffic_table(status)),
    }


def counts_table(counts: dict) -> str:
    lines = ["| revision | requests | 5xx | 4xx | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for rev, c in sorted(counts.items()):
        p50, p95 = c.latency_quantile(0.5), c.latency_quantile(0.95)
        fmt = lambda v: f"{v * 1000:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {rev} | {c.requests} | {c.errors} | {c.client_errors} | {fmt(p50)} | {fmt(p95)} |")
    return "\n".join(lines)


def build_serving_asset(model_name: str) -> tuple[dg.AssetsDefinition, dg.AssetChecksDefinition]:
    isvc = isvc_name_for(model_name)
    key = dg.AssetKey(["serving", model_name])

    @dg.asset(
        key=key,
        group_name=GROUP,
        deps=[dg.AssetKey(["models", model_name]), dg.AssetKey(["platform", "kserve"])],
        kinds={"kserve"},
    )
    def _serving(
        context: dg.AssetExecutionContext,
        config: ServingConfig,
        mlflow: MlflowRegistry,
        serving: ServingPlatform,
        metrics: MetricsSource,
    ) -> dg.MaterializeResult:
        """The live InferenceService (serving.kserve.io/v1beta1) serving the model's `champion`
        version: URL, revisions, traffic split and per-revision request counts."""
        version = mlflow.version_by_alias(model_name, config.alias)
        manifest = build_inference_service(
            Deployment(
                model_name=model_name,
                version=version.version,
                storage_uri=version.download_uri,
                namespace=config.namespace,
                run_id=version.run_id,
                triggered_by=f"dagster run {context.run_id}",
            )
        )
        names = serving.list_services()
        if isvc in names and serving.status(isvc).stable_version == version.version:
            context.log.info(f"{isvc} already serves version {version.version}; reconciling only")
            serving.reconcile(isvc)
            status = serving.status(isvc)
        else:
            context.log.info(f"applying InferenceService {isvc} for {model_name} v{version.version} ({version.download_uri})")
            status = serving.apply(manifest)
        context.log.info(f"{isvc} ready={status.ready} at {status.url}; traffic {status.traffic}")
        metadata = {"model_version": version.version, "model_uri": version.model_uri, **status_metadata(status)}
        try:
            counts = metrics.revision_counts(isvc, status.url)
            metadata["requests_total"] = sum(c.requests for c in counts.values())
            metadata["request_counts"] = dg.MetadataValue.md(counts_table(counts))
        except MetricsUnavailableError as exc:
            context.log.warning(str(exc))
        metadata["manifest"] = dg.MetadataValue.json(serving.manifest(isvc))
        if mlflow.ui_url:
            metadata["mlflow_ui"] = dg.MetadataValue.url(mlflow.model_ui_url(model_name, version.version))
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset_check(asset=key, name=CHECK_PREDICTOR_ANSWERS, blocking=True)
    def _answers(serving: ServingPlatform) -> dg.AssetCheckResult:
        """The InferenceService answers valid V1 and V2 requests with 200 and one score per row."""
        from mlops_assets.models.data import FEATURES, generate_fraud_data
        from mlops_assets.serving.payloads import v1_payload, v2_payload

        status = serving.status(isvc)
        frame = generate_fraud_data(5, seed=123)[FEATURES]
        v1_code, v1_body = http_json(status.predict_url("v1"), v1_payload(frame))
        v2_code, v2_body = http_json(status.predict_url("v2"), v2_payload(frame))
        n_v1 = len(v1_body.get("predictions", []))
        n_v2 = len((v2_body.get("outputs") or [{}])[0].get("data", []))
        passed = v1_code == 200 and v2_code == 200 and n_v1 == n_v2 == len(frame)
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"v1_status": v1_code, "v2_status": v2_code, "v1_scores": n_v1, "v2_scores": n_v2, "url": status.url},
        )

    return _serving, _answers


_built = [build_serving_asset(name) for name in MODEL_NAMES]
serving_assets = [asset for asset, _ in _built]
serving_checks = [check for _, check in _built]
defs = dg.Definitions(assets=serving_assets, asset_checks=serving_checks)
