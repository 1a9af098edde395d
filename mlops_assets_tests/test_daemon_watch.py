"""The main job's Dagster daemon and instance start-up (issue 9), with real dagster processes on
fresh DAGSTER_HOMEs:

- `mlops-assets demo` creates the instance's databases before it starts `dagster-daemon run`,
  waits for the daemon's heartbeats, and when the daemon is killed it exits non-zero within 30 s,
  naming the daemon, its log and the log's last lines, and leaves no process behind;
- a daemon that is alive but no longer heartbeats (stopped with SIGSTOP) stops the demo's waits too;
- several processes opening one fresh instance at the same moment (the daemon, `dagster job launch`,
  the code servers they start) all succeed, with one alembic head in every database, because the
  project's dagster.yaml names `mlops_assets.instance.LockedSqliteStorage`;
- a database that the race left with two alembic heads (unopenable by dagster's own storage) opens again.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlops_assets.core.processes import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("mlops-assets"))


def processes_in_env(marker: str) -> list[str]:
    """Live processes whose environment contains `marker`: everything the test's demo started inherits
    its MLOPS_HOME, whatever its command line or process group."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            if marker.encode() + b"\0" in (proc / "environ").read_bytes():
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {cmd[:200]}")
        except OSError:
            continue
    return found


def fresh_dagster_home(path: Path, yaml_text: str | None = None) -> Path:
    path.mkdir(parents=True)
    if yaml_text is None:
        shutil.copyfile(ROOT / "dagster.yaml", path / "dagster.yaml")
    else:
        (path / "dagster.yaml").write_text(yaml_text)
    return path


def alembic_versions(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]


