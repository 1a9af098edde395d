"""MLflow tracking and model registry, through aliases and tags only.

Stages (`Staging`/`Production`) and `get_latest_versions` are deprecated in MLflow; this project
marks the serving version with the alias `champion` and a candidate with `challenger`, and keeps
deployment facts in version tags. MLflow is imported lazily: the code location must load without it.

Errors say which of two very different things happened:

- `ModelNotFoundError` (alias `UnknownModelError`): a working registry answered that the model,
  version or alias does not exist (MLflow's `RESOURCE_DOES_NOT_EXIST`; for aliases MLflow answers
  `INVALID_PARAMETER_VALUE` "alias ... not found", raised here as its subclass `AliasNotSetError`).
- `RegistryUnavailableError`: this is not a working MLflow, so nothing can be concluded: connection
  refused, time-outs, a server answering 404/5xx/HTML/non-JSON for the API endpoints (MLflow's
  `ENDPOINT_NOT_FOUND`, `INTERNAL_ERROR`, ...), 401/403, a corrupt, locked or unopenable SQLite file
  (sqlalchemy `DatabaseError` / `OperationalError`, which MLflow re-raises as `BAD_REQUEST` or
  `TEMPORARILY_UNAVAILABLE`), or a body that does not fit MLflow's API. A 404 is never read as
  "not found": only MLflow's own error code says that.

Both `RegistryUnavailableError` and a request MLflow refused for another reason are `RegistryError`s;
no raw sqlalchemy, requests or protobuf exception leaves this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlops_assets.core.config import EngineConfig
from mlops_assets.core.settings import apply_mlflow_client_env, mlflow_http_timeout_s

CHAMPION = "champion"
CHALLENGER = "challenger"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# MLflow answers a missing alias with INVALID_PARAMETER_VALUE, not RESOURCE_DOES_NOT_EXIST
# (SqlAlchemyModelRegistryStore: "Registered model alias {alias} not found.").
_ALIAS_NOT_FOUND = re.compile(r"alias .* not found", re.IGNORECASE)
# MLflow error codes that mean "this is not a working MLflow" rather than an answer about a model.
_UNAVAILABLE_CODES = {
    "ENDPOINT_NOT_FOUND",  # a non-JSON 404: a web server, but not MLflow's API (or the wrong base URL)
    "INTERNAL_ERROR",  # 5xx, a non-JSON 200, or JSON without an MLflow error code
    "TEMPORARILY_UNAVAILABLE",  # MLflow's wrapper for sqlalchemy OperationalError (locked database)
    "SERVICE_UNDER_MAINTENANCE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED",  # 401
    "PERMISSION_DENIED",  # 403
    "IO_ERROR",
    "DATA_LOSS",
}
_MAX_REASON = 300


class RegistryError(RuntimeError):
    """MLflow could not answer: it is unavailable, or it refused the request."""


class RegistryUnavailableError(RegistryError):
    """Not a working MLflow at the tracking URI (unreachable, wrong server, broken database); nothing
    can be concluded about any model. The message starts `MLflow registry unavailable at <uri>: <reason>`."""

    def __init__(self, uri: str, reason: str, what: str = "") -> None:
        self.uri, self.reason, self.what = uri, reason, what
        super().__init__(f"MLflow registry unavailable at {uri}: {reason}" + (f" ({what})" if what else ""))


class ModelNotFoundError(LookupError):
    """A working registry answered that the registered model, version or alias does not exist."""


class AliasNotSetError(ModelNotFoundError):
    """The registered model exists but the alias is not set on any of its versions."""


#: The name the rest of the project has always imported.
UnknownModelError = ModelNotFoundError


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ValueError(
            f"invalid registered model name {name!r}: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def redact_uri(uri: str) -> str:
    """`uri` without user:password, so an error message or tick log never carries credentials."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _one_line(text: Any, limit: int = _MAX_REASON) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and exc not in found:
        found.append(exc)
        # An explicit cause, else the exception being handled unless `raise ... from None` hid it.
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return found


