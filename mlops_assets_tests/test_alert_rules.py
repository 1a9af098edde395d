"""The shipped alert rules: `promtool check rules` accepts them and `promtool test rules` unit-tests
every alert (firing, not firing on idle traffic, labels and annotations). Skips with the reason
where promtool (Debian package `prometheus`) is absent."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mlops_assets.core.platform.services import RULES_FILE

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package `prometheus`)")


def test_promtool_accepts_the_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout


def test_promtool_unit_tests_pass():
    tests = RULES_FILE.with_name("mlops-alerts.test.yaml")
    out = subprocess.run(["promtool", "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_local_copy_is_valid_and_changes_only_for_and_the_slo_thresholds(tmp_path):
    import yaml

    from mlops_assets.core.platform.services import local_rules

    local = local_rules(tmp_path, slo={"max_error_rate": 0.05, "max_p95_latency_s": 2.0}, max_for_s=15)
    out = subprocess.run(["promtool", "check", "rules", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    original, copy = yaml.safe_load(RULES_FILE.read_text()), yaml.safe_load(local.read_text())
    pairs = zip(original["groups"], copy["groups"], strict=True)
    rules = {a.get("alert") or a["record"]: (a, b) for ga, gb in pairs for a, b in zip(ga["rules"], gb["rules"], strict=True)}
    assert rules and all({**a, "for": None, "expr": None} == {**b, "for": None, "expr": None} for a, b in rules.values())
    # Every `for:` capped but the latency alerts', which keep the rules' own (a busy box is not a slow model).
    latency = {name for name in rules if name and "Latency" in name}
    assert latency == {"InferenceHighLatencyP95", "InferenceHighLatencyP95Mesh"}
    assert {b["for"] for name, (a, b) in rules.items() if "for" in b and name not in latency} == {"15s"}
    assert all(rules[name][1]["for"] == rules[name][0]["for"] == "5m" for name in latency)
    changed = {name: b["expr"] for name, (a, b) in rules.items() if a["expr"] != b["expr"]}
    assert set(changed) == {"InferenceHighErrorRate", "InferenceHighLatencyP95"}
    assert ") > 0.05" in changed["InferenceHighErrorRate"] and "> 0.1" in changed["InferenceHighErrorRate"]
    assert ") > 2" in changed["InferenceHighLatencyP95"]


def test_the_shipped_slo_thresholds_are_the_rollout_policys_defaults(tmp_path):
    """One SLO: with the default policy the local copy is the shipped rules, threshold for threshold."""
    import yaml

    from mlops_assets.core.platform.services import SLO_ALERTS, local_rules
    from mlops_assets.core.rollout.policy import RolloutPolicy

    policy = RolloutPolicy()
    local = local_rules(tmp_path, slo={field: getattr(policy, field) for field in SLO_ALERTS.values()})
    assert yaml.safe_load(local.read_text()) == yaml.safe_load(RULES_FILE.read_text())


def test_every_alert_the_sensor_rolls_back_on_names_its_service_and_revision():
    """prometheus_alert_sensor maps an alert to a model by its `isvc` label and acts only on the
    stable `revision`: each rollback alert (the router's locally, the Istio sidecars' on a cluster)
    exists in the rules and, in promtool's unit tests, fires with both labels."""
    import yaml

    from mlops_assets.core.monitoring.alerts import RETRAIN_ALERTS, ROLLBACK_ALERTS

    rules = {r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert ROLLBACK_ALERTS | RETRAIN_ALERTS <= rules
    tests = yaml.safe_load(RULES_FILE.with_name("mlops-alerts.test.yaml").read_text())["tests"]
    fired = {}
    for case in tests:
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                fired.setdefault(check["alertname"], []).append(alert["exp_labels"])
    for name in ROLLBACK_ALERTS:
        assert fired.get(name), f"{name} never fires in the unit tests"
        assert all({"isvc", "revision"} <= set(labels) for labels in fired[name]), (name, fired[name])
