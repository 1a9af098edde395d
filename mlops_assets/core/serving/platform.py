"""`ServingPlatform`: one interface over KServe semantics, with the embedded `LocalPlatform`.

KServe is the reference. With `canaryTrafficPercent` P the latest ready revision gets P% and the
latest rolled-out revision the rest; removing the field promotes (the latest becomes the rolled-out
revision and the old one becomes `previousRolledoutRevision`); P=0 rolls the canary back. Names
never change, only traffic does. Every method takes or returns KServe-shaped data, so rollout code
is the same against the local processes and against a cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlops_assets.core import http, processes
from mlops_assets.core.config import EngineConfig
from mlops_assets.core.serving.manifest import (
    ANNOTATION_PREFIX,
    ManifestError,
    check_inference_service,
    predictor_identity,
    validate_dns1035,
)
from mlops_assets.core.settings import DEFAULT_NAMESPACE, SHADOW_MAX_IN_FLIGHT

if TYPE_CHECKING:
    from mlops_assets.core.serving.lock import RolloutLock


class UnknownServiceError(LookupError):
    """No InferenceService of that name exists on the platform."""


class RolloutStateError(RuntimeError):
    """The requested traffic change makes no sense in the service's current state."""


class RevisionStartError(processes.ProcessStartError):
    """A revision's model server did not come up; names the revision and its log."""

    def __init__(self, revision: str, log: str, detail: str) -> None:
        super().__init__(f"revision {revision} could not start (log {log}): {detail}")
        self.revision, self.log = revision, log


@dataclass
class ServiceStatus:
    """An InferenceService's observed state, in KServe's vocabulary."""

    name: str
    namespace: str
    url: str
    ready: bool
    traffic: list[dict]
    latest_created: str | None
    latest_ready: str | None
    latest_rolledout: str | None
    previous_rolledout: str | None
    canary_percent: int | None
    revisions: dict[str, dict] = field(default_factory=dict)
    message: str = ""
    #: Tag -> base URL that reaches only that revision ("latest", "prev"): KServe's tag routing.
    tag_urls: dict[str, str] = field(default_factory=dict)
    #: Where calls from inside the cluster go (KServe's `status.address.url`, plain HTTP through the mesh's
    #: local gateway); "" where `url` itself is reachable, as on the local platform. `url` carries the
    #: ingress' urlScheme and external domain, so on a cluster it is for display only.
    address: str = ""
    #: Tag -> in-cluster base URL of that revision (Knative's `<tag>-<route>.<namespace>.svc.cluster.local`).
    tag_addresses: dict[str, str] = field(default_factory=dict)
    #: Shadow traffic: {"revision", "percent", "max_in_flight"} while live requests are mirrored to a revision.
    mirror: dict = field(default_factory=dict)

    def percent_of(self, revision: str | None) -> int:
        return sum(t["percent"] for t in self.traffic if t["revisionName"] == revision)

    def version_of(self, revision: str | None) -> str | None:
        return (self.revisions.get(revision) or {}).get("model_version") if revision else None

    @property
    def stable_version(self) -> str | None:
        return self.version_of(self.latest_rolledout)

    def base_url(self, tag: str | None = None) -> str:
        """The base URL a call from here uses (the in-cluster address where the platform publishes one);
        with `tag`, the one that reaches only that tagged revision ("" if there is none)."""
        if tag is None:
            return self.address or self.url
        return self.tag_addresses.get(tag) or ("" if self.address else self.tag_urls.get(tag, ""))

    def predict_url(self, protocol: str = "v1", tag: str | None = None) -> str:
        """The endpoint of `protocol` ("v1" predict, "v2" infer); with `tag`, the one that reaches only that
        tagged revision. Built on `base_url`, so in a cluster it is the in-cluster address."""
        base = self.base_url(tag)
        if not base and tag is None:
            raise RolloutStateError(f"{self.name} has no URL yet: {self.message or 'not ready'}")
        if not base:
            tags = sorted(self.tag_addresses or self.tag_urls)
            raise RolloutStateError(f"{self.name} has no {tag!r} tag URL (tags: {tags}); is tag routing enabled?")
        return f"{base}/v1/models/{self.name}:predict" if protocol == "v1" else f"{base}/v2/models/{self.name}/infer"


