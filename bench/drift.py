"""Feature drift detection: time and memory of ours (`mlops_assets.core.monitoring.drift`) vs Evidently's DataDriftPreset.

What it measures (seeded; same data for both methods):
- 100k rows x 50 numeric features, reference vs current. Features are of four shapes (normal, log-normal, gamma,
  uniform) so that neither method sees only Gaussians; in the current batch, 10 of the 50 features are shifted
  by 0.5 of their own standard deviation, a shift both methods can see (Evidently's default numeric rule is
  normalised Wasserstein >= 0.1; ours is BH-adjusted KS p <= 0.05 and normalised Wasserstein >= 0.1).
  * ours_s: wall time of building the `ReferenceProfile` from the reference frame plus `detect_drift` on the
    current frame: median of 6 repetitions, 3 before and 3 after the Evidently run, so that load changes on the
    shared machine hit both sides alike. The split into build and detect, and detect alone against a cached
    profile (the cost per batch in production), are printed too.
  * ours_peak_mb: peak of memory allocated by ours during build + detect (tracemalloc, which numpy reports to;
    in a separate repetition so that tracing does not slow the timed ones), in 10^6 bytes. The data frames
    themselves exist before and are not counted. Data size = 100k x 50 x 8 B = 40 MB; target <= 3 x = 120 MB.
  * evidently_s: wall time of `Report([DataDriftPreset()]).run(current, reference)`, import excluded, in a
    subprocess (same venv) that reads the same frames from parquet; its peak RSS growth is printed too.
  * agree: whether both methods flag exactly the same set of features (expected: the 10 shifted ones).
- 1M rows x 50 numeric features, ours only: time of build + detect and peak allocated memory, to show that
  memory stays bounded (the profile is 2 x 8 B per reference value; features are processed one at a time).

Baseline install: `pip install --dry-run evidently` against /work/venv showed that Evidently 0.7.23 only adds
packages (plotly, litestar, nltk, ...) and changes none of the pinned ones (dagster, mlflow, pandas, numpy,
pydantic, scipy), so it was installed into /work/venv as an optional benchmark dependency; it is not a project
dependency. Without it the 100k comparison is skipped and `evidently_s=nan`.

Run: python bench/drift.py [--skip-1m] [--seed 20261126]   (about 1.5 min on the 2-core box)
Final lines:
  drift_100k_x50 ours_s=<x> evidently_s=<y> ratio=<y/x> ours_peak_mb=<m> agree=<true|false>
  drift_1m_x50 ours_s=<x> ours_peak_mb=<m>
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_assets.core.monitoring.drift import DriftConfig, ReferenceProfile, detect_drift  # noqa: E402

N_FEATURES = 50
N_SHIFTED = 10
SHIFT_SD = 0.5
REPEATS = 3


def make_frames(n_rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Reference and current frames (one contiguous float64 array per column, as read from parquet)."""
    rng = np.random.default_rng(seed)
    columns = [f"f{i:02d}" for i in range(N_FEATURES)]
    draws = [
        (lambda size: rng.normal(10.0, 2.0, size), 2.0),
        (lambda size: rng.lognormal(3.0, 0.5, size), math.sqrt((math.exp(0.25) - 1) * math.exp(6.25))),
        (lambda size: rng.gamma(2.0, 3.0, size), math.sqrt(2.0) * 3.0),
        (lambda size: rng.uniform(0.0, 1.0, size), math.sqrt(1 / 12)),
    ]
    reference, current = {}, {}
    for i, name in enumerate(columns):
        draw, sd = draws[i % len(draws)]
        reference[name] = draw(n_rows)
        current[name] = draw(n_rows) + (SHIFT_SD * sd if i < N_SHIFTED else 0.0)
    return pd.DataFrame(reference), pd.DataFrame(current), columns[:N_SHIFTED]


def run_ours(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, float, ReferenceProfile, list[str]]:
    t0 = time.perf_counter()
    profile = ReferenceProfile.from_frame(reference)
    t1 = time.perf_counter()
    report = detect_drift(profile, current, DriftConfig())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, profile, report.drifted_features


def sort_and_search_floor(reference: pd.DataFrame, current: pd.DataFrame) -> float:
    """Seconds for the part no exact method can skip: sort both samples of every column, locate one in the other."""
    t0 = time.perf_counter()
    for name in reference.columns:
        ref = np.sort(reference[name].to_numpy())
        np.searchsorted(ref, np.sort(current[name].to_numpy()), side="right")
    return time.perf_counter() - t0


def peak_mb(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, float]:
    """Peak traced allocation (MB) of build + detect, and the profile's own size (MB)."""
    gc.collect()
    tracemalloc.start()
    profile = ReferenceProfile.from_frame(reference)
    detect_drift(profile, current, DriftConfig())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6, profile.nbytes() / 1e6


def evidently_worker(reference_path: str, current_path: str) -> None:
    """Subprocess body: run Evidently's DataDriftPreset on the parquet frames and print one JSON line."""
    # No telemetry from a benchmark (the machine has no way out anyway).
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    reference = pd.read_parquet(reference_path)
    current = pd.read_parquet(current_path)
    from evidently import Report
    from evidently.presets import DataDriftPreset

    rss_before = _rss_mb()
    t0 = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(current, reference)
    seconds = time.perf_counter() - t0
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    drifted, count = [], None
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("ValueDrift"):
            # Distance-based tests (Wasserstein, Jensen-Shannon) drift when the distance reaches the threshold.
            if metric["value"] >= config["threshold"]:
                drifted.append(config["column"])
        elif config.get("type", "").endswith("DriftedColumnsCount"):
            count = metric["value"]["count"]
    print(json.dumps({"seconds": seconds, "rss_growth_mb": max_rss - rss_before, "drifted": sorted(drifted), "count": count}))


