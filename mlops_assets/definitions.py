"""The code location: everything under `defs/`, loaded the way `dg` projects are.

`defs/` holds one folder per domain (platform, models, serving, monitoring) with its jobs, sensors
and asset factories, one `defs.yaml` per served model (`defs/models/<name>/`, an `MlflowModel`
component) and `defs/resources.py`, the one place that picks implementations for the environment.
The engine they call lives in `core/` and never imports Dagster.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml
from dagster_shared.yaml_utils import SourcePositionTree, parse_yamls_with_source_position

DEFS_DIR = Path(__file__).parent / "defs"
COMPONENT_TYPES = {"mlops_assets.components.MlflowModel", "mlops_assets.components.mlflow_model.MlflowModel"}


def _line_at(tree: SourcePositionTree, path: tuple) -> int:
    """The line of the YAML value at `path` (mapping keys and sequence indexes), or of the deepest one found; a
    mapping or a sequence starts at its first entry."""
    for step in path:
        if step not in tree.children:
            break
        tree = tree.children[step]
    return next(iter(tree.children.values()), tree).position.start.line


def check_declarations(defs_dir: Path = DEFS_DIR) -> None:
    """Every model declaration is valid, and each registered model is declared once; otherwise fail
    naming the file, the line and the field. Dagster's loader checks the YAML's shape with lines too,
    but values it might still template (strings: a strategy, a name) only after, without a line; and
    two declarations of one model would only show as a duplicated asset key. The YAML is read by the loader's own
    parser (values and lines in one pass, as the loader will see them)."""
    import pydantic

    from mlops_assets.core.declaration import ModelDeclaration

    seen: dict[str, str] = {}
    for path in sorted(defs_dir.rglob("defs.yaml")):
        for parsed in parse_yamls_with_source_position(path.read_text(encoding="utf-8"), str(path)):
            document, lines = parsed.value, parsed.source_position_tree
            if not isinstance(document, dict) or document.get("type") not in COMPONENT_TYPES:
                continue
            attributes = document.get("attributes")
            if not isinstance(attributes, dict) or "{{" in yaml.safe_dump(attributes):
                continue  # the loader reports a missing mapping; templated values are checked once rendered
            try:
                declaration = ModelDeclaration(**attributes)
            except pydantic.ValidationError as exc:
                error = exc.errors()[0]
                field = ".".join(str(step) for step in error["loc"])
                line = _line_at(lines, ("attributes", *error["loc"]))
                raise dg.DagsterInvalidDefinitionError(
                    f"{path}:{line}: invalid model declaration, field attributes.{field}: {error['msg']}"
                ) from None
            where = f"{path}:{_line_at(lines, ('attributes', 'name'))}"
            if declaration.name in seen:
                raise dg.DagsterInvalidDefinitionError(
                    f"model {declaration.name!r} is declared twice: {seen[declaration.name]} and {where} "
                    "(field attributes.name); keep one declaration per registered model"
                )
            seen[declaration.name] = where


def build_definitions() -> dg.Definitions:
    """Everything under `defs/`, with the resources for the environment (settings read now)."""
    check_declarations()
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        # One process per run, not per step: every step would otherwise pay the imports of
        # dagster, MLflow and pandas again; the steps here wait on I/O, not on CPU.
        dg.Definitions(executor=dg.in_process_executor),
    )


def unbound_assets_and_checks() -> tuple[list, list]:
    """Every asset and asset check of the code location, for tests that supply their own resources."""
    loaded = build_definitions()
    return list(loaded.assets or []), list(loaded.asset_checks or [])


@dg.definitions
def defs() -> dg.Definitions:
    """What `dagster`, `dg` and the code server load: built on load, never at import."""
    return build_definitions()
