"""Faults on the embedded platform, with real processes: what users see when parts of it die.

Runs every scenario of `mlops_assets_tests/fault_scenarios.py` (the same ones `test_faults.py` asserts
on) against a fresh MLOPS_HOME: a real MLflow registry on SQLite with two trained versions, real model
servers, the real router and supervisor, real users sending HTTP at 30-50 requests/s. Then, as the
baseline in the same process, the scenarios that depend on supervision run again with the supervisor
off (what the platform did before it had one): nothing restarts a dead server or router, and nobody
rolls back a canary whose run was killed.

Per scenario one line:  fault=<name> survived=<bool> stable_failed=<k> failed=<k>/<n> recovery_s=<s> ...
Final lines:
  baseline_without_supervisor survived=<n>/<m>
  faults survived=<n>/<m> stable_failed_requests=<k> max_recovery_s=<s>

`stable_failed_requests` adds up the failed requests on the stable revision in the scenarios where a
healthy revision exists to fail over to (all but `lone_revision_killed` and `router_killed`, where
no revision can answer until the restart); `max_recovery_s` is the longest fault-to-healthy time.

Run: python bench/faults.py [--only NAME ...] [--no-baseline]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_assets.core.platform import services  # noqa: E402
from mlops_assets.core.registry import MlflowRegistry  # noqa: E402
from mlops_assets.core.serving.platform import LocalPlatform  # noqa: E402
from mlops_assets.demo.training import train_and_register  # noqa: E402
from mlops_assets_tests import fault_scenarios as fs  # noqa: E402

NO_FAILOVER = {"lone_revision_killed", "router_killed"}
NEEDS_SUPERVISOR = ["lone_revision_killed", "router_killed", "run_sigkill_mid_canary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(fs.SCENARIOS), help="run only these scenarios")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without a supervisor")
    args = parser.parse_args()
    names = args.only or list(fs.SCENARIOS)

    with tempfile.TemporaryDirectory(prefix="mlops-faults-") as tmp:
        home = Path(tmp)
        (home / "mlflow").mkdir()
        scratch = home / "scratch"
        scratch.mkdir()
        registry = MlflowRegistry(
            tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", artifact_root=str(home / "mlflow" / "artifacts")
        )
        print("training two versions ...", flush=True)
        versions = {
            "1": train_and_register(registry, "fault_model", n_rows=3000, seed=1),
            "2": train_and_register(registry, "fault_model", n_rows=3000, seed=2),
        }
        platform = LocalPlatform(home=str(home), ready_timeout_s=90)
        try:
            baseline = []
            if not args.no_baseline:
                bare = LocalPlatform(home=str(home), ready_timeout_s=90, supervise=False)
                for name in [n for n in NEEDS_SUPERVISOR if n in names]:
                    platform.stop_supervisor()
                    started = time.monotonic()
                    outcome = fs.SCENARIOS[name](bare, versions, scratch)
                    baseline.append(outcome)
                    print(f"baseline_without_supervisor {outcome.line()} ({time.monotonic() - started:.0f}s)", flush=True)
                platform.stop_supervisor()
            outcomes = []
            for name in names:
                started = time.monotonic()
                outcome = fs.SCENARIOS[name](platform, versions, scratch)
                outcomes.append(outcome)
                print(f"{outcome.line()} ({time.monotonic() - started:.0f}s) {outcome.detail}", flush=True)
        finally:
            platform.stop_all()
            services.stop_all(home)

    if baseline:
        print(f"baseline_without_supervisor survived={sum(o.survived for o in baseline)}/{len(baseline)}")
    stable_failed = sum(o.stable_failed for o in outcomes if o.name not in NO_FAILOVER)
    recoveries = [o.recovery_s for o in outcomes if o.recovery_s is not None]
    print(
        f"faults survived={sum(o.survived for o in outcomes)}/{len(outcomes)} "
        f"stable_failed_requests={stable_failed} max_recovery_s={max(recoveries, default=0.0):.2f}"
    )


if __name__ == "__main__":
    main()
