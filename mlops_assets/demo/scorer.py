"""The MLflow pyfunc models that the platform serves.

`FraudScorer` returns one fraud probability per row. `FaultInjectingScorer` is a deliberately
broken variant for rollout drills: it adds latency and fails a share of requests. It is labelled
as such in the registry (tag `fault_injection`) and never produced by training.
"""

from __future__ import annotations

import random
import time

import mlflow.pyfunc
import numpy as np
import pandas as pd


class FraudScorer(mlflow.pyfunc.PythonModel):
    """Wraps a fitted scikit-learn pipeline; predicts P(fraud) per row."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return self.pipeline.predict_proba(model_input)[:, 1]


class InjectedFault(RuntimeError):
    """Raised on purpose by `FaultInjectingScorer`: a simulated model failure."""


class FaultInjectingScorer(FraudScorer):
    """FAULT INJECTION, for rollout tests only: `latency_ms` extra per request, `error_rate` of
    requests raise `InjectedFault` (the model server answers 500)."""

    def __init__(self, pipeline, latency_ms: float = 0.0, error_rate: float = 0.0) -> None:
        if latency_ms < 0 or not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"bad fault config: latency_ms={latency_ms}, error_rate={error_rate}")
        super().__init__(pipeline)
        self.latency_ms = latency_ms
        self.error_rate = error_rate

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000.0)
        if self.error_rate and random.random() < self.error_rate:
            raise InjectedFault(f"injected failure (error_rate={self.error_rate})")
        return super().predict(context, model_input, params)
