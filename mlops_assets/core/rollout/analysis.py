"""Canary analysis with anytime-valid sequential tests: continue, promote, roll back or hold.

Why this design
---------------
A canary analysis looks at the data again and again (every few seconds) and stops as soon as it
knows. A fixed-horizon test (a two-proportion z-test) or a threshold per interval (Flagger) is not
valid under that kind of peeking: the more often one looks, the more often noise alone crosses
the line, so healthy canaries get rolled back and the only cure is to look rarely, which lets a broken
canary fail many user requests first. We use *e-processes* instead: non-negative processes E_t with
E_0 = 1 that are supermartingales (or bounded by one) under the null hypothesis. Ville's inequality gives
P(exists t: E_t >= 1/alpha) <= alpha, so the analysis may look after every window, forever, and stop
at any data-dependent time while the error probability stays below alpha. All inputs are *counts* per
window (requests, errors, slow requests), so each test is an exact likelihood-ratio construction; no
normal approximation and no warm-up period are needed, and a few errors are enough to decide.

Rollback tests (H0: "the canary is as good as the baseline and within its SLOs")
---------------------------------------------------------------------------------
(a) Error rate relative to baseline, two-sample, conditional on events. In one window with n_c canary and
    n_b baseline requests and K = k_c + k_b errors, if both revisions fail at the same per-request rate
    then, given K, every error is a canary error with probability p0 = n_c / (n_c + n_b) (exactly so for
    Poisson counts). If the canary's rate is theta times the baseline's, that probability is
    q = p0 theta / (p0 theta + 1 - p0). The window's likelihood ratio is
        LR_w(theta) = q^k_c (1-q)^k_b / (p0^k_c (1-p0)^k_b) = theta^k_c / (1 + p0 (theta - 1))^K,
    which does not involve the unknown baseline rate: nothing about the baseline has to be known.
    Validity: E[LR_w | past, n_c, n_b, K] = 1 under Binomial(K, p0); a canary that is *better* than the
    baseline makes k_c stochastically smaller and theta^k_c increasing, so E <= 1 (composite H0:
    canary rate <= baseline rate). With Bernoulli requests instead of Poisson counts, k_c given K is
    hypergeometric, which is smaller than Binomial(K, p0) in the convex order (Hoeffding 1963) while
    x -> theta^x is convex, so E <= 1 still. p0 may change from window to window (traffic steps,
    jitter) because each factor is conditioned on its own window. The product over windows is therefore
    a test supermartingale for every theta, and so is any fixed mixture of them:
        E_t = sum_j w_j prod_w LR_w(theta_j),  theta_j geometric from min_rate_ratio to 100, w_j = 1/J.
    The grid spacing is a factor of about 1.6: the growth rate of the best grid point is within a few
    percent of the true theta's, and each point carries 1/J of the prior, which costs ln J nats of
    evidence (J = 10 for min_rate_ratio 1.5: 2.3 nats, about one and a half canary errors' worth when the
    canary fails 20x more often at a 5% share) in exchange for not having to guess theta.
(b) The same test on slow requests (latency above the p95 threshold): canary latency against baseline.
(c) Absolute error SLO, one sample: H0: p <= max_error_rate. For an alternative p1 > p0 the
    likelihood ratio (p1/p0)^k ((1-p1)/(1-p0))^(n-k) has expectation <= 1 for every p <= p0 (it is
    linear in p, increasing, and equal to 1 at p0). Mixture over p1 on a geometric grid of odds ratios
    from 1.5 to 1000 (p1 stays inside (p0, 1)), equal weights.
(d) Absolute latency SLO, the same one-sample test on the slow share: "p95 <= max_p95_latency_s" is
    "P(slow) <= 0.05". The caller derives "slow" from the latency histogram and max_p95_latency_s
    (the threshold is recorded here in the evidence only).
A ROLLBACK is issued as soon as any of the rollback e-processes ((a)-(f)) reaches its Bonferroni threshold
1/(share_i alpha), with shares summing to one (see ROLLBACK_ALPHA_SHARES), so the probability of ever
rolling back a canary that is as good as the baseline and within its SLOs is at most alpha, however the
windows are sized and however long the rollout runs. Each test on its own also controls its own null at
share_i alpha (e.g. a canary as good as a baseline that itself breaks the SLO is rolled back by (a) with
probability at most share_a alpha, and correctly by (c) otherwise). The rollback e-processes run over the
whole rollout (not per step): restarting them per step would spend alpha once per step. The cost is
that evidence for "healthy" gathered at early steps must be overcome by a failure that appears only at a
later step; the mixture keeps this small because its low-theta components barely move under healthy
data.

Promotion tests (H0': "the canary violates an SLO")
--------------------------------------------------
A step passes when, on the requests served *at this step* (fresh e-processes at every step, so each
traffic level has to show compliance on its own traffic), both
    error_slo_met:   H0': p >= max_error_rate       (one-sample, alternatives p1 = p0 * r, r < 1)
    latency_slo_met: H0': P(slow) >= 0.05
are rejected at promote_alpha, the step has at least min_requests_per_step canary requests, and no
rollback test fired. The alternatives are r in (0, 1/20, 1/10, 1/5, 2/5, 7/10), equal weights; r = 0
is the "no failures at all" bet, which promotes a clean canary after about ln(6/promote_alpha)/p0
requests and drops out at its first failure. A canary is promoted only if *both* nulls are rejected, so
this is an intersection-union test (Berger 1982): a canary that violates either SLO is promoted with
probability at most promote_alpha without splitting promote_alpha between the two tests, because the
promotion event is contained in "the e-process of the violated SLO crossed 1/promote_alpha", whose
probability Ville bounds by promote_alpha (for a step started at a stopping time, too).

Low traffic
-----------
At a few requests per second the declared steps (5/25/50%, each proving the SLOs on its own traffic) take hours:
at 2 req/s a 5% canary gets one request every 10 s. The budget there is users exposed, not time. Once the request
rate is known (MIN_RATE_ESTIMATE_S of data, at the first step), if the declared steps would take longer than
decision_budget_s, they are replaced by ONE step whose share gets the canary requests a promotion needs (the clean
requests of the r = 0 bet) within the budget, capped at max_low_traffic_percent; the evidence gathered so far is
kept. The evidence reports the schedule and expected_decision_s, the expected time to promotion at the observed
rate if the canary keeps its observed rates. The share is raised only when the baseline's record is long enough
(RECORD_FACTOR x those requests), because at a large share the concurrent test (a) is slow: each canary error is
a coin flip when the canary serves half the traffic (at 2 req/s a canary failing 2% of requests would fail about
11 requests before (a) fires at 50%, 5 at 5%). What carries the comparison then is
(e) error_vs_baseline_record: H0: the canary's error rate <= the baseline's, the baseline having one rate over its
    record (what it served before the canary started, e.g. its counters at deployment, plus what it serves during
    the rollout). Universal inference (Wasserman, Ramdas, Balakrishnan 2020): numerator a fixed mixture over
    (baseline rate b on RECORD_RATE_GRID, canary rate theta b) of the joint likelihood, denominator the maximum
    likelihood under H0. For the true null rates, the numerator over their likelihood is a martingale with mean
    <= 1 (the record is its first observation), and the denominator is at least that likelihood, so Ville's bound
    holds. It assumes the baseline's rate is stationary over its record (the concurrent test (a) does not); as a
    guard, (e) fires only if the canary's observed rate during the rollout is also above min_rate_ratio times the
    baseline's during it, so a surge that hits both revisions now is not blamed on the canary (an extra condition
    only removes rollbacks).

Shadow evidence
---------------
A canary that follows a shadow phase of the same revision (`shadow_then_canary`) starts its first step's promotion
tests from what the shadow counted (`carry_slo_proof`): the candidate answered mirrored copies of the same live
traffic, so under H0' (it violates an SLO) the product of the per-request likelihood ratios over both phases is still
a test supermartingale and the intersection-union bound holds (the argument of blue-green's `PostSwitchAnalysis`).
What the first step then waits for is users exposed, not proof: min_requests_per_step canary requests with no
rollback test firing (the rollback tests start with the canary, on its own traffic, as always), and at low traffic
its share is sized for those requests instead of the clean requests a proof from nothing needs. Later steps prove
the SLOs on their own traffic as before.

Relative latency
----------------
(f) latency_tail_vs_baseline: the canary's latency is judged against the baseline's distribution with a declared
    tolerance: p95 at most latency_ratio_tolerance x the baseline's + latency_margin_s. Latencies come as histogram
    buckets, so the test works on bucket counts: before each window (from the baseline's past windows, so the
    choice is predictable) x is the smallest bucket bound with at most 5% of the baseline above it (its p95
    bucket) and y the smallest bound >= ratio x + margin. H0: P(canary > y) <= P(baseline > x), implied by
    "above the baseline's p95, the canary's latency is within ratio x + margin of the baseline's" (the tolerance
    taken over the tail, which gives the p95 statement at x >= p95). Test: the conditional two-sample test (a) on
    the events "canary above y" and "baseline above x". No estimate of the baseline's quantile enters the null:
    x is only chosen from the past, and any predictable choice keeps every window's ratio a valid e-value, so the
    estimated quantile costs no validity. Rounding y up to a bound is conservative. Promotion waits for
    latency_tail_met, wherever both revisions report histograms: the canary's share above y credibly below 5%
    (its p95 at most y, the tolerance over the baseline's p95 bucket), a one-sample test that, unlike a
    comparison with the baseline's share above x, can pass when no baseline request lies above x.

Missing data is never success: a window of None, or with zero canary requests, changes no evidence; the
analysis HOLDs (traffic unchanged) while the last good window is at most no_data_deadline_s old and
ROLLs BACK after that.

bench/canary.py simulates bad and healthy canaries with the default `Thresholds`, a Flagger-like
per-interval threshold and 10-minute averages on the same requests: failed requests before a rollback,
false rollbacks of healthy canaries, time to promotion (figures in bench/RESULTS.md).

Assumptions: within a window, requests of one revision fail independently with a common probability
(the rate may drift between windows for the relative tests; drift of the canary's own rate between
windows is covered by the one-sample tests as long as it stays on one side of the SLO). Windows must
contain *new* counts (differences of cumulative counters), never overlapping ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from mlops_assets.core.rollout.policy import RolloutPolicy

# p95 <= threshold  <=>  P(latency > threshold) <= 5%.
P95_SLOW_SHARE = 0.05
# Top of the rate-ratio grid: a canary 100x worse than baseline is already detected by the grid's top point
# after a couple of errors; going higher would add grid points (and their ln J cost) for no gain.
MAX_RATE_RATIO = 100.0
RATE_RATIO_GRID_STEP = 1.6
# Odds-ratio alternatives of the absolute (one-sample) rollback tests: from 1.5x the SLO's odds upwards.
SLO_ODDS_RATIOS = (1.5, 2.5, 4.0, 6.5, 10.5, 17.0, 28.0, 45.0, 75.0, 1000.0)
# Alternatives of the promotion tests, as fractions of the SLO rate.
SLO_MET_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7)
# Bonferroni shares of alpha for the rollback tests. The relative error test gets the largest share because
# it is the fastest detector of the common failure (a broken model throwing errors) and its speed is what the
# number of failed user requests depends on; the shares sum to one.
ROLLBACK_ALPHA_SHARES: Mapping[str, float] = {
    "error_vs_baseline": 0.3,
    "error_vs_baseline_record": 0.3,
    "latency_vs_baseline": 0.1,
    "latency_tail_vs_baseline": 0.1,
    "error_slo": 0.1,
    "latency_slo": 0.1,
}
# Grid of baseline error rates for the baseline-record test's mixture (log-uniform, about 1.3x apart).
RECORD_RATE_GRID = np.geomspace(1e-4, 0.1, 20)
# Rate ratios of the record test start higher than the concurrent test's: it is there for the large jumps (a broken
# model) at shares where the concurrent test is slow; fewer grid points cost less evidence.
RECORD_MIN_RATIO = 3.0
# The low-traffic schedule raises the canary's share only when the baseline's record (its requests before and
# during the rollout) is at least this many times the canary requests a decision needs: the record test, not the
# share, then carries the comparison with the baseline (see "Low traffic" above).
RECORD_FACTOR = 10
# Data needed before the request rate is trusted for the schedule.
MIN_RATE_ESTIMATE_S = 30.0


class Decision(StrEnum):
    """A str enum: `Decision.ROLLBACK == "rollback"`, and json.dumps writes the plain value."""

    CONTINUE = "continue"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    HOLD = "hold"


def _is_rate(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0.0 < float(x) < 1.0


#: The policy's defaults, which are the analysis's.
_POLICY = RolloutPolicy()


@dataclass(frozen=True)
class Thresholds:
    """All configuration of a canary analysis; validated on construction (ValueError names the field).

    Every field is a `RolloutPolicy` field, and the defaults are the policy's (`RolloutPolicy.thresholds()`).
    """

    max_error_rate: float = _POLICY.max_error_rate  # absolute SLO on the canary's error rate
    max_p95_latency_s: float = _POLICY.max_p95_latency_s  # absolute SLO on the canary's p95 latency
    alpha: float = _POLICY.alpha  # P(roll back a canary as good as baseline and within SLO) <= alpha
    promote_alpha: float = _POLICY.promote_alpha  # P(promote a canary that violates an SLO) <= promote_alpha
    min_rate_ratio: float = _POLICY.min_rate_ratio  # smallest canary/baseline rate ratio the relative tests aim at
    steps: tuple[int, ...] = tuple(_POLICY.steps)  # canary traffic percents; passing the last one promotes
    min_requests_per_step: int = _POLICY.min_requests_per_step  # canary requests needed at each step before it can pass
    no_data_deadline_s: float = _POLICY.no_data_deadline_s  # HOLD while data is missing, ROLLBACK once missing longer
    decision_budget_s: float = _POLICY.decision_budget_s  # low traffic: raise the share when the steps would be slower
    max_low_traffic_percent: int = _POLICY.max_low_traffic_percent  # ... up to this canary percent
    latency_ratio_tolerance: float = _POLICY.latency_ratio_tolerance  # canary latency tail <= ratio x baseline's ...
    latency_margin_s: float = _POLICY.latency_margin_s  # ... + margin

    def __post_init__(self) -> None:
        if not _is_rate(self.max_error_rate):
            raise ValueError(f"max_error_rate must be in (0, 1), got {self.max_error_rate!r}")
        if not _is_positive_finite(self.max_p95_latency_s):
            raise ValueError(f"max_p95_latency_s must be a positive finite number of seconds, got {self.max_p95_latency_s!r}")
        for name in ("alpha", "promote_alpha"):
            value = getattr(self, name)
            if not (_is_rate(value) and value <= 0.5):
                raise ValueError(f"{name} must be in (0, 0.5], got {value!r}")
        r = self.min_rate_ratio
        if not (_is_positive_finite(r) and 1.0 < r < MAX_RATE_RATIO):
            raise ValueError(f"min_rate_ratio must be in (1, {MAX_RATE_RATIO:g}), got {r!r}")
        steps = self.steps
        if not isinstance(steps, tuple) or not steps:
            raise ValueError(f"steps must be a non-empty tuple of percents, got {steps!r}")
        for s in steps:
            if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100:
                raise ValueError(f"steps must contain integer percents in [1, 100], got {steps!r}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"steps must be strictly increasing, got {steps!r}")
        m = self.min_requests_per_step
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"min_requests_per_step must be an integer >= 1, got {m!r}")
        if not _is_positive_finite(self.no_data_deadline_s):
            raise ValueError(f"no_data_deadline_s must be a positive finite number of seconds, got {self.no_data_deadline_s!r}")
        if not _is_positive_finite(self.decision_budget_s):
            raise ValueError(f"decision_budget_s must be a positive finite number of seconds, got {self.decision_budget_s!r}")
        p = self.max_low_traffic_percent
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 100:
            raise ValueError(f"max_low_traffic_percent must be an integer percent in [1, 100], got {p!r}")
        if not (_is_positive_finite(self.latency_ratio_tolerance) and self.latency_ratio_tolerance >= 1.0):
            raise ValueError(f"latency_ratio_tolerance must be a finite number >= 1, got {self.latency_ratio_tolerance!r}")
        m = self.latency_margin_s
        if not (isinstance(m, int | float) and not isinstance(m, bool) and math.isfinite(m) and m >= 0):
            raise ValueError(f"latency_margin_s must be a finite number of seconds >= 0, got {m!r}")


def _is_positive_finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class WindowCounts:
    """Counts observed in ONE new window (differences of cumulative counters, not cumulative values)."""

    canary_requests: int
    canary_errors: int
    canary_slow: int
    baseline_requests: int
    baseline_errors: int
    baseline_slow: int
    # Latency histograms of the window, as (upper bound in seconds, requests at or below it), the last bound inf;
    # empty when the metrics have none (the relative latency test then waits).
    canary_buckets: tuple[tuple[float, int], ...] = ()
    baseline_buckets: tuple[tuple[float, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("canary_requests", "canary_errors", "canary_slow", "baseline_requests", "baseline_errors", "baseline_slow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for who in ("canary", "baseline"):
            n = getattr(self, f"{who}_requests")
            for what in ("errors", "slow"):
                if getattr(self, f"{who}_{what}") > n:
                    raise ValueError(f"{who}_{what} must not exceed {who}_requests ({n})")


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str  # one human sentence
    percent: int  # canary percent to apply now: next step after a pass, 0 on ROLLBACK, 100 on PROMOTE
    evidence: dict = field(default_factory=dict)  # JSON-serialisable


# --------------------------------------------------------------------------------------------------------------
# e-processes


def _logsumexp(xs: list[float]) -> float:
    # Plain floats: the grids have 6-12 points and this runs several times per window, where numpy's per-call
    # overhead would cost more than the arithmetic.
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rate_ratio_grid(min_ratio: float, max_ratio: float = MAX_RATE_RATIO, step: float = RATE_RATIO_GRID_STEP) -> np.ndarray:
    """Geometric grid of rate ratios theta from min_ratio to max_ratio, spaced by about `step`."""
    n = max(1, math.ceil(math.log(max_ratio / min_ratio) / math.log(step))) + 1
    return np.geomspace(min_ratio, max_ratio, n)


def conditional_window_log_lr(k_c: Any, k_b: Any, p0: Any, thetas: Any) -> np.ndarray:
    """log LR of one window for each theta: k_c ln(theta) - (k_c + k_b) ln(1 + p0 (theta - 1)).

    Equals ln[Binomial(k_c; K, q(theta)) / Binomial(k_c; K, p0)] with q = p0 theta / (p0 theta + 1 - p0).
    Broadcasts, so simulations can evaluate many windows at once (e.g. shape (runs, 1) against (J,)).
    """
    k_c = np.asarray(k_c, dtype=float)
    k_b = np.asarray(k_b, dtype=float)
    p0 = np.asarray(p0, dtype=float)
    thetas = np.asarray(thetas, dtype=float)
    return k_c * np.log(thetas) - (k_c + k_b) * np.log1p(p0 * (thetas - 1.0))


class RelativeRateTest:
    """Mixture e-process for H0: canary per-request rate <= baseline rate (conditional two-sample test)."""

    def __init__(self, min_ratio: float, below: bool = False) -> None:
        # below=True: H0 "canary rate >= baseline rate", alternatives theta = 1/grid (theta^k_c is then decreasing in
        # k_c, which is stochastically larger under H0, so each window's ratio has expectation <= 1 again).
        self.thetas = 1.0 / rate_ratio_grid(min_ratio) if below else rate_ratio_grid(min_ratio)
        self._log_theta = [math.log(x) for x in self.thetas]
        self._theta_minus_1 = [x - 1.0 for x in self.thetas]
        self._log_weight = -math.log(len(self.thetas))
        self.log_lr = [0.0] * len(self.thetas)  # cumulative log LR per grid point
        self._log_e = 0.0

    def update(self, k_c: int, n_c: int, k_b: int, n_b: int) -> None:
        total = k_c + k_b
        # No event, or no baseline traffic (p0 = 1: every event is a canary event under H0 and H1 alike):
        # the window's likelihood ratio is exactly 1, so skipping it is not an approximation.
        if total == 0 or n_c == 0 or n_b == 0:
            return
        p0 = n_c / (n_c + n_b)
        self.log_lr = [
            s + k_c * lt - total * math.log1p(p0 * tm1)
            for s, lt, tm1 in zip(self.log_lr, self._log_theta, self._theta_minus_1, strict=True)
        ]
        self._log_e = self._log_weight + _logsumexp(self.log_lr)

    @property
    def log_e(self) -> float:
        return self._log_e


class BernoulliSLOTest:
    """Mixture e-process for a one-sample rate against a fixed level p0.

    direction "above": H0: p <= p0 (rejecting it says the rate is above the SLO: roll back).
    direction "below": H0: p >= p0 (rejecting it says the rate is credibly below the SLO: may promote).
    The product of per-request likelihood ratios only depends on the cumulative (k, n), so the state is two
    integers; the log LR for alternative p1 is k ln(p1/p0) + (n-k) ln((1-p1)/(1-p0)).
    """

    def __init__(self, p0: float, direction: str, alternatives: Any = None) -> None:
        if not 0.0 < p0 < 1.0:
            raise ValueError(f"p0 must be in (0, 1), got {p0!r}")
        if direction not in ("above", "below"):
            raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
        self.p0 = p0
        self.direction = direction
        if alternatives is None:
            if direction == "above":
                odds = p0 / (1.0 - p0) * np.asarray(SLO_ODDS_RATIOS)
                alternatives = odds / (1.0 + odds)
            else:
                alternatives = p0 * np.asarray(SLO_MET_FRACTIONS)
        p1 = np.asarray(alternatives, dtype=float)
        if direction == "above" and not np.all((p1 > p0) & (p1 < 1.0)):
            raise ValueError("alternatives of an 'above' test must lie in (p0, 1)")
        if direction == "below" and not np.all((p1 >= 0.0) & (p1 < p0)):
            raise ValueError("alternatives of a 'below' test must lie in [0, p0)")
        self.alternatives = p1
        # ln(p1/p0) per alternative; None for p1 = 0, whose LR is (1/(1-p0))^n while k = 0 and 0 after a failure.
        self._log_ratio_fail = [math.log(x / p0) if x > 0 else None for x in p1]
        self._log_ratio_ok = [math.log1p(-x) - math.log1p(-p0) for x in p1]
        self._log_weight = -math.log(len(p1))
        self.k = 0
        self.n = 0

    def update(self, k: int, n: int) -> None:
        self.k += k
        self.n += n

    def log_lr(self) -> list[float]:
        """Cumulative log likelihood ratio for each alternative."""
        k, ok = self.k, self.n - self.k
        return [
            (k * f if f is not None else (0.0 if k == 0 else -math.inf)) + ok * o
            for f, o in zip(self._log_ratio_fail, self._log_ratio_ok, strict=True)
        ]

    @property
    def log_e(self) -> float:
        return self._log_weight + _logsumexp(self.log_lr())


def _log_binomial_lr_terms(k: float, n: float, p: np.ndarray) -> np.ndarray:
    """k ln p + (n - k) ln(1 - p), with 0 ln 0 = 0 (the binomial log likelihood without its coefficient)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        fail = np.where(k > 0, k * np.log(p), 0.0)
        ok = np.where(n - k > 0, (n - k) * np.log1p(-p), 0.0)
    return fail + ok


