"""A/B test under continuous monitoring: false positives and sample size of the mSPRT vs the peeked z-test.

What it measures (seeded simulation, all methods on the SAME simulated users in a run):
- False-positive rate under A = B (both convert 5%): the share of runs in which the method declares a
  difference at ANY look, looking after every batch of BATCH = 100 users per arm, up to CAP_FACTOR = 8 times
  the fixed-horizon planned n per arm. Methods: ours (`msprt_p_value` with `ABTest`'s defaults: tau2 =
  (base * lift)^2, min_samples 100, alpha 0.05); the naive fixed-horizon z-test read at every look (what
  "peeking" does); and the guide's practice, the z-test read 24 times ("hourly" over a day) up to the planned
  n. The baseline for ours is the nominal alpha = 0.05; the z-test rates show why peeking is broken.
- Mean sample size under a 10% relative lift (5% -> 5.5%): users per arm when ours first reaches p <= 0.05,
  averaged over runs; runs that have not stopped by the cap count as the cap (the share is printed), so the
  mean is, if anything, underestimated by at most that share times the remaining distance. Divided by the
  fixed-horizon planned n (`planned_sample_size(0.05, 0.10)`, 80% power, alpha 0.05, two-sided). For
  comparison the fixed-horizon test's power at its planned n is printed: it stops at n always, but decides
  only 80% of the time, while the mSPRT runs until it decides.

How: per run, Binomial(BATCH, p) successes per batch and arm, cumulated with numpy; all runs are vectorised
in blocks of 1000 runs (arrays of 1000 x looks); about 10 s in all for the default 10,000 runs.

Run: python bench/abtest.py [--runs 10000] [--seed 7]
Final line: ab_false_positive_rate=<x> ab_mean_sample_ratio=<mean/fixed>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_assets.core.rollout.ab import ABTest, msprt_p_value, planned_sample_size  # noqa: E402

BASE = 0.05
LIFT = 0.10
ALPHA = 0.05
BATCH = 100
CAP_FACTOR = 8
BLOCK = 1000


def cumulative(rng: np.random.Generator, p: float, runs: int, looks: int) -> np.ndarray:
    return np.cumsum(rng.binomial(BATCH, p, size=(runs, looks)), axis=1)


def z_stats(s_a: np.ndarray, s_b: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Pooled two-proportion z (equal n per arm), vectorised; 0 where there is no variance yet."""
    pooled = (s_a + s_b) / (2.0 * n)
    se = np.sqrt(pooled * (1.0 - pooled) * 2.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (s_b - s_a) / n / se
    return np.where(se > 0, z, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()

    reference = ABTest(alpha=ALPHA, base_rate=BASE, lift=LIFT)  # the defaults the bench measures
    n_fixed = reference.planned_n
    assert n_fixed == planned_sample_size(BASE, LIFT, ALPHA, 0.8)
    looks = CAP_FACTOR * n_fixed // BATCH
    n = BATCH * np.arange(1, looks + 1)
    fixed_look = int(np.searchsorted(n, n_fixed))  # first look with n >= n_fixed
    hourly = np.unique(np.linspace(0, fixed_look, 24).round().astype(int))
    z_crit = norm.ppf(1 - ALPHA / 2)

    fp = {"ours": 0, "z_every_look": 0, "z_hourly_to_planned_n": 0}
    stop_n: list[np.ndarray] = []
    capped = wrong_direction = fixed_power = 0
    done = 0
    while done < args.runs:
        r = min(BLOCK, args.runs - done)
        # A = B: false positives.
        s_a, s_b = cumulative(rng, BASE, r, looks), cumulative(rng, BASE, r, looks)
        p = msprt_p_value(s_a, n, s_b, n, reference.tau2, reference.min_samples)
        fp["ours"] += int((p[:, -1] <= ALPHA).sum())
        z = np.abs(z_stats(s_a, s_b, n))
        fp["z_every_look"] += int((z > z_crit).any(axis=1).sum())
        fp["z_hourly_to_planned_n"] += int((z[:, hourly] > z_crit).any(axis=1).sum())
        # 10% lift: sample size at stopping.
        s_a, s_b = cumulative(rng, BASE, r, looks), cumulative(rng, BASE * (1 + LIFT), r, looks)
        p = msprt_p_value(s_a, n, s_b, n, reference.tau2, reference.min_samples)
        hit = p <= ALPHA
        stopped = hit.any(axis=1)
        first = np.where(stopped, hit.argmax(axis=1), looks - 1)
        stop_n.append(n[first])
        capped += int((~stopped).sum())
        rows = np.arange(r)
        wrong_direction += int((stopped & (s_b[rows, first] < s_a[rows, first])).sum())
        fixed_power += int((z_stats(s_a[:, fixed_look], s_b[:, fixed_look], n[fixed_look]) > z_crit).sum())
        done += r

    sizes = np.concatenate(stop_n)
    fpr = {k: v / args.runs for k, v in fp.items()}
    ratio = sizes.mean() / n_fixed
    print(f"planned fixed-horizon n per arm: {n_fixed} (base {BASE:.0%}, lift {LIFT:.0%}, alpha {ALPHA}, power 0.8)")
    print(f"tau2 = {reference.tau2:.3g}, batch {BATCH} users per arm, looks after every batch, cap {CAP_FACTOR} x n = {n[-1]}")
    print(f"runs {args.runs}")
    print("A = B (5%): false-positive rate over all looks up to the cap")
    for k, v in fpr.items():
        print(f"  {k:<24} {v:.4f}  (+- {1.96 * np.sqrt(v * (1 - v) / args.runs):.4f} at 95%)")
    print("B = A + 10% (5.5% vs 5%):")
    print(
        f"  ours: mean n {sizes.mean():.0f} (ratio {ratio:.3f}), median {np.median(sizes):.0f} "
        f"(ratio {np.median(sizes) / n_fixed:.3f}), p90 {np.percentile(sizes, 90):.0f}, "
        f"not stopped by the cap {capped / args.runs:.4f}, stopped in the wrong direction {wrong_direction / args.runs:.4f}"
    )
    print(f"  fixed-horizon z-test at n = {n[fixed_look]}: power {fixed_power / args.runs:.3f}")
    print(f"elapsed {time.perf_counter() - t0:.1f} s")
    print(f"ab_false_positive_rate={fpr['ours']:.4f} ab_mean_sample_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
