"""Shadow analysis: the candidate answers the same live requests as the stable revision, users never see it.

The router mirrors a share of live requests to the candidate and records, for each, both answers (see
`mlops_assets/servers/router.py`). Because both revisions scored the *same inputs*, the comparison is
paired: no population noise between the arms, so a candidate that silently changes what the model
decides is measured directly, before any user is exposed. This module is the statistics, as plain
Python (no Dagster): feed `ShadowAnalysis.observe` the pairs of each window, get a `Verdict`.

What is compared, per mirrored request (and per row of a multi-row request):
* Classifiers (a decision threshold is declared): the decision-flip rate, the share of rows where
  `score >= threshold` differs between stable and candidate.
* Scores and regressions (no threshold): the mean absolute difference of the predictions (each row's
  difference counted up to `diff_cap`, the scale of the scores: 1 for probabilities, declared for a
  regression), and the Kolmogorov-Smirnov distance between the two prediction distributions.
* In both modes, the candidate's own health on those requests: its error rate (5xx, no answer, or an
  answer that is not one prediction per row where stable answered 200) and its slow share (latency
  above the p95 SLO), each against the absolute SLO and paired against the stable revision; and its
  latency relative to stable's on the same request (the declared `latency_ratio_tolerance` and
  `latency_margin_s`, as the canary's): a candidate well inside the SLO but many times slower than
  stable is caught here, before any user waits for it.

Decisions are anytime-valid, like the canary's (`analysis.py`): the analysis may look after every window,
forever, and the error probabilities below hold at whatever time it stops.
* REJECT (`Decision.ROLLBACK`) when any test is credibly above its tolerance. Each test holds a share
  of `alpha` (Bonferroni, `REJECT_ALPHA_SHARES`), so a candidate within every tolerance is rejected with
  probability at most alpha.
  - flip rate: the one-sample Bernoulli mixture e-process of the canary (`BernoulliSLOTest`, H0: flip
    rate <= max_flip_rate);
  - mean absolute difference: a betting e-process for a bounded mean (Waudby-Smith & Ramdas 2023):
    X = min(|d|, cap) / cap in [0, 1], K_t = prod (1 + lam (X_i - m)) with m = max_mean_abs_diff / cap,
    mixed over a fixed grid of lam in (0, 1/m); under H0: E[X | past] <= m each factor has expectation
    <= 1, so K_t is a test supermartingale and Ville's inequality applies;
  - KS distance: a time-uniform confidence band for each empirical CDF (Massart's DKW inequality with
    a union bound over every sample size n: eps_n = sqrt(ln(pi^2 n^2 / (3 a)) / (2 n)) holds for all n
    at once with probability 1 - a); the distance between the true CDFs is within eps_s + eps_c of the
    empirical one, so "credibly above" is D_hat - eps_s - eps_c > max_ks_distance;
  - errors and slow requests vs stable: on the pairs where exactly one revision failed (or was slow),
    under H0 "the candidate fails no more often than stable on the same inputs" the failing one is
    the candidate with probability at most 1/2 (a sequential McNemar / sign test), tested with the same
    Bernoulli mixture; the absolute SLO tests are the canary's;
  - latency vs stable: on the pairs both answered (with both latencies known), the share where the
    candidate took longer than `latency_ratio_tolerance` x stable's + `latency_margin_s`. H0: that share
    is at most 1/2, i.e. on the median request the candidate is within the tolerance of stable (a sign
    test on c - (r s + m), the same Bernoulli mixture). A candidate adding 150 ms to a 10 ms model is
    slower beyond any such tolerance on nearly every pair and is rejected after a handful; one as fast as
    stable is rarely beyond it. Locally the copy is sent once stable has answered, and copies beyond
    the in-flight bound are dropped, so a candidate queues less than stable under load: the comparison
    errs towards the candidate, never against it.
* PASS (`Decision.PROMOTE`) when every "within tolerance" test is credibly passed at promote_alpha
  (an intersection-union test, Berger 1982: no splitting needed) and at least `min_requests` pairs were
  compared: flip rate below max_flip_rate, or mean absolute difference and KS distance below theirs
  (the mirror-image e-processes, and the same DKW band), error rate below the SLO, p95 within the SLO.
* Missing data is never a pass: a window with no pairs HOLDs, and after `no_data_deadline_s` without
  any the analysis rejects.

Assumptions: mirrored requests are a random sample of live traffic and rows are independent given the
past (a repeated input counts again); for the KS band, prediction values of one revision are i.i.d. The
evidence of every window carries the estimates, e-values, bounds and the examples that disagree most.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mlops_assets.core.rollout.analysis import P95_SLOW_SHARE, BernoulliSLOTest, Decision, Verdict

#: Bonferroni shares of alpha for the reject tests: the comparison of predictions (split between mean
#: difference and KS in score mode) is what shadow traffic is for; the health tests share the rest.
REJECT_ALPHA_SHARES: dict[str, float] = {
    "predictions": 0.4,
    "error_slo": 0.12,
    "errors_vs_stable": 0.12,
    "latency_slo": 0.12,
    "slow_vs_stable": 0.12,
    "latency_vs_stable": 0.12,
}
#: Bets of the bounded-mean e-processes, as fractions of the largest bet that keeps every factor >= 0.
BET_FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
#: How many of the most disagreeing rows the evidence keeps.
TOP_DISAGREEMENTS = 10


def _is_rate(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0.0 < float(x) < 1.0


def _is_positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class ShadowTolerances:
    """All configuration of a shadow analysis (from the model's `RolloutPolicy`); validated on construction."""

    threshold: float | None = None  # a classifier's decision threshold; None: compare scores / regressions
    max_flip_rate: float = 0.02  # share of rows whose decision may flip
    max_mean_abs_diff: float = 0.05  # mean |stable - candidate| allowed (scores, regressions)
    diff_cap: float = 1.0  # each row's |difference| counts at most this (the scale of the predictions)
    max_ks_distance: float = 0.2  # KS distance allowed between the two prediction distributions
    max_error_rate: float = 0.01
    max_p95_latency_s: float = 0.5
    # Relative latency: the candidate may take at most this multiple of stable's latency on the same request,
    # plus the margin (the canary's `latency_ratio_tolerance` / `latency_margin_s`).
    latency_ratio_tolerance: float = 1.2
    latency_margin_s: float = 0.002
    alpha: float = 0.01  # P(reject a candidate within every tolerance) <= alpha
    promote_alpha: float = 0.05  # P(pass a candidate outside a tolerance) <= promote_alpha
    min_requests: int = 200  # compared requests needed before a pass
    no_data_deadline_s: float = 120.0
    #: False: judge only the candidate's health (errors, latency), e.g. a blue-green's green, a new model whose
    #: predictions are meant to differ; the health tests then share all of alpha.
    compare_predictions: bool = True

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold)):
            raise ValueError(f"threshold must be a finite number or None, got {self.threshold!r}")
        for name in ("max_flip_rate", "max_ks_distance", "max_error_rate"):
            if not _is_rate(getattr(self, name)):
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("max_mean_abs_diff", "diff_cap", "max_p95_latency_s", "no_data_deadline_s"):
            if not _is_positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        r, m = self.latency_ratio_tolerance, self.latency_margin_s
        if isinstance(r, bool) or not isinstance(r, int | float) or not (math.isfinite(r) and r >= 1.0):
            raise ValueError(f"latency_ratio_tolerance must be a finite number >= 1, got {r!r}")
        if isinstance(m, bool) or not isinstance(m, int | float) or not (math.isfinite(m) and m >= 0.0):
            raise ValueError(f"latency_margin_s must be a finite number of seconds >= 0, got {m!r}")
        if self.max_mean_abs_diff >= self.diff_cap:
            raise ValueError(f"max_mean_abs_diff ({self.max_mean_abs_diff}) must be below diff_cap ({self.diff_cap})")
        for name in ("alpha", "promote_alpha"):
            if not (_is_rate(getattr(self, name)) and getattr(self, name) <= 0.5):
                raise ValueError(f"{name} must be in (0, 0.5], got {getattr(self, name)!r}")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise ValueError(f"min_requests must be an integer >= 1, got {self.min_requests!r}")

    @property
    def classifier(self) -> bool:
        return self.threshold is not None and self.compare_predictions


