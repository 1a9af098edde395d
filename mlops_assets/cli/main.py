"""`mlops-assets`: the main job (`demo`), and `stop` / `status` for the local platform.

`demo` drives the whole lifecycle the way a platform engineer's deployment would: a real Dagster
instance under DAGSTER_HOME, the Dagster daemon dequeuing runs submitted with `dagster job launch`,
assets materialized by those runs, then real HTTP traffic through the router, then a summary read
back from the instance's event log.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlops_assets.core.settings import Settings, dagster_home_for, load_settings
from mlops_assets.demo.traffic import TrafficGenerator, send_traffic

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CODE_LOCATION = ["-m", "mlops_assets.definitions"]
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def prepare_dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME (default `$MLOPS_HOME/dagster`) holding the project's `dagster.yaml`."""
    home = dagster_home_for(settings)
    home.mkdir(parents=True, exist_ok=True)
    source = PROJECT_ROOT / "dagster.yaml"
    if not source.exists():
        raise SystemExit(f"dagster.yaml not found at {source}: install the project with `pip install -e .` from its checkout")
    shutil.copyfile(source, home / "dagster.yaml")
    # The CLI starts the other processes (daemon, runs, servers): they find the instance and the
    # platform through the environment they inherit.
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["MLOPS_HOME"] = str(settings.home)
    return home


def prepare_mlflow_store(settings: Settings) -> str:
    """Create and migrate MLflow's backend store before any other process opens it."""
    from mlops_assets.core.platform.backends import LocalPlatformServices

    services = LocalPlatformServices(
        home=str(settings.home),
        tracking_uri=settings.mlflow_tracking_uri,
        mlflow_ui_port=settings.mlflow_ui_port,
        prometheus_port=settings.prometheus_port,
    )
    return str(services.backend_store().get("uri", settings.mlflow_tracking_uri))


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


