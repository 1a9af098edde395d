"""A model's declaration: which MLflow registered model the platform serves, and that model's policy.

A team onboards its model with one short declaration (`defs/models/<name>/defs.yaml`, read by the
`MlflowModel` component); everything but the name has a default. Its rollout and drift sections
override, field by field, the platform's policy (`RolloutPolicy` and `DriftConfig`, themselves set
from the environment), so the allowed fields, their bounds and their defaults are written once, in
those classes: the override models below are derived from them.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic.fields import FieldInfo

from mlops_assets.core.config import EngineConfig
from mlops_assets.core.monitoring.drift import DriftConfig
from mlops_assets.core.registry import validate_model_name
from mlops_assets.core.rollout.policy import RolloutPolicy, Strategy
from mlops_assets.core.serving.manifest import isvc_name_for

#: What a declaration may not override: where the platform keeps its files is not a model's policy.
_PLATFORM_ONLY = {"home"}


def _overrides(policy: type[EngineConfig], name: str, doc: str) -> type[EngineConfig]:
    """A model with every field of `policy` optional (None: the platform's value), same bounds."""
    fields: dict[str, Any] = {}
    for field_name, field in policy.model_fields.items():
        if field_name in _PLATFORM_ONLY:
            continue
        # The bounds apply to the value when given; None (absent) means the platform's value.
        bounded = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        fields[field_name] = (bounded | None, FieldInfo(default=None, description=field.description))
    return pydantic.create_model(name, __base__=EngineConfig, __doc__=doc, **fields)


RolloutOverrides = _overrides(RolloutPolicy, "RolloutOverrides", "Fields of RolloutPolicy this model sets.")
DriftOverrides = _overrides(DriftConfig, "DriftOverrides", "Fields of DriftConfig this model sets.")


class ModelDeclaration(EngineConfig):
    """One served model: its MLflow registered model name and its policy."""

    #: The MLflow registered model (also the asset names: models/<name>, serving/<name>, ...): a name
    #: MLflow accepts whose InferenceService name (lower-cased, `_`/`.` as `-`) Kubernetes accepts too.
    name: Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,44}$")]
    #: How new versions are rolled out, unless a version's (or the model's) `rollout_strategy` tag says otherwise.
    strategy: Strategy = Strategy.CANARY
    rollout: RolloutOverrides = pydantic.Field(default_factory=RolloutOverrides)  # type: ignore[valid-type]
    drift: DriftOverrides = pydantic.Field(default_factory=DriftOverrides)  # type: ignore[valid-type]
    #: Features the drift report compares (default: every input of the version's signature).
    drift_features: list[str] | None = None
    #: `module:function` that trains and registers a version (optional: models trained elsewhere
    #: only register versions in MLflow, and the platform does the rest).
    training: str | None = pydantic.Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    #: Each revision's predictor on a cluster: replicas (autoscaled between the two) and resources,
    #: e.g. {"cpu": "500m", "memory": "1Gi"}. None: the manifest builder's defaults (`Deployment`).
    min_replicas: int | None = pydantic.Field(default=None, ge=0, le=100)
    max_replicas: int | None = pydantic.Field(default=None, ge=1, le=100)
    requests: dict[str, str] | None = None
    limits: dict[str, str] | None = None

    @pydantic.field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        """A name MLflow accepts, whose InferenceService name Kubernetes accepts too."""
        validate_model_name(name)
        isvc_name_for(name)
        return name

    @property
    def isvc(self) -> str:
        return isvc_name_for(self.name)

    def rollout_policy(self, platform: RolloutPolicy) -> RolloutPolicy:
        """The platform's rollout policy with this model's overrides applied (and validated)."""
        return RolloutPolicy(**{**platform.model_dump(), **self.rollout.model_dump(exclude_none=True)})

    def drift_config(self, platform: DriftConfig) -> DriftConfig:
        """The platform's drift configuration with this model's overrides applied (and validated)."""
        return DriftConfig(**{**platform.model_dump(), **self.drift.model_dump(exclude_none=True)})

    def deployment_fields(self) -> dict[str, Any]:
        """What this model sets of its InferenceService (`Deployment` fields); the rest are defaults."""
        fields = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas}
        fields |= {"requests": self.requests, "limits": self.limits}
        return {key: value for key, value in fields.items() if value is not None}

    def policy_summary(self) -> dict[str, Any]:
        """What this model sets, for the UI (the rest is the platform's policy)."""
        return {
            "strategy": str(self.strategy),
            "rollout": self.rollout.model_dump(exclude_none=True),
            "drift": self.drift.model_dump(exclude_none=True),
            "drift_features": self.drift_features or "signature",
            "training": self.training or "outside the platform (registered in MLflow)",
            "deployment": self.deployment_fields(),
        }