def _database_reason(chain: list[BaseException]) -> str | None:
    """Why a SQL store failed, from sqlalchemy's error and the DB-API error under it (no SQL text)."""
    import sqlite3

    try:
        from sqlalchemy.exc import DatabaseError, OperationalError, SQLAlchemyError
    except ImportError:  # mlflow-skinny talking to a tracking server has no SQL store, so no sqlalchemy
        DatabaseError = OperationalError = SQLAlchemyError = ()  # isinstance(x, ()) is False

    orig = next((e for e in chain if isinstance(e, sqlite3.Error)), None)
    wrapped = next((e for e in chain if isinstance(e, SQLAlchemyError)), None)
    if orig is None and wrapped is None:
        return None
    if orig is None:
        orig = getattr(wrapped, "orig", None) or wrapped
    first_line = str(orig).splitlines()[0] if str(orig) else ""  # sqlalchemy appends the SQL on later lines
    detail = f"{type(orig).__module__}.{type(orig).__name__}: {_one_line(first_line)}"
    if isinstance(orig, sqlite3.OperationalError) or isinstance(wrapped, OperationalError):
        return f"the database cannot be opened or is locked ({detail})"
    if isinstance(orig, sqlite3.DatabaseError) or isinstance(wrapped, DatabaseError):
        return f"the database file is corrupt or not an MLflow database ({detail})"
    return f"database error ({detail})"


def _http_reason(chain: list[BaseException]) -> str | None:
    """Why an HTTP request to the tracking server failed, from requests' and urllib3's errors."""
    import socket
    import ssl

    import requests
    import urllib3.exceptions

    if not any(isinstance(e, (requests.RequestException, urllib3.exceptions.HTTPError, OSError)) for e in chain):
        return None
    # The most specific cause wins; order matters: urllib3's NewConnectionError is a ConnectTimeoutError
    # subclass even when the connection was refused at once.
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused (nothing listens on that port)"
    for e in chain:
        if isinstance(e, socket.gaierror):
            return f"the host name does not resolve ({e})"
        if isinstance(e, ssl.SSLError):
            return f"TLS error ({_one_line(e)})"
        if isinstance(e, urllib3.exceptions.ResponseError):
            status = re.search(r"too many (\d+) error responses", str(e))
            if status:
                return f"it keeps answering HTTP {status.group(1)}"
    if any(isinstance(e, (TimeoutError, requests.Timeout, urllib3.exceptions.TimeoutError)) for e in chain):
        return f"no answer within {mlflow_http_timeout_s()}s (timed out)"
    last = chain[-1]
    return f"{type(last).__name__}: {_one_line(last)}"


def _mlflow_reason(exc: BaseException) -> str:
    """A short reason from an MlflowException raised by MLflow's REST client."""
    message = getattr(exc, "message", None) or str(exc)
    code = getattr(exc, "error_code", "")
    status = re.search(r"endpoint (\S+) failed with error code (\d+) != 200\. Response body: (.*)", message, re.DOTALL)
    if status:
        endpoint, http_status, body = status.groups()
        hint = {
            "404": "not an MLflow tracking server, or not its base URL",
            "401": "authentication required: check MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN",
            "403": "access denied: check the credentials' permissions",
        }.get(http_status, "not an answer from MLflow's API")
        return f"HTTP {http_status} for {endpoint} ({hint}); body {_one_line(body, 120)}"
    if "not in a valid JSON format" in message:
        body = message.split("Response body:", 1)[-1]
        return f"it answered with a body that is not JSON, so it is not MLflow's API; body {_one_line(body, 120)}"
    if message.startswith(f"{code}: Response:"):
        # RestException's text when a JSON body carries no MLflow error code: someone else's API.
        body = _one_line(message[len(code) + 2 :], 160)
        return f"it answered JSON without an MLflow error code, so it is not MLflow's API; {body}"
    return f"{code}: {_one_line(message)}"


