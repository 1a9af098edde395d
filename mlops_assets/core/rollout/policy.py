"""The rollout policy: thresholds and timing as configuration, shared by jobs, checks and sensor."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from mlops_assets.core.config import EngineConfig
from mlops_assets.core.settings import ROLLOUT_DEFAULTS, SHADOW_MAX_IN_FLIGHT


class Strategy(StrEnum):
    """How a new model version reaches users; the closed set a rollout can be asked for."""

    CANARY = "canary"
    BLUE_GREEN = "blue_green"
    AB_TEST = "ab_test"
    #: Live requests mirrored to the candidate, users served by the stable revision only; promoted when the paired
    #: comparison passes (`shadow.py`).
    SHADOW = "shadow"
    #: Shadow first; when it passes, a canary of the same revision.
    SHADOW_THEN_CANARY = "shadow_then_canary"


#: The registry tag (on a version, or else on its model) that picks the strategy of its rollout.
STRATEGY_TAG = "rollout_strategy"
DEFAULT_STRATEGY = Strategy.CANARY


def strategy_from_tag(tag: str | None, default: Strategy = DEFAULT_STRATEGY) -> Strategy:
    """The strategy a registry tag asks for; `default` (the model's declared one) when the tag is
    absent or names none."""
    try:
        return Strategy(tag) if tag else default
    except ValueError:
        return default


class RolloutPolicy(EngineConfig):
    """Rollout thresholds (error rate, p95 latency, false-alarm bounds), traffic steps and timing."""

    max_error_rate: float = Field(default=ROLLOUT_DEFAULTS["max_error_rate"], gt=0, lt=1)
    max_p95_latency_s: float = Field(default=ROLLOUT_DEFAULTS["max_p95_latency_s"], gt=0)
    alpha: float = Field(default=0.01, gt=0, le=0.5)
    promote_alpha: float = Field(default=0.05, gt=0, le=0.5)
    min_rate_ratio: float = Field(default=1.5, gt=1)
    steps: list[int] = Field(default_factory=lambda: list(ROLLOUT_DEFAULTS["steps"]))
    min_requests_per_step: int = Field(default=ROLLOUT_DEFAULTS["min_requests_per_step"], ge=1)
    no_data_deadline_s: float = Field(default=120.0, gt=0)
    # Low traffic (see core/rollout/analysis.py): when the declared steps would take longer than this at the
    # observed request rate, the canary's share is raised (up to max_low_traffic_percent) so that it decides in time.
    decision_budget_s: float = Field(default=600.0, gt=0)
    max_low_traffic_percent: int = Field(default=50, ge=1, le=100)
    # Relative latency: the canary's latency tail may be at most this multiple of the baseline's, plus the margin.
    latency_ratio_tolerance: float = Field(default=1.2, ge=1)
    latency_margin_s: float = Field(default=0.002, ge=0)
    poll_s: float = Field(default=ROLLOUT_DEFAULTS["poll_s"], gt=0)
    timeout_s: float = Field(default=900.0, gt=0)
    validation_requests: int = Field(default=50, ge=1)
    ab_alpha: float = Field(default=0.05, gt=0, le=0.5)
    ab_base_rate: float = Field(default=ROLLOUT_DEFAULTS["ab_base_rate"], gt=0, lt=1)
    ab_min_lift: float = Field(default=ROLLOUT_DEFAULTS["ab_min_lift"], gt=0)
    # Shadow traffic (see core/rollout/shadow.py): how much is mirrored, and what the candidate may change.
    shadow_percent: int = Field(default=100, ge=1, le=100)
    shadow_max_in_flight: int = Field(default=SHADOW_MAX_IN_FLIGHT, ge=1, le=1024)
    shadow_threshold: float | None = None  # a classifier's decision threshold; None: compare scores / regressions
    shadow_max_flip_rate: float = Field(default=0.02, gt=0, lt=1)
    shadow_max_mean_abs_diff: float = Field(default=0.05, gt=0)
    shadow_diff_cap: float = Field(default=1.0, gt=0)
    shadow_max_ks_distance: float = Field(default=0.2, gt=0, lt=1)
    shadow_min_requests: int = Field(default=200, ge=1)

    def thresholds(self):
        """The policy as the analysis's `Thresholds`, whose every field is a field of the policy (numpy is imported
        only when a rollout runs)."""
        from dataclasses import fields

        from mlops_assets.core.rollout.analysis import Thresholds

        values = {f.name: getattr(self, f.name) for f in fields(Thresholds)}
        return Thresholds(**{**values, "steps": tuple(self.steps)})

    def shadow_tolerances(self):
        """The policy as the shadow analysis's `ShadowTolerances` (the `shadow_*` fields and the shared SLOs)."""
        from dataclasses import fields

        from mlops_assets.core.rollout.shadow import ShadowTolerances

        names = {f.name for f in fields(ShadowTolerances)}
        values = {name: getattr(self, name) for name in names if name in type(self).model_fields}
        values |= {name: getattr(self, f"shadow_{name}") for name in names if f"shadow_{name}" in type(self).model_fields}
        values["min_requests"] = self.shadow_min_requests
        return ShadowTolerances(**values)
