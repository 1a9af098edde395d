"""Rollout strategies as plain Python: canary, blue-green and A/B over any `ServingPlatform`.

Each strategy applies traffic changes with KServe semantics, reads per-revision counts from a
`MetricsSource`, lets the sequential analysis decide, and reports every traffic change through
`emit` with the evidence behind it (the Dagster layer turns those into asset events). Metrics that
cannot be read are never taken as success: the analysis holds and, past its deadline, rolls back.
A strategy never promotes on a timeout. Whatever goes wrong inside a strategy (an exception, the
run being interrupted, the candidate's server going down) leaves the candidate at 0% before the
strategy returns or raises: a canary never keeps traffic with nobody watching it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mlops_assets.core import http
from mlops_assets.core.rollout import bluegreen
from mlops_assets.core.rollout.analysis import CanaryAnalysis, Decision, Thresholds, Verdict, WindowCounts
from mlops_assets.core.rollout.shadow import MirroredPair, ShadowAnalysis, ShadowTolerances, pair_from_record
from mlops_assets.core.serving.metrics import MetricsSource, MetricsUnavailableError, RevisionCounts
from mlops_assets.core.serving.platform import ServiceStatus, ServingPlatform
from mlops_assets.core.settings import SHADOW_MAX_IN_FLIGHT

PROMOTED, ROLLED_BACK, UNCHANGED = "promoted", "rolled_back", "unchanged"


@dataclass
class RolloutEvent:
    kind: str  # canary_start, step, hold, promote, rollback, green_deployed, validated, switch, ab_start, ab_decision
    percent: int | None
    status: ServiceStatus | None  # None for a window's sample (`RolloutContext.sample`)
    evidence: dict
    elapsed_s: float
    #: Filled in by the runner: which rollout, and which model version it rolls out.
    rollout_id: str = ""
    candidate_version: str = ""


@dataclass
class RolloutResult:
    strategy: str
    outcome: str
    candidate_revision: str | None
    stable_revision: str | None
    #: Failed requests per revision during the rollout; None when the final metrics could not be
    #: read (unknown is not zero).
    candidate_failed_requests: int | None
    stable_failed_requests: int | None
    duration_s: float
    reason: str
    evidence: dict = field(default_factory=dict)


@dataclass
class RolloutContext:
    platform: ServingPlatform
    metrics: MetricsSource
    isvc: str
    emit: Callable[[RolloutEvent], None]
    log: Callable[[str], None] = print
    #: Receives the analysis's evidence after every window that had data, between the events `emit` gets (a
    #: canary watched every 2 s would be hundreds of asset events): the rollout chart's points in between.
    observe: Callable[[RolloutEvent], None] | None = None
    poll_s: float = 2.0
    timeout_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    started: float = 0.0
    #: Set by the strategy: the revision under test, and whether its fate was decided (promoted or
    #: rolled back on purpose) so the failure guard must not undo it.
    candidate: str | None = None
    stable_before: str | None = None
    candidate_crashes: int = 0  # the candidate's crash count when it was deployed
    decided: bool = False

    def elapsed(self) -> float:
        return self.clock() - self.started

    def event(self, kind: str, status: ServiceStatus, evidence: dict, percent: int | None = None) -> None:
        self.log(f"{self.isvc}: {kind} {'' if percent is None else f'-> {percent}% '}{evidence.get('reason', '')}")
        self.emit(RolloutEvent(kind, percent, status, evidence, round(self.elapsed(), 2)))

    def sample(self, kind: str, evidence: dict) -> None:
        """One window's evidence for `observe` (not an event: nothing is logged or emitted; the traffic share is
        the last event's)."""
        if self.observe is not None:
            self.observe(RolloutEvent(kind, None, None, evidence, round(self.elapsed(), 2)))

    def counts(self, url: str) -> dict[str, RevisionCounts] | None:
        try:
            return self.metrics.revision_counts(self.isvc, url)
        except MetricsUnavailableError as exc:
            self.log(f"{self.isvc}: metrics unavailable ({exc}); holding")
            return None
        except Exception as exc:  # noqa: BLE001 - any unreadable answer is "no data", never success
            self.log(f"{self.isvc}: metrics unavailable ({type(exc).__name__}: {exc}); holding")
            return None


