"""Canary analysis statistics: oracles (scipy), seeded simulations of error rates and power, and the decision logic.

The e-process building blocks are checked against scipy's binomial and hypergeometric distributions; their
anytime validity (probability of EVER crossing 1/alpha under the null, looking after every window) is checked
by vectorised simulation at larger alphas, where crossings are frequent enough to measure; `CanaryAnalysis`
itself is simulated end to end for false rollbacks (healthy and exactly-at-SLO canaries), power against a
broken canary, promotion of healthy ones, missing data, configuration errors and JSON evidence.
All simulations are seeded and sized to run in a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from mlops_assets.core.rollout.analysis import (
    P95_SLOW_SHARE,
    BernoulliSLOTest,
    CanaryAnalysis,
    Decision,
    RelativeRateTest,
    Thresholds,
    Verdict,
    WindowCounts,
    conditional_window_log_lr,
    rate_ratio_grid,
)


def simulate_canary(
    rng: np.random.Generator,
    thresholds: Thresholds,
    *,
    rate: float,
    p_canary: float,
    p_base: float,
    slow_canary: float = 0.001,
    slow_base: float = 0.001,
    seconds: int = 600,
    every: int = 5,
) -> tuple[Verdict, int, float]:
    """One CanaryAnalysis run on a binomial request stream; returns (last verdict, failed canary requests, time)."""
    analysis = CanaryAnalysis(thresholds, started_at=0.0)
    failed = 0
    verdict = None
    for t in range(every, seconds + 1, every):
        n = int(rng.poisson(rate * every))
        n_c = int(rng.binomial(n, analysis.percent / 100))
        n_b = n - n_c
        k_c, k_b = int(rng.binomial(n_c, p_canary)), int(rng.binomial(n_b, p_base))
        s_c, s_b = int(rng.binomial(n_c, slow_canary)), int(rng.binomial(n_b, slow_base))
        failed += k_c
        verdict = analysis.observe(WindowCounts(n_c, k_c, s_c, n_b, k_b, s_b), now=float(t))
        if verdict.decision in (Decision.ROLLBACK, Decision.PROMOTE):
            return verdict, failed, float(t)
    assert verdict is not None
    return verdict, failed, float(seconds)


# ---------------------------------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(
    ("k_c", "k_b", "p0", "theta"),
    [(0, 0, 0.05, 2.0), (3, 1, 0.05, 20.0), (0, 7, 0.25, 1.5), (5, 5, 0.5, 3.0), (12, 40, 0.1, 100.0), (1, 0, 0.01, 7.0)],
)
def test_conditional_window_likelihood_ratio_matches_binomial_pmf_ratio(k_c: int, k_b: int, p0: float, theta: float) -> None:
    q = p0 * theta / (p0 * theta + 1 - p0)
    k = k_c + k_b
    expected = stats.binom.logpmf(k_c, k, q) - stats.binom.logpmf(k_c, k, p0)
    got = float(conditional_window_log_lr(k_c, k_b, p0, theta))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize(("n_c", "n_b", "total"), [(50, 950, 5), (30, 70, 12), (5, 5, 3)])
def test_conditional_window_ratio_has_expectation_one_under_binomial_and_at_most_one_under_hypergeometric(
    n_c: int, n_b: int, total: int
) -> None:
    # Exact expectations over k_c: 1 under the Poisson model (binomial given the total), <= 1 with Bernoulli
    # requests (hypergeometric given the total: smaller in the convex order), which is why the test stays valid.
    thetas = rate_ratio_grid(1.5)
    p0 = n_c / (n_c + n_b)
    k_c = np.arange(total + 1)
    lr = np.exp(conditional_window_log_lr(k_c[:, None], total - k_c[:, None], p0, thetas))
    binomial = stats.binom.pmf(k_c, total, p0) @ lr
    hyper = stats.hypergeom.pmf(k_c, n_c + n_b, n_c, total) @ lr
    np.testing.assert_allclose(binomial, 1.0, rtol=1e-9)
    assert np.all(hyper <= 1.0 + 1e-12)


def test_bernoulli_likelihood_ratio_matches_binomial_pmf_ratio() -> None:
    for direction, p0 in (("above", 0.01), ("below", 0.01), ("above", P95_SLOW_SHARE), ("below", P95_SLOW_SHARE)):
        test = BernoulliSLOTest(p0, direction)
        test.update(3, 400)
        test.update(1, 250)
        expected = stats.binom.logpmf(4, 650, test.alternatives) - stats.binom.logpmf(4, 650, p0)
        np.testing.assert_allclose(test.log_lr(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("direction", "p0", "p_true", "n"),
    [("above", 0.01, 0.03, 3000), ("above", 0.05, 0.10, 2000), ("below", 0.01, 0.001, 3000), ("below", 0.05, 0.01, 1500)],
)
def test_bernoulli_e_process_rejects_when_the_fixed_n_binomial_test_is_overwhelming(
    direction: str, p0: float, p_true: float, n: int
) -> None:
    rng = np.random.default_rng(11)
    alternative = "greater" if direction == "above" else "less"
    overwhelming = 0
    for _ in range(20):
        k = int(rng.binomial(n, p_true))
        fixed_p = stats.binomtest(k, n, p0, alternative=alternative).pvalue
        test = BernoulliSLOTest(p0, direction)
        test.update(k, n)
        if fixed_p < 1e-6:  # overwhelming for the fixed-n test: ours (which may be read at any time) rejects too
            overwhelming += 1
            assert test.log_e >= math.log(1 / 0.01)
    assert overwhelming >= 15  # the cases are clear ones, so the check above is not vacuous


@pytest.mark.parametrize(("direction", "p0"), [("above", 0.01), ("below", 0.01), ("above", 0.05), ("below", 0.05)])
def test_bernoulli_e_process_does_not_reject_data_equal_to_h0(direction: str, p0: float) -> None:
    for n in (100, 1000, 10_000, 100_000):
        k = round(n * p0)
        assert stats.binomtest(k, n, p0).pvalue > 0.5  # the fixed-n test sees nothing either
        test = BernoulliSLOTest(p0, direction)
        test.update(k, n)
        assert test.log_e < math.log(1 / 0.05)


# ------------------------------------------------------------------------------ anytime validity (vectorised)


def crossing_rate(log_lr_increments: np.ndarray, log_bound: float) -> float:
    """Share of runs whose mixture e-process EVER reaches exp(log_bound). Increments: (runs, windows, grid)."""
    paths = np.cumsum(log_lr_increments, axis=1)
    grid = paths.shape[2]
    top = paths.max(axis=2, keepdims=True)
    log_e = top[..., 0] + np.log(np.exp(paths - top).sum(axis=2)) - math.log(grid)
    return float((log_e.max(axis=1) >= log_bound).mean())


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_relative_test_ever_crosses_at_most_alpha_under_equal_rates_with_varying_traffic_split(alpha: float) -> None:
    rng = np.random.default_rng(2024)
    runs, windows = 2000, 300
    thetas = rate_ratio_grid(1.5)
    # Traffic split changes over time (5% -> 25% -> 50% steps plus noise) and the common rate drifts: the test
    # conditions on each window, so neither matters. Bernoulli requests (hypergeometric given the total).
    share = np.repeat([0.05, 0.25, 0.5], windows // 3)
    n = rng.poisson(200, size=(runs, windows))
    n_c = rng.binomial(n, share)
    n_b = n - n_c
    p = 0.01 * (1 + 0.5 * np.sin(np.arange(windows) / 20.0))
    k_c, k_b = rng.binomial(n_c, p), rng.binomial(n_b, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        p0 = np.where(n > 0, n_c / np.maximum(n, 1), 0.0)
    inc = conditional_window_log_lr(k_c[..., None], k_b[..., None], p0[..., None], thetas)
    rate = crossing_rate(inc, math.log(1 / alpha))
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


@pytest.mark.parametrize(("direction", "alpha"), [("above", 0.05), ("above", 0.2), ("below", 0.05), ("below", 0.2)])
def test_slo_tests_ever_cross_at_most_alpha_at_the_boundary(direction: str, alpha: float) -> None:
    rng = np.random.default_rng(7)
    runs, windows, p0 = 2000, 300, 0.05
    test = BernoulliSLOTest(p0, direction)
    n = rng.poisson(20, size=(runs, windows))
    k = rng.binomial(n, p0)  # exactly at the SLO: the hardest null for both directions
    log_fail = np.where(test.alternatives > 0, np.log(np.maximum(test.alternatives, 1e-300) / p0), -np.inf)
    log_ok = np.log1p(-test.alternatives) - math.log1p(-p0)
    with np.errstate(invalid="ignore"):
        inc = np.where(k[..., None] > 0, k[..., None] * log_fail, 0.0) + (n - k)[..., None] * log_ok
    rate = crossing_rate(inc, math.log(1 / alpha))
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_relative_test_is_powerful_against_a_twenty_fold_error_rate() -> None:
    test = RelativeRateTest(1.5)
    # 5 canary errors among 250 requests vs 5 baseline errors among 4750: 20x the rate.
    for _ in range(5):
        test.update(1, 50, 1, 950)
    assert test.log_e >= math.log(1 / (0.4 * 0.01))


# ------------------------------------------------------------------------------------- CanaryAnalysis, simulated


def test_false_rollback_rate_of_healthy_canaries_is_at_most_alpha() -> None:
    rng = np.random.default_rng(101)
    watch_only = Thresholds(steps=(5,), min_requests_per_step=10**12)  # never promotes: watches the whole horizon
    runs = 150
    rollbacks = sum(
        simulate_canary(rng, watch_only, rate=100, p_canary=0.001, p_base=0.001, seconds=900, every=5)[0].decision
        is Decision.ROLLBACK
        for _ in range(runs)
    )
    assert rollbacks / runs <= watch_only.alpha + 3 * math.sqrt(watch_only.alpha / runs)


def test_canary_exactly_at_the_slos_is_rarely_rolled_back_and_rarely_promoted() -> None:
    # Canary and baseline both fail exactly max_error_rate and are slow exactly 5% of the time: every rollback null
    # holds (at its boundary) and so does every promotion null. Larger alphas make the bounds measurable.
    rng = np.random.default_rng(202)
    t = Thresholds(alpha=0.2, promote_alpha=0.2, steps=(10,))
    runs = 150
    decisions = [
        simulate_canary(
            rng, t, rate=100, p_canary=0.01, p_base=0.01, slow_canary=P95_SLOW_SHARE, slow_base=P95_SLOW_SHARE, seconds=600
        )[0].decision
        for _ in range(runs)
    ]
    margin = 3 * math.sqrt(0.2 * 0.8 / runs)
    assert sum(d is Decision.ROLLBACK for d in decisions) / runs <= t.alpha + margin
    assert sum(d is Decision.PROMOTE for d in decisions) / runs <= t.promote_alpha + margin


def test_broken_canary_is_rolled_back_after_a_handful_of_failed_requests() -> None:
    rng = np.random.default_rng(303)
    runs = 200
    outcomes = [simulate_canary(rng, Thresholds(), rate=100, p_canary=0.02, p_base=0.001, seconds=600) for _ in range(runs)]
    rolled_back = [failed for verdict, failed, _ in outcomes if verdict.decision is Decision.ROLLBACK]
    assert len(rolled_back) >= 0.97 * runs
    assert np.median(rolled_back) <= 5
    assert all(v.evidence["fired"] for v, _, _ in outcomes if v.decision is Decision.ROLLBACK)
    # The relative error test is the one that catches it (the SLO test needs far more data at 2% vs 1%).
    assert sum("error_vs_baseline" in v.evidence["fired"] for v, _, _ in outcomes) >= 0.9 * runs


def test_slow_canary_is_rolled_back_by_a_latency_test() -> None:
    rng = np.random.default_rng(404)
    verdict, _, _ = simulate_canary(rng, Thresholds(), rate=100, p_canary=0.001, p_base=0.001, slow_canary=0.3, seconds=600)
    assert verdict.decision is Decision.ROLLBACK
    assert {"latency_vs_baseline", "latency_slo"} & set(verdict.evidence["fired"])


def test_healthy_canary_is_promoted_through_every_step() -> None:
    rng = np.random.default_rng(505)
    runs = 40
    times = []
    for _ in range(runs):
        verdict, _, t = simulate_canary(rng, Thresholds(), rate=100, p_canary=0.001, p_base=0.001, seconds=900)
        assert verdict.decision is not Decision.ROLLBACK
        if verdict.decision is Decision.PROMOTE:
            assert verdict.percent == 100
            times.append(t)
    assert len(times) >= 0.95 * runs
    assert np.median(times) <= 180


def test_steps_advance_in_order_and_need_min_requests() -> None:
    t = Thresholds(steps=(5, 25, 50), min_requests_per_step=2000)
    a = CanaryAnalysis(t, started_at=0.0)
    clean = WindowCounts(500, 0, 0, 9500, 5, 5)
    seen = []
    now = 0.0
    for _ in range(20):
        now += 5
        v = a.observe(clean, now)
        seen.append((v.decision, v.percent))
        if v.decision is Decision.PROMOTE:
            break
    # 2000 requests per step at 500 per window: each step needs 4 windows even though the SLO evidence is there.
    assert seen[:3] == [(Decision.CONTINUE, 5)] * 3
    assert seen[3] == (Decision.CONTINUE, 25)
    assert seen[7] == (Decision.CONTINUE, 50)
    assert seen[11] == (Decision.PROMOTE, 100)
    assert a.percent == 100 and a.finished


# ------------------------------------------------------------------------------------------------- missing data


def test_missing_data_holds_then_rolls_back_after_the_deadline() -> None:
    t = Thresholds(no_data_deadline_s=60)
    a = CanaryAnalysis(t, started_at=1000.0)
    v = a.observe(WindowCounts(50, 0, 0, 950, 1, 1), 1005.0)
    assert v.decision is Decision.CONTINUE
    v = a.observe(None, 1030.0)
    assert (v.decision, v.percent) == (Decision.HOLD, 5)
    v = a.observe(WindowCounts(0, 0, 0, 1000, 1, 1), 1060.0)  # no canary requests counts as missing too
    assert v.decision is Decision.HOLD
    v = a.observe(None, 1065.0)  # exactly 60 s since the last good window: still holding
    assert v.decision is Decision.HOLD
    v = a.observe(None, 1066.0)
    assert (v.decision, v.percent) == (Decision.ROLLBACK, 0)
    assert v.evidence["fired"] == ["no_data_deadline"]
    # Terminal decisions stick, whatever comes next.
    assert a.observe(WindowCounts(50, 0, 0, 950, 0, 0), 1070.0) is v


def test_missing_data_from_the_start_counts_from_started_at_and_good_data_resets_the_clock() -> None:
    a = CanaryAnalysis(Thresholds(no_data_deadline_s=30), started_at=0.0)
    assert a.observe(None, 20.0).decision is Decision.HOLD
    assert a.observe(WindowCounts(10, 0, 0, 190, 0, 0), 25.0).decision is Decision.CONTINUE
    assert a.observe(None, 50.0).decision is Decision.HOLD  # 25 s since the last good window
    assert a.observe(None, 56.0).decision is Decision.ROLLBACK


def test_missing_data_is_never_promoted() -> None:
    a = CanaryAnalysis(Thresholds(steps=(50,), min_requests_per_step=1), started_at=0.0)
    decisions = {a.observe(None, float(s)).decision for s in range(0, 121, 10)}
    assert decisions == {Decision.HOLD}


# ------------------------------------------------------------------------------------ configuration and evidence


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_error_rate": 0.0}, "max_error_rate"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"max_p95_latency_s": -1.0}, "max_p95_latency_s"),
        ({"max_p95_latency_s": math.inf}, "max_p95_latency_s"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 0.6}, "alpha"),
        ({"promote_alpha": 1.0}, "promote_alpha"),
        ({"min_rate_ratio": 1.0}, "min_rate_ratio"),
        ({"min_rate_ratio": 500.0}, "min_rate_ratio"),
        ({"steps": ()}, "steps"),
        ({"steps": (5, 5, 50)}, "steps"),
        ({"steps": (50, 25)}, "steps"),
        ({"steps": (0, 50)}, "steps"),
        ({"steps": (5, 150)}, "steps"),
        ({"steps": [5, 25]}, "steps"),
        ({"steps": (5.0, 25)}, "steps"),
        ({"min_requests_per_step": 0}, "min_requests_per_step"),
        ({"min_requests_per_step": 1.5}, "min_requests_per_step"),
        ({"no_data_deadline_s": 0}, "no_data_deadline_s"),
        ({"no_data_deadline_s": math.nan}, "no_data_deadline_s"),
    ],
)
def test_bad_thresholds_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Thresholds(**kwargs)


@pytest.mark.parametrize(
    ("counts", "field"),
    [
        ((-1, 0, 0, 10, 0, 0), "canary_requests"),
        ((10, 11, 0, 10, 0, 0), "canary_errors"),
        ((10, 0, 0, 10, 0, 12), "baseline_slow"),
    ],
)
def test_bad_window_counts_raise_value_error(counts: tuple, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        WindowCounts(*counts)


def test_every_verdict_evidence_is_strict_json() -> None:
    a = CanaryAnalysis(Thresholds(), started_at=0.0)
    verdicts = [a.observe(None, 1.0), a.observe(WindowCounts(100, 0, 0, 1900, 2, 3), 5.0)]
    verdicts.append(a.observe(WindowCounts(1000, 900, 900, 19000, 1, 1), 10.0))  # astronomically large e-values
    assert verdicts[-1].decision is Decision.ROLLBACK
    for v in verdicts:
        text = json.dumps(v.evidence, allow_nan=False)
        back = json.loads(text)
        assert back["thresholds"]["steps"] == [5, 25, 50]
        assert set(back["e_values"]) >= {"error_vs_baseline", "latency_vs_baseline", "error_slo", "latency_slo"}
        assert isinstance(v.reason, str) and v.reason.endswith(".")
    final = json.loads(json.dumps(verdicts[-1].evidence))
    assert final["cumulative"]["canary_errors"] == 900
    assert final["e_values"]["error_vs_baseline"] >= final["e_value_thresholds"]["error_vs_baseline"]
    assert final["final"] == "rollback"
