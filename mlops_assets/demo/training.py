"""Train the fraud model and register it in MLflow: plain Python, no Dagster.

The registered version carries its signature and input example, the training metrics, the training
data snapshot (a parquet artifact, the drift reference), and tags saying what produced it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlops_assets.core.registry import MlflowRegistry, VersionInfo, validate_model_name
from mlops_assets.core.rollout.policy import STRATEGY_TAG
from mlops_assets.demo.data import (
    CATEGORICAL_FEATURES,
    FEATURES,
    NUMERIC_FEATURES,
    TARGET,
    generate_fraud_data,
    label_fraud,
)

log = logging.getLogger(__name__)
EXPERIMENT = "fraud-detection"


@dataclass(frozen=True)
class Fault:
    """Fault-injection settings for a deliberately broken version (rollout drills only)."""

    latency_ms: float = 0.0
    error_rate: float = 0.0


def _pip_requirements() -> list[str]:
    # Naming requirements explicitly spares MLflow inferring them (it imports the model's code to guess).
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "scikit-learn", "pandas", "numpy", "cloudpickle")]


def train_and_register(
    registry: MlflowRegistry,
    model_name: str,
    *,
    n_rows: int = 20_000,
    seed: int = 0,
    shift: float = 0.0,
    fault: Fault | None = None,
    triggered_by: str = "manual",
    strategy: str | None = None,
    recent: pd.DataFrame | None = None,
) -> VersionInfo:
    """Fit the pipeline on generated data, log it to MLflow and register a new version."""
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from mlops_assets.demo.scorer import FaultInjectingScorer, FraudScorer

    validate_model_name(model_name)
    if recent is not None:
        # Retraining on recent traffic: its features, labelled by the ground truth (see label_fraud).
        if len(recent) < 200:
            raise ValueError(f"retraining needs at least 200 recent rows, got {len(recent)}")
        frame = recent[FEATURES].dropna().reset_index(drop=True)
        frame[TARGET] = label_fraud(frame, np.random.default_rng(seed))
        n_rows = len(frame)
    else:
        frame = generate_fraud_data(n_rows, seed=seed, shift=shift)
    train, test = train_test_split(frame, test_size=0.25, random_state=seed, stratify=frame[TARGET])
    pipeline = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [
                        ("num", StandardScaler(), NUMERIC_FEATURES),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL_FEATURES),
                    ]
                ),
            ),
            ("clf", LogisticRegression(max_iter=500)),
        ]
    )
    log.info("training %s on %d rows (seed=%d, shift=%.2f)", model_name, len(train), seed, shift)
    pipeline.fit(train[FEATURES], train[TARGET])
    scores = pipeline.predict_proba(test[FEATURES])[:, 1]
    metrics = {
        "auc": float(roc_auc_score(test[TARGET], scores)),
        "fraud_rate": float(frame[TARGET].mean()),
        "n_train": float(len(train)),
    }
    scorer = FraudScorer(pipeline) if fault is None else FaultInjectingScorer(pipeline, fault.latency_ms, fault.error_rate)
    example = train[FEATURES].head(3)

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    experiment_id = registry.ensure_experiment(EXPERIMENT)
    tags = {"triggered_by": triggered_by, "data_seed": str(seed), "data_shift": str(shift)}
    if recent is not None:
        tags["training_data"] = f"recent traffic ({n_rows} rows)"
    if strategy:
        tags[STRATEGY_TAG] = strategy
    if fault is not None:
        tags["fault_injection"] = json.dumps({"latency_ms": fault.latency_ms, "error_rate": fault.error_rate})
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{model_name}") as run:
        mlflow.log_params({"n_rows": n_rows, "seed": seed, "shift": shift, "model": "logistic_regression"})
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            snapshot = Path(tmp, "training_data.parquet")
            train[FEATURES].to_parquet(snapshot)
            mlflow.log_artifact(str(snapshot), artifact_path="reference")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=scorer,
            signature=infer_signature(example, FraudScorer(pipeline).predict(None, example)),
            input_example=example,
            pip_requirements=_pip_requirements(),
        )
        log.info("logged %s in run %s", info.model_uri, run.info.run_id)
    # Register with the tags in one call, so a sensor never sees the version without them.
    client = registry.client()
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    description = f"FAULT INJECTION for rollout drills: {tags['fault_injection']}" if fault is not None else None
    mv = client.create_model_version(model_name, info.model_uri, run_id=run.info.run_id, tags=tags, description=description)
    version = str(mv.version)
    return registry.get_version(model_name, version)