class CandidateNotRolledBackError(RuntimeError):
    """A strategy failed and so did the rollback of its candidate: the rollout lock must stay
    taken, so the next rollout treats this one as dead and rolls the service back first."""


def guarded(strategy: Callable[..., RolloutResult]) -> Callable[..., RolloutResult]:
    """Run a strategy so that any exception (or interruption) inside it first rolls its candidate
    back to 0%, with an event saying why, then propagates."""

    def run(ctx: RolloutContext, *args, **kwargs) -> RolloutResult:
        try:
            return strategy(ctx, *args, **kwargs)
        except BaseException as exc:
            if ctx.candidate is None or ctx.decided:
                raise
            try:
                status = ctx.platform.status(ctx.isvc)
                if status.percent_of(ctx.candidate) > 0 and ctx.candidate != ctx.stable_before:
                    status = ctx.platform.rollback(ctx.isvc)
                    reason = f"{strategy.__name__} failed ({type(exc).__name__}: {exc}); candidate rolled back to 0%"
                    ctx.event("rollback", status, {"reason": reason, "failure": repr(exc)[:500]}, 0)
            except Exception as rollback_exc:
                raise CandidateNotRolledBackError(
                    f"{ctx.isvc}: {strategy.__name__} failed ({exc!r}) and rolling candidate {ctx.candidate} back "
                    f"failed too ({rollback_exc!r}); the next rollout of {ctx.isvc} will roll it back first"
                ) from exc
            raise

    run.__name__, run.__doc__ = strategy.__name__, strategy.__doc__
    return run


def _with_percent(manifest: dict, percent: int | None) -> dict:
    manifest = copy.deepcopy(manifest)
    if percent is None:
        manifest["spec"]["predictor"].pop("canaryTrafficPercent", None)
    else:
        manifest["spec"]["predictor"]["canaryTrafficPercent"] = percent
    return manifest


def _diff(now: dict[str, RevisionCounts], base: dict[str, RevisionCounts], rev: str) -> RevisionCounts:
    current = now.get(rev, RevisionCounts())
    earlier = base.get(rev, RevisionCounts())
    if current.requests < earlier.requests:  # the router restarted: its counters began again
        return current
    return current.minus(earlier)


def _window(now, before, candidate, stable, slow_s) -> WindowCounts:
    c, b = _diff(now, before, candidate), _diff(now, before, stable)
    return WindowCounts(
        canary_requests=c.requests,
        canary_errors=c.errors,
        canary_slow=c.slow_count(slow_s),
        baseline_requests=b.requests,
        baseline_errors=b.errors,
        baseline_slow=b.slow_count(slow_s),
        canary_buckets=tuple(sorted(c.buckets.items())),
        baseline_buckets=tuple(sorted(b.buckets.items())),
    )


def _failed(ctx: RolloutContext, start_counts, url: str, rev: str | None) -> int | None:
    """Failed requests on `rev` since `start_counts`; None when either snapshot is missing."""
    if rev is None:
        return 0
    now = ctx.counts(url)
    if now is None or start_counts is None:
        return None
    return _diff(now, start_counts, rev).errors


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _candidate_down(ctx: RolloutContext, candidate: str, crashes_before: int) -> str | None:
    """Why the candidate has failed without a single bad answer being counted (its server is down,
    or crashed and was restarted), or None."""
    try:
        status = ctx.platform.status(ctx.isvc)
    except Exception as exc:  # noqa: BLE001 - the platform's view is unavailable: hold, as with metrics
        ctx.log(f"{ctx.isvc}: status unavailable ({exc}); holding")
        return None
    info = status.revisions.get(candidate) or {}
    if info.get("status") in ("down", "failed"):
        return f"candidate revision {candidate} is {info['status']}: {status.message or 'its server is not running'}"
    if int(info.get("crashes", 0)) > crashes_before:
        return f"candidate revision {candidate} crashed during the rollout: {status.message or 'restarted'}"
    return None


