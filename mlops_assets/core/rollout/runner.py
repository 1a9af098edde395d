"""The rollout runner: everything a rollout does around its strategy, as plain Python.

A rollout takes the service's rollout lock (one rollout per InferenceService), recovers from a
rollout that died holding it (its canary is rolled back before anything else happens), builds the
candidate's manifest, runs the strategy, records the outcome on the model version in the registry
and releases the lock. If the strategy failed and could not roll its candidate back, the lock is
kept: the next rollout sees a dead owner and rolls the service back first.

The orchestrator (the Dagster serving asset) supplies only what it owns: how to report events,
how to log, and whether the run that holds a lock is still alive.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mlops_assets.core.registry import CHAMPION, MlflowRegistry, VersionInfo
from mlops_assets.core.rollout.policy import RolloutPolicy, Strategy
from mlops_assets.core.rollout.strategies import (
    CandidateNotRolledBackError,
    RolloutContext,
    RolloutEvent,
    RolloutResult,
    run_ab_test,
    run_blue_green,
    run_canary,
    run_shadow,
)
from mlops_assets.core.serving.lock import LockInfo
from mlops_assets.core.serving.manifest import Deployment, build_inference_service, isvc_name_for
from mlops_assets.core.serving.metrics import MetricsSource
from mlops_assets.core.serving.platform import ServiceStatus, ServingPlatform


@dataclass(frozen=True)
class RolloutRequest:
    model_name: str
    version: VersionInfo
    strategy: Strategy
    namespace: str
    triggered_by: str
    #: The orchestrator's id for this attempt: it owns the lock while the rollout runs.
    run_id: str
    #: `Deployment` fields the model's declaration sets (replicas, resources).
    deployment_fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutReport:
    rollout_id: str
    request: RolloutRequest
    result: RolloutResult
    status: ServiceStatus


@dataclass(frozen=True)
class RollbackReport:
    rollout_id: str
    bad_revision: str | None
    bad_version: str | None
    good_version: str | None
    status: ServiceStatus
    reason: str


@dataclass
class RolloutRunner:
    platform: ServingPlatform
    metrics: MetricsSource
    registry: MlflowRegistry
    policy: RolloutPolicy
    #: Receives every traffic change (and a recovery from a dead rollout) with its evidence.
    emit: Callable[[RolloutEvent], None]
    log: Callable[[str], None] = print
    #: Receives each analysed window's evidence between the events (`RolloutContext.observe`).
    observe: Callable[[RolloutEvent], None] | None = None
    #: Whether the run that holds a lock is still alive; a lock held by a dead run is taken over.
    run_is_active: Callable[[str], bool] = lambda run_id: True
    #: One request body the blue-green validation sends to the new revision (the model's payload).
    validation_body: bytes | None = None

    def run(self, request: RolloutRequest) -> RolloutReport:
        strategy = Strategy(request.strategy)
        isvc = isvc_name_for(request.model_name)
        version = request.version
        rollout_id = f"{strategy}-{request.model_name}-v{version.version}-{uuid.uuid4().hex[:6]}"
        lock = self.platform.rollout_lock(isvc)
        info = LockInfo(
            isvc, rollout_id, request.run_id, str(strategy), version.version, time.time(), os.getpid(), socket.gethostname()
        )
        stale = lock.acquire(info, self.run_is_active)

        def emit(event: RolloutEvent) -> None:
            self.emit(replace(event, rollout_id=rollout_id, candidate_version=version.version))

        release = True
        try:
            if stale is not None:
                self._recover(isvc, stale, emit)
            manifest = build_inference_service(
                Deployment(
                    model_name=request.model_name,
                    version=version.version,
                    storage_uri=version.download_uri,
                    namespace=request.namespace,
                    run_id=version.run_id,
                    rollout_id=rollout_id,
                    triggered_by=request.triggered_by,
                    **request.deployment_fields,
                )
            )
            self.log(f"{rollout_id}: rolling out {request.model_name} v{version.version} with {strategy}")
            result = self._dispatch(strategy, isvc, manifest, emit)
        except CandidateNotRolledBackError:
            # Keep the lock: the next rollout sees a dead owner and rolls the service back first.
            release = False
            raise
        finally:
            if release:
                lock.release(info)
        self.registry.set_version_tag(request.model_name, version.version, f"rollout.{strategy}", result.outcome)
        self.log(f"{rollout_id}: {result.outcome} after {result.duration_s:.1f}s ({result.reason})")
        return RolloutReport(rollout_id, request, result, self.platform.status(isvc))

    def _recover(self, isvc: str, stale: LockInfo, emit: Callable[[RolloutEvent], None]) -> None:
        """A rollout died holding the lock: if its candidate still has traffic, roll it back first."""
        status = self.platform.status(isvc)
        if status.latest_ready != status.latest_rolledout and status.percent_of(status.latest_ready) > 0:
            status = self.platform.rollback(isvc)
            reason = f"rollout {stale.rollout_id} (run {stale.run_id}) died mid-rollout: rolled {isvc} back"
            self.log(reason)
            emit(
                RolloutEvent(
                    "reconcile_rollback",
                    0,
                    status,
                    {"reason": reason, "stale_run_id": stale.run_id, "stale_rollout_id": stale.rollout_id},
                    0.0,
                )
            )

    def _dispatch(self, strategy: Strategy, isvc: str, manifest: dict, emit: Callable[[RolloutEvent], None]) -> RolloutResult:
        ctx = RolloutContext(
            platform=self.platform,
            metrics=self.metrics,
            isvc=isvc,
            emit=emit,
            log=self.log,
            observe=self.observe,
            poll_s=self.policy.poll_s,
            timeout_s=self.policy.timeout_s,
        )
        if strategy is Strategy.CANARY:
            return run_canary(ctx, manifest, self.policy.thresholds())
        if strategy is Strategy.BLUE_GREEN:
            if self.validation_body is None:
                raise ValueError("a blue-green rollout needs a validation request body for the new revision")
            p = self.policy
            # Green is validated on mirrored live traffic with the shadow's mirroring bounds (the same router mechanism).
            return run_blue_green(
                ctx,
                manifest,
                p.thresholds(),
                self.validation_body,
                p.validation_requests,
                mirror_percent=p.shadow_percent,
                max_in_flight=p.shadow_max_in_flight,
            )
        if strategy in (Strategy.SHADOW, Strategy.SHADOW_THEN_CANARY):
            p = self.policy
            return run_shadow(
                ctx,
                manifest,
                p.thresholds(),
                p.shadow_tolerances(),
                p.shadow_percent,
                p.shadow_max_in_flight,
                then_canary=strategy is Strategy.SHADOW_THEN_CANARY,
            )
        from mlops_assets.core.rollout.ab import ABTest

        ab = ABTest(alpha=self.policy.ab_alpha, base_rate=self.policy.ab_base_rate, lift=self.policy.ab_min_lift)
        return run_ab_test(ctx, manifest, ab)

    def rollback(self, model_name: str, reason: str) -> RollbackReport:
        """An alert fired on the stable revision: send traffic back to the previous good revision
        (kept warm) and point the registry's champion at it. The bad revision stays at 0% for
        debugging."""
        isvc = isvc_name_for(model_name)
        before = self.platform.status(isvc)
        status = self.platform.rollback(isvc)
        good_version = status.stable_version
        if good_version:
            self.registry.set_alias(model_name, CHAMPION, good_version)
        message = f"rolled back {before.latest_rolledout} (v{before.stable_version}) to v{good_version}: {reason}"
        self.log(message)
        return RollbackReport(
            f"rollback-{model_name}-{uuid.uuid4().hex[:6]}",
            before.latest_rolledout,
            before.stable_version,
            good_version,
            status,
            message,
        )
