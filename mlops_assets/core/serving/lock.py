"""One rollout per InferenceService at a time, and recovery from rollouts whose run died.

The lock records which rollout (and which Dagster run) owns the service. A second rollout is
refused with a message naming the owner. A lock whose owner is no longer running is stale: the
next rollout takes it over after rolling the service back to its last good revision.

Each `ServingPlatform` hands out its own lock (`rollout_lock(name)`): a file under MLOPS_HOME for
`LocalPlatform`, a `coordination.k8s.io` Lease beside the InferenceService for `KubernetesPlatform`,
so that run pods on different nodes see the same owner. (The run queue's per-InferenceService tag
limit already serializes rollouts that go through Dagster's queue; the lock also covers runs launched
around it and records who owned a service when a run died.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


class RolloutInProgressError(RuntimeError):
    """Another rollout owns this InferenceService."""


@dataclass(frozen=True)
class LockInfo:
    isvc: str
    rollout_id: str
    run_id: str
    strategy: str
    version: str
    started: float
    #: The process running the rollout and its host, so a supervisor on that host can tell a rollout
    #: whose process died (SIGKILL, OOM) from one still watching its canary. 0 / "" when unknown.
    pid: int = 0
    host: str = ""

    def owner_dead(self) -> bool:
        """True when the owning process ran on this host and is gone (never guessed across hosts)."""
        if not self.pid or self.host != socket.gethostname():
            return False
        try:
            return psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE  # a zombie has exited too
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False  # it exists; whether it still runs cannot be told, so it is not declared dead


def refusal(isvc: str, current: LockInfo) -> RolloutInProgressError:
    return RolloutInProgressError(
        f"{isvc} is being rolled out by {current.strategy} rollout {current.rollout_id} "
        f"(version {current.version}, run {current.run_id}, started {time.ctime(current.started)}); "
        "one rollout per InferenceService at a time: wait for it or cancel that run"
    )


class RolloutLock(ABC):
    """Who owns an InferenceService's rollout."""

    @abstractmethod
    def holder(self) -> LockInfo | None:
        """The current owner, if any."""

    @abstractmethod
    def acquire(self, info: LockInfo, is_running: Callable[[str], bool]) -> LockInfo | None:
        """Take the lock; return the stale holder it replaced (its run died), if any; raise
        `RolloutInProgressError` if a running rollout holds it."""

    @abstractmethod
    def release(self, info: LockInfo) -> None:
        """Give the lock up if `info`'s rollout still holds it."""


class FileRolloutLock(RolloutLock):
    """The lock as a JSON file, guarded by flock: for processes on one machine."""

    def __init__(self, root: Path, isvc: str) -> None:
        self.path = root / "rollouts" / f"{isvc}.lock.json"
        self.isvc = isvc

    def holder(self) -> LockInfo | None:
        try:
            return LockInfo(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self, info: LockInfo, is_running: Callable[[str], bool]) -> LockInfo | None:
        """Take the lock; return the stale holder it replaced (its run died), if any."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".guard"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            current = self.holder()
            if current is not None and current.run_id != info.run_id and is_running(current.run_id):
                raise refusal(self.isvc, current)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(info)))
            tmp.replace(self.path)
            return current if current is not None and current.run_id != info.run_id else None

    def release(self, info: LockInfo) -> None:
        current = self.holder()
        if current is not None and current.rollout_id == info.rollout_id:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