# --------------------------------------------------------------------------------------------------------------
# one mirrored request


@dataclass(frozen=True)
class MirroredPair:
    """One mirrored request as the router recorded it: both answers on the same input."""

    seq: int
    stable_status: int
    candidate_status: int  # 0: no answer (timeout, connection failure)
    stable_latency_s: float
    candidate_latency_s: float
    stable: list[float] | None  # one prediction per row, or None when the answer had none
    candidate: list[float] | None
    rows: list[Any] = field(default_factory=list)  # the request's input rows (for the disagreement table)

    @property
    def compared(self) -> bool:
        """Stable answered with predictions: there is something to compare the candidate with."""
        return self.stable_status == 200 and self.stable is not None

    @property
    def candidate_error(self) -> bool:
        """A 5xx or no answer; or, where stable answered, anything but one prediction per row."""
        if self.candidate_status == 0 or self.candidate_status >= 500:
            return True
        return self.compared and (self.candidate is None or len(self.candidate) != len(self.stable or []))

    @property
    def stable_error(self) -> bool:
        return self.stable_status == 0 or self.stable_status >= 500


def predictions_of(answer: Any) -> list[float] | None:
    """The predictions of a V1 (`predictions`) or V2 (first output's `data`) answer as floats, one per row
    (the first value of a row when a row holds several, e.g. class probabilities); None if there are none."""
    if not isinstance(answer, dict):
        return None
    values = answer.get("predictions")
    if values is None and isinstance(answer.get("outputs"), list) and answer["outputs"]:
        output = answer["outputs"][0]
        values = output.get("data") if isinstance(output, dict) else None
        shape = output.get("shape") if isinstance(output, dict) else None
        if isinstance(values, list) and isinstance(shape, list) and len(shape) == 2 and shape[1] and shape[1] > 1:
            k = shape[1]
            values = values[k - 1 :: k] if k == 2 else values[::k]  # [P(0), P(1)] rows -> P(positive class)
    if not isinstance(values, list) or not values:
        return None
    out = []
    for value in values:
        while isinstance(value, list) and value:
            value = value[-1] if len(value) == 2 else value[0]  # [p0, p1] -> P(positive class)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        out.append(float(value))
    return out


