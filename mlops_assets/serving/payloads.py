"""Request bodies for KServe's V1 and V2 REST protocols, built from a feature frame."""

from __future__ import annotations

import pandas as pd


def v1_payload(frame: pd.DataFrame) -> dict:
    return {"instances": frame.to_dict(orient="records")}


def v2_payload(frame: pd.DataFrame) -> dict:
    inputs = []
    for column in frame.columns:
        series = frame[column]
        numeric = pd.api.types.is_numeric_dtype(series)
        inputs.append(
            {
                "name": column,
                "shape": [len(series)],
                "datatype": "FP64" if numeric else "BYTES",
                "data": series.astype(float).tolist() if numeric else series.astype(str).tolist(),
            }
        )
    return {"inputs": inputs}