class ServingPlatform(EngineConfig, ABC):
    """Where InferenceServices run: KServe semantics, local processes or a cluster."""

    #: The namespace of the InferenceServices (MLOPS_NAMESPACE): a cluster's platform works in it alone; locally it
    #: is recorded with each service.
    namespace: str = DEFAULT_NAMESPACE

    @abstractmethod
    def apply(self, manifest: dict) -> ServiceStatus:
        """Create or update an InferenceService from its manifest; wait until it is ready."""

    @abstractmethod
    def status(self, name: str) -> ServiceStatus:
        """The observed state of an InferenceService; `UnknownServiceError` if absent."""

    @abstractmethod
    def manifest(self, name: str) -> dict:
        """The last applied manifest of an InferenceService."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove an InferenceService and everything serving it."""

    @abstractmethod
    def list_services(self) -> list[str]:
        """Names of the InferenceServices on the platform."""

    def set_canary_percent(self, name: str, percent: int) -> ServiceStatus:
        """Send `percent`% of traffic to the latest ready revision, the rest to the rolled-out one."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ManifestError(f"canary percent must be an integer 0-100, got {percent!r}")
        manifest = self.manifest(name)
        manifest["spec"]["predictor"]["canaryTrafficPercent"] = percent
        return self.apply(manifest)

    def promote(self, name: str) -> ServiceStatus:
        """Remove `canaryTrafficPercent`: the latest ready revision takes all traffic."""
        manifest = self.manifest(name)
        manifest["spec"]["predictor"].pop("canaryTrafficPercent", None)
        return self.apply(manifest)

    def reconcile(self, name: str) -> list[str]:
        """Bring what runs in line with what is recorded; returns what was restarted."""
        return []

    def recent_payloads(self, name: str, columns: list[str], max_rows: int = 200_000):
        """Recent inference request rows the serving path logged (the drift reports' current data)."""
        raise NotImplementedError(f"{type(self).__name__} does not log payloads")

    def publish_drift(self, name: str, share: float, scores: dict[str, float]) -> None:
        """Expose the latest drift report as Prometheus gauges (model_drift_share, model_drift_score)."""
        raise NotImplementedError(f"{type(self).__name__} does not publish drift gauges")

    def set_mirror(self, name: str, percent: int, max_in_flight: int = SHADOW_MAX_IN_FLIGHT) -> ServiceStatus:
        """Mirror `percent`% of live requests to the latest ready revision (not rolled out: users never get
        its answers), at most `max_in_flight` copies waiting at once; `percent` 0 stops mirroring."""
        raise NotImplementedError(f"{type(self).__name__} does not mirror traffic")

    def shadow_pairs(self, name: str, since: int = 0) -> dict:
        """The mirrored requests recorded after `since`, with both answers (the router's `GET /-/shadow`)."""
        raise NotImplementedError(f"{type(self).__name__} does not record mirrored requests")

    def start_ab_test(self, name: str, a: str, b: str, percent: int) -> None:
        """Pin users to arms (B = revision `b` for `percent`% of users, A = `a`) and declare the test to what
        counts its outcomes, where the platform's own split is per request."""
        raise NotImplementedError(f"{type(self).__name__} does not pin A/B users")

    def ab_outcomes(self, name: str) -> dict[str, tuple[int, int]]:
        """Cumulative A/B outcomes per revision, (successes, failures), where they are not in the metrics."""
        raise NotImplementedError(f"{type(self).__name__} counts A/B outcomes with its metrics")

    @abstractmethod
    def rollback(self, name: str) -> ServiceStatus:
        """During a canary, send all traffic back to the rolled-out revision; after a promotion,
        to the previous rolled-out revision."""

    @abstractmethod
    def rollout_lock(self, name: str) -> RolloutLock:
        """The lock that lets one rollout at a time own InferenceService `name` (see rollout/lock.py)."""


def _identity_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(predictor_identity(manifest), sort_keys=True).encode()).hexdigest()[:16]


