"""Dagster's SQLite instance storage, safe to create from several processes at the same moment.

Dagster's SQLite storages create their schema the first time any process opens the instance, with
no lock between processes: each checks for the alembic version table, then creates the tables and
stamps the revision. On a fresh DAGSTER_HOME, `dagster-daemon run`, `dagster job launch` (or
`dg launch`, `dagster dev`, the webserver, and the code servers each of them starts) all do that
at once, and one of them dies with `table alembic_version already exists` or a UNIQUE constraint
error. Worse, one process can see the other's half-created tables, take them for a pre-alembic
database and stamp an old revision next to the other's head: the database then has two alembic
heads and no process can open the instance again.

`LockedSqliteStorage` is dagster's own `DagsterSqliteStorage` (same files, same layout) whose
schema creation runs under an exclusive `flock` on `<base_dir>/.storage.lock`, so whoever comes
first creates the schema and the others find it complete. The project's `dagster.yaml` selects it
(`storage: custom:`), so every process that loads the instance from DAGSTER_HOME is covered.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData

LOCK_FILE = ".storage.lock"
#: Creating a fresh instance takes a few seconds even on a loaded box; a holder that is still busy
#: after this long is stuck, and waiting on it forever would hide that.
LOCK_TIMEOUT_S = 300.0

_log = logging.getLogger(__name__)
# Paths this thread holds the lock on: storage creation takes the lock, and the event log's
# per-database set-up it calls takes it again (flock is per open file, so it would deadlock).
_held = threading.local()


@contextmanager
def schema_lock(base_dir: str | os.PathLike[str], timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive lock that serializes schema creation for the instance under `base_dir`.

    Re-entrant within a thread. A `flock` is released by the kernel when its holder exits, so a
    killed process never leaves the lock behind.
    """
    path = os.path.join(os.path.abspath(base_dir), LOCK_FILE)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as lock_file:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held the Dagster storage lock {path} for over {timeout_s:.0f}s") from exc
                time.sleep(0.05)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def alembic_head() -> str:
    """The newest alembic revision of dagster's storage schema."""
    from alembic.script import ScriptDirectory
    from dagster._core.storage.runs.sqlite import sqlite_run_storage
    from dagster._core.storage.sql import get_alembic_config

    # Dagster's run, event-log and schedule databases share one alembic script directory.
    return ScriptDirectory.from_config(get_alembic_config(sqlite_run_storage.__file__)).get_current_head()


def repair_double_stamp(db_path: str | os.PathLike[str]) -> bool:
    """Drop the stale second alembic head that the creation race leaves behind; True if it did.

    The race's loser stamped the last pre-alembic revision next to the winner's head, over tables
    the winner had just created at head: the head is the truth. Anything else is left to dagster.
    """
    if not os.path.exists(db_path):
        return False
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        try:
            versions = {row[0] for row in conn.execute("SELECT version_num FROM alembic_version")}
        except sqlite3.OperationalError:  # no version table yet: fresh, or legacy, which dagster handles
            return False
        if len(versions) < 2:
            return False
        head = alembic_head()
        if head not in versions:
            return False
        with conn:
            conn.execute("DELETE FROM alembic_version WHERE version_num != ?", (head,))
    _log.warning(
        "%s had alembic versions %s from a concurrent schema creation; kept the head %s", db_path, sorted(versions), head
    )
    return True


class LockedSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log, setting up each database under the instance's schema lock: it
    creates each run's database (and its index) lazily, in whichever process touches it first (the
    run worker writing events, the CLI or the webserver reading them), and dagster's own retries for
    that race give up too soon when several processes start at once."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None, lock_dir: str | None = None) -> None:
        self._lock_dir = lock_dir or base_dir  # before super().__init__, which creates the index database
        super().__init__(base_dir, inst_data=inst_data)

    def _initdb(self, engine: Any, for_index_shard: bool = False) -> None:
        with schema_lock(self._lock_dir):
            super()._initdb(engine, for_index_shard=for_index_shard)


class LockedSqliteStorage(DagsterSqliteStorage):
    """`DagsterSqliteStorage` whose databases are created under `schema_lock(base_dir)`.

    In dagster.yaml:

        storage:
          custom:
            module: mlops_assets.instance
            class: LockedSqliteStorage
            config:
              base_dir: {env: DAGSTER_HOME}
    """

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self.base_dir = base_dir
        self._inst_data = inst_data
        with schema_lock(base_dir):
            for db_path in self.database_paths(base_dir):
                repair_double_stamp(db_path)
            # What DagsterSqliteStorage.__init__ does, with the event log that locks its lazy set-up.
            self._run_storage = SqliteRunStorage.from_local(_runs_directory(base_dir))
            self._event_log_storage = LockedSqliteEventLogStorage(_event_logs_directory(base_dir), lock_dir=base_dir)
            self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        super(DagsterSqliteStorage, self).__init__()

    @staticmethod
    def database_paths(base_dir: str | os.PathLike[str]) -> list[Path]:
        """The instance-wide databases: runs, the event log's index, schedules (runs' event logs aside)."""
        base = str(base_dir)
        return [
            Path(_runs_directory(base)) / "runs.db",
            Path(_event_logs_directory(base)) / f"{INDEX_SHARD_NAME}.db",
            Path(_schedule_directory(base)) / "schedules.db",
        ]

    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> LockedSqliteStorage:
        # The parent's builds a DagsterSqliteStorage by name, not `cls`.
        return cls.from_local(inst_data=inst_data, **config_value)


def create_storage(instance: Any, base_dir: str | os.PathLike[str]) -> list[Path]:
    """Open every storage of `instance` (whose dagster.yaml puts its databases under `base_dir`) so
    that all its databases exist with their schema before any other process starts on it; return
    the databases' paths.

    With `LockedSqliteStorage` opening the instance already creates them; the reads make sure of it
    and fail here, in the caller, if the storage is broken.
    """
    instance.get_runs(limit=1)  # run storage
    instance.get_daemon_heartbeats()
    instance.event_log_storage.get_maximum_record_id()  # the event log's index database
    instance.all_instigator_state()  # schedule storage
    paths = LockedSqliteStorage.database_paths(base_dir)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"the Dagster instance opened but its databases are missing: {missing}")
    return paths
