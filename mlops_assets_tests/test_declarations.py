"""Model declarations (`defs/models/<name>/defs.yaml`, the `MlflowModel` component): a three-line
declaration gives a model its whole lifecycle; its policy overrides the platform's field by field;
bad declarations fail at load naming the file, the line and the field (in-process with dagster's
component sandbox, and through the real `dg check defs` on a copy of the project)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from mlops_assets.components import MlflowModel
from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.monitoring.drift import DriftConfig
from mlops_assets.core.rollout.policy import RolloutPolicy, Strategy
from mlops_assets.definitions import check_declarations
from mlops_assets.defs.models.assets import DECLARATION_KEY, ROLE_TAG, declared_models
from mlops_assets_tests.helpers import project_cli

ROOT = Path(__file__).resolve().parents[1]
TYPE = "mlops_assets.components.MlflowModel"


def _load(attributes: dict):
    """Write `attributes` as a defs.yaml in a sandboxed defs folder, load it, return (component, defs)."""
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            component_cls=MlflowModel, defs_path="models/m", defs_yaml_contents={"type": TYPE, "attributes": attributes}
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
            return component, defs


def test_a_three_line_declaration_gives_the_model_its_whole_lifecycle():
    component, defs = _load({"name": "delivery_time"})
    keys = {key.to_user_string() for a in defs.assets for key in a.keys}
    assert keys == {
        "models/delivery_time",
        "serving/delivery_time",
        "models/delivery_time_champion",
        "monitoring/delivery_time_drift",
    }
    checks = {key.name for c in defs.asset_checks for key in c.check_keys}
    assert checks == {"predictor_answers", "error_rate", "p95_latency", "drift_share"}
    roles = {key.to_user_string(): a.tags_by_key[key][ROLE_TAG] for a in defs.assets for key in a.keys}
    assert roles["serving/delivery_time"] == "serving" and roles["models/delivery_time_champion"] == "champion"
    (model,) = [a for a in defs.assets if dg.AssetKey(["models", "delivery_time"]) in a.keys]
    assert "Trained outside the platform" in model.descriptions_by_key[dg.AssetKey(["models", "delivery_time"])]
    repository = dg.Definitions(
        assets=[dg.AssetSpec(["models", "delivery_time"], metadata=model.specs_by_key[model.key].metadata)]
    ).get_repository_def()
    assert declared_models(repository) == {"delivery_time": ModelDeclaration(name="delivery_time")}
    assert ModelDeclaration(**component.model_dump()).strategy is Strategy.CANARY


def test_the_declared_policy_overrides_the_platforms_field_by_field():
    component, defs = _load(
        {
            "name": "delivery_time",
            "strategy": "blue_green",
            "rollout": {"max_p95_latency_s": 0.3, "steps": [10, 50]},
            "drift": {"drift_share_threshold": 0.3},
            "drift_features": ["distance_km"],
        }
    )
    declaration = ModelDeclaration(**component.model_dump())
    platform = RolloutPolicy(max_error_rate=0.02, poll_s=1.0)  # as set from MLOPS_ROLLOUT_* for the platform
    policy = declaration.rollout_policy(platform)
    assert (policy.max_p95_latency_s, policy.steps, policy.max_error_rate, policy.poll_s) == (0.3, [10, 50], 0.02, 1.0)
    drift = declaration.drift_config(DriftConfig(home="/tmp/x"))
    assert (drift.drift_share_threshold, drift.alpha, drift.home) == (0.3, DriftConfig().alpha, "/tmp/x")
    assert declaration.strategy is Strategy.BLUE_GREEN
    (serving,) = [a for a in defs.assets if dg.AssetKey(["serving", "delivery_time"]) in a.keys]
    shown = serving.specs_by_key[serving.key].metadata["policy"]
    assert shown["strategy"] == "blue_green" and shown["rollout"] == {"max_p95_latency_s": 0.3, "steps": [10, 50]}
    (model,) = [a for a in defs.assets if dg.AssetKey(["models", "delivery_time"]) in a.keys]
    assert model.specs_by_key[model.key].metadata[DECLARATION_KEY]["strategy"] == "blue_green"


BAD = [
    pytest.param({"name": "delivery_time", "colour": "red"}, "colour", id="unknown-key"),
    pytest.param({"name": "delivery_time", "rollout": {"max_error_rate": 2}}, "rollout.max_error_rate", id="threshold-range"),
    pytest.param({"name": "delivery_time", "rollout": {"max_p95_latency_s": -1}}, "rollout.max_p95_latency_s", id="negative-slo"),
    pytest.param({"name": "delivery_time", "drift": {"alpha": 1.5}}, "drift.alpha", id="drift-alpha"),
    pytest.param({"name": "delivery_time", "strategy": "yolo"}, "strategy", id="unknown-strategy"),
    pytest.param({"name": "Bad Name!"}, "name", id="invalid-model-name"),
    pytest.param({"strategy": "canary"}, "name", id="missing-name"),
]


@pytest.mark.parametrize(("attributes", "field"), BAD)
def test_a_bad_declaration_fails_at_load_naming_file_line_and_field(tmp_path, attributes, field):
    """What the code location runs before loading (so `dg check defs` and every load show it)."""
    path = _declare(tmp_path, "m", attributes)
    with pytest.raises(dg.DagsterInvalidDefinitionError) as caught:
        check_declarations(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and f"attributes.{field}" in message, message
    line = int(message[len(str(path)) + 1 :].split(":")[0])
    assert field.split(".")[-1] in path.read_text().splitlines()[line - 1] or field == "name", (line, path.read_text())


def _declare(defs_dir: Path, folder: str, attributes: dict) -> Path:
    path = defs_dir / "models" / folder / "defs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"type": TYPE, "attributes": attributes}, sort_keys=False))
    return path


def test_two_declarations_of_one_model_are_refused_naming_both_files(tmp_path):
    first = _declare(tmp_path, "a", {"name": "delivery_time"})
    second = _declare(tmp_path, "b", {"name": "delivery_time", "strategy": "ab_test"})
    with pytest.raises(dg.DagsterInvalidDefinitionError) as caught:
        check_declarations(tmp_path)
    assert f"{first}:3" in str(caught.value) and f"{second}:3" in str(caught.value)
    assert "attributes.name" in str(caught.value)
    _declare(tmp_path, "b", {"name": "price_model"})
    check_declarations(tmp_path)


def _project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "mlops_assets", project / "mlops_assets", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    return project


@pytest.mark.parametrize(
    ("attributes", "duplicate", "expected"),
    [
        pytest.param({"name": "delivery_time", "colour": "red"}, False, "colour", id="unknown-key"),
        pytest.param({"name": "delivery_time", "rollout": {"max_error_rate": 2}}, False, "max_error_rate", id="threshold"),
        pytest.param({"name": "Bad Name!"}, False, "name", id="invalid-name"),
        pytest.param({"name": "fraud_detector"}, True, "declared twice", id="duplicate"),
    ],
)
def test_dg_check_defs_rejects_each_kind_of_bad_declaration(tmp_path, attributes, duplicate, expected):
    """`dg check defs` on a copy of the project with one more declaration, as a user would run it."""
    project = _project_copy(tmp_path)
    path = _declare(project / "mlops_assets" / "defs", "new_model", attributes)
    env = {**os.environ, "PYTHONPATH": str(project), "MLOPS_HOME": str(tmp_path / "home")}
    out = project_cli("dg", "check", "defs", "--use-active-venv", env=env, cwd=project)
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert expected in output and f"{path}:" in output, output
    if duplicate:
        assert str(project / "mlops_assets" / "defs" / "models" / "fraud_detector" / "defs.yaml") in output


def test_the_declared_replicas_and_resources_shape_its_inference_service():
    """On a cluster the same declaration produces the InferenceService (modelFormat mlflow)."""
    from mlops_assets.core.serving.manifest import Deployment, build_inference_service

    component, _defs = _load({"name": "delivery_time", "min_replicas": 2, "max_replicas": 4, "requests": {"cpu": "1500m"}})
    declaration = ModelDeclaration(**component.model_dump())
    manifest = build_inference_service(
        Deployment(model_name="delivery_time", version="3", storage_uri="s3://mlflow/3/model", **declaration.deployment_fields())
    )
    predictor = manifest["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 4)
    assert predictor["model"]["modelFormat"] == {"name": "mlflow"}
    assert predictor["model"]["resources"]["requests"] == {"cpu": "1500m"}
    assert manifest["metadata"]["name"] == "delivery-time"
