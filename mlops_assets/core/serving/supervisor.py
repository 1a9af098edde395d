"""The embedded platform's supervisor: what Kubernetes' controllers do on a cluster, for 127.0.0.1.

Run as `python -m mlops_assets.core.serving.supervisor <MLOPS_HOME> [interval_s] [ready_timeout_s]`; one per
MLOPS_HOME, started by `LocalPlatform` whenever it applies, rolls back or reconciles. Every
`interval_s` it looks at each InferenceService:

- a router or a kept model server (latest ready, rolled out, previous rolled out) that is not
  running is restarted, the router first. Restarts back off per component (1 s, 2 s, 4 s ... up to
  60 s) while they keep failing, the delay resets once the component has stayed up for a minute,
  and after 10 failures in a row the component is left down (and says so) until someone reconciles.
  While a revision is down the router already sends its share to a healthy revision (outlier
  ejection), so users do not wait for this loop.
- a candidate that serves users while the rollout owning it is dead (its process is gone) is rolled
  back: a canary is never left with traffic and nobody watching.

What it did is visible: one line per action in `MLOPS_HOME/logs/supervisor.log`, and the
per-component restarts, failures and next attempt in `serving/supervisor.json`
(`LocalPlatform.supervisor_status()`; the serving asset's metadata shows it). It exits when
MLOPS_HOME's serving directory is gone or holds no InferenceService for a minute.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlops_assets.core.serving.platform import LocalPlatform, UnknownServiceError

MIN_BACKOFF_S, MAX_BACKOFF_S, HEALTHY_RESET_S, IDLE_EXIT_S = 1.0, 60.0, 60.0, 60.0
#: Consecutive failed restarts after which the supervisor leaves a component down (an explicit
#: `reconcile`, i.e. materializing the serving asset, still tries).
MAX_FAILURES = 10


@dataclass
class Backoff:
    """Restart bookkeeping for one component of one InferenceService."""

    restarts: int = 0
    failures: int = 0
    delay_s: float = 0.0
    next_try: float = 0.0
    last_error: str = ""
    last_restart: float = 0.0

    consecutive_failures: int = 0

    def due(self, now: float) -> bool:
        return now >= self.next_try and self.consecutive_failures < MAX_FAILURES

    def record(self, outcome: str, now: float) -> None:
        if outcome == "restarted":
            self.restarts += 1
            self.last_restart, self.last_error, self.consecutive_failures = now, "", 0
            # A component that crashes again soon after a restart keeps backing off.
            self.delay_s = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, self.delay_s * 2))
        else:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = outcome[-2000:]
            self.delay_s = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, self.delay_s * 2))
        self.next_try = now + self.delay_s

    def settle(self, now: float) -> None:
        if self.delay_s and not self.last_error and now - self.last_restart > HEALTHY_RESET_S:
            self.delay_s = 0.0


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)


def supervise_once(platform: LocalPlatform, backoffs: dict[str, dict[str, Backoff]], clock=time.monotonic) -> list[str]:
    """One pass over every InferenceService; returns the actions taken (for the log)."""
    actions = []
    for name in platform.list_services():
        per = backoffs.setdefault(name, {})
        now = clock()
        for b in per.values():
            b.settle(now)

        def due(component: str, per=per, now=now) -> bool:
            return per.setdefault(component, Backoff()).due(now)

        try:
            report = platform.repair(name, due=due)
        except UnknownServiceError:
            continue  # deleted under us
        for component, outcome in report.items():
            per[component].record(outcome, clock())
            if outcome == "restarted":
                actions.append(f"{name}: restarted {component} (restart #{per[component].restarts})")
            else:
                actions.append(f"{name}: {component} failed to restart, next try in {per[component].delay_s:.0f}s: {outcome}")
        try:
            note = platform.guard_unwatched(name)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything one service does
            note = f"could not check the rollout owner of {name}: {exc!r}"
        if note:
            actions.append(f"{name}: {note}")
    return actions


def _write_status(platform: LocalPlatform, backoffs: dict[str, dict[str, Backoff]]) -> None:
    out = Path(platform.home) / "serving" / "supervisor.json"
    data = {
        "updated": time.time(),
        "services": {name: {c: asdict(b) for c, b in per.items()} for name, per in backoffs.items()},
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(out)


def main(argv: list[str]) -> None:
    home = Path(argv[0])
    interval = float(argv[1]) if len(argv) > 1 else 1.0
    ready_timeout = float(argv[2]) if len(argv) > 2 else 120.0
    platform = LocalPlatform(home=str(home), ready_timeout_s=ready_timeout, supervise=False)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    backoffs: dict[str, dict[str, Backoff]] = {}
    idle_since, written = time.monotonic(), False
    _log(f"supervising InferenceServices under {home} every {interval:g}s")
    while not stopping:
        if not (home / "serving").is_dir():
            _log("serving directory is gone; exiting")
            return
        if platform.list_services():
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_EXIT_S:
            _log("no InferenceService left; exiting")
            return
        try:
            actions = supervise_once(platform, backoffs)
            for action in actions:
                _log(action)
            if actions or not written:  # the file changes only when something happened
                _write_status(platform, backoffs)
                written = True
        except Exception as exc:  # noqa: BLE001 - log and keep supervising
            _log(f"supervision pass failed: {exc!r}")
        time.sleep(interval)
    _log("stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