class BaselineRecordTest:
    """E-process for H0: canary error rate <= the baseline's, the baseline's rate being one rate over its whole
    record (its requests before the canary started and during the rollout); universal inference (see "Low traffic")."""

    def __init__(self, min_ratio: float, record_requests: int = 0, record_errors: int = 0) -> None:
        thetas = rate_ratio_grid(max(min_ratio, RECORD_MIN_RATIO))
        b = RECORD_RATE_GRID[:, None]
        p_c = b * thetas[None, :]
        valid = p_c < 1.0
        # Pairs whose canary rate would reach 1 are dropped: the weights then sum to less than one, still valid.
        self._b = np.broadcast_to(b, p_c.shape)[valid]
        self._p_c = p_c[valid]
        self._log_weight = -math.log(p_c.size)
        self.n_b, self.k_b = int(record_requests), int(record_errors)
        self.n_c = self.k_c = 0
        self.rollout_n_b = self.rollout_k_b = 0
        self._log_e = -math.inf

    def update(self, k_c: int, n_c: int, k_b: int, n_b: int) -> None:
        self.k_c += k_c
        self.n_c += n_c
        self.k_b += k_b
        self.n_b += n_b
        self.rollout_k_b += k_b
        self.rollout_n_b += n_b
        if self.n_c == 0 or self.n_b == 0:
            self._log_e = -math.inf
            return
        num = _log_binomial_lr_terms(self.k_b, self.n_b, self._b) + _log_binomial_lr_terms(self.k_c, self.n_c, self._p_c)
        log_num = self._log_weight + float(np.logaddexp.reduce(num))
        # The null's maximum likelihood: each revision its own rate unless the canary's exceeds the baseline's,
        # then one pooled rate (the boundary of H0).
        r_b, r_c = self.k_b / self.n_b, self.k_c / self.n_c
        if r_c <= r_b:
            pairs = ((self.k_b, self.n_b, r_b), (self.k_c, self.n_c, r_c))
        else:
            pooled = (self.k_b + self.k_c) / (self.n_b + self.n_c)
            pairs = ((self.k_b, self.n_b, pooled), (self.k_c, self.n_c, pooled))
        log_den = sum(float(_log_binomial_lr_terms(k, n, np.asarray(min(max(r, 1e-300), 1 - 1e-16)))) for k, n, r in pairs)
        self._log_e = log_num - log_den

    def canary_worse_during_rollout(self, min_ratio: float) -> bool:
        """The canary's observed rate during the rollout is above min_ratio x the baseline's during it (a guard, not a
        test: a common-cause surge that hits both revisions now is not blamed on the canary by the record)."""
        if self.n_c == 0 or self.k_c == 0:
            return False
        if self.rollout_n_b == 0:
            return True
        return self.k_c / self.n_c > min_ratio * self.rollout_k_b / self.rollout_n_b

    @property
    def log_e(self) -> float:
        return self._log_e


