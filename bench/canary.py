"""Canary analysis: failed requests before rollback, false rollbacks, time to promote; ours vs Flagger vs the guide.

What it measures, on simulated request streams (seeded; every method sees the SAME requests in a run):
(1) bad canary: the canary fails 2% of requests, the baseline 0.1%; 100 req/s, the canary starts at 5%.
    Figure: canary requests that failed before the method rolled the canary back (median over runs).
(2) healthy canary: both fail 0.1% of requests; 10 req/s; 30 minutes. Figure: share of runs rolled back.
    Two variants, both printed:
    - soak (the figure on the final line): the canary is watched at a fixed 5% share for 30 minutes, i.e.
      Flagger's fixed-traffic analysis mode (`iterations: 30`, `interval: 1m`, as in its A/B or blue/green
      strategies), and ours with promotion disabled (`min_requests_per_step` unreachable), so both look at a
      healthy canary for the whole 30 minutes. This is the "looks again and again" case.
    - rollout: each method runs its normal step schedule (5% -> 25% -> 50% -> promote) and the run ends at
      promotion, rollback or 30 minutes. Flagger promotes after 3 passing 1-minute checks, so it looks only
      3 times; ours takes longer at 10 req/s (it must show the SLOs are met on each step's own traffic).
(3) healthy canary at 100 req/s, normal step schedule: seconds from the start of the canary to promotion
    (median over the runs that promoted; rollbacks are counted apart).

Methods
- ours: `mlops_assets.core.rollout.analysis.CanaryAnalysis` with default `Thresholds()` (alpha 0.01, promote_alpha
  0.05, error SLO 1%, steps 5/25/50, 100 requests per step), observing one window of counts every
  OBSERVE_EVERY_S = 5 seconds (a Prometheus-like cadence; (1) is also run at 1 s and printed for information).
- flagger_like: Flagger's canary scheduler as in fluxcd/flagger `pkg/controller/scheduler.go`: a tick every
  60 s; at a tick, if failed checks >= threshold the canary is rolled back (so rollback happens one interval
  after the failing check that reaches the threshold); otherwise the metric check runs on the last minute of
  canary traffic: error rate > 1% (`request-success-rate` with `thresholdRange.min: 99`), or no canary request
  at all ("no values found"), is a failed check (counter +1, no advance); a passing check advances the weight
  to the next of `stepWeights: [5, 25, 50]` or, at 50%, promotes. Failed checks are not reset by passing ones.
  Threshold 5 (the issue's setting) in (1) and (3); in (2) its default threshold of 1 for the final line (the
  issue quotes the default for this case), with threshold 5 printed as well.
- guide: the source guide's rule: every 10 minutes, the canary's average error rate over the last 10
  minutes is compared with the 1% threshold and with the baseline's 10-minute average; above either ->
  rollback (the baseline, at 0.1%, never binds before the threshold here).

How the streams are made: per second, Poisson(rate) requests; each request gets three uniforms (routing,
failure, slowness). A method whose canary share is s sends the request to the canary when u_route < s; the
request fails when u_fail is below its revision's error rate, and is slow when u_slow is below the slow share
(0.1% for both revisions in every scenario: latency is healthy; only errors differ). So all methods face the
same requests, and a request that fails on the baseline would also fail on the (worse) canary. Slow requests
only matter to ours (Flagger and the guide are modelled with their error check only, which favours them).

Run: python bench/canary.py [--runs-bad 1000] [--runs-healthy 2000] [--runs-promote 1000] [--seed 20240611]
Final lines:
  bad_canary_failed_requests ours=<median> flagger_like=<median> guide=<median>
  healthy_false_rollback ours=<rate> flagger_like=<rate>
  healthy_time_to_promote_s ours=<median> flagger_like=<median>
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_assets.core.rollout.analysis import CanaryAnalysis, Decision, Thresholds, WindowCounts  # noqa: E402

LEVELS = (5, 25, 50)  # canary percents of the step schedule (Flagger's stepWeights and our Thresholds.steps)
OBSERVE_EVERY_S = 5
FLAGGER_INTERVAL_S = 60
FLAGGER_MAX_ERROR_PCT = 1.0
GUIDE_WINDOW_S = 600
GUIDE_MAX_ERROR_RATE = 0.01
SLOW_SHARE = 0.001
FIELDS = ("canary_requests", "canary_errors", "canary_slow", "baseline_requests", "baseline_errors", "baseline_slow")


@dataclass
class Outcome:
    decision: str  # "rollback", "promote" or "none" (no decision within the horizon)
    t_s: float  # time of the decision (horizon when none)
    failed: int  # canary requests that failed before the decision


def simulate(rng: np.random.Generator, rate: float, seconds: int, p_canary: float, p_base: float) -> np.ndarray:
    """Cumulative per-second counts for every canary level: shape (len(LEVELS), 6, seconds + 1), index 0 = zeros."""
    per_second = rng.poisson(rate, seconds)
    sec = np.repeat(np.arange(seconds), per_second)
    u_route = rng.random(sec.size)
    u_fail = rng.random(sec.size)
    slow = rng.random(sec.size) < SLOW_SHARE
    fail_c = u_fail < p_canary
    fail_b = u_fail < p_base
    out = np.zeros((len(LEVELS), 6, seconds + 1), dtype=np.int64)
    for i, pct in enumerate(LEVELS):
        to_canary = u_route < pct / 100.0
        to_base = ~to_canary
        for j, mask in enumerate((to_canary, to_canary & fail_c, to_canary & slow, to_base, to_base & fail_b, to_base & slow)):
            out[i, j, 1:] = np.cumsum(np.bincount(sec[mask], minlength=seconds))
    return out


def window(cum: np.ndarray, level: int, t0: int, t1: int) -> np.ndarray:
    return cum[level, :, t1] - cum[level, :, t0]


def run_ours(cum: np.ndarray, thresholds: Thresholds, every: int) -> Outcome:
    horizon = cum.shape[2] - 1
    analysis = CanaryAnalysis(thresholds, started_at=0.0)
    failed = 0
    t = 0
    while t + every <= horizon:
        level = LEVELS.index(analysis.percent)
        w = window(cum, level, t, t + every)
        failed += int(w[1])
        t += every
        verdict = analysis.observe(WindowCounts(*(int(x) for x in w)), now=float(t))
        if verdict.decision in (Decision.ROLLBACK, Decision.PROMOTE):
            return Outcome(verdict.decision.value, float(t), failed)
    return Outcome("none", float(horizon), failed)


def failed_until(cum: np.ndarray, changes: list[tuple[int, int]], t_end: int) -> int:
    """Canary failures served from 0 to t_end, given the (start second, level) changes of a method's traffic."""
    total = 0
    for k, (start, level) in enumerate(changes):
        stop = min(changes[k + 1][0] if k + 1 < len(changes) else t_end, t_end)
        if stop > start:
            total += int(cum[level, 1, stop] - cum[level, 1, start])
    return total


