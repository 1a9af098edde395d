"""What a registered model version says about itself: read from MLflow, for any pyfunc model.

The platform serves whatever MLflow pyfunc model a team registers (a scikit-learn pipeline, a custom
`mlflow.pyfunc.PythonModel`, a regressor or a classifier, on any table), so nothing here knows a
model: everything comes from what was logged with the version.

- `input_example`: the rows logged with `input_example=` (MLflow keeps them beside the MLmodel file),
  sent to validate each new revision.
- `input_schema`: the input columns of the version's signature, split numeric / categorical.
- `training_data`: the reference data it was trained on, for drift: a dataset logged as an input of
  its run with context "training" whose source can be loaded, else the run artifact
  `reference/training_data.parquet`.
- `missing_requirements`: the packages of its `requirements.txt` that are not installed here.

Each function takes the registry and either a `VersionInfo` or a model name and version number.
What the version does not carry raises `ModelArtifactMissingError` (a `RegistryError`), whose message
names the model and version and the exact MLflow call that logs what is missing. Failures to reach
MLflow or its artifact store map as in `registry`: a dead tracking server is
`RegistryUnavailableError`, never "missing", because presence is decided from MLflow's answers (the
MLmodel metadata, artifact listings), never from a failed download. MLflow and pandas are imported
inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_assets.core.registry import MlflowRegistry, RegistryError, VersionInfo, _one_line

if TYPE_CHECKING:
    import pandas as pd

#: The run artifact the platform falls back to for the training data (what the demo logs).
REFERENCE_ARTIFACT = "reference/training_data.parquet"
#: The dataset context `mlflow.log_input(..., context=...)` must carry to be read as training data.
TRAINING_CONTEXT = "training"
# MLflow ColSpec types read as numeric. Booleans are categorical: two levels whose frequencies are what
# drift compares; a mean or a quantile test over 0/1 says little.
_NUMERIC_TYPES = {"integer", "long", "float", "double"}
_CATEGORICAL_TYPES = {"string", "boolean"}
# Never reported missing: serving runs on MLflow, whichever of its distributions is installed.
_ALWAYS_SATISFIED = {"mlflow", "mlflow-skinny"}

_LOG_INPUT_EXAMPLE = "the model with `mlflow.<flavor>.log_model(..., input_example=<a few rows of its input>)`"
_LOG_SIGNATURE = "the model with `mlflow.<flavor>.log_model(..., signature=infer_signature(X, model.predict(X)))`"
_LOG_TRAINING_DATASET = (
    '`mlflow.log_input(mlflow.data.from_pandas(train_df, source="<uri of a parquet/csv file holding train_df>"), '
    'context="training")` in the run that logs the model'
)
_LOG_REFERENCE_ARTIFACT = (
    '`train_df.to_parquet("training_data.parquet"); mlflow.log_artifact("training_data.parquet", '
    'artifact_path="reference")` in that run'
)
_LOG_REQUIREMENTS = 'the model with `mlflow.<flavor>.log_model(..., pip_requirements=["<package>==<version>", ...])`'


class ModelArtifactMissingError(RegistryError):
    """A working registry holds the version, but not something it was expected to be logged with.
    The message names the model and version and the MLflow call that logs what is missing."""

    def __init__(self, version: VersionInfo, missing: str, how: str, purpose: str, detail: str = "") -> None:
        self.model, self.version, self.missing = version.name, version.version, missing
        message = f"{version.name} v{version.version} has no {missing}: log {how}; {purpose}"
        super().__init__(message + (f". {detail}" if detail else ""))


@dataclass(frozen=True)
class ModelInputs:
    """A version's input columns from its signature, in order. `numeric`: integer, long, float and
    double columns; `categorical`: string and boolean columns; any other type (binary, datetime, arrays,
    objects, maps) is in `names` only (see `other`)."""

    names: list[str]
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)

    @property
    def other(self) -> list[str]:
        typed = set(self.numeric) | set(self.categorical)
        return [name for name in self.names if name not in typed]


def _resolve(registry: MlflowRegistry, model: VersionInfo | str, version: str | int | None) -> VersionInfo:
    if isinstance(model, VersionInfo):
        if version is not None:
            raise TypeError("pass a VersionInfo alone, or a model name and a version number")
        return model
    if version is None:
        raise TypeError(f"model {model!r}: a version number is needed with a model name")
    return registry.get_version(model, version)


class _ModelDir:
    """The version's model directory in the artifact store: the files it holds (from the store's
    listing, so an absent file is an answer, not a failure) and their download into a temporary dir."""

    def __init__(self, registry: MlflowRegistry, info: VersionInfo, local: Path) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.registry, self.info, self.local = registry, info, local
        uri = info.download_uri
        if not uri:
            what = f"download uri of {info.name!r} version {info.version}"
            uri = registry._call(what, registry.client().get_model_version_download_uri, info.name, info.version)
        self.what = f"model files of {info.name!r} version {info.version} at {uri}"
        self.repo = registry._call(
            self.what, get_artifact_repository, uri, tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri
        )
        listing = registry._call(self.what, self.repo.list_artifacts)
        self.files = {Path(f.path).name for f in listing if not f.is_dir}
        if "MLmodel" not in self.files:
            # Every MLflow model directory has one: without it this is not the version's model at all.
            raise registry._unavailable(self.what, f"the model directory has no MLmodel file (it holds {sorted(self.files)})")

    def fetch(self, name: str) -> Path:
        """Download `name` (a file the listing holds) into the local directory."""
        if name not in self.files:
            raise self.registry._unavailable(self.what, f"the MLmodel file names {name}, which the model directory does not hold")
        return Path(self.registry._call(self.what, self.repo.download_artifacts, name, dst_path=str(self.local)))

    def mlmodel(self):
        from mlflow.models import Model

        return self.registry._call(self.what, Model.load, str(self.fetch("MLmodel")))


@contextmanager
def _model_dir(registry: MlflowRegistry, info: VersionInfo) -> Iterator[_ModelDir]:
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
        yield _ModelDir(registry, info, Path(tmp))


def input_example(registry: MlflowRegistry, model: VersionInfo | str, version: str | int | None = None) -> pd.DataFrame:
    """The input example logged with the version, as a DataFrame. MLflow stores it as `input_example.json`
    beside the MLmodel file, whose `saved_input_example_info` names it and its type: `dataframe` (pandas'
    split orient, what a DataFrame becomes), `json_object` (a dict: of columns, of one row, or a serving
    payload such as `{"dataframe_split": ...}`), or `ndarray` (columns named by the signature)."""
    info = _resolve(registry, model, version)
    with _model_dir(registry, info) as model_dir:
        mlmodel = model_dir.mlmodel()
        example_info = mlmodel.saved_input_example_info or {}
        if not example_info.get("artifact_path"):
            raise ModelArtifactMissingError(
                info, "input example", _LOG_INPUT_EXAMPLE, "the platform sends it to validate each new revision"
            )
        model_dir.fetch(example_info["artifact_path"])
        example = registry._call(model_dir.what, mlmodel.load_input_example, str(model_dir.local))
    names = _signature_names(mlmodel.signature)
    frame = _as_frame(example, names)
    if frame is None:
        raise ModelArtifactMissingError(
            info,
            "tabular input example",
            _LOG_INPUT_EXAMPLE + " with a pandas DataFrame (or a dict of columns)",
            "the platform sends it to validate each new revision",
            f"Its input example is of MLflow type {example_info.get('type')!r}, which is not a table",
        )
    return frame


def _signature_names(signature) -> list[str]:
    inputs = getattr(signature, "inputs", None)
    if inputs is None or not inputs.has_input_names():
        return []
    return [str(name) for name in inputs.input_names()]


def _as_frame(example: Any, names: list[str]) -> pd.DataFrame | None:
    """A DataFrame from what `Model.load_input_example` returns, or None if it is not tabular."""
    import numpy as np
    import pandas as pd

    if isinstance(example, pd.DataFrame):
        return example.reset_index(drop=True)
    if isinstance(example, dict):
        # A serving payload (what `serving_input_example.json` holds) saved as the example itself.
        if len(example) == 1:
            key, value = next(iter(example.items()))
            if key == "dataframe_split" and isinstance(value, dict):
                return pd.DataFrame(value.get("data", []), columns=value.get("columns"))
            if key in ("dataframe_records", "instances", "inputs"):
                return _as_frame(value, names)
        if example and all(isinstance(v, (list, tuple, np.ndarray)) for v in example.values()):
            return pd.DataFrame(example)
        if example and not any(isinstance(v, (dict, list, tuple, np.ndarray)) for v in example.values()):
            return pd.DataFrame([example])  # one row
        return None
    if isinstance(example, list) and example and all(isinstance(row, dict) for row in example):
        return pd.DataFrame(example)
    if isinstance(example, (list, np.ndarray)):
        array = np.asarray(example)
        if array.ndim == 1:
            array = array.reshape(1, -1) if names and len(names) == len(array) else array.reshape(-1, 1)
        if array.ndim != 2:
            return None
        columns = names if len(names) == array.shape[1] else None
        return pd.DataFrame(array, columns=columns)
    return None


def input_schema(registry: MlflowRegistry, model: VersionInfo | str, version: str | int | None = None) -> ModelInputs:
    """The input columns of the version's signature (a column-based one: MLflow ColSpecs with names)."""
    info = _resolve(registry, model, version)
    with _model_dir(registry, info) as model_dir:
        signature = model_dir.mlmodel().signature
    inputs = getattr(signature, "inputs", None)
    if inputs is None:
        raise ModelArtifactMissingError(info, "signature", _LOG_SIGNATURE, "the platform reads its input columns from it")
    if inputs.is_tensor_spec() or not inputs.has_input_names():
        raise ModelArtifactMissingError(
            info,
            "column-based signature",
            _LOG_SIGNATURE + " with X a pandas DataFrame",
            "the platform reads its input columns from it",
            "Its signature's inputs are " + ("tensors" if inputs.is_tensor_spec() else "unnamed columns"),
        )
    names, numeric, categorical = [], [], []
    for spec in inputs.inputs:
        names.append(str(spec.name))
        kind = getattr(spec.type, "name", "")  # a DataType member; Array, Object, Map and AnyType have none
        if kind in _NUMERIC_TYPES:
            numeric.append(str(spec.name))
        elif kind in _CATEGORICAL_TYPES:
            categorical.append(str(spec.name))
    return ModelInputs(names=names, numeric=numeric, categorical=categorical)


