"""The code location: everything under `defs/`, loaded the way `dg` projects are.

`defs/` holds one folder per domain (platform, models, serving, monitoring) with its assets,
checks, jobs and sensors, and `defs/resources.py`, the one place that picks implementations for
the environment. The engine they call lives in `core/` and never imports Dagster.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlops_assets.defs.models import assets as models
from mlops_assets.defs.monitoring import assets as monitoring
from mlops_assets.defs.platform import assets as platform
from mlops_assets.defs.serving import assets as serving
from mlops_assets.defs.serving import checks as serving_checks

#: Unbound definitions, for tests that supply their own resources.
ALL_ASSETS = [*platform.defs.assets, *models.defs.assets, *serving.defs.assets, *monitoring.defs.assets]
ALL_CHECKS = [*platform.defs.asset_checks, *serving_checks.defs.asset_checks, *monitoring.defs.asset_checks]


def build_definitions() -> dg.Definitions:
    """Everything under `defs/`, with the resources for the environment (settings read now)."""
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        # One process per run, not per step: every step would otherwise pay the imports of
        # dagster, MLflow and pandas again; the steps here wait on I/O, not on CPU.
        dg.Definitions(executor=dg.in_process_executor),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What `dagster`, `dg` and the code server load: built on load, never at import."""
    return build_definitions()
