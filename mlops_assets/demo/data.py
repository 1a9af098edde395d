"""A synthetic fraud-detection table the project generates itself.

Numeric and categorical features with a known generating process, a fraud label drawn from a
logistic model of them, and a `shift` knob that moves the feature distributions (in standard
deviations for numeric features, towards rarer categories for categorical ones), so drift and
retraining can be exercised with data whose truth is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NUMERIC_FEATURES = ["amount", "hour", "distance_km", "account_age_days", "tx_count_24h", "merchant_risk"]
CATEGORICAL_FEATURES = ["merchant_category", "channel", "country"]
FEATURES = NUMERIC_FEATURES + CATEGORICAL_FEATURES
TARGET = "is_fraud"

_CATEGORIES = {
    "merchant_category": (["grocery", "electronics", "travel", "fashion", "gaming", "fuel"], [0.3, 0.15, 0.1, 0.2, 0.1, 0.15]),
    "channel": (["pos", "web", "mobile"], [0.5, 0.3, 0.2]),
    "country": (["DE", "FR", "US", "GB", "NG", "BR"], [0.3, 0.2, 0.25, 0.15, 0.05, 0.05]),
}
_RISKY = {"electronics": 0.8, "travel": 0.5, "gaming": 0.9, "web": 0.5, "mobile": 0.3, "NG": 1.0, "BR": 0.6}


def generate_fraud_data(n_rows: int, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    """`n_rows` transactions; `shift` > 0 moves every feature's distribution (0 = training-time)."""
    if n_rows <= 0:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            # Each numeric feature's location moves by `shift` of its own standard deviation.
            "amount": np.exp(rng.normal(3.5 + 1.0 * shift, 1.0, n_rows)).round(2),
            "hour": np.clip(rng.normal(14 + 4.0 * shift, 4.0, n_rows), 0, 23.99),
            "distance_km": np.abs(rng.normal(20 + 30.0 * shift, 30.0, n_rows)),
            "account_age_days": np.clip(rng.normal(900 - 400.0 * shift, 400.0, n_rows), 1, None),
            "tx_count_24h": rng.poisson(3 + 2.0 * max(shift, 0.0), n_rows).astype(float),
            "merchant_risk": np.clip(rng.normal(0.3 + 0.15 * shift, 0.15, n_rows), 0, 1),
        }
    )
    for column, (levels, probs) in _CATEGORIES.items():
        p = np.asarray(probs, dtype=float)
        if shift:
            # Tilt towards the rarer levels as the shift grows.
            p = p * np.exp(-shift * (p - p.mean()) * 10)
            p = p / p.sum()
        frame[column] = rng.choice(levels, size=n_rows, p=p)
    frame[TARGET] = label_fraud(frame, rng)
    return frame


def label_fraud(features: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth labels from the generating process. For recent traffic this stands in for the
    labels a real platform gets later (chargebacks, analyst review)."""
    logit = (
        -4.0
        + 0.6 * (np.log(features["amount"].astype(float).clip(lower=0.01)) - 3.5)
        + 0.02 * features["distance_km"].astype(float)
        - 0.001 * features["account_age_days"].astype(float)
        + 0.2 * features["tx_count_24h"].astype(float)
        + 3.0 * features["merchant_risk"].astype(float)
        + 0.8 * ((features["hour"] < 6) | (features["hour"] > 22))
        + sum(features[c].map(_RISKY).fillna(0.0) for c in CATEGORICAL_FEATURES)
    )
    return (rng.random(len(features)) < 1 / (1 + np.exp(-logit.to_numpy(dtype=float)))).astype(int)
