"""Fault scenarios on the embedded platform with real processes, shared by the fault tests
(`test_faults.py`, which assert on them) and `bench/faults.py` (which reports their figures).

Each scenario deploys its own InferenceService under a `LocalPlatform` (real model servers, the real
router, the real supervisor), puts real users on it (HTTP at a steady rate, every answer recorded
with the revision that served it), injects one fault, and returns what users saw: failed requests
on the stable revision, failed requests in all, time to recover, the candidate's final share, and
whether state survived. Nothing is mocked; where a fault needs a bad peer (a metrics endpoint that
answers garbage), the peer is a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from mlops_assets.core import processes
from mlops_assets.core.rollout.analysis import Thresholds
from mlops_assets.core.rollout.strategies import ROLLED_BACK, RolloutContext, run_canary
from mlops_assets.core.serving.manifest import Deployment, build_inference_service
from mlops_assets.core.serving.metrics import MetricsSource, RevisionCounts, ScrapeMetrics
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets_tests.helpers import valid_body

#: Fast enough for tests, strict enough to judge: 25% then 50%, and a short no-data deadline.
THRESHOLDS = Thresholds(max_error_rate=0.05, steps=(25, 50), min_requests_per_step=40, no_data_deadline_s=6.0)
FAILED = 500  # status >= FAILED is a failed request (5xx, or 599 for a connection error)


@dataclass
class Outcome:
    """What users saw during one fault."""

    name: str
    survived: bool
    stable_failed: int  # failed requests served by (or meant for) the stable revision
    failed: int  # failed requests in all
    requests: int
    recovery_s: float | None  # fault -> traffic healthy again (None: never)
    candidate_share: int | None = None  # the candidate's percent at the end (rollouts)
    detail: dict = field(default_factory=dict)

    def line(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        return (
            f"fault={self.name} survived={str(self.survived).lower()} stable_failed={self.stable_failed} "
            f"failed={self.failed}/{self.requests} recovery_s={rec}"
            + ("" if self.candidate_share is None else f" candidate_share={self.candidate_share}")
        )


class Users:
    """Real users: POSTs at `rate`/s to the service's predict URL from a background thread, each
    answer recorded as (sent, done, revision that served it, status; 599 = connection error)."""

    def __init__(self, url: str, rate: float = 50.0, timeout_s: float = 40.0) -> None:
        self.url, self.rate, self.timeout_s = url, rate, timeout_s
        self.records: list[tuple[float, float, str, int]] = []
        self.errors: list[str] = []  # the bodies of failed answers (the router names the cause)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="users", daemon=True)
        self.body = valid_body()

    def __enter__(self) -> Users:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 10)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        try:
            async with session.post(self.url, data=self.body, headers={"content-type": "application/json"}) as resp:
                answer = await resp.read()
                rec = (sent, time.monotonic(), resp.headers.get("x-mlops-revision", ""), resp.status)
                if resp.status >= FAILED:
                    self.errors.append(answer[:300].decode(errors="replace"))
        except (TimeoutError, aiohttp.ClientError, OSError):
            rec = (sent, time.monotonic(), "", 599)
        self.records.append(rec)

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks: set[asyncio.Task] = set()
            while not self._stop.is_set():
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1.0 / self.rate)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout_s)

    def failed(self, since: float = 0.0, revision: str | None = None) -> int:
        return sum(
            1 for s, _, rev, code in self.records if s >= since and code >= FAILED and (revision is None or rev == revision)
        )

    def recovered_at(self, since: float, streak: int = 20) -> float | None:
        """When answers became healthy again after `since`: the first of `streak` successes in a row."""
        run, first = 0, None
        for s, done, _, code in sorted(self.records):
            if s < since:
                continue
            if code < FAILED:
                first = done if run == 0 else first
                run += 1
                if run >= streak:
                    return first
            else:
                run, first = 0, None
        return None

    def slowest_failure_s(self, since: float = 0.0) -> float:
        return max((d - s for s, d, _, code in self.records if s >= since and code >= FAILED), default=0.0)


def manifest(model: str, version, storage_uri: str | None = None, canary: int | None = None) -> dict:
    return build_inference_service(
        Deployment(
            model_name=model,
            version=version.version,
            storage_uri=storage_uri or version.download_uri,
            run_id=version.run_id,
            canary_percent=canary,
        )
    )


def local_copy(version, into: Path) -> str:
    """A private copy of a version's artifacts, so a scenario can corrupt it without touching the registry."""
    source = version.download_uri.removeprefix("file://")
    target = into / f"model-v{version.version}-{time.monotonic_ns()}"
    shutil.copytree(source, target)
    return str(target)


