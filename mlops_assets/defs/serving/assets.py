"""`serving/<name>`: the live InferenceService for a registered model, and its rollouts.

What materializing does is chosen by the run's job, through its `mlops-assets/rollout` tag:
without one (the UI's Materialize, `lifecycle_job`) it applies the manifest for the model's
`champion` version (an unchanged manifest changes nothing); `canary_rollout_job`, `blue_green_job`
and `ab_test_job` roll `version` (default: the `challenger` alias) out with their strategy;
`rollback_job` sends traffic back to the previous good revision. The rollout itself is the engine's
`RolloutRunner`; this asset turns its events into materializations carrying their evidence, so the
asset's history is the audit trail of every rollout, and the rollout's last materialization shows
it as a chart (`rollout_chart`: traffic share, rates and the tests' progress over time). The blocking
checks `error_rate` and `p95_latency` then judge the result; only if they pass does
`models/<name>_champion` move MLflow's `champion` alias.
"""

import json

import dagster as dg

from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.model_artifacts import ModelArtifactMissingError
from mlops_assets.core.registry import (
    CHALLENGER,
    CHAMPION,
    AliasNotSetError,
    MlflowRegistry,
    ModelNotFoundError,
    VersionInfo,
)
from mlops_assets.core.rollout.policy import RolloutPolicy, Strategy
from mlops_assets.core.serving.manifest import Deployment, build_inference_service
from mlops_assets.core.serving.metrics import MetricsSource, MetricsUnavailableError
from mlops_assets.core.serving.platform import ServiceStatus, ServingPlatform
from mlops_assets.defs.models.assets import ROLE_TAG

GROUP = "serving"
#: The run tag that says what a run of the serving asset does: a `Strategy` value, or ROLLBACK.
ROLLOUT_TAG = "mlops-assets/rollout"
ROLLBACK = "rollback"
ACTIONS = (*[str(s) for s in Strategy], ROLLBACK)


class ServingConfig(dg.Config):
    alias: str = CHAMPION  # the alias a plain materialization deploys
    namespace: str = ""  # "": the serving platform's (MLOPS_NAMESPACE); anything else must be the same
    version: str = ""  # the version a rollout job rolls out (default: the `challenger` alias)
    triggered_by: str = ""


def _namespace(config: ServingConfig, serving: ServingPlatform) -> str:
    """The namespace to deploy in: the platform's, which the run config may name but not change (a cluster's platform
    can only act in its own namespace; MLOPS_NAMESPACE sets it)."""
    if config.namespace and config.namespace != serving.namespace:
        raise dg.Failure(
            f"run config asks for namespace {config.namespace!r}, but the serving platform works in {serving.namespace!r}: "
            "set MLOPS_NAMESPACE for the code location instead, or leave `namespace` out"
        )
    return serving.namespace


def traffic_table(status: ServiceStatus) -> str:
    lines = ["| revision | model version | percent | tag | state | restarts |", "|---|---|---|---|---|---|"]
    for entry in status.traffic:
        rev = entry["revisionName"]
        info = status.revisions[rev]
        lines.append(
            f"| {rev} | {status.version_of(rev)} | {entry['percent']} | {entry.get('tag', '-')} | {info['status']} "
            f"| {info.get('restarts', 0)} |"
        )
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
        # Down revisions, restarts that failed (with their logs): empty when all is well.
        "health": status.message or "ok",
    }


def counts_table(counts: dict) -> str:
    lines = ["| revision | requests | 5xx | 4xx | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for rev, c in sorted(counts.items()):
        p50, p95 = c.latency_quantile(0.5), c.latency_quantile(0.95)
        fmt = lambda v: f"{v * 1000:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {rev} | {c.requests} | {c.errors} | {c.client_errors} | {fmt(p50)} | {fmt(p95)} |")
    return "\n".join(lines)


def _evidence_metadata(evidence: dict) -> dict:
    flat = {}
    for key, value in evidence.items():
        if key.endswith("_table") and isinstance(value, str):
            flat[f"evidence/{key}"] = dg.MetadataValue.md(value)  # e.g. the shadow's most disagreeing examples
        elif isinstance(value, bool | int | float | str) or value is None:
            flat[f"evidence/{key}"] = "" if value is None else value
    flat["evidence"] = dg.MetadataValue.json(json.loads(json.dumps(evidence, default=str)))
    return flat


def rollout_chart_metadata(events: list, title: str, log) -> dict:
    """The rollout's chart (traffic share, rates against their limits, the tests' progress to a decision, over
    time) as an image embedded in the materialization; a chart that cannot be drawn is logged, never fatal."""
    from mlops_assets.core.monitoring.charts import png_markdown
    from mlops_assets.core.rollout.charts import rollout_chart_png, rollout_series

    if not events:  # nothing moved (the manifest matched the serving revision): nothing to draw
        return {}
    try:
        png = rollout_chart_png(rollout_series(events), title)
    except Exception as exc:  # noqa: BLE001 - the rollout already happened: a missing picture must not fail it
        log(f"rollout chart not drawn: {type(exc).__name__}: {exc}")
        return {}
    return {"rollout_chart": dg.MetadataValue.md(png_markdown(png, title))}


