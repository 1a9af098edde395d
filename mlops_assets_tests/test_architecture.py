"""The import contracts in pyproject.toml (run by import-linter's `lint-imports`, as scripts/test.sh
does): they hold on the project, and they fail on a copy of the package that breaks them (the engine
importing Dagster; an engine layer importing one above it, which would close a cycle)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=project,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("core/config.py", "import dagster", "never import Dagster"),
        ("core/serving/manifest.py", "import mlops_assets.core.rollout.runner", "Inside the engine"),
        ("core/registry.py", "import mlops_assets.defs.resources", "Layers: cli"),
    ],
)
def test_a_violation_fails_naming_the_contract_and_the_import(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "mlops_assets", tmp_path / "mlops_assets", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "mlops_assets" / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0
    broken = out.stdout.split("Broken contracts", 1)[1]
    assert contract in broken and "mlops_assets." + module.removesuffix(".py").replace("/", ".") in broken