#: How long after a server's death a request may still be forwarded to it by the router (see stable_killed).
ROUTER_NOTICES_S = 0.05


def _kill(platform: LocalPlatform, name: str, revision: str) -> None:
    """SIGKILL the revision's server and return once it is dead (its sockets closed): until then
    it may still accept a connection, so a request sent meanwhile was in flight at the kill.

    The kernel frees a killed process's memory before it closes its files, and meanwhile the listening
    socket still completes handshakes: the connections made in that window are reset when it closes, with
    the request sent. Measured here: 3 ms for a 350 MB process on a quiet box (up to 129 connections taken
    into the backlog), 1 s for 2.5 GB. The router cannot tell such a request from one the server read and
    died on, so it answers 502 for both (a request that could kill a server is not replayed to another)."""
    record = processes.read_record(platform._dir(name) / "revisions" / f"{revision}.pid")
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(record.pid)
        while time.monotonic() < deadline and process.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.001)


def _kill_router(platform: LocalPlatform, name: str) -> None:
    os.kill(processes.read_record(platform._dir(name) / "router.pid").pid, signal.SIGKILL)


def _ctx(platform: LocalPlatform, name: str, events: list, metrics: MetricsSource | None = None, timeout_s: float = 120.0):
    return RolloutContext(
        platform=platform,
        metrics=metrics or ScrapeMetrics(),
        isvc=name,
        emit=events.append,
        log=lambda m: None,
        poll_s=0.5,
        timeout_s=timeout_s,
    )


def _stable_and_previous(platform: LocalPlatform, model: str, versions: dict) -> tuple[str, str]:
    """A service as it is after a rollout: v2 rolled out, v1 kept warm as the previous revision."""
    name = model.replace("_", "-")
    with contextlib.suppress(Exception):
        platform.delete(name)
    platform.apply(manifest(model, versions["1"]))
    status = platform.apply(manifest(model, versions["2"]))
    return name, status.latest_rolledout


# ---- the scenarios ----------------------------------------------------------------------------------


def canary_cannot_restart(platform: LocalPlatform, versions: dict, scratch: Path) -> Outcome:
    """The canary's server is killed at 25% and cannot start again (its artifact is gone, as with a
    corrupt download or an OOM at load). The rollout must roll it back without raising, users on
    the stable revision must see no failure, and reconcile / a redeploy of stable must still work."""
    model, name = "fault_canary", "fault-canary"
    with contextlib.suppress(Exception):
        platform.delete(name)
    stable = platform.apply(manifest(model, versions["1"]))
    doomed = local_copy(versions["2"], scratch)
    events: list = []
    killed: dict = {}

    def emit(event) -> None:
        events.append(event)
        if event.kind == "canary_start":
            shutil.rmtree(doomed)  # it can never load again
            _kill(platform, name, event.status.latest_ready)
            killed["at"] = time.monotonic()

    ctx = _ctx(platform, name, events)
    ctx.emit = emit
    error = None
    with Users(stable.predict_url(), rate=50) as users:
        try:
            result = run_canary(ctx, manifest(model, versions["2"], storage_uri=doomed), THRESHOLDS)
        except Exception as exc:  # noqa: BLE001 - the scenario reports it
            result, error = None, exc
        decided = time.monotonic()
        time.sleep(2.0)
    # The supervisor keeps trying (with backoff); its first failed start is recorded, naming the log.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ".log" not in platform.status(name).message:
        time.sleep(0.5)
    status = platform.status(name)
    candidate = status.latest_ready
    repaired = redeployed = True
    try:
        platform.reconcile(name)
    except Exception as exc:  # noqa: BLE001
        repaired, error = False, error or exc
    try:
        platform.apply(manifest(model, versions["1"]))
    except Exception as exc:  # noqa: BLE001
        redeployed, error = False, error or exc
    share = status.percent_of(status.latest_created)
    stable_failed = users.failed(revision=stable.latest_rolledout)
    survived = (
        error is None
        and result is not None
        and result.outcome == ROLLED_BACK
        and share == 0
        and stable_failed == 0
        and users.failed(since=decided) == 0
        and repaired
        and redeployed
    )
    platform.delete(name)
    return Outcome(
        "canary_cannot_restart",
        survived,
        stable_failed,
        users.failed(),
        len(users.records),
        round(decided - killed["at"], 2) if "at" in killed else None,
        share,
        {
            "reason": result.reason if result else repr(error),
            "candidate": candidate,
            "error": repr(error) if error else "",
            "status_message": status.message,
        },
    )


