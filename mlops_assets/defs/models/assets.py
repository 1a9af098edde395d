"""`models/<name>`: a registered model in MLflow, trained and registered by materializing it."""

import dagster as dg
from pydantic import Field

from mlops_assets.core.kube import run_pod_tags
from mlops_assets.core.registry import CHALLENGER, CHAMPION, MlflowRegistry, UnknownModelError
from mlops_assets.core.serving.manifest import isvc_name_for
from mlops_assets.core.serving.platform import ServingPlatform

GROUP = "models"
#: The demo model family: every name gets a `models/<name>` and a `serving/<name>` asset.
MODEL_NAMES = ["fraud_detector"]


class TrainingConfig(dg.Config):
    n_rows: int = Field(default=20_000, ge=100, le=5_000_000, description="rows of generated data")
    seed: int = Field(default=0, description="data seed")
    shift: float = Field(default=0.0, ge=-3.0, le=3.0, description="distribution shift in standard deviations")
    recent_data: bool = Field(default=False, description="retrain on the recent traffic the serving path logged")
    triggered_by: str = ""


def _versions_table(versions) -> str:
    lines = ["| version | aliases | created (ms) | run | tags |", "|---|---|---|---|---|"]
    for v in versions[:20]:
        tags = ", ".join(f"{k}={val}" for k, val in sorted(v.tags.items()))
        lines.append(f"| {v.version} | {', '.join(v.aliases) or '-'} | {v.created_ms} | {v.run_id[:8]} | {tags} |")
    return "\n".join(lines)


def build_model_asset(model_name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=model_name,
        key_prefix=["models"],
        group_name=GROUP,
        deps=[dg.AssetKey(["platform", "mlflow_backend_store"]), dg.AssetKey(["platform", "artifact_store"])],
        kinds={"mlflow", "scikitlearn"},
    )
    def _model(
        context: dg.AssetExecutionContext,
        config: TrainingConfig,
        mlflow: dg.ResourceParam[MlflowRegistry],
        serving: dg.ResourceParam[ServingPlatform],
    ) -> dg.MaterializeResult:
        """A registered model in MLflow. Materializing trains on freshly generated data (or, with
        `recent_data`, on the recent traffic the serving path logged), logs the model with its
        signature, input example and training-data snapshot, and registers a new version: the first
        becomes `champion`, later ones `challenger` (a rollout promotes them)."""
        from mlops_assets.demo.training import train_and_register

        recent = None
        if config.recent_data:
            from mlops_assets.core.serving.manifest import isvc_name_for
            from mlops_assets.demo.data import FEATURES

            recent = serving.recent_payloads(isvc_name_for(model_name), FEATURES)
            context.log.info(f"retraining {model_name} on {len(recent)} recent rows ({config.triggered_by or 'manual'})")
        else:
            context.log.info(f"training {model_name}: {config.n_rows} rows, seed {config.seed}, shift {config.shift}")
        version = train_and_register(
            mlflow,
            model_name,
            n_rows=config.n_rows,
            seed=config.seed,
            shift=config.shift,
            recent=recent,
            triggered_by=config.triggered_by or f"dagster run {context.run_id}",
        )
        try:
            champion = mlflow.version_by_alias(model_name, CHAMPION).version
        except UnknownModelError:
            champion = None
        alias = CHAMPION if champion is None else CHALLENGER
        mlflow.set_alias(model_name, alias, version.version)
        context.log.info(
            f"registered {model_name} version {version.version} as {alias} (auc {version.metrics.get('auc', 0):.3f})"
        )
        versions = mlflow.versions(model_name)
        metadata = {
            "version": version.version,
            "alias": alias,
            "champion_version": champion or version.version,
            "model_uri": version.model_uri,
            "run_id": version.run_id,
            "auc": version.metrics.get("auc"),
            "training_data": version.tags.get("training_data", "generated"),
            "n_train": version.metrics.get("n_train"),
            "fraud_rate": version.metrics.get("fraud_rate"),
            "versions": dg.MetadataValue.md(_versions_table(versions)),
            "n_versions": len(versions),
        }
        if mlflow.ui_url:
            metadata["mlflow_ui"] = dg.MetadataValue.url(mlflow.model_ui_url(model_name, version.version))
        return dg.MaterializeResult(metadata=metadata)

    return _model


model_assets = [build_model_asset(name) for name in MODEL_NAMES]


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


champion_assets = [build_champion_asset(name) for name in MODEL_NAMES]

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(*model_assets),
    description="Retrain on recent traffic and register a new version (its rollout follows via the registry sensor).",
    # On a cluster: training holds the recent payloads, the frame and the fitted pipeline in memory.
    tags=run_pod_tags(cpu="1", memory="2Gi", memory_limit="4Gi"),
)
defs = dg.Definitions(assets=[*model_assets, *champion_assets], jobs=[retrain_job])
