"""What the serving processes share (the local routers and the cluster's payload sink), with no heavy
imports: pandas stays out of them."""

from __future__ import annotations

import json


def payload_line(ts: float, body: bytes) -> bytes:
    """One line of a payload log: the request body, raw, wrapped with its arrival time (so readers can
    take a time window). The local router's log and the cluster's payload sink write the same lines."""
    return b'{"ts":%.3f,"body":' % ts + body.replace(b"\n", b" ") + b"}\n"


def parse_drift_body(body) -> tuple[float, dict[str, float]]:
    """`{"share": 0.2, "features": {"amount": 0.31, ...}}` -> (share, scores); ValueError if malformed."""
    try:
        return float(body["share"]), {str(k): float(v) for k, v in body["features"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f'expected {{"share": float, "features": {{name: float}}}}: {exc}') from None


class DriftGauges:
    """`model_drift_share{isvc}` and `model_drift_score{isvc,feature}`: the latest drift report of each
    InferenceService, posted by `monitoring/<name>_drift`, for the ModelDriftDetected alert."""

    def __init__(self, registry) -> None:
        from prometheus_client import Gauge

        self.score = Gauge(
            "model_drift_score", "Effect size of drift per feature (latest drift report)", ["isvc", "feature"], registry=registry
        )
        self.share = Gauge("model_drift_share", "Share of features drifting (latest drift report)", ["isvc"], registry=registry)
        self._features: dict[str, set[str]] = {}

    def record(self, isvc: str, share: float, features: dict[str, float]) -> None:
        """The latest report replaces the previous one of `isvc` (features no longer scored disappear)."""
        for feature in self._features.pop(isvc, set()):
            self.score.remove(isvc, feature)
        self._features[isvc] = set(features)
        for feature, score in features.items():
            self.score.labels(isvc, feature).set(score)
        self.share.labels(isvc).set(share)


def store_for(tracking_uri: str) -> str:
    """The payload store behind an MLflow tracking server's artifact proxy (`--serve-artifacts`)."""
    if not tracking_uri.startswith(("http://", "https://")):
        raise ValueError(f"the payload store needs an MLflow tracking server (http[s]://...), got {tracking_uri!r}")
    return f"{tracking_uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/payloads"


def json_or_text(data: bytes | None):
    """A recorded request or answer as JSON, or its first 2,000 characters as text (None stays None)."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"text": data[:2000].decode("utf-8", "replace")}