def _watch(ctx: RolloutContext, analysis: CanaryAnalysis, candidate: str, stable: str, url: str, slow_s: float, on_step):
    """Feed windows to the analysis until it promotes or rolls back (or the run times out)."""
    before = ctx.counts(url)
    crashes_before = ctx.candidate_crashes if candidate == ctx.candidate else 0
    deadline = ctx.started + ctx.timeout_s
    while ctx.clock() < deadline:
        ctx.sleep(ctx.poll_s)
        now = ctx.counts(url)
        window = _window(now, before, candidate, stable, slow_s) if (now is not None and before is not None) else None
        verdict = analysis.observe(window, ctx.clock())
        if window is not None:
            ctx.sample("window", {"reason": verdict.reason, **verdict.evidence})
        if now is not None:
            before = now
        if verdict.decision in (Decision.PROMOTE, Decision.ROLLBACK):
            return verdict
        down = _candidate_down(ctx, candidate, crashes_before)
        if down is not None:
            # The router has ejected it and serves its share from the stable revision; a candidate that
            # crashes under real traffic has failed, so do not wait for the no-data deadline.
            return Verdict(Decision.ROLLBACK, down, 0, {**verdict.evidence, "fired": ["candidate_down"]})
        if verdict.decision == Decision.CONTINUE and on_step is not None:
            on_step(verdict)
    return None


def _deploy_candidate(
    ctx: RolloutContext, manifest: dict, percent: int, strategy: str
) -> tuple[ServiceStatus, str | None, str | None, RolloutResult | None]:
    """Apply `manifest` with `percent` of traffic on its revision: (status, candidate, stable, result), the
    result set (UNCHANGED) only when the manifest matches the serving revision, so there is nothing to roll out."""
    try:
        ctx.stable_before = ctx.platform.status(ctx.isvc).latest_rolledout
    except Exception:  # noqa: BLE001 - a first deployment has no stable revision
        ctx.stable_before = None
    ctx.candidate = None
    status = ctx.platform.apply(_with_percent(manifest, percent))
    candidate, stable = status.latest_ready, status.latest_rolledout
    if candidate != stable:
        ctx.candidate = candidate
        ctx.candidate_crashes = int((status.revisions.get(candidate) or {}).get("crashes", 0))
    if candidate == stable:
        return (
            status,
            candidate,
            stable,
            RolloutResult(strategy, UNCHANGED, candidate, stable, 0, 0, 0.0, "the manifest matches the serving revision"),
        )
    return status, candidate, stable, None