def classify_registry_error(exc: BaseException, uri: str, what: str = "") -> Exception | None:
    """The project's exception for an error raised by an MLflow client call, or None if it is not one
    the registry can explain (then the caller re-raises the original: a bug is not an outage)."""
    from google.protobuf.json_format import ParseError
    from mlflow.exceptions import MlflowException

    uri = redact_uri(uri)
    code = getattr(exc, "error_code", "") if isinstance(exc, MlflowException) else ""
    message = _one_line(getattr(exc, "message", "") or exc)
    # MLflow's answers first: only its own error codes mean "does not exist" (a 404 alone never does),
    # and a broken store cannot produce them (MLflow wraps database errors as BAD_REQUEST,
    # TEMPORARILY_UNAVAILABLE or INTERNAL_ERROR).
    if code == "RESOURCE_DOES_NOT_EXIST":
        return ModelNotFoundError(f"{what}: {message}" if what else message)
    if code == "INVALID_PARAMETER_VALUE" and _ALIAS_NOT_FOUND.search(message):
        return AliasNotSetError(f"{what}: {message}" if what else message)
    # Then storage and transport: the cause under MLflow's wrapper says what actually broke.
    chain = _chain(exc)
    reason = _database_reason(chain) or _http_reason(chain)
    if reason is not None:
        return RegistryUnavailableError(uri, reason, what)
    if isinstance(exc, MlflowException):
        if code in _UNAVAILABLE_CODES:
            return RegistryUnavailableError(uri, _mlflow_reason(exc), what)
        return RegistryError(f"MLflow at {uri} refused {what or 'the request'}: {code}: {message}")
    if isinstance(exc, ParseError):
        return RegistryUnavailableError(uri, f"it answered JSON that does not fit MLflow's API ({message})", what)
    return None


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str
    source: str
    aliases: list[str]
    tags: dict[str, str]
    created_ms: int
    download_uri: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model_uri(self) -> str:
        # MLflow's registry URI scheme is `models:/name/version` (one slash: `models://` is not it).
        return f"models:/{self.name}/{self.version}"


