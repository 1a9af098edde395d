"""`serving/<name>`: the live InferenceService for a registered model, and its rollouts.

Without rollout config, materializing applies the manifest for the model's `champion` version
(an unchanged manifest changes nothing). With `strategy` set (canary, blue_green, ab_test), it
rolls `version` out with that strategy: every traffic change is recorded as a materialization of
this asset carrying its evidence, so the asset's history is the audit trail of every rollout.
The blocking checks `error_rate` and `p95_latency` then judge the result; only if they pass does
`models/<name>_champion` move MLflow's `champion` alias.
"""

import json
import os
import socket
import time
import uuid
from collections.abc import Callable

import dagster as dg

from mlops_assets.core.registry import CHALLENGER, CHAMPION, MlflowRegistry
from mlops_assets.core.rollout.policy import STRATEGIES, RolloutPolicy
from mlops_assets.core.serving.manifest import Deployment, build_inference_service, isvc_name_for
from mlops_assets.core.serving.metrics import MetricsSource, MetricsUnavailableError, RevisionCounts
from mlops_assets.core.serving.platform import ServiceStatus, ServingPlatform, http_json
from mlops_assets.defs.models.assets import MODEL_NAMES

GROUP = "serving"
CHECK_PREDICTOR_ANSWERS = "predictor_answers"
CHECK_ERROR_RATE = "error_rate"
CHECK_P95_LATENCY = "p95_latency"
ISVC_TAG = "mlops-assets/isvc"


class ServingConfig(dg.Config):
    alias: str = CHAMPION
    namespace: str = "mlops"
    strategy: str = ""  # "" deploys the alias; canary | blue_green | ab_test rolls `version` out
    version: str = ""  # the version to roll out (default: the `challenger` alias)
    triggered_by: str = ""


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
        if isinstance(value, bool | int | float | str) or value is None:
            flat[f"evidence/{key}"] = "" if value is None else value
    flat["evidence"] = dg.MetadataValue.json(json.loads(json.dumps(evidence, default=str)))
    return flat


def _count_or_unknown(count: int | None) -> int | str:
    """A failed-request count for metadata: unknown (metrics unreadable) is not zero."""
    return "unknown (metrics could not be read)" if count is None else count