@guarded
def run_canary(
    ctx: RolloutContext, manifest: dict, thresholds: Thresholds, carried: bluegreen.MirroredHealth | None = None
) -> RolloutResult:
    """Ramp the new revision through `thresholds.steps`; promote or roll back on the evidence. `carried`: what a
    shadow phase of the same revision counted on mirrored requests, which its first step's SLO proof starts from."""
    ctx.started = ctx.clock()
    analysis = CanaryAnalysis(thresholds, started_at=ctx.clock())
    if carried is not None:
        analysis.carry_slo_proof(carried.requests, carried.errors, carried.answered, carried.slow, "shadow")
    status, candidate, stable, unchanged = _deploy_candidate(ctx, manifest, analysis.percent, "canary")
    if unchanged is not None:
        return unchanged
    start_counts = ctx.counts(status.url)
    if start_counts is not None and stable in start_counts:
        # The stable revision's counters so far are its record: at low traffic the canary is compared with it.
        analysis.record_baseline(start_counts[stable].requests, start_counts[stable].errors)
    ctx.event("canary_start", status, {"candidate": candidate, "stable": stable, "reason": "canary deployed"}, analysis.percent)
    current = {"percent": analysis.percent}

    def on_step(verdict) -> None:
        if verdict.percent != current["percent"]:
            current["percent"] = verdict.percent
            new_status = ctx.platform.set_canary_percent(ctx.isvc, verdict.percent)
            ctx.event("step", new_status, {"reason": verdict.reason, **verdict.evidence}, verdict.percent)

    verdict = _watch(ctx, analysis, candidate, stable, status.url, thresholds.max_p95_latency_s, on_step)
    if verdict is not None and verdict.decision == Decision.PROMOTE:
        status = ctx.platform.promote(ctx.isvc)
        outcome, kind, percent = PROMOTED, "promote", 100
    else:
        status = ctx.platform.rollback(ctx.isvc)
        outcome, kind, percent = ROLLED_BACK, "rollback", 0
    ctx.decided = True
    reason = verdict.reason if verdict is not None else f"no decision within {ctx.timeout_s:.0f}s: rolled back, never promoted"
    evidence = {"reason": reason, **(verdict.evidence if verdict is not None else {})}
    ctx.event(kind, status, evidence, percent)
    return RolloutResult(
        "canary",
        outcome,
        candidate,
        stable,
        _failed(ctx, start_counts, status.url, candidate),
        _failed(ctx, start_counts, status.url, stable),
        round(ctx.elapsed(), 2),
        reason,
        evidence,
    )


def _validation_answer(url: str, body: bytes, protocol: str, rows: int, timeout: float = 10.0) -> int:
    """One validation request: its HTTP status, or 0 for a 200 that is not one prediction per row in
    `protocol` (599: no answer at all)."""
    from mlops_assets.core.serving.payloads import predictions_in

    try:
        response = http.request(url, body=body, headers={"content-type": "application/json"}, timeout=timeout)
    except http.HttpUnavailableError:
        return 599
    if response.status != 200:
        return response.status
    try:
        answer = json.loads(response.body or b"{}")
    except ValueError:
        return 0
    return 200 if isinstance(answer, dict) and predictions_in(answer, protocol) == rows else 0


def _green_mirror_cursor(ctx: RolloutContext) -> tuple[int | None, str]:
    """Where the router's record of mirrored requests stands now, or None (with why) when the platform cannot mirror."""
    try:
        return int(ctx.platform.shadow_pairs(ctx.isvc).get("next", 0)), ""
    except NotImplementedError as exc:
        return None, str(exc)


def _watch_mirrored(
    ctx: RolloutContext, analysis: ShadowAnalysis, candidate: str, cursor: int, status: ServiceStatus, prefix: str
) -> tuple[Verdict | None, dict]:
    """Feed `analysis` the pairs the router mirrors, window by window, until it passes or rejects the candidate (or the
    candidate goes down, or the run times out: None). One `<prefix>_window` event per window with pairs, one
    `<prefix>_hold` when a stretch without begins. Returns the verdict and the router's mirroring counters."""
    verdict, router = None, {}
    while ctx.clock() < ctx.started + ctx.timeout_s:
        ctx.sleep(ctx.poll_s)
        pairs, cursor, batch = _shadow_window(ctx, cursor)
        router = {**batch, "lost": router.get("lost", 0) + batch["lost"]} if batch else router
        holding = verdict is not None and verdict.decision == Decision.HOLD
        verdict = analysis.observe(pairs, ctx.clock())
        if pairs or (verdict.decision == Decision.HOLD and not holding):
            kind = f"{prefix}_window" if pairs else f"{prefix}_hold"
            ctx.event(kind, status, {"reason": verdict.reason, **verdict.evidence, "router": router}, 0)
        if verdict.decision in (Decision.PROMOTE, Decision.ROLLBACK):
            return verdict, router
        down = _candidate_down(ctx, candidate, ctx.candidate_crashes)
        if down is not None:
            return Verdict(Decision.ROLLBACK, down, 0, {**verdict.evidence, "fired": ["candidate_down"]}), router
    return None, router