class LocalPlatform(ServingPlatform):
    """KServe semantics on this machine: model-server processes and a traffic router on 127.0.0.1."""

    home: str
    ready_timeout_s: float = 120.0
    payload_sample_rate: float = 0.25
    payload_max_bytes: int = 32 * 1024 * 1024
    recent_window_s: float = 3600.0

    def recent_payloads(self, name: str, columns: list[str], max_rows: int = 200_000):
        from mlops_assets.core.serving.payloads import read_payload_log

        status = self.status(name)
        if status.url:
            # Ask the router to flush its buffered log first; a stopped router has nothing buffered.
            with contextlib.suppress(http.HttpUnavailableError):
                http.request(f"{status.url}/-/payloads/flush", method="POST", body=b"", timeout=5)
        return read_payload_log(self.payload_dir(name), columns, max_rows, since=time.time() - self.recent_window_s)

    def publish_drift(self, name: str, share: float, scores: dict[str, float]) -> None:
        status = self.status(name)
        code, body = http_json(f"{status.url}/-/drift", {"share": share, "features": scores})
        if code != 200:
            raise RuntimeError(f"router of {name} refused the drift gauges: {code} {body}")

    def set_mirror(self, name: str, percent: int, max_in_flight: int = SHADOW_MAX_IN_FLIGHT) -> ServiceStatus:
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ManifestError(f"mirror percent must be an integer 0-100, got {percent!r}")
        with self._locked(name) as directory:
            state = self._require(directory, name)
            if percent == 0:
                state.pop("mirror", None)
            else:
                candidate = state.get("latest_ready")
                if candidate is None or candidate == state.get("latest_rolledout"):
                    raise RolloutStateError(f"{name} has no candidate revision to mirror to (latest ready is rolled out)")
                state["mirror"] = {"revision": candidate, "percent": percent, "max_in_flight": max_in_flight}
            self._route_locked(directory, state)
            return self._status(directory, state)

    def shadow_pairs(self, name: str, since: int = 0) -> dict:
        status = self.status(name)
        return http.request(f"{status.url}/-/shadow?since={int(since)}", timeout=10).checked().json()

    def start_ab_test(self, name: str, a: str, b: str, percent: int) -> None:
        """Nothing to do: the router pins each user to an arm by its `x-user-key` at the split `apply` set, and
        counts the outcomes (`/-/feedback`) with its metrics (so `ab_outcomes` is the base class's)."""

    def rollout_lock(self, name: str) -> RolloutLock:
        from mlops_assets.core.serving.lock import FileRolloutLock

        return FileRolloutLock(self._root, validate_dns1035(name, "InferenceService name"))

    def payload_dir(self, name: str) -> Path:
        """Where the router logs sampled inference payloads (the drift reports' current data)."""
        return Path(self.home) / "payloads" / validate_dns1035(name, "InferenceService name")

    # ---- layout -------------------------------------------------------------------------------
    @property
    def _root(self) -> Path:
        return Path(self.home) / "serving"

    def _dir(self, name: str) -> Path:
        return self._root / validate_dns1035(name, "InferenceService name")

    @contextlib.contextmanager
    def _locked(self, name: str):
        directory = self._dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield directory
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _write_json(path: Path, data: dict) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(path)

    def _load_state(self, directory: Path) -> dict | None:
        try:
            return json.loads((directory / "state.json").read_text())
        except FileNotFoundError:
            return None

    # ---- processes ----------------------------------------------------------------------------
    def _spawn_revision(self, directory: Path, state: dict, revision: str) -> processes.ProcessRecord:
        """Start a revision's model server (on its recorded port when that is free, so the router's
        table stays valid) without waiting for it; the caller waits outside the service lock."""
        rev = state["revisions"][revision]
        port = rev.get("port")
        if not port or not processes.port_is_free(port):
            port = processes.free_port()
        config = {"model_name": state["name"], "storage_uri": rev["storage_uri"], "port": port}
        config_file = directory / "revisions" / f"{revision}.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        self._write_json(config_file, config)
        record = processes.spawn(
            [sys.executable, "-m", "mlops_assets.servers.model_server", str(config_file)],
            port=port,
            pid_file=directory / "revisions" / f"{revision}.pid",
            log_file=Path(self.home) / "logs" / f"{revision}.log",
        )
        rev["port"] = port
        return record

    def _wait_revision(self, record: processes.ProcessRecord, name: str, revision: str) -> None:
        try:
            processes.wait_http(record, f"/v1/models/{name}", self.ready_timeout_s, f"model server for revision {revision}")
        except processes.ProcessStartError as exc:
            raise RevisionStartError(revision, record.log, str(exc)) from None

    def _revision_record(self, directory: Path, revision: str) -> processes.ProcessRecord | None:
        return processes.read_record(directory / "revisions" / f"{revision}.pid")

    def _revision_alive(self, directory: Path, revision: str) -> bool:
        record = self._revision_record(directory, revision)
        return record is not None and processes.is_alive(record)

    def _router_record(self, directory: Path) -> processes.ProcessRecord | None:
        return processes.read_record(directory / "router.pid")

    def _ensure_router(self, directory: Path, state: dict) -> None:
        record = self._router_record(directory)
        if record is not None and processes.is_alive(record):
            return
        port = state.get("router_port") or processes.free_port()
        processes.ensure_port_free(port)
        state["router_port"] = port
        self._write_json(directory / "routes.json", self._routes(state))
        config_file = directory / "router.json"
        self._write_json(
            config_file,
            {
                "isvc": state["name"],
                "routes_file": str(directory / "routes.json"),
                "port": port,
                "payload_log": {
                    "dir": str(self.payload_dir(state["name"])),
                    "sample_rate": self.payload_sample_rate,
                    "max_bytes": self.payload_max_bytes,
                },
            },
        )
        record = processes.spawn(
            [sys.executable, "-m", "mlops_assets.servers.router", str(config_file)],
            port=port,
            pid_file=directory / "router.pid",
            log_file=Path(self.home) / "logs" / f"{state['name']}-router.log",
        )
        processes.wait_http(record, "/-/healthz", 30, f"traffic router for {state['name']}")

    def _routes(self, state: dict) -> dict:
        traffic = _traffic(state)
        revisions = {
            rev: f"http://127.0.0.1:{info['port']}"
            for rev, info in state["revisions"].items()
            if info["status"] == "ready" and info.get("port")
        }
        routes = {
            "revisions": revisions,
            "traffic": [{"revision": t["revisionName"], "percent": t["percent"]} for t in traffic],
            "tags": _tags(state),
        }
        mirror = _mirror(state)
        if mirror and mirror["revision"] in revisions:
            routes["mirror"] = mirror
        return routes

    def _push_routes(self, directory: Path, state: dict) -> None:
        routes = self._routes(state)
        self._write_json(directory / "routes.json", routes)
        # An error status raises too (an OSError, as for a router that is gone): see `_route_locked`.
        http.request(f"http://127.0.0.1:{state['router_port']}/-/routes", json_body=routes, timeout=10).checked()

    def _retire(self, directory: Path, state: dict) -> None:
        keep = {state.get("latest_ready"), state.get("latest_rolledout"), state.get("previous_rolledout")}
        for revision, info in state["revisions"].items():
            if revision not in keep and info["status"] == "ready":
                record = self._revision_record(directory, revision)
                if record is not None:
                    processes.stop(record)
                info["status"] = "retired"

    def _write_scrape_targets(self) -> None:
        """File-based service discovery for the embedded Prometheus: every router and server."""
        targets = []
        for directory in sorted(p for p in self._root.glob("*") if p.is_dir()):
            state = self._load_state(directory)
            if not state:
                continue
            if state.get("router_port"):
                targets.append(
                    {"targets": [f"127.0.0.1:{state['router_port']}"], "labels": {"isvc": state["name"], "component": "router"}}
                )
            for rev, info in state["revisions"].items():
                if info["status"] == "ready" and info.get("port"):
                    targets.append(
                        {
                            "targets": [f"127.0.0.1:{info['port']}"],
                            "labels": {"isvc": state["name"], "revision": rev, "component": "predictor"},
                        }
                    )
        out = Path(self.home) / "prometheus" / "targets"
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "serving.json.tmp"
        tmp.write_text(json.dumps(targets))
        tmp.replace(out / "serving.json")

    # ---- supervision ----------------------------------------------------------------------------
    supervise: bool = True
    supervisor_interval_s: float = 1.0

    @property
    def _supervisor_pid_file(self) -> Path:
        return self._root / "supervisor.pid"

    def ensure_supervisor(self) -> processes.ProcessRecord | None:
        """Start the platform's supervisor (one per MLOPS_HOME) unless it runs: it restarts dead
        routers and model servers with backoff and rolls back canaries whose rollout died, as
        Kubernetes' controllers do on a cluster (serving/supervisor.py)."""
        if not self.supervise:
            return None
        with self._supervisor_guard():
            record = processes.read_record(self._supervisor_pid_file)
            if record is not None and processes.is_alive(record):
                return record
            return processes.spawn(
                [
                    sys.executable,
                    "-m",
                    "mlops_assets.core.serving.supervisor",
                    str(Path(self.home).resolve()),
                    str(self.supervisor_interval_s),
                    str(self.ready_timeout_s),
                ],
                port=0,
                pid_file=self._supervisor_pid_file,
                log_file=Path(self.home) / "logs" / "supervisor.log",
            )

    @contextlib.contextmanager
    def _supervisor_guard(self):
        self._root.mkdir(parents=True, exist_ok=True)
        with open(self._root / ".supervisor.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def stop_supervisor(self) -> bool:
        """Stop the supervisor (until the next apply, rollback or reconcile); True if it ran."""
        with self._supervisor_guard():
            record = processes.read_record(self._supervisor_pid_file)
            if record is None or not processes.is_alive(record):
                return False
            processes.stop(record)
            return True

    def supervisor_status(self) -> dict:
        """What the supervisor last did: restarts, failures and backoff per component."""
        try:
            return json.loads((self._root / "supervisor.json").read_text())
        except (OSError, ValueError):
            return {}

    def guard_unwatched(self, name: str) -> str | None:
        """Roll back a candidate that serves users while the rollout that owned it is dead (its
        process on this host is gone): a canary is never left serving with nobody watching."""
        holder = self.rollout_lock(name).holder()
        if holder is None or not holder.owner_dead():
            return None
        status = self.status(name)
        canary_live = status.latest_ready != status.latest_rolledout and status.percent_of(status.latest_ready) > 0
        switched = (
            holder.strategy == "blue_green"
            and status.stable_version == holder.version
            and status.previous_rolledout is not None
            and status.version_of(status.previous_rolledout) != holder.version
        )
        if not (canary_live or switched):
            if status.mirror:  # a shadow nobody compares any more: stop copying requests to it
                self.set_mirror(name, 0)
                shadow = status.mirror["revision"]
                return f"rollout {holder.rollout_id} (run {holder.run_id}) died while mirroring to {shadow}: mirroring stopped"
            return None
        self.rollback(name)
        return (
            f"rollout {holder.rollout_id} (run {holder.run_id}, pid {holder.pid}) died while its candidate "
            f"v{holder.version} served users: rolled {name} back"
        )

    def _kept(self, state: dict) -> list[str]:
        """The revisions that must run: the latest ready one and the rolled-out ones (KServe keeps
        the previous rolled-out revision warm for a rollback)."""
        keep = [state.get("latest_rolledout"), state.get("latest_ready"), state.get("previous_rolledout")]
        return [r for r in dict.fromkeys(keep) if r and state["revisions"][r]["status"] == "ready"]

    def _route_locked(self, directory: Path, state: dict) -> None:
        """Make the router serve `state`'s table: start the router if it is down (it reads the table
        from its file), else push the table. Never waits for a model server."""
        router = self._router_record(directory)
        if router is None or not processes.is_alive(router):
            self._ensure_router(directory, state)
        else:
            try:
                self._push_routes(directory, state)
            except OSError:
                # The router died between the check and the push: a new one reads the table from its file.
                self._ensure_router(directory, state)
        self._write_json(directory / "state.json", state)
        self._write_scrape_targets()

    def repair(self, name: str, due: Callable[[str], bool] | None = None, *, raise_router: bool = False) -> dict[str, str]:
        """Restart what should run and does not: the router first (traffic cannot move without it),
        then each dead revision, each on its own, outside the service lock, so a revision that
        cannot start blocks neither the others nor any traffic change. `due(component)` lets a
        supervisor apply its backoff. Returns component -> "restarted" or the error; with
        `raise_router`, a router that cannot start raises instead."""
        due = due or (lambda component: True)
        report: dict[str, str] = {}
        to_start: list[tuple[str, processes.ProcessRecord]] = []
        with self._locked(name) as directory:
            state = self._require(directory, name)
            router = self._router_record(directory)
            if (router is None or not processes.is_alive(router)) and due("router"):
                try:
                    self._ensure_router(directory, state)
                    report["router"] = "restarted"
                except processes.ProcessStartError as exc:
                    if raise_router:  # nothing can be served without it: say so at once
                        raise
                    report["router"] = str(exc)
                self._write_json(directory / "state.json", state)
            for revision in self._kept(state):
                if not self._revision_alive(directory, revision) and due(revision):
                    info = state["revisions"][revision]
                    # Counted when found dead, not when restarted: a candidate whose restarts keep
                    # failing has crashed as surely as one that came back.
                    info["crashes"] = int(info.get("crashes", 0)) + 1
                    to_start.append((revision, self._spawn_revision(directory, state, revision)))
            if to_start:
                self._write_json(directory / "state.json", state)
        for revision, record in to_start:
            try:
                self._wait_revision(record, name, revision)
                report[revision] = "restarted"
            except RevisionStartError as exc:
                report[revision] = str(exc)
        if to_start:
            with self._locked(name) as directory:
                try:
                    state = self._require(directory, name)
                except UnknownServiceError:
                    # Deleted while these started: nothing must outlive it.
                    for _, record in to_start:
                        processes.stop(record)
                    raise
                for revision, record in to_start:
                    info = state["revisions"].get(revision)
                    if info is None or revision not in self._kept(state):
                        processes.stop(record)  # retired while it started
                        continue
                    if report[revision] == "restarted":
                        info["port"], info["last_error"] = record.port, ""
                        info["restarts"] = int(info.get("restarts", 0)) + 1
                    else:
                        info["last_error"] = _brief(report[revision])
                self._route_locked(directory, state)
        return report

    # ---- the interface ------------------------------------------------------------------------
    def apply(self, manifest: dict) -> ServiceStatus:
        manifest = check_inference_service(manifest)
        name = manifest["metadata"]["name"]
        pct = manifest["spec"]["predictor"].get("canaryTrafficPercent")
        identity = _identity_hash(manifest)
        started: tuple[str, processes.ProcessRecord] | None = None
        with self._locked(name) as directory:
            state = self._load_state(directory) or {
                "name": name,
                "namespace": manifest["metadata"].get("namespace", "default"),
                "revisions": {},
                "latest_created": None,
                "latest_ready": None,
                "latest_rolledout": None,
                "previous_rolledout": None,
                "canary_percent": None,
                "router_port": None,
            }
            latest = state["revisions"].get(state["latest_created"] or "")
            if latest is None or latest["identity"] != identity:
                revision = f"{name}-predictor-{len(state['revisions']) + 1:05d}"
                annotations = manifest["metadata"].get("annotations") or {}
                state["revisions"][revision] = {
                    "identity": identity,
                    "storage_uri": manifest["spec"]["predictor"]["model"]["storageUri"],
                    "model_version": annotations.get(f"{ANNOTATION_PREFIX}/model-version"),
                    "annotations": annotations,
                    "created": time.time(),
                    "status": "starting",
                    "port": None,
                }
                state["latest_created"] = revision
                started = (revision, self._spawn_revision(directory, state, revision))
                self._write_json(directory / "state.json", state)
        if started is not None:
            # Waited for outside the service lock: a slow or broken new revision never holds up the
            # supervisor or a rollback of this service.
            revision, record = started
            try:
                self._wait_revision(record, name, revision)
            except RevisionStartError:
                with self._locked(name) as directory:
                    # As in KServe: a revision that never becomes ready gets no traffic.
                    state = self._require_state(directory, name)
                    state["revisions"][revision]["status"] = "failed"
                    self._write_json(directory / "state.json", state)
                raise
        with self._locked(name) as directory:
            try:
                state = self._require_state(directory, name)
            except UnknownServiceError:
                if started is not None:  # deleted while the new revision started
                    processes.stop(started[1])
                raise
            if started is not None and state["latest_created"] == started[0]:
                state["revisions"][started[0]]["status"] = "ready"
                state["latest_ready"] = started[0]
            ready = state["latest_ready"]
            if state["latest_rolledout"] is None:
                state["latest_rolledout"], state["canary_percent"] = ready, None
            elif pct is None:
                if ready != state["latest_rolledout"]:
                    state["previous_rolledout"], state["latest_rolledout"] = state["latest_rolledout"], ready
                state["canary_percent"] = None
            else:
                state["canary_percent"] = pct
            self._write_json(directory / "manifest.json", manifest)
            self._retire(directory, state)
            self._route_locked(directory, state)
            status = self._status(directory, state)
        self.ensure_supervisor()
        return status

    def rollback(self, name: str) -> ServiceStatus:
        """Traffic first: the routing table changes before anything is started. A rollback target
        that is down is restarted afterwards; meanwhile the router sends its share to a healthy
        revision (outlier ejection). Only a target that cannot start at all is an error."""
        with self._locked(name) as directory:
            state = self._require(directory, name)
            state.pop("mirror", None)  # a rolled-back candidate gets no copies either
            if state["latest_ready"] != state["latest_rolledout"]:
                state["canary_percent"] = 0
            elif state.get("previous_rolledout"):
                # After a promotion KServe users re-apply the old spec; locally the previous
                # revision is still warm, so point the rolled-out revision back at it at once.
                state["latest_rolledout"], state["previous_rolledout"] = state["previous_rolledout"], None
                state["canary_percent"] = 0
            else:
                raise RolloutStateError(f"{name} has no canary and no previous rolled-out revision to roll back to")
            manifest = json.loads((directory / "manifest.json").read_text())
            manifest["spec"]["predictor"]["canaryTrafficPercent"] = 0
            self._write_json(directory / "manifest.json", manifest)
            self._route_locked(directory, state)
            target = state["latest_rolledout"]
            target_down = not self._revision_alive(directory, target)
        self.ensure_supervisor()
        if target_down:
            error = self.repair(name, due=lambda component: component in ("router", target)).get(target, "")
            if error and error != "restarted":
                raise RevisionStartError(target, str(Path(self.home) / "logs" / f"{target}.log"), error)
        return self.status(name)

    def reconcile(self, name: str) -> list[str]:
        """Bring the running processes back in line with the recorded state (after a crash or a
        `stop_all`); returns what was restarted. A revision that cannot start is reported in the
        service's status message (naming its log), not raised: it must not block the others."""
        restarted = [c for c, outcome in self.repair(name, raise_router=True).items() if outcome == "restarted"]
        self.ensure_supervisor()
        return restarted

    def status(self, name: str) -> ServiceStatus:
        directory = self._dir(name)
        return self._status(directory, self._require(directory, name))

    def manifest(self, name: str) -> dict:
        directory = self._dir(name)
        self._require(directory, name)
        return json.loads((directory / "manifest.json").read_text())

    def list_services(self) -> list[str]:
        if not self._root.exists():
            return []
        return sorted(p.name for p in self._root.iterdir() if (p / "manifest.json").exists())

    def delete(self, name: str) -> None:
        with self._locked(name) as directory:
            self._require(directory, name)
            # Gone for everyone first (the supervisor then restarts nothing), then stopped, then removed,
            # all under the service's lock.
            (directory / "manifest.json").unlink()
            self._stop_processes(directory)
            shutil.rmtree(directory, ignore_errors=True)
        self._write_scrape_targets()

    def stop_all(self) -> list[str]:
        """Stop the supervisor, then every local router and model server, keeping their state for
        `reconcile` (which starts the supervisor again)."""
        stopped = ["supervisor"] if self.stop_supervisor() else []
        for name in self.list_services():
            with self._locked(name) as directory:
                stopped += self._stop_processes(directory)
        return stopped

    def _stop_processes(self, directory: Path) -> list[str]:
        stopped = []
        for pid_file in [directory / "router.pid", *sorted((directory / "revisions").glob("*.pid"))]:
            record = processes.read_record(pid_file)
            if record is not None and processes.is_alive(record):
                processes.stop(record)
                stopped.append(pid_file.stem)
        return stopped

    def _require_state(self, directory: Path, name: str) -> dict:
        state = self._load_state(directory)
        if state is None:
            raise UnknownServiceError(f"InferenceService {name!r} does not exist; known: {self.list_services()}")
        return state

    def _require(self, directory: Path, name: str) -> dict:
        state = self._load_state(directory)
        if state is None or not (directory / "manifest.json").exists():
            raise UnknownServiceError(f"InferenceService {name!r} does not exist; known: {self.list_services()}")
        return state

    def _status(self, directory: Path, state: dict) -> ServiceStatus:
        traffic = _traffic(state)
        alive = {
            rev: self._revision_alive(directory, rev)
            for rev in state["revisions"]
            if state["revisions"][rev]["status"] == "ready"
        }
        router = self._router_record(directory)
        router_alive = router is not None and processes.is_alive(router)
        serving = [t["revisionName"] for t in traffic if t["percent"] > 0]
        down = [rev for rev in serving if not alive.get(rev)]
        idle_down = [rev for rev in self._kept(state) if rev not in serving and not alive.get(rev)]
        notes = [] if router_alive and not down else [f"router alive={router_alive}; revisions down: {down}"]
        if idle_down:
            notes.append(f"kept revisions not running (no traffic): {idle_down}")
        # Why a revision is down, with its log: the supervisor's (or a reconcile's) last failed start.
        notes += [f"{rev}: {info['last_error']}" for rev, info in state["revisions"].items() if info.get("last_error")]
        message = "; ".join(notes)
        revisions = {
            rev: {
                "model_version": info.get("model_version"),
                "status": info["status"] if info["status"] != "ready" or alive.get(rev) else "down",
                "storage_uri": info["storage_uri"],
                "port": info.get("port"),
                "restarts": int(info.get("restarts", 0)),
                "crashes": int(info.get("crashes", 0)),
                "run_id": (info.get("annotations") or {}).get(f"{ANNOTATION_PREFIX}/mlflow-run-id", ""),
            }
            for rev, info in state["revisions"].items()
        }
        url = f"http://127.0.0.1:{state['router_port']}" if state.get("router_port") else ""
        return ServiceStatus(
            name=state["name"],
            namespace=state["namespace"],
            url=url,
            ready=router_alive and not down and bool(serving),
            traffic=traffic,
            latest_created=state["latest_created"],
            latest_ready=state["latest_ready"],
            latest_rolledout=state["latest_rolledout"],
            previous_rolledout=state.get("previous_rolledout"),
            canary_percent=state.get("canary_percent"),
            revisions=revisions,
            message=message,
            # The router serves tags under a path prefix (it also honours KServe's latest-/prev- hostnames).
            tag_urls={tag: f"{url}/{tag}" for tag in _tags(state)} if url else {},
            mirror=_mirror(state),
        )


def _brief(error: str) -> str:
    """An error for a status line: its first line and the last line of the log tail it carries."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def _traffic(state: dict) -> list[dict]:
    """KServe's `status.components.predictor.traffic` for the recorded state."""
    ready, stable, pct = state.get("latest_ready"), state.get("latest_rolledout"), state.get("canary_percent")
    tags = {rev: tag for tag, rev in _tags(state).items()}
    if stable is None:
        return []
    if pct is None or ready == stable or ready is None:
        entries = [(stable, 100)]
    else:
        entries = [(ready, pct), (stable, 100 - pct)]
    if ready and ready not in dict(entries):
        entries.insert(0, (ready, 0))
    return [
        {"revisionName": rev, "percent": p, "latestRevision": rev == ready, **({"tag": tags[rev]} if rev in tags else {})}
        for rev, p in entries
    ]


def _mirror(state: dict) -> dict:
    """The recorded mirror while it still points at a candidate (the latest ready revision, not rolled out)."""
    mirror = state.get("mirror") or {}
    if mirror.get("revision") != state.get("latest_ready") or mirror.get("revision") == state.get("latest_rolledout"):
        return {}
    return mirror


def _tags(state: dict) -> dict[str, str]:
    ready, stable, previous = state.get("latest_ready"), state.get("latest_rolledout"), state.get("previous_rolledout")
    tags = {}
    if ready:
        tags["latest"] = ready
    prev = stable if stable and stable != ready else previous
    if prev and state["revisions"].get(prev, {}).get("status") == "ready":
        tags["prev"] = prev
    return tags


def http_json(url: str, payload: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    """Smoke requests: (status, the JSON body, or {"text": ...} when it is not JSON), whatever the status."""
    response = http.request(url, json_body=payload, headers={"content-type": "application/json"}, timeout=timeout)
    try:
        return response.status, json.loads(response.body or b"{}")
    except ValueError:
        return response.status, {"text": response.text}