def _run_is_active(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and not run.is_finished


def build_serving_asset(model_name: str) -> tuple[dg.AssetsDefinition, list[dg.AssetChecksDefinition]]:
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
        mlflow: dg.ResourceParam[MlflowRegistry],
        serving: dg.ResourceParam[ServingPlatform],
        metrics: dg.ResourceParam[MetricsSource],
        rollout_policy: dg.ResourceParam[RolloutPolicy],
    ) -> dg.MaterializeResult:
        """The live InferenceService (serving.kserve.io/v1beta1) of the model: URL, revisions,
        traffic split, per-revision request counts. Its materializations are the audit trail of
        every rollout (canary steps, blue-green switches, A/B decisions) with their evidence."""
        if config.strategy:
            return _rollout(context, config, mlflow, serving, metrics, rollout_policy)
        version = mlflow.version_by_alias(model_name, config.alias)
        manifest = build_inference_service(
            Deployment(
                model_name=model_name,
                version=version.version,
                storage_uri=version.download_uri,
                namespace=config.namespace,
                run_id=version.run_id,
                triggered_by=config.triggered_by or f"dagster run {context.run_id}",
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

    def _rollout(context, config, mlflow, serving, metrics, policy) -> dg.MaterializeResult:
        from mlops_assets.core.rollout.strategies import (
            CandidateNotRolledBackError,
            RolloutContext,
            run_ab_test,
            run_blue_green,
            run_canary,
        )
        from mlops_assets.core.serving.lock import LockInfo

        if config.strategy == "rollback":
            return _alert_rollback(context, config, mlflow, serving, metrics)
        if config.strategy not in STRATEGIES:
            raise dg.Failure(f"unknown rollout strategy {config.strategy!r}; expected one of {sorted(STRATEGIES)}")
        version = (
            mlflow.get_version(model_name, config.version) if config.version else mlflow.version_by_alias(model_name, CHALLENGER)
        )
        rollout_id = f"{config.strategy}-{model_name}-v{version.version}-{uuid.uuid4().hex[:6]}"
        lock = serving.rollout_lock(isvc)
        info = LockInfo(
            isvc, rollout_id, context.run_id, config.strategy, version.version, time.time(), os.getpid(), socket.gethostname()
        )
        stale = lock.acquire(info, lambda run_id: _run_is_active(context.instance, run_id))
        release = True
        try:
            if stale is not None:
                status = serving.status(isvc)
                if status.latest_ready != status.latest_rolledout and status.percent_of(status.latest_ready) > 0:
                    status = serving.rollback(isvc)
                    context.log.warning(f"rollout {stale.rollout_id} (run {stale.run_id}) died mid-rollout: rolled {isvc} back")
                    context.log_event(
                        dg.AssetMaterialization(
                            asset_key=key,
                            description=f"reconciled: rollout {stale.rollout_id} died; rolled back to the last good revision",
                            metadata={
                                "rollout_event": "reconcile_rollback",
                                "stale_run_id": stale.run_id,
                                **status_metadata(status),
                            },
                        )
                    )
            manifest = build_inference_service(
                Deployment(
                    model_name=model_name,
                    version=version.version,
                    storage_uri=version.download_uri,
                    namespace=config.namespace,
                    run_id=version.run_id,
                    rollout_id=rollout_id,
                    triggered_by=config.triggered_by or f"dagster run {context.run_id}",
                )
            )

            def emit(event) -> None:
                context.log_event(
                    dg.AssetMaterialization(
                        asset_key=key,
                        description=f"{config.strategy} {event.kind}: {event.evidence.get('reason', '')}",
                        metadata={
                            "rollout_id": rollout_id,
                            "rollout_event": event.kind,
                            "strategy": config.strategy,
                            "candidate_version": version.version,
                            "elapsed_s": event.elapsed_s,
                            **status_metadata(event.status),
                            **_evidence_metadata(event.evidence),
                        },
                    )
                )

            ctx = RolloutContext(
                platform=serving,
                metrics=metrics,
                isvc=isvc,
                emit=emit,
                log=context.log.info,
                poll_s=policy.poll_s,
                timeout_s=policy.timeout_s,
            )
            context.log.info(f"{rollout_id}: rolling out {model_name} v{version.version} with {config.strategy}")
            if config.strategy == "canary":
                result = run_canary(ctx, manifest, policy.thresholds())
            elif config.strategy == "blue_green":
                from mlops_assets.core.serving.payloads import v1_payload
                from mlops_assets.demo.data import FEATURES, generate_fraud_data

                body = json.dumps(v1_payload(generate_fraud_data(1, seed=11)[FEATURES])).encode()
                result = run_blue_green(ctx, manifest, policy.thresholds(), body, policy.validation_requests)
            else:
                from mlops_assets.core.rollout.ab import ABTest

                result = run_ab_test(
                    ctx, manifest, ABTest(alpha=policy.ab_alpha, base_rate=policy.ab_base_rate, lift=policy.ab_min_lift)
                )
        except CandidateNotRolledBackError:
            # Keep the lock: the next rollout sees a dead owner and rolls the service back first.
            release = False
            raise
        finally:
            if release:
                lock.release(info)
        mlflow.set_version_tag(model_name, version.version, f"rollout.{config.strategy}", result.outcome)
        status = serving.status(isvc)
        context.log.info(f"{rollout_id}: {result.outcome} after {result.duration_s:.1f}s ({result.reason})")
        metadata = _final_metadata(status, mlflow, serving, metrics, version.version, version.model_uri)
        metadata.update(
            {
                "rollout_id": rollout_id,
                "rollout_outcome": result.outcome,
                "strategy": config.strategy,
                "candidate_version": version.version,
                "candidate_revision": result.candidate_revision or "",
                "candidate_failed_requests": _count_or_unknown(result.candidate_failed_requests),
                "stable_failed_requests": _count_or_unknown(result.stable_failed_requests),
                "time_to_decision_s": result.duration_s,
                "reason": result.reason,
                **_evidence_metadata(result.evidence),
            }
        )
        return dg.MaterializeResult(metadata=metadata)

    def _alert_rollback(context, config, mlflow, serving, metrics) -> dg.MaterializeResult:
        """An alert fired on the stable revision: send traffic back to the previous good one (kept
        warm) and point MLflow's champion at it. The bad revision stays at 0% for debugging."""
        before = serving.status(isvc)
        bad = before.latest_rolledout
        status = serving.rollback(isvc)
        good_version = status.stable_version
        if good_version:
            mlflow.set_alias(model_name, CHAMPION, good_version)
        reason = f"rolled back {bad} (v{before.stable_version}) to v{good_version}: {config.triggered_by or 'manual'}"
        context.log.warning(reason)
        metadata = _final_metadata(status, mlflow, serving, metrics, good_version or "", f"models:/{model_name}/{good_version}")
        metadata.update(
            {
                "rollout_id": f"rollback-{model_name}-{uuid.uuid4().hex[:6]}",
                "rollout_event": "alert_rollback",
                "rollout_outcome": "rolled_back",
                "strategy": "rollback",
                "candidate_version": before.stable_version or "",
                "candidate_revision": bad or "",
                "reason": reason,
                "evidence": dg.MetadataValue.json({"fired": ["prometheus_alert"], "trigger": config.triggered_by}),
            }
        )
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset_check(asset=key, name=CHECK_PREDICTOR_ANSWERS, blocking=True)
    def _answers(serving: dg.ResourceParam[ServingPlatform]) -> dg.AssetCheckResult:
        """The InferenceService answers valid V1 and V2 requests with 200 and one score per row."""
        from mlops_assets.core.serving.payloads import v1_payload, v2_payload
        from mlops_assets.demo.data import FEATURES, generate_fraud_data

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

    def _rollout_verdict(instance: dg.DagsterInstance, revision: str | None, kinds: set[str]) -> dict | None:
        """The last rollout's evidence if it rolled `revision` back for one of `kinds` of test."""
        event = instance.get_latest_materialization_event(key)
        meta = event.asset_materialization.metadata if event else {}
        if "rollout_outcome" not in meta or meta["rollout_outcome"].value != "rolled_back":
            return None
        if "candidate_revision" not in meta or meta["candidate_revision"].value != revision:
            return None
        evidence = meta["evidence"].value if "evidence" in meta else {}
        fired = set(evidence.get("fired") or [])
        failed_validation = bool(evidence.get("validation_errors"))
        if (
            fired & (kinds | {"prometheus_alert"})
            or (failed_validation and "error_slo" in kinds)
            or (not fired and not failed_validation)
        ):
            return {
                "rollout_id": meta["rollout_id"].value,
                "rolled_back_by": ", ".join(sorted(fired)) or ("validation" if failed_validation else "no decision"),
                "rollout_reason": meta["reason"].value if "reason" in meta else "",
            }
        return None

    def _judged_revision(serving: dg.ResourceParam[ServingPlatform], metrics: dg.ResourceParam[MetricsSource]):
        """The newest ready revision (the candidate of the last rollout), with its counts."""
        status = serving.status(isvc)
        counts = metrics.revision_counts(isvc, status.url)
        return status, status.latest_ready, counts.get(status.latest_ready)

    def _threshold_check(
        context: dg.AssetCheckExecutionContext,
        serving: dg.ResourceParam[ServingPlatform],
        metrics: dg.ResourceParam[MetricsSource],
        meta: dict,
        kinds: set[str],
        judge: Callable[[RevisionCounts | None], tuple[bool, dict] | None],
        on_verdict: Callable[[RevisionCounts | None], dict] = lambda counts: {},
    ) -> dg.AssetCheckResult:
        """What the threshold checks share: unreadable metrics fail; a rollout that rolled the judged
        revision back for one of `kinds` fails with its verdict; no requests yet is a warning, never a
        pass; otherwise `judge(counts)` decides, as (passed, observed metadata)."""
        query = metrics.describe_query(isvc)
        try:
            _, revision, counts = _judged_revision(serving, metrics)
        except MetricsUnavailableError as exc:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata={"error": str(exc), "query": query}
            )
        meta = {**meta, "query": query, "revision": revision or ""}
        verdict = _rollout_verdict(context.instance, revision, kinds)
        if verdict is not None:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata={**meta, **on_verdict(counts), **verdict}
            )
        judged = judge(counts)
        if judged is None:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.WARN, metadata={**meta, "note": "no requests yet"}
            )
        passed, observed = judged
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, metadata={**meta, **observed})

    @dg.asset_check(asset=key, name=CHECK_ERROR_RATE, blocking=True)
    def _error_rate(
        context: dg.AssetCheckExecutionContext,
        serving: dg.ResourceParam[ServingPlatform],
        metrics: dg.ResourceParam[MetricsSource],
        rollout_policy: dg.ResourceParam[RolloutPolicy],
    ) -> dg.AssetCheckResult:
        """The newest revision's share of 5xx responses is within the policy's max_error_rate, and
        no rollout rolled it back for errors (its sequential tests see degradations that a point
        estimate against the threshold cannot)."""
        limit = rollout_policy.max_error_rate

        def judge(counts: RevisionCounts | None) -> tuple[bool, dict] | None:
            if counts is None or counts.requests == 0:
                return None
            return counts.error_rate <= limit, {
                "observed": counts.error_rate,
                "requests": counts.requests,
                "errors": counts.errors,
            }

        return _threshold_check(
            context,
            serving,
            metrics,
            {"threshold": limit},
            {"error_vs_baseline", "error_slo", "no_data_deadline"},
            judge,
            on_verdict=lambda counts: {"observed": counts.error_rate if counts is not None and counts.requests else -1.0},
        )

    @dg.asset_check(asset=key, name=CHECK_P95_LATENCY, blocking=True)
    def _p95(
        context: dg.AssetCheckExecutionContext,
        serving: dg.ResourceParam[ServingPlatform],
        metrics: dg.ResourceParam[MetricsSource],
        rollout_policy: dg.ResourceParam[RolloutPolicy],
    ) -> dg.AssetCheckResult:
        """The newest revision's p95 latency (through the router) is within max_p95_latency_s, and
        no rollout rolled it back for latency."""
        limit = rollout_policy.max_p95_latency_s

        def judge(counts: RevisionCounts | None) -> tuple[bool, dict] | None:
            p95 = counts.latency_quantile(0.95) if counts is not None else None
            if p95 is None:
                return None
            return p95 <= limit, {"observed_s": p95, "requests": counts.requests}

        return _threshold_check(
            context, serving, metrics, {"threshold_s": limit}, {"latency_vs_baseline", "latency_slo", "no_data_deadline"}, judge
        )

    return _serving, [_answers, _error_rate, _p95]


