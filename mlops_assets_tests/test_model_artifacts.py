"""`core.model_artifacts` reads what any registered pyfunc model carries, from real MLflow on SQLite.

Versions are registered the way a team would, by a plain script-like helper calling MLflow's API (no
mocks, nothing from the demo): a scikit-learn regressor pipeline (numeric, boolean and string columns)
logged with signature, input example, a training dataset (`mlflow.log_input`) and installed pip
requirements; a custom `mlflow.pyfunc.PythonModel` logged with none of them and a requirement that is
not installed; and one whose training data is only the run artifact `reference/training_data.parquet`
(its logged dataset has no loadable source) and whose input example is a dict of columns; and one
whose input example is a numpy array (MLflow infers a tensor signature, which names no columns). The
conversion of every input example format MLflow writes into a table is checked on its own. Covered:
what each of `input_example`, `input_schema`, `training_data` and `missing_requirements` returns, the
`ModelArtifactMissingError` naming the MLflow call that logs what is missing, and that a dead tracking
server is `RegistryUnavailableError`, never "missing".
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mlops_assets.core.model_artifacts import (
    ModelArtifactMissingError,
    ModelInputs,
    input_example,
    input_schema,
    missing_requirements,
    training_data,
)
from mlops_assets.core.registry import MlflowRegistry, RegistryError, RegistryUnavailableError, VersionInfo

FUNCTIONS = [input_example, input_schema, training_data, missing_requirements]
NOT_INSTALLED = "definitely-not-installed-pkg==1.0"


class ConstantClassifier:
    """A custom pyfunc model (wrapped below), registered with nothing but its requirements."""

    def predict(self, context, model_input, params=None):
        return np.zeros(len(model_input), dtype=int)


def make_table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "amount": rng.normal(100, 20, rows).round(2),
            "items": rng.integers(1, 6, rows),
            "member": rng.integers(0, 2, rows).astype(bool),
            "city": rng.choice(["lyon", "oslo", "lima"], rows),
        }
    )
    table["price"] = table["amount"] * 1.5 + table["items"] + table["member"] * 3
    return table


@dataclass
class Logged:
    """What the helper logged for one version, to compare with what the functions read back."""

    version: VersionInfo
    example: pd.DataFrame | None = None
    train: pd.DataFrame | None = None


def register(
    registry: MlflowRegistry,
    name: str,
    model: Any,
    *,
    flavor: str = "sklearn",
    example: Any = None,
    signature: bool = False,
    dataset: pd.DataFrame | None = None,
    dataset_file: Path | None = None,
    reference: pd.DataFrame | None = None,
    pip_requirements: list[str],
) -> VersionInfo:
    """Log and register one version as a team's training script would: MLflow's API only."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    experiment_id = registry.ensure_experiment("teams")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        if dataset is not None:
            if dataset_file is not None:
                dataset.to_parquet(dataset_file)
            source = str(dataset_file) if dataset_file is not None else None
            mlflow.log_input(mlflow.data.from_pandas(dataset, source=source, targets="price"), context="training")
        if reference is not None:
            with tempfile.TemporaryDirectory() as tmp:
                reference.to_parquet(Path(tmp, "training_data.parquet"))
                mlflow.log_artifact(str(Path(tmp, "training_data.parquet")), artifact_path="reference")
        kwargs: dict[str, Any] = {"name": "model", "input_example": example, "pip_requirements": pip_requirements}
        if signature:
            kwargs["signature"] = infer_signature(example, model.predict(example))
        if flavor == "sklearn":
            info = mlflow.sklearn.log_model(model, **kwargs)
        else:
            info = mlflow.pyfunc.log_model(python_model=model, **kwargs)
    client = registry.client()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, info.model_uri, run_id=run.info.run_id)
    return registry.get_version(name, mv.version)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> MlflowRegistry:
    home = tmp_path_factory.mktemp("model_artifacts")
    (home / "mlflow").mkdir()
    return MlflowRegistry(tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", artifact_root=str(home / "mlflow" / "artifacts"))


@pytest.fixture(scope="module")
def regressor(store, tmp_path_factory) -> Logged:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    train = make_table(40, seed=1)
    features = train.drop(columns="price")
    pipeline = Pipeline(
        [
            (
                "features",
                ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])], remainder="passthrough"),
            ),
            ("model", Ridge()),
        ]
    ).fit(features, train["price"])
    example = features.head(3)
    version = register(
        store,
        "price_regressor",
        pipeline,
        example=example,
        signature=True,
        dataset=train,
        dataset_file=tmp_path_factory.mktemp("data") / "train.parquet",
        pip_requirements=["scikit-learn", "pandas", "numpy"],
    )
    return Logged(version, example=example, train=train)


