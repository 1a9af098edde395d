"""Component types of this project: what users declare in `defs/**/defs.yaml`."""

from mlops_assets.components.mlflow_model import MlflowModel

__all__ = ["MlflowModel"]
