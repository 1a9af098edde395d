"""The blocking checks of `serving/<name>`: they gate `models/<name>_champion` (the promotion).

`predictor_answers`: the InferenceService answers a valid request in the protocol its manifest declares. `error_rate` and
`p95_latency`: the newest revision is within the rollout policy's thresholds, and no rollout rolled it
back for that reason. Each carries the observed value, the threshold and the query in its metadata;
metrics that cannot be read fail the check, and no requests yet is a warning, never a pass.
"""

from collections.abc import Callable

import dagster as dg

from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.registry import MlflowRegistry
from mlops_assets.core.rollout.policy import RolloutPolicy
from mlops_assets.core.serving.metrics import MetricsSource, MetricsUnavailableError, RevisionCounts
from mlops_assets.core.serving.platform import ServingPlatform, http_json
from mlops_assets.defs.models.assets import not_served_yet

CHECK_PREDICTOR_ANSWERS = "predictor_answers"
CHECK_ERROR_RATE = "error_rate"
CHECK_P95_LATENCY = "p95_latency"


def _warn_not_served(note: str) -> dg.AssetCheckResult:
    """A declared model with nothing served yet (no version registered, or no champion): a warning
    that says so, not a failure of the platform."""
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata={"note": f"{note}: no champion"})


def build_serving_checks(declaration: ModelDeclaration) -> list[dg.AssetChecksDefinition]:
    model_name, isvc = declaration.name, declaration.isvc
    key = dg.AssetKey(["serving", model_name])

    @dg.asset_check(asset=key, name=CHECK_PREDICTOR_ANSWERS, blocking=True)
    def _answers(serving: dg.ResourceParam[ServingPlatform], mlflow: dg.ResourceParam[MlflowRegistry]) -> dg.AssetCheckResult:
        """The InferenceService answers the serving version's logged input example, sent in the protocol
        its manifest declares (on a cluster, the only one its ServingRuntime speaks: V2 for MLflow models),
        with 200 and one prediction per row. Sent to the in-cluster address on a cluster."""
        from mlops_assets.core.model_artifacts import ModelArtifactMissingError, input_example
        from mlops_assets.core.serving.manifest import protocol_of
        from mlops_assets.core.serving.payloads import payload_for, predictions_in

        if note := not_served_yet(serving, isvc):
            return _warn_not_served(note)
        status = serving.status(isvc)
        protocol = protocol_of(serving.manifest(isvc))
        try:
            frame = input_example(mlflow, mlflow.get_version(model_name, status.stable_version))
        except ModelArtifactMissingError as exc:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata={"error": str(exc), "url": status.url}
            )
        url = status.predict_url(protocol)
        code, body = http_json(url, payload_for(frame, protocol))
        scores = predictions_in(body, protocol) if code == 200 else 0
        return dg.AssetCheckResult(
            passed=code == 200 and scores == len(frame),
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "protocol": protocol,
                "status": code,
                "rows": len(frame),
                "scores": scores,
                "endpoint": url,
                "url": status.url,
                **({} if code == 200 else {"answer": str(body)[:500]}),
            },
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
        if note := not_served_yet(serving, isvc):
            return _warn_not_served(note)
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
        limit = declaration.rollout_policy(rollout_policy).max_error_rate

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
        limit = declaration.rollout_policy(rollout_policy).max_p95_latency_s

        def judge(counts: RevisionCounts | None) -> tuple[bool, dict] | None:
            p95 = counts.latency_quantile(0.95) if counts is not None else None
            if p95 is None:
                return None
            return p95 <= limit, {"observed_s": p95, "requests": counts.requests}

        return _threshold_check(
            context, serving, metrics, {"threshold_s": limit}, {"latency_vs_baseline", "latency_slo", "no_data_deadline"}, judge
        )

    return [_answers, _error_rate, _p95]
