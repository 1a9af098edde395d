"""Shadow traffic: what mirroring costs the primary, and how fast the paired comparison decides.

(a) Primary throughput with mirroring / without, through the real router: `LocalPlatform` serves the
    `fraud_detector` v1 (stable) and v2 at 0% (the candidate, another training seed), as a shadow rollout
    has them. Closed-loop load on the router (wrk, CONCURRENCY in flight, as `bench/router_overhead.py`)
    in ROUNDS rounds of off/on/on/off phases (ABBA, so a linear drift cancels); "on" mirrors
    `--mirror-percent` of the requests with at most `--max-in-flight` copies waiting. On this 2-core
    machine the candidate's model server takes CPU from the stable one, which the bounded in-flight
    copies limit: the figure shows what that costs the users' throughput. Also printed: mirrored and
    dropped copies, and that every user answer came from the stable revision.
(b) flip_detect_requests: `ShadowAnalysis` (default tolerances, decision threshold 0.5, 1-row requests
    in windows of 10) fed simulated pairs where the candidate flips 10% of decisions; the median number of
    mirrored requests until it rejects, over RUNS runs.
(c) false_reject: the same with an identical candidate (same predictions; errors 0.5% and latencies drawn
    from the same distribution for both revisions, independently): the share of runs rejected before the
    analysis passes or 5,000 requests have been compared. Also RUNS/5 candidates exactly at the tolerance
    (flip rate 2%) watched over 2,000 requests: their rejections are bounded by alpha too.

Run: python bench/shadow.py [--duration 4] [--rounds 3] [--mirror-percent 100] [--max-in-flight 2] [--runs 1000]
Final line: shadow primary_throughput_ratio=<on/off> flip_detect_requests=<median> false_reject=<rate>
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router_overhead import CpuMeter, python_run, wrk_run  # noqa: E402

from mlops_assets.core.rollout.analysis import Decision  # noqa: E402
from mlops_assets.core.rollout.shadow import MirroredPair, ShadowAnalysis, ShadowTolerances  # noqa: E402
from mlops_assets.core.settings import SHADOW_MAX_IN_FLIGHT  # noqa: E402


# ---- (a) throughput -----------------------------------------------------------------------------
def start_service():
    import os
    import tempfile

    from mlops_assets.core.registry import MlflowRegistry
    from mlops_assets.core.serving.manifest import Deployment, build_inference_service
    from mlops_assets.core.serving.payloads import v1_payload
    from mlops_assets.core.serving.platform import LocalPlatform
    from mlops_assets.demo.data import FEATURES, generate_fraud_data
    from mlops_assets.demo.training import train_and_register

    home = tempfile.mkdtemp(prefix="mlops-shadow-bench-")
    os.makedirs(f"{home}/mlflow")
    platform = LocalPlatform(home=home)
    reg = MlflowRegistry(tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", artifact_root=f"{home}/mlflow/artifacts")
    v1 = train_and_register(reg, "fraud_detector", n_rows=5000, seed=1)
    v2 = train_and_register(reg, "fraud_detector", n_rows=5000, seed=2)

    def manifest(v, canary=None):
        return build_inference_service(
            Deployment(model_name="fraud_detector", version=v.version, storage_uri=v.download_uri, canary_percent=canary)
        )

    platform.apply(manifest(v1))
    status = platform.apply(manifest(v2, canary=0))
    body = json.dumps(v1_payload(generate_fraud_data(1, seed=1)[FEATURES])).encode()
    return platform, home, status, body


def throughput(platform, home, status, body, args) -> float:
    from mlops_assets.core import processes
    from mlops_assets.core.serving.metrics import ScrapeMetrics

    use_wrk = shutil.which("wrk") is not None
    script = Path(home) / "post.lua"
    lua = f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body.decode())}\n'
    script.write_text(lua)
    url = status.predict_url("v1")
    directory = Path(home) / "serving" / status.name
    pids = {
        "router": processes.read_record(directory / "router.pid").pid,
        "stable": processes.read_record(directory / "revisions" / f"{status.latest_rolledout}.pid").pid,
        "shadow": processes.read_record(directory / "revisions" / f"{status.latest_ready}.pid").pid,
    }

    def one(seconds: float) -> dict:
        if use_wrk:
            return wrk_run(url, body, args.concurrency, seconds, script)
        return python_run(url, body, args.concurrency, seconds)

    def mirror(on: bool) -> None:
        platform.set_mirror(status.name, args.mirror_percent if on else 0, args.max_in_flight)

    print(
        f"\n(a) primary throughput: closed loop, {args.concurrency} in flight, {args.rounds} rounds of off/on/on/off, "
        f"{args.duration:g}s per phase, mirror {args.mirror_percent}% with at most {args.max_in_flight} in flight, "
        f"client={'wrk' if use_wrk else 'python'}"
    )
    for on in (False, True):  # warm-up: both pools open their connections
        mirror(on)
        one(2.0)
    totals = {False: [0, 0.0], True: [0, 0.0]}
    errors = 0
    before = platform.shadow_pairs(status.name, 0)
    for r in range(args.rounds):
        for on in (False, True, True, False):
            mirror(on)
            with CpuMeter(pids) as meter:
                res = one(args.duration)
            meter.add_external_client(res["client_cpu_s"])
            errors += res["errors"]
            totals[on][0] += res["requests"]
            totals[on][1] += meter.elapsed
            print(
                f"  r{r + 1} {'on ' if on else 'off'}: {res['requests'] / meter.elapsed:6.1f} req/s  p50={res['p50_ms']:.1f} ms "
                f"p99={res['p99_ms']:.1f} ms  CPU {meter.percent()}"
            )
    after = platform.shadow_pairs(status.name, before["next"])
    mirror(False)
    counts = {rev: c.requests for rev, c in ScrapeMetrics().revision_counts(status.name, status.url).items()}
    rps = {on: n / t for on, (n, t) in totals.items()}
    print(
        f"  overall: off={rps[False]:.1f} req/s on={rps[True]:.1f} req/s  ratio={rps[True] / rps[False]:.3f}; "
        f"user errors {errors}; mirrored {after['mirrored'] - before['mirrored']}, "
        f"dropped {after['dropped'] - before['dropped']} "
        f"(max in flight reached); user requests by revision {counts}"
    )
    return rps[True] / rps[False]


# ---- (b), (c) simulation ------------------------------------------------------------------------
def simulate(tol: ShadowTolerances, flip: float, seed: int, horizon: int = 5000, window: int = 10) -> tuple[Decision, int]:
    rng = np.random.default_rng(seed)
    analysis = ShadowAnalysis(tol, started_at=0.0)
    for w in range(horizon // window):
        s = rng.uniform(size=window)
        c = np.where(rng.uniform(size=window) < flip, 1.0 - s, s)
        lat = rng.lognormal(np.log(0.01), 0.5, size=(2, window))
        err = rng.uniform(size=(2, window)) < 0.005
        pairs = [
            MirroredPair(w * window + i, 200 + 300 * err[0, i], 200 + 300 * err[1, i], lat[0, i], lat[1, i], [s[i]], [c[i]])
            for i in range(window)
        ]
        verdict = analysis.observe(pairs, float(w))
        if verdict.decision in (Decision.PROMOTE, Decision.ROLLBACK):
            return verdict.decision, analysis.pairs
    return Decision.CONTINUE, analysis.pairs


def decisions(args) -> tuple[float, float]:
    tol = ShadowTolerances(threshold=0.5)
    print(f"\n(b, c) ShadowAnalysis by simulation, {args.runs} runs each; tolerances {tol}")
    t0 = time.perf_counter()
    flipping = [simulate(tol, 0.10, seed) for seed in range(args.runs)]
    detect = [n for d, n in flipping if d == Decision.ROLLBACK]
    print(
        f"  candidate flipping 10%: rejected {len(detect)}/{args.runs}, mirrored requests to reject: median "
        f"{statistics.median(detect):.0f}, p90 {np.percentile(detect, 90):.0f}, max {max(detect)}"
    )
    identical = [simulate(tol, 0.0, 10_000 + seed) for seed in range(args.runs)]
    rejected = sum(d == Decision.ROLLBACK for d, _ in identical)
    passed = [n for d, n in identical if d == Decision.PROMOTE]
    print(
        f"  identical candidate: rejected {rejected}/{args.runs}, passed {len(passed)} after a median of "
        f"{statistics.median(passed):.0f} mirrored requests"
    )
    runs = max(1, args.runs // 5)
    boundary = [simulate(tol, tol.max_flip_rate, 20_000 + seed, horizon=2000) for seed in range(runs)]
    at_tol = sum(d == Decision.ROLLBACK for d, _ in boundary)
    print(f"  candidate exactly at the tolerance (flips 2%), 2,000 requests: rejected {at_tol}/{runs} (alpha {tol.alpha})")
    print(f"  simulation time {time.perf_counter() - t0:.1f}s")
    return statistics.median(detect), rejected / args.runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mirror-percent", type=int, default=100)
    parser.add_argument("--max-in-flight", type=int, default=SHADOW_MAX_IN_FLIGHT)
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    platform, home, status, body = start_service()
    try:
        ratio = throughput(platform, home, status, body, args)
    finally:
        platform.stop_all()
        shutil.rmtree(home, ignore_errors=True)
    detect, false_reject = decisions(args)
    met = ratio >= 0.9 and false_reject <= 0.01
    print(f"\ngoals (ratio >= 0.9, false_reject <= 0.01): {'met' if met else 'NOT met'}")
    print(f"shadow primary_throughput_ratio={ratio:.3f} flip_detect_requests={detect:.0f} false_reject={false_reject:.4f}")


if __name__ == "__main__":
    main()
