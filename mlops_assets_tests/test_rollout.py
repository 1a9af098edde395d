"""Rollout strategies end to end on the embedded platform: real model servers and router, real
HTTP traffic from background users, metrics from the router (and from a real Prometheus), the
sequential analysis deciding. Includes the faults: a canary that fails every request, a canary
whose server is killed, Prometheus going down mid-canary, and a concurrent rollout."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from mlops_assets.core import processes
from mlops_assets.core.platform import services
from mlops_assets.core.rollout.ab import ABTest
from mlops_assets.core.rollout.analysis import Thresholds
from mlops_assets.core.rollout.charts import rollout_series
from mlops_assets.core.rollout.strategies import PROMOTED, ROLLED_BACK, RolloutContext, run_ab_test, run_blue_green, run_canary
from mlops_assets.core.serving.lock import FileRolloutLock, LockInfo, RolloutInProgressError
from mlops_assets.core.serving.manifest import Deployment, build_inference_service
from mlops_assets.core.serving.metrics import PrometheusMetrics, ScrapeMetrics
from mlops_assets.demo.traffic import TrafficGenerator
from mlops_assets_tests.helpers import valid_body

pytestmark = [pytest.mark.e2e, pytest.mark.latency]

MODEL = "fraud_rollout"
ISVC = "fraud-rollout"
FAST = Thresholds(max_error_rate=0.05, steps=(20, 50), min_requests_per_step=40, no_data_deadline_s=6.0)


def manifest(version) -> dict:
    return build_inference_service(Deployment(model_name=MODEL, version=version.version, storage_uri=version.download_uri))


@pytest.fixture(scope="module")
def service(platform, versions):
    status = platform.apply(manifest(versions["1"]))
    yield status
    platform.delete(ISVC)


@pytest.fixture()
def users(platform, service):
    traffic = TrafficGenerator(platform, ISVC, rate=80, success={"2": 0.30, "*": 0.05}).start()
    yield traffic
    traffic.stop()


def _ctx(platform, metrics=None, events=None, timeout_s=120.0):
    events = [] if events is None else events
    return RolloutContext(
        platform=platform,
        metrics=metrics or ScrapeMetrics(),
        isvc=ISVC,
        emit=events.append,
        log=lambda m: None,
        poll_s=0.5,
        timeout_s=timeout_s,
    ), events


def _reset_to(platform, versions, version: str) -> None:
    """Make `version` the stable revision with no canary."""
    status = platform.status(ISVC)
    if status.stable_version != version or status.latest_ready != status.latest_rolledout:
        platform.apply(manifest(versions[version]))
        platform.promote(ISVC)


def test_canary_promotes_a_healthy_version_step_by_step(platform, versions, users):
    _reset_to(platform, versions, "1")
    ctx, events = _ctx(platform)
    history: list = []  # as the serving asset keeps them for the chart: events and window samples in order
    ctx.emit, ctx.observe = (lambda e: (events.append(e), history.append(e))), history.append
    result = run_canary(ctx, manifest(versions["2"]), FAST)
    assert result.outcome == PROMOTED, result.reason
    assert [e.kind for e in events] == ["canary_start", "step", "promote"]
    assert [e.percent for e in events] == [20, 50, 100]
    assert all("e_values" in e.evidence for e in events[1:])
    # Every analysed window reached the chart (not the asset events): one sample per 0.5 s poll with data.
    samples = [e for e in history if e.kind == "window"]
    assert len(samples) >= 2 and all("e_values" in s.evidence and s.percent is None for s in samples)
    assert [e.elapsed_s for e in history] == sorted(e.elapsed_s for e in history)
    series = rollout_series(history)
    assert len(series.times_s) == len(history) and series.traffic_percent[-1] == 100
    status = platform.status(ISVC)
    assert status.stable_version == "2" and status.previous_rolledout == result.stable_revision
    assert result.candidate_failed_requests == 0 and result.stable_failed_requests == 0


def test_canary_rolls_back_a_failing_version_after_a_handful_of_failures(platform, versions, users):
    _reset_to(platform, versions, "1")
    ctx, events = _ctx(platform)
    result = run_canary(ctx, manifest(versions["3"]), FAST)
    assert result.outcome == ROLLED_BACK, result.reason
    assert events[-1].kind == "rollback" and events[-1].evidence["fired"]
    assert result.stable_failed_requests == 0
    # The analysis decided on a handful of failures (the windows it saw: 0.5 s polls at ~16 failing
    # requests/s; a poll delayed on a loaded 2-core box makes a window longer, hence the margin; the
    # benchmark measures the typical count, 4).
    assert result.evidence["cumulative"]["canary_errors"] <= 20
    assert result.duration_s < 15
    status = platform.status(ISVC)
    assert status.stable_version == "1" and status.percent_of(status.latest_rolledout) == 100


def test_a_canary_whose_server_is_killed_is_rolled_back(platform, versions, users):
    _reset_to(platform, versions, "1")

    def kill_canary(event) -> None:
        if event.kind == "canary_start":
            record = processes.read_record(platform._dir(ISVC) / "revisions" / f"{event.status.latest_ready}.pid")
            os.kill(record.pid, signal.SIGKILL)

    events: list = []
    ctx, _ = _ctx(platform, events=events)
    ctx.emit = lambda e: (events.append(e), kill_canary(e))
    result = run_canary(ctx, manifest(versions["2"]), FAST)
    assert result.outcome == ROLLED_BACK, result.reason
    assert result.stable_failed_requests == 0
    assert platform.status(ISVC).stable_version == "1"


@pytest.mark.skipif(services.prometheus_binary() is None, reason="prometheus is not installed (Debian package `prometheus`)")
def test_prometheus_metrics_match_the_router_and_its_loss_mid_canary_holds_then_aborts(platform, versions, users, mlops_home):
    _reset_to(platform, versions, "1")
    port = processes.free_port()
    record = services.start_prometheus(mlops_home, port, interval="1s")
    try:
        prom = PrometheusMetrics(url=record.url)
        url = platform.status(ISVC).url
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not prom.revision_counts(ISVC, url):
            time.sleep(1)  # the first scrape takes a few seconds
        from_prom = prom.revision_counts(ISVC, url)
        direct = ScrapeMetrics().revision_counts(ISVC, url)
        rev = platform.status(ISVC).latest_rolledout
        assert 0 < from_prom[rev].requests <= direct[rev].requests
        assert "sum by (revision, code)" in prom.describe_query(ISVC)

        def stop_prometheus(event) -> None:
            if event.kind == "canary_start":
                processes.stop(record)

        events: list = []
        ctx, _ = _ctx(platform, metrics=prom, events=events)
        ctx.emit = lambda e: (events.append(e), stop_prometheus(e))
        start = time.monotonic()
        result = run_canary(ctx, manifest(versions["2"]), FAST)
        assert result.outcome == ROLLED_BACK  # never promoted without data
        assert "data" in result.reason.lower() or "missing" in result.reason.lower(), result.reason
        assert time.monotonic() - start >= FAST.no_data_deadline_s
        assert platform.status(ISVC).stable_version == "1"
    finally:
        processes.stop(record)
        shutil.rmtree(mlops_home / "prometheus" / "data", ignore_errors=True)


def test_blue_green_switches_after_validation_and_refuses_a_broken_green(platform, versions, users):
    _reset_to(platform, versions, "1")
    ctx, events = _ctx(platform)
    result = run_blue_green(ctx, manifest(versions["2"]), FAST, valid_body(), validation_requests=30)
    assert result.outcome == PROMOTED, result.reason
    # Validated on live traffic mirrored to green (an event per window), then switched.
    kinds = [e.kind for e in events if e.kind not in ("validation_window", "validation_hold")]
    assert kinds == ["green_deployed", "validation_start", "validated", "switch", "promote"], kinds
    status = platform.status(ISVC)
    assert status.stable_version == "2" and status.previous_rolledout  # blue kept warm
    assert status.name == ISVC  # names never change, traffic does

    ctx, events = _ctx(platform)
    result = run_blue_green(ctx, manifest(versions["3"]), FAST, valid_body(), validation_requests=30)
    assert result.outcome == ROLLED_BACK
    assert [e.kind for e in events] == ["green_deployed", "rollback"]
    assert result.stable_failed_requests == 0  # users never reached the broken green
    assert platform.status(ISVC).stable_version == "2"


def test_ab_test_ships_the_arm_that_converts_better(platform, versions, users):
    _reset_to(platform, versions, "1")
    ctx, events = _ctx(platform)
    result = run_ab_test(ctx, manifest(versions["2"]), ABTest(alpha=0.05, base_rate=0.05, lift=2.0, min_samples=50))
    assert result.outcome == PROMOTED, result.reason
    assert result.evidence["recommendation"] == "ship_b"
    assert result.evidence["always_valid_p_value"] <= 0.05
    assert platform.status(ISVC).stable_version == "2"


def test_a_second_rollout_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    lock = FileRolloutLock(tmp_path, ISVC)
    first = LockInfo(ISVC, "canary-1", "run-a", "canary", "2", time.time())
    second = LockInfo(ISVC, "canary-2", "run-b", "blue_green", "3", time.time())
    assert lock.acquire(first, is_running=lambda run: True) is None
    with pytest.raises(RolloutInProgressError, match="canary rollout canary-1 .*run run-a.*one rollout per InferenceService"):
        lock.acquire(second, is_running=lambda run: True)
    stale = lock.acquire(second, is_running=lambda run: False)  # run-a died
    assert stale == first and lock.holder() == second
    lock.release(second)
    assert lock.holder() is None
