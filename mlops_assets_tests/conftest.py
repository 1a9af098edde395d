"""Shared fixtures: a real MLflow registry on SQLite and real local serving processes; for the cluster path, a
real payload sink process and Istio's VirtualService schema.

Expensive things (training, model-server start-up) happen once per session. At the end of the
session every process started under the test's MLOPS_HOME is stopped, and the suite fails if any
is left running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlops_assets.core.platform import services
from mlops_assets.core.registry import MlflowRegistry
from mlops_assets.core.serving.platform import LocalPlatform
from mlops_assets.demo.training import Fault, train_and_register

MODEL = "fraud_detector"
ISVC = "fraud-detector"
#: The `networking.istio.io/v1` VirtualService schema of Istio 1.27.1's CRD (see test_cluster_ab's docstring).
VS_SCHEMA = Path(__file__).parent / "schemas" / "istio-1.27.1-virtualservice-v1.json"
SHARED_SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"


def processes_under(home: Path) -> list[str]:
    """Command lines of live processes that mention `home` (our servers all do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(home) in cmd and proc.name != str(os.getpid()):
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


@pytest.fixture(scope="session")
def mlops_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("mlops_home")
    (home / "mlflow").mkdir()
    yield home
    LocalPlatform(home=str(home)).stop_all()
    services.stop_all(home)
    leftover = processes_under(home)
    assert not leftover, f"processes left running after the tests: {leftover}"


@pytest.fixture(scope="session")
def registry(mlops_home) -> MlflowRegistry:
    return MlflowRegistry(
        tracking_uri=f"sqlite:///{mlops_home}/mlflow/mlflow.db", artifact_root=str(mlops_home / "mlflow" / "artifacts")
    )


@pytest.fixture(scope="session")
def versions(registry):
    """v1 and v2 are healthy (different data seeds); v3 fails every request (fault injection)."""
    v1 = train_and_register(registry, MODEL, n_rows=3000, seed=1)
    v2 = train_and_register(registry, MODEL, n_rows=3000, seed=2)
    v3 = train_and_register(registry, MODEL, n_rows=3000, seed=3, fault=Fault(error_rate=1.0))
    return {"1": v1, "2": v2, "3": v3}


@pytest.fixture(scope="session")
def platform(mlops_home) -> LocalPlatform:
    return LocalPlatform(home=str(mlops_home), ready_timeout_s=90)


@pytest.fixture(scope="session")
def isvc_schema():
    """KServe's InferenceService CRD schema (../shared/schemas/kserve/) as a validator; skipped where absent."""
    import jsonschema
    import yaml

    if not SHARED_SCHEMA.exists():
        pytest.skip(f"KServe CRD schema not found at {SHARED_SCHEMA}")
    crd = yaml.load(SHARED_SCHEMA.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    # Built once: jsonschema.validate() would re-check this 2 MB schema on every call.
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def vs_validator():
    """Istio 1.27.1's VirtualService schema (`schemas/`) as a validator."""
    import json

    import jsonschema

    return jsonschema.Draft7Validator(json.loads(VS_SCHEMA.read_text()))


@pytest.fixture
def sink(tmp_path):
    """A real payload sink process on 127.0.0.1 (helpers.payload_sink), storing under `tmp_path`: its URL."""
    from mlops_assets_tests.helpers import payload_sink  # here: helpers imports dagster, which not every test needs

    with payload_sink(f"{tmp_path}/store") as url:
        yield url