def training_data(registry: MlflowRegistry, model: VersionInfo | str, version: str | int | None = None) -> pd.DataFrame:
    """The data the version was trained on, as logged (all its columns, the target too if it was logged
    with it: select `input_schema(...).names` for the model's inputs). Looked for in the version's run:
    (a) a dataset input with context "training" whose source loads (in the order MLflow lists them),
    (b) the artifact `reference/training_data.parquet`."""
    info = _resolve(registry, model, version)
    unreadable: list[str] = []
    if info.run_id:
        client = registry.client()
        run = registry._call(f"run {info.run_id} of {info.name!r} version {info.version}", client.get_run, info.run_id)
        for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
            if not _is_training(dataset_input):
                continue
            frame, why = _load_dataset(dataset_input.dataset)
            if frame is not None:
                return frame
            unreadable.append(f"dataset {dataset_input.dataset.name!r} ({why})")
        frame = _reference_artifact(registry, info, client)
        if frame is not None:
            return frame
    how = f"either {_LOG_TRAINING_DATASET}, or {_LOG_REFERENCE_ARTIFACT}"
    detail = "It was registered without a run" if not info.run_id else ""
    if unreadable:
        detail = f"Its run logs training data that could not be read: {'; '.join(unreadable)}"
    raise ModelArtifactMissingError(info, "training data", how, "the platform compares live traffic with it for drift", detail)


