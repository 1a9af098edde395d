"""`MlflowModel`: one MLflow registered model put on the platform by a short declaration.

A team adds `defs/models/<name>/defs.yaml`:

    type: mlops_assets.components.MlflowModel
    attributes:
      name: delivery_time

and gets the whole lifecycle for that model: `models/<name>` (its registry state, or its training
when a training function is declared), `serving/<name>` with its blocking checks, the promotion gate
`models/<name>_champion` and `monitoring/<name>_drift`; `mlflow_registry_sensor` and
`prometheus_alert_sensor` watch it, and the rollout jobs roll its versions out. The attributes are
`ModelDeclaration`'s (core/declaration.py): a bad key, value or name fails at load with the file,
the line and the field.
"""

from __future__ import annotations

from typing import Literal

import dagster as dg
import pydantic

from mlops_assets.core.declaration import DriftOverrides, ModelDeclaration, RolloutOverrides
from mlops_assets.core.rollout.policy import Strategy
from mlops_assets.defs.models.assets import build_champion_asset, build_model_asset
from mlops_assets.defs.monitoring.assets import build_drift_asset
from mlops_assets.defs.serving.assets import build_serving_asset
from mlops_assets.defs.serving.checks import build_serving_checks


def model_definitions(declaration: ModelDeclaration) -> dg.Definitions:
    """Every asset and check of one declared model."""
    drift, drift_check = build_drift_asset(declaration)
    return dg.Definitions(
        assets=[
            build_model_asset(declaration),
            build_serving_asset(declaration),
            build_champion_asset(declaration),
            drift,
        ],
        asset_checks=[*build_serving_checks(declaration), drift_check],
    )


def _resolvable(section: type[pydantic.BaseModel]) -> type[pydantic.BaseModel]:
    """The engine's section model, made readable from YAML by the component loader (which accepts
    nested models with bounded fields only when they are Resolvable too)."""
    return pydantic.create_model(section.__name__, __base__=(section, dg.Resolvable), __doc__=section.__doc__)


RolloutSection = _resolvable(RolloutOverrides)
DriftSection = _resolvable(DriftOverrides)
#: The strategies as YAML sees them (the loader checks a Literal, with the file and line, before the
#: declaration turns it into a `Strategy`).
StrategyName = Literal[tuple(str(s) for s in Strategy)]  # type: ignore[valid-type]


class MlflowModel(ModelDeclaration, dg.Component, dg.Resolvable):
    """A model the platform serves: an MLflow registered model name and its policy (rollout strategy
    and thresholds, drift thresholds and features, replicas and resources, an optional training
    function). Everything but `name` has a default."""

    strategy: StrategyName = str(Strategy.CANARY)  # type: ignore[assignment]
    rollout: RolloutSection = pydantic.Field(default_factory=RolloutSection)  # type: ignore[valid-type]
    drift: DriftSection = pydantic.Field(default_factory=DriftSection)  # type: ignore[valid-type]

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return model_definitions(ModelDeclaration(**self.model_dump()))
