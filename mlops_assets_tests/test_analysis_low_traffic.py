"""Low traffic and relative latency in the canary analysis: the baseline-record test (anytime validity by simulation,
power), the traffic-adaptive schedule (a healthy canary at 2 req/s promoted within the budget, a broken one stopped
after a handful of failed requests), the latency tail test on bucketed histograms (a 1.5x slower canary rolled back,
an identical one not) and the policy fields reaching the analysis. Seeded, a few seconds each."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from mlops_assets.core.rollout.analysis import (
    BaselineRecordTest,
    CanaryAnalysis,
    Decision,
    LatencyTailTest,
    RelativeRateTest,
    Thresholds,
    WindowCounts,
    rate_ratio_grid,
)
from mlops_assets.core.rollout.policy import RolloutPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import canary as bench  # noqa: E402


def test_record_test_ever_crosses_at_most_alpha_when_canary_equals_the_baseline() -> None:
    rng = np.random.default_rng(31)
    runs, alpha = 300, 0.1
    crossed = 0
    for _ in range(runs):
        n_h = int(rng.poisson(7200))
        test = BaselineRecordTest(1.5, n_h, int(rng.binomial(n_h, 0.002)))
        for _ in range(150):
            n_c, n_b = int(rng.poisson(5)), int(rng.poisson(5))
            test.update(int(rng.binomial(n_c, 0.002)), n_c, int(rng.binomial(n_b, 0.002)), n_b)
            if test.log_e >= math.log(1 / alpha):
                crossed += 1
                break
    assert crossed / runs <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_record_test_rejects_a_twenty_fold_rate_after_a_few_errors() -> None:
    test = BaselineRecordTest(1.5, 7200, 7)
    test.update(5, 250, 0, 250)
    assert test.log_e >= math.log(1 / (0.3 * 0.01))
    assert test.canary_worse_during_rollout(1.5)
    # A surge on both revisions now is not blamed on the canary by the record.
    surge = BaselineRecordTest(1.5, 7200, 7)
    surge.update(5, 250, 6, 250)
    assert not surge.canary_worse_during_rollout(1.5)


def test_below_relative_test_has_expectation_at_most_one_at_equal_rates() -> None:
    # Exact expectation over k_c ~ Binomial(K, p0) (equal rates, the boundary of H0 "canary >= baseline").
    thetas = 1.0 / rate_ratio_grid(1.5)
    assert np.all(RelativeRateTest(1.5, below=True).thetas == thetas)
    for total, p0 in ((5, 0.5), (12, 0.25)):
        k = np.arange(total + 1)
        lr = np.exp(k[:, None] * np.log(thetas) - total * np.log1p(p0 * (thetas - 1.0)))
        np.testing.assert_allclose(stats.binom.pmf(k, total, p0) @ lr, 1.0, rtol=1e-9)


def test_latency_tail_bounds_come_from_the_baseline_p95_bucket_and_the_tolerance() -> None:
    tail = LatencyTailTest(1.5, ratio=1.2, margin_s=0.002)
    assert tail.choose_bounds([0.05, 0.075, 0.1, math.inf]) is None  # no baseline data yet
    tail.baseline = {0.05: 70, 0.075: 97, 0.1: 100, math.inf: 100}
    # 3% above 75 ms (its p95 bucket); 1.2 x 75 ms + 2 ms = 92 ms, rounded up to the 100 ms bound.
    assert tail.choose_bounds([0.05, 0.075, 0.1, math.inf]) == (0.075, 0.1)


def _low_traffic_runs(p_canary: float, runs: int, seed: int) -> list[bench.Outcome]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(runs):
        n = int(rng.poisson(7200))
        record = (n, int(rng.binomial(n, 0.001)))
        out.append(bench.run_stream(bench.make_stream(rng, 2.0, 3600), Thresholds(), p_canary, 0.001, record=record))
    return out


def test_healthy_canary_at_two_requests_per_second_is_promoted_within_twenty_minutes() -> None:
    outcomes = _low_traffic_runs(0.001, 40, 41)
    assert not any(o.decision == "rollback" for o in outcomes)
    assert np.median([o.t_s for o in outcomes]) <= 1200
    evidence = next(o.evidence for o in outcomes if o.evidence)
    assert evidence["schedule"]["mode"] == "low_traffic"


def test_broken_canary_at_two_requests_per_second_stops_after_a_handful_of_failures() -> None:
    outcomes = _low_traffic_runs(0.02, 100, 42)
    assert all(o.decision == "rollback" for o in outcomes)
    # The goal is a median of 5 (bench/canary.py, 400 runs); 100 runs here put the sample median at 5 or 6.
    assert np.median([o.failed for o in outcomes]) <= 6
    assert np.mean([o.failed for o in outcomes]) <= 6


def test_evidence_reports_the_expected_time_to_a_decision() -> None:
    a = CanaryAnalysis(Thresholds(), started_at=0.0, baseline_record=(7200, 7))
    verdict = None
    for t in range(5, 61, 5):
        verdict = a.observe(WindowCounts(1, 0, 0, 9, 0, 0), float(t))
    assert verdict is not None and verdict.evidence["schedule"]["mode"] == "low_traffic"
    assert a.percent > 5
    assert 0 < verdict.evidence["expected_decision_s"] <= Thresholds().decision_budget_s * 1.5


def test_short_baseline_record_keeps_the_declared_share() -> None:
    a = CanaryAnalysis(Thresholds(), started_at=0.0)
    for t in range(5, 61, 5):
        a.observe(WindowCounts(1, 0, 0, 9, 0, 0), float(t))
    assert a.percent == 5


@pytest.mark.parametrize(("factor", "decision"), [(1.5, Decision.ROLLBACK), (1.0, Decision.PROMOTE)])
def test_relative_latency_on_router_buckets(factor: float, decision: Decision) -> None:
    rng = np.random.default_rng(51)
    outcomes = [
        bench.run_stream(bench.make_stream(rng, 100.0, 600), Thresholds(), 0.001, 0.001, latency_factor=factor, buckets=True)
        for _ in range(12)
    ]
    assert sum(o.decision == decision.value for o in outcomes) >= 11
    if decision is Decision.ROLLBACK:
        assert all("latency_tail_vs_baseline" in o.evidence["fired"] for o in outcomes if o.decision == "rollback")


def test_new_policy_fields_reach_the_thresholds_and_are_validated() -> None:
    t = RolloutPolicy(decision_budget_s=300, max_low_traffic_percent=30, latency_ratio_tolerance=1.5, latency_margin_s=0.02)
    th = t.thresholds()
    assert (th.decision_budget_s, th.max_low_traffic_percent, th.latency_ratio_tolerance, th.latency_margin_s) == (
        300,
        30,
        1.5,
        0.02,
    )
    for kwargs, field in (
        ({"latency_ratio_tolerance": 0.5}, "latency_ratio_tolerance"),
        ({"max_low_traffic_percent": 0}, "max_low"),
    ):
        with pytest.raises(ValueError, match=field):
            Thresholds(**kwargs)


# ---- a shadow's SLO proof carried into the canary's first step (shadow_then_canary) ----------------------------


def _first_step_requests(carried: tuple[int, int, int, int] | None) -> int:
    """Clean canary windows at a declared first step (high traffic, so the schedule stays): canary requests until
    step one passes."""
    a = CanaryAnalysis(Thresholds(), started_at=0.0)
    if carried is not None:
        a.carry_slo_proof(*carried)
    for t in range(1, 1000):
        verdict = a.observe(WindowCounts(10, 0, 0, 190, 0, 0), float(t))
        if verdict.percent != 5:
            return 10 * t
    raise AssertionError("step one never passed")


def test_a_carried_shadow_proof_leaves_the_first_step_only_its_users_to_serve() -> None:
    """A shadow that showed both SLOs on 600 mirrored requests: the first step passes once min_requests_per_step (100)
    users were served, against the ~360 clean requests the error SLO's proof needs from nothing; the evidence says
    what was carried."""
    fresh = _first_step_requests(None)
    carried = _first_step_requests((600, 0, 600, 0))
    assert carried == Thresholds().min_requests_per_step
    assert fresh >= 3 * carried
    a = CanaryAnalysis(Thresholds(), started_at=0.0)
    a.carry_slo_proof(600, 0, 600, 0)
    evidence = a.observe(WindowCounts(10, 0, 0, 190, 0, 0), 1.0).evidence
    assert evidence["carried_slo_proof"] == {
        "source": "shadow",
        "requests": 600,
        "errors": 0,
        "answered": 600,
        "slow": 0,
        "slo_shown": True,
    }


def test_a_carried_proof_keeps_promoting_a_canary_at_the_slo_below_promote_alpha() -> None:
    """By simulation: a candidate failing exactly at the error SLO (1%, the boundary of H0') in its shadow and in its
    canary; the shadow's counts carried into a one-step canary. Promotions stay within promote_alpha (0.05)."""
    rng = np.random.default_rng(7)
    t = Thresholds(steps=(50,))
    runs, promoted = 400, 0
    for _ in range(runs):
        n = int(rng.integers(200, 2000))
        a = CanaryAnalysis(t, started_at=0.0)
        a.carry_slo_proof(n, int(rng.binomial(n, 0.01)), n, 0)
        for w in range(1, 200):
            k_c, k_b = int(rng.binomial(20, 0.01)), int(rng.binomial(20, 0.01))
            verdict = a.observe(WindowCounts(20, k_c, 0, 20, k_b, 0), float(w))
            if verdict.decision in (Decision.PROMOTE, Decision.ROLLBACK):
                promoted += verdict.decision == Decision.PROMOTE
                break
    assert promoted <= stats.binom.ppf(0.99, runs, t.promote_alpha)


def test_carrying_a_proof_is_refused_after_the_first_window_or_with_impossible_counts() -> None:
    a = CanaryAnalysis(Thresholds(), started_at=0.0)
    with pytest.raises(ValueError, match="errors <= requests"):
        a.carry_slo_proof(10, 11, 10, 0)
    with pytest.raises(ValueError, match="whole number"):
        a.carry_slo_proof(10, -1, 10, 0)
    a.observe(WindowCounts(10, 0, 0, 190, 0, 0), 1.0)
    with pytest.raises(RuntimeError, match="first window"):
        a.carry_slo_proof(10, 0, 10, 0)


def test_shadow_then_canary_at_two_requests_per_second_exposes_about_min_requests_users() -> None:
    """At 2 req/s the users a candidate is shown to, not time, is the budget: after a shadow (100% mirrored, no user
    exposed) the canary promotes after about min_requests_per_step users instead of the ~360 a canary alone needs
    (bench/canary.py prints both)."""
    rng = np.random.default_rng(43)
    exposed = []
    for _ in range(20):
        n = int(rng.poisson(7200))
        shadow_s, carried = bench.run_shadow_phase(rng, 2.0, 0.001)
        assert carried is not None and shadow_s <= 1200
        out = bench.run_stream(bench.make_stream(rng, 2.0, 3600), Thresholds(), 0.001, 0.001, record=(n, 7), carried=carried)
        assert out.decision == "promote"
        exposed.append(out.evidence["cumulative"]["canary_requests"])
    assert np.median(exposed) <= 1.2 * Thresholds().min_requests_per_step
