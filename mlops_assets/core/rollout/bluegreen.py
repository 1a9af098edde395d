"""Blue-green's decisions: green judged on mirrored live traffic before the switch, and against blue's record after it.

Why not a fixed batch of synthetic requests
-------------------------------------------
Blue-green used to send `validation_requests` (50) copies of the version's input example to green and switch on
zero errors. That is a fixed-size test on the wrong traffic: a green failing 3% of requests passes it with probability
0.97^50 = 22%, and then every user is switched to it at once (issue 12 measured 29 failed user requests through the
real router before the post-switch SLO test fired; a canary stops the same version after about 4). Nothing about the
batch is anytime-valid, and the same input example, fifty times over, says little about live inputs.

Before the switch: `validation_tolerances`
------------------------------------------
Where the platform mirrors (`ServingPlatform.set_mirror` / `shadow_pairs`: the local router), live requests are copied
to green while blue keeps answering every user, and green's health is judged on those copies by the shadow analysis
(`shadow.py`) in its health-only mode (`compare_predictions=False`: green is a new model, its predictions are meant
to differ). Anytime-valid, looked at after every window:
* REJECT when green's error rate or slow share (latency above the p95 SLO) is credibly above the SLO, or credibly above
  blue's on the same requests (sign tests on the pairs where exactly one of them failed or was slow), or when green's
  latency is credibly beyond the declared tolerance of blue's on the same requests (`latency_ratio_tolerance` x blue's
  + `latency_margin_s`, a sign test on the pairs), each test at its share of alpha, so a green within its SLOs and
  no worse than blue is rejected with probability at most alpha;
* PASS when both SLOs are credibly met at promote_alpha (an intersection-union test) after `min_requests` mirrored
  requests, so a green outside an SLO is switched to with probability at most promote_alpha;
* no mirrored requests: HOLD, then REJECT after no_data_deadline_s. Never a pass.
The synthetic requests remain as a smoke check first (`smoke_check_rejects`): it rejects only a green that is credibly
broken on them (the error-SLO e-process at its own share of alpha, SMOKE_ALPHA_SHARE), which spares waiting for live
traffic to show a green that 404s or crashes on every request; it never passes anyone. Where the platform cannot
mirror (KubernetesPlatform today), the synthetic requests are the validation, as before; the evidence says which
path was used (`validation_path`: `mirrored` or `synthetic`).

After the switch: `post_switch_analysis`
----------------------------------------
Green serves every user and blue none, so the canary's concurrent comparisons have no baseline traffic. Blue's
counters at the switch (its requests and errors as the router counted them, mostly served while green was being
validated) are its record, and the canary analysis's `error_vs_baseline_record` test (universal inference, see
`analysis.py`) compares green's error rate after the switch with blue's over that record, next to the absolute SLO
tests. A green that is inside the SLO but credibly worse than blue (0.05% -> 0.8% at a 1% SLO) is rolled back; so is
one that fails above the SLO, sooner than the SLO test alone. Promotion needs both SLOs shown: on green's post-switch
traffic alone after a synthetic validation; after a mirrored one, the mirrored requests' proof carries over
(`PostSwitchAnalysis`) and green is promoted once min_requests_per_step users were served with no rollback test firing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from mlops_assets.core.rollout.analysis import (
    P95_SLOW_SHARE,
    BernoulliSLOTest,
    CanaryAnalysis,
    Decision,
    Thresholds,
    Verdict,
    WindowCounts,
)
from mlops_assets.core.rollout.shadow import ShadowAnalysis, ShadowTolerances

#: The share of alpha the synthetic smoke check may spend on rejecting a green that is in fact healthy; the mirrored
#: validation spends the rest, so P(reject a healthy green before the switch) <= alpha overall.
SMOKE_ALPHA_SHARE = 0.1
VALIDATION_PATH_MIRRORED = "mirrored"
VALIDATION_PATH_SYNTHETIC = "synthetic"


def validation_tolerances(thresholds: Thresholds, min_requests: int | None = None) -> ShadowTolerances:
    """The shadow analysis's tolerances for judging green's health on mirrored traffic: the rollout's SLOs and error
    bounds, predictions not compared, and alpha less the smoke check's share."""
    t = thresholds
    return ShadowTolerances(
        compare_predictions=False,
        max_error_rate=t.max_error_rate,
        max_p95_latency_s=t.max_p95_latency_s,
        latency_ratio_tolerance=t.latency_ratio_tolerance,
        latency_margin_s=t.latency_margin_s,
        alpha=t.alpha * (1.0 - SMOKE_ALPHA_SHARE),
        promote_alpha=t.promote_alpha,
        min_requests=t.min_requests_per_step if min_requests is None else min_requests,
        no_data_deadline_s=t.no_data_deadline_s,
    )


def smoke_check_e_value(errors: int, requests: int, thresholds: Thresholds) -> float:
    """The error-SLO e-value of the smoke check's answers (H0: green fails at most max_error_rate of requests)."""
    test = BernoulliSLOTest(thresholds.max_error_rate, "above")
    test.update(int(errors), int(requests))
    return math.exp(min(test.log_e, 690.0))


