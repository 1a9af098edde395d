"""A team's own training script, outside Dagster: a delivery-time regressor registered in MLflow.

It knows nothing of the platform. It trains a scikit-learn pipeline on its own table (numeric and
categorical columns, a numeric target), logs it with MLflow's API the way the platform needs (a
signature, an input example, the training data) and registers a version. The platform, told about
the model by `mlops_assets/defs/models/delivery_time/defs.yaml`, does the rest: it serves the
`champion`, and `mlflow_registry_sensor` rolls each new version out with the declared policy.

    python examples/delivery_time/train_and_register.py --tracking-uri sqlite:///.mlops/mlflow/mlflow.db

`--without-input-example` logs a version the platform must refuse (it names what to log);
`--slow-ms` makes a version that answers slowly (a rollout drill).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib.metadata import version as installed
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

MODEL = "delivery_time"
NUMERIC = ["distance_km", "items", "hour"]
CATEGORICAL = ["city", "vehicle"]


def make_table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "distance_km": rng.gamma(2.0, 2.5, n),
            "items": rng.integers(1, 12, n).astype("int64"),
            "hour": rng.integers(0, 24, n).astype("int64"),
            "city": rng.choice(["lisbon", "porto", "braga"], n),
            "vehicle": rng.choice(["bike", "car", "scooter"], n, p=[0.5, 0.2, 0.3]),
        }
    )
    speed = frame["vehicle"].map({"bike": 14.0, "car": 25.0, "scooter": 20.0})
    frame["minutes"] = 8 + 60 * frame["distance_km"] / speed + 1.5 * frame["items"] + rng.normal(0, 3, n)
    return frame


class SlowModel(mlflow.pyfunc.PythonModel):
    """The regressor, answering after `delay_ms` (a drill: a version that breaks the latency SLO)."""

    def __init__(self, pipeline, delay_ms: float) -> None:
        self.pipeline, self.delay_ms = pipeline, delay_ms

    def predict(self, context, model_input, params=None):
        time.sleep(self.delay_ms / 1000)
        return self.pipeline.predict(model_input)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--without-input-example", action="store_true")
    parser.add_argument("--slow-ms", type=float, default=0.0)
    args = parser.parse_args(argv)

    table = make_table(args.rows, args.seed)
    features = table[NUMERIC + CATEGORICAL]
    pipeline = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [("num", StandardScaler(), NUMERIC), ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)]
                ),
            ),
            ("regressor", Ridge(alpha=1.0)),
        ]
    ).fit(features, table["minutes"])
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_registry_uri(args.tracking_uri)  # the registry lives there too (not wherever MLFLOW_REGISTRY_URI points)
    mlflow.set_experiment("delivery-time")
    requirements = [f"{pkg}=={installed(pkg)}" for pkg in ("mlflow", "scikit-learn", "pandas", "numpy", "cloudpickle")]
    with mlflow.start_run() as run:
        mlflow.log_params({"rows": args.rows, "seed": args.seed, "model": "ridge"})
        mlflow.log_metric("rmse", float(np.sqrt(np.mean((pipeline.predict(features) - table["minutes"]) ** 2))))
        with tempfile.TemporaryDirectory() as tmp:
            snapshot = Path(tmp, "training_data.parquet")
            features.to_parquet(snapshot)
            mlflow.log_artifact(str(snapshot), artifact_path="reference")
        example = None if args.without_input_example else features.head(3)
        signature = infer_signature(features.head(50), pipeline.predict(features.head(50)))
        if args.slow_ms:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=SlowModel(pipeline, args.slow_ms),
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
            )
        else:
            info = mlflow.sklearn.log_model(
                pipeline, name="model", signature=signature, input_example=example, pip_requirements=requirements
            )
    registered = mlflow.register_model(info.model_uri, MODEL, tags={"trained_by": "examples/delivery_time"})
    client = mlflow.MlflowClient()
    if len(client.search_model_versions(f"name = '{MODEL}'")) == 1:
        client.set_registered_model_alias(MODEL, "champion", registered.version)
    print(f"registered {MODEL} version {registered.version} (run {run.info.run_id})")
    return registered.version


if __name__ == "__main__":
    main()