def rollback_with_dead_canary(platform: LocalPlatform, versions: dict, scratch: Path) -> Outcome:
    """Rollback while the canary's server is dead and cannot start: traffic moves first, at once,
    and no request fails after the rollback call returns."""
    model, name = "fault_rollback", "fault-rollback"
    with contextlib.suppress(Exception):
        platform.delete(name)
    stable = platform.apply(manifest(model, versions["1"]))
    doomed = local_copy(versions["2"], scratch)
    canary = platform.apply(manifest(model, versions["2"], storage_uri=doomed, canary=25))
    with Users(stable.predict_url(), rate=50) as users:
        time.sleep(1.0)
        shutil.rmtree(doomed)
        _kill(platform, name, canary.latest_ready)
        time.sleep(0.5)
        began = time.monotonic()
        error = None
        try:
            after = platform.rollback(name)
        except Exception as exc:  # noqa: BLE001
            after, error = platform.status(name), exc
        returned = time.monotonic()
        time.sleep(2.0)
    stable_failed = users.failed(revision=stable.latest_rolledout)
    late = users.failed(since=returned)
    share = after.percent_of(canary.latest_ready)
    platform.delete(name)
    return Outcome(
        "rollback_with_dead_canary",
        error is None and share == 0 and stable_failed == 0 and late == 0,
        stable_failed,
        users.failed(),
        len(users.records),
        round(returned - began, 3),
        share,
        {"rollback_call_s": round(returned - began, 3), "failed_after_rollback": late, "error": repr(error) if error else ""},
    )


def stable_killed(platform: LocalPlatform, versions: dict, scratch: Path) -> Outcome:
    """The stable revision's server is SIGKILLed with no rollout running, after a promotion (the
    previous revision warm). The router ejects it and serves from the previous revision; the
    supervisor restarts it; nobody materializes anything. Only requests in flight at the kill (sent
    before the router could notice it) may fail, and fast (no 30 s hang)."""
    name, stable = _stable_and_previous(platform, "fault_stable", versions)
    status = platform.status(name)
    with Users(status.predict_url(), rate=50) as users:
        time.sleep(1.0)
        kill_sent = time.monotonic()
        _kill(platform, name, stable)
        killed = time.monotonic()  # the server is dead: every request from now on must succeed
        deadline = killed + 60
        while time.monotonic() < deadline and platform.status(name).revisions[stable]["restarts"] == 0:
            time.sleep(0.2)
        restarted = time.monotonic()
        time.sleep(2.0)
    after = platform.status(name)
    recovered = users.recovered_at(killed)
    # In flight at the kill: sent before the router could know of it. It learns of a death from the
    # first connection that breaks; requests it forwarded meanwhile fail with that one (measured: all
    # failures end together, within ~25 ms of the kill), later ones go to the previous revision.
    in_flight = sum(1 for s, d, _, code in users.records if s < killed + ROUTER_NOTICES_S and d >= kill_sent)
    failed = users.failed()
    slowest = users.slowest_failure_s()
    platform.delete(name)
    return Outcome(
        "stable_killed",
        after.ready and after.revisions[stable]["restarts"] >= 1 and failed <= in_flight and slowest < 2.0,
        failed,
        failed,
        len(users.records),
        None if recovered is None else round(max(0.0, recovered - killed), 2),
        None,
        {
            "in_flight_at_kill": in_flight,
            "slowest_failure_s": round(slowest, 3),
            "restart_s": round(restarted - killed, 2),
            "death_s": round(killed - kill_sent, 4),  # from SIGKILL to the server gone
            "errors": users.errors[:3],
            # (sent, relative to the kill; status; revision): what a failure looked like
            "failures": [
                (round(s - kill_sent, 4), round(d - kill_sent, 4), code, rev)
                for s, d, rev, code in users.records
                if code >= FAILED
            ][:5],
        },
    )


