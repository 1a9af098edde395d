"""The payload sink: the cluster's payload log and drift gauges (locally the router does both).

On a cluster, KServe's payload logger (the agent beside each predictor container, configured by
`spec.predictor.logger` on the InferenceService) POSTs every inference request as a CloudEvent in
HTTP binary mode: the request body as the event data, `ce-type: org.kubeflow.serving.inference.request`
and the extension `ce-inferenceservicename` naming the InferenceService. This service:

* samples the requests (`--sample-rate`), buffers them per InferenceService as the same JSON lines the
  local router logs (`wire.payload_line`), and every `--flush-s` seconds writes each buffer as one
  batch `<unix ms>-<random>.jsonl` under `<store>/<isvc>/`, the store being object storage reached
  through the MLflow tracking server's artifact proxy (`<MLFLOW_TRACKING_URI>/api/2.0/mlflow-artifacts/
  artifacts/payloads`: MinIO's bucket `mlflow` on the cluster; no S3 credentials here, MLflow's own
  MLFLOW_TRACKING_USERNAME / PASSWORD if the server wants them). Memory is bounded (`--max-buffer-bytes`: the
  oldest lines go first, counted); a failed write keeps the batch for the next attempt, counted too;
* exposes the drift gauges that `monitoring/<name>_drift` POSTs to `/-/drift/<isvc>`
  (`model_drift_share{isvc}`, `model_drift_score{isvc,feature}`) and its own counters on `/metrics`,
  for the same alert rules as locally;
* answers `/-/flush` (write every buffer now: the drift asset calls it before reading) and the
  probes `/-/healthy` and `/-/ready`;
* records A/B outcomes, the cluster's counterpart of the local router's `/-/feedback`. The A/B run
  declares the test (`PUT /-/ab/<isvc>`: the revisions of arms a and b and B's share of users);
  callers `POST /-/outcome/<isvc>` `{"user_key": ..., "success": true|false}` (or a list), each
  attributed to the arm the mesh pins that user to (core/serving/mesh.py: the same bucket rule as the
  router) and counted as `mlops_ab_outcomes_total{isvc,revision,arm,outcome}`; the run reads the
  counts back from `GET /-/outcomes/<isvc>` and ends the test with `DELETE /-/ab/<isvc>`. Bad input is
  a 4xx that says what is wrong: 400 malformed or an unknown arm, 404 no test running on that
  InferenceService, 409 an outcome whose `arm` is not the one the user is pinned to, 413 too large.
  Counts live in memory, as the router's do: a restarted sink counts from zero.
* pairs the answers of a shadow, the cluster's counterpart of the local router's `/-/shadow`. Istio
  mirrors a share of requests to the candidate and Envoy discards its answers (core/serving/mesh.py),
  so the pairs are made here from what KServe's payload logger sends for both revisions, when
  `KubernetesPlatform.shadow_capture` has it log answers and the request id (mode `all`,
  `metadataHeaders: ["X-Request-Id"]`). What the logger sends (kserve/kserve pkg/logger/handler.go and
  worker.go): a request event when a request arrives and, *only for a 200*, a response event, both with
  the same `ce-id` and `ce-time` their moment; `ce-source` is the pod's name, `<revision>-deployment-...`
  (Knative names a revision's Deployment so: knative/serving pkg/reconciler/revision/resources/names);
  `ce-metadata` is the JSON of the listed headers. Envoy keeps `x-request-id` on the mirrored copy, so
  the stable and candidate events of one user request share it. The run declares the shadow
  (`PUT /-/shadow/<isvc>` `{"stable": rev, "candidate": rev, "percent": P}`); the sink then holds each
  request id's events for `--shadow-timeout-s` and records a pair once both answers are in, or at the
  timeout once the candidate got the request (an answer still missing is status 0: KServe logs no
  non-200 answer, so a 5xx looks like no answer, and its latency is counted as the timeout); the stable
  requests that were not mirrored expire unpaired. `GET /-/shadow/<isvc>?since=<seq>` answers as the
  router does (pairs with both answers, `next`, `lost`, `restarted`); `DELETE /-/shadow/<isvc>` ends the
  pairing. The candidate's mirrored requests are not users' requests: they stay out of the payload log.

`KubernetesPlatform.recent_payloads` reads the batches back through the same proxy.

Run: python -m mlops_assets.servers.payload_sink --host 0.0.0.0 --port 8080 [--store URI]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlops_assets.core.serving.manifest import ManifestError, validate_dns1035
from mlops_assets.core.serving.mesh import arm_of, check_mirror_percent, check_split, parse_outcomes, user_bucket
from mlops_assets.core.serving.wire import DriftGauges, json_or_text, parse_drift_body, payload_line, store_for
from mlops_assets.core.settings import PAYLOAD_SINK_MLFLOW_CLIENT_ENV, apply_mlflow_client_env, mlflow_tracking_uri_env

log = logging.getLogger("mlops_assets.payload_sink")
REQUEST_EVENT = "org.kubeflow.serving.inference.request"
RESPONSE_EVENT = "org.kubeflow.serving.inference.response"
#: Pairs kept for `GET /-/shadow/<isvc>` (the oldest go first and readers count them as lost), as the router.
SHADOW_BUFFER = 5000
#: Request ids waiting for their other events; beyond this the oldest are given up (counted as dropped).
SHADOW_MAX_PENDING = 20_000
#: Request bodies and answers larger than this are kept out of the pairs (the comparison then has no rows).
SHADOW_MAX_BODY = 256 * 1024
#: A/B control and outcome bodies are small JSON: a larger one is refused (413) before it is parsed.
AB_MAX_BYTES = 1 << 20


def write_batch(store: str, isvc: str, lines: list[bytes]) -> str:
    """Upload one batch through MLflow's artifact repository for `<store>/<isvc>`; returns its name."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    name = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(b"".join(lines))
        get_artifact_repository(f"{store.rstrip('/')}/{isvc}").log_artifact(str(path))
    return name