def _is_training(dataset_input) -> bool:
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return any(tag.key == MLFLOW_DATASET_CONTEXT and tag.value == TRAINING_CONTEXT for tag in dataset_input.tags or [])


def _load_dataset(dataset) -> tuple[pd.DataFrame | None, str]:
    """The dataset's data from its source, or None and why not. Any failure counts as "cannot be
    loaded" (the caller falls through): the source is the team's storage, not MLflow's."""
    import mlflow

    try:
        source = mlflow.data.get_source(dataset)
    except Exception as exc:
        return None, f"source {dataset.source_type!r} unknown here: {type(exc).__name__}"
    with tempfile.TemporaryDirectory(prefix="mlops-dataset-") as tmp:
        try:
            takes_dst = "dst_path" in inspect.signature(source.load).parameters
            loaded = source.load(dst_path=tmp) if takes_dst else source.load()
            frame = _read_table(loaded)
        except NotImplementedError:
            return None, f"its source ({dataset.source_type}) holds no data; give from_pandas a file as source"
        except Exception as exc:
            return None, _one_line(f"loading its {dataset.source_type} source failed: {type(exc).__name__}: {exc}", 200)
    if frame is None:
        return None, f"its {dataset.source_type} source loads as {type(loaded).__name__}, not a table"
    return frame, ""