class MlflowRegistry(EngineConfig):
    """MLflow registry and tracking (SQLite under MLOPS_HOME locally), by aliases and tags."""

    tracking_uri: str
    artifact_root: str
    ui_url: str = ""

    def client(self):
        """An `MlflowClient`; opening it already reads the store, so a broken one fails here."""
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("http"):
            # MLflow's default retries take minutes against a dead server; fail in seconds instead.
            apply_mlflow_client_env()
        self._check_sqlite_path()
        return self._call("open the registry", MlflowClient, tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _check_sqlite_path(self) -> None:
        # MLflow retries opening an SQLite file it cannot open for ~100 s (10 attempts, exponential
        # backoff in create_sqlalchemy_engine_with_retry): longer than a sensor tick may take. The
        # cases a path check can see are reported at once instead.
        if not self.tracking_uri.startswith("sqlite:///"):
            return
        path = Path(self.tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
        if path.is_dir():
            raise self._unavailable("open the registry", f"the SQLite path {path} is a directory, not a database file")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise self._unavailable("open the registry", f"no read/write permission on the SQLite file {path}")

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` with MLflow's, sqlalchemy's and requests' errors mapped to this module's."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            mapped = classify_registry_error(exc, self.tracking_uri, what)
            if mapped is None:
                raise
            # Keep the cause for the traceback; the message already says what it was.
            raise mapped from exc

    def _unavailable(self, what: str, reason: str) -> RegistryUnavailableError:
        return RegistryUnavailableError(redact_uri(self.tracking_uri), reason, what)

    def _checked_version(self, what: str, mv: Any, version: str | None = None) -> Any:
        # A server that answers `{}` to everything yields an empty ModelVersion, not an error: without
        # this check a probe for "the next version" would never end and would launch phantom rollouts.
        if mv is None or not getattr(mv, "name", "") or not str(getattr(mv, "version", "") or "").isdigit():
            raise self._unavailable(what, "it answered a model version with no name or version number: not MLflow's API")
        if version is not None and str(mv.version) != str(version):
            raise self._unavailable(what, f"it answered version {mv.version} when asked for version {version}: not MLflow's API")
        return mv

    def _checked_model(self, what: str, rm: Any) -> Any:
        if rm is None or not getattr(rm, "name", ""):
            raise self._unavailable(what, "it answered a registered model with no name: not MLflow's API")
        return rm

    def ensure_experiment(self, name: str) -> str:
        """The experiment's id, creating it with its artifacts under `artifact_root`."""
        client = self.client()
        found = self._call(f"experiment {name!r}", client.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(self.artifact_root, name).as_uri()
        return self._call(f"create experiment {name!r}", client.create_experiment, name, artifact_location=location)

    def get_version(self, name: str, version: str | int) -> VersionInfo:
        """One registered version; `ModelNotFoundError` names the model's known versions if absent."""
        validate_model_name(name)
        version = str(version)
        if not version.isdigit():
            raise ValueError(f"model version must be a positive integer, got {version!r}")
        client = self.client()
        self._require_model(client, name)
        what = f"model {name!r} version {version}"
        try:
            mv = self._checked_version(what, self._call(what, client.get_model_version, name, version), version)
        except ModelNotFoundError:
            known = [v.version for v in self.versions(name)]
            raise ModelNotFoundError(f"model {name!r} has no version {version}; known versions: {known}") from None
        return self._info(client, mv)

    def version_by_alias(self, name: str, alias: str) -> VersionInfo:
        validate_model_name(name)
        client = self.client()
        self._require_model(client, name)
        what = f"alias {alias!r} of {name!r}"
        try:
            mv = self._checked_version(what, self._call(what, client.get_model_version_by_alias, name, alias))
        except ModelNotFoundError:
            raise AliasNotSetError(f"model {name!r} has no alias {alias!r}") from None
        return self._info(client, mv)

    def versions(self, name: str) -> list[VersionInfo]:
        """All versions of `name`, newest first."""
        validate_model_name(name)
        client = self.client()
        self._require_model(client, name)
        found = self._call(f"versions of {name!r}", client.search_model_versions, f"name = '{name}'")
        return sorted((self._info(client, mv, metrics=False) for mv in found), key=lambda v: -int(v.version))

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self.get_version(name, version)
        self._call(f"set alias {alias!r}", self.client().set_registered_model_alias, name, alias, str(version))

    def new_versions(self, name: str, after: int) -> list[VersionInfo]:
        """Versions numbered above `after`, oldest first. Cost grows with what is new, not with the
        registry: one indexed probe per new version plus one that MLflow answers "does not exist".
        Only that answer ends the probe; any other failure raises, so an outage never reads as "nothing new"."""
        validate_model_name(name)
        client = self.client()
        found, number = [], after + 1
        while True:
            what = f"model {name!r} version {number}"
            try:
                mv = self._call(what, client.get_model_version, name, str(number))
            except ModelNotFoundError:
                return found
            found.append(self._info(client, self._checked_version(what, mv, str(number)), metrics=False))
            number += 1

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version an alias points to, or None when the model exists without that alias; one indexed
        lookup (no registry scan). `ModelNotFoundError` if the model itself is not registered."""
        what = f"alias {alias!r} of {name!r}"
        try:
            mv = self._call(what, self.client().get_model_version_by_alias, name, alias)
        except AliasNotSetError:
            return None
        return str(self._checked_version(what, mv).version)

    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's tags. MLflow's store loads every version for this call, so the
        sensor caches the answer."""
        what = f"model {name!r}"
        return dict(self._checked_model(what, self._call(what, self.client().get_registered_model, name)).tags or {})

    def set_version_tag(self, name: str, version: str | int, key: str, value: str) -> None:
        self._call("set tag", self.client().set_model_version_tag, name, str(version), key, value)

    def model_ui_url(self, name: str, version: str | None = None) -> str:
        if not self.ui_url:
            return ""
        base = f"{self.ui_url}/#/models/{name}"
        return f"{base}/versions/{version}" if version else base

    def _require_model(self, client, name: str) -> None:
        what = f"model {name!r}"
        try:
            self._checked_model(what, self._call(what, client.get_registered_model, name))
        except ModelNotFoundError:
            known = [m.name for m in self._call("list registered models", client.search_registered_models)]
            raise ModelNotFoundError(f"registered model {name!r} does not exist; known models: {sorted(known)}") from None

    def _info(self, client, mv, metrics: bool = True) -> VersionInfo:
        run_metrics: dict[str, Any] = {}
        if metrics and mv.run_id:
            run = self._call(f"run {mv.run_id}", client.get_run, mv.run_id)
            run_metrics = dict(run.data.metrics)
        return VersionInfo(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id or "",
            source=mv.source or "",
            aliases=sorted(getattr(mv, "aliases", []) or []),
            tags=dict(mv.tags or {}),
            created_ms=int(mv.creation_timestamp or 0),
            download_uri=self._call("download uri", client.get_model_version_download_uri, mv.name, mv.version)
            if metrics
            else "",
            metrics=run_metrics,
        )