@pytest.fixture(scope="module")
def bare(store) -> Logged:
    import mlflow.pyfunc

    class Classifier(ConstantClassifier, mlflow.pyfunc.PythonModel):
        pass

    requirements = ["pandas", NOT_INSTALLED, 'other-missing-pkg==2.0; python_version < "3"']
    return Logged(register(store, "bare_classifier", Classifier(), flavor="pyfunc", pip_requirements=requirements))


@pytest.fixture(scope="module")
def artifact_only(store) -> Logged:
    """Training data only as the run artifact; the logged dataset has no source (MLflow records a
    CodeDatasetSource: schema and digest, no rows). The input example is a dict of columns."""
    import mlflow.pyfunc

    class Classifier(ConstantClassifier, mlflow.pyfunc.PythonModel):
        pass

    train = make_table(12, seed=2)
    example = {"amount": [10.5, 20.0], "city": ["lyon", "oslo"]}
    version = register(
        store,
        "artifact_classifier",
        Classifier(),
        flavor="pyfunc",
        example=example,
        dataset=train,
        reference=train.drop(columns="price"),
        pip_requirements=["pandas"],
    )
    return Logged(version, example=pd.DataFrame(example), train=train.drop(columns="price"))


def test_a_fully_logged_regressor_yields_example_schema_training_data_and_no_missing_requirement(store, regressor):
    version = regressor.version
    pd.testing.assert_frame_equal(input_example(store, version), regressor.example.reset_index(drop=True))
    assert input_schema(store, version) == ModelInputs(
        names=["amount", "items", "member", "city"], numeric=["amount", "items"], categorical=["member", "city"]
    )
    pd.testing.assert_frame_equal(training_data(store, version), regressor.train)
    assert missing_requirements(store, version) == []


def test_a_model_name_and_version_number_work_as_a_version_info(store, regressor):
    name, number = regressor.version.name, int(regressor.version.version)
    assert input_schema(store, name, number).names == ["amount", "items", "member", "city"]
    assert len(input_example(store, name, str(number))) == 3
    # A VersionInfo without its download uri (as `versions()` lists them) is resolved through the registry.
    listed = store.versions(name)[0]
    assert listed.download_uri == ""
    assert list(input_example(store, listed).columns) == ["amount", "items", "member", "city"]


@pytest.mark.parametrize(
    "function, expected",
    [
        (input_example, ["has no input example", "input_example=<a few rows of its input>", "validate each new revision"]),
        (input_schema, ["has no signature", "signature=infer_signature(X, model.predict(X))"]),
        (
            training_data,
            ["has no training data", "mlflow.log_input(mlflow.data.from_pandas(", 'context="training"', "reference"],
        ),
    ],
    ids=["input_example", "input_schema", "training_data"],
)
def test_what_a_version_was_not_logged_with_is_named_with_the_call_that_logs_it(store, bare, function, expected):
    with pytest.raises(ModelArtifactMissingError) as raised:
        function(store, bare.version)
    message = str(raised.value)
    assert message.startswith(f"bare_classifier v{bare.version.version} has no ")
    for text in expected:
        assert text in message
    assert isinstance(raised.value, RegistryError) and not isinstance(raised.value, RegistryUnavailableError)


def test_requirements_not_installed_are_reported_and_mlflow_and_other_platforms_markers_are_not(store, bare):
    # MLflow adds `mlflow==<version>` to requirements.txt itself; it never counts, nor does a line
    # whose marker excludes this interpreter.
    assert missing_requirements(store, bare.version) == [NOT_INSTALLED]


