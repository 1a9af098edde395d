"""Registry faults, each one real: "does not exist" is told apart from "this is not a working MLflow".

Nothing here mocks MLflow. The registry is a real MLflow SQLite store with two trained versions; the
faults are real too: copies of that database file with garbage written over it or cut short, a file
corrupted under a store MLflow already holds open, a directory where the file should be, real
`http.server`s on 127.0.0.1 that answer 404 (HTML, and JSON that is not MLflow's), 200 with HTML, 200
with `{}`, 503, 401 or nothing in time, and a closed port. The registry must raise `ModelNotFoundError`
only when MLflow itself answers `RESOURCE_DOES_NOT_EXIST` (or that an alias is not set), and
`RegistryUnavailableError` with the reason otherwise; `mlflow_registry_sensor` must skip the tick with
that reason and leave the cursor as it was, so the next good tick still sees every new version.
A locked SQLite file is not exercised: MLflow waits out SQLite's 20 s busy timeout before it fails
(as TEMPORARILY_UNAVAILABLE, which maps to `RegistryUnavailableError`).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy.exc

from mlops_assets.core.registry import (
    CHAMPION,
    AliasNotSetError,
    MlflowRegistry,
    ModelNotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from mlops_assets.defs.serving.sensors import mlflow_registry_sensor
from mlops_assets.demo.training import train_and_register
from mlops_assets_tests.helpers import FRAUD, declared

MODEL = "fraud_detector"


@pytest.fixture(autouse=True)
def fast_http_failures(monkeypatch):
    # No retries and a 1 s read timeout, so each HTTP fault costs well under a second.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


@dataclass
class Registered:
    """A migrated but empty MLflow database, and one holding v1 (champion) and v2."""

    empty_db: Path
    db: Path
    registry: MlflowRegistry
    cursor: str  # the sensor's cursor after its first tick: v1 seen, v2 pending


def sqlite_registry(db: Path) -> MlflowRegistry:
    return MlflowRegistry(tracking_uri=f"sqlite:///{db}", artifact_root=str(db.parent / "artifacts"))


@pytest.fixture(scope="module")
def instance():
    # The sensor only reads the instance; one per module saves a second or two per tick.
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(scope="module")
def registered(tmp_path_factory, instance) -> Registered:
    home = tmp_path_factory.mktemp("faults")
    registry = sqlite_registry(home / "mlflow.db")
    registry.client()  # creates and migrates the schema
    shutil.copy(home / "mlflow.db", home / "empty.db")
    v1 = train_and_register(registry, MODEL, n_rows=500, seed=1)
    registry.set_alias(MODEL, CHAMPION, v1.version)
    cursor = tick(instance, registry).cursor
    train_and_register(registry, MODEL, n_rows=500, seed=2)
    return Registered(empty_db=home / "empty.db", db=home / "mlflow.db", registry=registry, cursor=cursor)


def tick(instance: dg.DagsterInstance, registry: MlflowRegistry, cursor: str | None = None):
    """One evaluation as the daemon runs it: what the tick records, including the cursor it keeps."""
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"mlflow": registry}, repository_def=declared(FRAUD)
    )
    return mlflow_registry_sensor.evaluate_tick(context)


# ---- fault makers: each yields a registry pointed at one real fault ----------------------------------
@dataclass
class FakeServer:
    """A real HTTP server on 127.0.0.1 that answers every request the same way and records the paths."""

    status: int
    body: bytes
    content_type: str = "text/html"
    delay_s: float = 0.0
    paths: list[str] = field(default_factory=list)
    # A server that answers 200 to everything could keep a broken probe loop going forever; after
    # this many requests it answers 500, so such a regression fails the test instead of hanging it.
    max_requests: int = 50

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.paths.append(self.path)
                time.sleep(fake.delay_s)
                status = fake.status if len(fake.paths) <= fake.max_requests else 500
                with contextlib.suppress(OSError):  # the client may have timed out and gone
                    self.send_response(status)
                    self.send_header("Content-Type", fake.content_type)
                    self.send_header("Content-Length", str(len(fake.body)))
                    self.end_headers()
                    self.wfile.write(fake.body)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_garbage(path: Path, offset: int = 0, size: int = 4096) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef" * (size // 4))


HTTP_FAULTS = {
    "404 html": (FakeServer(404, b"<html><body><h1>404 Not Found</h1></body></html>"), "HTTP 404 for /api/2.0/mlflow/"),
    "404 json, not mlflow": (
        FakeServer(404, b'{"detail": "Not Found"}', "application/json"),
        "JSON without an MLflow error code",
    ),
    "200 html": (FakeServer(200, b"<html><body>Welcome to nginx!</body></html>"), "body that is not JSON"),
    # MLflow parses `{}` into an empty entity instead of failing: the registry must notice.
    "200 empty json": (FakeServer(200, b"{}", "application/json"), "not MLflow's API"),
    "503": (FakeServer(503, b"upstream unavailable", "text/plain"), "keeps answering HTTP 503"),
    "401": (FakeServer(401, b"unauthorized", "text/plain"), "HTTP 401"),
    "slow": (FakeServer(200, b"{}", "application/json", delay_s=2.0), "timed out"),
}


@contextlib.contextmanager
def http_fault(name: str) -> Iterator[tuple[MlflowRegistry, str, FakeServer]]:
    server, reason = HTTP_FAULTS[name]
    server.paths.clear()
    with server.running() as url:
        yield MlflowRegistry(tracking_uri=url, artifact_root="/nonexistent"), reason, server


@contextlib.contextmanager
def sqlite_fault(name: str, registered: Registered, tmp_path: Path) -> Iterator[tuple[MlflowRegistry, str, None]]:
    bad = tmp_path / "mlflow.db"
    if name == "directory":
        bad.mkdir()
        yield sqlite_registry(bad), "is a directory", None
        return
    shutil.copy(registered.db, bad)
    if name == "garbage header":
        write_garbage(bad)
    elif name == "garbage pages":
        write_garbage(bad, offset=4096, size=bad.stat().st_size - 4096)
    elif name == "truncated":
        bad.write_bytes(registered.db.read_bytes()[:1000])
    elif name == "corrupted while open":
        # The store (and its engine) is cached per URI for the life of the process, as in the daemon;
        # the file goes bad under it, and MLflow re-raises sqlalchemy's error as BAD_REQUEST.
        registry = sqlite_registry(bad)
        assert registry.alias_version(MODEL, CHAMPION) == "1"
        write_garbage(bad, size=8192)
        yield registry, "corrupt", None
        return
    yield sqlite_registry(bad), "corrupt", None


SQLITE_FAULTS = ["garbage header", "garbage pages", "truncated", "corrupted while open", "directory"]


@contextlib.contextmanager
def fault(name: str, registered: Registered, tmp_path: Path):
    if name in HTTP_FAULTS:
        with http_fault(name) as made:
            yield made
    elif name == "closed port":
        yield (
            MlflowRegistry(tracking_uri=f"http://127.0.0.1:{closed_port()}", artifact_root="/nonexistent"),
            "connection refused",
            None,
        )
    else:
        with sqlite_fault(name, registered, tmp_path) as made:
            yield made


ALL_FAULTS = [*HTTP_FAULTS, "closed port", *SQLITE_FAULTS]


# ---- the registry ------------------------------------------------------------------------------------
def test_a_working_registry_says_what_does_not_exist(registered):
    registry = registered.registry
    with pytest.raises(ModelNotFoundError, match=r"registered model 'ghost' does not exist; known models: \['fraud_detector'\]"):
        registry.get_version("ghost", 1)
    with pytest.raises(ModelNotFoundError, match=r"model 'fraud_detector' has no version 9; known versions: \['2', '1'\]"):
        registry.get_version(MODEL, 9)
    with pytest.raises(AliasNotSetError, match="model 'fraud_detector' has no alias 'nope'"):
        registry.version_by_alias(MODEL, "nope")
    # alias_version: None is "the model exists, the alias is not set"; a missing model is an error.
    assert registry.alias_version(MODEL, "nope") is None
    with pytest.raises(ModelNotFoundError, match="Registered Model with name=ghost not found"):
        registry.alias_version("ghost", CHAMPION)
    assert [v.version for v in registry.new_versions(MODEL, 0)] == ["1", "2"]
    assert registry.new_versions(MODEL, 2) == []
    # Not-found is an answer, not an outage: it is no RegistryError.
    assert not issubclass(ModelNotFoundError, RegistryError)


def test_a_request_mlflow_refuses_is_a_registry_error_but_not_an_outage(registered):
    registry = registered.registry
    with pytest.raises(RegistryError, match="refused bad filter: INVALID_PARAMETER_VALUE") as caught:
        registry._call("bad filter", registry.client().search_model_versions, "name ~~ 'x'")
    assert not isinstance(caught.value, RegistryUnavailableError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ALL_FAULTS)
def test_every_fault_is_registry_unavailable_never_not_found(name, registered, tmp_path):
    with fault(name, registered, tmp_path) as (registry, reason, server):
        for call in (
            lambda: registry.alias_version(MODEL, CHAMPION),
            lambda: registry.new_versions(MODEL, 1),
            lambda: registry.get_version(MODEL, 1),
            lambda: registry.model_tags(MODEL),
        ):
            started = time.monotonic()
            with pytest.raises(RegistryUnavailableError) as caught:
                call()
            message = str(caught.value)
            assert message.startswith(f"MLflow registry unavailable at {registry.tracking_uri}: "), message
            assert reason in message, message
            assert time.monotonic() - started < 10, f"{name}: took {time.monotonic() - started:.1f}s"
        if server is not None:
            # The fake really was asked MLflow's REST API (this is not a test of a typo'd URL).
            assert any(p.startswith("/api/2.0/mlflow/") for p in server.paths), server.paths


def test_listing_versions_against_a_404_server_raises_instead_of_finding_nothing():
    with http_fault("404 html") as (registry, _, _server):
        with pytest.raises(RegistryUnavailableError, match="HTTP 404 for /api/2.0/mlflow/registered-models/get"):
            registry.versions(MODEL)


def test_a_corrupt_database_keeps_sqlalchemys_error_as_the_cause_only(registered, tmp_path):
    with sqlite_fault("garbage header", registered, tmp_path) as (registry, _, _):
        with pytest.raises(RegistryUnavailableError) as caught:
            registry.alias_version(MODEL, CHAMPION)
    assert "sqlite3.DatabaseError: file is not a database" in str(caught.value)
    assert "SELECT" not in str(caught.value)  # the reason, not sqlalchemy's SQL dump
    assert isinstance(caught.value.__cause__, sqlalchemy.exc.DatabaseError)


def test_credentials_in_the_tracking_uri_never_reach_the_message():
    with HTTP_FAULTS["404 html"][0].running() as url:
        registry = MlflowRegistry(tracking_uri=url.replace("http://", "http://alice:s3cret@"), artifact_root="/nonexistent")
        with pytest.raises(RegistryUnavailableError) as caught:
            registry.alias_version(MODEL, CHAMPION)
    assert "s3cret" not in str(caught.value) and "***@127.0.0.1" in str(caught.value)


# ---- the sensor --------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ALL_FAULTS)
def test_the_sensor_skips_every_fault_with_its_reason_and_the_cursor_unchanged(name, registered, tmp_path, instance):
    with fault(name, registered, tmp_path) as (registry, reason, _server):
        down = tick(instance, registry, registered.cursor)
    assert not down.run_requests
    assert down.skip_message.startswith(f"MLflow registry unavailable at {registry.tracking_uri}: "), down.skip_message
    assert reason in down.skip_message and down.skip_message.endswith("; cursor unchanged, no version lost")
    assert "nothing newer" not in down.skip_message and "not registered" not in down.skip_message
    assert down.cursor == registered.cursor
    # The next good tick, from the cursor the failed one kept, still launches v2.
    back = tick(instance, registered.registry, down.cursor)
    assert [r.run_key for r in back.run_requests] == [f"{MODEL}:2:canary"]
    assert json.loads(back.cursor)[MODEL]["seen"] == 2


def test_a_404_server_on_first_sight_is_an_outage_not_an_unregistered_model(instance):
    with http_fault("404 html") as (registry, _, _server):
        first = tick(instance, registry)
    assert first.skip_message.startswith("MLflow registry unavailable at ") and first.cursor is None


def test_a_declared_model_not_registered_yet_is_a_skip_with_its_own_note(registered, tmp_path, instance):
    shutil.copy(registered.empty_db, tmp_path / "mlflow.db")
    result = tick(instance, sqlite_registry(tmp_path / "mlflow.db"), registered.cursor)
    assert not result.run_requests
    assert f"{MODEL}: not registered in MLflow yet" in result.skip_message
    assert "its cursor is unchanged" in result.skip_message
    assert json.loads(result.cursor) == json.loads(registered.cursor)


def test_a_registered_model_without_a_champion_says_so(registered, tmp_path, instance):
    shutil.copy(registered.empty_db, tmp_path / "mlflow.db")
    registry = sqlite_registry(tmp_path / "mlflow.db")
    registry.client().create_registered_model(MODEL)
    result = tick(instance, registry)
    assert f"{MODEL}: registered, but no version has the alias 'champion' yet" in result.skip_message
    assert not json.loads(result.cursor)


def test_the_skip_reason_is_the_ticks_log_line(registered, tmp_path, instance):
    """What the daemon records for the tick (and shows in the UI) names the URI and the reason."""
    with sqlite_fault("truncated", registered, tmp_path) as (registry, _, _):
        data = tick(instance, registry, registered.cursor)
    assert data.skip_message == (
        f"MLflow registry unavailable at {registry.tracking_uri}: the database file is corrupt or not an MLflow database"
        " (sqlite3.DatabaseError: database disk image is malformed) (open the registry); cursor unchanged, no version lost"
    )