def test_demo_stops_within_seconds_when_its_daemon_dies(tmp_path):
    home = tmp_path / "home"
    marker = f"MLOPS_HOME={home}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},
        "MLOPS_HOME": str(home),
        "MLOPS_MLFLOW_UI_PORT": str(free_port()),
        "MLOPS_PROMETHEUS_PORT": str(free_port()),
    }
    demo = subprocess.Popen(
        [CLI, "demo", "--skip-rollouts", "--requests", "10"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    try:
        daemon_pid = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the demo ended before its daemon was up:\n" + "".join(output)
            output.append(line)
            if "dagster-daemon started (pid " in line:
                daemon_pid = int(line.split("(pid ")[1].split(")")[0])
                # The demo opened the instance, with all its databases, before starting the daemon.
                dbs = [home / "dagster" / "history" / "runs.db", home / "dagster" / "history" / "runs" / "index.db"]
                dbs.append(home / "dagster" / "schedules" / "schedules.db")
                assert all(db.exists() for db in dbs), [str(db) for db in dbs if not db.exists()]
            if "dagster-daemon is up" in line:
                break
        else:
            pytest.fail("the demo's daemon did not come up within 240 s:\n" + "".join(output))
        assert daemon_pid is not None

        os.kill(daemon_pid, signal.SIGKILL)
        killed = time.monotonic()
        rc = demo.wait(timeout=30)
        stopped_after = time.monotonic() - killed
        while (line := lines.get(timeout=10)) is not None:
            output.append(line)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    text = "".join(output)
    assert rc != 0, text
    assert stopped_after < 30, (stopped_after, text)
    assert f"dagster-daemon (pid {daemon_pid}) was killed by SIGKILL" in text, text
    assert f"its log, {home / 'logs' / 'dagster-daemon.log'}:" in text, text
    # The daemon's own log lines, without their terminal colours.
    assert "dagster.daemon - INFO - " in text.split("its log, ")[1], text
    # Everything the demo started (the daemon's code server, `dagster job launch`) is gone.
    deadline = time.monotonic() + 10
    while processes_in_env(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_in_env(marker), processes_in_env(marker)


def test_a_daemon_that_stops_heartbeating_stops_the_demos_waits(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    from mlops_assets.cli.main import Daemon, wait_for_sensor_run
    from mlops_assets.instance import create_storage

    dagster_home = fresh_dagster_home(tmp_path / "dagster")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    instance = DagsterInstance.get()
    daemon = None
    try:
        create_storage(instance, dagster_home)
        # A 3 s limit, not the demo's 120 s, so that the test need not wait out a real stall.
        daemon = Daemon(tmp_path / "logs" / "dagster-daemon.log", instance, heartbeat_stale_s=3)
        daemon.wait_until_ready()
        os.killpg(daemon.proc.pid, signal.SIGSTOP)  # alive, but silent
        stopped = time.monotonic()
        with pytest.raises(SystemExit) as failure:
            wait_for_sensor_run(instance, "fraud-detector", "never-registered", timeout_s=120, daemon=daemon)
        assert time.monotonic() - stopped < 30
        message = str(failure.value)
        assert f"dagster-daemon (pid {daemon.proc.pid}) is running but its " in message
        assert "sent no heartbeat for" in message and "mlflow_registry_sensor's rollout of version never-registered" in message
        assert "dagster.daemon - INFO - " in message  # the end of its log
    finally:
        if daemon is not None:
            os.killpg(daemon.proc.pid, signal.SIGCONT)
            daemon.stop()
        instance.dispose()


OPEN_INSTANCE = """
import os, sys, time
from pathlib import Path
from dagster import DagsterInstance
from mlops_assets.instance import create_storage

home, ready, go = Path(os.environ["DAGSTER_HOME"]), Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():  # imports done: only the opening races
    time.sleep(0.005)
instance = DagsterInstance.get()
create_storage(instance, home)
instance.all_logs("one-run")  # a run's event-log database, created lazily by whoever reads or writes first
instance.dispose()
"""


@pytest.mark.parametrize("round_", [1, 2])
def test_processes_opening_a_fresh_instance_at_once_all_succeed(tmp_path, round_):
    from mlops_assets.instance import LockedSqliteStorage, alembic_head

    dagster_home = fresh_dagster_home(tmp_path / "dagster")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "MLOPS_HOME": str(tmp_path / "mlops")}
    count, go = 6, tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_INSTANCE, str(tmp_path / f"ready{i}"), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(count)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(count)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    failed = [(p.returncode, out[-2000:]) for p, out in zip(procs, outputs, strict=True) if p.returncode != 0]
    assert not failed, failed
    head = alembic_head()
    for db in [*LockedSqliteStorage.database_paths(dagster_home), dagster_home / "history" / "runs" / "one-run.db"]:
        assert alembic_versions(db) == [head], db


def test_a_database_left_with_two_alembic_heads_opens_again(tmp_path, monkeypatch):
    from dagster import DagsterInstance
    from dagster._core.storage.sqlite import LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION

    from mlops_assets.instance import alembic_head

    dagster_home = fresh_dagster_home(tmp_path / "dagster")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    DagsterInstance.get().dispose()
    runs_db = dagster_home / "history" / "runs.db"
    # What the race leaves: the loser took the winner's fresh tables for a pre-alembic database.
    with sqlite3.connect(runs_db) as conn:
        conn.execute("INSERT INTO alembic_version VALUES (?)", (LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION,))
    assert len(alembic_versions(runs_db)) == 2

    # dagster's own SQLite storage cannot open it any more...
    plain = fresh_dagster_home(tmp_path / "plain", "storage:\n  sqlite:\n    base_dir:\n      env: DAGSTER_HOME\n")
    shutil.copytree(dagster_home / "history", plain / "history")
    monkeypatch.setenv("DAGSTER_HOME", str(plain))
    with pytest.raises(Exception, match="more than one head"):
        DagsterInstance.get()

    # ...the project's opens it, keeping the head its tables were created at.
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    instance = DagsterInstance.get()
    try:
        assert instance.get_runs() == []
    finally:
        instance.dispose()
    assert alembic_versions(runs_db) == [alembic_head()]
