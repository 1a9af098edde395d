"""Blue-green: how often a green failing 3% of requests reaches users, and how many of their requests fail.

Simulated (`mlops_assets_tests/blue_green_scenarios.py`): the real `run_blue_green`, shadow analysis and canary
analysis on a simulated service and clock; users at `--rate` requests/s, blue failing 0.1% of them, the rollout
policy's defaults (1% error SLO, p95 within 0.5 s, alpha 0.01, promote_alpha 0.05, windows every 2 s), blue having
served 60 s before the rollout.
(a) bad_green_passed: the share of `--runs` rollouts of a green failing 3% that switched users to it (validated on
    mirrored live traffic, after the smoke check of 50 synthetic requests).
(b) users_failed_median: users' failed requests on that green per rollout (median; 0 when it never got users).
(c) old_synthetic_passed: the old method in the same process: 50 synthetic requests needing zero errors (expected
    0.97^50 = 0.218), with the users' failed requests when it passed, judged after the switch by the absolute SLO
    tests alone (the old post-switch analysis).
(d) After the switch, on a green that got there failing 3%: users' failed requests until rollback with blue's record
    (this change) against the absolute SLO tests alone; and a green at 0.8%, inside the SLO, blue at 0.05%.
(e) healthy green (0.1%, as blue): promoted share and time to promotion, and users' failed requests on it.

Run: python bench/blue_green.py [--runs 1000] [--rate 50]
Final line: blue_green bad_green_passed=<share> users_failed_median=<n> old_synthetic_passed=<share>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_assets.core.rollout.analysis import Decision  # noqa: E402
from mlops_assets.core.rollout.strategies import PROMOTED  # noqa: E402
from mlops_assets_tests import blue_green_scenarios as sim  # noqa: E402


def _quantiles(xs: list[float]) -> str:
    if not xs:
        return "-"
    q = np.quantile(xs, [0.5, 0.9, 0.99])
    return f"median {q[0]:g}, p90 {q[1]:g}, p99 {q[2]:g}, max {max(xs):g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    t0 = time.perf_counter()

    bad = [sim.blue_green(0.03, seed, rate_rps=args.rate) for seed in range(args.runs)]
    passed = sum(r.switched for r in bad) / len(bad)
    users_failed = [r.users_failed_on_green for r in bad]
    decided_s = [r.result.duration_s for r in bad if not r.switched]
    mirrored = [r.result.evidence["mirrored"]["pairs"] for r in bad if "mirrored" in r.result.evidence and not r.switched]
    print(f"green failing 3%, {args.runs} rollouts at {args.rate:g} req/s, validated on mirrored live traffic:")
    print(f"  switched users to it: {passed:.4f}; users' failed requests on it per rollout: {_quantiles(users_failed)}")
    print(f"  rejected before the switch after {_quantiles(mirrored)} mirrored requests, {_quantiles(decided_s)} s")

    old = [sim.old_blue_green(0.03, seed, rate_rps=args.rate) for seed in range(args.runs)]
    old_passed = sum(p for p, _ in old) / len(old)
    old_failed = [n for p, n in old if p]
    print(f"old method (50 synthetic requests, zero errors; then the absolute SLO tests), {args.runs} rollouts:")
    print(
        f"  passed: {old_passed:.4f} (0.97^50 = {0.97**50:.3f}); users' failed requests when it passed: {_quantiles(old_failed)}"
    )
    per_rollout = [n for _, n in old]
    print(f"  users' failed requests per rollout: median {statistics.median(per_rollout):g}, mean {np.mean(per_rollout):.2f}")

    runs = max(20, args.runs // 5)
    record = (20_000, 10)  # blue: 0.05% over 20,000 requests before the switch
    print(f"after the switch, {runs} greens already switched to, blue's record {record[1]}/{record[0]}:")
    for error in (0.03, 0.008):
        for label, rec in (("with blue's record", record), ("absolute SLO only", None)):
            outcomes = [sim.post_switch_users_failed(error, seed, rec, args.rate) for seed in range(runs)]
            rolled = sum(d == Decision.ROLLBACK for d, _ in outcomes) / runs
            promoted = sum(d == Decision.PROMOTE for d, _ in outcomes) / runs
            failed = _quantiles([n for _, n in outcomes])
            print(f"  green {error:.1%}, {label}: rolled back {rolled:.3f}, promoted {promoted:.3f} within the hour;")
            print(f"    users' failed requests until then: {failed}")

    healthy = [sim.blue_green(0.001, 100_000 + seed, rate_rps=args.rate) for seed in range(runs)]
    promoted = [r for r in healthy if r.result.outcome == PROMOTED]
    took = _quantiles([r.result.duration_s for r in promoted])
    print(f"healthy green (0.1%), {runs} rollouts: promoted {len(promoted) / runs:.3f} after {took} s")
    print(f"  users' failed requests on it: {_quantiles([r.users_failed_on_green for r in healthy])}")
    print(f"  simulation time {time.perf_counter() - t0:.1f}s")
    met = passed <= 0.01 and statistics.median(users_failed) <= 1
    print(f"\ngoals (bad_green_passed <= 0.01, users_failed_median near 0): {'met' if met else 'NOT met'}")
    print(
        f"blue_green bad_green_passed={passed:.4f} users_failed_median={statistics.median(users_failed):g} "
        f"old_synthetic_passed={old_passed:.4f}"
    )


if __name__ == "__main__":
    main()