def run_flagger(cum: np.ndarray, threshold: int, advance: bool = True) -> Outcome:
    """Flagger's tick loop; advance=False models its fixed-traffic `iterations` mode (no weight change, no promotion)."""
    horizon = cum.shape[2] - 1
    level = 0
    changes = [(0, 0)]
    failed_checks = 0
    t = FLAGGER_INTERVAL_S
    while t <= horizon:
        # scheduler.go: the threshold is checked at the start of a tick, before this tick's analysis.
        if failed_checks >= threshold:
            return Outcome("rollback", float(t), failed_until(cum, changes, t))
        w = window(cum, level, t - FLAGGER_INTERVAL_S, t)
        if w[0] == 0 or 100.0 * w[1] / w[0] > FLAGGER_MAX_ERROR_PCT:
            failed_checks += 1  # "no values found" and a failed threshold both count as failed checks
        elif advance:
            if level + 1 < len(LEVELS):
                level += 1
                changes.append((t, level))
            else:
                return Outcome("promote", float(t), failed_until(cum, changes, t))
        t += FLAGGER_INTERVAL_S
    return Outcome("none", float(horizon), failed_until(cum, changes, horizon))


def run_guide(cum: np.ndarray) -> Outcome:
    """10-minute averages at a fixed 5% canary share; rollback when the canary's average is above the threshold or
    above the baseline's average (whichever is higher), promotion never within these horizons."""
    horizon = cum.shape[2] - 1
    t = GUIDE_WINDOW_S
    while t <= horizon:
        w = window(cum, 0, t - GUIDE_WINDOW_S, t)
        canary_rate = w[1] / w[0] if w[0] else 0.0
        base_rate = w[4] / w[3] if w[3] else 0.0
        if canary_rate > max(GUIDE_MAX_ERROR_RATE, base_rate):
            return Outcome("rollback", float(t), failed_until(cum, [(0, 0)], t))
        t += GUIDE_WINDOW_S
    return Outcome("none", float(horizon), failed_until(cum, [(0, 0)], horizon))


def median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def rate_of(outcomes: list[Outcome], decision: str) -> float:
    return sum(o.decision == decision for o in outcomes) / len(outcomes)


