"""`mlflow_registry_sensor`: a new model version (or a moved `challenger` alias) starts a rollout.

It watches every declared model (each `defs/models/<name>/defs.yaml`). The cursor holds, per model,
the highest version already handed to a rollout and the challenger version last seen. Each tick costs
one model lookup plus one probe per new version, whatever the size of the registry. The strategy
comes from the version's (or else the registered model's) tag `rollout_strategy`, else from the
model's declaration (canary unless it says otherwise).

Registry failures never read as "nothing new": if MLflow is not working (unreachable, a server that
is not MLflow answering 404/5xx/HTML, a corrupt or locked SQLite file, any `RegistryError`) the
whole tick skips with the reason in the tick log and the cursor unchanged, so no version is ever
lost. A declared model that MLflow answers does not exist yet is not a failure: that model is
skipped with its own note and its cursor entry is left as it was, while the others proceed.
"""

import json
import time

import dagster as dg

from mlops_assets.core.registry import CHALLENGER, CHAMPION, MlflowRegistry, ModelNotFoundError, RegistryError
from mlops_assets.core.rollout.policy import STRATEGY_TAG, Strategy, strategy_from_tag
from mlops_assets.core.serving.manifest import ISVC_TAG, isvc_name_for
from mlops_assets.defs.models.assets import declared_models
from mlops_assets.defs.serving.assets import ROLLOUT_TAG
from mlops_assets.defs.serving.jobs import JOB_FOR_STRATEGY, rollout_jobs


def rollout_request(model: str, version: str, strategy: Strategy, reason: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{model}:{version}:{strategy}",
        job_name=JOB_FOR_STRATEGY[strategy],
        run_config={"ops": {f"serving__{model}": {"config": {"version": version, "triggered_by": reason}}}},
        asset_selection=[dg.AssetKey(["serving", model]), dg.AssetKey(["models", f"{model}_champion"])],
        tags={ISVC_TAG: isvc_name_for(model), "mlops-assets/model-version": version, ROLLOUT_TAG: str(strategy)},
    )


#: How long the sensor trusts its cached copy of a model's tags (MLflow scans every version to read them).
MODEL_TAGS_TTL_S = 300


@dg.sensor(
    name="mlflow_registry_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    jobs=rollout_jobs,
    description="Starts a canary, blue-green or A/B rollout for each new MLflow model version.",
)
def mlflow_registry_sensor(context: dg.SensorEvaluationContext, mlflow: dg.ResourceParam[MlflowRegistry]):
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, notes = [], []
    now = time.time()
    for declaration in declared_models(context.repository_def).values():
        model = declaration.name
        state = dict(cursor.get(model) or {})
        # Every registry call of this model happens inside the try, so no failure escapes half-read.
        try:
            if not state:
                # First sight: versions up to the champion are already served; newer ones are pending.
                champion = mlflow.alias_version(model, CHAMPION)
                if champion is None:
                    notes.append(f"{model}: registered, but no version has the alias '{CHAMPION}' yet")
                    continue
                state = {"seen": int(champion), "challenger": None}
            new = mlflow.new_versions(model, state["seen"])
            challenger = mlflow.alias_version(model, CHALLENGER)
            moved = challenger is not None and challenger != state.get("challenger")
            needs_tags = moved or any(STRATEGY_TAG not in v.tags for v in new)
            if needs_tags and now - state.get("tags_at", 0) > MODEL_TAGS_TTL_S:
                state["tags"], state["tags_at"] = mlflow.model_tags(model), now
            seen = int(new[-1].version) if new else state["seen"]
            # A challenger moved back onto an older version re-rolls it, unless it is the champion itself.
            reroll = (
                moved
                and int(challenger) <= seen
                and not any(v.version == challenger for v in new)
                and challenger != mlflow.alias_version(model, CHAMPION)
            )
        except ModelNotFoundError as exc:
            # MLflow answered: this declared model is not registered (yet). Not an outage: note it,
            # leave its cursor entry as it was, and go on with the other models.
            notes.append(f"{model}: not registered in MLflow yet ({exc}); its cursor is unchanged")
            continue
        except RegistryError as exc:
            # Not a working MLflow (or a refused request): nothing can be concluded about any model.
            # A bare SkipReason leaves the whole cursor as it was, so the next good tick sees everything.
            context.log.warning(f"mlflow_registry_sensor: {exc}")
            return dg.SkipReason(f"{exc}; cursor unchanged, no version lost")
        model_strategy = (state.get("tags") or {}).get(STRATEGY_TAG)
        for version in new:
            strategy = strategy_from_tag(version.tags.get(STRATEGY_TAG) or model_strategy, declaration.strategy)
            requests.append(
                rollout_request(model, version.version, strategy, f"mlflow_registry_sensor: new version {version.version}")
            )
        state["seen"] = seen
        if reroll:
            reason = f"mlflow_registry_sensor: challenger -> v{challenger}"
            requests.append(rollout_request(model, challenger, strategy_from_tag(model_strategy, declaration.strategy), reason))
        state["challenger"] = challenger
        cursor[model] = state
        if not new:
            notes.append(f"{model}: nothing newer than v{state['seen']}")
    new_cursor = json.dumps(cursor, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason("; ".join(notes) or "no models"), cursor=new_cursor)
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


defs = dg.Definitions(sensors=[mlflow_registry_sensor])