def _validate_green_on_mirror(
    ctx: RolloutContext, green: str, tolerances: ShadowTolerances, cursor: int, mirror_percent: int, max_in_flight: int
) -> tuple[Verdict | None, dict, bluegreen.MirroredHealth]:
    """Mirror live traffic to green (blue answers every user) until the health-only shadow analysis passes or rejects
    it; mirroring stops however it ends. Returns the verdict (None on timeout), the evidence, and what was counted."""
    analysis = ShadowAnalysis(tolerances, started_at=ctx.clock())
    try:
        status = ctx.platform.set_mirror(ctx.isvc, mirror_percent, max_in_flight)
        why = f"{mirror_percent}% of live requests mirrored to green (at most {max_in_flight} in flight); blue answers every user"
        ctx.event("validation_start", status, {"green": green, "validation_path": "mirrored", "reason": why}, 0)
        verdict, router = _watch_mirrored(ctx, analysis, green, cursor, status, "validation")
    finally:
        ctx.platform.set_mirror(ctx.isvc, 0)
    evidence = verdict.evidence if verdict is not None else analysis.observe([], ctx.clock()).evidence
    counted = bluegreen.MirroredHealth.of(analysis)
    return verdict, {**evidence, "router": router}, counted


@guarded
def run_blue_green(
    ctx: RolloutContext,
    manifest: dict,
    thresholds: Thresholds,
    validation_body: bytes,
    validation_requests: int = 50,
    mirror_percent: int = 100,
    max_in_flight: int = SHADOW_MAX_IN_FLIGHT,
    send: Callable[[str, bytes, str, int], int] = _validation_answer,
) -> RolloutResult:
    """Green at 0% next to blue; validate green; switch all traffic at once; keep blue warm until the post-switch
    analysis passes; roll back instantly if not (see `bluegreen.py` for the statistics).

    Validation: `validation_requests` synthetic requests through green's `latest` tag route first (a smoke check that
    rejects only a credibly broken green), then, where the platform mirrors, live requests mirrored to green until it
    is credibly within its error and latency SLOs and no worse than blue on the same requests (or credibly not);
    where it cannot mirror, the synthetic requests decide as before. Synthetic requests speak the protocol the
    manifest declares (a V1 `validation_body` is sent as the V2 body of the same rows where the runtime speaks V2
    only) and count every answer but a 200 with one prediction per row as a failure: a 404 means green does not serve
    that endpoint, which is no pass. After the switch, green's window is judged against the SLOs and against blue's
    own error rate before the switch (its counters as a record). `send` sends one synthetic request (a stand-in in
    simulations)."""
    from mlops_assets.core.serving.manifest import protocol_of
    from mlops_assets.core.serving.payloads import as_protocol, rows_in

    ctx.started = ctx.clock()
    status, green, blue, unchanged = _deploy_candidate(ctx, manifest, 0, "blue_green")
    if unchanged is not None:
        return unchanged
    start_counts = ctx.counts(status.url)
    ctx.event("green_deployed", status, {"green": green, "blue": blue, "reason": "green at 0%, blue serves"}, 0)
    protocol = protocol_of(manifest)
    request = as_protocol(json.loads(validation_body), protocol)
    body, rows = json.dumps(request).encode(), rows_in(request)
    tag_url = status.predict_url(protocol, tag="latest")  # only green answers there (KServe's tag routing)
    codes = [send(tag_url, body, protocol, rows) for _ in range(validation_requests)]
    errors = sum(c != 200 for c in codes)
    after = ctx.counts(status.url)
    p95 = (_diff(after, start_counts or {}, green) if after is not None else RevisionCounts()).latency_quantile(0.95)
    cursor, cannot_mirror = _green_mirror_cursor(ctx)
    evidence = {
        "validation_path": bluegreen.VALIDATION_PATH_SYNTHETIC if cursor is None else bluegreen.VALIDATION_PATH_MIRRORED,
        "validation_requests": validation_requests,
        "validation_protocol": protocol,
        "validation_url": tag_url,
        # Every answer that is not a 200 with one prediction per row: 5xx, 4xx (a 404 is a missing
        # endpoint), no answer, or a 200 of the wrong shape.
        "validation_errors": errors,
        "validation_server_errors": sum(c >= 500 for c in codes),
        "validation_client_errors": sum(400 <= c < 500 for c in codes),
        "validation_bad_answers": sum(c == 0 for c in codes),
        "smoke_check_e_value": bluegreen.smoke_check_e_value(errors, validation_requests, thresholds),
        "green_p95_s": p95,
        "max_error_rate": thresholds.max_error_rate,
        "max_p95_latency_s": thresholds.max_p95_latency_s,
    }
    carried = None  # the mirrored requests' SLO proof, carried over to the post-switch analysis
    if cursor is None:
        evidence["mirror_unavailable"] = cannot_mirror
        valid = after is not None and bluegreen.synthetic_validation_passes(errors, validation_requests, p95, thresholds)
        reason = "green failed validation through its tag route; blue never stopped serving"
    elif bluegreen.smoke_check_rejects(errors, validation_requests, thresholds):
        valid = False
        reason = f"green failed {errors}/{validation_requests} smoke-check requests: credibly broken; blue never stopped serving"
    else:
        tolerances = bluegreen.validation_tolerances(thresholds)
        verdict, mirrored, carried = _validate_green_on_mirror(ctx, green, tolerances, cursor, mirror_percent, max_in_flight)
        evidence = {**evidence, "mirrored": mirrored}
        valid = verdict is not None and verdict.decision == Decision.PROMOTE
        reason = verdict.reason if verdict is not None else f"no validation decision within {ctx.timeout_s:.0f}s: never switched"
    if not valid:
        status = ctx.platform.rollback(ctx.isvc)
        ctx.decided = True
        ctx.event("rollback", status, {"reason": reason, **evidence}, 0)
        failed = [_failed(ctx, start_counts, status.url, rev) for rev in (green, blue)]
        return RolloutResult("blue_green", ROLLED_BACK, green, blue, *failed, round(ctx.elapsed(), 2), reason, evidence)
    ctx.event("validated", status, {"reason": f"green passed validation ({evidence['validation_path']})", **evidence}, 0)
    switch_counts = ctx.counts(status.url)
    blue_before = (switch_counts or {}).get(blue, RevisionCounts())
    evidence["blue_record"] = {"requests": blue_before.requests, "errors": blue_before.errors}
    status = ctx.platform.promote(ctx.isvc)
    ctx.event("switch", status, {"reason": "all traffic switched to green; blue kept warm", **evidence}, 100)
    # Post-switch: green serves everything; the SLO tests and green against blue's record can speak.
    post = bluegreen.PostSwitchAnalysis(thresholds, (blue_before.requests, blue_before.errors), ctx.clock(), carried)
    verdict = _watch(ctx, post, green, blue, status.url, thresholds.max_p95_latency_s, None)
    post_evidence = {**evidence, **(verdict.evidence if verdict is not None else {})}
    if verdict is not None and verdict.decision == Decision.PROMOTE:
        reason = f"post-switch analysis passed: {verdict.reason}"
        ctx.event("promote", status, {"reason": reason, **post_evidence}, 100)
        outcome = PROMOTED
    else:
        status = ctx.platform.rollback(ctx.isvc)
        reason = verdict.reason if verdict is not None else "post-switch analysis reached no decision: rolled back to blue"
        ctx.event("rollback", status, {"reason": reason, **post_evidence}, 0)
        outcome = ROLLED_BACK
    ctx.decided = True
    post_evidence["users_failed_on_green"] = _failed(ctx, switch_counts, status.url, green)
    return RolloutResult(
        "blue_green",
        outcome,
        green,
        blue,
        _failed(ctx, start_counts, status.url, green),
        _failed(ctx, start_counts, status.url, blue),
        round(ctx.elapsed(), 2),
        reason,
        post_evidence,
    )


