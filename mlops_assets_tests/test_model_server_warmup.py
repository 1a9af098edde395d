"""The model server warms its model up on the logged input example before it says ready (`_warm_up`), so a
canary's first requests are not judged cold against a warm baseline; without an example, or when the example
fails, it serves as it is. The pyfunc is a stand-in here (the real model server is exercised end to end by
test_local_platform and the rollout tests); what is checked is which calls are made."""

from __future__ import annotations

import pandas as pd

from mlops_assets.servers.model_server import WARM_UP_PREDICTIONS, make_model_class


class Pyfunc:
    def __init__(self, example, fail: bool = False) -> None:
        self.input_example, self.fail, self.frames = example, fail, []

    def predict(self, frame):
        self.frames.append(frame)
        if self.fail:
            raise RuntimeError("broken model")
        return [0.5] * len(frame)


def _model(pyfunc: Pyfunc):
    model = make_model_class()("m", "file:///nowhere")
    model.pyfunc, model.columns, model.dtypes = pyfunc, ["amount", "country"], {"amount": float}
    return model


def test_the_input_example_is_scored_before_ready_in_the_models_column_order():
    pyfunc = Pyfunc(pd.DataFrame([{"country": "FR", "amount": 3.0}]))
    _model(pyfunc)._warm_up()
    assert len(pyfunc.frames) == WARM_UP_PREDICTIONS >= 1
    assert list(pyfunc.frames[0].columns) == ["amount", "country"]


def test_no_example_or_a_failing_one_leaves_the_server_as_it_is(capsys):
    none = Pyfunc(None)
    _model(none)._warm_up()
    assert none.frames == []
    failing = Pyfunc(pd.DataFrame([{"amount": 1.0, "country": "FR"}]), fail=True)
    _model(failing)._warm_up()  # no exception: serving decides the rest
    assert len(failing.frames) == 1 and "warm-up on the input example skipped" in capsys.readouterr().err
