"""`models/<name>` and `models/<name>_champion`: a declared model's registry state and its promotion gate.

Each declared model (`defs/models/<name>/defs.yaml`, the `MlflowModel` component) gets both. With a
training function in its declaration, materializing `models/<name>` trains and registers a version;
without one (a model trained in a notebook or another pipeline and registered in MLflow), it records
the registry's state: versions, aliases, metrics, lineage. A declared model with no version yet shows
as "not registered yet", not as a failure.
"""

import importlib
import inspect
import typing
from typing import Any

import dagster as dg
import pydantic

from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.kube import run_pod_tags
from mlops_assets.core.registry import CHALLENGER, CHAMPION, MlflowRegistry, ModelNotFoundError
from mlops_assets.core.serving.platform import ServingPlatform

GROUP = "models"
#: Asset tag that says what an asset is to a model (model, champion, serving, drift): jobs select by it.
ROLE_TAG = "mlops-assets/role"
#: Definition metadata of `models/<name>` holding the model's declaration (read by the sensors).
DECLARATION_KEY = "mlops-assets/declaration"
#: Parameters a training function receives from the platform, not from run config.
_PLATFORM_PARAMS = {"registry", "model_name", "recent", "triggered_by"}
_CONFIG_TYPES = (int, float, str, bool)


def declared_models(repository: dg.RepositoryDefinition) -> dict[str, ModelDeclaration]:
    """Every model declared in the code location, by name (read from `models/<name>`'s metadata)."""
    found = {}
    for assets_def in repository.assets_defs_by_key.values():
        for spec in assets_def.specs:
            raw = spec.metadata.get(DECLARATION_KEY)
            if raw is not None:
                declaration = ModelDeclaration(**getattr(raw, "value", raw))
                found[declaration.name] = declaration
    return found


def not_served_yet(serving: ServingPlatform, isvc: str) -> str | None:
    """`"<isvc> is not served yet"` while the model has no InferenceService (no version rolled out yet), else None:
    what the assets and checks that act on a served model say instead of failing."""
    return None if isvc in serving.list_services() else f"{isvc} is not served yet"


def training_function(path: str):
    """The declared `module:function` that trains and registers a version."""
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise dg.DagsterInvalidDefinitionError(f"training function {path!r} cannot be imported: {exc}") from exc


def training_config_class(declaration: ModelDeclaration) -> type[dg.Config]:
    """Run config of `models/<name>`: the training function's own keyword parameters (typed, with
    their defaults, so a bad value is refused before the run starts), plus `recent_data`."""
    fields: dict[str, Any] = {
        "recent_data": (bool, pydantic.Field(default=False, description="retrain on the recent traffic the serving path logged")),
        "triggered_by": (str, ""),
    }
    if declaration.training:
        fn = training_function(declaration.training)
        hints = typing.get_type_hints(fn)
        for param in inspect.signature(fn).parameters.values():
            kind_ok = param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
            if param.name in _PLATFORM_PARAMS or not kind_ok or param.default is param.empty:
                continue
            if hints.get(param.name) in _CONFIG_TYPES:
                fields[param.name] = (hints[param.name], param.default)
    name = "".join(part.title() for part in declaration.name.split("_")) + "TrainingConfig"
    return pydantic.create_model(name, __base__=dg.Config, **fields)


def _versions_table(versions) -> str:
    lines = ["| version | aliases | created (ms) | run | tags |", "|---|---|---|---|---|"]
    for v in versions[:20]:
        tags = ", ".join(f"{k}={val}" for k, val in sorted(v.tags.items()))
        lines.append(f"| {v.version} | {', '.join(v.aliases) or '-'} | {v.created_ms} | {v.run_id[:8]} | {tags} |")
    return "\n".join(lines)