def revision_of_pod(source: str) -> str:
    """The Knative revision of a predictor pod named `<revision>-deployment-<hash>-<hash>` (the logger's
    `ce-source`), or "" for anything else."""
    head, sep, _ = source.rpartition("-deployment-")
    return head if sep else ""


def request_id_of(metadata: str | None) -> str:
    """The `X-Request-Id` in the logger's `ce-metadata` (JSON: header name -> values), or ""."""
    try:
        headers = json.loads(metadata or "{}")
    except ValueError:
        return ""
    if not isinstance(headers, dict):
        return ""
    for name, values in headers.items():
        if isinstance(name, str) and name.lower() == "x-request-id" and isinstance(values, list) and values:
            return str(values[0])
    return ""


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def event_time(value: str | None) -> float | None:
    """`ce-time` (RFC 3339, Go's nanoseconds included) as a Unix time, or None."""
    match = _RFC3339.match((value or "").strip())
    if not match:
        return None
    whole, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return stamp.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


class ShadowPairs:
    """The pairs of one InferenceService's shadows: the declared shadow, the request ids waiting for their
    events, and the recorded pairs numbered from 1 (the numbering goes on across shadows, as readers'
    cursors do)."""

    def __init__(self, timeout_s: float, max_pending: int = SHADOW_MAX_PENDING) -> None:
        self.timeout_s, self.max_pending = timeout_s, max_pending
        self.mirror: dict | None = None  # {"stable", "candidate", "percent"}
        self.pending: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.pairs: collections.deque[dict] = collections.deque(maxlen=SHADOW_BUFFER)
        self.seq = self.dropped = self.unmatched = 0

    def start(self, stable: str, candidate: str, percent: int) -> None:
        self.mirror = {"stable": stable, "candidate": candidate, "percent": percent}
        self.pending.clear()

    def stop(self) -> None:
        self.mirror = None
        self.pending.clear()

    def record(self, revision: str, kind: str, request_id: str, at: float, body: bytes, now: float) -> bool:
        """Take one logger event; False if it belongs to no running shadow."""
        mirror = self.mirror
        if mirror is None or not request_id or revision not in (mirror["stable"], mirror["candidate"]):
            return False
        self.expire(now)
        side = "stable" if revision == mirror["stable"] else "candidate"
        entry = self.pending.get(request_id)
        if entry is None:
            entry = self.pending[request_id] = {"seen": now, "stable": {}, "candidate": {}}
        kept = body if len(body) <= SHADOW_MAX_BODY else None
        if kind == "request":
            entry[side].update(t_req=at, request=kept)
        else:
            entry[side].update(t_resp=at, answer=kept if kept is not None else b"{}")
        if "answer" in entry["stable"] and "answer" in entry["candidate"]:
            self._pair(request_id, self.pending.pop(request_id))
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
            self.dropped += 1
        return True

    def expire(self, now: float) -> None:
        """Give up waiting on the request ids older than the timeout: a pair if the candidate got the request."""
        while self.pending:
            request_id, entry = next(iter(self.pending.items()))
            if now - entry["seen"] < self.timeout_s:
                break
            del self.pending[request_id]
            if not entry["candidate"]:
                continue  # a request that was not mirrored
            if not entry["stable"]:
                self.unmatched += 1  # a copy without its user request: nothing to compare it with
                continue
            self._pair(request_id, entry)

    def _pair(self, request_id: str, entry: dict) -> None:
        self.seq += 1
        mirror = self.mirror or {}
        record: dict = {"seq": self.seq, "ts": round(time.time(), 3), "request_id": request_id}
        for side in ("stable", "candidate"):
            got = entry[side]
            answered = "answer" in got and "t_req" in got
            latency = max(0.0, got["t_resp"] - got["t_req"]) if answered else self.timeout_s
            record[f"{side}_revision"] = mirror.get(side, "")
            record[f"{side}_status"] = 200 if answered else 0
            record[f"{side}_latency_s"] = round(latency, 6)
            record[side] = json_or_text(got["answer"]) if answered else None
        record["request"] = json_or_text(entry["stable"].get("request") or entry["candidate"].get("request"))
        self.pairs.append(record)

    def page(self, since: int, limit: int, now: float) -> dict:
        """The pairs after `since`, as the router's `GET /-/shadow` answers."""
        self.expire(now)
        restarted = since > self.seq
        if restarted:
            since = 0
        first = self.pairs[0]["seq"] if self.pairs else self.seq + 1
        start = max(0, since + 1 - first)
        records = list(itertools.islice(self.pairs, start, start + limit))
        mirror = self.mirror
        return {
            "mirror": None if mirror is None else {"revision": mirror["candidate"], **mirror},
            "mirrored": self.seq,
            "dropped": self.dropped,
            "unmatched": self.unmatched,
            "in_flight": sum(1 for e in self.pending.values() if e["candidate"]),
            "lost": max(0, first - 1 - since),
            "restarted": restarted,
            "next": records[-1]["seq"] if records else max(since, first - 1),
            "pairs": records,
        }