def lone_revision_killed(platform: LocalPlatform, versions: dict, scratch: Path) -> Outcome:
    """The only revision's server dies (no other revision to fail over to): requests fail fast
    (503) until the supervisor has it back, with no one materializing anything."""
    model, name = "fault_lone", "fault-lone"
    with contextlib.suppress(Exception):
        platform.delete(name)
    status = platform.apply(manifest(model, versions["1"]))
    with Users(status.predict_url(), rate=50) as users:
        time.sleep(1.0)
        killed = time.monotonic()
        _kill(platform, name, status.latest_rolledout)
        deadline = killed + 60
        while time.monotonic() < deadline and users.recovered_at(killed) is None:
            time.sleep(0.2)
        time.sleep(1.0)
    recovered = users.recovered_at(killed)
    slowest = users.slowest_failure_s()
    after = platform.status(name)
    platform.delete(name)
    return Outcome(
        "lone_revision_killed",
        recovered is not None and after.ready and slowest < 2.0,
        users.failed(),
        users.failed(),
        len(users.records),
        None if recovered is None else round(recovered - killed, 2),
        None,
        {"slowest_failure_s": round(slowest, 3), "note": "no healthy revision to fail over to: failures until restart"},
    )


def router_killed(platform: LocalPlatform, versions: dict, scratch: Path) -> Outcome:
    """The router dies with no rollout running: the supervisor restarts it on the same URL with the
    same table; nobody materializes anything."""
    name, _ = _stable_and_previous(platform, "fault_router", versions)
    before = platform.status(name)
    with Users(before.predict_url(), rate=50) as users:
        time.sleep(1.0)
        killed = time.monotonic()
        _kill_router(platform, name)
        deadline = killed + 60
        while time.monotonic() < deadline and users.recovered_at(killed) is None:
            time.sleep(0.2)
        time.sleep(1.0)
    recovered = users.recovered_at(killed)
    after = platform.status(name)
    intact = after.url == before.url and after.traffic == before.traffic
    platform.delete(name)
    return Outcome(
        "router_killed",
        recovered is not None and after.ready and intact,
        0,  # the router is the entry point: no revision served the failed requests
        users.failed(),
        len(users.records),
        None if recovered is None else round(recovered - killed, 2),
        None,
        {"state_intact": intact},
    )


class _GarbageHandler(http.server.BaseHTTPRequestHandler):
    mode = "html"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.mode == "html":
            body = b"<html><body>502 Bad Gateway (a proxy's error page)</body></html>"
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")  # lies about its type, too
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:  # truncated: promises more bytes than it sends, then closes
            body = b'mlops_router_requests_total{isvc="x",revision="r",code="200"} 1\nmlops_rout'
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body) + 500))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


