"""What a user does to put their own model on the platform, end to end.

A team writes a declaration (`defs.yaml`, loaded by dagster's component loader) for a model whose
schema, flavour and task differ from the fraud model's: a scikit-learn regressor on a delivery-time
table, trained and registered by a plain script (examples/delivery_time/train_and_register.py) with
MLflow's API only. Through a real Dagster instance: its assets appear, v1 is served and answers its
own input example, v2 is rolled out by `mlflow_registry_sensor` with the declared strategy and policy,
a version logged without an input example is refused with the message naming what to log, and two
models (this one and the fraud model) roll out at the same time, each with its own lock and decision.
Real MLflow (SQLite), real model servers and routers on 127.0.0.1; nothing mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from mlops_assets.components import MlflowModel
from mlops_assets.components.mlflow_model import model_definitions
from mlops_assets.core.http import post_json
from mlops_assets.core.model_artifacts import input_example
from mlops_assets.core.registry import CHAMPION
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets.core.settings import load_settings
from mlops_assets.defs.resources import build_resources
from mlops_assets.defs.serving.assets import ROLLOUT_TAG
from mlops_assets.defs.serving.jobs import rollback_job, rollout_jobs
from mlops_assets.defs.serving.sensors import mlflow_registry_sensor
from mlops_assets.demo.traffic import TrafficGenerator
from mlops_assets.demo.training import train_and_register
from mlops_assets_tests.conftest import processes_under
from mlops_assets_tests.helpers import FRAUD

pytestmark = pytest.mark.e2e  # fast models and generous SLOs: it runs beside the demo, not alone

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "delivery_time" / "train_and_register.py"
#: What the team writes. A fast policy so the test runs in a minute; strategy blue-green.
DECLARATION = """
type: mlops_assets.components.MlflowModel
attributes:
  name: delivery_time
  strategy: blue_green
  rollout:
    poll_s: 0.5
    steps: [50]
    min_requests_per_step: 30
    no_data_deadline_s: 30
    validation_requests: 12
    max_p95_latency_s: 2.0
    timeout_s: 120
"""
FAST_FRAUD = FRAUD.model_copy(
    update={
        "rollout": FRAUD.rollout.model_copy(
            update={"poll_s": 0.5, "steps": [50], "min_requests_per_step": 30, "no_data_deadline_s": 30, "max_p95_latency_s": 2.0}
        )
    }
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("your_model")
    (home / "mlflow").mkdir()
    resources = build_resources(load_settings({"MLOPS_HOME": str(home)}))
    resources["serving"] = LocalPlatform(home=str(home), supervise=False)
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            component_cls=MlflowModel, defs_path="models/delivery_time", defs_yaml_contents=yaml.safe_load(DECLARATION)
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (_component, user_defs):
            fraud = model_definitions(FAST_FRAUD)
            defs = dg.Definitions(
                assets=[*user_defs.assets, *fraud.assets],
                asset_checks=[*user_defs.asset_checks, *fraud.asset_checks],
                jobs=[*rollout_jobs, rollback_job],
                sensors=[mlflow_registry_sensor],
                resources=resources,
            )
            with dg.instance_for_test() as instance:
                yield home, resources, defs, instance
    resources["serving"].stop_all()
    assert not processes_under(home)


def _register(home: Path, *args: str) -> str:
    """The team's plain script, run as they would run it."""
    # The team's environment, not this test process's: MLflow's calls earlier in the suite export
    # MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI of other stores.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tracking-uri", f"sqlite:///{home}/mlflow/mlflow.db", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1].split()[3]


def _tick(world, cursor):
    _home, resources, defs, instance = world
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"mlflow": resources["mlflow"]}, repository_def=defs.get_repository_def()
    )
    return mlflow_registry_sensor(context)


def _execute(world, request: dg.RunRequest):
    _home, _resources, defs, instance = world
    return defs.resolve_job_def(request.job_name).execute_in_process(
        run_config=request.run_config,
        tags=request.tags,
        asset_selection=request.asset_selection,
        instance=instance,
        raise_on_error=False,
    )