def smoke_check_rejects(errors: int, requests: int, thresholds: Thresholds) -> bool:
    """Whether the smoke check's failures are credible evidence that green breaks the error SLO (at alpha x
    SMOKE_ALPHA_SHARE); a few failures are left to the mirrored validation."""
    return requests > 0 and smoke_check_e_value(errors, requests, thresholds) >= 1.0 / (thresholds.alpha * SMOKE_ALPHA_SHARE)


def synthetic_validation_passes(errors: int, requests: int, p95_s: float | None, thresholds: Thresholds) -> bool:
    """The validation where the platform cannot mirror (the old rule): the synthetic requests' error share within the
    SLO (with 50 requests and a 1% SLO: no error at all) and their p95 within the latency SLO."""
    return (
        requests > 0
        and errors / requests <= thresholds.max_error_rate
        and p95_s is not None
        and p95_s <= thresholds.max_p95_latency_s
    )


def post_switch_analysis(thresholds: Thresholds, blue_record: tuple[int, int], started_at: float) -> CanaryAnalysis:
    """The analysis of green's window after the switch: one step at 100%, the absolute SLO tests, and green's error rate
    against blue's record (`blue_record`: blue's requests and errors at the switch)."""
    requests, errors = (max(int(x), 0) for x in blue_record)
    return CanaryAnalysis(
        replace(thresholds, steps=(100,)), started_at=started_at, baseline_record=(requests, min(errors, requests))
    )


@dataclass(frozen=True)
class MirroredHealth:
    """What green's mirrored validation counted: requests and errors, answered requests and the slow ones."""

    requests: int
    errors: int
    answered: int
    slow: int

    @classmethod
    def of(cls, analysis: ShadowAnalysis) -> MirroredHealth:
        """What a shadow analysis counted of the candidate on the mirrored requests."""
        return cls(analysis.pairs, analysis.candidate_errors, analysis.candidate_answered, analysis.candidate_slow)


class PostSwitchAnalysis:
    """`post_switch_analysis`, with green's SLO proof carried over from its mirrored validation (`carried`).

    The promotion e-processes (error rate and slow share credibly below their SLOs) continue from the mirrored
    requests into green's live ones: green answered the same kind of inputs at about the same load, so under H0 (green
    violates an SLO) the product over both phases is still a test supermartingale and the intersection-union bound
    (promote_alpha) holds. Green is then promoted once it has served min_requests_per_step users with no rollback test
    firing and the carried SLO tests still met, instead of proving the SLOs again from nothing. The rollback tests
    start at the switch, as before. Where validation was synthetic, nothing is carried (one example sent over and
    over is no sample of live traffic)."""

    def __init__(
        self, thresholds: Thresholds, blue_record: tuple[int, int], started_at: float, carried: MirroredHealth | None
    ) -> None:
        self.thresholds = thresholds
        self.analysis = post_switch_analysis(thresholds, blue_record, started_at)
        self.carried = carried
        self._met = {
            "error_slo_met": BernoulliSLOTest(thresholds.max_error_rate, "below"),
            "latency_slo_met": BernoulliSLOTest(P95_SLOW_SHARE, "below"),
        }
        if carried is not None:
            self._met["error_slo_met"].update(carried.errors, carried.requests)
            self._met["latency_slo_met"].update(carried.slow, carried.answered)
        self.live_requests = 0

    def observe(self, window: WindowCounts | None, now: float) -> Verdict:
        """The post-switch analysis's verdict on the window, or a promotion on the carried-over SLO proof."""
        verdict = self.analysis.observe(window, now)
        if verdict.decision in (Decision.PROMOTE, Decision.ROLLBACK) or self.carried is None:
            return verdict
        if window is not None and window.canary_requests:
            self.live_requests += int(window.canary_requests)
            self._met["error_slo_met"].update(int(window.canary_errors), int(window.canary_requests))
            self._met["latency_slo_met"].update(int(window.canary_slow), int(window.canary_requests))
        e_values = {name: math.exp(min(test.log_e, 690.0)) for name, test in self._met.items()}
        evidence = {**verdict.evidence, "carried_from_mirrored": {**asdict(self.carried), "e_values": e_values}}
        met = all(e >= 1.0 / self.thresholds.promote_alpha for e in e_values.values())
        if verdict.decision == Decision.CONTINUE and met and self.live_requests >= self.thresholds.min_requests_per_step:
            reason = (
                f"Promoted: {self.live_requests} user requests on green with no rollback test firing; both SLOs shown on "
                f"{self.carried.requests} mirrored and {self.live_requests} live requests."
            )
            return Verdict(Decision.PROMOTE, reason, 100, {**evidence, "final": Decision.PROMOTE.value})
        return Verdict(verdict.decision, verdict.reason, verdict.percent, evidence)