#: The daemons the demo's runs depend on, by the `daemon_type()` their heartbeats carry: the run queue
#: (QueuedRunCoordinatorDaemon: runs submitted by `dagster job launch` and by sensors) and the sensors
#: (SensorDaemon: mlflow_registry_sensor, prometheus_alert_sensor).
WATCHED_DAEMONS = ("QUEUED_RUN_COORDINATOR", "SENSOR")
#: Each daemon thread writes a heartbeat every 30 s (dagster's DEFAULT_HEARTBEAT_INTERVAL_SECONDS, which
#: `dagster-daemon run` does not let us change), but only between its iterations, and one sensor
#: evaluation can hold an iteration for up to its 60 s gRPC timeout on a loaded box: 30 + 60 s, and
#: 30 s of slack, before a silent daemon counts as stuck. A daemon that dies is caught at once, by its exit.
HEARTBEAT_STALE_S = 120.0
#: Generous: on a loaded box the daemon's start (imports, the instance, its threads) can take many seconds.
DAEMON_READY_TIMEOUT_S = 120.0
#: Heartbeats change every 30 s: reading them every 2 s is enough; the process is checked at every call.
HEARTBEAT_READ_INTERVAL_S = 2.0
LOG_TAIL_LINES = 30
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Daemon:
    """`dagster-daemon run` in its own process group, watched by every wait of the demo, and stopped
    (with its children) on exit.

    Start it only once the instance's databases exist (`mlops_assets.instance.create_storage`), then
    `wait_until_ready()`; `check()` / `pause()` raise SystemExit with the end of its log as soon as
    the process is gone or its heartbeats stop.
    """

    def __init__(self, log_file: Path, instance, heartbeat_stale_s: float = HEARTBEAT_STALE_S) -> None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        self.instance = instance
        self.heartbeat_stale_s = heartbeat_stale_s
        # The log is appended to across demos: only what this daemon wrote is worth showing.
        self._log_offset = log_file.stat().st_size if log_file.exists() else 0
        self._heartbeats_read_at = 0.0
        # Heartbeats older than this are a previous daemon's, left in a reused DAGSTER_HOME.
        self.started_at = time.time()
        self.ready_at: float | None = None
        with open(log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [_bin("dagster-daemon"), "run", *CODE_LOCATION],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _heartbeats(self) -> dict[str, float]:
        """This daemon's latest heartbeat time per watched daemon type."""
        beats = self.instance.get_daemon_heartbeats()
        return {
            kind: beats[kind].timestamp for kind in WATCHED_DAEMONS if kind in beats and beats[kind].timestamp >= self.started_at
        }

    def _exited(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def problem(self) -> str | None:
        """Why the daemon can no longer run the demo's runs, or None while it is alive and heartbeating."""
        exited = self._exited()
        if exited or self.ready_at is None or time.monotonic() - self._heartbeats_read_at < HEARTBEAT_READ_INTERVAL_S:
            return exited
        self._heartbeats_read_at = time.monotonic()
        beats, now = self._heartbeats(), time.time()
        for kind in WATCHED_DAEMONS:
            age = now - beats.get(kind, self.ready_at)
            if age > self.heartbeat_stale_s:
                return f"is running but its {kind} sent no heartbeat for {age:.0f}s (the limit is {self.heartbeat_stale_s:.0f}s)"
        return None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_file, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(cannot read it: {exc})"
        tail = [_ANSI.sub("", line) for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(tail) if tail else "(empty)"

    def failure(self, problem: str, waiting_for: str) -> SystemExit:
        return SystemExit(
            f"dagster-daemon (pid {self.proc.pid}) {problem} while the demo waited for {waiting_for}.\n"
            f"The last {LOG_TAIL_LINES} lines of its log, {self.log_file}:\n{self.log_tail()}"
        )

    def check(self, waiting_for: str) -> None:
        """Raise SystemExit, with the end of the daemon's log, if the daemon died or stopped heartbeating."""
        problem = self.problem()
        if problem:
            raise self.failure(problem, waiting_for)

    def pause(self, seconds: float, waiting_for: str) -> None:
        """Sleep `seconds`, checking the daemon every half second."""
        end = time.monotonic() + seconds
        while True:
            self.check(waiting_for)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    def wait_until_ready(self, timeout_s: float = DAEMON_READY_TIMEOUT_S) -> float:
        """Wait for this daemon's first heartbeat from each of WATCHED_DAEMONS; return the seconds it took."""
        started = time.monotonic()
        while True:
            exited = self._exited()
            if exited:
                raise self.failure(exited, "its first heartbeats")
            beats = self._heartbeats()
            if len(beats) == len(WATCHED_DAEMONS):
                self.ready_at = time.time()
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                missing = [kind for kind in WATCHED_DAEMONS if kind not in beats]
                raise self.failure(f"sent no heartbeat from {', '.join(missing)} within {timeout_s:.0f}s", "its first heartbeats")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Whatever the daemon started (code server, run workers) shares its process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _interesting():
    from dagster import DagsterEventType

    return {
        DagsterEventType.RUN_START,
        DagsterEventType.STEP_START,
        DagsterEventType.STEP_SUCCESS,
        DagsterEventType.STEP_FAILURE,
        DagsterEventType.ASSET_MATERIALIZATION,
        DagsterEventType.ASSET_CHECK_EVALUATION,
        DagsterEventType.RUN_FAILURE,
    }


def _describe(event) -> str:
    from dagster import DagsterEventType

    if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
        mat = event.event_specific_data.materialization
        meta = mat.metadata
        label = event.asset_key.to_user_string()
        if "rollout_event" in meta:
            label += f"  [{meta['rollout_event'].value}] {mat.description or ''}"[:200]
        return label
    if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
        evaluation = event.event_specific_data
        return f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name} passed={evaluation.passed}"
    return event.step_key or ""


def follow_run(
    instance,
    run_id: str,
    job_name: str,
    timeout_s: float = 900,
    allow_failure: bool = False,
    *,
    daemon: Daemon,
    quiet: bool = False,
) -> str:
    """Stream a run's progress from the instance's event log until it ends (`quiet`: only wait);
    return its status."""
    shown = 0
    interesting = _interesting()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = instance.all_logs(run_id)
        for record in [] if quiet else records[shown:]:
            event = record.dagster_event
            if event is not None and event.event_type in interesting:
                _say(f"[dagster]   {event.event_type.value.lower():<24} {_describe(event)}")
            elif record.user_message and record.level >= 30:
                _say(f"[dagster]   {record.user_message[:300]}")
        shown = len(records)
        run = instance.get_run_by_id(run_id)
        if run.status.value in TERMINAL:
            if run.status.value != "SUCCESS" and not allow_failure:
                failures = [
                    r.dagster_event.event_specific_data for r in records if r.dagster_event and r.dagster_event.is_failure
                ]
                detail = "\n".join(str(getattr(f, "error", f)) for f in failures)[-4000:]
                raise SystemExit(f"run {run_id} of {job_name} ended {run.status.value}:\n{detail}")
            return run.status.value
        daemon.pause(0.5, f"run {run_id[:8]} of {job_name}")
    raise SystemExit(f"run {run_id} of {job_name} did not finish within {timeout_s:.0f}s")


def _dagster_job_launch(job_name: str, daemon: Daemon, timeout_s: float = 120) -> tuple[int, str]:
    """`dagster job launch -j job_name` (it queues the run for the daemon); its exit code and output."""
    launch = subprocess.Popen(
        [_bin("dagster"), "job", "launch", *CODE_LOCATION, "-j", job_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # with the code server it starts, killed as one group below
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                output, _ = launch.communicate(timeout=0.5)
                return launch.returncode, output
            except subprocess.TimeoutExpired:
                # Loading the code location takes a while on a busy box: a dead daemon must not wait for it.
                daemon.check(f"`dagster job launch -j {job_name}`")
                if time.monotonic() > deadline:
                    raise SystemExit(f"`dagster job launch -j {job_name}` did not return within {timeout_s:.0f}s") from None
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()


def launch_and_wait(instance, job_name: str, timeout_s: float = 600, *, daemon: Daemon) -> str:
    """Submit `job_name` with `dagster job launch`, let the daemon run it, stream its progress."""
    from dagster import RunsFilter

    before = {r.run_id for r in instance.get_runs(RunsFilter(job_name=job_name))}
    code, output = _dagster_job_launch(job_name, daemon)
    if code != 0:
        raise SystemExit(f"`dagster job launch -j {job_name}` failed:\n{output}")
    runs = [r for r in instance.get_runs(RunsFilter(job_name=job_name)) if r.run_id not in before]
    if not runs:
        raise SystemExit(f"`dagster job launch -j {job_name}` created no run:\n{output}")
    run_id = runs[0].run_id
    _say(f"[dagster] launched {job_name} run {run_id[:8]} (queued for the daemon)")
    follow_run(instance, run_id, job_name, timeout_s, daemon=daemon)
    return run_id


def wait_for_sensor_run(instance, isvc: str, version: str, timeout_s: float = 180, *, daemon: Daemon):
    """The run `mlflow_registry_sensor` launched for `version` of `isvc`'s model (found by its tags)."""
    from dagster import RunsFilter

    from mlops_assets.core.serving.manifest import ISVC_TAG

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = instance.get_runs(RunsFilter(tags={"mlops-assets/model-version": version, ISVC_TAG: isvc}))
        if runs:
            return runs[0]
        daemon.pause(1, f"mlflow_registry_sensor's rollout of version {version}")
    raise SystemExit(f"mlflow_registry_sensor launched no rollout for version {version} within {timeout_s:.0f}s")


DRILLS = [
    ("good v2, canary", 2, None, "canary", "promoted"),
    ("faulty v3 (fails 2% of requests), canary", 3, 0.02, "canary", "rolled_back"),
    ("v4, blue-green", 4, None, "blue_green", "promoted"),
    ("v5 (converts better), A/B test", 5, None, "ab_test", "promoted"),
]
#: Simulated conversion rates per model version for the A/B drill (v5 is the better model).
AB_SUCCESS = {"5": 0.16, "*": 0.06}
#: Rollout policy for the demo's modest traffic (~50 req/s); production defaults are stricter.
DEMO_ROLLOUT_ENV = {
    # A 1% error SLO: a canary failing 2% can then never show "within SLO" and is always rolled back
    # (with a laxer SLO, promotion and rollback race on a few errors).
    "MLOPS_ROLLOUT_STEPS": "25,50",
    "MLOPS_ROLLOUT_MIN_REQUESTS": "50",
    "MLOPS_ROLLOUT_MAX_ERROR_RATE": "0.01",
    # Every process of the demo shares 2 cores: a loaded box is not a slow model.
    "MLOPS_ROLLOUT_MAX_P95_S": "2.0",
    "MLOPS_ROLLOUT_POLL_S": "1",
    "MLOPS_ROLLOUT_AB_BASE_RATE": "0.06",
    "MLOPS_ROLLOUT_AB_MIN_LIFT": "0.5",
    # Drift reports and retraining look at the last 25 s of traffic: the demo's drift is that recent.
    "MLOPS_RECENT_WINDOW_S": "25",
    # Alerts wait 15 s, not the rules' minute or more: the demo's whole drift episode lasts about that.
    "MLOPS_ALERT_FOR_MAX_S": "15",
}


def run_drills(instance, settings: Settings, platform, isvc: str, model: str, *, daemon: Daemon) -> list[dict]:
    """Register each drill's version in MLflow, as a user would, and follow the rollout the
    sensor launches for it."""
    from mlops_assets.core.registry import MlflowRegistry
    from mlops_assets.demo.training import Fault, train_and_register

    registry = MlflowRegistry(tracking_uri=settings.mlflow_tracking_uri, artifact_root=str(settings.mlflow_artifact_root))
    results = []
    for what, seed, error_rate, strategy, expected in DRILLS:
        fault = Fault(error_rate=error_rate) if error_rate else None
        version = train_and_register(
            registry, model, n_rows=5000, seed=seed, fault=fault, strategy=strategy, triggered_by="mlops-assets demo"
        )
        _say(f"\n[demo] registered {model} v{version.version} in MLflow ({what}); waiting for mlflow_registry_sensor")
        run = wait_for_sensor_run(instance, isvc, version.version, daemon=daemon)
        _say(f"[dagster] sensor launched {run.job_name} run {run.run_id[:8]} for v{version.version}")
        status = follow_run(instance, run.run_id, run.job_name, allow_failure=True, daemon=daemon)
        meta = _rollout_metadata(instance, run.run_id, model)
        results.append(
            {"drill": what, "version": version.version, "job": run.job_name, "run_status": status, "expected": expected, **meta}
        )
        _say(
            f"[demo] v{version.version}: {meta.get('rollout_outcome')} in {meta.get('time_to_decision_s')}s; "
            f"failed requests on the candidate {meta.get('candidate_failed_requests')}, "
            f"on the stable revision {meta.get('stable_failed_requests')}"
        )
    return results


#: A team's own model: trained and registered by a plain script outside Dagster, served because it
#: is declared (defs/models/delivery_time/defs.yaml: a regressor on another table, blue-green).
TEAM_MODEL, TEAM_ISVC = "delivery_time", "delivery-time"
TEAM_SCRIPT = PROJECT_ROOT / "examples" / "delivery_time" / "train_and_register.py"
TEAM_DRILL = f"{TEAM_MODEL} v2 (a team's own model and script), declared blue-green"


def register_team_version(settings: Settings, seed: int) -> str:
    """Run the team's script as the team would: it registers a version with MLflow's API only."""
    out = subprocess.run(
        [sys.executable, str(TEAM_SCRIPT), "--tracking-uri", settings.mlflow_tracking_uri, "--seed", str(seed)],
        cwd=settings.home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"{TEAM_SCRIPT} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1].split()[3]


class TeamDrill(threading.Thread):
    """While the fraud drills run, the team registers v2 of its own model and the sensor rolls it
    out with the model's declared policy: two InferenceServices, two rollouts, each with its own
    lock and decision. Its users (sending the version's input example) keep going afterwards."""

    def __init__(self, settings: Settings, platform, daemon: Daemon) -> None:
        super().__init__(name="team-drill", daemon=True)
        self.settings, self.platform, self.daemon = settings, platform, daemon
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.users: TrafficGenerator | None = None

    def run(self) -> None:
        import json

        from dagster import DagsterInstance

        from mlops_assets.core.model_artifacts import training_data
        from mlops_assets.core.registry import MlflowRegistry

        try:
            settings = self.settings
            registry = MlflowRegistry(tracking_uri=settings.mlflow_tracking_uri, artifact_root=str(settings.mlflow_artifact_root))
            # The team's users look like its training data (the table the version logged).
            champion = registry.get_version(TEAM_MODEL, registry.alias_version(TEAM_MODEL, "champion"))
            rows = json.loads(training_data(registry, champion).head(1000).to_json(orient="records"))
            self.users = TrafficGenerator(self.platform, TEAM_ISVC, rate=10, rows=rows).start()
            version = register_team_version(settings, seed=2)
            _say(f"[demo] a team registered {TEAM_MODEL} v{version} with its own script (beside the fraud drills)")
            with DagsterInstance.get() as instance:
                run = wait_for_sensor_run(instance, TEAM_ISVC, version, daemon=self.daemon)
                _say(f"[dagster] sensor launched {run.job_name} run {run.run_id[:8]} for {TEAM_MODEL} v{version}")
                status = follow_run(instance, run.run_id, run.job_name, allow_failure=True, daemon=self.daemon, quiet=True)
                meta = _rollout_metadata(instance, run.run_id, TEAM_MODEL)
            _say(f"[demo] {TEAM_MODEL} v{version}: {meta.get('rollout_outcome')} in {meta.get('time_to_decision_s')}s")
            self.result = {
                "drill": TEAM_DRILL,
                "version": version,
                "job": run.job_name,
                "run_status": status,
                "expected": "promoted",
                **meta,
            }
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.error = exc

    def outcome(self, timeout_s: float = 600) -> dict:
        self.join(timeout_s)
        if self.is_alive():
            raise SystemExit(f"the {TEAM_MODEL} drill did not finish within {timeout_s:.0f}s")
        if self.error is not None:
            raise self.error
        return self.result or {}

    def stop(self) -> None:
        if self.users is not None:
            self.users.stop()


def run_drift_loop(instance, traffic: TrafficGenerator, wait_s: float, *, daemon: Daemon) -> dict:
    """Shift the users' data, let the drift report flag it, and follow the loop the sensors close:
    ModelDriftDetected -> retrain_job on recent traffic -> canary of the new version -> promotion."""
    from dagster import RunsFilter

    traffic.shift = 1.0
    _say(f"\n[demo] injecting drift: the users' data now shifts by 1 standard deviation; waiting {wait_s:.0f}s for traffic")
    daemon.pause(wait_s, "shifted traffic before the drift report")
    run_id = launch_and_wait(instance, "monitor_drift_job", daemon=daemon)
    report = _latest_meta(instance, ["monitoring", "fraud_detector_drift"], run_id)
    _say(
        f"[demo] drift report: {report.get('dataset_verdict')} (share {report.get('drift_share')}); "
        f"drifted: {report.get('drifted_features')}"
    )
    _say("[demo] waiting for Prometheus's ModelDriftDetected and prometheus_alert_sensor")
    deadline, retrain = time.monotonic() + 240, None
    while time.monotonic() < deadline and retrain is None:
        runs = instance.get_runs(RunsFilter(job_name="retrain_job"))
        retrain = runs[0] if runs else None
        if retrain is None:
            daemon.pause(1, "prometheus_alert_sensor's retraining run")
    if retrain is None:
        raise SystemExit("prometheus_alert_sensor launched no retraining within 240s")
    _say(f"[dagster] sensor launched retrain_job run {retrain.run_id[:8]} ({retrain.tags.get('mlops-assets/alert')})")
    follow_run(instance, retrain.run_id, "retrain_job", daemon=daemon)
    model = _latest_meta(instance, ["models", "fraud_detector"], retrain.run_id)
    version = str(model.get("version"))
    _say(f"[demo] retrained on recent traffic: v{version}; waiting for its canary")
    run = wait_for_sensor_run(instance, "fraud-detector", version, daemon=daemon)
    follow_run(instance, run.run_id, run.job_name, allow_failure=True, daemon=daemon)
    outcome = _rollout_metadata(instance, run.run_id, "fraud_detector")
    after_id = launch_and_wait(instance, "monitor_drift_job", daemon=daemon)
    after = _latest_meta(instance, ["monitoring", "fraud_detector_drift"], after_id)
    _say(f"[demo] drift against v{version}'s training data: {after.get('dataset_verdict')} (share {after.get('drift_share')})")
    return {"report": report, "version": version, "outcome": outcome, "after": after}


def _latest_meta(instance, path: list[str], run_id: str) -> dict:
    from dagster import AssetKey

    for record in instance.fetch_materializations(AssetKey(path), limit=20).records:
        if record.run_id == run_id:
            return {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}
    return {}


def _rollout_metadata(instance, run_id: str, model: str) -> dict:
    from dagster import AssetKey

    for record in instance.fetch_materializations(AssetKey(["serving", model]), limit=50).records:
        if record.run_id != run_id:
            continue
        meta = record.asset_materialization.metadata
        if "rollout_outcome" in meta:
            keys = ("rollout_outcome", "time_to_decision_s", "candidate_failed_requests", "stable_failed_requests", "reason")
            return {k: meta[k].value for k in keys if k in meta}
    return {"rollout_outcome": "unknown"}


def _md_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


def summary(
    instance, settings: Settings, traffic: dict[str, int], drills, loop, generator, elapsed: float, keep_running: bool
) -> str:
    from dagster import AssetKey, RunsFilter

    from mlops_assets.core.serving.manifest import ISVC_TAG
    from mlops_assets.definitions import build_definitions

    defs = build_definitions()

    lines = ["", "=" * 78, "mlops-assets: lifecycle complete", "=" * 78, "Assets (latest materialization):"]
    keys = sorted(defs.resolve_asset_graph().get_all_asset_keys(), key=lambda k: k.to_user_string())
    for key in keys:
        event = instance.get_latest_materialization_event(key)
        meta = event.asset_materialization.metadata if event else {}
        pick = {
            k: getattr(v, "value", v)
            for k, v in meta.items()
            if k in ("version", "alias", "auc", "url", "stable_version", "ready", "installed")
        }
        lines.append(f"  {key.to_user_string():<32} {'materialized' if event else 'MISSING':<13} {pick}")
    serving = instance.get_latest_materialization_event(AssetKey(["serving", "fraud_detector"]))
    if serving:
        meta = serving.asset_materialization.metadata
        lines += [
            "",
            "InferenceService fraud-detector:",
            f"  URL (router):   {meta['url'].value}",
            f"  predict (V1):   {meta['predict_url_v1'].value}",
        ]
        lines += ["  traffic:"] + [f"    {row}" for row in _md_rows(meta["traffic"].value)]
        if "request_counts" in meta:
            lines += ["  requests per revision (from the router's /metrics):"]
            lines += [f"    {row}" for row in _md_rows(meta["request_counts"].value)]
    lines += ["", f"First burst of traffic: {dict(sorted(traffic.items()))} (4xx are the deliberately malformed requests)"]
    if drills:
        lines += ["", "Rollouts (each registered in MLflow, launched by mlflow_registry_sensor, run by the daemon):"]
        lines += [
            "  | drill | version | job | outcome | expected | time to decision s | failed on candidate | failed on stable |"
        ]
        lines += ["  |---|---|---|---|---|---|---|---|"]
        for d in drills:
            lines.append(
                f"  | {d['drill']} | v{d['version']} | {d['job']} | {d.get('rollout_outcome')} | {d['expected']} | "
                f"{d.get('time_to_decision_s')} | {d.get('candidate_failed_requests')} | {d.get('stable_failed_requests')} |"
            )
    if loop is not None:
        r, o, a = loop["report"], loop["outcome"], loop["after"]
        lines += [
            "",
            "Closed loop (drift -> alert -> retrain -> canary -> promote):",
            f"  drift report:  {r.get('dataset_verdict')}, share {r.get('drift_share')}, drifted: {r.get('drifted_features')}",
            f"                 HTML report: {r.get('report')}",
            f"  retrained:     v{loop['version']} on recent traffic (launched by prometheus_alert_sensor on ModelDriftDetected)",
            f"  its canary:    {o.get('rollout_outcome')} in {o.get('time_to_decision_s')}s, failed requests on the candidate "
            f"{o.get('candidate_failed_requests')}, on the stable revision {o.get('stable_failed_requests')}",
            f"  drift after:   {a.get('dataset_verdict')}, share {a.get('drift_share')} "
            f"(against v{loop['version']}'s training data)",
        ]
    rollbacks = instance.get_runs(RunsFilter(job_name="rollback_job"))
    lines += ["", f"Rollbacks launched by prometheus_alert_sensor: {len(rollbacks)}"]
    lines += [
        f"  run {r.run_id[:8]} ({r.status.value}) on {r.tags.get(ISVC_TAG)}: alert {r.tags.get('mlops-assets/alert')}"
        for r in rollbacks
    ]
    if generator is not None:
        lines += ["", f"Background users' responses by model version and status: {generator.by_version()}"]
    lines += [
        "",
        "Where to look:",
        f"  Dagster UI:  DAGSTER_HOME={dagster_home_for(settings)} MLOPS_HOME={settings.home} dagster dev -w workspace.yaml",
        "               then http://127.0.0.1:3000 -> Assets (platform, models, serving) and Runs",
        f"  MLflow UI:   {settings.mlflow_ui_url}" + ("" if keep_running else " (stopped; run the demo with --keep-running)"),
        f"  State+logs:  {settings.home}",
        f"Finished in {elapsed:.0f}s." + ("" if keep_running else " All processes started by the demo were stopped."),
    ]
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from mlops_assets.core.platform import services
    from mlops_assets.core.serving.platform import LocalPlatform
    from mlops_assets.instance import create_storage

    started = time.monotonic()
    # The demo's rollout policy reaches the daemon and every run it starts through the environment
    # they inherit; values the operator set win. Settings then read it like any other process.
    for key, value in DEMO_ROLLOUT_ENV.items():
        os.environ.setdefault(key, value)
    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    dagster_home = prepare_dagster_home(settings)
    _say(f"[demo] MLOPS_HOME={settings.home} DAGSTER_HOME={dagster_home}")
    # The instance's databases exist before any other process opens it (dagster.yaml's storage also
    # locks their creation, for processes started by hand); a broken instance fails here, not in the daemon.
    instance = DagsterInstance.get()
    create_storage(instance, dagster_home)
    # MLflow's store too: the registry sensor (in the daemon) and the team's script would otherwise
    # both create and migrate a fresh SQLite store at once, and MLflow's migrations do not lock.
    _say(f"[demo] MLflow backend store ready: {prepare_mlflow_store(settings)}")
    daemon = Daemon(settings.home / "logs" / "dagster-daemon.log", instance)
    _say(f"[demo] dagster-daemon started (pid {daemon.proc.pid}); log {daemon.log_file}")
    platform = LocalPlatform(home=str(settings.home))
    traffic = team = None
    try:
        waited = daemon.wait_until_ready()
        _say(f"[demo] dagster-daemon is up: heartbeats from {', '.join(WATCHED_DAEMONS)} after {waited:.1f}s")
        team_v1 = register_team_version(settings, seed=1)
        _say(f"[demo] a team registered its own model {TEAM_MODEL} v{team_v1} with a plain MLflow script ({TEAM_SCRIPT.name})")
        launch_and_wait(instance, "lifecycle_job", daemon=daemon)
        status = platform.status("fraud-detector")
        _say(f"[demo] sending {args.requests} requests to {status.url}")
        burst = send_traffic(status.predict_url("v1"), status.predict_url("v2"), args.requests)
        _say(f"[demo] responses: {burst}")
        drills, loop = [], None
        if not args.skip_rollouts:
            traffic = TrafficGenerator(platform, "fraud-detector", rate=args.rate, success=AB_SUCCESS).start()
            _say(f"[demo] background users: ~{args.rate:.0f} requests/s with sticky user keys and A/B feedback")
            team = TeamDrill(settings, platform, daemon)
            team.start()
            drills = run_drills(instance, settings, platform, "fraud-detector", "fraud_detector", daemon=daemon)
            drills.append(team.outcome())
            from mlops_assets.core.platform import services as platform_services

            if platform_services.prometheus_binary() is None:
                _say("[demo] prometheus is not installed (Debian package `prometheus`): skipping the alert-driven drift loop")
            else:
                loop = run_drift_loop(instance, traffic, wait_s=args.drift_wait, daemon=daemon)
            traffic.stop()
        launch_and_wait(instance, "observe_serving_job", daemon=daemon)
        _say(summary(instance, settings, burst, drills, loop, traffic, time.monotonic() - started, args.keep_running))
        failed = [d for d in drills if d.get("rollout_outcome") != d["expected"]]
        if loop is not None and loop["outcome"].get("rollout_outcome") != "promoted":
            failed.append({"drill": "retrained version after drift", **loop["outcome"]})
        if failed:
            _say(f"[demo] UNEXPECTED rollout outcomes: {failed}")
            return 1
        return 0
    finally:
        if traffic is not None:
            traffic.stop()
        if team is not None:
            team.stop()
        daemon.stop()
        if not args.keep_running:
            platform.stop_all()
            services.stop_all(settings.home)


def stop(args: argparse.Namespace) -> int:
    from mlops_assets.core.platform import services
    from mlops_assets.core.serving.platform import LocalPlatform

    settings = load_settings()
    stopped = LocalPlatform(home=str(settings.home)).stop_all() + services.stop_all(settings.home)
    _say(f"stopped: {stopped or 'nothing was running'}")
    return 0


def status(args: argparse.Namespace) -> int:
    from mlops_assets.core.platform import services
    from mlops_assets.core.serving.platform import LocalPlatform

    settings = load_settings()
    platform = LocalPlatform(home=str(settings.home))
    for name in ("mlflow-server", "prometheus"):
        record = services.running(settings.home, name)
        _say(f"{name:<16} {'running at ' + record.url if record else 'stopped'}")
    for name in platform.list_services():
        st = platform.status(name)
        _say(f"{name:<16} ready={st.ready} url={st.url} stable=v{st.stable_version} traffic={st.traffic}")
        if st.message:
            _say(f"{'':<16} health: {st.message}")
    supervised = platform.supervisor_status().get("services", {})
    restarts = {
        f"{svc}/{component}": info["restarts"]
        for svc, components in supervised.items()
        for component, info in components.items()
        if info.get("restarts")
    }
    _say(f"{'supervisor':<16} restarts={restarts or 'none'} (log: {settings.home / 'logs' / 'supervisor.log'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlops-assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the end-to-end lifecycle through a real Dagster instance and daemon")
    p_demo.add_argument("--requests", type=int, default=400, help="inference requests to send (default 400)")
    p_demo.add_argument("--rate", type=float, default=50.0, help="background requests/s during rollouts (default 50)")
    p_demo.add_argument("--drift-wait", type=float, default=25.0, help="seconds of shifted traffic before the drift report")
    p_demo.add_argument("--skip-rollouts", action="store_true", help="stop after the first deployment")
    p_demo.add_argument(
        "--keep-running", action="store_true", help="leave the platform up for the UIs; stop with `mlops-assets stop`"
    )
    p_demo.set_defaults(func=demo)
    sub.add_parser("stop", help="stop every local router, model server, MLflow UI and Prometheus").set_defaults(func=stop)
    sub.add_parser("status", help="what runs locally").set_defaults(func=status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