def _materialize(world, *keys: str):
    _home, _resources, defs, instance = world
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        asset_selection=[dg.AssetKey.from_user_string(k) for k in keys], instance=instance, raise_on_error=False
    )


def _failure(result) -> str:
    return "\n".join(str(e.event_specific_data.error.message) for e in result.all_events if e.event_type_value == "STEP_FAILURE")


def _outcome(result, key: str) -> str:
    (final,) = [
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == key and "rollout_outcome" in e.materialization.metadata
    ]
    return final["rollout_outcome"].value


def test_a_team_onboards_its_model_with_a_declaration_and_a_plain_script(world):
    home, resources, defs, _instance = world
    registry, platform = resources["mlflow"], resources["serving"]
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"models/delivery_time", "serving/delivery_time", "models/delivery_time_champion"} <= keys
    assert {"monitoring/delivery_time_drift"} <= keys

    # Declared, nothing registered yet: a state, not a failure.
    before = _materialize(world, "models/delivery_time", "serving/delivery_time")
    assert before.success
    states = {
        e.asset_key.to_user_string(): e.materialization.metadata["state"].value for e in before.get_asset_materialization_events()
    }
    assert states == {"models/delivery_time": "not registered yet", "serving/delivery_time": "not registered yet"}

    # v1 from the team's script (it sets `champion` on the first version): served, answers its input example.
    assert _register(home, "--seed", "1") == "1"
    served = _materialize(world, "models/delivery_time", "serving/delivery_time")
    checks = {c.check_name: c for c in served.get_asset_check_evaluations()}
    assert checks["predictor_answers"].passed, checks["predictor_answers"].metadata
    assert served.success
    status = platform.status("delivery-time")
    assert status.stable_version == "1"
    example = input_example(registry, registry.get_version("delivery_time", 1))
    answer = post_json(status.predict_url("v1"), {"instances": json.loads(example.to_json(orient="records"))}, timeout=30)
    assert len(answer["predictions"]) == len(example) and all(isinstance(p, float) for p in answer["predictions"])

    # v2: the sensor rolls it out with the declared strategy (blue-green) and policy (12 validation requests).
    first = _tick(world, None)
    assert not first.run_requests
    assert _register(home, "--seed", "2") == "2"
    second = _tick(world, first.cursor)
    (request,) = [r for r in second.run_requests if r.tags["mlops-assets/isvc"] == "delivery-time"]
    assert request.job_name == "blue_green_job" and request.tags[ROLLOUT_TAG] == "blue_green"
    rows = json.loads(example.to_json(orient="records"))
    traffic = TrafficGenerator(platform, "delivery-time", rate=40, rows=rows).start()
    try:
        result = _execute(world, request)
    finally:
        traffic.stop()
    assert result.success, _failure(result)
    assert _outcome(result, "serving/delivery_time") == "promoted"
    events = [
        e.materialization.metadata["rollout_event"].value
        for e in result.get_asset_materialization_events()
        if "rollout_event" in e.materialization.metadata
    ]
    # Validated on live traffic mirrored to green (an event per window), then switched.
    kinds = [kind for kind in events if kind not in ("validation_window", "validation_hold")]
    assert kinds[:4] == ["green_deployed", "validation_start", "validated", "switch"], events
    (validated,) = [
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.materialization.metadata.get("rollout_event") and e.materialization.metadata["rollout_event"].value == "validated"
    ]
    assert validated["evidence/validation_requests"].value == 12  # the declared policy, not the platform's 50
    assert platform.status("delivery-time").stable_version == "2"
    assert registry.version_by_alias("delivery_time", CHAMPION).version == "2"

    # v3 logged without an input example: refused before any traffic moves, naming what to log.
    assert _register(home, "--seed", "3", "--without-input-example") == "3"
    third = _tick(world, second.cursor)
    (request,) = [r for r in third.run_requests if r.tags["mlops-assets/isvc"] == "delivery-time"]
    refused = _execute(world, request)
    assert not refused.success
    message = _failure(refused)
    assert "delivery_time v3 has no input example" in message and "input_example=" in message, message
    assert platform.status("delivery-time").stable_version == "2" and "3" not in {
        platform.status("delivery-time").version_of(e["revisionName"]) for e in platform.status("delivery-time").traffic
    }


