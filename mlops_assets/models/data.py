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
    logit = (
        -4.0
        + 0.6 * (np.log(frame["amount"]) - 3.5)
        + 0.02 * frame["distance_km"]
        - 0.001 * frame["account_age_days"]
        + 0.2 * frame["tx_count_24h"]
        + 3.0 * frame["merchant_risk"]
        + 0.8 * ((frame["hour"] < 6) | (frame["hour"] > 22))
        + sum(frame[c].map(_RISKY).fillna(0.0) for c in CATEGORICAL_FEATURES)
    )
    frame[TARGET] = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return frame
