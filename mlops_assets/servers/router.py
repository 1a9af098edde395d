"""The local traffic router: one process per InferenceService, KServe's traffic semantics on 127.0.0.1.

Run as `python -m mlops_assets.servers.router <router.json>`. It forwards each inference request to
one revision's model server, chosen by the traffic split (weighted at random, or sticky by the
`x-user-key` header so a user stays in one arm of an A/B test), and counts requests, errors and
latency per revision on `/metrics`: KServe's model server has no count by status, so error rates
come from here. Tag routes reach one revision whatever the split: a `Host` starting `latest-` or
`prev-` (KServe's tag hostnames), the header `x-mlops-tag`, or a path prefix `/latest/`, `/prev/`.
Upstream requests go through a small keep-alive HTTP/1.1 pool parsed with httptools (the parser
uvicorn uses) rather than aiohttp's `ClientSession`, which adds noticeably more latency per request
(`bench/router_overhead.py`; figures in `bench/RESULTS.md`).
The platform pushes a new routing table with `POST /-/routes`; on restart the router reads the
table from its file, so a routing change is never lost with a process. A table (pushed or read at
start) is validated whole before anything changes: revision names, `http://host:port[/prefix]`
URLs with a port 1-65535, traffic percents summing to 100, tags; then it is swapped in at once.

Faults, as Envoy handles them:
* An upstream that closes a connection fails the request in flight on it at once (502), or ends
  its body when the body is close-delimited. A reused keep-alive connection closed before any byte
  of a response came back is retried once on a fresh connection: the server closed it while idle,
  nothing was processed (a server killed in the middle of a request on a reused connection looks
  the same; its retry then cannot connect, which is handled as below).
* Outlier ejection: when a revision cannot be connected to (refused, reset or timed out before the
  request was sent, so nothing was processed), it is ejected for `EJECT_BASE_S` (2 s), doubling up
  to `EJECT_MAX_S` (30 s) while it keeps failing, and re-admitted on its first successful answer.
  That request, and the split's share of an ejected revision, go to a healthy revision (the others
  with traffic, the largest share first, then revisions at 0%, tagged ones, any other known one);
  with none left the answer is a quick 503 naming the revision. Only a request that was never
  processed (a failed connect, or that stale-connection retry failing to connect) is sent
  elsewhere; one that broke after it was sent is a 502. Tag routes address one revision and are never rerouted: an
  unreachable tagged revision answers 503, a broken answer 502.
* Client errors are 4xx, never 500: header values that are not latin-1 text (or not UTF-8) are a
  400, a body above the size limit a 413, both counted under the revision the split picked.
  Control endpoints (`/-/routes`, `/-/feedback`, `/-/drift`) take JSON up to `CONTROL_MAX_BYTES`
  (1 MiB, else 413) nested at most `CONTROL_MAX_DEPTH` (32) deep (else 400).

Metrics on `/metrics` (Prometheus text; counters get the `_total` suffix):
* `mlops_router_requests_total{isvc,revision,code}`: requests by the revision that answered (a
  rerouted request counts under the fallback that served it, as `x-mlops-revision` says) and the
  status the client got, router-made answers (400, 413, 502, 503) included.
* `mlops_router_request_duration_seconds{isvc,revision}`: latency histogram, same revision.
* `mlops_router_feedback_total{isvc,revision,outcome}`: A/B outcomes (`POST /-/feedback`).
* `mlops_router_ejections_total{isvc,revision}`: times a revision was ejected (it could not be
  connected to).
* `mlops_router_revision_ejected{isvc,revision}`: 1 while a revision is ejected, else 0 (only
  revisions ever ejected appear).
* `mlops_router_rerouted_requests_total{isvc,from_revision,to_revision}`: requests the split (or
  the failed attempt) meant for `from_revision` that `to_revision` served instead.
* `model_drift_share{isvc}`, `model_drift_score{isvc,feature}`: the latest drift report.
* `mlops_router_mirrored_requests_total{isvc,revision,code}`, `mlops_router_mirror_dropped_total{isvc,revision}`,
  `mlops_router_mirror_duration_seconds{isvc,revision}`: shadow traffic (below); never in the counts above.

Shadow traffic: a table with `"mirror": {"revision": r, "percent": p, "max_in_flight": m}` copies p% of the
POSTs the split sends elsewhere (never tag routes) to revision r, after the stable answer has gone back to
the user: fire and forget, on a pool of its own, with a timeout of its own (`MIRROR_TIMEOUT_S`). At most m
copies wait at once; a request picked while m wait is not mirrored and is counted as dropped, so a slow or
dead shadow costs the primary nothing but the copy. Each mirrored request is kept as a pair (request,
both answers, statuses, latencies; `MIRROR_BUFFER` at most) that `GET /-/shadow?since=<seq>` hands to the
rollout's paired comparison (`core/rollout/shadow.py`).
`GET /-/healthz` also lists the ejected revisions with the seconds left of their ejection.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import json
import random
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httptools
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlops_assets.core.serving.mesh import user_bucket
from mlops_assets.core.serving.wire import DriftGauges, json_or_text, parse_drift_body, payload_line
from mlops_assets.core.settings import SHADOW_MAX_IN_FLIGHT

TAGS = ("latest", "prev")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer", "expect"}
EJECT_BASE_S = 2.0
EJECT_MAX_S = 30.0
CONTROL_MAX_BYTES = 1 << 20
CONTROL_MAX_DEPTH = 32
MIRROR_TIMEOUT_S = 10.0
#: Mirrored pairs kept for `GET /-/shadow` (the oldest are dropped first, and counted as lost by readers).
MIRROR_BUFFER = 20_000
#: A mirrored request body above this is compared without its input in the record.
MIRROR_MAX_BODY = 64 * 1024
_REVISION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_URL_CHARS = re.compile(r"[\x21-\x7e]+\Z")


class UpstreamError(OSError):
    """The upstream connection failed or answered something that is not HTTP."""


class StaleConnectionError(UpstreamError):
    """A pooled keep-alive connection was closed before any byte of a response came back."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made: the request was never sent, nothing was processed."""


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a model server; one request at a time."""

    def __init__(self, pool: _UpstreamPool, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.head_only = False
        self._reset()

    def _reset(self) -> None:
        self.content_type = b""
        self.chunks: list[bytes] = []
        self.got_bytes = False
        self.headers_done = False
        self.framed = False  # content-length or chunked: the body ends without the connection closing

    def _result(self) -> tuple[int, str, bytes]:
        return self.parser.get_status_code(), self.content_type.decode("latin-1"), b"".join(self.chunks)

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad HTTP response: {exc}"))

    def eof_received(self):
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.forget(self)
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if self.headers_done and not self.framed:
            # A close-delimited body (no content-length, not chunked) ends with the connection
            # (httptools has no feed_eof to say so).
            waiter.set_result(self._result())
        elif self.got_bytes:
            waiter.set_exception(UpstreamError("upstream closed the connection in the middle of its answer"))
        else:
            waiter.set_exception(StaleConnectionError("upstream closed the connection before answering"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value
        elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.head_only:
            # The answer to HEAD has no body whatever its content-length says, and the parser cannot be
            # told so: answer now and do not reuse the connection.
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(self._result())
            self.close()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._result())
        if not self.parser.should_keep_alive():
            self.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes, timeout: float, head_only: bool = False) -> tuple[int, str, bytes]:
        loop = asyncio.get_running_loop()
        self._reset()
        self.head_only = head_only
        self.waiter = waiter = loop.create_future()
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)
        timer = loop.call_later(timeout, self._fail, TimeoutError())
        try:
            return await waiter
        except asyncio.CancelledError:
            self.close()  # the response may still arrive: never reuse this connection
            raise
        finally:
            timer.cancel()


class _UpstreamPool:
    """Idle keep-alive connections per (host, port); new ones are opened on demand.

    `request` raises `UpstreamUnreachable` when no connection could be made (nothing was sent, so
    the request may go elsewhere), `UpstreamError` when a connection broke with the request sent,
    `TimeoutError` when no answer came within `timeout`."""

    def __init__(self, timeout: float = 30.0, connect_timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.idle: dict[tuple[str, int], list[_UpstreamConnection]] = {}
        self.all: set[_UpstreamConnection] = set()

    def forget(self, conn: _UpstreamConnection) -> None:
        self.all.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def _acquire(self, key: tuple[str, int]) -> tuple[_UpstreamConnection, bool]:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        return await self._connect(key), False

    async def _connect(self, key: tuple[str, int]) -> _UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _UpstreamConnection(self, key), *key), self.connect_timeout
            )
        except OSError as exc:  # refused, reset, unreachable; TimeoutError is an OSError too
            raise UpstreamUnreachable(f"cannot connect to {key[0]}:{key[1]}: {exc.__class__.__name__}") from exc
        self.all.add(conn)
        return conn

    async def request(self, key: tuple[str, int], head: bytes, body: bytes, head_only: bool = False) -> tuple[int, str, bytes]:
        conn, reused = await self._acquire(key)
        try:
            result = await conn.request(head, body, self.timeout, head_only)
        except StaleConnectionError:
            if not reused:
                # A new connection closed with the request sent: the server may have processed it.
                raise UpstreamError("upstream closed a new connection before answering") from None
            # A pooled connection the server had already closed: nothing was processed, so one
            # retry on a fresh connection is safe.
            conn = await self._connect(key)
            try:
                result = await conn.request(head, body, self.timeout, head_only)
            except StaleConnectionError:
                raise UpstreamError("upstream closed a new connection before answering") from None
        if not conn.closed:
            self.idle.setdefault(key, []).append(conn)
        return result

    def close(self) -> None:
        for conn in list(self.all):
            conn.close()
        self.all.clear()
        self.idle.clear()


def _header_lines(headers, body_len: int) -> str:
    """The forwarded header lines (hop-by-hop ones dropped) and the end of the head, as text."""
    lines = [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]
    lines.append(f"content-length: {body_len}\r\n\r\n")
    return "".join(lines)


def _bad_header(headers) -> str:
    """The name of the first header whose value cannot be sent as latin-1 (for the 400's message)."""
    for k, v in headers.items():
        try:
            f"{k}: {v}".encode("latin-1")
        except UnicodeEncodeError:
            return k
    return "?"


class RoutingError(ValueError):
    """A routing table is malformed: unknown revisions, percents not summing to 100, ..."""


def _upstream_of(revision: str, url) -> tuple[tuple[str, int], str, str]:
    """((host, port), Host header, path prefix) of a revision's base URL; RoutingError if it is not
    an `http://host:port[/prefix]` URL with a valid host and a port 1-65535."""
    if not isinstance(url, str) or not _URL_CHARS.match(url):
        raise RoutingError(f"revision {revision!r}: URL {url!r} is not a printable ASCII string")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise RoutingError(f"revision {revision!r}: bad URL {url!r}: {exc}") from None
    if u.scheme != "http" or u.query or u.fragment or "@" in u.netloc:
        raise RoutingError(f"revision {revision!r}: URL {url!r} must be http://host:port[/prefix]")
    host = u.hostname or ""
    try:
        is_ip6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        if not _DNS_NAME.match(host):
            raise RoutingError(f"revision {revision!r}: URL {url!r} has no valid host") from None
        is_ip6 = False
    if port is None or not 1 <= port <= 65535:
        raise RoutingError(f"revision {revision!r}: URL {url!r} needs a port 1-65535")
    return (host, port), f"[{host}]:{port}" if is_ip6 else f"{host}:{port}", u.path.rstrip("/")


def _compile_routes(routes) -> dict:
    """Check a whole routing table and build everything the router needs from it, changing nothing."""
    if not isinstance(routes, dict):
        raise RoutingError("routes need a 'revisions' map and a non-empty 'traffic' list")
    revisions = routes.get("revisions")
    traffic = routes.get("traffic")
    if not isinstance(revisions, dict) or not isinstance(traffic, list) or not traffic:
        raise RoutingError("routes need a 'revisions' map and a non-empty 'traffic' list")
    total = 0
    for entry in traffic:
        if not isinstance(entry, dict):
            raise RoutingError(f"traffic entries are {{'revision': name, 'percent': int}}, got {entry!r}")
        rev, pct = entry.get("revision"), entry.get("percent")
        if not isinstance(rev, str) or rev not in revisions:
            raise RoutingError(f"traffic names unknown revision {rev!r}")
        if not isinstance(pct, int) or isinstance(pct, bool) or not 0 <= pct <= 100:
            raise RoutingError(f"percent for {rev!r} must be an integer 0-100, got {pct!r}")
        total += pct
    if total != 100:
        raise RoutingError(f"traffic percents sum to {total}, not 100")
    tags = routes.get("tags") or {}
    if not isinstance(tags, dict):
        raise RoutingError(f"tags must be a map of tag to revision, got {tags!r}")
    for tag, rev in tags.items():
        if tag not in TAGS or not isinstance(rev, str) or rev not in revisions:
            raise RoutingError(f"tag {tag!r} -> {rev!r} is not a known tag and revision")
    upstream_keys = {}
    for rev, base in revisions.items():
        if not _REVISION_NAME.match(rev):
            raise RoutingError(f"revision name {rev!r} must be letters, digits, '.', '_' or '-'")
        upstream_keys[rev] = _upstream_of(rev, base)
    cumulative, acc = [], 0
    for entry in traffic:
        if entry["percent"]:
            acc += entry["percent"]
            cumulative.append((acc, entry["revision"]))
    # Where an ejected revision's requests go: the others with traffic (largest share first), then the
    # previous rolled-out revision (tag "prev", kept warm as the known-good rollback target). Never a
    # revision at 0% otherwise: that is a candidate that was rolled back, or one nobody is watching.
    shares: dict[str, int] = {}
    for entry in traffic:
        shares[entry["revision"]] = shares.get(entry["revision"], 0) + entry["percent"]
    order = sorted((r for r in shares if shares[r] > 0), key=lambda r: -shares[r])
    if tags.get("prev") and tags["prev"] not in order:
        order.append(tags["prev"])
    mirror = _compile_mirror(routes.get("mirror"), revisions)
    return {
        "routes": routes,
        "cumulative": cumulative,
        "upstreams": dict(revisions),
        "upstream_keys": upstream_keys,
        "tags": dict(tags),
        "fallbacks": {rev: tuple(r for r in order if r != rev) for rev in revisions},
        "fallbacks_any": tuple(order),
        "mirror": mirror,
    }


def _compile_mirror(mirror, revisions: dict) -> tuple[str, float, int] | None:
    """(revision, percent, max in flight) of a table's `mirror` entry, or None when there is none."""
    if mirror is None:
        return None
    if not isinstance(mirror, dict):
        raise RoutingError(f"mirror is {{'revision': name, 'percent': 0-100, 'max_in_flight': int}}, got {mirror!r}")
    rev, pct, limit = mirror.get("revision"), mirror.get("percent", 100), mirror.get("max_in_flight", SHADOW_MAX_IN_FLIGHT)
    if not isinstance(rev, str) or rev not in revisions:
        raise RoutingError(f"mirror names unknown revision {rev!r}")
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 100:
        raise RoutingError(f"mirror percent must be a number in (0, 100], got {pct!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1024:
        raise RoutingError(f"mirror max_in_flight must be an integer 1-1024, got {limit!r}")
    return rev, float(pct), limit


def validate_routes(routes: dict) -> dict:
    """Check a routing table; return it. Raises `RoutingError` naming the problem."""
    _compile_routes(routes)
    return routes


class _ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _too_deep(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


async def _control_json(request: web.Request):
    """The JSON body of a control request: at most CONTROL_MAX_BYTES (else 413), nested at most
    CONTROL_MAX_DEPTH deep (else 400)."""
    if request.content_length is not None and request.content_length > CONTROL_MAX_BYTES:
        raise _ControlError(413, f"body of {request.content_length} bytes is over the limit of {CONTROL_MAX_BYTES}")
    data = bytearray()
    while chunk := await request.content.read(65536):
        data += chunk
        if len(data) > CONTROL_MAX_BYTES:
            raise _ControlError(413, f"body is over the limit of {CONTROL_MAX_BYTES} bytes")
    try:
        body = json.loads(data)
    except RecursionError:
        raise _ControlError(400, f"JSON nested more than {CONTROL_MAX_DEPTH} deep") from None
    except ValueError as exc:
        raise _ControlError(400, f"body is not JSON: {exc}") from None
    if _too_deep(body, CONTROL_MAX_DEPTH):
        raise _ControlError(400, f"JSON nested more than {CONTROL_MAX_DEPTH} deep")
    return body


class PayloadLog:
    """A sampled, size-bounded log of successful inference request bodies (JSON lines), the
    "current" data of drift reports. Two files at most: when `current.jsonl` passes half the
    budget it becomes `previous.jsonl`, so the log never exceeds `max_bytes`."""

    def __init__(self, directory: Path, sample_rate: float, max_bytes: int) -> None:
        self.directory, self.sample_rate, self.max_bytes = directory, sample_rate, max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "current.jsonl"
        self.handle = open(self.path, "ab")  # noqa: SIM115 - kept open for the router's lifetime
        self.size = self.path.stat().st_size

    def maybe_log(self, body: bytes) -> None:
        if not body or random.random() >= self.sample_rate:
            return
        # Wrapped with its arrival time so readers can take a time window; the body stays raw bytes.
        line = payload_line(time.time(), body)
        self.handle.write(line)
        self.size += len(line)
        if self.size > self.max_bytes // 2:
            self.handle.close()
            self.path.replace(self.directory / "previous.jsonl")
            self.handle = open(self.path, "ab")  # noqa: SIM115
            self.size = 0

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _pair_json(pair: tuple) -> dict:
    seq, ts, stable, status, latency, payload, revision, shadow_status, shadow_latency, shadow_payload, body = pair
    return {
        "seq": seq,
        "ts": round(ts, 3),
        "stable_revision": stable,
        "stable_status": status,
        "stable_latency_s": round(latency, 6),
        "stable": json_or_text(payload),
        "candidate_revision": revision,
        "candidate_status": shadow_status,
        "candidate_latency_s": round(shadow_latency, 6),
        "candidate": json_or_text(shadow_payload) if shadow_status else None,
        "request": json_or_text(body),
    }


def _error(message: str, revision: str) -> bytes:
    return json.dumps({"error": message, "revision": revision}).encode()


class Router:
    eject_base_s = EJECT_BASE_S
    eject_max_s = EJECT_MAX_S

    def __init__(self, isvc: str, routes_file: Path, payload_log: PayloadLog | None = None) -> None:
        self.isvc = isvc
        self.payload_log = payload_log
        self.routes_file = routes_file
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlops_router_requests",
            "Inference requests by revision and HTTP status",
            ["isvc", "revision", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlops_router_request_duration_seconds",
            "Upstream latency by revision",
            ["isvc", "revision"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.feedback = Counter(
            "mlops_router_feedback",
            "Outcomes reported for users (A/B tests), by the revision the user is routed to",
            ["isvc", "revision", "outcome"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "mlops_router_ejections",
            "Times a revision was ejected from routing because it could not be connected to",
            ["isvc", "revision"],
            registry=self.registry,
        )
        self.ejected_gauge = Gauge(
            "mlops_router_revision_ejected",
            "1 while a revision is ejected from routing (its requests go to a healthy revision)",
            ["isvc", "revision"],
            registry=self.registry,
        )
        self.rerouted = Counter(
            "mlops_router_rerouted_requests",
            "Requests meant for an unreachable or ejected revision that another revision served",
            ["isvc", "from_revision", "to_revision"],
            registry=self.registry,
        )
        self.drift = DriftGauges(self.registry)
        self.pool: _UpstreamPool | None = None
        # Outlier ejection: revision -> monotonic time its ejection ends; revision -> its last
        # ejection interval (kept until it answers again, so repeated failures back off).
        self.ejected: dict[str, float] = {}
        self.eject_interval: dict[str, float] = {}
        self.mirrored = Counter(
            "mlops_router_mirrored_requests",
            "Requests mirrored to a shadow revision, by the status of its answer (0: no answer); users never get it",
            ["isvc", "revision", "code"],
            registry=self.registry,
        )
        self.mirror_dropped = Counter(
            "mlops_router_mirror_dropped",
            "Requests picked for mirroring but not mirrored: max_in_flight mirrored requests were already waiting",
            ["isvc", "revision"],
            registry=self.registry,
        )
        self.mirror_latency = Histogram(
            "mlops_router_mirror_duration_seconds",
            "Latency of the shadow revision on mirrored requests",
            ["isvc", "revision"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Shadow traffic: its own connection pool (a slow shadow never holds the primary's connections),
        # the mirrored requests in flight (bounded: beyond max_in_flight they are dropped and counted), and
        # the recorded pairs that `GET /-/shadow` hands to the rollout, numbered from 1.
        self.mirror_pool: _UpstreamPool | None = None
        self.mirror_in_flight = 0
        self.mirror_dropped_total = 0
        self.mirror_tasks: set[asyncio.Task] = set()
        self.shadow_pairs: collections.deque = collections.deque(maxlen=MIRROR_BUFFER)
        self.shadow_seq = 0
        try:
            routes = json.loads(routes_file.read_text())
        except (OSError, ValueError) as exc:
            raise RoutingError(f"cannot read routes file {routes_file}: {exc}") from None
        self.set_routes(routes)

    def set_routes(self, routes: dict) -> None:
        """Validate the whole table, then swap it in at once (a bad table changes nothing)."""
        new = _compile_routes(routes)
        old_upstreams = getattr(self, "upstreams", {})
        for name, value in new.items():  # no await in between: requests see the old table or the new one
            setattr(self, name, value)
        # A revision that is gone or moved (a restarted process) starts with a clean record.
        for rev in list(self.eject_interval):
            if rev not in self.upstreams or self.upstreams[rev] != old_upstreams.get(rev):
                self.eject_interval.pop(rev, None)
                if self.ejected.pop(rev, None) is not None:
                    self.ejected_gauge.labels(self.isvc, rev).set(0)

    def revision_for_key(self, key: str) -> str:
        """The revision a user key is pinned to under the current split (sticky routing)."""
        # The mesh's rule too (core/serving/mesh.py): on a cluster the same user lands on the same arm.
        point = user_bucket(key) / 100.0
        for bound, revision in self.cumulative:
            if point < bound:
                return revision
        return self.cumulative[-1][1]

    def _route(self, request: web.Request) -> tuple[str, str, bool]:
        """(revision, upstream path, whether a tag chose it) for this request."""
        path = request.path_qs
        tag = request.headers.get("x-mlops-tag")
        host = request.host or ""
        for name in TAGS:
            if path.startswith(f"/{name}/"):
                tag, path = name, path[len(name) + 1 :]
            elif host.startswith(f"{name}-"):
                tag = name
        if tag:
            if tag not in self.tags:
                raise web.HTTPNotFound(text=f"no revision carries tag {tag!r} on {self.isvc}")
            return self.tags[tag], path, True
        key = request.headers.get("x-user-key")
        if key:
            # Sticky: the same user key always lands at the same point of the split.
            return self.revision_for_key(key), path, False
        point = random.random() * 100.0
        for bound, revision in self.cumulative:
            if point < bound:
                return revision, path, False
        return self.cumulative[-1][1], path, False

    def pick(self, request: web.Request) -> tuple[str, str]:
        """(revision, upstream path) for this request, by tag or split (before any ejection)."""
        revision, path, _ = self._route(request)
        return revision, path

    # ---- outlier ejection -------------------------------------------------------------------
    def _eject(self, revision: str) -> None:
        now = time.monotonic()
        if self.ejected.get(revision, 0.0) > now:
            return  # already ejected (requests that were in flight failing too)
        last = self.eject_interval.get(revision)
        interval = self.eject_base_s if last is None else min(last * 2, self.eject_max_s)
        self.eject_interval[revision] = interval
        self.ejected[revision] = now + interval
        self.ejections.labels(self.isvc, revision).inc()
        self.ejected_gauge.labels(self.isvc, revision).set(1)

    def _readmit(self, revision: str) -> None:
        """`revision` answered: its failure record is cleared."""
        self.eject_interval.pop(revision, None)
        if self.ejected.pop(revision, None) is not None:
            self.ejected_gauge.labels(self.isvc, revision).set(0)

    def _admitted(self, revision: str, now: float) -> bool:
        until = self.ejected.get(revision)
        if until is None:
            return True
        if until <= now:  # the interval is over: let it try again (a new failure ejects it for longer)
            del self.ejected[revision]
            self.ejected_gauge.labels(self.isvc, revision).set(0)
            return True
        return False

    def _healthy(self, revision: str) -> str | None:
        """`revision` if it is not ejected, else the first healthy one of its fallbacks, else None."""
        now = time.monotonic()
        if revision in self.upstream_keys and self._admitted(revision, now):
            return revision
        # (a revision the table no longer has, after a change mid-request: any healthy one will do)
        for other in self.fallbacks.get(revision, self.fallbacks_any):
            if self._admitted(other, now):
                return other
        return None

    def _expire_ejections(self) -> None:
        now = time.monotonic()
        for revision in list(self.ejected):
            self._admitted(revision, now)

    # ---- handlers -----------------------------------------------------------------------------
    def _answer(self, revision: str, status: int, payload: bytes, start: float) -> web.Response:
        self.latency.labels(self.isvc, revision).observe(time.perf_counter() - start)
        self.requests.labels(self.isvc, revision, str(status)).inc()
        return web.Response(
            body=payload, status=status, headers={"content-type": "application/json", "x-mlops-revision": revision}
        )

    async def proxy(self, request: web.Request) -> web.Response:
        revision, path, tagged = self._route(request)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            message = f"request body is too large: {exc.text}"
            return self._answer(revision, 413, _error(message, revision), time.perf_counter())
        method = request.method
        lines = _header_lines(request.headers, len(body))
        upstream = self.upstream_keys.get(revision)
        if upstream is None:  # a new table without that revision came while the body arrived
            revision, path, tagged = self._route(request)
            upstream = self.upstream_keys[revision]
        key, host, prefix = upstream
        try:
            head = f"{method} {prefix}{path} HTTP/1.1\r\nhost: {host}\r\n{lines}".encode("latin-1")
        except UnicodeEncodeError:
            # aiohttp decodes header bytes as UTF-8 (surrogates for bytes that are not): a value that
            # is not latin-1 text cannot be forwarded as it was meant.
            name = _bad_header(request.headers)
            message = f"header {name!r} is not latin-1 text (HTTP header values are latin-1, or UTF-8 of it)"
            return self._answer(revision, 400, _error(message, revision), time.perf_counter())
        start = time.perf_counter()
        target = revision
        if self.ejected and not tagged and revision in self.ejected:
            target = self._healthy(revision)
            if target is None:
                message = f"revision {revision} is ejected (unreachable) and no healthy revision can take its traffic"
                return self._answer(revision, 503, _error(message, revision), start)
            if target != revision:
                self.rerouted.labels(self.isvc, revision, target).inc()
                key, host, prefix = self.upstream_keys[target]
                head = f"{method} {prefix}{path} HTTP/1.1\r\nhost: {host}\r\n{lines}".encode("latin-1")
        for _ in range(len(self.upstream_keys)):
            try:
                status, content_type, payload = await self.pool.request(key, head, body, method == "HEAD")
            except UpstreamUnreachable as exc:
                # Nothing was sent: eject the revision and let a healthy one answer (never for a tag route).
                self._eject(target)
                nxt = None if tagged else self._healthy(revision)
                if nxt is None:
                    if tagged:
                        message = f"tagged revision {revision} unreachable ({exc}); tag routes are not rerouted"
                    else:
                        tried = "" if target == revision else f", nor its fallback {target}"
                        message = f"revision {revision} unreachable{tried} ({exc}); no healthy revision can take its traffic"
                    return self._answer(revision, 503, _error(message, revision), start)
                self.rerouted.labels(self.isvc, target, nxt).inc()
                target = nxt
                key, host, prefix = self.upstream_keys[target]
                head = f"{method} {prefix}{path} HTTP/1.1\r\nhost: {host}\r\n{lines}".encode("latin-1")
                continue
            except OSError as exc:  # TimeoutError, a broken connection, a response that is not HTTP
                message = f"revision {target} unreachable: {exc.__class__.__name__}"
                return self._answer(target, 502, _error(message, target), start)
            break
        else:
            message = f"revision {revision}: no revision could be reached"
            return self._answer(revision, 503, _error(message, revision), start)
        if self.eject_interval:
            self._readmit(target)
        elapsed = time.perf_counter() - start
        self.latency.labels(self.isvc, target).observe(elapsed)
        self.requests.labels(self.isvc, target, str(status)).inc()
        mirror = self.mirror
        if mirror is not None and not tagged and method == "POST" and target != mirror[0] and random.random() * 100.0 < mirror[1]:
            self._mirror(mirror, method, path, lines, body, target, status, payload, elapsed)
        if status == 200 and self.payload_log is not None:
            self.payload_log.maybe_log(body)
        headers = {"content-type": content_type or "application/json", "x-mlops-revision": target}
        return web.Response(body=payload, status=status, headers=headers)

    # ---- shadow traffic --------------------------------------------------------------------------
    def _mirror(self, mirror, method: str, path: str, lines: str, body: bytes, stable: str, status: int, payload, latency):
        """Send a copy of a request the stable revision has answered to the shadow revision, fire and forget:
        the user already has the stable answer, and a shadow that is slow or down only fills its own
        bounded set of requests in flight; past `max_in_flight` the copy is dropped and counted."""
        revision, _, limit = mirror
        if self.mirror_in_flight >= limit:
            self.mirror_dropped.labels(self.isvc, revision).inc()
            self.mirror_dropped_total += 1
            return
        key, host, prefix = self.upstream_keys[revision]
        head_bytes = f"{method} {prefix}{path} HTTP/1.1\r\nhost: {host}\r\nx-mlops-shadow: true\r\n{lines}".encode("latin-1")
        self.mirror_in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._shadow_request(revision, key, head_bytes, body, stable, status, payload, latency)
        )
        self.mirror_tasks.add(task)
        task.add_done_callback(self.mirror_tasks.discard)

    async def _shadow_request(self, revision, key, head: bytes, body: bytes, stable, status, payload, latency) -> None:
        start = time.perf_counter()
        try:
            shadow_status, _, shadow_payload = await self.mirror_pool.request(key, head, body)
        except Exception:  # noqa: BLE001 - no answer (refused, timed out, broken): recorded as status 0
            shadow_status, shadow_payload = 0, b""
        finally:
            self.mirror_in_flight -= 1
        elapsed = time.perf_counter() - start
        self.mirror_latency.labels(self.isvc, revision).observe(elapsed)
        self.mirrored.labels(self.isvc, revision, str(shadow_status)).inc()
        self.shadow_seq += 1
        request = body if len(body) <= MIRROR_MAX_BODY else None
        record = (self.shadow_seq, time.time(), stable, status, latency, payload)
        self.shadow_pairs.append((*record, revision, shadow_status, elapsed, shadow_payload, request))

    async def shadow(self, request: web.Request) -> web.Response:
        """`GET /-/shadow?since=<seq>&limit=<n>`: the mirrored pairs recorded after `since` (both answers,
        their statuses and latencies, the request), `next` to pass as `since` the next time, and `lost`:
        pairs after `since` already dropped from the buffer. A router that restarted numbers from 1 again
        and says `restarted`."""
        try:
            since = max(0, int(request.query.get("since", "0")))
            limit = min(max(1, int(request.query.get("limit", "5000"))), MIRROR_BUFFER)
        except ValueError:
            return web.json_response({"error": "since and limit are integers"}, status=400)
        restarted = since > self.shadow_seq
        if restarted:
            since = 0
        pairs = self.shadow_pairs
        first = pairs[0][0] if pairs else self.shadow_seq + 1
        lost = max(0, first - 1 - since)
        start = max(0, since + 1 - first)
        records = [_pair_json(p) for p in itertools.islice(pairs, start, start + limit)]
        mirror = self.mirror
        return web.json_response(
            {
                "isvc": self.isvc,
                "mirror": None if mirror is None else {"revision": mirror[0], "percent": mirror[1], "max_in_flight": mirror[2]},
                "mirrored": self.shadow_seq,
                "dropped": self.mirror_dropped_total,
                "in_flight": self.mirror_in_flight,
                "lost": lost,
                "restarted": restarted,
                "next": records[-1]["seq"] if records else max(since, first - 1),
                "pairs": records,
            }
        )

    async def update_routes(self, request: web.Request) -> web.Response:
        try:
            self.set_routes(await _control_json(request))
        except _ControlError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except RoutingError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "traffic": self.routes["traffic"]})

    async def record_feedback(self, request: web.Request) -> web.Response:
        """`{"user_key": ..., "success": true|false}` (or a list of them): an outcome for an A/B
        test, attributed to the revision that user is pinned to."""
        try:
            body = await _control_json(request)
            items = body if isinstance(body, list) else [body]
            parsed = []
            for item in items:
                if not isinstance(item, dict):
                    raise ValueError('each feedback is {"user_key": str, "success": bool}')
                key, success = item.get("user_key"), item.get("success")
                if not isinstance(key, str) or not key or not isinstance(success, bool):
                    raise ValueError('each feedback needs a non-empty string "user_key" and a boolean "success"')
                parsed.append((key, success))
        except _ControlError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        for key, success in parsed:
            self.feedback.labels(self.isvc, self.revision_for_key(key), "success" if success else "failure").inc()
        return web.json_response({"recorded": len(parsed)})

    async def record_drift(self, request: web.Request) -> web.Response:
        """`{"share": 0.2, "features": {"amount": 0.31, ...}}`: the latest drift report's scores,
        exposed as gauges so Prometheus can alert on them."""
        try:
            share, features = parse_drift_body(await _control_json(request))
        except _ControlError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.drift.record(self.isvc, share, features)
        return web.json_response({"recorded": len(features)})

    async def payloads(self, request: web.Request) -> web.Response:
        """Flush the payload log so a reader sees every sampled request so far."""
        if self.payload_log is None:
            return web.json_response({"error": "payload logging is off"}, status=404)
        self.payload_log.flush()
        return web.json_response({"path": str(self.payload_log.path)})

    async def metrics(self, request: web.Request) -> web.Response:
        if self.payload_log is not None:
            self.payload_log.flush()
        self._expire_ejections()
        return web.Response(body=generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        self._expire_ejections()
        now = time.monotonic()
        ejected = {rev: round(until - now, 3) for rev, until in self.ejected.items()}
        return web.json_response({"isvc": self.isvc, "traffic": self.routes["traffic"], "tags": self.tags, "ejected": ejected})

    async def on_startup(self, app: web.Application) -> None:
        self.pool = _UpstreamPool(timeout=30.0)
        self.mirror_pool = _UpstreamPool(timeout=MIRROR_TIMEOUT_S, connect_timeout=2.0)

    async def on_cleanup(self, app: web.Application) -> None:
        for task in list(self.mirror_tasks):
            task.cancel()
        if self.pool:
            self.pool.close()
        if self.mirror_pool:
            self.mirror_pool.close()
        if self.payload_log is not None:
            self.payload_log.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/-/healthz", self.health)
        app.router.add_post("/-/routes", self.update_routes)
        app.router.add_post("/-/feedback", self.record_feedback)
        app.router.add_post("/-/drift", self.record_drift)
        app.router.add_post("/-/payloads/flush", self.payloads)
        app.router.add_get("/-/shadow", self.shadow)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


def main(argv: list[str]) -> None:
    config = json.loads(Path(argv[0]).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        router = Router(config["isvc"], Path(config["routes_file"]))
    except RoutingError as exc:
        raise SystemExit(f"router {config['isvc']}: refusing to start: {exc}") from None
    log_config = config.get("payload_log")
    if log_config:
        router.payload_log = PayloadLog(Path(log_config["dir"]), float(log_config["sample_rate"]), int(log_config["max_bytes"]))
    web.run_app(router.app(), host="127.0.0.1", port=config["port"], access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