class GarbageMetricsServer:
    """A real HTTP server on 127.0.0.1 whose `/metrics` answers 200 with garbage (`html` or `truncated`)."""

    def __init__(self, mode: str) -> None:
        handler = type("Handler", (_GarbageHandler,), {"mode": mode})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GarbageMetricsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class MetricsAt(MetricsSource):
    """`ScrapeMetrics` aimed at another URL than the router's (here: a garbage server)."""

    url: str

    def revision_counts(self, isvc: str, router_url: str) -> dict[str, RevisionCounts]:
        return ScrapeMetrics(timeout_s=2.0).revision_counts(isvc, self.url)

    def describe_query(self, isvc: str) -> str:
        return f"scrape of {self.url}/metrics"


def garbage_metrics(platform: LocalPlatform, versions: dict, scratch: Path, mode: str = "html") -> Outcome:
    """The metrics endpoint answers 200 with an HTML page or a truncated body during a canary: that
    is "metrics unavailable", the rollout holds and rolls back at the no-data deadline, the canary
    ends at 0%, and the failed-request counts say "unknown", not 0."""
    model, name = f"fault_metrics_{mode}", f"fault-metrics-{mode}"
    with contextlib.suppress(Exception):
        platform.delete(name)
    stable = platform.apply(manifest(model, versions["1"]))
    events: list = []
    error = result = None
    with GarbageMetricsServer(mode) as garbage, Users(stable.predict_url(), rate=30) as users:
        ctx = _ctx(platform, name, events, metrics=MetricsAt(url=garbage.url))
        began = time.monotonic()
        try:
            result = run_canary(ctx, manifest(model, versions["2"]), THRESHOLDS)
        except Exception as exc:  # noqa: BLE001
            error = exc
        decided = time.monotonic()
    status = platform.status(name)
    share = status.percent_of(status.latest_ready) if status.latest_ready != status.latest_rolledout else 0
    unknown = result is not None and result.candidate_failed_requests is None and result.stable_failed_requests is None
    platform.delete(name)
    return Outcome(
        f"garbage_metrics_{mode}",
        error is None and result is not None and result.outcome == ROLLED_BACK and share == 0 and unknown,
        users.failed(revision=stable.latest_rolledout),
        users.failed(),
        len(users.records),
        round(decided - began, 2),
        share,
        {"reason": result.reason if result else repr(error), "failed_counts_unknown": unknown},
    )


def strategy_raises(platform: LocalPlatform, versions: dict, scratch: Path) -> Outcome:
    """Something inside the strategy raises mid-canary (here: recording an event fails, as a broken
    event log would): the candidate is rolled back to 0% before the exception leaves the strategy."""
    model, name = "fault_raise", "fault-raise"
    with contextlib.suppress(Exception):
        platform.delete(name)
    stable = platform.apply(manifest(model, versions["1"]))
    events: list = []

    def emit(event) -> None:
        events.append(event)
        if event.kind == "step":
            raise RuntimeError("event log unavailable")

    ctx = _ctx(platform, name, events)
    ctx.emit = emit
    raised = None
    with Users(stable.predict_url(), rate=50) as users:
        try:
            run_canary(ctx, manifest(model, versions["2"]), THRESHOLDS)
        except RuntimeError as exc:
            raised = exc
    status = platform.status(name)
    share = status.percent_of(status.latest_ready) if status.latest_ready != status.latest_rolledout else 0
    rolled_back = any(e.kind == "rollback" for e in events)
    platform.delete(name)
    return Outcome(
        "strategy_raises",
        raised is not None and share == 0 and rolled_back and status.stable_version == "1",
        users.failed(revision=stable.latest_rolledout),
        users.failed(),
        len(users.records),
        None,
        share,
        {"raised": repr(raised), "rollback_event": rolled_back},
    )


