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

(4) low traffic: a healthy canary (0.1% errors, like the baseline) on a service at 2 req/s, for at most 2 hours.
    Figure: seconds to promotion, median over all runs (a run still undecided at 2 hours counts as 2 hours, so the
    median is a lower bound when more than half are undecided). The baseline's record is the hour before the canary
    at the same rate (the stable revision's counters when the canary is deployed; what `run_canary` passes).
    - ours: `CanaryAnalysis` with default `Thresholds()`: at low traffic it replaces the declared steps by one step
      whose share decides within `decision_budget_s` (see the analysis's "Low traffic").
    - ours_declared (the figure before the change, printed for the record): the same with the adaptation off
      (`decision_budget_s` unreachable): the declared 5/25/50 steps, fresh evidence at each step.
    - flagger_like: the scheduler of (1)-(3) at 2 req/s: a check every minute on the last minute's 6 or so canary
      requests. Its failure modes at low traffic: with so few requests one failed request is a 17% error rate, so a
      healthy canary occasionally fails a check, while a canary failing 2% of requests passes 89% of its checks and
      is promoted; a minute with no canary request is "no values found", a failed check (some Flagger versions count
      it as a pass, fluxcd/flagger 1035, 1689, 1098). It decides in 3 minutes on about 18 canary requests.
    The same canary failing 2% of requests at 2 req/s (failed user requests before rollback) and a healthy one's false
    rollbacks at 2 req/s are printed too: the low-traffic schedule must keep both.
(5) relative latency at 100 req/s, normal step schedule, 10 minutes: baseline latencies log-normal with median 40 ms
    and sigma 0.35 (p95 71 ms), bucketed as the router buckets them (its LATENCY_BUCKETS); detect: the canary's
    latencies are 1.5x the baseline's (p95 107 ms, inside the 0.5 s SLO); figure: share rolled back within 10 minutes.
    false_rollback: identical latencies, watched for 10 minutes at a fixed 50% share (promotion disabled). Default
    tolerance: latency_ratio_tolerance 1.2, latency_margin_s 2 ms.

Run: python bench/canary.py [--runs-bad 1000] [--runs-healthy 2000] [--runs-promote 1000] [--runs-low 400]
     [--runs-latency 400] [--seed 20240611]
Final lines:
  bad_canary_failed_requests ours=<median> flagger_like=<median> guide=<median>
  healthy_false_rollback ours=<rate> flagger_like=<rate>
  healthy_time_to_promote_s ours=<median> flagger_like=<median>
  low_traffic_2rps_time_to_promote_s ours=<median> flagger_like=<median>
  relative_latency detect=<share> false_rollback=<share>
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
from mlops_assets.servers.router import LATENCY_BUCKETS  # noqa: E402

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
    evidence: dict | None = None


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


@dataclass
class Stream:
    """One run's requests, in time order: second, routing / failure / slowness uniforms, baseline latency."""

    second: np.ndarray
    u_route: np.ndarray
    u_fail: np.ndarray
    slow: np.ndarray
    latency: np.ndarray


def make_stream(rng: np.random.Generator, rate: float, seconds: int, latency_median_s: float = 0.04) -> Stream:
    per_second = rng.poisson(rate, seconds)
    sec = np.repeat(np.arange(seconds), per_second)
    latency = latency_median_s * np.exp(0.35 * rng.standard_normal(sec.size))
    return Stream(sec, rng.random(sec.size), rng.random(sec.size), rng.random(sec.size) < SLOW_SHARE, latency)


BOUNDS = np.array([*LATENCY_BUCKETS, np.inf])


def histogram(latency: np.ndarray) -> tuple[tuple[float, int], ...]:
    """Cumulative bucket counts (le, requests at or below le), as the router exports them."""
    counts = np.searchsorted(np.sort(latency), BOUNDS, side="right")
    return tuple((float(le), int(n)) for le, n in zip(BOUNDS, counts, strict=True))


def run_stream(
    stream: Stream,
    thresholds: Thresholds,
    p_canary: float,
    p_base: float,
    *,
    every: int = OBSERVE_EVERY_S,
    record: tuple[int, int] = (0, 0),
    latency_factor: float = 1.0,
    buckets: bool = False,
    carried: tuple[int, int, int, int] | None = None,
) -> Outcome:
    """Ours on a request stream with whatever share the analysis asks for (the low-traffic schedule picks its own);
    `carried`: (requests, errors, answered, slow) of a shadow phase whose SLO proof the first step starts from."""
    horizon = int(stream.second[-1]) + 1 if stream.second.size else 0
    analysis = CanaryAnalysis(thresholds, started_at=0.0, baseline_record=record)
    if carried is not None:
        analysis.carry_slo_proof(*carried)
    edges = np.searchsorted(stream.second, np.arange(0, horizon + every, every))
    failed = 0
    for w in range(len(edges) - 1):
        lo, hi = edges[w], edges[w + 1]
        to_canary = stream.u_route[lo:hi] < analysis.percent / 100.0
        to_base = ~to_canary
        fail = stream.u_fail[lo:hi]
        slow = stream.slow[lo:hi]
        k_c = int(np.count_nonzero(to_canary & (fail < p_canary)))
        failed += k_c
        counts = WindowCounts(
            int(to_canary.sum()),
            k_c,
            int(np.count_nonzero(to_canary & slow)),
            int(to_base.sum()),
            int(np.count_nonzero(to_base & (fail < p_base))),
            int(np.count_nonzero(to_base & slow)),
            histogram(stream.latency[lo:hi][to_canary] * latency_factor) if buckets else (),
            histogram(stream.latency[lo:hi][to_base]) if buckets else (),
        )
        verdict = analysis.observe(counts, now=float((w + 1) * every))
        if verdict.decision in (Decision.ROLLBACK, Decision.PROMOTE):
            return Outcome(verdict.decision.value, float((w + 1) * every), failed, verdict.evidence)
    return Outcome("none", float(horizon), failed)


def run_shadow_phase(rng: np.random.Generator, rate: float, p_fail: float, every: int = OBSERVE_EVERY_S):
    """A shadow at 100% mirroring before the canary (`shadow_then_canary`), health only (identical predictions pass
    the comparison after a few hundred rows, sooner than the error SLO's proof): `ShadowAnalysis` fed each window's
    mirrored requests, both revisions failing at `p_fail`. (seconds to its pass, its counts) or (horizon, None)."""
    from mlops_assets.core.rollout.shadow import MirroredPair, ShadowAnalysis, ShadowTolerances

    t = Thresholds()
    analysis = ShadowAnalysis(
        ShadowTolerances(compare_predictions=False, max_error_rate=t.max_error_rate, min_requests=200), started_at=0.0
    )
    for w in range(1, LOW_HORIZON_S // every + 1):
        n = int(rng.poisson(rate * every))
        fail_s, fail_c = rng.random(n) < p_fail, rng.random(n) < p_fail
        latency = rng.lognormal(np.log(0.04), 0.5, size=(2, n))
        pairs = [
            MirroredPair(0, 500 if fail_s[i] else 200, 500 if fail_c[i] else 200, latency[0, i], latency[1, i], [0.5], [0.5])
            for i in range(n)
        ]
        verdict = analysis.observe(pairs, float(w * every))
        if verdict.decision == Decision.PROMOTE:
            counts = (analysis.pairs, analysis.candidate_errors, analysis.candidate_answered, analysis.candidate_slow)
            return float(w * every), counts
        if verdict.decision == Decision.ROLLBACK:
            break
    return float(LOW_HORIZON_S), None


def run_flagger_stream(stream: Stream, p_canary: float, threshold: int = 5) -> Outcome:
    """Flagger's tick loop (as run_flagger) on a request stream."""
    horizon = int(stream.second[-1]) + 1
    levels, level, failed_checks, failed = LEVELS, 0, 0, 0
    t = FLAGGER_INTERVAL_S
    while t <= horizon:
        if failed_checks >= threshold:
            return Outcome("rollback", float(t), failed)
        lo, hi = np.searchsorted(stream.second, [t - FLAGGER_INTERVAL_S, t])
        to_canary = stream.u_route[lo:hi] < levels[level] / 100.0
        n, k = int(to_canary.sum()), int(np.count_nonzero(to_canary & (stream.u_fail[lo:hi] < p_canary)))
        failed += k
        if n == 0 or 100.0 * k / n > FLAGGER_MAX_ERROR_PCT:
            failed_checks += 1
        elif level + 1 < len(levels):
            level += 1
        else:
            return Outcome("promote", float(t), failed)
        t += FLAGGER_INTERVAL_S
    return Outcome("none", float(horizon), failed)


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
    ap.add_argument("--runs-low", type=int, default=400)
    ap.add_argument("--runs-latency", type=int, default=400)
    ap.add_argument("--only", choices=("all", "low", "latency"), default="all", help="run only the new scenarios")
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    default = Thresholds()
    watch_only = Thresholds(steps=(LEVELS[0],), min_requests_per_step=10**12)  # ours with promotion disabled
    t_start = time.perf_counter()
    if args.only != "all":
        (low_traffic if args.only == "low" else relative_latency)(rng, args)
        return

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
    low = low_traffic(rng, args)
    latency = relative_latency(rng, args)
    print(f"elapsed {time.perf_counter() - t_start:.1f} s")

    print(f"bad_canary_failed_requests ours={bad['ours']:g} flagger_like={bad['flagger_like']:g} guide={bad['guide']:g}")
    fr_ours, fr_flagger = rate_of(soak["ours"], "rollback"), rate_of(soak["flagger_like_t1"], "rollback")
    print(f"healthy_false_rollback ours={fr_ours:.4f} flagger_like={fr_flagger:.4f}")
    print(f"healthy_time_to_promote_s ours={ttp['ours']:g} flagger_like={ttp['flagger_like']:g}")
    print(f"low_traffic_2rps_time_to_promote_s ours={low['ours']:g} flagger_like={low['flagger_like']:g}")
    print(f"relative_latency detect={latency['detect']:.4f} false_rollback={latency['false_rollback']:.4f}")


LOW_RPS, LOW_HORIZON_S, RECORD_S = 2.0, 7200, 3600


def low_traffic(rng: np.random.Generator, args: argparse.Namespace) -> dict[str, float]:
    """(4): a healthy canary at 2 req/s, and a bad one and false rollbacks at the same rate."""
    default = Thresholds()
    declared = Thresholds(decision_budget_s=1e12)  # the adaptation off: the schedule before it
    res: dict[str, list[Outcome]] = {"ours": [], "ours_declared": [], "flagger_like": []}
    after_shadow: list[Outcome] = []  # shadow_then_canary: the shadow's SLO proof carried into the canary
    bad: dict[str, list[Outcome]] = {"ours": [], "ours_no_record": [], "flagger_like": []}
    for _ in range(args.runs_low):
        record_n = int(rng.poisson(LOW_RPS * RECORD_S))
        record = (record_n, int(rng.binomial(record_n, 0.001)))
        healthy = make_stream(rng, LOW_RPS, LOW_HORIZON_S)
        res["ours"].append(run_stream(healthy, default, 0.001, 0.001, record=record))
        res["ours_declared"].append(run_stream(healthy, declared, 0.001, 0.001, record=record))
        res["flagger_like"].append(run_flagger_stream(healthy, 0.001))
        shadow_s, carried = run_shadow_phase(rng, LOW_RPS, 0.001)
        if carried is not None:
            out = run_stream(healthy, default, 0.001, 0.001, record=record, carried=carried)
            after_shadow.append(Outcome(out.decision, out.t_s + shadow_s, out.failed, out.evidence))
        broken = make_stream(rng, LOW_RPS, LOW_HORIZON_S)
        bad["ours"].append(run_stream(broken, default, 0.02, 0.001, record=record))
        bad["ours_no_record"].append(run_stream(broken, default, 0.02, 0.001))
        bad["flagger_like"].append(run_flagger_stream(broken, 0.02))
    print(f"(4) low traffic, 2 req/s, baseline record of 1 h, horizon 2 h, {args.runs_low} runs")
    print("  healthy canary (0.1% errors):")
    for name, outs in res.items():
        print(describe(name, outs), f"false_rollback={rate_of(outs, 'rollback'):.4f} undecided={rate_of(outs, 'none'):.3f}")
    shares = [o.evidence["schedule"]["steps"][0] for o in res["ours"] if o.evidence and o.evidence.get("schedule")]
    expected = [o.evidence.get("expected_decision_s") for o in res["ours"] if o.evidence]
    print(f"  ours: low-traffic share median={median(shares):g}%")
    print(f"  ours: expected_decision_s at promotion: {sum(e is not None for e in expected)} of {len(expected)} reported")
    exposed = lambda outs: median([o.evidence["cumulative"]["canary_requests"] for o in outs if o.decision == "promote"])  # noqa: E731
    print(describe("shadow_then_canary", after_shadow), f"({len(after_shadow)} shadows passed of {args.runs_low})")
    print(
        f"  users exposed to the candidate until its promotion (median canary requests): ours={exposed(res['ours']):g} "
        f"shadow_then_canary={exposed(after_shadow):g} (the shadow's proof carried: the canary only needs "
        f"{Thresholds().min_requests_per_step} users served with no rollback test firing)"
    )
    print("  canary failing 2% of requests (baseline 0.1%):")
    for name, outs in bad.items():
        print(describe(name, outs))
    return {name: median([o.t_s for o in outs]) for name, outs in res.items()}


def relative_latency(rng: np.random.Generator, args: argparse.Namespace) -> dict[str, float]:
    """(5): a canary 1.5x slower than the baseline (inside the SLO) and an identical one, at 100 req/s."""
    default = Thresholds()
    watch_half = Thresholds(steps=(50,), min_requests_per_step=10**12)
    slow: list[Outcome] = []
    same: list[Outcome] = []
    for _ in range(args.runs_latency):
        stream = make_stream(rng, 100.0, 600)
        slow.append(run_stream(stream, default, 0.001, 0.001, latency_factor=1.5, buckets=True))
        same.append(run_stream(make_stream(rng, 100.0, 600), watch_half, 0.001, 0.001, buckets=True))
    print(f"(5) relative latency, 100 req/s, 10 minutes, {args.runs_latency} runs")
    print(describe("canary 1.5x slower", slow))
    print(describe("identical, 50% watch", same))
    fired: dict[str, int] = {}
    for o in slow:
        for name in (o.evidence or {}).get("fired", []) if o.decision == "rollback" else []:
            fired[name] = fired.get(name, 0) + 1
    print(f"  tests that fired on the slower canary: {fired}")
    return {"detect": rate_of(slow, "rollback"), "false_rollback": rate_of(same, "rollback")}


if __name__ == "__main__":
    main()
