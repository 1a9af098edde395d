"""A/B statistics: the fixed-horizon z-test and sample size against statsmodels, the mSPRT's closed form against
numerical integration, and seeded simulations of continuous monitoring.

The key simulation shows the bug of the guide we replace: reading a fixed-horizon z-test after every batch and
stopping at the first p < 0.05 gives far more than 5% false positives, while the always-valid mSPRT p-value,
read after every batch on the very same data, stays below 5%. Simulations are vectorised with numpy and seeded.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize, proportions_ztest

from mlops_assets.core.rollout.ab import (
    KEEP_A,
    NO_DIFFERENCE_YET,
    SHIP_B,
    ABTest,
    msprt_log_lambda,
    msprt_p_value,
    planned_sample_size,
    two_proportion_ztest,
)


@pytest.mark.parametrize(
    ("s_a", "n_a", "s_b", "n_b"),
    [
        (50, 1000, 65, 1000),
        (500, 10000, 480, 9000),
        (3, 40, 9, 45),
        (120, 130, 100, 130),
        (0, 100, 2, 100),
        (1000, 20000, 1100, 20000),
    ],
)
def test_two_proportion_ztest_matches_statsmodels(s_a: int, n_a: int, s_b: int, n_b: int) -> None:
    z, p = two_proportion_ztest(s_a, n_a, s_b, n_b)
    # statsmodels computes (p1 - p2) / se; ours is B - A, so B goes first.
    z_sm, p_sm = proportions_ztest([s_b, s_a], [n_b, n_a])
    assert z == pytest.approx(z_sm, rel=1e-9)
    assert p == pytest.approx(p_sm, rel=1e-9, abs=1e-15)


def test_two_proportion_ztest_without_variance_is_no_evidence() -> None:
    assert two_proportion_ztest(0, 100, 0, 100) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes_b"):
        two_proportion_ztest(1, 10, 11, 10)


@pytest.mark.parametrize(
    ("base", "lift", "alpha", "power"),
    [(0.05, 0.10, 0.05, 0.8), (0.10, 0.05, 0.05, 0.9), (0.02, 0.25, 0.01, 0.8), (0.30, -0.10, 0.05, 0.8), (0.5, 0.02, 0.1, 0.95)],
)
def test_planned_sample_size_matches_statsmodels_normal_ind_power(base: float, lift: float, alpha: float, power: float) -> None:
    h = proportion_effectsize(base * (1 + lift), base)
    expected = NormalIndPower().solve_power(effect_size=h, alpha=alpha, power=power, ratio=1.0, alternative="two-sided")
    n = planned_sample_size(base, lift, alpha, power)
    assert abs(n - math.ceil(expected)) <= 1
    assert n >= expected - 1e-6  # rounded up: at least the power asked for


def test_planned_sample_size_rejects_bad_input() -> None:
    for kwargs, field in (
        ({"base_rate": 0.0, "lift": 0.1}, "base_rate"),
        ({"base_rate": 0.5, "lift": 1.5}, "lift"),
        ({"base_rate": 0.1, "lift": 0.0}, "lift"),
    ):
        with pytest.raises(ValueError, match=field):
            planned_sample_size(**kwargs)


@pytest.mark.parametrize(
    ("s_a", "n_a", "s_b", "n_b", "tau2"),
    [(500, 10000, 560, 10000, 2.5e-5), (40, 800, 30, 700, 1e-4), (100, 1000, 100, 1000, 1e-3)],
)
def test_msprt_closed_form_matches_numerical_mixture_integral(s_a: int, n_a: int, s_b: int, n_b: int, tau2: float) -> None:
    # Lambda = integral of N(d; theta, V) / N(d; 0, V) against the prior N(theta; 0, tau2).
    pooled = (s_a + s_b) / (n_a + n_b)
    v = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    d = s_b / n_b - s_a / n_a
    sd = math.sqrt(tau2)

    def integrand(theta: float) -> float:
        return math.exp((d * theta - theta**2 / 2) / v) * stats.norm.pdf(theta, 0, sd)

    value, _ = integrate.quad(integrand, -12 * sd, 12 * sd, points=[0.0, d], limit=200)
    assert float(msprt_log_lambda(s_a, n_a, s_b, n_b, tau2)) == pytest.approx(math.log(value), rel=1e-6, abs=1e-9)


def simulate_cumulative(rng: np.random.Generator, p_a: float, p_b: float, runs: int, looks: int, batch: int) -> tuple:
    s_a = np.cumsum(rng.binomial(batch, p_a, size=(runs, looks)), axis=1)
    s_b = np.cumsum(rng.binomial(batch, p_b, size=(runs, looks)), axis=1)
    return s_a, s_b, batch * np.arange(1, looks + 1)


def test_continuous_monitoring_msprt_keeps_false_positives_below_alpha_while_peeked_z_test_does_not() -> None:
    rng = np.random.default_rng(12345)
    runs, looks, batch = 2000, 400, 100  # looks after every 100 users per arm, up to 40,000 per arm
    s_a, s_b, n = simulate_cumulative(rng, 0.05, 0.05, runs, looks, batch)
    ab = ABTest()  # defaults: planned for a 10% lift on 5%
    p = msprt_p_value(s_a, n, s_b, n, ab.tau2, ab.min_samples)
    msprt_fpr = float((p.min(axis=1) <= 0.05).mean())
    pooled = (s_a + s_b) / (2 * n)
    with np.errstate(invalid="ignore", divide="ignore"):  # no success yet in either arm: 0/0, counted as no rejection
        z = np.nan_to_num((s_b - s_a) / n / np.sqrt(pooled * (1 - pooled) * 2 / n))
    naive_fpr = float((np.abs(z) > stats.norm.ppf(0.975)).any(axis=1).mean())
    assert msprt_fpr <= 0.05
    assert naive_fpr > 0.15  # the guide's bug: peeking at a fixed-horizon test
    # The p-value is a running minimum: it never goes back up.
    assert np.all(np.diff(p, axis=1) <= 0)


def test_msprt_finds_a_real_lift_with_about_the_fixed_sample_size() -> None:
    rng = np.random.default_rng(777)
    base, lift = 0.10, 0.30  # a larger effect than production's default keeps the test fast
    n_fixed = planned_sample_size(base, lift)
    looks, batch = 8 * n_fixed // 50, 50
    s_a, s_b, n = simulate_cumulative(rng, base, base * (1 + lift), 1000, looks, batch)
    tau2 = (base * lift) ** 2
    hit = msprt_p_value(s_a, n, s_b, n, tau2) <= 0.05
    assert hit.any(axis=1).mean() >= 0.99
    first = hit.argmax(axis=1)
    assert n[first].mean() / n_fixed <= 1.3
    assert np.all(s_b[np.arange(1000), first] > s_a[np.arange(1000), first])  # stops in the right direction


def test_ab_test_recommendations_and_confidence_sequence() -> None:
    ab = ABTest(base_rate=0.05, lift=0.10)
    assert ab.recommendation().decision == NO_DIFFERENCE_YET
    rng = np.random.default_rng(99)
    s_a = s_b = n = 0
    p_values = []
    for _ in range(300):
        n += 500
        s_a += int(rng.binomial(500, 0.05))
        s_b += int(rng.binomial(500, 0.065))  # +30%: found quickly
        p_values.append(ab.update(s_a, n, s_b, n))
    assert all(b <= a for a, b in zip(p_values, p_values[1:], strict=False))
    rec = ab.recommendation()
    assert rec.decision == SHIP_B
    lo, hi = ab.confidence_interval
    assert 0 < lo <= 0.015 <= hi
    ev = json.loads(json.dumps(rec.evidence, allow_nan=False))
    assert ev["always_valid_p_value"] <= 0.05 and ev["planned_n_per_arm"] == planned_sample_size(0.05, 0.10)

    worse = ABTest(base_rate=0.05, lift=0.10)
    s_a = s_b = n = 0
    for _ in range(300):
        n += 500
        s_a += int(rng.binomial(500, 0.065))
        s_b += int(rng.binomial(500, 0.05))
        worse.update(s_a, n, s_b, n)
    assert worse.recommendation().decision == KEEP_A


def test_ab_confidence_sequence_covers_the_true_difference_at_all_looks() -> None:
    rng = np.random.default_rng(4242)
    runs, misses = 200, 0
    for _ in range(runs):
        ab = ABTest(alpha=0.05, base_rate=0.2, lift=0.1)
        s_a = s_b = n = 0
        for _ in range(60):
            n += 200
            s_a += int(rng.binomial(200, 0.20))
            s_b += int(rng.binomial(200, 0.22))
            ab.update(s_a, n, s_b, n)
            lo, hi = ab.confidence_interval
            if not lo <= 0.02 <= hi:
                misses += 1
                break
    assert misses / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_ab_test_accepts_empty_arms_and_rejects_decreasing_or_inconsistent_counts() -> None:
    ab = ABTest()
    assert ab.update(0, 0, 0, 0) == 1.0  # a job may look before the first outcome arrives
    assert ab.recommendation().decision == NO_DIFFERENCE_YET
    ab.update(10, 200, 12, 200)
    with pytest.raises(ValueError, match="cumulative"):
        ab.update(9, 300, 15, 300)
    with pytest.raises(ValueError, match="successes_a"):
        ab.update(400, 300, 15, 300)
    with pytest.raises(ValueError, match="tau2"):
        ABTest(tau2=-1.0)