def rows_of(request: Any) -> list[Any]:
    """The input rows of a V1 (`instances`) or V2 (`inputs`, one tensor per column) request body."""
    if not isinstance(request, dict):
        return []
    if isinstance(request.get("instances"), list):
        return request["instances"]
    inputs = [t for t in request.get("inputs") or [] if isinstance(t, dict) and isinstance(t.get("data"), list)]
    if not inputs:
        return []
    n = min(len(t["data"]) for t in inputs)
    return [{t.get("name", f"input_{j}"): t["data"][i] for j, t in enumerate(inputs)} for i in range(n)]


def pair_from_record(record: dict) -> MirroredPair:
    """A router `/-/shadow` record as a `MirroredPair`."""
    return MirroredPair(
        seq=int(record.get("seq", 0)),
        stable_status=int(record.get("stable_status") or 0),
        candidate_status=int(record.get("candidate_status") or 0),
        stable_latency_s=float(record.get("stable_latency_s") or 0.0),
        candidate_latency_s=float(record.get("candidate_latency_s") or 0.0),
        stable=predictions_of(record.get("stable")),
        candidate=predictions_of(record.get("candidate")),
        rows=rows_of(record.get("request")),
    )


# --------------------------------------------------------------------------------------------------------------
# tests


class BoundedMeanTest:
    """Betting e-process for the mean of X in [0, 1] against level m, mixed over a grid of bets.

    direction "above": H0: E[X] <= m, K = prod(1 + lam (X - m)), lam = f / m.
    direction "below": H0: E[X] >= m, K = prod(1 - lam (X - m)), lam = f / (1 - m).
    With f < 1 every factor is positive for every X in [0, 1]."""

    def __init__(self, m: float, direction: str, fractions: tuple[float, ...] = BET_FRACTIONS) -> None:
        if not 0.0 < m < 1.0:
            raise ValueError(f"m must be in (0, 1), got {m!r}")
        if direction not in ("above", "below"):
            raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
        self.m, self.direction = m, direction
        scale = 1.0 / m if direction == "above" else -1.0 / (1.0 - m)
        self.lams = np.asarray(fractions, dtype=float) * scale  # signed: the "below" bet is on X - m < 0
        self.log_k = np.zeros(len(fractions))
        self.n = 0
        self.total = 0.0

    def update(self, xs: np.ndarray) -> None:
        xs = np.asarray(xs, dtype=float)
        if xs.size == 0:
            return
        self.log_k += np.log1p(np.outer(xs - self.m, self.lams)).sum(axis=0)
        self.n += xs.size
        self.total += float(xs.sum())

    @property
    def log_e(self) -> float:
        top = float(self.log_k.max())
        return top + math.log(float(np.exp(self.log_k - top).sum())) - math.log(len(self.log_k))


