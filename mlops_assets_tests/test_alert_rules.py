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


def test_the_capped_copy_the_demo_uses_is_valid_and_only_shortens_for(tmp_path):
    import yaml

    from mlops_assets.core.platform.services import capped_rules

    capped = capped_rules(tmp_path, 15)
    out = subprocess.run(["promtool", "check", "rules", str(capped)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    original, copy = yaml.safe_load(RULES_FILE.read_text()), yaml.safe_load(capped.read_text())
    pairs = zip(original["groups"], copy["groups"], strict=True)
    rules = [(a, b) for ga, gb in pairs for a, b in zip(ga["rules"], gb["rules"], strict=True)]
    assert rules and all({**a, "for": None} == {**b, "for": None} for a, b in rules)
    assert {b["for"] for _, b in rules if "for" in b} == {"15s"}
