"""Request bodies for KServe's V1 and V2 REST protocols, built from a feature frame, and what an answer must hold.

V2 is the Open Inference Protocol (kserve/open-inference-protocol specification/protocol/inference_rest.md):
POST /v2/models/<name>/infer with `inputs`, each tensor {name, shape, datatype, data}; the answer's `outputs`
hold tensors of the same form. A frame is sent one tensor per column, and the request says `content_type: pd`,
which MLServer (KServe's runtime for MLflow models) decodes as a pandas DataFrame (MLServer's "Content Types"
user guide); KServe's own model server reads the same body as a DataFrame too.
"""

from __future__ import annotations

import pandas as pd

PROTOCOLS = ("v1", "v2")


def v1_payload(frame: pd.DataFrame) -> dict:
    return {"instances": frame.to_dict(orient="records")}


def _tensor(name: str, series: pd.Series) -> dict:
    # Integer and boolean columns keep their type: MLflow's schema enforcement refuses a float for a long.
    if pd.api.types.is_bool_dtype(series):
        datatype, data = "BOOL", series.astype(bool).tolist()
    elif pd.api.types.is_integer_dtype(series):
        datatype, data = "INT64", series.astype("int64").tolist()
    elif pd.api.types.is_numeric_dtype(series):
        datatype, data = "FP64", series.astype(float).tolist()
    else:
        datatype, data = "BYTES", series.astype(str).tolist()
    return {"name": str(name), "shape": [len(series)], "datatype": datatype, "data": data}


def v2_payload(frame: pd.DataFrame) -> dict:
    return {"parameters": {"content_type": "pd"}, "inputs": [_tensor(c, frame[c]) for c in frame.columns]}


def payload_for(frame: pd.DataFrame, protocol: str) -> dict:
    """The request body of `protocol` ("v1" or "v2") for the rows of `frame`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return v1_payload(frame) if protocol == "v1" else v2_payload(frame)


def as_protocol(body: dict, protocol: str) -> dict:
    """A request body in `protocol`: a V1 body of records (`instances`) becomes the V2 body of the same rows."""
    if protocol == "v2" and "instances" in body:
        return v2_payload(pd.DataFrame(body["instances"]))
    return body


def rows_in(body: dict) -> int:
    """How many rows a V1 or V2 request body carries."""
    if isinstance(body.get("instances"), list):
        return len(body["instances"])
    shapes = [t.get("shape") or [len(t.get("data") or [])] for t in body.get("inputs") or [] if isinstance(t, dict)]
    return int(shapes[0][0]) if shapes else 0


def predictions_in(answer: dict, protocol: str) -> int:
    """How many predictions an answer in `protocol` holds: V1 `predictions`, V2 the first output's rows
    (0 if the answer is not of that protocol)."""
    if protocol == "v1":
        predictions = answer.get("predictions")
        return len(predictions) if isinstance(predictions, list) else 0
    outputs = answer.get("outputs")
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
        return 0
    shape, data = outputs[0].get("shape"), outputs[0].get("data")
    if isinstance(shape, list) and shape and isinstance(shape[0], int):
        return shape[0]
    return len(data) if isinstance(data, list) else 0


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