def dkw_radius(n: int, a: float) -> float:
    """eps with P(exists n >= 1: sup |F_n - F| > eps_n) <= a: Massart's DKW at level a_n = 6 a / (pi^2 n^2)."""
    if n <= 0:
        return 1.0
    return min(1.0, math.sqrt(math.log(math.pi**2 * n * n / (3.0 * a)) / (2.0 * n)))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """sup_t |F_a(t) - F_b(t)| of two samples (scipy.stats.ks_2samp's statistic)."""
    if a.size == 0 or b.size == 0:
        return 0.0
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def _e_value(log_e: float) -> float:
    if math.isnan(log_e):
        return 0.0
    return max(min(math.exp(min(log_e, 690.0)) if log_e > -745.0 else 0.0, 1e300), 0.0)


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=str, separators=(",", ":"))
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


class ShadowAnalysis:
    """Sequential paired comparison: feed it each window's `MirroredPair`s with `observe`."""

    def __init__(self, tolerances: ShadowTolerances, started_at: float) -> None:
        t = self.tolerances = tolerances
        self.started_at = self._last_data_at = float(started_at)
        self._final: Verdict | None = None
        self.windows = self.missing_windows = 0
        self.pairs = self.compared = self.rows = 0
        self.candidate_errors = self.stable_errors = self.candidate_slow = self.candidate_answered = 0
        self.latency_pairs = self.candidate_slower = 0  # pairs with both latencies; candidate beyond the tolerance
        self.flips = 0
        self.abs_diff_total = 0.0
        self._stable_values: list[np.ndarray] = []
        self._candidate_values: list[np.ndarray] = []
        self._top: list[tuple[tuple[int, float], int, dict]] = []  # min-heap of the most disagreeing rows
        self._counter = 0
        shares = dict(REJECT_ALPHA_SHARES)
        if not t.compare_predictions:  # health only: the predictions' share goes to the health tests
            shares = {name: share / (1.0 - shares["predictions"]) for name, share in shares.items()}
        # reject tests (H0: within tolerance) and pass tests (H0: outside tolerance)
        self._reject: dict[str, Any] = {
            "error_slo": BernoulliSLOTest(t.max_error_rate, "above"),
            "errors_vs_stable": BernoulliSLOTest(0.5, "above"),
            "latency_slo": BernoulliSLOTest(P95_SLOW_SHARE, "above"),
            "slow_vs_stable": BernoulliSLOTest(0.5, "above"),
            "latency_vs_stable": BernoulliSLOTest(0.5, "above"),
        }
        self._reject_alpha = {name: shares[name] * t.alpha for name in self._reject}
        self._pass: dict[str, Any] = {
            "error_slo_met": BernoulliSLOTest(t.max_error_rate, "below"),
            "latency_slo_met": BernoulliSLOTest(P95_SLOW_SHARE, "below"),
        }
        if t.classifier:
            self._reject["flip_rate"] = BernoulliSLOTest(t.max_flip_rate, "above")
            self._reject_alpha["flip_rate"] = shares["predictions"] * t.alpha
            self._pass["flip_rate_met"] = BernoulliSLOTest(t.max_flip_rate, "below")
        elif t.compare_predictions:
            m = t.max_mean_abs_diff / t.diff_cap
            self._reject["mean_abs_diff"] = BoundedMeanTest(m, "above")
            self._reject_alpha["mean_abs_diff"] = shares["predictions"] / 2 * t.alpha
            self._pass["mean_abs_diff_met"] = BoundedMeanTest(m, "below")
            # the KS bands: half of the test's share for each revision's CDF
            self._reject_alpha["ks_distance"] = shares["predictions"] / 2 * t.alpha
        self._log_e: dict[str, float] = {}

    @property
    def finished(self) -> bool:
        return self._final is not None

    # ---- feeding ----------------------------------------------------------------------------------------------
    def _ingest(self, pairs: list[MirroredPair]) -> None:
        t = self.tolerances
        errors_c = errors_s = disc_err_c = disc_err = slow_c = answered = disc_slow_c = disc_slow = 0
        timed = slower = flips = rows = 0
        diffs: list[np.ndarray] = []
        for pair in pairs:
            self.pairs += 1
            c_err, s_err = bool(pair.candidate_error), bool(pair.stable_error)
            errors_c += c_err
            errors_s += s_err
            if c_err != s_err:
                disc_err += 1
                disc_err_c += c_err
            if pair.candidate_status and not c_err:
                answered += 1
                c_slow = bool(pair.candidate_latency_s > t.max_p95_latency_s)
                s_slow = bool(pair.stable_latency_s > t.max_p95_latency_s)
                slow_c += c_slow
                if c_slow != s_slow and not s_err:
                    disc_slow += 1
                    disc_slow_c += c_slow
                if not s_err and pair.stable_latency_s > 0 and pair.candidate_latency_s > 0:
                    timed += 1
                    limit = t.latency_ratio_tolerance * pair.stable_latency_s + t.latency_margin_s
                    slower += bool(pair.candidate_latency_s > limit)
            if not pair.compared or c_err:
                continue
            self.compared += 1
            if not t.compare_predictions:
                continue
            s = np.asarray(pair.stable, dtype=float)
            c = np.asarray(pair.candidate, dtype=float)
            d = np.abs(s - c)
            rows += d.size
            diffs.append(d)
            self._stable_values.append(s)
            self._candidate_values.append(c)
            if t.classifier:
                flipped = (s >= t.threshold) != (c >= t.threshold)
                flips += int(flipped.sum())
            else:
                flipped = np.zeros(d.size, dtype=bool)
            self._keep_top(pair, s, c, d, flipped)
        self.candidate_errors += errors_c
        self.stable_errors += errors_s
        self.candidate_slow += slow_c
        self.candidate_answered += answered
        self.latency_pairs += timed
        self.candidate_slower += slower
        self.flips += flips
        self.rows += rows
        self._reject["error_slo"].update(errors_c, len(pairs))
        self._pass["error_slo_met"].update(errors_c, len(pairs))
        self._reject["errors_vs_stable"].update(disc_err_c, disc_err)
        self._reject["latency_slo"].update(slow_c, answered)
        self._pass["latency_slo_met"].update(slow_c, answered)
        self._reject["slow_vs_stable"].update(disc_slow_c, disc_slow)
        self._reject["latency_vs_stable"].update(slower, timed)
        if t.classifier:
            self._reject["flip_rate"].update(flips, rows)
            self._pass["flip_rate_met"].update(flips, rows)
        elif diffs:
            d = np.concatenate(diffs)
            self.abs_diff_total += float(d.sum())
            x = np.minimum(d, t.diff_cap) / t.diff_cap
            self._reject["mean_abs_diff"].update(x)
            self._pass["mean_abs_diff_met"].update(x)

    def _keep_top(self, pair: MirroredPair, s: np.ndarray, c: np.ndarray, d: np.ndarray, flipped: np.ndarray) -> None:
        order = np.lexsort((d, flipped))[::-1][:TOP_DISAGREEMENTS]
        for i in order:
            if d[i] == 0 and not flipped[i]:
                break
            key = (int(flipped[i]), float(d[i]))
            if len(self._top) == TOP_DISAGREEMENTS and key <= self._top[0][0]:
                break
            row = {
                "request": pair.seq,
                "row": int(i),
                "stable": float(s[i]),
                "candidate": float(c[i]),
                "abs_diff": float(d[i]),
                "flip": bool(flipped[i]),
                "input": pair.rows[i] if i < len(pair.rows) else None,
            }
            self._counter += 1
            item = (key, self._counter, row)
            if len(self._top) < TOP_DISAGREEMENTS:
                heapq.heappush(self._top, item)
            else:
                heapq.heapreplace(self._top, item)

    def _ks(self) -> dict[str, float]:
        """The KS distance of the two prediction distributions with its time-uniform band."""
        t = self.tolerances
        s = np.concatenate(self._stable_values) if self._stable_values else np.zeros(0)
        c = np.concatenate(self._candidate_values) if self._candidate_values else np.zeros(0)
        d = ks_distance(s, c)
        n = s.size
        reject_a = self._reject_alpha["ks_distance"] / 2
        reject_radius = 2 * dkw_radius(n, reject_a)
        pass_radius = 2 * dkw_radius(n, t.promote_alpha / 2)
        return {"distance": d, "reject_lower": d - reject_radius, "pass_upper": d + pass_radius, "n": n}

    # ---- deciding ---------------------------------------------------------------------------------------------
    def observe(self, pairs: list[MirroredPair] | None, now: float) -> Verdict:
        """Take one window's new pairs (None when the router could not be read) and decide."""
        if self._final is not None:
            return self._final
        t = self.tolerances
        if not pairs:
            self.missing_windows += 1
            silent = max(0.0, float(now) - self._last_data_at)
            what = "the router's mirrored pairs could not be read" if pairs is None else "no mirrored requests in the window"
            if silent > t.no_data_deadline_s:
                reason = f"No shadow data for {silent:.0f} s ({what}), past the {t.no_data_deadline_s:g} s deadline."
                return self._finish(Decision.ROLLBACK, reason, now, ["no_data_deadline"])
            reason = f"Holding: {what} for {silent:.0f} s (deadline {t.no_data_deadline_s:g} s)."
            return Verdict(Decision.HOLD, reason, 0, self._evidence(now, [], silent_for=silent))
        self._last_data_at = max(self._last_data_at, float(now))
        self.windows += 1
        self._ingest(pairs)
        self._log_e = {name: test.log_e for name, test in {**self._reject, **self._pass}.items()}
        ks = None if t.classifier or not t.compare_predictions else self._ks()
        fired = [n for n, test in self._reject.items() if self._log_e[n] >= math.log(1.0 / self._reject_alpha[n])]
        if ks is not None and ks["reject_lower"] > t.max_ks_distance:
            fired.append("ks_distance")
        if fired:
            reason = f"Rejected: {', '.join(_DESCRIPTIONS[n] for n in fired)} ({self._summary()})."
            return self._finish(Decision.ROLLBACK, reason, now, fired, ks=ks)
        met = {name: self._log_e[name] >= math.log(1.0 / t.promote_alpha) for name in self._pass}
        if ks is not None:
            met["ks_distance_met"] = ks["pass_upper"] <= t.max_ks_distance
        enough = self.compared >= t.min_requests
        if enough and all(met.values()):
            reason = f"Passed: the candidate is credibly within every tolerance ({self._summary()})."
            return self._finish(Decision.PROMOTE, reason, now, [], ks=ks)
        missing = [] if enough else [f"{self.compared}/{t.min_requests} requests compared"]
        missing += [f"{_DESCRIPTIONS[n]} not yet shown" for n, ok in met.items() if not ok]
        reason = f"Continuing: {', '.join(missing)} ({self._summary()})."
        return Verdict(Decision.CONTINUE, reason, 0, self._evidence(now, [], ks=ks))

    def _finish(self, decision: Decision, reason: str, now: float, fired: list[str], ks=None) -> Verdict:
        self._final = Verdict(decision, reason, 0, self._evidence(now, fired, ks=ks, final=decision.value))
        return self._final

    # ---- evidence ---------------------------------------------------------------------------------------------
    def estimates(self) -> dict[str, float | None]:
        rate = lambda k, n: k / n if n else None  # noqa: E731
        est: dict[str, float | None] = {
            "candidate_error_rate": rate(self.candidate_errors, self.pairs),
            "stable_error_rate": rate(self.stable_errors, self.pairs),
            "candidate_slow_share": rate(self.candidate_slow, self.candidate_answered),
            # the share of pairs where the candidate took longer than the tolerance allows of stable's latency
            "candidate_slower_share": rate(self.candidate_slower, self.latency_pairs),
        }
        if self.tolerances.classifier:
            est["flip_rate"] = rate(self.flips, self.rows)
        elif self.tolerances.compare_predictions:
            est["mean_abs_diff"] = rate(self.abs_diff_total, self.rows)
        return est

    def _summary(self) -> str:
        est = self.estimates()
        parts = [
            f"{self.compared} requests, {self.rows} rows compared"
            if self.tolerances.compare_predictions
            else f"{self.pairs} requests"
        ]
        if self.tolerances.classifier:
            parts.append(f"{self.flips} decisions flipped ({(est['flip_rate'] or 0):.2%})")
        elif self.tolerances.compare_predictions:
            parts.append(f"mean |diff| {(est['mean_abs_diff'] or 0):.4g}")
        parts.append(f"candidate errors {self.candidate_errors}/{self.pairs}")
        return "; ".join(parts)

    def disagreements(self) -> list[dict]:
        """The rows that disagree most so far (flips first, then by absolute difference)."""
        return [row for _, _, row in sorted(self._top, reverse=True)]

    def disagreement_table(self) -> str:
        if not self.tolerances.compare_predictions:
            return "predictions not compared: the candidate's health only"
        lines = [
            "| mirrored request | row | stable | candidate | abs diff | flip | input |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.disagreements():
            lines.append(
                f"| {r['request']} | {r['row']} | {r['stable']:.4g} | {r['candidate']:.4g} | {r['abs_diff']:.4g} "
                f"| {'yes' if r['flip'] else 'no'} | `{_short(r['input'])}` |"
            )
        return "\n".join(lines) if len(lines) > 2 else "no disagreement: every compared prediction was identical"

    def _evidence(self, now: float, fired: list[str], ks=None, **extra: Any) -> dict:
        t = self.tolerances
        evidence: dict[str, Any] = {
            "mode": "classifier" if t.classifier else "scores" if t.compare_predictions else "health",
            "pairs": self.pairs,
            "compared_requests": self.compared,
            "compared_rows": self.rows,
            "flips": self.flips,
            "candidate_errors": self.candidate_errors,
            "stable_errors": self.stable_errors,
            "candidate_slow": self.candidate_slow,
            "latency_pairs": self.latency_pairs,
            "candidate_slower": self.candidate_slower,
            "estimates": self.estimates(),
            "e_values": {name: _e_value(v) for name, v in self._log_e.items()},
            "reject_e_value_thresholds": {n: 1.0 / a for n, a in self._reject_alpha.items() if n != "ks_distance"},
            "pass_e_value_threshold": 1.0 / t.promote_alpha,
            "fired": list(fired),
            "windows": self.windows,
            "missing_windows": self.missing_windows,
            "elapsed_s": round(max(0.0, float(now) - self.started_at), 3),
            "tolerances": asdict(t),
            "disagreements": self.disagreements(),
            "disagreements_table": self.disagreement_table(),
        }
        if ks is not None:
            evidence["ks_distance"] = ks
        evidence.update(extra)
        return evidence


_DESCRIPTIONS = {
    "flip_rate": "decision-flip rate above its tolerance",
    "flip_rate_met": "decision-flip rate within its tolerance",
    "mean_abs_diff": "mean absolute difference of the predictions above its tolerance",
    "mean_abs_diff_met": "mean absolute difference within its tolerance",
    "ks_distance": "distribution of the predictions (KS distance) further than its tolerance",
    "ks_distance_met": "distribution of the predictions (KS distance) within its tolerance",
    "error_slo": "candidate error rate above the error SLO",
    "error_slo_met": "candidate error rate below the SLO",
    "errors_vs_stable": "candidate fails where stable answers",
    "latency_slo": "candidate p95 latency above the latency SLO",
    "latency_slo_met": "candidate p95 latency within the SLO",
    "slow_vs_stable": "candidate slower than stable on the same requests",
    "latency_vs_stable": "candidate latency beyond the tolerance of stable's on the same requests",
}
