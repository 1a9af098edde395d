"""The few byte formats the serving processes share, with no heavy imports (routers and the payload
sink import this; pandas stays out of them)."""

from __future__ import annotations


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