def build_champion_asset(model_name: str) -> dg.AssetsDefinition:
    isvc = isvc_name_for(model_name)

    @dg.asset(
        key=["models", f"{model_name}_champion"], group_name=GROUP, deps=[dg.AssetKey(["serving", model_name])], kinds={"mlflow"}
    )
    def _champion(
        context: dg.AssetExecutionContext, mlflow: dg.ResourceParam[MlflowRegistry], serving: dg.ResourceParam[ServingPlatform]
    ) -> dg.MaterializeResult:
        """MLflow's `champion` alias, moved to the version serving/<name> now serves as its stable
        revision. Runs only after serving's blocking checks pass: the registry's promotion gate."""
        stable = serving.status(isvc).stable_version
        try:
            before = mlflow.version_by_alias(model_name, CHAMPION).version
        except LookupError:
            before = None
        if stable and stable != before:
            mlflow.set_alias(model_name, CHAMPION, stable)
            context.log.info(f"champion of {model_name}: v{before} -> v{stable}")
        return dg.MaterializeResult(metadata={"champion_version": stable or "", "previous_champion": before or ""})

    return _champion


_built = [build_serving_asset(name) for name in MODEL_NAMES]
serving_assets = [asset for asset, _ in _built]
serving_checks = [check for _, checks in _built for check in checks]
champion_assets = [build_champion_asset(name) for name in MODEL_NAMES]
rollout_selection = dg.AssetSelection.assets(*serving_assets, *champion_assets)
rollout_jobs = [
    dg.define_asset_job(job, selection=rollout_selection, description=f"Roll a model version out with the {strategy} strategy.")
    for strategy, job in STRATEGIES.items()
]
rollback_job = dg.define_asset_job(
    "rollback_job", selection=rollout_selection, description="Send traffic back to the previous good revision (alert-driven)."
)
defs = dg.Definitions(assets=[*serving_assets, *champion_assets], asset_checks=serving_checks, jobs=[*rollout_jobs, rollback_job])