def _cumulative_at(buckets: tuple[tuple[float, int], ...], bound: float) -> int:
    """Requests at or below `bound` (a bucket bound of `buckets`); 0 when it is below every bound."""
    return max((n for le, n in buckets if le <= bound), default=0)


class LatencyTailTest:
    """Relative latency on bucketed histograms: H0 "the canary's latency tail is within ratio x the baseline's
    + margin" at the baseline's p95 (see "Relative latency" above); a conditional two-sample test per window."""

    def __init__(self, min_ratio: float, ratio: float, margin_s: float) -> None:
        self.ratio = ratio
        self.margin_s = margin_s
        self.test = RelativeRateTest(min_ratio)
        self.baseline: dict[float, int] = {}  # cumulative baseline histogram of past windows (the predictable part)
        self.bounds: tuple[float, float] | None = None  # (x, y) used by the last window
        self.canary_above = self.baseline_above = 0
        self.last: tuple[int, int, int, int] | None = None  # the last window's (k_c, n_c, k_b, n_b), None if unused

    def choose_bounds(self, bounds: list[float]) -> tuple[float, float] | None:
        """(x, y): x the smallest finite bound with at most 5% of the baseline's past requests above it (its p95
        bucket), y the smallest bound >= ratio x + margin; None while neither exists."""
        total = self.baseline.get(math.inf, 0)
        if total == 0:
            return None
        finite = sorted(b for b in bounds if math.isfinite(b))
        x = next((b for b in finite if total - self.baseline.get(b, 0) <= P95_SLOW_SHARE * total), None)
        if x is None:
            return None
        y = next((b for b in finite if b >= self.ratio * x + self.margin_s - 1e-12), None)
        return None if y is None else (x, y)

    def update(self, window: WindowCounts) -> None:
        self.last = None
        if window.canary_buckets and window.baseline_buckets:
            bounds = [le for le, _ in window.canary_buckets]
            chosen = self.choose_bounds(bounds)
            if chosen is not None:
                x, y = chosen
                self.bounds = chosen
                # Totals from the histograms themselves (their +Inf bucket), so counts and totals agree.
                n_c, n_b = _cumulative_at(window.canary_buckets, math.inf), _cumulative_at(window.baseline_buckets, math.inf)
                k_c = max(n_c - _cumulative_at(window.canary_buckets, y), 0)
                k_b = max(n_b - _cumulative_at(window.baseline_buckets, x), 0)
                if n_c > 0 and n_b > 0:
                    self.canary_above += k_c
                    self.baseline_above += k_b
                    self.test.update(k_c, n_c, k_b, n_b)
                    self.last = (k_c, n_c, k_b, n_b)
        for le, n in window.baseline_buckets:
            self.baseline[le] = self.baseline.get(le, 0) + int(n)

    @property
    def log_e(self) -> float:
        return self.test.log_e