_RUNNER = textwrap.dedent(
    """
    import os, signal, socket, sys, time, json
    from mlops_assets.core.serving.lock import LockInfo
    from mlops_assets.core.rollout.strategies import RolloutContext, run_canary
    from mlops_assets.core.rollout.analysis import Thresholds
    from mlops_assets.core.serving.metrics import ScrapeMetrics
    from mlops_assets.core.serving.platform import LocalPlatform

    home, name, manifest_file, ready_file, supervise = sys.argv[1:6]
    # As Dagster does for a terminated run: SIGTERM becomes an exception inside the step.
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("run terminated")))
    platform = LocalPlatform(home=home, supervise=supervise == "1")
    lock = platform.rollout_lock(name)
    info = LockInfo(name, "canary-doomed", "run-doomed", "canary", "2", time.time(), os.getpid(), socket.gethostname())
    lock.acquire(info, is_running=lambda run_id: False)

    def emit(event):
        if event.kind == "canary_start":
            open(ready_file, "w").write(event.status.latest_ready)

    ctx = RolloutContext(platform=platform, metrics=ScrapeMetrics(), isvc=name, emit=emit, log=print, poll_s=0.5,
                         timeout_s=600)
    # Never decides on its own: a step needs far more requests than the users send.
    run_canary(ctx, json.load(open(manifest_file)), Thresholds(steps=(25, 50), min_requests_per_step=10**9,
                                                              no_data_deadline_s=600))
    """
)


def run_killed_mid_canary(platform: LocalPlatform, versions: dict, scratch: Path, sig: int = signal.SIGKILL) -> Outcome:
    """The process running a canary dies at 25% (SIGKILL: no chance to clean up; SIGTERM: Dagster's
    run termination). With SIGTERM the strategy rolls back on its way out; with SIGKILL the
    supervisor sees the rollout's owner gone and rolls the canary back."""
    label = "sigkill" if sig == signal.SIGKILL else "sigterm"
    model, name = f"fault_run_{label}", f"fault-run-{label}"
    with contextlib.suppress(Exception):
        platform.delete(name)
    stable = platform.apply(manifest(model, versions["1"]))
    manifest_file, ready_file = scratch / f"{name}.json", scratch / f"{name}.ready"
    manifest_file.write_text(json.dumps(manifest(model, versions["2"])))
    ready_file.unlink(missing_ok=True)
    log = open(scratch / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, platform.home, name, str(manifest_file), str(ready_file), str(int(platform.supervise))],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    recovered_s = None
    try:
        with Users(stable.predict_url(), rate=30) as users:
            deadline = time.monotonic() + 120
            while not ready_file.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            canary = ready_file.read_text() if ready_file.exists() else None
            time.sleep(1.0)
            killed = time.monotonic()
            proc.send_signal(sig)
            proc.wait(timeout=60)
            while time.monotonic() < killed + 30:
                status = platform.status(name)
                if canary and status.percent_of(canary) == 0:
                    recovered_s = time.monotonic() - killed
                    break
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    status = platform.status(name)
    share = status.percent_of(canary) if canary else None
    platform.delete(name)
    return Outcome(
        f"run_{label}_mid_canary",
        canary is not None and share == 0 and status.stable_version == "1",
        users.failed(revision=stable.latest_rolledout),
        users.failed(),
        len(users.records),
        None if recovered_s is None else round(recovered_s, 2),
        share,
        {"exit_code": proc.returncode, "log": (scratch / f"{name}.log").read_text()[-1500:]},
    )


SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "canary_cannot_restart": canary_cannot_restart,
    "rollback_with_dead_canary": rollback_with_dead_canary,
    "stable_killed": stable_killed,
    "lone_revision_killed": lone_revision_killed,
    "router_killed": router_killed,
    "garbage_metrics_html": lambda p, v, s: garbage_metrics(p, v, s, "html"),
    "garbage_metrics_truncated": lambda p, v, s: garbage_metrics(p, v, s, "truncated"),
    "strategy_raises": strategy_raises,
    "run_sigkill_mid_canary": lambda p, v, s: run_killed_mid_canary(p, v, s, signal.SIGKILL),
    "run_sigterm_mid_canary": lambda p, v, s: run_killed_mid_canary(p, v, s, signal.SIGTERM),
}