class PayloadSink:
    def __init__(
        self, store: str, sample_rate: float, flush_s: float, max_buffer_bytes: int, shadow_timeout_s: float = 30.0
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {sample_rate}")
        if flush_s <= 0 or max_buffer_bytes <= 0:
            raise ValueError("flush interval and buffer size must be positive")
        self.store, self.sample_rate, self.flush_s, self.max_buffer_bytes = store, sample_rate, flush_s, max_buffer_bytes
        self.buffers: dict[str, collections.deque[bytes]] = {}
        self.buffered_bytes = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self.registry = CollectorRegistry()
        self.received = Counter("payload_sink_events_total", "CloudEvents received", ["isvc", "outcome"], registry=self.registry)
        self.written = Counter(
            "payload_sink_rows_written_total", "Logged requests written to the store", ["isvc"], registry=self.registry
        )
        self.dropped = Counter(
            "payload_sink_rows_dropped_total", "Logged requests dropped", ["isvc", "reason"], registry=self.registry
        )
        self.failures = Counter(
            "payload_sink_write_failures_total", "Batches that failed to upload", ["isvc"], registry=self.registry
        )
        self.drift = DriftGauges(self.registry)
        self.outcomes = Counter(
            "mlops_ab_outcomes",
            "A/B outcomes by the arm the user is pinned to",
            ["isvc", "revision", "arm", "outcome"],
            registry=self.registry,
        )
        self.ab_tests: dict[str, dict] = {}  # isvc -> {"a": revision, "b": revision, "split_percent": P}
        self.outcome_counts: dict[tuple[str, str], list[int]] = {}  # (isvc, revision) -> [successes, failures]
        if shadow_timeout_s <= 0:
            raise ValueError("the shadow timeout must be positive")
        self.shadow_timeout_s = shadow_timeout_s
        self.shadows: dict[str, ShadowPairs] = {}

    # ---- receiving ------------------------------------------------------------------------------
    async def receive(self, request: web.Request) -> web.Response:
        isvc = request.headers.get("ce-inferenceservicename", "")
        try:
            validate_dns1035(isvc, "ce-inferenceservicename")
        except ManifestError as exc:
            return web.json_response({"error": f"not a KServe payload-logger event: {exc}"}, status=400)
        kind = {REQUEST_EVENT: "request", RESPONSE_EVENT: "response"}.get(request.headers.get("ce-type", ""))
        shadow = self.shadows.get(isvc)
        if kind is None or (kind == "response" and (shadow is None or shadow.mirror is None)):
            self.received.labels(isvc, "ignored").inc()  # responses: the drift reports need requests only
            return web.json_response({"ignored": request.headers.get("ce-type")}, status=202)
        body = await request.read()
        revision = revision_of_pod(request.headers.get("ce-source", ""))
        if shadow is not None and shadow.mirror is not None:
            at = event_time(request.headers.get("ce-time")) or time.time()
            request_id = request_id_of(request.headers.get("ce-metadata"))
            paired = shadow.record(revision, kind, request_id, at, body, time.monotonic())
            if kind == "response" or (paired and revision == shadow.mirror["candidate"]):
                # An answer, or the candidate's copy of a user's request: not a user's request for the payload log.
                self.received.labels(isvc, "shadow" if paired else "ignored").inc()
                return web.json_response({"shadow": paired}, status=202)
        if not body.lstrip().startswith(b"{"):
            self.received.labels(isvc, "malformed").inc()
            return web.json_response({"error": "the event data must be a JSON object (a V1 or V2 request body)"}, status=400)
        self.received.labels(isvc, "request").inc()
        if random.random() >= self.sample_rate:
            return web.json_response({"sampled": False}, status=202)
        self._append(isvc, [payload_line(time.time(), body)])
        return web.json_response({"sampled": True}, status=202)

    def _append(self, isvc: str, lines: list[bytes]) -> None:
        buffer = self.buffers.setdefault(isvc, collections.deque())
        for line in lines:
            buffer.append(line)
            self.buffered_bytes += len(line)
        # Bounded memory: the oldest lines of the largest buffer go first.
        while self.buffered_bytes > self.max_buffer_bytes:
            victim = max(self.buffers, key=lambda k: len(self.buffers[k]))
            self.buffered_bytes -= len(self.buffers[victim].popleft())
            self.dropped.labels(victim, "buffer_full").inc()

    # ---- writing --------------------------------------------------------------------------------
    async def flush(self) -> dict[str, str]:
        """Write every non-empty buffer as one batch; a failed batch goes back to its buffer."""
        results: dict[str, str] = {}
        async with self._lock:
            taken = {isvc: list(buf) for isvc, buf in self.buffers.items() if buf}
            for isvc in taken:
                self.buffered_bytes -= sum(len(line) for line in self.buffers[isvc])
                self.buffers[isvc].clear()
            loop = asyncio.get_running_loop()
            for isvc, lines in taken.items():
                try:
                    results[isvc] = await loop.run_in_executor(None, write_batch, self.store, isvc, lines)
                    self.written.labels(isvc).inc(len(lines))
                except Exception as exc:  # noqa: BLE001 - any store failure: keep the batch, count it, say why
                    self.failures.labels(isvc).inc()
                    log.warning("writing %d payload rows of %s to %s failed: %s", len(lines), isvc, self.store, exc)
                    results[isvc] = f"failed: {type(exc).__name__}: {exc}"
                    self._append(isvc, lines)
        return results

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush_now(self, request: web.Request) -> web.Response:
        results = await self.flush()
        failed = {k: v for k, v in results.items() if v.startswith("failed")}
        return web.json_response({"written": results}, status=503 if failed else 200)

    # ---- drift gauges, metrics, probes ---------------------------------------------------------------
    async def record_drift(self, request: web.Request) -> web.Response:
        isvc = request.match_info["isvc"]
        try:
            validate_dns1035(isvc, "InferenceService name")
            share, features = parse_drift_body(await request.json())
        except (ManifestError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.drift.record(isvc, share, features)
        return web.json_response({"recorded": len(features)})

    # ---- A/B tests: the assignment, outcomes and their counts -------------------------------------
    async def _ab_json(self, request: web.Request) -> object:
        """The JSON body of an A/B request; raises `web.HTTPException`s carrying the reason."""
        if request.content_length is not None and request.content_length > AB_MAX_BYTES:
            raise _json_error(413, f"body of {request.content_length} bytes is over the {AB_MAX_BYTES}-byte limit")
        body = await request.content.read(AB_MAX_BYTES + 1)
        if len(body) > AB_MAX_BYTES:
            raise _json_error(413, f"body is over the {AB_MAX_BYTES}-byte limit")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _json_error(400, f"body is not JSON: {exc}") from None

    def _isvc(self, request: web.Request) -> str:
        isvc = request.match_info["isvc"]
        try:
            return validate_dns1035(isvc, "InferenceService name")
        except ManifestError as exc:
            raise _json_error(400, str(exc)) from None

    async def _control(
        self, request: web.Request, form: str, revisions: dict[str, str], both: str, percent: tuple[str, Callable[[int], object]]
    ) -> tuple[str, dict]:
        """The InferenceService and body of a control `PUT` (an A/B test, a shadow): the body is `form`, two different
        `revisions` (key -> what an error calls it; `both` names the pair) and a percent (key, its check raising
        ValueError or ManifestError). Raises a 400 (413) saying what is wrong, the name first."""
        isvc, body = self._isvc(request), await self._ab_json(request)
        try:
            if not isinstance(body, dict) or set(body) != {*revisions, percent[0]}:
                raise ValueError(form)
            for key, called in revisions.items():
                validate_dns1035(body[key], called)
            first, second = (body[key] for key in revisions)
            if first == second:
                raise ValueError(f"{both} are the same revision {first!r}")
            percent[1](body[percent[0]])
        except (ValueError, ManifestError) as exc:
            raise _json_error(400, str(exc)) from None
        return isvc, body

    async def start_ab(self, request: web.Request) -> web.Response:
        """`PUT /-/ab/<isvc>` `{"a": revision, "b": revision, "split_percent": P}`: who is in which arm."""
        isvc, body = await self._control(
            request,
            'an A/B test is {"a": revision, "b": revision, "split_percent": 1-99}',
            {"a": "revision of arm a", "b": "revision of arm b"},
            "arms a and b",
            ("split_percent", check_split),
        )
        self.ab_tests[isvc] = dict(body)
        return web.json_response({"isvc": isvc, **body})

    async def end_ab(self, request: web.Request) -> web.Response:
        isvc = self._isvc(request)
        ended = self.ab_tests.pop(isvc, None)
        return web.json_response({"isvc": isvc, "ended": ended})

    async def record_outcome(self, request: web.Request) -> web.Response:
        """`POST /-/outcome/<isvc>`: outcomes, each counted under the revision its user is pinned to.
        The whole body is checked before anything is counted."""
        isvc, body = self._isvc(request), await self._ab_json(request)
        test = self.ab_tests.get(isvc)
        if test is None:
            return web.json_response({"error": f"no A/B test is running on {isvc}: nothing to attribute outcomes to"}, status=404)
        try:
            parsed = parse_outcomes(body)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        pinned = [(key, success, arm_of(user_bucket(key), test["split_percent"]), claimed) for key, success, claimed in parsed]
        for key, _, arm, claimed in pinned:
            if claimed is not None and claimed != arm:
                message = f"user {key!r} is pinned to arm {arm!r} at a {test['split_percent']}% split, not {claimed!r}"
                return web.json_response({"error": message}, status=409)
        for _, success, arm, _ in pinned:
            revision = test[arm]
            self.outcomes.labels(isvc, revision, arm, "success" if success else "failure").inc()
            self.outcome_counts.setdefault((isvc, revision), [0, 0])[0 if success else 1] += 1
        return web.json_response({"recorded": len(pinned)})

    async def outcome_counts_of(self, request: web.Request) -> web.Response:
        """`GET /-/outcomes/<isvc>`: cumulative outcomes per revision (every revision ever in a test)."""
        isvc = self._isvc(request)
        counted = self.outcome_counts.items()
        revisions = {rev: {"success": n[0], "failure": n[1]} for (name, rev), n in counted if name == isvc}
        return web.json_response({"isvc": isvc, "test": self.ab_tests.get(isvc), "revisions": revisions})

    # ---- shadows: the stable and candidate answers of one request, paired ---------------------------------
    async def start_shadow(self, request: web.Request) -> web.Response:
        """`PUT /-/shadow/<isvc>` `{"stable": revision, "candidate": revision, "percent": 1-100}`."""
        isvc, body = await self._control(
            request,
            'a shadow is {"stable": revision, "candidate": revision, "percent": 1-100}',
            {"stable": "stable revision", "candidate": "candidate revision"},
            "stable and candidate",
            ("percent", _shadow_percent),
        )
        shadow = self.shadows.setdefault(isvc, ShadowPairs(self.shadow_timeout_s))
        shadow.start(body["stable"], body["candidate"], body["percent"])
        return web.json_response({"isvc": isvc, **body})

    async def end_shadow(self, request: web.Request) -> web.Response:
        isvc = self._isvc(request)
        shadow = self.shadows.get(isvc)
        ended = None if shadow is None else shadow.mirror
        if shadow is not None:
            shadow.stop()
        return web.json_response({"isvc": isvc, "ended": ended})

    async def shadow_pairs(self, request: web.Request) -> web.Response:
        """`GET /-/shadow/<isvc>?since=<seq>&limit=<n>`: the pairs recorded after `since` (the router's format)."""
        isvc = self._isvc(request)
        try:
            since = max(0, int(request.query.get("since", "0")))
            limit = min(max(1, int(request.query.get("limit", "5000"))), SHADOW_BUFFER)
        except ValueError:
            return web.json_response({"error": "since and limit are integers"}, status=400)
        shadow = self.shadows.get(isvc) or ShadowPairs(self.shadow_timeout_s)  # none yet: nothing paired
        return web.json_response({"isvc": isvc, **shadow.page(since, limit, time.monotonic())})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthy(self, request: web.Request) -> web.Response:
        return web.json_response({"buffered_bytes": self.buffered_bytes, "store": self.store})

    async def on_startup(self, app: web.Application) -> None:
        self._task = asyncio.create_task(self._flush_forever())

    async def on_cleanup(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()  # what is buffered at shutdown is written, not lost

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/", self.receive)
        app.router.add_post("/-/flush", self.flush_now)
        app.router.add_post("/-/drift/{isvc}", self.record_drift)
        app.router.add_put("/-/ab/{isvc}", self.start_ab)
        app.router.add_delete("/-/ab/{isvc}", self.end_ab)
        app.router.add_post("/-/outcome/{isvc}", self.record_outcome)
        app.router.add_get("/-/outcomes/{isvc}", self.outcome_counts_of)
        app.router.add_put("/-/shadow/{isvc}", self.start_shadow)
        app.router.add_delete("/-/shadow/{isvc}", self.end_shadow)
        app.router.add_get("/-/shadow/{isvc}", self.shadow_pairs)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/-/healthy", self.healthy)
        app.router.add_get("/-/ready", self.healthy)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


def _shadow_percent(percent: int) -> None:
    if check_mirror_percent(percent) == 0:
        raise ValueError("a shadow mirrors 1-100 percent of requests")


def _json_error(status: int, message: str) -> web.HTTPException:
    body = {"text": json.dumps({"error": message}), "content_type": "application/json"}
    if status == 413:
        return web.HTTPRequestEntityTooLarge(max_size=AB_MAX_BYTES, actual_size=AB_MAX_BYTES + 1, **body)
    return web.HTTPBadRequest(**body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--store", default="", help="artifact URI of the payload store (default: from MLFLOW_TRACKING_URI)")
    parser.add_argument("--sample-rate", type=float, default=0.25)
    parser.add_argument("--flush-s", type=float, default=30.0)
    parser.add_argument("--max-buffer-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--shadow-timeout-s", type=float, default=30.0, help="how long a shadow pair waits for its answers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A store that is down must not hold a flush for minutes (MLflow's default is 7 retries with backoff):
    # the batch stays buffered and the next flush tries again.
    apply_mlflow_client_env(PAYLOAD_SINK_MLFLOW_CLIENT_ENV)
    store = args.store or store_for(mlflow_tracking_uri_env())
    sink = PayloadSink(store, args.sample_rate, args.flush_s, args.max_buffer_bytes, args.shadow_timeout_s)
    web.run_app(sink.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
