"""`mlflow_registry_sensor`: a new model version (or a moved `challenger` alias) starts a rollout.

The cursor holds, per model, the highest version already handed to a rollout and the challenger
version last seen. Each tick costs one model lookup plus one probe per new version, whatever the
size of the registry. If MLflow cannot be reached the tick skips with the cursor unchanged, so no
version is ever lost. The strategy comes from the version's (or else the model's) tag
`rollout_strategy`; canary by default.
"""

import json
import time

import dagster as dg

from mlops_assets.models.assets import MODEL_NAMES
from mlops_assets.models.registry import CHALLENGER, CHAMPION, MlflowRegistry, RegistryError, UnknownModelError
from mlops_assets.rollout.resources import STRATEGIES, STRATEGY_TAG
from mlops_assets.serving.assets import rollout_jobs
from mlops_assets.serving.manifest import isvc_name_for

ISVC_TAG = "mlops-assets/isvc"


def rollout_request(model: str, version: str, strategy: str, reason: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{model}:{version}:{strategy}",
        job_name=STRATEGIES[strategy],
        run_config={"ops": {f"serving__{model}": {"config": {"strategy": strategy, "version": version, "triggered_by": reason}}}},
        asset_selection=[dg.AssetKey(["serving", model]), dg.AssetKey(["models", f"{model}_champion"])],
        tags={ISVC_TAG: isvc_name_for(model), "mlops-assets/model-version": version, "mlops-assets/strategy": strategy},
    )


#: How long the sensor trusts its cached copy of a model's tags (MLflow scans every version to read them).
MODEL_TAGS_TTL_S = 300


def _strategy(tag: str | None) -> str:
    return tag if tag in STRATEGIES else "canary"


@dg.sensor(
    name="mlflow_registry_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    jobs=rollout_jobs,
    description="Starts a canary, blue-green or A/B rollout for each new MLflow model version.",
)
def mlflow_registry_sensor(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry):
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, notes = [], []
    now = time.time()
    for model in MODEL_NAMES:
        state = dict(cursor.get(model) or {})
        try:
            if not state:
                # First sight: versions up to the champion are already served; newer ones are pending.
                champion = mlflow.alias_version(model, CHAMPION)
                if champion is None:
                    notes.append(f"{model}: not registered or no champion yet")
                    continue
                state = {"seen": int(champion), "challenger": None}
            new = mlflow.new_versions(model, state["seen"])
            challenger = mlflow.alias_version(model, CHALLENGER)
            moved = challenger is not None and challenger != state.get("challenger")
            needs_tags = moved or any(STRATEGY_TAG not in v.tags for v in new)
            if needs_tags and now - state.get("tags_at", 0) > MODEL_TAGS_TTL_S:
                state["tags"], state["tags_at"] = mlflow.model_tags(model), now
        except (RegistryError, OSError) as exc:
            return dg.SkipReason(f"MLflow unreachable ({exc}); cursor unchanged, no version lost")
        except UnknownModelError:
            notes.append(f"{model}: not registered")
            continue
        model_strategy = (state.get("tags") or {}).get(STRATEGY_TAG)
        for version in new:
            strategy = _strategy(version.tags.get(STRATEGY_TAG) or model_strategy)
            requests.append(
                rollout_request(model, version.version, strategy, f"mlflow_registry_sensor: new version {version.version}")
            )
            state["seen"] = int(version.version)
        if moved and int(challenger) <= state["seen"] and not any(v.version == challenger for v in new):
            if challenger != mlflow.alias_version(model, CHAMPION):
                requests.append(
                    rollout_request(
                        model, challenger, _strategy(model_strategy), f"mlflow_registry_sensor: challenger -> v{challenger}"
                    )
                )
        state["challenger"] = challenger
        cursor[model] = state
        if not new:
            notes.append(f"{model}: nothing newer than v{state['seen']}")
    new_cursor = json.dumps(cursor, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason("; ".join(notes) or "no models"), cursor=new_cursor)
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


defs = dg.Definitions(sensors=[mlflow_registry_sensor])