# --------------------------------------------------------------------------------------------------------------
# the analysis

_ROLLBACK_DESCRIPTIONS = {
    "error_vs_baseline": "canary error rate higher than baseline's",
    "error_vs_baseline_record": "canary error rate higher than the baseline's over its record",
    "latency_tail_vs_baseline": "canary latency tail beyond the tolerance over the baseline's",
    "latency_vs_baseline": "canary slow-request share (latency above the p95 threshold) higher than baseline's",
    "error_slo": "canary error rate above the error SLO",
    "latency_slo": "canary p95 latency above the latency SLO",
}
_PROMOTE_DESCRIPTIONS = {
    "error_slo_met": "error rate below the SLO",
    "latency_slo_met": "p95 latency within the SLO",
    "latency_tail_met": "latency tail within the tolerance over the baseline's",
}


def _finite(x: float) -> float:
    """JSON-safe float: e-values can be astronomically large (or 0); clamp so json.dumps(allow_nan=False) works."""
    if math.isnan(x):
        return 0.0
    return max(min(x, 1e300), -1e300)


def _e_value(log_e: float) -> float:
    return _finite(math.exp(min(log_e, 690.0)) if log_e > -745.0 else 0.0)


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


class CanaryAnalysis:
    """Sequential canary analysis: feed it one `WindowCounts` per window with `observe`, apply `Verdict.percent`."""

    def __init__(self, thresholds: Thresholds, started_at: float, baseline_record: tuple[int, int] = (0, 0)) -> None:
        """`baseline_record`: (requests, errors) the baseline served before the canary started, e.g. its cumulative
        counters at the start (see "Low traffic")."""
        self.thresholds = thresholds
        self.started_at = float(started_at)
        self._step = 0
        self._steps = tuple(thresholds.steps)
        self._schedule: dict[str, Any] = {"mode": "declared"}
        self._last_data_at = float(started_at)
        self._final: Verdict | None = None
        self._windows = 0
        self._missing_windows = 0
        self._totals = dict.fromkeys(
            ("canary_requests", "canary_errors", "canary_slow", "baseline_requests", "baseline_errors", "baseline_slow"), 0
        )
        t = thresholds
        self._error_vs_baseline = RelativeRateTest(t.min_rate_ratio)
        self._latency_vs_baseline = RelativeRateTest(t.min_rate_ratio)
        self._error_slo = BernoulliSLOTest(t.max_error_rate, "above")
        self._latency_slo = BernoulliSLOTest(P95_SLOW_SHARE, "above")
        requests, errors = baseline_record
        if isinstance(requests, bool) or not 0 <= int(errors) <= int(requests):
            raise ValueError(f"baseline_record must be (requests, errors) with 0 <= errors <= requests, got {baseline_record!r}")
        self._record = BaselineRecordTest(t.min_rate_ratio, int(requests), int(errors))
        self._record_before = int(requests)
        self._carried: dict[str, Any] | None = None  # the shadow phase's counts, when its proof was carried over
        # Requests to the service in every window read, with canary requests or not, and the end of the last one: the
        # request rate. (Windows without canary requests change no evidence, but at a 5% share and a few requests per
        # second most windows have none, and leaving them out of the rate would underestimate it several-fold.)
        self._rate_requests = 0
        self._rate_until = float(started_at)
        self._latency_tail = LatencyTailTest(t.min_rate_ratio, t.latency_ratio_tolerance, t.latency_margin_s)
        self._rollback_tests: dict[str, Any] = {
            "error_vs_baseline": self._error_vs_baseline,
            "error_vs_baseline_record": self._record,
            "latency_vs_baseline": self._latency_vs_baseline,
            "latency_tail_vs_baseline": self._latency_tail,
            "error_slo": self._error_slo,
            "latency_slo": self._latency_slo,
        }
        self._log_rollback_bounds = {name: math.log(1.0 / (share * t.alpha)) for name, share in ROLLBACK_ALPHA_SHARES.items()}
        self._log_promote_bound = math.log(1.0 / t.promote_alpha)
        self._log_e: dict[str, float] = dict.fromkeys(self._rollback_tests, 0.0)
        self._new_step_tests()
        # Constant parts of the evidence, built once.
        self._thresholds_dict = asdict(t)
        self._bounds = {name: _finite(math.exp(b)) for name, b in self._log_rollback_bounds.items()}
        self._bounds.update(
            {name: _finite(math.exp(self._log_promote_bound)) for name in [*self._good_tests, "latency_tail_met"]}
        )

    def _new_step_tests(self) -> None:
        self._step_requests = 0
        self._step_windows = 0
        self._good_tests = {
            "error_slo_met": BernoulliSLOTest(self.thresholds.max_error_rate, "below"),
            "latency_slo_met": BernoulliSLOTest(P95_SLOW_SHARE, "below"),
        }
        # Relative latency must be shown within its tolerance too, wherever both revisions report histograms: the
        # canary's share above y credibly below 5%, i.e. its p95 at most y, the tolerance over the baseline's p95
        # bucket x (fresh at every step, like the others). Not "below the baseline's share above x": where no
        # baseline request is above x (coarse buckets, a fast model) that comparison has no events and could
        # never pass, and a healthy canary would never be promoted.
        self._tail_met = BernoulliSLOTest(P95_SLOW_SHARE, "below")
        self._tail_met_windows = 0
        self._log_e.update(dict.fromkeys(self._good_tests, 0.0))
        self._log_e["latency_tail_met"] = 0.0

    def record_baseline(self, requests: int, errors: int) -> None:
        """Add what the baseline served before the canary started (e.g. its cumulative counters when the canary was
        deployed) to its record; only before the first window."""
        if self._windows or self._missing_windows:
            raise RuntimeError("the baseline's record must be given before the first window")
        if isinstance(requests, bool) or not 0 <= int(errors) <= int(requests):
            raise ValueError(f"the baseline's record must have 0 <= errors <= requests, got ({requests!r}, {errors!r})")
        self._record.n_b += int(requests)
        self._record.k_b += int(errors)
        self._record_before += int(requests)

    def carry_slo_proof(self, requests: int, errors: int, answered: int, slow: int, source: str = "shadow") -> None:
        """Start the first step's promotion tests from what the same revision showed on mirrored copies of live
        requests: `errors` of `requests` failed, `slow` of the `answered` ones were above the p95 SLO (see "Shadow
        evidence"). Only before the first window."""
        if self._windows or self._missing_windows or self._step:
            raise RuntimeError("a shadow's SLO proof can only be carried into the first step, before its first window")
        counts = {"requests": requests, "errors": errors, "answered": answered, "slow": slow}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"carried {name} must be a whole number >= 0, got {value!r}")
        if errors > requests or slow > answered or answered > requests:
            raise ValueError(f"carried counts must have errors <= requests, slow <= answered <= requests, got {counts}")
        self._good_tests["error_slo_met"].update(errors, requests)
        self._good_tests["latency_slo_met"].update(slow, answered)
        for name, test in self._good_tests.items():
            self._log_e[name] = test.log_e
        shown = all(test.log_e >= self._log_promote_bound for test in self._good_tests.values())
        self._carried = {"source": source, **counts, "slo_shown": shown}

    @property
    def percent(self) -> int:
        """Canary traffic percent of the current step (0 after a rollback, 100 after promotion)."""
        if self._final is not None:
            return self._final.percent
        return self._steps[self._step]

    @property
    def finished(self) -> bool:
        return self._final is not None

    def observe(self, window: WindowCounts | None, now: float) -> Verdict:
        """Take one new window of counts (None when metrics are unavailable) and decide."""
        if self._final is not None:
            # Terminal decisions stick: a re-run job that asks again gets the same answer.
            return self._final
        t = self.thresholds
        if window is not None:
            self._rate_requests += int(window.canary_requests) + int(window.baseline_requests)
            self._rate_until = max(self._rate_until, float(now))
        if window is None or window.canary_requests == 0:
            self._missing_windows += 1
            silent_for = max(0.0, float(now) - self._last_data_at)
            what = "metrics unavailable" if window is None else "no canary requests in the window"
            if silent_for > t.no_data_deadline_s:
                return self._finish(
                    Decision.ROLLBACK,
                    f"No usable canary data for {silent_for:.0f} s ({what}), past the {t.no_data_deadline_s:g} s deadline.",
                    0,
                    now,
                    fired=["no_data_deadline"],
                )
            return Verdict(
                Decision.HOLD,
                f"Holding at {self.percent}%: {what} for {silent_for:.0f} s (deadline {t.no_data_deadline_s:g} s).",
                self.percent,
                self._evidence(now, fired=[], silent_for=silent_for),
            )

        self._last_data_at = max(self._last_data_at, float(now))
        self._windows += 1
        w = window
        for name in self._totals:
            self._totals[name] += int(getattr(w, name))
        self._error_vs_baseline.update(w.canary_errors, w.canary_requests, w.baseline_errors, w.baseline_requests)
        self._latency_vs_baseline.update(w.canary_slow, w.canary_requests, w.baseline_slow, w.baseline_requests)
        self._error_slo.update(w.canary_errors, w.canary_requests)
        self._latency_slo.update(w.canary_slow, w.canary_requests)
        self._record.update(int(w.canary_errors), int(w.canary_requests), int(w.baseline_errors), int(w.baseline_requests))
        self._latency_tail.update(w)
        if self._latency_tail.last is not None:
            k_c, n_c, _, _ = self._latency_tail.last
            self._tail_met.update(k_c, n_c)
            self._tail_met_windows += 1
        self._step_requests += int(w.canary_requests)
        self._step_windows += 1
        self._good_tests["error_slo_met"].update(int(w.canary_errors), int(w.canary_requests))
        self._good_tests["latency_slo_met"].update(int(w.canary_slow), int(w.canary_requests))

        # Each e-value is computed once per window and reused for the decision and the evidence.
        rb = self._rollback_tests
        self._log_e = {name: test.log_e for name, test in rb.items()}
        self._log_e.update({name: test.log_e for name, test in self._good_tests.items()})
        fired = [name for name in rb if self._log_e[name] >= self._log_rollback_bounds[name]]
        if "error_vs_baseline_record" in fired and not self._record.canary_worse_during_rollout(t.min_rate_ratio):
            fired.remove("error_vs_baseline_record")
        if fired:
            name = fired[0]
            e = _e_value(self._log_e[name])
            bound = math.exp(self._log_rollback_bounds[name])
            return self._finish(
                Decision.ROLLBACK,
                f"Rolled back at {self.percent}%: {_ROLLBACK_DESCRIPTIONS[name]} ({self._summary()}); "
                f"e-value {e:.3g} >= {bound:.3g}.",
                0,
                now,
                fired=fired,
            )

        good = {name: self._log_e[name] >= self._log_promote_bound for name in self._good_tests}
        self._log_e["latency_tail_met"] = self._tail_met.log_e
        if self._tail_met_windows:  # only where both revisions report latency histograms
            good["latency_tail_met"] = self._tail_met.log_e >= self._log_promote_bound
        enough = self._step_requests >= t.min_requests_per_step
        if enough and all(good.values()):
            passed = self.percent
            if self._step + 1 == len(self._steps):
                return self._finish(
                    Decision.PROMOTE,
                    f"Promoted: step {passed}% passed, canary within both SLOs ({self._summary()}).",
                    100,
                    now,
                    fired=[],
                )
            evidence = self._evidence(now, fired=[], step_passed=passed, next_percent=self._steps[self._step + 1])
            self._step += 1
            self._new_step_tests()
            return Verdict(
                Decision.CONTINUE,
                f"Step {passed}% passed ({self._summary()}); moving to {self.percent}%.",
                self.percent,
                evidence,
            )
        switched = self._adapt_to_traffic(now)
        missing = [switched] if switched else []
        if not enough:
            missing.append(f"{self._step_requests}/{t.min_requests_per_step} canary requests")
        missing += [f"{_PROMOTE_DESCRIPTIONS[name]} not yet shown" for name, ok in good.items() if not ok]
        return Verdict(
            Decision.CONTINUE,
            f"Continuing at {self.percent}%: {', '.join(missing)} ({self._summary()}).",
            self.percent,
            self._evidence(now, fired=[]),
        )

    def _observed_rps(self) -> float | None:
        """Requests per second to the service (canary and baseline) since the canary started, or None."""
        span = self._rate_until - self.started_at
        return self._rate_requests / span if span > 0 and self._rate_requests > 0 else None

    def _clean_requests_per_step(self, step: int | None = None) -> int:
        """Canary requests step `step` (by default: the later ones) needs at least: those that show the error SLO with
        no failure at all (the r = 0 alternative of the promotion test), or min_requests_per_step if more; only the
        latter for a first step whose SLO proof was carried over from a shadow phase that showed both."""
        t = self.thresholds
        if step == 0 and self._carried is not None and self._carried["slo_shown"]:
            return t.min_requests_per_step
        log_bound = self._log_promote_bound + math.log(len(SLO_MET_FRACTIONS))
        return max(math.ceil(log_bound / -math.log1p(-t.max_error_rate)), t.min_requests_per_step)

    def _adapt_to_traffic(self, now: float) -> str | None:
        """At step one, once the request rate is known: if the declared steps would take longer than the decision
        budget, replace them with one step whose share reaches a decision within the budget (see "Low traffic")."""
        t = self.thresholds
        if self._schedule["mode"] != "declared" or self._step != 0:
            return None
        rps = self._observed_rps()
        if rps is None or self._rate_until - self.started_at < MIN_RATE_ESTIMATE_S:
            return None
        n_first, n_clean = self._clean_requests_per_step(0), self._clean_requests_per_step()
        declared_s = sum((n_first if i == 0 else n_clean) / (rps * s / 100.0) for i, s in enumerate(self._steps))
        if declared_s <= t.decision_budget_s:
            return None
        needed = max(n_first - self._step_requests, 1)
        share = math.ceil(100.0 * needed / (rps * t.decision_budget_s))
        record_ok = self._record.n_b >= RECORD_FACTOR * n_first
        percent = min(max(share, self._steps[0]), t.max_low_traffic_percent) if record_ok else self._steps[0]
        percent = max(percent, self._steps[0])
        self._steps = (percent,)
        self._schedule = {
            "mode": "low_traffic",
            "observed_rps": round(rps, 4),
            "declared_steps": list(t.steps),
            "declared_schedule_s": round(declared_s, 1),
            "decision_budget_s": t.decision_budget_s,
            "baseline_record_sufficient": record_ok,
        }
        why = "" if record_ok else f" (kept: the baseline's record of {self._record.n_b} requests is too short to raise it)"
        return (
            f"low traffic ({rps:.3g} req/s): the declared steps would take about {declared_s:.0f} s, over the "
            f"{t.decision_budget_s:g} s budget, so one step at {percent}%{why}"
        )

    def _requests_to_pass(self) -> float | None:
        """Canary requests the current step still needs if the canary keeps its observed rates, or None if it is not
        expected to pass at those rates."""
        needed = float(max(self.thresholds.min_requests_per_step - self._step_requests, 0))
        for test in self._good_tests.values():
            q = test.k / test.n if test.n else 0.0
            if q >= test.p0:
                return None
            best = math.inf
            for llr, p1 in zip(test.log_lr(), test.alternatives, strict=True):
                drift = (q * math.log(p1 / test.p0) if p1 > 0 else (0.0 if q == 0 else -math.inf)) + (1 - q) * (
                    math.log1p(-p1) - math.log1p(-test.p0)
                )
                if drift > 0 and llr > -math.inf:
                    best = min(best, max(self._log_promote_bound - test._log_weight - llr, 0.0) / drift)
            if not math.isfinite(best):
                return None
            needed = max(needed, best)
        return needed

    def _expected_decision_s(self, now: float) -> float | None:
        """Expected seconds until promotion at the observed request rate and the schedule's shares, if the canary
        keeps its observed rates (None while the rate is unknown or the canary is not on course to pass)."""
        rps = self._observed_rps()
        needed = self._requests_to_pass()
        if rps is None or needed is None or self._final is not None:
            return None
        n_clean = self._clean_requests_per_step()
        seconds = needed / (rps * self.percent / 100.0)
        seconds += sum(n_clean / (rps * s / 100.0) for s in self._steps[self._step + 1 :])
        return round(seconds, 1)

    def _finish(self, decision: Decision, reason: str, percent: int, now: float, fired: list[str]) -> Verdict:
        self._final = Verdict(decision, reason, percent, self._evidence(now, fired=fired, final=decision.value))
        return self._final

    def _summary(self) -> str:
        c = self._totals
        parts = []
        for what in ("errors", "slow"):
            cr = _rate(c[f"canary_{what}"], c["canary_requests"])
            br = _rate(c[f"baseline_{what}"], c["baseline_requests"])
            label = "errors" if what == "errors" else "slow"
            s = f"canary {label} {c[f'canary_{what}']}/{c['canary_requests']}"
            if cr is not None:
                s += f" ({cr:.3%})"
            if br is not None:
                s += f" vs baseline {br:.3%}"
            parts.append(s)
        return "; ".join(parts)

    def _evidence(self, now: float, fired: list[str], **extra: Any) -> dict:
        t = self.thresholds
        c = dict(self._totals)
        estimates: dict[str, float | None] = {
            "canary_error_rate": _rate(c["canary_errors"], c["canary_requests"]),
            "baseline_error_rate": _rate(c["baseline_errors"], c["baseline_requests"]),
            "canary_slow_share": _rate(c["canary_slow"], c["canary_requests"]),
            "baseline_slow_share": _rate(c["baseline_slow"], c["baseline_requests"]),
        }
        for what, a, b in (
            ("error", "canary_error_rate", "baseline_error_rate"),
            ("slow", "canary_slow_share", "baseline_slow_share"),
        ):
            ca, ba = estimates[a], estimates[b]
            estimates[f"{what}_rate_ratio"] = ca / ba if ca is not None and ba else None
        e_values = {name: _e_value(log_e) for name, log_e in self._log_e.items()}
        evidence: dict[str, Any] = {
            "cumulative": c,
            "estimates": estimates,
            "e_values": e_values,
            "e_value_thresholds": dict(self._bounds),
            "fired": list(fired),
            "step_index": self._step,
            "step_percent": self._steps[self._step],
            "schedule": {**self._schedule, "steps": list(self._steps)},
            "expected_decision_s": self._expected_decision_s(now),
            "latency_tail_bounds_s": list(self._latency_tail.bounds) if self._latency_tail.bounds else None,
            "baseline_record": {"before_canary": self._record_before, "requests": self._record.n_b, "errors": self._record.k_b},
            "carried_slo_proof": self._carried,
            "step_canary_requests": self._step_requests,
            "step_windows": self._step_windows,
            "windows": self._windows,
            "missing_windows": self._missing_windows,
            "elapsed_s": round(max(0.0, float(now) - self.started_at), 3),
            "thresholds": {**self._thresholds_dict, "steps": list(t.steps)},
            "rollback_alpha_shares": dict(ROLLBACK_ALPHA_SHARES),
            "p95_slow_share": P95_SLOW_SHARE,
        }
        evidence.update(extra)
        return evidence
