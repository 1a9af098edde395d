"""The shipped alert rules: `promtool check rules` accepts them and `promtool test rules` unit-tests
every alert (firing, not firing on idle traffic, labels and annotations). Skips with the reason
where promtool (Debian package `prometheus`) is absent."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mlops_assets.platform.services import RULES_FILE

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package `prometheus`)")


def test_promtool_accepts_the_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout


def test_promtool_unit_tests_pass():
    tests = RULES_FILE.with_name("mlops-alerts.test.yaml")
    out = subprocess.run(["promtool", "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