def build_model_asset(declaration: ModelDeclaration) -> dg.AssetsDefinition:
    model_name = declaration.name
    config_class = training_config_class(declaration)
    trains = declaration.training is not None

    @dg.asset(
        name=model_name,
        key_prefix=["models"],
        group_name=GROUP,
        deps=[dg.AssetKey(["platform", "mlflow_backend_store"]), dg.AssetKey(["platform", "artifact_store"])],
        kinds={"mlflow"},
        tags={ROLE_TAG: "model"},
        metadata={DECLARATION_KEY: declaration.model_dump(mode="json")},
        description=(
            f"Registered model `{model_name}` in MLflow. "
            + (
                f"Materializing trains it with `{declaration.training}` (or, with `recent_data`, on the recent "
                "traffic the serving path logged) and registers a version: the first becomes `champion`, later "
                "ones `challenger` (a rollout promotes them)."
                if trains
                else "Trained outside the platform: materializing records the registry's state (versions, aliases, "
                "metrics, lineage); registering a version in MLflow starts its rollout."
            )
            + f" Policy: {declaration.policy_summary()}"
        ),
    )
    def _model(
        context: dg.AssetExecutionContext,
        config: config_class,  # type: ignore[valid-type]
        mlflow: dg.ResourceParam[MlflowRegistry],
        serving: dg.ResourceParam[ServingPlatform],
    ) -> dg.MaterializeResult:
        if not trains:
            return _record(context, mlflow)
        params = config.model_dump()
        recent_data, triggered_by = params.pop("recent_data"), params.pop("triggered_by")
        recent = None
        if recent_data:
            from mlops_assets.core.model_artifacts import input_schema

            champion = mlflow.version_by_alias(model_name, CHAMPION)
            features = input_schema(mlflow, champion).names
            recent = serving.recent_payloads(declaration.isvc, features)
            context.log.info(f"retraining {model_name} on {len(recent)} recent rows ({triggered_by or 'manual'})")
        else:
            context.log.info(f"training {model_name} with {declaration.training} {params}")
        train = training_function(declaration.training)
        version = train(mlflow, model_name, recent=recent, triggered_by=triggered_by or f"dagster run {context.run_id}", **params)
        champion = mlflow.alias_version(model_name, CHAMPION)
        alias = CHAMPION if champion is None else CHALLENGER
        mlflow.set_alias(model_name, alias, version.version)
        context.log.info(f"registered {model_name} version {version.version} as {alias} (metrics {version.metrics})")
        versions = mlflow.versions(model_name)
        metadata = {
            "version": version.version,
            "alias": alias,
            "champion_version": champion or version.version,
            "model_uri": version.model_uri,
            "run_id": version.run_id,
            "training_data": version.tags.get("training_data", "generated"),
            **{f"metric/{k}": v for k, v in sorted(version.metrics.items())},
            "versions": dg.MetadataValue.md(_versions_table(versions)),
            "n_versions": len(versions),
        }
        if mlflow.ui_url:
            metadata["mlflow_ui"] = dg.MetadataValue.url(mlflow.model_ui_url(model_name, version.version))
        return dg.MaterializeResult(metadata=metadata)

    def _record(context: dg.AssetExecutionContext, mlflow: MlflowRegistry) -> dg.MaterializeResult:
        try:
            versions = mlflow.versions(model_name)
        except ModelNotFoundError:
            versions = []
        if not versions:
            context.log.info(f"{model_name}: not registered yet in MLflow; register a version and the platform serves it")
            return dg.MaterializeResult(metadata={"state": "not registered yet", "n_versions": 0})
        latest = versions[0]
        metadata = {
            "state": "registered",
            "latest_version": latest.version,
            "champion_version": mlflow.alias_version(model_name, CHAMPION) or "",
            "challenger_version": mlflow.alias_version(model_name, CHALLENGER) or "",
            "run_id": latest.run_id,
            "source": latest.source,
            **{f"metric/{k}": v for k, v in sorted(latest.metrics.items())},
            "versions": dg.MetadataValue.md(_versions_table(versions)),
            "n_versions": len(versions),
        }
        if mlflow.ui_url:
            metadata["mlflow_ui"] = dg.MetadataValue.url(mlflow.model_ui_url(model_name, latest.version))
        return dg.MaterializeResult(metadata=metadata)

    return _model


def build_champion_asset(declaration: ModelDeclaration) -> dg.AssetsDefinition:
    model_name, isvc = declaration.name, declaration.isvc

    @dg.asset(
        key=["models", f"{model_name}_champion"],
        group_name=GROUP,
        deps=[dg.AssetKey(["serving", model_name])],
        kinds={"mlflow"},
        tags={ROLE_TAG: "champion"},
    )
    def _champion(
        context: dg.AssetExecutionContext, mlflow: dg.ResourceParam[MlflowRegistry], serving: dg.ResourceParam[ServingPlatform]
    ) -> dg.MaterializeResult:
        """MLflow's `champion` alias, moved to the version serving/<name> now serves as its stable
        revision. Runs only after serving's blocking checks pass: the registry's promotion gate."""
        if note := not_served_yet(serving, isvc):
            return dg.MaterializeResult(metadata={"champion_version": "", "note": note})
        stable = serving.status(isvc).stable_version
        before = mlflow.alias_version(model_name, CHAMPION)
        if stable and stable != before:
            mlflow.set_alias(model_name, CHAMPION, stable)
            context.log.info(f"champion of {model_name}: v{before} -> v{stable}")
        return dg.MaterializeResult(metadata={"champion_version": stable or "", "previous_champion": before or ""})

    return _champion


retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.tag(ROLE_TAG, "model"),
    description="Retrain on recent traffic and register a new version (its rollout follows via the registry sensor).",
    # On a cluster: training holds the recent payloads, the frame and the fitted pipeline in memory.
    tags=run_pod_tags(cpu="1", memory="2Gi", memory_limit="4Gi"),
)
defs = dg.Definitions(jobs=[retrain_job])
