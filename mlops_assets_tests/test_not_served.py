"""A declared model with no InferenceService yet: the assets and checks that act on a served model say "not served
yet" (a warning for the checks, a materialization that says so for the champion gate and the drift report) and touch
nothing else of the platform, the registry or the metrics."""

from __future__ import annotations

import dagster as dg

from mlops_assets.components.mlflow_model import model_definitions
from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.monitoring.drift import DriftConfig
from mlops_assets.core.rollout.policy import RolloutPolicy


class NothingServed:
    """A platform with no InferenceService; any other call is a failure of the guard."""

    def list_services(self) -> list[str]:
        return []

    def __getattr__(self, method: str):
        if method.startswith("_"):  # Dagster's own probes of a resource object
            raise AttributeError(method)
        raise AssertionError(f"{method} called on a platform that serves nothing")


class Untouched:
    """The registry and the metrics: nothing may be read while nothing is served."""

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        raise AssertionError(f"{method} called while nothing is served")


def test_a_model_not_served_yet_is_said_so_by_its_checks_its_champion_and_its_drift(tmp_path):
    loaded = model_definitions(ModelDeclaration(name="fraud_detector"))
    result = dg.materialize(
        [*loaded.assets, *loaded.asset_checks],
        selection=dg.AssetSelection.assets(["models", "fraud_detector_champion"], ["monitoring", "fraud_detector_drift"])
        | dg.AssetSelection.checks_for_assets(dg.AssetKey(["serving", "fraud_detector"])),
        resources={
            "serving": NothingServed(),
            "mlflow": Untouched(),
            "metrics": Untouched(),
            "rollout_policy": RolloutPolicy(),
            "drift_policy": DriftConfig(home=str(tmp_path)),
        },
    )
    assert result.success
    champion = result.asset_materializations_for_node("models__fraud_detector_champion")[0].metadata
    assert (champion["champion_version"].value, champion["note"].value) == ("", "fraud-detector is not served yet")
    drift = result.asset_materializations_for_node("monitoring__fraud_detector_drift")[0].metadata
    assert drift["dataset_verdict"].value == "not served yet"
    checks = {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key.path[0] == "serving"}
    assert set(checks) == {"predictor_answers", "error_rate", "p95_latency"}
    for evaluation in checks.values():
        assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.metadata["note"].value == "fraud-detector is not served yet: no champion"