def _ab_counts(ctx: RolloutContext, url: str) -> dict[str, RevisionCounts] | None:
    """Counts with A/B outcomes. A platform that pins users at the mesh (KubernetesPlatform's
    `ab_outcomes`: the payload sink's counts) gives the outcomes; locally the router's feedback
    counts come with the metrics. Outcomes that cannot be read are no data, as metrics are."""
    counts = ctx.counts(url)
    if counts is None:
        return counts
    try:
        per_revision = ctx.platform.ab_outcomes(ctx.isvc)
    except NotImplementedError:  # the outcomes are in the metrics (the local router's feedback counts)
        return counts
    except Exception as exc:  # noqa: BLE001 - unreadable outcomes are "no data", never a decision
        ctx.log(f"{ctx.isvc}: A/B outcomes unavailable ({type(exc).__name__}: {exc}); holding")
        return None
    for rev, (success, failure) in per_revision.items():
        counts.setdefault(rev, RevisionCounts())
        counts[rev].feedback_success, counts[rev].feedback_failure = success, failure
    return counts


@guarded
def run_ab_test(ctx: RolloutContext, manifest: dict, ab, split_percent: int = 50) -> RolloutResult:
    """Split users stickily between A (the rolled-out revision) and B (the new one), read success
    outcomes (the router's feedback endpoint locally, the payload sink's outcome endpoint on a
    cluster, where the mesh pins users by the same rule), and stop when the always-valid p-value
    says so. B is shipped only on evidence that it is better; otherwise A stays."""
    ctx.started = ctx.clock()
    status, b_rev, a_rev, unchanged = _deploy_candidate(ctx, manifest, split_percent, "ab_test")
    if unchanged is not None:
        return unchanged
    # Users stay in their arm: pinned at the mesh on a cluster (Knative's own split is per request), by the router locally.
    ctx.platform.start_ab_test(ctx.isvc, a_rev, b_rev, split_percent)
    start = _ab_counts(ctx, status.url) or {}
    ctx.event(
        "ab_start",
        status,
        {"a": a_rev, "b": b_rev, "reason": f"users split {100 - split_percent}/{split_percent}"},
        split_percent,
    )
    deadline = ctx.started + ctx.timeout_s
    recommendation, evidence = "no_difference_yet", {}
    while ctx.clock() < deadline:
        ctx.sleep(ctx.poll_s)
        now = _ab_counts(ctx, status.url)
        if now is None:
            continue
        a, b = _diff(now, start, a_rev), _diff(now, start, b_rev)
        ab.update(
            a.feedback_success,
            a.feedback_success + a.feedback_failure,
            b.feedback_success,
            b.feedback_success + b.feedback_failure,
        )
        rec = ab.recommendation()
        recommendation, evidence = rec.decision, {"reason_detail": rec.reason, **rec.evidence}
        if recommendation != "no_difference_yet":
            break
    evidence = json.loads(json.dumps(evidence, default=str))
    if recommendation == "ship_b":
        status = ctx.platform.promote(ctx.isvc)
        outcome, kind, percent, reason = PROMOTED, "promote", 100, "B is better with an always-valid p-value below alpha"
    else:
        status = ctx.platform.rollback(ctx.isvc)
        outcome, kind, percent = ROLLED_BACK, "rollback", 0
        reason = "A is better" if recommendation == "keep_a" else "no significant difference by the deadline: A stays"
    ctx.decided = True
    ctx.event(kind, status, {"reason": reason, "recommendation": recommendation, **evidence}, percent)
    return RolloutResult(
        "ab_test",
        outcome,
        b_rev,
        a_rev,
        _failed(ctx, start, status.url, b_rev),
        _failed(ctx, start, status.url, a_rev),
        round(ctx.elapsed(), 2),
        reason,
        {"recommendation": recommendation, **evidence},
    )


