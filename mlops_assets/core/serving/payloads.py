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


def rows_from_payload(body: dict, columns: list[str]) -> list[dict]:
    """Feature rows from one logged V1 or V2 request body (unparseable parts are skipped)."""
    if "instances" in body and isinstance(body["instances"], list):
        rows = []
        for item in body["instances"]:
            if isinstance(item, dict):
                rows.append(item)
            elif isinstance(item, list) and len(item) == len(columns):
                rows.append(dict(zip(columns, item, strict=True)))
        return rows
    if "inputs" in body and isinstance(body["inputs"], list):
        tensors = {t.get("name"): t.get("data") for t in body["inputs"] if isinstance(t, dict)}
        lengths = {len(v) for v in tensors.values() if isinstance(v, list)}
        if len(lengths) != 1:
            return []
        (n,) = lengths
        return [{name: data[i] for name, data in tensors.items() if isinstance(data, list)} for i in range(n)]
    return []


def rows_from_lines(lines, columns: list[str], since: float | None = None) -> list[dict]:
    """Feature rows from payload-log lines (bytes), skipping torn or foreign lines and those older than `since`."""
    import json

    rows: list[dict] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line while the router writes
        if not isinstance(entry, dict) or not isinstance(entry.get("body"), dict):
            continue
        if since is not None and float(entry.get("ts", 0)) < since:
            continue
        rows.extend(rows_from_payload(entry["body"], columns))
    return rows


def rows_frame(rows: list[dict], columns: list[str], max_rows: int) -> pd.DataFrame:
    rows = rows[-max_rows:]
    return pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns)


def read_payload_log(directory, columns: list[str], max_rows: int = 200_000, since: float | None = None) -> pd.DataFrame:
    """The most recent logged request rows (newest last): at most `max_rows`, none older than `since`."""
    from pathlib import Path

    rows: list[dict] = []
    for name in ("previous.jsonl", "current.jsonl"):
        path = Path(directory) / name
        if path.exists():
            with open(path, "rb") as handle:
                rows.extend(rows_from_lines(handle, columns, since))
    return rows_frame(rows, columns, max_rows)