def describe(name: str, outcomes: list[Outcome]) -> str:
    failed = np.array([o.failed for o in outcomes])
    times = np.array([o.t_s for o in outcomes])
    counts = {d: sum(o.decision == d for o in outcomes) for d in ("rollback", "promote", "none")}
    return (
        f"  {name:<22} decisions={counts} failed median={np.median(failed):g} mean={failed.mean():.2f} "
        f"p90={np.percentile(failed, 90):g} max={failed.max()} | "
        f"time median={np.median(times):g}s p90={np.percentile(times, 90):g}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-bad", type=int, default=1000)
    ap.add_argument("--runs-healthy", type=int, default=2000)
    ap.add_argument("--runs-promote", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    default = Thresholds()
    watch_only = Thresholds(steps=(LEVELS[0],), min_requests_per_step=10**12)  # ours with promotion disabled
    t_start = time.perf_counter()

    # (1) bad canary
    res: dict[str, list[Outcome]] = {"ours": [], "ours_1s": [], "flagger_like": [], "guide": []}
    for _ in range(args.runs_bad):
        cum = simulate(rng, 100.0, 1200, p_canary=0.02, p_base=0.001)
        res["ours"].append(run_ours(cum, default, OBSERVE_EVERY_S))
        res["ours_1s"].append(run_ours(cum, default, 1))
        res["flagger_like"].append(run_flagger(cum, threshold=5))
        res["guide"].append(run_guide(cum))
    print(f"(1) bad canary: 2% vs 0.1% errors, 100 req/s, canary at 5%, {args.runs_bad} runs")
    for name, outs in res.items():
        print(describe(name, outs))
    bad = {name: median([o.failed for o in outs]) for name, outs in res.items()}

    # (2) healthy canary, 10 req/s, 30 minutes
    soak: dict[str, list[Outcome]] = {"ours": [], "flagger_like_t1": [], "flagger_like_t5": []}
    roll: dict[str, list[Outcome]] = {"ours": [], "flagger_like_t1": [], "flagger_like_t5": []}
    for _ in range(args.runs_healthy):
        cum = simulate(rng, 10.0, 1800, p_canary=0.001, p_base=0.001)
        soak["ours"].append(run_ours(cum, watch_only, OBSERVE_EVERY_S))
        soak["flagger_like_t1"].append(run_flagger(cum, threshold=1, advance=False))
        soak["flagger_like_t5"].append(run_flagger(cum, threshold=5, advance=False))
        roll["ours"].append(run_ours(cum, default, OBSERVE_EVERY_S))
        roll["flagger_like_t1"].append(run_flagger(cum, threshold=1))
        roll["flagger_like_t5"].append(run_flagger(cum, threshold=5))
    print(f"(2) healthy canary: 0.1% errors both, 10 req/s, 30 min, {args.runs_healthy} runs")
    print("  soak (fixed 5% share for 30 minutes, promotion disabled):")
    for name, outs in soak.items():
        print(describe(name, outs), f"false_rollback={rate_of(outs, 'rollback'):.4f}")
    print("  rollout (step schedule 5/25/50, run ends at promotion, rollback or 30 min):")
    for name, outs in roll.items():
        print(describe(name, outs), f"false_rollback={rate_of(outs, 'rollback'):.4f}")

    # (3) healthy canary, 100 req/s: time to promote
    prom: dict[str, list[Outcome]] = {"ours": [], "flagger_like": []}
    for _ in range(args.runs_promote):
        cum = simulate(rng, 100.0, 900, p_canary=0.001, p_base=0.001)
        prom["ours"].append(run_ours(cum, default, OBSERVE_EVERY_S))
        prom["flagger_like"].append(run_flagger(cum, threshold=5))
    print(f"(3) healthy canary: 0.1% errors both, 100 req/s, step schedule, {args.runs_promote} runs")
    for name, outs in prom.items():
        print(describe(name, outs))
    ttp = {name: median([o.t_s for o in outs if o.decision == "promote"]) for name, outs in prom.items()}
    print(f"elapsed {time.perf_counter() - t_start:.1f} s")

    print(f"bad_canary_failed_requests ours={bad['ours']:g} flagger_like={bad['flagger_like']:g} guide={bad['guide']:g}")
    fr_ours, fr_flagger = rate_of(soak["ours"], "rollback"), rate_of(soak["flagger_like_t1"], "rollback")
    print(f"healthy_false_rollback ours={fr_ours:.4f} flagger_like={fr_flagger:.4f}")
    print(f"healthy_time_to_promote_s ours={ttp['ours']:g} flagger_like={ttp['flagger_like']:g}")


if __name__ == "__main__":
    main()