def _shadow_window(ctx: RolloutContext, cursor: int) -> tuple[list[MirroredPair] | None, int, dict]:
    """The pairs the router mirrored since `cursor`: (pairs or None when unreadable, new cursor, the batch's counters)."""
    try:
        batch = ctx.platform.shadow_pairs(ctx.isvc, cursor)
    except Exception as exc:  # noqa: BLE001 - unreadable pairs are "no data", never a pass
        ctx.log(f"{ctx.isvc}: mirrored pairs unavailable ({type(exc).__name__}: {exc}); holding")
        return None, cursor, {}
    pairs = [pair_from_record(record) for record in batch.get("pairs") or []]
    counters = {key: batch.get(key, 0) for key in ("mirrored", "dropped", "lost", "in_flight")}
    return pairs, int(batch.get("next", cursor)), counters


@guarded
def run_shadow(
    ctx: RolloutContext,
    manifest: dict,
    thresholds: Thresholds,
    tolerances: ShadowTolerances,
    mirror_percent: int = 100,
    max_in_flight: int = SHADOW_MAX_IN_FLIGHT,
    then_canary: bool = False,
) -> RolloutResult:
    """Deploy the candidate at 0%, mirror `mirror_percent`% of live requests to it and compare its answers with
    the stable revision's on the same inputs (`ShadowAnalysis`), one asset event per window. Rejected: the
    candidate stays at 0% and is rolled back. Passed: promoted, or with `then_canary` ramped as a canary.
    Users only ever get the stable revision's answers while the shadow runs; mirroring stops however it ends."""
    strategy = "shadow_then_canary" if then_canary else "shadow"
    ctx.started = ctx.clock()
    status, candidate, stable, unchanged = _deploy_candidate(ctx, manifest, 0, strategy)
    if unchanged is not None:
        return unchanged
    start_counts = ctx.counts(status.url)
    analysis = ShadowAnalysis(tolerances, started_at=ctx.clock())
    cursor = int(ctx.platform.shadow_pairs(ctx.isvc).get("next", 0))
    verdict, counters = None, {}
    try:
        status = ctx.platform.set_mirror(ctx.isvc, mirror_percent, max_in_flight)
        reason = f"candidate at 0%; {mirror_percent}% of live requests mirrored to it (at most {max_in_flight} in flight)"
        ctx.event("shadow_start", status, {"candidate": candidate, "stable": stable, "reason": reason}, 0)
        verdict, counters = _watch_mirrored(ctx, analysis, candidate, cursor, status, "shadow")
    finally:
        status = ctx.platform.set_mirror(ctx.isvc, 0)
    evidence = {**(verdict.evidence if verdict is not None else analysis.observe([], ctx.clock()).evidence), "router": counters}

    def result(outcome: str, reason: str) -> RolloutResult:
        failed = [_failed(ctx, start_counts, status.url, rev) for rev in (candidate, stable)]
        return RolloutResult(strategy, outcome, candidate, stable, *failed, round(ctx.elapsed(), 2), reason, evidence)

    if verdict is None or verdict.decision != Decision.PROMOTE:
        status = ctx.platform.rollback(ctx.isvc)
        ctx.decided = True
        reason = verdict.reason if verdict is not None else f"no shadow decision within {ctx.timeout_s:.0f}s: never promoted"
        ctx.event("rollback", status, {"reason": reason, **evidence}, 0)
        return result(ROLLED_BACK, reason)
    ctx.event("shadow_passed", status, {"reason": verdict.reason, **evidence}, 0)
    if then_canary:
        shadow_s = round(ctx.elapsed(), 2)
        mirrored = bluegreen.MirroredHealth.of(analysis)
        canary = run_canary(ctx, manifest, thresholds, carried=mirrored)
        canary.strategy = strategy
        canary.duration_s = round(canary.duration_s + shadow_s, 2)
        canary.evidence = {**canary.evidence, "shadow": evidence, "disagreements_table": evidence["disagreements_table"]}
        return canary
    status = ctx.platform.promote(ctx.isvc)
    ctx.decided = True
    ctx.event("promote", status, {"reason": verdict.reason, **evidence}, 100)
    return result(PROMOTED, verdict.reason)
