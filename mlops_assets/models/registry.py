"""MLflow tracking and model registry, through aliases and tags only.

Stages (`Staging`/`Production`) and `get_latest_versions` are deprecated in MLflow; this project
marks the serving version with the alias `champion` and a candidate with `challenger`, and keeps
deployment facts in version tags. MLflow is imported lazily: the code location must load without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

CHAMPION = "champion"
CHALLENGER = "challenger"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class RegistryError(RuntimeError):
    """MLflow answered with an error, or cannot be reached."""


class UnknownModelError(LookupError):
    """The registered model, version or alias does not exist."""


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ValueError(
            f"invalid registered model name {name!r}: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


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
        # MLflow's registry URI scheme is `models:/name/version` (the guide's `models://` is wrong).
        return f"models:/{self.name}/{self.version}"


class MlflowRegistry(dg.ConfigurableResource):
    """MLflow registry and tracking (SQLite under MLOPS_HOME locally), by aliases and tags."""

    tracking_uri: str
    artifact_root: str
    ui_url: str = ""

    def client(self):
        import os

        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("http"):
            # MLflow's default retries take minutes against a dead server; fail in seconds instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _call(self, what: str, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                raise UnknownModelError(f"{what}: {exc.message}") from None
            raise RegistryError(f"{what} failed against {self.tracking_uri}: {exc.message}") from exc
        except (OSError, ConnectionError) as exc:
            raise RegistryError(f"{what}: MLflow at {self.tracking_uri} is unreachable ({exc})") from exc

    def ensure_experiment(self, name: str) -> str:
        """The experiment's id, creating it with its artifacts under `artifact_root`."""
        client = self.client()
        found = self._call(f"experiment {name!r}", client.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(self.artifact_root, name).as_uri()
        return self._call(f"create experiment {name!r}", client.create_experiment, name, artifact_location=location)

    def model_names(self) -> list[str]:
        client = self.client()
        return sorted(m.name for m in self._call("list registered models", client.search_registered_models))

    def get_version(self, name: str, version: str | int) -> VersionInfo:
        """One registered version; `UnknownModelError` names the model's known versions if absent."""
        validate_model_name(name)
        version = str(version)
        if not version.isdigit():
            raise ValueError(f"model version must be a positive integer, got {version!r}")
        client = self.client()
        self._require_model(client, name)
        try:
            mv = self._call(f"model {name!r} version {version}", client.get_model_version, name, version)
        except UnknownModelError:
            known = [v.version for v in self.versions(name)]
            raise UnknownModelError(f"model {name!r} has no version {version}; known versions: {known}") from None
        return self._info(client, mv)

    def version_by_alias(self, name: str, alias: str) -> VersionInfo:
        validate_model_name(name)
        client = self.client()
        self._require_model(client, name)
        try:
            mv = self._call(f"alias {alias!r} of {name!r}", client.get_model_version_by_alias, name, alias)
        except UnknownModelError:
            raise UnknownModelError(f"model {name!r} has no alias {alias!r}") from None
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
        registry: one indexed probe per new version plus one that finds nothing."""
        validate_model_name(name)
        client = self.client()
        found, number = [], after + 1
        while True:
            try:
                mv = self._call(f"model {name!r} version {number}", client.get_model_version, name, str(number))
            except UnknownModelError:
                return found
            found.append(self._info(client, mv, metrics=False))
            number += 1

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version an alias points to, or None; one indexed lookup (no registry scan)."""
        try:
            return str(self._call(f"alias {alias!r}", self.client().get_model_version_by_alias, name, alias).version)
        except UnknownModelError:
            return None

    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's tags. MLflow's store loads every version for this call, so the
        sensor caches the answer."""
        return dict(self._call(f"model {name!r}", self.client().get_registered_model, name).tags or {})

    def set_version_tag(self, name: str, version: str | int, key: str, value: str) -> None:
        self._call("set tag", self.client().set_model_version_tag, name, str(version), key, value)

    def model_ui_url(self, name: str, version: str | None = None) -> str:
        if not self.ui_url:
            return ""
        base = f"{self.ui_url}/#/models/{name}"
        return f"{base}/versions/{version}" if version else base

    def _require_model(self, client, name: str) -> None:
        try:
            self._call(f"model {name!r}", client.get_registered_model, name)
        except UnknownModelError:
            known = [m.name for m in self._call("list registered models", client.search_registered_models)]
            raise UnknownModelError(f"registered model {name!r} does not exist; known models: {sorted(known)}") from None

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
