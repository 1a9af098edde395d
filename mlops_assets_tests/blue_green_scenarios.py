"""Blue-green rollouts simulated through the real `run_blue_green`, shared by `test_blue_green_mirror.py` (which asserts
on them) and `bench/blue_green.py` (which reports their figures).

Only the service is simulated: `SimulatedService` is a hand-written stand-in for a platform and its router (KServe's
traffic semantics for blue and green, the router's per-revision counts and latency histograms, its mirrored pairs in
the `GET /-/shadow` record format), fed by live users at a steady Poisson rate on a simulated clock. Each revision
fails a request with its own probability, independently; latencies are log-normal around 10 ms. The strategy, the
shadow analysis and the canary analysis are the real ones, on that clock. `mirror=False` is a platform that cannot
mirror (the synthetic path, as on KubernetesPlatform today).

`old_blue_green` is the method blue-green used before (for the baseline in the same process): `validation_requests`
synthetic requests needing zero errors, then every user switched and judged by the absolute SLO tests alone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace

import numpy as np

from mlops_assets.core.rollout.analysis import CanaryAnalysis, Decision, Thresholds, WindowCounts
from mlops_assets.core.rollout.strategies import RolloutContext, RolloutResult, run_blue_green
from mlops_assets.core.serving.metrics import RevisionCounts
from mlops_assets.core.serving.platform import ServiceStatus
from mlops_assets.core.settings import SHADOW_MAX_IN_FLIGHT
from mlops_assets.servers.router import LATENCY_BUCKETS

ISVC = "sim-bluegreen"
URL = "http://sim.invalid"
BUCKETS = (*LATENCY_BUCKETS, float("inf"))
#: The rollout policy's defaults: a 1% error SLO, p95 within 0.5 s, windows every 2 s.
THRESHOLDS = Thresholds()
POLL_S = 2.0
BODY = json.dumps({"instances": [{"x": 1.0}]}).encode()
MANIFEST = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": ISVC, "namespace": "sim"},
    "spec": {"predictor": {"model": {"modelFormat": {"name": "mlflow"}, "storageUri": "file:///sim/green"}}},
}


@dataclass
class SimulatedService:
    """A platform and its router, simulated: blue serves, green is deployed next to it at 0%."""

    rng: np.random.Generator
    error_rate: dict[str, float]  # revision -> probability that a request fails
    rate_rps: float = 50.0
    mirror_supported: bool = True
    latency_s: dict[str, float] = field(default_factory=lambda: {"blue": 0.01, "green": 0.01})
    now: float = 0.0
    green_percent: int | None = None  # None: green not deployed; 0 while validated; 100 once switched
    rolled_out: str = "blue"
    mirror_percent: int = 0
    counts: dict[str, RevisionCounts] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)
    user_failed: dict[str, int] = field(default_factory=lambda: {"blue": 0, "green": 0})

    def __post_init__(self) -> None:
        self.counts = {rev: RevisionCounts(buckets=dict.fromkeys(BUCKETS, 0)) for rev in ("blue", "green")}

    # ---- the simulated world -------------------------------------------------------------------------------------
    def _latencies(self, rev: str, n: int) -> np.ndarray:
        return self.rng.lognormal(np.log(self.latency_s[rev]), 0.3, size=n)

    def _count(self, rev: str, n: int, errors: int, latencies: np.ndarray) -> None:
        c = self.counts[rev]
        c.requests += n
        c.errors += errors
        c.latency_sum_s += float(latencies.sum())
        for le in BUCKETS:
            c.buckets[le] += int((latencies <= le).sum())

    def advance(self, seconds: float) -> None:
        """`seconds` of live traffic: users served per the split (their failures counted), copies mirrored to green."""
        self.now += seconds
        n = int(self.rng.poisson(self.rate_rps * seconds))
        to_green = int(self.rng.binomial(n, self.green_percent / 100)) if self.green_percent else 0
        for rev, served in (("green", to_green), ("blue", n - to_green)):
            if served:
                failed = self.rng.uniform(size=served) < self.error_rate[rev]
                latencies = self._latencies(rev, served)
                self._count(rev, served, int(failed.sum()), latencies)
                self.user_failed[rev] += int(failed.sum())
                if rev == "blue" and self.mirror_percent and self.green_percent == 0:
                    self._mirror(failed, latencies)

    def _mirror(self, blue_failed: np.ndarray, blue_latency: np.ndarray) -> None:
        picked = self.rng.uniform(size=blue_failed.size) * 100 < self.mirror_percent
        green_failed = self.rng.uniform(size=int(picked.sum())) < self.error_rate["green"]
        green_latency = self._latencies("green", int(picked.sum()))
        for failed_b, lat_b, failed_g, lat_g in zip(
            blue_failed[picked], blue_latency[picked], green_failed, green_latency, strict=True
        ):
            self.pairs.append(
                {
                    "seq": len(self.pairs) + 1,
                    "stable_status": 500 if failed_b else 200,
                    "candidate_status": 500 if failed_g else 200,
                    "stable_latency_s": float(lat_b),
                    "candidate_latency_s": float(lat_g),
                    "stable": None if failed_b else {"predictions": [0.5]},
                    "candidate": None if failed_g else {"predictions": [0.5]},
                }
            )

    def send(self, url: str, body: bytes, protocol: str, rows: int) -> int:
        """One synthetic request through green's tag route: counted under green by the router."""
        failed = bool(self.rng.uniform() < self.error_rate["green"])
        self._count("green", 1, int(failed), self._latencies("green", 1))
        return 500 if failed else 200

    # ---- the platform ---------------------------------------------------------------------------------------------
    def status(self, name: str = ISVC) -> ServiceStatus:
        revisions = {"blue": {"model_version": "1", "status": "ready"}}
        traffic = [{"revisionName": "blue", "percent": 100, "latestRevision": True}]
        latest = "blue"
        if self.green_percent is not None:
            latest = "green"
            revisions["green"] = {"model_version": "2", "status": "ready"}
            traffic = [
                {"revisionName": "green", "percent": self.green_percent, "latestRevision": True, "tag": "latest"},
                {"revisionName": "blue", "percent": 100 - self.green_percent, "latestRevision": False, "tag": "prev"},
            ]
        mirror = {"revision": "green", "percent": self.mirror_percent} if self.mirror_percent else {}
        return ServiceStatus(
            name=ISVC,
            namespace="sim",
            url=URL,
            ready=True,
            traffic=traffic,
            latest_created=latest,
            latest_ready=latest,
            latest_rolledout=self.rolled_out,
            previous_rolledout="blue" if self.rolled_out == "green" else None,
            canary_percent=self.green_percent,
            revisions=revisions,
            tag_urls={"latest": URL},
            mirror=mirror,
        )

    def apply(self, manifest: dict) -> ServiceStatus:
        self.green_percent = int(manifest["spec"]["predictor"].get("canaryTrafficPercent", 100))
        return self.status()

    def promote(self, name: str) -> ServiceStatus:
        self.green_percent, self.rolled_out = 100, "green"
        return self.status()

    def set_canary_percent(self, name: str, percent: int) -> ServiceStatus:
        self.green_percent = percent
        return self.status()

    def rollback(self, name: str) -> ServiceStatus:
        self.green_percent, self.rolled_out, self.mirror_percent = 0, "blue", 0
        return self.status()

    def set_mirror(self, name: str, percent: int, max_in_flight: int = SHADOW_MAX_IN_FLIGHT) -> ServiceStatus:
        if not self.mirror_supported:
            raise NotImplementedError("the simulated platform does not mirror traffic")
        self.mirror_percent = percent
        return self.status()

    def shadow_pairs(self, name: str, since: int = 0) -> dict:
        if not self.mirror_supported:
            raise NotImplementedError("the simulated platform does not record mirrored requests")
        new = self.pairs[since:]
        return {"next": len(self.pairs), "pairs": new, "mirrored": len(self.pairs), "dropped": 0, "lost": 0, "in_flight": 0}

    def revision_counts(self, isvc: str, url: str) -> dict[str, RevisionCounts]:
        return copy.deepcopy(self.counts)


