"""The fault suite: one test per fault the embedded platform must survive, with real processes.

Each test runs a scenario from `fault_scenarios.py` (real model servers, the real router and
supervisor, real users over HTTP) and asserts what users saw: no failed request on the stable
revision where a healthy revision exists, recovery without anyone materializing an asset, the
candidate's final share at 0% after any failed rollout, state intact, no process left behind (the
session fixture fails the suite if one is). `python bench/faults.py` runs the same scenarios and
reports their figures. The router's own faults (client errors, in-flight failures, bad routing
tables) are in `test_router_faults.py`; the registry's in `test_registry_faults.py`; the daemon's
in `test_daemon_watch.py`.
"""

from __future__ import annotations

import pytest

from mlops_assets.core.serving.metrics import MetricsUnavailableError, ScrapeMetrics
from mlops_assets_tests import fault_scenarios as fs

pytestmark = [pytest.mark.e2e, pytest.mark.latency]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def _run(name, platform, versions, scratch) -> fs.Outcome:
    outcome = fs.SCENARIOS[name](platform, versions, scratch)
    print(outcome.line(), outcome.detail)
    return outcome


def test_a_canary_that_cannot_restart_is_rolled_back_and_blocks_no_recovery(platform, versions, scratch):
    out = _run("canary_cannot_restart", platform, versions, scratch)
    assert out.detail["error"] == "", out.detail
    assert out.candidate_share == 0, out.detail
    assert "candidate revision" in out.detail["reason"], out.detail
    assert out.stable_failed == 0, out.detail
    assert out.survived, out.detail
    # The broken revision is named, with its log, in the service's status.
    assert out.detail["candidate"] in out.detail["status_message"] and ".log" in out.detail["status_message"]


def test_rollback_moves_traffic_before_restarting_anything(platform, versions, scratch):
    out = _run("rollback_with_dead_canary", platform, versions, scratch)
    assert out.detail["error"] == "", out.detail
    assert out.candidate_share == 0 and out.detail["failed_after_rollback"] == 0, out.detail
    assert out.stable_failed == 0, out.detail


def test_a_killed_stable_server_fails_over_and_is_restarted_unasked(platform, versions, scratch):
    out = _run("stable_killed", platform, versions, scratch)
    # Only requests already inside the dying server can fail, and they fail fast.
    assert out.failed <= out.detail["in_flight_at_kill"], out.detail
    assert out.detail["slowest_failure_s"] < 2.0, out.detail
    assert out.survived, out.detail


def test_a_lone_revision_killed_is_restarted_unasked(platform, versions, scratch):
    out = _run("lone_revision_killed", platform, versions, scratch)
    assert out.recovery_s is not None and out.recovery_s < 60, out.detail
    assert out.detail["slowest_failure_s"] < 2.0, out.detail
    assert out.survived, out.detail


def test_a_killed_router_is_restarted_unasked_with_its_state(platform, versions, scratch):
    out = _run("router_killed", platform, versions, scratch)
    assert out.detail["state_intact"], out.detail
    assert out.recovery_s is not None and out.recovery_s < 30, out.detail
    assert out.survived


@pytest.mark.parametrize("mode", ["html", "truncated"])
def test_every_unreadable_metrics_answer_is_unavailable_never_an_exception(mode):
    """A 200 with an HTML page (whatever its content type says) or a body cut short: `ScrapeMetrics`
    raises `MetricsUnavailableError`, which the rollout reads as "no data", as it does a closed port."""
    with fs.GarbageMetricsServer(mode) as garbage:
        with pytest.raises(MetricsUnavailableError, match="cannot scrape"):
            ScrapeMetrics(timeout_s=2).revision_counts("fault", garbage.url)
    with pytest.raises(MetricsUnavailableError, match="cannot scrape"):
        ScrapeMetrics(timeout_s=2).revision_counts("fault", garbage.url)  # now closed


def test_garbage_metrics_hold_then_roll_back_and_counts_are_unknown(platform, versions, scratch):
    """The whole rollout once (the truncated body takes the same path, see the test above; both run
    in `bench/faults.py`)."""
    out = _run("garbage_metrics_html", platform, versions, scratch)
    assert out.candidate_share == 0, out.detail
    assert out.detail["failed_counts_unknown"], out.detail
    assert "No usable canary data" in out.detail["reason"], out.detail
    assert out.survived, out.detail


def test_an_exception_inside_a_strategy_rolls_the_candidate_back_first(platform, versions, scratch):
    out = _run("strategy_raises", platform, versions, scratch)
    assert "event log unavailable" in out.detail["raised"]
    assert out.detail["rollback_event"] and out.candidate_share == 0
    assert out.survived


@pytest.mark.parametrize("signame", ["sigkill", "sigterm"])
def test_a_run_killed_mid_canary_never_leaves_the_canary_serving(platform, versions, scratch, signame):
    out = _run(f"run_{signame}_mid_canary", platform, versions, scratch)
    assert out.candidate_share == 0, out.detail
    assert out.recovery_s is not None and out.recovery_s < 30, out.detail
    assert out.stable_failed == 0, out.detail
    assert out.survived, out.detail


def test_the_supervisors_restarts_back_off_reset_and_give_up():
    """Restart bookkeeping on its own (plain Python, a fake clock): 1 s doubling to 60 s while starts
    fail, reset after a minute up, and no more tries after 10 failures in a row."""
    from mlops_assets.core.serving.supervisor import MAX_BACKOFF_S, MAX_FAILURES, Backoff

    b, now = Backoff(), 100.0
    assert b.due(now)
    delays = []
    for _ in range(MAX_FAILURES):
        assert b.due(now)
        b.record("could not start", now)
        delays.append(b.delay_s)
        assert not b.due(now)
        now = b.next_try
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0] and max(delays) == MAX_BACKOFF_S
    assert not b.due(now + 3600)  # gave up: left down until someone reconciles
    up = Backoff()
    up.record("restarted", 0.0)
    up.record("restarted", 2.0)
    assert up.delay_s == 2.0 and up.restarts == 2
    up.settle(2.0 + 61)
    assert up.delay_s == 0.0