def test_training_data_falls_back_to_the_reference_artifact_and_a_dict_example_is_a_table(store, artifact_only):
    pd.testing.assert_frame_equal(training_data(store, artifact_only.version), artifact_only.train)
    pd.testing.assert_frame_equal(input_example(store, artifact_only.version), artifact_only.example)


def test_a_training_dataset_whose_file_is_gone_falls_through_and_is_named(store, regressor, tmp_path):
    # The regressor's dataset source is a parquet file outside MLflow; once it is gone, the version has
    # no readable training data, and the message says which dataset could not be read.
    import mlflow

    run = store.client().get_run(regressor.version.run_id)
    source = Path(mlflow.data.get_source(run.inputs.dataset_inputs[0].dataset).uri)
    moved = tmp_path / "moved.parquet"
    source.rename(moved)
    try:
        with pytest.raises(ModelArtifactMissingError, match="could not be read") as raised:
            training_data(store, regressor.version)
        assert "could not be read: dataset 'dataset' (loading its local source failed" in str(raised.value)
    finally:
        moved.rename(source)


@pytest.fixture(scope="module")
def tensor_model(store) -> Logged:
    """A pyfunc logged with a numpy array as input example: MLflow infers a tensor signature."""
    import mlflow.pyfunc

    class Classifier(ConstantClassifier, mlflow.pyfunc.PythonModel):
        pass

    example = np.array([[1.0, 2.0], [3.0, 4.0]])
    version = register(store, "tensor_classifier", Classifier(), flavor="pyfunc", example=example, pip_requirements=["numpy"])
    return Logged(version, example=pd.DataFrame(example))


def test_an_array_example_is_a_table_but_a_tensor_signature_names_no_columns(store, tensor_model):
    pd.testing.assert_frame_equal(input_example(store, tensor_model.version), tensor_model.example)
    with pytest.raises(ModelArtifactMissingError, match="has no column-based signature: .*tensors"):
        input_schema(store, tensor_model.version)


@pytest.mark.parametrize(
    "example, expected",
    [
        ({"a": [1, 2], "c": ["x", "y"]}, pd.DataFrame({"a": [1, 2], "c": ["x", "y"]})),
        ({"a": 1, "c": "x"}, pd.DataFrame({"a": [1], "c": ["x"]})),
        ([{"a": 1, "c": "x"}, {"a": 2, "c": "y"}], pd.DataFrame({"a": [1, 2], "c": ["x", "y"]})),
        ({"dataframe_split": {"columns": ["a", "c"], "data": [[1, "x"]]}}, pd.DataFrame({"a": [1], "c": ["x"]})),
        ({"dataframe_records": [{"a": 1, "c": "x"}]}, pd.DataFrame({"a": [1], "c": ["x"]})),
        # A column that happens to be called like a payload key is a column.
        ({"inputs": [1, 2], "c": ["x", "y"]}, pd.DataFrame({"inputs": [1, 2], "c": ["x", "y"]})),
        (np.array([1.0, 2.0]), pd.DataFrame([[1.0, 2.0]], columns=["a", "c"])),
        ({"a": {"nested": 1}}, None),
        (np.zeros((2, 2, 2)), None),
    ],
    ids=["columns", "one row", "records", "dataframe_split", "dataframe_records", "inputs column", "1-d array", "nested", "3-d"],
)
def test_each_input_example_format_mlflow_writes_becomes_a_table(example, expected):
    from mlops_assets.core.model_artifacts import _as_frame

    frame = _as_frame(example, ["a", "c"])
    if expected is None:
        assert frame is None
    else:
        pd.testing.assert_frame_equal(frame, expected)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_a_dead_tracking_server_is_unavailable_not_missing(monkeypatch, tmp_path, bare, function):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    dead = MlflowRegistry(tracking_uri=f"http://127.0.0.1:{closed_port()}", artifact_root=str(tmp_path))
    with pytest.raises(RegistryUnavailableError, match="connection refused"):
        function(dead, "bare_classifier", 1)
    # The same with a VersionInfo that must be resolved (or whose run must be read) through the server.
    unresolved = VersionInfo(
        name="bare_classifier", version="1", run_id=bare.version.run_id, source="", aliases=[], tags={}, created_ms=0
    )
    with pytest.raises(RegistryUnavailableError, match="connection refused"):
        function(dead, unresolved)