@dataclass
class Run:
    """One simulated blue-green rollout: the result, whether users were switched, and users' failed requests."""

    result: RolloutResult
    switched: bool
    users_failed_on_green: int
    events: list[str]


def blue_green(
    green_error: float,
    seed: int,
    blue_error: float = 0.001,
    rate_rps: float = 50.0,
    mirror: bool = True,
    warmup_s: float = 60.0,
    thresholds: Thresholds = THRESHOLDS,
    timeout_s: float = 900.0,
) -> Run:
    """The real `run_blue_green` on a simulated service whose blue has served `warmup_s` of traffic."""
    service = SimulatedService(np.random.default_rng(seed), {"blue": blue_error, "green": green_error}, rate_rps, mirror)
    service.advance(warmup_s)
    events: list[str] = []
    ctx = RolloutContext(
        platform=service,
        metrics=service,
        isvc=ISVC,
        emit=lambda e: events.append(e.kind),
        log=lambda m: None,
        poll_s=POLL_S,
        timeout_s=timeout_s,
        clock=lambda: service.now,
        sleep=service.advance,
    )
    result = run_blue_green(ctx, MANIFEST, thresholds, BODY, send=service.send)
    return Run(result, "switch" in events, service.user_failed["green"], events)


def post_switch_users_failed(
    green_error: float,
    seed: int,
    blue_record: tuple[int, int] | None,
    rate_rps: float = 50.0,
    thresholds: Thresholds = THRESHOLDS,
    horizon_s: float = 3600.0,
) -> tuple[Decision, int]:
    """Users' failed requests on a green already switched to, until the post-switch analysis decides: with blue's
    record (`blue_record`, this change) or the absolute SLO tests alone (None, the old analysis); CONTINUE when
    neither decided within `horizon_s`."""
    rng = np.random.default_rng(seed)
    if blue_record is None:
        analysis = CanaryAnalysis(replace(thresholds, steps=(thresholds.steps[-1],)), started_at=0.0)
    else:
        from mlops_assets.core.rollout.bluegreen import post_switch_analysis

        analysis = post_switch_analysis(thresholds, blue_record, 0.0)
    failed, now = 0, 0.0
    while now < horizon_s:
        now += POLL_S
        n = int(rng.poisson(rate_rps * POLL_S))
        window = WindowCounts(n, int(rng.binomial(n, green_error)), 0, 0, 0, 0)  # green alone; latencies far inside the SLO
        failed += window.canary_errors
        verdict = analysis.observe(window, now)
        if verdict.decision in (Decision.PROMOTE, Decision.ROLLBACK):
            return verdict.decision, failed
    return Decision.CONTINUE, failed


def old_blue_green(green_error: float, seed: int, validation_requests: int = 50, rate_rps: float = 50.0) -> tuple[bool, int]:
    """The old method: (passed the 50 synthetic requests with zero errors, users' failed requests on green after it)."""
    rng = np.random.default_rng(seed)
    passed = int(rng.binomial(validation_requests, green_error)) == 0
    if not passed:
        return False, 0
    return True, post_switch_users_failed(green_error, seed + 1_000_000, None, rate_rps)[1]