def _read_table(loaded: Any) -> pd.DataFrame | None:
    """A DataFrame from what a dataset source's `load()` returns: a DataFrame, a path to a parquet,
    csv or json file (or a directory of parquet files), or an object with `to_pandas`/`toPandas`."""
    import pandas as pd

    if isinstance(loaded, pd.DataFrame):
        return loaded
    if isinstance(loaded, (str, os.PathLike)):
        path = Path(loaded)
        suffix = path.suffix.lower()
        if path.is_dir() or suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
        if suffix in {".csv", ".tsv"}:
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        if suffix in {".json", ".jsonl"}:
            return pd.read_json(path, lines=suffix == ".jsonl")
        return None
    for method in ("to_pandas", "toPandas"):
        if callable(getattr(loaded, method, None)):
            return getattr(loaded, method)()
    return None


def _reference_artifact(registry: MlflowRegistry, info: VersionInfo, client) -> pd.DataFrame | None:
    import pandas as pd

    folder, _, file = REFERENCE_ARTIFACT.rpartition("/")
    what = f"artifacts of run {info.run_id} ({info.name!r} version {info.version})"
    listing = registry._call(what, client.list_artifacts, info.run_id, folder)
    if not any(f.path == REFERENCE_ARTIFACT and not f.is_dir for f in listing):
        return None
    with tempfile.TemporaryDirectory(prefix="mlops-reference-") as tmp:
        local = registry._call(what, client.download_artifacts, info.run_id, REFERENCE_ARTIFACT, tmp)
        return registry._call(what, pd.read_parquet, local)


def missing_requirements(registry: MlflowRegistry, model: VersionInfo | str, version: str | int | None = None) -> list[str]:
    """The lines of the version's `requirements.txt` naming a package that is not installed here at all,
    as written there. Installed packages count whatever their version (serving runs the model on this
    environment's versions; a mismatch is MLflow's warning, not a missing package); mlflow itself never
    counts; requirements whose environment marker does not apply here, pip options (`-c constraints.txt`)
    and lines naming no package (a bare path or URL) are skipped."""
    info = _resolve(registry, model, version)
    with _model_dir(registry, info) as model_dir:
        if "requirements.txt" not in model_dir.files:
            raise ModelArtifactMissingError(
                info, "requirements.txt", _LOG_REQUIREMENTS, "the platform checks them before it deploys"
            )
        lines = model_dir.fetch("requirements.txt").read_text().splitlines()
    installed = _installed_distributions()
    return [line for line in (_requirement_line(raw) for raw in lines) if line and _missing(line, installed)]


def _requirement_line(raw: str) -> str:
    line = raw.split(" #", 1)[0].strip()
    return "" if not line or line.startswith(("#", "-")) else line


def _missing(line: str, installed: set[str]) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        requirement = Requirement(line)
    except InvalidRequirement:
        return False  # a path or URL without a name: nothing to look up
    if requirement.marker is not None and not requirement.marker.evaluate():
        return False
    name = canonicalize_name(requirement.name)
    return name not in _ALWAYS_SATISFIED and name not in installed


def _installed_distributions() -> set[str]:
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    return {canonicalize_name(d.metadata["Name"]) for d in distributions() if d.metadata and d.metadata["Name"]}
