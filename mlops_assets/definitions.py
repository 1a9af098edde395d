"""The code location: every domain's definitions merged, with resources for the environment."""

from __future__ import annotations

import dagster as dg

from mlops_assets.models import assets as models
from mlops_assets.models import sensors as model_sensors
from mlops_assets.monitoring import assets as monitoring
from mlops_assets.monitoring import sensors as monitoring_sensors
from mlops_assets.platform import assets as platform
from mlops_assets.resources import build_resources
from mlops_assets.serving import assets as serving
from mlops_assets.settings import load_settings

#: Unbound definitions, for tests that supply their own resources.
ALL_ASSETS = [*platform.defs.assets, *models.defs.assets, *serving.defs.assets, *monitoring.defs.assets]
ALL_CHECKS = [*platform.defs.asset_checks, *serving.defs.asset_checks, *monitoring.defs.asset_checks]

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("monitoring"),
    description="Bring the platform up, train and register a model version, serve its champion.",
)
observe_serving_job = dg.define_asset_job(
    "observe_serving_job",
    selection=dg.AssetSelection.groups("serving"),
    description="Record every InferenceService's traffic and request counts (applies nothing new).",
)


def build_definitions() -> dg.Definitions:
    return dg.Definitions.merge(
        platform.defs,
        models.defs,
        serving.defs,
        monitoring.defs,
        model_sensors.defs,
        monitoring_sensors.defs,
        # One process per run, not per step: every step would otherwise pay ~3 s of imports
        # (dagster, MLflow, pandas) on these 2-core machines; steps here are I/O-bound anyway.
        dg.Definitions(
            jobs=[lifecycle_job, observe_serving_job], resources=build_resources(load_settings()), executor=dg.in_process_executor
        ),
    )


defs = build_definitions()
