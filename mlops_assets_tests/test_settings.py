"""The one environment switch: defaults, and a clear error for every bad variable."""

from __future__ import annotations

import re
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


def test_rollout_defaults_are_written_once():
    """MLOPS_ROLLOUT_* defaults live in settings; the policy, the canary analysis and the A/B test use them."""
    from mlops_assets.core.rollout.ab import ABTest
    from mlops_assets.core.rollout.analysis import Thresholds
    from mlops_assets.core.rollout.policy import RolloutPolicy
    from mlops_assets.core.settings import ROLLOUT_VARIABLES

    policy = RolloutPolicy()
    for name, (field, parse, default) in ROLLOUT_VARIABLES.items():
        expected = list(default) if isinstance(default, tuple) else default
        assert parse(VARIABLES[name]) == expected == getattr(policy, field), name
    assert policy.thresholds() == Thresholds()
    ab = ABTest()
    assert (ab.alpha, ab.base_rate, ab.lift) == (policy.ab_alpha, policy.ab_base_rate, policy.ab_min_lift)
    assert load_settings({}).rollout == {}
    overridden = RolloutPolicy(**load_settings({"MLOPS_ROLLOUT_STEPS": "10,50", "MLOPS_ROLLOUT_POLL_S": "0.5"}).rollout)
    assert (overridden.steps, overridden.poll_s, overridden.thresholds().steps) == ([10, 50], 0.5, (10, 50))


def test_namespace_default_is_the_serving_namespace():
    from mlops_assets.core.serving.manifest import Deployment
    from mlops_assets.core.settings import DEFAULT_NAMESPACE

    assert DEFAULT_NAMESPACE == "mlops-serving" == load_settings({}).namespace
    assert Deployment(model_name="m", version="1", storage_uri="s3://b/m").namespace == DEFAULT_NAMESPACE
    assert load_settings({"MLOPS_NAMESPACE": "team-a"}).namespace == "team-a"


def test_mlflow_client_env_defaults_never_override_the_environment():
    from mlops_assets.core.settings import MLFLOW_CLIENT_ENV, apply_mlflow_client_env, mlflow_http_timeout_s

    environ = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    apply_mlflow_client_env(environ=environ)
    assert environ == {**MLFLOW_CLIENT_ENV, "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    assert mlflow_http_timeout_s(environ) == "3" and mlflow_http_timeout_s({}) == "120"


@pytest.mark.parametrize("raw, expected", [(None, False), ("true", True), ("false", False), ("TRUE", True), (" False ", False)])
def test_shadow_capture_is_a_true_or_false_flag(raw, expected):
    assert load_settings({} if raw is None else {"MLOPS_SHADOW_CAPTURE": raw}).shadow_capture is expected


@pytest.mark.parametrize("raw", ["yes", "1", "on", "", "truee"])
def test_a_shadow_capture_that_is_not_true_or_false_names_the_variable(raw):
    with pytest.raises(SettingsError, match=r"MLOPS_SHADOW_CAPTURE=.*expected true or false"):
        load_settings({"MLOPS_SHADOW_CAPTURE": raw})


def test_the_kubernetes_platform_gets_shadow_capture_from_the_settings(tmp_path):
    """defs/resources.py passes MLOPS_SHADOW_CAPTURE to KubernetesPlatform (its payload logger then logs answers
    and X-Request-Id, which a shadow's pairs need); off unless set."""
    from mlops_assets.core.serving.kubernetes import KubernetesPlatform
    from mlops_assets.defs.resources import build_resources

    env = {"MLOPS_ENV": "kubernetes", "MLOPS_HOME": str(tmp_path), "MLOPS_PROMETHEUS_URL": "http://prometheus:9090"}
    for raw, expected in ((None, False), ("true", True), ("false", False)):
        environ = env if raw is None else {**env, "MLOPS_SHADOW_CAPTURE": raw}
        serving = build_resources(load_settings(environ))["serving"]
        assert isinstance(serving, KubernetesPlatform) and serving.shadow_capture is expected, raw
        logger = serving._for_cluster(_manifest())["spec"]["predictor"]["logger"]
        assert (logger["mode"] == "all") is expected and ("metadataHeaders" in logger) is expected


def _manifest() -> dict:
    from mlops_assets.core.serving.manifest import Deployment, build_inference_service

    return build_inference_service(Deployment(model_name="m", version="1", storage_uri="s3://b/m"))


def test_the_readme_configuration_table_lists_exactly_the_variables():
    """README.md's configuration table mirrors VARIABLES: every MLOPS_* variable read here has a row, and no
    row names one that is not read."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(MLOPS_\w+)` \|", section, flags=re.MULTILINE))
    assert rows == {name for name in VARIABLES if name.startswith("MLOPS_")}, rows ^ set(VARIABLES)
