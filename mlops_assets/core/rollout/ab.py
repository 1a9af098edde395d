"""A/B test on a success metric (e.g. conversions): an always-valid p-value that may be checked continuously.

Why: a fixed-horizon two-proportion z-test is valid only when looked at once, at the planned sample size;
an A/B test watched continuously (say every hour) and stopped the first time p < 0.05 turns a 5%
false-positive rate into 30-40%. We keep that z-test (for the planned sample size, and for reports) and
add the mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis and Walsh, "Always
valid inference" (2017; Operations Research 2022), whose p-value may be checked after every batch and the
experiment stopped whenever it crosses alpha.

mSPRT for the difference of two proportions. theta = p_b - p_a, estimated by d_n = p_b_hat - p_a_hat with
variance V_n (below). Under the normal approximation d_n ~ N(theta, V_n); the likelihood ratio of theta
against theta0 = 0, mixed over the prior theta ~ N(0, tau2), has the closed form
    Lambda_n = sqrt(V_n / (V_n + tau2)) * exp(tau2 d_n^2 / (2 V_n (V_n + tau2))).
Lambda_n is (asymptotically) a martingale under H0: theta = 0, so by Ville P(exists n: Lambda_n >= 1/alpha)
<= alpha and the always-valid p-value p_n = min(p_{n-1}, 1 / Lambda_n), p_0 = 1, may be monitored at will.
Under H0 the variance is the pooled one, V_n = p_bar (1 - p_bar) (1/n_a + 1/n_b), as in the pooled z-test;
it is also the more conservative choice when one arm has few successes.
Normal approximation: early on, with a handful of successes, it is poor; looks before `min_samples` per arm
are skipped (Lambda = 1). Skipping looks can only lower the false-positive rate; the simulation in
bench/abtest.py checks the rate with looks after every batch of 100 users per arm from there on.

Confidence sequence: inverting Lambda_n(theta0) < 1/alpha gives, at every n, the interval
    d_n +- sqrt(V_n (V_n + tau2) / tau2 * (2 ln(1/alpha) + ln((V_n + tau2) / V_n)))
(with the unpooled V_n = p_a(1-p_a)/n_a + p_b(1-p_b)/n_b, since theta0 need not be 0), and their running
intersection covers theta at all times with probability >= 1 - alpha (asymptotically).

Choice of tau2: it sets the effect size the test is tuned for. With the planned absolute effect
delta = base_rate * lift, the crossing point of the mean path is where x = n delta^2 / sigma^2 solves
x = (1 + 1/(x r)) (2 ln(1/alpha) + ln(1 + x r)) for r = tau2 / delta^2; that is minimised near r = 1,
where x ~ 9.3 against 7.85 = (z_{0.975} + z_{0.8})^2 for the fixed-horizon test at 80% power. Random paths
that run ahead cross earlier, so the mean sample size ends close to the fixed n (see bench/abtest.py,
which measures it), while the fixed test has only 80% power at n and the mSPRT keeps going until it decides.
Default: tau2 = (base_rate * lift)^2.

Fixed-horizon sample size: per arm, n = (1 + 1/ratio) ((z_{1-alpha/2} + z_{power}) / h)^2 with Cohen's
arcsine effect size h = 2 asin(sqrt(p2)) - 2 asin(sqrt(p1)) (the variance-stabilising transform), which is
what statsmodels' NormalIndPower with proportion_effectsize solves (up to the negligible far-tail power).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import norm

from mlops_assets.core.rollout.policy import RolloutPolicy

SHIP_B = "ship_b"
KEEP_A = "keep_a"
NO_DIFFERENCE_YET = "no_difference_yet"
#: The policy's A/B defaults (ab_alpha, ab_base_rate, ab_min_lift) are the test's.
_POLICY = RolloutPolicy()


def two_proportion_ztest(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """Pooled two-sided z-test of p_a = p_b. z > 0 when B's rate is higher. Valid for ONE look at a planned n.

    (0.0, 1.0) when the pooled rate is 0 or 1 (no variance, no evidence).
    """
    _check_counts(successes_a, n_a, "a")
    _check_counts(successes_b, n_b, "b")
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b))
    if se == 0.0:
        return 0.0, 1.0
    z = (successes_b / n_b - successes_a / n_a) / se
    return z, float(2.0 * norm.sf(abs(z)))


def planned_sample_size(base_rate: float, lift: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Users per arm for the fixed-horizon two-sided test to detect p_b = base_rate * (1 + lift) (arcsine formula)."""
    if not 0.0 < base_rate < 1.0:
        raise ValueError(f"base_rate must be in (0, 1), got {base_rate!r}")
    target = base_rate * (1.0 + lift)
    if lift == 0 or not 0.0 < target < 1.0:
        raise ValueError(f"lift must be non-zero with base_rate * (1 + lift) in (0, 1), got {lift!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    h = 2.0 * math.asin(math.sqrt(target)) - 2.0 * math.asin(math.sqrt(base_rate))
    z = norm.ppf(1.0 - alpha / 2.0) + norm.ppf(power)
    return math.ceil(2.0 * (z / h) ** 2)


def msprt_log_lambda(successes_a: Any, n_a: Any, successes_b: Any, n_b: Any, tau2: float) -> np.ndarray:
    """log Lambda_n of the normal-mixture SPRT for p_b - p_a = 0 (pooled variance). Vectorised over cumulative counts."""
    s_a, n_a, s_b, n_b = (np.asarray(x, dtype=float) for x in (successes_a, n_a, successes_b, n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (s_a + s_b) / (n_a + n_b)
        v = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
        d = s_b / n_b - s_a / n_a
        out = 0.5 * np.log(v / (v + tau2)) + tau2 * d * d / (2.0 * v * (v + tau2))
    # No variance yet (no success or no failure at all): no evidence either way.
    return np.where((v > 0) & np.isfinite(out), out, 0.0)


def msprt_p_value(successes_a: Any, n_a: Any, successes_b: Any, n_b: Any, tau2: float, min_samples: int = 100) -> np.ndarray:
    """Always-valid p-values for a sequence of looks (cumulative counts along the last axis): running min of 1/Lambda.

    Looks with fewer than `min_samples` users in either arm are skipped (p stays 1 there).
    """
    log_lam = msprt_log_lambda(successes_a, n_a, successes_b, n_b, tau2)
    ready = (np.asarray(n_a) >= min_samples) & (np.asarray(n_b) >= min_samples)
    p = np.minimum(1.0, np.exp(-np.where(ready, log_lam, 0.0)))
    return np.minimum.accumulate(p, axis=-1)


def _check_counts(successes: int, n: int, arm: str, allow_empty: bool = False) -> None:
    for name, value in ((f"successes_{arm}", successes), (f"n_{arm}", n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if n == 0 and not allow_empty:
        raise ValueError(f"n_{arm} must be positive")
    if successes > n:
        raise ValueError(f"successes_{arm} ({successes}) must not exceed n_{arm} ({n})")


@dataclass(frozen=True)
class ABRecommendation:
    decision: str  # "ship_b", "keep_a" or "no_difference_yet"
    reason: str
    evidence: dict = field(default_factory=dict)  # JSON-serialisable


class ABTest:
    """Continuously monitored A/B test on cumulative success counts (A = control, B = treatment)."""

    def __init__(
        self,
        tau2: float | None = None,
        alpha: float = _POLICY.ab_alpha,
        base_rate: float = _POLICY.ab_base_rate,
        lift: float = _POLICY.ab_min_lift,
        min_samples: int = 100,
        power: float = 0.8,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if tau2 is not None and not (math.isfinite(tau2) and tau2 > 0):
            raise ValueError(f"tau2 must be positive, got {tau2!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be an integer >= 1, got {min_samples!r}")
        self.alpha = alpha
        self.base_rate = base_rate
        self.lift = lift
        self.min_samples = min_samples
        self.planned_n = planned_sample_size(base_rate, lift, alpha, power)  # also validates base_rate and lift
        self.tau2 = tau2 if tau2 is not None else (base_rate * lift) ** 2
        self.counts = (0, 0, 0, 0)
        self.looks = 0
        self.p_value = 1.0
        self.log_lambda = 0.0
        self.max_log_lambda = 0.0
        self.confidence_interval = (-1.0, 1.0)  # always-valid interval for p_b - p_a (running intersection)

    def update(self, successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
        """Take CUMULATIVE counts of both arms; returns the always-valid p-value (never increases).

        Arms without users yet (n = 0) are accepted: a job polling outcomes may look before the first one arrives.
        """
        _check_counts(successes_a, n_a, "a", allow_empty=True)
        _check_counts(successes_b, n_b, "b", allow_empty=True)
        new = (int(successes_a), int(n_a), int(successes_b), int(n_b))
        old = self.counts
        if new[1] < old[1] or new[3] < old[3] or new[0] < old[0] or new[2] < old[2]:
            raise ValueError(f"counts are cumulative and must not decrease: {old} -> {new}")
        self.counts = new
        self.looks += 1
        if n_a < self.min_samples or n_b < self.min_samples:
            return self.p_value
        self.log_lambda = float(msprt_log_lambda(successes_a, n_a, successes_b, n_b, self.tau2))
        self.max_log_lambda = max(self.max_log_lambda, self.log_lambda)
        self.p_value = min(self.p_value, math.exp(-self.log_lambda)) if self.log_lambda > 0 else self.p_value
        pa, pb = successes_a / n_a, successes_b / n_b
        v = pa * (1 - pa) / n_a + pb * (1 - pb) / n_b
        if v > 0:
            half = math.sqrt(v * (v + self.tau2) / self.tau2 * (2 * math.log(1 / self.alpha) + math.log((v + self.tau2) / v)))
            lo, hi = self.confidence_interval
            self.confidence_interval = (max(lo, pb - pa - half), min(hi, pb - pa + half))
        return self.p_value

    def recommendation(self) -> ABRecommendation:
        s_a, n_a, s_b, n_b = self.counts
        rate_a = s_a / n_a if n_a else None
        rate_b = s_b / n_b if n_b else None
        diff = rate_b - rate_a if rate_a is not None and rate_b is not None else None
        z, p_fixed = two_proportion_ztest(s_a, n_a, s_b, n_b) if n_a and n_b else (0.0, 1.0)
        lo, hi = self.confidence_interval
        evidence = {
            "successes_a": s_a,
            "n_a": n_a,
            "successes_b": s_b,
            "n_b": n_b,
            "rate_a": rate_a,
            "rate_b": rate_b,
            "difference": diff,
            "always_valid_p_value": self.p_value,
            "confidence_sequence": [lo, hi],
            "log_lambda": self.log_lambda,
            "tau2": self.tau2,
            "alpha": self.alpha,
            "looks": self.looks,
            "min_samples": self.min_samples,
            "planned_n_per_arm": self.planned_n,
            "planned_for": {"base_rate": self.base_rate, "lift": self.lift},
            # The fixed-horizon test is reported for comparison; it is valid only when read once at the planned n.
            "fixed_horizon_z": z,
            "fixed_horizon_p": p_fixed,
            "fixed_horizon_valid_now": n_a >= self.planned_n and n_b >= self.planned_n,
        }
        if self.p_value <= self.alpha and diff is not None and diff != 0:
            decision = SHIP_B if diff > 0 else KEEP_A
            better, worse = ("B", "A") if diff > 0 else ("A", "B")
            reason = (
                f"{better} converts better than {worse}: {rate_b:.4%} (B) vs {rate_a:.4%} (A), always-valid p = "
                f"{self.p_value:.3g} <= {self.alpha:g}, difference in [{lo:+.4%}, {hi:+.4%}]."
            )
        else:
            decision = NO_DIFFERENCE_YET
            reason = (
                f"No significant difference yet after {n_a} + {n_b} users: always-valid p = {self.p_value:.3g} > "
                f"{self.alpha:g}; keep collecting (planned fixed-horizon n is {self.planned_n} per arm)."
            )
        return ABRecommendation(decision, reason, evidence)
