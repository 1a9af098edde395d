"""The one environment switch: defaults, and a clear error for every bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops_assets.core.settings import VARIABLES, SettingsError, load_settings


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({})
    assert s.env == "local"
    assert s.home == (tmp_path / ".mlops").resolve()
    assert s.mlflow_tracking_uri == f"sqlite:///{s.home}/mlflow/mlflow.db"
    assert s.mlflow_ui_port == int(VARIABLES["MLOPS_MLFLOW_UI_PORT"])
    assert s.mlflow_ui_url.startswith("http://127.0.0.1:")


def test_overrides():
    s = load_settings({"MLOPS_ENV": "Kubernetes", "MLOPS_HOME": "/srv/x", "MLOPS_MLFLOW_UI_PORT": "6000"})
    assert (s.env, s.home, s.mlflow_ui_port) == ("kubernetes", Path("/srv/x"), 6000)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"MLOPS_ENV": "cloud"}, "MLOPS_ENV"),
        ({"MLOPS_MLFLOW_UI_PORT": "http"}, "MLOPS_MLFLOW_UI_PORT"),
        ({"MLOPS_PROMETHEUS_PORT": "70000"}, "MLOPS_PROMETHEUS_PORT"),
    ],
)
def test_bad_values_name_the_variable(environ, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ)
