"""Cost of one `mlflow_registry_sensor` tick against a registry with 5,000 versions.

Baseline in the same run: the naive tick that lists every version of the model
(`search_model_versions`) to find the new ones, which is what a sensor that rescans the registry
does. Versions are created straight through MLflow's client on SQLite (no training: the cost under
test is the registry query, not the model). Prints the median over repeated ticks with one new
version pending, and ends with `sensor_tick_ms versions=5000 ms=<x>`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.registry import CHAMPION, MlflowRegistry
from mlops_assets.defs.models.assets import DECLARATION_KEY
from mlops_assets.defs.serving.sensors import mlflow_registry_sensor

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
MODEL = "fraud_detector"


def main() -> None:
    home = Path(tempfile.mkdtemp())
    (home / "mlflow").mkdir()
    registry = MlflowRegistry(tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", artifact_root=str(home / "art"))
    client = registry.client()
    client.create_registered_model(MODEL)
    t0 = time.perf_counter()
    for _ in range(N):
        client.create_model_version(MODEL, source="file:///tmp/model", run_id=None)
    print(f"created {N} versions in {time.perf_counter() - t0:.1f}s")
    registry.set_alias(MODEL, CHAMPION, str(N - 1))  # version N is pending
    ours, naive = [], []
    # The code location as the sensor reads it: one declared model.
    declaration = ModelDeclaration(name=MODEL)
    spec = dg.AssetSpec(["models", MODEL], metadata={DECLARATION_KEY: declaration.model_dump(mode="json")})
    repository = dg.Definitions(assets=[spec]).get_repository_def()
    with dg.instance_for_test() as instance:
        # Steady state: the cursor after a first tick (which also caches the model's tags).
        warm = dg.build_sensor_context(
            instance=instance,
            cursor=json.dumps({MODEL: {"seen": N - 2, "challenger": None}}),
            resources={"mlflow": registry},
            repository_def=repository,
        )
        state = json.loads(mlflow_registry_sensor(warm).cursor)
        state[MODEL]["seen"] = N - 1
        cursor = json.dumps(state)
        for _ in range(30):
            ctx = dg.build_sensor_context(
                instance=instance, cursor=cursor, resources={"mlflow": registry}, repository_def=repository
            )
            t = time.perf_counter()
            result = mlflow_registry_sensor(ctx)
            ours.append((time.perf_counter() - t) * 1000)
            assert [r.run_key for r in result.run_requests] == [f"{MODEL}:{N}:canary"]
            t = time.perf_counter()
            versions = client.search_model_versions(f"name = '{MODEL}'", max_results=200_000)
            pending = [v for v in versions if int(v.version) > N - 1]
            naive.append((time.perf_counter() - t) * 1000)
            assert len(pending) == 1
    o, b = statistics.median(ours), statistics.median(naive)
    print(f"median tick: ours {o:.1f} ms, naive full scan {b:.1f} ms, ratio naive/ours {b / o:.1f}")
    print(f"sensor_tick_ms versions={N} ms={o:.1f}")


if __name__ == "__main__":
    main()