def run_evidently(reference: pd.DataFrame, current: pd.DataFrame) -> dict | None:
    try:
        import evidently  # noqa: F401
    except ImportError:
        print("evidently is not installed: skipping the comparison (pip install evidently)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, cur_path = Path(tmp) / "reference.parquet", Path(tmp) / "current.parquet"
        reference.to_parquet(ref_path)
        current.to_parquet(cur_path)
        out = subprocess.run(
            [sys.executable, __file__, "--evidently-worker", str(ref_path), str(cur_path)],
            capture_output=True,
            text=True,
            check=True,
            # The same glibc allocator settings ours runs with (drift.reuse_freed_arrays), so neither side
            # pays page faults on fresh temporaries that the other does not.
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)},
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def bench_100k(seed: int) -> str:
    n = 100_000
    reference, current, shifted = make_frames(n, seed)
    data_mb = reference.memory_usage(index=False).sum() / 1e6
    print(f"100k x {N_FEATURES}: reference {data_mb:.0f} MB (same again for current); shifted by {SHIFT_SD} SD: {shifted}")
    builds, detects, totals, cached = [], [], [], []
    ours_drifted: list[str] = []

    def time_ours() -> None:
        nonlocal ours_drifted
        build_s, detect_s, profile, ours_drifted = run_ours(reference, current)
        builds.append(build_s)
        detects.append(detect_s)
        totals.append(build_s + detect_s)
        t0 = time.perf_counter()
        detect_drift(profile, current)
        cached.append(time.perf_counter() - t0)

    # Ours is timed REPEATS times before and REPEATS times after Evidently's single 30-45 s run, and the median of
    # all is taken, so that a change in the load of this shared machine during the run affects both sides alike.
    for _ in range(REPEATS):
        time_ours()
    ev = run_evidently(reference, current)
    for _ in range(REPEATS):
        time_ours()
    ours_s = statistics.median(totals)
    floor_s = statistics.median(sort_and_search_floor(reference, current) for _ in range(REPEATS))
    peak, profile_mb = peak_mb(reference, current)
    print(
        f"  ours: build+detect median {ours_s:.3f}s (runs {', '.join(f'{t:.3f}' for t in totals)}; "
        f"the last {REPEATS} after Evidently); build {statistics.median(builds):.3f}s, "
        f"detect {statistics.median(detects):.3f}s; detect against a cached profile {statistics.median(cached):.3f}s"
    )
    print(f"  floor: np.sort of both samples + np.searchsorted, all 50 columns, nothing else: {floor_s:.3f}s")
    print(f"  ours: peak allocated {peak:.1f} MB = {peak / data_mb:.2f} x data; profile {profile_mb:.1f} MB")
    print(f"  ours drifted: {ours_drifted}")
    if ev is None:
        return f"drift_100k_x50 ours_s={ours_s:.3f} evidently_s=nan ratio=nan ours_peak_mb={peak:.1f} agree=false"
    print(f"  evidently: run {ev['seconds']:.2f}s, peak RSS growth {ev['rss_growth_mb']:.0f} MB, drifted count {ev['count']}")
    print(f"  evidently drifted: {ev['drifted']}")
    agree = sorted(ours_drifted) == ev["drifted"]
    print(f"  same drifted set: {agree}; equal to the shifted set: {sorted(ours_drifted) == shifted}")
    print(
        f"  ratios: build+detect {ev['seconds'] / ours_s:.1f}, detect with a cached profile "
        f"{ev['seconds'] / statistics.median(cached):.1f}, sort+search floor {ev['seconds'] / floor_s:.1f}"
    )
    ratio = ev["seconds"] / ours_s
    return (
        f"drift_100k_x50 ours_s={ours_s:.3f} evidently_s={ev['seconds']:.2f} ratio={ratio:.1f} "
        f"ours_peak_mb={peak:.1f} agree={str(agree).lower()}"
    )


def bench_1m(seed: int) -> str:
    n = 1_000_000
    reference, current, shifted = make_frames(n, seed + 1)
    data_mb = reference.memory_usage(index=False).sum() / 1e6
    print(f"1M x {N_FEATURES}: reference {data_mb:.0f} MB (same again for current)")
    build_s, detect_s, profile, drifted = run_ours(reference, current)
    del profile
    gc.collect()
    peak, profile_mb = peak_mb(reference, current)
    print(
        f"  ours: build {build_s:.2f}s + detect {detect_s:.2f}s = {build_s + detect_s:.2f}s; "
        f"drifted = shifted: {drifted == shifted}"
    )
    print(f"  ours: peak allocated {peak:.0f} MB = {peak / data_mb:.2f} x data; profile {profile_mb:.0f} MB")
    return f"drift_1m_x50 ours_s={build_s + detect_s:.2f} ours_peak_mb={peak:.0f}"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--evidently-worker":
        evidently_worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--skip-1m", action="store_true")
    args = ap.parse_args()
    line_100k = bench_100k(args.seed)
    gc.collect()
    line_1m = None if args.skip_1m else bench_1m(args.seed)
    print(line_100k)
    if line_1m:
        print(line_1m)


if __name__ == "__main__":
    main()