def _count_or_unknown(count: int | None) -> int | str:
    """A failed-request count for metadata: unknown (metrics unreadable) is not zero."""
    return "unknown (metrics could not be read)" if count is None else count


def _run_is_active(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and not run.is_finished


def requested_action(context: dg.AssetExecutionContext) -> str | None:
    """What the run's job asks of the serving asset (None: deploy the alias)."""
    action = context.run.tags.get(ROLLOUT_TAG)
    if action is not None and action not in ACTIONS:
        raise dg.Failure(f"run tag {ROLLOUT_TAG}={action!r} names no rollout; expected one of {', '.join(ACTIONS)}")
    return action


def validation_body(mlflow: MlflowRegistry, version: VersionInfo) -> bytes:
    """One V1 request built from the version's logged input example: what blue-green validation
    sends to the new revision (a version without one is refused, naming what to log)."""
    from mlops_assets.core.model_artifacts import input_example
    from mlops_assets.core.serving.payloads import v1_payload

    return json.dumps(v1_payload(input_example(mlflow, version))).encode()


def build_serving_asset(declaration: ModelDeclaration) -> dg.AssetsDefinition:
    model_name, isvc = declaration.name, declaration.isvc
    key = dg.AssetKey(["serving", model_name])

    @dg.asset(
        key=key,
        group_name=GROUP,
        deps=[dg.AssetKey(["models", model_name]), dg.AssetKey(["platform", "kserve"])],
        kinds={"kserve"},
        tags={ROLE_TAG: "serving"},
        metadata={"policy": declaration.policy_summary()},
    )
    def _serving(
        context: dg.AssetExecutionContext,
        config: ServingConfig,
        mlflow: dg.ResourceParam[MlflowRegistry],
        serving: dg.ResourceParam[ServingPlatform],
        metrics: dg.ResourceParam[MetricsSource],
        rollout_policy: dg.ResourceParam[RolloutPolicy],
    ) -> dg.MaterializeResult:
        """The live InferenceService (serving.kserve.io/v1beta1) of the model: URL, revisions,
        traffic split, per-revision request counts. Its materializations are the audit trail of
        every rollout (canary steps, blue-green switches, A/B decisions) with their evidence."""
        action = requested_action(context)
        if action is None:
            return _deploy(context, config, mlflow, serving, metrics)
        # Imported here: the rollout analysis needs numpy, which the code location does not load.
        from mlops_assets.core.rollout.runner import RolloutRunner

        history: list = []  # the events reported, drawn as the rollout's chart at the end

        def emit(event) -> None:
            history.append(event)
            context.log_event(_event_materialization(event, action))

        runner = RolloutRunner(
            platform=serving,
            metrics=metrics,
            registry=mlflow,
            policy=declaration.rollout_policy(rollout_policy),
            emit=emit,
            log=context.log.info,
            observe=history.append,
            run_is_active=lambda run_id: _run_is_active(context.instance, run_id),
        )
        if action == ROLLBACK:
            return _rollback(runner, config, mlflow, serving, metrics)
        return _rollout(context, runner, Strategy(action), config, mlflow, serving, metrics, history)

    def _require_installed(mlflow, version, what: str) -> None:
        from mlops_assets.core.model_artifacts import missing_requirements

        missing = missing_requirements(mlflow, version)
        if missing:
            raise dg.Failure(
                f"{what} of {model_name} v{version.version} refused: the model needs packages that are not installed "
                f"where it would be served: {', '.join(missing)}"
            )

    def _deploy(context, config, mlflow, serving, metrics) -> dg.MaterializeResult:
        try:
            version = mlflow.version_by_alias(model_name, config.alias)
        except ModelNotFoundError as exc:
            # A declared model not registered yet, or with no champion yet, has nothing to serve: a
            # state, not a failure. An alias asked for by name that does not exist is a failure.
            if isinstance(exc, AliasNotSetError) and config.alias != CHAMPION:
                raise
            state = f"no version has alias '{CHAMPION}' yet" if isinstance(exc, AliasNotSetError) else "not registered yet"
            context.log.info(f"{model_name}: {state}; register a version in MLflow and the platform serves it")
            return dg.MaterializeResult(metadata={"state": state})
        _require_installed(mlflow, version, "deployment")
        manifest = build_inference_service(
            Deployment(
                model_name=model_name,
                version=version.version,
                storage_uri=version.download_uri,
                namespace=_namespace(config, serving),
                run_id=version.run_id,
                triggered_by=config.triggered_by or f"dagster run {context.run_id}",
                **declaration.deployment_fields(),
            )
        )
        if isvc in serving.list_services() and serving.status(isvc).stable_version == version.version:
            context.log.info(f"{isvc} already serves version {version.version}; reconciling only")
            serving.reconcile(isvc)
            status = serving.status(isvc)
        else:
            context.log.info(f"applying InferenceService {isvc} for {model_name} v{version.version} ({version.download_uri})")
            status = serving.apply(manifest)
        context.log.info(f"{isvc} ready={status.ready} at {status.url}; traffic {status.traffic}")
        return dg.MaterializeResult(
            metadata=_final_metadata(status, mlflow, serving, metrics, version.version, version.model_uri)
        )

    def _final_metadata(status, mlflow, serving, metrics, version, model_uri) -> dict:
        metadata = {"model_version": version, "model_uri": model_uri, **status_metadata(status)}
        try:
            counts = metrics.revision_counts(isvc, status.url)
            metadata["requests_total"] = sum(c.requests for c in counts.values())
            metadata["request_counts"] = dg.MetadataValue.md(counts_table(counts))
        except MetricsUnavailableError as exc:
            metadata["metrics_error"] = str(exc)
        metadata["manifest"] = dg.MetadataValue.json(serving.manifest(isvc))
        if mlflow.ui_url:
            metadata["mlflow_ui"] = dg.MetadataValue.url(mlflow.model_ui_url(model_name, version))
        return metadata

    def _event_materialization(event, action: str) -> dg.AssetMaterialization:
        return dg.AssetMaterialization(
            asset_key=key,
            description=f"{action} {event.kind}: {event.evidence.get('reason', '')}",
            metadata={
                "rollout_id": event.rollout_id,
                "rollout_event": event.kind,
                "strategy": action,
                "candidate_version": event.candidate_version,
                "elapsed_s": event.elapsed_s,
                **status_metadata(event.status),
                **_evidence_metadata(event.evidence),
            },
        )

    def _rollout(context, runner, strategy, config, mlflow, serving, metrics, history) -> dg.MaterializeResult:
        from mlops_assets.core.rollout.runner import RolloutRequest

        try:
            version = (
                mlflow.get_version(model_name, config.version)
                if config.version
                else mlflow.version_by_alias(model_name, CHALLENGER)
            )
        except ModelNotFoundError as exc:  # the alias is not set, or the model is not registered yet
            raise dg.Failure(
                f"{strategy} rollout of {model_name}: which version? No version has the alias '{CHALLENGER}' ({exc}). "
                f"Set the alias in MLflow, or pass the version as run config: "
                f"ops: {{serving__{model_name}: {{config: {{version: '<n>'}}}}}}"
            ) from exc
        request = RolloutRequest(
            model_name=model_name,
            version=version,
            strategy=strategy,
            namespace=_namespace(config, serving),
            triggered_by=config.triggered_by or f"dagster run {context.run_id}",
            run_id=context.run_id,
            deployment_fields=declaration.deployment_fields(),
        )
        # Refused before any traffic moves: a version the platform cannot validate, or cannot load here.
        try:
            runner.validation_body = validation_body(mlflow, version)
        except ModelArtifactMissingError as exc:
            raise dg.Failure(f"{strategy} rollout of {model_name} v{version.version} refused: {exc}") from exc
        _require_installed(mlflow, version, f"{strategy} rollout")
        report = runner.run(request)
        result = report.result
        metadata = _final_metadata(report.status, mlflow, serving, metrics, version.version, version.model_uri)
        metadata.update(
            {
                "rollout_id": report.rollout_id,
                "rollout_outcome": result.outcome,
                "strategy": str(strategy),
                "candidate_version": version.version,
                "candidate_revision": result.candidate_revision or "",
                "candidate_failed_requests": _count_or_unknown(result.candidate_failed_requests),
                "stable_failed_requests": _count_or_unknown(result.stable_failed_requests),
                "time_to_decision_s": result.duration_s,
                "reason": result.reason,
                **_evidence_metadata(result.evidence),
            }
        )
        title = f"{strategy} of {model_name} v{version.version}: {result.outcome}"
        metadata.update(rollout_chart_metadata(history, title, context.log.warning))
        return dg.MaterializeResult(metadata=metadata)

    def _rollback(runner, config, mlflow, serving, metrics) -> dg.MaterializeResult:
        report = runner.rollback(model_name, config.triggered_by or "manual")
        good = report.good_version or ""
        metadata = _final_metadata(report.status, mlflow, serving, metrics, good, f"models:/{model_name}/{good}")
        metadata.update(
            {
                "rollout_id": report.rollout_id,
                "rollout_event": "alert_rollback",
                "rollout_outcome": "rolled_back",
                "strategy": ROLLBACK,
                "candidate_version": report.bad_version or "",
                "candidate_revision": report.bad_revision or "",
                "reason": report.reason,
                "evidence": dg.MetadataValue.json({"fired": ["prometheus_alert"], "trigger": config.triggered_by}),
            }
        )
        return dg.MaterializeResult(metadata=metadata)

    return _serving
