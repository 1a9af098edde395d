"""One model-server process per revision: KServe's `ModelServer` serving an MLflow pyfunc model.

Run as `python -m mlops_assets.servers.model_server <revision.json>`. It answers KServe's V1
(`/v1/models/<name>:predict`) and V2 (`/v2/models/<name>/infer`) REST protocols and exposes
Prometheus `/metrics`. KServe's REST server hard-codes host 0.0.0.0; locally we bind loopback only.
Malformed payloads are answered 400 with a message naming the problem; model failures are 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

#: The numpy dtype each MLflow column type arrives as (JSON numbers are floats or ints; MLflow's schema
#: enforcement refuses a float64 column for a `long` input, so integers stay integers).
_DTYPES = {"double": np.float64, "float": np.float32, "long": np.int64, "integer": np.int32, "boolean": np.bool_}
#: Predictions on the model's input example before the server says ready (see `_warm_up`).
WARM_UP_PREDICTIONS = 3


def _bind_loopback() -> None:
    import kserve.model_server as ms
    from kserve.protocol.rest.server import RESTServer

    class LoopbackRESTServer(RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = "127.0.0.1"

    ms.RESTServer = LoopbackRESTServer


def make_model_class():
    import kserve
    from kserve.errors import InferenceError, InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class MlflowPyfuncModel(kserve.Model):
        """Loads an MLflow pyfunc model from its storage URI and scores V1 or V2 requests."""

        def __init__(self, name: str, storage_uri: str):
            super().__init__(name)
            self.storage_uri = storage_uri
            self.columns: list[str] = []

        def load(self) -> bool:
            import mlflow.pyfunc

            self.pyfunc = mlflow.pyfunc.load_model(self.storage_uri)
            schema = self.pyfunc.metadata.get_input_schema()
            self.columns = list(schema.input_names()) if schema is not None else []
            self.dtypes = {
                spec.name: _DTYPES[kind]
                for spec in (schema.inputs if schema is not None else [])
                if (kind := str(spec.type).removeprefix("DataType.")) in _DTYPES
            }
            self._warm_up()
            self.ready = True
            return self.ready

        def _warm_up(self) -> None:
            """Score the model's logged input example a few times before saying ready, as Triton's and TF Serving's
            warm-up do: a fresh process answers its first predictions slower (lazy imports, first-call caches; here
            ~30 ms then ~8 ms on a quiet box, far more on a busy one), and a canary's latency is judged against the
            warm baseline's from its first request on (a demo run rolled a healthy canary back on its first 28
            requests). A model without an example, or whose example fails, is served as it is."""
            example = getattr(self.pyfunc, "input_example", None)
            if example is None:
                return
            try:
                frame = self._check(example if isinstance(example, pd.DataFrame) else pd.DataFrame(example))
                for _ in range(WARM_UP_PREDICTIONS):
                    self._score(frame)
            except Exception as exc:  # noqa: BLE001 - warming up is best effort; serving decides the rest
                print(f"model server: warm-up on the input example skipped ({type(exc).__name__}: {exc})", file=sys.stderr)

        def _frame_v1(self, payload) -> pd.DataFrame:
            if not isinstance(payload, dict) or "instances" not in payload:
                raise InvalidInput('V1 payload must be a JSON object with an "instances" list')
            rows = payload["instances"]
            if not isinstance(rows, list) or not rows:
                raise InvalidInput('"instances" must be a non-empty list')
            if all(isinstance(r, dict) for r in rows):
                return pd.DataFrame(rows)
            if all(isinstance(r, list) for r in rows):
                if any(len(r) != len(self.columns) for r in rows):
                    raise InvalidInput(f"each instance list must have {len(self.columns)} values in order {self.columns}")
                return pd.DataFrame(rows, columns=self.columns)
            raise InvalidInput("instances must all be objects (feature -> value) or all be lists")

        def _check(self, frame: pd.DataFrame) -> pd.DataFrame:
            missing = [c for c in self.columns if c not in frame.columns]
            if missing:
                raise InvalidInput(f"missing features: {missing}; expected {self.columns}")
            frame = frame[self.columns] if self.columns else frame.copy()
            for column in frame.columns:
                if frame[column].isna().any():
                    raise InvalidInput(f"feature {column!r} has null values")
                dtype = self.dtypes.get(column)
                if dtype is np.bool_:
                    if not frame[column].map(lambda v: isinstance(v, bool) or v in (0, 1)).all():
                        raise InvalidInput(f"feature {column!r} must be true or false")
                    frame[column] = frame[column].astype(np.bool_)
                elif dtype is not None:
                    try:
                        values = pd.to_numeric(frame[column])
                    except (TypeError, ValueError):
                        raise InvalidInput(f"feature {column!r} must be numeric") from None
                    if np.issubdtype(dtype, np.integer) and not (values == values.round()).all():
                        raise InvalidInput(f"feature {column!r} must be a whole number")
                    frame[column] = values.astype(dtype)
                else:
                    frame[column] = frame[column].astype(str)
            return frame

        def _score(self, frame: pd.DataFrame) -> np.ndarray:
            from mlflow.exceptions import MlflowException

            try:
                return np.asarray(self.pyfunc.predict(frame))
            except MlflowException as exc:  # schema enforcement: wrong types or shapes
                raise InvalidInput(f"payload does not match the model signature: {exc.message}") from None
            except Exception as exc:  # noqa: BLE001
                # A registered handler answers 500 and keeps the connection; an unhandled
                # exception would make uvicorn drop the keep-alive connection the router reuses.
                raise InferenceError(f"model failed: {exc.__class__.__name__}: {exc}") from None

        async def predict(self, payload, headers=None, response_headers=None):
            if isinstance(payload, InferRequest):
                try:
                    frame = payload.as_dataframe()
                except Exception as exc:  # noqa: BLE001 - kserve raises plain errors on bad tensors
                    raise InvalidInput(f"cannot decode V2 inputs: {exc}") from None
                preds = await asyncio.get_running_loop().run_in_executor(None, self._score, self._check(frame))
                out = InferOutput(name="fraud_probability", shape=list(preds.shape), datatype="FP64")
                out.set_data_from_numpy(preds.astype(np.float64), binary_data=False)
                return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[out])
            frame = self._check(self._frame_v1(payload))
            preds = await asyncio.get_running_loop().run_in_executor(None, self._score, frame)
            return {"predictions": preds.tolist()}

    return MlflowPyfuncModel


def main(argv: list[str]) -> None:
    config = json.loads(Path(argv[0]).read_text())
    _bind_loopback()
    import kserve

    model = make_model_class()(config["model_name"], config["storage_uri"])
    model.load()
    server = kserve.ModelServer(http_port=config["port"], workers=1, enable_grpc=False, enable_latency_logging=False)
    # Per-request access and timing logs (and a FastAPI deprecation warning per response) cost
    # more CPU than the prediction itself; KServe configures logging in the constructor above.
    warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")
    for noisy in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main(sys.argv[1:])