def test_two_models_roll_out_at_the_same_time_each_with_its_own_lock_and_decision(world):
    """The sensor asks for both rollouts in one tick; the engine's runners then run them at once, in
    two threads (as two run workers would), on the same platform: a healthy canary of the fraud model
    and a blue-green of a version of delivery_time that answers in 2.5 s, over its declared 2 s p95
    SLO. Each decides on its own service's evidence: fraud promoted, delivery_time rolled back."""
    from mlops_assets.core.rollout.policy import Strategy
    from mlops_assets.core.rollout.runner import RolloutRequest, RolloutRunner
    from mlops_assets.defs.serving.assets import validation_body

    home, resources, _defs, _instance = world
    registry, platform = resources["mlflow"], resources["serving"]
    v1 = train_and_register(registry, "fraud_detector", n_rows=2000, seed=1)
    registry.set_alias("fraud_detector", CHAMPION, v1.version)
    assert _materialize(world, "serving/fraud_detector").success
    cursor = _tick(world, None).cursor
    fraud_v2 = train_and_register(registry, "fraud_detector", n_rows=2000, seed=2)
    slow = _register(home, "--seed", "4", "--slow-ms", "2500")
    requests = {r.tags["mlops-assets/isvc"]: r for r in _tick(world, cursor).run_requests}
    assert {isvc: r.job_name for isvc, r in requests.items()} == {
        "fraud-detector": "canary_rollout_job",
        "delivery-time": "blue_green_job",
    }

    declarations = {"fraud-detector": FAST_FRAUD, "delivery-time": _declared(world)}
    versions = {"fraud-detector": fraud_v2, "delivery-time": registry.get_version("delivery_time", slow)}
    events: dict[str, list] = {"fraud-detector": [], "delivery-time": []}
    reports: dict[str, object] = {}

    def roll_out(isvc: str) -> None:
        declaration, version = declarations[isvc], versions[isvc]
        runner = RolloutRunner(
            platform=platform,
            metrics=resources["metrics"],
            registry=registry,
            policy=declaration.rollout_policy(resources["rollout_policy"]),
            emit=events[isvc].append,
            log=lambda message: None,
            validation_body=validation_body(registry, version),
        )
        strategy = Strategy(requests[isvc].tags[ROLLOUT_TAG])
        reports[isvc] = runner.run(RolloutRequest(declaration.name, version, strategy, "mlops-serving", "test", f"run-{isvc}"))

    example = input_example(registry, versions["delivery-time"])
    traffic = [
        TrafficGenerator(platform, "fraud-detector", rate=40).start(),
        TrafficGenerator(platform, "delivery-time", rate=20, rows=json.loads(example.to_json(orient="records"))).start(),
    ]
    try:
        threads = [threading.Thread(target=roll_out, args=(isvc,)) for isvc in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    finally:
        for generator in traffic:
            generator.stop()
    assert reports["fraud-detector"].result.outcome == "promoted", reports["fraud-detector"].result.reason
    assert reports["delivery-time"].result.outcome == "rolled_back", reports["delivery-time"].result.reason
    evidence = reports["delivery-time"].result.evidence
    assert evidence["max_p95_latency_s"] == 2.0 and evidence["green_p95_s"] > 2.0  # judged against its declared SLO
    assert platform.status("fraud-detector").stable_version == fraud_v2.version
    assert platform.status("delivery-time").stable_version != slow
    # Every event of a rollout concerns its own service, and each lock is free again.
    assert {e.rollout_id for e in events["fraud-detector"]} == {reports["fraud-detector"].rollout_id}
    assert {e.rollout_id for e in events["delivery-time"]} == {reports["delivery-time"].rollout_id}
    for isvc in requests:
        assert platform.rollout_lock(isvc).holder() is None


def _declared(world):
    """delivery_time's declaration as the code location read it (from models/delivery_time's metadata)."""
    from mlops_assets.defs.models.assets import declared_models

    return declared_models(world[2].get_repository_def())["delivery_time"]
